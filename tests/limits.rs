//! Rate limits end to end: requests, tokens and concurrency per key, IP and model, with
//! the 429s and `x-ratelimit-*` headers a client sees, and what reached the upstream.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, chat_status, client, eventually, Gateway};
use serde_json::Value;
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

fn config(up: &MockUpstream, keys: &str, extra: &str) -> String {
    format!(
        "{extra}keys:\n{keys}upstreams:\n  u:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
        up.url()
    )
}

fn assert_openai_duration(v: &str) {
    let ok = v
        .strip_suffix("ms")
        .is_some_and(|n| n.parse::<u64>().is_ok())
        || v.strip_suffix('s').is_some_and(|rest| {
            let rest =
                rest.split_once('h').map_or(
                    rest,
                    |(h, r)| if h.parse::<u64>().is_ok() { r } else { "x" },
                );
            let rest =
                rest.split_once('m').map_or(
                    rest,
                    |(m, r)| if m.parse::<u64>().is_ok() { r } else { "x" },
                );
            rest.parse::<u64>().is_ok()
        });
    assert!(ok, "not an OpenAI reset duration: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_a_keys_rpm_is_refused_with_openai_headers_and_keys_are_independent() {
    let up = MockUpstream::start("u").await.unwrap();
    // The upstream's own headers must not leak through in place of the key's.
    up.set_default(Reply::Status {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-ratelimit-limit-requests".into(), "99999".into()),
        ],
        body: "{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}".into(),
    });
    let gw = Gateway::start(&config(
        &up,
        "  - {name: a, key: tg-key-a-00000000, limits: {rpm: 60, tpm: 100000}}\n  - {name: b, key: tg-key-b-00000000, limits: {rpm: 60}}\n",
        "",
    ));
    let c = client();
    let mut ok = 0;
    let mut refused = Vec::new();
    for _ in 0..100 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth("tg-key-a-00000000")
            .json(&chat("m", false))
            .send()
            .await
            .unwrap();
        let h = r.headers();
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-limit-tokens"], "100000");
        assert_openai_duration(h["x-ratelimit-reset-requests"].to_str().unwrap());
        assert_openai_duration(h["x-ratelimit-reset-tokens"].to_str().unwrap());
        let remaining: u64 = h["x-ratelimit-remaining-requests"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(remaining, 0);
                let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry), "{retry}");
                refused.push(r.json::<Value>().await.unwrap());
            }
            s => panic!("unexpected {s}"),
        }
    }
    // The sliding window admits exactly the limit within one window (documented tolerance:
    // concurrent requests in flight at the same instant; this burst is sequential).
    assert_eq!(ok, 60);
    assert_eq!(up.hits(), 60);
    let e = &refused[0]["error"];
    assert_eq!(e["type"], "rate_limit_exceeded");
    assert_eq!(e["code"], "rate_limit_exceeded");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("60 requests per minute") && msg.contains("API key"),
        "{msg}"
    );
    assert!(!msg.contains("tg-key-a"));
    // Key b has its own budget.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("tg-key-b-00000000")
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "59");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ip_limit_uses_forwarded_for_only_from_trusted_proxies() {
    let up = MockUpstream::start("u").await.unwrap();
    let trusted = Gateway::start(&config(&up, "  []\n", "server:\n  listen: [\"127.0.0.1:0\"]\n  admin_listen: \"127.0.0.1:0\"\n  threads: 1\n  grace_period: 0s\n  trusted_proxies: [\"127.0.0.1\"]\nlimits:\n  per_ip: {rpm: 3}\n"));
    let untrusted = Gateway::start(&config(&up, "  []\n", "limits:\n  per_ip: {rpm: 3}\n"));
    let c = client();
    let send = |gw: &Gateway, xff: &'static str| {
        c.post(gw.url("/v1/chat/completions"))
            .header("x-forwarded-for", xff)
            .json(&chat("m", false))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(send(&trusted, "198.51.100.1").await.unwrap().status(), 200);
    }
    assert_eq!(send(&trusted, "198.51.100.1").await.unwrap().status(), 429);
    assert_eq!(send(&trusted, "198.51.100.2").await.unwrap().status(), 200);
    // Not trusted: X-Forwarded-For is ignored and every request counts for 127.0.0.1.
    for _ in 0..3 {
        assert_eq!(
            send(&untrusted, "198.51.100.1").await.unwrap().status(),
            200
        );
    }
    let r = send(&untrusted, "198.51.100.9").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("client IP"));
    // The upstream sees the client's chain with the real peer appended.
    assert_eq!(
        up.last().unwrap().headers["x-forwarded-for"],
        "198.51.100.1, 127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_refuses_once_reported_usage_exhausts_the_window_including_stream_usage() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&config(
        &up,
        "  - {name: json, key: tg-key-json-0000, limits: {tpm: 1000}}\n  - {name: sse, key: tg-key-sse-00000, limits: {tpm: 1000}}\n",
        "",
    ));
    let c = client();
    let post = |key: &'static str, stream: bool| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat("m", stream))
            .send()
    };
    // A non-streaming response that reports 990 tokens: the next request's estimate
    // (a quarter of its ~90 body bytes) no longer fits in the minute.
    up.push([Reply::error(
        200,
        r#"{"choices":[],"usage":{"prompt_tokens":900,"completion_tokens":90,"total_tokens":990}}"#,
    )]);
    let r = post("tg-key-json-0000", false).await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let r = post("tg-key-json-0000", false).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "1000");
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1000 tokens per minute"));
    assert_eq!(up.hits(), 1);

    // The same through a stream whose usage arrives in its last chunk.
    up.push([Reply::Stream {
        events: vec![
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n".into(),
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":500,\"completion_tokens\":490,\"total_tokens\":990}}\n\n".into(),
            "data: [DONE]\n\n".into(),
        ],
        gap: Duration::from_millis(10),
        cut: false,
    }]);
    let r = post("tg-key-sse-00000", true).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    assert_eq!(post("tg-key-sse-00000", true).await.unwrap().status(), 429);
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_counts_streams_until_they_end_or_the_client_leaves() {
    let up = MockUpstream::start("u").await.unwrap();
    let slow = || Reply::Stream {
        events: (0..40)
            .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
            .collect(),
        gap: Duration::from_millis(100),
        cut: false,
    };
    up.set_default(slow());
    let gw = Gateway::start(&config(
        &up,
        "  - {name: k, key: tg-key-conc-0000, limits: {concurrency: 2}}\n",
        "",
    ));
    let c = client();
    let post = || {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth("tg-key-conc-0000")
            .json(&chat("m", true))
            .send()
    };
    let mut s1 = post().await.unwrap();
    let mut s2 = post().await.unwrap();
    s1.chunk().await.unwrap().unwrap();
    s2.chunk().await.unwrap().unwrap();
    let third = post().await.unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 requests in flight"));
    // The client of stream 1 leaves: its slot frees as soon as the gateway notices.
    drop(s1);
    let admitted = async {
        for _ in 0..100 {
            up.push([Reply::Model]);
            let r = c
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth("tg-key-conc-0000")
                .json(&chat("m", false))
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                return true;
            }
            up.clear_script();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(admitted.await);
    // Stream 2 runs to its end: then two new streams fit again.
    while s2.chunk().await.unwrap().is_some() {}
    assert!(eventually(Duration::from_secs(2), || up.open_streams() == 0).await);
    up.set_default(Reply::Model);
    let a = post().await.unwrap();
    let b = post().await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_limit_applies_to_every_caller_of_the_alias() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n    limits: {{rpm: 2}}\n  n:\n    routes: [{{upstream: u}}]\n",
        up.url()
    ));
    let c = client();
    for expected in [200, 200, 429] {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .json(&chat("m", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), expected);
        if expected == 429 {
            assert!(r.json::<Value>().await.unwrap()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("model `m`"));
        }
    }
    assert_eq!(chat_status(&c, &gw, "n").await, 200);
}

