// The Tollgate admin console. Plain script, no framework, nothing fetched from another
// origin. Every action is a call to the admin API with the key signed in with, kept in
// this tab's session storage; data reaches the page through textContent only.
"use strict";

const state = { key: sessionStorage.getItem("tollgate.key") || "", role: null, keys: [], teams: [], live: [] };
const $ = (id) => document.getElementById(id);

function say(message, error) {
  const s = $("status");
  s.textContent = message || "";
  s.className = error ? "error" : "";
}

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + state.key };
  const init = { method, headers };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!r.ok) {
    const message = data && data.error && data.error.message ? data.error.message : r.status + " " + r.statusText;
    const err = new Error(message);
    err.status = r.status;
    throw err;
  }
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c === null || c === undefined ? "" : c);
  return e;
}

const isAdmin = () => state.role === "admin";
const usd = (n) => (n === null || n === undefined ? "-" : "$" + Number(n).toFixed(n < 1 ? 6 : 2));
const limitsText = (l) => (l ? ["rps", "rpm", "tpm", "concurrency"].filter((k) => l[k] !== undefined && l[k] !== null).map((k) => k + " " + l[k]).join(", ") : "") || "-";
const budgetText = (b) => (b ? usd(b.spend_usd || 0) + " of " + usd(b.max_usd) + " " + b.period + (b.mode === "track" ? " (track)" : "") : "-");

function action(label, fn, cls) {
  return el("button", { type: "button", class: "write " + (cls || "plain"), onclick: async () => {
    try { await fn(); } catch (e) { say(label + ": " + e.message, true); }
  } }, label);
}

// ---- sign in ----

async function signIn(key) {
  state.key = key;
  const who = await api("GET", "/admin/whoami");
  if (!who.role) throw new Error("unknown key");
  state.role = who.role;
  sessionStorage.setItem("tollgate.key", key);
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("role").textContent = who.role === "admin" ? "admin" : "viewer (read only)";
  document.querySelectorAll(".write").forEach((e) => { e.hidden = !isAdmin(); });
  show(location.hash.slice(1) || "keys");
}

function signOut() {
  sessionStorage.removeItem("tollgate.key");
  state.key = "";
  state.role = null;
  location.hash = "";
  location.reload();
}

// ---- pages ----

const pages = { keys: loadKeys, teams: loadTeams, spend: loadSpend, upstreams: loadUpstreams, live: startLive };
let liveTimer = null;

function show(page) {
  if (!pages[page]) page = "keys";
  for (const p of Object.keys(pages)) $("page-" + p).hidden = p !== page;
  document.querySelectorAll("nav button").forEach((b) => {
    if (b.dataset.page === page) b.setAttribute("aria-current", "page"); else b.removeAttribute("aria-current");
  });
  if (location.hash !== "#" + page) history.replaceState(null, "", "#" + page);
  if (liveTimer) { clearInterval(liveTimer); liveTimer = null; }
  say("");
  pages[page]().catch((e) => say(e.message, true));
}

// ---- keys ----

function keyStatus(k) {
  if (k.blocked) return "blocked";
  if (k.expires_at && Date.parse(k.expires_at) < Date.now()) return "expired";
  return "active";
}

async function loadKeys() {
  const [keys, teams] = await Promise.all([api("GET", "/admin/keys"), api("GET", "/admin/teams")]);
  state.keys = keys.data || [];
  state.teams = teams.data || [];
  const select = $("key-team");
  select.replaceChildren(el("option", { value: "" }, "(none)"), ...state.teams.map((t) => el("option", { value: t.id }, t.name)));
  renderKeys();
}

