//! A finished request as OpenTelemetry spans (`tracing.*`), named and attributed by the
//! GenAI semantic conventions: one SERVER span for the client's request, named
//! `{operation} {model}`, and one CLIENT span per upstream attempt as its child. Built
//! once, when the request has ended, from the record the access log is written from; the
//! span of the attempt that answered, like the request's, ends after the last byte.

use super::Record;
use crate::attempt::{AttemptOutcome, AttemptRecord};
use crate::config::Config;
use crate::trace::{KeyValue, SpanData, TraceCtx};
use bytes::Bytes;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, StringValue, Value};
use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
use serde::Deserialize;
use std::borrow::Cow;
use std::time::{Instant, SystemTime};

/// What a traced request carries besides its record.
#[derive(Debug)]
pub struct Traced {
    pub ctx: TraceCtx,
    pub params: Params,
    /// The client's body, capped (`tracing.capture_content`).
    pub prompt: Option<String>,
    /// The answer as the client received it (sampled requests only).
    pub answer: Option<Bytes>,
    /// The alias the request resolved to.
    pub alias: Option<String>,
}

impl Traced {
    pub fn new(ctx: TraceCtx) -> Traced {
        Traced {
            ctx,
            params: Params::default(),
            prompt: None,
            answer: None,
            alias: None,
        }
    }
}

/// The request parameters the conventions name, read from the client's body.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Gemini's native body.
    #[serde(default, rename = "generationConfig")]
    pub generation: Option<Generation>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Generation {
    #[serde(default, rename = "maxOutputTokens")]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default, rename = "topP")]
    pub top_p: Option<f64>,
}

impl Params {
    /// The parameters of a JSON body (none, if it does not parse).
    pub fn read(body: &[u8]) -> Params {
        serde_json::from_slice(body).unwrap_or_default()
    }

    fn max_tokens(&self) -> Option<u64> {
        let g = self.generation.as_ref();
        self.max_tokens
            .or(self.max_completion_tokens)
            .or(g.and_then(|g| g.max_tokens))
    }
}

/// The conventions' operation name for a client path.
pub fn operation(path: &str) -> &'static str {
    let p = path.trim_start_matches("/v1").trim_start_matches("beta/");
    if p.starts_with("/chat/completions") || p == "/messages" || p.starts_with("/responses") {
        "chat"
    } else if p.starts_with("/completions") {
        "text_completion"
    } else if p.starts_with("/embeddings") {
        "embeddings"
    } else if p.contains(":generateContent") || p.contains(":streamGenerateContent") {
        "generate_content"
    } else {
        "other"
    }
}

/// The conventions' provider name.
pub fn provider_name(p: crate::provider::Provider) -> &'static str {
    use crate::provider::Provider::*;
    match p {
        Openai => "openai",
        Anthropic => "anthropic",
        Azure => "azure.ai.openai",
        Gemini => "gcp.gemini",
        Generic => "openai_compatible",
    }
}

fn kv(key: &'static str, value: impl Into<Value>) -> KeyValue {
    KeyValue::new(key, value)
}

