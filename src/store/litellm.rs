//! A LiteLLM proxy's database, read for `tollgate import-litellm-keys`: its teams
//! (`LiteLLM_TeamTable`) and virtual keys (`LiteLLM_VerificationToken`), in one read-only
//! transaction so that keys and teams are read as of one moment. Nothing is written there.

use super::StoreError;
use crate::secret::mask_userinfo;
use sqlx::{Connection, Row};

/// A LiteLLM team.
#[derive(Debug, Clone, PartialEq)]
pub struct LiteTeam {
    pub team_id: String,
    pub team_alias: Option<String>,
    pub models: Vec<String>,
    pub max_budget: Option<f64>,
    pub spend: f64,
    pub budget_duration: Option<String>,
    /// Milliseconds since the epoch, UTC.
    pub budget_reset_at: Option<i64>,
    pub tpm_limit: Option<i64>,
    pub rpm_limit: Option<i64>,
    pub max_parallel_requests: Option<i64>,
    pub blocked: bool,
}

/// A LiteLLM virtual key: `token` is the SHA-256 hex of the whole key.
#[derive(Debug, Clone, PartialEq)]
pub struct LiteKey {
    pub token: String,
    pub key_name: Option<String>,
    pub key_alias: Option<String>,
    pub team_id: Option<String>,
    pub models: Vec<String>,
    pub max_budget: Option<f64>,
    pub spend: f64,
    pub budget_duration: Option<String>,
    pub budget_reset_at: Option<i64>,
    pub expires: Option<i64>,
    pub tpm_limit: Option<i64>,
    pub rpm_limit: Option<i64>,
    pub max_parallel_requests: Option<i64>,
    pub blocked: bool,
}

/// A timestamp column (Prisma writes UTC without a zone) as milliseconds since the epoch.
fn ms(column: &str) -> String {
    format!("CAST(EXTRACT(EPOCH FROM \"{column}\") * 1000 AS BIGINT) AS \"{column}\"")
}

/// Reads every team and key of the LiteLLM database at `url` (`postgres://...`).
pub async fn read(url: &str) -> Result<(Vec<LiteTeam>, Vec<LiteKey>), StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError(
            "--from: expected LiteLLM's PostgreSQL URL (postgres://user:password@host/db; the value is not shown)".into(),
        ));
    }
    let mut conn = sqlx::PgConnection::connect(url).await.map_err(|e| {
        StoreError(format!(
            "LiteLLM's database: {}",
            mask_userinfo(&e.to_string())
        ))
    })?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let teams_sql = format!(
        "SELECT team_id, team_alias, COALESCE(models, ARRAY[]::TEXT[]) AS models, max_budget, spend, budget_duration, {}, tpm_limit, rpm_limit, CAST(max_parallel_requests AS BIGINT) AS max_parallel_requests, blocked FROM \"LiteLLM_TeamTable\" ORDER BY team_id",
        ms("budget_reset_at")
    );
    let teams = sqlx::query(&teams_sql)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| table_error("LiteLLM_TeamTable", e))?
        .iter()
        .map(|r| {
            Ok(LiteTeam {
                team_id: r.try_get("team_id")?,
                team_alias: r.try_get("team_alias")?,
                models: r.try_get("models")?,
                max_budget: r.try_get("max_budget")?,
                spend: r.try_get("spend")?,
                budget_duration: r.try_get("budget_duration")?,
                budget_reset_at: r.try_get("budget_reset_at")?,
                tpm_limit: r.try_get("tpm_limit")?,
                rpm_limit: r.try_get("rpm_limit")?,
                max_parallel_requests: r.try_get("max_parallel_requests")?,
                blocked: r.try_get("blocked")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let keys_sql = format!(
        "SELECT token, key_name, key_alias, team_id, COALESCE(models, ARRAY[]::TEXT[]) AS models, max_budget, spend, budget_duration, {}, {}, tpm_limit, rpm_limit, CAST(max_parallel_requests AS BIGINT) AS max_parallel_requests, COALESCE(blocked, false) AS blocked FROM \"LiteLLM_VerificationToken\" ORDER BY token",
        ms("budget_reset_at"),
        ms("expires")
    );
    let keys = sqlx::query(&keys_sql)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| table_error("LiteLLM_VerificationToken", e))?
        .iter()
        .map(|r| {
            Ok(LiteKey {
                token: r.try_get("token")?,
                key_name: r.try_get("key_name")?,
                key_alias: r.try_get("key_alias")?,
                team_id: r.try_get("team_id")?,
                models: r.try_get("models")?,
                max_budget: r.try_get("max_budget")?,
                spend: r.try_get("spend")?,
                budget_duration: r.try_get("budget_duration")?,
                budget_reset_at: r.try_get("budget_reset_at")?,
                expires: r.try_get("expires")?,
                tpm_limit: r.try_get("tpm_limit")?,
                rpm_limit: r.try_get("rpm_limit")?,
                max_parallel_requests: r.try_get("max_parallel_requests")?,
                blocked: r.try_get("blocked")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    tx.rollback().await?;
    Ok((teams, keys))
}

fn table_error(table: &str, e: sqlx::Error) -> StoreError {
    StoreError(format!(
        "LiteLLM's database: reading \"{table}\": {}",
        mask_userinfo(&e.to_string())
    ))
}
