//! The durable record: keys, teams, usage rows and the audit log, in an embedded SQLite
//! database by default (`store.url`), or in PostgreSQL when several instances share
//! them, through sqlx's driver-neutral pool: the same queries and migrations for both. The request path never waits on it: keys
//! and budgets are loaded into memory (see `keys`), usage rows are queued and written in
//! batches in the background (see `usage`).
//!
//! Database work runs on the store's own small runtime, so no Pingora service runtime
//! owns a database connection and a slow database never occupies a proxy thread.

pub(crate) mod cluster;

pub mod litellm;

pub mod records;
pub mod reports;
mod sqlite_rows;
pub mod usage;

use crate::secret::mask_userinfo;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Row};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The schema, one migration per version, applied in order in one transaction each.
/// A database at a version this binary does not know refuses to start (a newer binary
/// wrote it).
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE teams (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        models TEXT,
        limits TEXT NOT NULL,
        budget TEXT,
        metadata TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        spend_reset_at BIGINT NOT NULL DEFAULT 0,
        deleted_at BIGINT
    );
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        team_id TEXT,
        digest TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        old_digest TEXT,
        old_valid_until BIGINT,
        models TEXT,
        limits TEXT NOT NULL,
        budget TEXT,
        expires_at BIGINT,
        metadata TEXT NOT NULL,
        blocked BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        spend_reset_at BIGINT NOT NULL DEFAULT 0,
        deleted_at BIGINT
    );
    CREATE INDEX keys_team ON keys (team_id);
    CREATE TABLE usage (
        request_id TEXT NOT NULL,
        ts BIGINT NOT NULL,
        day TEXT NOT NULL,
        key_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        team_id TEXT,
        model TEXT NOT NULL,
        upstream TEXT,
        upstream_model TEXT,
        status BIGINT NOT NULL,
        stream BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        cost_micro_usd BIGINT NOT NULL,
        priced BIGINT NOT NULL,
        cache TEXT
    );
    CREATE INDEX usage_ts ON usage (ts);
    CREATE INDEX usage_key_ts ON usage (key_id, ts);
    CREATE INDEX usage_team_ts ON usage (team_id, ts);
    CREATE TABLE audit (
        ts BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        object_type TEXT NOT NULL,
        object_id TEXT NOT NULL,
        before_json TEXT,
        after_json TEXT
    );
    CREATE INDEX audit_ts ON audit (ts);",
    ),
    (
        2,
        // What a cache hit saved: the tokens and cost its stored answer had (the hit itself
        // is counted as zero in input_tokens, output_tokens and cost_micro_usd).
        "ALTER TABLE usage ADD COLUMN saved_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN saved_micro_usd BIGINT NOT NULL DEFAULT 0",
    ),
    (
        3,
        // The wire-format translation a request went through (`openai->anthropic`, ...),
        // NULL when it was passed through as the client sent it.
        "ALTER TABLE usage ADD COLUMN translation TEXT",
    ),
    (
        4,
        // Tokens reported apart: prompt-cache writes (5-minute and hour-long together;
        // also in input_tokens) and reasoning (also in output_tokens).
        "ALTER TABLE usage ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0",
    ),
    (
        5,
        // No query looks usage rows up by team first (team sums range over `ts`, which
        // `usage_ts` serves), and every row paid for keeping this index: about 1,500
        // instructions of SQLite's a request.
        "DROP INDEX IF EXISTS usage_team_ts",
    ),
    (
        6,
        // Nor by key first: spend per key and the reports range over `ts` (`usage_ts`),
        // and keeping this index cost about 2,200 instructions a request (80,306 -> 78,105).
        "DROP INDEX IF EXISTS usage_key_ts",
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = 6;

/// A store failure, with any password in the URL masked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(mask_userinfo(&e.to_string()))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// The database. Connections are made lazily on the store's own runtime, which is
/// started on first use: after Pingora has forked into the background (`-d`), since a
/// fork keeps no thread. Start-up work (migrations, loading keys) goes through
/// [`prepare`] on a throwaway runtime before that.
#[derive(Clone)]
pub struct Store {
    url: String,
    live: Arc<OnceLock<Result<(AnyPool, tokio::runtime::Handle), StoreError>>>,
}

/// The runtime of all store work: two threads, kept for the life of the process.
fn runtime() -> Result<tokio::runtime::Handle, StoreError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-store")
        .enable_all()
        .build()
        .map_err(|e| StoreError(format!("cannot start the store's runtime: {e}")))?;
    let handle = rt.handle().clone();
    // The runtime lives as long as the process: it parks a thread that never exits.
    std::thread::Builder::new()
        .name("tollgate-store-rt".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| StoreError(format!("cannot start the store's runtime: {e}")))?;
    Ok(handle)
}

