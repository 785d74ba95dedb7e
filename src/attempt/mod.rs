//! The attempt loop, run inside `request_filter` for the LLM POST endpoints. Walks the
//! alias's tiers in priority order (L1), then its `fallbacks` aliases with their own tiers
//! (L2); asks `select` for a usable server of each tier not tried yet; runs `forward`;
//! lets `inspect` classify the answer; cools failed targets down; and either delivers a
//! response or moves on, within `failover.max_attempts`. Nothing here writes to the
//! client, so no retry can ever follow a byte the client has seen.

pub(crate) mod forward;
mod one;

use crate::clock::monotonic_ms as now_ms;
use crate::error::GatewayError;
use crate::provider::inspect::Class;
use crate::provider::translate::{Path, Target, Translation};
use crate::route::{Alias, Need, Route, Router, Tier};
use crate::spec::Strategy;
use crate::transport::pool::Connections;
use crate::upstream::health::Reason;
use crate::upstream::shared::Cooldowns;
use crate::upstream::{InFlight, Server, Upstream};
use bytes::Bytes;
use forward::{Outgoing, Sent, TransportError};
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use crate::record::{AttemptOutcome, AttemptRecord, AttemptSpan};
pub use crate::spec::Failover;

/// The attempt whose response is delivered, holding its server's in-flight slot.
pub struct Winner {
    pub sent: Sent,
    pub server: Arc<Server>,
    pub upstream: Arc<Upstream>,
    /// The model name the upstream was sent.
    pub model: String,
    /// The gateway added `stream_options.include_usage`: the usage chunk is not the client's.
    pub usage_added: bool,
    /// Held, not read: the server's in-flight count ends when the winner is dropped.
    pub _in_flight: InFlight,
    /// The strategy of the tier that chose it.
    pub strategy: Strategy,
    /// The answer is in another format than the client's.
    pub translation: Option<Translation>,
    /// The route's price (resolved at config build, or looked up for a `*` route).
    pub price: Option<crate::relay::pricing::Price>,
}

fn route_serves(route: &Route, suffix: &str) -> bool {
    Path::of(suffix, route.upstream.provider).serves()
}

/// One attempt's body, path and query.
struct Prepared {
    body: Bytes,
    suffix: Option<String>,
    query: Option<&'static str>,
    translation: Option<Translation>,
    usage_added: bool,
}

/// Builds the request for `route`: the client's body with the model renamed, or a
/// translation of it into the upstream's format. `Err`: the request cannot be expressed
/// in that format (a client-facing message).
fn prepare(plan: &Plan<'_>, route: &Route, model: &str) -> Result<Prepared, String> {
    let upstream = &route.upstream;
    match Path::of(plan.out.suffix, upstream.provider) {
        Path::Translated(t) => {
            let target = Target {
                model,
                provider: upstream.provider,
                default_max_tokens: plan.default_max_tokens,
            };
            let out = t.request(plan.body, &target)?;
            Ok(Prepared {
                body: Bytes::from(out.body),
                suffix: Some(out.suffix),
                query: out.query,
                translation: Some(t),
                usage_added: false,
            })
        }
        _ => {
            let usage_added = plan.wants_usage && upstream.stream_usage;
            Ok(Prepared {
                body: (plan.rewrite)(model, usage_added),
                suffix: None,
                query: None,
                translation: None,
                usage_added,
            })
        }
    }
}

/// Everything one request's attempt loop reads.
pub struct Plan<'a> {
    pub connections: &'a Connections,
    pub router: &'a Router,
    pub failover: &'a Failover,
    pub out: &'a Outgoing<'a>,
    /// The client's body as received: what translated attempts are built from.
    pub body: &'a Bytes,
    /// `max_tokens` for an upstream that requires one when the client set none.
    pub default_max_tokens: u64,
    /// The client's model, estimated tokens and prices: what route strategies and context
    /// windows go by.
    pub need: &'a Need<'a>,
    /// The body for a model name, with or without `stream_options.include_usage` added.
    pub rewrite: &'a (dyn Fn(&str, bool) -> Bytes + Sync),
    /// A streaming request without `stream_options` on an endpoint that supports it.
    pub wants_usage: bool,
    /// Where cooldowns apply: here, or also on every instance (`cluster.redis`).
    pub cooldowns: &'a dyn Cooldowns,
    /// The request's trace, when tracing is on: each attempt gets a span id, sent
    /// upstream in `traceparent`.
    pub trace: Option<&'a crate::trace::TraceCtx>,
    /// Wall time, for quota resets and `retry-after` dates.
    pub clock: &'a dyn crate::clock::Clock,
}

/// An upstream error status a client can act on, relayed as sent when every attempt
/// failed. 401/403 are not: they concern the gateway's credential, not the client's.
fn client_meaningful(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 407)
}

