//! Mixing providers: clients of one format served by upstreams of another, through the
//! real binary, with scripted upstreams on loopback and the official SDKs as clients.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{client, python, Gateway};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

async fn run_script(script: &str, args: Vec<String>) -> String {
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(path)
            .args(args)
            .output()
            .expect("run python (see scripts/bootstrap)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{script} failed (scripts/bootstrap installs the SDKs):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_reply(v: Value) -> Reply {
    Reply::Status {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: v.to_string(),
    }
}

fn stream_reply(events: Vec<String>) -> Reply {
    Reply::Stream {
        events,
        gap: Duration::from_millis(5),
        cut: false,
    }
}

fn named(v: Value) -> String {
    format!("event: {}\ndata: {v}\n\n", v["type"].as_str().unwrap())
}

/// An Anthropic answer: "Checking." and a get_weather call; 20 + 5 cached input, 7 output.
fn anthropic_tool_answer() -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 7}})
}

fn anthropic_tool_stream() -> Vec<String> {
    [
        json!({"type": "message_start", "message": {"id": "msg_2", "type": "message", "role": "assistant", "model": "claude-up", "content": [], "stop_reason": null, "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check."}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}}),
        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"ci"}}),
        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "ty\": \"Par"}}),
        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "is\"}"}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 7}}),
        json!({"type": "message_stop"}),
    ]
    .into_iter()
    .map(named)
    .collect()
}

fn gemini_tool_answer() -> Value {
    json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Checking."}, {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]}, "finishReason": "STOP", "index": 0}],
           "usageMetadata": {"promptTokenCount": 25, "candidatesTokenCount": 7, "cachedContentTokenCount": 5}, "modelVersion": "gem-up", "responseId": "g1"})
}

fn gemini_tool_stream() -> Vec<String> {
    let chunk = |parts: Value, finish: Option<&str>, out: u64| {
        let mut c = json!({"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}],
            "usageMetadata": {"promptTokenCount": 25, "candidatesTokenCount": out, "cachedContentTokenCount": 5}, "modelVersion": "gem-up", "responseId": "g2"});
        if let Some(f) = finish {
            c["candidates"][0]["finishReason"] = json!(f);
        }
        format!("data: {c}\r\n\r\n")
    };
    vec![
        chunk(json!([{"text": "Let me "}]), None, 2),
        chunk(json!([{"text": "check."}]), None, 4),
        chunk(
            json!([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]),
            Some("STOP"),
            7,
        ),
    ]
}

const KEY: &str = "tg-translate-key-1234";
const MASTER: &str = "tg-translate-master-0000";

