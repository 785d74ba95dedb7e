//! `GET /v1/key/info`: what a calling key may see of itself (its limits, models and
//! budgets with their spend), served on the proxy listener.

use super::auth::Caller;
use super::budget::{Budget, BudgetSpec};
use super::Directory;
use crate::clock::rfc3339;
use crate::relay::pricing::usd;
use serde_json::{json, Value};
use std::sync::Arc;

/// `GET /v1/key/info`: the calling key's own view.
pub fn key_info(caller: &Caller, dir: &Directory) -> Value {
    let now = dir.now();
    let budget = |scope: &str, spec: &BudgetSpec, live: &Arc<Budget>| {
        let f = live.figures(now);
        json!({
            "scope": scope,
            "max_usd": usd(spec.max_micro),
            "spend_usd": usd(f.spent_micro),
            "period": spec.period.as_str(),
            "mode": spec.mode.as_str(),
            "resets_at": f.resets_at.map(rfc3339),
        })
    };
    match caller {
        Caller::Anonymous => {
            json!({"key": null, "message": "the gateway is open: no key is needed"})
        }
        Caller::Key(k) => {
            let budgets: Vec<Value> = k
                .budget
                .iter()
                .map(|spec| budget("key", spec, &dir.config_budget(&k.name, spec)))
                .collect();
            json!({
                "id": super::owner_id("config", &k.name), "name": k.name, "team": null,
                "models": k.models, "limits": k.limits, "expires_at": null, "budgets": budgets,
            })
        }
        Caller::Stored(k) => {
            let mut budgets = Vec::new();
            if let (Some(spec), Some(live)) = (&k.rec.budget, &k.budget) {
                budgets.push(budget("key", spec, live));
            }
            if let Some(t) = &k.team {
                if let (Some(spec), Some(live)) = (&t.rec.budget, &t.budget) {
                    budgets.push(budget("team", spec, live));
                }
            }
            json!({
                "id": k.rec.id,
                "name": k.rec.name,
                "team": k.team.as_ref().map(|t| json!({"id": t.rec.id, "name": t.rec.name, "models": t.rec.models, "limits": t.rec.limits})),
                "models": k.rec.models,
                "limits": k.rec.limits,
                "expires_at": k.rec.expires_at.map(rfc3339),
                "budgets": budgets,
            })
        }
    }
}
