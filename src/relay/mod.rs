//! Stage 8: relaying the chosen response to the client. Writes the response header
//! (hop-by-hop fields dropped, chunked framing added for HTTP/1.1 clients when the
//! upstream gave no length), then passes body chunks through as they arrive, racing each
//! upstream read against a client disconnect. Once the header is written there is no
//! retry: a failure mid-stream ends in an SSE error event (never a fake `[DONE]`) and an
//! error, so the client cannot mistake a cut stream for a complete one.

pub mod pricing;
pub(crate) mod respond;
pub(crate) mod translated;
pub mod usage;

use crate::relay::usage::{Usage, UsageScanner};
use crate::transport::h1::Head;
use crate::transport::headers::{
    connection_nominated, HOP_BY_HOP_NAMES, X_REQUEST_ID, X_TOLLGATE_ATTEMPTS, X_TOLLGATE_UPSTREAM,
    X_UPSTREAM_REQUEST_ID,
};
use crate::transport::pool::Connections;
use crate::transport::sent::Sent;
use bytes::{Bytes, BytesMut};
use http::HeaderName;
use http::HeaderValue;
use pingora_core::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use std::time::Duration;
use std::time::Instant;

pub use crate::record::StreamEnd;

/// What the relay observed, for the access log and metrics.
#[derive(Debug, Default)]
pub struct Relayed {
    pub status: u16,
    pub first_byte: Option<Instant>,
    pub bytes: usize,
    pub end: Option<StreamEnd>,
    /// Token usage found in the body.
    pub usage: Option<Usage>,
    /// The bytes the client received, kept for the response cache when asked.
    pub capture: Option<Capture>,
}

/// The body of a response as the client received it, up to `limit` bytes (past that,
/// nothing is kept: the answer is too large to cache).
#[derive(Debug, Default)]
pub struct Capture {
    pub chunks: Vec<Bytes>,
    bytes: usize,
    limit: usize,
    overflow: bool,
}

impl Capture {
    pub fn new(limit: usize) -> Self {
        Capture {
            limit,
            ..Capture::default()
        }
    }

    fn keep(&mut self, chunk: &Bytes) {
        if self.overflow {
            return;
        }
        if self.bytes + chunk.len() > self.limit {
            self.overflow = true;
            self.chunks = Vec::new();
            return;
        }
        self.bytes += chunk.len();
        self.chunks.push(chunk.clone());
    }

    /// The whole body, unless it was too large.
    pub fn body(&self) -> Option<Bytes> {
        (!self.overflow).then(|| Bytes::from(self.chunks.concat()))
    }
}

/// Labels the gateway adds to every relayed response.
pub struct Stamp<'a> {
    pub request_id: &'a str,
    pub target: &'a str,
    pub attempts: usize,
    /// Headers that replace the upstream's (the key's `x-ratelimit-*`).
    pub headers: &'a [(HeaderName, HeaderValue)],
}

/// The client's response header, derived from the upstream's: its field map is taken
/// over (hop-by-hop fields removed) rather than copied field by field, and handed to
/// Pingora without a case map, so no field is re-parsed or re-allocated.
pub fn downstream_header(up: Head, http1_client: bool, stamp: &Stamp) -> ResponseHeader {
    let Head {
        status,
        mut headers,
    } = up;
    headers.reserve(4 + stamp.headers.len());
    for name in connection_nominated(&headers) {
        headers.remove(name.as_str());
    }
    // Most responses carry one or two hop-by-hop fields: look them up once, remove those.
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|k| HOP_BY_HOP_NAMES.contains(k))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
    if let Some(upstream_id) = headers.remove(X_REQUEST_ID) {
        headers.insert(X_UPSTREAM_REQUEST_ID, upstream_id);
    }
    let mut set = |name: HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(X_REQUEST_ID, stamp.request_id);
    set(X_TOLLGATE_UPSTREAM, stamp.target);
    // Nearly always one digit: a static value, not an allocation.
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    let attempts = DIGITS.get(stamp.attempts).map_or_else(
        || HeaderValue::from(stamp.attempts),
        |d| HeaderValue::from_static(d),
    );
    headers.insert(X_TOLLGATE_ATTEMPTS, attempts);
    for (name, value) in stamp.headers {
        headers.insert(name.clone(), value.clone());
    }
    if http1_client && !headers.contains_key(http::header::CONTENT_LENGTH) {
        // Without a length or chunked framing the client would read until close, which
        // loses keep-alive and hides truncation.
        headers.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers;
    ResponseHeader::from(parts)
}

