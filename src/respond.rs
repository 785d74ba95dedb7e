//! Answers the gateway writes itself: errors (OpenAI-shaped JSON), health, and the model
//! list. Each writes a complete response with a length so keep-alive survives.

use crate::error::GatewayError;
use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// Writes a complete JSON response.
pub async fn json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
) -> pingora_core::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header("x-request-id", request_id)?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes a gateway error. When the request body was not read to the end the client
/// connection cannot be reused, so it is closed after the answer.
/// What a gateway error response carries besides the error.
pub struct Refusal<'a> {
    pub request_id: &'a str,
    /// The request body was not read to the end: the connection closes afterwards.
    pub body_unread: bool,
    pub attempts: usize,
    /// Extra headers (the key's `x-ratelimit-*`).
    pub headers: &'a [(&'static str, String)],
}

pub async fn error(
    session: &mut Session,
    e: &GatewayError,
    r: &Refusal<'_>,
) -> pingora_core::Result<()> {
    if r.body_unread {
        session.set_keepalive(None);
    }
    let (request_id, attempts) = (r.request_id, r.attempts);
    let body = e.body();
    let mut resp = ResponseHeader::build(e.status(), Some(6))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header("x-request-id", request_id)?;
    if let Some(secs) = e.retry_after() {
        resp.insert_header(http::header::RETRY_AFTER, secs.max(1))?;
    }
    if attempts > 0 {
        resp.insert_header("x-tollgate-attempts", attempts)?;
    }
    for (name, value) in r.headers {
        resp.insert_header(*name, value.as_str())?;
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