/// What a `store.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An embedded SQLite file: one instance.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database (the URL as written): one or several instances.
    Postgres(String),
}

/// The SQL dialect of a pool, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn of(pool: &AnyPool) -> Dialect {
        match pool.connect_options().database_url.scheme() {
            "postgres" | "postgresql" => Dialect::Postgres,
            _ => Dialect::Sqlite,
        }
    }
}

/// Parses `store.url`: `sqlite:///absolute/path.db`, `sqlite://relative/path.db`, or
/// `postgres://user:password@host:port/database` (also `postgresql://`, and
/// `?host=/socket/dir` for a unix socket).
pub fn location(url: &str) -> Result<Location, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err(StoreError("store.url: sqlite:// needs a file path".into()));
        }
        if path
            .split('/')
            .next()
            .is_some_and(|head| head.contains('@'))
        {
            return Err(StoreError(
                "store.url: sqlite:// takes a file path, not a user or password (the value is not shown)".into(),
            ));
        }
        return Ok(Location::Sqlite(path.into()));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| StoreError(format!("store.url: {}", mask_userinfo(&e.to_string()))))?;
        return Ok(Location::Postgres(url.to_string()));
    }
    // The value is not echoed: it may hold a password in a shape no mask knows.
    Err(StoreError(
        "store.url: is not a supported database URL (sqlite:///path/to/file.db or postgres://user:password@host/database; the value is not shown: it may hold a password)".into(),
    ))
}

impl Location {
    /// What to connect to; `mode` (`rwc`, `rw`, `ro`) applies to SQLite.
    fn connect_url(&self, mode: &str) -> String {
        match self {
            Location::Sqlite(path) => format!("sqlite://{}?mode={mode}", path.display()),
            Location::Postgres(url) => url.clone(),
        }
    }

    /// The URL with any password masked, for messages.
    fn shown(&self) -> String {
        match self {
            Location::Sqlite(path) => mask_userinfo(&path.display().to_string()),
            Location::Postgres(url) => mask_userinfo(url),
        }
    }
}

fn pool_options() -> AnyPoolOptions {
    sqlx::any::install_default_drivers();
    AnyPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
}

/// One connection made and closed, so that a database that cannot be reached is
/// reported with its reason (refused, unknown host, authentication) rather than as a pool
/// that timed out.
async fn try_connect(url: &str) -> Result<(), StoreError> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let made = tokio::time::timeout(Duration::from_secs(5), AnyConnection::connect(url))
        .await
        .map_err(|_| StoreError("the database did not answer within 5s".into()))??;
    made.close().await?;
    Ok(())
}

/// Creates a SQLite file that does not exist yet readable by its owner only (0600), in a
/// directory made 0700 when it is missing too: the file holds key digests, spend and the
/// audit log. SQLite gives its `-wal` and `-shm` files the database file's permissions.
/// An existing file or directory keeps the permissions it has.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let cannot = |what: &std::path::Path, e: std::io::Error| {
        StoreError(format!("store.url: cannot create {}: {e}", what.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| cannot(dir, e))?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(cannot(path, e)),
    }
}

/// Start-up: creates the file and its directory when missing (SQLite), migrates the
/// schema and runs `load` on the database, all on a throwaway runtime that is gone when
/// this returns.
pub fn prepare<T, F>(
    url: &str,
    now_ms: i64,
    load: impl FnOnce(AnyPool) -> F,
) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    let loc = location(url)?;
    if let Location::Sqlite(path) = &loc {
        create_private(path)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        try_connect(&loc.connect_url("rwc")).await?;
        let pool = pool_options().connect(&loc.connect_url("rwc")).await?;
        if let Location::Sqlite(_) = loc {
            // Readers do not block the writer, and a crash loses no committed row.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        migrate(&pool, now_ms).await?;
        let loaded = load(pool.clone()).await;
        pool.close().await;
        loaded
    })
}

