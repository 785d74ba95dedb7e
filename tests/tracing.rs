//! Traces end to end: the gateway exports to a real OTLP/HTTP receiver (a loopback HTTP
//! server decoding the protobuf with the `opentelemetry-proto` types); each case asserts
//! the span tree, names, kinds, attributes and timing, and what the upstream received.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, eventually, scrape, Gateway};
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate::demo::mock::{MockUpstream, Reply};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// An OTLP/HTTP trace receiver on loopback: every span it was sent, with the service
/// name of its resource and the headers of its request.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    headers: Arc<Mutex<Vec<http::HeaderMap>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let headers: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
        let (s, h) = (spans.clone(), headers.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, h) = (s.clone(), h.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (s, h) = (s.clone(), h.clone());
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                                h.lock().unwrap().push(req.headers().clone());
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let export = ExportTraceServiceRequest::decode(body).unwrap();
                                for rs in export.resource_spans {
                                    let service = rs
                                        .resource
                                        .iter()
                                        .flat_map(|r| &r.attributes)
                                        .find(|a| a.key == "service.name")
                                        .and_then(|a| a.value.clone())
                                        .and_then(|v| v.value)
                                        .map(|v| match v {
                                            Any::StringValue(s) => s,
                                            other => format!("{other:?}"),
                                        })
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for span in ss.spans {
                                            s.lock().unwrap().push((service.clone(), span));
                                        }
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Collector {
            url,
            spans,
            headers,
        }
    }

    /// The spans of one trace (hex id), once `n` of them have arrived.
    async fn trace(&self, trace_id: &str, n: usize) -> Vec<Span> {
        let id = hex(trace_id);
        let arrived = eventually(Duration::from_secs(10), || {
            self.spans
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| s.trace_id == id)
                .count()
                >= n
        })
        .await;
        let spans: Vec<Span> = self
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.trace_id == id)
            .map(|(_, s)| s.clone())
            .collect();
        assert!(
            arrived,
            "expected {n} spans of trace {trace_id}, got {spans:#?}"
        );
        spans
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Any::StringValue(s)) => s.clone(),
        other => panic!("{key} is {other:?} on {}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Any::IntValue(n)) => *n,
        other => panic!("{key} is {other:?} on {}", span.name),
    }
}

fn config(collector: &Collector, upstreams: &str, tracing: &str) -> String {
    format!(
        "tracing:\n  otlp:\n    endpoint: \"{}\"\n  service_name: gw-test\n  batch_delay: 50ms\n  headers:\n    x-collector-key: sekrit-collector-key\n{tracing}{upstreams}",
        collector.url
    )
}

fn one_upstream(url: &str) -> String {
    format!(
        "upstreams:\n  up:\n    provider: openai\n    servers: [{{url: \"{url}\", name: a, api_key: sk-upstream}}]\nmodels:\n  m:\n    routes: [{{upstream: up, model: gpt-x}}]\n"
    )
}

