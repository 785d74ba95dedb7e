//! The attempt loop, run inside `request_filter` for the LLM POST endpoints: walks an
//! alias's tiers in priority order, asks `select` for a server of each tier not tried
//! yet, runs `forward`, lets `inspect` judge, and either delivers the response or moves
//! on. It owns the order of attempts and nothing else: no I/O to the client happens
//! here, so no retry can ever follow a byte the client has seen.

use crate::error::GatewayError;
use crate::forward::{self, Outgoing, Sent, TransportError};
use crate::inspect::{self, Verdict};
use crate::route::{Alias, Route};
use crate::select::{InFlight, Server, Upstream};
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use std::fmt::Write;
use std::sync::Arc;

/// One attempt as it appears in the access log and in an all-failed error.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub target: String,
    pub outcome: &'static str,
}

/// The attempt whose response is delivered, holding its server's in-flight slot.
pub struct Winner {
    pub sent: Sent,
    pub server: Arc<Server>,
    pub upstream: Arc<Upstream>,
    pub in_flight: InFlight,
}

/// What kind of endpoint the request is for: Anthropic's `/v1/messages` can only go to
/// upstreams of provider `anthropic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

fn route_serves(route: &Route, dialect: Dialect) -> bool {
    use crate::config::file::Provider;
    match dialect {
        Dialect::OpenAi => true,
        Dialect::Anthropic => route.upstream.provider == Provider::Anthropic,
    }
}

/// Runs attempts until one is delivered or every target of every tier was tried.
pub async fn run(
    connector: &Connector,
    alias: &Alias,
    dialect: Dialect,
    out: &Outgoing<'_>,
    client_model: &str,
    rewrite: &(dyn Fn(&str) -> Bytes + Sync),
    attempts: &mut Vec<AttemptRecord>,
) -> Result<Winner, GatewayError> {
    if !alias
        .tiers
        .iter()
        .any(|t| t.routes.iter().any(|r| route_serves(r, dialect)))
    {
        return Err(GatewayError::NoRouteForEndpoint {
            model: client_model.to_string(),
            path: format!("/v1{}", out.suffix),
        });
    }
    let mut last_timeout = false;
    for tier in &alias.tiers {
        let order: Vec<usize> = tier.route_order().collect();
        // (route index, server address): a target this request already tried.
        let mut tried: Vec<(usize, usize)> = Vec::new();
        loop {
            let Some((ri, server)) = order.iter().find_map(|&ri| {
                let route = &tier.routes[ri];
                if !route_serves(route, dialect) {
                    return None;
                }
                route
                    .upstream
                    .pick(|s| !tried.contains(&(ri, Arc::as_ptr(s) as usize)))
                    .map(|s| (ri, Arc::clone(s)))
            }) else {
                break;
            };
            tried.push((ri, Arc::as_ptr(&server) as usize));
            let route = &tier.routes[ri];
            let upstream = &route.upstream;
            let model = route.model.as_deref().unwrap_or(client_model);
            let body = rewrite(model);
            let in_flight = InFlight::new(&server.state);
            let header =
                forward::request_header(out, &server, upstream, body.len()).map_err(|e| {
                    GatewayError::BadRequest(format!(
                        "Request cannot be forwarded: {}",
                        e.etype().as_str()
                    ))
                })?;
            let outcome = match forward::send(connector, &server, upstream, &header, &body).await {
                Ok(sent) => match inspect::judge_response(&sent) {
                    Verdict::Deliver => {
                        attempts.push(AttemptRecord {
                            target: server.name.clone(),
                            outcome: "ok",
                        });
                        return Ok(Winner {
                            sent,
                            server,
                            upstream: Arc::clone(upstream),
                            in_flight,
                        });
                    }
                    Verdict::NextTarget(outcome) => outcome,
                },
                Err(e) => {
                    log::warn!(
                        "request {}: attempt on {} failed: {}",
                        out.request_id,
                        server.name,
                        describe(&e)
                    );
                    last_timeout = matches!(e, TransportError::Timeout);
                    inspect::judge_transport(&e)
                }
            };
            attempts.push(AttemptRecord {
                target: server.name.clone(),
                outcome,
            });
        }
    }
    Err(all_failed(client_model, attempts, last_timeout))
}

fn describe(e: &TransportError) -> String {
    match e {
        TransportError::Unresolved => "address not resolved".into(),
        TransportError::Connect(m) | TransportError::Broken(m) => m.clone(),
        TransportError::Timeout => "no response header in time".into(),
    }
}

fn all_failed(model: &str, attempts: &[AttemptRecord], last_timeout: bool) -> GatewayError {
    if attempts.is_empty() {
        return GatewayError::NoTarget(format!(
            "No upstream is available for model `{model}` right now."
        ));
    }
    let mut msg = format!(
        "All {} upstream attempts for model `{model}` failed:",
        attempts.len()
    );
    for (i, a) in attempts.iter().enumerate() {
        let _ = write!(
            msg,
            "{} {} ({})",
            if i == 0 { "" } else { ";" },
            a.target,
            a.outcome
        );
    }
    msg.push('.');
    if last_timeout {
        GatewayError::UpstreamTimeout(msg)
    } else {
        GatewayError::UpstreamUnavailable(msg)
    }
}
