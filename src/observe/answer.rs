//! What an answer says about itself (its id, model and finish reasons, and, only when
//! content is captured, its text), read from the body the client received: a JSON
//! answer or an SSE stream, in the OpenAI, Anthropic or Gemini format. Its members are
//! borrowed from the body where they hold no escape; everything else is skipped unread.

use super::spans::push_capped;
use crate::spec::json::Walk;
use serde::Deserialize;
use std::borrow::Cow;

#[derive(Debug, Default)]
pub struct Answer<'a> {
    pub id: Option<Cow<'a, str>>,
    pub model: Option<Cow<'a, str>>,
    pub finish: Vec<Cow<'a, str>>,
    /// The answer's text, capped (for `capture_content`).
    pub text: String,
}

impl<'a> Answer<'a> {
    /// Reads `body` (an SSE stream if `sse`); its text, up to `limit` bytes, is collected
    /// only when `limit` is not 0.
    pub fn read(body: &'a [u8], sse: bool, limit: usize) -> Answer<'a> {
        let mut a = Answer::default();
        let mut doc = |json: &'a [u8]| {
            if let Some(m) = Meta::read(json) {
                a.take(m);
            }
            if limit > 0 {
                if let Ok(t) = serde_json::from_slice::<Texts>(json) {
                    t.collect(&mut a.text, limit);
                }
            }
        };
        if sse {
            for line in body.split(|b| *b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data:") {
                    doc(data.trim_ascii());
                }
            }
        } else {
            doc(body);
        }
        a
    }

    /// One JSON answer or stream event's metadata.
    fn take(&mut self, m: Meta<'a>) {
        // Anthropic's stream wraps the message in `message_start`.
        let m = match m.message {
            Some(inner) if m.kind.as_deref() == Some("message_start") => *inner,
            _ => m,
        };
        if self.id.is_none() {
            self.id = m.id.or(m.response_id);
        }
        if self.model.is_none() {
            self.model = m.model.or(m.model_version);
        }
        let reasons = [m.stop_reason, m.delta_reason].into_iter().flatten();
        if self.finish.is_empty() && reasons.clone().next().is_none() {
            self.finish = m.reasons;
        } else {
            self.finish.extend(reasons.chain(m.reasons));
        }
    }
}

/// The members of an answer or stream event that name it: OpenAI's `id`, `model` and
/// `choices[].finish_reason`; Anthropic's `id`, `model`, `stop_reason` and, in a stream,
/// `message_start.message` and `message_delta.delta.stop_reason`; Gemini's `responseId`,
/// `modelVersion` and `candidates[].finishReason`. A member that should be a string and
/// is not is left out; one that should be an object or an array and is not (or a
/// document that is not one JSON object) gives nothing.
#[derive(Debug, Default, PartialEq)]
struct Meta<'a> {
    kind: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    response_id: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    model_version: Option<Cow<'a, str>>,
    stop_reason: Option<Cow<'a, str>>,
    message: Option<Box<Meta<'a>>>,
    delta_reason: Option<Cow<'a, str>>,
    /// `choices[].finish_reason`, then `candidates[].finishReason`.
    reasons: Vec<Cow<'a, str>>,
}

/// The names a finish reason goes by in `choices[]` and `delta`, and in Gemini's
/// `candidates[]`.
const REASON: &[&[u8]] = &[b"finish_reason", b"stop_reason"];
const GEMINI_REASON: &[&[u8]] = &[b"finishReason"];

impl<'a> Meta<'a> {
    /// Reads one JSON document, walking only its top level and the members above; all
    /// else (the content, above all) is stepped over without being decoded.
    fn read(json: &'a [u8]) -> Option<Meta<'a>> {
        let mut j = Walk::new(json);
        let m = Meta::object(&mut j, false)?;
        j.end()?;
        Some(m)
    }

    /// One object's members; in a `message` (`nested`), a further `message` is stepped
    /// over, so that no document nests the reading deeper than that.
    fn object(j: &mut Walk<'a>, nested: bool) -> Option<Meta<'a>> {
        let mut m = Meta::default();
        let mut candidates = Vec::new();
        j.object(|j, key| {
            match key {
                b"type" => m.kind = j.text()?,
                b"id" => m.id = j.text()?,
                b"responseId" => m.response_id = j.text()?,
                b"model" => m.model = j.text()?,
                b"modelVersion" => m.model_version = j.text()?,
                b"stop_reason" => m.stop_reason = j.text()?,
                b"message" if nested => j.skip()?,
                b"message" => {
                    m.message = if j.null() {
                        None
                    } else {
                        Some(Box::new(Meta::object(j, true)?))
                    }
                }
                b"delta" => m.delta_reason = reason(j, REASON)?,
                b"choices" => j.array(|j| {
                    m.reasons.extend(reason(j, REASON)?);
                    Some(())
                })?,
                b"candidates" => j.array(|j| {
                    candidates.extend(reason(j, GEMINI_REASON)?);
                    Some(())
                })?,
                _ => j.skip()?,
            }
            Some(())
        })?;
        m.reasons.append(&mut candidates);
        Some(m)
    }
}

/// An object's finish reason: its member named one of `names`, if a string. Two such
/// members make the object unreadable.
fn reason<'a>(j: &mut Walk<'a>, names: &[&[u8]]) -> Option<Option<Cow<'a, str>>> {
    let mut found = None;
    let mut seen = false;
    j.object(|j, key| {
        if !names.contains(&key) {
            return j.skip();
        }
        if std::mem::replace(&mut seen, true) {
            return None;
        }
        found = j.text()?;
        Some(())
    })?;
    Some(found)
}

