//! The keys, teams and audit tables: each row as the database holds it (JSON columns as
//! text), written and read here; `keys` turns rows into the records it serves from. The
//! change announcements (PostgreSQL `NOTIFY`) that let other instances re-read them are
//! sent here too.

use super::{Dialect, StoreError};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use std::collections::HashMap;

/// A `keys` row.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub team_id: Option<String>,
    pub digest: String,
    pub prefix: String,
    pub old_digest: Option<String>,
    pub old_valid_until: Option<i64>,
    /// JSON.
    pub models: Option<String>,
    /// JSON.
    pub limits: Option<String>,
    /// JSON.
    pub budget: Option<String>,
    pub expires_at: Option<i64>,
    /// JSON.
    pub metadata: Option<String>,
    pub blocked: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub spend_reset_at: i64,
    pub deleted_at: Option<i64>,
}

/// A `teams` row.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamRow {
    pub id: String,
    pub name: String,
    /// JSON.
    pub models: Option<String>,
    /// JSON.
    pub limits: Option<String>,
    /// JSON.
    pub budget: Option<String>,
    /// JSON.
    pub metadata: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub spend_reset_at: i64,
    pub deleted_at: Option<i64>,
}

fn key_row(row: &AnyRow) -> Result<KeyRow, StoreError> {
    Ok(KeyRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        team_id: row.try_get("team_id")?,
        digest: row.try_get("digest")?,
        prefix: row.try_get("prefix")?,
        old_digest: row.try_get("old_digest")?,
        old_valid_until: row.try_get("old_valid_until")?,
        models: row.try_get("models")?,
        limits: row.try_get("limits")?,
        budget: row.try_get("budget")?,
        expires_at: row.try_get("expires_at")?,
        metadata: row.try_get("metadata")?,
        blocked: row.try_get::<i64, _>("blocked")? != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        spend_reset_at: row.try_get("spend_reset_at")?,
        deleted_at: row.try_get("deleted_at")?,
    })
}

fn team_row(row: &AnyRow) -> Result<TeamRow, StoreError> {
    Ok(TeamRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        models: row.try_get("models")?,
        limits: row.try_get("limits")?,
        budget: row.try_get("budget")?,
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        spend_reset_at: row.try_get("spend_reset_at")?,
        deleted_at: row.try_get("deleted_at")?,
    })
}

/// Every key row, deleted ones included.
pub async fn keys(pool: &AnyPool) -> Result<Vec<KeyRow>, StoreError> {
    sqlx::query("SELECT * FROM keys")
        .fetch_all(pool)
        .await?
        .iter()
        .map(key_row)
        .collect()
}

/// Every team row, deleted ones included.
pub async fn teams(pool: &AnyPool) -> Result<Vec<TeamRow>, StoreError> {
    sqlx::query("SELECT * FROM teams")
        .fetch_all(pool)
        .await?
        .iter()
        .map(team_row)
        .collect()
}

