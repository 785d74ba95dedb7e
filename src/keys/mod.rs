//! Keys and teams managed at run time: their records in the store, and the in-memory
//! directory the request path reads (no I/O, one atomic load). Every change made through
//! the admin API is written to the store first, then the directory is rebuilt from it, so
//! memory never holds what the database does not.
//!
//! A key's secret is `tg-<id>-<32 hex digits>`; only its SHA-256 digest is stored (with
//! a short prefix to show). Budgets (`budget`) live here too: one live [`Budget`] per key,
//! team or budgeted config key, kept across rebuilds and config reloads.

pub(crate) mod auth;

pub mod alerts;
pub mod budget;
pub mod digests;
pub mod follow;
pub mod info;
pub mod reserve;

use crate::clock::Clock;
use crate::limits::Limits;
use crate::store::records::{self, Column, KeyRow, TeamRow};
use crate::store::{Store, StoreError};
use arc_swap::ArcSwap;
use budget::{Budget, BudgetSpec, Mode, Owner, Period};
use sha2::{Digest, Sha256};
use sqlx::AnyPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;

/// A stored key, as in the database (the digests never leave this module's users).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub team_id: Option<String>,
    pub digest: String,
    pub prefix: String,
    /// The secret before the last rotation, valid until `old_valid_until`.
    pub old_digest: Option<String>,
    pub old_valid_until: Option<i64>,
    pub models: Option<Vec<String>>,
    pub limits: Limits,
    pub budget: Option<BudgetSpec>,
    pub expires_at: Option<i64>,
    pub metadata: serde_json::Value,
    pub blocked: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub spend_reset_at: i64,
    pub deleted_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TeamRecord {
    pub id: String,
    pub name: String,
    pub models: Option<Vec<String>>,
    pub limits: Limits,
    pub budget: Option<BudgetSpec>,
    pub metadata: serde_json::Value,
    pub created_at: i64,
    pub updated_at: i64,
    pub spend_reset_at: i64,
    pub deleted_at: Option<i64>,
}

/// A stored key with what it needs on the request path.
#[derive(Debug)]
pub struct StoredKey {
    pub rec: KeyRecord,
    /// `rec.id` and `rec.name`, shared with every request's record and usage row.
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub team: Option<Arc<StoredTeam>>,
    pub budget: Option<Arc<Budget>>,
}

#[derive(Debug)]
pub struct StoredTeam {
    pub rec: TeamRecord,
    /// `rec.id`, shared with every request's record and usage row.
    pub id: Arc<str>,
    pub budget: Option<Arc<Budget>>,
}

pub use crate::error::Rejected;

struct Entry {
    key: Arc<StoredKey>,
    /// The secret from before a rotation.
    previous: bool,
}

/// What the request path reads: every stored key by digest, every team.
#[derive(Default)]
pub struct Snapshot {
    by_digest: HashMap<[u8; 32], Entry, foldhash::fast::RandomState>,
    pub keys: BTreeMap<String, Arc<StoredKey>>,
    pub teams: BTreeMap<String, Arc<StoredTeam>>,
}

impl Snapshot {
    /// The key whose digest is `d`, or why it is refused.
    pub fn find_digest(&self, d: &[u8; 32], now: i64) -> Result<Arc<StoredKey>, Rejected> {
        let (stored, entry) = self.by_digest.get_key_value(d).ok_or(Rejected::Unknown)?;
        if !bool::from(stored.ct_eq(d)) {
            return Err(Rejected::Unknown);
        }
        let k = &entry.key;
        if k.rec.deleted_at.is_some() {
            return Err(Rejected::Deleted);
        }
        if entry.previous && k.rec.old_valid_until.is_none_or(|t| now >= t) {
            return Err(Rejected::Rotated);
        }
        if k.rec.blocked {
            return Err(Rejected::Blocked);
        }
        if k.rec.expires_at.is_some_and(|t| now >= t) {
            return Err(Rejected::Expired);
        }
        if k.team.as_ref().is_some_and(|t| t.rec.deleted_at.is_some()) {
            return Err(Rejected::Blocked);
        }
        Ok(Arc::clone(k))
    }

