//! Golden fixtures per direction (written from each provider's documented shapes) and
//! properties of the stream translators.

use super::*;
use crate::provider::sse;
use serde_json::{json, Value};

fn target(model: &str, provider: Provider) -> Target<'_> {
    Target {
        model,
        provider,
        default_max_tokens: 4096,
    }
}

fn request(t: Translation, body: Value, provider: Provider) -> Result<(Value, Outbound), String> {
    let out = t.request(body.to_string().as_bytes(), &target("up-model", provider))?;
    Ok((serde_json::from_slice(&out.body).unwrap(), out))
}

/// The events of an SSE byte stream: (event name, data as JSON or the raw text).
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut r = sse::Reader::default();
    let mut out = Vec::new();
    r.feed(bytes, |e| {
        let data = serde_json::from_str(&e.data).unwrap_or(Value::String(e.data.clone()));
        out.push((e.name, data));
    });
    out
}

/// Feeds `wire` to a fresh stream cut at `cuts`; the client bytes and the completion.
fn run_stream(t: Translation, include_usage: bool, wire: &[u8], cuts: &[usize]) -> (Vec<u8>, bool) {
    let mut s = t.stream(1_700_000_000, include_usage);
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for c in cuts.into_iter().chain([wire.len()]) {
        s.feed(&wire[from..c], &mut out);
        from = c;
    }
    let complete = s.finish(&mut out);
    (out, complete)
}

fn anthropic_sse(events: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        let name = e["type"].as_str().unwrap();
        out.extend_from_slice(format!("event: {name}\ndata: {e}\n\n").as_bytes());
    }
    out
}

fn openai_sse(chunks: &[Value], done: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(format!("data: {c}\n\n").as_bytes());
    }
    if done {
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
    out
}

// OpenAI client, Anthropic upstream.

#[test]
fn a_chat_request_becomes_a_messages_request() {
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"cat\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
            {"role": "user", "content": "Thanks"}
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
                  {"type": "function", "function": {"name": "now"}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "parallel_tool_calls": false,
        "max_completion_tokens": 2000,
        "stop": "END",
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "u-42",
        "reasoning_effort": "low",
        "stream": true,
        "stream_options": {"include_usage": true}
    });
    let (got, out) = request(Translation::ChatToMessages, body, Provider::Anthropic).unwrap();
    assert_eq!(out.suffix, "/messages");
    assert_eq!(
        got,
        json!({
            "model": "up-model",
            "max_tokens": 2000,
            "system": "Be brief.\nUse tools.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "cat"}},
                    {"type": "tool_use", "id": "call_2", "name": "now", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
                    {"type": "text", "text": "Thanks"}
                ]}
            ],
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_p": 0.9,
            "stream": true,
            "metadata": {"user_id": "u-42"},
            "tools": [
                {"name": "lookup", "description": "Search", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}}
            ],
            "tool_choice": {"type": "tool", "name": "lookup", "disable_parallel_tool_use": true},
            "thinking": {"type": "enabled", "budget_tokens": 1024}
        })
    );
}

#[test]
fn max_tokens_defaults_and_choice_modes_map() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]});
    let (got, _) = request(Translation::ChatToMessages, body, Provider::Anthropic).unwrap();
    assert_eq!(got["max_tokens"], 4096);
    assert_eq!(got["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        got["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    );
}

