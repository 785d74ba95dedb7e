//! Stage 0, before any request: client connections. Caps how many are open (in all and
//! per client IP) and how long a client may take to send a request header (`deadline`),
//! reads each HTTP/1.x request header, and hands the request to the gateway. Nothing here
//! looks at a request's content.
//!
//! HTTP/1.x requests do not go through Pingora's `HttpProxy`: its per-request future is
//! about 15 KiB (its whole upstream path, which the gateway never uses, sits inside),
//! boxed and copied twice for every request. Here a connection's requests are one loop in
//! one future: read a header, let [`Serve`] answer it, keep the stream when the
//! connection may carry another. HTTP/2 connections go to `HttpProxy` as they are.

mod accept;
mod deadline;

pub use accept::PlainListeners;

pub use deadline::HeaderDeadline;

use crate::config::Config;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_core::ErrorType;
use pingora_proxy::{HttpProxy, ProxyHttp, Session};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What answers an HTTP/1.x request whose header is in. `shutdown` says whether the
/// server is shutting down (the connection is then not kept).
pub trait Serve: Send + Sync + 'static {
    /// Answers the request in `session`; whether it ended so that the connection may
    /// carry another request (the connection then finishes the session and keeps it if
    /// the session allows).
    fn serve<'a>(
        &'a self,
        session: &'a mut Session,
        shutdown: &'a ShutdownWatch,
    ) -> impl Future<Output = bool> + Send + 'a;
}

/// What HTTP/2 connections go to: Pingora's proxy over the gateway's hooks.
pub trait H2Proxy: ProxyHttp<CTX: Send + Sync> + Send + Sync + 'static {}

impl<T: ProxyHttp<CTX: Send + Sync> + Send + Sync + 'static> H2Proxy for T {}

/// The proxy service's application: admits a connection, then serves its HTTP/1.x
/// requests one after the other with a header deadline each (HTTP/2 connections go to
/// Pingora's `HttpProxy`; their streams have their own flow control).
pub struct ClientListener<P, S> {
    /// HTTP/2 connections.
    pub proxy: Arc<HttpProxy<P>>,
    /// HTTP/1.x requests.
    pub server: Arc<S>,
    pub config: Arc<ArcSwap<Config>>,
    pub counts: Arc<ConnectionCounts>,
    /// `server.max_connections` when the config leaves it unset.
    pub default_max: usize,
}

impl<P, S> Clone for ClientListener<P, S> {
    fn clone(&self) -> Self {
        ClientListener {
            proxy: Arc::clone(&self.proxy),
            server: Arc::clone(&self.server),
            config: Arc::clone(&self.config),
            counts: Arc::clone(&self.counts),
            default_max: self.default_max,
        }
    }
}

impl<P, S> ClientListener<P, S>
where
    P: H2Proxy,
    S: Serve,
{
    /// Serves one client connection to its end.
    pub async fn connection(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let config = self.config.load_full();
        let s = &config.server;
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let caps = Caps {
            total: s.max_connections.unwrap_or(self.default_max),
            per_ip: s.max_connections_per_ip,
        };
        // Dropping the stream on refusal closes it at once, before anything is read.
        let Some(_slot) = self.counts.open(peer, caps) else {
            return;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            drop(config);
            let mut next = Some(stream);
            while let Some(stream) = next {
                next = ServerApp::process_new(&self.proxy, stream, shutdown).await;
            }
            return;
        }
        let header_timeout = s.header_timeout;
        let keepalive = s.keepalive_timeout;
        drop(config);

        // The keep-alive limit is the wrapper's (one timer a connection); Pingora's own
        // would set a timer around every request's first read.
        let mut watched: Box<HeaderDeadline<Stream>> =
            Box::new(HeaderDeadline::new(stream, header_timeout).keep_alive(keepalive));
        let mut settings: Option<HttpPersistentSettings> = None;
        // One wait for the shutdown for the connection's life, polled while it waits for
        // a request: a new one each request would join and leave the watch's waiters.
        let mut closing = shutdown.clone();
        let mut closed = std::pin::pin!(async move {
            // An error is the sender gone: the server is stopping too.
            let _ = closing.wait_for(|shutting_down| *shutting_down).await;
        });
        loop {
            let mut session = Session::new_h1(watched);
            let downstream = &mut session.downstream_session;
            match settings {
                Some(settings) => settings.apply_to_session(downstream),
                None => {
                    // Pipelined requests are answered in order, one after the other
                    // (RFC 9112 9.3.2).
                    downstream.set_pipelining_enabled(true);
                    // Some(0): keep-alive with no limit of Pingora's.
                    downstream.set_keepalive(if *shutdown.borrow() { None } else { Some(0) });
                }
            }
            if !read_header(downstream, closed.as_mut()).await {
                return;
            }
            // The session stays here, and is finished here: in the answer's future it
            // would take room twice, and Pingora's finishing (a 3.7 KB future) would add
            // to the request's state in every connection's task.
            if !self.server.serve(&mut session, shutdown).await {
                return;
            }
            let kept = HttpPersistentSettings::for_session(&session.downstream_session);
            let Ok(Some(reusable)) = session.downstream_session.finish().await else {
                return;
            };
            let reused = ReusedHttpStream::from_reusable_stream(reusable, kept);
            let (stream, next) = reused.consume();
            let Ok(stream) = stream.into_any().downcast::<HeaderDeadline<Stream>>() else {
                return;
            };
            watched = stream;
            watched.next_request();
            settings = next;
        }
    }
}

