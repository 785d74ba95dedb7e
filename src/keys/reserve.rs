//! Budget reservations on the request path: the most a request can cost, reserved against
//! the caller's key and team budgets before any attempt, so that concurrent requests
//! cannot overspend. The reservation is settled to the real cost when the answer ends,
//! and given back when the request ends without one (`budget::Hold`'s drop).

use super::alerts::Alerts;
use super::budget::{Budget, Exceeded, Hold};
use super::Directory;
use crate::error::GatewayError;
use crate::keys::auth::Caller;
use crate::limits::CounterBackend;
use crate::limits::{Charge, Dimension, Refusal, Scope};
use crate::relay::pricing::Pricing;
use crate::route::Alias;
use crate::route::Router;
use std::sync::Arc;

/// What a request asks for, as far as its cost goes.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The model the client named.
    pub client_model: &'a str,
    /// The request body's length: its input is estimated at a token per four bytes.
    pub body_len: usize,
    /// The most output it may bill: its completion budget (or
    /// `budgets.default_max_tokens`) times its choices (`n`, `best_of`).
    pub output_tokens: u64,
}

/// The budgets a request is reserved against, and how much: the estimated input plus the
/// most output it may bill, at the dearest price among the routes it may take.
pub struct Plan {
    budgets: Vec<Arc<Budget>>,
    amount: i64,
    now: i64,
}

/// The key's and the team's budgets of a request and its most possible cost; `None` when
/// no budget applies. An unpriced model is refused here when an enforced budget applies
/// and `budgets.unpriced: refuse`.
/// What the reservation prices a request with: the aliases (for fallbacks), the price
/// table, and what an unpriced model does under a budget (`budgets.unpriced`).
#[derive(Clone, Copy)]
pub struct Prices<'a> {
    pub router: &'a Router,
    pub pricing: &'a Pricing,
    pub unpriced: crate::spec::Unpriced,
}

/// The budgets a caller's requests are charged to: its key's, then its team's.
pub fn budgets_of(keys: &Directory, caller: &Caller) -> Vec<Arc<Budget>> {
    let mut budgets = Vec::with_capacity(2);
    match caller {
        Caller::Anonymous => {}
        Caller::Key(k) => {
            if let Some(spec) = &k.budget {
                budgets.push(keys.config_budget(&k.name, spec));
            }
        }
        Caller::Stored(k) => {
            budgets.extend(k.budget.clone());
            budgets.extend(k.team.as_ref().and_then(|t| t.budget.clone()));
        }
    }
    budgets
}

/// Raises the caller's budgets to what a shared counter backend holds (every instance's
/// spend so far), so that `/v1/key/info` on any instance shows the same figure.
pub async fn read_shared(keys: &Directory, caller: &Caller, counters: &dyn CounterBackend) {
    if !counters.counts_spend() {
        return;
    }
    let now = keys.now();
    for b in budgets_of(keys, caller) {
        let (key, _, _) = b.counter(now);
        let scope = if b.owner.scope == "team" {
            Scope::Team
        } else {
            Scope::Key
        };
        if let Some(spent) = counters.spent(scope, key).await {
            b.raise(i64::try_from(spent).unwrap_or(i64::MAX), now);
        }
    }
}

pub fn plan(
    keys: &Directory,
    prices: &Prices<'_>,
    caller: &Caller,
    alias: &Alias,
    ask: &Ask<'_>,
) -> Result<Option<Plan>, GatewayError> {
    let Ask {
        client_model,
        body_len,
        output_tokens: output,
    } = *ask;
    let budgets = budgets_of(keys, caller);
    if budgets.is_empty() {
        return Ok(None);
    }
    let now = keys.now();
    let input = crate::limits::input_tokens(body_len);
    let amount = match dearest_price(prices, alias, client_model) {
        Some(p) => p.most(input, output),
        None => {
            let enforced = budgets
                .iter()
                .any(|b| b.figures(now).spec.mode == crate::keys::budget::Mode::Enforce);
            if enforced && prices.unpriced == crate::spec::Unpriced::Refuse {
                return Err(GatewayError::Unpriced(client_model.to_string()));
            }
            0
        }
    };
    Ok(Some(Plan {
        budgets,
        amount,
        now,
    }))
}