#[test]
fn what_anthropic_cannot_express_is_refused_naming_the_field() {
    let base = |extra: Value| {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (extra, field) in [
        (json!({"n": 2}), "`n`"),
        (json!({"logprobs": true}), "`logprobs`"),
        (json!({"logit_bias": {"50256": -100}}), "`logit_bias`"),
        (json!({"presence_penalty": 0.5}), "`presence_penalty`"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "`response_format`",
        ),
        (json!({"temperature": 1.5}), "temperature"),
        (
            json!({"reasoning_effort": "high", "max_tokens": 1000}),
            "reasoning_effort",
        ),
    ] {
        let err = request(
            Translation::ChatToMessages,
            base(extra.clone()),
            Provider::Anthropic,
        )
        .unwrap_err();
        assert!(err.contains(field), "{extra}: {err}");
    }
    // Defaults that mean nothing are accepted.
    let ok = base(
        json!({"n": 1, "logprobs": false, "presence_penalty": 0, "response_format": {"type": "text"}}),
    );
    assert!(request(Translation::ChatToMessages, ok, Provider::Anthropic).is_ok());
    let audio = base(
        json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
    );
    let err = request(Translation::ChatToMessages, audio, Provider::Anthropic).unwrap_err();
    assert!(err.contains("messages[0]"), "{err}");
}

#[test]
fn an_anthropic_answer_becomes_a_chat_completion() {
    let answer = json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4",
        "content": [
            {"type": "thinking", "thinking": "Let me look.", "signature": "sig"},
            {"type": "text", "text": "Looking it up."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "cat"}}
        ],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 20}
    });
    let out = Translation::ChatToMessages
        .answer(answer.to_string().as_bytes(), 1_700_000_000)
        .unwrap();
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        got,
        json!({
            "id": "msg_01", "object": "chat.completion", "created": 1_700_000_000u64, "model": "claude-sonnet-4",
            "choices": [{"index": 0, "message": {
                "role": "assistant", "content": "Looking it up.", "reasoning_content": "Let me look.",
                "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"cat\"}"}}]
            }, "finish_reason": "tool_calls", "logprobs": null}],
            "usage": {"prompt_tokens": 115, "completion_tokens": 20, "total_tokens": 135,
                      "prompt_tokens_details": {"cached_tokens": 100}}
        })
    );
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
    ] {
        let a = json!({"id": "m", "content": [], "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}});
        let got: Value = serde_json::from_slice(
            &Translation::ChatToMessages
                .answer(a.to_string().as_bytes(), 0)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(got["choices"][0]["finish_reason"], finish, "{stop}");
    }
}

fn anthropic_tool_stream(args: &[&str]) -> Vec<Value> {
    let mut e = vec![
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "stop_reason": null, "usage": {"input_tokens": 12, "cache_read_input_tokens": 3, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check."}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {}}}),
    ];
    for a in args {
        e.push(json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": a}}));
    }
    e.push(json!({"type": "content_block_stop", "index": 1}));
    e.push(json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "time", "input": {}}}));
    e.push(json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}));
    e.push(json!({"type": "content_block_stop", "index": 2}));
    e.push(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 30}}));
    e.push(json!({"type": "message_stop"}));
    e
}

/// Text, tool calls (id, name, arguments by index) and finish reasons of a chat stream.
struct ChatStream {
    role_chunks: usize,
    text: String,
    calls: Vec<(String, String, String)>,
    finishes: Vec<String>,
    usage: Option<Value>,
    done_last: bool,
    errors: usize,
}

