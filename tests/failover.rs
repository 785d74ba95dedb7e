//! Quota-aware failover end to end: mock upstreams script error answers from the
//! reference shapes; assertions on per-server hit counts and on what the client saw.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{admin_json, chat, client, eventually, send_chat, single, two_tiers, Gateway};
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

const OPENAI_QUOTA: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
const OPENAI_RATE: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o on tokens per min (TPM). Please try again in 2s.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
const ANTHROPIC_OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

fn two_servers(a: &MockUpstream, b: &MockUpstream, extra: &str) -> String {
    format!(
        "{extra}upstreams:\n  pool:\n    servers:\n      - {{url: \"{}\", name: a}}\n      - {{url: \"{}\", name: b}}\nmodels:\n  m:\n    routes: [{{upstream: pool}}]\n",
        a.url(),
        b.url()
    )
}

async fn cooldowns(gw: &Gateway) -> Vec<Value> {
    let v: Value = admin_json(&client(), gw, "/admin/cooldowns").await;
    v["cooldowns"].as_array().cloned().unwrap_or_default()
}

async fn post(gw: &Gateway, model: &str) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(model, false))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_on_one_key_moves_to_the_next_and_keeps_it_out_for_the_quota_cooldown() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    a.set_default(Reply::error(429, OPENAI_QUOTA));
    let gw = Gateway::start(&two_servers(&a, &b, ""));
    for _ in 0..6 {
        let r = post(&gw, "m").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tollgate-upstream"], "pool/b");
    }
    // Round robin reaches a within the first two requests; after its quota error it
    // cools for an hour and gets nothing more.
    assert_eq!(a.hits(), 1);
    assert_eq!(b.hits(), 6);
    let list = cooldowns(&gw).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["target"], "pool/a");
    assert_eq!(list[0]["reason"], "quota");
    let left = list[0]["remaining_seconds"].as_f64().unwrap();
    assert!(left > 3500.0 && left <= 3600.0, "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_429_cools_the_target_for_its_retry_after() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  first:\n    servers: [{{url: \"{}\", name: a}}]\n  second:\n    servers: [{{url: \"{}\", name: b}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: first, priority: 1}}\n      - {{upstream: second, priority: 2}}\n",
        a.url(),
        b.url()
    ));
    a.push([Reply::Status {
        status: 429,
        headers: vec![
            ("retry-after".into(), "2".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: OPENAI_RATE.into(),
    }]);
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "2");
    assert_eq!(r.headers()["x-tollgate-upstream"], "second/b");
    let list = cooldowns(&gw).await;
    assert_eq!(list[0]["target"], "first/a");
    assert_eq!(list[0]["reason"], "transient");
    let left = list[0]["remaining_seconds"].as_f64().unwrap();
    assert!(left > 1.0 && left <= 2.0, "{left}");
    // While a cools, tier 2 serves directly.
    let r = post(&gw, "m").await;
    assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    assert_eq!((a.hits(), b.hits()), (1, 2));
    // An operator can end the cooldown at once.
    let del = client()
        .delete(gw.admin_url("/admin/cooldowns/first%2Fa"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    assert!(cooldowns(&gw).await.is_empty());
    let r = post(&gw, "m").await;
    assert_eq!(r.headers()["x-tollgate-upstream"], "first/a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_two_only_after_tier_one_is_exhausted_then_the_fallback_alias() {
    let t1a = MockUpstream::start("t1a").await.unwrap();
    let t1b = MockUpstream::start("t1b").await.unwrap();
    let t2 = MockUpstream::start("t2").await.unwrap();
    let fb = MockUpstream::start("fb").await.unwrap();
    for m in [&t1a, &t1b, &t2] {
        m.set_default(Reply::error(529, ANTHROPIC_OVERLOADED));
    }
    let gw = Gateway::start(&format!(
        "failover: {{max_attempts: 6}}\nupstreams:\n  one:\n    servers: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n  two:\n    servers: [{{url: \"{}\"}}]\n  other:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: one, priority: 1}}\n      - {{upstream: two, priority: 2}}\n    fallbacks: [small]\n  small:\n    routes: [{{upstream: other, model: small-v2}}]\n",
        t1a.url(),
        t1b.url(),
        t2.url(),
        fb.url()
    ));
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "4");
    assert_eq!((t1a.hits(), t1b.hits(), t2.hits(), fb.hits()), (1, 1, 1, 1));
    let sent: Value = serde_json::from_slice(&fb.last().unwrap().body).unwrap();
    assert_eq!(sent["model"], "small-v2");
    // Order: both tier-1 servers (either order), then tier 2, then the fallback alias.
    // The access log is written just after the response; wait for it.
    let has_line = |l: &str| l.contains(" id=") && l.contains("attempts=");
    assert!(eventually(Duration::from_secs(2), || gw.logs().lines().any(has_line)).await);
    let log = gw.logs();
    let line = log.lines().find(|l| has_line(l)).unwrap();
    let attempts = line
        .split("attempts=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let order: Vec<&str> = attempts.split(',').collect();
    assert_eq!(order.len(), 4, "{attempts}");
    assert!(
        order[0].starts_with("one/") && order[1].starts_with("one/"),
        "{attempts}"
    );
    assert!(
        order[2].starts_with("two/") && order[3].starts_with("other/"),
        "{attempts}"
    );
    assert!(order[0].ends_with("transient:529"), "{attempts}");

    // Every target of m now cools: the next request goes to the fallback straight away.
    let r = post(&gw, "m").await;
    assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    assert_eq!(fb.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_body_is_resent_intact_on_every_attempt() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let c = MockUpstream::start("c").await.unwrap();
    a.set_default(Reply::error(500, "{\"error\":{\"message\":\"boom\"}}"));
    b.set_default(Reply::error(503, "upstream connect error"));
    let gw = Gateway::start(&format!(
        "upstreams:\n  a: {{servers: [{{url: \"{}\"}}]}}\n  b: {{servers: [{{url: \"{}\"}}]}}\n  c: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: a, priority: 1}}\n      - {{upstream: b, priority: 2}}\n      - {{upstream: c, priority: 3}}\n",
        a.url(),
        b.url(),
        c.url()
    ));
    let filler: String = (0..(1 << 20))
        .map(|i| (b'a' + (i % 23) as u8) as char)
        .collect();
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": filler}]})
        .to_string();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "3");
    for m in [&a, &b, &c] {
        assert_eq!(m.hits(), 1);
        assert_eq!(m.last().unwrap().body, body.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_bounds_the_total_and_the_client_gets_a_gateway_error_listing_them() {
    let mocks = [
        MockUpstream::start("1").await.unwrap(),
        MockUpstream::start("2").await.unwrap(),
        MockUpstream::start("3").await.unwrap(),
        MockUpstream::start("4").await.unwrap(),
        MockUpstream::start("5").await.unwrap(),
    ];
    for m in &mocks {
        m.set_default(Reply::Status {
            status: 503,
            headers: vec![("retry-after".into(), "20".into())],
            body: "overloaded".into(),
        });
    }
    let servers: Vec<String> = mocks
        .iter()
        .map(|m| format!("{{url: \"{}\"}}", m.url()))
        .collect();
    let gw = Gateway::start_with_env(
        &format!(
            "failover: {{max_attempts: 3}}\nupstreams:\n  pool:\n    provider: openai\n    servers: [{}]\nmodels:\n  m:\n    routes: [{{upstream: pool}}]\n",
            servers.iter().map(|s| s.replace('}', ", api_key: \"${TG_UP_KEY}\"}")).collect::<Vec<_>>().join(", ")
        ),
        &[("TG_UP_KEY", "sk-upstream-secret-42424242")],
    );
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-tollgate-attempts"], "3");
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19..=20).contains(&retry_after), "{retry_after}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("All 3 upstream attempts") && msg.contains("transient 503"),
        "{msg}"
    );
    assert!(!msg.contains("sk-upstream-secret"));
    assert_eq!(mocks.iter().map(|m| m.hits()).sum::<usize>(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_error_is_returned_as_is_without_trying_other_targets() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let bad = r#"{"error":{"message":"Invalid value for 'temperature'","type":"invalid_request_error","param":"temperature","code":null}}"#;
    a.set_default(Reply::error(400, bad));
    b.set_default(Reply::error(400, bad));
    let gw = Gateway::start(&two_servers(&a, &b, ""));
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    assert_eq!(r.text().await.unwrap(), bad);
    assert_eq!(a.hits() + b.hits(), 1);
    assert!(cooldowns(&gw).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_length_error_moves_to_the_context_fallback() {
    let small = MockUpstream::start("small").await.unwrap();
    let big = MockUpstream::start("big").await.unwrap();
    small.set_default(Reply::error(400, r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#));
    let gw = Gateway::start(&format!(
        "upstreams:\n  s: {{servers: [{{url: \"{}\"}}]}}\n  b: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  short:\n    routes: [{{upstream: s}}]\n    context_fallbacks: [long]\n  long:\n    routes: [{{upstream: b, model: long-128k}}]\n  plain:\n    routes: [{{upstream: s}}]\n",
        small.url(),
        big.url()
    ));
    let r = post(&gw, "short").await;
    assert_eq!(r.status(), 200);
    assert_eq!(big.hits(), 1);
    assert_eq!(
        serde_json::from_slice::<Value>(&big.last().unwrap().body).unwrap()["model"],
        "long-128k"
    );
    // Without a context fallback the client gets the upstream's 400 as is.
    let r = post(&gw, "plain").await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("context_length_exceeded"));
    assert_eq!(big.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_an_upstream_moves_on_and_is_logged_without_the_key() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let gw = Gateway::start_with_env(
        &format!(
            "upstreams:\n  first:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: \"${{TG_BAD}}\"}}]\n  second:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: \"${{TG_GOOD}}\"}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: first, priority: 1}}\n      - {{upstream: second, priority: 2}}\n",
            a.url(),
            b.url()
        ),
        &[("TG_BAD", "sk-revoked-key-77777777"), ("TG_GOOD", "sk-good-key-88888888")],
    );
    a.set_default(Reply::error(401, r#"{"error":{"message":"Incorrect API key provided: sk-revo****7777.","type":"invalid_request_error","code":"invalid_api_key"}}"#));
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        a.last().unwrap().headers["authorization"],
        "Bearer sk-revoked-key-77777777"
    );
    assert_eq!(
        b.last().unwrap().headers["authorization"],
        "Bearer sk-good-key-88888888"
    );
    assert!(
        eventually(Duration::from_secs(2), || gw
            .logs()
            .contains("rejected the gateway's credential"))
        .await
    );
    let logs = gw.logs();
    assert!(logs.contains("first/"), "{logs}");
    // The operator can tell which key it was from its masked form.
    assert!(logs.contains("sk-re****7777"), "{logs}");
    assert!(!logs.contains("sk-revoked-key-77777777") && !logs.contains("sk-good-key-88888888"));
    let list = cooldowns(&gw).await;
    assert_eq!(list[0]["reason"], "credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_fail_over_before_the_first_byte_but_never_after() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let gw = Gateway::start(&two_tiers(&a.url(), &b.url(), ""));
    // Before the first byte: a 429 on a stream request fails over like any other.
    a.push([Reply::error(429, OPENAI_RATE)]);
    let r = send_chat(&gw, "m", true).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert_eq!((a.hits(), b.hits()), (1, 1));
    client()
        .delete(gw.admin_url("/admin/cooldowns"))
        .send()
        .await
        .unwrap();

    // After the first byte: the upstream dies mid-stream; no retry, an SSE error event,
    // and no [DONE].
    a.push([Reply::Stream {
        events: vec!["data: {\"n\":1}\n\n".into(), "data: {\"n\":2}\n\n".into()],
        gap: Duration::from_millis(50),
        cut: true,
    }]);
    let r = send_chat(&gw, "m", true).await;
    assert_eq!(r.status(), 200);
    let mut body = Vec::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => body.extend_from_slice(&c),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.starts_with("data: {\"n\":1}\n\ndata: {\"n\":2}\n\n"),
        "{text}"
    );
    assert!(text.contains("data: {\"error\":"), "{text}");
    assert!(text.contains("upstream_stream_error"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!((a.hits(), b.hits()), (2, 1));
    let cut_logged = eventually(Duration::from_secs(2), || {
        gw.logs().contains("error=upstream_error")
    })
    .await;
    assert!(cut_logged, "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_byte_times_out_and_moves_on() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    a.set_default(Reply::Hang);
    let gw = Gateway::start(&two_tiers(
        &a.url(),
        &b.url(),
        "first_byte_timeout: 300ms, ",
    ));
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "2");
    assert_eq!(b.hits(), 1);
    let list = cooldowns(&gw).await;
    assert_eq!(list[0]["reason"], "unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_before_any_response_moves_on() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    a.set_default(Reply::Close);
    let gw = Gateway::start(&two_tiers(&a.url(), &b.url(), ""));
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "2");
    assert_eq!((a.hits(), b.hits()), (1, 1));
    let logged = eventually(Duration::from_secs(2), || gw.logs().contains("=reset")).await;
    assert!(logged, "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_failing_active_checks_gets_no_traffic_and_returns_when_healthy() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    a.set_default(Reply::error(503, "down for maintenance"));
    let gw = Gateway::start(&format!(
        "upstreams:\n  pool:\n    health_check: {{interval: 200ms, timeout: 1s}}\n    servers:\n      - {{url: \"{}\", name: a}}\n      - {{url: \"{}\", name: b}}\nmodels:\n  m:\n    routes: [{{upstream: pool}}]\n",
        a.url(),
        b.url()
    ));
    let chat_hits = |m: &MockUpstream| {
        m.received()
            .iter()
            .filter(|r| r.path.ends_with("/chat/completions"))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(3), || a
            .received()
            .iter()
            .any(|r| r.path == "/v1/models"))
        .await
    );
    // Let the failed check land before sending traffic.
    let listed = async {
        for _ in 0..100 {
            if cooldowns(&gw)
                .await
                .iter()
                .any(|c| c["target"] == "pool/a" && c["healthy"] == false)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        false
    };
    assert!(listed.await);
    for _ in 0..10 {
        assert_eq!(post(&gw, "m").await.status(), 200);
    }
    assert_eq!(chat_hits(&a), 0);
    assert_eq!(chat_hits(&b), 10);
    assert_eq!(
        client()
            .get(gw.admin_url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    a.set_default(Reply::Model);
    let back = async {
        for _ in 0..100 {
            if cooldowns(&gw).await.is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        false
    };
    assert!(back.await);
    for _ in 0..10 {
        assert_eq!(post(&gw, "m").await.status(), 200);
    }
    assert!(chat_hits(&a) >= 4, "a={}", chat_hits(&a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_server_is_tried_again_after_a_transient_failure_but_not_after_quota() {
    let up = MockUpstream::start("only").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    // One 500 cools the only server down; the next request still reaches it.
    up.push([Reply::error(500, "{\"error\":{\"message\":\"boom\"}}")]);
    assert_eq!(send_chat(&gw, "m", false).await.status(), 503);
    assert_eq!(cooldowns(&gw).await[0]["reason"], "transient");
    assert_eq!(send_chat(&gw, "m", false).await.status(), 200);
    assert_eq!(up.hits(), 2);
    // Out of quota: the cooldown holds and the client hears when to come back.
    up.push([Reply::error(429, OPENAI_QUOTA)]);
    client()
        .delete(gw.admin_url("/admin/cooldowns"))
        .send()
        .await
        .unwrap();
    let r = send_chat(&gw, "m", false).await;
    assert_eq!(
        r.status(),
        429,
        "the upstream's quota error is relayed as is"
    );
    let r = send_chat(&gw, "m", false).await;
    assert_eq!(r.status(), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 3500, "{retry}");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "no_target"
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_carried_an_error_answer_is_reused_after_the_failover() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let gw = Gateway::start(&two_tiers(&a.url(), &b.url(), ""));
    a.push([Reply::error(429, OPENAI_RATE)]);
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 200);
    assert_eq!((a.hits(), b.hits()), (1, 1));
    client()
        .delete(gw.admin_url("/admin/cooldowns"))
        .send()
        .await
        .unwrap();
    // a is first again; the connection that brought its 429 (read to the end) is reused.
    let r = post(&gw, "m").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["x-tollgate-upstream"]
        .to_str()
        .unwrap()
        .starts_with("first/"));
    assert_eq!(a.hits(), 2);
    assert_eq!(a.connections(), 1);
}
