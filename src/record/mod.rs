//! What a request did, as the access log, the metrics, traces and usage rows record it:
//! each upstream attempt and how it ended, how the answer's relay ended, and the tokens
//! the answer used. The attempt loop and the relay fill these in; `observe` reads them,
//! without depending on either.

use crate::provider::inspect::Class;
use std::sync::{Arc, LazyLock};

/// `-`, the name and key id a request without a key is recorded under: one shared string,
/// so no request allocates it.
pub fn unnamed() -> Arc<str> {
    static DASH: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("-"));
    Arc::clone(&DASH)
}

/// One attempt as it appears in the access log and in an all-failed error.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The server's name (`upstream/server`) and its upstream's, shared with the config.
    pub target: Arc<str>,
    pub upstream: Arc<str>,
    pub outcome: AttemptOutcome,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    /// Which alias of the chain the attempt belonged to (0: the requested one).
    pub alias_index: usize,
    /// What a trace span of the attempt needs, when the request is traced.
    pub span: Option<Box<AttemptSpan>>,
}

/// An attempt as its trace span shows it.
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    pub id: crate::trace::SpanId,
    pub started: std::time::Instant,
    /// When its outcome was known (the response header, or the failure).
    pub ended: std::time::Instant,
    /// The model the upstream was asked for.
    pub model: String,
    pub provider: crate::provider::Provider,
    pub address: String,
    pub port: u16,
    /// The tier of its alias (0: the first).
    pub tier: usize,
}

/// How one attempt ended; named only where it is logged or counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttemptOutcome {
    /// The upstream answered; how its answer was classified.
    Answered(Class),
    /// No answer: the connection failed.
    Failed(TransportFailure),
}

impl AttemptOutcome {
    /// The name in the access log and the `outcome` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Answered(class) => class.outcome(),
            AttemptOutcome::Failed(f) => f.as_str(),
        }
    }
}

/// What kind of transport failure an attempt met, without its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    Unresolved,
    Connect,
    Timeout,
    Reset,
}

impl TransportFailure {
    /// Low-cardinality outcome name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportFailure::Unresolved => "unresolved",
            TransportFailure::Connect => "connect_error",
            TransportFailure::Timeout => "timeout",
            TransportFailure::Reset => "reset",
        }
    }
}

/// How a relayed response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    Complete,
    ClientGone,
    UpstreamError,
    UpstreamTimeout,
}

impl StreamEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::ClientGone => "client_disconnect",
            StreamEnd::UpstreamError => "upstream_error",
            StreamEnd::UpstreamTimeout => "upstream_timeout",
        }
    }
}

/// Tokens of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every input token, cached ones included (Anthropic's cache reads and writes are
    /// added to its `input_tokens`, so both dialects mean the same).
    pub input: u64,
    pub output: u64,
    /// Input tokens read from the provider's prompt cache (OpenAI
    /// `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`).
    pub cached: u64,
    /// Input tokens written to Anthropic's prompt cache for 5 minutes
    /// (`cache_creation.ephemeral_5m_input_tokens`, or all of
    /// `cache_creation_input_tokens` when it is not split).
    pub cache_write: u64,
    /// Input tokens written to Anthropic's prompt cache for an hour
    /// (`cache_creation.ephemeral_1h_input_tokens`).
    pub cache_write_1h: u64,
    /// Of the output, the tokens spent reasoning (OpenAI
    /// `completion_tokens_details.reasoning_tokens`, the Responses API's
    /// `output_tokens_details.reasoning_tokens`, Gemini `thoughtsTokenCount`); reported
    /// apart, priced as output. Anthropic counts thinking in `output_tokens` without a
    /// split.
    pub reasoning: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}