function renderKeys() {
  const q = $("key-search").value.trim().toLowerCase();
  const rows = state.keys.filter((k) => !q || k.name.toLowerCase().includes(q) || (k.team && k.team.name.toLowerCase().includes(q)));
  $("keys-table").tBodies[0].replaceChildren(...rows.map((k) => {
    const st = keyStatus(k);
    const actions = el("div", { class: "row" });
    if (isAdmin() && k.source !== "config") {
      actions.append(
        action("Edit", async () => editKey(k)),
        action("Rotate", async () => {
          const r = await api("POST", "/admin/keys/" + encodeURIComponent(k.id) + "/rotate", {});
          showSecret(k.name, r.key);
          await loadKeys();
        }),
        k.blocked
          ? action("Unblock", async () => { await api("PATCH", "/admin/keys/" + encodeURIComponent(k.id), { blocked: false }); say("Unblocked " + k.name); await loadKeys(); })
          : action("Block", async () => { await api("PATCH", "/admin/keys/" + encodeURIComponent(k.id), { blocked: true }); say("Blocked " + k.name); await loadKeys(); }, "danger"),
        action("Delete", async () => {
          if (!confirm("Delete key " + k.name + "? Requests with it are refused at once.")) return;
          await api("DELETE", "/admin/keys/" + encodeURIComponent(k.id));
          say("Deleted " + k.name);
          await loadKeys();
        }, "danger"),
      );
    } else if (k.source === "config") {
      actions.append("in the config file");
    }
    return el("tr", { "data-key": k.name },
      el("td", {}, k.name),
      el("td", {}, k.team ? k.team.name : "-"),
      el("td", {}, k.prefix || "-"),
      el("td", {}, k.models ? k.models.join(", ") : "all"),
      el("td", {}, limitsText(k.limits)),
      el("td", {}, budgetText(k.budget)),
      el("td", { class: "state-" + st }, st),
      el("td", {}, actions));
  }));
}

function showSecret(name, secret) {
  $("secret-name").textContent = name;
  $("secret-value").value = secret;
  $("secret-panel").hidden = false;
  $("secret-value").focus();
  $("secret-value").select();
}

const numberOrNull = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
const listOrNull = (id) => { const v = $(id).value.trim(); return v === "" ? null : v.split(",").map((s) => s.trim()).filter(Boolean); };

function keyBody() {
  const body = { name: $("key-name").value.trim(), team: $("key-team").value || null, models: listOrNull("key-models") };
  const limits = {};
  for (const k of ["rpm", "tpm", "concurrency"]) { const n = numberOrNull("key-" + k); if (n !== null) limits[k] = n; }
  body.limits = limits;
  const budget = numberOrNull("key-budget");
  body.budget = budget === null ? null : { max_usd: budget, period: $("key-period").value, mode: $("key-mode").value };
  const expires = $("key-expires").value.trim();
  if (expires) body.expires_in = expires;
  return body;
}

function editKey(k) {
  $("key-form-title").textContent = "Edit key " + k.name;
  $("key-submit").textContent = "Save changes";
  $("key-cancel").hidden = false;
  $("key-id").value = k.id;
  $("key-name").value = k.name;
  $("key-team").value = k.team ? k.team.id : "";
  $("key-models").value = k.models ? k.models.join(", ") : "";
  for (const f of ["rpm", "tpm", "concurrency"]) $("key-" + f).value = k.limits && k.limits[f] !== undefined ? k.limits[f] : "";
  $("key-budget").value = k.budget ? k.budget.max_usd : "";
  if (k.budget) { $("key-period").value = k.budget.period; $("key-mode").value = k.budget.mode; }
  $("key-expires").value = "";
  $("key-name").focus();
}

function resetKeyForm() {
  $("key-form").reset();
  $("key-id").value = "";
  $("key-form-title").textContent = "Create a key";
  $("key-submit").textContent = "Create key";
  $("key-cancel").hidden = true;
}

async function submitKey(ev) {
  ev.preventDefault();
  const id = $("key-id").value;
  try {
    if (id) {
      await api("PATCH", "/admin/keys/" + encodeURIComponent(id), keyBody());
      say("Saved " + $("key-name").value);
    } else {
      const r = await api("POST", "/admin/keys", keyBody());
      showSecret(r.name, r.key);
      say("Created " + r.name);
    }
    resetKeyForm();
    await loadKeys();
  } catch (e) { say(e.message, true); }
}

// ---- teams ----

async function loadTeams() {
  const teams = await api("GET", "/admin/teams");
  state.teams = teams.data || [];
  $("teams-table").tBodies[0].replaceChildren(...state.teams.map((t) => el("tr", { "data-team": t.name },
    el("td", {}, t.name),
    el("td", { class: "num" }, String(t.keys)),
    el("td", {}, t.models ? t.models.join(", ") : "all"),
    el("td", {}, limitsText(t.limits)),
    el("td", {}, budgetText(t.budget)),
    el("td", {}, isAdmin() ? action("Delete", async () => {
      if (!confirm("Delete team " + t.name + "?")) return;
      await api("DELETE", "/admin/teams/" + encodeURIComponent(t.id));
      await loadTeams();
    }, "danger") : ""))));
}