fn config(upstreams: &str, models: &str) -> String {
    format!("keys:\n  - {{name: t, key: {KEY}}}\nupstreams:\n{upstreams}models:\n{models}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_is_served_by_an_anthropic_upstream() {
    let up = MockUpstream::start("anthropic").await.unwrap();
    let gw = Gateway::start(&format!(
        "admin:\n  master_key: {MASTER}\n{}",
        config(
            &format!("  an:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-test-0000000000}}]\n", up.url()),
            "  gpt-4o:\n    routes: [{upstream: an, model: claude-up}]\n",
        )
    ));
    up.push([
        json_reply(anthropic_tool_answer()),
        stream_reply(anthropic_tool_stream()),
    ]);
    let out = run_script(
        "sdk_translated_openai.py",
        vec![gw.url("/v1"), KEY.into(), "gpt-4o".into()],
    )
    .await;
    assert!(out.contains("translated sdk ok"));
    let got = up.received();
    assert_eq!(got.len(), 3);
    for r in &got {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.headers["x-api-key"], "sk-ant-test-0000000000");
        assert_eq!(r.headers["anthropic-version"], "2023-06-01");
        assert!(r.headers.get("authorization").is_none());
    }
    let first: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(first["model"], "claude-up");
    assert_eq!(first["system"], "Answer with tools.");
    assert_eq!(first["max_tokens"], 300);
    assert_eq!(first["messages"][0]["content"][1]["type"], "image");
    assert_eq!(
        first["messages"][0]["content"][1]["source"]["media_type"],
        "image/png"
    );
    assert_eq!(
        first["tools"][0]["input_schema"]["required"],
        json!(["city"])
    );
    let second: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(second["stream"], true);
    assert_eq!(second["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        second["messages"][1]["content"][0]["input"],
        json!({"city": "Paris"})
    );
    assert_eq!(second["messages"][2]["content"][0]["type"], "tool_result");
    assert!(second.get("stream_options").is_none());
    // The access log names the translation and has the upstream's exact usage.
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("stream=false") && l.contains("path=/v1/chat/completions"))
        .unwrap();
    assert!(line.contains("translation=openai->anthropic"), "{line}");
    assert!(line.contains("tokens_in=25 tokens_out=7"), "{line}");
    let metrics = common::scrape(&gw).await;
    assert!(
        metrics.contains("tollgate_translations_total{direction=\"openai->anthropic\"} 3"),
        "{metrics}"
    );
    // So do the usage rows; one is found by its request id.
    let usage = |query: &'static str| {
        let url = gw.admin_url(&format!("/admin/usage{query}"));
        async move {
            let r = client().get(url).bearer_auth(MASTER).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["data"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    assert!(
        common::eventually_async(Duration::from_secs(10), || async {
            usage("").await.len() == 3
        })
        .await
    );
    let rows = usage("").await;
    for row in &rows {
        assert_eq!(row["translation"], "openai->anthropic", "{row}");
        assert_eq!(row["upstream"], "an", "{row}");
        assert_eq!(row["upstream_model"], "claude-up", "{row}");
    }
    let id = rows[1]["request_id"].as_str().unwrap().to_string();
    let url = gw.admin_url(&format!("/admin/usage?request_id={id}"));
    let one = common::get_json_as(url, MASTER).await;
    assert_eq!(one["data"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["data"][0], rows[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_is_served_by_a_gemini_upstream() {
    let up = MockUpstream::start("gemini").await.unwrap();
    let gw = Gateway::start(&config(
        &format!("  gm:\n    provider: gemini\n    servers: [{{url: \"http://{}/v1beta\", api_key: gm-test-key-0000000000}}]\n", up.addr),
        "  gpt-4o:\n    routes: [{upstream: gm, model: gem-up}]\n",
    ));
    up.push([
        json_reply(gemini_tool_answer()),
        stream_reply(gemini_tool_stream()),
    ]);
    let out = run_script(
        "sdk_translated_openai.py",
        vec![gw.url("/v1"), KEY.into(), "gpt-4o".into()],
    )
    .await;
    assert!(out.contains("translated sdk ok"));
    let got = up.received();
    let paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1beta/models/gem-up:generateContent",
            "/v1beta/models/gem-up:streamGenerateContent?alt=sse",
            "/v1beta/models/gem-up:streamGenerateContent?alt=sse"
        ]
    );
    assert_eq!(got[0].headers["x-goog-api-key"], "gm-test-key-0000000000");
    let first: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(
        first["systemInstruction"]["parts"][0]["text"],
        "Answer with tools."
    );
    assert_eq!(
        first["contents"][0]["parts"][1]["inlineData"]["mimeType"],
        "image/png"
    );
    assert_eq!(
        first["tools"][0]["functionDeclarations"][0]["name"],
        "get_weather"
    );
    let second: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(
        second["contents"][1]["parts"][0]["functionCall"]["name"],
        "get_weather"
    );
    assert_eq!(
        second["contents"][2]["parts"][0]["functionResponse"],
        json!({"name": "get_weather", "response": {"temp": 21}})
    );
}

fn openai_tool_answer() -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen-up",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Checking.",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32, "prompt_tokens_details": {"cached_tokens": 5}}})
}

