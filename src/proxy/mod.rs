//! A request's stages: `Gateway::answer` answers it (the LLM endpoints entirely, by the
//! pipeline around the attempt loop, because Pingora's own retry can neither read an
//! error body nor replay a body over 64 KiB) and `Gateway::record` records it, whatever
//! path it ended by. `serve` calls them for HTTP/1.x requests; the Pingora `ProxyHttp`
//! hooks `request_filter` and `logging` call them for HTTP/2.
//!
//! `context` holds the per-request state, `dispatch` picks the endpoint, `intake` reads
//! the request body, `pipeline` runs the LLM stages one call each.

mod cached;
mod context;
mod dispatch;
mod intake;
mod pipeline;
mod serve;

pub use context::RequestCtx;

use crate::cache::CacheBackend;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::GatewayError;
use crate::keys::alerts::Alerts;
use crate::keys::Directory;
use crate::limits::CounterBackend;
use crate::observe::spans::Traced;
use crate::observe::{self, Failure};
use crate::relay::respond;
use crate::store::usage::UsageQueue;
use crate::trace::Tracer;
use crate::transport::pool::Connections;
use crate::upstream::shared::Cooldowns;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType};
use pingora_proxy::{ProxyHttp, Session};
use std::sync::Arc;

/// The gateway service: the live config and the state every request shares (a clone
/// shares all of it).
#[derive(Clone)]
pub struct Gateway {
    pub config: Arc<ArcSwap<Config>>,
    connections: Arc<Connections>,
    /// Limit counters; they outlive config reloads.
    counters: Arc<dyn CounterBackend>,
    /// Stored keys and teams, and every budget.
    keys: Arc<Directory>,
    /// Usage rows on their way to the store.
    usage: Arc<UsageQueue>,
    /// Budget alerts on their way to the webhook.
    alerts: Option<Arc<Alerts>>,
    /// Stored answers of the aliases that cache.
    cache: Arc<dyn CacheBackend>,
    /// Cooldowns shared with other instances (`cluster.redis`).
    cooldowns: Arc<dyn Cooldowns>,
    /// Traces, when `tracing.otlp` is set.
    tracer: Option<Arc<Tracer>>,
    /// Wall time: request timestamps, quota resets, translated answers' `created`.
    clock: Arc<dyn Clock>,
}

/// What the gateway's shared state is made of, for [`Gateway::new`].
pub struct Shared {
    pub connections: Arc<Connections>,
    pub counters: Arc<dyn CounterBackend>,
    pub keys: Arc<Directory>,
    pub usage: Arc<UsageQueue>,
    pub alerts: Option<Arc<Alerts>>,
    pub cache: Arc<dyn CacheBackend>,
    pub cooldowns: Arc<dyn Cooldowns>,
    pub tracer: Option<Arc<Tracer>>,
    pub clock: Arc<dyn Clock>,
}

impl Gateway {
    pub fn new(config: Arc<ArcSwap<Config>>, shared: Shared) -> Self {
        Gateway {
            config,
            connections: shared.connections,
            counters: shared.counters,
            keys: shared.keys,
            usage: shared.usage,
            alerts: shared.alerts,
            cache: shared.cache,
            cooldowns: shared.cooldowns,
            tracer: shared.tracer,
            clock: shared.clock,
        }
    }
}

/// How a request that was not answered normally ends.
enum Outcome {
    /// Answer the client with this error.
    Refused(GatewayError),
    /// The response already started (or the client left): end the request with an error.
    Aborted(Box<Error>),
}

impl From<GatewayError> for Outcome {
    fn from(e: GatewayError) -> Self {
        Outcome::Refused(e)
    }
}

