//! The in-memory backend: moka's concurrent cache, bounded by bytes (`cache.max_size`,
//! each entry weighed by its size), evicting by its TinyLFU policy (admission by
//! frequency, eviction of the least recently used), each entry dropped at its own TTL.

use super::{CacheBackend, Entry, Key};
use async_trait::async_trait;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
struct Stored {
    entry: Arc<Entry>,
    ttl: Duration,
}

struct PerEntry;

impl Expiry<Key, Stored> for PerEntry {
    fn expire_after_create(&self, _key: &Key, value: &Stored, _now: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Answers kept in this process.
pub struct MemoryCache {
    inner: Cache<Key, Stored>,
}

impl MemoryCache {
    pub fn new(max_bytes: u64) -> Self {
        let inner = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, v: &Stored| u32::try_from(v.entry.weight()).unwrap_or(u32::MAX))
            .expire_after(PerEntry)
            .eviction_listener(|_, _, cause| {
                if cause == RemovalCause::Size {
                    if let Some(m) = crate::metrics::get() {
                        m.cache_evictions.inc();
                    }
                }
            })
            .support_invalidation_closures()
            .build();
        MemoryCache { inner }
    }
}

#[async_trait]
impl CacheBackend for MemoryCache {
    async fn get(&self, key: &Key, _alias: &str) -> Option<Entry> {
        self.inner.get(key).map(|s| Entry::clone(&s.entry))
    }

    async fn put(&self, key: Key, entry: Entry, ttl: Duration) {
        let entry = Arc::new(entry);
        self.inner.insert(key, Stored { entry, ttl });
    }

    async fn clear(&self, alias: Option<&str>) -> Result<u64, String> {
        self.inner.run_pending_tasks();
        let before = self.inner.entry_count();
        match alias {
            None => self.inner.invalidate_all(),
            Some(a) => {
                let a = a.to_string();
                self.inner
                    .invalidate_entries_if(move |_, v| v.entry.alias == a)
                    .map_err(|e| e.to_string())?;
            }
        }
        self.inner.run_pending_tasks();
        Ok(before.saturating_sub(self.inner.entry_count()))
    }

    fn size(&self) -> Option<(u64, u64)> {
        self.inner.run_pending_tasks();
        Some((self.inner.entry_count(), self.inner.weighted_size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(alias: &str, size: usize) -> Entry {
        Entry {
            alias: alias.into(),
            stream: false,
            body: Bytes::from(vec![b'x'; size]),
            input_tokens: 10,
            output_tokens: 5,
            cost_micro: 7,
            expires_at: i64::MAX,
        }
    }

    fn key(i: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        Key(k)
    }

    #[tokio::test]
    async fn a_flood_of_distinct_answers_stays_within_max_size() {
        let c = MemoryCache::new(100_000);
        for i in 0..2_000 {
            c.put(key(i), entry("m", 1_000), Duration::from_secs(60))
                .await;
        }
        let (entries, bytes) = c.size().unwrap();
        assert!(bytes <= 100_000, "{bytes} bytes held");
        assert!(entries > 0 && entries < 2_000, "{entries} entries");
    }

    #[tokio::test]
    async fn clearing_one_alias_keeps_the_others() {
        let c = MemoryCache::new(1 << 20);
        c.put(key(1), entry("a", 10), Duration::from_secs(60)).await;
        c.put(key(2), entry("b", 10), Duration::from_secs(60)).await;
        assert_eq!(c.clear(Some("a")).await.unwrap(), 1);
        assert!(c.get(&key(1), "a").await.is_none());
        assert!(c.get(&key(2), "b").await.is_some());
        c.clear(None).await.unwrap();
        assert!(c.get(&key(2), "b").await.is_none());
    }
}