async function submitTeam(ev) {
  ev.preventDefault();
  const body = { name: $("team-name").value.trim(), models: listOrNull("team-models") };
  const rpm = numberOrNull("team-rpm");
  body.limits = rpm === null ? {} : { rpm };
  const budget = numberOrNull("team-budget");
  body.budget = budget === null ? null : { max_usd: budget, period: $("team-period").value };
  try {
    await api("POST", "/admin/teams", body);
    say("Created team " + body.name);
    $("team-form").reset();
    await loadTeams();
  } catch (e) { say(e.message, true); }
}

// ---- spend ----

const day = (d) => d.toISOString().slice(0, 10);

function spendQuery(group, format) {
  const q = new URLSearchParams({ group_by: group });
  if ($("spend-from").value) q.set("from", $("spend-from").value);
  if ($("spend-to").value) q.set("to", $("spend-to").value);
  if (format) q.set("format", format);
  return "/admin/spend?" + q.toString();
}

async function loadSpend() {
  if (!$("spend-from").value) {
    const now = new Date();
    $("spend-to").value = day(now);
    $("spend-from").value = day(new Date(now.getTime() - 6 * 86400000));
  }
  const group = $("spend-group").value;
  const [rows, days] = await Promise.all([api("GET", spendQuery(group)), api("GET", spendQuery("day"))]);
  $("spend-group-head").textContent = group[0].toUpperCase() + group.slice(1);
  const label = (r) => r.key_name || r.team_name || r.model || r.upstream || r.day || r.key_id || r.team_id || "(none)";
  $("spend-table").tBodies[0].replaceChildren(...(rows.data || []).map((r) => el("tr", {},
    el("td", {}, label(r)),
    el("td", { class: "num" }, String(r.requests)),
    el("td", { class: "num" }, String(r.input_tokens)),
    el("td", { class: "num" }, String(r.output_tokens)),
    el("td", { class: "num" }, String(r.cached_tokens)),
    el("td", { class: "num" }, usd(r.spend_usd)))));
  drawBars($("spend-chart"), (days.data || []).slice().sort((a, b) => (a.day < b.day ? -1 : 1)).map((r) => [r.day, r.spend_usd]));
}

async function downloadCsv() {
  try {
    const r = await fetch(spendQuery($("spend-group").value, "csv"), { headers: { authorization: "Bearer " + state.key } });
    if (!r.ok) throw new Error(r.status + " " + r.statusText);
    const blob = await r.blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: "tollgate-spend.csv" });
    document.body.append(a);
    a.click();
    a.remove();
  } catch (e) { say("CSV: " + e.message, true); }
}