/// TLS listeners run on Pingora's listening service, which hands each connection here.
#[async_trait]
impl<P, S> ServerApp for ClientListener<P, S>
where
    P: H2Proxy,
    S: Serve,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.connection(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// Reads a request header into `session`, as Pingora's proxy does: a malformed header
/// is answered 400 and a CONNECT 405, both closing the connection. False when there is
/// no request to answer (the client closed, the read failed, or the server is shutting
/// down while the connection waits for a request).
async fn read_header(
    session: &mut ServerSession,
    closed: Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let read = tokio::select! {
        // A request already buffered is read before a shutdown is looked at.
        biased;
        read = session.read_request() => read,
        () = closed => return false,
    };
    let refuse = match read {
        Ok(true) if session.req_header().method == http::Method::CONNECT => 405,
        Ok(true) => return true,
        Ok(false) => return false,
        Err(e) if matches!(e.etype, ErrorType::InvalidHTTPHeader) => {
            log::debug!("client sent a malformed request header: {e}");
            400
        }
        Err(e) => {
            log::debug!("reading a request header: {e}");
            0
        }
    };
    if refuse != 0 {
        if let Err(e) = session.respond_error(refuse).await {
            log::debug!("cannot answer {refuse} to a client: {e}");
        }
    }
    session.shutdown().await;
    false
}

/// Tells the connection's header deadline that `session`'s header is in.
pub fn header_in(session: &ServerSession) {
    if let Some(watched) = session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<HeaderDeadline<Stream>>())
    {
        watched.mark_header_in();
    }
}

/// The caps a new connection is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_ip: Option<usize>,
}

/// Open client connections, in all and per IP. Shared by every listener.
#[derive(Default)]
pub struct ConnectionCounts {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// When the last "cap reached" line was logged (seconds on the process clock), and how
    /// many connections were refused since.
    last_warning: AtomicU64,
    refused_since: AtomicU64,
}

/// A connection's place in the counts; given back when dropped.
pub struct Slot {
    counts: Arc<ConnectionCounts>,
    ip: Option<IpAddr>,
}

/// How often at most the gateway says that a cap refuses connections.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl ConnectionCounts {
    /// Counts a new connection from `ip`, or refuses it (logged, at most every 10 s).
    pub fn open(self: &Arc<Self>, ip: Option<IpAddr>, caps: Caps) -> Option<Slot> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= caps.total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            self.refused("max_connections", caps.total, "server.max_connections");
            return None;
        }
        if let Some(m) = crate::metrics::get() {
            m.client_connections.inc();
        }
        // From here on the slot is counted: dropping it undoes exactly what was counted.
        let mut slot = Slot {
            counts: Arc::clone(self),
            ip: None,
        };
        if let (Some(ip), Ok(mut map)) = (ip, self.per_ip.lock()) {
            let open = map.get(&ip).copied().unwrap_or(0);
            if let Some(cap) = caps.per_ip.filter(|cap| open >= *cap) {
                drop(map);
                drop(slot);
                self.refused(
                    "max_connections_per_ip",
                    cap,
                    "server.max_connections_per_ip",
                );
                return None;
            }
            map.insert(ip, open + 1);
            slot.ip = Some(ip);
        }
        Some(slot)
    }

    /// Client connections open now.
    #[cfg(test)]
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    fn refused(&self, reason: &str, cap: usize, setting: &str) {
        if let Some(m) = crate::metrics::get() {
            m.client_connections_refused
                .with_label_values(&[reason])
                .inc();
        }
        let refused = self.refused_since.fetch_add(1, Ordering::AcqRel) + 1;
        let now = process_secs();
        let last = self.last_warning.load(Ordering::Acquire);
        let due = last == 0 || now >= last + WARN_EVERY.as_secs();
        if due
            && self
                .last_warning
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.refused_since.store(0, Ordering::Release);
            log::warn!(
                "client connections: the cap of {cap} ({setting}) is reached; new connections are closed on arrival ({refused} since the last message)"
            );
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(m) = crate::metrics::get() {
            m.client_connections.dec();
        }
        if let Some(ip) = self.ip {
            if let Ok(mut map) = self.counts.per_ip.lock() {
                if let Some(n) = map.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(&ip);
                    }
                }
            }
        }
    }
}

/// Whole seconds since the process first asked.
fn process_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
}

/// Raises the soft open-file limit to the hard one (at most 2^20), as Go's runtime does:
/// the usual soft default of 1024 is a leftover of `select(2)`, not a resource decision.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(1 << 20);
        if soft < want {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                log::warn!("cannot raise the open-file limit from {soft} to {want}: {e}");
            }
        }
    }
}

/// The default connection cap: half the open-file limit (a proxied request holds an
/// upstream connection too), keeping 64 descriptors for everything else, at least 64.
pub fn default_max_connections() -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    (soft.saturating_sub(64) / 2).max(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn caps_count_in_all_and_per_ip_and_slots_give_back() {
        let counts = Arc::new(ConnectionCounts::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let caps = Caps {
            total: 3,
            per_ip: Some(2),
        };
        let a1 = counts.open(Some(a), caps).unwrap();
        let _a2 = counts.open(Some(a), caps).unwrap();
        assert!(counts.open(Some(a), caps).is_none());
        let b1 = counts.open(Some(b), caps).unwrap();
        assert!(counts.open(Some(b), caps).is_none(), "total cap");
        assert_eq!(counts.total(), 3);
        drop(a1);
        let _a3 = counts.open(Some(a), caps).unwrap();
        drop(b1);
        assert_eq!(counts.total(), 2);
        assert_eq!(counts.per_ip.lock().unwrap().get(&b), None);
    }
}
