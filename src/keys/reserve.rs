//! Budget reservations on the request path: the most a request can cost, reserved against
//! the caller's key and team budgets before any attempt, so that concurrent requests
//! cannot overspend. The reservation is settled to the real cost when the answer ends,
//! and given back when the request ends without one (`budget::Hold`'s drop).

use super::alerts::Alerts;
use super::budget::{Exceeded, Hold};
use super::Directory;
use crate::auth::Caller;
use crate::config::Config;
use crate::error::GatewayError;
use crate::route::Alias;

/// What a request asks for, as far as its cost goes.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The model the client named.
    pub client_model: &'a str,
    /// The request body's length: its input is estimated at a token per four bytes.
    pub body_len: usize,
    /// The completion budget it asked for, if any.
    pub max_tokens: Option<u64>,
}

/// Reserves the request's most possible cost against the key's and the team's
/// budgets: the estimated input plus `max_tokens` (or `budgets.default_max_tokens`),
/// at the dearest price among the routes it may take.
pub fn reserve(
    keys: &Directory,
    alerts: Option<&Alerts>,
    config: &Config,
    caller: &Caller,
    alias: &Alias,
    ask: &Ask<'_>,
) -> Result<Option<Hold>, GatewayError> {
    let Ask {
        client_model,
        body_len,
        max_tokens,
    } = *ask;
    let config_budget;
    let mut budgets = Vec::with_capacity(2);
    match caller {
        Caller::Anonymous => {}
        Caller::Key(k) => {
            if let Some(spec) = &k.budget {
                config_budget = keys.config_budget(&k.name, spec);
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
    let now = keys.now();
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
            if let Some(a) = alerts.filter(|_| e.first) {
                a.refused(&e);
            }
            Err(budget_exceeded(&e))
        }
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
