//! An OpenAI chat client served by a Gemini upstream: the request to `generateContent`,
//! the answer and each streamed partial answer back to chat completions.

use super::State;
use super::{refuse, Target};
use crate::provider::gemini as gm;
use crate::provider::openai::{self as oa, DeltaOut, FunctionDeltaOut, ToolDeltaOut};
use serde_json::Value;

fn thinking_budget(effort: &str) -> Option<u64> {
    match effort {
        "none" | "minimal" => Some(0),
        "low" => Some(1024),
        "medium" => Some(8192),
        "high" => Some(24576),
        _ => None,
    }
}

fn text_part(text: String) -> gm::Part {
    gm::Part {
        text: Some(text),
        ..Default::default()
    }
}

/// The path after the base URL, and the query, for `model`.
pub fn path(model: &str, stream: bool) -> (String, Option<&'static str>) {
    if stream {
        (
            format!("/models/{model}:streamGenerateContent"),
            Some("alt=sse"),
        )
    } else {
        (format!("/models/{model}:generateContent"), None)
    }
}

pub fn request(body: &[u8], _target: &Target) -> Result<(Vec<u8>, bool), String> {
    let req: oa::ChatRequest = serde_json::from_slice(body)
        .map_err(|e| format!("Request body is not a valid chat request: {e}"))?;
    if let Some((field, why)) = req.untranslatable() {
        return Err(refuse(field, "Gemini", why));
    }
    let budget = req.budget();
    let mut system: Vec<gm::Part> = Vec::new();
    let mut contents: Vec<gm::Content> = Vec::with_capacity(req.messages.len());
    // Gemini's function responses name the function, not the call: remember the names.
    let mut names: Vec<(String, String)> = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let at = |what: &str| format!("messages[{i}]: {what}");
        match m.role.as_str() {
            "system" | "developer" => {
                if let Some(c) = m.content {
                    system.push(text_part(c.text().map_err(|e| at(&e))?));
                }
            }
            "user" => {
                let parts = match m.content {
                    None => Vec::new(),
                    Some(oa::Content::Text(t)) => vec![text_part(t)],
                    Some(oa::Content::Parts(parts)) => parts
                        .into_iter()
                        .map(|p| match p {
                            oa::Part::Text { text } => Ok(text_part(text)),
                            oa::Part::ImageUrl { image_url } => inline_image(&image_url.url),
                            oa::Part::Unsupported => Err(
                                "only text and image_url parts can be sent to a Gemini upstream"
                                    .to_string(),
                            ),
                        })
                        .collect::<Result<_, _>>()
                        .map_err(|e| at(&e))?,
                };
                push(&mut contents, "user", parts);
            }
            "assistant" => {
                let mut parts = Vec::new();
                if let Some(c) = m.content {
                    let text = c.text().map_err(|e| at(&e))?;
                    if !text.is_empty() {
                        parts.push(text_part(text));
                    }
                }
                for call in m.tool_calls.unwrap_or_default() {
                    let args = super::chat_anthropic::arguments(&call.function.arguments)
                        .map_err(|e| at(&format!("tool call `{}`: {e}", call.id)))?;
                    let thought_signature = signature_of(&call.id);
                    names.push((call.id, call.function.name.clone()));
                    parts.push(gm::Part {
                        function_call: Some(gm::FunctionCall {
                            name: call.function.name,
                            args,
                            id: None,
                        }),
                        thought_signature,
                        ..Default::default()
                    });
                }
                push(&mut contents, "model", parts);
            }
            "tool" => {
                let id = m
                    .tool_call_id
                    .ok_or_else(|| at("a tool message needs tool_call_id"))?;
                let name = names
                    .iter()
                    .rev()
                    .find(|(call, _)| *call == id)
                    .map(|(_, name)| name.clone())
                    .ok_or_else(|| {
                        at(&format!("tool_call_id `{id}` matches no earlier tool call"))
                    })?;
                let text = match m.content {
                    Some(c) => c.text().map_err(|e| at(&e))?,
                    None => String::new(),
                };
                // A JSON object result is passed as it is; anything else as `content`.
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => serde_json::json!({ "content": text }),
                };
                let part = gm::Part {
                    function_response: Some(gm::FunctionResponse { name, response }),
                    ..Default::default()
                };
                push(&mut contents, "user", vec![part]);
            }
            other => return Err(at(&format!("role `{other}` is not known"))),
        }
    }
    let tools = req.tools.map(|tools| {
        vec![gm::Tool {
            function_declarations: tools
                .into_iter()
                .map(|t| gm::FunctionDeclaration {
                    name: t.function.name,
                    description: t.function.description,
                    parameters_json_schema: t.function.parameters,
                })
                .collect(),
        }]
    });
    let tool_config = match req.tool_choice {
        None => None,
        Some(oa::ToolChoice::Mode(mode)) => Some(gm::FunctionCallingConfig {
            mode: match mode.as_str() {
                "auto" => "AUTO",
                "required" => "ANY",
                "none" => "NONE",
                other => return Err(format!("tool_choice `{other}` is not known.")),
            }
            .into(),
            allowed_function_names: None,
        }),
        Some(oa::ToolChoice::Named { function, .. }) => Some(gm::FunctionCallingConfig {
            mode: "ANY".into(),
            allowed_function_names: Some(vec![function.name]),
        }),
    }
    .map(|c| gm::ToolConfig {
        function_calling_config: c,
    });
    let generation = gm::GenerationConfig {
        max_output_tokens: budget,
        temperature: req.temperature,
        top_p: req.top_p,
        stop_sequences: req.stop.map(oa::Stop::into_vec),
        thinking_config: req
            .reasoning_effort
            .as_deref()
            .and_then(thinking_budget)
            .map(|b| gm::ThinkingConfig {
                thinking_budget: b,
                include_thoughts: b > 0,
            }),
    };
    let out = gm::Request {
        contents,
        system_instruction: (!system.is_empty()).then_some(gm::Content {
            role: None,
            parts: system,
        }),
        tools,
        tool_config,
        generation_config: Some(generation),
    };
    let body = serde_json::to_vec(&out).map_err(|e| e.to_string())?;
    Ok((body, req.stream))
}