/// Why targets were passed over before any attempt, counted once per request.
#[derive(Default)]
struct Skips {
    context: AtomicBool,
    quota: AtomicBool,
}

fn skipped(reason: &'static str) {
    if let Some(m) = crate::metrics::get() {
        m.route_skips.with_label_values(&[reason]).inc();
    }
}

/// Runs attempts until one is delivered or no attempt is left.
pub async fn run(
    plan: &Plan<'_>,
    alias: &Arc<Alias>,
    attempts: &mut Vec<AttemptRecord>,
) -> Result<Winner, GatewayError> {
    let skips = Skips::default();
    let result = attempt_all(plan, alias, attempts, &skips).await;
    for (skip, reason) in [(&skips.context, "context"), (&skips.quota, "quota")] {
        if skip.load(Ordering::Relaxed) {
            skipped(reason);
        }
    }
    result
}

/// The aliases a request goes through, in order: its alias, then its `fallbacks`; or,
/// when no route of those takes the request's context, its `context_fallbacks` (`true`:
/// switched already). Refused when no route serves the endpoint, or none takes the
/// context (with the largest window there is).
fn aliases_in_order(
    plan: &Plan<'_>,
    alias: &Arc<Alias>,
    skips: &Skips,
) -> Result<(VecDeque<Arc<Alias>>, bool), GatewayError> {
    let serves = |a: &Alias| {
        a.tiers
            .iter()
            .any(|t| t.routes.iter().any(|r| route_serves(r, plan.out.suffix)))
    };
    let mut queue: VecDeque<Arc<Alias>> = VecDeque::with_capacity(1 + alias.fallbacks.len());
    queue.push_back(Arc::clone(alias));
    queue.extend(
        alias
            .fallbacks
            .iter()
            .filter_map(|f| plan.router.resolve(f).cloned()),
    );
    if !queue.iter().any(|a| serves(a)) {
        return Err(GatewayError::NoRouteForEndpoint {
            model: plan.need.client_model.to_string(),
            path: format!("/v1{}", plan.out.suffix),
        });
    }
    // A request no route's context window takes goes to the alias's context fallbacks
    // before any attempt, or is refused with the largest window there is.
    let needed = plan.need.tokens();
    let fits = |a: &Alias| {
        a.tiers
            .iter()
            .flat_map(|t| &t.routes)
            .any(|r| route_serves(r, plan.out.suffix) && r.fits(plan.need.client_model, needed))
    };
    if queue.iter().any(|a| fits(a)) {
        return Ok((queue, false));
    }
    skips.context.store(true, Ordering::Relaxed);
    let switched: VecDeque<Arc<Alias>> = alias
        .context_fallbacks
        .iter()
        .filter_map(|a| plan.router.resolve(a).cloned())
        .collect();
    if !switched.iter().any(|a| fits(a)) {
        let largest = queue
            .iter()
            .chain(&switched)
            .flat_map(|a| a.tiers.iter())
            .flat_map(|t| &t.routes)
            .filter_map(|r| r.context_window(plan.need.client_model))
            .max()
            .unwrap_or(0);
        return Err(GatewayError::ContextLengthExceeded {
            model: plan.need.client_model.to_string(),
            needed,
            largest,
        });
    }
    Ok((switched, true))
}

/// The next target of `tier` in its route `order` that serves the request and was not
/// tried yet, as (route index, server). Outside `last_resort`, a target the provider said
/// cannot take the request before its reset is passed over (counted in `skips`).
fn next_target(
    plan: &Plan<'_>,
    tier: &Tier,
    order: &[crate::route::Placed],
    tried: &[(usize, usize)],
    last_resort: bool,
    skips: &Skips,
) -> Option<(usize, Arc<Server>)> {
    let needed = plan.need.tokens();
    let now = now_ms();
    order.iter().find_map(|placed| {
        let ri = placed.route;
        let route = &tier.routes[ri];
        if !route_serves(route, plan.out.suffix) {
            return None;
        }
        if !route.fits(plan.need.client_model, needed) {
            skips.context.store(true, Ordering::Relaxed);
            return None;
        }
        route
            .upstream
            .pick_with(last_resort, |s| {
                if tried.contains(&(ri, Arc::as_ptr(s) as usize)) {
                    return false;
                }
                // The provider says this target cannot take it before its reset (only
                // as a last resort is it asked anyway).
                if !last_resort && !s.state.quota.covers(now, needed) {
                    skips.quota.store(true, Ordering::Relaxed);
                    return false;
                }
                true
            })
            .map(|s| (ri, Arc::clone(s)))
    })
}