fn read_chat_stream(bytes: &[u8]) -> ChatStream {
    let evs = events(bytes);
    let mut s = ChatStream {
        role_chunks: 0,
        text: String::new(),
        calls: Vec::new(),
        finishes: Vec::new(),
        usage: None,
        done_last: false,
        errors: 0,
    };
    for (i, (_, data)) in evs.iter().enumerate() {
        if data == "[DONE]" {
            s.done_last = i == evs.len() - 1;
            continue;
        }
        if data.get("error").is_some() {
            s.errors += 1;
            continue;
        }
        if !data["usage"].is_null() {
            assert_eq!(data["choices"], json!([]));
            s.usage = Some(data["usage"].clone());
        }
        for c in data["choices"].as_array().unwrap() {
            let d = &c["delta"];
            if d.get("role").is_some() {
                s.role_chunks += 1;
            }
            if let Some(t) = d["content"].as_str() {
                s.text.push_str(t);
            }
            for tc in d["tool_calls"].as_array().into_iter().flatten() {
                let i = tc["index"].as_u64().unwrap() as usize;
                if let Some(id) = tc["id"].as_str() {
                    assert_eq!(i, s.calls.len(), "a new call takes the next index");
                    s.calls.push((
                        id.into(),
                        tc["function"]["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                }
                if let Some(a) = tc["function"]["arguments"].as_str() {
                    s.calls[i].2.push_str(a);
                }
            }
            if let Some(f) = c["finish_reason"].as_str() {
                s.finishes.push(f.into());
            }
        }
    }
    s
}

#[test]
fn an_anthropic_stream_becomes_chat_chunks_with_tool_calls_counted_apart_from_blocks() {
    let wire = anthropic_sse(&anthropic_tool_stream(&["{\"city\":", " \"Paris\"", "}"]));
    let (out, complete) = run_stream(Translation::ChatToMessages, true, &wire, &[]);
    assert!(complete);
    let s = read_chat_stream(&out);
    assert_eq!(s.role_chunks, 1);
    assert_eq!(s.text, "Let me check.");
    assert_eq!(
        s.calls,
        vec![
            (
                "toolu_a".into(),
                "weather".into(),
                "{\"city\": \"Paris\"}".into()
            ),
            ("toolu_b".into(), "time".into(), "{}".into())
        ]
    );
    assert_eq!(s.finishes, vec!["tool_calls"]);
    assert_eq!(
        s.usage,
        Some(
            json!({"prompt_tokens": 15, "completion_tokens": 30, "total_tokens": 45, "prompt_tokens_details": {"cached_tokens": 3}})
        )
    );
    assert!(s.done_last);
    // Without include_usage there is no usage chunk.
    let (out, _) = run_stream(Translation::ChatToMessages, false, &wire, &[]);
    assert!(read_chat_stream(&out).usage.is_none());
}

#[test]
fn an_error_event_ends_the_chat_stream_without_done() {
    let mut evs = anthropic_tool_stream(&["{}"]);
    evs.truncate(4);
    evs.push(
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    evs.push(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "late"}}));
    evs.push(json!({"type": "message_stop"}));
    let (out, complete) = run_stream(Translation::ChatToMessages, true, &anthropic_sse(&evs), &[]);
    assert!(!complete);
    let s = read_chat_stream(&out);
    assert_eq!(
        (s.errors, s.done_last, s.text.as_str()),
        (1, false, "Let me ")
    );
    let last = events(&out).pop().unwrap().1;
    assert_eq!(last["error"]["type"], "overloaded_error");
    // Cut before message_stop: an error, no [DONE].
    let mut evs = anthropic_tool_stream(&["{}"]);
    evs.pop();
    let (out, complete) = run_stream(
        Translation::ChatToMessages,
        false,
        &anthropic_sse(&evs),
        &[],
    );
    assert!(!complete);
    let s = read_chat_stream(&out);
    assert_eq!((s.errors, s.done_last), (1, false));
}

// Anthropic client, OpenAI-compatible upstream.

#[test]
fn a_messages_request_becomes_a_chat_request() {
    let body = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "You are a coding agent."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look at this"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.rs"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "fn main() {}"}]},
                {"type": "text", "text": "Fix it"}
            ]}
        ],
        "tools": [{"name": "read", "description": "Read a file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "stop_sequences": ["\n\nHuman:"],
        "temperature": 0.2,
        "metadata": {"user_id": "dev-1"},
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "stream": true
    });
    let (got, out) = request(Translation::MessagesToChat, body.clone(), Provider::Openai).unwrap();
    assert_eq!(out.suffix, "/chat/completions");
    assert_eq!(
        got,
        json!({
            "model": "up-model",
            "messages": [
                {"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Look at this"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}
                ]},
                {"role": "assistant", "content": "Reading.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"a.rs\"}"}}
                ]},
                {"role": "tool", "content": "fn main() {}", "tool_call_id": "toolu_1"},
                {"role": "user", "content": "Fix it"}
            ],
            "max_completion_tokens": 1024,
            "stream": true,
            "stream_options": {"include_usage": true},
            "stop": ["\n\nHuman:"],
            "temperature": 0.2,
            "user": "dev-1",
            "tools": [{"type": "function", "function": {"name": "read", "description": "Read a file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "reasoning_effort": "medium"
        })
    );
    // A self-hosted server reads max_tokens.
    let (got, _) = request(Translation::MessagesToChat, body, Provider::Generic).unwrap();
    assert_eq!(
        (got["max_tokens"].clone(), got.get("max_completion_tokens")),
        (json!(1024), None)
    );
}

