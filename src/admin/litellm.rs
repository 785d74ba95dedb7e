//! `tollgate import-litellm-keys --from URL [--dry-run]`: copies a LiteLLM proxy's teams
//! and virtual keys into Tollgate's store. LiteLLM keeps a key as the SHA-256 hex of the
//! whole `sk-...` string, which is what Tollgate keeps too: the strings clients hold keep
//! working. Ids come from the token and the team id, so a second run updates what the
//! first wrote. Spend so far is carried over as one usage row per key (and one per team
//! for what its keys do not account for), replaced on every run.

use crate::keys::budget::{BudgetSpec, Mode, Period};
use crate::keys::{self, KeyRecord, TeamRecord};
use crate::limits::Limits;
use crate::store::litellm::{LiteKey, LiteTeam};
use crate::store::usage::UsageRow;
use crate::store::StoreError;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What an import writes.
#[derive(Debug, Default)]
pub struct Plan {
    pub teams: Vec<TeamRecord>,
    pub keys: Vec<KeyRecord>,
    /// Spend carried over, one row per key or team remainder.
    pub carried: Vec<UsageRow>,
    /// What did not carry over as it was.
    pub notes: Vec<String>,
}

/// The usage rows' model name for spend carried over.
pub const CARRIED_MODEL: &str = "litellm-import";

/// The request id of the row carrying a key's spend, and of a team's remainder.
fn key_row(id: &str) -> String {
    format!("{CARRIED_MODEL}:key:{id}")
}

fn team_row(id: &str) -> String {
    format!("{CARRIED_MODEL}:team:{id}")
}

/// LiteLLM's `budget_duration` (`30s`, `12h`, `1d`, `7d`, `1mo`) as a calendar period,
/// and whether the period is not the same length.
fn period(duration: Option<&str>) -> (Period, bool) {
    let Some(d) = duration.map(str::trim).filter(|d| !d.is_empty()) else {
        return (Period::Total, false);
    };
    let digits: String = d.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or(0);
    const DAY: u64 = 86_400;
    const WEEK: u64 = 7 * DAY;
    const MONTH: u64 = 30 * DAY;
    const LONG_MONTH: u64 = 31 * DAY;
    let seconds = match &d[digits.len()..] {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3_600),
        "d" => n.saturating_mul(DAY),
        "w" => n.saturating_mul(WEEK),
        "mo" => n.saturating_mul(MONTH),
        _ => return (Period::Monthly, true),
    };
    match seconds {
        DAY => (Period::Daily, false),
        WEEK => (Period::Weekly, false),
        MONTH | LONG_MONTH => (Period::Monthly, false),
        s if s <= 3 * DAY => (Period::Daily, true),
        s if s <= 15 * DAY => (Period::Weekly, true),
        _ => (Period::Monthly, true),
    }
}

/// A LiteLLM model list: empty, `all-proxy-models` or `*` mean every model.
fn models(list: &[String]) -> Option<Vec<String>> {
    let every = list.is_empty()
        || list
            .iter()
            .any(|m| m == "all-proxy-models" || m == "*" || m == "all-team-models");
    (!every).then(|| list.to_vec())
}

fn limits(tpm: Option<i64>, rpm: Option<i64>, parallel: Option<i64>) -> Limits {
    let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0);
    Limits {
        rps: None,
        rpm: positive(rpm),
        tpm: positive(tpm),
        concurrency: positive(parallel),
    }
}

fn micro(usd: f64) -> i64 {
    (usd.max(0.0) * 1e6).round() as i64
}

struct Budgeted<'a> {
    what: String,
    max_budget: Option<f64>,
    duration: Option<&'a str>,
    reset_at: Option<i64>,
    spend: f64,
}

impl Budgeted<'_> {
    /// The budget, and the spend to carry over (none when LiteLLM's reset is due).
    fn read(&self, now: i64, notes: &mut Vec<String>) -> (Option<BudgetSpec>, i64) {
        let (period, approximate) = period(self.duration);
        if approximate {
            notes.push(format!(
                "{}: budget_duration {} has no calendar equivalent; {} is used",
                self.what,
                self.duration.unwrap_or_default(),
                period.as_str()
            ));
        }
        let budget = self.max_budget.and_then(|usd| {
            BudgetSpec::new(usd, period, Mode::Enforce, &[0.8, 1.0])
                .map_err(|(field, why)| {
                    notes.push(format!(
                        "{}: max_budget {usd}: {field} {why}; no budget",
                        self.what
                    ))
                })
                .ok()
        });
        let due = self.duration.is_some() && self.reset_at.is_some_and(|t| t <= now);
        if due && self.spend > 0.0 {
            notes.push(format!(
                "{}: LiteLLM's budget reset was due; its spend starts again at 0",
                self.what
            ));
            return (budget, 0);
        }
        (budget, micro(self.spend))
    }
}