impl Store {
    /// The store at `url`, connected on first use (see [`prepare`] for start-up).
    pub fn new(url: &str) -> Store {
        Store {
            url: url.to_string(),
            live: Arc::new(OnceLock::new()),
        }
    }

    fn live(&self) -> Result<(AnyPool, tokio::runtime::Handle), StoreError> {
        self.live
            .get_or_init(|| {
                let loc = location(&self.url)?;
                let rt = runtime()?;
                let _in_runtime = rt.enter();
                let pool = match loc {
                    // SQLite takes one writer at a time; one connection, kept open, also
                    // keeps the process's open files steady.
                    Location::Sqlite(_) => pool_options()
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None),
                    Location::Postgres(_) => pool_options().min_connections(1),
                }
                .connect_lazy(&loc.connect_url("rw"))?;
                Ok((pool, rt))
            })
            .clone()
    }

    /// The SQLite file, when the store is one.
    pub fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        match location(&self.url) {
            Ok(Location::Sqlite(path)) => Some(path),
            _ => None,
        }
    }

    /// `tollgate -t`: the store is reachable and its schema version is known, without
    /// creating anything. A SQLite file not there yet is fine: it is created at start.
    pub fn check(url: &str) -> Result<String, StoreError> {
        let loc = location(url)?;
        if let Location::Sqlite(path) = &loc {
            if !path.exists() {
                let mut dir = path.parent().map(std::path::Path::to_path_buf);
                while let Some(d) = dir
                    .as_ref()
                    .filter(|d| !d.as_os_str().is_empty() && !d.exists())
                {
                    dir = d.parent().map(std::path::Path::to_path_buf);
                }
                return Ok(format!(
                    "{} will be created at start (under {})",
                    path.display(),
                    dir.map_or_else(|| ".".into(), |d| d.display().to_string())
                ));
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError(format!("cannot start a runtime: {e}")))?;
        let version = rt.block_on(async {
            try_connect(&loc.connect_url("ro")).await?;
            let pool = pool_options()
                .max_connections(1)
                .connect(&loc.connect_url("ro"))
                .await?;
            let v = schema_version(&pool).await;
            pool.close().await;
            v
        })?;
        let shown = loc.shown();
        if version > SCHEMA_VERSION {
            return Err(StoreError(format!(
                "store.url: {shown} has schema version {version}, newer than this binary's {SCHEMA_VERSION}"
            )));
        }
        Ok(format!("{shown} at schema version {version}"))
    }

    /// Starts a task of the store's on its runtime (a listener); `None` when the runtime
    /// cannot start.
    pub fn spawn(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (_, rt) = self.live().ok()?;
        Some(rt.spawn(task))
    }

    /// Runs database work on the store's runtime and waits for it from any runtime.
    pub async fn run<T, F>(&self, work: impl FnOnce(AnyPool) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (pool, rt) = self.live()?;
        rt.spawn(work(pool))
            .await
            .map_err(|e| StoreError(format!("store task failed: {e}")))?
    }

    /// Runs database work from outside any runtime (the final flush at exit).
    pub fn run_blocking<T, F>(&self, work: impl FnOnce(AnyPool) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (pool, rt) = self.live()?;
        block_on(&rt, work(pool))?
    }

    /// Connects now rather than on the first write (and reads, so that SQLite opens its
    /// journal files too).
    pub async fn connect(&self) -> Result<(), StoreError> {
        self.run(|pool| async move { schema_version(&pool).await.map(drop) })
            .await
    }

    /// [`connect`](Self::connect) from outside any runtime. Not before a fork (`-d`).
    pub fn connect_blocking(&self) -> Result<(), StoreError> {
        self.run_blocking(|pool| async move { schema_version(&pool).await.map(drop) })
    }
}

/// Waits for `fut` on the store's runtime from a thread outside it.
fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| StoreError("store task failed".into()))
}

async fn schema_version(pool: &AnyPool) -> Result<i64, StoreError> {
    let mut conn = pool.acquire().await?;
    version_on(&mut conn, Dialect::of(pool)).await
}

/// The schema version, read on one connection (inside the migration's transaction).
async fn version_on(conn: &mut AnyConnection, dialect: Dialect) -> Result<i64, StoreError> {
    let exists = match dialect {
        Dialect::Sqlite => "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'tollgate_schema'",
        Dialect::Postgres => "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'tollgate_schema'",
    };
    let exists = sqlx::query(exists)
        .fetch_one(&mut *conn)
        .await?
        .try_get::<i64, _>("n")?;
    if exists == 0 {
        return Ok(0);
    }
    let row: AnyRow = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM tollgate_schema")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get::<i64, _>("v")?)
}