fn int(n: u64) -> Value {
    Value::I64(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The spans of a finished, sampled request: the SERVER span first.
pub fn build(r: &Record, config: &Config) -> Vec<SpanData> {
    let Some(t) = r.trace.as_deref() else {
        return Vec::new();
    };
    let settings = config.tracing.as_ref();
    let limit = settings.map_or(0, |s| s.content_limit);
    let wall = |i: Instant| r.wall + i.saturating_duration_since(r.start);
    let end = SystemTime::now().max(r.wall);
    let op = operation(&r.path);
    let answer = t
        .answer
        .as_deref()
        .map(|b| Answer::read(b, r.stream, limit));
    let scope = InstrumentationScope::builder("tollgate")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();

    let mut attrs = vec![
        kv("gen_ai.operation.name", op),
        kv("http.request.method", r.method.clone()),
        kv("url.path", r.path.clone()),
        kv("tollgate.request_id", r.request_id.clone()),
    ];
    if r.status != 0 {
        attrs.push(kv("http.response.status_code", i64::from(r.status)));
    }
    if let Some(m) = &r.model {
        attrs.push(kv("gen_ai.request.model", m.clone()));
    }
    if let Some(p) = r.upstream.as_deref().and_then(|u| config.upstreams.get(u)) {
        attrs.push(kv("gen_ai.provider.name", provider_name(p.provider)));
    }
    request_params(&mut attrs, &t.params);
    response_attributes(&mut attrs, r, answer.as_ref());
    if let Some(a) = &t.alias {
        attrs.push(kv("tollgate.alias", a.clone()));
    }
    if let Some(tier) = r
        .attempts
        .last()
        .and_then(|a| a.span.as_ref())
        .map(|s| s.tier)
    {
        attrs.push(kv("tollgate.tier", tier as i64));
    }
    for (key, value) in [
        ("tollgate.key_id", r.key_id.as_ref()),
        ("tollgate.team", r.team.as_ref()),
        ("tollgate.upstream", r.upstream.as_ref()),
        ("tollgate.target", r.target.as_ref()),
    ] {
        if let Some(v) = value {
            attrs.push(kv(key, v.clone()));
        }
    }
    if let Some(c) = r.cost_micro {
        attrs.push(kv("tollgate.cost_micro_usd", c));
    }
    if let Some(c) = r.cache {
        attrs.push(kv("tollgate.cache", c.as_str()));
    }
    if let Some(tr) = r.translation {
        attrs.push(kv("tollgate.translation", tr));
    }
    attrs.push(kv("tollgate.attempts", r.attempts.len() as i64));
    let mut events = SpanEvents::default();
    if let Some(first) = r.first_byte {
        let ttft = first.saturating_duration_since(r.start).as_secs_f64();
        attrs.push(kv("tollgate.time_to_first_token", ttft));
        events.events.push(opentelemetry::trace::Event::new(
            "gen_ai.first_token",
            wall(first),
            Vec::new(),
            0,
        ));
    }
    let failed = r.error.map(|e| e.as_str());
    if let Some(e) = failed {
        attrs.push(kv("error.type", e));
    }
    if limit > 0 && settings.is_some_and(|s| s.capture_content) {
        if let Some(p) = &t.prompt {
            events.events.push(content_event(
                "gen_ai.content.prompt",
                "gen_ai.prompt",
                p,
                r.wall,
            ));
        }
        if let Some(text) = answer.as_ref().map(|a| &a.text).filter(|t| !t.is_empty()) {
            let text = mask_keys(text);
            events.events.push(content_event(
                "gen_ai.content.completion",
                "gen_ai.completion",
                &text,
                end,
            ));
        }
    }
    let name = match &r.model {
        Some(m) => format!("{op} {m}"),
        None => op.to_string(),
    };
    let server = SpanData {
        span_context: t.ctx.context(t.ctx.span_id),
        parent_span_id: t.ctx.parent.unwrap_or(crate::trace::SpanId::INVALID),
        parent_span_is_remote: t.ctx.parent.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Owned(name),
        start_time: r.wall,
        end_time: end,
        attributes: attrs,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status: status(failed.is_some() || r.status >= 500),
        instrumentation_scope: scope.clone(),
    };
    let mut spans = vec![server];
    let last = r.attempts.len().checked_sub(1);
    for (i, a) in r.attempts.iter().enumerate() {
        let Some(s) = &a.span else { continue };
        // The attempt that answered lasts as long as its answer.
        let delivered = Some(i) == last && r.target.is_some();
        let mut attrs = vec![
            kv("gen_ai.operation.name", op),
            kv("gen_ai.provider.name", provider_name(s.provider)),
            kv("gen_ai.request.model", s.model.clone()),
            kv("server.address", s.address.clone()),
            kv("server.port", i64::from(s.port)),
            kv("tollgate.upstream", a.upstream.clone()),
            kv("tollgate.target", a.target.clone()),
            kv("tollgate.tier", s.tier as i64),
        ];
        if let Some(code) = a.status {
            attrs.push(kv("http.response.status_code", i64::from(code)));
        }
        let error = attempt_error(a);
        if let Some(e) = error {
            attrs.push(kv("error.type", e));
        }
        if delivered {
            request_params(&mut attrs, &t.params);
            response_attributes(&mut attrs, r, answer.as_ref());
        }
        spans.push(SpanData {
            span_context: t.ctx.context(s.id),
            parent_span_id: t.ctx.span_id,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: Cow::Owned(format!("{op} {}", s.model)),
            start_time: wall(s.started),
            end_time: if delivered { end } else { wall(s.ended) },
            attributes: attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: status(error.is_some() || delivered && failed.is_some()),
            instrumentation_scope: scope.clone(),
        });
    }
    spans
}

/// Why an attempt failed, as its failover class; `None` for the one delivered.
fn attempt_error(a: &AttemptRecord) -> Option<&'static str> {
    match a.outcome {
        AttemptOutcome::Answered(crate::provider::inspect::Class::Deliver) => None,
        other => Some(other.as_str()),
    }
}

fn status(error: bool) -> Status {
    if error {
        Status::error("")
    } else {
        Status::Unset
    }
}

fn request_params(attrs: &mut Vec<KeyValue>, p: &Params) {
    let g = p.generation.as_ref();
    if let Some(n) = p.max_tokens() {
        attrs.push(kv("gen_ai.request.max_tokens", int(n)));
    }
    if let Some(v) = p.temperature.or(g.and_then(|g| g.temperature)) {
        attrs.push(kv("gen_ai.request.temperature", v));
    }
    if let Some(v) = p.top_p.or(g.and_then(|g| g.top_p)) {
        attrs.push(kv("gen_ai.request.top_p", v));
    }
}

fn response_attributes(attrs: &mut Vec<KeyValue>, r: &Record, answer: Option<&Answer>) {
    if let Some(u) = &r.usage {
        // Input tokens include the cached ones, as the conventions count them.
        attrs.push(kv("gen_ai.usage.input_tokens", int(u.input)));
        attrs.push(kv("gen_ai.usage.output_tokens", int(u.output)));
        attrs.push(kv("gen_ai.usage.cache_read.input_tokens", int(u.cached)));
        attrs.push(kv(
            "gen_ai.usage.cache_creation.input_tokens",
            int(u.cache_write),
        ));
    }
    let Some(a) = answer else { return };
    if let Some(id) = &a.id {
        attrs.push(kv("gen_ai.response.id", id.clone()));
    }
    if let Some(m) = &a.model {
        attrs.push(kv("gen_ai.response.model", m.clone()));
    }
    if !a.finish.is_empty() {
        let reasons: Vec<StringValue> = a.finish.iter().cloned().map(StringValue::from).collect();
        attrs.push(kv(
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(reasons)),
        ));
    }
}