/// The lowercase SHA-256 hex a LiteLLM token stands for (old versions kept some keys
/// unhashed: those are hashed here).
fn digest_of(token: &str) -> String {
    let hashed = token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit());
    if hashed {
        token.to_ascii_lowercase()
    } else {
        keys::hex(&keys::digest(token))
    }
}

fn carried_row(now: i64, id: String, key: (&str, &str), team: Option<&str>, cost: i64) -> UsageRow {
    UsageRow {
        request_id: id,
        ts: now,
        key_id: key.0.into(),
        key_name: key.1.into(),
        team_id: team.map(Into::into),
        model: CARRIED_MODEL.into(),
        upstream: None,
        upstream_model: None,
        status: 200,
        stream: false,
        input_tokens: 0,
        output_tokens: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        cost_micro: cost,
        priced: true,
        cache: None,
        saved_tokens: 0,
        saved_micro: 0,
        translation: None,
    }
}

/// Maps LiteLLM's teams and keys to Tollgate's records, as of `now`.
pub fn plan(teams: &[LiteTeam], keys: &[LiteKey], now: i64) -> Plan {
    let mut p = Plan::default();
    let mut blocked_teams = Vec::new();
    let mut team_spend = BTreeMap::new();
    for t in teams {
        let name = t.team_alias.clone().unwrap_or_else(|| t.team_id.clone());
        let b = Budgeted {
            what: format!("team {name}"),
            max_budget: t.max_budget,
            duration: t.budget_duration.as_deref(),
            reset_at: t.budget_reset_at,
            spend: t.spend,
        };
        let (budget, spend) = b.read(now, &mut p.notes);
        team_spend.insert(t.team_id.clone(), (name.clone(), spend));
        if t.blocked {
            blocked_teams.push(t.team_id.clone());
        }
        p.teams.push(TeamRecord {
            id: t.team_id.clone(),
            name,
            models: models(&t.models),
            limits: limits(t.tpm_limit, t.rpm_limit, t.max_parallel_requests),
            budget,
            metadata: json!({"imported_from": "litellm"}),
            created_at: now,
            updated_at: now,
            spend_reset_at: 0,
            deleted_at: None,
        });
    }
    for k in keys {
        let digest = digest_of(&k.token);
        let id = digest[..12].to_string();
        let name = k
            .key_alias
            .clone()
            .or_else(|| k.key_name.clone())
            .unwrap_or_else(|| format!("litellm-{id}"));
        let team = k.team_id.clone().filter(|t| {
            let known = team_spend.contains_key(t);
            if !known {
                p.notes.push(format!(
                    "key {name}: team {t} is not in LiteLLM_TeamTable; imported without a team"
                ));
            }
            known
        });
        let b = Budgeted {
            what: format!("key {name}"),
            max_budget: k.max_budget,
            duration: k.budget_duration.as_deref(),
            reset_at: k.budget_reset_at,
            spend: k.spend,
        };
        let (budget, spend) = b.read(now, &mut p.notes);
        let team_blocked = team.as_ref().is_some_and(|t| blocked_teams.contains(t));
        if team_blocked && !k.blocked {
            p.notes.push(format!(
                "key {name}: its team is blocked in LiteLLM; the key is imported blocked"
            ));
        }
        p.carried.push(carried_row(
            now,
            key_row(&id),
            (&id, &name),
            team.as_deref(),
            spend,
        ));
        if let Some((_, left)) = team.as_ref().and_then(|t| team_spend.get_mut(t)) {
            *left -= spend;
        }
        p.keys.push(KeyRecord {
            id,
            name,
            team_id: team,
            digest,
            prefix: k.key_name.clone().unwrap_or_else(|| "sk-...".into()),
            old_digest: None,
            old_valid_until: None,
            models: models(&k.models),
            limits: limits(k.tpm_limit, k.rpm_limit, k.max_parallel_requests),
            budget,
            expires_at: k.expires,
            metadata: json!({"imported_from": "litellm"}),
            blocked: k.blocked || team_blocked,
            created_at: now,
            updated_at: now,
            spend_reset_at: 0,
            deleted_at: None,
        });
    }
    // What a team spent beyond its keys' spend (keys since deleted, or reset apart).
    for (team, (name, left)) in team_spend {
        p.carried.push(carried_row(
            now,
            team_row(&team),
            (
                &team_row(&team),
                &format!("{name} (team spend carried over)"),
            ),
            Some(&team),
            left.max(0),
        ));
    }
    p.carried
        .retain(|r| r.cost_micro > 0 || r.request_id.contains(":key:"));
    p
}

