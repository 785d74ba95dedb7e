//! The Anthropic messages wire format, as far as the gateway translates it: the
//! request, the answer, the stream events and the error shape.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Request {
    #[serde(default)]
    pub model: String,
    /// Required by Anthropic; `None` only while parsing a client's request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Thinking>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::text::text_or_list(d, Content::Text, Content::Blocks)
    }
}

impl Content {
    pub fn into_blocks(self) -> Vec<Block> {
        match self {
            Content::Text(text) => vec![Block::Text { text }],
            Content::Blocks(b) => b,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<ToolResultContent>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        is_error: Option<bool>,
    },
    Thinking {
        thinking: String,
        #[serde(default)]
        signature: String,
    },
    RedactedThinking {
        data: String,
    },
    #[serde(other, skip_serializing)]
    Unsupported,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum ToolResultContent {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// Set on Anthropic's server tools (`bash_20250124`, `web_search_...`) and on
    /// `custom`; absent on client tools.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Thinking {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<u64>,
}

// The answer.

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Response {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default = "message")]
    pub kind: String,
    #[serde(default = "assistant")]
    pub role: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub content: Vec<Block>,
    #[serde(default)]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub stop_sequence: Option<String>,
    #[serde(default)]
    pub usage: Usage,
}

fn message() -> String {
    "message".into()
}

fn assistant() -> String {
    "assistant".into()
}

#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
}

impl Usage {
    /// Every input token, as OpenAI counts them (Anthropic's `input_tokens` exclude
    /// cache reads and writes).
    pub fn all_input(&self) -> u64 {
        self.input_tokens
            + self.cache_read_input_tokens.unwrap_or(0)
            + self.cache_creation_input_tokens.unwrap_or(0)
    }
}

// The stream.

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    MessageStart {
        message: Response,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u32,
        delta: Delta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<DeltaUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorBody,
    },
}

/// The members of each event but its `type`, read straight into the variant once the type
/// is known (serde's internally tagged enum would first buffer the whole event).
mod body {
    use super::*;

    #[derive(Deserialize)]
    pub struct MessageStart {
        pub message: Response,
    }
    #[derive(Deserialize)]
    pub struct BlockStart {
        pub index: u32,
        pub content_block: Block,
    }
    #[derive(Deserialize)]
    pub struct BlockDelta {
        pub index: u32,
        pub delta: Delta,
    }
    #[derive(Deserialize)]
    pub struct BlockStop {
        pub index: u32,
    }
    #[derive(Deserialize)]
    pub struct MessageDeltaBody {
        pub delta: MessageDelta,
        #[serde(default)]
        pub usage: Option<DeltaUsage>,
    }
    #[derive(Deserialize)]
    pub struct Error {
        pub error: ErrorBody,
    }
}

/// The `type` an event's JSON starts with (`{"type":"message_start",...`), as Anthropic
/// writes every event.
use serde::de;

fn leading_type(data: &[u8]) -> Option<&[u8]> {
    let rest = data
        .trim_ascii_start()
        .strip_prefix(b"{")?
        .trim_ascii_start()
        .strip_prefix(b"\"type\"")?
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start()
        .strip_prefix(b"\"")?;
    Some(&rest[..memchr::memchr(b'"', rest)?])
}

impl Event {
    /// Reads one event's data; `None` for an event of an unknown type or shape. When the
    /// event starts with its type, only that variant's members are read.
    pub fn read(data: &[u8]) -> Option<Event> {
        fn of<'a, T: Deserialize<'a>>(data: &'a [u8]) -> Option<T> {
            serde_json::from_slice(data).ok()
        }
        let fast = match leading_type(data) {
            Some(b"message_start") => {
                of::<body::MessageStart>(data).map(|b| Event::MessageStart { message: b.message })
            }
            Some(b"content_block_start") => {
                of::<body::BlockStart>(data).map(|b| Event::ContentBlockStart {
                    index: b.index,
                    content_block: b.content_block,
                })
            }
            Some(b"content_block_delta") => {
                of::<body::BlockDelta>(data).map(|b| Event::ContentBlockDelta {
                    index: b.index,
                    delta: b.delta,
                })
            }
            Some(b"content_block_stop") => {
                of::<body::BlockStop>(data).map(|b| Event::ContentBlockStop { index: b.index })
            }
            Some(b"message_delta") => {
                of::<body::MessageDeltaBody>(data).map(|b| Event::MessageDelta {
                    delta: b.delta,
                    usage: b.usage,
                })
            }
            Some(b"message_stop") => of::<de::IgnoredAny>(data).map(|_| Event::MessageStop),
            Some(b"ping") => of::<de::IgnoredAny>(data).map(|_| Event::Ping),
            Some(b"error") => of::<body::Error>(data).map(|b| Event::Error { error: b.error }),
            _ => None,
        };
        fast.or_else(|| of(data))
    }

