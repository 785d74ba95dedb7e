//! Reading the request body: up to `server.max_body_size` (413), with `Expect:
//! 100-continue` answered, stalls past `server.body_timeout` answered 408 and broken
//! chunked framing 400; and, after an early answer, draining what the client still sends.

use super::Outcome;
use crate::clock::within;
use crate::error::GatewayError;
use bytes::{Bytes, BytesMut};
use pingora_core::{Error, ErrorType};
use pingora_proxy::Session;
use std::time::Duration;

/// How long, and how much, the gateway keeps reading a body it answered early.
const LINGER_TIME: Duration = Duration::from_secs(10);
const LINGER_BYTES: usize = 64 << 20;

/// After an answer sent before the request body was read (413, 401, 429, ...), reads and
/// discards what the client is still sending, for a bounded time and size, the way
/// nginx's lingering close does. Closing at once would reset the connection while the
/// client writes, and most clients (Python's, so the OpenAI SDK) send the whole body
/// before reading: they would see a broken pipe instead of the answer, and retry.
pub(super) async fn linger(session: &mut Session) {
    if expects_continue(session) && session.body_bytes_read() == 0 {
        // It was told no (no 100 Continue): it sends no body.
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut drained = 0;
    while drained <= LINGER_BYTES {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => drained += chunk.len(),
            _ => return,
        }
    }
}

/// Whether the client waits for `100 Continue` before sending its body.
fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Pingora's error for chunked framing it cannot parse.
const INVALID_CHUNK: ErrorType = ErrorType::new("InvalidChunk");

/// What a failed body read means for the client: a stall past `server.body_timeout`
/// (408, timed by `read_body` itself) and broken chunked framing (400) are answered; a
/// connection that broke is not.
fn body_error(e: Box<Error>) -> Outcome {
    match &e.etype {
        t if *t == INVALID_CHUNK => Outcome::Refused(GatewayError::BadRequest(
            "The request body's chunked framing is malformed.".into(),
        )),
        _ => Outcome::Aborted(e),
    }
}

/// A body that paused longer than `timeout`: 408.
fn body_timed_out(timeout: Duration) -> Outcome {
    if let Some(m) = crate::metrics::get() {
        m.client_timeouts.with_label_values(&["body"]).inc();
    }
    Outcome::Refused(GatewayError::RequestTimeout {
        secs: timeout.as_secs(),
    })
}

/// Reads the whole request body, refusing more than `limit` bytes. Answers
/// `Expect: 100-continue` first (after authentication), since clients otherwise wait
/// before sending large bodies.
pub(super) async fn read_body(
    session: &mut Session,
    limit: u64,
    gap: Duration,
) -> Result<Bytes, Outcome> {
    let too_large = || GatewayError::BodyTooLarge { limit };
    // With Transfer-Encoding too, Pingora has already dropped the length (RFC 9112 6.1).
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large().into());
    }
    if expects_continue(session) {
        // Writing 100 makes Pingora treat the response as started early and close the
        // client connection at the end, unless this is turned off around it.
        session.set_close_on_response_before_downstream_finish(false);
        session.write_continue_response().await?;
        session.set_close_on_response_before_downstream_finish(true);
    }
    // Each read may pause at most `gap`. A body that came in one piece (the usual case:
    // it arrived with the header) is returned as that piece, without a copy.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    loop {
        let chunk = within(gap, session.read_request_body())
            .await
            .ok_or_else(|| body_timed_out(gap))?
            .map_err(body_error)?;
        let Some(chunk) = chunk else { break };
        let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
        if (held + chunk.len()) as u64 > limit {
            return Err(too_large().into());
        }
        if first.is_none() && buf.is_empty() {
            first = Some(chunk);
            continue;
        }
        if let Some(earlier) = first.take() {
            let size = declared.unwrap_or(16 * 1024).min(limit) as usize;
            buf.reserve(size.max(earlier.len() + chunk.len()));
            buf.extend_from_slice(&earlier);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}
