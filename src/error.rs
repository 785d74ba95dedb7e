//! The gateway's own errors: what went wrong for a client request, the status it maps
//! to, a low-cardinality `kind` for logs and metrics, and the OpenAI-shaped JSON body.
//! Messages name the problem for the client and never carry credentials or internals.

use bytes::Bytes;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GatewayError {
    #[error("Invalid or missing API key. Pass it as 'Authorization: Bearer KEY'.")]
    Unauthorized,
    #[error("Request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("The model `{model}` has no upstream that serves {path}.")]
    NoRouteForEndpoint { model: String, path: String },
    #[error("Unknown path {0}.")]
    NotFound(String),
    #[error("Method {0} is not allowed on this path.")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UpstreamUnavailable(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("{0}")]
    NoTarget(String),
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::Unauthorized => 401,
            GatewayError::BodyTooLarge { .. } => 413,
            GatewayError::BadRequest(_) => 400,
            GatewayError::ModelNotFound(_) | GatewayError::NotFound(_) => 404,
            GatewayError::NoRouteForEndpoint { .. } => 400,
            GatewayError::MethodNotAllowed(_) => 405,
            GatewayError::UpstreamUnavailable(_) => 502,
            GatewayError::UpstreamTimeout(_) => 504,
            GatewayError::NoTarget(_) => 503,
        }
    }

    /// A fixed, low-cardinality name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::NoRouteForEndpoint { .. } => "no_route",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::UpstreamUnavailable(_) => "upstream_unavailable",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::NoTarget(_) => "no_target",
        }
    }

    /// OpenAI's `error.type`.
    fn error_type(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized => "invalid_request_error",
            GatewayError::UpstreamUnavailable(_)
            | GatewayError::UpstreamTimeout(_)
            | GatewayError::NoTarget(_) => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code`.
    fn code(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized => "invalid_api_key",
            GatewayError::ModelNotFound(_) => "model_not_found",
            other => other.kind(),
        }
    }

    /// `{"error":{"message","type","param","code"}}`
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": null,
                "code": self.code(),
            }
        });
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_openai_shaped() {
        let e = GatewayError::ModelNotFound("gpt-9".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
        assert!(v["error"]["param"].is_null());
        assert_eq!(e.status(), 404);
    }
}
