//! An OpenAI chat client, a Gemini upstream; errors and paths.

use super::from_chat::read_chat_stream;
use super::*;
use serde_json::{json, Value};

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

/// Gemini's thought signature of a function call comes back with the call on the next
/// turn: carried in the tool call's id, whole and streamed, and put back on the call.
#[test]
fn thought_signatures_go_out_in_the_tool_call_id_and_come_back_with_the_call() {
    let call = json!({"functionCall": {"name": "weather", "args": {"city": "Oslo"}}, "thoughtSignature": "c2lnbmF0dXJl"});
    let answer = json!({"candidates": [{"content": {"role": "model", "parts": [call.clone()]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3}, "responseId": "r3", "modelVersion": "g"});
    let got: Value = serde_json::from_slice(
        &Translation::ChatToGemini
            .answer(answer.to_string().as_bytes(), 7)
            .unwrap(),
    )
    .unwrap();
    let id = got["choices"][0]["message"]["tool_calls"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id, "call_r3_0__thought__c2lnbmF0dXJl");
    let wire = format!("data: {answer}\r\n\r\n");
    let (out, complete) = run_stream(Translation::ChatToGemini, true, wire.as_bytes(), &[]);
    assert!(complete);
    assert_eq!(read_chat_stream(&out).calls[0].0, id);

    // The next turn: the call goes back with its signature; the tool's answer is matched
    // to it by the same id.
    let body = json!({"model": "gemini", "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": id, "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": id, "content": "{\"temp\":3}"}
    ]});
    let (sent, _) = request(Translation::ChatToGemini, body, Provider::Gemini).unwrap();
    assert_eq!(sent["contents"][1]["parts"][0], call);
    assert_eq!(
        sent["contents"][2]["parts"][0]["functionResponse"]["name"],
        "weather"
    );
}
