//! The Pingora `ProxyHttp` implementation: a thin dispatcher. Each hook calls one stage;
//! the LLM endpoints are answered entirely inside `request_filter` by the attempt loop
//! (see `failover`), because Pingora's own retry can neither read an error body nor
//! replay a body over 64 KiB. `logging` always runs and is where a request is recorded.

use crate::auth::{presented_key, Caller, KeyStore};
use crate::body;
use crate::config::Config;
use crate::error::GatewayError;
use crate::failover::{self, Dialect};
use crate::forward::Outgoing;
use crate::keys::budget::{Exceeded, Hold};
use crate::keys::Directory;
use crate::limits::{self, key_hash, Admission, Counters, Refusal, Scope};
use crate::observe::{self, Failure, Record};
use crate::respond;
use crate::route::Alias;
use crate::store::usage::{UsageQueue, UsageRow};
use crate::stream::{self, Relayed, Stamp};
use crate::transport::pool::Connections;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType};
use pingora_proxy::{ProxyHttp, Session};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The gateway service: the live config and where upstream connections come from.
pub struct Gateway {
    pub config: Arc<ArcSwap<Config>>,
    connections: Arc<Connections>,
    /// Limit counters; they outlive config reloads.
    counters: Counters,
    /// Stored keys and teams, and every budget.
    keys: Arc<Directory>,
    /// Usage rows on their way to the store.
    usage: Arc<UsageQueue>,
    /// Budget alerts on their way to the webhook.
    alerts: Option<Arc<crate::keys::alerts::Alerts>>,
}

impl Gateway {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        connections: Arc<Connections>,
        keys: Arc<Directory>,
        usage: Arc<UsageQueue>,
        alerts: Option<Arc<crate::keys::alerts::Alerts>>,
    ) -> Self {
        Gateway {
            config,
            connections,
            counters: Counters::default(),
            keys,
            usage,
            alerts,
        }
    }
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    pub record: Record,
    /// Whether the client's request body is still unread (the connection then closes
    /// after an early answer).
    body_unread: bool,
    /// The TCP peer (the client, or the proxy in front of it).
    peer: Option<IpAddr>,
    /// What this request holds against the limits; released when the context drops.
    admission: Admission,
    /// The config the request started with, kept to the end so that a reload in the
    /// middle of a request never mixes two configs (the access log and metrics included).
    config: Option<Arc<Config>>,
    /// What this request reserved against its budgets; released when the context drops
    /// unless settled.
    hold: Option<Hold>,
}

/// The LLM endpoints forwarded through the attempt loop, after `/v1`.
const FORWARDED: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
];

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora adds a (disabled) compression module by default,
    /// which still builds a context and runs its filters on every request and body chunk;
    /// the gateway never re-encodes a body.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_core::Result<bool> {
        let config = self.config.load_full();
        ctx.config = Some(Arc::clone(&config));
        begin(session, ctx, &config);
        match self.handle(session, ctx, &config).await {
            Ok(()) => Ok(true),
            Err(Outcome::Refused(e)) => {
                ctx.record.status = e.status();
                ctx.record.error = Some(Failure::Refused(e.kind()));
                let extra = ctx
                    .admission
                    .key_headers
                    .as_ref()
                    .map(|h| h.pairs())
                    .unwrap_or_default();
                let r = respond::Refusal {
                    request_id: &ctx.record.request_id,
                    body_unread: ctx.body_unread,
                    attempts: ctx.record.attempts.len(),
                    headers: &extra,
                };
                respond::error(session, &e, &r).await?;
                if ctx.body_unread && !matches!(e, GatewayError::RequestTimeout { .. }) {
                    linger(session).await;
                }
                Ok(true)
            }
            Err(Outcome::Aborted(e)) => Err(e),
        }
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
        // The record's last use: its strings move into the row.
        if let Some(row) = usage_row(&mut ctx.record, self.keys.now()) {
            self.usage.push(row);
        }
    }
}

