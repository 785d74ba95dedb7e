//! Stage 6 (inside the attempt loop): one attempt against one target. Builds the upstream
//! request fresh (hop-by-hop fields, client credentials and `Expect` never cross), swaps
//! in the target's credential in its provider's style, writes the buffered body and waits
//! for the response header under the upstream's timeouts. It decides nothing about
//! retrying: it reports what happened and `inspect` judges it.

use crate::config::file::Provider;
use crate::headers::{connection_nominated, is_hop_by_hop};
use crate::select::{Server, Upstream};
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
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

/// `anthropic-version` sent when the client did not send one.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Everything about the client request an attempt needs; built once per request.
pub struct Outgoing<'a> {
    pub client: &'a RequestHeader,
    /// The client path after `/v1`, e.g. `/chat/completions`.
    pub suffix: &'a str,
    pub request_id: &'a str,
    pub forwarded_for: &'a str,
}

/// A response header received from the target; the body is still unread.
pub struct Sent {
    pub session: HttpSession,
    pub peer: HttpPeer,
    /// False when the upstream answered before taking the whole body: the connection
    /// must not be pooled.
    pub body_complete: bool,
    /// Body chunks already read (an error body read to classify it), relayed first.
    pub prefix: Vec<Bytes>,
    /// The whole response body is in `prefix`.
    pub ended: bool,
}

impl Sent {
    pub fn status(&self) -> u16 {
        self.session
            .response_header()
            .map_or(0, |h| h.status.as_u16())
    }

    pub fn headers(&self) -> Option<&http::HeaderMap> {
        self.session.response_header().map(|h| &h.headers)
    }

    /// Reads up to `limit` bytes of the response body into `prefix`, so that `inspect` can
    /// classify an error. Stops early at the end of the body or on an error.
    pub async fn read_prefix(&mut self, limit: usize, idle: Duration) {
        self.session.set_read_timeout(Some(idle));
        let mut total = 0;
        while total < limit {
            match self.session.read_response_body().await {
                Ok(Some(chunk)) => {
                    total += chunk.len();
                    self.prefix.push(chunk);
                }
                Ok(None) => {
                    self.ended = true;
                    return;
                }
                Err(_) => {
                    // Nothing more can be read; what was read is what the client gets.
                    self.ended = true;
                    self.body_complete = false;
                    return;
                }
            }
        }
    }

    /// The prefix as one contiguous slice (copied only when it came in several chunks).
    pub fn prefix_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.prefix.as_slice() {
            [] => std::borrow::Cow::Borrowed(&[]),
            [one] => std::borrow::Cow::Borrowed(one),
            many => std::borrow::Cow::Owned(many.concat()),
        }
    }
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

impl TransportError {
    /// Low-cardinality outcome name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportError::Unresolved => "unresolved",
            TransportError::Connect(_) => "connect_error",
            TransportError::Timeout => "timeout",
            TransportError::Broken(_) => "reset",
        }
    }
}

/// Builds the upstream request header for one target.
pub fn request_header(
    out: &Outgoing,
    server: &Server,
    upstream: &Upstream,
    body_len: usize,
) -> pingora_core::Result<RequestHeader> {
    let ep = &server.endpoint;
    let mut path = String::with_capacity(ep.base_path.len() + out.suffix.len() + 32);
    path.push_str(&ep.base_path);
    path.push_str(out.suffix);
    let client_query = out.client.uri.query();
    match (&ep.query, client_query) {
        (Some(a), Some(b)) => {
            path.push('?');
            path.push_str(a);
            path.push('&');
            path.push_str(b);
        }
        (Some(q), None) => {
            path.push('?');
            path.push_str(q);
        }
        (None, Some(q)) => {
            path.push('?');
            path.push_str(q);
        }
        (None, None) => {}
    }
    let mut req = RequestHeader::build(
        out.client.method.clone(),
        path.as_bytes(),
        Some(out.client.headers.len() + 6),
    )?;
    let nominated = connection_nominated(&out.client.headers);
    for (name, value) in out.client.headers.iter() {
        if is_hop_by_hop(name, &nominated) || NOT_FORWARDED.contains(&name.as_str()) {
            continue;
        }
        req.append_header(name.clone(), value.clone())?;
    }
    req.insert_header(http::header::HOST, ep.authority())?;
    req.insert_header(http::header::CONTENT_LENGTH, body_len)?;
    req.insert_header("x-request-id", out.request_id)?;
    req.insert_header("x-forwarded-for", out.forwarded_for)?;
    set_credential(&mut req, server, upstream.provider)?;
    Ok(req)
}

