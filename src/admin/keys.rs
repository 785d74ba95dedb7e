//! The admin API for keys, teams, spend, usage and the audit log (`/admin/keys`,
//! `/admin/teams`, `/admin/spend`, `/admin/usage`, `/admin/audit`), and the key's own
//! `/v1/key/info`. Every change is written to the store (with its audit row) before the
//! directory the request path reads is rebuilt; reads never show a secret or a digest.

use super::reply;
use crate::clock::{parse_time, rfc3339};
use crate::config::file::BudgetSection;
use crate::config::Config;
use crate::keys::auth::Caller;
use crate::keys::budget::{Budget, BudgetSpec};
use crate::keys::{self, Directory, KeyRecord, Snapshot, StoredKey, StoredTeam, TeamRecord};
use crate::limits::Limits;
use crate::relay::pricing::usd;
use crate::store::StoreError;
use http::Response;
use serde_json::{json, Map, Value};
use sqlx::Row;
use std::sync::Arc;

/// An API error: status, message, and the field it is about.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    message: String,
    param: Option<String>,
    code: &'static str,
}

impl ApiError {
    fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        let param = param.into();
        ApiError {
            status: 400,
            message: format!("{param}: {}", message.into()),
            param: Some(param),
            code: "invalid_value",
        }
    }

    fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    fn not_found(what: &str, id: &str) -> ApiError {
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

type Answer = Result<Response<Vec<u8>>, ApiError>;

fn ok(status: u16, v: Value) -> Answer {
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
fn param(query: &str, name: &str) -> Option<String> {
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

async fn route(dir: &Directory, config: &Config, call: Call<'_>) -> Answer {
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

fn budget_view(spec: &BudgetSpec, live: Option<&Arc<Budget>>, now: i64) -> Value {
    let mut v = spec.to_json();
    if let Some(b) = live {
        let f = b.figures(now);
        v["spend_usd"] = usd(f.spent_micro).into();
        v["reserved_usd"] = usd(f.reserved_micro).into();
        v["resets_at"] = f.resets_at.map(rfc3339).into();
    }
    v
}

fn key_view(k: &StoredKey, now: i64) -> Value {
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
fn config_key_view(dir: &Directory, k: &crate::keys::auth::KeyInfo, now: i64) -> Value {
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

fn team_view(t: &StoredTeam, members: usize, now: i64) -> Value {
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

/// The audit form of a key: what the API shows, never a secret or digest.
fn key_audit(r: &KeyRecord) -> Value {
    json!({
        "name": r.name, "team": r.team_id, "models": r.models, "limits": r.limits,
        "budget": r.budget.as_ref().map(BudgetSpec::to_json),
        "expires_at": r.expires_at.map(rfc3339), "metadata": r.metadata, "blocked": r.blocked,
        "deleted": r.deleted_at.is_some(),
    })
}

fn team_audit(r: &TeamRecord) -> Value {
    json!({
        "name": r.name, "models": r.models, "limits": r.limits,
        "budget": r.budget.as_ref().map(BudgetSpec::to_json), "metadata": r.metadata,
        "deleted": r.deleted_at.is_some(),
    })
}

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
                "id": keys::owner_id("config", &k.name), "name": k.name, "team": null,
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

// ---- fields ----

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            400,
            "invalid_json",
            "the body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            400,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

fn typed<T: serde::de::DeserializeOwned>(field: &str, v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." || inner.is_empty() {
            field.to_string()
        } else {
            format!("{field}.{inner}")
        };
        let message = e.into_inner().to_string();
        // serde's "unknown field `x`, expected ..." already names the field.
        ApiError::invalid(path, message)
    })
}

fn name_field(field: &str, v: &Value) -> Result<String, ApiError> {
    let s: String = typed(field, v)?;
    let s = s.trim().to_string();
    if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_control() || invisible(c)) {
        return Err(ApiError::invalid(
            field,
            "expected a name of 1 to 256 printable characters (no control, bidirectional or zero-width characters)",
        ));
    }
    Ok(s)
}

/// Characters that change how a name reads without being seen: bidirectional controls
/// (which can reverse a name on screen), zero-width characters and the byte-order mark.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{180E}'
    )
}

/// Refuses a stored key's name that a config key has: the two would be told apart in the
/// console, logs and reports only by their ids.
fn not_a_config_key_name(config: &Config, name: &str) -> Result<(), ApiError> {
    if config.keys.infos().any(|k| k.name == name) {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} is the name of a key in the config file"),
        ));
    }
    Ok(())
}