fn content_event(
    name: &'static str,
    key: &'static str,
    text: &str,
    at: SystemTime,
) -> opentelemetry::trace::Event {
    opentelemetry::trace::Event::new(name, at, vec![kv(key, text.to_string())], 0)
}

/// What the answer says about itself, in whichever format the client received it.
#[derive(Debug, Default)]
struct Answer {
    id: Option<String>,
    model: Option<String>,
    finish: Vec<String>,
    /// The answer's text, capped (for `capture_content`).
    text: String,
}

impl Answer {
    fn read(body: &[u8], sse: bool, limit: usize) -> Answer {
        let mut a = Answer::default();
        if sse {
            for line in body.split(|b| *b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data:") {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii()) {
                        a.take(&v, limit);
                    }
                }
            }
        } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            a.take(&v, limit);
        }
        a
    }

    /// One JSON answer or stream event: OpenAI, Anthropic or Gemini shaped.
    fn take(&mut self, v: &serde_json::Value, limit: usize) {
        // Anthropic's stream wraps the message in `message_start`.
        let v = if v["type"] == "message_start" {
            &v["message"]
        } else {
            v
        };
        let text = |s: &serde_json::Value| s.as_str().map(str::to_string);
        if self.id.is_none() {
            self.id = text(&v["id"]).or_else(|| text(&v["responseId"]));
        }
        if self.model.is_none() {
            self.model = text(&v["model"]).or_else(|| text(&v["modelVersion"]));
        }
        let mut add_reason = |r: Option<&str>| {
            if let Some(r) = r {
                self.finish.push(r.to_string());
            }
        };
        add_reason(v["stop_reason"].as_str());
        add_reason(v["delta"]["stop_reason"].as_str());
        let mut pieces: Vec<&str> = Vec::new();
        for c in v["choices"].as_array().into_iter().flatten() {
            add_reason(c["finish_reason"].as_str());
            pieces.extend(c["message"]["content"].as_str());
            pieces.extend(c["delta"]["content"].as_str());
            pieces.extend(c["text"].as_str());
        }
        for c in v["candidates"].as_array().into_iter().flatten() {
            add_reason(c["finishReason"].as_str());
            for p in c["content"]["parts"].as_array().into_iter().flatten() {
                pieces.extend(p["text"].as_str());
            }
        }
        for c in v["content"].as_array().into_iter().flatten() {
            pieces.extend(c["text"].as_str());
        }
        pieces.extend(v["delta"]["text"].as_str());
        for p in pieces {
            push_capped(&mut self.text, p, limit);
        }
    }
}

