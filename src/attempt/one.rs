//! One attempt: the request sent to one server, its answer's header read and classified
//! (and, for an error, the start of its body), the server's health, latency and quota
//! updated, and the attempt recorded for the log and the trace.

use super::forward::{self, TransportError};
use super::{describe, AttemptOutcome, AttemptRecord, AttemptSpan, Plan, Prepared, Winner};
use crate::clock::monotonic_ms as now_ms;
use crate::provider::inspect::{self, Class};
use crate::route::{Route, Tier};
use crate::upstream::{InFlight, Server};
use std::sync::Arc;

/// Where an attempt goes: a route of a tier, one of its servers, the model it is asked
/// for; and where that tier and alias stand in the request's order.
pub(super) struct Target<'t> {
    pub route: &'t Route,
    pub server: &'t Arc<Server>,
    pub model: &'t str,
    pub tier: &'t Tier,
    pub tier_index: usize,
    pub alias_index: usize,
}

/// How an attempt ended: answered (the answer, ready to deliver, and its class), or not
/// (`true`: no header came in time).
pub(super) type Outcome = Result<(Winner, Class), bool>;

/// Sends `prepared` to the target and reads its answer's header.
pub(super) async fn attempt(
    plan: &Plan<'_>,
    at: &Target<'_>,
    prepared: Prepared,
) -> (AttemptRecord, Outcome) {
    let Target {
        route,
        server,
        model,
        tier,
        tier_index,
        alias_index,
    } = *at;
    let upstream = &route.upstream;
    let Prepared {
        body,
        suffix,
        query,
        translation,
        usage_added,
    } = prepared;
    let in_flight = InFlight::new(&server.state);
    // Every traced attempt sends its own span id upstream; only a sampled one keeps what
    // its span will show.
    let span_id = plan.trace.map(|_| crate::trace::TraceCtx::new_span());
    let sampled = plan.trace.is_some_and(|t| t.sampled);
    let mut span = span_id.filter(|_| sampled).map(|id| {
        let now = std::time::Instant::now();
        Box::new(AttemptSpan {
            id,
            started: now,
            ended: now,
            model: model.to_string(),
            provider: upstream.provider,
            address: server.endpoint.host.clone(),
            port: server.endpoint.port,
            tier: tier_index,
        })
    });
    let traceparent = plan.trace.zip(span_id).map(|(t, id)| t.traceparent(id));
    let wire = forward::Wire {
        traceparent: traceparent.as_deref(),
        suffix: suffix.as_deref().unwrap_or(plan.out.suffix),
        query: if suffix.is_some() {
            query
        } else {
            plan.out.query.as_deref()
        },
    };
    let head = forward::request_head(plan.out, &wire, server, upstream, body.len());
    let health = &server.state.health;
    let sent_at = tokio::time::Instant::now();
    let record = |outcome, status, span| AttemptRecord {
        target: server.name.clone(),
        upstream: upstream.name.clone(),
        outcome,
        status,
        alias_index,
        span,
    };

    let sent = forward::send(
        plan.connections,
        server,
        upstream,
        &head,
        &body,
        plan.out.method == http::Method::HEAD,
    )
    .await;
    let mut sent = match sent {
        Ok(sent) => sent,
        Err(e) => {
            log::warn!(
                "request {}: attempt on {} failed: {}",
                plan.out.request_id,
                server.name,
                describe(&e)
            );
            health.record_failure(now_ms(), server.max_fails, server.fail_timeout);
            let timed_out = matches!(e, TransportError::Timeout);
            if timed_out {
                // No header in time is a sample of at least that long.
                let waited = sent_at.elapsed();
                server
                    .state
                    .latency
                    .observe(waited, now_ms(), upstream.latency_decay);
            }
            if let Some(s) = span.as_mut() {
                s.ended = std::time::Instant::now();
            }
            let failed = AttemptOutcome::Failed(e.failure());
            return (record(failed, None, span), Err(timed_out));
        }
    };
    health.record_success();
    let state = &server.state;
    let now = now_ms();
    state
        .latency
        .observe(sent_at.elapsed(), now, upstream.latency_decay);
    state
        .quota
        .observe(sent.headers(), now, || plan.clock.now_ms());
    let status = sent.status();
    let class = if status < 400 {
        Class::Deliver
    } else {
        let wall = plan.clock.now_ms();
        sent.read_prefix(plan.failover.error_body_limit, upstream.idle_timeout)
            .await;
        inspect::classify(
            status,
            sent.headers(),
            &sent.prefix_bytes(),
            &upstream.rules,
            wall,
        )
    };
    if let Some(s) = span.as_mut() {
        s.ended = std::time::Instant::now();
    }
    let winner = Winner {
        usage_added,
        model: model.to_string(),
        sent,
        server: Arc::clone(server),
        upstream: Arc::clone(upstream),
        _in_flight: in_flight,
        strategy: tier.strategy,
        translation,
        price: route.price(plan.need.pricing, plan.need.client_model, plan.need.alias),
    };
    let answered = AttemptOutcome::Answered(class);
    (record(answered, Some(status), span), Ok((winner, class)))
}
