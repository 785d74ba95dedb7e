//! Usage rows: one per LLM request, queued in memory on the request path (no I/O, one
//! short lock) and written in batches by a background task every `store.flush_interval`,
//! at reload, and once more when the process exits. When the database is slow or down,
//! rows wait in the queue up to `store.queue_size`; what arrives past that is dropped,
//! counted (`tollgate_usage_rows_total{result="dropped"}`) and logged. A `kill -9` loses what is
//! queued: at most one flush interval of rows.

use super::sqlite_rows::RowWriter;
use super::{Dialect, Store, StoreError};
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one request used and cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub request_id: String,
    /// Milliseconds since the epoch, UTC.
    pub ts: i64,
    /// Shared with the key directory and the config: a row copies none of these.
    pub key_id: Arc<str>,
    pub key_name: Arc<str>,
    pub team_id: Option<Arc<str>>,
    pub model: String,
    pub upstream: Option<Arc<str>>,
    pub upstream_model: Option<String>,
    pub status: u16,
    pub stream: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    /// Input tokens written to the prompt cache (part of `input_tokens`).
    pub cache_write_tokens: u64,
    /// Output tokens spent reasoning (part of `output_tokens`).
    pub reasoning_tokens: u64,
    pub cost_micro: i64,
    /// Whether a price was known (an unpriced answer counts zero).
    pub priced: bool,
    /// `hit`, `miss` or `bypass` for a cached alias.
    pub cache: Option<&'static str>,
    /// For a hit: the tokens (input plus output) and micro-USD its stored answer cost.
    pub saved_tokens: u64,
    pub saved_micro: i64,
    /// The translation between wire formats, if any (`openai->anthropic`, ...).
    pub translation: Option<&'static str>,
}

/// Rows waiting to be written.
pub struct UsageQueue {
    rows: Mutex<VecDeque<UsageRow>>,
    /// The buffer of the last written flush, emptied, which becomes the queue at the next
    /// flush. Taking the rows by swapping buffers leaves both with their capacity: a flush
    /// copies no row and the queue does not grow again. Drained into a new vector instead,
    /// each flush's rows landed in freshly mapped memory, and its page faults cost 1.7 %
    /// of the gateway's CPU under load.
    spare: Mutex<VecDeque<UsageRow>>,
    bound: usize,
    dropped: AtomicU64,
    /// Wakes the writer early (reload, shutdown).
    wake: tokio::sync::Notify,
    flushing: tokio::sync::Mutex<()>,
    /// With a SQLite store: the writer's own connection, opened on the first flush and
    /// again after a failed one.
    sqlite: Arc<Mutex<Option<RowWriter>>>,
}

