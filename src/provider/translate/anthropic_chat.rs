//! An Anthropic messages client (a coding agent) served by an OpenAI-compatible upstream:
//! the request to chat completions, the answer and chunks back to Anthropic's messages
//! and stream events.

use super::State;
use super::{refuse, Target};
use crate::provider::anthropic::{self as an, Block};
use crate::provider::openai as oa;
use crate::provider::Provider;
use serde_json::Value;

fn effort(budget: u64) -> &'static str {
    match budget {
        0..=2048 => "low",
        2049..=8192 => "medium",
        _ => "high",
    }
}

pub fn request(body: &[u8], target: &Target) -> Result<Vec<u8>, String> {
    let req: an::Request = serde_json::from_slice(body)
        .map_err(|e| format!("Request body is not a valid messages request: {e}"))?;
    let max_tokens = req
        .max_tokens
        .ok_or("max_tokens: Field required (the messages API needs it).")?;
    let hosted = matches!(target.provider, Provider::Openai | Provider::Azure);
    let mut messages: Vec<oa::Message> = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        let text = text_of(system.into_blocks()).map_err(|e| format!("system: {e}"))?;
        messages.push(oa::Message {
            role: "system".into(),
            content: Some(oa::Content::Text(text)),
            ..Default::default()
        });
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        let at = |what: &str| format!("messages[{i}]: {what}");
        let blocks = m.content.into_blocks();
        match m.role.as_str() {
            "user" => {
                let mut parts = Vec::new();
                for block in blocks {
                    match block {
                        Block::ToolResult {
                            tool_use_id,
                            content,
                            ..
                        } => {
                            let text = match content {
                                None => String::new(),
                                Some(an::ToolResultContent::Text(t)) => t,
                                Some(an::ToolResultContent::Blocks(b)) => {
                                    text_of(b).map_err(|e| at(&format!("tool_result: {e}")))?
                                }
                            };
                            messages.push(oa::Message {
                                role: "tool".into(),
                                content: Some(oa::Content::Text(text)),
                                tool_call_id: Some(tool_use_id),
                                ..Default::default()
                            });
                        }
                        Block::Text { text } => parts.push(oa::Part::Text { text }),
                        Block::Image { source } => parts.push(oa::Part::ImageUrl {
                            image_url: oa::ImageUrl {
                                url: match source {
                                    an::ImageSource::Base64 { media_type, data } => {
                                        format!("data:{media_type};base64,{data}")
                                    }
                                    an::ImageSource::Url { url } => url,
                                },
                                detail: None,
                            },
                        }),
                        Block::Thinking { .. } | Block::RedactedThinking { .. } => {}
                        _ => return Err(at("only text, image and tool_result blocks can be sent to an OpenAI-compatible upstream")),
                    }
                }
                if !parts.is_empty() {
                    let content = match parts.as_slice() {
                        [oa::Part::Text { .. }] => match parts.pop() {
                            Some(oa::Part::Text { text }) => oa::Content::Text(text),
                            _ => oa::Content::Parts(parts),
                        },
                        _ => oa::Content::Parts(parts),
                    };
                    messages.push(oa::Message {
                        role: "user".into(),
                        content: Some(content),
                        ..Default::default()
                    });
                }
            }
            "assistant" => {
                let mut text = String::new();
                let mut calls = Vec::new();
                for block in blocks {
                    match block {
                        Block::Text { text: t } => text.push_str(&t),
                        Block::ToolUse { id, name, input } => calls.push(oa::ToolCall {
                            id,
                            kind: "function".into(),
                            function: oa::FunctionCall {
                                name,
                                arguments: input.to_string(),
                            },
                        }),
                        // Earlier reasoning is not sent back to an OpenAI-compatible model.
                        Block::Thinking { .. } | Block::RedactedThinking { .. } => {}
                        _ => return Err(at("only text, thinking and tool_use blocks can be sent to an OpenAI-compatible upstream")),
                    }
                }
                messages.push(oa::Message {
                    role: "assistant".into(),
                    content: (!text.is_empty() || calls.is_empty())
                        .then_some(oa::Content::Text(text)),
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    ..Default::default()
                });
            }
            other => return Err(at(&format!("role `{other}` is not known"))),
        }
    }
    let tools = match req.tools {
        None => None,
        Some(tools) => Some(
            tools
                .into_iter()
                .map(|t| match t.kind.as_deref() {
                    None | Some("custom") => Ok(oa::Tool {
                        kind: "function".into(),
                        function: oa::FunctionDef {
                            name: t.name,
                            description: t.description,
                            parameters: t.input_schema,
                        },
                    }),
                    Some(kind) => Err(refuse(
                        "tools",
                        "an OpenAI-compatible",
                        &format!("Anthropic's server tool `{kind}` runs only on Anthropic"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let mut parallel_tool_calls = None;
    let tool_choice = match req.tool_choice {
        None => None,
        Some(choice) => {
            if choice.disable_parallel_tool_use == Some(true) && tools.is_some() {
                parallel_tool_calls = Some(false);
            }
            Some(match choice.kind.as_str() {
                "auto" => oa::ToolChoice::Mode("auto".into()),
                "any" => oa::ToolChoice::Mode("required".into()),
                "none" => oa::ToolChoice::Mode("none".into()),
                "tool" => oa::ToolChoice::Named {
                    kind: "function".into(),
                    function: oa::Named {
                        name: choice
                            .name
                            .ok_or("tool_choice of type tool needs a name.")?,
                    },
                },
                other => return Err(format!("tool_choice type `{other}` is not known.")),
            })
        }
    };
    if hosted && req.top_k.is_some() {
        return Err(refuse("top_k", "an OpenAI", "it has no top_k sampling"));
    }
    let reasoning_effort = req
        .thinking
        .filter(|t| t.kind == "enabled")
        .map(|t| effort(t.budget_tokens.unwrap_or(0)).to_string());
    let out = oa::ChatRequest {
        model: target.model.to_string(),
        messages,
        // OpenAI's reasoning models take only `max_completion_tokens`; other servers
        // read `max_tokens`.
        max_tokens: (!hosted).then_some(max_tokens),
        max_completion_tokens: hosted.then_some(max_tokens),
        stream: req.stream,
        // The usage chunk is what `message_delta` reports; always asked for.
        stream_options: req.stream.then_some(oa::StreamOptions {
            include_usage: Some(true),
        }),
        stop: req.stop_sequences.map(oa::Stop::Many),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        user: req.metadata.and_then(|m| m.user_id),
        tools,
        tool_choice,
        parallel_tool_calls,
        reasoning_effort,
        ..Default::default()
    };
    serde_json::to_vec(&out).map_err(|e| e.to_string())
}

/// The text of blocks that may only be text.
fn text_of(blocks: Vec<Block>) -> Result<String, String> {
    let mut out = String::new();
    for b in blocks {
        match b {
            Block::Text { text } => {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&text);
            }
            _ => return Err("only text blocks can be translated here".into()),
        }
    }
    Ok(out)
}

pub fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

fn usage(u: Option<&oa::Usage>) -> an::Usage {
    let Some(u) = u else {
        return an::Usage::default();
    };
    let cached = u.cached().min(u.prompt_tokens);
    an::Usage {
        input_tokens: u.prompt_tokens - cached,
        output_tokens: u.completion_tokens,
        cache_read_input_tokens: Some(cached),
        cache_creation_input_tokens: Some(0),
    }
}

/// Tool arguments as the `input` object; arguments that are not JSON are passed on as a
/// string rather than dropped.
fn input(arguments: &str) -> Value {
    super::chat_anthropic::arguments(arguments).unwrap_or_else(|_| Value::String(arguments.into()))
}

pub fn answer(body: &[u8]) -> Result<Vec<u8>, String> {
    let r: oa::Completion = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let choice = r
        .choices
        .into_iter()
        .next()
        .ok_or("the upstream answered without a choice")?;
    let m = choice.message;
    let mut content = Vec::new();
    if let Some(thinking) = m.reasoning_content.filter(|t| !t.is_empty()) {
        content.push(Block::Thinking {
            thinking,
            signature: String::new(),
        });
    }
    if let Some(text) = m
        .content
        .map(|c| c.text())
        .transpose()?
        .filter(|t| !t.is_empty())
    {
        content.push(Block::Text { text });
    }
    for call in m.tool_calls.unwrap_or_default() {
        content.push(Block::ToolUse {
            id: call.id,
            name: call.function.name,
            input: input(&call.function.arguments),
        });
    }
    let out = an::Response {
        id: r.id,
        kind: "message".into(),
        role: "assistant".into(),
        model: r.model,
        content,
        stop_reason: Some(stop_reason(choice.finish_reason.as_deref()).into()),
        stop_sequence: None,
        usage: usage(r.usage.as_ref()),
    };
    serde_json::to_vec(&out).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    Thinking,
    /// A tool call, by its OpenAI index.
    Tool(u32),
}

/// Chat-completion chunks in, Anthropic stream events out, chunk by chunk.
pub struct Stream {
    started: bool,
    open: Open,
    /// The index of the next content block.
    next: u32,
    /// OpenAI tool indexes already closed.
    closed: Vec<u32>,
    stop: Option<&'static str>,
    usage: Option<oa::Usage>,
    state: State,
}

impl Default for Stream {
    fn default() -> Self {
        Stream {
            started: false,
            open: Open::None,
            next: 0,
            closed: Vec::new(),
            stop: None,
            usage: None,
            state: State::Open,
        }
    }
}

impl Stream {
    /// At the end of the upstream body: whether the answer was complete. An upstream that
    /// ends after its finish reason without `[DONE]` is complete.
    pub fn end(&mut self, out: &mut Vec<u8>) -> bool {
        if self.state == State::Open && self.stop.is_some() {
            self.complete(out);
        }
        if self.state == State::Open {
            self.fail(
                "The upstream stream ended before the answer was complete.",
                out,
            );
        }
        self.state == State::Done
    }

    pub fn fail(&mut self, message: &str, out: &mut Vec<u8>) {
        if self.state == State::Open {
            an::Event::Error {
                error: an::ErrorBody {
                    kind: "api_error".into(),
                    message: message.into(),
                },
            }
            .write(out);
            self.state = State::Failed;
        }
    }

    fn start(&mut self, id: &str, model: &str, out: &mut Vec<u8>) {
        self.started = true;
        an::Event::MessageStart {
            message: an::Response {
                id: id.into(),
                kind: "message".into(),
                role: "assistant".into(),
                model: model.into(),
                ..Default::default()
            },
        }
        .write(out);
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Open::Tool(oi) = self.open {
            self.closed.push(oi);
        }
        if self.open != Open::None {
            an::Event::ContentBlockStop {
                index: self.next - 1,
            }
            .write(out);
            self.open = Open::None;
        }
    }

    fn open_block(&mut self, open: Open, block: Block, out: &mut Vec<u8>) {
        self.close(out);
        an::Event::ContentBlockStart {
            index: self.next,
            content_block: block,
        }
        .write(out);
        self.next += 1;
        self.open = open;
    }

    fn delta(&self, delta: an::Delta, out: &mut Vec<u8>) {
        an::Event::ContentBlockDelta {
            index: self.next - 1,
            delta,
        }
        .write(out);
    }

    fn complete(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.start("", "", out);
        }
        self.close(out);
        let u = usage(self.usage.as_ref());
        an::Event::MessageDelta {
            delta: an::MessageDelta {
                stop_reason: Some(self.stop.unwrap_or("end_turn").into()),
                stop_sequence: None,
            },
            usage: Some(an::DeltaUsage {
                output_tokens: u.output_tokens,
                input_tokens: Some(u.input_tokens),
                cache_read_input_tokens: u.cache_read_input_tokens,
                cache_creation_input_tokens: u.cache_creation_input_tokens,
            }),
        }
        .write(out);
        an::Event::MessageStop.write(out);
        self.state = State::Done;
    }

    pub fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.state != State::Open || data.is_empty() {
            return;
        }
        if data == b"[DONE]" {
            self.complete(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<oa::Chunk>(data) else {
            return;
        };
        if let Some(e) = chunk.error {
            let message = e["message"]
                .as_str()
                .unwrap_or("The upstream failed mid-stream.");
            self.fail(message, out);
            return;
        }
        if !self.started {
            self.start(&chunk.id, &chunk.model, out);
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        let Some(choice) = chunk.choices.into_iter().find(|c| c.index == 0) else {
            return;
        };
        let d = choice.delta;
        if let Some(thinking) = d.reasoning_content.filter(|t| !t.is_empty()) {
            if self.open != Open::Thinking {
                let block = Block::Thinking {
                    thinking: String::new(),
                    signature: String::new(),
                };
                self.open_block(Open::Thinking, block, out);
            }
            self.delta(an::Delta::ThinkingDelta { thinking }, out);
        }
        if let Some(text) = d.content.filter(|t| !t.is_empty()) {
            if self.open != Open::Text {
                self.open_block(
                    Open::Text,
                    Block::Text {
                        text: String::new(),
                    },
                    out,
                );
            }
            self.delta(an::Delta::TextDelta { text }, out);
        }
        for call in d.tool_calls.unwrap_or_default() {
            let oi = call.index;
            if self.open != Open::Tool(oi) {
                if self.closed.contains(&oi) {
                    // Anthropic blocks cannot interleave: arguments for a call already
                    // closed cannot be placed. Fail loudly rather than mix them up.
                    self.fail("The upstream interleaved the arguments of parallel tool calls, which cannot be translated.", out);
                    return;
                }
                let block = Block::ToolUse {
                    id: call.id.clone().unwrap_or_else(|| format!("call_{oi}")),
                    name: call.function.name.clone().unwrap_or_default(),
                    input: Value::Object(Default::default()),
                };
                self.open_block(Open::Tool(oi), block, out);
            }
            if let Some(partial_json) = call.function.arguments.filter(|a| !a.is_empty()) {
                self.delta(an::Delta::InputJsonDelta { partial_json }, out);
            }
        }
        if let Some(reason) = choice.finish_reason {
            self.close(out);
            self.stop = Some(stop_reason(Some(&reason)));
        }
    }
}
