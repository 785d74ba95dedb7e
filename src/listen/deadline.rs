//! The deadline on each request header: a thin wrapper around a client connection's
//! stream that watches the bytes read for the blank line that ends a header, and answers
//! 408 and closes when it does not come in time. Pingora's own parsing is untouched.
//!
//! The wrapper also gathers small writes until a flush, so a response header and a short
//! body leave in one send. Its buffer exists only between a write and the flush after it:
//! an idle connection, or a stream waiting for its next event, holds none.

use crate::clock;
use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The answer to a client that took too long to send its header. Written straight to the
/// socket: no request exists yet to answer through Pingora.
const REQUEST_TIMEOUT_BODY: &str = r#"{"error":{"message":"The request header was not received in time.","type":"invalid_request_error","code":"request_timeout"}}"#;
static REQUEST_TIMEOUT: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{REQUEST_TIMEOUT_BODY}",
        REQUEST_TIMEOUT_BODY.len()
    )
    .into_bytes()
});

/// Where a connection is in reading a request header.
enum Phase {
    /// Between keep-alive requests: the keep-alive limit applies, and the header deadline
    /// starts with the next request's first byte.
    Idle,
    /// Reading a header that began at `started` (read from the clock only when the header
    /// did not come whole in its first read). The timer is made only when a read has to
    /// wait (most headers arrive in one read and never need it). `seen`: some of the
    /// header arrived; `line_start`: the last byte ended a line, so a line break now ends
    /// the header.
    Header {
        started: Option<Instant>,
        timer: Option<Pin<Box<Sleep>>>,
        seen: bool,
        line_start: bool,
    },
    /// The header is in; reads pass through untimed (body reads have Pingora's timeout).
    Done,
}

/// A client stream with a deadline on each request header, gathering small writes until
/// a flush.
pub struct HeaderDeadline<T: AsyncWrite + Unpin> {
    inner: T,
    timeout: Duration,
    phase: Phase,
    /// Set by the proxy once it has the request header: a pipelined header is parsed
    /// from bytes read earlier, so the wrapper never sees it go by.
    header_in: AtomicBool,
    /// Bytes written and not yet sent, and how many of them are sent.
    out: Vec<u8>,
    sent: usize,
    /// How long the connection may wait for its next request, in milliseconds (0: as long
    /// as it likes), and when it began to wait ([`clock::monotonic_ms`]).
    keepalive_ms: u64,
    idle_since: u64,
    /// The connection's one keep-alive timer, made the first time it waits for a request
    /// and reset only when it fires: a request costs a coarse clock read, not a timer.
    idle_timer: Option<Pin<Box<Sleep>>>,
}

/// The most a connection gathers before sending: one TCP segment on Ethernet.
const GATHER: usize = 1460;

impl<T: AsyncWrite + Unpin> HeaderDeadline<T> {
    /// A new connection: its first header must arrive within `timeout` from now.
    pub fn new(inner: T, timeout: Duration) -> Self {
        HeaderDeadline {
            inner,
            timeout,
            phase: Phase::Header {
                started: Some(Instant::now()),
                timer: None,
                seen: false,
                line_start: false,
            },
            header_in: AtomicBool::new(false),
            out: Vec::new(),
            sent: 0,
            keepalive_ms: 0,
            idle_since: 0,
            idle_timer: None,
        }
    }