/// The members of an answer or stream event that hold its text: OpenAI's
/// `choices[].message.content`, `choices[].delta.content` and `choices[].text`;
/// Anthropic's `content[].text` and `delta.text`; Gemini's
/// `candidates[].content.parts[].text`.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Texts<'a> {
    #[serde(borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(borrow)]
    candidates: Vec<Candidate<'a>>,
    #[serde(borrow)]
    content: Vec<Part<'a>>,
    #[serde(borrow)]
    delta: Part<'a>,
}

impl Texts<'_> {
    fn collect(self, out: &mut String, limit: usize) {
        let choices = self
            .choices
            .into_iter()
            .flat_map(|c| [c.message.content, c.delta.content, c.text]);
        let candidates = self
            .candidates
            .into_iter()
            .flat_map(|c| c.content.parts)
            .map(|p| p.text);
        let parts = self.content.into_iter().map(|p| p.text);
        for t in choices
            .chain(candidates)
            .chain(parts)
            .chain([self.delta.text])
        {
            if let Some(piece) = t.0 {
                push_capped(out, &piece, limit);
            }
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Choice<'a> {
    #[serde(borrow)]
    message: Content<'a>,
    #[serde(borrow)]
    delta: Content<'a>,
    #[serde(borrow)]
    text: Text<'a>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Content<'a> {
    #[serde(borrow)]
    content: Text<'a>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Candidate<'a> {
    #[serde(borrow)]
    content: Parts<'a>,
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
    text: Text<'a>,
}

/// A string member, or `None` for a member of any other type (`null`, an array of
/// content parts, ...), which is skipped rather than failing the whole event.
#[derive(Debug, Default)]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the same members read by serde's derived readers (the reader
    /// the gateway used before), whole document decoded.
    #[derive(Default, Deserialize)]
    #[serde(default)]
    struct Oracle<'a> {
        #[serde(borrow, rename = "type")]
        kind: Text<'a>,
        #[serde(borrow)]
        id: Text<'a>,
        #[serde(borrow, rename = "responseId")]
        response_id: Text<'a>,
        #[serde(borrow)]
        model: Text<'a>,
        #[serde(borrow, rename = "modelVersion")]
        model_version: Text<'a>,
        #[serde(borrow)]
        stop_reason: Text<'a>,
        #[serde(borrow)]
        message: Option<Box<Oracle<'a>>>,
        #[serde(borrow)]
        delta: Reason<'a>,
        #[serde(borrow)]
        choices: Vec<Reason<'a>>,
        #[serde(borrow)]
        candidates: Vec<GeminiReason<'a>>,
    }

    #[derive(Default, Deserialize)]
    #[serde(default)]
    struct Reason<'a> {
        #[serde(borrow, alias = "stop_reason")]
        finish_reason: Text<'a>,
    }

    #[derive(Default, Deserialize)]
    #[serde(default)]
    struct GeminiReason<'a> {
        #[serde(borrow, rename = "finishReason")]
        finish_reason: Text<'a>,
    }

    impl<'a> Oracle<'a> {
        fn into_meta(self) -> Meta<'a> {
            let choices = self.choices.into_iter().map(|c| c.finish_reason.0);
            let candidates = self.candidates.into_iter().map(|c| c.finish_reason.0);
            Meta {
                kind: self.kind.0,
                id: self.id.0,
                response_id: self.response_id.0,
                model: self.model.0,
                model_version: self.model_version.0,
                stop_reason: self.stop_reason.0,
                message: self.message.map(|m| Box::new(m.into_meta())),
                delta_reason: self.delta.finish_reason.0,
                reasons: choices.chain(candidates).flatten().collect(),
            }
        }
    }

    use proptest::prelude::*;
    use serde_json::{Map, Value};

    /// Any JSON value; objects use names the reader looks for, at the wrong depth.
    fn junk() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-z\"\\\\\n\u{e9}\u{1F600}{}\\[\\],: ]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "id",
                        "model",
                        "finish_reason",
                        "stop_reason",
                        "type",
                        "x",
                        "choices"
                    ]),
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    /// A string member's value: mostly a string, sometimes another type.
    fn text() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => "[a-z0-9_\"\\\\\u{e9}-]{0,10}".prop_map(Value::from),
            1 => Just(Value::from("message_start")),
            1 => junk(),
        ]
    }

    /// An object with at most one of `names` holding a reason, among other members.
    fn reason(names: &'static [&'static str]) -> impl Strategy<Value = Value> {
        (
            prop::option::of((prop::sample::select(names), text())),
            prop::collection::btree_map("[a-z]{1,3}", junk(), 0..3),
        )
            .prop_map(|(r, other)| {
                let mut m: Map<String, Value> = other.into_iter().collect();
                if let Some((k, v)) = r {
                    m.insert(k.to_string(), v);
                }
                Value::Object(m)
            })
    }

    fn meta(depth: u32) -> BoxedStrategy<Value> {
        let names = [
            "type",
            "id",
            "responseId",
            "model",
            "modelVersion",
            "stop_reason",
        ];
        let message = if depth == 0 {
            prop::option::of(prop_oneof![Just(Value::Null), meta(1)]).boxed()
        } else {
            Just(None).boxed()
        };
        (
            prop::collection::btree_map(prop::sample::select(names.to_vec()), text(), 0..6),
            message,
            prop::option::of(reason(&["finish_reason", "stop_reason"])),
            prop::option::of(prop::collection::vec(
                reason(&["finish_reason", "stop_reason"]),
                0..3,
            )),
            prop::option::of(prop::collection::vec(reason(&["finishReason"]), 0..3)),
            prop::collection::btree_map(
                prop::sample::select(vec!["content", "usage", "object"]),
                junk(),
                0..3,
            ),
        )
            .prop_map(|(strings, message, delta, choices, candidates, other)| {
                let mut m: Map<String, Value> =
                    other.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                m.extend(strings.into_iter().map(|(k, v)| (k.to_string(), v)));
                for (k, v) in [
                    ("message", message),
                    ("delta", delta),
                    ("choices", choices.map(Value::from)),
                    ("candidates", candidates.map(Value::from)),
                ] {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
                Value::Object(m)
            })
            .boxed()
    }

    proptest! {
        #[test]
        fn the_walk_reads_what_a_whole_decode_reads(doc in meta(0), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&doc).unwrap()
            } else {
                serde_json::to_string(&doc).unwrap()
            };
            let expected = serde_json::from_str::<Oracle>(&text).ok().map(Oracle::into_meta);
            prop_assert_eq!(Meta::read(text.as_bytes()), expected, "{}", text);
        }

        #[test]
        fn any_bytes_or_a_cut_document_never_panic(
            doc in meta(0),
            cut in any::<prop::sample::Index>(),
            bytes in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let text = serde_json::to_string(&doc).unwrap();
            let _ = Meta::read(&text.as_bytes()[..cut.index(text.len() + 1)]);
            let _ = Meta::read(&bytes);
            let _ = Answer::read(&bytes, true, 8);
        }
    }

    #[test]
    fn shapes_the_reader_refuses_give_nothing() {
        for bad in [
            &br#"[1]"#[..],
            br#"{"id":"a"} x"#,
            br#"{"id":"a","choices":{}}"#,
            br#"{"id":"a","choices":[1]}"#,
            br#"{"id":"a","delta":null}"#,
            br#"{"id":"a","delta":{"stop_reason":"x","finish_reason":"y"}}"#,
            br#"{"id":"a""#,
            br#"{"id":"a\"}"#,
        ] {
            assert_eq!(Meta::read(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let deep = format!(
            "{}{}",
            r#"{"message":"#.repeat(100_000),
            "}".repeat(100_000)
        );
        let m = Meta::read(deep.as_bytes()).expect("deep nesting is stepped over");
        assert_eq!(
            m.message.map(|m| m.message),
            Some(None),
            "read one level down"
        );
        let m =
            Meta::read(br#" {"id" : "a\u00e9" , "model":7,"choices":[{"finish_reason":null}]} "#)
                .unwrap();
        assert_eq!((m.id.as_deref(), m.model), (Some("a\u{e9}"), None));
        assert!(m.reasons.is_empty());
    }

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
        let a = Answer::read(openai, true, 0);
        assert_eq!((a.id.as_deref(), a.finish.len()), (Some("c1"), 1));
        assert_eq!(a.text, "", "no text is collected without a limit");
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
        assert_eq!(a.finish, ["end_turn"]);
        assert_eq!(a.text, "Hi");
        let gemini = br#"{"responseId":"r1","modelVersion":"gemini-2","candidates":[{"finishReason":"STOP","content":{"parts":[{"text":"ok"}]}}]}"#;
        let a = Answer::read(gemini, false, 100);
        assert_eq!(
            (a.id.as_deref(), a.model.as_deref()),
            (Some("r1"), Some("gemini-2"))
        );
        assert_eq!(a.finish, ["STOP"]);
        assert_eq!(a.text, "ok");
        // Members of another type than expected (a tool call's null content, content
        // parts, a number) are skipped, not the whole answer.
        let tools = br#"{"id":"c2","model":"m","choices":[{"message":{"content":null,"tool_calls":[{"id":"t"}]},"finish_reason":"tool_calls"},{"message":{"content":[{"type":"text","text":"x"}]},"finish_reason":7}]}"#;
        let a = Answer::read(tools, false, 100);
        assert_eq!(a.id.as_deref(), Some("c2"));
        assert_eq!(a.finish, ["tool_calls"]);
        assert_eq!(a.text, "");
    }
}
