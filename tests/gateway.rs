//! The gateway core end to end: the real binary in front of mock upstreams on loopback,
//! asserting on what the upstreams received as well as on what the client saw.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, eventually, send_chat, single, Gateway, RefusingPort};
use futures_util::StreamExt;
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

fn long_stream(events: usize, gap_ms: u64) -> Reply {
    Reply::Stream {
        events: (0..events)
            .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
            .collect(),
        gap: Duration::from_millis(gap_ms),
        cut: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_weights_over_1000_requests() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  pool:\n    balance: weighted\n    servers:\n      - {{url: \"{}\", weight: 3}}\n      - {{url: \"{}\", weight: 1}}\nmodels:\n  m:\n    routes: [{{upstream: pool}}]\n",
        a.url(),
        b.url()
    ));
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let body = chat("m", false);
    let results = futures_util::stream::iter(0..1000)
        .map(|_| c.post(&url).json(&body).send())
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)));
    let (ha, hb) = (a.hits(), b.hits());
    assert_eq!(ha + hb, 1000);
    // 3:1 is 750:250; allow 3 percentage points.
    assert!((720..=780).contains(&ha), "a={ha} b={hb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_sends_new_requests_away_from_a_server_holding_a_long_stream() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  pool:\n    balance: least_conn\n    servers:\n      - {{url: \"{}\"}}\n      - {{url: \"{}\"}}\nmodels:\n  m:\n    routes: [{{upstream: pool}}]\n",
        a.url(),
        b.url()
    ));
    // Whichever server takes the first request holds a 3 s stream.
    a.push([long_stream(30, 100)]);
    b.push([long_stream(30, 100)]);
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let mut held = c.post(&url).json(&chat("m", true)).send().await.unwrap();
    assert_eq!(held.status(), 200);
    let first = held.chunk().await.unwrap();
    assert!(first.is_some());
    let (busy, idle) = if a.open_streams() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(busy.open_streams(), 1);
    idle.clear_script();
    for _ in 0..10 {
        let r = c.post(&url).json(&chat("m", false)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(busy.hits(), 1, "the busy server got new requests");
    assert_eq!(idle.hits(), 10);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_untouched_while_primaries_are_up_and_used_when_they_are_down() {
    let primary = MockUpstream::start("primary").await.unwrap();
    let backup = MockUpstream::start("backup").await.unwrap();
    let refusing = RefusingPort::new();
    let dead = refusing.port;
    let gw = Gateway::start(&format!(
        "upstreams:\n  up:\n    servers:\n      - {{url: \"{}\"}}\n      - {{url: \"{}\", backup: true}}\n  down:\n    servers:\n      - {{url: \"http://127.0.0.1:{dead}/v1\"}}\n      - {{url: \"{}\", backup: true}}\nmodels:\n  m-up:\n    routes: [{{upstream: up}}]\n  m-down:\n    routes: [{{upstream: down}}]\n",
        primary.url(),
        backup.url(),
        backup.url()
    ));
    let c = client();
    for _ in 0..20 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .json(&chat("m-up", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(primary.hits(), 20);
    assert_eq!(backup.hits(), 0);

    let r = c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m-down", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "2");
    assert!(r.headers()["x-tollgate-upstream"]
        .to_str()
        .unwrap()
        .starts_with("down/"));
    assert_eq!(backup.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rewrite_is_the_only_change_to_the_body_and_credentials_are_swapped() {
    let up = MockUpstream::start("vllm").await.unwrap();
    let gw = Gateway::start_with_env(
        &format!(
            "keys:\n  - {{name: team-a, key: \"${{TG_TEAM_A}}\"}}\nupstreams:\n  vllm:\n    servers:\n      - {{url: \"{}\", api_key: \"${{TG_UPSTREAM}}\"}}\nmodels:\n  gpt-4o:\n    routes: [{{upstream: vllm, model: llama-3-70b}}]\n",
            up.url()
        ),
        &[("TG_TEAM_A", "tg-client-key-aaaaaaaa"), ("TG_UPSTREAM", "up-secret-key-bbbbbbbb")],
    );
    let sent = r#"{"messages": [{"role":"user","content":"say \"model\": x"}],  "model" :"gpt-4o", "temperature":0.5}"#;
    let r = client()
        .post(gw.url("/v1/chat/completions?trace=1"))
        .header("authorization", "Bearer tg-client-key-aaaaaaaa")
        .header("content-type", "application/json")
        .header("x-request-id", "req-123")
        .header("connection", "x-private-hop")
        .header("x-private-hop", "1")
        .header("openai-beta", "assistants=v2")
        .body(sent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-123");
    let got = up.last().unwrap();
    let expected = sent.replace(r#""gpt-4o""#, r#""llama-3-70b""#);
    assert_eq!(std::str::from_utf8(&got.body).unwrap(), expected);
    assert_eq!(got.path, "/v1/chat/completions?trace=1");
    assert_eq!(
        got.headers["authorization"],
        "Bearer up-secret-key-bbbbbbbb"
    );
    assert_eq!(got.headers["x-request-id"], "req-123");
    assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(got.headers["openai-beta"], "assistants=v2");
    assert!(got.headers.get("x-private-hop").is_none());
    assert!(!got
        .headers
        .values()
        .any(|v| v.to_str().unwrap_or("").contains("tg-client-key")));
    let logs = gw.logs();
    assert!(!logs.contains("tg-client-key-aaaaaaaa") && !logs.contains("up-secret-key-bbbbbbbb"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_prompt_is_resent_intact_after_a_connect_failure() {
    let live = MockUpstream::start("live").await.unwrap();
    let refusing = RefusingPort::new();
    let dead = refusing.port;
    let gw = Gateway::start(&format!(
        "upstreams:\n  dead:\n    servers: [{{url: \"http://127.0.0.1:{dead}/v1\"}}]\n  live:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: dead, priority: 1}}\n      - {{upstream: live, priority: 2}}\n",
        live.url()
    ));
    let filler: String = (0..(1 << 20))
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": filler}]})
        .to_string();
    assert!(body.len() > 1 << 20);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "2");
    assert_eq!(live.hits(), 1);
    assert_eq!(live.last().unwrap().body, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_chunk_reaches_the_client_while_the_upstream_is_still_sending() {
    let up = MockUpstream::start("slow").await.unwrap();
    up.set_default(long_stream(6, 300));
    let gw = Gateway::start(&single(&up.url()));
    let mut r = send_chat(&gw, "m", true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["transfer-encoding"], "chunked");
    let first = r.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: {\"i\":0}\n\n");
    // The upstream has five more events to send, 300 ms apart: it is still writing.
    assert_eq!(up.open_streams(), 1);
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(rest.ends_with(b"data: {\"i\":5}\n\n"));
    assert_eq!(up.open_streams(), 0);
    assert_eq!(up.cut_by_peer(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_mid_stream_closes_the_upstream_connection() {
    let up = MockUpstream::start("long").await.unwrap();
    up.set_default(long_stream(50, 100));
    let gw = Gateway::start(&single(&up.url()));
    let mut r = send_chat(&gw, "m", true).await;
    r.chunk().await.unwrap().unwrap();
    assert_eq!(up.open_streams(), 1);
    drop(r);
    // The stream would run for 5 s; the upstream must see its reader go well before that.
    assert!(eventually(Duration::from_secs(2), || up.cut_by_peer() == 1).await);
    assert_eq!(up.open_streams(), 0);
    assert!(
        eventually(Duration::from_secs(2), || gw
            .logs()
            .contains("error=client_disconnect"))
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_openai_shaped_and_never_reach_an_upstream() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&format!(
        "server:\n  listen: [\"127.0.0.1:0\"]\n  admin_listen: \"127.0.0.1:0\"\n  threads: 1\n  grace_period: 0s\n  max_body_size: 1KiB\nkeys:\n  - {{name: t, key: tg-test-key-000000}}\nupstreams:\n  u:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
        up.url()
    ));
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (c.post(&url).json(&chat("m", false)), 401, "invalid_api_key"),
        (
            c.post(&url).bearer_auth("wrong").json(&chat("m", false)),
            401,
            "invalid_api_key",
        ),
        (
            c.post(&url)
                .bearer_auth("tg-test-key-000000")
                .body("{not json"),
            400,
            "bad_request",
        ),
        (
            c.post(&url)
                .bearer_auth("tg-test-key-000000")
                .body("{\"messages\":[]}"),
            400,
            "bad_request",
        ),
        (
            c.post(&url)
                .bearer_auth("tg-test-key-000000")
                .json(&chat("gpt-9", false)),
            404,
            "model_not_found",
        ),
        (
            c.post(&url)
                .bearer_auth("tg-test-key-000000")
                .body(vec![b' '; 2048]),
            413,
            "body_too_large",
        ),
        (
            c.get(&url).bearer_auth("tg-test-key-000000"),
            405,
            "method_not_allowed",
        ),
        (
            c.get(gw.url("/v1/nothing"))
                .bearer_auth("tg-test-key-000000"),
            404,
            "not_found",
        ),
    ];
    for (req, status, code) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{code}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code);
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].is_string());
    }
    assert_eq!(up.hits(), 0);
    // Health and the model list.
    assert_eq!(
        c.get(gw.url("/healthz")).send().await.unwrap().status(),
        200
    );
    let models: serde_json::Value = c
        .get(gw.url("/v1/models"))
        .bearer_auth("tg-test-key-000000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "m");
    assert_eq!(
        c.get(gw.admin_url("/ready")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_translated_for_an_openai_tier_and_each_upstream_gets_its_auth_style() {
    let openai = MockUpstream::start("openai").await.unwrap();
    let anthropic = MockUpstream::start("anthropic").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  oa:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: sk-oa-1111111111}}]\n  an:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-2222222222}}]\nmodels:\n  claude:\n    routes:\n      - {{upstream: oa, priority: 1}}\n      - {{upstream: an, priority: 2}}\n",
        openai.url(),
        anthropic.url()
    ));
    let messages = serde_json::json!({"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&messages)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["type"],
        "message"
    );
    let got = openai.last().unwrap();
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(got.headers["authorization"], "Bearer sk-oa-1111111111");
    assert!(got.headers.get("x-api-key").is_none());
    assert_eq!(anthropic.hits(), 0);
    // Tier 1 fails over to Anthropic, which gets the request as it is, in its own style.
    openai.push([Reply::error(
        503,
        r#"{"error":{"message":"busy","type":"server_error"}}"#,
    )]);
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&messages)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = anthropic.last().unwrap();
    assert_eq!(got.path, "/v1/messages");
    assert_eq!(got.headers["x-api-key"], "sk-ant-2222222222");
    assert_eq!(got.headers["anthropic-version"], "2023-06-01");
    assert!(got.headers.get("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_and_the_connection_stays_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    let body = chat("m", false).to_string();
    let mut s = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(body.as_bytes()).await.unwrap();
    let text = read_response(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(up.last().unwrap().headers.get("expect").is_none());
    // Same connection, second request.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let text = read_response(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(up.hits(), 2);
}

/// Reads one response with a Content-Length body from a raw connection.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed");
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if data.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_response_header_frees_the_upstream_at_once() {
    let up = MockUpstream::start("thinking").await.unwrap();
    up.set_default(Reply::Delay(Duration::from_secs(4), Box::new(Reply::Model)));
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    servers: [{{url: \"{}\", name: u1}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
        up.url()
    ));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    assert!(impatient
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m", false))
        .send()
        .await
        .is_err());
    // The upstream would answer after 4 s; the gateway lets go well before that.
    let released = eventually(Duration::from_millis(1500), || {
        gw.logs().contains("error=client_disconnect")
    })
    .await;
    assert!(released, "{}", gw.logs());
    let metrics = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let in_flight = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_upstream_in_flight") && l.contains("u/u1"))
        .unwrap();
    assert!(in_flight.ends_with(" 0"), "{in_flight}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_one_closed_while_pooled_is_replaced() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    for stream in [false, true, false, true, false] {
        let r = send_chat(&gw, "m", stream).await;
        assert_eq!(r.status(), 200);
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    assert_eq!(up.hits(), 5);
    assert_eq!(
        up.connections(),
        1,
        "JSON and SSE responses both leave the connection reusable"
    );

    // The pooled connection dies when the next request arrives on it (as when the upstream
    // closed it while idle): the request goes again on a new connection to the same server,
    // not to another target, and the client sees one attempt.
    up.push([Reply::Close]);
    let r = send_chat(&gw, "m", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    assert_eq!(up.hits(), 7);
    assert_eq!(up.connections(), 2);
}