impl Plan {
    /// What `--dry-run` prints: every team and key with what it gets (no digest).
    pub fn describe(&self, now: i64) -> String {
        let mut out = String::new();
        let usd = |m: i64| crate::relay::pricing::usd(m);
        let budget = |b: &Option<BudgetSpec>| {
            b.as_ref().map_or("no budget".to_string(), |b| {
                format!("budget ${} {}", usd(b.max_micro), b.period.as_str())
            })
        };
        let spent = |owner: &str| {
            self.carried
                .iter()
                .find(|r| r.request_id == owner)
                .map_or(0, |r| r.cost_micro)
        };
        let _ = writeln!(out, "teams ({}):", self.teams.len());
        for t in &self.teams {
            let _ = writeln!(
                out,
                "  {}  {}  {}  spent ${}",
                t.id,
                t.name,
                budget(&t.budget),
                usd(spent(&team_row(&t.id)))
            );
        }
        let _ = writeln!(out, "keys ({}):", self.keys.len());
        for k in &self.keys {
            let state = if k.blocked {
                "blocked"
            } else if k.expires_at.is_some_and(|t| t <= now) {
                "expired"
            } else {
                "active"
            };
            let _ = writeln!(
                out,
                "  {}  {}  {}  team {}  {}  spent ${}",
                k.id,
                k.name,
                state,
                k.team_id.as_deref().unwrap_or("-"),
                budget(&k.budget),
                usd(spent(&key_row(&k.id)))
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// Writes the plan into the store at `store_url` (migrated first), replacing what an
    /// earlier run wrote, and tells the other instances sharing it.
    pub fn apply(self, store_url: &str, now: i64) -> Result<(), StoreError> {
        crate::store::prepare(store_url, now, |pool| async move {
            for t in &self.teams {
                keys::save_team(&pool, t).await?;
                let after = json!({"name": t.name, "from": "litellm"});
                keys::audit(
                    &pool,
                    now,
                    "import-litellm-keys",
                    "team.import",
                    ("team", &t.id),
                    None,
                    Some(after),
                )
                .await?;
            }
            for k in &self.keys {
                keys::save_key(&pool, k).await?;
                let after = json!({"name": k.name, "team": k.team_id, "from": "litellm"});
                keys::audit(
                    &pool,
                    now,
                    "import-litellm-keys",
                    "key.import",
                    ("key", &k.id),
                    None,
                    Some(after),
                )
                .await?;
            }
            // Every imported key's and team's row of an earlier run goes, also a team
            // remainder that is zero now.
            let ids: Vec<String> = (self.keys.iter().map(|k| key_row(&k.id)))
                .chain(self.teams.iter().map(|t| team_row(&t.id)))
                .collect();
            crate::store::usage::replace(&pool, &ids, &self.carried).await?;
            keys::announce(&pool, "import").await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_durations_become_calendar_periods() {
        assert_eq!(period(None), (Period::Total, false));
        assert_eq!(period(Some("1d")), (Period::Daily, false));
        assert_eq!(period(Some("24h")), (Period::Daily, false));
        assert_eq!(period(Some("7d")), (Period::Weekly, false));
        assert_eq!(period(Some("1mo")), (Period::Monthly, false));
        assert_eq!(period(Some("30d")), (Period::Monthly, false));
        assert_eq!(period(Some("30s")), (Period::Daily, true));
        assert_eq!(period(Some("10d")), (Period::Weekly, true));
        assert_eq!(period(Some("90d")), (Period::Monthly, true));
    }

    #[test]
    fn a_hashed_token_is_the_digest_and_a_raw_key_is_hashed() {
        let secret = "sk-1234567890abcdef";
        let hashed = keys::hex(&keys::digest(secret));
        assert_eq!(digest_of(&hashed.to_uppercase()), hashed);
        assert_eq!(digest_of(secret), hashed);
    }
}
