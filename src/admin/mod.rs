//! The admin listener (loopback by default), separate from the proxy path: `/health`
//! (the process is up), `/ready` (every alias has at least one usable target) and
//! `/metrics` (Prometheus text format, the default registry of prometheus 0.14); with
//! `admin.master_key`, the keys, teams and spend API of `keys`.

pub mod cli;
mod fields;
pub mod keys;
pub mod litellm;
pub mod pricing;
mod reports;
pub mod route;
mod teams;
mod ui;

use crate::clock::monotonic_ms as now_ms;
use crate::config::Config;
use crate::ops::reload::Reloader;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::Encoder;
use sha2::Digest;
use std::sync::Arc;

pub struct AdminApp {
    pub config: Arc<ArcSwap<Config>>,
    /// `None` when there is no file to reload (the demo).
    pub reloader: Option<Arc<Reloader>>,
    pub keys: Arc<crate::keys::Directory>,
    /// The response cache, for `DELETE /admin/cache` and its gauges.
    pub cache: Arc<dyn crate::cache::CacheBackend>,
    /// Cooldowns shared with other instances, cleared everywhere from here.
    pub cooldowns: Arc<dyn crate::upstream::shared::Cooldowns>,
}

/// The largest admin request body read.
const MAX_ADMIN_BODY: usize = 1 << 20;

/// Reads an admin request's body, at most [`MAX_ADMIN_BODY`].
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(reply(
                        413,
                        "application/json",
                        b"{\"error\":{\"message\":\"the body is larger than 1 MiB\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"body_too_large\"}}".to_vec(),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(reply(
                    400,
                    "application/json",
                    b"{\"error\":{\"message\":\"the body could not be read\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"bad_body\"}}".to_vec(),
                ))
            }
        }
    }
}

/// An OpenAI-shaped error answer.
fn error_reply(status: u16, kind: &str, code: &str, message: &str) -> Response<Vec<u8>> {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    reply(status, "application/json", body.to_string().into_bytes())
}

