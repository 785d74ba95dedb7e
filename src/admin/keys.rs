//! The admin API for keys (`/admin/keys`), its routing for teams (`teams`) and the
//! reports (`reports`, `/admin/spend`, `/admin/usage`, `/admin/audit`), and the key's own
//! `/v1/key/info`. Every change is written to the store (with its audit row) before the
//! directory the request path reads is rebuilt; reads never show a secret or a digest.

use super::reply;
use crate::clock::{parse_time, rfc3339};
use crate::config::Config;
use crate::keys::budget::{Budget, BudgetSpec};
use crate::keys::{self, Directory, KeyRecord, Snapshot, StoredKey};
use crate::limits::Limits;
use crate::relay::pricing::usd;
use crate::store::StoreError;
use http::Response;
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub(super) use super::fields::*;
pub(super) use super::reports::*;
pub(super) use super::teams::*;

/// An API error: status, message, and the field it is about.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    message: String,
    pub(super) param: Option<String>,
    code: &'static str,
}

impl ApiError {
    pub(super) fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        let param = param.into();
        ApiError {
            status: 400,
            message: format!("{param}: {}", message.into()),
            param: Some(param),
            code: "invalid_value",
        }
    }

    pub(super) fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    pub(super) fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::new(404, "not_found", format!("no {what} with id {id:?}"))
    }

    pub fn response(&self) -> Response<Vec<u8>> {
        let kind = match self.status {
            401 => "authentication_error",
            404 => "not_found_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }});
        reply(
            self.status,
            "application/json",
            body.to_string().into_bytes(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        log::error!("admin: store error: {e}");
        ApiError::new(503, "store_unavailable", format!("the store failed: {e}"))
    }
}

pub(super) type Answer = Result<Response<Vec<u8>>, ApiError>;

pub(super) fn ok(status: u16, v: Value) -> Answer {
    Ok(reply(
        status,
        "application/json",
        v.to_string().into_bytes(),
    ))
}

/// One admin request for these endpoints.
pub struct Call<'a> {
    pub method: &'a http::Method,
    /// After `/admin`.
    pub path: &'a str,
    pub query: &'a str,
    pub body: &'a [u8],
}

/// The query parameter `name`, percent-decoded.
pub(super) fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| super::percent_decode(&v.replace('+', " ")))
    })
}

/// Whether this module serves `path` (after `/admin`).
pub fn serves(path: &str) -> bool {
    ["/keys", "/teams", "/spend", "/usage", "/audit"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

pub async fn handle(dir: &Directory, config: &Config, call: Call<'_>) -> Response<Vec<u8>> {
    match route(dir, config, call).await {
        Ok(r) => r,
        Err(e) => e.response(),
    }
}

pub(super) async fn route(dir: &Directory, config: &Config, call: Call<'_>) -> Answer {
    use http::Method;
    let parts: Vec<&str> = call.path.trim_matches('/').split('/').collect();
    let m = call.method;
    match (parts.as_slice(), m) {
        (["keys"], &Method::GET) => list_keys(dir, config, call.query),
        (["keys"], &Method::POST) => create_key(dir, config, call.body).await,
        (["keys", id], &Method::GET) => show_key(dir, config, id),
        (["keys", id], &Method::PATCH) => update_key(dir, config, id, call.body).await,
        (["keys", id], &Method::DELETE) => delete_key(dir, config, id).await,
        (["keys", id, "rotate"], &Method::POST) => rotate_key(dir, config, id, call.body).await,
        (["keys", id, "reset_spend"], &Method::POST) => reset_key(dir, config, id).await,
        (["teams"], &Method::GET) => list_teams(dir),
        (["teams"], &Method::POST) => create_team(dir, config, call.body).await,
        (["teams", id], &Method::GET) => show_team(dir, id),
        (["teams", id], &Method::PATCH) => update_team(dir, config, id, call.body).await,
        (["teams", id], &Method::DELETE) => delete_team(dir, config, id).await,
        (["teams", id, "reset_spend"], &Method::POST) => reset_team(dir, config, id).await,
        (["spend"], &Method::GET) => spend(dir, call.query).await,
        (["usage"], &Method::GET) => usage(dir, call.query).await,
        (["audit"], &Method::GET) => audit_log(dir, call.query).await,
        (["keys" | "teams" | "spend" | "usage" | "audit", ..], _) => Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{m} is not allowed on /admin{}", call.path),
        )),
        _ => Err(ApiError::new(404, "not_found", "not found")),
    }
}

