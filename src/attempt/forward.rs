//! Stage 6 (inside the attempt loop): one attempt against one target. Builds the upstream
//! request fresh (hop-by-hop fields, client credentials and `Expect` never cross), swaps
//! in the target's credential in its provider's style, writes the buffered body and waits
//! for the response header under the upstream's timeouts. It decides nothing about
//! retrying: it reports what happened and `inspect` judges it.

use crate::transport::h1::{self, Conn, Head};
use crate::transport::headers::{connection_nominated, is_hop_by_hop};
use crate::transport::pool::Connections;
pub use crate::transport::sent::Sent;
use crate::upstream::{Server, Upstream};
use bytes::Bytes;
use pingora_core::upstreams::peer::Peer;
use pingora_http::RequestHeader;
use std::time::Duration;

/// Client headers that never reach an upstream, besides hop-by-hop ones: the client's
/// credentials, framing the gateway recomputes, and fields tied to the gateway's own keys.
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "expect",
    "authorization",
    "x-api-key",
    "api-key",
    "accept-encoding",
    "x-forwarded-for",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "cookie",
];

/// Everything about the client request an attempt needs; built once per request, so
/// the attempts do not hold the client session (which is watched for a disconnect).
pub struct Outgoing<'a> {
    pub method: http::Method,
    /// The client's query string, if any.
    pub query: Option<String>,
    /// The client's header fields that pass to every upstream, as wire lines.
    pub fields: Vec<u8>,
    /// The client's `anthropic-*` fields (version, beta features), as wire lines: they
    /// pass to Anthropic upstreams only, never to a route the request is translated for.
    pub anthropic_fields: Vec<u8>,
    /// The client sent `anthropic-version` (kept rather than the default).
    pub anthropic_version: bool,
    /// The client path after `/v1`, e.g. `/chat/completions`.
    pub suffix: &'a str,
    pub request_id: &'a str,
    pub forwarded_for: &'a str,
}

/// The `X-Forwarded-For` sent upstream: the client's own value, if any, with the TCP
/// peer appended.
pub fn forwarded_for(req: &RequestHeader, peer: Option<std::net::IpAddr>) -> String {
    let mut out = String::with_capacity(64);
    if let Some(prior) = req
        .headers
        .get(crate::transport::headers::X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        out.push_str(prior);
        out.push_str(", ");
    }
    match peer {
        Some(ip) => crate::transport::headers::push_ip(&mut out, ip),
        None => out.push_str("unknown"),
    }
    out
}

impl<'a> Outgoing<'a> {
    /// Client fields pass through as received, minus hop-by-hop ones and those in
    /// `NOT_FORWARDED` (and `traceparent` when `traced`: each attempt sends its own);
    /// `anthropic-*` ones are kept apart.
    pub fn new(
        client: &RequestHeader,
        suffix: &'a str,
        request_id: &'a str,
        forwarded_for: &'a str,
        traced: bool,
    ) -> Self {
        let nominated = connection_nominated(&client.headers);
        let mut fields = Vec::with_capacity(client.headers.len() * 48);
        let mut anthropic_fields = Vec::new();
        for (name, value) in client.headers.iter() {
            let n = name.as_str();
            if is_hop_by_hop(name, &nominated) || NOT_FORWARDED.contains(&n) {
                continue;
            }
            if traced && n == "traceparent" {
                continue;
            }
            let into = if n.starts_with("anthropic-") {
                &mut anthropic_fields
            } else {
                &mut fields
            };
            push_field(into, n.as_bytes(), value.as_bytes());
        }
        Outgoing {
            method: client.method.clone(),
            query: client.uri.query().map(str::to_string),
            fields,
            anthropic_fields,
            anthropic_version: client
                .headers
                .contains_key(crate::transport::headers::ANTHROPIC_VERSION),
            suffix,
            request_id,
            forwarded_for,
        }
    }
}

fn push_field(w: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    w.extend_from_slice(name);
    w.extend_from_slice(b": ");
    w.extend_from_slice(value);
    w.extend_from_slice(b"\r\n");
}

/// Why an attempt got no response header.
#[derive(Debug)]
pub enum TransportError {
    /// The server's address is unknown (DNS has not resolved it).
    Unresolved,
    Connect(String),
    /// No response header within `first_byte_timeout`.
    Timeout,
    /// The connection failed or closed before a response header arrived.
    Broken(String),
}

pub use crate::record::TransportFailure;

impl TransportError {
    pub fn failure(&self) -> TransportFailure {
        match self {
            TransportError::Unresolved => TransportFailure::Unresolved,
            TransportError::Connect(_) => TransportFailure::Connect,
            TransportError::Timeout => TransportFailure::Timeout,
            TransportError::Broken(_) => TransportFailure::Reset,
        }
    }
}

