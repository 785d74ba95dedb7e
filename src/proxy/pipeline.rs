//! The LLM pipeline, one call per stage: read the body (`intake`), find the model and
//! stream flag (`body`), resolve the alias (`route`), check the caller may use it
//! (`auth`), the second limits stage (`limits`), reserve against budgets
//! (`keys::reserve`), run the attempt loop (`failover`) while watching for the client
//! leaving, relay the answer (`stream`), and account for what it used.

use super::dispatch::refused;
use super::{intake, Gateway, Outcome, RequestCtx};
use crate::attempt;
use crate::attempt::forward::{self, Outgoing};
use crate::body;
use crate::config::Config;
use crate::error::GatewayError;
use crate::keys::auth::Caller;
use crate::keys::reserve::{self, Ask};
use crate::limits;
use crate::observe::spans::{mask_keys, push_capped, Params, Traced};
use crate::observe::Failure;
use crate::relay::pricing::Price;
use crate::relay::{self, Relayed, Stamp};
use crate::route::Need;
use pingora_core::{Error, ErrorType};
use pingora_proxy::Session;
use std::time::Instant;

/// Anthropic's token counting endpoint: passed to an Anthropic route when the alias has
/// one, otherwise answered here with an estimate.
pub(super) const COUNT_TOKENS: &str = "/messages/count_tokens";

/// `{"input_tokens": N}` estimated from the body's size, marked `x-tollgate-estimated`.
async fn estimated_count(
    session: &mut Session,
    ctx: &mut RequestCtx,
    body_len: usize,
) -> Result<(), Outcome> {
    let tokens = limits::input_tokens(body_len);
    let body = bytes::Bytes::from(format!("{{\"input_tokens\":{tokens}}}"));
    ctx.record.status = 200;
    let estimated = (
        http::HeaderName::from_static("x-tollgate-estimated"),
        http::HeaderValue::from_static("true"),
    );
    crate::relay::respond::json_with(session, 200, body, &ctx.record.request_id, &[estimated])
        .await
        .map_err(Outcome::Aborted)
}

/// Whether the request is traced and sampled.
fn sampled(ctx: &RequestCtx) -> bool {
    ctx.record.trace.as_ref().is_some_and(|t| t.ctx.sampled)
}

/// What a sampled trace reads from the request: its alias, the parameters the GenAI
/// conventions name and, with `tracing.capture_content`, the prompt (capped, keys masked).
fn trace_request(
    t: &mut Traced,
    config: &Config,
    alias: &str,
    body: &[u8],
    facts: &body::RequestFacts,
) {
    if !t.ctx.sampled {
        return;
    }
    t.alias = Some(alias.to_string());
    t.params = Params::read(body, facts);
    if let Some(s) = config.tracing.as_ref().filter(|s| s.capture_content) {
        // Masked before the final cut, so a key across the limit is masked too.
        let head = &body[..body.len().min(s.content_limit + 256)];
        let mut prompt = String::new();
        push_capped(
            &mut prompt,
            &mask_keys(&String::from_utf8_lossy(head)),
            s.content_limit,
        );
        t.prompt = Some(prompt);
    }
}

/// What an upstream answered, ready to relay.
struct Chosen<'c> {
    alias: &'c std::sync::Arc<crate::route::Alias>,
    winner: attempt::Winner,
    cache_plan: Option<super::cached::Plan>,
    /// The client's `stream` and `stream_options.include_usage`.
    stream: (bool, bool),
}

impl Gateway {
    pub(super) async fn pipeline(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &Config,
        caller: &Caller,
        suffix: &str,
    ) -> Result<(), Outcome> {
        // Two stages, so that what only choosing needs (the request body above all) is
        // freed before the answer is relayed, however long it streams. (A `match` on the
        // first stage's result would keep room for it beside the second: 800 bytes more
        // in every connection's task, by `-Zprint-type-sizes`.)
        let Some(chosen) = self.choose(session, ctx, config, caller, suffix).await? else {
            return Ok(());
        };
        self.deliver(session, ctx, config, chosen).await
    }

