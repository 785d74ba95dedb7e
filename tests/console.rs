//! The admin console in a real browser: Debian's headless Chromium driven through
//! ChromeDriver by Selenium (`tests/python/console.py`, both installed by
//! `scripts/bootstrap`) against the real binary, a real SQLite file and a mock upstream.
//! Screenshots of each page are written to `target/console-screenshots/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;
use tollgate::demo::mock::{MockUpstream, Reply};

const MASTER: &str = "console-master-key-0123";
const VIEWER: &str = "console-viewer-key-4567";

fn python() -> String {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/pyenv/bin/python");
    assert!(
        std::path::Path::new(venv).exists(),
        "{venv} is missing: run scripts/bootstrap"
    );
    venv.to_string()
}

async fn admin(gw: &Gateway, key: &str, method: reqwest::Method, path: &str) -> (u16, Value) {
    let r = client()
        .request(method, gw.admin_url(path))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_manages_keys_in_a_real_browser_and_the_viewer_only_reads() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: run scripts/bootstrap"
        );
    }
    let up = MockUpstream::start("u").await.unwrap();
    // Tier 1 answers 429 with a long retry hint: the console shows it cooling.
    let flaky = MockUpstream::start("flaky").await.unwrap();
    flaky.set_default(Reply::Status {
        status: 429,
        headers: vec![("retry-after".into(), "600".into())],
        body: r#"{"error":{"message":"slow down","type":"rate_limit_exceeded"}}"#.into(),
    });
    let gw = Gateway::start(&format!(
        "admin:\n  master_key: {MASTER}\n  viewer_key: {VIEWER}\nkeys:\n  - {{name: ops-config, key: ops-config-key-0000}}\nupstreams:\n  bad:\n    servers: [{{url: \"{}\", name: flaky}}]\n  u:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: bad, model: up-model, priority: 1}}\n      - {{upstream: u, model: up-model, priority: 2}}\npricing:\n  up-model: {{input: 5.0, output: 15.0}}\n",
        flaky.url(),
        up.url()
    ));
    let shots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/console-screenshots");
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/console.py"
        ))
        .env("ADMIN", format!("http://{}", gw.admin))
        .env("PROXY", format!("http://{}", gw.addr))
        .env("MASTER", MASTER)
        .env("VIEWER", VIEWER)
        .env("COOLING", "bad/flaky")
        .env("SHOTS", shots)
        .output()
        .expect("run the console script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "console script failed: {stdout}\n{}\nscreenshots in {shots}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();

    // What the browser saw.
    assert_eq!(
        seen["statuses"],
        serde_json::json!([200, 200, 200]),
        "{seen}"
    );
    assert_eq!(seen["after_block"], 401, "{seen}");
    assert_eq!(seen["viewer_write_status"], 403, "{seen}");
    assert!(seen["spend_row"].as_str().unwrap().contains('$'), "{seen}");
    assert!(
        seen["upstream_row"].as_str().unwrap().contains("u/"),
        "{seen}"
    );

    // What reached the upstreams: the three requests (the first one tried the cooling
    // tier first), not the one after the block.
    assert_eq!((flaky.hits(), up.hits()), (1, 3));
    assert_eq!(seen["cooling_before"], "cooling", "{seen}");
    assert_eq!(seen["cooling_after"], "up", "{seen}");
    // The same audit rows as the API's: created, then blocked.
    let (status, audit) = admin(&gw, MASTER, reqwest::Method::GET, "/admin/audit").await;
    assert_eq!(status, 200, "{audit}");
    let actions: Vec<String> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(actions.iter().any(|a| a.contains("create")), "{actions:?}");
    assert!(actions.iter().any(|a| a.contains("update")), "{actions:?}");
    // The viewer reads the same API and changes nothing.
    let (status, _) = admin(&gw, VIEWER, reqwest::Method::GET, "/admin/keys").await;
    assert_eq!(status, 200);
    let (status, _) = admin(&gw, VIEWER, reqwest::Method::DELETE, "/admin/cooldowns").await;
    assert_eq!(status, 403);
    let (status, _) = admin(&gw, "nobody", reqwest::Method::GET, "/admin/keys").await;
    assert_eq!(status, 401);
    // No key, master or viewer, in the gateway's logs.
    let logs = gw.logs();
    for secret in [MASTER, VIEWER] {
        assert!(!logs.contains(secret));
    }
    for page in [
        "signin",
        "keys",
        "spend",
        "teams",
        "upstreams",
        "live",
        "keys-viewer",
    ] {
        assert!(
            std::path::Path::new(&format!("{shots}/{page}.png")).exists(),
            "no screenshot of {page}"
        );
    }
}
