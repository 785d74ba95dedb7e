//! A finished request as OpenTelemetry spans (`tracing.*`), named and attributed by the
//! GenAI semantic conventions: one SERVER span for the client's request, named
//! `{operation} {model}`, and one CLIENT span per upstream attempt as its child; what the
//! answer reports (its id, model, finish reasons, token usage) is on the attempt that
//! delivered it. Written once, when the request has ended, from the record the access
//! log is written from; the span of the attempt that answered, like the request's, ends
//! after the last byte.

use super::Record;
use crate::attempt::{AttemptOutcome, AttemptRecord};
use crate::config::Config;
use crate::trace::wire::{self, Attrs, Enc, Event, Head, Kind, Val};
use crate::trace::TraceCtx;
use bytes::Bytes;
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

/// The request parameters the conventions name (from the top of the body, or from
/// Gemini's `generationConfig`).
#[derive(Debug, Default)]
pub struct Params {
    /// The completion budget the endpoint reads.
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
}

/// Gemini's native `generationConfig`.
#[derive(Debug, Default, Deserialize)]
struct Generation {
    #[serde(default, rename = "maxOutputTokens")]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default, rename = "topP")]
    pub top_p: Option<f64>,
}

impl Params {
    /// The parameters of a body whose facts were read (only their values are parsed
    /// here; a value of the wrong type is left out).
    pub fn read(body: &[u8], facts: &crate::body::RequestFacts) -> Params {
        let s = &facts.sampling;
        let at = |r: &Option<std::ops::Range<usize>>| r.clone().and_then(|r| body.get(r));
        let number = |r| at(r).and_then(|v| serde_json::from_slice::<f64>(v).ok());
        let g: Generation = at(&s.generation)
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default();
        Params {
            max_tokens: facts.max_tokens.or(g.max_tokens),
            temperature: number(&s.temperature).or(g.temperature),
            top_p: number(&s.top_p).or(g.top_p),
        }
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

/// Writes the spans of a finished, sampled request into `enc` (the SERVER span first)
/// and returns how many.
pub fn write(r: &Record, config: &Config, enc: &mut Enc) -> usize {
    let Some(t) = r.trace.as_deref() else {
        return 0;
    };
    let settings = config.tracing.as_ref();
    let limit = settings.map_or(0, |s| s.content_limit);
    let capture = limit > 0 && settings.is_some_and(|s| s.capture_content);
    let wall = |i: Instant| r.wall + i.saturating_duration_since(r.start);
    let end = SystemTime::now().max(r.wall);
    let op = operation(&r.path);
    // Its text is collected only to be captured.
    let text_limit = if capture { limit } else { 0 };
    let answer = t
        .answer
        .as_deref()
        .map(|b| Answer::read(b, r.stream, text_limit));
    let failed = r.error.map(|e| e.as_str());
    let provider = super::upstream_provider(r, config);
    let mut name = String::with_capacity(op.len() + 1 + r.model.as_deref().map_or(0, str::len));
    name.push_str(op);
    if let Some(m) = &r.model {
        name.push(' ');
        name.push_str(m);
    }
    let head = Head {
        trace_id: t.ctx.trace_id,
        span_id: t.ctx.span_id,
        parent: t.ctx.parent,
        parent_is_remote: t.ctx.parent.is_some(),
        state: t.ctx.state.as_deref(),
        name: &name,
        kind: Kind::Server,
        start: r.wall,
        end,
        error: failed.is_some() || r.status >= 500,
    };
    wire::span(enc, &head, |a, events| {
        a.str("gen_ai.operation.name", op);
        a.str("http.request.method", &r.method);
        a.str("url.path", &r.path);
        a.str("tollgate.request_id", &r.request_id);
        if r.status != 0 {
            a.int("http.response.status_code", u64::from(r.status));
        }
        if let Some(m) = &r.model {
            a.str("gen_ai.request.model", m);
        }
        if let Some(p) = provider {
            a.str("gen_ai.provider.name", p);
        }
        request_params(a, &t.params);
        // The answer's model, id, reasons and usage are the attempt's that delivered it:
        // on one span only, so that a backend summing token usage over spans counts
        // them once. A cache hit (no attempt) carries them here.
        if r.attempts.iter().all(|a| a.span.is_none()) {
            response_attributes(a, r, answer.as_ref());
        }
        if let Some(alias) = &t.alias {
            a.str("tollgate.alias", alias);
        }
        if let Some(s) = r.attempts.last().and_then(|a| a.span.as_ref()) {
            a.int("tollgate.tier", s.tier as u64);
        }
        for (key, value) in [
            ("tollgate.key_id", &r.key_id),
            ("tollgate.team", &r.team),
            ("tollgate.upstream", &r.upstream),
            ("tollgate.target", &r.target),
        ] {
            if let Some(v) = value {
                a.str(key, v);
            }
        }
        if let Some(c) = r.cost_micro {
            a.add("tollgate.cost_micro_usd", Val::Int(c));
        }
        if let Some(c) = r.cache {
            a.str("tollgate.cache", c.as_str());
        }
        if let Some(tr) = r.translation {
            a.str("tollgate.translation", tr);
        }
        a.int("tollgate.attempts", r.attempts.len() as u64);
        if let Some(first) = r.first_byte {
            let ttft = first.saturating_duration_since(r.start).as_secs_f64();
            a.add("tollgate.time_to_first_token", Val::F64(ttft));
            events.push(Event {
                name: "gen_ai.first_token",
                at: wall(first),
                attr: None,
            });
        }
        if let Some(e) = failed {
            a.str("error.type", e);
        }
        if capture {
            if let Some(p) = &t.prompt {
                events.push(Event {
                    name: "gen_ai.content.prompt",
                    at: r.wall,
                    attr: Some(("gen_ai.prompt", p.clone())),
                });
            }
            if let Some(text) = answer.as_ref().map(|a| &a.text).filter(|t| !t.is_empty()) {
                events.push(Event {
                    name: "gen_ai.content.completion",
                    at: end,
                    attr: Some(("gen_ai.completion", mask_keys(text))),
                });
            }
        }
    });
    let mut n = 1;
    let last = r.attempts.len().checked_sub(1);
    let mut attempt_name = String::new();
    for (i, at) in r.attempts.iter().enumerate() {
        let Some(s) = &at.span else { continue };
        // The attempt that answered lasts as long as its answer.
        let delivered = Some(i) == last && r.target.is_some();
        let error = attempt_error(at);
        attempt_name.clear();
        attempt_name.push_str(op);
        attempt_name.push(' ');
        attempt_name.push_str(&s.model);
        let head = Head {
            trace_id: t.ctx.trace_id,
            span_id: s.id,
            parent: Some(t.ctx.span_id),
            parent_is_remote: false,
            state: t.ctx.state.as_deref(),
            name: &attempt_name,
            kind: Kind::Client,
            start: wall(s.started),
            end: if delivered { end } else { wall(s.ended) },
            error: error.is_some() || delivered && failed.is_some(),
        };
        wire::span(enc, &head, |a, _| {
            a.str("gen_ai.operation.name", op);
            a.str("gen_ai.provider.name", provider_name(s.provider));
            a.str("gen_ai.request.model", &s.model);
            a.str("server.address", &s.address);
            a.int("server.port", u64::from(s.port));
            a.str("tollgate.upstream", &at.upstream);
            a.str("tollgate.target", &at.target);
            a.int("tollgate.tier", s.tier as u64);
            if let Some(code) = at.status {
                a.int("http.response.status_code", u64::from(code));
            }
            if let Some(e) = error {
                a.str("error.type", e);
            }
            if delivered {
                request_params(a, &t.params);
                response_attributes(a, r, answer.as_ref());
            }
        });
        n += 1;
    }
    n
}

/// Why an attempt failed, as its failover class; `None` for the one delivered.
fn attempt_error(a: &AttemptRecord) -> Option<&'static str> {
    match a.outcome {
        AttemptOutcome::Answered(crate::provider::inspect::Class::Deliver) => None,
        other => Some(other.as_str()),
    }
}

fn request_params(a: &mut Attrs, p: &Params) {
    if let Some(n) = p.max_tokens {
        a.int("gen_ai.request.max_tokens", n);
    }
    if let Some(v) = p.temperature {
        a.add("gen_ai.request.temperature", Val::F64(v));
    }
    if let Some(v) = p.top_p {
        a.add("gen_ai.request.top_p", Val::F64(v));
    }
}

fn response_attributes(a: &mut Attrs, r: &Record, answer: Option<&Answer>) {
    if let Some(u) = &r.usage {
        // Input tokens include the cached ones, as the conventions count them.
        a.int("gen_ai.usage.input_tokens", u.input);
        a.int("gen_ai.usage.output_tokens", u.output);
        a.int("gen_ai.usage.cache_read.input_tokens", u.cached);
        a.int("gen_ai.usage.cache_creation.input_tokens", u.cache_write);
    }
    let Some(answer) = answer else { return };
    if let Some(id) = &answer.id {
        a.str("gen_ai.response.id", id);
    }
    if let Some(m) = &answer.model {
        a.str("gen_ai.response.model", m);
    }
    if !answer.finish.is_empty() {
        a.add("gen_ai.response.finish_reasons", Val::Strs(&answer.finish));
    }
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
                    if let Ok(d) = serde_json::from_slice::<Doc>(data.trim_ascii()) {
                        a.take(d, limit);
                    }
                }
            }
        } else if let Ok(d) = serde_json::from_slice::<Doc>(body) {
            a.take(d, limit);
        }
        a
    }

    /// One JSON answer or stream event: OpenAI, Anthropic or Gemini shaped.
    fn take(&mut self, d: Doc, limit: usize) {
        // Anthropic's stream wraps the message in `message_start`.
        let d = match d.message {
            Some(m) if d.kind.as_ref().and_then(|t| t.0.as_deref()) == Some("message_start") => *m,
            _ => d,
        };
        let own = |t: Option<Text>| t.and_then(|t| t.0).map(Cow::into_owned);
        if self.id.is_none() {
            self.id = own(d.id).or_else(|| own(d.response_id));
        }
        if self.model.is_none() {
            self.model = own(d.model).or_else(|| own(d.model_version));
        }
        let delta = d.delta.unwrap_or_default();
        let mut reasons = vec![d.stop_reason, delta.stop_reason];
        let mut pieces: Vec<Text> = Vec::new();
        for c in d.choices {
            reasons.push(c.finish_reason);
            pieces.extend(c.message.and_then(|m| m.content));
            pieces.extend(c.delta.and_then(|m| m.content));
            pieces.extend(c.text);
        }
        for c in d.candidates {
            reasons.push(c.finish_reason);
            pieces.extend(
                c.content
                    .into_iter()
                    .flat_map(|c| c.parts)
                    .filter_map(|p| p.text),
            );
        }
        pieces.extend(d.content.into_iter().filter_map(|b| b.text));
        pieces.extend(delta.text);
        self.finish.extend(reasons.into_iter().filter_map(own));
        for p in pieces.into_iter().filter_map(|p| p.0) {
            push_capped(&mut self.text, &p, limit);
        }
    }
}

