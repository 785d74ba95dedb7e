//! An OpenAI chat client, an Anthropic upstream.

use super::*;
use serde_json::{json, Value};

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

pub(super) fn anthropic_tool_stream(args: &[&str]) -> Vec<Value> {
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
pub(super) struct ChatStream {
    pub role_chunks: usize,
    pub text: String,
    pub calls: Vec<(String, String, String)>,
    pub finishes: Vec<String>,
    pub usage: Option<Value>,
    pub done_last: bool,
    pub errors: usize,
}

pub(super) fn read_chat_stream(bytes: &[u8]) -> ChatStream {
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