/// Sets the server's credential in its provider's style (and `anthropic-version` for
/// Anthropic when the client sent none).
pub fn set_credential(
    req: &mut RequestHeader,
    server: &Server,
    provider: Provider,
) -> pingora_core::Result<()> {
    if let Some(key) = &server.api_key {
        match provider {
            Provider::Openai | Provider::Generic => {
                req.insert_header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", key.expose()),
                )?;
            }
            Provider::Anthropic => req.insert_header("x-api-key", key.expose())?,
            Provider::Azure => req.insert_header("api-key", key.expose())?,
        }
    }
    if provider == Provider::Anthropic && req.headers.get("anthropic-version").is_none() {
        req.insert_header("anthropic-version", ANTHROPIC_VERSION)?;
    }
    Ok(())
}

/// How long to wait for a response header after a body write failed: an upstream that
/// refuses early (429, 413) often answers and closes before reading a large body.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Sends one attempt and reads the response header. A pooled connection that turns out
/// to be dead before anything was received is replaced by a fresh one (the upstream may
/// close idle connections at any time); other failures are returned.
pub async fn send(
    connector: &Connector,
    server: &Server,
    upstream: &Upstream,
    header: &RequestHeader,
    body: &Bytes,
) -> Result<Sent, TransportError> {
    let peer = server
        .endpoint
        .peer(upstream.connect_timeout, upstream.idle_timeout)
        .ok_or(TransportError::Unresolved)?;
    // A pool holds at most a few dead connections for one peer; past that, a failure
    // is the server's.
    let mut stale_retries = 3;
    loop {
        let (session, reused) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        match exchange(session, header, body, upstream).await {
            Ok((session, body_complete)) => {
                return Ok(Sent {
                    session,
                    peer,
                    body_complete,
                    prefix: Vec::new(),
                    ended: false,
                })
            }
            Err(Failure {
                error,
                received_nothing,
            }) => {
                if reused && received_nothing && stale_retries > 0 {
                    stale_retries -= 1;
                    continue;
                }
                return Err(error);
            }
        }
    }
}

struct Failure {
    error: TransportError,
    received_nothing: bool,
}

async fn exchange(
    mut session: HttpSession,
    header: &RequestHeader,
    body: &Bytes,
    upstream: &Upstream,
) -> Result<(HttpSession, bool), Failure> {
    let broken = |e: Box<pingora_core::Error>| Failure {
        error: TransportError::Broken(e.to_string()),
        received_nothing: true,
    };
    session.set_write_timeout(Some(upstream.idle_timeout));
    let written = async {
        session
            .write_request_header(Box::new(header.clone()))
            .await?;
        if !body.is_empty() {
            session.write_request_body(body.clone(), true).await?;
        }
        session.finish_request_body().await
    }
    .await;
    let body_complete = written.is_ok();
    let wait = if body_complete {
        upstream.first_byte_timeout
    } else {
        EARLY_ANSWER_WAIT.min(upstream.first_byte_timeout)
    };
    session.set_read_timeout(Some(wait));
    match session.read_response_header().await {
        Ok(()) => Ok((session, body_complete)),
        Err(e) => {
            if let Err(write_error) = written {
                return Err(broken(write_error));
            }
            let timed_out = matches!(e.etype(), pingora_core::ErrorType::ReadTimedout);
            Err(Failure {
                error: if timed_out {
                    TransportError::Timeout
                } else {
                    TransportError::Broken(e.to_string())
                },
                // A timeout is not a dead pooled connection: the request reached a server.
                received_nothing: !timed_out,
            })
        }
    }
}