    /// The SSE `event:` name Anthropic gives this event.
    pub fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Ping => "ping",
            Event::Error { .. } => "error",
        }
    }

    /// Appends the event in wire form.
    pub fn write(&self, out: &mut Vec<u8>) {
        // Serializing plain structs to a Vec cannot fail.
        let data = serde_json::to_vec(self).unwrap_or_default();
        super::sse::write(out, Some(self.name()), &data);
    }
}

/// Which text a `content_block_delta` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaKind {
    Text,
    Thinking,
    InputJson,
}

/// A `content_block_delta`, the event a stream repeats per token, with its text as the
/// JSON string literal it arrived as (quotes and escapes included), so that it can be
/// written into another JSON document without being decoded and encoded again.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenDelta<'a> {
    pub index: u32,
    pub kind: DeltaKind,
    pub literal: &'a [u8],
}

/// Reads a `content_block_delta` written exactly as Anthropic writes it (compact, in its
/// member order). Any other event, or another spelling of this one, gives `None` and is
/// read as an [`Event`].
pub fn token_delta(data: &[u8]) -> Option<TokenDelta<'_>> {
    let rest = data.strip_prefix(br#"{"type":"content_block_delta","index":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let index = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(br#","delta":{"type":""#)?;
    let (kind, rest) = [
        (DeltaKind::Text, br#"text_delta","text":"#.as_slice()),
        (
            DeltaKind::InputJson,
            br#"input_json_delta","partial_json":"#,
        ),
        (DeltaKind::Thinking, br#"thinking_delta","thinking":"#),
    ]
    .into_iter()
    .find_map(|(kind, head)| Some((kind, rest.strip_prefix(head)?)))?;
    let end = string_literal_end(rest)?;
    let (literal, tail) = rest.split_at(end);
    (tail == b"}}").then_some(TokenDelta {
        index,
        kind,
        literal,
    })
}

/// Where the JSON string literal at the start of `s` ends (just past its closing quote);
/// `None` when `b` does not start with a valid one (its UTF-8 is checked too).
fn string_literal_end(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', &b[i..])?;
        if b[i..at].iter().any(|&c| c < 0x20) {
            return None;
        }
        std::str::from_utf8(&b[i..at]).ok()?;
        if b[at] == b'"' {
            return Some(at + 1);
        }
        // An escape: `\uXXXX` or one character, none of them a quote or backslash.
        match b.get(at + 1)? {
            b'u' => {
                let hex = b.get(at + 2..at + 6)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                i = at + 6;
            }
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i = at + 2,
            _ => return None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Delta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    SignatureDelta {
        signature: String,
    },
    #[serde(other, skip_serializing)]
    Unsupported,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct MessageDelta {
    #[serde(default)]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub stop_sequence: Option<String>,
}

/// The usage of `message_delta`: cumulative; newer API versions repeat the input counts.
#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize)]
pub struct DeltaUsage {
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ErrorBody {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

/// An Anthropic-shaped error body.
pub fn error_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
        .to_string()
        .into_bytes()
}

/// The type and message of an Anthropic-shaped error body, if it is one.
pub fn read_error(body: &[u8]) -> Option<(String, String)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let e = &v["error"];
    Some((
        e["type"].as_str()?.to_string(),
        e["message"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading an event by its leading type gives what reading it whole gives, for every
    /// event of a documented stream, and an event that does not lead with its type is
    /// still read.
    #[test]
    fn events_read_by_their_leading_type_equal_events_read_whole() {
        let events = [
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_read_input_tokens":5,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Par"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":15}}"#,
            r#"{"type":"message_stop"}"#,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ];
        for e in events {
            let whole: Event = serde_json::from_str(e).unwrap();
            let read = Event::read(e.as_bytes()).unwrap();
            assert_eq!(
                serde_json::to_value(&read).unwrap(),
                serde_json::to_value(&whole).unwrap(),
                "{e}"
            );
        }
        let late = br#"{"index":2,"type":"content_block_stop"}"#;
        assert!(matches!(
            Event::read(late),
            Some(Event::ContentBlockStop { index: 2 })
        ));
        assert!(Event::read(br#"{"type":"message_stop""#).is_none());
        assert!(Event::read(br#"{"type":"future_event","x":1}"#).is_none());
    }

    #[test]
    fn a_token_delta_is_read_only_in_anthropics_exact_spelling() {
        let d = token_delta(
            br#"{"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{\"a\": \"\\\"x\u00e9\""}}"#,
        );
        assert_eq!(
            d,
            Some(TokenDelta {
                index: 3,
                kind: DeltaKind::InputJson,
                literal: br#""{\"a\": \"\\\"x\u00e9\"""#
            })
        );
        for other in [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}x"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a\q"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\u12"}}"#,
            "{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\nb\"}}",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"s"}}"#,
            r#"{"type":"content_block_delta", "index":0,"delta":{"type":"text_delta","text":"a"}}"#,
            r#"{"type":"content_block_delta","index":,"delta":{"type":"text_delta","text":"a"}}"#,
        ] {
            assert_eq!(token_delta(other.as_bytes()), None, "{other}");
        }
    }
}