    /// A team by id or name (not deleted).
    pub fn team(&self, id_or_name: &str) -> Option<&Arc<StoredTeam>> {
        self.teams
            .get(id_or_name)
            .or_else(|| self.teams.values().find(|t| t.rec.name == id_or_name))
            .filter(|t| t.rec.deleted_at.is_none())
    }
}

pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Random hex digits from the operating system's source.
pub fn random_hex(bytes: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf)
        .map_err(|e| StoreError(format!("no randomness from the system: {e}")))?;
    Ok(hex(&buf))
}

/// A new secret for key `id`: the secret, its digest (hex) and the prefix to show.
pub fn new_secret(id: &str) -> Result<(String, String, String), StoreError> {
    let secret = format!("tg-{id}-{}", random_hex(16)?);
    let prefix = format!("{}...", &secret[..secret.len().min(id.len() + 7)]);
    Ok((secret.clone(), hex(&digest(&secret)), prefix))
}

/// A budget as the database keeps it: integers of micro-USD.
pub fn budget_to_db(b: &BudgetSpec) -> String {
    serde_json::json!({
        "max_micro_usd": b.max_micro,
        "period": b.period.as_str(),
        "mode": b.mode.as_str(),
        "alert_at": b.alert_at,
    })
    .to_string()
}

fn budget_from_db(s: &str) -> Option<BudgetSpec> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    Some(BudgetSpec {
        max_micro: v["max_micro_usd"].as_i64()?,
        period: serde_json::from_value::<Period>(v["period"].clone()).ok()?,
        mode: serde_json::from_value::<Mode>(v["mode"].clone()).unwrap_or_default(),
        alert_at: serde_json::from_value(v["alert_at"].clone()).unwrap_or_default(),
    })
}

