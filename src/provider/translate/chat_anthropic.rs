//! An OpenAI chat client served by an Anthropic upstream: the request to Anthropic's
//! messages format, the answer and stream events back to chat completions.

use super::State;
use super::{refuse, Target};
use crate::provider::anthropic::{self as an, Block};
use crate::provider::openai::{self as oa, DeltaOut, FunctionDeltaOut, ToolDeltaOut};
use serde_json::Value;

/// Thinking budgets for `reasoning_effort` (Anthropic needs at least 1,024).
fn thinking_budget(effort: &str) -> Option<u64> {
    match effort {
        "low" => Some(1024),
        "medium" => Some(4096),
        "high" => Some(16384),
        _ => None,
    }
}

pub fn request(body: &[u8], target: &Target) -> Result<Vec<u8>, String> {
    let req: oa::ChatRequest = serde_json::from_slice(body)
        .map_err(|e| format!("Request body is not a valid chat request: {e}"))?;
    if let Some((field, why)) = req.untranslatable() {
        return Err(refuse(field, "Anthropic", why));
    }
    let max_tokens = req.budget().unwrap_or(target.default_max_tokens);
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<an::Message> = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let at = |what: &str| format!("messages[{i}]: {what}");
        match m.role.as_str() {
            "system" | "developer" => {
                if let Some(c) = m.content {
                    system.push(c.text().map_err(|e| at(&e))?);
                }
            }
            "user" => {
                let blocks = match m.content {
                    Some(c) => user_blocks(c).map_err(|e| at(&e))?,
                    None => Vec::new(),
                };
                push(&mut messages, "user", blocks);
            }
            "assistant" => {
                let mut blocks = Vec::new();
                if let Some(c) = m.content {
                    let text = c.text().map_err(|e| at(&e))?;
                    if !text.is_empty() {
                        blocks.push(Block::Text { text });
                    }
                }
                for call in m.tool_calls.unwrap_or_default() {
                    let input = arguments(&call.function.arguments)
                        .map_err(|e| at(&format!("tool call `{}`: {e}", call.id)))?;
                    blocks.push(Block::ToolUse {
                        id: call.id,
                        name: call.function.name,
                        input,
                    });
                }
                push(&mut messages, "assistant", blocks);
            }
            "tool" => {
                let id = m
                    .tool_call_id
                    .ok_or_else(|| at("a tool message needs tool_call_id"))?;
                let text = match m.content {
                    Some(c) => c.text().map_err(|e| at(&e))?,
                    None => String::new(),
                };
                let block = Block::ToolResult {
                    tool_use_id: id,
                    content: Some(an::ToolResultContent::Text(text)),
                    is_error: None,
                };
                push(&mut messages, "user", vec![block]);
            }
            other => return Err(at(&format!("role `{other}` is not known"))),
        }
    }
    let mut tool_choice = match req.tool_choice {
        None => None,
        Some(oa::ToolChoice::Mode(mode)) => Some(an::ToolChoice {
            kind: match mode.as_str() {
                "auto" => "auto",
                "required" => "any",
                "none" => "none",
                other => return Err(format!("tool_choice `{other}` is not known.")),
            }
            .into(),
            ..Default::default()
        }),
        Some(oa::ToolChoice::Named { function, .. }) => Some(an::ToolChoice {
            kind: "tool".into(),
            name: Some(function.name),
            ..Default::default()
        }),
    };
    let tools = match req.tools {
        None => None,
        Some(tools) => Some(
            tools
                .into_iter()
                .map(|t| {
                    if t.kind != "function" {
                        return Err(refuse(
                            "tools",
                            "Anthropic",
                            "only function tools are translated",
                        ));
                    }
                    Ok(an::Tool {
                        name: t.function.name,
                        description: t.function.description,
                        input_schema: Some(t.function.parameters.unwrap_or_else(
                            || serde_json::json!({"type": "object", "properties": {}}),
                        )),
                        kind: None,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    if req.parallel_tool_calls == Some(false) && tools.is_some() {
        tool_choice
            .get_or_insert_with(|| an::ToolChoice {
                kind: "auto".into(),
                ..Default::default()
            })
            .disable_parallel_tool_use = Some(true);
    }
    if let Some(t) = req.temperature.filter(|t| *t > 1.0) {
        return Err(format!(
            "temperature {t} cannot be sent to an Anthropic upstream: its range is 0 to 1."
        ));
    }
    let thinking = match req.reasoning_effort.as_deref().and_then(thinking_budget) {
        None => None,
        Some(_) if max_tokens <= 1024 => {
            return Err(
                "reasoning_effort on an Anthropic upstream needs max_completion_tokens above 1024 (the thinking budget must be below it)."
                    .into(),
            )
        }
        Some(budget) => Some(an::Thinking {
            kind: "enabled".into(),
            budget_tokens: Some(budget.min(max_tokens - 1)),
        }),
    };
    let out = an::Request {
        model: target.model.to_string(),
        max_tokens: Some(max_tokens),
        messages,
        system: (!system.is_empty()).then(|| an::Content::Text(system.join("\n"))),
        stop_sequences: req.stop.map(oa::Stop::into_vec),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: None,
        stream: req.stream,
        metadata: req.user.map(|u| an::Metadata { user_id: Some(u) }),
        tools,
        tool_choice,
        thinking,
    };
    serde_json::to_vec(&out).map_err(|e| e.to_string())
}

/// Appends blocks to the last message when it has the same role (Anthropic wants the
/// turns to alternate, and the results of one assistant turn's tool calls in one user
/// turn).
fn push(messages: &mut Vec<an::Message>, role: &str, blocks: Vec<Block>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut().filter(|m| m.role == role) {
        let content = std::mem::replace(&mut last.content, an::Content::Blocks(Vec::new()));
        let mut merged = content.into_blocks();
        merged.extend(blocks);
        last.content = an::Content::Blocks(merged);
        return;
    }
    messages.push(an::Message {
        role: role.into(),
        content: an::Content::Blocks(blocks),
    });
}

fn user_blocks(content: oa::Content) -> Result<Vec<Block>, String> {
    match content {
        oa::Content::Text(text) => Ok(vec![Block::Text { text }]),
        oa::Content::Parts(parts) => parts
            .into_iter()
            .map(|p| match p {
                oa::Part::Text { text } => Ok(Block::Text { text }),
                oa::Part::ImageUrl { image_url } => Ok(Block::Image {
                    source: image_source(&image_url.url)?,
                }),
                oa::Part::Unsupported => {
                    Err("only text and image_url parts can be sent to an Anthropic upstream".into())
                }
            })
            .collect(),
    }
}

/// A data URL or an http(s) URL as an Anthropic image source.
fn image_source(url: &str) -> Result<an::ImageSource, String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or("an image data URL has no data")?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or("an image data URL must be base64")?;
        return Ok(an::ImageSource::Base64 {
            media_type: media_type.to_string(),
            data: data.to_string(),
        });
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(an::ImageSource::Url {
            url: url.to_string(),
        });
    }
    Err("an image URL must be https:// or a base64 data URL".into())
}

/// A tool call's arguments (a JSON string) as an object; empty means no arguments.
pub(super) fn arguments(text: &str) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(text).map_err(|_| "arguments are not JSON".to_string())
}

pub fn finish_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn usage(u: &an::Usage) -> oa::Usage {
    oa::Usage::new(
        u.all_input(),
        u.output_tokens,
        u.cache_read_input_tokens.unwrap_or(0),
        0,
    )
}

pub fn answer(body: &[u8], created: u64) -> Result<Vec<u8>, String> {
    let r: an::Response = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for block in r.content {
        match block {
            Block::Text { text: t } => text.push_str(&t),
            Block::Thinking { thinking, .. } => reasoning.push_str(&thinking),
            Block::ToolUse { id, name, input } => calls.push(oa::ToolCall {
                id,
                kind: "function".into(),
                function: oa::FunctionCall {
                    name,
                    arguments: input.to_string(),
                },
            }),
            _ => {}
        }
    }
    let message = oa::Message {
        role: "assistant".into(),
        content: (!text.is_empty() || calls.is_empty()).then_some(oa::Content::Text(text)),
        tool_calls: (!calls.is_empty()).then_some(calls),
        tool_call_id: None,
        reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
    };
    let out = oa::Completion {
        id: r.id,
        object: "chat.completion".into(),
        created,
        model: r.model,
        choices: vec![oa::Choice {
            index: 0,
            message,
            finish_reason: Some(finish_reason(r.stop_reason.as_deref()).into()),
            logprobs: None,
        }],
        usage: Some(usage(&r.usage)),
    };
    serde_json::to_vec(&out).map_err(|e| e.to_string())
}

/// Anthropic stream events in, chat-completion chunks out, event by event.
pub struct Stream {
    head: oa::ChunkHead,
    include_usage: bool,
    /// Tool blocks: (Anthropic block index, OpenAI tool index, any argument sent).
    tools: Vec<(u32, u32, bool)>,
    usage: an::Usage,
    finished: bool,
    state: State,
}

impl Stream {
    pub fn new(created: u64, include_usage: bool) -> Stream {
        Stream {
            head: oa::ChunkHead::new(created),
            include_usage,
            tools: Vec::new(),
            usage: an::Usage::default(),
            finished: false,
            state: State::Open,
        }
    }

    /// Called at the end of the upstream body: whether the answer was complete (if not,
    /// an error event was written).
    pub fn end(&mut self, out: &mut Vec<u8>) -> bool {
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
            oa::write_stream_error(out, message, "api_error");
            self.state = State::Failed;
        }
    }

    fn block_delta(&mut self, d: an::TokenDelta<'_>, out: &mut Vec<u8>) {
        let raw = match d.kind {
            an::DeltaKind::Text => oa::RawDelta::Content(d.literal),
            an::DeltaKind::Thinking => oa::RawDelta::Reasoning(d.literal),
            an::DeltaKind::InputJson => {
                let Some(tool) = self.tools.iter_mut().find(|t| t.0 == d.index) else {
                    return;
                };
                if d.literal == b"\"\"" {
                    return;
                }
                tool.2 = true;
                oa::RawDelta::Arguments {
                    index: tool.1,
                    literal: d.literal,
                }
            }
        };
        self.head.write_raw(out, raw);
    }

    fn delta(&self, out: &mut Vec<u8>, delta: DeltaOut<'_>) {
        self.head.write(out, delta, None);
    }

    fn tool_delta(&self, out: &mut Vec<u8>, tool: ToolDeltaOut<'_>) {
        self.delta(
            out,
            DeltaOut {
                tool_calls: Some([tool]),
                ..Default::default()
            },
        );
    }

    pub fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.state != State::Open || data.is_empty() {
            return;
        }
        // The per-token event first, its text copied as it is; then any other.
        if let Some(d) = an::token_delta(data) {
            self.block_delta(d, out);
            return;
        }
        // Unknown event types (added by later API versions) are skipped.
        let Some(event) = an::Event::read(data) else {
            return;
        };
        match event {
            an::Event::MessageStart { message } => {
                self.head.start(&message.id, &message.model);
                self.usage = message.usage;
                self.delta(
                    out,
                    DeltaOut {
                        role: Some("assistant"),
                        content: Some(""),
                        ..Default::default()
                    },
                );
            }
            an::Event::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                Block::Text { text } if !text.is_empty() => self.delta(
                    out,
                    DeltaOut {
                        content: Some(&text),
                        ..Default::default()
                    },
                ),
                Block::Thinking { thinking, .. } if !thinking.is_empty() => self.delta(
                    out,
                    DeltaOut {
                        reasoning_content: Some(&thinking),
                        ..Default::default()
                    },
                ),
                Block::ToolUse { id, name, .. } => {
                    let oi = self.tools.len() as u32;
                    self.tools.push((index, oi, false));
                    self.tool_delta(
                        out,
                        ToolDeltaOut {
                            index: oi,
                            id: Some(&id),
                            kind: Some("function"),
                            function: FunctionDeltaOut {
                                name: Some(&name),
                                arguments: Some(""),
                            },
                        },
                    );
                }
                _ => {}
            },
            an::Event::ContentBlockDelta { index, delta } => {
                let (kind, text) = match &delta {
                    an::Delta::TextDelta { text } => (an::DeltaKind::Text, text),
                    an::Delta::ThinkingDelta { thinking } => (an::DeltaKind::Thinking, thinking),
                    an::Delta::InputJsonDelta { partial_json } => {
                        (an::DeltaKind::InputJson, partial_json)
                    }
                    _ => return,
                };
                let literal = serde_json::to_string(text).unwrap_or_default();
                self.block_delta(
                    an::TokenDelta {
                        index,
                        kind,
                        literal: literal.as_bytes(),
                    },
                    out,
                );
            }
            an::Event::ContentBlockStop { index } => {
                // A tool called without arguments still ends with `{}`: SDKs parse the
                // arguments, and "" is not JSON.
                if let Some(&(_, oi, false)) = self.tools.iter().find(|t| t.0 == index) {
                    self.tool_delta(
                        out,
                        ToolDeltaOut {
                            index: oi,
                            id: None,
                            kind: None,
                            function: FunctionDeltaOut {
                                name: None,
                                arguments: Some("{}"),
                            },
                        },
                    );
                }
            }
            an::Event::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    self.usage.output_tokens = u.output_tokens;
                    if let Some(n) = u.input_tokens {
                        self.usage.input_tokens = n;
                    }
                    if u.cache_read_input_tokens.is_some() {
                        self.usage.cache_read_input_tokens = u.cache_read_input_tokens;
                    }
                    if u.cache_creation_input_tokens.is_some() {
                        self.usage.cache_creation_input_tokens = u.cache_creation_input_tokens;
                    }
                }
                if delta.stop_reason.is_some() && !self.finished {
                    self.finished = true;
                    let reason = finish_reason(delta.stop_reason.as_deref());
                    self.head.write(out, DeltaOut::default(), Some(reason));
                }
            }
            an::Event::MessageStop => {
                if !self.finished {
                    self.finished = true;
                    self.head.write(out, DeltaOut::default(), Some("stop"));
                }
                if self.include_usage {
                    self.head.write_usage(out, &usage(&self.usage));
                }
                out.extend_from_slice(oa::DONE);
                self.state = State::Done;
            }
            an::Event::Ping => {}
            an::Event::Error { error } => {
                oa::write_stream_error(out, &error.message, &error.kind);
                self.state = State::Failed;
            }
        }
    }
}
