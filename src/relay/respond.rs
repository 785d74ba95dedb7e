//! Answers the gateway writes itself: errors (OpenAI-shaped JSON, or Anthropic-shaped on
//! `/v1/messages`), health, and the model
//! list. Each writes a complete response with a length so keep-alive survives.

use crate::error::GatewayError;
use crate::transport::headers::{X_REQUEST_ID, X_TOLLGATE_ATTEMPTS};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// Writes a complete JSON response.
pub async fn json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
) -> pingora_core::Result<()> {
    write_json(session, status, body, request_id, &[]).await
}

/// Writes a complete JSON response with extra header fields.
pub async fn json_with(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> pingora_core::Result<()> {
    write_json(session, status, body, request_id, extra).await
}

/// What a gateway error response carries besides the error.
pub struct Refusal<'a> {
    pub request_id: &'a str,
    /// The request body was not read to the end: the connection closes afterwards.
    pub body_unread: bool,
    pub attempts: usize,
    /// Extra headers (the key's `x-ratelimit-*`).
    pub headers: &'a [(HeaderName, HeaderValue)],
    /// The client speaks Anthropic's format (`/v1/messages`): the error is in its shape.
    pub anthropic: bool,
}

/// Writes a gateway error with its `retry-after`, `x-tollgate-attempts` and the extra
/// headers. When the request body was not read to the end the client connection cannot be
/// reused, so it is closed after the answer.
pub async fn error(
    session: &mut Session,
    e: &GatewayError,
    r: &Refusal<'_>,
) -> pingora_core::Result<()> {
    if r.body_unread {
        session.set_keepalive(None);
    }
    let mut extra = Vec::with_capacity(r.headers.len() + 2);
    if let Some(secs) = e.retry_after() {
        extra.push((http::header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
    }
    if r.attempts > 0 {
        extra.push((X_TOLLGATE_ATTEMPTS, HeaderValue::from(r.attempts)));
    }
    extra.extend(r.headers.iter().cloned());
    let body = if r.anthropic {
        use crate::provider::anthropic;
        let kind = anthropic::error_type(e.status());
        Bytes::from(anthropic::error_body(kind, &e.to_string()))
    } else {
        e.body()
    };
    write_json(session, e.status(), body, r.request_id, &extra).await
}

async fn write_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> pingora_core::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3 + extra.len()))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(X_REQUEST_ID, request_id)?;
    for (name, value) in extra {
        resp.insert_header(name.clone(), value.clone())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// `GET /v1/models`: the configured aliases (not `*`).
pub fn model_list(names: &[&str]) -> Bytes {
    let data: Vec<serde_json::Value> = names.iter().map(|n| model_object(n)).collect();
    Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string())
}

pub fn model_object(name: &str) -> serde_json::Value {
    serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": "tollgate"})
}