fn models_field(v: &Value) -> Result<Option<Vec<String>>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let list: Vec<String> = typed("models", v)?;
    if list.iter().any(|m| m.trim().is_empty()) {
        return Err(ApiError::invalid("models", "names must not be empty"));
    }
    Ok(Some(list))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiLimits {
    rps: Option<u64>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    concurrency: Option<u64>,
}

fn limits_field(v: &Value) -> Result<Limits, ApiError> {
    if v.is_null() {
        return Ok(Limits::default());
    }
    let l: ApiLimits = typed("limits", v)?;
    for (name, value) in [
        ("rps", l.rps),
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("concurrency", l.concurrency),
    ] {
        if value.is_some_and(|n| n > crate::limits::MAX_COUNT) {
            return Err(ApiError::invalid(
                format!("limits.{name}"),
                format!("must be at most {}", crate::limits::MAX_COUNT),
            ));
        }
    }
    Ok(Limits {
        rps: l.rps,
        rpm: l.rpm,
        tpm: l.tpm,
        concurrency: l.concurrency,
    })
}

fn budget_field(v: &Value) -> Result<Option<BudgetSpec>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let b: BudgetSection = typed("budget", v)?;
    crate::config::budget_spec(&b)
        .map(Some)
        .map_err(|(field, message)| ApiError::invalid(format!("budget.{field}"), message))
}

fn metadata_field(v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::Null => Ok(json!({})),
        Value::Object(_) if v.to_string().len() <= 16 * 1024 => Ok(v.clone()),
        Value::Object(_) => Err(ApiError::invalid("metadata", "at most 16 KiB of JSON")),
        _ => Err(ApiError::invalid("metadata", "expected a JSON object")),
    }
}

fn duration_field(field: &str, v: &Value) -> Result<i64, ApiError> {
    let s: String = typed(field, v)?;
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        ApiError::invalid(field, format!("expected a duration like 30d or 12h: {e}"))
    })?;
    i64::try_from(d.as_millis())
        .ok()
        .filter(|ms| *ms > 0 && *ms <= 100 * 366 * 86_400_000)
        .ok_or_else(|| ApiError::invalid(field, "expected a duration from 1ms to 100 years"))
}

fn team_ref(snap: &Snapshot, v: &Value) -> Result<Option<String>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let t: String = typed("team", v)?;
    snap.team(&t)
        .map(|t| Some(t.rec.id.clone()))
        .ok_or_else(|| ApiError::invalid("team", format!("no team with id or name {t:?}")))
}

