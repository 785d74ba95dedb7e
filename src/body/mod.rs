//! Stage 3, `request_filter`: the request body. Finds `model`, `stream` and the other
//! members the gateway reads in one pass over the borrowed bytes ([`skim`]: the whole
//! document's grammar is checked, nothing is built, and only the values read go through
//! serde_json), and rewrites only the bytes of the model value when a route renames it.
//! The rest of the body is forwarded byte for byte; nothing here re-encodes the JSON.

mod skim;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::Number;
use std::ops::Range;

/// What the gateway needs from a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: String,
    /// Byte range of the model value, quotes included, in the original body.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// The completion budget of one choice, from the field the endpoint reads
    /// (`max_tokens`, the larger of `max_completion_tokens` and `max_tokens` on chat,
    /// `max_output_tokens` on responses), used to estimate tokens before the response.
    pub max_tokens: Option<u64>,
    /// How many completions the upstream generates and bills: the larger of `n` and
    /// `best_of` on the endpoints that take them, else 1.
    pub choices: u64,
    /// The client sent `stream_options` (then the gateway never adds its own).
    pub stream_options: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Offset of the object's opening brace.
    pub open: usize,
    /// Where the sampling parameters are, read only for a traced request.
    pub sampling: SamplingSpans,
}

/// Byte ranges of `temperature`, `top_p` and Gemini's `generationConfig` in the body
/// (their values are not read on the way).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SamplingSpans {
    pub temperature: Option<Range<usize>>,
    pub top_p: Option<Range<usize>>,
    pub generation: Option<Range<usize>>,
}

/// The members the gateway reads, as the body has them: the JSON text of the values kept
/// as text, the numbers and the stream flag read. A `null` is no value.
#[derive(Debug)]
struct Found<'a> {
    model: Option<&'a str>,
    stream: Option<bool>,
    max_tokens: Option<Number>,
    max_completion_tokens: Option<Number>,
    max_output_tokens: Option<Number>,
    n: Option<Number>,
    best_of: Option<Number>,
    stream_options: Option<&'a str>,
    temperature: Option<&'a str>,
    top_p: Option<&'a str>,
    generation: Option<&'a str>,
}

/// The members [`Found`] holds, by their names in the body.
const MEMBERS: [&str; 11] = [
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "stream_options",
    "temperature",
    "top_p",
    "generationConfig",
];

/// The members the gateway reads, found by [`skim`] in one pass; the same answers as
/// deserializing them from the whole body with serde_json (a member twice is an error,
/// a value of the wrong type too), which the tests hold it to.
fn found(text: &str) -> Result<Found<'_>, String> {
    let mut at: [Option<&str>; MEMBERS.len()] = Default::default();
    skim::members(text, |key, value| {
        let Some(i) = MEMBERS.iter().position(|m| *m == key) else {
            return Ok(());
        };
        match at[i].replace(&text[value]) {
            Some(_) => Err(format!("duplicate field `{key}`")),
            None => Ok(()),
        }
    })
    .map_err(|e| format!("Request body is not valid JSON: {e}"))?;
    let [model, stream, max_tokens, max_completion_tokens, max_output_tokens, n, best_of, stream_options, temperature, top_p, generation] =
        at.map(|v| v.filter(|v| *v != "null"));
    let stream = match stream {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(v) => Some(serde_json::from_str(v).map_err(|e| invalid("stream", &e))?),
    };
    Ok(Found {
        model,
        stream,
        max_tokens: read_number("max_tokens", max_tokens)?,
        max_completion_tokens: read_number("max_completion_tokens", max_completion_tokens)?,
        max_output_tokens: read_number("max_output_tokens", max_output_tokens)?,
        n: read_number("n", n)?,
        best_of: read_number("best_of", best_of)?,
        stream_options,
        temperature,
        top_p,
        generation,
    })
}

fn invalid(name: &str, e: &serde_json::Error) -> String {
    format!("Request body is not valid JSON: {name}: {e}")
}

