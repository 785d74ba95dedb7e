//! Routing strategies end to end: mock upstreams of different speeds, prices, context
//! windows and provider rate-limit headers behind the real gateway; assertions on which
//! upstream got each request (hit counts) and on what the explain endpoint says.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{admin_json, chat, client, scrape, Gateway};
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

async fn post(gw: &Gateway, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Sends `n` requests, `concurrency` at a time; every one must be answered 200.
async fn burst(gw: &Gateway, n: usize, concurrency: usize) {
    let body = chat("m", false);
    let mut left = n;
    while left > 0 {
        let k = left.min(concurrency);
        let rs = futures_util::future::join_all((0..k).map(|_| post(gw, &body))).await;
        for r in rs {
            assert_eq!(r.status(), 200);
        }
        left -= k;
    }
}

fn delayed(ms: u64) -> Reply {
    Reply::Delay(Duration::from_millis(ms), Box::new(Reply::Model))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_50ms_slower_gets_under_a_fifth_of_the_traffic() {
    let fast = MockUpstream::start("fast").await.unwrap();
    let slow = MockUpstream::start("slow").await.unwrap();
    slow.set_default(delayed(50));
    let gw = Gateway::start(&format!(
        "upstreams:\n  pool:\n    balance: latency\n    latency_decay: 1s\n    servers:\n      - {{url: \"{}\", name: fast}}\n      - {{url: \"{}\", name: slow}}\nmodels:\n  m:\n    routes: [{{upstream: pool}}]\n",
        fast.url(),
        slow.url()
    ));
    burst(&gw, 400, 8).await;
    let (f, s) = (fast.hits(), slow.hits());
    assert_eq!(f + s, 400);
    println!("slow server: {s} of 400 while slow");
    assert!(s < 80, "the slow server got {s} of 400");
    let metrics = scrape(&gw).await;
    assert!(
        metrics.contains("tollgate_upstream_latency_estimate_seconds{server=\"pool/slow\""),
        "{metrics}"
    );
    // How it takes its share back once it recovers (its estimate decays while idle) is
    // `upstream::tests::a_slow_server_loses_its_share_and_takes_it_back_once_it_recovers`,
    // on a paused clock.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_sends_to_the_cheapest_route_and_falls_to_the_next_when_it_fails() {
    let dear = MockUpstream::start("dear").await.unwrap();
    let mid = MockUpstream::start("mid").await.unwrap();
    let cheap = MockUpstream::start("cheap").await.unwrap();
    // Shipped prices: gpt-4o $2.50/$10, gpt-4.1 $2/$8, gpt-4o-mini $0.15/$0.60 per million.
    let gw = Gateway::start(&format!(
        "upstreams:\n  dear: {{servers: [{{url: \"{}\"}}]}}\n  mid: {{servers: [{{url: \"{}\"}}]}}\n  cheap: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    strategy: cost\n    routes:\n      - {{upstream: dear, model: gpt-4o}}\n      - {{upstream: mid, model: gpt-4.1}}\n      - {{upstream: cheap, model: gpt-4o-mini}}\n",
        dear.url(),
        mid.url(),
        cheap.url()
    ));
    burst(&gw, 10, 2).await;
    assert_eq!((dear.hits(), mid.hits(), cheap.hits()), (0, 0, 10));
    let sent: Value = serde_json::from_slice(&cheap.received()[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");

    cheap.set_default(Reply::error(500, r#"{"error":{"message":"boom"}}"#));
    let r = post(&gw, &chat("m", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "2");
    assert_eq!((dear.hits(), mid.hits(), cheap.hits()), (0, 1, 11));
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .logs()
            .contains("strategy=cost"))
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_token_prompt_skips_the_32k_route_without_an_attempt() {
    let small = MockUpstream::start("small").await.unwrap();
    let large = MockUpstream::start("large").await.unwrap();
    let spare = MockUpstream::start("spare").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  small: {{servers: [{{url: \"{}\"}}]}}\n  large: {{servers: [{{url: \"{}\"}}]}}\n  spare: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: small, model: local-32k, max_context: 32000, priority: 1}}\n      - {{upstream: large, model: local-128k, max_context: 128000, priority: 2}}\n  tight:\n    routes: [{{upstream: small, model: local-32k, max_context: 32000}}]\n  spilled:\n    routes: [{{upstream: small, model: local-32k, max_context: 32000}}]\n    context_fallbacks: [m]\n",
        small.url(),
        large.url(),
        spare.url()
    ));
    // About 100k tokens of prompt at four bytes a token.
    let prompt = "word ".repeat(80_000);
    let big =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
    let r = post(&gw, &big("m")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    assert_eq!((small.hits(), large.hits()), (0, 1));

    // Nothing takes it: 400 naming the largest window, and no upstream is asked.
    let r = post(&gw, &big("tight")).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(e["error"]["max_context"], 32000);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("32000"),
        "{e}"
    );
    assert_eq!((small.hits(), large.hits()), (0, 1));

    // An alias with context_fallbacks moves there before any attempt.
    let r = post(&gw, &big("spilled")).await;
    assert_eq!(r.status(), 200);
    assert_eq!((small.hits(), large.hits()), (0, 2));
    // Small requests still go to the small route.
    let r = post(&gw, &chat("m", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!((small.hits(), large.hits(), spare.hits()), (1, 2, 0));
    let metrics = scrape(&gw).await;
    assert!(
        metrics.contains("tollgate_route_skips_total{reason=\"context\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_no_requests_left_gets_none_until_its_reset() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    a.push([Reply::Status {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-ratelimit-remaining-requests".into(), "0".into()),
            ("x-ratelimit-reset-requests".into(), "2s".into()),
        ],
        body: r#"{"id":"x","object":"chat.completion","choices":[]}"#.into(),
    }]);
    let gw = Gateway::start(&format!(
        "upstreams:\n  a: {{servers: [{{url: \"{}\"}}]}}\n  b: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: a, priority: 1}}\n      - {{upstream: b, priority: 2}}\n",
        a.url(),
        b.url()
    ));
    let r = post(&gw, &chat("m", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!((a.hits(), b.hits()), (1, 0));
    let started = std::time::Instant::now();
    // Within its reset, a is passed over without an attempt.
    let mut sent = 0;
    while started.elapsed() < Duration::from_millis(1700) {
        let r = post(&gw, &chat("m", false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tollgate-attempts"], "1");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((a.hits(), b.hits()), (1, sent));
    let explained = admin_json(&client(), &gw, "/admin/route?model=m").await;
    let server = &explained["order"][0]["tiers"][0]["routes"][0]["servers"][0];
    assert_eq!(server["state"], "quota", "{explained}");
    assert_eq!(server["quota"]["requests_remaining"], 0);
    // After it, a takes requests again: the first one it gets is sent once the reset is
    // over.
    while a.hits() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a took no request after its reset"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = post(&gw, &chat("m", false)).await;
        assert_eq!(r.status(), 200);
        sent += 1;
    }
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(a.hits() + b.hits(), 1 + sent);
    assert!(scrape(&gw)
        .await
        .contains("tollgate_route_skips_total{reason=\"quota\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explain_endpoint_gives_the_order_the_next_requests_take() {
    let ups: Vec<MockUpstream> = futures_util::future::join_all(
        ["u0", "u1", "u2"].map(|n| async move { MockUpstream::start(n).await.unwrap() }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u0: {{servers: [{{url: \"{}\"}}]}}\n  u1: {{servers: [{{url: \"{}\"}}]}}\n  u2: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    strategy: weighted\n    routes:\n      - {{upstream: u0, weight: 2}}\n      - {{upstream: u1, weight: 1}}\n      - {{upstream: u2, weight: 1, priority: 2}}\n",
        ups[0].url(),
        ups[1].url(),
        ups[2].url()
    ));
    let hits = || ups.iter().map(MockUpstream::hits).collect::<Vec<_>>();
    for _ in 0..8 {
        let v = admin_json(&client(), &gw, "/admin/route?model=m").await;
        let tiers = &v["order"][0]["tiers"];
        assert_eq!(tiers[0]["strategy"], "weighted");
        assert_eq!(tiers[1]["priority"], 2);
        let first = tiers[0]["routes"][0]["upstream"]
            .as_str()
            .unwrap()
            .to_string();
        let before = hits();
        assert_eq!(post(&gw, &chat("m", false)).await.status(), 200);
        let after = hits();
        let went: Vec<usize> = (0..3).filter(|&i| after[i] > before[i]).collect();
        assert_eq!(went.len(), 1);
        assert_eq!(format!("u{}", went[0]), first, "{v}");
    }
    // Weighted 2:1 within tier 1; tier 2 only when tier 1 is exhausted.
    assert_eq!(hits(), [6, 2, 0]);

    let r = client()
        .get(gw.admin_url("/admin/route?model=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