    /// The body read, the model routed, the request admitted and sent until an upstream
    /// answered; `None` when the gateway answered itself (a cache hit, an estimated token
    /// count).
    async fn choose<'c>(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &'c Config,
        caller: &Caller,
        suffix: &str,
    ) -> Result<Option<Chosen<'c>>, Outcome> {
        let s = &config.server;
        let body = crate::clock::add_wait(
            &mut ctx.record.waiting,
            intake::read_body(session, s.max_body_size, s.body_timeout),
        )
        .await?;
        ctx.body_unread = false;
        let facts = body::scan(&body, suffix).map_err(GatewayError::BadRequest)?;
        if facts.choices > config.budgets.max_n {
            return Err(GatewayError::BadRequest(format!(
                "n (or best_of) is {}; this gateway serves at most {} choices per request (budgets.max_n).",
                facts.choices, config.budgets.max_n
            ))
            .into());
        }
        ctx.record.model = Some(facts.model.clone());
        ctx.record.stream = facts.stream;
        let alias = config
            .router
            .resolve(&facts.model)
            .ok_or_else(|| GatewayError::ModelNotFound(facts.model.clone()))?;
        if let Some(t) = ctx.record.trace.as_deref_mut() {
            trace_request(t, config, &alias.name, &body, &facts);
        }
        if !caller.may_use(&facts.model) {
            return Err(GatewayError::ModelNotAllowed(facts.model.clone()).into());
        }
        let (hit, cache_plan) = self
            .cache_lookup(session, ctx, config, caller, alias, &body)
            .await;
        if let Some(entry) = hit {
            // A hit counts toward request rates and concurrency, not tokens or budgets.
            let who = super::scopes(config, caller, &ctx.record.client_ip);
            let model = (alias.name.as_str(), &alias.limits);
            let admitted = limits::admit_model(&mut ctx.admission, &who, model, 0, &[]).await;
            admitted.map_err(|r| refused(ctx, r))?;
            // Boxed, as the other rare paths below: a future's size is that of its largest
            // state, and every request (an idle stream too) holds the whole of it.
            Box::pin(self.answer_hit(session, ctx, entry)).await?;
            return Ok(None);
        }
        // Counting tokens generates nothing and costs nothing: no budget is reserved.
        let free = suffix == COUNT_TOKENS;
        self.admit(ctx, config, caller, alias, (body.len(), &facts), free)
            .await?;

        // Boxed: the attempt loop's future is the largest of a request's, and a future is
        // as large as its largest state, so inline it would be held by every stream for
        // its whole length.
        let search = self.search(session, ctx, config, alias, (&body, &facts), suffix);
        let Some(result) = Box::pin(search).await else {
            ctx.record.error = Some(Failure::Stream(relay::StreamEnd::ClientGone));
            return Err(Outcome::Aborted(Error::explain(
                ErrorType::ConnectionClosed,
                "client disconnected before the response",
            )));
        };
        if free && matches!(result, Err(GatewayError::NoRouteForEndpoint { .. })) {
            Box::pin(estimated_count(session, ctx, body.len())).await?;
            return Ok(None);
        }
        Ok(Some(Chosen {
            alias,
            winner: result?,
            cache_plan,
            stream: (facts.stream, facts.include_usage),
        }))
    }

    /// The attempt loop, watching for the client leaving: `None` when the client left
    /// before an upstream answered. The attempts made are in `ctx.record`.
    async fn search(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &Config,
        alias: &std::sync::Arc<crate::route::Alias>,
        (body, facts): (&bytes::Bytes, &body::RequestFacts),
        suffix: &str,
    ) -> Option<Result<attempt::Winner, GatewayError>> {
        let req = session.req_header();
        let forwarded_for = forward::forwarded_for(req, ctx.peer);
        let traced = ctx.record.trace.is_some();
        let out = Outgoing::new(req, suffix, &ctx.record.request_id, &forwarded_for, traced);
        let rewrite = |model: &str, add_usage: bool| body::prepare(body, facts, model, add_usage);
        let need = Need {
            client_model: &facts.model,
            alias: &alias.name,
            input_tokens: limits::input_tokens(body.len()),
            output_tokens: facts.max_tokens.unwrap_or(0),
            pricing: &config.pricing,
        };
        let plan = attempt::Plan {
            connections: &self.connections,
            router: &config.router,
            failover: &config.failover,
            out: &out,
            body,
            default_max_tokens: config.budgets.default_max_tokens,
            need: &need,
            rewrite: &rewrite,
            wants_usage: facts.stream
                && !facts.stream_options
                && matches!(suffix, "/chat/completions" | "/completions"),
            cooldowns: self.cooldowns.as_ref(),
            trace: ctx.record.trace.as_deref().map(|t| &t.ctx),
            clock: self.clock.as_ref(),
        };
        let mut attempts = Vec::new();
        let attempts_started = Instant::now();
        // A client that leaves while the upstream is still thinking (no header yet) ends the
        // attempt: dropping it closes the upstream connection, which stops the generation.
        let result = tokio::select! {
            r = attempt::run(&plan, alias, &mut attempts) => Some(r),
            _ = session.downstream_session.read_body_or_idle(true) => None,
        };
        ctx.record.waiting += attempts_started.elapsed();
        ctx.record.attempts = attempts;
        result
    }

    /// The answer relayed to the client (translated if need be), then accounted for and
    /// offered to the cache.
    async fn deliver(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        config: &Config,
        chosen: Chosen<'_>,
    ) -> Result<(), Outcome> {
        let Chosen {
            alias,
            winner,
            cache_plan,
            stream: (stream, include_usage),
        } = chosen;
        let attempt::Winner {
            sent,
            server,
            upstream,
            model,
            usage_added,
            _in_flight: in_flight,
            strategy,
            translation,
            price,
        } = winner;

        let target = server.name.clone();
        ctx.record.strategy = Some(strategy.as_str());
        let mut headers = ctx.answer_headers();
        headers.extend(Self::cache_header(ctx));
        let stamp = Stamp {
            request_id: &ctx.record.request_id,
            target: &target,
            attempts: ctx.record.attempts.len(),
            headers: &headers,
        };
        let mut relayed = Relayed {
            capture: Self::capture_for(config, cache_plan.as_ref(), sampled(ctx)),
            ..Relayed::default()
        };
        ctx.record.upstream = Some(upstream.name.clone());
        ctx.record.upstream_model = Some(model);
        ctx.record.translation = translation.map(|t| t.label());
        let relay_started = Instant::now();
        let answer = relay::Answer {
            price,
            sent,
            idle_timeout: upstream.idle_timeout,
            usage_added,
            translation: translation.map(|t| (t, include_usage)),
            // Only a translated answer says when it was made.
            created: translation.map_or(0, |_| (self.clock.now_ms() / 1000).max(0) as u64),
        };
        // `in_flight` holds the server's in-flight count until the answer is relayed.
        let result = relay::relay(session, &self.connections, answer, &stamp, &mut relayed).await;
        drop(in_flight);
        ctx.record.target = Some(target);
        let relay_ended = Instant::now();
        ctx.record.waiting += relay_ended.saturating_duration_since(relay_started);
        ctx.record.ended = Some(relay_ended);
        if let Some(t) = ctx.record.trace.as_deref_mut().filter(|t| t.ctx.sampled) {
            t.answer = relayed.capture.as_ref().and_then(|c| c.body());
        }
        self.account(ctx, price, &relayed);
        if let Some(plan) = cache_plan {
            self.cache_store(ctx, alias, stream, &relayed, plan).await;
        }
        result.map_err(Outcome::Aborted)
    }

    /// The second limits stage and the budgets: the request's token estimate counted
    /// against its key's, team's and model's limits, and its most expensive answer
    /// reserved against its budgets (with the limits, in one call, when a shared backend
    /// counts budgets). `free`: nothing is reserved (token counting).
    async fn admit(
        &self,
        ctx: &mut RequestCtx,
        config: &Config,
        caller: &Caller,
        alias: &crate::route::Alias,
        (body_len, facts): (usize, &body::RequestFacts),
        free: bool,
    ) -> Result<(), Outcome> {
        let estimate = if free {
            0
        } else {
            limits::estimate_tokens(body_len, facts.output_ceiling(0))
        };
        let ask = Ask {
            client_model: &facts.model,
            body_len,
            output_tokens: facts.output_ceiling(config.budgets.default_max_tokens),
        };
        let prices = reserve::Prices {
            router: &config.router,
            pricing: &config.pricing,
            unpriced: config.budgets.unpriced,
        };
        let budgets = if free {
            None
        } else {
            reserve::plan(&self.keys, &prices, caller, alias, &ask)?
        };
        // A shared counter backend checks budgets with the limits, in the same call.
        let shared = budgets.as_ref().filter(|_| ctx.admission.counts_spend());
        let spend = shared.map(|p| p.charges()).unwrap_or_default();
        let who = super::scopes(config, caller, &ctx.record.client_ip);
        let model = (alias.name.as_str(), &alias.limits);
        let admitted = limits::admit_model(&mut ctx.admission, &who, model, estimate, &spend).await;
        let alerts = self.alerts.as_deref();
        if let Err(r) = admitted {
            return Err(match shared {
                Some(p) if r.dimension == limits::Dimension::Spend && !r.unavailable => {
                    p.refused(&r, alerts)
                }
                _ => refused(ctx, r),
            }
            .into());
        }
        let shared = shared.is_some();
        ctx.hold = match &budgets {
            None => None,
            Some(p) => {
                let reserved: Vec<&limits::Charge> = ctx.admission.spend_held().collect();
                if shared && !reserved.is_empty() {
                    Some(p.mirrored(&reserved))
                } else {
                    // In this process (also while a shared backend is unreachable).
                    Some(p.hold(alerts)?)
                }
            }
        };
        Ok(())
    }

    /// The last stage: what the answer used and cost, settled against the token limits and
    /// budgets it reserved.
    fn account(&self, ctx: &mut RequestCtx, price: Option<Price>, relayed: &Relayed) {
        ctx.record.status = relayed.status;
        ctx.record.first_byte = relayed.first_byte;
        ctx.record.bytes_out = relayed.bytes;
        if let Some(usage) = relayed.usage {
            ctx.admission.settle_tokens(usage.total());
            ctx.record.usage = Some(usage);
            ctx.record.cost_micro = price.map(|p| p.cost(&usage));
            if price.is_none() {
                if let Some(m) = crate::metrics::get() {
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
            // A shared backend's budget counters, in its call at the request's end.
            ctx.admission.settle_spend(u64::try_from(cost).unwrap_or(0));
            let alerts = hold.settle(cost, self.keys.now());
            if let Some(a) = &self.alerts {
                for alert in alerts {
                    a.send(alert);
                }
            }
        }
        if let Some(end) = relayed.end.filter(|e| *e != relay::StreamEnd::Complete) {
            ctx.record.error = Some(Failure::Stream(end));
        }
    }
}
