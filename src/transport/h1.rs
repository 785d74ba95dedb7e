//! The upstream side of HTTP/1.1, shaped for the one exchange the gateway makes: a
//! request whose body is already in memory, then a response read as it arrives.
//!
//! Pingora's HTTP/1 client writes the request header and the body in separate writes and
//! reads every response body through a fixed 64 KiB buffer that lives as long as the
//! exchange. Here the request leaves in one write, and the read buffer follows the
//! traffic: none while a stream idles between tokens (small reads go through a per-thread
//! scratch buffer), growing to 64 KiB only while a large body keeps filling it.
//! Connections come from, and go back to, the gateway's pool (`pool`).

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pingora_core::protocols::Stream;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Smallest read: room for a provider's response header (about 1 KiB) or a few SSE
/// events (a few hundred bytes each). Reads this small land in the thread's [`SCRATCH`]
/// first, so a connection waiting for its next event holds no buffer.
const MIN_READ: usize = 2 * 1024;

thread_local! {
    /// Where a small read lands before its bytes are copied to the connection's buffer:
    /// borrowed only within one poll, so an idle stream (an SSE stream between events, an
    /// exchange waiting for its answer) holds none of it. Reading straight into a buffer
    /// of the connection's own kept `MIN_READ` bytes reserved through every wait.
    static SCRATCH: std::cell::RefCell<[u8; MIN_READ]> = const { std::cell::RefCell::new([0; MIN_READ]) };
}
/// Largest read, reached only while reads keep filling the buffer.
const MAX_READ: usize = 64 * 1024;
/// A response header larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in one response.
const MAX_FIELDS: usize = 128;
/// A chunk-size line (with extensions) or trailer line longer than this is refused.
const MAX_LINE: usize = 4 * 1024;
/// Bodies up to this size are copied behind the request header so both leave in one
/// write; larger ones are written after it (the copy would cost more than the syscall).
const COALESCE_LIMIT: usize = 64 * 1024;

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    Timeout,
    /// The connection ended before the message did.
    Closed,
    Io(std::io::Error),
    /// The upstream sent something that is not HTTP/1.x.
    Malformed(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Timeout => f.write_str("timed out"),
            Error::Closed => f.write_str("connection closed early"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Malformed(what) => write!(f, "malformed response: {what}"),
        }
    }
}

/// A response's status line and fields.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// How the rest of the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many body bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// Where a chunked body's parser stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// One upstream connection carrying one exchange.
pub struct Conn {
    stream: Stream,
    /// Bytes received and not yet handed out.
    buf: BytesMut,
    read_size: usize,
    framing: Framing,
    /// The request went out whole (a connection cut mid-request is never reused).
    request_complete: bool,
    /// The response allows another exchange on this connection.
    persistent: bool,
    /// Whether any response byte has arrived (a pooled connection that fails before one
    /// did was closed by the server while idle, and the request can go on a fresh one).
    received: bool,
}

impl Conn {
    pub fn new(stream: Stream) -> Self {
        Conn {
            stream,
            buf: BytesMut::new(),
            read_size: MIN_READ,
            framing: Framing::Done,
            request_complete: false,
            persistent: false,
            received: false,
        }
    }

    pub fn received_anything(&self) -> bool {
        self.received
    }

    /// Writes the request: `head` (request line and fields, ending in the blank line)
    /// and `body`, in one write when the body is small.
    pub async fn send(&mut self, head: &[u8], body: &[u8], wait: Duration) -> Result<(), Error> {
        if body.len() <= COALESCE_LIMIT {
            let mut wire = Vec::with_capacity(head.len() + body.len());
            wire.extend_from_slice(head);
            wire.extend_from_slice(body);
            self.write(&wire, wait).await?;
        } else {
            self.write(head, wait).await?;
            // `wait` bounds each piece, so a large body on a slow link is not cut off
            // while it is still moving.
            for piece in body.chunks(COALESCE_LIMIT) {
                self.write(piece, wait).await?;
            }
        }
        self.request_complete = true;
        Ok(())
    }