/// An answer that is not delivered: its server cooled down as its class says (here and,
/// when cooldowns are shared, on every instance).
fn cool_for(plan: &Plan<'_>, server: &Server, class: Class, status: u16) {
    let f = plan.failover;
    let now = now_ms();
    match class {
        Class::Transient { hint } => {
            let d = hint.unwrap_or(f.cooldown).min(f.max_cooldown);
            plan.cooldowns.cool(server, now, d, Reason::Transient);
        }
        Class::Quota => plan
            .cooldowns
            .cool(server, now, f.quota_cooldown, Reason::Quota),
        Class::Credentials => {
            log::error!(
                "upstream {} rejected the gateway's credential ({}) with status {status}: check its api_key; no traffic for {}",
                server.name,
                server.api_key.as_ref().map_or_else(|| "none".to_string(), |k| crate::secret::mask(k.expose())),
                humantime::format_duration(f.quota_cooldown)
            );
            plan.cooldowns
                .cool(server, now, f.quota_cooldown, Reason::Credentials);
        }
        Class::Deliver | Class::ContextLength | Class::Skip => {}
    }
}

async fn attempt_all(
    plan: &Plan<'_>,
    alias: &Arc<Alias>,
    attempts: &mut Vec<AttemptRecord>,
    skips: &Skips,
) -> Result<Winner, GatewayError> {
    let (queue, context_first) = aliases_in_order(plan, alias, skips)?;
    let chain: Vec<Arc<Alias>> = queue.iter().cloned().collect();
    let mut search = Search {
        plan,
        attempts,
        skips,
        last: None,
        untranslatable: None,
        last_timeout: false,
    };
    if let Some(w) = search.pass(queue, context_first, false).await {
        return Ok(w);
    }
    // When every target is cooling down, the ones cooling for a transient failure are tried
    // anyway rather than failing the request outright: a single server's one bad answer
    // must not take a model offline for the whole cooldown (nginx likewise never marks the
    // only server of a group unavailable). Quota and credential cooldowns always hold.
    if search.attempts.is_empty() {
        log::info!(
            "request {}: every target of model `{}` is cooling down; trying those with a transient cooldown",
            plan.out.request_id,
            plan.need.client_model
        );
        let queue = chain.iter().cloned().collect();
        if let Some(w) = search.pass(queue, context_first, true).await {
            return Ok(w);
        }
    }
    search.fail(&chain)
}

/// One request's search for an answer across its aliases, tiers and targets.
struct Search<'p, 'a> {
    plan: &'p Plan<'a>,
    attempts: &'p mut Vec<AttemptRecord>,
    skips: &'p Skips,
    /// The last answer that failed: relayed when every target failed and the client can
    /// act on it.
    last: Option<Winner>,
    /// Why a route's format could not express the request, if one could not.
    untranslatable: Option<String>,
    /// Whether the last attempt timed out.
    last_timeout: bool,
}

/// What trying the targets of one tier came to. Returned once per tier and matched at
/// once: boxing the answer would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum TierEnd {
    /// An answer to deliver.
    Delivered(Winner),
    /// The context was too long: go on with these aliases instead.
    Context(VecDeque<Arc<Alias>>),
    /// No target of the tier is left to try.
    Exhausted,
    /// `failover.max_attempts` is reached.
    Spent,
}

impl Search<'_, '_> {
    /// Goes through `queue`'s aliases and their tiers in order (`last_resort`: trying
    /// targets in a transient cooldown too). `context_switched`: the queue is already
    /// the context fallbacks.
    async fn pass(
        &mut self,
        mut queue: VecDeque<Arc<Alias>>,
        mut context_switched: bool,
        last_resort: bool,
    ) -> Option<Winner> {
        let mut alias_index = 0;
        while let Some(current) = queue.pop_front() {
            let may_switch = !context_switched && !current.context_fallbacks.is_empty();
            for (tier_index, tier) in current.tiers.iter().enumerate() {
                let at = (alias_index, tier_index);
                match self.tier(&current, tier, at, last_resort, may_switch).await {
                    TierEnd::Delivered(w) => {
                        recycle(self.plan.connections, self.last.take());
                        return Some(w);
                    }
                    TierEnd::Context(next) => {
                        context_switched = true;
                        queue = next;
                        break;
                    }
                    TierEnd::Exhausted => {}
                    TierEnd::Spent => return None,
                }
            }
            alias_index += 1;
        }
        None
    }

