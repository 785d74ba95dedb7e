//! The shared backend: entries in Redis (`cluster.redis`), so an answer one instance stored
//! is a hit on every other. Each entry is one string key, `tollgate:cache:{ALIAS}:HASH`
//! (the alias part is a hash tag: one alias's entries sit on one Redis Cluster slot, and
//! `DELETE /admin/cache?model=` finds them with one pattern), written with its TTL (`SET
//! ... PX`), so Redis drops it by itself. The connection is redis-rs's connection manager,
//! which reconnects by itself; every call has a short timeout, and an unreachable Redis is
//! a miss (logged, at most every 10 s), never an error for the client.

use super::{CacheBackend, Entry, Key};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The longest a cache call may take before it counts as a miss.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);

pub struct RedisCache {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    last_warning: AtomicU64,
}

impl RedisCache {
    /// `url`: `redis://[:PASSWORD@]HOST:PORT/DB` or `rediss://` for TLS. Nothing connects
    /// until the first call.
    pub fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(RedisCache {
            client,
            conn: OnceCell::new(),
            last_warning: AtomicU64::new(0),
        })
    }

    async fn conn(&self) -> Option<ConnectionManager> {
        let made = tokio::time::timeout(
            CALL_TIMEOUT * 4,
            self.conn
                .get_or_try_init(|| ConnectionManager::new(self.client.clone())),
        )
        .await;
        match made {
            Ok(Ok(c)) => Some(c.clone()),
            Ok(Err(e)) => {
                self.warn(&e.to_string());
                None
            }
            Err(_) => {
                self.warn("connect timed out");
                None
            }
        }
    }

    fn warn(&self, what: &str) {
        let now = crate::clock::monotonic_ms();
        let last = self.last_warning.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > 10_000 {
            self.last_warning.store(now, Ordering::Relaxed);
            log::warn!("cache: Redis unavailable, answering without the cache: {what}");
        }
    }

    async fn call<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut c = self.conn().await?;
        match tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.warn(&e.to_string());
                None
            }
            Err(_) => {
                self.warn("call timed out");
                None
            }
        }
    }
}

fn prefix(alias: &str) -> String {
    format!(
        "tollgate:cache:{{{:016x}}}:",
        crate::limits::key_hash(alias)
    )
}

fn name(key: &Key, alias: &str) -> String {
    format!("{}{}", prefix(alias), key.hex())
}

#[async_trait]
impl CacheBackend for RedisCache {
    async fn get(&self, key: &Key, alias: &str) -> Option<Entry> {
        let text: Option<String> = self.call(redis::cmd("GET").arg(name(key, alias))).await?;
        serde_json::from_str(&text?).ok()
    }

    async fn put(&self, key: Key, entry: Entry, ttl: Duration) {
        let Ok(text) = serde_json::to_string(&entry) else {
            return;
        };
        let ms = ttl.as_millis().max(1) as u64;
        let set = redis::cmd("SET")
            .arg(name(&key, &entry.alias))
            .arg(text)
            .arg("PX")
            .arg(ms)
            .clone();
        let _: Option<()> = self.call(&set).await;
    }

    async fn clear(&self, alias: Option<&str>) -> Result<u64, String> {
        let pattern = match alias {
            Some(a) => format!("{}*", prefix(a)),
            None => "tollgate:cache:*".to_string(),
        };
        let mut c = self.conn().await.ok_or("Redis is unavailable")?;
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let (next, names): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            if !names.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&names)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    fn size(&self) -> Option<(u64, u64)> {
        None
    }
}
