//! Metrics and logs after scripted traffic: exact counter values from a scrape, histogram
//! counts, gauges following in-flight streams, the `other` model label, promtool, and
//! access-log lines with no secret anywhere in the gateway's output.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, eventually_async, scrape, send_chat, single, Gateway};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

/// Parses the Prometheus text format into (name, labels) -> value.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let mut map = BTreeMap::new();
                for pair in rest.trim_end_matches('}').split("\",") {
                    if let Some((k, v)) = pair.split_once("=\"") {
                        map.insert(k.to_string(), v.trim_end_matches('"').to_string());
                    }
                }
                (n.to_string(), map)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push((name, labels, value.parse().unwrap()));
    }
    out
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_failovers_refusals_and_follow_streams() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    let gw = Gateway::start_with_env(
        &format!(
            "keys:\n  - {{name: team, key: \"${{TG_KEY}}\", limits: {{rpm: 7}}}}\nupstreams:\n  first:\n    servers: [{{url: \"{}\", name: a}}]\n  second:\n    provider: openai\n    servers: [{{url: \"{}\", name: b, api_key: \"${{TG_UP}}\"}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: first, priority: 1, model: up-model}}\n      - {{upstream: second, priority: 2, model: up-model}}\n  \"*\":\n    routes: [{{upstream: second}}]\npricing:\n  up-model: {{input: 2.0, output: 10.0}}\n",
            a.url(),
            b.url()
        ),
        &[("TG_KEY", "tg-metrics-client-key-1"), ("TG_UP", "sk-metrics-upstream-key-2")],
    );
    let c = client();
    let post = |model: &str, stream: bool| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth("tg-metrics-client-key-1")
            .json(&chat(model, stream))
            .send()
    };
    let usage_json =
        r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#;
    // 1: first answers 503 and cools down; second serves. 2, 3: second directly.
    a.push([Reply::error(503, "overloaded")]);
    b.push([
        Reply::error(200, usage_json),
        Reply::error(200, usage_json),
        Reply::error(200, usage_json),
    ]);
    for _ in 0..3 {
        let r = post("m", false).await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    // 4: a stream with usage at its end; 5: a stream without usage.
    b.push([
        Reply::Stream {
            events: vec!["data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n".into(), "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n".into(), "data: [DONE]\n\n".into()],
            gap: Duration::from_millis(5),
            cut: false,
        },
        Reply::Stream {
            events: vec!["data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n".into(), "data: [DONE]\n\n".into()],
            gap: Duration::from_millis(5),
            cut: false,
        },
    ]);
    for _ in 0..2 {
        post("m", true).await.unwrap().text().await.unwrap();
    }
    // 6: an unconfigured model through `*`.
    b.push([Reply::error(200, usage_json)]);
    post("some-client-model-9000", false)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // 7: a long stream, to see the in-flight gauge; 8: refused by the key's rpm of 7.
    b.push([Reply::Stream {
        events: (0..10)
            .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
            .collect(),
        gap: Duration::from_millis(100),
        cut: false,
    }]);
    let mut held = post("m", true).await.unwrap();
    held.chunk().await.unwrap().unwrap();
    assert_eq!(post("m", false).await.unwrap().status(), 429);

    let text = scrape(&gw).await;
    let in_flight = [("upstream", "second"), ("server", "second/b")];
    assert_eq!(value(&text, "tollgate_upstream_in_flight", &in_flight), 1.0);
    assert_eq!(
        value(&text, "tollgate_upstream_up", &[("server", "first/a")]),
        0.0
    );
    assert_eq!(
        value(&text, "tollgate_upstream_up", &[("server", "second/b")]),
        1.0
    );
    assert!(
        value(
            &text,
            "tollgate_upstream_cooldown_seconds",
            &[("server", "first/a")]
        ) > 25.0
    );
    while held.chunk().await.unwrap().is_some() {}
    // The gauge falls when the gateway has finished the request, just after its last byte.
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            value(
                &scrape(&gw).await,
                "tollgate_upstream_in_flight",
                &in_flight,
            ) == 0.0
        })
        .await
    );
    let text = scrape(&gw).await;

    let m_second = [("model", "m"), ("upstream", "second")];
    assert_eq!(
        value(
            &text,
            "tollgate_requests_total",
            &[("model", "m"), ("upstream", "second"), ("code", "200")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_requests_total",
            &[("model", "other"), ("upstream", "second"), ("code", "200")]
        ),
        1.0
    );
    assert_eq!(
        value(&text, "tollgate_requests_total", &[("code", "429")]),
        1.0
    );
    assert_eq!(
        value(&text, "tollgate_request_duration_seconds_count", &m_second),
        6.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_time_to_first_token_seconds_count",
            &m_second
        ),
        6.0
    );
    assert_eq!(value(&text, "tollgate_overhead_seconds_count", &[]), 8.0);
    assert_eq!(
        value(
            &text,
            "tollgate_tokens_total",
            &[("model", "m"), ("type", "input")]
        ),
        37.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_tokens_total",
            &[("model", "m"), ("type", "output")]
        ),
        18.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_tokens_total",
            &[("model", "other"), ("type", "input")]
        ),
        10.0
    );
    // (37 x 2 + 18 x 10) / 1e6 USD for the priced upstream model.
    let cost = value(&text, "tollgate_cost_usd_total", &m_second);
    assert!((cost - 254e-6).abs() < 1e-9, "{cost}");
    assert_eq!(
        value(
            &text,
            "tollgate_usage_unreported_total",
            &[("model", "m"), ("reason", "not_reported")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_upstream_attempts_total",
            &[("server", "first/a"), ("outcome", "transient")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_upstream_attempts_total",
            &[("server", "second/b"), ("outcome", "ok")]
        ),
        7.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_failovers_total",
            &[("model", "m"), ("reason", "transient"), ("level", "tier")]
        ),
        1.0
    );
    assert_eq!(
        value(&text, "tollgate_ratelimited_total", &[("scope", "key")]),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Bounded labels: the client's model string and the key never appear.
    assert!(!text.contains("some-client-model-9000"));
    assert!(
        !text.contains("tg-metrics-client-key-1") && !text.contains("sk-metrics-upstream-key-2")
    );

    // promtool finds nothing to complain about.
    let path = gw.dir.path().join("metrics.txt");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .expect("promtool (Debian package prometheus; scripts/bootstrap installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_before_its_usage_is_counted_as_such_and_aborts_by_reason() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    up.push([Reply::Stream {
        events: vec!["data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n".into()],
        gap: Duration::from_millis(5),
        cut: true,
    }]);
    let r = send_chat(&gw, "m", true).await;
    let _ = r.bytes().await;
    up.set_default(Reply::Stream {
        events: (0..50)
            .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
            .collect(),
        gap: Duration::from_millis(100),
        cut: false,
    });
    let mut r = send_chat(&gw, "m", true).await;
    r.chunk().await.unwrap();
    drop(r);
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(&gw).await;
        // Both figures of the second request: they are counted one after the other.
        if value(
            &text,
            "tollgate_stream_aborts_total",
            &[("reason", "client_disconnect")],
        ) == 1.0
            && value(
                &text,
                "tollgate_usage_unreported_total",
                &[("model", "m"), ("reason", "stream_cut")],
            ) == 2.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        value(
            &text,
            "tollgate_stream_aborts_total",
            &[("reason", "upstream_error")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_stream_aborts_total",
            &[("reason", "client_disconnect")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_usage_unreported_total",
            &[("model", "m"), ("reason", "stream_cut")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_logs_have_one_line_per_request_and_no_secret_anywhere() {
    let up = MockUpstream::start("u").await.unwrap();
    let client_key = "tg-log-client-key-abcdef123456";
    let upstream_key = "sk-log-upstream-key-987654321";
    let gw = Gateway::start_with_env(
        &format!(
            "log: {{format: json}}\nkeys:\n  - {{name: team-log, key: \"${{TG_KEY}}\"}}\nupstreams:\n  u:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: \"${{TG_UP}}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u, model: up-m}}]\n",
            up.url()
        ),
        &[("TG_KEY", client_key), ("TG_UP", upstream_key)],
    );
    let c = client();
    up.push([Reply::error(
        200,
        r#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
    )]);
    let ok = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(client_key)
        .header("x-request-id", "log-req-1")
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    ok.text().await.unwrap();
    c.post(gw.url("/v1/chat/completions"))
        .bearer_auth("sk-wrong-key-presented-0000")
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    c.post(gw.url("/v1/chat/completions"))
        .bearer_auth(client_key)
        .json(&chat("nope", false))
        .send()
        .await
        .unwrap();
    c.get(gw.url("/v1/models"))
        .header("x-api-key", client_key)
        .send()
        .await
        .unwrap();
    // Access-log lines are written just after each response.
    let four = common::eventually(Duration::from_secs(3), || {
        gw.logs().lines().filter(|l| l.starts_with('{')).count() >= 4
    })
    .await;
    assert!(four, "{}", gw.logs());

    let logs = gw.logs();
    let lines: Vec<Value> = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{logs}");
    let first = &lines[0];
    for field in [
        "time",
        "request_id",
        "key",
        "client_ip",
        "method",
        "path",
        "model",
        "target",
        "attempts",
        "status",
        "duration_ms",
        "ttfb_ms",
        "tokens_in",
        "tokens_out",
        "bytes_in",
        "bytes_out",
        "error",
    ] {
        assert!(first.get(field).is_some(), "missing {field} in {first}");
    }
    assert_eq!(first["request_id"], "log-req-1");
    assert_eq!(first["key"], "team-log");
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(first["model"], "m");
    assert_eq!(
        first["target"],
        "u/127.0.0.1:".to_string() + &up.addr.port().to_string()
    );
    assert_eq!(first["attempts"][0]["outcome"], "ok");
    assert_eq!(
        (
            first["status"].as_u64(),
            first["tokens_in"].as_u64(),
            first["tokens_out"].as_u64()
        ),
        (Some(200), Some(3), Some(4))
    );
    assert_eq!(
        (lines[1]["status"].as_u64(), lines[1]["error"].as_str()),
        (Some(401), Some("unauthorized"))
    );
    assert_eq!(
        (lines[2]["status"].as_u64(), lines[2]["error"].as_str()),
        (Some(404), Some("model_not_found"))
    );
    assert_eq!(lines[3]["status"].as_u64(), Some(200));
    // The upstream did get its key; no output of the gateway holds any key.
    assert_eq!(
        up.last().unwrap().headers["authorization"],
        format!("Bearer {upstream_key}")
    );
    for secret in [client_key, upstream_key, "sk-wrong-key-presented-0000"] {
        assert!(!logs.contains(secret), "secret in logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_is_requested_upstream_counted_and_kept_from_the_client() {
    let openai = MockUpstream::start("openai").await.unwrap();
    let generic = MockUpstream::start("generic").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  oa:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: sk-test-000000000000}}]\n  gen:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: oa}}]\n  g:\n    routes: [{{upstream: gen}}]\n",
        openai.url(),
        generic.url()
    ));
    let c = client();
    // The client did not ask for usage: the gateway asks, counts it, and strips the chunk.
    let text = c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m", true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sent: Value = serde_json::from_slice(&openai.last().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(!text.contains("\"choices\":[]"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The client asked itself: the chunk is its to keep.
    let own = serde_json::json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]});
    let text = c
        .post(gw.url("/v1/chat/completions"))
        .json(&own)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"choices\":[]"), "{text}");
    // A generic upstream is left alone.
    c.post(gw.url("/v1/chat/completions"))
        .json(&chat("g", true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sent: Value = serde_json::from_slice(&generic.last().unwrap().body).unwrap();
    assert!(sent.get("stream_options").is_none());

    let text = scrape(&gw).await;
    assert_eq!(
        value(
            &text,
            "tollgate_tokens_total",
            &[("model", "m"), ("type", "input")]
        ),
        16.0
    );
    assert_eq!(
        value(&text, "tollgate_usage_unreported_total", &[("model", "m")]),
        0.0
    );
    assert_eq!(
        value(
            &text,
            "tollgate_usage_unreported_total",
            &[("model", "g"), ("reason", "not_reported")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_held_for_a_batch_are_written_at_sigterm() {
    let up = MockUpstream::start("up").await.unwrap();
    let mut gw = Gateway::start(&format!(
        "server: {{grace_period: 0s}}\nlog: {{flush_interval: 30s}}\nupstreams:\n  u:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
        up.url()
    ));
    let answers = futures_util::future::join_all((0..40).map(|_| send_chat(&gw, "m", false))).await;
    assert!(answers.iter().all(|r| r.status() == 200));
    // Held for a batch every 30 s: none is written yet, and the stop writes them all.
    let early = std::fs::read_to_string(&gw.stderr_path).unwrap();
    assert_eq!(early.matches(" status=200 ").count(), 0, "{early}");
    assert!(gw.terminate().success());
    let path = gw.stderr_path.clone();
    let logs = std::fs::read_to_string(path).unwrap();
    let lines = logs.lines().filter(|l| l.contains(" status=200 ")).count();
    assert_eq!(lines, 40, "{logs}");
}
