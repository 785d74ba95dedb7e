//! The gateway's own errors: what went wrong for a client request, the status it maps
//! to, a low-cardinality `kind` for logs and metrics, and the OpenAI-shaped JSON body.
//! Messages name the problem for the client and never carry credentials or internals.

use bytes::Bytes;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GatewayError {
    #[error("{}", .0.message())]
    Unauthorized(Rejected),
    #[error("This API key may not use the model `{0}`.")]
    ModelNotAllowed(String),
    #[error("{message}")]
    BudgetExceeded {
        message: String,
        /// `key` or `team`.
        scope: &'static str,
        max_micro: i64,
        /// RFC 3339, `None` for a total budget.
        resets_at: Option<String>,
    },
    #[error("The model `{0}` has no price, and this key's budget is enforced: set its price in `pricing`, or `budgets.unpriced: allow`.")]
    Unpriced(String),
    #[error("Request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("The request body was not received in time: nothing arrived for {secs}s.")]
    RequestTimeout { secs: u64 },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("The model `{model}` has no upstream that serves {path}.")]
    NoRouteForEndpoint { model: String, path: String },
    #[error("This request needs about {needed} tokens (estimated prompt plus max_tokens), more than any route of model `{model}` takes; the largest context window available is {largest} tokens.")]
    ContextLengthExceeded {
        model: String,
        needed: u64,
        largest: u64,
    },
    #[error(
        "The gateway's shared rate-limit counters cannot be reached; please try again shortly."
    )]
    LimitsUnavailable,
    #[error("Unknown path {0}.")]
    NotFound(String),
    #[error("Method {0} is not allowed on this path.")]
    MethodNotAllowed(String),
    #[error("{message}")]
    UpstreamUnavailable {
        message: String,
        retry_after: Option<u64>,
    },
    #[error("{message}")]
    UpstreamTimeout {
        message: String,
        retry_after: Option<u64>,
    },
    #[error("{message}")]
    NoTarget {
        message: String,
        retry_after: Option<u64>,
    },
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
}

/// A wait as whole seconds for `retry-after`: rounded up, at least 1.
pub fn retry_after_secs(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::Unauthorized(_) => 401,
            GatewayError::ModelNotAllowed(_) | GatewayError::Unpriced(_) => 403,
            GatewayError::BudgetExceeded { .. } => 402,
            GatewayError::BodyTooLarge { .. } => 413,
            GatewayError::BadRequest(_) => 400,
            GatewayError::RequestTimeout { .. } => 408,
            GatewayError::ModelNotFound(_) | GatewayError::NotFound(_) => 404,
            GatewayError::NoRouteForEndpoint { .. } => 400,
            GatewayError::ContextLengthExceeded { .. } => 400,
            GatewayError::LimitsUnavailable => 503,
            GatewayError::MethodNotAllowed(_) => 405,
            GatewayError::UpstreamUnavailable { .. } => 503,
            GatewayError::UpstreamTimeout { .. } => 503,
            GatewayError::NoTarget { .. } => 503,
            GatewayError::RateLimited { .. } => 429,
        }
    }

    /// A fixed, low-cardinality name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::ModelNotAllowed(_) => "model_not_allowed",
            GatewayError::BudgetExceeded { .. } => "budget_exceeded",
            GatewayError::Unpriced(_) => "unpriced_model",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::RequestTimeout { .. } => "request_timeout",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::NoRouteForEndpoint { .. } => "no_route",
            GatewayError::ContextLengthExceeded { .. } => "context_length_exceeded",
            GatewayError::LimitsUnavailable => "limits_unavailable",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::UpstreamUnavailable { .. } => "upstream_unavailable",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::NoTarget { .. } => "no_target",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
        }
    }

    /// Seconds after which the client may try again (`retry-after`), when known.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::UpstreamUnavailable { retry_after, .. }
            | GatewayError::UpstreamTimeout { retry_after, .. }
            | GatewayError::NoTarget { retry_after, .. } => *retry_after,
            GatewayError::RateLimited { retry_after, .. } => Some(*retry_after),
            GatewayError::LimitsUnavailable => Some(1),
            _ => None,
        }
    }

    /// OpenAI's `error.type`.
    fn error_type(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized(_) => "invalid_request_error",
            GatewayError::BudgetExceeded { .. } => "insufficient_quota",
            GatewayError::UpstreamUnavailable { .. }
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::NoTarget { .. } => "api_error",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code`.
    fn code(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized(_) => "invalid_api_key",
            GatewayError::ModelNotFound(_) => "model_not_found",
            other => other.kind(),
        }
    }

    /// `{"error":{"message","type","param","code"}}`
    pub fn body(&self) -> Bytes {
        let mut body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": null,
                "code": self.code(),
            }
        });
        if let GatewayError::BudgetExceeded {
            scope,
            max_micro,
            resets_at,
            ..
        } = self
        {
            body["error"]["scope"] = (*scope).into();
            body["error"]["max_usd"] = crate::spec::usd(*max_micro).into();
            body["error"]["resets_at"] = resets_at.clone().into();
        }
        if let GatewayError::ContextLengthExceeded { largest, .. } = self {
            body["error"]["max_context"] = (*largest).into();
        }
        Bytes::from(body.to_string())
    }
}

/// Why a presented key was not accepted: the 401 says which, never the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Unknown,
    Expired,
    Blocked,
    Deleted,
    /// A secret replaced by a rotation whose grace period is over.
    Rotated,
}

impl Rejected {
    pub fn message(self) -> &'static str {
        match self {
            Rejected::Unknown => {
                "Invalid or missing API key. Pass it as 'Authorization: Bearer KEY'."
            }
            Rejected::Expired => "This API key has expired.",
            Rejected::Blocked => "This API key is blocked.",
            Rejected::Deleted => "This API key was deleted.",
            Rejected::Rotated => {
                "This API key was rotated: the secret presented is no longer valid."
            }
        }
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
