//! Operations: config reload (admin endpoint and SIGHUP) that keeps live state and
//! refuses bad files, and a binary upgrade plus a reload under steady load with long
//! streams, with zero failed requests and zero truncated streams.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{admin_json, chat, chat_status, client, eventually, eventually_async, Gateway};
use serde_json::Value;
use std::time::{Duration, Instant};
use tollgate::demo::mock::{MockUpstream, Reply};

fn text(
    dir: &std::path::Path,
    listen: &str,
    admin: &str,
    grace: &str,
    models: &str,
    upstream: &MockUpstream,
    streams: &MockUpstream,
) -> String {
    format!(
        "server:\n  listen: [\"{listen}\"]\n  admin_listen: \"{admin}\"\n  threads: 2\n  grace_period: {grace}\n  pid_file: {d}/tollgate.pid\n  upgrade_sock: {d}/upgrade.sock\nupstreams:\n  u:\n    servers:\n      - {{url: \"{}\", name: a}}\n      - {{url: \"{}\", name: b}}\n  st:\n    servers: [{{url: \"{}\"}}]\nmodels:\n{models}",
        upstream.url(),
        upstream.url(),
        streams.url(),
        d = dir.display()
    )
}

fn kill(pid: u32, signal: &str) {
    assert!(std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

fn fresh_client() -> reqwest::Client {
    // No pooled connections: a connection idle in the pool while a process hands over its
    // listeners can be closed under a client, which no proxy can prevent.
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn metric(gw: &Gateway, result: &str) -> f64 {
    let text = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("tollgate_config_reloads_total")
                && l.contains(&format!("result=\"{result}\""))
        })
        .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_a_valid_file_keeps_cooldowns_and_refuses_a_bad_one() {
    let up = MockUpstream::start("u").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v1 = text(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        "0s",
        "  m:\n    routes: [{upstream: u}]\n",
        &up,
        &up,
    );
    let gw = Gateway::start(&v1);
    let path = gw.dir.path().join("tollgate.yaml");
    let c = fresh_client();
    // Cool server a down with a quota error (one of the first two requests reaches it).
    up.push([Reply::error(
        429,
        r#"{"error":{"code":"insufficient_quota"}}"#,
    )]);
    for _ in 0..2 {
        assert_eq!(chat_status(&c, &gw, "m").await, 200);
    }
    let cooling = |v: &Value| v["cooldowns"].as_array().unwrap().len();
    let before: Value = admin_json(&c, &gw, "/admin/cooldowns").await;
    assert_eq!(cooling(&before), 1);
    assert_eq!(chat_status(&c, &gw, "n").await, 404);

    // A valid file adds alias n; the cooldown of the server that still exists survives.
    let v2 = std::fs::read_to_string(&path).unwrap() + "  n:\n    routes: [{upstream: u}]\n";
    std::fs::write(&path, &v2).unwrap();
    let r = c.post(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(chat_status(&c, &gw, "n").await, 200);
    let after: Value = admin_json(&c, &gw, "/admin/cooldowns").await;
    assert_eq!(
        after["cooldowns"][0]["target"],
        before["cooldowns"][0]["target"]
    );
    assert_eq!(after["cooldowns"][0]["reason"], "quota");

    // A bad file is refused with every error; the running config stays.
    std::fs::write(
        &path,
        v2.clone() + "  bad:\n    routes: [{upstream: nowhere}]\n    colour: red\n",
    )
    .unwrap();
    let r = c.post(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["errors"][0].as_str().unwrap().contains("models.bad"),
        "{v}"
    );
    assert_eq!(chat_status(&c, &gw, "n").await, 200);
    assert!(gw.logs().contains("reload of"), "{}", gw.logs());

    // SIGHUP reloads too.
    std::fs::write(&path, v2 + "  o:\n    routes: [{upstream: u}]\n").unwrap();
    kill(gw.pid(), "-HUP");
    let reloaded = || async { chat_status(&c, &gw, "o").await == 200 };
    assert!(
        eventually_async(Duration::from_secs(5), reloaded).await,
        "SIGHUP did not reload"
    );
    assert_eq!(metric(&gw, "ok").await, 2.0);
    assert_eq!(metric(&gw, "error").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_and_a_reload_under_load_lose_no_request_and_cut_no_stream() {
    let up = MockUpstream::start("u").await.unwrap();
    let stream_reply = Reply::Stream {
        events: (0..15)
            .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
            .chain(["data: [DONE]\n\n".to_string()])
            .collect(),
        gap: Duration::from_millis(100),
        cut: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let streams = MockUpstream::start("streams").await.unwrap();
    streams.set_default(stream_reply);
    let gw = Gateway::start(&text(
        dir.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        "5s",
        "  m:\n    routes: [{upstream: u}]\n  s:\n    routes: [{upstream: st}]\n",
        &up,
        &streams,
    ));
    // The upgrade's new process takes over the listeners named in its file: name the
    // ports this one got (a reload only warns that they changed).
    let path = gw.dir.path().join("tollgate.yaml");
    let named = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "listen: [\"127.0.0.1:0\"]",
            &format!("listen: [\"{}\"]", gw.url("").trim_start_matches("http://")),
        )
        .replace(
            "admin_listen: \"127.0.0.1:0\"",
            &format!(
                "admin_listen: \"{}\"",
                gw.admin_url("").trim_start_matches("http://")
            ),
        );
    std::fs::write(&path, named).unwrap();
    let url = gw.url("/v1/chat/completions");

    let stop = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    // Two loops of short requests.
    for _ in 0..2 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = fresh_client();
            let (mut ok, mut failed) = (0, Vec::new());
            while Instant::now() < stop {
                match c.post(&url).json(&chat("m", false)).send().await {
                    Ok(r) => {
                        let status = r.status();
                        match r.text().await {
                            Ok(t) if status == 200 && t.contains("usage") => ok += 1,
                            Ok(t) => failed.push(format!("status {status}: {t}")),
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    // One loop of 1.5 s streams.
    {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = fresh_client();
            let (mut ok, mut failed) = (0, Vec::new());
            while Instant::now() < stop {
                let body = match c
                    .post(&url)
                    .json(&serde_json::json!({"model": "s", "stream": true, "messages": []}))
                    .send()
                    .await
                {
                    Ok(r) => r.text().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match body {
                    Ok(t) if t.ends_with("data: {\"i\":14}\n\ndata: [DONE]\n\n") => ok += 1,
                    Ok(t) => failed.push(format!("truncated stream: {} bytes", t.len())),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }

    // Under load: short requests answered and a stream under way.
    assert!(
        eventually(Duration::from_secs(5), || up.hits() >= 10
            && streams.hits() >= 1)
        .await
    );
    // Reload: an extra alias.
    let v2 = std::fs::read_to_string(&path).unwrap() + "  extra:\n    routes: [{upstream: u}]\n";
    std::fs::write(&path, v2).unwrap();
    kill(gw.pid(), "-HUP");
    // Reloaded when the admin listener knows the new alias.
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            let r = client()
                .get(gw.admin_url("/admin/route?model=extra"))
                .send()
                .await;
            r.is_ok_and(|r| r.status() == 200)
        })
        .await,
        "the reload was not applied:\n{}",
        gw.logs()
    );
    // Binary upgrade: a new process takes the listeners over; the old one finishes its streams.
    kill(gw.pid(), "-USR2");
    assert!(
        eventually(Duration::from_secs(5), || gw.pids().len() >= 2).await,
        "no new process after SIGUSR2:\n{}",
        gw.logs()
    );

    let mut total_ok = 0;
    let mut failures = Vec::new();
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        total_ok += ok;
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}\n{}",
        failures.len(),
        failures.first(),
        gw.logs()
    );
    assert!(total_ok > 20, "{total_ok}");
    // The new process serves (with the reloaded file) after the old one stopped accepting.
    let c = fresh_client();
    let r = c
        .post(&url)
        .json(&chat("extra", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(gw.logs().contains("SIGUSR2: upgrading"), "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_removed_by_a_reload_leaves_the_upstream_metrics() {
    let up = MockUpstream::start("u").await.unwrap();
    let gone = format!(
        "  gone:\n    servers: [{{url: \"{}\", name: old}}]\n",
        up.url()
    );
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    servers: [{{url: \"{}\", name: kept}}]\n{gone}models:\n  m:\n    routes: [{{upstream: u}}]\n",
        up.url()
    ));
    let scrape = || async {
        reqwest::get(gw.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    assert!(
        before.contains("tollgate_upstream_up{server=\"gone/old\",upstream=\"gone\"} 1"),
        "{before}"
    );
    assert!(before.contains("upstream=\"u\""), "{before}");

    let path = gw.dir.path().join("tollgate.yaml");
    let v2 = std::fs::read_to_string(&path).unwrap().replace(&gone, "");
    std::fs::write(&path, v2).unwrap();
    let r = reqwest::Client::new()
        .post(gw.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after = scrape().await;
    assert!(!after.contains("upstream=\"gone\""), "{after}");
    assert!(
        after.contains("tollgate_upstream_up{server=\"u/kept\",upstream=\"u\"} 1"),
        "{after}"
    );
}

/// Regression: a web page could make the operator's browser reload the config or clear
/// cooldowns (a cross-site POST/DELETE to the admin listener was served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_from_another_sites_page_are_refused() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&common::single(&up.url()));
    let c = client();
    let r = c
        .post(gw.admin_url("/admin/reload"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .delete(gw.admin_url("/admin/cooldowns"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = c
        .post(gw.admin_url("/admin/reload"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let metrics = common::scrape(&gw).await;
    assert!(
        !metrics.contains("tollgate_config_reloads_total{result="),
        "no reload ran: {metrics}"
    );
    // The admin listener's own page, and tools that send no Origin, are served.
    let r = c
        .post(gw.admin_url("/admin/reload"))
        .header("origin", format!("http://{}", gw.admin))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c.post(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// With `admin.master_key`, `/admin/*` needs it; probes and scrapers still get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_master_key_guards_the_admin_api_but_not_probes() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_env(
        &format!(
            "admin:\n  master_key: \"${{TG_ADMIN_KEY}}\"\n{}",
            common::single(&up.url())
        ),
        &[("TG_ADMIN_KEY", "adm-key-do-not-print-01")],
    );
    let c = client();
    for path in ["/admin/cooldowns"] {
        assert_eq!(
            c.get(gw.admin_url(path)).send().await.unwrap().status(),
            401
        );
        let r = c
            .get(gw.admin_url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .get(gw.admin_url(path))
            .bearer_auth("adm-key-do-not-print-01")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c.post(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(
            c.get(gw.admin_url(path)).send().await.unwrap().status(),
            200
        );
    }
    assert!(!gw.logs().contains("adm-key-do-not-print"));
}

/// Regression: the access log of a request read the config again at its end, so a reload
/// in the middle of a request could log it under another config's settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_logged_with_the_config_it_started_with() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&common::single(&up.url()));
    up.push([Reply::Stream {
        events: (0..40)
            .map(|i| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{i}\"}}}}]}}\n\n"))
            .chain(["data: [DONE]\n\n".to_string()])
            .collect(),
        gap: Duration::from_millis(100),
        cut: false,
    }]);
    let c = client();
    let mut r = c
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "started-before-the-reload")
        .json(&chat("m", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The first event is here: the request is under way. Reload to JSON access logs.
    r.chunk().await.unwrap();
    let path = gw.dir.path().join("tollgate.yaml");
    let text = std::fs::read_to_string(&path).unwrap() + "log: {format: json}\n";
    std::fs::write(&path, text).unwrap();
    let reload = c.post(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    while r.chunk().await.unwrap().is_some() {}
    let after = c
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "started-after-the-reload")
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    after.text().await.unwrap();
    // The access log is written just after the answer.
    let written = || {
        gw.logs()
            .contains("\"request_id\":\"started-after-the-reload\"")
    };
    assert!(common::eventually(Duration::from_secs(5), written).await);
    let logs = gw.logs();
    let line = |id: &str| {
        logs.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no access log line for {id}:\n{logs}"))
            .to_string()
    };
    assert!(
        line("started-before-the-reload").contains("id=started-before-the-reload"),
        "{logs}"
    );
    assert!(
        line("started-after-the-reload").contains("\"request_id\":\"started-after-the-reload\""),
        "{logs}"
    );
}
