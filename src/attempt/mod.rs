//! The attempt loop, run inside `request_filter` for the LLM POST endpoints. Walks the
//! alias's tiers in priority order (L1), then its `fallbacks` aliases with their own tiers
//! (L2); asks `select` for a usable server of each tier not tried yet; runs `forward`;
//! lets `inspect` classify the answer; cools failed targets down; and either delivers a
//! response or moves on, within `failover.max_attempts`. Nothing here writes to the
//! client, so no retry can ever follow a byte the client has seen.

pub(crate) mod forward;

use crate::clock::monotonic_ms as now_ms;
use crate::error::GatewayError;
use crate::provider::inspect::{self, Class};
use crate::provider::Dialect;
use crate::route::{Alias, Need, Route, Router};
use crate::spec::Strategy;
use crate::transport::pool::Connections;
use crate::upstream::health::Reason;
use crate::upstream::shared::SharedCooldowns;
use crate::upstream::{InFlight, Server, Upstream};
use bytes::Bytes;
use forward::{Outgoing, Sent, TransportError, TransportFailure};
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One attempt as it appears in the access log and in an all-failed error.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The server's name (`upstream/server`).
    pub target: String,
    pub upstream: String,
    pub outcome: AttemptOutcome,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    /// Which alias of the chain the attempt belonged to (0: the requested one).
    pub alias_index: usize,
}

/// How one attempt ended; named only where it is logged or counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttemptOutcome {
    /// The upstream answered; how its answer was classified.
    Answered(Class),
    /// No answer: the connection failed.
    Failed(TransportFailure),
}

impl AttemptOutcome {
    /// The name in the access log and the `outcome` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Answered(class) => class.outcome(),
            AttemptOutcome::Failed(f) => f.as_str(),
        }
    }
}

/// Failover settings in effect (see `failover` in the config reference).
#[derive(Debug, Clone)]
pub struct Failover {
    pub max_attempts: usize,
    pub cooldown: std::time::Duration,
    pub max_cooldown: std::time::Duration,
    pub quota_cooldown: std::time::Duration,
    pub error_body_limit: usize,
}

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
}

fn route_serves(route: &Route, dialect: Dialect) -> bool {
    dialect.served_by(route.upstream.provider)
}

/// Everything one request's attempt loop reads.
pub struct Plan<'a> {
    pub connections: &'a Connections,
    pub router: &'a Router,
    pub failover: &'a Failover,
    pub dialect: Dialect,
    pub out: &'a Outgoing<'a>,
    /// The client's model, estimated tokens and prices: what route strategies and context
    /// windows go by.
    pub need: &'a Need<'a>,
    /// The body for a model name, with or without `stream_options.include_usage` added.
    pub rewrite: &'a (dyn Fn(&str, bool) -> Bytes + Sync),
    /// A streaming request without `stream_options` on an endpoint that supports it.
    pub wants_usage: bool,
    /// Where cooldowns are shared with other instances (`cluster.redis`), if they are.
    pub cooldowns: Option<&'a Arc<SharedCooldowns>>,
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

