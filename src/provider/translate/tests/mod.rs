//! Golden fixtures per direction (written from each provider's documented shapes) and
//! properties of the stream translators.

use super::*;

mod from_chat;
mod gemini;
mod props;
mod to_chat;
use crate::provider::sse;
use serde_json::Value;

pub(super) fn target(model: &str, provider: Provider) -> Target<'_> {
    Target {
        model,
        provider,
        default_max_tokens: 4096,
    }
}

pub(super) fn request(
    t: Translation,
    body: Value,
    provider: Provider,
) -> Result<(Value, Outbound), String> {
    let out = t.request(body.to_string().as_bytes(), &target("up-model", provider))?;
    Ok((serde_json::from_slice(&out.body).unwrap(), out))
}

/// The events of an SSE byte stream: (event name, data as JSON or the raw text).
pub(super) fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut r = sse::Reader::default();
    let mut out = Vec::new();
    r.feed(bytes, |e| {
        let data = serde_json::from_slice(&e.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.data).into_owned()));
        out.push((String::from_utf8_lossy(&e.name).into_owned(), data));
    });
    out
}

/// Feeds `wire` to a fresh stream cut at `cuts`; the client bytes and the completion.
pub(super) fn run_stream(
    t: Translation,
    include_usage: bool,
    wire: &[u8],
    cuts: &[usize],
) -> (Vec<u8>, bool) {
    let mut s = t.stream(1_700_000_000, include_usage);
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for c in cuts.into_iter().chain([wire.len()]) {
        s.feed(&wire[from..c], &mut out, |_| {});
        from = c;
    }
    let complete = s.finish(&mut out, |_| {});
    (out, complete)
}

pub(super) fn anthropic_sse(events: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        let name = e["type"].as_str().unwrap();
        out.extend_from_slice(format!("event: {name}\ndata: {e}\n\n").as_bytes());
    }
    out
}

pub(super) fn openai_sse(chunks: &[Value], done: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(format!("data: {c}\n\n").as_bytes());
    }
    if done {
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
    out
}