#[test]
fn messages_requests_without_an_equivalent_are_refused() {
    let no_max = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert!(
        request(Translation::MessagesToChat, no_max, Provider::Openai)
            .unwrap_err()
            .contains("max_tokens")
    );
    let server_tool = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                             "tools": [{"type": "web_search_20250305", "name": "web_search"}]});
    let err = request(Translation::MessagesToChat, server_tool, Provider::Openai).unwrap_err();
    assert!(err.contains("web_search_20250305"), "{err}");
    let doc = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]});
    assert!(request(Translation::MessagesToChat, doc, Provider::Openai)
        .unwrap_err()
        .contains("messages[0]"));
}

#[test]
fn a_chat_completion_becomes_an_anthropic_answer() {
    let answer = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Done.", "reasoning_content": "think",
            "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "write", "arguments": "{\"path\":\"a\"}"}}]},
            "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57, "prompt_tokens_details": {"cached_tokens": 20}}
    });
    let got: Value = serde_json::from_slice(
        &Translation::MessagesToChat
            .answer(answer.to_string().as_bytes(), 0)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        got,
        json!({
            "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "qwen",
            "content": [
                {"type": "thinking", "thinking": "think", "signature": ""},
                {"type": "text", "text": "Done."},
                {"type": "tool_use", "id": "call_9", "name": "write", "input": {"path": "a"}}
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 30, "output_tokens": 7, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0}
        })
    );
}