/// Appends `piece` to `out`, up to `limit` bytes in all (on a character boundary).
pub fn push_capped(out: &mut String, piece: &str, limit: usize) {
    let room = limit.saturating_sub(out.len());
    if piece.len() <= room {
        out.push_str(piece);
        return;
    }
    let mut cut = room;
    while !piece.is_char_boundary(cut) {
        cut -= 1;
    }
    out.push_str(&piece[..cut]);
}

/// `text` with every word shaped like an API key (`sk-…`, `tg-…`, `AIza…`, 20 characters
/// or more) masked as `secret::mask` shows keys: captured prompts must not carry one out.
pub fn mask_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest
            .find(|c: char| c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..len];
        let key_like = ["sk-", "tg-", "AIza"].iter().any(|p| word.starts_with(p)) && len >= 20;
        if key_like {
            out.push_str(&crate::secret::mask(word));
        } else {
            out.push_str(word);
        }
        rest = &rest[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_of_each_format_give_their_id_model_reasons_and_text() {
        let openai = br#"data: {"id":"c1","model":"gpt-4o-2024","choices":[{"delta":{"content":"Hel"}}]}

data: {"id":"c1","model":"gpt-4o-2024","choices":[{"delta":{"content":"lo"},"finish_reason":"stop"}]}

data: [DONE]
"#;
        let a = Answer::read(openai, true, 3);
        assert_eq!(a.id.as_deref(), Some("c1"));
        assert_eq!(a.model.as_deref(), Some("gpt-4o-2024"));
        assert_eq!(a.finish, ["stop"]);
        assert_eq!(a.text, "Hel", "capped at the limit");
        let anthropic = br#"event: message_start
data: {"type":"message_start","message":{"id":"msg_1","model":"claude-x","content":[]}}

data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}

data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}
"#;
        let a = Answer::read(anthropic, true, 100);
        assert_eq!(
            (a.id.as_deref(), a.model.as_deref()),
            (Some("msg_1"), Some("claude-x"))
        );
        assert_eq!(
            (a.finish.as_slice(), a.text.as_str()),
            (&["end_turn".to_string()][..], "Hi")
        );
        let gemini = br#"{"responseId":"r1","modelVersion":"gemini-2","candidates":[{"finishReason":"STOP","content":{"parts":[{"text":"ok"}]}}]}"#;
        let a = Answer::read(gemini, false, 100);
        assert_eq!(
            (a.id.as_deref(), a.model.as_deref()),
            (Some("r1"), Some("gemini-2"))
        );
        assert_eq!(
            (a.finish.as_slice(), a.text.as_str()),
            (&["STOP".to_string()][..], "ok")
        );
    }

    #[test]
    fn key_shaped_words_are_masked_and_the_rest_kept() {
        let t = "use sk-live-0123456789abcdefXYZ, not tg-short; café AIzaSyA0123456789012345678";
        assert_eq!(
            mask_keys(t),
            "use sk-li****fXYZ, not tg-short; café AIzaS****5678"
        );
        let mut s = String::new();
        push_capped(&mut s, "héllo", 2);
        assert_eq!(s, "h", "a cut never splits a character");
    }

    #[test]
    fn paths_name_their_operation() {
        assert_eq!(operation("/v1/chat/completions"), "chat");
        assert_eq!(operation("/v1/messages"), "chat");
        assert_eq!(operation("/v1/completions"), "text_completion");
        assert_eq!(operation("/v1/embeddings"), "embeddings");
        assert_eq!(
            operation("/v1beta/models/g:streamGenerateContent"),
            "generate_content"
        );
        assert_eq!(operation("/v1/models"), "other");
    }
}