enum Outcome {
    /// Answer the client with this error.
    Refused(GatewayError),
    /// The response already started (or the client left): end the request with an error.
    Aborted(Box<Error>),
}

/// Records a limit refusal and turns it into the client's 429.
fn refused(ctx: &mut RequestCtx, r: Refusal) -> GatewayError {
    ctx.record.limited = Some(r.scope.as_str());
    GatewayError::RateLimited {
        message: r.message(),
        retry_after: r.retry_after,
    }
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

fn begin(session: &mut Session, ctx: &mut RequestCtx, config: &Config) {
    crate::client_conn::header_in(&session.downstream_session);
    let req = session.req_header();
    let r = &mut ctx.record;
    r.method = req.method.as_str().to_string();
    r.path = req.uri.path().to_string();
    r.request_id = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(new_request_id, str::to_string);
    ctx.peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    if let Some(peer) = ctx.peer {
        let xff = req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        r.client_ip = limits::client_ip(peer, xff, &config.trusted_proxies).to_string();
    }
    ctx.body_unread = !session.is_body_empty();
    // Pingora turns keep-alive off when the request says so, and when it carries both
    // Transfer-Encoding and Content-Length (RFC 9112 6.1: a proxy in front may have
    // framed it by the length); only a connection that may be kept gets the timeout.
    if session.get_keepalive().is_some() {
        session.set_keepalive(Some(config.server.keepalive_timeout.0.as_secs()));
    }
    // Pingora times each body read with this: the longest pause within a body.
    session
        .downstream_session
        .set_read_timeout(Some(config.server.body_timeout.0));
}

/// A request id unique across processes: a per-process random seed and a counter.
fn new_request_id() -> String {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 40)
    });
    format!("{seed:016x}{:08x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl Gateway {
    async fn handle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &Config,
    ) -> Result<(), Outcome> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        if path == "/health" || path == "/healthz" {
            ctx.record.status = 200;
            respond::json(
                session,
                200,
                Bytes::from_static(b"{\"status\":\"ok\"}"),
                &ctx.record.request_id,
            )
            .await?;
            return Ok(());
        }
        let Some(suffix) = path.strip_prefix("/v1") else {
            return Err(GatewayError::NotFound(path).into());
        };

        let key = presented_key(
            req.headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            req.headers.get("x-api-key").map(|v| v.as_bytes()),
        );
        let caller = self
            .keys
            .authenticate(&config.keys, key)
            .map_err(GatewayError::Unauthorized)?;
        ctx.record.caller = caller.name().to_string();
        if !matches!(caller, Caller::Anonymous) {
            ctx.record.key_id = Some(caller.id());
            ctx.record.team = caller.team().map(|t| t.rec.id.clone());
        }
        if suffix == "/key/info" {
            if method != http::Method::GET {
                return Err(GatewayError::MethodNotAllowed(method.to_string()).into());
            }
            let body = crate::admin::keys::key_info(&caller, &self.keys);
            ctx.record.status = 200;
            respond::json(
                session,
                200,
                Bytes::from(body.to_string()),
                &ctx.record.request_id,
            )
            .await?;
            return Ok(());
        }

        if suffix == "/models" || suffix.starts_with("/models/") {
            if method != http::Method::GET {
                return Err(GatewayError::MethodNotAllowed(method.to_string()).into());
            }
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
            ctx.record.status = 200;
            respond::json(session, 200, body, &ctx.record.request_id).await?;
            return Ok(());
        }
        if !FORWARDED.contains(&suffix) {
            return Err(GatewayError::NotFound(path).into());
        }
        if method != http::Method::POST {
            return Err(GatewayError::MethodNotAllowed(method.to_string()).into());
        }
        let dialect = if suffix == "/messages" {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        };
        self.admit_request(ctx, config, &caller)?;
        self.forward(session, ctx, config, &caller, suffix, dialect)
            .await
    }

    /// Request limits of the global, IP and key scopes, before the body is read.
    fn admit_request(
        &self,
        ctx: &mut RequestCtx,
        config: &Config,
        caller: &Caller,
    ) -> Result<(), GatewayError> {
        let c = &self.counters;
        let adm = &mut ctx.admission;
        let mut result = c
            .admit_request(Scope::Global, 0, &config.limits.global, adm)
            .and_then(|()| {
                c.admit_request(
                    Scope::Ip,
                    key_hash(&ctx.record.client_ip),
                    &config.limits.per_ip,
                    adm,
                )
            });
        if let Some((key, limits)) = caller.key_limits() {
            result = result.and_then(|()| c.admit_request(Scope::Key, key, limits, adm));
            adm.key_headers = c.key_headers(key, limits);
        }
        if let Some((team, limits)) = caller.team_limits() {
            result = result.and_then(|()| c.admit_request(Scope::Team, team, limits, adm));
        }
        result.map_err(|r| refused(ctx, r))
    }

    /// Model request limits, then the concurrency and token limits of every scope, once
    /// the body is in (a client stalling its upload holds no slot).
    fn admit_model(
        &self,
        ctx: &mut RequestCtx,
        config: &Config,
        caller: &Caller,
        alias: &Alias,
        tokens: u64,
    ) -> Result<(), GatewayError> {
        let c = &self.counters;
        let adm = &mut ctx.admission;
        let model_key = key_hash(&alias.name);
        let ip_key = key_hash(&ctx.record.client_ip);
        let key_limits = caller.key_limits();
        let team_limits = caller.team_limits();
        let mut result = c
            .admit_request(Scope::Model, model_key, &alias.limits, adm)
            .and_then(|()| c.admit_concurrency(Scope::Global, 0, &config.limits.global, adm))
            .and_then(|()| c.admit_concurrency(Scope::Ip, ip_key, &config.limits.per_ip, adm))
            .and_then(|()| match key_limits {
                Some((key, limits)) => c.admit_concurrency(Scope::Key, key, limits, adm),
                None => Ok(()),
            })
            .and_then(|()| match team_limits {
                Some((team, limits)) => c.admit_concurrency(Scope::Team, team, limits, adm),
                None => Ok(()),
            })
            .and_then(|()| c.admit_concurrency(Scope::Model, model_key, &alias.limits, adm))
            .and_then(|()| c.admit_tokens(Scope::Global, 0, &config.limits.global, tokens, adm))
            .and_then(|()| c.admit_tokens(Scope::Ip, ip_key, &config.limits.per_ip, tokens, adm))
            .and_then(|()| c.admit_tokens(Scope::Model, model_key, &alias.limits, tokens, adm))
            .map_err(|mut r| {
                if r.scope == Scope::Model {
                    r.model = Some(alias.name.clone());
                }
                r
            });
        if let Some((key, limits)) = key_limits {
            result = result.and_then(|()| c.admit_tokens(Scope::Key, key, limits, tokens, adm));
            adm.key_headers = c.key_headers(key, limits);
        }
        if let Some((team, limits)) = team_limits {
            result = result.and_then(|()| c.admit_tokens(Scope::Team, team, limits, tokens, adm));
        }
        result.map_err(|r| refused(ctx, r))
    }

    /// Reserves the request's most possible cost against the key's and the team's
    /// budgets: the estimated input plus `max_tokens` (or `budgets.default_max_tokens`),
    /// at the dearest price among the routes it may take.
    fn reserve(
        &self,
        config: &Config,
        caller: &Caller,
        alias: &Alias,
        client_model: &str,
        body_len: usize,
        max_tokens: Option<u64>,
    ) -> Result<Option<Hold>, GatewayError> {
        let config_budget;
        let mut budgets = Vec::with_capacity(2);
        match caller {
            Caller::Anonymous => {}
            Caller::Key(k) => {
                if let Some(spec) = &k.budget {
                    config_budget = self.keys.config_budget(&k.name, spec);
                    budgets.push(&config_budget);
                }
            }
            Caller::Stored(k) => {
                budgets.extend(k.budget.as_ref());
                budgets.extend(k.team.as_ref().and_then(|t| t.budget.as_ref()));
            }
        }
        if budgets.is_empty() {
            return Ok(None);
        }
        let now = self.keys.now();
        let input = (body_len as u64).div_ceil(4);
        let output = max_tokens.unwrap_or(config.budgets.default_max_tokens);
        let amount = match dearest_price(config, alias, client_model) {
            Some(p) => p.most(input, output),
            None => {
                let enforced = budgets
                    .iter()
                    .any(|b| b.figures(now).spec.mode == crate::keys::budget::Mode::Enforce);
                if enforced && config.budgets.unpriced == crate::config::file::Unpriced::Refuse {
                    return Err(GatewayError::Unpriced(client_model.to_string()));
                }
                0
            }
        };
        match Hold::reserve(&budgets, amount, now) {
            Ok(hold) => Ok(Some(hold)),
            Err(e) => {
                if let Some(m) = crate::observe::metrics::get() {
                    m.budget_refusals.with_label_values(&[e.owner.scope]).inc();
                }
                if let Some(a) = self.alerts.as_ref().filter(|_| e.first) {
                    a.refused(&e);
                }
                Err(budget_exceeded(&e))
            }
        }
    }

    async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &Config,
        caller: &Caller,
        suffix: &str,
        dialect: Dialect,
    ) -> Result<(), Outcome> {
        let body_started = Instant::now();
        let s = &config.server;
        let body = read_body(session, s.max_body_size.0, s.body_timeout.0).await?;
        ctx.record.waiting += body_started.elapsed();
        ctx.body_unread = false;
        let facts = body::scan(&body).map_err(GatewayError::BadRequest)?;
        ctx.record.model = Some(facts.model.clone());
        ctx.record.stream = facts.stream;
        let alias = config
            .router
            .resolve(&facts.model)
            .ok_or_else(|| GatewayError::ModelNotFound(facts.model.clone()))?;
        if !caller.may_use(&facts.model) {
            return Err(GatewayError::ModelNotAllowed(facts.model.clone()).into());
        }
        let estimate = limits::estimate_tokens(body.len(), facts.max_tokens);
        self.admit_model(ctx, config, caller, alias, estimate)?;
        ctx.hold = self.reserve(
            config,
            caller,
            alias,
            &facts.model,
            body.len(),
            facts.max_tokens,
        )?;

        let req = session.req_header();
        // The TCP peer is appended to any X-Forwarded-For the client sent.
        let mut forwarded_for = String::with_capacity(64);
        if let Some(prior) = req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            forwarded_for.push_str(prior);
            forwarded_for.push_str(", ");
        }
        match ctx.peer {
            Some(ip) => {
                let _ = write!(forwarded_for, "{ip}");
            }
            None => forwarded_for.push_str("unknown"),
        }
        let out = Outgoing::new(req, suffix, &ctx.record.request_id, &forwarded_for);
        let rewrite = |model: &str, add_usage: bool| body::prepare(&body, &facts, model, add_usage);
        let plan = failover::Plan {
            connections: &self.connections,
            router: &config.router,
            failover: &config.failover,
            dialect,
            out: &out,
            client_model: &facts.model,
            rewrite: &rewrite,
            wants_usage: facts.stream
                && !facts.stream_options
                && matches!(suffix, "/chat/completions" | "/completions"),
        };
        let mut attempts = Vec::new();
        let attempts_started = Instant::now();
        // A client that leaves while the upstream is still thinking (no header yet) ends the
        // attempt: dropping it closes the upstream connection, which stops the generation.
        let result = tokio::select! {
            r = failover::run(&plan, alias, &mut attempts) => Some(r),
            _ = session.downstream_session.read_body_or_idle(true) => None,
        };
        ctx.record.waiting += attempts_started.elapsed();
        ctx.record.attempts = attempts;
        let Some(result) = result else {
            ctx.record.error = Some(Failure::Stream(stream::StreamEnd::ClientGone));
            return Err(Outcome::Aborted(Error::explain(
                ErrorType::ConnectionClosed,
                "client disconnected before the response",
            )));
        };
        let winner = result?;

        let target = winner.server.name.clone();
        let stamp = Stamp {
            request_id: &ctx.record.request_id,
            target: &target,
            attempts: ctx.record.attempts.len(),
            headers: &ctx
                .admission
                .key_headers
                .as_ref()
                .map(|h| h.pairs())
                .unwrap_or_default(),
        };
        let mut relayed = Relayed::default();
        ctx.record.upstream = Some(winner.upstream.name.clone());
        ctx.record.upstream_model = Some(winner.model.clone());
        let relay_started = Instant::now();
        let result = stream::relay(session, &self.connections, winner, &stamp, &mut relayed).await;
        ctx.record.target = Some(target);
        ctx.record.waiting += relay_started.elapsed();
        ctx.record.status = relayed.status;
        ctx.record.first_byte = relayed.first_byte;
        ctx.record.bytes_out = relayed.bytes;
        let price = config.pricing.for_route(
            ctx.record.upstream_model.as_deref().unwrap_or_default(),
            &alias.name,
        );
        if let Some(usage) = relayed.usage {
            self.counters
                .settle_tokens(&mut ctx.admission, usage.total());
            ctx.record.usage = Some(usage);
            ctx.record.cost_micro = price.map(|p| p.cost(&usage));
            if price.is_none() {
                if let Some(m) = crate::observe::metrics::get() {
                    m.unpriced.inc();
                }
            }
        }
        if let Some(hold) = ctx.hold.take() {
            // An answer that reported no usage is charged what was reserved for it: the
            // most it could have cost. An error answer costs nothing.
            let cost = match (ctx.record.cost_micro, (200..300).contains(&relayed.status)) {
                (Some(c), _) => c,
                (None, true) if ctx.record.usage.is_none() => {
                    ctx.record.cost_micro = Some(hold.reserved());
                    hold.reserved()
                }
                _ => 0,
            };
            let alerts = hold.settle(cost, self.keys.now());
            if let Some(a) = &self.alerts {
                for alert in alerts {
                    a.send(alert);
                }
            }
        }
        if let Some(end) = relayed.end.filter(|e| *e != stream::StreamEnd::Complete) {
            ctx.record.error = Some(Failure::Stream(end));
        }
        result.map_err(Outcome::Aborted)
    }
}

