//! The counter backend shared by every instance: Redis (`cluster.redis`). One request's
//! charges of a stage are checked and counted by one server-side script, in one round
//! trip, all or nothing, on the Redis server's clock (no skew between instances).
//!
//! - A rate (`rps`, `rpm`, `tpm`) is one hash per scope key and dimension holding the
//!   current fixed window's index and count and the previous window's count; the
//!   estimate is the same sliding one as in-process (`previous x (1 - elapsed fraction) +
//!   current`). Each hash expires two windows after its last use.
//! - A concurrency limit is one sorted set per scope key of the requests holding a slot,
//!   scored by when the slot expires (`cluster.slot_ttl`). Slots are released when the
//!   request ends, by any path; while it lasts, a heartbeat pushes the expiry forward
//!   every third of the TTL, so the slots of an instance that died come back within
//!   `slot_ttl` and no request outlives its slot.
//! - Every key carries the hash tag `{tollgate-limits}`: a script may only touch keys of
//!   one Redis Cluster slot, so all limit keys live on one shard.
//!
//! When Redis cannot be reached (a 250 ms timeout per call), `cluster.on_redis_error`
//! decides: `local` counts in this process at `limit / cluster.expected_instances`
//! (rounded up), `refuse` answers 503. Both are logged and counted; Redis is tried again
//! on the next request. A request rate already refused in its current window is refused
//! again without a round trip until the window frees room.

use super::backend::CounterBackend;
use super::local::LocalCounters;
use super::{Charge, Dimension, Refusal, Room, Scope};
use crate::cluster::{SharedRedis, CALL_TIMEOUT};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A mark with this bit set: the charge was counted in the local fallback.
const LOCAL: u64 = 1 << 63;

/// What to do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Count in this process, at `limit / expected_instances`.
    #[default]
    Local,
    /// Refuse with 503.
    Refuse,
}

/// Checks every charge, then counts all of them or none. ARGV: now-independent numbers
/// per charge, five each: kind (`r` rate, `c` slot), limit, amount, window (ms) or slot
/// TTL (ms), slot id. Returns `{0, mark..., estimate...}` (a rate's mark is its window,
/// its estimate the count it now holds) or `{failed index, retry after ms}`.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local function window(key, win)
  local h = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = math.floor(now / win)
  local sw, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if sw ~= w then
    if sw == w - 1 then p = c else p = 0 end
    c = 0
  end
  return w, c, p
end
for i = 1, n do
  local b = (i - 1) * 5
  local kind, limit, amount, span = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('ZCARD', KEYS[i]) + 1 > limit then return {i, 1000} end
  else
    local left = span - (now % span)
    if amount > limit then return {i, left} end
    local w, c, p = window(KEYS[i], span)
    local frac = (now % span) / span
    if p * (1 - frac) + c + amount > limit then return {i, left} end
  end
end
local out = {0}
for i = 1, n do
  local b = (i - 1) * 5
  local kind, amount, span, id = ARGV[b + 1], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 5]
  if kind == 'c' then
    redis.call('ZADD', KEYS[i], now + span, id)
    redis.call('PEXPIRE', KEYS[i], span * 2)
    out[i + 1] = 0
  else
    local w, c, p = window(KEYS[i], span)
    redis.call('HSET', KEYS[i], 'w', w, 'c', c + amount, 'p', p)
    redis.call('PEXPIRE', KEYS[i], span * 2)
    out[i + 1] = w
    local frac = (now % span) / span
    out[n + i + 1] = math.ceil(p * (1 - frac) + c + amount)
  end
end
return out
"#;

/// Adds ARGV[2] to a rate's count when its window is still ARGV[1] (settling or undoing
/// a charge in the window it was counted in; later windows are left alone).
const ADJUST: &str = r#"
if redis.call('HGET', KEYS[1], 'w') == ARGV[1] then
  local c = tonumber(redis.call('HGET', KEYS[1], 'c')) + tonumber(ARGV[2])
  if c < 0 then c = 0 end
  redis.call('HSET', KEYS[1], 'c', c)
end
return 0
"#;

/// Pushes the expiry of the slots named in ARGV (after the TTL in ARGV[1]) forward,
/// when they are still held.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
end
return 0
"#;

pub struct RedisCounters {
    redis: SharedRedis,
    reserve: redis::Script,
    adjust: redis::Script,
    heartbeat: redis::Script,
    fallback: LocalCounters,
    on_error: OnRedisError,
    instances: u64,
    slot_ttl: Duration,
    /// Slots held now (id -> key), for the heartbeat.
    held: Mutex<HashMap<u64, String>>,
    /// Rates refused in their current window: key -> until (monotonic ms).
    refused: Mutex<HashMap<String, u64>>,
    /// The last shared count seen per rate key, for the `x-ratelimit-*` headers.
    seen: Mutex<HashMap<String, u64>>,
    next_slot: AtomicU64,
    last_warning: AtomicU64,
}