async fn attempt_all(
    plan: &Plan<'_>,
    alias: &Arc<Alias>,
    attempts: &mut Vec<AttemptRecord>,
    skips: &Skips,
) -> Result<Winner, GatewayError> {
    let serves = |a: &Alias| {
        a.tiers
            .iter()
            .any(|t| t.routes.iter().any(|r| route_serves(r, plan.dialect)))
    };
    let mut queue: VecDeque<Arc<Alias>> = VecDeque::new();
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
            .any(|r| route_serves(r, plan.dialect) && r.fits(plan.need.client_model, needed))
    };
    let mut context_first = false;
    if !queue.iter().any(|a| fits(a)) {
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
        queue = switched;
        context_first = true;
    }
    let chain: Vec<Arc<Alias>> = queue.iter().cloned().collect();
    let mut last: Option<Winner> = None;
    let mut last_timeout = false;

    // When every target is cooling down, the ones cooling for a transient failure are tried
    // anyway rather than failing the request outright: a single server's one bad answer
    // must not take a model offline for the whole cooldown (nginx likewise never marks the
    // only server of a group unavailable). Quota and credential cooldowns always hold.
    for last_resort in [false, true] {
        if last_resort {
            if !attempts.is_empty() {
                break;
            }
            log::info!(
            "request {}: every target of model `{}` is cooling down; trying those with a transient cooldown",
            plan.out.request_id,
            plan.need.client_model
        );
            queue = chain.iter().cloned().collect();
        }
        let mut context_switched = context_first;
        let mut alias_index = 0;
        'aliases: while let Some(current) = queue.pop_front() {
            alias_index += 1;
            let alias_index = alias_index - 1;
            for tier in &current.tiers {
                let order = tier.route_order(plan.need);
                // (route index, server address): targets this request already tried.
                let mut tried: Vec<(usize, usize)> = Vec::new();
                loop {
                    if attempts.len() >= plan.failover.max_attempts {
                        break 'aliases;
                    }
                    let now = now_ms();
                    let Some((ri, server)) = order.iter().find_map(|placed| {
                        let ri = placed.route;
                        let route = &tier.routes[ri];
                        if !route_serves(route, plan.dialect) {
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
                                // The provider says this target cannot take it before its
                                // reset (only as a last resort is it asked anyway).
                                if !last_resort && !s.state.quota.covers(now, needed) {
                                    skips.quota.store(true, Ordering::Relaxed);
                                    return false;
                                }
                                true
                            })
                            .map(|s| (ri, Arc::clone(s)))
                    }) else {
                        break;
                    };
                    server.state.quota.spend(needed);
                    tried.push((ri, Arc::as_ptr(&server) as usize));
                    let route = &tier.routes[ri];
                    let upstream = &route.upstream;
                    let model = route.model.as_deref().unwrap_or(plan.need.client_model);
                    let usage_added = plan.wants_usage && upstream.stream_usage;
                    let body = (plan.rewrite)(model, usage_added);
                    let in_flight = InFlight::new(&server.state);
                    let head = forward::request_head(plan.out, &server, upstream, body.len());
                    let health = &server.state.health;
                    let sent_at = tokio::time::Instant::now();

                    let mut sent = match forward::send(
                        plan.connections,
                        &server,
                        upstream,
                        &head,
                        &body,
                        plan.out.method == http::Method::HEAD,
                    )
                    .await
                    {
                        Ok(sent) => sent,
                        Err(e) => {
                            log::warn!(
                                "request {}: attempt on {} failed: {}",
                                plan.out.request_id,
                                server.name,
                                describe(&e)
                            );
                            health.record_failure(now_ms(), server.max_fails, server.fail_timeout);
                            last_timeout = matches!(e, TransportError::Timeout);
                            if last_timeout {
                                // No header in time is a sample of at least that long.
                                let waited = sent_at.elapsed();
                                server.state.latency.observe(
                                    waited,
                                    now_ms(),
                                    upstream.latency_decay,
                                );
                            }
                            attempts.push(AttemptRecord {
                                target: server.name.clone(),
                                upstream: upstream.name.clone(),
                                outcome: AttemptOutcome::Failed(e.failure()),
                                status: None,
                                alias_index,
                            });
                            continue;
                        }
                    };
                    last_timeout = false;
                    health.record_success();
                    let state = &server.state;
                    let now = now_ms();
                    state
                        .latency
                        .observe(sent_at.elapsed(), now, upstream.latency_decay);
                    let wall = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
                    state.quota.observe(sent.headers(), now, wall);
                    let status = sent.status();
                    let class = if status < 400 {
                        Class::Deliver
                    } else {
                        sent.read_prefix(plan.failover.error_body_limit, upstream.idle_timeout)
                            .await;
                        inspect::classify(
                            status,
                            sent.headers(),
                            &sent.prefix_bytes(),
                            &upstream.rules,
                        )
                    };
                    attempts.push(AttemptRecord {
                        target: server.name.clone(),
                        upstream: upstream.name.clone(),
                        outcome: AttemptOutcome::Answered(class),
                        status: Some(status),
                        alias_index,
                    });
                    let winner = Winner {
                        usage_added,
                        model: model.to_string(),
                        sent,
                        server: Arc::clone(&server),
                        upstream: Arc::clone(upstream),
                        _in_flight: in_flight,
                        strategy: tier.strategy,
                    };
                    let f = plan.failover;
                    match class {
                        Class::Deliver => {
                            recycle(plan.connections, last.take());
                            return Ok(winner);
                        }
                        Class::ContextLength => {
                            if context_switched || current.context_fallbacks.is_empty() {
                                recycle(plan.connections, last.take());
                                return Ok(winner);
                            }
                            context_switched = true;
                            queue.clear();
                            queue.extend(
                                current
                                    .context_fallbacks
                                    .iter()
                                    .filter_map(|a| plan.router.resolve(a).cloned()),
                            );
                            recycle(plan.connections, last.replace(winner));
                            continue 'aliases;
                        }
                        Class::Transient { hint } => {
                            let d = hint.unwrap_or(f.cooldown).min(f.max_cooldown);
                            cool(plan, &server, now, d, Reason::Transient);
                        }
                        Class::Quota => cool(plan, &server, now, f.quota_cooldown, Reason::Quota),
                        Class::Credentials => {
                            log::error!(
                            "upstream {} rejected the gateway's credential ({}) with status {status}: check its api_key; no traffic for {}",
                            server.name,
                            server.api_key.as_ref().map_or_else(|| "none".to_string(), |k| crate::secret::mask(k.expose())),
                            humantime::format_duration(f.quota_cooldown)
                        );
                            cool(plan, &server, now, f.quota_cooldown, Reason::Credentials);
                        }
                        Class::Skip => {}
                    }
                    log::info!(
                        "request {}: {} answered {status} ({}), trying the next target",
                        plan.out.request_id,
                        server.name,
                        class.outcome()
                    );
                    recycle(plan.connections, last.replace(winner));
                }
            }
        }
    }

    match last {
        Some(w) if client_meaningful(w.sent.status()) => return Ok(w),
        other => recycle(plan.connections, other),
    }
    Err(all_failed(
        plan.need.client_model,
        attempts,
        last_timeout,
        retry_after(&chain),
    ))
}

