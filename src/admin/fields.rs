//! Reading the fields of an admin request's JSON body: each error names its field.

use super::keys::*;
use crate::config::file::BudgetSection;
use crate::config::Config;
use crate::keys::budget::BudgetSpec;
use crate::keys::Snapshot;
use crate::limits::Limits;
use serde_json::{json, Map, Value};

pub(super) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
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

pub(super) fn typed<T: serde::de::DeserializeOwned>(field: &str, v: &Value) -> Result<T, ApiError> {
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

pub(super) fn name_field(field: &str, v: &Value) -> Result<String, ApiError> {
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
pub(super) fn invisible(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{180E}'
    )
}

/// Refuses a stored key's name that a config key has: the two would be told apart in the
/// console, logs and reports only by their ids.
pub(super) fn not_a_config_key_name(config: &Config, name: &str) -> Result<(), ApiError> {
    if config.keys.infos().any(|k| *k.name == *name) {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} is the name of a key in the config file"),
        ));
    }
    Ok(())
}

pub(super) fn models_field(v: &Value) -> Result<Option<Vec<String>>, ApiError> {
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
pub(super) struct ApiLimits {
    rps: Option<u64>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    concurrency: Option<u64>,
}

pub(super) fn limits_field(v: &Value) -> Result<Limits, ApiError> {
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

pub(super) fn budget_field(v: &Value) -> Result<Option<BudgetSpec>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let b: BudgetSection = typed("budget", v)?;
    crate::config::budget_spec(&b)
        .map(Some)
        .map_err(|(field, message)| ApiError::invalid(format!("budget.{field}"), message))
}

pub(super) fn metadata_field(v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::Null => Ok(json!({})),
        Value::Object(_) if v.to_string().len() <= 16 * 1024 => Ok(v.clone()),
        Value::Object(_) => Err(ApiError::invalid("metadata", "at most 16 KiB of JSON")),
        _ => Err(ApiError::invalid("metadata", "expected a JSON object")),
    }
}

pub(super) fn duration_field(field: &str, v: &Value) -> Result<i64, ApiError> {
    let s: String = typed(field, v)?;
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        ApiError::invalid(field, format!("expected a duration like 30d or 12h: {e}"))
    })?;
    i64::try_from(d.as_millis())
        .ok()
        .filter(|ms| *ms > 0 && *ms <= 100 * 366 * 86_400_000)
        .ok_or_else(|| ApiError::invalid(field, "expected a duration from 1ms to 100 years"))
}

pub(super) fn team_ref(snap: &Snapshot, v: &Value) -> Result<Option<String>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let t: String = typed("team", v)?;
    snap.team(&t)
        .map(|t| Some(t.rec.id.clone()))
        .ok_or_else(|| ApiError::invalid("team", format!("no team with id or name {t:?}")))
}
