//! A finished request as OpenTelemetry spans (`tracing.*`), named and attributed by the
//! GenAI semantic conventions: one SERVER span for the client's request, named
//! `{operation} {model}`, and one CLIENT span per upstream attempt as its child; what the
//! answer reports (its id, model, finish reasons, token usage) is on the attempt that
//! delivered it. Written once, when the request has ended, from the record the access
//! log is written from; the span of the attempt that answered, like the request's, ends
//! after the last byte.

use super::answer::Answer;
use super::Record;
use crate::config::Config;
use crate::record::{AttemptOutcome, AttemptRecord};
use crate::trace::wire::{self, Attrs, Enc, Event, Head, Kind, Val};
use crate::trace::TraceCtx;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Instant;

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
    let p = path.strip_prefix("/v1").unwrap_or(path);
    let p = p.strip_prefix("beta/").unwrap_or(p);
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
    let end = wall(Instant::now());
    let op = operation(&r.path);
    // Its text is collected only to be captured.
    let text_limit = if capture { limit } else { 0 };
    let answer = t
        .answer
        .as_deref()
        .map(|b| Answer::read(b, r.stream, text_limit));
    let failed = r.error.map(|e| e.as_str());
    let provider = super::upstream_provider(r, config);
    let model = r.model.as_deref();
    let name = [
        op,
        if model.is_some() { " " } else { "" },
        model.unwrap_or(""),
    ];
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
            ("tollgate.key_id", r.key_id.as_deref()),
            ("tollgate.team", r.team.as_deref()),
            ("tollgate.upstream", r.upstream.as_deref()),
            ("tollgate.target", r.target.as_deref()),
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
    for (i, at) in r.attempts.iter().enumerate() {
        let Some(s) = &at.span else { continue };
        // The attempt that answered lasts as long as its answer.
        let delivered = Some(i) == last && r.target.is_some();
        let error = attempt_error(at);
        let head = Head {
            trace_id: t.ctx.trace_id,
            span_id: s.id,
            parent: Some(t.ctx.span_id),
            parent_is_remote: false,
            state: t.ctx.state.as_deref(),
            name: &[op, " ", &s.model],
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
