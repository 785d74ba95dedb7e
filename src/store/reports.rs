//! The report queries of the admin API: spend grouped by key, team, model, upstream or day;
//! usage rows; the audit log. Each reads the usage or audit table over `[from, to)`
//! (milliseconds).

use super::StoreError;
use crate::clock::rfc3339;
use serde_json::{json, Value};
use sqlx::{AnyPool, Row};

/// What spend is grouped by: a column of the usage table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Key,
    Team,
    Model,
    Upstream,
    Day,
}

impl Group {
    fn column(self) -> &'static str {
        match self {
            Group::Key => "key_id",
            Group::Team => "team_id",
            Group::Model => "model",
            Group::Upstream => "upstream",
            Group::Day => "day",
        }
    }
}

/// One group's spend.
#[derive(Debug)]
pub struct SpendRow {
    /// The group's value (a key id, a team id, a model, an upstream, a day).
    pub group: Option<String>,
    /// The last name the key was recorded under.
    pub key_name: Option<String>,
    pub requests: i64,
    pub input: i64,
    pub output: i64,
    pub cached: i64,
    pub cost: i64,
}

/// Spend per group, dearest first.
pub async fn spend(
    pool: &AnyPool,
    group: Group,
    from: i64,
    to: i64,
) -> Result<Vec<SpendRow>, StoreError> {
    let column = group.column();
    let sql = format!(
        "SELECT {column} AS g, MAX(key_name) AS key_name, COUNT(*) AS requests, CAST(SUM(input_tokens) AS BIGINT) AS input, CAST(SUM(output_tokens) AS BIGINT) AS output, CAST(SUM(cached_tokens) AS BIGINT) AS cached, CAST(SUM(cost_micro_usd) AS BIGINT) AS cost
         FROM usage WHERE ts >= $1 AND ts < $2 GROUP BY {column} ORDER BY cost DESC, g"
    );
    let rows = sqlx::query(&sql)
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(SpendRow {
                group: r.try_get("g")?,
                key_name: r.try_get("key_name")?,
                requests: r.try_get("requests")?,
                input: r.try_get("input")?,
                output: r.try_get("output")?,
                cached: r.try_get("cached")?,
                cost: r.try_get("cost")?,
            })
        })
        .collect()
}

/// Usage rows, newest first, at most `limit`, optionally of one key or one request.
pub async fn usage(
    pool: &AnyPool,
    (from, to): (i64, i64),
    limit: i64,
    key: Option<String>,
    request_id: Option<String>,
) -> Result<Vec<Value>, StoreError> {
    let mut sql = String::from(
        "SELECT request_id, ts, key_id, key_name, team_id, model, upstream, upstream_model, status, stream, input_tokens, output_tokens, cached_tokens, cost_micro_usd, priced, cache, saved_tokens, saved_micro_usd, translation, cache_write_tokens, reasoning_tokens FROM usage WHERE ts >= $1 AND ts < $2",
    );
    let filters = [("key_id", key), ("request_id", request_id)];
    let mut n = 3;
    for (column, _) in filters.iter().filter(|(_, v)| v.is_some()) {
        n += 1;
        sql.push_str(&format!(" AND {column} = ${n}"));
    }
    sql.push_str(" ORDER BY ts DESC LIMIT $3");
    let mut q = sqlx::query(&sql).bind(from).bind(to).bind(limit);
    for value in filters.into_iter().filter_map(|(_, v)| v) {
        q = q.bind(value);
    }
    let rows = q.fetch_all(pool).await?;
    rows.iter()
        .map(|r| {
            Ok(json!({
                "request_id": r.try_get::<String, _>("request_id")?,
                "time": rfc3339(r.try_get::<i64, _>("ts")?),
                "key_id": r.try_get::<String, _>("key_id")?,
                "key_name": r.try_get::<String, _>("key_name")?,
                "team_id": r.try_get::<Option<String>, _>("team_id")?,
                "model": r.try_get::<String, _>("model")?,
                "upstream": r.try_get::<Option<String>, _>("upstream")?,
                "upstream_model": r.try_get::<Option<String>, _>("upstream_model")?,
                "status": r.try_get::<i64, _>("status")?,
                "stream": r.try_get::<i64, _>("stream")? != 0,
                "input_tokens": r.try_get::<i64, _>("input_tokens")?,
                "output_tokens": r.try_get::<i64, _>("output_tokens")?,
                "cached_tokens": r.try_get::<i64, _>("cached_tokens")?,
                "cache_write_tokens": r.try_get::<i64, _>("cache_write_tokens")?,
                "reasoning_tokens": r.try_get::<i64, _>("reasoning_tokens")?,
                "cost_micro_usd": r.try_get::<i64, _>("cost_micro_usd")?,
                "priced": r.try_get::<i64, _>("priced")? != 0,
                "cache": r.try_get::<Option<String>, _>("cache")?,
                "saved_tokens": r.try_get::<i64, _>("saved_tokens")?,
                "saved_micro_usd": r.try_get::<i64, _>("saved_micro_usd")?,
                "translation": r.try_get::<Option<String>, _>("translation")?,
            }))
        })
        .collect()
}

/// Audit rows, newest first, at most `limit`.
pub async fn audit(
    pool: &AnyPool,
    (from, to): (i64, i64),
    limit: i64,
) -> Result<Vec<Value>, StoreError> {
    let rows = sqlx::query(
        "SELECT ts, actor, action, object_type, object_id, before_json, after_json FROM audit WHERE ts >= $1 AND ts < $2 ORDER BY ts DESC LIMIT $3",
    )
    .bind(from)
    .bind(to)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str::<Value>(&s).ok());
    rows.iter()
        .map(|r| {
            Ok(json!({
                "time": rfc3339(r.try_get::<i64, _>("ts")?),
                "actor": r.try_get::<String, _>("actor")?,
                "action": r.try_get::<String, _>("action")?,
                "object_type": r.try_get::<String, _>("object_type")?,
                "object_id": r.try_get::<String, _>("object_id")?,
                "before": parse(r.try_get("before_json")?),
                "after": parse(r.try_get("after_json")?),
            }))
        })
        .collect()
}
