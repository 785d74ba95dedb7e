//! The admin listener (loopback by default), separate from the proxy path: `/health`
//! (the process is up), `/ready` (every alias has at least one usable target) and
//! `/metrics` (Prometheus text format, the default registry of prometheus 0.14).

use crate::config::Config;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::Encoder;
use std::sync::Arc;

pub struct AdminApp {
    pub config: Arc<ArcSwap<Config>>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/health" => reply(200, "application/json", b"{\"status\":\"ok\"}".to_vec()),
            "/ready" => {
                let config = self.config.load();
                let mut unready: Vec<&str> = config
                    .router
                    .all()
                    .filter(|a| !a.has_usable_target())
                    .map(|a| a.name.as_str())
                    .collect();
                unready.sort_unstable();
                let body = serde_json::json!({
                    "status": if unready.is_empty() { "ready" } else { "not_ready" },
                    "unavailable_models": unready,
                });
                reply(
                    if unready.is_empty() { 200 } else { 503 },
                    "application/json",
                    body.to_string().into_bytes(),
                )
            }
            "/metrics" => {
                let mut buf = Vec::new();
                let encoder = prometheus::TextEncoder::new();
                match encoder.encode(&prometheus::gather(), &mut buf) {
                    Ok(()) => reply(200, encoder.format_type(), buf),
                    Err(e) => reply(500, "text/plain", e.to_string().into_bytes()),
                }
            }
            _ => reply(
                404,
                "application/json",
                b"{\"error\":\"not found\"}".to_vec(),
            ),
        }
    }
}