// ---- views ----

pub(super) fn budget_view(spec: &BudgetSpec, live: Option<&Arc<Budget>>, now: i64) -> Value {
    let mut v = spec.to_json();
    if let Some(b) = live {
        let f = b.figures(now);
        v["spend_usd"] = usd(f.spent_micro).into();
        v["reserved_usd"] = usd(f.reserved_micro).into();
        v["resets_at"] = f.resets_at.map(rfc3339).into();
    }
    v
}

pub(super) fn key_view(k: &StoredKey, now: i64) -> Value {
    let r = &k.rec;
    json!({
        "id": r.id,
        "name": r.name,
        "source": "api",
        "team": k.team.as_ref().map(|t| json!({"id": t.rec.id, "name": t.rec.name})),
        "prefix": r.prefix,
        "models": r.models,
        "limits": r.limits,
        "budget": r.budget.as_ref().map(|b| budget_view(b, k.budget.as_ref(), now)),
        "expires_at": r.expires_at.map(rfc3339),
        "metadata": r.metadata,
        "blocked": r.blocked,
        "rotated_secret_valid_until": r.old_valid_until.filter(|t| *t > now).map(rfc3339),
        "created_at": rfc3339(r.created_at),
        "updated_at": rfc3339(r.updated_at),
    })
}

/// A key of the config file, as the API lists it (read-only).
pub(super) fn config_key_view(dir: &Directory, k: &crate::keys::auth::KeyInfo, now: i64) -> Value {
    let budget = k.budget.as_ref().map(|spec| {
        let live = dir.config_budget(&k.name, spec);
        budget_view(spec, Some(&live), now)
    });
    json!({
        "id": keys::owner_id("config", &k.name),
        "name": k.name,
        "source": "config",
        "read_only": true,
        "models": k.models,
        "limits": k.limits,
        "budget": budget,
        "blocked": false,
    })
}

/// The audit form of a key: what the API shows, never a secret or digest.
pub(super) fn key_audit(r: &KeyRecord) -> Value {
    json!({
        "name": r.name, "team": r.team_id, "models": r.models, "limits": r.limits,
        "budget": r.budget.as_ref().map(BudgetSpec::to_json),
        "expires_at": r.expires_at.map(rfc3339), "metadata": r.metadata, "blocked": r.blocked,
        "deleted": r.deleted_at.is_some(),
    })
}

// ---- fields ----

/// Applies the fields of `body` to `k`; `creating` requires `name`.
pub(super) fn apply_key(
    k: &mut KeyRecord,
    body: &Map<String, Value>,
    snap: &Snapshot,
    now: i64,
    creating: bool,
) -> Result<(), ApiError> {
    if creating && !body.contains_key("name") {
        return Err(ApiError::invalid("name", "is required"));
    }
    if body.contains_key("expires_at") && body.contains_key("expires_in") {
        return Err(ApiError::invalid(
            "expires_in",
            "give expires_at or expires_in, not both",
        ));
    }
    for (field, v) in body {
        match field.as_str() {
            "name" => k.name = name_field("name", v)?,
            "team" => k.team_id = team_ref(snap, v)?,
            "models" => k.models = models_field(v)?,
            "limits" => k.limits = limits_field(v)?,
            "budget" => k.budget = budget_field(v)?,
            "expires_at" if v.is_null() => k.expires_at = None,
            "expires_at" => {
                let s: String = typed("expires_at", v)?;
                k.expires_at = Some(parse_time(&s).ok_or_else(|| {
                    ApiError::invalid("expires_at", "expected an RFC 3339 time like 2027-01-01T00:00:00Z")
                })?);
            }
            "expires_in" if v.is_null() => k.expires_at = None,
            "expires_in" => k.expires_at = Some(now + duration_field("expires_in", v)?),
            "metadata" => k.metadata = metadata_field(v)?,
            "blocked" => k.blocked = typed("blocked", v)?,
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown field (expected name, team, models, limits, budget, expires_at, expires_in, metadata or blocked)",
                ))
            }
        }
    }
    Ok(())
}