    /// Tries the targets of one tier (`at`: alias and tier index) until one answers for
    /// good or none is left. `may_switch`: a context-length answer moves the request to
    /// the alias's context fallbacks rather than being delivered.
    async fn tier(
        &mut self,
        current: &Alias,
        tier: &Tier,
        at: (usize, usize),
        last_resort: bool,
        may_switch: bool,
    ) -> TierEnd {
        let plan = self.plan;
        let order = tier.route_order(plan.need);
        // (route index, server address): targets this request already tried.
        let mut tried: Vec<(usize, usize)> = Vec::new();
        loop {
            if self.attempts.len() >= plan.failover.max_attempts {
                return TierEnd::Spent;
            }
            let Some((ri, server)) =
                next_target(plan, tier, &order, &tried, last_resort, self.skips)
            else {
                return TierEnd::Exhausted;
            };
            tried.push((ri, Arc::as_ptr(&server) as usize));
            let route = &tier.routes[ri];
            let model = route.model.as_deref().unwrap_or(plan.need.client_model);
            let prepared = match prepare(plan, route, model) {
                Ok(p) => p,
                Err(message) => {
                    self.untranslatable = Some(message);
                    continue;
                }
            };
            server.state.quota.spend(plan.need.tokens());
            let target = one::Target {
                route,
                server: &server,
                model,
                tier,
                tier_index: at.1,
                alias_index: at.0,
            };
            let (record, outcome) = one::attempt(plan, &target, prepared).await;
            self.attempts.push(record);
            let (winner, class) = match outcome {
                Ok(answered) => answered,
                Err(timed_out) => {
                    self.last_timeout = timed_out;
                    continue;
                }
            };
            self.last_timeout = false;
            match class {
                Class::Deliver => return TierEnd::Delivered(winner),
                Class::ContextLength if !may_switch => return TierEnd::Delivered(winner),
                Class::ContextLength => {
                    recycle(plan.connections, self.last.replace(winner));
                    let fallbacks = current.context_fallbacks.iter();
                    let next = fallbacks.filter_map(|a| plan.router.resolve(a).cloned());
                    return TierEnd::Context(next.collect());
                }
                other => cool_for(plan, &server, other, winner.sent.status()),
            }
            log::info!(
                "request {}: {} answered {} ({}), trying the next target",
                plan.out.request_id,
                server.name,
                winner.sent.status(),
                class.outcome()
            );
            recycle(plan.connections, self.last.replace(winner));
        }
    }

    /// Every target failed: the last answer when the client can act on it, else why.
    fn fail(mut self, chain: &[Arc<Alias>]) -> Result<Winner, GatewayError> {
        match self.last.take() {
            Some(w) if client_meaningful(w.sent.status()) => return Ok(w),
            other => recycle(self.plan.connections, other),
        }
        let translated_none = self.attempts.is_empty();
        if let Some(message) = self.untranslatable.take().filter(|_| translated_none) {
            return Err(GatewayError::BadRequest(message));
        }
        let model = self.plan.need.client_model;
        Err(all_failed(
            model,
            self.attempts,
            self.last_timeout,
            retry_after(chain),
        ))
    }
}

/// Gives the connection of an attempt that will not be delivered back to the pool, when
/// its error answer was read to the end (the answer itself is no longer needed).
fn recycle(connections: &Connections, attempt: Option<Winner>) {
    if let Some(Winner { sent, upstream, .. }) = attempt {
        connections.give_back(sent.conn, sent.pool_key, upstream.idle_timeout);
    }
}

/// Seconds until the first cooling server of the chain comes back, if any is cooling.
fn retry_after(chain: &[Arc<Alias>]) -> Option<u64> {
    let now = now_ms();
    chain
        .iter()
        .flat_map(|a| a.tiers.iter())
        .flat_map(|t| t.routes.iter())
        .flat_map(|r| r.upstream.servers.iter())
        .filter_map(|s| s.state.health.cooldown(now).map(|(d, _)| d))
        .min()
        .map(crate::error::retry_after_secs)
}

fn describe(e: &TransportError) -> String {
    match e {
        TransportError::Unresolved => "address not resolved".into(),
        TransportError::Connect(m) | TransportError::Broken(m) => m.clone(),
        TransportError::Timeout => "no response header in time".into(),
    }
}

fn all_failed(
    model: &str,
    attempts: &[AttemptRecord],
    last_timeout: bool,
    retry_after: Option<u64>,
) -> GatewayError {
    if attempts.is_empty() {
        return GatewayError::NoTarget {
            message: format!("No upstream is available for model `{model}` right now."),
            retry_after,
        };
    }
    let mut message = format!(
        "All {} upstream attempts for model `{model}` failed:",
        attempts.len()
    );
    for (i, a) in attempts.iter().enumerate() {
        let sep = if i == 0 { "" } else { ";" };
        match a.status {
            Some(s) => {
                let _ = write!(message, "{sep} {} ({} {s})", a.target, a.outcome.as_str());
            }
            None => {
                let _ = write!(message, "{sep} {} ({})", a.target, a.outcome.as_str());
            }
        }
    }
    message.push('.');
    if last_timeout {
        GatewayError::UpstreamTimeout {
            message,
            retry_after,
        }
    } else {
        GatewayError::UpstreamUnavailable {
            message,
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests;