impl From<Box<Error>> for Outcome {
    fn from(e: Box<Error>) -> Self {
        Outcome::Aborted(e)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora adds a (disabled) compression module by default,
    /// which still builds a context and runs its filters on every request and body chunk;
    /// the gateway never re-encodes a body.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(Arc::clone(&self.counters), self.clock.now_ms())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_core::Result<bool> {
        self.answer(session, ctx).await.map(|()| true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora_core::Result<Box<HttpPeer>> {
        // Every request is answered in request_filter; reaching Pingora's own proxy path
        // would be a bug, and it must not silently proxy somewhere.
        Error::e_explain(ErrorType::InternalError, "no native proxy path")
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora_core::Error>,
        ctx: &mut RequestCtx,
    ) {
        self.record(session, e, ctx);
    }
}

impl Gateway {
    /// Answers a request (the LLM endpoints, the few others, or an error); `Err` when the
    /// request ends without a whole answer (the client left, or the answer broke off).
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_core::Result<()> {
        let config = self.config.load_full();
        ctx.begin(session, Arc::clone(&config));
        if let Some(t) = &self.tracer {
            let h = &session.req_header().headers;
            let header = |name: &str| h.get(name).map(|v| v.as_bytes());
            let trace = t.begin(header("traceparent"), header("tracestate"));
            ctx.record.trace = Some(Box::new(Traced::new(trace)));
        }
        match self.dispatch(session, ctx, &config).await {
            Ok(()) => Ok(()),
            Err(Outcome::Refused(e)) => {
                ctx.record.status = e.status();
                ctx.record.error = Some(Failure::Refused(e.kind()));
                let extra = ctx.answer_headers();
                let r = respond::Refusal {
                    request_id: &ctx.record.request_id,
                    body_unread: ctx.body_unread,
                    attempts: ctx.record.attempts.len(),
                    headers: &extra,
                    anthropic: ctx
                        .record
                        .path
                        .trim_start_matches("/v1")
                        .starts_with("/messages"),
                };
                respond::error(session, &e, &r).await?;
                if ctx.body_unread && !matches!(e, GatewayError::RequestTimeout { .. }) {
                    intake::linger(session).await;
                }
                Ok(())
            }
            Err(Outcome::Aborted(e)) => Err(e),
        }
    }

    /// Records a finished request: the access log, metrics, its spans and its usage row.
    fn record(&self, session: &Session, e: Option<&pingora_core::Error>, ctx: &mut RequestCtx) {
        if ctx.record.status == 0 {
            ctx.record.status = session.response_written().map_or(0, |r| r.status.as_u16());
        }
        if e.is_some() && ctx.record.error.is_none() {
            ctx.record.error = Some(Failure::Aborted);
        }
        ctx.record.bytes_in = session.body_bytes_read();
        // A request Pingora refused before request_filter has no config yet: the live one.
        let config = ctx.config.take().unwrap_or_else(|| self.config.load_full());
        observe::finish(&ctx.record, &config);
        if let Some(t) = &self.tracer {
            if ctx.record.trace.as_ref().is_some_and(|t| t.ctx.sampled) {
                SPANS.with_borrow_mut(|enc| {
                    enc.buf.clear();
                    let n = observe::spans::write(&ctx.record, &config, enc);
                    t.export(&enc.buf, n);
                });
            }
        }
        // The record's last use: its strings move into the row.
        if let Some(row) = observe::usage_row(&mut ctx.record, self.keys.now()) {
            self.usage.push(row);
        }
    }
}

thread_local! {
    /// Where a finished request's spans are written before they are queued, kept per
    /// thread so that no request allocates its own.
    static SPANS: std::cell::RefCell<crate::trace::wire::Enc> = std::cell::RefCell::default();
}

/// The limit scopes a request of `caller` from `client_ip` counts in.
fn scopes<'a>(
    config: &'a crate::config::Config,
    caller: &'a crate::keys::auth::Caller,
    client_ip: &'a str,
) -> crate::limits::Scopes<'a> {
    crate::limits::Scopes {
        global: &config.limits.global,
        per_ip: &config.limits.per_ip,
        client_ip,
        key: caller.key_limits(),
        team: caller.team_limits(),
    }
}