pub(super) fn page(query: &str) -> Result<(usize, usize), ApiError> {
    let num = |name: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match param(query, name) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    ApiError::invalid(name, format!("expected a whole number up to {max}"))
                }),
        }
    };
    Ok((num("limit", 100, 1000)?, num("offset", 0, usize::MAX)?))
}

pub(super) fn list_keys(dir: &Directory, config: &Config, query: &str) -> Answer {
    let now = dir.now();
    let snap = dir.snapshot();
    let (limit, offset) = page(query)?;
    let team =
        match param(query, "team") {
            Some(t) => Some(snap.team(&t).map(|t| t.rec.id.clone()).ok_or_else(|| {
                ApiError::invalid("team", format!("no team with id or name {t:?}"))
            })?),
            None => None,
        };
    let search = param(query, "search").map(|s| s.to_lowercase());
    let mut all: Vec<Value> = Vec::new();
    if team.is_none() {
        let mut config_keys: Vec<&crate::keys::auth::KeyInfo> = config.keys.infos().collect();
        config_keys.sort_by(|a, b| a.name.cmp(&b.name));
        all.extend(
            config_keys
                .into_iter()
                .filter(|k| {
                    search
                        .as_ref()
                        .is_none_or(|s| k.name.to_lowercase().contains(s))
                })
                .map(|k| config_key_view(dir, k, now)),
        );
    }
    all.extend(
        snap.keys
            .values()
            .filter(|k| k.rec.deleted_at.is_none())
            .filter(|k| team.is_none() || k.rec.team_id == team)
            .filter(|k| {
                search.as_ref().is_none_or(|s| {
                    k.rec.name.to_lowercase().contains(s)
                        || k.team
                            .as_ref()
                            .is_some_and(|t| t.rec.name.to_lowercase().contains(s))
                })
            })
            .map(|k| key_view(k, now)),
    );
    let total = all.len();
    let data: Vec<Value> = all.into_iter().skip(offset).take(limit).collect();
    ok(
        200,
        json!({"object": "list", "data": data, "total": total, "limit": limit, "offset": offset}),
    )
}

pub(super) fn find_key<'a>(snap: &'a Snapshot, id: &str) -> Result<&'a Arc<StoredKey>, ApiError> {
    snap.keys
        .get(id)
        .filter(|k| k.rec.deleted_at.is_none())
        .ok_or_else(|| ApiError::not_found("key", id))
}

pub(super) fn read_only(id: &str) -> Result<(), ApiError> {
    if id.starts_with("config:") {
        return Err(ApiError::new(
            409,
            "read_only",
            "keys from the config file are read-only through the API: edit the config file and reload",
        ));
    }
    Ok(())
}

pub(super) fn show_key(dir: &Directory, config: &Config, id: &str) -> Answer {
    let now = dir.now();
    if let Some(name) = id.strip_prefix("config:") {
        return match config.keys.infos().find(|k| *k.name == *name) {
            Some(k) => ok(200, config_key_view(dir, k, now)),
            None => Err(ApiError::not_found("key", id)),
        };
    }
    let snap = dir.snapshot();
    ok(200, key_view(find_key(&snap, id)?, now))
}

/// Writes a change (record and audit row), then rebuilds the directory.
pub(super) async fn commit<F, Fut>(
    dir: &Directory,
    config: &Config,
    write: F,
) -> Result<(), ApiError>
where
    F: FnOnce(sqlx::AnyPool) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
{
    dir.store.run(write).await?;
    dir.refresh(config.keys.budgets()).await?;
    Ok(())
}

/// Writes a key and its audit row (`before`, `after`), then rebuilds the directory.
pub(super) async fn commit_key(
    dir: &Directory,
    config: &Config,
    k: KeyRecord,
    action: &'static str,
    now: i64,
    (before, after): (Option<Value>, Option<Value>),
) -> Result<(), ApiError> {
    commit(dir, config, move |pool| async move {
        keys::save_key(&pool, &k).await?;
        keys::audit(
            &pool,
            now,
            "master_key",
            action,
            ("key", &k.id),
            before,
            after,
        )
        .await?;
        keys::announce(&pool, &format!("key:{}", k.id)).await
    })
    .await
}

