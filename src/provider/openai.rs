//! The OpenAI chat-completions wire format, as far as the gateway translates it: the
//! request, the answer, and the stream chunks. Served by OpenAI, Azure and the
//! OpenAI-compatible fleets (vLLM, TGI, llama.cpp).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write as _;

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Not OpenAI's, but taken by vLLM and llama.cpp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    // Fields read only to refuse them when another format has no equivalent.
    #[serde(default, skip_serializing)]
    pub n: Option<u64>,
    #[serde(default, skip_serializing)]
    pub logprobs: Option<bool>,
    #[serde(default, skip_serializing)]
    pub top_logprobs: Option<u64>,
    #[serde(default, skip_serializing)]
    pub logit_bias: Option<Value>,
    #[serde(default, skip_serializing)]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing)]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing)]
    pub seed: Option<Value>,
    #[serde(default, skip_serializing)]
    pub response_format: Option<Value>,
    #[serde(default, skip_serializing)]
    pub audio: Option<Value>,
    #[serde(default, skip_serializing)]
    pub functions: Option<Value>,
    #[serde(default, skip_serializing)]
    pub function_call: Option<Value>,
}

impl ChatRequest {
    /// The first field set to something another format cannot express, with why.
    pub fn untranslatable(&self) -> Option<(&'static str, &'static str)> {
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        if self.n.is_some_and(|n| n > 1) {
            return Some(("n", "only one choice per request can be translated"));
        }
        if self.logprobs == Some(true) || self.top_logprobs.is_some() {
            return Some(("logprobs", "log probabilities are not reported"));
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty()))
        {
            return Some(("logit_bias", "token biases have no equivalent"));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Some(("presence_penalty", "penalties have no equivalent"));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Some(("frequency_penalty", "penalties have no equivalent"));
        }
        if set(&self.seed) {
            return Some(("seed", "seeded sampling has no equivalent"));
        }
        if self
            .response_format
            .as_ref()
            .is_some_and(|f| f["type"] != "text")
        {
            return Some((
                "response_format",
                "JSON modes have no equivalent; describe the format in the prompt or use a tool",
            ));
        }
        if set(&self.audio) {
            return Some(("audio", "audio output has no equivalent"));
        }
        if set(&self.functions) || set(&self.function_call) {
            return Some((
                "functions",
                "the deprecated functions API is not translated; use tools",
            ));
        }
        None
    }

    /// The completion budget the client set (the larger of the two fields).
    pub fn budget(&self) -> Option<u64> {
        match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn wants_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true)
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Message {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::text::text_or_list(d, Content::Text, Content::Parts)
    }
}

impl Content {
    /// The text of the content (text parts joined), for places that take only text.
    pub fn text(&self) -> Result<String, String> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Text { text } => out.push_str(text),
                        _ => return Err("only text parts are allowed here".into()),
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    #[serde(other, skip_serializing)]
    Unsupported,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function() -> String {
    "function".into()
}

#[derive(Debug, Deserialize, Serialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Tool {
    #[serde(rename = "type", default = "function")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `auto`, `required` or `none`.
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: Named,
    },
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Named {
    pub name: String,
}

// The answer.

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Completion {
    #[serde(default)]
    pub id: String,
    #[serde(default = "completion_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

fn completion_object() -> String {
    "chat.completion".into()
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Choice {
    #[serde(default)]
    pub index: u32,
    pub message: Message,
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: u64,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn new(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptDetails {
                cached_tokens: cached,
            }),
            completion_tokens_details: (reasoning > 0).then_some(CompletionDetails {
                reasoning_tokens: reasoning,
            }),
        }
    }

    pub fn cached(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
}

// The stream.

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Chunk {
    #[serde(default)]
    pub id: String,
    #[serde(default = "chunk_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// An error some servers send inside the stream.
    #[serde(default, skip_serializing)]
    pub error: Option<Value>,
}

fn chunk_object() -> String {
    "chat.completion.chunk".into()
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: Delta,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ToolCallDelta {
    #[serde(default)]
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub function: FunctionDelta,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct FunctionDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// An OpenAI-shaped error body.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        .to_string()
        .into_bytes()
}

/// The message and type of an OpenAI-shaped error body, if it is one.
pub fn read_error(body: &[u8]) -> Option<(String, String)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let e = &v["error"];
    let message = match &e["message"] {
        Value::String(s) => s.clone(),
        _ => e.as_str()?.to_string(),
    };
    let kind = e["type"].as_str().unwrap_or("api_error").to_string();
    Some((message, kind))
}

// Chunks as the gateway writes them: borrowed, so no string is copied per chunk.

#[derive(Serialize, Default)]
pub struct ChoiceOut<'a> {
    pub index: u32,
    pub delta: DeltaOut<'a>,
    pub finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
pub struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[ToolDeltaOut<'a>; 1]>,
}

#[derive(Serialize)]
pub struct ToolDeltaOut<'a> {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDeltaOut<'a>,
}