fn openai_tool_chunks(args: &[&str]) -> Vec<Value> {
    let c = |delta: Value, finish: Value| json!({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "qwen", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    let mut v = vec![
        c(json!({"role": "assistant", "content": ""}), Value::Null),
        c(json!({"content": "Sure"}), Value::Null),
        c(
            json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "edit", "arguments": ""}}]}),
            Value::Null,
        ),
    ];
    for a in args {
        v.push(c(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}),
            Value::Null,
        ));
    }
    v.push(c(json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "run", "arguments": "{}"}}]}), Value::Null));
    // Content and the finish reason in one chunk.
    v.push(c(json!({"content": ""}), json!("tool_calls")));
    v.push(json!({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "qwen", "choices": [],
                  "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49, "prompt_tokens_details": {"cached_tokens": 8}}}));
    v
}

/// Checks Anthropic's event grammar and returns (text, tool inputs as JSON text by block,
/// stop reason, final usage).
fn read_anthropic_stream(
    bytes: &[u8],
) -> (
    String,
    Vec<(String, String)>,
    Option<String>,
    Option<Value>,
    bool,
) {
    let evs = events(bytes);
    let mut open: Option<u64> = None;
    let mut next = 0;
    let mut text = String::new();
    let mut tools: Vec<(String, String)> = Vec::new();
    let mut stop = None;
    let mut usage = None;
    let mut stopped = false;
    assert_eq!(evs.first().map(|e| e.0.as_str()), Some("message_start"));
    for (name, data) in &evs {
        assert_eq!(
            name,
            data["type"].as_str().unwrap(),
            "the event name matches its type"
        );
        assert!(!stopped, "nothing after message_stop or error");
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(open, None, "blocks never overlap");
                assert_eq!(data["index"], next);
                open = Some(next);
                next += 1;
                if data["content_block"]["type"] == "tool_use" {
                    tools.push((
                        data["content_block"]["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                }
            }
            "content_block_delta" => {
                assert_eq!(Some(data["index"].as_u64().unwrap()), open);
                match data["delta"]["type"].as_str().unwrap() {
                    "text_delta" => text.push_str(data["delta"]["text"].as_str().unwrap()),
                    "input_json_delta" => tools
                        .last_mut()
                        .unwrap()
                        .1
                        .push_str(data["delta"]["partial_json"].as_str().unwrap()),
                    _ => {}
                }
            }
            "content_block_stop" => {
                assert_eq!(Some(data["index"].as_u64().unwrap()), open);
                open = None;
            }
            "message_delta" => {
                assert_eq!(open, None);
                stop = data["delta"]["stop_reason"].as_str().map(String::from);
                usage = Some(data["usage"].clone());
            }
            "message_stop" | "error" => stopped = true,
            _ => {}
        }
    }
    let ok = evs.last().map(|e| e.0.as_str()) == Some("message_stop");
    (text, tools, stop, usage, ok)
}

#[test]
fn chat_chunks_become_anthropic_events_in_order() {
    let wire = openai_sse(&openai_tool_chunks(&["{\"file\":", "\"a.rs\"}"]), true);
    let (out, complete) = run_stream(Translation::MessagesToChat, false, &wire, &[]);
    assert!(complete);
    let (text, tools, stop, usage, ok) = read_anthropic_stream(&out);
    assert!(ok);
    assert_eq!(text, "Sure");
    assert_eq!(
        tools,
        vec![
            ("edit".into(), "{\"file\":\"a.rs\"}".into()),
            ("run".into(), "{}".into())
        ]
    );
    assert_eq!(stop.as_deref(), Some("tool_use"));
    assert_eq!(
        usage,
        Some(
            json!({"output_tokens": 9, "input_tokens": 32, "cache_read_input_tokens": 8, "cache_creation_input_tokens": 0})
        )
    );
}

#[test]
fn an_upstream_error_chunk_or_a_cut_ends_the_anthropic_stream_with_an_error_event() {
    let mut chunks = openai_tool_chunks(&["{}"]);
    chunks.truncate(2);
    chunks.push(
        json!({"error": {"message": "context length exceeded", "type": "invalid_request_error"}}),
    );
    let (out, complete) = run_stream(
        Translation::MessagesToChat,
        false,
        &openai_sse(&chunks, true),
        &[],
    );
    assert!(!complete);
    let evs = events(&out);
    assert_eq!(evs.last().unwrap().0, "error");
    assert_eq!(
        evs.last().unwrap().1["error"]["message"],
        "context length exceeded"
    );
    assert!(!evs.iter().any(|e| e.0 == "message_stop"));
    let mut chunks = openai_tool_chunks(&["{}"]);
    chunks.truncate(3);
    let (out, complete) = run_stream(
        Translation::MessagesToChat,
        false,
        &openai_sse(&chunks, false),
        &[],
    );
    assert!(!complete);
    assert_eq!(events(&out).last().unwrap().0, "error");
}

// Gemini.

#[test]
fn a_chat_request_becomes_a_gemini_request() {
    let body = json!({
        "model": "gemini", "stream": true,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "tool_calls": [{"id": "call_x", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_x", "content": "{\"temp\":3}"}
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "additionalProperties": false}}}],
        "tool_choice": "auto", "max_tokens": 300, "temperature": 1.2, "stop": ["x"]
    });
    let (got, out) = request(Translation::ChatToGemini, body, Provider::Gemini).unwrap();
    assert_eq!(
        (out.suffix.as_str(), out.query),
        ("/models/up-model:streamGenerateContent", Some("alt=sse"))
    );
    assert_eq!(
        got,
        json!({
            "contents": [
                {"role": "user", "parts": [{"text": "Weather?"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]},
                {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"temp": 3}}}]}
            ],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "tools": [{"functionDeclarations": [{"name": "weather", "parametersJsonSchema": {"type": "object", "additionalProperties": false}}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
            "generationConfig": {"maxOutputTokens": 300, "temperature": 1.2, "topP": null, "stopSequences": ["x"]}
        })
        .as_object()
        .map(|o| {
            let mut o = o.clone();
            o["generationConfig"].as_object_mut().unwrap().remove("topP");
            Value::Object(o)
        })
        .unwrap()
    );
    let https = json!({"model": "g", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]});
    assert!(request(Translation::ChatToGemini, https, Provider::Gemini)
        .unwrap_err()
        .contains("data URL"));
    let orphan = json!({"model": "g", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]});
    assert!(request(Translation::ChatToGemini, orphan, Provider::Gemini)
        .unwrap_err()
        .contains("nope"));
}

