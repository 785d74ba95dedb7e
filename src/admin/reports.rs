//! The reports: `/admin/spend` (by key, team, model, upstream or day; JSON or CSV),
//! `/admin/usage` (usage rows) and `/admin/audit` (every admin change).

use super::keys::*;
use super::reply;
use crate::clock::{parse_time, rfc3339};
use crate::keys::Directory;
use crate::relay::pricing::usd;
use crate::store::reports::{self, Group, SpendRow};
use serde_json::{json, Value};

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
    let by = match group.as_str() {
        "key" => Group::Key,
        "team" => Group::Team,
        "model" => Group::Model,
        "upstream" => Group::Upstream,
        "day" => Group::Day,
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
    let rows = dir
        .store
        .run(move |pool| async move { reports::spend(&pool, by, from, to).await })
        .await?;
    let snap = dir.snapshot();
    let data: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let SpendRow {
                group: g,
                key_name,
                requests,
                input,
                output,
                cached,
                cost,
            } = row;
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
            reports::usage(&pool, (from, to), limit as i64, key, request_id).await
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
        .run(move |pool| async move { reports::audit(&pool, (from, to), limit as i64).await })
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