/// The 402 of a budget with no room.
fn budget_exceeded(e: &Exceeded) -> GatewayError {
    let whose = if e.owner.scope == "team" {
        format!("the budget of team `{}`", e.owner.name)
    } else {
        "this key's budget".to_string()
    };
    let per = match e.period {
        crate::keys::budget::Period::Daily => "per day",
        crate::keys::budget::Period::Weekly => "per week",
        crate::keys::budget::Period::Monthly => "per month",
        crate::keys::budget::Period::Total => "in total",
    };
    let resets_at = e.resets_at.map(crate::clock::rfc3339);
    let when = resets_at.as_ref().map_or_else(
        || " It does not reset.".to_string(),
        |t| format!(" It resets at {t}."),
    );
    GatewayError::BudgetExceeded {
        message: format!(
            "Budget exceeded: {whose} is {} {per} and {} is spent; with what is reserved for requests in flight, this request does not fit.{when}",
            crate::pricing::dollars(e.max_micro),
            crate::pricing::dollars(e.spent_micro),
        ),
        scope: e.owner.scope,
        max_micro: e.max_micro,
        resets_at,
    }
}

/// The highest input and output prices among the routes of `alias` and its fallbacks
/// (`None` when one of them has no price).
fn dearest_price(
    config: &Config,
    alias: &Alias,
    client_model: &str,
) -> Option<crate::pricing::Price> {
    let mut aliases = vec![alias];
    for name in alias.fallbacks.iter().chain(&alias.context_fallbacks) {
        aliases.extend(config.router.resolve(name).map(|a| &**a));
    }
    let mut dearest = crate::pricing::Price {
        input: 0,
        output: 0,
        cached_input: 0,
    };
    for a in aliases {
        for route in a.tiers.iter().flat_map(|t| &t.routes) {
            let model = route.model.as_deref().unwrap_or(client_model);
            let p = config.pricing.for_route(model, &a.name)?;
            dearest.input = dearest.input.max(p.input);
            dearest.output = dearest.output.max(p.output);
            dearest.cached_input = dearest.cached_input.max(p.cached_input);
        }
    }
    Some(dearest)
}