fn key_name(c: &Charge) -> String {
    let dim = match c.dimension {
        Dimension::Rps => "rps",
        Dimension::Rpm => "rpm",
        Dimension::Tpm => "tpm",
        Dimension::Concurrency => "slots",
    };
    format!(
        "tollgate:{{tollgate-limits}}:{}:{:016x}:{dim}",
        c.scope.as_str(),
        c.key
    )
}

fn window_ms(d: Dimension) -> u64 {
    match d {
        Dimension::Rps => 1_000,
        _ => 60_000,
    }
}

impl RedisCounters {
    /// Nothing connects until the first request.
    pub fn new(
        url: &str,
        on_error: OnRedisError,
        instances: u64,
        slot_ttl: Duration,
    ) -> Result<Self, String> {
        let redis = SharedRedis::open(url)?;
        let seed = crate::clock::Clock::now_ms(&crate::clock::SystemClock) as u64
            ^ (u64::from(std::process::id()) << 32);
        Ok(RedisCounters {
            redis,
            reserve: redis::Script::new(RESERVE),
            adjust: redis::Script::new(ADJUST),
            heartbeat: redis::Script::new(HEARTBEAT),
            fallback: LocalCounters::default(),
            on_error,
            instances: instances.max(1),
            slot_ttl,
            held: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(seed & !LOCAL),
            last_warning: AtomicU64::new(0),
        })
    }

    fn unreachable(&self, what: &str) {
        if let Some(m) = crate::observe::metrics::get() {
            m.limits_redis_errors.inc();
        }
        let now = crate::clock::monotonic_ms();
        let last = self.last_warning.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > 10_000 {
            self.last_warning.store(now, Ordering::Relaxed);
            let mode = match self.on_error {
                OnRedisError::Local => "counting in this process at limit / expected_instances",
                OnRedisError::Refuse => "refusing requests with 503",
            };
            log::warn!("limits: Redis unavailable ({what}); {mode}");
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A rate refused in its window, without asking Redis again.
    fn known_refusal(&self, charges: &[Charge]) -> Option<Refusal> {
        let now = crate::clock::monotonic_ms();
        let mut refused = Self::lock(&self.refused);
        refused.retain(|_, until| *until > now);
        charges.iter().find_map(|c| {
            let until = *refused.get(&key_name(c))?;
            Some(c.refusal(Duration::from_millis(until.saturating_sub(now))))
        })
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let mut c = self.redis.conn().await?;
        match tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("call timed out".into()),
        }
    }

    /// Counts in this process, at each limit divided among the expected instances.
    async fn locally(&self, charges: &mut [Charge]) -> Result<(), Refusal> {
        let mut scaled: Vec<Charge> = charges
            .iter()
            .map(|c| Charge {
                limit: c.limit.div_ceil(self.instances),
                ..*c
            })
            .collect();
        self.fallback.reserve(&mut scaled).await.map_err(|mut r| {
            if let Some(c) = charges
                .iter()
                .find(|c| c.scope == r.scope && c.dimension == r.dimension)
            {
                r.limit = c.limit;
            }
            r
        })?;
        for c in charges.iter_mut() {
            c.mark = LOCAL;
        }
        Ok(())
    }

    /// Spawns a call that need not be waited for (release, settle, undo).
    fn later(&self, keys: Vec<String>, args: Vec<String>, script: &'static str) {
        let Some(mut c) = self.redis.made() else {
            return;
        };
        let script = match script {
            "adjust" => self.adjust.clone(),
            _ => return,
        };
        tokio::spawn(async move {
            let mut inv = script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &args {
                inv.arg(a);
            }
            let _ = tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async::<()>(&mut c)).await;
        });
    }

