//! Per-request state, from `request_filter` to `logging`: the config the request started
//! with, what it holds against limits and budgets (given back when the context drops), and
//! the record the access log, metrics and usage row are written from.

use crate::config::Config;
use crate::keys::budget::Hold;
use crate::limits::{self, Admission, CounterBackend};
use crate::observe::Record;
use pingora_proxy::Session;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Per-request state.
pub struct RequestCtx {
    pub record: Record,
    /// Whether the client's request body is still unread (the connection then closes
    /// after an early answer).
    pub(super) body_unread: bool,
    /// The TCP peer (the client, or the proxy in front of it).
    pub(super) peer: Option<IpAddr>,
    /// What this request holds against the limits; released when the context drops.
    pub(super) admission: Admission,
    /// The config the request started with, kept to the end so that a reload in the
    /// middle of a request never mixes two configs (the access log and metrics included).
    pub(super) config: Option<Arc<Config>>,
    /// What this request reserved against its budgets; released when the context drops
    /// unless settled.
    pub(super) hold: Option<Hold>,
}

impl RequestCtx {
    /// `x-tollgate-trace-id`, when the request is traced.
    fn trace_header(&self) -> Option<(http::HeaderName, http::HeaderValue)> {
        let t = self.record.trace.as_deref()?;
        let value = http::HeaderValue::from_str(t.ctx.trace_id_hex()).ok()?;
        Some((crate::transport::headers::X_TOLLGATE_TRACE_ID, value))
    }

    /// The header fields the gateway adds to its answers: the key's rate-limit headers
    /// and the trace id.
    pub(super) fn answer_headers(&self) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let mut headers = self
            .admission
            .key_headers()
            .map(|h| h.pairs())
            .unwrap_or_default();
        headers.extend(self.trace_header());
        headers
    }

    /// A request that starts at `wall_ms` (milliseconds since the Unix epoch).
    pub(super) fn new(counters: Arc<dyn CounterBackend>, wall_ms: i64) -> Self {
        RequestCtx {
            record: Record::at(wall_ms),
            body_unread: false,
            peer: None,
            admission: Admission::new(counters),
            config: None,
            hold: None,
        }
    }

    /// Takes what the request header says: its id, the client's address, whether a body
    /// follows; and sets the connection's timeouts from `config`, which the request keeps.
    pub(super) fn begin(&mut self, session: &mut Session, config: Arc<Config>) {
        crate::listen::header_in(&session.downstream_session);
        let req = session.req_header();
        let r = &mut self.record;
        r.method = req.method.as_str().to_string();
        r.path = req.uri.path().to_string();
        r.request_id = req
            .headers
            .get(crate::transport::headers::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(new_request_id, str::to_string);
        self.peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if let Some(peer) = self.peer {
            let xff = req
                .headers
                .get(crate::transport::headers::X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok());
            let ip = limits::client_ip(peer, xff, &config.trusted_proxies);
            // Sized for the longest IPv6 text: no regrowth.
            let mut text = String::with_capacity(39);
            crate::transport::headers::push_ip(&mut text, ip);
            r.client_ip = text;
        }
        self.body_unread = !session.is_body_empty();
        // Pingora turns keep-alive off when the request says so, and when it carries both
        // Transfer-Encoding and Content-Length (RFC 9112 6.1: a proxy in front may have
        // framed it by the length). A connection that may be kept is kept with no limit of
        // Pingora's: `server.keepalive_timeout` is the connection's header deadline's
        // (`listen::HeaderDeadline::keep_alive`, one timer a connection, where Pingora's
        // would set one around every request's first read).
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(0));
        }
        // The body's reads are timed by `intake::read_body` (`server.body_timeout`), with a
        // timer only for a read that waits; Pingora's own timer would read the clock for
        // every read. A connection whose answer starts before its body is read is closed
        // (Pingora's rule); should Pingora drain such a body instead, it does so for at most
        // as long.
        let downstream = &mut session.downstream_session;
        downstream.set_read_timeout(None);
        downstream.set_total_drain_timeout(Some(config.server.body_timeout));
        self.config = Some(config);
    }
}

/// A request id unique across processes: a per-process random seed and a counter.
fn new_request_id() -> String {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let t = crate::clock::Clock::now_ms(&crate::clock::SystemClock) as u64;
        t ^ (u64::from(std::process::id()) << 40)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // 16 hex digits of the seed, then the counter in at least 8 (`{:016x}{:08x}`).
    let mut id = String::with_capacity(24);
    crate::spec::text::push_hex(&mut id, seed, 16);
    crate::spec::text::push_hex(&mut id, n, (64 - n.leading_zeros()).div_ceil(4).max(8));
    id
}