/// The usage row of a request that reached an upstream, taking the record's strings.
fn usage_row(r: &mut Record, now: i64) -> Option<UsageRow> {
    if r.attempts.is_empty() {
        return None;
    }
    let usage = r.usage.unwrap_or_default();
    let take = std::mem::take::<String>;
    Some(UsageRow {
        request_id: take(&mut r.request_id),
        ts: now,
        key_id: r.key_id.take().unwrap_or_else(|| "-".into()),
        key_name: take(&mut r.caller),
        team_id: r.team.take(),
        model: r.model.take().unwrap_or_default(),
        upstream: r.upstream.take(),
        upstream_model: r.upstream_model.take(),
        status: r.status,
        stream: r.stream,
        input_tokens: usage.input,
        output_tokens: usage.output,
        cached_tokens: usage.cached,
        cost_micro: r.cost_micro.unwrap_or(0),
        priced: r.cost_micro.is_some() || r.usage.is_none(),
        cache: None,
    })
}

/// How long, and how much, the gateway keeps reading a body it answered early.
const LINGER_TIME: Duration = Duration::from_secs(10);
const LINGER_BYTES: usize = 64 << 20;

/// After an answer sent before the request body was read (413, 401, 429, ...), reads and
/// discards what the client is still sending, for a bounded time and size, the way
/// nginx's lingering close does. Closing at once would reset the connection while the
/// client writes, and most clients (Python's, so the OpenAI SDK) send the whole body
/// before reading: they would see a broken pipe instead of the answer, and retry.
async fn linger(session: &mut Session) {
    if expects_continue(session) && session.body_bytes_read() == 0 {
        // It was told no (no 100 Continue): it sends no body.
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut drained = 0;
    while drained <= LINGER_BYTES {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => drained += chunk.len(),
            _ => return,
        }
    }
}