#[test]
fn a_gemini_answer_becomes_a_chat_completion() {
    let answer = json!({
        "candidates": [{"content": {"role": "model", "parts": [
            {"text": "plan", "thought": true}, {"text": "Calling."},
            {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}
        ]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 10, "thoughtsTokenCount": 4, "cachedContentTokenCount": 12},
        "modelVersion": "gemini-2.5-flash", "responseId": "r1"
    });
    let got: Value = serde_json::from_slice(
        &Translation::ChatToGemini
            .answer(answer.to_string().as_bytes(), 7)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        got,
        json!({
            "id": "r1", "object": "chat.completion", "created": 7, "model": "gemini-2.5-flash",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Calling.", "reasoning_content": "plan",
                "tool_calls": [{"id": "call_r1_0", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                "finish_reason": "tool_calls", "logprobs": null}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 14, "total_tokens": 44,
                      "prompt_tokens_details": {"cached_tokens": 12}, "completion_tokens_details": {"reasoning_tokens": 4}}
        })
    );
}

#[test]
fn a_gemini_stream_becomes_chat_chunks_and_ends_only_after_a_finish_reason() {
    let part = |p: Value, finish: Option<&str>, out: u64| {
        let mut c = json!({"candidates": [{"content": {"role": "model", "parts": [p]}, "index": 0}],
                           "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": out}, "responseId": "r2", "modelVersion": "g"});
        if let Some(f) = finish {
            c["candidates"][0]["finishReason"] = json!(f);
        }
        format!("data: {c}\r\n\r\n")
    };
    let wire = [
        part(json!({"text": "Hel"}), None, 1),
        part(json!({"text": "lo"}), None, 2),
        part(
            json!({"functionCall": {"name": "f", "args": {}}}),
            Some("STOP"),
            5,
        ),
    ]
    .concat();
    let (out, complete) = run_stream(Translation::ChatToGemini, true, wire.as_bytes(), &[]);
    assert!(complete);
    let s = read_chat_stream(&out);
    assert_eq!(s.text, "Hello");
    assert_eq!(s.calls, vec![("call_r2_0".into(), "f".into(), "{}".into())]);
    assert_eq!(s.finishes, vec!["tool_calls"]);
    assert_eq!(s.usage.unwrap()["completion_tokens"], 5);
    assert!(s.done_last);
    let cut = [part(json!({"text": "Hel"}), None, 1)].concat();
    let (out, complete) = run_stream(Translation::ChatToGemini, true, cut.as_bytes(), &[]);
    assert!(!complete);
    let s = read_chat_stream(&out);
    assert_eq!((s.errors, s.done_last), (1, false));
}

#[test]
fn upstream_errors_are_answered_in_the_clients_shape() {
    let an = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let got: Value = serde_json::from_slice(&Translation::ChatToMessages.error(529, an)).unwrap();
    assert_eq!(got["error"]["message"], "Overloaded");
    assert_eq!(got["error"]["type"], "overloaded_error");
    let oa = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
    let got: Value = serde_json::from_slice(&Translation::MessagesToChat.error(429, oa)).unwrap();
    assert_eq!(
        got,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}})
    );
    let gm = br#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}"#;
    let got: Value = serde_json::from_slice(&Translation::ChatToGemini.error(429, gm)).unwrap();
    assert_eq!(got["error"]["code"], "RESOURCE_EXHAUSTED");
    assert_eq!(got["error"]["message"], "Resource has been exhausted");
    let plain: Value =
        serde_json::from_slice(&Translation::ChatToMessages.error(502, b"Bad Gateway")).unwrap();
    assert!(plain["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Bad Gateway"));
}

