//! Several instances sharing one PostgreSQL store (and one Redis): keys made or changed
//! through any instance apply on all within a second, usage from all lands in one
//! database, and budgets are not overspent across instances. The servers are real
//! (`postgres` and `redis-server`, started by the tests in temporary directories on unix
//! sockets, as an unprivileged user for PostgreSQL, and stopped by pid).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tollgate::demo::mock::MockUpstream;

const MASTER: &str = "scale-out-master-key";

fn config(store: &str, redis: Option<&str>, upstream: &str) -> String {
    let cluster = redis.map_or_else(String::new, |r| format!("cluster:\n  redis: \"{r}\"\n"));
    format!(
        "store:\n  url: \"{store}\"\n  flush_interval: 200ms\n  refresh_interval: 1s\n{cluster}admin:\n  master_key: {MASTER}\nupstreams:\n  u:\n    servers: [{{url: \"{upstream}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u, model: gpt-4o-mini}}]\n"
    )
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client().request(m, gw.admin_url(path)).bearer_auth(MASTER);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let _ = r.bytes().await;
    s
}

/// How long until `gw` answers `key` with `want` (polling every 20 ms, for up to 3 s).
async fn until_status(gw: &Gateway, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        if status(gw, key).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still not {want} after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_or_blocked_on_one_instance_applies_on_all_within_a_second() {
    let pg = Postgres::start();
    let up = MockUpstream::start("u").await.unwrap();
    let text = config(&pg.url, None, &up.url());
    let gws = [
        Gateway::start(&text),
        Gateway::start(&text),
        Gateway::start(&text),
    ];
    // All three migrated the one database (one after the other) and agree on it.
    assert_eq!(pg.psql("SELECT MAX(version) FROM tollgate_schema"), "2");

    let (s, v) = admin(
        &gws[0],
        "POST",
        "/admin/keys",
        Some(json!({"name": "shared"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (id, key) = (v["id"].as_str().unwrap(), v["key"].as_str().unwrap());
    for gw in &gws[1..] {
        let took = until_status(gw, key, 200).await;
        eprintln!("a new key applied after {took:?}");
        assert!(took < Duration::from_secs(1), "a new key took {took:?}");
    }

    let path = format!("/admin/keys/{id}");
    let (s, v) = admin(&gws[2], "PATCH", &path, Some(json!({"blocked": true}))).await;
    assert_eq!(s, 200, "{v}");
    for gw in &gws[..2] {
        let took = until_status(gw, key, 401).await;
        eprintln!("a block applied after {took:?}");
        assert!(took < Duration::from_secs(1), "a block took {took:?}");
    }
    // Instance 1's view of the key says blocked too.
    let (_, shown) = admin(&gws[0], "GET", &path, None).await;
    assert_eq!(shown["blocked"], json!(true), "{shown}");

    // Usage from every instance lands in the one database, and any instance reports it.
    let served = 2; // the first 200 of instances 2 and 3 above, and none since
    let rows = || pg.psql("SELECT COUNT(*) FROM usage WHERE status = 200");
    assert!(
        eventually(Duration::from_secs(5), || rows() == served.to_string()).await,
        "usage rows: {}",
        rows()
    );
    let (s, spend) = admin(&gws[0], "GET", "/admin/spend?group_by=key", None).await;
    assert_eq!(s, 200, "{spend}");
    assert_eq!(spend["data"][0]["key_id"], json!(id), "{spend}");
    assert_eq!(spend["data"][0]["requests"], json!(served), "{spend}");
    assert!(
        spend["data"][0]["spend_micro_usd"].as_i64().unwrap() > 0,
        "{spend}"
    );
    // The audit log holds both changes, whichever instance made them.
    let actions = pg.psql("SELECT string_agg(action, ',' ORDER BY ts) FROM audit");
    assert_eq!(actions, "key.create,key.update");
    assert_eq!(up.hits(), served);

    // A change no notification announced (made in the database directly) still applies
    // within the full re-read's interval (`store.refresh_interval`, 1 s here).
    pg.psql(&format!("UPDATE keys SET blocked = 0 WHERE id = '{id}'"));
    for gw in &gws {
        let took = until_status(gw, key, 200).await;
        assert!(
            took < Duration::from_millis(2500),
            "a re-read took {took:?}"
        );
    }
}