fn openai_tool_stream() -> Vec<String> {
    let c = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "qwen-up",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    vec![
        c(json!({"role": "assistant", "content": ""}), Value::Null),
        c(json!({"content": "Let me "}), Value::Null),
        c(json!({"content": "check."}), Value::Null),
        c(
            json!({"tool_calls": [{"index": 0, "id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
            Value::Null,
        ),
        c(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
            Value::Null,
        ),
        c(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": " \"Paris\"}"}}]}),
            Value::Null,
        ),
        c(json!({}), json!("tool_calls")),
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "qwen-up", "choices": [],
            "usage": {"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32}})
        ),
        "data: [DONE]\n\n".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_is_served_by_an_openai_compatible_upstream() {
    let up = MockUpstream::start("vllm").await.unwrap();
    let gw = Gateway::start(&config(
        &format!("  fleet:\n    servers: [{{url: \"{}\"}}]\n", up.url()),
        "  claude-sonnet:\n    routes: [{upstream: fleet, model: qwen-up}]\n",
    ));
    up.push([
        json_reply(openai_tool_answer()),
        stream_reply(openai_tool_stream()),
    ]);
    let base = format!("http://{}", gw.addr);
    let out = run_script(
        "sdk_anthropic.py",
        vec![base, KEY.into(), "claude-sonnet".into()],
    )
    .await;
    assert!(out.contains("anthropic sdk ok"));
    // count_tokens was estimated here (no Anthropic route), and the error stayed local.
    let got = up.received();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.path, "/v1/chat/completions");
        // The SDK's anthropic-version and anthropic-beta mean nothing to this upstream.
        let names: Vec<&str> = r.headers.keys().map(|n| n.as_str()).collect();
        assert!(
            !names.iter().any(|n| n.starts_with("anthropic-")),
            "{names:?}"
        );
        assert!(r.headers.get("x-api-key").is_none());
    }
    let first: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(first["model"], "qwen-up");
    assert_eq!(first["max_tokens"], 500);
    assert_eq!(
        first["messages"][0],
        json!({"role": "system", "content": "Answer with tools."})
    );
    assert_eq!(
        first["tools"][0]["function"]["parameters"]["required"],
        json!(["city"])
    );
    let second: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(second["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        second["messages"][1]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Paris\"}"
    );
    assert_eq!(second["messages"][2]["role"], "tool");
    let logs = gw.logs();
    assert!(logs.contains("translation=anthropic->openai"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_goes_to_an_anthropic_route_when_the_alias_has_one() {
    let up = MockUpstream::start("anthropic").await.unwrap();
    let gw = Gateway::start(&config(
        &format!("  an:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-test-0000000000}}]\n", up.url()),
        "  claude:\n    routes: [{upstream: an}]\n",
    ));
    up.push([json_reply(json!({"input_tokens": 42}))]);
    let r = client()
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "token-counting-2024-11-01")
        .json(&json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tollgate-estimated").is_none());
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"input_tokens": 42})
    );
    let got = up.last().unwrap();
    assert_eq!(got.path, "/v1/messages/count_tokens");
    // Passed through to Anthropic: the client's anthropic-* fields go with it, once.
    assert_eq!(got.headers["anthropic-beta"], "token-counting-2024-11-01");
    assert_eq!(got.headers.get_all("anthropic-version").iter().count(), 1);
    assert_eq!(got.headers["x-api-key"], "sk-ant-test-0000000000");
}

/// Sends `body` to `path` and returns the status, `x-tollgate-attempts` and body text.
async fn post(gw: &Gateway, path: &str, body: Value) -> (u16, String, String) {
    let r = client()
        .post(gw.url(path))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let attempts = r
        .headers()
        .get("x-tollgate-attempts")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, attempts, r.text().await.unwrap())
}

const OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_529_on_tier_one_is_served_by_another_format_on_tier_two_streamed_or_not() {
    for stream in [false, true] {
        // Each case on its own upstreams, so no cooldown carries over.
        let an = MockUpstream::start("anthropic").await.unwrap();
        let oa = MockUpstream::start("openai").await.unwrap();
        let an2 = MockUpstream::start("anthropic").await.unwrap();
        let oa2 = MockUpstream::start("openai").await.unwrap();
        let gw = Gateway::start(&config(
            &format!(
                "  an:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-test-0000000000}}]\n  oa:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: sk-oa-test-0000000000}}]\n  an2:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-test-0000000000}}]\n  oa2:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: sk-oa-test-0000000000}}]\n",
                an.url(),
                oa.url(),
                an2.url(),
                oa2.url()
            ),
            "  anthropic-first:\n    routes:\n      - {upstream: an, model: claude-up, priority: 1}\n      - {upstream: oa, model: gpt-up, priority: 2}\n  openai-first:\n    routes:\n      - {upstream: oa2, model: gpt-up, priority: 1}\n      - {upstream: an2, model: claude-up, priority: 2}\n",
        ));
        let (an_first, oa_first) = (an, oa);
        let (an, oa) = (&an_first, &oa_first);
        if !stream {
            // The explain endpoint says, per endpoint, which route is translated and how.
            for (endpoint, wires) in [
                (
                    "",
                    [
                        ("anthropic", "translated", json!("openai->anthropic")),
                        ("openai", "direct", Value::Null),
                    ],
                ),
                (
                    "&endpoint=/v1/messages",
                    [
                        ("anthropic", "direct", Value::Null),
                        ("openai", "translated", json!("anthropic->openai")),
                    ],
                ),
            ] {
                let v = common::admin_json(
                    &client(),
                    &gw,
                    &format!("/admin/route?model=anthropic-first{endpoint}"),
                )
                .await;
                for (tier, (provider, wire, translation)) in wires.into_iter().enumerate() {
                    let route = &v["order"][0]["tiers"][tier]["routes"][0];
                    assert_eq!(
                        (&route["provider"], &route["wire"], &route["translation"]),
                        (&json!(provider), &json!(wire), &translation),
                        "{v}"
                    );
                }
            }
        }
        // An OpenAI client: Anthropic overloaded, OpenAI serves it as it is.
        an.push([Reply::error(529, OVERLOADED)]);
        let body = json!({"model": "anthropic-first", "stream": stream, "messages": [{"role": "user", "content": "ping"}]});
        let (status, attempts, text) = post(&gw, "/v1/chat/completions", body).await;
        assert_eq!(
            (status, attempts.as_str()),
            (200, "2"),
            "stream={stream}: {text}"
        );
        assert!(text.contains("ping"), "{text}");
        assert_eq!(an.last().unwrap().path, "/v1/messages");
        assert_eq!(oa.last().unwrap().path, "/v1/chat/completions");
        assert_eq!(
            serde_json::from_slice::<Value>(&oa.last().unwrap().body).unwrap()["model"],
            "gpt-up"
        );
        if stream {
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
        // An Anthropic client: OpenAI overloaded (503), Anthropic serves it as it is.
        let (an, oa) = (&an2, &oa2);
        oa.push([Reply::error(
            503,
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
        )]);
        let body = json!({"model": "openai-first", "stream": stream, "max_tokens": 50, "messages": [{"role": "user", "content": "pong"}]});
        let (status, attempts, text) = post(&gw, "/v1/messages", body).await;
        assert_eq!(
            (status, attempts.as_str()),
            (200, "2"),
            "stream={stream}: {text}"
        );
        assert!(text.contains("pong"), "{text}");
        let sent: Value = serde_json::from_slice(&an.last().unwrap().body).unwrap();
        assert_eq!(
            (sent["model"].as_str(), sent["max_tokens"].as_u64()),
            (Some("claude-up"), Some(50))
        );
        if stream {
            assert!(text.contains("event: message_stop"), "{text}");
        } else {
            assert_eq!(
                serde_json::from_str::<Value>(&text).unwrap()["type"],
                "message"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_back_in_the_clients_format() {
    let an = MockUpstream::start("anthropic").await.unwrap();
    let oa = MockUpstream::start("fleet").await.unwrap();
    let gw = Gateway::start(&config(
        &format!(
            "  an:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-test-0000000000}}]\n  oa:\n    servers: [{{url: \"{}\"}}]\n",
            an.url(),
            oa.url()
        ),
        "  claude:\n    routes: [{upstream: an}]\n  local:\n    routes: [{upstream: oa}]\n",
    ));
    an.push([Reply::error(400, r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}"#)]);
    let (status, _, text) = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "claude", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["message"], "messages: roles must alternate");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    oa.push([Reply::error(
        400,
        r#"{"error":{"message":"bad temperature","type":"invalid_request_error"}}"#,
    )]);
    let (status, _, text) = post(
        &gw,
        "/v1/messages",
        json!({"model": "local", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad temperature"}})
    );
    // What has no equivalent is refused before any upstream work, naming the field.
    let hits = an.hits();
    let (status, _, text) = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "claude", "n": 3, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(text.contains("`n`"), "{text}");
    assert_eq!(an.hits(), hits);
    // The gateway's own errors on /v1/messages are Anthropic-shaped too.
    let (status, _, text) = post(
        &gw,
        "/v1/messages",
        json!({"model": "nope", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
        "not_found_error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translation_never_holds_the_stream_back_and_a_cut_ends_in_an_error_event() {
    let an = MockUpstream::start("anthropic").await.unwrap();
    let gw = Gateway::start(&config(
        &format!("  an:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-test-0000000000}}]\n", an.url()),
        "  claude:\n    routes: [{upstream: an}]\n",
    ));
    // A slow upstream: the first translated delta reaches the client while the upstream
    // is still streaming.
    an.push([Reply::Stream {
        events: anthropic_tool_stream(),
        gap: Duration::from_millis(200),
        cut: false,
    }]);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "claude", "stream": true, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("Let me ") {
        let next = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .unwrap();
        let chunk = next
            .unwrap_or_else(|| panic!("the stream ended early: {seen}"))
            .unwrap_or_else(|e| panic!("{e}: {seen}\n{}", gw.logs()));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(
        an.open_streams(),
        1,
        "the upstream is still streaming when the first delta arrives"
    );
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(seen.trim_end().ends_with("data: [DONE]"), "{seen}");
    // A stream cut before message_stop: an error event, never [DONE].
    let mut events = anthropic_tool_stream();
    events.truncate(4);
    an.push([Reply::Stream {
        events,
        gap: Duration::from_millis(5),
        cut: true,
    }]);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "claude", "stream": true, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The body ends without its last chunk (the connection closes): read what came.
    let mut text = String::new();
    let mut body = r.bytes_stream();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("Let me "), "{text}");
    assert!(text.contains("\"error\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
}

/// Anthropic's prompt-cache writes are billed by duration, for an Anthropic client passed
/// through and an OpenAI client translated, streamed or not: every usage row carries the
/// same hand-computed cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_cache_writes_are_priced_by_duration_on_every_path() {
    let up = MockUpstream::start("anthropic").await.unwrap();
    let gw = Gateway::start(&format!(
        "admin:\n  master_key: {MASTER}\npricing:\n  claude-up: {{input: 3.0, cached_input: 0.30, output: 15.0}}\n{}",
        config(
            &format!("  an:\n    provider: anthropic\n    servers: [{{url: \"{}\", api_key: sk-ant-test-0000000000}}]\n", up.url()),
            "  claude:\n    routes: [{upstream: an, model: claude-up}]\n",
        )
    ));
    let usage = json!({"input_tokens": 10, "cache_read_input_tokens": 200, "cache_creation_input_tokens": 400,
        "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 100}, "output_tokens": 50});
    let whole = json_reply(
        json!({"id": "msg_c", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [{"type": "text", "text": "cached"}], "stop_reason": "end_turn", "usage": usage}),
    );
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let streamed = stream_reply(
        [
            json!({"type": "message_start", "message": {"id": "msg_c", "type": "message", "role": "assistant", "model": "claude-up", "content": [], "stop_reason": null, "usage": start_usage}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "cached"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 50}}),
            json!({"type": "message_stop"}),
        ]
        .into_iter()
        .map(named)
        .collect(),
    );
    up.push([whole.clone(), streamed.clone(), whole, streamed]);
    for (path, stream) in [
        ("/v1/messages", false),
        ("/v1/messages", true),
        ("/v1/chat/completions", false),
        ("/v1/chat/completions", true),
    ] {
        let body = json!({"model": "claude", "stream": stream, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
        let r = client()
            .post(gw.url(path))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        // A whole answer says what it cost, passed through or translated; a stream's cost
        // is known after its header (its usage row has it).
        let cost = r.headers().get("x-tollgate-cost-usd").cloned();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{path} stream={stream}: {text}");
        assert!(text.contains("cached"), "{text}");
        match stream {
            false => assert_eq!(cost.unwrap(), "0.002565", "{path}"),
            true => assert_eq!(cost, None, "{path}"),
        }
    }
    // 10 x $3 + 200 x $0.30 + 300 x $3.75 (5-minute writes, 1.25 x input) + 100 x $6
    // (hour-long writes, 2 x input) + 50 x $15, per million tokens, in micro-USD.
    let expected = 30 + 60 + 1125 + 600 + 750;
    for row in usage_rows(&gw, 4).await {
        assert_eq!(row["cache_write_tokens"], 400, "{row}");
        assert_eq!(row["reasoning_tokens"], 0, "{row}");
        assert_eq!(row["input_tokens"], 610, "{row}");
        assert_eq!(row["cached_tokens"], 200, "{row}");
        assert_eq!(row["output_tokens"], 50, "{row}");
        assert_eq!(row["cost_micro_usd"], expected, "{row}");
    }
}

/// Reasoning tokens are reported apart (usage row, metrics) and priced as the output
/// they are part of: OpenAI's `completion_tokens_details` passed through, Gemini's
/// `thoughtsTokenCount` translated for an OpenAI client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_tokens_are_reported_apart_and_priced_as_output() {
    let oa = MockUpstream::start("openai").await.unwrap();
    let ge = MockUpstream::start("gemini").await.unwrap();
    oa.set_default(json_reply(json!({"id": "c", "object": "chat.completion", "created": 0, "model": "o-up",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 900, "total_tokens": 1000,
                  "completion_tokens_details": {"reasoning_tokens": 640}}})));
    ge.set_default(json_reply(json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "42"}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 260, "thoughtsTokenCount": 640, "totalTokenCount": 1000},
        "modelVersion": "g-up", "responseId": "g1"})));
    let gw = Gateway::start(&format!(
        "admin:\n  master_key: {MASTER}\npricing:\n  o-up: {{input: 2.0, output: 8.0}}\n  g-up: {{input: 2.0, output: 8.0}}\n{}",
        config(
            &format!(
                "  oa:\n    provider: openai\n    servers: [{{url: \"{}\", api_key: sk-oa-test}}]\n  ge:\n    provider: gemini\n    servers: [{{url: \"{}\", api_key: g-test}}]\n",
                oa.url(),
                ge.url()
            ),
            "  thinker:\n    routes: [{upstream: oa, model: o-up}]\n  gthinker:\n    routes: [{upstream: ge, model: g-up}]\n",
        )
    ));
    for model in ["thinker", "gthinker"] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "think"}]});
        let (status, _, text) = post(&gw, "/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 900, "{text}");
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"], 640,
            "{text}"
        );
    }
    for row in usage_rows(&gw, 2).await {
        assert_eq!(row["output_tokens"], 900, "{row}");
        assert_eq!(row["reasoning_tokens"], 640, "{row}");
        // 100 x $2 + 900 x $8 per million tokens: 200 + 7,200 micro-USD.
        assert_eq!(row["cost_micro_usd"], 7_400, "{row}");
    }
    let metrics = common::scrape(&gw).await;
    let reasoning: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_tokens_total{") && l.contains("type=\"reasoning\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(reasoning, 1280, "{metrics}");
}

/// The usage rows, once there are `n` of them (they are written in the background).
async fn usage_rows(gw: &Gateway, n: usize) -> Vec<Value> {
    let rows = || async {
        common::get_json_as(gw.admin_url("/admin/usage"), MASTER).await["data"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert!(
        common::eventually_async(Duration::from_secs(10), || async {
            rows().await.len() == n
        })
        .await,
        "{n} usage rows never came"
    );
    rows().await
}