/// Where one attempt goes under the server's base path: the client's path and query, or a
/// translated request's own.
pub struct Wire<'a> {
    pub suffix: &'a str,
    pub query: Option<&'a str>,
    /// The attempt's `traceparent`, when tracing is on.
    pub traceparent: Option<&'a str>,
}

/// The upstream request line and header fields for one target, ready for the wire
/// (ending in the blank line): the client's fields, and the `Host`, length, request id,
/// `X-Forwarded-For` and credential the gateway sets.
pub fn request_head(
    out: &Outgoing,
    wire: &Wire,
    server: &Server,
    upstream: &Upstream,
    body_len: usize,
) -> Vec<u8> {
    let ep = &server.endpoint;
    let mut w = Vec::with_capacity(out.fields.len() + 384);
    w.extend_from_slice(out.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(ep.base_path.as_bytes());
    w.extend_from_slice(wire.suffix.as_bytes());
    let queries = ep.query.as_deref().into_iter().chain(wire.query);
    for (i, q) in queries.enumerate() {
        w.push(if i == 0 { b'?' } else { b'&' });
        w.extend_from_slice(q.as_bytes());
    }
    w.extend_from_slice(b" HTTP/1.1\r\n");
    push_field(&mut w, b"host", ep.authority().as_bytes());
    w.extend_from_slice(&out.fields);
    let anthropic = upstream.provider == crate::provider::Provider::Anthropic;
    if anthropic {
        w.extend_from_slice(&out.anthropic_fields);
    }
    push_field(
        &mut w,
        b"content-length",
        itoa::Buffer::new().format(body_len).as_bytes(),
    );
    push_field(&mut w, b"x-request-id", out.request_id.as_bytes());
    push_field(&mut w, b"x-forwarded-for", out.forwarded_for.as_bytes());
    if let Some(tp) = wire.traceparent {
        push_field(&mut w, b"traceparent", tp.as_bytes());
    }
    for (name, prefix, value) in crate::provider::credential(
        server.api_key.as_ref(),
        upstream.provider,
        anthropic && out.anthropic_version,
    )
    .into_iter()
    .flatten()
    {
        w.extend_from_slice(name.as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(prefix.as_bytes());
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(b"\r\n");
    w
}

/// How long to wait for a response header after a body write failed: an upstream that
/// refuses early (429, 413) often answers and closes before reading a large body.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Sends one attempt and reads the response header. A pooled connection that turns out
/// to be dead before anything was received is replaced by a fresh one (the upstream may
/// close idle connections at any time); other failures are returned.
pub async fn send(
    connections: &Connections,
    server: &Server,
    upstream: &Upstream,
    head: &[u8],
    body: &Bytes,
    head_request: bool,
) -> Result<Sent, TransportError> {
    let peer = server
        .endpoint
        .peer(upstream.connect_timeout, upstream.idle_timeout)
        .ok_or(TransportError::Unresolved)?;
    // A pool holds at most a few dead connections for one peer; past that, a failure
    // is the server's.
    let mut stale_retries = 3;
    loop {
        let pool_key = peer.reuse_hash();
        // Connecting is an 8 KiB future (TLS included); boxed by the dialer, it is only paid
        // for when the pool has no connection, instead of being carried and moved by every
        // request.
        let (stream, reused) = match connections.pool.take(pool_key) {
            Some(stream) => (stream, true),
            None => {
                let stream = connections
                    .dialer
                    .dial(&peer)
                    .await
                    .map_err(|e| TransportError::Connect(e.to_string()))?;
                (stream, false)
            }
        };
        let mut conn = Conn::new(stream);
        match exchange(&mut conn, head, body, upstream, head_request).await {
            Ok(head) => {
                return Ok(Sent {
                    conn,
                    head,
                    pool_key,
                    prefix: Vec::new(),
                    ended: false,
                })
            }
            Err(error) => {
                let stale = !matches!(error, TransportError::Timeout) && !conn.received_anything();
                if reused && stale && stale_retries > 0 {
                    stale_retries -= 1;
                    continue;
                }
                return Err(error);
            }
        }
    }
}

async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    body: &Bytes,
    upstream: &Upstream,
    head_request: bool,
) -> Result<Head, TransportError> {
    let written = conn.send(head, body, upstream.idle_timeout).await;
    let wait = if written.is_ok() {
        upstream.first_byte_timeout
    } else {
        EARLY_ANSWER_WAIT.min(upstream.first_byte_timeout)
    };
    match conn.read_head(wait, head_request).await {
        Ok(head) => Ok(head),
        Err(e) => Err(match (written, e) {
            (Err(write_error), _) => TransportError::Broken(write_error.to_string()),
            (Ok(()), h1::Error::Timeout) => TransportError::Timeout,
            (Ok(()), e) => TransportError::Broken(e.to_string()),
        }),
    }
}
