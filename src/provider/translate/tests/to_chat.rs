//! An Anthropic client, an OpenAI-compatible upstream.

use super::*;
use serde_json::{json, Value};

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

pub(super) fn openai_tool_chunks(args: &[&str]) -> Vec<Value> {
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
/// (text, tool inputs by block, stop reason, final usage, ended with message_stop).
pub(super) type AnthropicStream = (
    String,
    Vec<(String, String)>,
    Option<String>,
    Option<Value>,
    bool,
);

pub(super) fn read_anthropic_stream(bytes: &[u8]) -> AnthropicStream {
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