    fn zrem_later(&self, key: String, id: u64) {
        let Some(mut c) = self.redis.made() else {
            return;
        };
        tokio::spawn(async move {
            let cmd = redis::cmd("ZREM").arg(key).arg(id).clone();
            let _ = tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<()>(&mut c)).await;
        });
    }

    /// Pushes the expiry of every slot held by this process forward (run every third of
    /// `slot_ttl`).
    pub async fn beat(&self) {
        let held: Vec<(u64, String)> = Self::lock(&self.held)
            .iter()
            .map(|(id, key)| (*id, key.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        let mut inv = self.heartbeat.prepare_invoke();
        inv.arg(self.slot_ttl.as_millis() as u64);
        for (id, key) in &held {
            inv.key(key);
            inv.arg(*id);
        }
        if let Err(e) = self.run::<()>(&mut inv).await {
            self.unreachable(&e);
        }
    }

    /// How often [`RedisCounters::beat`] must run.
    pub fn beat_every(&self) -> Duration {
        self.slot_ttl / 3
    }
}

#[async_trait]
impl CounterBackend for RedisCounters {
    async fn reserve(&self, charges: &mut [Charge]) -> Result<(), Refusal> {
        if let Some(r) = self.known_refusal(charges) {
            return Err(r);
        }
        let mut inv = self.reserve.prepare_invoke();
        let slot_ttl = self.slot_ttl.as_millis() as u64;
        for c in charges.iter_mut() {
            inv.key(key_name(c));
            let (kind, span, id) = if c.dimension == Dimension::Concurrency {
                let id = self.next_slot.fetch_add(1, Ordering::Relaxed) & !LOCAL;
                c.mark = id;
                ("c", slot_ttl, id)
            } else {
                ("r", window_ms(c.dimension), 0)
            };
            inv.arg(kind)
                .arg(c.limit)
                .arg(c.amount.min(super::MAX_COUNT))
                .arg(span)
                .arg(id);
        }
        match self.run::<Vec<u64>>(&mut inv).await {
            Ok(out) => {
                let failed = out.first().copied().unwrap_or(0) as usize;
                if failed == 0 {
                    let n = charges.len();
                    let mut held = Self::lock(&self.held);
                    let mut seen = Self::lock(&self.seen);
                    for (i, c) in charges.iter_mut().enumerate() {
                        if c.dimension == Dimension::Concurrency {
                            held.insert(c.mark, key_name(c));
                        } else {
                            c.mark = out.get(i + 1).copied().unwrap_or(0);
                            // Only the key scope's figures go in headers; keeping others
                            // (one per client IP) would only grow the map.
                            if c.scope == Scope::Key {
                                let count = out.get(n + i + 1).copied().unwrap_or(0);
                                seen.insert(key_name(c), count);
                            }
                        }
                    }
                    return Ok(());
                }
                let c = charges.get(failed - 1).copied().unwrap_or(charges[0]);
                let left = Duration::from_millis(out.get(1).copied().unwrap_or(1000));
                // Only request counts: a token refusal says nothing about a smaller request.
                if matches!(c.dimension, Dimension::Rps | Dimension::Rpm) {
                    let until = crate::clock::monotonic_ms() + left.as_millis() as u64;
                    Self::lock(&self.refused).insert(key_name(&c), until);
                }
                Err(c.refusal(left))
            }
            Err(e) => {
                self.unreachable(&e);
                match self.on_error {
                    OnRedisError::Local => self.locally(charges).await,
                    OnRedisError::Refuse => {
                        let mut r = charges[0].refusal(Duration::from_secs(1));
                        r.unavailable = true;
                        Err(r)
                    }
                }
            }
        }
    }

    fn settle(&self, c: &Charge, actual: u64) {
        if c.mark & LOCAL != 0 {
            let scaled = Charge {
                limit: c.limit.div_ceil(self.instances),
                ..*c
            };
            return self.fallback.settle(&scaled, actual);
        }
        let delta =
            i128::from(actual.min(super::MAX_COUNT)) - i128::from(c.amount.min(super::MAX_COUNT));
        if delta != 0 {
            self.later(
                vec![key_name(c)],
                vec![c.mark.to_string(), delta.to_string()],
                "adjust",
            );
        }
    }

    fn release(&self, charges: &[Charge]) {
        for c in charges
            .iter()
            .filter(|c| c.dimension == Dimension::Concurrency)
        {
            if c.mark & LOCAL != 0 {
                self.fallback.release(std::slice::from_ref(c));
                continue;
            }
            Self::lock(&self.held).remove(&c.mark);
            self.zrem_later(key_name(c), c.mark);
        }
    }

    fn undo(&self, charges: &[Charge]) {
        for c in charges {
            if c.mark & LOCAL != 0 {
                self.fallback.undo(std::slice::from_ref(c));
            } else if c.dimension == Dimension::Concurrency {
                Self::lock(&self.held).remove(&c.mark);
                self.zrem_later(key_name(c), c.mark);
            } else {
                let amount = c.amount.min(super::MAX_COUNT);
                self.later(
                    vec![key_name(c)],
                    vec![c.mark.to_string(), format!("-{amount}")],
                    "adjust",
                );
            }
        }
    }

    fn room(&self, scope: Scope, key: u64, dimension: Dimension, limit: u64) -> Room {
        // The shared count as of this process's last charge of that key (asking again
        // would cost a round trip); the reset is the window's end on this process's clock.
        let probe = Charge {
            scope,
            key,
            dimension,
            limit,
            amount: 0,
            mark: 0,
        };
        let count = Self::lock(&self.seen)
            .get(&key_name(&probe))
            .copied()
            .unwrap_or(0);
        let span = window_ms(dimension);
        let wall = crate::clock::Clock::now_ms(&crate::clock::SystemClock) as u64;
        Room {
            limit,
            remaining: limit.saturating_sub(count),
            reset: Duration::from_millis(span - wall % span),
        }
    }
}
