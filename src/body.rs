//! Stage 3, `request_filter`: the request body. Finds `model` and `stream` in one pass
//! of serde_json over the borrowed bytes (unknown fields are skipped, not built), and
//! rewrites only the bytes of the model value when a route renames it. The rest of the
//! body is forwarded byte for byte; nothing here re-encodes the whole JSON.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::ops::Range;

/// What the gateway needs from a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: String,
    /// Byte range of the model value, quotes included, in the original body.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// The completion budget asked for (`max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens`), used to estimate tokens before the response.
    pub max_tokens: Option<u64>,
    /// The client sent `stream_options` (then the gateway never adds its own).
    pub stream_options: bool,
    /// Offset of the object's opening brace.
    pub open: usize,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<serde_json::Number>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Number>,
    #[serde(default)]
    max_output_tokens: Option<serde_json::Number>,
    #[serde(default, borrow)]
    stream_options: Option<&'a RawValue>,
}

/// The largest completion budget a request may ask for (the largest 32-bit signed
/// integer, which is what providers accept); more is a client error, not a number to
/// count against a limit.
pub const MAX_COMPLETION_TOKENS: u64 = i32::MAX as u64;

/// Reads `model` and `stream` from a JSON object body. Errors are client-facing messages.
pub fn scan(body: &[u8]) -> Result<RequestFacts, String> {
    let text =
        std::str::from_utf8(body).map_err(|_| "Request body is not valid UTF-8.".to_string())?;
    if !text.trim_start().starts_with('{') {
        return Err("Request body must be a JSON object.".into());
    }
    let head: Head =
        serde_json::from_str(text).map_err(|e| format!("Request body is not valid JSON: {e}"))?;
    let raw = head
        .model
        .ok_or_else(|| "You must provide a model parameter.".to_string())?;
    let model: String = serde_json::from_str(raw.get())
        .map_err(|_| "The model parameter must be a string.".to_string())?;
    let mut max_tokens = None;
    for (name, value) in [
        ("max_completion_tokens", &head.max_completion_tokens),
        ("max_tokens", &head.max_tokens),
        ("max_output_tokens", &head.max_output_tokens),
    ] {
        let Some(value) = value else { continue };
        let n = value
            .as_u64()
            .filter(|n| *n <= MAX_COMPLETION_TOKENS)
            .ok_or_else(|| {
                format!("{name} must be a non-negative integer of at most {MAX_COMPLETION_TOKENS}.")
            })?;
        max_tokens = max_tokens.or(Some(n));
    }
    // RawValue borrows from `text`, so its position is the value's offset in the body.
    let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
    Ok(RequestFacts {
        model,
        model_span: start..start + raw.get().len(),
        stream: head.stream.unwrap_or(false),
        max_tokens,
        stream_options: head.stream_options.is_some(),
        open: text.len() - text.trim_start().len(),
    })
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

    #[test]
    fn finds_model_and_stream_anywhere_in_the_object() {
        let body = br#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}"}],"stream":true,"model":"gpt-4o"}"#;
        let f = scan(body).unwrap();
        assert_eq!(f.model, "gpt-4o");
        assert!(f.stream);
        assert_eq!(&body[f.model_span.clone()], br#""gpt-4o""#);
    }

    #[test]
    fn rewrite_touches_only_the_model_value() {
        let body = Bytes::from_static(br#"{ "model" : "alias", "n": 1, "stream": null }"#);
        let f = scan(&body).unwrap();
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
        let f = scan(&body).unwrap();
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
        let f = scan(&own).unwrap();
        assert!(f.stream_options);
        assert_eq!(prepare(&own, &f, "a", true).as_ptr(), own.as_ptr());
    }

    #[test]
    fn escaped_model_names_round_trip() {
        let body = Bytes::from_static(br#"{"model":"a\"b"}"#);
        let f = scan(&body).unwrap();
        assert_eq!(f.model, "a\"b");
        let out = rewrite_model(&body, &f, "c\"d");
        assert_eq!(scan(&out).unwrap().model, "c\"d");
    }

    #[test]
    fn bad_bodies_are_client_errors() {
        assert!(scan(b"").is_err());
        assert!(scan(b"[1]").is_err());
        assert!(scan(b"{\"model\":").is_err());
        assert!(scan(b"{\"messages\":[]}")
            .unwrap_err()
            .contains("model parameter"));
        assert!(scan(b"{\"model\":5}").is_err());
        assert!(scan(b"{\"model\":\"a\",\"model\":\"b\"}").is_err());
        assert!(scan(b"{\"model\":\"a\",\"stream\":\"yes\"}").is_err());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any body: facts or a client-facing message, never a panic.
        #[test]
        fn any_bytes_scan_or_are_refused(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = scan(&body);
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
                if k != "model" && k != "stream" && !k.starts_with("max_") && k != "stream_options" {
                    obj.insert(k.clone(), serde_json::json!(v));
                }
            }
            obj.insert("model".into(), serde_json::json!(model));
            obj.insert("stream".into(), serde_json::json!(stream));
            let body = Bytes::from(serde_json::Value::Object(obj.clone()).to_string());
            let facts = scan(&body).unwrap();
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
