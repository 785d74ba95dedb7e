//! `GET /admin/route?model=ALIAS[&input_tokens=N][&max_tokens=N][&endpoint=PATH]`: the
//! order a request for the alias would take now, and why. Every candidate target (route and server) in tier
//! order, the tier's strategy and each route's score under it, the server's latency
//! estimate, requests in flight, price, context window, what its provider says is left,
//! whether it is cooling down or unhealthy (with the reason and until when), and for the
//! endpoint (`/v1/chat/completions` unless given) whether the route passes the request
//! through, translates it (and how) or cannot serve it. Reads the
//! same state the attempt loop reads; moves no rotation.

use crate::clock::monotonic_ms;
use crate::config::Config;
use crate::provider::translate::Path;
use crate::route::{Alias, Need};
use crate::upstream::Server;
use serde_json::{json, Value};
use std::time::Duration;

/// The explanation, or why the query cannot be answered.
pub fn explain(config: &Config, query: &str) -> Result<Value, String> {
    let mut model = None;
    let (mut input_tokens, mut max_tokens) = (0u64, 0u64);
    let mut endpoint = "/v1/chat/completions".to_string();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || {
            v.parse::<u64>()
                .map_err(|_| format!("{k} must be a whole number of tokens"))
        };
        match k {
            "model" => model = Some(super::percent_decode(v)),
            "input_tokens" => input_tokens = number()?,
            "max_tokens" => max_tokens = number()?,
            "endpoint" => endpoint = super::percent_decode(v),
            _ => return Err(format!("unknown parameter {k:?}")),
        }
    }
    let model = model.ok_or("model is required")?;
    let suffix = endpoint
        .strip_prefix("/v1")
        .filter(|s| s.starts_with('/'))
        .ok_or_else(|| format!("endpoint must be a path under /v1, not {endpoint:?}"))?;
    let alias = config
        .router
        .resolve(&model)
        .ok_or_else(|| format!("no model alias {model:?} and no \"*\""))?;
    let need = Need {
        client_model: &model,
        alias: &alias.name,
        input_tokens,
        output_tokens: max_tokens,
        pricing: &config.pricing,
    };
    let mut chain = vec![json!({"alias": alias.name, "tiers": tiers(alias, &need, suffix)})];
    for name in alias.fallbacks.iter() {
        if let Some(a) = config.router.resolve(name) {
            let need = Need {
                alias: &a.name,
                ..need
            };
            chain.push(json!({"alias": a.name, "tiers": tiers(a, &need, suffix)}));
        }
    }
    Ok(json!({
        "model": model,
        "endpoint": endpoint,
        "needed_tokens": need.tokens(),
        "context_fallbacks": alias.context_fallbacks,
        "order": chain,
    }))
}

fn tiers(alias: &Alias, need: &Need, suffix: &str) -> Vec<Value> {
    let now = monotonic_ms();
    alias
        .tiers
        .iter()
        .map(|tier| {
            let candidates: Vec<Value> = tier
                .next_order(need)
                .into_iter()
                .map(|placed| {
                    let route = &tier.routes[placed.route];
                    let upstream_model = route.model_for(need.client_model);
                    let price = route.price(need.pricing, need.client_model, need.alias);
                    let window = route.context_window(need.client_model);
                    let servers: Vec<Value> = route
                        .upstream
                        .servers
                        .iter()
                        .map(|s| server_view(s, route.upstream.latency_decay, now, need.tokens()))
                        .collect();
                    let provider = route.upstream.provider;
                    let (wire, translation) = match Path::of(suffix, provider) {
                        Path::Direct => ("direct", None),
                        Path::Translated(t) => ("translated", Some(t.label())),
                        Path::Unserved => ("unserved", None),
                    };
                    json!({
                        "upstream": route.upstream.name,
                        "provider": provider.as_str(),
                        "wire": wire,
                        "translation": translation,
                        "model": upstream_model,
                        "score": placed.score.filter(|s| s.is_finite()),
                        "weight": route.weight,
                        "price_per_million": price.map(|p| json!({
                            "input_usd": crate::relay::pricing::usd(p.input as i64),
                            "output_usd": crate::relay::pricing::usd(p.output as i64),
                        })),
                        "max_context": window,
                        "fits": route.fits(need.client_model, need.tokens()),
                        "balance": route.upstream.balance.as_str(),
                        "servers": servers,
                    })
                })
                .collect();
            json!({
                "priority": tier.priority,
                "strategy": tier.strategy.as_str(),
                "routes": candidates,
            })
        })
        .collect()
}

/// One server as the explain endpoint and `GET /admin/upstreams` show it: its state
/// (`up`, `cooling`, `unhealthy`, `quota` for a request of `tokens`, `max_conns`,
/// `unresolved`), the cooldown's reason and time left, latency estimate, requests in
/// flight and what its provider says is left.
pub fn server_view(s: &Server, decay: Duration, now: u64, tokens: u64) -> Value {
    let ms = |d: Duration| d.as_millis() as u64;
    let health = &s.state.health;
    let cooling = health.cooldown(now);
    let room = s.state.quota.room(now);
    let state = if s.endpoint.addr().is_none() {
        "unresolved"
    } else if !health.active_ok() {
        "unhealthy"
    } else if cooling.is_some() {
        "cooling"
    } else if !s.state.quota.covers(now, tokens) {
        "quota"
    } else if !s.has_room() {
        "max_conns"
    } else {
        "up"
    };
    json!({
        "server": s.name,
        "state": state,
        "backup": s.backup,
        "cooling": cooling.map(|(d, r)| json!({"reason": r.as_str(), "for_ms": ms(d)})),
        "latency_ms": s.state.latency.estimate(now, decay).map(|d| d.as_secs_f64() * 1e3),
        "in_flight": s.state.in_flight(),
        "quota": {
            "requests_remaining": room.requests.map(|r| r.0),
            "requests_reset_ms": room.requests.map(|r| ms(r.1)),
            "tokens_remaining": room.tokens.map(|r| r.0),
            "tokens_reset_ms": room.tokens.map(|r| ms(r.1)),
        },
    })
}

/// `GET /admin/upstreams`: every server of every upstream with its state.
pub fn upstreams(config: &Config) -> Value {
    let now = monotonic_ms();
    let list: Vec<Value> = config
        .upstreams
        .values()
        .map(|u| {
            let servers: Vec<Value> = u
                .servers
                .iter()
                .map(|s| server_view(s, u.latency_decay, now, 0))
                .collect();
            json!({
                "upstream": u.name,
                "provider": format!("{:?}", u.provider).to_lowercase(),
                "balance": u.balance.as_str(),
                "servers": servers,
            })
        })
        .collect();
    json!({ "upstreams": list })
}