fn is_event_stream(h: &Head) -> bool {
    h.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// Removes the usage-only event (`"choices":[]` with a `usage` object) from an SSE stream
/// whose `include_usage` the gateway added, passing every other event on unchanged as soon
/// as it is complete. Each byte is searched once; an event that grows past
/// [`MAX_EVENT`] without ending turns the filter off for the rest of the stream (what is
/// held and everything after passes through as it is), so a stream that never ends an
/// event is neither held back nor buffered without bound.
#[derive(Default)]
pub struct UsageChunkFilter {
    pending: BytesMut,
    /// How much of `pending` was already searched for an event end.
    searched: usize,
    /// Past the cap: pass everything through.
    bypass: bool,
}

/// The largest SSE event the usage filter holds while waiting for its end.
pub const MAX_EVENT: usize = 1 << 20;

impl UsageChunkFilter {
    /// The complete events of `chunk` (and of what was pending) to pass on, if any.
    pub fn filter(&mut self, chunk: Bytes) -> Option<Bytes> {
        if self.bypass {
            return (!chunk.is_empty()).then_some(chunk);
        }
        self.pending.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        loop {
            // An end marker may straddle the previous search's edge: look 3 bytes back.
            let from = self.searched.saturating_sub(3);
            let Some(end) = event_end(&self.pending[from..]) else {
                self.searched = self.pending.len();
                break;
            };
            let event = self.pending.split_to(from + end);
            self.searched = 0;
            if !is_usage_only(&event) {
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > MAX_EVENT {
            self.bypass = true;
            out.extend_from_slice(&self.pending.split());
            self.pending = BytesMut::new();
            log::warn!(
                "an SSE event grew past {MAX_EVENT} bytes without ending: the usage filter passes the rest of this stream through unfiltered"
            );
            if let Some(m) = crate::metrics::get() {
                m.sse_filter_bypassed.inc();
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// Whatever is left at the end of the stream (an unterminated last event).
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }
}

/// The end of the first complete event (after its blank line), if there is one.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_usage_only(event: &[u8]) -> bool {
    let contains = |n: &[u8]| event.windows(n.len()).any(|w| w == n);
    if !contains(b"\"usage\"") || !contains(b"\"choices\"") {
        return false;
    }
    let text = String::from_utf8_lossy(event);
    let data = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .collect::<String>();
    serde_json::from_str::<serde_json::Value>(data.trim()).is_ok_and(|v| {
        v["choices"].as_array().is_some_and(|c| c.is_empty()) && v["usage"].is_object()
    })
}

/// The SSE event sent when the upstream fails after the stream began. SDKs raise it.
fn sse_error_event(message: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {"message": message, "type": "api_error", "param": null, "code": "upstream_stream_error"}
    });
    Bytes::from(format!("data: {body}\n\n"))
}

/// The answer to relay: the attempt's exchange, how long the upstream may pause, and
/// whether the gateway added `stream_options.include_usage` (then the usage chunk is not
/// the client's).
pub struct Answer {
    pub sent: Sent,
    pub idle_timeout: Duration,
    pub usage_added: bool,
    /// The answer is in another format than the client's, and whether an OpenAI client
    /// asked for the usage chunk.
    pub translation: Option<(crate::provider::translate::Translation, bool)>,
    /// The route's price: a whole (not streamed) answer it prices gets its cost in
    /// `x-tollgate-cost-usd`.
    pub price: Option<pricing::Price>,
    /// When a translated answer arrived, in seconds since the Unix epoch: its `created`
    /// (0 for an answer passed through, which keeps its own).
    pub created: u64,
}

/// The response field that carries what a whole answer cost.
pub const COST_HEADER: &str = "x-tollgate-cost-usd";

/// Micro-USD as the decimal `x-tollgate-cost-usd` carries (`0.002565`): exact, six places.
pub fn cost_value(micro: i64) -> HeaderValue {
    let m = micro.max(0) as u64;
    let mut s = String::with_capacity(24);
    crate::spec::text::push_u64(&mut s, m / 1_000_000);
    s.push('.');
    let fraction = m % 1_000_000;
    for scale in [100_000, 10_000, 1_000, 100, 10, 1] {
        s.push(char::from(b'0' + (fraction / scale % 10) as u8));
    }
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("0.000000"))
}

/// Reads the rest of a body into `chunks`, holding at most `limit` bytes: `Ok(true)` when
/// it ended, `Ok(false)` when it grew past the limit first, `Err` with how it ended when
/// the upstream failed or the client left.
pub(crate) async fn read_whole(
    session: &mut Session,
    up: &mut crate::transport::h1::Conn,
    chunks: &mut Vec<Bytes>,
    idle: Duration,
    limit: usize,
) -> Result<bool, StreamEnd> {
    let mut held: usize = chunks.iter().map(Bytes::len).sum();
    while held <= limit {
        let read = tokio::select! {
            biased;
            chunk = up.read_body(idle) => chunk,
            _ = session.downstream_session.read_body_or_idle(true) => return Err(StreamEnd::ClientGone),
        };
        match read {
            Ok(Some(chunk)) => {
                held += chunk.len();
                chunks.push(chunk);
            }
            Ok(None) => return Ok(true),
            Err(crate::transport::h1::Error::Timeout) => return Err(StreamEnd::UpstreamTimeout),
            Err(_) => return Err(StreamEnd::UpstreamError),
        }
    }
    Ok(false)
}

/// The largest whole answer held back to put its cost in its header.
const MAX_WHOLE: usize = 4 << 20;

/// Relays `answer`. `Ok` when the body completed; `Err` when it was cut, in which case
/// the connection to the client is not reused.
pub async fn relay(
    session: &mut Session,
    connections: &Connections,
    answer: Answer,
    stamp: &Stamp<'_>,
    relayed: &mut Relayed,
) -> pingora_core::Result<()> {
    if let Some((t, include_usage)) = answer.translation {
        // Boxed: the translator's state would otherwise make every relay, and so every
        // request held open, as large as a translated one.
        return Box::pin(translated::relay(
            session,
            connections,
            answer,
            t,
            include_usage,
            stamp,
            relayed,
        ))
        .await;
    }
    let Answer {
        mut sent,
        idle_timeout,
        usage_added,
        price,
        ..
    } = answer;
    let sse = is_event_stream(&sent.head);
    let mut usage = UsageScanner::new(sse);
    // The usage chunk the gateway asked for on the client's behalf is not passed on.
    let mut strip = (sse && usage_added).then(UsageChunkFilter::default);
    if strip.is_some() {
        // The client gets fewer bytes than the upstream sent.
        sent.head.headers.remove(http::header::CONTENT_LENGTH);
    }
    // Only the gateway says what an answer cost (an upstream may be another gateway).
    sent.head.headers.remove(COST_HEADER);
    let mut up = sent.conn;
    let mut ended = sent.ended;
    let mut early = None;
    let mut fed = false;
    if let Some(price) = price.filter(|_| !sse && (200..300).contains(&sent.head.status.as_u16())) {
        if !ended {
            // Read before the header so that it can carry the cost; past the bound, or
            // when the upstream fails, the answer is relayed as it comes.
            match read_whole(session, &mut up, &mut sent.prefix, idle_timeout, MAX_WHOLE).await {
                Ok(whole) => ended = whole,
                Err(end) => early = Some(end),
            }
        }
        if ended {
            for chunk in &sent.prefix {
                usage.feed(chunk);
            }
            fed = true;
            if let Some(u) = usage.finish() {
                sent.head
                    .headers
                    .insert(COST_HEADER, cost_value(price.cost(&u)));
            }
        }
    }
    let http1 = !session.is_http2();
    let header = downstream_header(sent.head, http1, stamp);
    relayed.status = header.status.as_u16();
    session
        .write_response_header(Box::new(header), false)
        .await?;

    for chunk in std::mem::take(&mut sent.prefix) {
        if !fed {
            usage.feed(&chunk);
        }
        if let Some(c) = relayed.capture.as_mut() {
            c.keep(&chunk);
        }
        relayed.bytes += chunk.len();
        relayed.first_byte.get_or_insert_with(Instant::now);
        if session
            .write_response_body(Some(chunk), false)
            .await
            .is_err()
        {
            relayed.end = Some(StreamEnd::ClientGone);
            return Error::e_explain(
                ErrorType::ConnectionClosed,
                "client disconnected mid-response",
            );
        }
    }
    let end = if let Some(end) = early {
        end
    } else if ended {
        StreamEnd::Complete
    } else {
        loop {
            let read = tokio::select! {
                biased;
                chunk = up.read_body(idle_timeout) => chunk,
                _ = session.downstream_session.read_body_or_idle(true) => break StreamEnd::ClientGone,
            };
            match read {
                Ok(Some(chunk)) => {
                    if relayed.first_byte.is_none() {
                        relayed.first_byte = Some(Instant::now());
                    }
                    usage.feed(&chunk);
                    let chunk = match strip.as_mut() {
                        Some(f) => match f.filter(chunk) {
                            Some(c) => c,
                            None => continue,
                        },
                        None => chunk,
                    };
                    relayed.bytes += chunk.len();
                    if let Some(c) = relayed.capture.as_mut() {
                        c.keep(&chunk);
                    }
                    if session
                        .write_response_body(Some(chunk), false)
                        .await
                        .is_err()
                    {
                        break StreamEnd::ClientGone;
                    }
                }
                Ok(None) => break StreamEnd::Complete,
                Err(crate::transport::h1::Error::Timeout) => break StreamEnd::UpstreamTimeout,
                Err(_) => break StreamEnd::UpstreamError,
            }
        }
    };
    relayed.end = Some(end);
    relayed.usage = usage.finish();
    match end {
        StreamEnd::Complete => {
            if let Some(rest) = strip.as_mut().and_then(UsageChunkFilter::finish) {
                relayed.bytes += rest.len();
                if let Some(c) = relayed.capture.as_mut() {
                    c.keep(&rest);
                }
                session.write_response_body(Some(rest), false).await?;
            }
            connections.give_back(up, sent.pool_key, idle_timeout);
            Ok(())
        }
        StreamEnd::ClientGone => {
            // Dropping the upstream connection is what stops the generation (and its cost).
            drop(up);
            Error::e_explain(
                ErrorType::ConnectionClosed,
                "client disconnected mid-response",
            )
        }
        StreamEnd::UpstreamError | StreamEnd::UpstreamTimeout => {
            drop(up);
            if sse {
                let msg = if end == StreamEnd::UpstreamTimeout {
                    "The upstream stopped sending in the middle of the stream (idle timeout)."
                } else {
                    "The upstream connection failed in the middle of the stream."
                };
                let _ = session
                    .write_response_body(Some(sse_error_event(msg)), false)
                    .await;
            }
            Error::e_explain(ErrorType::ReadError, "upstream failed mid-response")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_written_with_six_places() {
        for (micro, text) in [
            (0, "0.000000"),
            (-5, "0.000000"),
            (2_565, "0.002565"),
            (1_000_000, "1.000000"),
            (12_345_678_901, "12345.678901"),
            (i64::MAX, "9223372036854.775807"),
        ] {
            assert_eq!(cost_value(micro), text);
        }
    }

    #[test]
    fn the_usage_chunk_is_removed_and_everything_else_passes_whole() {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        let stream: &[&[u8]] = &[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\nda",
            b"ta: {\"choices\":[{\"delta\":{}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n",
            b"\ndata: [DONE]\n\n",
        ];
        for c in stream {
            if let Some(b) = f.filter(Bytes::from_static(c)) {
                out.extend_from_slice(&b);
            }
        }
        assert!(f.finish().is_none());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\ndata: {\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn crlf_events_and_an_unterminated_tail_pass_through() {
        let mut f = UsageChunkFilter::default();
        assert_eq!(
            f.filter(Bytes::from_static(b"data: 1\r\n\r\ndata: 2"))
                .as_deref(),
            Some(&b"data: 1\r\n\r\n"[..])
        );
        assert_eq!(f.finish().as_deref(), Some(&b"data: 2"[..]));
    }

    #[test]
    fn an_event_that_never_ends_is_passed_through_past_the_cap() {
        let mut f = UsageChunkFilter::default();
        let mut sent = b"data: {\"choices\":[]}\n\ndata: ".to_vec();
        let mut out = Vec::new();
        let mut take = |b: Option<Bytes>| {
            if let Some(b) = b {
                out.extend_from_slice(&b);
            }
        };
        take(f.filter(Bytes::from(sent.clone())));
        let piece = vec![b'x'; 1024];
        for _ in 0..3 * 1024 {
            sent.extend_from_slice(&piece);
            take(f.filter(Bytes::from(piece.clone())));
        }
        take(f.finish());
        assert_eq!(out, sent);
        assert!(f.bypass);
        assert!(
            f.pending.capacity() < MAX_EVENT,
            "nothing held past the cap"
        );
    }

    #[test]
    fn an_end_marker_split_across_chunks_is_found() {
        for split in 1..4 {
            let mut f = UsageChunkFilter::default();
            let text = b"data: 1\r\n\r\n";
            let at = text.len() - split;
            assert_eq!(f.filter(Bytes::copy_from_slice(&text[..at])), None);
            assert_eq!(
                f.filter(Bytes::copy_from_slice(&text[at..])).as_deref(),
                Some(&text[..])
            );
        }
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// What the filter passes on when `wire` arrives cut at `cuts` (taken modulo its length).
    fn filter_in_pieces(wire: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        let mut from = 0;
        for c in cuts.into_iter().chain([wire.len()]) {
            if let Some(b) = f.filter(Bytes::copy_from_slice(&wire[from..c])) {
                out.extend_from_slice(&b);
            }
            from = c;
        }
        if let Some(b) = f.finish() {
            out.extend_from_slice(&b);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// However the stream is cut, the client gets every event but the usage-only one,
        /// byte for byte and in order.
        #[test]
        fn the_filter_removes_exactly_the_usage_event(
            texts in proptest::collection::vec("[a-z ]{0,20}", 0..6),
            crlf in any::<bool>(),
            usage_at in any::<proptest::sample::Index>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut events: Vec<String> = texts
                .iter()
                .map(|t| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}],\"usage\":null}}{nl}{nl}"))
                .collect();
            events.push(format!("data: [DONE]{nl}{nl}"));
            let usage = format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}}}}{nl}{nl}");
            let at = usage_at.index(events.len());
            let want: String = events.concat();
            events.insert(at, usage);
            let wire = events.concat().into_bytes();
            let out = filter_in_pieces(&wire, &cuts);
            prop_assert_eq!(String::from_utf8(out).unwrap(), want);
        }

        /// Bytes without a usage event pass through whole, however they are cut.
        #[test]
        fn other_bytes_pass_through_whole(
            wire in proptest::collection::vec(any::<u8>(), 0..512),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            prop_assume!(!wire.windows(7).any(|w| w == b"\"usage\""));
            let out = filter_in_pieces(&wire, &cuts);
            prop_assert_eq!(out, wire);
        }
    }
}