/// Cools `server` here and, when cooldowns are shared, on every instance.
fn cool(plan: &Plan<'_>, server: &Server, now: u64, d: std::time::Duration, reason: Reason) {
    server.state.health.cool(now, d, reason);
    if let Some(shared) = plan.cooldowns {
        shared.cool(&server.name, d, reason);
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
mod tests {
    //! The attempt loop on its own, against real mock upstreams on loopback: which
    //! targets it tries in which order, what it records, and what it cools down.
    use super::*;
    use crate::config::Config;
    use crate::demo::mock::{MockUpstream, Reply};
    use crate::transport::pool::Pool;
    use pingora_core::connectors::TransportConnector;
    use pingora_http::RequestHeader;
    use std::time::Duration;

    async fn attempt(
        config: &Config,
        model: &str,
    ) -> (Result<Winner, GatewayError>, Vec<AttemptRecord>) {
        let connections = Connections {
            dialer: Box::new(TransportConnector::new(None)),
            pool: Pool::new(8),
        };
        attempt_over(&connections, config, model).await
    }

    async fn attempt_over(
        connections: &Connections,
        config: &Config,
        model: &str,
    ) -> (Result<Winner, GatewayError>, Vec<AttemptRecord>) {
        let req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        let out = Outgoing::new(&req, "/chat/completions", "test-request", "127.0.0.1");
        let body = Bytes::from(format!(r#"{{"model":"{model}","messages":[]}}"#));
        let rewrite = |_: &str, _: bool| body.clone();
        let alias = config.router.resolve(model).unwrap().clone();
        let need = Need {
            client_model: model,
            alias: &alias.name,
            input_tokens: body.len() as u64 / 4,
            output_tokens: 0,
            pricing: &config.pricing,
        };
        let plan = Plan {
            connections,
            router: &config.router,
            failover: &config.failover,
            dialect: Dialect::OpenAi,
            out: &out,
            need: &need,
            rewrite: &rewrite,
            wants_usage: false,
            cooldowns: None,
        };
        let mut attempts = Vec::new();
        let result = run(&plan, &alias, &mut attempts).await;
        (result, attempts)
    }

    fn config(text: &str) -> Config {
        let c = Config::parse(text, &|_| None).unwrap();
        c.resolve();
        c
    }

    fn outcomes(attempts: &[AttemptRecord]) -> Vec<(String, &'static str)> {
        attempts
            .iter()
            .map(|a| (a.upstream.clone(), a.outcome.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn a_rate_limited_tier_is_cooled_for_its_hint_and_the_next_tier_answers() {
        let a = MockUpstream::start("a").await.unwrap();
        let b = MockUpstream::start("b").await.unwrap();
        a.set_default(Reply::Status {
            status: 429,
            headers: vec![("retry-after".into(), "7".into())],
            body: r#"{"error":{"message":"slow down","type":"rate_limit_exceeded"}}"#.into(),
        });
        let c = config(&format!(
            "upstreams:\n  a: {{servers: [{{url: \"{}\"}}]}}\n  b: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: a, priority: 1}}\n      - {{upstream: b, priority: 2}}\n",
            a.url(),
            b.url()
        ));
        let (result, attempts) = attempt(&c, "m").await;
        let winner = result.unwrap();
        assert_eq!(winner.upstream.name, "b");
        assert_eq!(winner.sent.status(), 200);
        assert_eq!(
            outcomes(&attempts),
            [("a".to_string(), "transient"), ("b".to_string(), "ok")]
        );
        assert_eq!(attempts[0].status, Some(429));
        let server_a = &c.upstreams["a"].servers[0];
        let (left, reason) = server_a.state.health.cooldown(now_ms()).unwrap();
        assert_eq!(reason, crate::upstream::health::Reason::Transient);
        assert!(
            left > Duration::from_secs(6) && left <= Duration::from_secs(7),
            "{left:?}"
        );
        assert_eq!((a.hits(), b.hits()), (1, 1));
    }

    #[tokio::test]
    async fn attempts_stop_at_max_attempts_and_the_last_error_says_so() {
        let ups: Vec<MockUpstream> = futures_util::future::join_all(
            (0..5).map(|i| async move { MockUpstream::start(&format!("s{i}")).await.unwrap() }),
        )
        .await;
        for u in &ups {
            u.set_default(Reply::error(503, r#"{"error":{"message":"overloaded"}}"#));
        }
        let servers: Vec<String> = ups
            .iter()
            .map(|u| format!("{{url: \"{}\"}}", u.url()))
            .collect();
        let c = config(&format!(
            "failover: {{max_attempts: 3}}\nupstreams:\n  u: {{servers: [{}]}}\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
            servers.join(", ")
        ));
        let (result, attempts) = attempt(&c, "m").await;
        let Err(e) = result else {
            panic!("every server answered 503")
        };
        assert_eq!(e.status(), 503);
        let message = e.to_string();
        assert!(
            message.starts_with("All 3 upstream attempts for model `m` failed"),
            "{message}"
        );
        assert_eq!(message.matches("(transient 503)").count(), 3, "{message}");
        assert_eq!(attempts.len(), 3);
        assert!(attempts.iter().all(|a| a.outcome.as_str() == "transient"));
        assert_eq!(ups.iter().map(MockUpstream::hits).sum::<usize>(), 3);
    }

    #[tokio::test]
    async fn a_quota_failure_cools_for_the_quota_cooldown_and_a_refused_connection_is_a_transport_failure(
    ) {
        let quota = MockUpstream::start("q").await.unwrap();
        let ok = MockUpstream::start("ok").await.unwrap();
        quota.set_default(Reply::error(
            429,
            r#"{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}"#,
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let c = config(&format!(
            "failover: {{quota_cooldown: 1h}}\nupstreams:\n  dead: {{servers: [{{url: \"http://127.0.0.1:{closed_port}\"}}]}}\n  q: {{servers: [{{url: \"{}\"}}]}}\n  ok: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: dead, priority: 1}}\n      - {{upstream: q, priority: 2}}\n      - {{upstream: ok, priority: 3}}\n",
            quota.url(),
            ok.url()
        ));
        let (result, attempts) = attempt(&c, "m").await;
        assert_eq!(result.unwrap().upstream.name, "ok");
        assert_eq!(
            outcomes(&attempts),
            [
                ("dead".to_string(), "connect_error"),
                ("q".to_string(), "quota"),
                ("ok".to_string(), "ok")
            ]
        );
        let (left, reason) = c.upstreams["q"].servers[0]
            .state
            .health
            .cooldown(now_ms())
            .unwrap();
        assert_eq!(reason, crate::upstream::health::Reason::Quota);
        assert!(left > Duration::from_secs(3500), "{left:?}");
    }

    /// Upstreams scripted in memory, reached through the dialer: each address answers
    /// every request with its raw HTTP response after its delay, timed by tokio's clock,
    /// so that tests run with paused time and never wait for real.
    #[derive(Default)]
    struct Scripted {
        scripts: std::sync::Mutex<std::collections::HashMap<String, (Duration, &'static str)>>,
        hits: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    }

    impl Scripted {
        fn answer(&self, addr: &str, delay: Duration, response: &'static str) {
            let mut scripts = self.scripts.lock().unwrap();
            scripts.insert(addr.to_string(), (delay, response));
        }

        fn hits(&self, addr: &str) -> usize {
            self.hits.lock().unwrap().get(addr).copied().unwrap_or(0)
        }
    }

    #[async_trait::async_trait]
    impl crate::transport::pool::Dialer for std::sync::Arc<Scripted> {
        async fn dial(
            &self,
            peer: &pingora_core::upstreams::peer::HttpPeer,
        ) -> pingora_core::Result<pingora_core::protocols::Stream> {
            use pingora_core::upstreams::peer::Peer;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let addr = peer.address().to_string();
            if !self.scripts.lock().unwrap().contains_key(&addr) {
                return pingora_core::Error::e_explain(
                    pingora_core::ErrorType::ConnectRefused,
                    "nothing scripted",
                );
            }
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let me = std::sync::Arc::clone(self);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = server.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // Each test request is one JSON object: its last byte ends it.
                    if seen.ends_with(b"}") {
                        seen.clear();
                        *me.hits.lock().unwrap().entry(addr.clone()).or_default() += 1;
                        // The script as it is now: a pooled connection follows changes.
                        let (delay, response) = me.scripts.lock().unwrap()[&addr];
                        tokio::time::sleep(delay).await;
                        if server.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(Box::new(client))
        }
    }

    const OK: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    const SLOW_DOWN: &str = "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-type: application/json\r\ncontent-length: 33\r\n\r\n{\"error\":{\"message\":\"slow down\"}}";

    fn scripted() -> (std::sync::Arc<Scripted>, Connections) {
        let s = std::sync::Arc::new(Scripted::default());
        let connections = Connections {
            dialer: Box::new(std::sync::Arc::clone(&s)),
            pool: Pool::new(8),
        };
        (s, connections)
    }

    fn two_tiers(extra: &str) -> Config {
        config(&format!(
            "upstreams:\n  a: {{{extra}servers: [{{url: \"http://127.0.0.11:80\"}}]}}\n  b: {{servers: [{{url: \"http://127.0.0.12:80\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: a, priority: 1}}\n      - {{upstream: b, priority: 2}}\n"
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_byte_times_out_after_first_byte_timeout_and_the_next_tier_answers() {
        let (up, connections) = scripted();
        up.answer("127.0.0.11:80", Duration::from_secs(600), OK);
        up.answer("127.0.0.12:80", Duration::from_millis(250), OK);
        let c = two_tiers("first_byte_timeout: 20s, ");
        let started = tokio::time::Instant::now();
        let (result, attempts) = attempt_over(&connections, &c, "m").await;
        assert_eq!(result.unwrap().upstream.name, "b");
        assert_eq!(
            outcomes(&attempts),
            [("a".to_string(), "timeout"), ("b".to_string(), "ok")]
        );
        // 20 s waiting for a, 250 ms for b, on the paused clock: nothing else waited.
        assert_eq!(started.elapsed(), Duration::from_millis(20_250));
        assert_eq!((up.hits("127.0.0.11:80"), up.hits("127.0.0.12:80")), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooled_tier_is_skipped_until_its_hint_has_passed_then_tried_again() {
        let (up, connections) = scripted();
        up.answer("127.0.0.11:80", Duration::ZERO, SLOW_DOWN);
        up.answer("127.0.0.12:80", Duration::ZERO, OK);
        let c = two_tiers("");
        let (result, attempts) = attempt_over(&connections, &c, "m").await;
        assert_eq!(result.unwrap().upstream.name, "b");
        assert_eq!(attempts.len(), 2);

        // Within its 7 s hint, a is not asked again.
        tokio::time::advance(Duration::from_millis(6_900)).await;
        let (result, attempts) = attempt_over(&connections, &c, "m").await;
        assert_eq!(result.unwrap().upstream.name, "b");
        assert_eq!(outcomes(&attempts), [("b".to_string(), "ok")]);
        assert_eq!(up.hits("127.0.0.11:80"), 1);

        // Once it has passed, a is first again.
        tokio::time::advance(Duration::from_millis(200)).await;
        up.answer("127.0.0.11:80", Duration::ZERO, OK);
        let (result, attempts) = attempt_over(&connections, &c, "m").await;
        assert_eq!(result.unwrap().upstream.name, "a");
        assert_eq!(outcomes(&attempts), [("a".to_string(), "ok")]);
        assert_eq!((up.hits("127.0.0.11:80"), up.hits("127.0.0.12:80")), (2, 2));
    }
}