/// 405 unless the request uses `allowed`.
fn only(method: &http::Method, allowed: http::Method) -> Option<Response<Vec<u8>>> {
    (*method != allowed).then(|| {
        let message = format!("Use {allowed} on this path.");
        error_reply(405, "invalid_request_error", "method_not_allowed", &message)
    })
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

impl AdminApp {
    /// `POST /admin/reload`: 200 when the file was valid and is now live, 400 with every
    /// error otherwise (the running config stays).
    async fn reload(&self, method: &http::Method) -> Response<Vec<u8>> {
        if method != http::Method::POST {
            return reply(
                405,
                "application/json",
                b"{\"error\":\"use POST\"}".to_vec(),
            );
        }
        let Some(reloader) = self.reloader.clone() else {
            return reply(
                409,
                "application/json",
                b"{\"error\":\"no config file to reload\"}".to_vec(),
            );
        };
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(())) => reply(
                200,
                "application/json",
                b"{\"status\":\"reloaded\"}".to_vec(),
            ),
            Ok(Err(errors)) => {
                let list: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
                reply(
                    400,
                    "application/json",
                    serde_json::json!({"status": "refused", "errors": list})
                        .to_string()
                        .into_bytes(),
                )
            }
            Err(e) => reply(
                500,
                "application/json",
                serde_json::json!({"error": e.to_string()})
                    .to_string()
                    .into_bytes(),
            ),
        }
    }
    /// Upstream gauges are read from live server state at scrape time.
    fn update_gauges(&self) {
        let Some(m) = crate::metrics::get() else {
            return;
        };
        let config = self.config.load();
        let now = now_ms();
        // Start from the servers of the live config: one removed by a reload disappears.
        // (The admin listener has one thread and this runs without yielding, so no scrape
        // sees the series half rebuilt.)
        m.upstream_up.reset();
        m.upstream_in_flight.reset();
        m.upstream_cooldown.reset();
        m.upstream_latency.reset();
        if let Some((entries, bytes)) = self.cache.size() {
            m.cache_entries.set(entries as i64);
            m.cache_bytes.set(bytes as i64);
        }
        for u in config.upstreams.values() {
            for s in &u.servers {
                let labels = [&*u.name, &*s.name];
                m.upstream_up
                    .with_label_values(&labels)
                    .set(i64::from(s.usable(now)));
                m.upstream_in_flight
                    .with_label_values(&labels)
                    .set(s.state.in_flight() as i64);
                let left = s
                    .state
                    .health
                    .cooldown(now)
                    .map_or(0.0, |(d, _)| d.as_secs_f64());
                m.upstream_cooldown.with_label_values(&labels).set(left);
                if let Some(e) = s.state.latency.estimate(now, u.latency_decay) {
                    m.upstream_latency
                        .with_label_values(&labels)
                        .set(e.as_secs_f64());
                }
            }
        }
    }
    /// `GET /admin/cooldowns`: cooling and unhealthy servers with reason and time left.
    /// `DELETE /admin/cooldowns/{server}` clears one (`DELETE /admin/cooldowns`: all).
    fn cooldowns(&self, method: &http::Method, rest: &str) -> Response<Vec<u8>> {
        let config = self.config.load();
        let now = now_ms();
        let servers = config.upstreams.values().flat_map(|u| u.servers.iter());
        match *method {
            http::Method::GET if rest.is_empty() || rest == "/" => {
                let list: Vec<serde_json::Value> = servers
                    .filter_map(|s| {
                        let cooling = s.state.health.cooldown(now);
                        let healthy = s.state.health.active_ok();
                        if cooling.is_none() && healthy {
                            return None;
                        }
                        Some(serde_json::json!({
                            "target": s.name,
                            "reason": cooling.map(|(_, r)| r.as_str()),
                            "remaining_seconds": cooling.map(|(d, _)| d.as_secs_f64()),
                            "healthy": healthy,
                        }))
                    })
                    .collect();
                reply(
                    200,
                    "application/json",
                    serde_json::json!({ "cooldowns": list })
                        .to_string()
                        .into_bytes(),
                )
            }
            http::Method::DELETE => {
                let wanted = percent_decode(rest.trim_start_matches('/'));
                let only = (!wanted.is_empty()).then_some(wanted.as_str());
                let servers: Vec<Arc<crate::upstream::Server>> = servers.cloned().collect();
                let cleared = self.cooldowns.clear(&servers, only);
                if cleared.is_empty() {
                    return reply(
                        404,
                        "application/json",
                        serde_json::json!({ "error": format!("no server named {wanted:?}") })
                            .to_string()
                            .into_bytes(),
                    );
                }
                log::info!("cooldowns cleared by an operator: {}", cleared.join(", "));
                reply(
                    200,
                    "application/json",
                    serde_json::json!({ "cleared": cleared })
                        .to_string()
                        .into_bytes(),
                )
            }
            _ => reply(
                405,
                "application/json",
                b"{\"error\":\"method not allowed\"}".to_vec(),
            ),
        }
    }
}

/// Decodes `%XX` escapes (server names hold `/`, `:` and `#`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who an admin request is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The master key: everything.
    Admin,
    /// `admin.viewer_key`: reads only.
    Viewer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// The role of a presented bearer secret, compared in constant time by SHA-256 digest.
fn role(
    presented: &str,
    master: &crate::secret::Secret,
    viewer: Option<&crate::secret::Secret>,
) -> Option<Role> {
    let digest = sha2::Sha256::digest(presented.as_bytes());
    let is = |s: &crate::secret::Secret| {
        let other = sha2::Sha256::digest(s.expose().as_bytes());
        bool::from(subtle::ConstantTimeEq::ct_eq(&digest[..], &other[..]))
    };
    if is(master) {
        Some(Role::Admin)
    } else if viewer.is_some_and(is) {
        Some(Role::Viewer)
    } else {
        None
    }
}

