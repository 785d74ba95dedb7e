//! Translation between wire formats, so one alias can mix providers: an OpenAI chat
//! client served by Anthropic or Gemini, an Anthropic messages client served by an
//! OpenAI-compatible fleet. Pure functions from bytes to bytes: the request for one
//! attempt (built from the client's original body each time, so failover can cross
//! formats), the answer, an error answer, and one streaming state machine per direction
//! that turns upstream events into client events as they arrive. Usage is read from the
//! upstream's own bytes elsewhere (`relay::usage`), so accounting never depends on this.

pub mod anthropic_chat;
pub mod chat_anthropic;
pub mod chat_gemini;
#[cfg(test)]
mod tests;

use super::{anthropic, gemini, openai, sse, Provider};

/// A client format served by an upstream of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// `/v1/chat/completions` to Anthropic's `/v1/messages`.
    ChatToMessages,
    /// `/v1/messages` to an OpenAI-compatible `/v1/chat/completions`.
    MessagesToChat,
    /// `/v1/chat/completions` to Gemini's `generateContent`.
    ChatToGemini,
}

/// How a request to an endpoint reaches an upstream of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// As it is.
    Direct,
    Translated(Translation),
    /// Not at all: the route is skipped.
    Unserved,
}

impl Path {
    /// `suffix` is the client's path after `/v1`.
    pub fn of(suffix: &str, provider: Provider) -> Path {
        use Provider::*;
        match (suffix, provider) {
            ("/chat/completions", Anthropic) => Path::Translated(Translation::ChatToMessages),
            ("/chat/completions", Gemini) => Path::Translated(Translation::ChatToGemini),
            ("/messages" | "/messages/count_tokens", Anthropic) => Path::Direct,
            ("/messages", Openai | Azure | Generic) => {
                Path::Translated(Translation::MessagesToChat)
            }
            ("/messages" | "/messages/count_tokens", _) => Path::Unserved,
            (_, Anthropic | Gemini) => Path::Unserved,
            _ => Path::Direct,
        }
    }

    pub fn serves(self) -> bool {
        self != Path::Unserved
    }
}

impl Translation {
    /// The name in the access log, usage rows and the metric label.
    pub fn label(self) -> &'static str {
        match self {
            Translation::ChatToMessages => "openai->anthropic",
            Translation::MessagesToChat => "anthropic->openai",
            Translation::ChatToGemini => "openai->gemini",
        }
    }

    /// Whether the client speaks Anthropic's format.
    pub fn anthropic_client(self) -> bool {
        self == Translation::MessagesToChat
    }

    /// The upstream request for one attempt, from the client's original body. Errors are
    /// client-facing messages (a 400).
    pub fn request(self, body: &[u8], target: &Target) -> Result<Outbound, String> {
        match self {
            Translation::ChatToMessages => Ok(Outbound {
                body: chat_anthropic::request(body, target)?,
                suffix: "/messages".into(),
                query: None,
            }),
            Translation::MessagesToChat => Ok(Outbound {
                body: anthropic_chat::request(body, target)?,
                suffix: "/chat/completions".into(),
                query: None,
            }),
            Translation::ChatToGemini => {
                let (body, stream) = chat_gemini::request(body, target)?;
                let (suffix, query) = chat_gemini::path(target.model, stream);
                Ok(Outbound {
                    body,
                    suffix,
                    query,
                })
            }
        }
    }

    /// A complete (non-streamed) successful answer in the client's format.
    pub fn answer(self, body: &[u8], created: u64) -> Result<Vec<u8>, String> {
        match self {
            Translation::ChatToMessages => chat_anthropic::answer(body, created),
            Translation::MessagesToChat => anthropic_chat::answer(body),
            Translation::ChatToGemini => chat_gemini::answer(body, created),
        }
    }

    /// An upstream error answer in the client's format, keeping its meaning.
    pub fn error(self, status: u16, body: &[u8]) -> Vec<u8> {
        let raw = || {
            let text = String::from_utf8_lossy(body);
            let text: String = text.chars().take(512).collect();
            format!("The upstream answered {status}: {text}")
        };
        match self {
            Translation::ChatToMessages => match anthropic::read_error(body) {
                Some((kind, message)) => openai::error_body(&message, &kind, None),
                None => openai::error_body(&raw(), "upstream_error", None),
            },
            Translation::ChatToGemini => match gemini::read_error(body) {
                Some((status_name, message)) => openai::error_body(
                    &message,
                    &status_name.to_ascii_lowercase(),
                    Some(&status_name),
                ),
                None => openai::error_body(&raw(), "upstream_error", None),
            },
            Translation::MessagesToChat => {
                let message = openai::read_error(body).map_or_else(raw, |(m, _)| m);
                anthropic::error_body(anthropic::error_type(status), &message)
            }
        }
    }

    /// The state machine for a streamed answer. `include_usage`: the client asked for the
    /// usage chunk (OpenAI clients).
    pub fn stream(self, created: u64, include_usage: bool) -> Stream {
        match self {
            Translation::ChatToMessages => Stream::new(Machine::FromMessages(
                chat_anthropic::Stream::new(created, include_usage),
            )),
            Translation::MessagesToChat => {
                Stream::new(Machine::ToMessages(anthropic_chat::Stream::default()))
            }
            Translation::ChatToGemini => Stream::new(Machine::FromGemini(
                chat_gemini::Stream::new(created, include_usage),
            )),
        }
    }
}