/// Whether the client waits for `100 Continue` before sending its body.
fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Pingora's error for chunked framing it cannot parse.
const INVALID_CHUNK: ErrorType = ErrorType::new("InvalidChunk");

/// What a failed body read means for the client: a stall past `server.body_timeout`
/// (408) and broken chunked framing (400) are answered; a connection that broke is not.
fn body_error(e: Box<Error>, timeout: Duration) -> Outcome {
    match &e.etype {
        ErrorType::ReadTimedout => {
            if let Some(m) = crate::observe::metrics::get() {
                m.client_timeouts.with_label_values(&["body"]).inc();
            }
            Outcome::Refused(GatewayError::RequestTimeout {
                secs: timeout.as_secs(),
            })
        }
        t if *t == INVALID_CHUNK => Outcome::Refused(GatewayError::BadRequest(
            "The request body's chunked framing is malformed.".into(),
        )),
        _ => Outcome::Aborted(e),
    }
}

/// Reads the whole request body, refusing more than `limit` bytes. Answers
/// `Expect: 100-continue` first (after authentication), since clients otherwise wait
/// before sending large bodies.
async fn read_body(session: &mut Session, limit: u64, gap: Duration) -> Result<Bytes, Outcome> {
    let too_large = || GatewayError::BodyTooLarge { limit };
    // With Transfer-Encoding too, Pingora has already dropped the length (RFC 9112 6.1).
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large().into());
    }
    if expects_continue(session) {
        // Writing 100 makes Pingora treat the response as started early and close the
        // client connection at the end, unless this is turned off around it.
        session.set_close_on_response_before_downstream_finish(false);
        session.write_continue_response().await?;
        session.set_close_on_response_before_downstream_finish(true);
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(16 * 1024).min(limit) as usize);
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| body_error(e, gap))?
    {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(too_large().into());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