fn push(contents: &mut Vec<gm::Content>, role: &str, parts: Vec<gm::Part>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents
        .last_mut()
        .filter(|c| c.role.as_deref() == Some(role))
    {
        last.parts.extend(parts);
        return;
    }
    contents.push(gm::Content {
        role: Some(role.into()),
        parts,
    });
}

fn inline_image(url: &str) -> Result<gm::Part, String> {
    let rest = url.strip_prefix("data:").ok_or(
        "a Gemini upstream takes images as base64 data URLs only (it cannot fetch an https URL)",
    )?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or("an image data URL has no data")?;
    let mime_type = meta
        .strip_suffix(";base64")
        .ok_or("an image data URL must be base64")?;
    Ok(gm::Part {
        inline_data: Some(gm::Blob {
            mime_type: mime_type.into(),
            data: data.into(),
        }),
        ..Default::default()
    })
}

fn usage(u: &gm::UsageMetadata) -> oa::Usage {
    oa::Usage::new(
        u.prompt_token_count,
        u.candidates_token_count + u.thoughts_token_count,
        u.cached_content_token_count,
        u.thoughts_token_count,
    )
}

/// A call id for a function call (Gemini's carry none, or an id of their own).
/// Between a tool call's id and the Gemini thought signature carried in it: Gemini needs
/// the signature of each function call back with the call on the next turn, and an OpenAI
/// client keeps nothing of a call but its id, name and arguments.
const SIGNATURE: &str = "__thought__";

/// A tool call id for the client, carrying the call's thought signature if it has one.
fn signed(id: String, signature: Option<&str>) -> String {
    match signature.filter(|s| !s.is_empty()) {
        Some(s) => format!("{id}{SIGNATURE}{s}"),
        None => id,
    }
}

/// The thought signature a client's tool call id carries.
fn signature_of(id: &str) -> Option<String> {
    id.split_once(SIGNATURE)
        .map(|(_, s)| s.to_string())
        .filter(|s| !s.is_empty())
}

fn call_id(response_id: Option<&str>, created: u64, index: usize) -> String {
    match response_id {
        Some(r) => format!("call_{r}_{index}"),
        None => format!("call_{created:x}_{index}"),
    }
}