/// Writes a key row (insert or replace).
pub async fn save_key(pool: &AnyPool, k: &KeyRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO keys (id, name, team_id, digest, prefix, old_digest, old_valid_until, models, limits, budget, expires_at, metadata, blocked, created_at, updated_at, spend_reset_at, deleted_at)
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)
         ON CONFLICT (id) DO UPDATE SET name=$2, team_id=$3, digest=$4, prefix=$5, old_digest=$6, old_valid_until=$7, models=$8, limits=$9, budget=$10, expires_at=$11, metadata=$12, blocked=$13, updated_at=$15, spend_reset_at=$16, deleted_at=$17",
    )
    .bind(k.id.clone())
    .bind(k.name.clone())
    .bind(k.team_id.clone())
    .bind(k.digest.clone())
    .bind(k.prefix.clone())
    .bind(k.old_digest.clone())
    .bind(k.old_valid_until)
    .bind(k.models.clone())
    .bind(k.limits.clone())
    .bind(k.budget.clone())
    .bind(k.expires_at)
    .bind(k.metadata.clone())
    .bind(i64::from(k.blocked))
    .bind(k.created_at)
    .bind(k.updated_at)
    .bind(k.spend_reset_at)
    .bind(k.deleted_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Writes a team row (insert or replace).
pub async fn save_team(pool: &AnyPool, t: &TeamRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO teams (id, name, models, limits, budget, metadata, created_at, updated_at, spend_reset_at, deleted_at)
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)
         ON CONFLICT (id) DO UPDATE SET name=$2, models=$3, limits=$4, budget=$5, metadata=$6, updated_at=$8, spend_reset_at=$9, deleted_at=$10",
    )
    .bind(t.id.clone())
    .bind(t.name.clone())
    .bind(t.models.clone())
    .bind(t.limits.clone())
    .bind(t.budget.clone())
    .bind(t.metadata.clone())
    .bind(t.created_at)
    .bind(t.updated_at)
    .bind(t.spend_reset_at)
    .bind(t.deleted_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// What usage rows since `from` (ms) cost, summed per value of `column` (`key_id` or
/// `team_id`).
pub async fn spend_since(
    pool: &AnyPool,
    column: Column,
    from: i64,
) -> Result<HashMap<String, i64>, StoreError> {
    let sql = match column {
        Column::Key => "SELECT key_id AS id, CAST(COALESCE(SUM(cost_micro_usd), 0) AS BIGINT) AS s FROM usage WHERE ts >= $1 AND key_id IS NOT NULL GROUP BY key_id",
        Column::Team => "SELECT team_id AS id, CAST(COALESCE(SUM(cost_micro_usd), 0) AS BIGINT) AS s FROM usage WHERE ts >= $1 AND team_id IS NOT NULL GROUP BY team_id",
    };
    let mut sums = HashMap::new();
    for row in sqlx::query(sql).bind(from).fetch_all(pool).await? {
        sums.insert(row.try_get::<String, _>("id")?, row.try_get::<i64, _>("s")?);
    }
    Ok(sums)
}

/// The usage column a budget's owner is found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Column {
    Key,
    Team,
}

/// The PostgreSQL channel on which a change to keys or teams is announced to every
/// instance sharing the database.
pub const CHANGES: &str = "tollgate_keys";

/// Tells the other instances that keys or teams changed (PostgreSQL `NOTIFY`; a SQLite
/// store has no other instance to tell).
pub async fn announce(pool: &AnyPool, what: &str) -> Result<(), StoreError> {
    if Dialect::of(pool) == Dialect::Postgres {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES)
            .bind(what.to_string())
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// An audit row: who changed what, before and after (secrets and digests never).
pub async fn audit(
    pool: &AnyPool,
    ts: i64,
    actor: &str,
    action: &str,
    object: (&str, &str),
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (ts, actor, action, object_type, object_id, before_json, after_json) VALUES ($1,$2,$3,$4,$5,$6,$7)",
    )
    .bind(ts)
    .bind(actor.to_string())
    .bind(action.to_string())
    .bind(object.0.to_string())
    .bind(object.1.to_string())
    .bind(before.map(|v| v.to_string()))
    .bind(after.map(|v| v.to_string()))
    .execute(pool)
    .await?;
    Ok(())
}

/// Listens on [`CHANGES`] at the PostgreSQL store `url`: signals `changed` on every
/// notification, and once per (re)connect, since what was announced while not listening
/// is lost. Retries every second; returns when `changed` is closed.
pub async fn listen(url: String, changed: tokio::sync::mpsc::Sender<()>) {
    let mut failing = false;
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(CHANGES).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match listener.await {
            Ok(mut l) => {
                if failing {
                    log::info!("store: listening for key changes again");
                }
                // What was announced while not listening was lost: re-read.
                let _ = changed.try_send(());
                loop {
                    match l.try_recv().await {
                        // `None`: the connection dropped and will be made again.
                        Ok(Some(_)) | Ok(None) => {
                            if changed.try_send(()).is_err() && changed.is_closed() {
                                return;
                            }
                        }
                        Err(e) => {
                            log::warn!(
                                "store: key change notifications stopped ({}); retrying",
                                crate::secret::mask_userinfo(&e.to_string())
                            );
                            failing = true;
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if !failing {
                    log::warn!(
                        "store: cannot listen for key changes ({}); retrying every second, and keys are re-read every store.refresh_interval",
                        crate::secret::mask_userinfo(&e.to_string())
                    );
                }
                failing = true;
            }
        }
        if changed.is_closed() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
