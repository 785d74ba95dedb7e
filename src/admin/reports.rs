//! The reports: `/admin/spend` (by key, team, model, upstream or day; JSON or CSV),
//! `/admin/usage` (usage rows) and `/admin/audit` (every admin change).

use super::keys::*;
use super::reply;
use crate::clock::{parse_time, rfc3339};
use crate::keys::Directory;
use crate::relay::pricing::usd;
use crate::store::StoreError;
use serde_json::{json, Value};
use sqlx::Row;

/// `from` and `to` of a query, as milliseconds (`to` exclusive; a date means its whole day).
/// Refuses a query parameter a report does not take (400 naming it), so that a filter
/// the client believes applied is never silently ignored.
pub(super) fn only(query: &str, known: &[&str]) -> Result<(), ApiError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !known.contains(&name) {
            let name = super::percent_decode(name);
            return Err(ApiError::invalid(
                name.chars().take(64).collect::<String>(),
                format!("unknown parameter; this report takes {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The time range of a report: `from` (or its alias `since`) and `to` (or `until`).
pub(super) fn range(query: &str) -> Result<(i64, i64), ApiError> {
    let at = |name: &str, alias: &str, end: bool| -> Result<Option<i64>, ApiError> {
        let v = match (param(query, name), param(query, alias)) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    alias,
                    format!("is another name for {name}: send one of them"),
                ))
            }
            (Some(v), None) => v,
            (None, Some(v)) => return at_time(alias, &v, end).map(Some),
            (None, None) => return Ok(None),
        };
        at_time(name, &v, end).map(Some)
    };
    let from = at("from", "since", false)?.unwrap_or(0);
    let to = at("to", "until", true)?.unwrap_or(i64::MAX);
    if from > to {
        return Err(ApiError::invalid("from", "must not be after to"));
    }
    Ok((from, to))
}

/// A report's time bound: a date, or an RFC 3339 time; a bare date as an end includes
/// that day.
pub(super) fn at_time(name: &str, v: &str, end: bool) -> Result<i64, ApiError> {
    let t = parse_time(v).ok_or_else(|| {
        ApiError::invalid(name, "expected a date (2026-12-01) or an RFC 3339 time")
    })?;
    let whole_day = end && v.trim().len() == 10;
    Ok(if whole_day { t + 86_400_000 } else { t })
}