    /// Between requests, the connection waits at most `limit` for the next one, then
    /// reads as closed (Pingora closes it quietly, as after its own keep-alive timeout).
    /// Zero: no limit.
    pub fn keep_alive(mut self, limit: Duration) -> Self {
        self.keepalive_ms = limit.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// The request's header is parsed: what is read next is its body.
    pub fn mark_header_in(&self) {
        self.header_in.store(true, Ordering::Release);
    }

    /// The previous request is answered; the next header's deadline starts with its first byte.
    pub fn next_request(&mut self) {
        self.phase = Phase::Idle;
        *self.header_in.get_mut() = false;
        if self.keepalive_ms > 0 {
            self.idle_since = clock::monotonic_ms();
        }
    }

    /// A read between requests has to wait: Ready (as end of stream) once the connection
    /// has waited its keep-alive limit. The timer set for an earlier wait may fire before
    /// this one's limit; it is then set again for what remains.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.keepalive_ms == 0 {
            return Poll::Pending;
        }
        let limit = Duration::from_millis(self.keepalive_ms);
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        while timer.as_mut().poll(cx).is_ready() {
            let waited = clock::monotonic_ms().saturating_sub(self.idle_since);
            if waited >= self.keepalive_ms {
                return Poll::Ready(Ok(()));
            }
            let left = Duration::from_millis(self.keepalive_ms - waited);
            timer.as_mut().reset(Instant::now() + left);
        }
        Poll::Pending
    }

    /// Whether the connection has a header deadline running.
    #[cfg(test)]
    pub fn reading_header(&self) -> bool {
        matches!(self.phase, Phase::Header { .. })
    }

    /// Follows the bytes just read: starts the deadline on a request's first byte and
    /// ends it at the blank line after the header (`\r\n\r\n`, or bare `\n\n`). Jumps
    /// from line feed to line feed (memchr); a line of only `\r` is a blank line.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if matches!(self.phase, Phase::Idle) {
            self.phase = Phase::Header {
                started: None,
                timer: None,
                seen: false,
                line_start: false,
            };
        }
        let Phase::Header {
            seen, line_start, ..
        } = &mut self.phase
        else {
            return;
        };
        *seen = true;
        let blank = |line: &[u8]| line.iter().all(|&b| b == b'\r');
        let mut rest = bytes;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            if *line_start && blank(&rest[..i]) {
                self.phase = Phase::Done;
                return;
            }
            *line_start = true;
            rest = &rest[i + 1..];
        }
        if !blank(rest) {
            *line_start = false;
        }
        // The header goes on past this read: its deadline counts from now.
        if let Phase::Header { started, .. } = &mut self.phase {
            started.get_or_insert_with(Instant::now);
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeaderDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !matches!(this.phase, Phase::Done) && *this.header_in.get_mut() {
            this.phase = Phase::Done;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !matches!(this.phase, Phase::Done) {
                    let new = &buf.filled()[before..];
                    this.saw(new);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if matches!(this.phase, Phase::Idle) => this.poll_idle(cx),
            Poll::Pending => {
                let Phase::Header {
                    started,
                    timer,
                    seen,
                    ..
                } = &mut this.phase
                else {
                    return Poll::Pending;
                };
                let deadline = *started.get_or_insert_with(Instant::now) + this.timeout;
                let timer =
                    timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if *seen {
                    // Best effort: the socket's send buffer is empty while a header is
                    // read, so this small answer goes out whole or not at all.
                    let _ = Pin::new(&mut this.inner).poll_write(cx, &REQUEST_TIMEOUT);
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                }
                if let Some(m) = crate::metrics::get() {
                    m.client_timeouts.with_label_values(&["header"]).inc();
                }
                this.phase = Phase::Done;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not send a whole request header within server.header_timeout",
                )))
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> HeaderDeadline<T> {
    /// Sends what is gathered, then lets the buffer go.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.out = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: sends what is gathered when they would not fit.
    /// Ready(true) when they are to be gathered, Ready(false) when they are large enough
    /// to go straight to the socket.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.out.len() + len > GATHER {
            ready!(self.poll_send(cx))?;
        }
        if len >= GATHER {
            return Poll::Ready(Ok(false));
        }
        if self.out.capacity() == 0 {
            self.out.reserve_exact(GATHER);
        }
        Poll::Ready(Ok(true))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !ready!(this.poll_room(cx, buf.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

impl<T: AsyncWrite + Unpin> Drop for HeaderDeadline<T> {
    /// A connection dropped with bytes gathered (an answer cut by an upstream failure)
    /// sends them if the socket takes them now, as Pingora's own stream does.
    fn drop(&mut self) {
        if self.sent < self.out.len() {
            let _ = self.poll_send(&mut Context::from_waker(
                futures_util::task::noop_waker_ref(),
            ));
        }
    }
}

impl<T: AsyncWrite + Unpin> std::fmt::Debug for HeaderDeadline<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// Pingora's transport traits, all answered by the wrapped stream.

#[async_trait]
impl Shutdown for HeaderDeadline<Stream> {
    async fn shutdown(&mut self) {
        // What is gathered goes first; a failure shows in the shutdown that follows.
        let _ = std::future::poll_fn(|cx| self.poll_send(cx)).await;
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeaderDeadline<Stream> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline<Stream> {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline<Stream> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline<Stream> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeaderDeadline<Stream> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeaderDeadline<Stream> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_header_sent_a_byte_at_a_time_is_cut_at_the_deadline_with_408() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut watched = HeaderDeadline::new(server, Duration::from_secs(10));
        let drip = async {
            for b in b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" {
                client.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // Then nothing: the header never ends.
            let mut answer = vec![0; 512];
            let n = client.read(&mut answer).await.unwrap();
            String::from_utf8_lossy(&answer[..n]).into_owned()
        };
        let started = Instant::now();
        let read_all = async {
            let mut buf = [0u8; 64];
            loop {
                match watched.read(&mut buf).await {
                    Ok(0) => return (Ok(()), started.elapsed()),
                    Ok(_) => {}
                    Err(e) => return (Err(e), started.elapsed()),
                }
            }
        };
        let (answer, (read, elapsed)) = tokio::join!(drip, read_all);
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(elapsed, Duration::from_secs(10));
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(body.len(), 124);
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_header_ends_the_deadline_and_keep_alive_waits_for_the_first_byte() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut watched = HeaderDeadline::new(server, Duration::from_secs(10));
        let mut buf = [0u8; 256];
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 27);
        assert!(!watched.reading_header());
        // A body read much later is not the header's business.
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"body").await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 4);

        // Between requests no deadline runs until the next request begins.
        watched.next_request();
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 8);
        assert!(watched.reading_header());
        let started = Instant::now();
        let err = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_reads_as_closed_after_its_keep_alive_limit() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut watched = HeaderDeadline::new(server, Duration::from_secs(10))
            .keep_alive(Duration::from_secs(60));
        let mut buf = [0u8; 256];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 18);

        // A first wait of 30 s makes the timer (due at 60 s); the request that ends it
        // comes in time.
        watched.next_request();
        let wait = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        };
        let (read, ()) = tokio::join!(watched.read(&mut buf), wait);
        assert_eq!(read.unwrap(), 18);

        // The next wait has its own 60 s, though the timer first fires 30 s into it.
        watched.next_request();
        let started = Instant::now();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 0, "end of stream");
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_keep_alive_limit_an_idle_connection_waits() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut watched = HeaderDeadline::new(server, Duration::from_secs(10));
        let mut buf = [0u8; 256];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 18);
        watched.next_request();
        let read = tokio::time::timeout(Duration::from_secs(3600), watched.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting after an hour");
    }

    /// A socket that records each send and takes at most `room` bytes at a time.
    struct Sends {
        sends: Vec<Vec<u8>>,
        room: usize,
        shut: bool,
    }

    impl AsyncWrite for Sends {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.room);
            self.sends.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn sends(room: usize) -> HeaderDeadline<Sends> {
        let socket = Sends {
            sends: Vec::new(),
            room,
            shut: false,
        };
        HeaderDeadline::new(socket, Duration::from_secs(10))
    }

    #[tokio::test]
    async fn small_writes_leave_in_one_send_at_the_flush_and_the_buffer_goes_with_them() {
        let mut out = sends(usize::MAX);
        out.write_all(&[b'h'; 100]).await.unwrap();
        out.write_all(&[b'b'; 50]).await.unwrap();
        assert!(out.inner.sends.is_empty());
        out.flush().await.unwrap();
        assert_eq!(out.inner.sends.len(), 1);
        assert_eq!(
            out.inner.sends[0],
            [[b'h'; 100].as_slice(), &[b'b'; 50]].concat()
        );
        assert_eq!(
            out.out.capacity(),
            0,
            "a flushed connection holds no buffer"
        );

        // A write that would overflow the buffer sends what is gathered first; one as
        // large as the buffer goes straight through.
        out.write_all(&[b'x'; 10]).await.unwrap();
        out.write_all(&[b'y'; GATHER]).await.unwrap();
        let sizes: Vec<usize> = out.inner.sends.iter().map(Vec::len).collect();
        assert_eq!(sizes, [150, 10, GATHER]);

        // Vectored writes are gathered whole.
        let parts = [io::IoSlice::new(b"3\r\n"), io::IoSlice::new(b"abc")];
        assert_eq!(out.write_vectored(&parts).await.unwrap(), 6);
        out.flush().await.unwrap();
        assert_eq!(out.inner.sends.last().unwrap(), b"3\r\nabc");
    }

    #[tokio::test]
    async fn a_socket_that_takes_part_gets_the_rest_in_order_and_shutdown_sends_first() {
        let mut out = sends(64);
        let body: Vec<u8> = (0..150u8).collect();
        out.write_all(&body).await.unwrap();
        out.shutdown().await.unwrap();
        let sizes: Vec<usize> = out.inner.sends.iter().map(Vec::len).collect();
        assert_eq!(sizes, [64, 64, 22]);
        assert_eq!(out.inner.sends.concat(), body);
        assert!(out.inner.shut);
    }

    #[tokio::test]
    async fn a_connection_dropped_with_bytes_gathered_sends_them() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut watched = HeaderDeadline::new(server, Duration::from_secs(10));
        watched
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 400\r\n\r\n{\"id\"")
            .await
            .unwrap();
        drop(watched);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got,
            b"HTTP/1.1 200 OK\r\ncontent-length: 400\r\n\r\n{\"id\""
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_without_an_answer() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut watched = HeaderDeadline::new(server, Duration::from_secs(10));
        let mut buf = [0u8; 16];
        let err = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(watched);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert!(answer.is_empty());
    }

    #[test]
    fn bare_line_feeds_end_a_header_too() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut w = HeaderDeadline::new(tokio::io::empty(), Duration::from_secs(1));
            w.saw(b"GET / HTTP/1.1\nhost: x\n");
            assert!(w.reading_header());
            w.saw(b"\n");
            assert!(!w.reading_header());
        });
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// However a request is cut into reads, the header deadline ends exactly with the
        /// read that completes the header, and never sooner.
        #[test]
        fn the_deadline_ends_exactly_at_the_end_of_the_header(
            fields in proptest::collection::vec(("[a-z-]{1,10}", "[ -~]{0,20}"), 0..6),
            lf_only in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let nl = if lf_only { "\n" } else { "\r\n" };
            let mut head = format!("POST /v1/chat/completions HTTP/1.1{nl}");
            for (n, v) in &fields {
                head.push_str(&format!("{n}: {v}{nl}"));
            }
            head.push_str(nl);
            let end = head.len();
            let mut wire = head.into_bytes();
            wire.extend_from_slice(&body);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let mut w = HeaderDeadline::new(tokio::io::empty(), Duration::from_secs(10));
                let mut from = 0;
                for c in cuts.into_iter().chain([wire.len()]) {
                    w.saw(&wire[from..c]);
                    prop_assert_eq!(w.reading_header(), c < end, "after {} of {} bytes", c, end);
                    from = c;
                }
                Ok(())
            })?;
        }
    }
}
