//! Which endpoint a request is for, and who is calling: `/health`; then, under `/v1`,
//! authentication (stage 1), the gateway's own answers (`/key/info`, `/models`), and the
//! LLM endpoints, which go through the first limits stage and on to the pipeline.

use super::{Gateway, Outcome, RequestCtx};
use crate::config::Config;
use crate::error::GatewayError;
use crate::keys::auth::{presented_key, Caller};
use crate::limits::{self, Refusal};
use crate::relay::respond;
use bytes::Bytes;
use pingora_proxy::Session;

/// The LLM endpoints forwarded through the attempt loop, after `/v1`.
const FORWARDED: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
    super::pipeline::COUNT_TOKENS,
];

impl Gateway {
    pub(super) async fn dispatch(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &Config,
    ) -> Result<(), Outcome> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        if path == "/health" || path == "/healthz" {
            let body = Bytes::from_static(b"{\"status\":\"ok\"}");
            return answer(session, ctx, body).await;
        }
        let suffix = match path.strip_prefix("/v1") {
            Some(suffix) => suffix,
            // Also without the prefix, as LiteLLM and most OpenAI-compatible servers take
            // it: an OpenAI SDK whose base URL is `http://host:4000` sends
            // `/chat/completions`.
            None if unprefixed(&path) => path.as_str(),
            None => return Err(GatewayError::NotFound(path).into()),
        };

        let key = presented_key(
            req.headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            req.headers
                .get(crate::transport::headers::X_API_KEY)
                .map(|v| v.as_bytes()),
        );
        let caller = self
            .keys
            .authenticate(&config.keys, key)
            .map_err(GatewayError::Unauthorized)?;
        ctx.record.caller = caller.shared_name();
        if !matches!(caller, Caller::Anonymous) {
            ctx.record.key_id = Some(caller.id());
            ctx.record.team = caller.team().map(|t| std::sync::Arc::clone(&t.id));
        }
        let get_only = || {
            if method == http::Method::GET {
                Ok(())
            } else {
                Err(GatewayError::MethodNotAllowed(method.to_string()))
            }
        };
        if suffix == "/key/info" {
            get_only()?;
            crate::keys::reserve::read_shared(&self.keys, &caller, &*self.counters).await;
            let body = crate::keys::info::key_info(&caller, &self.keys);
            return answer(session, ctx, Bytes::from(body.to_string())).await;
        }
        if suffix == "/models" || suffix.starts_with("/models/") {
            get_only()?;
            let body = match suffix.strip_prefix("/models/") {
                None => {
                    let mut names = config.router.alias_names();
                    names.retain(|n| caller.may_use(n));
                    respond::model_list(&names)
                }
                Some(id) if config.router.is_configured(id) && caller.may_use(id) => {
                    Bytes::from(respond::model_object(id).to_string())
                }
                Some(id) => return Err(GatewayError::ModelNotFound(id.to_string()).into()),
            };
            return answer(session, ctx, body).await;
        }
        if !FORWARDED.contains(&suffix) {
            return Err(GatewayError::NotFound(path).into());
        }
        if method != http::Method::POST {
            return Err(GatewayError::MethodNotAllowed(method.to_string()).into());
        }
        let who = super::scopes(config, &caller, &ctx.record.client_ip);
        let admitted = limits::admit_request(&mut ctx.admission, &who).await;
        admitted.map_err(|r| refused(ctx, r))?;
        self.pipeline(session, ctx, config, &caller, suffix).await
    }
}

/// A path the gateway serves under `/v1` given without it.
fn unprefixed(path: &str) -> bool {
    FORWARDED.contains(&path)
        || path == "/models"
        || path.starts_with("/models/")
        || path == "/key/info"
}

/// A 200 the gateway answers itself.
async fn answer(session: &mut Session, ctx: &mut RequestCtx, body: Bytes) -> Result<(), Outcome> {
    ctx.record.status = 200;
    respond::json(session, 200, body, &ctx.record.request_id).await?;
    Ok(())
}

/// Records a limit refusal and turns it into the client's 429.
pub(super) fn refused(ctx: &mut RequestCtx, r: Refusal) -> GatewayError {
    if r.unavailable {
        return GatewayError::LimitsUnavailable;
    }
    ctx.record.limited = Some(r.scope.as_str());
    GatewayError::RateLimited {
        message: r.message(),
        retry_after: r.retry_after,
    }
}