pub(super) async fn spend(dir: &Directory, query: &str) -> Answer {
    only(
        query,
        &["group_by", "format", "from", "to", "since", "until"],
    )?;
    let group = param(query, "group_by").unwrap_or_else(|| "key".into());
    let column = match group.as_str() {
        "key" => "key_id",
        "team" => "team_id",
        "model" => "model",
        "upstream" => "upstream",
        "day" => "day",
        _ => {
            return Err(ApiError::invalid(
                "group_by",
                "expected key, team, model, upstream or day",
            ))
        }
    };
    let csv = match param(query, "format").as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::invalid("format", "expected json or csv")),
    };
    let (from, to) = range(query)?;
    let sql = format!(
        "SELECT {column} AS g, MAX(key_name) AS key_name, COUNT(*) AS requests, CAST(SUM(input_tokens) AS BIGINT) AS input, CAST(SUM(output_tokens) AS BIGINT) AS output, CAST(SUM(cached_tokens) AS BIGINT) AS cached, CAST(SUM(cost_micro_usd) AS BIGINT) AS cost
         FROM usage WHERE ts >= $1 AND ts < $2 GROUP BY {column} ORDER BY cost DESC, g"
    );
    let rows = dir
        .store
        .run(move |pool| async move {
            let rows = sqlx::query(&sql)
                .bind(from)
                .bind(to)
                .fetch_all(&pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get::<Option<String>, _>("g")?,
                        r.try_get::<Option<String>, _>("key_name")?,
                        r.try_get::<i64, _>("requests")?,
                        r.try_get::<i64, _>("input")?,
                        r.try_get::<i64, _>("output")?,
                        r.try_get::<i64, _>("cached")?,
                        r.try_get::<i64, _>("cost")?,
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await?;
    let snap = dir.snapshot();
    let data: Vec<Value> = rows
        .into_iter()
        .map(|(g, key_name, requests, input, output, cached, cost)| {
            let mut v = json!({
                "requests": requests,
                "input_tokens": input,
                "output_tokens": output,
                "cached_tokens": cached,
                "spend_micro_usd": cost,
                "spend_usd": usd(cost),
            });
            match group.as_str() {
                "key" => {
                    let name = g
                        .as_deref()
                        .and_then(|id| snap.keys.get(id))
                        .map(|k| k.rec.name.clone())
                        .or(key_name);
                    v["key_id"] = g.into();
                    v["key_name"] = name.into();
                }
                "team" => {
                    let name = g
                        .as_deref()
                        .and_then(|id| snap.teams.get(id))
                        .map(|t| t.rec.name.clone());
                    v["team_id"] = g.into();
                    v["team_name"] = name.into();
                }
                other => v[other] = g.into(),
            }
            v
        })
        .collect();
    if csv {
        return Ok(reply(
            200,
            "text/csv; charset=utf-8",
            spend_csv(&group, &data).into_bytes(),
        ));
    }
    ok(
        200,
        json!({"object": "list", "group_by": group, "from": (from > 0).then(|| rfc3339(from)), "to": (to < i64::MAX).then(|| rfc3339(to)), "data": data}),
    )
}

pub(super) fn spend_csv(group: &str, data: &[Value]) -> String {
    let heads: Vec<&str> = match group {
        "key" => vec!["key_id", "key_name"],
        "team" => vec!["team_id", "team_name"],
        other => vec![other],
    };
    let tail = [
        "requests",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "spend_micro_usd",
        "spend_usd",
    ];
    let mut out = heads
        .iter()
        .chain(&tail)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in data {
        let cells: Vec<String> = heads
            .iter()
            .chain(&tail)
            .map(|h| match &row[*h] {
                Value::String(s) => csv_cell(s),
                Value::Null => String::new(),
                v => v.to_string(),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// A CSV cell, quoted when needed, and never read as a formula by a spreadsheet: a cell
/// that starts with `=`, `+`, `-`, `@`, a tab or a carriage return (which some
/// spreadsheets skip before reading a formula) gets a leading `'`.
pub(super) fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

pub(super) async fn usage(dir: &Directory, query: &str) -> Answer {
    only(
        query,
        &["from", "to", "since", "until", "limit", "key", "request_id"],
    )?;
    let (from, to) = range(query)?;
    let (limit, _) = page(query)?;
    let key = param(query, "key");
    let request_id = param(query, "request_id");
    let rows = dir
        .store
        .run(move |pool| async move {
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
            let mut q = sqlx::query(&sql).bind(from).bind(to).bind(limit as i64);
            for value in filters.into_iter().filter_map(|(_, v)| v) {
                q = q.bind(value);
            }
            let rows = q.fetch_all(&pool).await?;
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
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await?;
    ok(200, json!({"object": "list", "data": rows}))
}

pub(super) async fn audit_log(dir: &Directory, query: &str) -> Answer {
    only(query, &["from", "to", "since", "until", "limit"])?;
    let (limit, _) = page(query)?;
    let (from, to) = range(query)?;
    let rows = dir
        .store
        .run(move |pool| async move {
            let rows = sqlx::query(
                "SELECT ts, actor, action, object_type, object_id, before_json, after_json FROM audit WHERE ts >= $1 AND ts < $2 ORDER BY ts DESC LIMIT $3",
            )
            .bind(from)
            .bind(to)
            .bind(limit as i64)
            .fetch_all(&pool)
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
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await?;
    ok(200, json!({"object": "list", "data": rows}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a model name (which a client key allowed `*` controls) starting with
    /// a tab reached the spreadsheet as a formula.
    #[test]
    fn a_csv_cell_starting_with_a_tab_or_carriage_return_is_not_a_formula() {
        for bad in ["=1+1", "+1", "-1", "@SUM(A1)", "\t=1+1", "\r=1+1"] {
            let cell = csv_cell(bad);
            assert!(
                cell.starts_with('\'') || cell.starts_with("\"'"),
                "{bad:?} -> {cell:?}"
            );
        }
        assert_eq!(csv_cell("gpt-4o"), "gpt-4o");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("\r=1"), "\"'\r=1\"");
    }

    #[test]
    fn report_parameters_are_known_or_refused() {
        assert!(only("from=1&to=2", &["from", "to"]).is_ok());
        assert!(only("", &["from"]).is_ok());
        let e = only("from=1&sinse=2", &["from", "to"]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("sinse"));
        let (from, to) = range("since=2026-01-01&until=2026-01-01").unwrap();
        assert_eq!(to - from, 86_400_000);
    }
}