/// What the request of one attempt is built for.
pub struct Target<'a> {
    /// The model name the upstream is sent.
    pub model: &'a str,
    pub provider: Provider,
    /// `max_tokens` for Anthropic when the client set none (`budgets.default_max_tokens`).
    pub default_max_tokens: u64,
}

/// One attempt's upstream request.
#[derive(Debug)]
pub struct Outbound {
    pub body: Vec<u8>,
    /// The path after the upstream's base URL.
    pub suffix: String,
    pub query: Option<&'static str>,
}

/// Where a streamed translation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Events are being translated.
    Open,
    /// The answer was complete and its end marker written.
    Done,
    /// An error event was written; nothing follows it.
    Failed,
}

/// A streamed answer being translated: the upstream's bytes are split into events, and
/// each event goes to the machine for the direction.
pub struct Stream {
    reader: sse::Reader,
    machine: Machine,
}

enum Machine {
    FromMessages(chat_anthropic::Stream),
    ToMessages(anthropic_chat::Stream),
    FromGemini(chat_gemini::Stream),
}

impl Machine {
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            Machine::FromMessages(s) => s.event(data, out),
            Machine::ToMessages(s) => s.event(data, out),
            Machine::FromGemini(s) => s.event(data, out),
        }
    }
}

impl Stream {
    fn new(machine: Machine) -> Stream {
        Stream {
            reader: sse::Reader::default(),
            machine,
        }
    }

    /// Translates one upstream read; appends whatever client events it completes. Each
    /// upstream event's data is also shown to `seen` (the usage reader), so that the
    /// stream is split into events once.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>, mut seen: impl FnMut(&[u8])) {
        let machine = &mut self.machine;
        self.reader.feed(chunk, |e| {
            seen(&e.data);
            machine.event(&e.data, out);
        });
    }

    /// The upstream body ended: whether the answer was complete. When it was not, an
    /// error event in the client's format was appended, and no end marker. A last event
    /// without its blank line is shown to `seen` too.
    pub fn finish(&mut self, out: &mut Vec<u8>, mut seen: impl FnMut(&[u8])) -> bool {
        let machine = &mut self.machine;
        self.reader.finish(|e| {
            seen(&e.data);
            machine.event(&e.data, out);
        });
        match machine {
            Machine::FromMessages(s) => s.end(out),
            Machine::ToMessages(s) => s.end(out),
            Machine::FromGemini(s) => s.end(out),
        }
    }

    /// The upstream failed mid-stream: an error event in the client's format, once.
    pub fn fail(&mut self, message: &str, out: &mut Vec<u8>) {
        match &mut self.machine {
            Machine::FromMessages(s) => s.fail(message, out),
            Machine::ToMessages(s) => s.fail(message, out),
            Machine::FromGemini(s) => s.fail(message, out),
        }
    }
}

/// The message for a field another format cannot express.
pub(crate) fn refuse(field: &str, upstream: &str, why: &str) -> String {
    match article(upstream) {
        "" => format!("`{field}` cannot be sent to {upstream} upstream: {why}."),
        a => format!("`{field}` cannot be sent to {a} {upstream} upstream: {why}."),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with("an ") || word.starts_with("a ") {
        ""
    } else if word.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    }
}
