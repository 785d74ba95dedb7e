//! The response cache end to end: the real binary in front of a mock upstream, asserting
//! on the upstream's hit count as well as on what the client got; and two instances
//! sharing a real Redis (`redis-server`, started here on a unix socket in a temporary
//! directory, stopped by pid).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

const KEY_A: &str = "cache-key-a-000000";
const KEY_B: &str = "cache-key-b-000000";

fn cached_config(url: &str, extra: &str) -> String {
    format!(
        "keys:\n  - {{name: a, key: {KEY_A}}}\n  - {{name: b, key: {KEY_B}}}\nupstreams:\n  u:\n    servers: [{{url: \"{url}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u, model: up-model}}]\n    cache: {{ttl: 10m}}\n  plain:\n    routes: [{{upstream: u}}]\npricing:\n  up-model: {{input: 5.0, output: 15.0}}\n{extra}"
    )
}

async fn ask(
    gw: &Gateway,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-tollgate-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    // A cut stream ends in an error: what arrived is enough here.
    (status, cache, r.text().await.unwrap_or_default())
}

const BODY: &str =
    r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"What is 2+2?"}]}"#;
const SAME: &str = r#"{ "messages": [ { "content": "What is 2+2?", "role": "user" } ],
    "temperature": 0, "model": "m" }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_request_in_another_member_order_is_answered_without_the_upstream() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&cached_config(&up.url(), ""));
    let (status, cache, first) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    let (status, cache, second) = ask(&gw, KEY_A, SAME, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "hit"));
    assert_eq!(first, second);
    assert_eq!(up.hits(), 1);
    // An alias without a cache says nothing about it.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&json!({"model": "plain", "messages": []}))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("x-tollgate-cache").is_none());

    let metrics = scrape(&gw).await;
    assert!(
        metrics.contains("tollgate_cache_lookups_total{result=\"hit\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_cache_lookups_total{result=\"miss\"} 1"));
    let saved = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_cache_saved_tokens_total "))
        .unwrap();
    assert_ne!(saved, "tollgate_cache_saved_tokens_total 0");
    assert!(metrics.contains("tollgate_cache_entries 1"), "{metrics}");
    assert!(eventually(Duration::from_secs(2), || gw.logs().contains(" cache=hit ")).await);

    // DELETE /admin/cache empties it: the next request goes upstream again.
    let r = client()
        .delete(gw.admin_url("/admin/cache?model=m"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, cache, _) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_eq!(cache, "miss");
    assert_eq!(
        up.hits(),
        3,
        "the first miss, the uncached alias, the miss after clearing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_replayed_event_by_event_and_streams_are_separate_entries() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&cached_config(&up.url(), ""));
    let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"tell me"}]}"#;
    let (status, cache, first) = ask(&gw, KEY_A, stream, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    assert!(first.contains("data: [DONE]"), "{first}");
    let (status, cache, second) = ask(&gw, KEY_A, stream, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "hit"));
    assert_eq!(first, second);
    assert!(first.matches("data: ").count() >= 3, "{first}");
    // The same question without stream is another entry.
    let plain = r#"{"model":"m","messages":[{"role":"user","content":"tell me"}]}"#;
    let (_, cache, body) = ask(&gw, KEY_A, plain, &[]).await;
    assert_eq!(cache, "miss");
    assert!(!body.contains("data: "));
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_never_cross_keys_and_cache_control_is_obeyed() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&cached_config(&up.url(), ""));
    ask(&gw, KEY_A, BODY, &[]).await;
    // Another key does not see a's answer (scope key).
    let (_, cache, _) = ask(&gw, KEY_B, BODY, &[]).await;
    assert_eq!(cache, "miss");
    assert_eq!(up.hits(), 2);
    // no-cache: asks the upstream, and stores what it got.
    let (_, cache, _) = ask(&gw, KEY_A, BODY, &[("cache-control", "no-cache")]).await;
    assert_eq!(cache, "bypass");
    assert_eq!(up.hits(), 3);
    let (_, cache, _) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_eq!(cache, "hit");
    // no-store: neither reads nor writes.
    let other = r#"{"model":"m","messages":[{"role":"user","content":"new question"}]}"#;
    let (_, cache, _) = ask(&gw, KEY_A, other, &[("cache-control", "no-store")]).await;
    assert_eq!(cache, "bypass");
    let (_, cache, _) = ask(&gw, KEY_A, other, &[]).await;
    assert_eq!(cache, "miss");
    assert_eq!(up.hits(), 5);
    // x-tollgate-cache-ttl shortens the time an answer is kept.
    let short = r#"{"model":"m","messages":[{"role":"user","content":"short-lived"}]}"#;
    ask(&gw, KEY_A, short, &[("x-tollgate-cache-ttl", "1s")]).await;
    let (_, cache, _) = ask(&gw, KEY_A, short, &[]).await;
    assert_eq!(cache, "hit");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (_, cache, _) = ask(&gw, KEY_A, short, &[]).await;
    assert_eq!(cache, "miss");
    assert_eq!(up.hits(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_cut_answers_are_never_stored() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&cached_config(&up.url(), ""));
    up.push([Reply::error(500, r#"{"error":{"message":"boom"}}"#)]);
    let (status, _, _) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_ne!(status, 200);
    let (status, cache, _) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"cut"}]}"#;
    up.push([Reply::Stream {
        events: vec![r#"{"choices":[{"delta":{"content":"par"}}]}"#.into()],
        gap: Duration::from_millis(10),
        cut: true,
    }]);
    let _ = ask(&gw, KEY_A, stream, &[]).await;
    let (status, cache, body) = ask(&gw, KEY_A, stream, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"), "{body}");
    assert_eq!(up.hits(), 4);
}

/// An upstream that answers every request with `head` and `body` as raw bytes and then
/// closes the connection: no Content-Length, not chunked, so the close ends the body.
/// Returns its URL and the count of requests it answered.
async fn close_delimited_upstream(
    head: &'static str,
    body: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // The header, then as many body bytes as it announces.
                loop {
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (url, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_answer_ended_by_closing_the_connection_is_never_stored() {
    use std::sync::atomic::Ordering;
    // Half a JSON body, then the upstream closes.
    let (url, served) = close_delimited_upstream(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
        r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"The answer is"#,
    )
    .await;
    let gw = Gateway::start(&cached_config(&url, ""));
    let (status, cache, body) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    assert!(body.ends_with("The answer is"), "{body}");
    let (_, cache, _) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_eq!(cache, "miss", "half a JSON body was stored");
    assert_eq!(served.load(Ordering::SeqCst), 2);

    // A stream without its [DONE], then the upstream closes.
    let (url, served) = close_delimited_upstream(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"The\"}}]}\n\n",
    )
    .await;
    let gw = Gateway::start(&cached_config(&url, ""));
    let streamed =
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"What is 2+2?"}]}"#;
    let (status, cache, body) = ask(&gw, KEY_A, streamed, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    assert!(body.contains("The") && !body.contains("[DONE]"), "{body}");
    let (_, cache, _) = ask(&gw, KEY_A, streamed, &[]).await;
    assert_eq!(cache, "miss", "a stream without its final event was stored");
    assert_eq!(served.load(Ordering::SeqCst), 2);

    // A Content-Length the upstream does not fill before closing.
    let (url, served) = close_delimited_upstream(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n",
        r#"{"id":"x","object":"chat.completion","choices":[]}"#,
    )
    .await;
    let gw = Gateway::start(&cached_config(&url, ""));
    let _ = ask(&gw, KEY_A, BODY, &[]).await;
    let (_, cache, _) = ask(&gw, KEY_A, BODY, &[]).await;
    assert_eq!(cache, "miss", "a body shorter than its length was stored");
    assert_eq!(served.load(Ordering::SeqCst), 2);

    // The same framing with a whole answer is stored: the check is on the answer.
    let (url, served) = close_delimited_upstream(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"4\"}}]}\n\ndata: [DONE]\n\n",
    )
    .await;
    let gw = Gateway::start(&cached_config(&url, ""));
    assert_eq!(ask(&gw, KEY_A, streamed, &[]).await.1, "miss");
    let (status, cache, body) = ask(&gw, KEY_A, streamed, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "hit"));
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_members_share_answers_with_scope_team_and_a_hit_costs_nothing() {
    const MASTER: &str = "cache-master-key-0000";
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&cached_config(
        &up.url(),
        &format!("cache: {{scope: team}}\nadmin:\n  master_key: {MASTER}\n"),
    ));
    let admin = |method: reqwest::Method, path: &str, body: Value| {
        client()
            .request(method, gw.admin_url(path))
            .bearer_auth(MASTER)
            .json(&body)
            .send()
    };
    let r = admin(reqwest::Method::POST, "/admin/teams", json!({"name": "t"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut secrets = Vec::new();
    for name in ["one", "two", "alone"] {
        let team = if name == "alone" {
            Value::Null
        } else {
            json!("t")
        };
        let r = admin(
            reqwest::Method::POST,
            "/admin/keys",
            json!({"name": name, "team": team, "budget": {"max_usd": 10, "period": "total"}}),
        )
        .await
        .unwrap();
        let v: Value = r.json().await.unwrap();
        secrets.push(v["key"].as_str().unwrap().to_string());
    }
    let (_, cache, _) = ask(&gw, &secrets[0], BODY, &[]).await;
    assert_eq!(cache, "miss");
    let (_, cache, _) = ask(&gw, &secrets[1], BODY, &[]).await;
    assert_eq!(cache, "hit", "a member of the same team");
    let (_, cache, _) = ask(&gw, &secrets[2], BODY, &[]).await;
    assert_eq!(cache, "miss", "a key without a team keeps its own");
    assert_eq!(up.hits(), 2);
    // Usage: the hit is a row with no tokens and no cost, marked as a hit with what it saved.
    let mut usage = Vec::new();
    for _ in 0..100 {
        let r = admin(reqwest::Method::GET, "/admin/usage", Value::Null)
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        usage = v["data"].as_array().cloned().unwrap_or_default();
        if usage.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(usage.len(), 3, "{usage:?}");
    let hit = usage.iter().find(|r| r["cache"] == "hit").unwrap();
    assert_eq!(hit["cost_micro_usd"], 0, "{hit}");
    assert_eq!(hit["input_tokens"], 0, "{hit}");
    assert_eq!(hit["key_name"], "two", "{hit}");
    assert!(hit["saved_tokens"].as_i64().unwrap() > 0, "{hit}");
    let miss = usage.iter().find(|r| r["key_name"] == "one").unwrap();
    assert!(miss["cost_micro_usd"].as_i64().unwrap() > 0, "{miss}");
    assert_eq!(hit["saved_micro_usd"], miss["cost_micro_usd"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_redis_backend_instance_two_hits_what_instance_one_stored() {
    let redis = Redis::start();
    let up = MockUpstream::start("u").await.unwrap();
    let extra = format!(
        "cache: {{backend: redis}}\ncluster: {{redis: \"{}\"}}\n",
        redis.url
    );
    let one = Gateway::start(&cached_config(&up.url(), &extra));
    let two = Gateway::start(&cached_config(&up.url(), &extra));
    let (_, cache, first) = ask(&one, KEY_A, BODY, &[]).await;
    assert_eq!(cache, "miss");
    let (_, cache, second) = ask(&two, KEY_A, SAME, &[]).await;
    assert_eq!(cache, "hit");
    assert_eq!(first, second);
    assert_eq!(up.hits(), 1);
    // Another key's scope is kept apart in Redis too.
    let (_, cache, _) = ask(&two, KEY_B, BODY, &[]).await;
    assert_eq!(cache, "miss");
    // Clearing through instance 2 clears it for instance 1.
    let r = client()
        .delete(two.admin_url("/admin/cache"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, cache, _) = ask(&one, KEY_A, BODY, &[]).await;
    assert_eq!(cache, "miss");
    // Redis gone: requests still succeed, answered without the cache.
    drop(redis);
    let (status, cache, _) = ask(&one, KEY_A, BODY, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_says_what_it_cost_and_a_hit_costs_nothing() {
    let up = MockUpstream::start("u").await.unwrap();
    // The upstream is another gateway that says what it charged: only this one's figure
    // reaches the client.
    up.set_default(Reply::Status {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-tollgate-cost-usd".into(), "9.990000".into()),
        ],
        body: json!({"id": "c1", "object": "chat.completion", "created": 0, "model": "up-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}})
        .to_string(),
    });
    let gw = Gateway::start(&cached_config(&up.url(), ""));
    let cost = |model: &'static str| {
        let gw = &gw;
        async move {
            let r = client()
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(KEY_A)
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "2+2?"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.headers()
                .get("x-tollgate-cost-usd")
                .map(|v| v.to_str().unwrap().to_string())
        }
    };
    // 1,000 input tokens at $5 and 200 output tokens at $15 per million: 8,000 micro-USD.
    assert_eq!(cost("m").await.as_deref(), Some("0.008000"));
    assert_eq!(cost("m").await.as_deref(), Some("0.000000"), "a cache hit");
    assert_eq!(cost("plain").await, None, "no price for the model");
    assert_eq!(up.hits(), 2);
}