    /// Writes `bytes` within `wait` (a request usually goes into the socket's buffer at
    /// once, without a timer).
    async fn write(&mut self, bytes: &[u8], wait: Duration) -> Result<(), Error> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match crate::clock::within(wait, write).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(Error::Io(e)),
            None => Err(Error::Timeout),
        }
    }

    /// Reads the response header (skipping interim 1xx responses). `head_request`: the
    /// request was HEAD, so the response has no body whatever its fields say.
    pub async fn read_head(&mut self, wait: Duration, head_request: bool) -> Result<Head, Error> {
        loop {
            if let Some((mut head, len, persistent)) = parse_head(&self.buf)? {
                // One large read can bring a whole oversized head at once.
                if len > MAX_HEAD {
                    return Err(Error::Malformed("response header too large"));
                }
                let _ = self.buf.split_to(len);
                if head.status.is_informational() {
                    continue;
                }
                self.framing = framing(&head, head_request)?;
                // Transfer-Encoding overrides Content-Length; a response with both is
                // suspect (response splitting), so the length goes and so does the
                // connection.
                let both = head.headers.contains_key(http::header::TRANSFER_ENCODING)
                    && head.headers.remove(http::header::CONTENT_LENGTH).is_some();
                self.persistent = persistent && !both && self.framing != Framing::UntilClose;
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Error::Malformed("response header too large"));
            }
            if self.fill(usize::MAX, wait).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }

    /// The next piece of the response body, `None` at its end. `idle` bounds the wait
    /// for each read, not the whole body.
    pub async fn read_body(&mut self, idle: Duration) -> Result<Option<Bytes>, Error> {
        loop {
            match self.framing {
                Framing::Done => return Ok(None),
                Framing::Length(0) => self.framing = Framing::Done,
                Framing::Length(left) => {
                    if self.buf.is_empty() && self.fill(clamp(left), idle).await? == 0 {
                        return Err(Error::Closed);
                    }
                    let take = clamp(left).min(self.buf.len());
                    self.framing = Framing::Length(left - take as u64);
                    return Ok(Some(self.buf.split_to(take).freeze()));
                }
                Framing::UntilClose => {
                    if self.buf.is_empty() && self.fill(usize::MAX, idle).await? == 0 {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                Framing::Chunked(state) => {
                    if let Some(data) = self.step_chunked(state)? {
                        return Ok(Some(data));
                    }
                    if matches!(self.framing, Framing::Chunked(_))
                        && self.fill(usize::MAX, idle).await? == 0
                    {
                        return Err(Error::Closed);
                    }
                }
            }
        }
    }

    /// Advances the chunked parser over what is buffered. Returns data when some is
    /// ready; `None` when more input is needed or the body ended (`framing` says which).
    fn step_chunked(&mut self, mut state: Chunk) -> Result<Option<Bytes>, Error> {
        loop {
            match state {
                Chunk::Size => {
                    let Some(line) = take_line(&mut self.buf)? else {
                        break;
                    };
                    let size = chunk_size(&line)?;
                    state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if self.buf.is_empty() {
                        break;
                    }
                    let take = clamp(left).min(self.buf.len());
                    let rest = left - take as u64;
                    self.framing = Framing::Chunked(if rest == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(rest)
                    });
                    return Ok(Some(self.buf.split_to(take).freeze()));
                }
                Chunk::DataEnd => {
                    let Some(line) = take_line(&mut self.buf)? else {
                        break;
                    };
                    if !line.is_empty() {
                        return Err(Error::Malformed("chunk data longer than its size"));
                    }
                    state = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(line) = take_line(&mut self.buf)? else {
                        break;
                    };
                    if line.is_empty() {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                }
            }
        }
        self.framing = Framing::Chunked(state);
        Ok(None)
    }

    /// Reads once, at most `limit` bytes, into the buffer. Returns 0 at end of stream.
    async fn fill(&mut self, limit: usize, wait: Duration) -> Result<usize, Error> {
        let want = self.read_size.min(limit).max(1);
        let read = if want <= MIN_READ && self.buf.capacity() - self.buf.len() < want {
            let (stream, buf) = (&mut self.stream, &mut self.buf);
            crate::clock::within(
                wait,
                std::future::poll_fn(|cx| poll_read_via_scratch(stream, cx, want, buf)),
            )
            .await
        } else {
            self.buf.reserve(want);
            let mut limited = (&mut self.stream).take(want as u64);
            crate::clock::within(wait, limited.read_buf(&mut self.buf)).await
        };
        let n = match read {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(Error::Io(e)),
            None => return Err(Error::Timeout),
        };
        if n > 0 {
            self.received = true;
        }
        // Grow while reads fill the buffer; shrink back when traffic thins out.
        if n == want && want == self.read_size {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else if n < self.read_size / 4 {
            self.read_size = (self.read_size / 2).max(MIN_READ);
        }
        Ok(n)
    }

    /// The connection, when it can carry another request: the whole exchange was read,
    /// nothing extra arrived, and neither side asked to close.
    pub fn into_reusable(self) -> Option<Stream> {
        let done = self.framing == Framing::Done && self.buf.is_empty();
        (self.request_complete && self.persistent && done).then_some(self.stream)
    }
}

/// Reads at most `want` (at most [`MIN_READ`]) bytes from `stream` into the thread's
/// scratch buffer and appends them to `buf`, which grows by what arrived only.
fn poll_read_via_scratch(
    stream: &mut Stream,
    cx: &mut std::task::Context<'_>,
    want: usize,
    buf: &mut BytesMut,
) -> std::task::Poll<std::io::Result<usize>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut read = tokio::io::ReadBuf::new(&mut scratch[..want]);
        std::task::ready!(std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        std::task::Poll::Ready(Ok(read.filled().len()))
    })
}