/// Why an `/admin/*` request is refused before it is served, if it is: a missing or
/// wrong master key (401), or, for a request that changes state, signs of a browser
/// sending it on behalf of another site (403): an `Origin` that is not the admin
/// listener's own, `Sec-Fetch-Site: cross-site`, or a body type other than JSON (the
/// types a web form can send without asking).
fn refuse(
    req: &pingora_http::RequestHeader,
    admin: &crate::config::settings::Admin,
) -> Option<Response<Vec<u8>>> {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    let reads = matches!(
        req.method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    if let Some(master) = &admin.master_key {
        let presented = header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        match role(presented, master, admin.viewer_key.as_ref()) {
            Some(Role::Admin) => {}
            Some(Role::Viewer) if reads => {}
            Some(Role::Viewer) => {
                return Some(error_reply(
                    403,
                    "permission_error",
                    "read_only",
                    "The viewer key may only read: changes need the master key.",
                ))
            }
            None => {
                return Some(error_reply(
                    401,
                    "authentication_error",
                    "invalid_master_key",
                    "The admin API needs 'Authorization: Bearer MASTER_KEY' with admin.master_key (or admin.viewer_key, to read).",
                ))
            }
        }
    }
    if reads {
        return None;
    }
    let own_origin = |origin: &[u8]| {
        let host = header("host").unwrap_or_default();
        !host.is_empty()
            && (origin == format!("http://{host}").as_bytes()
                || origin == format!("https://{host}").as_bytes())
    };
    // Every instance of a header counts: a second `Origin` must not hide the first.
    let all = |name: &str| req.headers.get_all(name).into_iter().map(|v| v.as_bytes());
    let foreign_origin = all("origin").any(|o| !own_origin(o));
    let cross_site = all("sec-fetch-site").any(|v| v.eq_ignore_ascii_case(b"cross-site"));
    if foreign_origin || cross_site {
        return Some(error_reply(
            403,
            "invalid_request_error",
            "cross_site_refused",
            "Refused: a state-changing admin request must not come from another site's page.",
        ));
    }
    let types: Vec<&[u8]> = all("content-type").collect();
    let json = |t: &[u8]| {
        let t = std::str::from_utf8(t).unwrap_or_default();
        t.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case("application/json")
    };
    let has_body = req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || header("content-length").is_some_and(|l| l.trim() != "0");
    let not_json = match types.as_slice() {
        [] => has_body,
        [t] => !json(t),
        _ => true,
    };
    not_json.then(|| {
        error_reply(
            415,
            "invalid_request_error",
            "unsupported_media_type",
            "A state-changing admin request sends its body as Content-Type: application/json (or sends no body).",
        )
    })
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let admin = session.req_header().uri.path().starts_with("/admin/");
        let mut r = self.serve(session).await;
        let h = r.headers_mut();
        // No admin answer is kept by a cache (the 201 of a new key carries its secret), and
        // no page of this listener may be framed by another.
        if admin {
            h.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
        }
        h.insert("x-frame-options", http::HeaderValue::from_static("DENY"));
        h.insert(
            "x-content-type-options",
            http::HeaderValue::from_static("nosniff"),
        );
        r
    }
}