pub fn answer(body: &[u8], created: u64) -> Result<Vec<u8>, String> {
    let r: gm::Response = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    let candidate = r.candidates.into_iter().next();
    let finish = candidate.as_ref().and_then(|c| c.finish_reason.clone());
    for part in candidate
        .and_then(|c| c.content)
        .map(|c| c.parts)
        .unwrap_or_default()
    {
        if let Some(call) = part.function_call {
            let id = call
                .id
                .unwrap_or_else(|| call_id(r.response_id.as_deref(), created, calls.len()));
            calls.push(oa::ToolCall {
                id: signed(id, part.thought_signature.as_deref()),
                kind: "function".into(),
                function: oa::FunctionCall {
                    name: call.name,
                    arguments: call.args.to_string(),
                },
            });
        } else if let Some(t) = part.text {
            if part.thought == Some(true) {
                reasoning.push_str(&t);
            } else {
                text.push_str(&t);
            }
        }
    }
    let finish_reason = match (&finish, r.prompt_feedback.is_some()) {
        (None, true) => "content_filter",
        (reason, _) => gm::finish_reason(reason.as_deref().unwrap_or("STOP"), !calls.is_empty()),
    };
    let message = oa::Message {
        role: "assistant".into(),
        content: (!text.is_empty() || calls.is_empty()).then_some(oa::Content::Text(text)),
        tool_calls: (!calls.is_empty()).then_some(calls),
        tool_call_id: None,
        reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
    };
    let out = oa::Completion {
        id: r.response_id.unwrap_or_default(),
        object: "chat.completion".into(),
        created,
        model: r.model_version.unwrap_or_default(),
        choices: vec![oa::Choice {
            index: 0,
            message,
            finish_reason: Some(finish_reason.into()),
            logprobs: None,
        }],
        usage: r.usage_metadata.as_ref().map(usage),
    };
    serde_json::to_vec(&out).map_err(|e| e.to_string())
}

/// Gemini's streamed partial answers in, chat-completion chunks out.
pub struct Stream {
    head: oa::ChunkHead,
    include_usage: bool,
    started: bool,
    calls: u32,
    finish: Option<&'static str>,
    usage: Option<gm::UsageMetadata>,
    state: State,
}

impl Stream {
    pub fn new(created: u64, include_usage: bool) -> Stream {
        Stream {
            head: oa::ChunkHead::new(created),
            include_usage,
            started: false,
            calls: 0,
            finish: None,
            usage: None,
            state: State::Open,
        }
    }

    /// At the end of the upstream body (Gemini sends no end marker: the answer is complete
    /// when a finish reason came).
    pub fn end(&mut self, out: &mut Vec<u8>) -> bool {
        if self.state == State::Open {
            match self.finish {
                Some(reason) => {
                    self.head.write(out, DeltaOut::default(), Some(reason));
                    if self.include_usage {
                        let u = self.usage.as_ref().map(usage).unwrap_or_default();
                        self.head.write_usage(out, &u);
                    }
                    out.extend_from_slice(oa::DONE);
                    self.state = State::Done;
                }
                None => self.fail(
                    "The upstream stream ended before the answer was complete.",
                    out,
                ),
            }
        }
        self.state == State::Done
    }

    pub fn fail(&mut self, message: &str, out: &mut Vec<u8>) {
        if self.state == State::Open {
            oa::write_stream_error(out, message, "api_error");
            self.state = State::Failed;
        }
    }

    pub fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.state != State::Open || data.is_empty() {
            return;
        }
        let Ok(r) = serde_json::from_slice::<gm::Response>(data) else {
            return;
        };
        if r.candidates.is_empty() && r.usage_metadata.is_none() {
            if let Some((status, message)) = gm::read_error(data) {
                self.fail(&format!("{status}: {message}"), out);
            }
            return;
        }
        if !self.started {
            self.started = true;
            self.head.start(
                r.response_id.as_deref().unwrap_or_default(),
                r.model_version.as_deref().unwrap_or_default(),
            );
            let role = DeltaOut {
                role: Some("assistant"),
                content: Some(""),
                ..Default::default()
            };
            self.head.write(out, role, None);
        }
        if r.usage_metadata.is_some() {
            self.usage = r.usage_metadata;
        }
        let Some(candidate) = r.candidates.into_iter().next() else {
            return;
        };
        for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
            if let Some(call) = part.function_call {
                let id = call.id.unwrap_or_else(|| {
                    call_id(
                        r.response_id.as_deref(),
                        self.head.created(),
                        self.calls as usize,
                    )
                });
                let id = signed(id, part.thought_signature.as_deref());
                let arguments = call.args.to_string();
                let tool = ToolDeltaOut {
                    index: self.calls,
                    id: Some(&id),
                    kind: Some("function"),
                    function: FunctionDeltaOut {
                        name: Some(&call.name),
                        arguments: Some(if call.args.is_null() {
                            "{}"
                        } else {
                            &arguments
                        }),
                    },
                };
                self.calls += 1;
                let delta = DeltaOut {
                    tool_calls: Some([tool]),
                    ..Default::default()
                };
                self.head.write(out, delta, None);
            } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                let delta = if part.thought == Some(true) {
                    DeltaOut {
                        reasoning_content: Some(&text),
                        ..Default::default()
                    }
                } else {
                    DeltaOut {
                        content: Some(&text),
                        ..Default::default()
                    }
                };
                self.head.write(out, delta, None);
            }
        }
        if let Some(reason) = candidate.finish_reason {
            self.finish = Some(gm::finish_reason(&reason, self.calls > 0));
        }
    }
}