pub(super) async fn create_key(dir: &Directory, config: &Config, body: &[u8]) -> Answer {
    let body = object(body)?;
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let id = keys::random_hex(6)?;
    let (secret, digest, prefix) = keys::new_secret(&id)?;
    let mut k = KeyRecord {
        id: id.clone(),
        name: String::new(),
        team_id: None,
        digest,
        prefix,
        old_digest: None,
        old_valid_until: None,
        models: None,
        limits: Limits::default(),
        budget: None,
        expires_at: None,
        metadata: json!({}),
        blocked: false,
        created_at: now,
        updated_at: now,
        spend_reset_at: 0,
        deleted_at: None,
    };
    apply_key(&mut k, &body, &dir.snapshot(), now, true)?;
    not_a_config_key_name(config, &k.name)?;
    let after = key_audit(&k);
    commit_key(dir, config, k, "key.create", now, (None, Some(after))).await?;
    let snap = dir.snapshot();
    let mut v = key_view(find_key(&snap, &id)?, now);
    v["key"] = secret.into();
    log::info!("admin: key {id} created");
    ok(201, v)
}

pub(super) async fn update_key(dir: &Directory, config: &Config, id: &str, body: &[u8]) -> Answer {
    read_only(id)?;
    let body = object(body)?;
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let mut k = find_key(&dir.snapshot(), id)?.rec.clone();
    let before = key_audit(&k);
    apply_key(&mut k, &body, &dir.snapshot(), now, false)?;
    not_a_config_key_name(config, &k.name)?;
    k.updated_at = now;
    let after = key_audit(&k);
    let key_id = k.id.clone();
    commit_key(
        dir,
        config,
        k,
        "key.update",
        now,
        (Some(before), Some(after)),
    )
    .await?;
    let snap = dir.snapshot();
    ok(200, key_view(find_key(&snap, &key_id)?, now))
}

pub(super) async fn delete_key(dir: &Directory, config: &Config, id: &str) -> Answer {
    read_only(id)?;
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let mut k = find_key(&dir.snapshot(), id)?.rec.clone();
    let before = key_audit(&k);
    k.deleted_at = Some(now);
    k.updated_at = now;
    let key_id = k.id.clone();
    commit_key(dir, config, k, "key.delete", now, (Some(before), None)).await?;
    log::info!("admin: key {key_id} deleted");
    ok(200, json!({"id": key_id, "deleted": true}))
}

pub(super) async fn rotate_key(dir: &Directory, config: &Config, id: &str, body: &[u8]) -> Answer {
    read_only(id)?;
    let body = object(body)?;
    let mut grace = 0;
    for (field, v) in &body {
        match field.as_str() {
            "grace_period" if !v.is_null() => grace = duration_field("grace_period", v)?,
            "grace_period" => {}
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown field (expected grace_period)",
                ))
            }
        }
    }
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let mut k = find_key(&dir.snapshot(), id)?.rec.clone();
    let (secret, digest, prefix) = keys::new_secret(&k.id)?;
    // The old digest is kept (valid for the grace period, if any) so that a client
    // still sending it is told the key was rotated rather than that it never existed.
    k.old_digest = Some(k.digest.clone());
    k.old_valid_until = Some(now + grace);
    k.digest = digest;
    k.prefix = prefix;
    k.updated_at = now;
    let key_id = k.id.clone();
    let note = json!({"grace_period_ms": grace});
    commit_key(dir, config, k, "key.rotate", now, (None, Some(note))).await?;
    let snap = dir.snapshot();
    let mut v = key_view(find_key(&snap, &key_id)?, now);
    v["key"] = secret.into();
    log::info!("admin: key {key_id} rotated");
    ok(200, v)
}

pub(super) async fn reset_key(dir: &Directory, config: &Config, id: &str) -> Answer {
    read_only(id)?;
    let _one_at_a_time = dir.writes.lock().await;
    let now = dir.now();
    let mut k = find_key(&dir.snapshot(), id)?.rec.clone();
    k.spend_reset_at = now;
    k.updated_at = now;
    let key_id = k.id.clone();
    commit_key(dir, config, k, "key.reset_spend", now, (None, None)).await?;
    if let Some(b) = dir.live_budget(&keys::owner_id("key", &key_id)) {
        b.reset(now);
    }
    let snap = dir.snapshot();
    ok(200, key_view(find_key(&snap, &key_id)?, now))
}

// ---- teams ----