impl AdminApp {
    async fn serve(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        if path.starts_with("/admin/") {
            let config = self.config.load();
            if let Some(r) = refuse(session.req_header(), &config.admin) {
                return r;
            }
        }
        if let Some(rest) = path.strip_prefix("/admin").filter(|r| keys::serves(r)) {
            let config = self.config.load_full();
            if config.admin.master_key.is_none() {
                return reply(
                    404,
                    "application/json",
                    b"{\"error\":{\"message\":\"the keys API is off: set admin.master_key\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"not_found\"}}".to_vec(),
                );
            }
            let rest = rest.to_string();
            let query = session
                .req_header()
                .uri
                .query()
                .unwrap_or_default()
                .to_string();
            let body = match read_body(session).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let call = keys::Call {
                method: &method,
                path: &rest,
                query: &query,
                body: &body,
            };
            return keys::handle(&self.keys, &config, call).await;
        }
        if let Some(rest) = path.strip_prefix("/admin/cooldowns") {
            return self.cooldowns(&method, rest);
        }
        if let Some(r) = ui::serve(&path) {
            return r;
        }
        let Some(page) = PAGES
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, page)| *page)
        else {
            return reply(
                404,
                "application/json",
                b"{\"error\":\"not found\"}".to_vec(),
            );
        };
        match page {
            Page::Whoami => self.whoami(session),
            Page::Cache => self.clear_cache(session, &method).await,
            Page::Upstreams => only(&method, http::Method::GET).unwrap_or_else(|| {
                let body = route::upstreams(&self.config.load())
                    .to_string()
                    .into_bytes();
                reply(200, "application/json", body)
            }),
            Page::Route => only(&method, http::Method::GET)
                .unwrap_or_else(|| self.explain(session.req_header().uri.query())),
            Page::Reload => self.reload(&method).await,
            Page::Health => reply(200, "application/json", b"{\"status\":\"ok\"}".to_vec()),
            Page::Ready => self.ready(),
            Page::Metrics => self.metrics(),
        }
    }

    /// `/admin/whoami`: the role the presented bearer key has.
    fn whoami(&self, session: &ServerSession) -> Response<Vec<u8>> {
        let config = self.config.load();
        let presented = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Without a master key the listener is open: everyone is admin.
        let role = match &config.admin.master_key {
            None => Some(Role::Admin),
            Some(m) => role(presented, m, config.admin.viewer_key.as_ref()),
        };
        let body = serde_json::json!({
            "role": role.map(Role::as_str),
            "keys_api": config.admin.master_key.is_some(),
        });
        reply(200, "application/json", body.to_string().into_bytes())
    }

    /// `DELETE /admin/cache[?model=ALIAS]`.
    async fn clear_cache(
        &self,
        session: &ServerSession,
        method: &http::Method,
    ) -> Response<Vec<u8>> {
        if let Some(r) = only(method, http::Method::DELETE) {
            return r;
        }
        let model = session
            .req_header()
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|p| p.strip_prefix("model="))
            .map(percent_decode);
        match self.cache.clear(model.as_deref()).await {
            Ok(n) => {
                log::info!(
                    "admin: cache cleared ({n} answers, model {})",
                    model.as_deref().unwrap_or("*")
                );
                let body = serde_json::json!({"cleared": n, "model": model});
                reply(200, "application/json", body.to_string().into_bytes())
            }
            Err(e) => error_reply(503, "api_error", "cache_unavailable", &e),
        }
    }

    /// `GET /admin/route?model=...`.
    fn explain(&self, query: Option<&str>) -> Response<Vec<u8>> {
        match route::explain(&self.config.load(), query.unwrap_or_default()) {
            Ok(v) => reply(200, "application/json", v.to_string().into_bytes()),
            Err(m) => error_reply(400, "invalid_request_error", "bad_request", &m),
        }
    }

    /// `/ready`: 503 while an alias has no usable target.
    fn ready(&self) -> Response<Vec<u8>> {
        let config = self.config.load();
        let mut unready: Vec<&str> = config
            .router
            .all()
            .filter(|a| !a.has_usable_target())
            .map(|a| a.name.as_str())
            .collect();
        unready.sort_unstable();
        let body = serde_json::json!({
            "status": if unready.is_empty() { "ready" } else { "not_ready" },
            "unavailable_models": unready,
        });
        reply(
            if unready.is_empty() { 200 } else { 503 },
            "application/json",
            body.to_string().into_bytes(),
        )
    }

    /// `/metrics`: the Prometheus text format.
    fn metrics(&self) -> Response<Vec<u8>> {
        self.update_gauges();
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        match encoder.encode(&prometheus::gather(), &mut buf) {
            Ok(()) => reply(200, encoder.format_type(), buf),
            Err(e) => reply(500, "text/plain", e.to_string().into_bytes()),
        }
    }
}

/// The pages served at one exact path (the keys API, cooldowns and the console are
/// matched by prefix before these).
#[derive(Debug, Clone, Copy)]
enum Page {
    Whoami,
    Cache,
    Upstreams,
    Route,
    Reload,
    Health,
    Ready,
    Metrics,
}

const PAGES: &[(&str, Page)] = &[
    ("/admin/whoami", Page::Whoami),
    ("/admin/cache", Page::Cache),
    ("/admin/upstreams", Page::Upstreams),
    ("/admin/route", Page::Route),
    ("/admin/reload", Page::Reload),
    ("/health", Page::Health),
    ("/ready", Page::Ready),
    ("/metrics", Page::Metrics),
];