impl Plan {
    /// Reserves against the budgets in this process, all or none.
    pub fn hold(&self, alerts: Option<&Alerts>) -> Result<Hold, GatewayError> {
        let budgets: Vec<&Arc<Budget>> = self.budgets.iter().collect();
        Hold::reserve(&budgets, self.amount, self.now).map_err(|e| refusal(alerts, &e))
    }

    /// The reservations as charges for a shared counter backend, which checks and counts
    /// them with the request's limits.
    pub fn charges(&self) -> Vec<Charge> {
        let amount = u64::try_from(self.amount).unwrap_or(0);
        self.budgets
            .iter()
            .map(|b| {
                let (key, limit, base) = b.counter(self.now);
                let scope = if b.owner.scope == "team" {
                    Scope::Team
                } else {
                    Scope::Key
                };
                Charge {
                    base,
                    ..Charge::new(scope, key, Dimension::Spend, limit, amount)
                }
            })
            .collect()
    }

    /// After the shared backend reserved: each budget takes the spend it reported, and the
    /// hold settles this instance's figures (and alerts) when the request ends.
    pub fn mirrored(&self, reserved: &[&Charge]) -> Hold {
        for (b, c) in self.budgets.iter().zip(reserved) {
            b.observe(i64::try_from(c.base).unwrap_or(i64::MAX), self.now);
        }
        Hold::mirror(&self.budgets, self.amount, self.now)
    }

    /// The 402 of a reservation the shared backend refused.
    pub fn refused(&self, r: &Refusal, alerts: Option<&Alerts>) -> GatewayError {
        let scope = if r.scope == Scope::Team {
            "team"
        } else {
            "key"
        };
        let Some(b) = self.budgets.iter().find(|b| b.owner.scope == scope) else {
            return GatewayError::LimitsUnavailable;
        };
        let e = b.refused(i64::try_from(r.spent).unwrap_or(i64::MAX), self.now);
        refusal(alerts, &e)
    }
}

/// Counts and alerts a budget refusal and makes its 402.
fn refusal(alerts: Option<&Alerts>, e: &Exceeded) -> GatewayError {
    if let Some(m) = crate::metrics::get() {
        m.budget_refusals.with_label_values(&[e.owner.scope]).inc();
    }
    if let Some(a) = alerts.filter(|_| e.first) {
        a.refused(e);
    }
    budget_exceeded(e)
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
            crate::relay::pricing::dollars(e.max_micro),
            crate::relay::pricing::dollars(e.spent_micro),
        ),
        scope: e.owner.scope,
        max_micro: e.max_micro,
        resets_at,
    }
}

/// The highest input and output prices among the routes of `alias` and its fallbacks
/// (`None` when one of them has no price).
fn dearest_price(
    prices: &Prices<'_>,
    alias: &Alias,
    client_model: &str,
) -> Option<crate::relay::pricing::Price> {
    let mut aliases = vec![alias];
    for name in alias.fallbacks.iter().chain(&alias.context_fallbacks) {
        aliases.extend(prices.router.resolve(name).map(|a| &**a));
    }
    let mut dearest = crate::relay::pricing::Price {
        input: 0,
        output: 0,
        cached_input: 0,
        cache_write: 0,
        cache_write_1h: 0,
    };
    for a in aliases {
        for route in a.tiers.iter().flat_map(|t| &t.routes) {
            let p = route.price(prices.pricing, client_model, &a.name)?;
            // Anthropic bills prompt-cache writes above the input price: the
            // reservation covers an input that is all writes.
            let writes = route.upstream.provider == crate::provider::Provider::Anthropic;
            dearest.input = dearest.input.max(p.dearest_input(writes));
            dearest.output = dearest.output.max(p.output);
        }
    }
    Some(dearest)
}