impl UsageQueue {
    pub fn new(bound: usize) -> Arc<UsageQueue> {
        Arc::new(UsageQueue {
            rows: Mutex::new(VecDeque::new()),
            spare: Mutex::new(VecDeque::new()),
            bound: bound.max(1),
            dropped: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
            sqlite: Arc::new(Mutex::new(None)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<UsageRow>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, VecDeque<UsageRow>> {
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a row; past the bound it is dropped and counted.
    pub fn push(&self, row: UsageRow) {
        let depth = {
            let mut q = self.lock();
            if q.len() >= self.bound {
                drop(q);
                self.dropped_rows(1);
                return;
            }
            q.push_back(row);
            q.len()
        };
        if let Some(m) = crate::metrics::get() {
            m.store_queue.set(depth as i64);
        }
    }

    fn dropped_rows(&self, n: u64) {
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = crate::metrics::get() {
            m.usage_rows.with_label_values(&["dropped"]).inc_by(n);
        }
        // One line per power of two dropped: loud at first, never a flood.
        if (before + n).is_power_of_two() || before == 0 {
            log::error!(
                "store: the usage queue is full ({} rows): {} usage rows dropped so far",
                self.bound,
                before + n
            );
        }
    }

    pub fn depth(&self) -> usize {
        self.lock().len()
    }

    /// Asks the writer to flush now.
    pub fn flush_soon(&self) {
        self.wake.notify_one();
    }

    /// Writes everything queued; on failure the rows go back to the front of the queue
    /// (as many as fit) for the next attempt. The work runs on the store's runtime, one
    /// flush at a time, so a flush whose caller went away (a runtime shutting down)
    /// still finishes before the next one, the last at exit included, begins.
    pub async fn flush(self: &Arc<Self>, store: &Store) -> Result<usize, StoreError> {
        let (q, file) = (Arc::clone(self), store.sqlite_file());
        store
            .run(move |pool| async move { q.write_queued(&pool, file).await })
            .await
    }

    /// [`flush`] from outside any runtime: the last write before the process exits.
    pub fn flush_blocking(self: &Arc<Self>, store: &Store) -> Result<usize, StoreError> {
        let (q, file) = (Arc::clone(self), store.sqlite_file());
        store.run_blocking(move |pool| async move { q.write_queued(&pool, file).await })
    }

    /// Writes the queued rows: to a SQLite `file` through the writer's own connection
    /// (on a blocking thread), otherwise through the pool.
    async fn write_queued(
        &self,
        pool: &sqlx::AnyPool,
        file: Option<std::path::PathBuf>,
    ) -> Result<usize, StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let mut rows = std::mem::take(&mut *self.spare());
        std::mem::swap(&mut *self.lock(), &mut rows);
        if rows.is_empty() {
            *self.spare() = rows;
            return Ok(0);
        }
        rows.make_contiguous();
        let started = Instant::now();
        let (rows, result) = match file {
            Some(file) => {
                let conn = Arc::clone(&self.sqlite);
                tokio::task::spawn_blocking(move || {
                    let result = insert_sqlite(&conn, &file, rows.as_slices().0);
                    (rows, result)
                })
                .await
                .map_err(|e| StoreError(format!("store task failed: {e}")))?
            }
            None => {
                let result = insert(pool, rows.as_slices().0).await;
                (rows, result)
            }
        };
        self.after(rows, started, result)
    }

    fn after(
        &self,
        mut rows: VecDeque<UsageRow>,
        started: Instant,
        result: Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        let n = rows.len();
        let m = crate::metrics::get();
        if let Some(m) = m {
            m.store_flush.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(()) => {
                rows.clear();
                *self.spare() = rows;
                if let Some(m) = m {
                    m.usage_rows
                        .with_label_values(&["written"])
                        .inc_by(n as u64);
                    m.store_queue.set(self.depth() as i64);
                }
                Ok(n)
            }
            Err(e) => {
                let mut q = self.lock();
                let room = self.bound.saturating_sub(q.len());
                let keep = n.min(room);
                for row in rows.into_iter().take(keep).rev() {
                    q.push_front(row);
                }
                let depth = q.len();
                drop(q);
                if keep < n {
                    self.dropped_rows((n - keep) as u64);
                }
                if let Some(m) = m {
                    m.store_queue.set(depth as i64);
                }
                Err(e)
            }
        }
    }
}

const COLUMNS: &str = "request_id, ts, day, key_id, key_name, team_id, model, upstream, upstream_model, status, stream, input_tokens, output_tokens, cached_tokens, cost_micro_usd, priced, cache, saved_tokens, saved_micro_usd, translation, cache_write_tokens, reasoning_tokens";

/// Rows per multi-row INSERT. Every statement has a fixed text, so each is parsed once and
/// then reused from the connection's statement cache; on SQLite, positional `?`
/// parameters spare a lookup by name per parameter (with `$N` names that lookup is
/// linear, and it cost more than writing the rows). PostgreSQL only takes `$N`.
pub(super) const BATCH: usize = 32;
pub(super) const FIELDS: usize = 22;

fn insert_sql(rows: usize, dialect: Dialect) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=FIELDS)
                .map(|i| match dialect {
                    Dialect::Sqlite => "?".to_string(),
                    Dialect::Postgres => format!("${}", r * FIELDS + i),
                })
                .collect();
            format!("({})", params.join(","))
        })
        .collect();
    format!("INSERT INTO usage ({COLUMNS}) VALUES {}", values.join(","))
}

/// Removes the rows of request ids `ids` and writes `rows` (an import run again).
pub async fn replace(
    pool: &sqlx::AnyPool,
    ids: &[String],
    rows: &[UsageRow],
) -> Result<(), StoreError> {
    for id in ids {
        sqlx::query("DELETE FROM usage WHERE request_id = $1")
            .bind(id.clone())
            .execute(pool)
            .await?;
    }
    if rows.is_empty() {
        return Ok(());
    }
    insert(pool, rows).await
}

/// The INSERT of `rows` rows (1 to BATCH), made once per dialect: a flush is full
/// batches and one statement for the rest, never a statement per row (on SQLite a row
/// alone cost 16k instructions of SQLite's own work, against 9k in a batch).
fn statement(rows: usize, dialect: Dialect) -> &'static str {
    type Sql = [std::sync::OnceLock<String>; BATCH];
    static SQLITE: Sql = [const { std::sync::OnceLock::new() }; BATCH];
    static POSTGRES: Sql = [const { std::sync::OnceLock::new() }; BATCH];
    let sql = match dialect {
        Dialect::Sqlite => &SQLITE,
        Dialect::Postgres => &POSTGRES,
    };
    sql[rows - 1].get_or_init(|| insert_sql(rows, dialect))
}