/// Any key PostgreSQL's advisory locks take: the one migrations hold, so that instances
/// starting together migrate one after the other.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// `now_ms`: the time each applied version is recorded with.
async fn migrate(pool: &AnyPool, now_ms: i64) -> Result<(), StoreError> {
    let dialect = Dialect::of(pool);
    // One transaction for the whole migration: on PostgreSQL it holds the advisory lock
    // until it commits, and DDL is transactional, so a failed step leaves nothing behind.
    let mut tx = pool.begin().await?;
    if dialect == Dialect::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS tollgate_schema (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let current = version_on(&mut tx, dialect).await?;
    if current > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "the database has schema version {current}, newer than this binary's {SCHEMA_VERSION}; run a newer tollgate"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO tollgate_schema (version, applied_at) VALUES ($1, $2)")
            .bind(*version)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        log::info!("store: schema migrated to version {version}");
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_rows_are_indexed_by_time_only() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("indexes.db").display());
        let names: Vec<String> = prepare(&url, 1, |pool| async move {
            let rows = sqlx::query(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage' ORDER BY name",
            )
            .fetch_all(&pool)
            .await?;
            Ok(rows
                .iter()
                .map(|r| r.try_get::<String, _>("name").unwrap_or_default())
                .collect())
        })
        .unwrap();
        assert_eq!(names, ["usage_ts"]);
    }

    #[test]
    fn a_version_1_database_keeps_its_usage_rows_through_migration_2() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("v1.db").display());
        let rows = prepare(&url, 1, |pool| async move {
            // Roll the fresh database back to what version 1 wrote, with one usage row.
            sqlx::query("DROP TABLE usage").execute(&pool).await?;
            let v1 = MIGRATIONS[0].1;
            let usage = v1
                .split(';')
                .find(|s| s.contains("CREATE TABLE usage"))
                .unwrap_or_default();
            sqlx::query(usage).execute(&pool).await?;
            sqlx::query("DELETE FROM tollgate_schema WHERE version > 1")
                .execute(&pool)
                .await?;
            sqlx::query("INSERT INTO usage (request_id, ts, day, key_id, key_name, model, status, stream, input_tokens, output_tokens, cached_tokens, cost_micro_usd, priced) VALUES ('r1', 1, '1970-01-01', 'k', 'n', 'm', 200, 0, 10, 5, 0, 42, 1)")
                .execute(&pool)
                .await?;
            assert_eq!(schema_version(&pool).await?, 1);
            migrate(&pool, 1).await?;
            assert_eq!(schema_version(&pool).await?, SCHEMA_VERSION);
            let row = sqlx::query("SELECT cost_micro_usd, saved_tokens, saved_micro_usd FROM usage")
                .fetch_one(&pool)
                .await?;
            Ok((
                row.try_get::<i64, _>("cost_micro_usd")?,
                row.try_get::<i64, _>("saved_tokens")?,
                row.try_get::<i64, _>("saved_micro_usd")?,
            ))
        })
        .unwrap();
        assert_eq!(rows, (42, 0, 0));
    }

    #[test]
    fn prepares_migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/t.db");
        let url = format!("sqlite://{}", path.display());
        assert!(Store::check(&url).unwrap().contains("will be created"));
        let v = prepare(&url, 1, |pool| async move { schema_version(&pool).await }).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let at = format!("schema version {SCHEMA_VERSION}");
        assert!(Store::check(&url).unwrap().contains(&at));
        // Migrating again is a no-op; the live store reads what start-up wrote.
        prepare(&url, 1, |_| async { Ok(()) }).unwrap();
        let store = Store::new(&url);
        let v = store
            .run_blocking(|pool| async move { schema_version(&pool).await })
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let e = location("mysql://u:pw@h/db").unwrap_err().0;
        assert!(e.contains("store.url") && !e.contains("pw"), "{e}");
        let e = location("sqlite://u:pw@/x.db").unwrap_err().0;
        assert!(
            e.contains("not a user or password") && !e.contains("pw@"),
            "{e}"
        );
    }
}