#[derive(Serialize)]
pub struct FunctionDeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a str>,
}

/// A chunk's delta with one text, as a JSON string literal (quotes included).
#[derive(Debug, Clone, Copy)]
pub enum RawDelta<'a> {
    Content(&'a [u8]),
    Reasoning(&'a [u8]),
    Arguments { index: u32, literal: &'a [u8] },
}

/// What every chunk of one answer repeats, written once per answer: each chunk is this
/// prefix, its choices, and the closing brace.
#[derive(Debug)]
pub struct ChunkHead {
    created: u64,
    /// `data: {"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":`
    prefix: Vec<u8>,
}

impl ChunkHead {
    pub fn new(created: u64) -> ChunkHead {
        let mut head = ChunkHead {
            created,
            prefix: Vec::new(),
        };
        head.start("", "");
        head
    }

    pub fn created(&self) -> u64 {
        self.created
    }

    /// Sets the answer's id and model (from the upstream's first event).
    pub fn start(&mut self, id: &str, model: &str) {
        #[derive(Serialize)]
        struct Head<'a> {
            id: &'a str,
            object: &'static str,
            created: u64,
            model: &'a str,
        }
        let head = Head {
            id,
            object: "chat.completion.chunk",
            created: self.created,
            model,
        };
        self.prefix.clear();
        self.prefix.extend_from_slice(b"data: ");
        // Serializing plain structs to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.prefix, &head);
        self.prefix.pop(); // the closing brace
        self.prefix.extend_from_slice(b",\"choices\":");
    }

    /// Appends one chunk with one choice.
    pub fn write(&self, out: &mut Vec<u8>, delta: DeltaOut<'_>, finish_reason: Option<&str>) {
        let choices = [ChoiceOut {
            index: 0,
            delta,
            finish_reason,
        }];
        self.emit(out, &choices, None);
    }

    /// Appends one chunk whose delta is one text given as a JSON string literal, copied
    /// as it is (the same bytes [`ChunkHead::write`] gives for that text).
    pub fn write_raw(&self, out: &mut Vec<u8>, delta: RawDelta<'_>) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b"[{\"index\":0,\"delta\":{");
        match delta {
            RawDelta::Content(literal) => {
                out.extend_from_slice(b"\"content\":");
                out.extend_from_slice(literal);
            }
            RawDelta::Reasoning(literal) => {
                out.extend_from_slice(b"\"reasoning_content\":");
                out.extend_from_slice(literal);
            }
            RawDelta::Arguments { index, literal } => {
                // Writing into a Vec cannot fail.
                let _ = write!(
                    out,
                    "\"tool_calls\":[{{\"index\":{index},\"function\":{{\"arguments\":"
                );
                out.extend_from_slice(literal);
                out.extend_from_slice(b"}}]");
            }
        }
        out.extend_from_slice(b"},\"finish_reason\":null}]}\n\n");
    }

    /// Appends the usage-only chunk (`choices: []`).
    pub fn write_usage(&self, out: &mut Vec<u8>, usage: &Usage) {
        self.emit(out, &[], Some(usage));
    }

    fn emit(&self, out: &mut Vec<u8>, choices: &[ChoiceOut<'_>], usage: Option<&Usage>) {
        out.extend_from_slice(&self.prefix);
        let _ = serde_json::to_writer(&mut *out, choices);
        if let Some(usage) = usage {
            out.extend_from_slice(b",\"usage\":");
            let _ = serde_json::to_writer(&mut *out, usage);
        }
        out.extend_from_slice(b"}\n\n");
    }
}

/// The end of a complete stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// An error event inside a stream (SDKs raise it); no `[DONE]` follows.
pub fn write_stream_error(out: &mut Vec<u8>, message: &str, kind: &str) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&error_body(message, kind, Some("upstream_stream_error")));
    out.extend_from_slice(b"\n\n");
}