async fn post(
    gw: &Gateway,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = client().post(gw.url("/v1/chat/completions")).json(&body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_a_server_span_with_one_client_span_per_attempt_and_the_genai_attributes() {
    let collector = Collector::start().await;
    let up = MockUpstream::start("a").await.unwrap();
    let gw = Gateway::start(&config(&collector, &one_upstream(&up.url()), ""));
    let mut body = chat("m", false);
    body["max_tokens"] = 50.into();
    body["temperature"] = 0.5.into();
    body["top_p"] = 0.9.into();
    let before = std::time::SystemTime::now();
    let r = post(&gw, body, &[]).await;
    assert_eq!(r.status(), 200);
    let trace_id = r.headers()["x-tollgate-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(trace_id.len(), 32);
    let answer: serde_json::Value = r.json().await.unwrap();

    let spans = collector.trace(&trace_id, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans
        .iter()
        .find(|s| s.kind == SERVER)
        .expect("a SERVER span");
    let attempt = spans
        .iter()
        .find(|s| s.kind == CLIENT)
        .expect("a CLIENT span");
    assert_eq!(server.name, "chat m");
    assert!(server.parent_span_id.is_empty(), "a new trace's root");
    assert_eq!(attempt.name, "chat gpt-x");
    assert_eq!(attempt.parent_span_id, server.span_id);
    // The upstream was told the attempt's span is its parent.
    let received = up.last().unwrap();
    assert_eq!(
        received.headers["traceparent"],
        format!("00-{trace_id}-{}-01", to_hex(&attempt.span_id)).as_str()
    );
    for (s, model) in [(server, "m"), (attempt, "gpt-x")] {
        assert_eq!(text(s, "gen_ai.operation.name"), "chat");
        assert_eq!(text(s, "gen_ai.provider.name"), "openai");
        assert_eq!(text(s, "gen_ai.request.model"), model);
        assert_eq!(int(s, "http.response.status_code"), 200);
    }
    assert_eq!(text(server, "tollgate.alias"), "m");
    assert_eq!(text(server, "tollgate.upstream"), "up");
    assert_eq!(text(server, "tollgate.request_id"), request_id);
    assert_eq!(text(attempt, "server.address"), "127.0.0.1");
    assert_eq!(int(attempt, "server.port"), i64::from(up.addr.port()));
    assert!(attr(attempt, "error.type").is_none());
    // The request's parameters on both spans; what the answer says on the span of the
    // attempt that delivered it only (a backend summing usage over spans counts it once).
    for s in [server, attempt] {
        assert_eq!(int(s, "gen_ai.request.max_tokens"), 50);
        assert_eq!(
            attr(s, "gen_ai.request.temperature"),
            Some(&Any::DoubleValue(0.5))
        );
        assert_eq!(
            attr(s, "gen_ai.request.top_p"),
            Some(&Any::DoubleValue(0.9))
        );
    }
    assert!(attr(server, "gen_ai.usage.input_tokens").is_none());
    assert!(attr(server, "gen_ai.response.id").is_none());
    let s = attempt;
    assert_eq!(
        text(s, "gen_ai.response.id"),
        answer["id"].as_str().unwrap()
    );
    assert_eq!(text(s, "gen_ai.response.model"), "gpt-x");
    assert_eq!(
        int(s, "gen_ai.usage.input_tokens"),
        answer["usage"]["prompt_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        int(s, "gen_ai.usage.output_tokens"),
        answer["usage"]["completion_tokens"].as_i64().unwrap()
    );
    match attr(s, "gen_ai.response.finish_reasons") {
        Some(Any::ArrayValue(a)) => assert_eq!(a.values.len(), 1),
        other => panic!("finish_reasons: {other:?}"),
    }
    // Timing: the attempt within the request, the request within the test.
    let t0 = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(server.start_time_unix_nano >= t0 - 1_000_000);
    assert!(attempt.start_time_unix_nano >= server.start_time_unix_nano);
    assert!(attempt.end_time_unix_nano <= server.end_time_unix_nano);
    assert!(server.end_time_unix_nano > server.start_time_unix_nano);
    // Content is off by default.
    assert!(server
        .events
        .iter()
        .all(|e| !e.name.starts_with("gen_ai.content")));
    // The resource's service name and the configured collector header.
    let service = collector.spans.lock().unwrap()[0].0.clone();
    assert_eq!(service, "gw-test");
    assert_eq!(
        collector.headers.lock().unwrap()[0]["x-collector-key"],
        "sekrit-collector-key"
    );
    // The access log names the trace; no log line shows the collector's key.
    assert!(
        eventually(Duration::from_secs(5), || gw
            .logs()
            .contains(&format!("trace_id={trace_id}")))
        .await
    );
    assert!(!gw.logs().contains("sekrit-collector-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_shows_two_attempt_spans_the_first_with_its_error_type() {
    let collector = Collector::start().await;
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    a.set_default(Reply::error(
        503,
        r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
    ));
    let upstreams = format!(
        "upstreams:\n  first:\n    servers: [{{url: \"{}\", name: a}}]\n  second:\n    provider: anthropic\n    servers: [{{url: \"{}\", name: b, api_key: sk-ant-upstream}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: first, priority: 1}}\n      - {{upstream: second, priority: 2, model: claude-x}}\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&config(&collector, &upstreams, ""));
    let r = post(&gw, chat("m", false), &[]).await;
    assert_eq!(r.status(), 200);
    let trace_id = r.headers()["x-tollgate-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let spans = collector.trace(&trace_id, 3).await;
    let server = spans.iter().find(|s| s.kind == SERVER).unwrap();
    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    assert!(attempts.iter().all(|s| s.parent_span_id == server.span_id));
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(int(first, "http.response.status_code"), 503);
    assert_eq!(text(first, "error.type"), "transient");
    assert_eq!(
        first.status.as_ref().map(|s| s.code),
        Some(2),
        "the failed attempt is an error"
    );
    assert!(first.end_time_unix_nano <= second.start_time_unix_nano);
    assert_eq!(text(second, "gen_ai.provider.name"), "anthropic");
    assert_eq!(text(second, "gen_ai.request.model"), "claude-x");
    assert!(attr(second, "error.type").is_none());
    assert_eq!(int(server, "tollgate.attempts"), 2);
    assert_eq!(text(server, "tollgate.translation"), "openai->anthropic");
    // Each upstream got its own attempt's span as parent.
    for (up, span) in [(&a, first), (&b, second)] {
        let tp = up.last().unwrap().headers["traceparent"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(tp, format!("00-{trace_id}-{}-01", to_hex(&span.span_id)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_spans_end_after_its_last_byte_and_carry_time_to_first_token() {
    let collector = Collector::start().await;
    let up = MockUpstream::start("a").await.unwrap();
    up.set_stream_gap(Duration::from_millis(40));
    let gw = Gateway::start(&config(&collector, &one_upstream(&up.url()), ""));
    let r = post(&gw, chat("m", true), &[]).await;
    assert_eq!(r.status(), 200);
    let trace_id = r.headers()["x-tollgate-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body = r.bytes().await.unwrap();
    let last_byte = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    let spans = collector.trace(&trace_id, 2).await;
    let server = spans.iter().find(|s| s.kind == SERVER).unwrap();
    let attempt = spans.iter().find(|s| s.kind == CLIENT).unwrap();
    let ttft = match attr(server, "tollgate.time_to_first_token") {
        Some(Any::DoubleValue(v)) => *v,
        other => panic!("{other:?}"),
    };
    let duration = (server.end_time_unix_nano - server.start_time_unix_nano) as f64 / 1e9;
    // Several 40 ms gaps came after the first chunk: the span covers them.
    assert!(
        ttft > 0.0 && ttft + 0.1 < duration,
        "ttft {ttft} s, duration {duration} s"
    );
    let first = server
        .events
        .iter()
        .find(|e| e.name == "gen_ai.first_token")
        .unwrap();
    assert!(first.time_unix_nano > server.start_time_unix_nano);
    // Both end after the last byte reached the gateway's client side (within the
    // moment it took the test to read it).
    for s in [server, attempt] {
        assert!(s.end_time_unix_nano <= last_byte + 1_000_000);
        assert!(
            s.end_time_unix_nano >= first.time_unix_nano + 100_000_000,
            "{}",
            s.name
        );
    }
    match attr(attempt, "gen_ai.response.finish_reasons") {
        Some(Any::ArrayValue(a)) => {
            assert_eq!(a.values[0].value, Some(Any::StringValue("stop".into())))
        }
        other => panic!("{other:?}"),
    }
    assert!(int(attempt, "gen_ai.usage.output_tokens") > 1);
    assert!(attr(server, "gen_ai.usage.output_tokens").is_none());
    // The conventions' time per output token, on /metrics.
    let m = scrape(&gw).await;
    assert!(
        m.contains("gen_ai_server_time_per_output_token_seconds_count{gen_ai_provider_name=\"openai\",gen_ai_request_model=\"m\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_traceparent_is_continued_and_its_sampling_decision_honoured() {
    let collector = Collector::start().await;
    let up = MockUpstream::start("a").await.unwrap();
    // New traces are never sampled here: only the client's decision records one.
    let gw = Gateway::start(&config(
        &collector,
        &one_upstream(&up.url()),
        "  sample_ratio: 0\n",
    ));
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let r = post(
        &gw,
        chat("m", false),
        &[("traceparent", unsampled), ("tracestate", "v=1")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-tollgate-trace-id"],
        "11111111111111111111111111111111"
    );
    // The trace goes on upstream, unsampled, from a span of the gateway's.
    let tp = up.last().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        tp.starts_with("00-11111111111111111111111111111111-") && tp.ends_with("-00"),
        "{tp}"
    );
    assert!(!tp.contains("2222222222222222"), "{tp}");
    assert_eq!(up.last().unwrap().headers["tracestate"], "v=1");
    let r = post(&gw, chat("m", false), &[]).await;
    assert_eq!(r.status(), 200);
    let sampled = "00-33333333333333333333333333333333-4444444444444444-01";
    let r = post(&gw, chat("m", false), &[("traceparent", sampled)]).await;
    assert_eq!(r.status(), 200);
    let spans = collector.trace("33333333333333333333333333333333", 2).await;
    let server = spans.iter().find(|s| s.kind == SERVER).unwrap();
    assert_eq!(to_hex(&server.parent_span_id), "4444444444444444");
    // Exports come in order: by the time the sampled trace is in, nothing else is.
    assert_eq!(
        collector.spans.lock().unwrap().len(),
        2,
        "only the sampled request's spans"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_capture_records_prompt_and_answer_capped_with_keys_masked() {
    let collector = Collector::start().await;
    let up = MockUpstream::start("a").await.unwrap();
    let gw = Gateway::start(&config(
        &collector,
        &one_upstream(&up.url()),
        "  capture_content: true\n  content_limit: 200\n",
    ));
    let mut body = chat("m", false);
    body["messages"][0]["content"] =
        format!("my key is sk-live-0123456789abcdefXYZ {}", "x".repeat(500)).into();
    let r = post(&gw, body, &[]).await;
    let trace_id = r.headers()["x-tollgate-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let answer: serde_json::Value = r.json().await.unwrap();
    let spans = collector.trace(&trace_id, 2).await;
    let server = spans.iter().find(|s| s.kind == SERVER).unwrap();
    let event = |name: &str, key: &str| {
        let e = server
            .events
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        match e
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .and_then(|v| v.value)
        {
            Some(Any::StringValue(s)) => s,
            other => panic!("{other:?}"),
        }
    };
    let prompt = event("gen_ai.content.prompt", "gen_ai.prompt");
    assert!(
        prompt.len() <= 200 && prompt.contains("my key is sk-li****fXYZ"),
        "{prompt}"
    );
    assert!(!prompt.contains("0123456789abcdef"));
    let completion = event("gen_ai.content.completion", "gen_ai.completion");
    // The mock echoes the prompt: the answer is capped and masked the same way.
    let full = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(full.contains("sk-live-0123456789abcdefXYZ"), "{full}");
    assert!(completion.len() <= 200, "{completion}");
    assert!(
        completion.starts_with("Hello from a. You said: my key is sk-li****fXYZ xxx"),
        "{completion}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_slows_no_request_and_drops_are_counted() {
    // Accepts connections and never reads or answers them.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", hung.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let up = MockUpstream::start("a").await.unwrap();
    let gw = Gateway::start(&format!(
        "tracing:\n  otlp:\n    endpoint: \"{url}\"\n    timeout: 30s\n  queue_size: 1\n  batch_size: 1\n  batch_delay: 10ms\n{}",
        one_upstream(&up.url())
    ));
    let started = Instant::now();
    for _ in 0..20 {
        let r = post(&gw, chat("m", false), &[]).await;
        assert_eq!(r.status(), 200);
    }
    // 20 requests took nowhere near one export timeout.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let m = scrape(&gw).await;
    let dropped: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_trace_spans_total{result=\"dropped\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // One span is being sent and one is queued; of the 40, the rest were dropped.
    assert!(dropped >= 30, "{m}");
    assert!(gw.logs().contains("spans are being dropped"));
}