fn clamp(left: u64) -> usize {
    usize::try_from(left).unwrap_or(usize::MAX)
}

/// Fields the gateway may add to an upstream's response header (see `relay`).
const ADDED_FIELDS: usize = 12;

/// Parses a complete response header at the start of `buf`: the head and its length.
/// The third value says whether the connection may carry another exchange afterwards.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize, bool)>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Malformed("too many header fields"))
        }
        Err(_) => return Err(Error::Malformed("invalid status line or header field")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Malformed("invalid status code"))?;
    // One copy of the header block; every value is a slice of it, not an allocation.
    let block = Bytes::copy_from_slice(&buf[..len]);
    // Room for the fields the gateway adds before the map goes to the client (request id,
    // target, attempts, cost, rate limits, framing): adding them then rehashes nothing.
    let mut headers = HeaderMap::with_capacity(resp.headers.len() + ADDED_FIELDS);
    for f in resp.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| Error::Malformed("invalid header name"))?;
        let start = f.value.as_ptr() as usize - buf.as_ptr() as usize;
        let value = HeaderValue::from_maybe_shared(block.slice(start..start + f.value.len()))
            .map_err(|_| Error::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    // HTTP/1.0 closes after each response unless it says otherwise; 1.1 the other way round.
    let persistent = if resp.version == Some(0) {
        has_token(&headers, http::header::CONNECTION, "keep-alive")
    } else {
        !has_token(&headers, http::header::CONNECTION, "close")
    };
    Ok(Some((Head { status, headers }, len, persistent)))
}

/// How the body of a response is delimited (RFC 9112, section 6.3).
fn framing(head: &Head, head_request: bool) -> Result<Framing, Error> {
    let status = head.status.as_u16();
    if head_request || status == 204 || status == 304 {
        return Ok(Framing::Done);
    }
    if head.headers.contains_key(http::header::TRANSFER_ENCODING) {
        let chunked_last = head
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|c| !c.is_empty())
            .is_some_and(|c| c.eq_ignore_ascii_case("chunked"));
        return Ok(if chunked_last {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for v in head.headers.get_all(http::header::CONTENT_LENGTH) {
        let n = std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(Error::Malformed("invalid content-length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(Error::Malformed("conflicting content-length fields"));
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Takes one CRLF- (or LF-) terminated line off the front of `buf`, without its end.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, Error> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(Error::Malformed("line too long in chunked body")),
        None => Ok(None),
    }
}

/// The size on a chunk-size line (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let hex = std::str::from_utf8(hex)
        .map(str::trim)
        .map_err(|_| Error::Malformed("invalid chunk size"))?;
    if hex.is_empty() || hex.len() > 15 {
        return Err(Error::Malformed("invalid chunk size"));
    }
    u64::from_str_radix(hex, 16).map_err(|_| Error::Malformed("invalid chunk size"))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props {
    use super::tests::{answered_with_owned, body_of};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes: a head, "not yet", or an error; never a panic.
        #[test]
        fn any_bytes_parse_or_are_refused(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_head(&buf);
        }

        /// A well-formed head parses with every field; each strict prefix is "not yet".
        #[test]
        fn a_head_parses_whole_and_waits_on_any_prefix(
            status in 200u16..600,
            fields in proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..8),
        ) {
            let mut text = format!("HTTP/1.1 {status} X\r\n");
            for (n, v) in &fields {
                text.push_str(&format!("{n}: {v}\r\n"));
            }
            text.push_str("\r\n");
            let bytes = text.as_bytes();
            let (head, len, _) = parse_head(bytes).unwrap().unwrap();
            prop_assert_eq!(len, bytes.len());
            prop_assert_eq!(head.status.as_u16(), status);
            prop_assert_eq!(head.headers.len(), fields.len());
            for (n, v) in &fields {
                prop_assert!(head.headers.get_all(n.as_str()).iter().any(|x| x.as_bytes() == v.as_bytes()));
            }
            for cut in 0..bytes.len() {
                prop_assert!(matches!(parse_head(&bytes[..cut]), Ok(None)), "prefix {}", cut);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// A chunked body cut anywhere on the wire decodes to the same bytes.
        #[test]
        fn a_chunked_body_decodes_however_it_is_cut(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 0..5),
            cuts in proptest::collection::vec(any::<usize>(), 0..4),
        ) {
            let mut wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % wire.len()).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut parts = Vec::new();
            let mut from = 0;
            for c in cuts.into_iter().chain([wire.len()]) {
                if c > from {
                    parts.push(wire[from..c].to_vec());
                    from = c;
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let body = rt.block_on(async {
                let mut conn = answered_with_owned(parts).await;
                conn.read_head(Duration::from_secs(5), false).await.unwrap();
                body_of(&mut conn).await
            });
            prop_assert_eq!(body.unwrap(), chunks.concat());
        }
    }
}