/// Regression: `max_tokens` near 2^63 or 2^64 wrapped the token estimate into a negative
/// counter increment, which switched the tpm limit off for the key and the global scope
/// until the window rolled over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_max_tokens_cannot_switch_the_token_limit_off() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&config(
        &up,
        "  - {name: a, key: tg-key-a-00000000, limits: {tpm: 1000}}\n",
        "limits:\n  global: {tpm: 5000}\n",
    ));
    let c = client();
    let post = |max_tokens: Value| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth("tg-key-a-00000000")
            .json(&serde_json::json!({
                "model": "m",
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hi"}],
            }))
            .send()
    };
    for bad in [
        serde_json::json!(9223372036854775807u64),
        serde_json::json!(18446744073709551615u64),
        serde_json::json!(-1),
        serde_json::json!(1.5),
    ] {
        let r = post(bad.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "max_tokens {bad}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_tokens must be a non-negative integer"),
            "{v}"
        );
    }
    // A sane number larger than the limit: refused as a whole, nothing counted.
    let r = post(serde_json::json!(2_000_000_000u64)).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(up.hits(), 0);

    // The limit still holds: 990 reported tokens leave no room for the next request.
    up.push([Reply::error(
        200,
        r#"{"choices":[],"usage":{"prompt_tokens":900,"completion_tokens":90,"total_tokens":990}}"#,
    )]);
    let r = post(serde_json::json!(1)).await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    assert_eq!(post(serde_json::json!(1)).await.unwrap().status(), 429);
    assert_eq!(up.hits(), 1);
}
