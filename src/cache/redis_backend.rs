//! The shared backend: entries in Redis (`cluster.redis`), so an answer one instance stored
//! is a hit on every other. Each entry is one string key, `tollgate:cache:{ALIAS}:HASH`
//! (the alias part is a hash tag: one alias's entries sit on one Redis Cluster slot, and
//! `DELETE /admin/cache?model=` finds them with one pattern), written with its TTL (`SET
//! ... PX`), so Redis drops it by itself. The connection is redis-rs's connection manager,
//! which reconnects by itself; every call has a short timeout, and an unreachable Redis is
//! a miss (logged, at most every 10 s), never an error for the client.

use super::{CacheBackend, Entry, Key};
use crate::store::cluster::{SharedRedis, CALL_TIMEOUT};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct RedisCache {
    redis: SharedRedis,
    last_warning: AtomicU64,
}

impl RedisCache {
    /// `url`: `redis://[:PASSWORD@]HOST:PORT/DB` or `rediss://` for TLS. Nothing connects
    /// until the first call.
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(RedisCache {
            redis: SharedRedis::open(url)?,
            last_warning: AtomicU64::new(0),
        })
    }

    async fn conn(&self) -> Option<ConnectionManager> {
        self.redis.conn().await.map_err(|e| self.warn(&e)).ok()
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
