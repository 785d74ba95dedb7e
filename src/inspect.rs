//! Stage 7 (inside the attempt loop): judging an attempt before anything reaches the
//! client. A transport failure before any response moves on to the next target; an
//! upstream response is delivered. It only classifies: it neither sends nor waits.

use crate::forward::{Sent, TransportError};

/// What the attempt loop does with an attempt's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Relay this response to the client.
    Deliver,
    /// Try the next target; the string is the outcome recorded for the attempt.
    NextTarget(&'static str),
}

/// Judges an upstream response by its status and headers.
pub fn judge_response(_sent: &Sent) -> Verdict {
    Verdict::Deliver
}

/// Judges an attempt that got no response: every transport failure moves on, since
/// nothing reached the client. Returns the outcome recorded for the attempt.
pub fn judge_transport(error: &TransportError) -> &'static str {
    error.kind()
}