// The SVG namespace: a name that identifies the element type, never fetched.
const SVG = "http:" + "//www.w3.org/2000/svg";
const svg = (tag, attrs) => { const e = document.createElementNS(SVG, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };

function drawBars(box, points) {
  const w = 1000, h = 180, pad = 24;
  const s = svg("svg", { viewBox: "0 0 " + w + " " + (h + pad), width: "100%", role: "img", "aria-label": "Spend per day" });
  const max = Math.max(0.000001, ...points.map((p) => p[1]));
  const left = 90;
  const bw = points.length ? Math.min(80, (w - left) / points.length) : 0;
  points.forEach(([label, v], i) => {
    const bh = Math.max(1, (v / max) * h);
    const x = left + i * bw;
    const r = svg("rect", { class: "bar", x: x + 2, y: h - bh, width: Math.max(1, bw - 4), height: bh });
    r.append(svg("title", {}));
    r.lastChild.textContent = label + ": " + usd(v);
    s.append(r);
    const t = svg("text", { x: x + bw / 2, y: h + 16, "text-anchor": "middle" });
    t.textContent = label.slice(5);
    s.append(t);
  });
  const top = svg("text", { x: 0, y: 12 });
  top.textContent = usd(max);
  s.append(top);
  if (!points.length) { const t = svg("text", { x: w / 2, y: h / 2, "text-anchor": "middle" }); t.textContent = "no spend in this range"; s.append(t); }
  box.replaceChildren(s);
}

// ---- upstreams ----

async function loadUpstreams() {
  const v = await api("GET", "/admin/upstreams");
  const rows = [];
  for (const u of v.upstreams) {
    for (const s of u.servers) {
      const why = s.cooling ? s.cooling.reason + ", " + Math.ceil(s.cooling.for_ms / 1000) + " s left (until " + new Date(Date.now() + s.cooling.for_ms).toLocaleTimeString() + ")" : "-";
      rows.push(el("tr", { "data-server": s.server },
        el("td", {}, u.upstream),
        el("td", {}, s.server + (s.backup ? " (backup)" : "")),
        el("td", { class: "state-" + s.state }, s.state),
        el("td", {}, why),
        el("td", { class: "num" }, String(s.in_flight)),
        el("td", { class: "num" }, s.latency_ms === null ? "-" : s.latency_ms.toFixed(1)),
        el("td", {}, isAdmin() && s.cooling ? action("Clear cooldown", async () => {
          await api("DELETE", "/admin/cooldowns/" + s.server);
          say("Cleared the cooldown of " + s.server);
          await loadUpstreams();
        }) : "")));
    }
  }
  $("upstreams-table").tBodies[0].replaceChildren(...rows);
}

// ---- live ----

function parseMetrics(text) {
  let requests = 0, errors = 0, tokens = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith("tollgate_requests_total{")) {
      const v = Number(line.slice(line.lastIndexOf(" ") + 1));
      requests += v;
      if (/code="5\d\d"/.test(line)) errors += v;
    } else if (line.startsWith("tollgate_tokens_total{") && /type="(input|output)"/.test(line)) {
      tokens += Number(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return { t: Date.now(), requests, errors, tokens };
}

async function sampleLive() {
  const r = await fetch("/metrics");
  const now = parseMetrics(await r.text());
  const prev = state.live[state.live.length - 1];
  state.live.push(now);
  if (state.live.length > 61) state.live.shift();
  $("live-total").textContent = String(now.requests);
  if (!prev) return;
  const dt = Math.max(0.001, (now.t - prev.t) / 1000);
  now.rps = (now.requests - prev.requests) / dt;
  $("live-rps").textContent = now.rps.toFixed(1);
  $("live-errors").textContent = ((now.errors - prev.errors) / dt).toFixed(2);
  $("live-tpm").textContent = Math.round(((now.tokens - prev.tokens) / dt) * 60).toString();
  const pts = state.live.filter((p) => p.rps !== undefined);
  const w = 1000, h = 120, max = Math.max(1, ...pts.map((p) => p.rps));
  const s = svg("svg", { viewBox: "0 0 " + w + " " + h, width: "100%", role: "img", "aria-label": "Requests per second" });
  s.append(svg("polyline", { points: pts.map((p, i) => (i * w) / 60 + "," + (h - (p.rps / max) * (h - 4))).join(" ") }));
  $("live-chart").replaceChildren(s);
}

async function startLive() {
  state.live = [];
  await sampleLive();
  liveTimer = setInterval(() => sampleLive().catch((e) => say(e.message, true)), 2000);
}

// ---- wiring ----

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try { await signIn($("signin-key").value); $("signin-key").value = ""; say(""); }
    catch (e) { state.key = ""; say(e.status === 401 ? "That key is not the master key or the viewer key." : e.message, true); }
  });
  $("signout").addEventListener("click", signOut);
  document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.page)));
  $("key-search").addEventListener("input", renderKeys);
  $("key-form").addEventListener("submit", submitKey);
  $("key-cancel").addEventListener("click", resetKeyForm);
  $("team-form").addEventListener("submit", submitTeam);
  $("spend-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadSpend().catch((e) => say(e.message, true)); });
  $("spend-csv").addEventListener("click", downloadCsv);
  $("secret-copy").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("secret-value").value); say("Copied."); }
    catch (e) { $("secret-value").select(); document.execCommand("copy"); say("Copied."); }
  });
  $("secret-done").addEventListener("click", () => { $("secret-value").value = ""; $("secret-panel").hidden = true; });
  window.addEventListener("hashchange", () => { if (state.role) show(location.hash.slice(1)); });
  if (state.key) signIn(state.key).catch(() => { sessionStorage.removeItem("tollgate.key"); state.key = ""; });
});