/// A JSON column's value (`None`: NULL).
fn json_col<T: serde::de::DeserializeOwned>(
    col: &str,
    text: Option<&str>,
) -> Result<Option<T>, StoreError> {
    text.map(|t| serde_json::from_str(t).map_err(|e| StoreError(format!("column {col}: {e}"))))
        .transpose()
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// What keys and teams both keep in JSON columns: models, limits, budget, metadata.
type Grants = (
    Option<Vec<String>>,
    Limits,
    Option<BudgetSpec>,
    serde_json::Value,
);

/// The shared JSON columns of a row (`models`, `limits`, `budget`, `metadata`), read.
fn read_grants(columns: [&Option<String>; 4]) -> Result<Grants, StoreError> {
    let [models, limits, budget, metadata] = columns.map(Option::as_deref);
    Ok((
        json_col("models", models)?,
        json_col("limits", limits)?.unwrap_or_default(),
        budget.and_then(budget_from_db),
        json_col("metadata", metadata)?.unwrap_or(serde_json::Value::Null),
    ))
}

/// The shared JSON columns, written in the order [`read_grants`] reads them.
fn write_grants(
    models: &Option<Vec<String>>,
    limits: &Limits,
    budget: &Option<BudgetSpec>,
    metadata: &serde_json::Value,
) -> [Option<String>; 4] {
    [
        models.as_ref().map(to_json),
        Some(to_json(limits)),
        budget.as_ref().map(budget_to_db),
        Some(to_json(metadata)),
    ]
}

impl KeyRecord {
    fn from_row(r: KeyRow) -> Result<KeyRecord, StoreError> {
        let (models, limits, budget, metadata) =
            read_grants([&r.models, &r.limits, &r.budget, &r.metadata])?;
        Ok(KeyRecord {
            models,
            limits,
            budget,
            metadata,
            id: r.id,
            name: r.name,
            team_id: r.team_id,
            digest: r.digest,
            prefix: r.prefix,
            old_digest: r.old_digest,
            old_valid_until: r.old_valid_until,
            expires_at: r.expires_at,
            blocked: r.blocked,
            created_at: r.created_at,
            updated_at: r.updated_at,
            spend_reset_at: r.spend_reset_at,
            deleted_at: r.deleted_at,
        })
    }

    fn row(&self) -> KeyRow {
        let [models, limits, budget, metadata] =
            write_grants(&self.models, &self.limits, &self.budget, &self.metadata);
        KeyRow {
            id: self.id.clone(),
            name: self.name.clone(),
            team_id: self.team_id.clone(),
            digest: self.digest.clone(),
            prefix: self.prefix.clone(),
            old_digest: self.old_digest.clone(),
            old_valid_until: self.old_valid_until,
            models,
            limits,
            budget,
            expires_at: self.expires_at,
            metadata,
            blocked: self.blocked,
            created_at: self.created_at,
            updated_at: self.updated_at,
            spend_reset_at: self.spend_reset_at,
            deleted_at: self.deleted_at,
        }
    }
}

impl TeamRecord {
    fn from_row(r: TeamRow) -> Result<TeamRecord, StoreError> {
        let (models, limits, budget, metadata) =
            read_grants([&r.models, &r.limits, &r.budget, &r.metadata])?;
        Ok(TeamRecord {
            models,
            limits,
            budget,
            metadata,
            id: r.id,
            name: r.name,
            created_at: r.created_at,
            updated_at: r.updated_at,
            spend_reset_at: r.spend_reset_at,
            deleted_at: r.deleted_at,
        })
    }

    fn row(&self) -> TeamRow {
        let [models, limits, budget, metadata] =
            write_grants(&self.models, &self.limits, &self.budget, &self.metadata);
        TeamRow {
            id: self.id.clone(),
            name: self.name.clone(),
            models,
            limits,
            budget,
            metadata,
            created_at: self.created_at,
            updated_at: self.updated_at,
            spend_reset_at: self.spend_reset_at,
            deleted_at: self.deleted_at,
        }
    }
}

/// Writes a key record (insert or replace).
pub async fn save_key(pool: &AnyPool, k: &KeyRecord) -> Result<(), StoreError> {
    records::save_key(pool, &k.row()).await
}

/// Writes a team record (insert or replace).
pub async fn save_team(pool: &AnyPool, t: &TeamRecord) -> Result<(), StoreError> {
    records::save_team(pool, &t.row()).await
}

pub use crate::store::records::{announce, audit};

/// Everything the directory is built from: records, and the spend already counted in
/// the current period of each budget not yet live in memory.
pub struct Loaded {
    pub keys: Vec<KeyRecord>,
    pub teams: Vec<TeamRecord>,
    pub spent: HashMap<String, i64>,
}

/// Budget owner names: `key:ID`, `team:ID`, `config:NAME`.
pub fn owner_id(scope: &str, id: &str) -> String {
    // By hand: a config key's id is made for each of its requests, and `format!` cost
    // 700 instructions.
    let mut s = String::with_capacity(scope.len() + 1 + id.len());
    s.push_str(scope);
    s.push(':');
    s.push_str(id);
    s
}

/// Reads every key and team, and sums the current period's spend of the budgets in
/// `wanted` that `live` does not hold yet.
pub async fn load(
    pool: AnyPool,
    now: i64,
    live: HashSet<String>,
    config_budgets: Vec<(String, BudgetSpec)>,
) -> Result<Loaded, StoreError> {
    let keys = records::keys(&pool)
        .await?
        .into_iter()
        .map(KeyRecord::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let teams = records::teams(&pool)
        .await?
        .into_iter()
        .map(TeamRecord::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let mut spent = HashMap::new();
    let mut wanted = Vec::new();
    for k in keys.iter().filter(|k| k.deleted_at.is_none()) {
        if let Some(b) = &k.budget {
            let owner = owner_id("key", &k.id);
            if !live.contains(&owner) {
                let from = Budget::counts_from(b, k.spend_reset_at, now);
                wanted.push((Column::Key, owner, k.id.clone(), from));
            }
        }
    }
    for t in teams.iter().filter(|t| t.deleted_at.is_none()) {
        if let Some(b) = &t.budget {
            let owner = owner_id("team", &t.id);
            if !live.contains(&owner) {
                let from = Budget::counts_from(b, t.spend_reset_at, now);
                wanted.push((Column::Team, owner, t.id.clone(), from));
            }
        }
    }
    for (name, b) in config_budgets {
        let owner = owner_id("config", &name);
        if !live.contains(&owner) {
            let from = Budget::counts_from(&b, 0, now);
            wanted.push((Column::Key, owner.clone(), owner, from));
        }
    }
    // One grouped query per owner column and period start, however many budgets share
    // them (every daily key budget without a reset of its own: one query).
    let mut by_start: BTreeMap<(Column, i64), Vec<(String, String)>> = BTreeMap::new();
    for (column, owner, id, from) in wanted {
        by_start
            .entry((column, from))
            .or_default()
            .push((owner, id));
    }
    for ((column, from), owners) in by_start {
        let sums = records::spend_since(&pool, column, from).await?;
        for (owner, id) in owners {
            let s = sums.get(&id).copied().unwrap_or(0);
            spent.insert(owner, s);
        }
    }
    Ok(Loaded { keys, teams, spent })
}

/// The live directory of stored keys and teams, and every budget's live figures.
pub struct Directory {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    snapshot: ArcSwap<Snapshot>,
    budgets: Mutex<HashMap<String, Arc<Budget>>>,
    /// Spend read from the store for config keys' budgets not made yet.
    config_spend: Mutex<HashMap<String, i64>>,
    /// Admin writes one at a time, so a rebuild never races another change.
    pub writes: tokio::sync::Mutex<()>,
    /// Digests of keys that authenticated recently.
    digests: digests::Digests,
}

impl Directory {
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> Directory {
        Directory {
            store,
            clock,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            budgets: Mutex::new(HashMap::new()),
            config_spend: Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            digests: digests::Digests::default(),
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    fn budgets(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Budget>>> {
        self.budgets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The owners whose budgets are live in memory.
    pub fn live_budgets(&self) -> HashSet<String> {
        self.budgets().keys().cloned().collect()
    }

    /// The live budget of `owner`, made (with `spent` already counted) or respecified.
    fn budget(
        &self,
        owner: Owner,
        key: String,
        spec: &BudgetSpec,
        spent: Option<i64>,
        reset_at: i64,
    ) -> Arc<Budget> {
        let now = self.now();
        let mut budgets = self.budgets();
        if let Some(b) = budgets.get(&key) {
            if b.figures(now).spec != *spec {
                b.respec(spec.clone(), now);
            }
            // A reset made through another instance.
            if reset_at > b.reset_at(now) {
                b.reset(reset_at);
            }
            // Spend recorded in the store by every instance (a periodic re-read).
            if let Some(spent) = spent {
                b.raise(spent, now);
            }
            return Arc::clone(b);
        }
        let b = Arc::new(Budget::new(
            owner,
            spec.clone(),
            spent.unwrap_or(0),
            reset_at,
            now,
        ));
        budgets.insert(key, Arc::clone(&b));
        b
    }

    /// The live budget of a key or team record (none when it has none or is deleted).
    #[allow(clippy::too_many_arguments)]
    fn live_for(
        &self,
        scope: &'static str,
        id: &str,
        name: &str,
        spec: Option<&BudgetSpec>,
        deleted_at: Option<i64>,
        reset_at: i64,
        spent: &HashMap<String, i64>,
    ) -> Option<Arc<Budget>> {
        let spec = spec.filter(|_| deleted_at.is_none())?;
        let owner = Owner {
            scope,
            id: id.to_string(),
            name: name.to_string(),
        };
        let key = owner_id(scope, id);
        let already = spent.get(&key).copied();
        Some(self.budget(owner, key, spec, already, reset_at))
    }

    /// Installs what `load` read.
    pub fn install(&self, loaded: Loaded) {
        let mut teams = BTreeMap::new();
        for t in loaded.teams {
            let budget = self.live_for(
                "team",
                &t.id,
                &t.name,
                t.budget.as_ref(),
                t.deleted_at,
                t.spend_reset_at,
                &loaded.spent,
            );
            let id = t.id.as_str().into();
            teams.insert(t.id.clone(), Arc::new(StoredTeam { rec: t, id, budget }));
        }
        let mut snapshot = Snapshot::default();
        for k in loaded.keys {
            let budget = self.live_for(
                "key",
                &k.id,
                &k.name,
                k.budget.as_ref(),
                k.deleted_at,
                k.spend_reset_at,
                &loaded.spent,
            );
            let team = k.team_id.as_ref().and_then(|t| teams.get(t)).cloned();
            let digests = [
                unhex(&k.digest).map(|d| (d, false)),
                k.old_digest.as_deref().and_then(unhex).map(|d| (d, true)),
            ];
            let key = Arc::new(StoredKey {
                id: k.id.as_str().into(),
                name: k.name.as_str().into(),
                rec: k,
                team,
                budget,
            });
            for (d, previous) in digests.into_iter().flatten() {
                snapshot.by_digest.insert(
                    d,
                    Entry {
                        key: Arc::clone(&key),
                        previous,
                    },
                );
            }
            snapshot.keys.insert(key.rec.id.clone(), key);
        }
        snapshot.teams = teams;
        // Config-key budgets read at the same time.
        for (owner, spent) in &loaded.spent {
            if owner.starts_with("config:") {
                self.pending_config_spend().insert(owner.clone(), *spent);
            }
        }
        self.snapshot.store(Arc::new(snapshot));
    }

    fn pending_config_spend(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.config_spend.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live budget of config key `name`.
    pub fn config_budget(&self, name: &str, spec: &BudgetSpec) -> Arc<Budget> {
        let key = owner_id("config", name);
        let spent = self.pending_config_spend().remove(&key);
        self.budget(
            Owner {
                scope: "key",
                id: key.clone(),
                name: name.to_string(),
            },
            key,
            spec,
            spent,
            0,
        )
    }

    /// The live budget of `owner` if there is one (reset_spend).
    pub fn live_budget(&self, owner: &str) -> Option<Arc<Budget>> {
        self.budgets().get(owner).cloned()
    }

    /// [`refresh`](Self::refresh) from a thread outside any runtime (a config reload).
    pub fn refresh_blocking(
        &self,
        config_budgets: Vec<(String, BudgetSpec)>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        let live = self.live_budgets();
        let loaded = self
            .store
            .run_blocking(move |pool| load(pool, now, live, config_budgets))?;
        self.install(loaded);
        Ok(())
    }

    /// Reloads the directory from the store and recounts every budget's spend from the
    /// usage rows (the periodic re-read of a shared store): a budget's figure rises to
    /// what every instance recorded, so a shared counter that must start again (Redis
    /// flushed) starts from it, and without Redis each instance's budget counts the
    /// others' spend as of the last re-read.
    pub async fn recount(
        &self,
        config_budgets: Vec<(String, BudgetSpec)>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        let loaded = self
            .store
            .run(move |pool| load(pool, now, HashSet::new(), config_budgets))
            .await?;
        self.install(loaded);
        Ok(())
    }

    /// Reloads the directory from the store (after an admin change).
    pub async fn refresh(
        &self,
        config_budgets: Vec<(String, BudgetSpec)>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        let live = self.live_budgets();
        let loaded = self
            .store
            .run(move |pool| load(pool, now, live, config_budgets))
            .await?;
        self.install(loaded);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