/// Applies the fields of `body` to `k`; `creating` requires `name`.
fn apply_key(
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

fn apply_team(
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

fn page(query: &str) -> Result<(usize, usize), ApiError> {
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

fn list_keys(dir: &Directory, config: &Config, query: &str) -> Answer {
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

fn find_key<'a>(snap: &'a Snapshot, id: &str) -> Result<&'a Arc<StoredKey>, ApiError> {
    snap.keys
        .get(id)
        .filter(|k| k.rec.deleted_at.is_none())
        .ok_or_else(|| ApiError::not_found("key", id))
}

fn read_only(id: &str) -> Result<(), ApiError> {
    if id.starts_with("config:") {
        return Err(ApiError::new(
            409,
            "read_only",
            "keys from the config file are read-only through the API: edit the config file and reload",
        ));
    }
    Ok(())
}

fn show_key(dir: &Directory, config: &Config, id: &str) -> Answer {
    let now = dir.now();
    if let Some(name) = id.strip_prefix("config:") {
        return match config.keys.infos().find(|k| k.name == name) {
            Some(k) => ok(200, config_key_view(dir, k, now)),
            None => Err(ApiError::not_found("key", id)),
        };
    }
    let snap = dir.snapshot();
    ok(200, key_view(find_key(&snap, id)?, now))
}

/// Writes a change (record and audit row), then rebuilds the directory.
async fn commit<F, Fut>(dir: &Directory, config: &Config, write: F) -> Result<(), ApiError>
where
    F: FnOnce(sqlx::AnyPool) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
{
    dir.store.run(write).await?;
    dir.refresh(config.keys.budgets()).await?;
    Ok(())
}

/// Writes a key and its audit row (`before`, `after`), then rebuilds the directory.
async fn commit_key(
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

/// Writes a team and its audit row, then rebuilds the directory.
async fn commit_team(
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

async fn create_key(dir: &Directory, config: &Config, body: &[u8]) -> Answer {
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

async fn update_key(dir: &Directory, config: &Config, id: &str, body: &[u8]) -> Answer {
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

async fn delete_key(dir: &Directory, config: &Config, id: &str) -> Answer {
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

async fn rotate_key(dir: &Directory, config: &Config, id: &str, body: &[u8]) -> Answer {
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

async fn reset_key(dir: &Directory, config: &Config, id: &str) -> Answer {
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

fn members(snap: &Snapshot, team: &str) -> usize {
    snap.keys
        .values()
        .filter(|k| k.rec.deleted_at.is_none() && k.rec.team_id.as_deref() == Some(team))
        .count()
}

fn find_team<'a>(snap: &'a Snapshot, id: &str) -> Result<&'a Arc<StoredTeam>, ApiError> {
    snap.team(id).ok_or_else(|| ApiError::not_found("team", id))
}

fn list_teams(dir: &Directory) -> Answer {
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

fn show_team(dir: &Directory, id: &str) -> Answer {
    let snap = dir.snapshot();
    let t = find_team(&snap, id)?;
    ok(200, team_view(t, members(&snap, &t.rec.id), dir.now()))
}

fn unique_team_name(snap: &Snapshot, name: &str, except: Option<&str>) -> Result<(), ApiError> {
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

async fn create_team(dir: &Directory, config: &Config, body: &[u8]) -> Answer {
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

async fn update_team(dir: &Directory, config: &Config, id: &str, body: &[u8]) -> Answer {
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

async fn delete_team(dir: &Directory, config: &Config, id: &str) -> Answer {
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

async fn reset_team(dir: &Directory, config: &Config, id: &str) -> Answer {
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

/// `from` and `to` of a query, as milliseconds (`to` exclusive; a date means its whole day).
/// Refuses a query parameter a report does not take (400 naming it), so that a filter
/// the client believes applied is never silently ignored.
fn only(query: &str, known: &[&str]) -> Result<(), ApiError> {
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
fn range(query: &str) -> Result<(i64, i64), ApiError> {
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
fn at_time(name: &str, v: &str, end: bool) -> Result<i64, ApiError> {
    let t = parse_time(v).ok_or_else(|| {
        ApiError::invalid(name, "expected a date (2026-12-01) or an RFC 3339 time")
    })?;
    let whole_day = end && v.trim().len() == 10;
    Ok(if whole_day { t + 86_400_000 } else { t })
}

async fn spend(dir: &Directory, query: &str) -> Answer {
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

fn spend_csv(group: &str, data: &[Value]) -> String {
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
fn csv_cell(s: &str) -> String {
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

async fn usage(dir: &Directory, query: &str) -> Answer {
    only(query, &["from", "to", "since", "until", "limit", "key"])?;
    let (from, to) = range(query)?;
    let (limit, _) = page(query)?;
    let key = param(query, "key");
    let rows = dir
        .store
        .run(move |pool| async move {
            let mut sql = String::from(
                "SELECT request_id, ts, key_id, key_name, team_id, model, upstream, upstream_model, status, stream, input_tokens, output_tokens, cached_tokens, cost_micro_usd, priced, cache, saved_tokens, saved_micro_usd FROM usage WHERE ts >= $1 AND ts < $2",
            );
            if key.is_some() {
                sql.push_str(" AND key_id = $4");
            }
            sql.push_str(" ORDER BY ts DESC LIMIT $3");
            let mut q = sqlx::query(&sql).bind(from).bind(to).bind(limit as i64);
            if let Some(k) = key {
                q = q.bind(k);
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
                        "cost_micro_usd": r.try_get::<i64, _>("cost_micro_usd")?,
                        "priced": r.try_get::<i64, _>("priced")? != 0,
                        "cache": r.try_get::<Option<String>, _>("cache")?,
                        "saved_tokens": r.try_get::<i64, _>("saved_tokens")?,
                        "saved_micro_usd": r.try_get::<i64, _>("saved_micro_usd")?,
                    }))
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await?;
    ok(200, json!({"object": "list", "data": rows}))
}

async fn audit_log(dir: &Directory, query: &str) -> Answer {
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