/// The members of an answer or stream event that a span shows, borrowed from it where
/// they hold no escape; the rest is skipped unread.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Doc<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    id: Option<Text<'a>>,
    #[serde(borrow, rename = "responseId")]
    response_id: Option<Text<'a>>,
    #[serde(borrow)]
    model: Option<Text<'a>>,
    #[serde(borrow, rename = "modelVersion")]
    model_version: Option<Text<'a>>,
    #[serde(borrow)]
    stop_reason: Option<Text<'a>>,
    #[serde(borrow)]
    message: Option<Box<Doc<'a>>>,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(borrow)]
    candidates: Vec<Candidate<'a>>,
    #[serde(borrow)]
    content: Vec<Part<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Delta<'a> {
    #[serde(borrow)]
    stop_reason: Option<Text<'a>>,
    #[serde(borrow)]
    text: Option<Text<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Choice<'a> {
    #[serde(borrow)]
    finish_reason: Option<Text<'a>>,
    #[serde(borrow)]
    message: Option<ChoiceText<'a>>,
    #[serde(borrow)]
    delta: Option<ChoiceText<'a>>,
    #[serde(borrow)]
    text: Option<Text<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct ChoiceText<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Candidate<'a> {
    #[serde(borrow, rename = "finishReason")]
    finish_reason: Option<Text<'a>>,
    #[serde(borrow)]
    content: Option<Parts<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Parts<'a> {
    #[serde(borrow)]
    parts: Vec<Part<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Part<'a> {
    #[serde(borrow)]
    text: Option<Text<'a>>,
}

