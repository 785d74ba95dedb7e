//! `/admin/teams`: create, list, show, change, delete and reset the spend of teams.

use super::keys::*;
use crate::clock::rfc3339;
use crate::config::Config;
use crate::keys::budget::BudgetSpec;
use crate::keys::{self, Directory, Snapshot, StoredTeam, TeamRecord};
use crate::limits::Limits;
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub(super) fn team_view(t: &StoredTeam, members: usize, now: i64) -> Value {
    let r = &t.rec;
    json!({
        "id": r.id,
        "name": r.name,
        "models": r.models,
        "limits": r.limits,
        "budget": r.budget.as_ref().map(|b| budget_view(b, t.budget.as_ref(), now)),
        "metadata": r.metadata,
        "keys": members,
        "created_at": rfc3339(r.created_at),
        "updated_at": rfc3339(r.updated_at),
    })
}

pub(super) fn team_audit(r: &TeamRecord) -> Value {
    json!({
        "name": r.name, "models": r.models, "limits": r.limits,
        "budget": r.budget.as_ref().map(BudgetSpec::to_json), "metadata": r.metadata,
        "deleted": r.deleted_at.is_some(),
    })
}

pub(super) fn apply_team(
    t: &mut TeamRecord,
    body: &Map<String, Value>,
    creating: bool,
) -> Result<(), ApiError> {
    if creating && !body.contains_key("name") {
        return Err(ApiError::invalid("name", "is required"));
    }
    for (field, v) in body {
        match field.as_str() {
            "name" => t.name = name_field("name", v)?,
            "models" => t.models = models_field(v)?,
            "limits" => t.limits = limits_field(v)?,
            "budget" => t.budget = budget_field(v)?,
            "metadata" => t.metadata = metadata_field(v)?,
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown field (expected name, models, limits, budget or metadata)",
                ))
            }
        }
    }
    Ok(())
}

// ---- keys ----

/// Writes a team and its audit row, then rebuilds the directory.
pub(super) async fn commit_team(
    dir: &Directory,
    config: &Config,
    t: TeamRecord,
    action: &'static str,
    now: i64,
    (before, after): (Option<Value>, Option<Value>),
) -> Result<(), ApiError> {
    commit(dir, config, move |pool| async move {
        keys::save_team(&pool, &t).await?;
        keys::audit(
            &pool,
            now,
            "master_key",
            action,
            ("team", &t.id),
            before,
            after,
        )
        .await?;
        keys::announce(&pool, &format!("team:{}", t.id)).await
    })
    .await
}

pub(super) fn members(snap: &Snapshot, team: &str) -> usize {
    snap.keys
        .values()
        .filter(|k| k.rec.deleted_at.is_none() && k.rec.team_id.as_deref() == Some(team))
        .count()
}

pub(super) fn find_team<'a>(snap: &'a Snapshot, id: &str) -> Result<&'a Arc<StoredTeam>, ApiError> {
    snap.team(id).ok_or_else(|| ApiError::not_found("team", id))
}

pub(super) fn list_teams(dir: &Directory) -> Answer {
    let now = dir.now();
    let snap = dir.snapshot();
    let data: Vec<Value> = snap
        .teams
        .values()
        .filter(|t| t.rec.deleted_at.is_none())
        .map(|t| team_view(t, members(&snap, &t.rec.id), now))
        .collect();
    ok(200, json!({"object": "list", "data": data}))
}

pub(super) fn show_team(dir: &Directory, id: &str) -> Answer {
    let snap = dir.snapshot();
    let t = find_team(&snap, id)?;
    ok(200, team_view(t, members(&snap, &t.rec.id), dir.now()))
}

pub(super) fn unique_team_name(
    snap: &Snapshot,
    name: &str,
    except: Option<&str>,
) -> Result<(), ApiError> {
    let taken = snap.teams.values().any(|t| {
        t.rec.deleted_at.is_none() && t.rec.name == name && Some(t.rec.id.as_str()) != except
    });
    if taken {
        return Err(ApiError::invalid(
            "name",
            format!("a team named {name:?} exists"),
        ));
    }
    Ok(())
}

pub(super) async fn create_team(dir: &Directory, config: &Config, body: &[u8]) -> Answer {
    let body = object(body)?;
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let id = keys::random_hex(6)?;
    let mut t = TeamRecord {
        id: id.clone(),
        name: String::new(),
        models: None,
        limits: Limits::default(),
        budget: None,
        metadata: json!({}),
        created_at: now,
        updated_at: now,
        spend_reset_at: 0,
        deleted_at: None,
    };
    apply_team(&mut t, &body, true)?;
    unique_team_name(&dir.snapshot(), &t.name, None)?;
    let after = team_audit(&t);
    commit_team(dir, config, t, "team.create", now, (None, Some(after))).await?;
    let snap = dir.snapshot();
    ok(201, team_view(find_team(&snap, &id)?, 0, now))
}

pub(super) async fn update_team(dir: &Directory, config: &Config, id: &str, body: &[u8]) -> Answer {
    let body = object(body)?;
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let mut t = find_team(&dir.snapshot(), id)?.rec.clone();
    let before = team_audit(&t);
    apply_team(&mut t, &body, false)?;
    unique_team_name(&dir.snapshot(), &t.name, Some(&t.id))?;
    t.updated_at = now;
    let after = team_audit(&t);
    let team_id = t.id.clone();
    commit_team(
        dir,
        config,
        t,
        "team.update",
        now,
        (Some(before), Some(after)),
    )
    .await?;
    let snap = dir.snapshot();
    ok(
        200,
        team_view(find_team(&snap, &team_id)?, members(&snap, &team_id), now),
    )
}

pub(super) async fn delete_team(dir: &Directory, config: &Config, id: &str) -> Answer {
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let snap = dir.snapshot();
    let mut t = find_team(&snap, id)?.rec.clone();
    let n = members(&snap, &t.id);
    if n > 0 {
        return Err(ApiError::new(
            409,
            "team_not_empty",
            format!(
                "team {:?} still has {n} keys: move or delete them first",
                t.name
            ),
        ));
    }
    let before = team_audit(&t);
    t.deleted_at = Some(now);
    t.updated_at = now;
    let team_id = t.id.clone();
    commit_team(dir, config, t, "team.delete", now, (Some(before), None)).await?;
    ok(200, json!({"id": team_id, "deleted": true}))
}

pub(super) async fn reset_team(dir: &Directory, config: &Config, id: &str) -> Answer {
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let mut t = find_team(&dir.snapshot(), id)?.rec.clone();
    t.spend_reset_at = now;
    t.updated_at = now;
    let team_id = t.id.clone();
    commit_team(dir, config, t, "team.reset_spend", now, (None, None)).await?;
    if let Some(b) = dir.live_budget(&keys::owner_id("team", &team_id)) {
        b.reset(now);
    }
    show_team(dir, &team_id)
}

// ---- spend, usage, audit ----