/// SQLite's writer's INSERT of `rows` rows: `OR ROLLBACK`, so that SQLite keeps no
/// statement journal. With a plain INSERT in a transaction of several statements, SQLite
/// journals every page a statement touches so as to undo that statement alone; past
/// 64 KiB the journal went to a temporary file, two `pwrite`s a row. Here any failure
/// ends the whole flush anyway: the transaction is rolled back and the rows queued again.
pub(super) fn rollback_statement(rows: usize) -> &'static str {
    static SQL: [std::sync::OnceLock<String>; BATCH] =
        [const { std::sync::OnceLock::new() }; BATCH];
    SQL[rows - 1].get_or_init(|| {
        insert_sql(rows, Dialect::Sqlite).replacen("INSERT INTO", "INSERT OR ROLLBACK INTO", 1)
    })
}

async fn insert(pool: &sqlx::AnyPool, rows: &[UsageRow]) -> Result<(), StoreError> {
    let dialect = Dialect::of(pool);
    let mut tx = pool.begin().await?;
    for chunk in rows.chunks(BATCH) {
        bind_rows(sqlx::query(statement(chunk.len(), dialect)), chunk)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Writes `rows` to the SQLite `file` in one transaction, through the writer's own
/// connection (`sqlite_rows`). The connection is kept for the next flush, or dropped
/// after a failure so that the next one starts afresh.
fn insert_sqlite(
    conn: &Mutex<Option<RowWriter>>,
    file: &std::path::Path,
    rows: &[UsageRow],
) -> Result<(), StoreError> {
    let mut slot = conn.lock().unwrap_or_else(|e| e.into_inner());
    let mut writer = match slot.take() {
        Some(w) => w,
        None => RowWriter::open(file)?,
    };
    writer.write(rows)?;
    *slot = Some(writer);
    Ok(())
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_rows<'q>(mut q: Query<'q>, rows: &[UsageRow]) -> Query<'q> {
    for r in rows {
        q = q
            .bind(r.request_id.clone())
            .bind(r.ts)
            .bind(crate::clock::day(r.ts))
            .bind(r.key_id.to_string())
            .bind(r.key_name.to_string())
            .bind(r.team_id.as_deref().map(str::to_string))
            .bind(r.model.clone())
            .bind(r.upstream.as_deref().map(str::to_string))
            .bind(r.upstream_model.clone())
            .bind(i64::from(r.status))
            .bind(i64::from(r.stream))
            .bind(sat(r.input_tokens))
            .bind(sat(r.output_tokens))
            .bind(sat(r.cached_tokens))
            .bind(r.cost_micro)
            .bind(i64::from(r.priced))
            .bind(r.cache.map(str::to_string))
            .bind(sat(r.saved_tokens))
            .bind(r.saved_micro)
            .bind(r.translation.map(str::to_string))
            .bind(sat(r.cache_write_tokens))
            .bind(sat(r.reasoning_tokens));
    }
    q
}

pub(super) fn sat(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The background writer: flushes every `interval`, and when woken.
pub struct Writer {
    pub queue: Arc<UsageQueue>,
    pub store: Store,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for Writer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut failing = false;
        let mut stopping = false;
        if let Err(e) = self.store.connect().await {
            log::error!("store: cannot connect ({e}); usage rows wait in the queue");
            failing = true;
        }
        loop {
            let wait = if stopping {
                Duration::from_millis(100)
            } else {
                self.interval
            };
            tokio::select! {
                _ = shutdown.changed(), if !stopping => stopping = true,
                _ = self.queue.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            match self.queue.flush(&self.store).await {
                Ok(_) if failing => {
                    failing = false;
                    log::info!("store: usage rows are written again");
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        log::error!(
                            "store: cannot write usage rows ({e}); {} rows wait in the queue",
                            self.queue.depth()
                        );
                    }
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    fn row(i: usize) -> UsageRow {
        UsageRow {
            request_id: format!("r{i}"),
            ts: 1_800_000_000_000 + i as i64,
            key_id: "k".into(),
            key_name: "n".into(),
            team_id: None,
            model: "m".into(),
            upstream: Some("u".into()),
            upstream_model: None,
            status: 200,
            stream: false,
            input_tokens: i as u64,
            output_tokens: 1,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            cost_micro: 7,
            priced: true,
            cache: None,
            saved_tokens: 0,
            saved_micro: 0,
            translation: None,
        }
    }

    /// Every size of flush is written whole: one row, a part batch, whole batches and
    /// whole batches with a rest.
    #[test]
    fn flushes_of_any_size_write_every_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("u.db").display());
        let counts = [1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 5];
        let written = crate::store::prepare(&url, 1, |pool| async move {
            let mut next = 0;
            let mut seen = Vec::new();
            for n in counts {
                let rows: Vec<UsageRow> = (next..next + n).map(row).collect();
                next += n;
                insert(&pool, &rows).await?;
                let r = sqlx::query("SELECT COUNT(*) AS n, SUM(input_tokens) AS t FROM usage")
                    .fetch_one(&pool)
                    .await?;
                seen.push((r.try_get::<i64, _>("n")?, r.try_get::<i64, _>("t")?));
            }
            Ok(seen)
        })
        .unwrap();
        let mut total = 0;
        let expected: Vec<(i64, i64)> = counts
            .iter()
            .map(|n| {
                total += n;
                (total as i64, (0..total).sum::<usize>() as i64)
            })
            .collect();
        assert_eq!(written, expected);
    }

    /// A row with every optional column set (or not, by `i`).
    fn varied(i: usize) -> UsageRow {
        let mut r = row(i);
        if i % 2 == 0 {
            r.team_id = Some(format!("t{i}").into());
            r.upstream_model = Some("gpt-4o-mini".into());
            r.cache = Some("miss");
            r.translation = Some("openai->anthropic");
        }
        // Ten rows a day, so that a flush spans days.
        r.ts += (i as i64 / 10) * crate::clock::DAY_MS;
        r.stream = i % 3 == 0;
        r.priced = i % 5 != 0;
        r.key_name = "quote ' and \u{e9}".into();
        r.saved_micro = -(i as i64);
        r.reasoning_tokens = u64::MAX;
        r
    }

    /// Every column of every row, as SQLite's `quote()` shows it (type and value).
    async fn dump(pool: &sqlx::AnyPool) -> Result<Vec<String>, StoreError> {
        let cols: Vec<String> = COLUMNS.split(", ").map(|c| format!("quote({c})")).collect();
        let sql = format!(
            "SELECT {} AS v FROM usage ORDER BY request_id",
            cols.join(" || ',' || ")
        );
        let rows = sqlx::query(&sql).fetch_all(pool).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("v").map_err(StoreError::from))
            .collect()
    }

    /// SQLite's own writer, through the queue's flush, stores exactly what the pool's
    /// INSERT stores, column for column, and writes each row once whatever the flush size.
    #[test]
    fn the_sqlite_writer_stores_what_the_pool_stores() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<UsageRow> = (0..70).map(varied).collect();
        let by_pool = format!("sqlite://{}", dir.path().join("pool.db").display());
        let expected = crate::store::prepare(&by_pool, 1, |pool| {
            let rows = rows.clone();
            async move {
                insert(&pool, &rows).await?;
                dump(&pool).await
            }
        })
        .unwrap();

        let native = format!("sqlite://{}", dir.path().join("native.db").display());
        crate::store::prepare(&native, 1, |_| async { Ok(()) }).unwrap();
        let store = Store::new(&native);
        let queue = UsageQueue::new(1000);
        for chunk in [&rows[..1], &rows[1..40], &rows[40..]] {
            for r in chunk {
                queue.push(r.clone());
            }
            assert_eq!(queue.flush_blocking(&store).unwrap(), chunk.len());
        }
        assert_eq!(queue.flush_blocking(&store).unwrap(), 0);
        let got =
            crate::store::prepare(&native, 1, |pool| async move { dump(&pool).await }).unwrap();
        assert_eq!(got.len(), 70);
        assert_eq!(got, expected);
    }

    /// A flush SQLite refuses part-way (here a trigger, on the 40th row of 45) writes
    /// nothing and keeps every row; once SQLite takes them, a flush writes each once.
    #[test]
    fn a_flush_sqlite_refuses_keeps_its_rows_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("usage.db");
        let url = format!("sqlite://{}", file.display());
        crate::store::prepare(&url, 1, |_| async { Ok(()) }).unwrap();
        let admin = rusqlite::Connection::open(&file).unwrap();
        admin
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON usage WHEN NEW.request_id = 'r39' \
                 BEGIN SELECT RAISE(ROLLBACK, 'refused by the test'); END",
            )
            .unwrap();
        let store = Store::new(&url);
        let queue = UsageQueue::new(1000);
        let rows: Vec<UsageRow> = (0..45).map(varied).collect();
        assert_eq!(rows[39].request_id, "r39");
        for r in &rows {
            queue.push(r.clone());
        }
        let err = queue.flush_blocking(&store).unwrap_err();
        assert!(err.to_string().contains("refused by the test"), "{err}");
        assert_eq!(queue.depth(), 45);
        let count = |c: &rusqlite::Connection| -> i64 {
            c.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&admin), 0);

        admin.execute_batch("DROP TRIGGER refuse").unwrap();
        assert_eq!(queue.flush_blocking(&store).unwrap(), 45);
        assert_eq!(count(&admin), 45);
        let distinct: i64 = admin
            .query_row("SELECT COUNT(DISTINCT request_id) FROM usage", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(distinct, 45);
    }
}