#[test]
fn paths_say_which_routes_serve_which_endpoints() {
    use Provider::*;
    assert_eq!(
        Path::of("/chat/completions", Anthropic),
        Path::Translated(Translation::ChatToMessages)
    );
    assert_eq!(Path::of("/chat/completions", Generic), Path::Direct);
    assert_eq!(Path::of("/messages", Anthropic), Path::Direct);
    assert_eq!(
        Path::of("/messages", Azure),
        Path::Translated(Translation::MessagesToChat)
    );
    assert_eq!(Path::of("/messages", Gemini), Path::Unserved);
    assert_eq!(Path::of("/messages/count_tokens", Openai), Path::Unserved);
    assert_eq!(Path::of("/embeddings", Anthropic), Path::Unserved);
    assert_eq!(Path::of("/embeddings", Openai), Path::Direct);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Argument text cut into 1..6 pieces at arbitrary char boundaries.
    fn pieces(text: &str, cuts: &[usize]) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
        at.sort_unstable();
        let mut out = Vec::new();
        let mut from = 0;
        for c in at.into_iter().chain([chars.len()]) {
            out.push(chars[from..c].iter().collect());
            from = c;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// However the upstream stream is cut into reads, the client gets the same bytes,
        /// and streamed tool arguments concatenate to exactly the upstream's JSON.
        #[test]
        fn anthropic_to_chat_is_independent_of_reads(
            city in "[a-zA-Z \\\\\"é{}]{0,24}",
            arg_cuts in proptest::collection::vec(any::<usize>(), 0..5),
            read_cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let args = json!({"city": city}).to_string();
            let ps = pieces(&args, &arg_cuts);
            let refs: Vec<&str> = ps.iter().map(String::as_str).collect();
            let wire = anthropic_sse(&anthropic_tool_stream(&refs));
            let (whole, complete) = run_stream(Translation::ChatToMessages, true, &wire, &[]);
            prop_assert!(complete);
            let (cut, _) = run_stream(Translation::ChatToMessages, true, &wire, &read_cuts);
            prop_assert_eq!(&cut, &whole);
            let s = read_chat_stream(&whole);
            prop_assert_eq!(&s.calls[0].2, &args);
        }

        #[test]
        fn chat_to_anthropic_is_independent_of_reads(
            path in "[a-z/. \\\\\"]{0,24}",
            arg_cuts in proptest::collection::vec(any::<usize>(), 0..5),
            read_cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let args = json!({"file": path}).to_string();
            let ps = pieces(&args, &arg_cuts);
            let refs: Vec<&str> = ps.iter().map(String::as_str).collect();
            let wire = openai_sse(&openai_tool_chunks(&refs), true);
            let (whole, complete) = run_stream(Translation::MessagesToChat, false, &wire, &[]);
            prop_assert!(complete);
            let (cut, _) = run_stream(Translation::MessagesToChat, false, &wire, &read_cuts);
            prop_assert_eq!(&cut, &whole);
            let (_, tools, _, _, ok) = read_anthropic_stream(&whole);
            prop_assert!(ok);
            prop_assert_eq!(&tools[0].1, &args);
        }

        /// After an error event nothing more is emitted, whatever follows upstream.
        #[test]
        fn nothing_follows_an_error(at in 1usize..12, extra in 0usize..6) {
            let mut evs = anthropic_tool_stream(&["{\"a\":", "1}"]);
            let at = at.min(evs.len() - 1);
            evs.insert(at, json!({"type": "error", "error": {"type": "api_error", "message": "boom"}}));
            evs.truncate(at + 1 + extra);
            let (out, complete) = run_stream(Translation::ChatToMessages, true, &anthropic_sse(&evs), &[]);
            prop_assert!(!complete);
            let all = events(&out);
            prop_assert!(all.last().unwrap().1.get("error").is_some());
            prop_assert_eq!(all.iter().filter(|e| e.1.get("error").is_some()).count(), 1);
        }
    }
}