/// A string member, or `None` for a member of any other type (`null`, an array of
/// content parts, ...), which is skipped rather than failing the whole event.
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(v))))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V)
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
        // Members of another type than expected (a tool call's null content, content
        // parts, a number) are skipped, not the whole answer.
        let tools = br#"{"id":"c2","model":"m","choices":[{"message":{"content":null,"tool_calls":[{"id":"t"}]},"finish_reason":"tool_calls"},{"message":{"content":[{"type":"text","text":"x"}]},"finish_reason":7}]}"#;
        let a = Answer::read(tools, false, 100);
        assert_eq!(a.id.as_deref(), Some("c2"));
        assert_eq!(a.finish, ["tool_calls"]);
        assert_eq!(a.text, "");
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
    fn sampling_parameters_are_read_where_the_body_scan_found_them() {
        let body = br#"{"model":"m","temperature":"hot","top_p":0.5,"max_tokens":9,"messages":[{"role":"user","content":"{\"temperature\":1}"}]}"#;
        let facts = crate::body::scan(body, "/chat/completions").unwrap();
        let p = Params::read(body, &facts);
        assert_eq!(
            (p.max_tokens, p.temperature, p.top_p),
            (Some(9), None, Some(0.5))
        );
        let gemini = br#"{"contents":[],"model":"g","generationConfig":{"temperature":0.2,"maxOutputTokens":7}}"#;
        let facts = crate::body::scan(gemini, "/models/g:generateContent").unwrap();
        let p = Params::read(gemini, &facts);
        assert_eq!((p.max_tokens, p.temperature), (Some(7), Some(0.2)));
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