/// A member's number; a plain count is read without serde_json.
fn read_number(name: &str, value: Option<&str>) -> Result<Option<Number>, String> {
    let Some(v) = value else { return Ok(None) };
    if v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = v.parse::<u64>() {
            return Ok(Some(Number::from(n)));
        }
    }
    serde_json::from_str(v)
        .map(Some)
        .map_err(|e| invalid(name, &e))
}

/// A model name: the string's text as it stands when it holds no escape.
fn model_name(raw: &str) -> Option<String> {
    match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(plain) if !plain.contains('\\') => Some(plain.to_string()),
        _ => serde_json::from_str(raw).ok(),
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The completion-budget fields an endpoint reads (a field the endpoint does not define
/// is forwarded but not trusted: the upstream may ignore it).
fn budget_fields(suffix: &str) -> &'static [&'static str] {
    match suffix {
        "/chat/completions" => &["max_completion_tokens", "max_tokens"],
        "/completions" | "/messages" => &["max_tokens"],
        "/responses" => &["max_output_tokens"],
        _ => &[],
    }
}

/// The fields that multiply the completions an endpoint generates.
fn choice_fields(suffix: &str) -> &'static [&'static str] {
    match suffix {
        "/chat/completions" => &["n"],
        "/completions" => &["n", "best_of"],
        _ => &[],
    }
}

/// The largest completion budget a request may ask for (the largest 32-bit signed
/// integer, which is what providers accept); more is a client error, not a number to
/// count against a limit.
pub const MAX_COMPLETION_TOKENS: u64 = i32::MAX as u64;

/// Reads `model`, `stream`, the completion budget and the number of choices from the JSON
/// object body of a request to `suffix` (the path after `/v1`). Errors are client-facing
/// messages.
pub fn scan(body: &[u8], suffix: &str) -> Result<RequestFacts, String> {
    scan_with(body, suffix, found)
}

fn scan_with(
    body: &[u8],
    suffix: &str,
    found: for<'a> fn(&'a str) -> Result<Found<'a>, String>,
) -> Result<RequestFacts, String> {
    let text =
        std::str::from_utf8(body).map_err(|_| "Request body is not valid UTF-8.".to_string())?;
    if !text.trim_start().starts_with('{') {
        return Err("Request body must be a JSON object.".into());
    }
    let head = found(text)?;
    let raw = head
        .model
        .ok_or_else(|| "You must provide a model parameter.".to_string())?;
    let model =
        model_name(raw).ok_or_else(|| "The model parameter must be a string.".to_string())?;
    let number = |name: &str, value: &Number| {
        value
            .as_u64()
            .filter(|n| *n <= MAX_COMPLETION_TOKENS)
            .ok_or_else(|| {
                format!("{name} must be a non-negative integer of at most {MAX_COMPLETION_TOKENS}.")
            })
    };
    let mut max_tokens: Option<u64> = None;
    for (name, value) in [
        ("max_completion_tokens", &head.max_completion_tokens),
        ("max_tokens", &head.max_tokens),
        ("max_output_tokens", &head.max_output_tokens),
    ] {
        let Some(value) = value else { continue };
        let n = number(name, value)?;
        if !budget_fields(suffix).contains(&name) {
            continue;
        }
        // Zero would reserve nothing while the upstream may read it as "no limit".
        if n == 0 {
            return Err(format!("{name} must be at least 1."));
        }
        max_tokens = Some(max_tokens.map_or(n, |m| m.max(n)));
    }
    let mut choices = 1;
    for (name, value) in [("n", &head.n), ("best_of", &head.best_of)] {
        let Some(value) = value else { continue };
        if !choice_fields(suffix).contains(&name) {
            continue;
        }
        let n = number(name, value)?;
        if n == 0 {
            return Err(format!("{name} must be at least 1."));
        }
        choices = choices.max(n);
    }
    // Each value borrows from `text`, so its position is its offset in the body.
    let span = |r: &str| {
        let start = r.as_ptr() as usize - text.as_ptr() as usize;
        start..start + r.len()
    };
    Ok(RequestFacts {
        model,
        model_span: span(raw),
        stream: head.stream.unwrap_or(false),
        max_tokens,
        choices,
        stream_options: head.stream_options.is_some(),
        include_usage: head.stream_options.is_some_and(|raw| {
            serde_json::from_str::<StreamOptions>(raw).is_ok_and(|o| o.include_usage == Some(true))
        }),
        open: text.len() - text.trim_start().len(),
        sampling: SamplingSpans {
            temperature: head.temperature.map(span),
            top_p: head.top_p.map(span),
            generation: head.generation.map(span),
        },
    })
}

impl RequestFacts {
    /// The most output tokens the answer can hold: the completion budget (or `default`
    /// when the request sets none) for each choice.
    pub fn output_ceiling(&self, default: u64) -> u64 {
        self.max_tokens
            .unwrap_or(default)
            .saturating_mul(self.choices)
    }
}

/// The member the gateway adds to a streaming request so that the upstream reports usage.
const STREAM_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// The body with the model value replaced by `model`; the same bytes (no copy) when the
/// name is unchanged.
pub fn rewrite_model(body: &Bytes, facts: &RequestFacts, model: &str) -> Bytes {
    prepare(body, facts, model, false)
}

/// The body for one upstream: the model value replaced by `model` and, with `add_usage`,
/// `"stream_options":{"include_usage":true}` added as the first member. Every other byte
/// is the client's. No copy when nothing changes.
pub fn prepare(body: &Bytes, facts: &RequestFacts, model: &str, add_usage: bool) -> Bytes {
    let add_usage = add_usage && !facts.stream_options;
    if model == facts.model && !add_usage {
        return body.clone();
    }
    let quoted = serde_json::to_string(model).unwrap_or_else(|_| format!("\"{model}\""));
    let mut out = BytesMut::with_capacity(body.len() + quoted.len() + STREAM_USAGE.len());
    let mut from = 0;
    if add_usage {
        out.extend_from_slice(&body[..=facts.open]);
        out.extend_from_slice(STREAM_USAGE);
        from = facts.open + 1;
    }
    out.extend_from_slice(&body[from..facts.model_span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[facts.model_span.end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/chat/completions";

    #[test]
    fn finds_model_and_stream_anywhere_in_the_object() {
        let body = br#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}"}],"stream":true,"model":"gpt-4o"}"#;
        let f = scan(body, CHAT).unwrap();
        assert_eq!(f.model, "gpt-4o");
        assert!(f.stream);
        assert_eq!(&body[f.model_span.clone()], br#""gpt-4o""#);
    }

    #[test]
    fn rewrite_touches_only_the_model_value() {
        let body = Bytes::from_static(br#"{ "model" : "alias", "n": 1, "stream": null }"#);
        let f = scan(&body, CHAT).unwrap();
        assert!(!f.stream);
        let out = rewrite_model(&body, &f, "llama-3-70b");
        assert_eq!(
            &out[..],
            br#"{ "model" : "llama-3-70b", "n": 1, "stream": null }"#
        );
        let same = rewrite_model(&body, &f, "alias");
        assert_eq!(same.as_ptr(), body.as_ptr());
    }

    #[test]
    fn stream_usage_is_added_as_the_first_member_unless_the_client_set_options() {
        let body = Bytes::from_static(br#" {"model":"a","stream":true}"#);
        let f = scan(&body, CHAT).unwrap();
        let out = prepare(&body, &f, "b", true);
        assert_eq!(
            &out[..],
            br#" {"stream_options":{"include_usage":true},"model":"b","stream":true}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let own = Bytes::from_static(
            br#"{"model":"a","stream":true,"stream_options":{"include_usage":false}}"#,
        );
        let f = scan(&own, CHAT).unwrap();
        assert!(f.stream_options);
        assert_eq!(prepare(&own, &f, "a", true).as_ptr(), own.as_ptr());
    }

    #[test]
    fn escaped_model_names_round_trip() {
        let body = Bytes::from_static(br#"{"model":"a\"b"}"#);
        let f = scan(&body, CHAT).unwrap();
        assert_eq!(f.model, "a\"b");
        let out = rewrite_model(&body, &f, "c\"d");
        assert_eq!(scan(&out, CHAT).unwrap().model, "c\"d");
    }

    #[test]
    fn n_and_best_of_multiply_the_output_a_request_may_bill() {
        let f = scan(br#"{"model":"m","max_tokens":20,"n":128}"#, CHAT).unwrap();
        assert_eq!((f.max_tokens, f.choices), (Some(20), 128));
        assert_eq!(f.output_ceiling(4096), 2560);
        let f = scan(br#"{"model":"m","n":3,"best_of":5}"#, "/completions").unwrap();
        assert_eq!(f.output_ceiling(10), 50);
        // Anthropic and the responses API have no `n`: it is not theirs to multiply.
        let f = scan(br#"{"model":"m","max_tokens":20,"n":128}"#, "/messages").unwrap();
        assert_eq!(f.output_ceiling(4096), 20);
        assert!(scan(br#"{"model":"m","n":0}"#, CHAT)
            .unwrap_err()
            .contains("n must be at least 1"));
        assert!(scan(br#"{"model":"m","n":-2}"#, CHAT).is_err());
    }

    #[test]
    fn only_the_endpoints_own_budget_fields_are_trusted_and_the_larger_wins() {
        // max_output_tokens is the responses API's field, not chat's.
        let f = scan(br#"{"model":"m","max_output_tokens":5}"#, CHAT).unwrap();
        assert_eq!(f.max_tokens, None);
        let f = scan(br#"{"model":"m","max_output_tokens":5}"#, "/responses").unwrap();
        assert_eq!(f.max_tokens, Some(5));
        let f = scan(
            br#"{"model":"m","max_completion_tokens":10,"max_tokens":900}"#,
            CHAT,
        )
        .unwrap();
        assert_eq!(f.max_tokens, Some(900));
        let f = scan(
            br#"{"model":"m","max_completion_tokens":900,"max_tokens":10}"#,
            CHAT,
        )
        .unwrap();
        assert_eq!(f.max_tokens, Some(900));
        // Zero would reserve nothing.
        for body in [
            &br#"{"model":"m","max_tokens":0}"#[..],
            br#"{"model":"m","max_completion_tokens":0}"#,
        ] {
            assert!(scan(body, CHAT).unwrap_err().contains("at least 1"));
        }
    }

    #[test]
    fn bad_bodies_are_client_errors() {
        assert!(scan(b"", CHAT).is_err());
        assert!(scan(b"[1]", CHAT).is_err());
        assert!(scan(b"{\"model\":", CHAT).is_err());
        assert!(scan(b"{\"messages\":[]}", CHAT)
            .unwrap_err()
            .contains("model parameter"));
        assert!(scan(b"{\"model\":5}", CHAT).is_err());
        assert!(scan(b"{\"model\":\"a\",\"model\":\"b\"}", CHAT).is_err());
        assert!(scan(b"{\"model\":\"a\",\"stream\":\"yes\"}", CHAT).is_err());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    const CHAT: &str = "/chat/completions";

    /// The members the gateway reads, as serde_json deserializes them from a whole body.
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        model: Option<&'a RawValue>,
        stream: Option<bool>,
        max_tokens: Option<Number>,
        max_completion_tokens: Option<Number>,
        max_output_tokens: Option<Number>,
        n: Option<Number>,
        best_of: Option<Number>,
        #[serde(borrow)]
        stream_options: Option<&'a RawValue>,
        #[serde(borrow)]
        temperature: Option<&'a RawValue>,
        #[serde(borrow)]
        top_p: Option<&'a RawValue>,
        #[serde(borrow, rename = "generationConfig")]
        generation: Option<&'a RawValue>,
    }

    /// The reference: [`Head`] deserialized from the whole body by serde_json.
    fn found_by_serde(text: &str) -> Result<Found<'_>, String> {
        let h: Head = serde_json::from_str(text)
            .map_err(|e| format!("Request body is not valid JSON: {e}"))?;
        Ok(Found {
            model: h.model.map(RawValue::get),
            stream: h.stream,
            max_tokens: h.max_tokens,
            max_completion_tokens: h.max_completion_tokens,
            max_output_tokens: h.max_output_tokens,
            n: h.n,
            best_of: h.best_of,
            stream_options: h.stream_options.map(RawValue::get),
            temperature: h.temperature.map(RawValue::get),
            top_p: h.top_p.map(RawValue::get),
            generation: h.generation.map(RawValue::get),
        })
    }

    /// A member's key: one the gateway reads (sometimes escaped), or another.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(MEMBERS.to_vec()).prop_map(|k| format!("\"{k}\"")),
            Just(r#""mod\u0065l""#.to_string()),
            Just(r#""str\u0065am""#.to_string()),
            "[a-z_]{1,8}".prop_map(|k| format!("\"{k}\"")),
        ]
    }

    /// A member's value, of a type the gateway expects or not.
    fn value() -> impl Strategy<Value = String> {
        let any_json = any::<(bool, i32, String)>().prop_map(|(b, n, s)| {
            serde_json::json!({"b": b, "n": n, "s": s, "list": [n, s, null]}).to_string()
        });
        prop_oneof![
            proptest::sample::select(vec![
                "null",
                "true",
                "false",
                "0",
                "1",
                "64",
                "-1",
                "1.5",
                "1e3",
                "2147483647",
                "2147483648",
                "18446744073709551616",
                r#""gpt-4o""#,
                r#""a\"b""#,
                r#""\u00e9""#,
                "{}",
                r#"{"include_usage":true}"#,
                r#"{"include_usage":false}"#,
                r#"{"include_usage":"yes"}"#,
                "[1,2]",
                r#"{"temperature":0.5}"#,
                " 7 ",
            ])
            .prop_map(str::to_string),
            any_json,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The walker and serde_json find the same facts in any body, and refuse the same
        /// bodies: members the gateway reads or not, of the right type or not, twice or
        /// not, and the text cut or changed anywhere.
        #[test]
        fn the_walker_reads_bodies_as_serde_json_does(
            members in proptest::collection::vec((key(), value()), 0..7),
            damage in proptest::option::of((any::<proptest::sample::Index>(), 0..3u8, proptest::sample::select(b"\"{}[],:\\ 0e-.".to_vec()))),
            suffix in proptest::sample::select(vec!["/chat/completions", "/completions", "/messages", "/responses"]),
        ) {
            let inner: Vec<String> = members.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let mut body = format!("{{{}}}", inner.join(",")).into_bytes();
            if let Some((at, how, byte)) = damage {
                let i = at.index(body.len() + 1);
                match how {
                    0 => body.truncate(i),
                    1 if i < body.len() => body[i] = byte,
                    _ => body.insert(i, byte),
                }
            }
            let walked = scan(&body, suffix);
            let parsed = scan_with(&body, suffix, found_by_serde);
            match (&walked, &parsed) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "{:?}: walked {:?}, serde_json {:?}", String::from_utf8_lossy(&body), walked, parsed),
            }
        }

        /// Any body: facts or a client-facing message, never a panic.
        #[test]
        fn any_bytes_scan_or_are_refused(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = scan(&body, CHAT);
        }

        /// For any object, the model is found, and the rewritten body is the same JSON
        /// with only the model (and the optional stream_options) changed.
        #[test]
        fn rewriting_changes_only_the_model(
            model in "\\PC{0,24}",
            new_model in "\\PC{0,24}",
            extra in proptest::collection::btree_map("[a-z_]{1,10}", any::<i32>(), 0..6),
            stream in any::<bool>(),
            add_usage in any::<bool>(),
        ) {
            let mut obj = serde_json::Map::new();
            for (k, v) in &extra {
                if !matches!(k.as_str(), "model" | "stream" | "stream_options" | "n" | "best_of") && !k.starts_with("max_") {
                    obj.insert(k.clone(), serde_json::json!(v));
                }
            }
            obj.insert("model".into(), serde_json::json!(model));
            obj.insert("stream".into(), serde_json::json!(stream));
            let body = Bytes::from(serde_json::Value::Object(obj.clone()).to_string());
            let facts = scan(&body, CHAT).unwrap();
            prop_assert_eq!(&facts.model, &model);
            prop_assert_eq!(facts.stream, stream);
            let out = prepare(&body, &facts, &new_model, add_usage);
            let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let mut want = obj;
            want.insert("model".into(), serde_json::json!(new_model));
            if add_usage {
                want.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
            }
            prop_assert_eq!(got, serde_json::Value::Object(want));
        }
    }
}
