//! The counter backend shared by every instance: Redis (`cluster.redis`). One request's
//! charges of a stage are checked and counted by one server-side script, in one round
//! trip, all or nothing, on the Redis server's clock (no skew between instances).
//!
//! - A rate (`rps`, `rpm`, `tpm`) is one hash per scope key and dimension holding the
//!   current fixed window's index and count and the previous window's count; the
//!   estimate is the same sliding one as in-process (`previous x (1 - elapsed fraction) +
//!   current`). Each hash expires two windows after the start of the last window it was used in.
//! - A concurrency limit is one hash per scope key of the slots held (`r:ID` =
//!   `AMOUNT:EXPIRES`: one request's slot, or a lease of several), each expiring after
//!   `cluster.slot_ttl`. Slots are released when the request (or the lease) ends, by any
//!   path; while it lasts, a heartbeat pushes the expiry forward every third of the TTL,
//!   so the slots of an instance that died come back within `slot_ttl` and no request
//!   outlives its slot.
//! - Under large limits most requests make no call at all: they are taken from leases
//!   (`lease.rs`, driven by `shared/leasing.rs`).
//! - Every key carries the hash tag `{tollgate-limits}`: a script may only touch keys of
//!   one Redis Cluster slot, so all limit keys live on one shard.
//!
//! When Redis cannot be reached (a 250 ms timeout per call), `cluster.on_redis_error`
//! decides: `local` counts in this process at `limit / cluster.expected_instances`
//! (rounded up), `refuse` answers 503. Both are logged and counted; Redis is tried again
//! on the next request. A request rate already refused in its current window is refused
//! again without a round trip until the window frees room.

use super::backend::CounterBackend;
use super::lease::{counter, is_taken, Counter, Grant, Leases, Return, LEASED};
use super::local::LocalCounters;
use super::scripts::{argument, counter_name, finish_item, key_name, window_ms, Field};
use super::{Charge, Dimension, Refusal, Room, Scope};

mod leasing;
mod refusals;
use crate::store::cluster::{SharedRedis, CALL_TIMEOUT};
use async_trait::async_trait;
use refusals::Refusals;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A mark with this bit set: the charge was counted in the local fallback.
const LOCAL: u64 = super::COUNTED_HERE;

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

use super::scripts::{script, FINISH, HEARTBEAT, RESERVE};

/// How long a call nothing waits for may take (the end of a request, late counts). It is
/// not the request path's `CALL_TIMEOUT`: giving up on one of these loses what it
/// carries (a reservation stays held until it expires, a settled cost is never counted),
/// and under a burst the calls of a thousand ending requests can queue for longer than a
/// request may wait. The bound only keeps tasks from piling up while Redis hangs.
const LATE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A call nothing waited for failed: counted and logged (at most every 10 s).
fn late_call_failed(what: &str) {
    if let Some(m) = crate::metrics::get() {
        m.limits_redis_errors.inc();
    }
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::clock::monotonic_ms();
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        log::warn!("limits: a call to the shared counters (Redis) failed: {what} may be lost");
    }
}

pub struct RedisCounters {
    redis: std::sync::Arc<SharedRedis>,
    reserve: redis::Script,
    finish: redis::Script,
    heartbeat: redis::Script,
    fallback: LocalCounters,
    on_error: OnRedisError,
    instances: u64,
    slot_ttl: Duration,
    /// Slots, budget reservations and leases held now (id -> counter), for the heartbeat.
    held: Mutex<HashMap<u64, Counter>>,
    /// Rates refused in their current window.
    refused: Refusals,
    /// The last shared count seen per rate counter, for the `x-ratelimit-*` headers.
    seen: Mutex<HashMap<Counter, u64>>,
    next_slot: AtomicU64,
    last_warning: AtomicU64,
    leases: Leases,
    /// Leases to renew ahead (a charge of nothing and the lease to ask for), and the
    /// wake-up of the task that asks for them.
    ahead: Mutex<Vec<(Charge, u64)>>,
    pub(crate) ahead_ready: tokio::sync::Notify,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
}

/// The options of [`RedisCounters::new`] (the `cluster` section).
pub struct SharedOptions {
    pub on_error: OnRedisError,
    pub instances: u64,
    pub slot_ttl: Duration,
    /// `cluster.leases`.
    pub leases: bool,
    /// Wall time: when the minute windows of the rate-limit headers end.
    pub clock: std::sync::Arc<dyn crate::clock::Clock>,
}

impl RedisCounters {
    /// Nothing connects until the first request.
    pub fn new(url: &str, options: SharedOptions) -> Result<Self, String> {
        let SharedOptions {
            on_error,
            instances,
            slot_ttl,
            leases,
            clock,
        } = options;
        let redis = std::sync::Arc::new(SharedRedis::open(url)?);
        let seed = clock.now_ms() as u64 ^ (u64::from(std::process::id()) << 32);
        Ok(RedisCounters {
            redis,
            reserve: script(RESERVE),
            finish: script(FINISH),
            heartbeat: script(HEARTBEAT),
            fallback: LocalCounters::default(),
            on_error,
            instances: instances.max(1),
            slot_ttl,
            held: Mutex::new(HashMap::new()),
            refused: Refusals::default(),
            seen: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(seed & !(LOCAL | LEASED)),
            last_warning: AtomicU64::new(0),
            leases: Leases::new(leases, instances),
            ahead: Mutex::new(Vec::new()),
            ahead_ready: tokio::sync::Notify::new(),
            clock,
        })
    }

    fn unreachable(&self, what: &str) {
        if let Some(m) = crate::metrics::get() {
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
        self.refused.known(charges, crate::clock::monotonic_ms())
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

    /// A fresh slot, reservation or lease id.
    fn next_id(&self) -> u64 {
        self.next_slot.fetch_add(1, Ordering::Relaxed) & !(LOCAL | LEASED)
    }

    /// The keys and arguments of a RESERVE call for `charges`, giving each slot and budget
    /// reservation its id; `wants`: the lease to ask for with each (none when empty).
    fn reserve_call(&self, charges: &mut [Charge], wants: &[u64]) -> (Vec<String>, Vec<String>) {
        let slot_ttl = self.slot_ttl.as_millis() as u64;
        let mut keys = Vec::with_capacity(charges.len());
        let mut args = Vec::with_capacity(charges.len());
        for (i, c) in charges.iter_mut().enumerate() {
            keys.push(key_name(counter(c)));
            let (kind, span, id) = match c.dimension {
                Dimension::Concurrency | Dimension::Spend => {
                    let id = self.next_id();
                    c.mark = id;
                    let kind = if c.dimension == Dimension::Spend {
                        "s"
                    } else {
                        "c"
                    };
                    (kind, slot_ttl, id)
                }
                d => ("r", window_ms(d), 0),
            };
            let cap = if c.dimension == Dimension::Spend {
                super::MAX_SPEND
            } else {
                super::MAX_COUNT
            };
            args.push(argument(&[
                Field::Word(kind),
                Field::Number(c.limit.min(cap)),
                Field::Number(c.amount.min(cap)),
                Field::Number(span),
                Field::Number(id),
                Field::Number(c.base.min(cap)),
                Field::Number(wants.get(i).copied().unwrap_or(0)),
            ]));
        }
        (keys, args)
    }

    /// Spawns one FINISH call (nothing waits for it) with `items`: a key and its
    /// argument each.
    fn finish_later(&self, items: Vec<(String, String)>) {
        if items.is_empty() {
            return;
        }
        let Some(mut c) = self.redis.made() else {
            return;
        };
        let script = self.finish.clone();
        tokio::spawn(async move {
            let mut inv = script.prepare_invoke();
            for (key, arg) in &items {
                inv.key(key);
                inv.arg(arg);
            }
            let done =
                tokio::time::timeout(LATE_CALL_TIMEOUT, inv.invoke_async::<()>(&mut c)).await;
            if !matches!(done, Ok(Ok(()))) {
                late_call_failed("the end of a request (its slots, reservations and settled cost)");
            }
        });
    }

    /// The FINISH items of `charges`: each slot and budget reservation given back, and
    /// each settled amount counted in place of its estimate (`undo`: every rate taken back
    /// whole, and no cost charged). Charges taken from a lease go to the lease, and only
    /// what it gives back (if anything) becomes an item.
    fn finish_items(&self, charges: &[Charge], undo: bool) -> Vec<(String, String)> {
        let mut back = Vec::new();
        let mut items = Vec::new();
        {
            let mut held = Self::lock(&self.held);
            for c in charges.iter().filter(|c| c.mark & LOCAL == 0) {
                if c.mark & LEASED != 0 {
                    self.leases.finish(c, undo, &mut back);
                    continue;
                }
                let item = match c.dimension {
                    Dimension::Concurrency | Dimension::Spend => {
                        held.remove(&c.mark);
                        let cost = (c.dimension == Dimension::Spend && !undo)
                            .then_some(c.settled)
                            .flatten();
                        Return::Held {
                            counter: counter(c),
                            id: c.mark,
                            amount: 0,
                            cost,
                            base: c.base,
                            last: true,
                        }
                    }
                    _ => {
                        let cap = |n: u64| i128::from(n.min(super::MAX_COUNT));
                        let delta = match (undo, c.settled) {
                            (true, _) => -cap(c.amount),
                            (false, Some(actual)) => cap(actual) - cap(c.amount),
                            (false, None) => 0,
                        };
                        if delta == 0 {
                            continue;
                        }
                        Return::Rate {
                            counter: counter(c),
                            window: c.mark,
                            delta,
                        }
                    }
                };
                items.push(item);
            }
        }
        items.extend(back);
        self.items(items)
    }

    /// FINISH items, in the script's layout; a reservation given back for the last time
    /// is no longer kept alive by the heartbeat.
    fn items(&self, returns: Vec<Return>) -> Vec<(String, String)> {
        if returns.is_empty() {
            return Vec::new();
        }
        let mut held = Self::lock(&self.held);
        for r in &returns {
            if let Return::Held { id, last: true, .. } = r {
                held.remove(id);
            }
        }
        returns.iter().map(finish_item).collect()
    }

    /// Pushes the expiry of every slot held by this process forward (run every third of
    /// `slot_ttl`).
    pub async fn beat(&self) {
        let held: Vec<(u64, String)> = Self::lock(&self.held)
            .iter()
            .map(|(id, &(scope, key, dimension))| (*id, counter_name(scope, key, dimension)))
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

impl RedisCounters {
    /// One RESERVE call for `charges` with the leases in `wants`: the script's answer.
    async fn call_reserve(
        &self,
        charges: &mut [Charge],
        wants: &[u64],
    ) -> Result<Vec<u64>, String> {
        let (keys, args) = self.reserve_call(charges, wants);
        let mut inv = self.reserve.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for a in &args {
            inv.arg(a);
        }
        self.run::<Vec<u64>>(&mut inv).await
    }

    /// Checks and counts `charges` in Redis, asking for the leases in `wants`.
    async fn counted(
        &self,
        charges: &mut [Charge],
        wants: &[u64],
        now: u64,
    ) -> Result<(), Refusal> {
        match self.call_reserve(charges, wants).await {
            Ok(out) => {
                let failed = out.first().copied().unwrap_or(0) as usize;
                if failed == 0 {
                    self.note_counted(charges, &out, now, false);
                    return Ok(());
                }
                let c = charges.get(failed - 1).copied().unwrap_or(charges[0]);
                let left = Duration::from_millis(out.get(1).copied().unwrap_or(1000));
                self.refused
                    .remember(&c, crate::clock::monotonic_ms(), left, CALL_TIMEOUT);
                let mut r = c.refusal(left);
                r.spent = out.get(2).copied().unwrap_or(0);
                Err(r)
            }
            Err(e) => {
                self.unreachable(&e);
                // A call that timed out may still have run: give back the slots and
                // reservations it would have taken (idempotent; rates are left, at worst
                // one request counted twice).
                let taken: Vec<Charge> = charges
                    .iter()
                    .filter(|c| matches!(c.dimension, Dimension::Concurrency | Dimension::Spend))
                    .map(|c| Charge {
                        settled: None,
                        ..*c
                    })
                    .collect();
                self.finish_later(self.finish_items(&taken, true));
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

    /// Notes what a RESERVE call counted: each charge's mark, the shared figures, the
    /// slots and reservations to keep alive, and the leases granted.
    fn note_counted(&self, charges: &mut [Charge], out: &[u64], now: u64, ahead: bool) {
        let n = charges.len();
        let at = |i: usize| out.get(i).copied().unwrap_or(0);
        let mut back = Vec::new();
        {
            let mut held = Self::lock(&self.held);
            let mut seen = Self::lock(&self.seen);
            for (i, c) in charges.iter_mut().enumerate() {
                let (figure, extra) = (at(n + i + 1), at(2 * n + i + 1));
                let id = match c.dimension {
                    Dimension::Concurrency | Dimension::Spend => {
                        held.insert(c.mark, counter(c));
                        if c.dimension == Dimension::Spend {
                            // What the budget had spent, for this instance's figures.
                            c.base = figure;
                        }
                        c.mark
                    }
                    _ => {
                        c.mark = at(i + 1);
                        // Only the key scope's figures go in headers; keeping others
                        // (one per client IP) would only grow the map.
                        if c.scope == Scope::Key {
                            seen.insert(counter(c), figure.saturating_sub(extra));
                        }
                        if extra > 0 {
                            self.next_id()
                        } else {
                            0
                        }
                    }
                };
                if extra > 0 {
                    let grant = Grant {
                        extra,
                        id,
                        window: at(i + 1),
                        left_ms: at(3 * n + i + 1),
                        figure,
                        ahead,
                    };
                    self.leases.grant(c, &grant, now, &mut back);
                } else if ahead && matches!(c.dimension, Dimension::Concurrency | Dimension::Spend)
                {
                    // Nothing granted: the empty reservation goes.
                    back.push(Return::Held {
                        counter: counter(c),
                        id,
                        amount: 0,
                        cost: None,
                        base: c.base,
                        last: true,
                    });
                }
            }
        }
        self.give_back(back);
    }
}

#[async_trait]
impl CounterBackend for RedisCounters {
    async fn reserve(&self, charges: &mut [Charge]) -> Result<(), Refusal> {
        if let Some(r) = self.known_refusal(charges) {
            return Err(r);
        }
        let now = crate::clock::monotonic_ms();
        let (mut wants, mut back, mut ahead) = (Vec::new(), Vec::new(), Vec::new());
        let taken = self
            .leases
            .take(charges, now, &mut wants, &mut back, &mut ahead);
        self.give_back(back);
        self.renew_later(ahead);
        if taken == 0 {
            return self.counted(charges, &wants, now).await;
        }
        let all = u64::MAX >> 64u32.saturating_sub(charges.len() as u32);
        if taken == all {
            return Ok(());
        }
        // Those the leases could not take make one call.
        let (mut rest, mut rest_wants) = (Vec::new(), Vec::new());
        for (i, c) in charges
            .iter()
            .enumerate()
            .filter(|(i, _)| !is_taken(taken, *i))
        {
            rest.push(*c);
            rest_wants.push(wants[i]);
        }
        match self.counted(&mut rest, &rest_wants, now).await {
            Ok(()) => {
                let mut counted = rest.into_iter();
                for (i, c) in charges.iter_mut().enumerate() {
                    if !is_taken(taken, i) {
                        if let Some(r) = counted.next() {
                            *c = r;
                        }
                    }
                }
                Ok(())
            }
            Err(r) => {
                let mut back = Vec::new();
                self.leases.untake(charges, taken, &mut back);
                self.give_back(back);
                Err(r)
            }
        }
    }

    fn finish(&self, charges: &[Charge]) {
        let local: Vec<Charge> = charges
            .iter()
            .filter(|c| c.mark & LOCAL != 0)
            .map(|c| Charge {
                limit: c.limit.div_ceil(self.instances),
                ..*c
            })
            .collect();
        if !local.is_empty() {
            self.fallback.finish(&local);
        }
        let mut items = self.finish_items(charges, false);
        // Spend counted in this process while Redis could not be reached still goes to the
        // shared counter (no reservation to drop), so that it holds every instance's spend.
        let spent_here = local
            .iter()
            .filter(|c| c.dimension == Dimension::Spend)
            .filter_map(|c| {
                // An id no reservation has (ids never set the top bit).
                Some(Return::Held {
                    counter: counter(c),
                    id: LOCAL,
                    amount: 0,
                    cost: Some(c.settled?),
                    base: c.base,
                    last: false,
                })
            })
            .collect();
        items.extend(self.items(spent_here));
        self.finish_later(items);
    }

    fn undo(&self, charges: &[Charge]) {
        let local: Vec<Charge> = charges
            .iter()
            .filter(|c| c.mark & LOCAL != 0)
            .copied()
            .collect();
        if !local.is_empty() {
            self.fallback.undo(&local);
        }
        // Room given back: a rate refused in this window may fit again.
        self.refused.undone(charges, crate::clock::monotonic_ms());
        let items = self.finish_items(charges, true);
        self.finish_later(items);
    }

    fn defers(&self) -> bool {
        true
    }

    fn count_later(&self, mut charges: Vec<Charge>) {
        // Request rates only (stage one has no slot): nothing to give back later.
        charges.retain(|c| matches!(c.dimension, Dimension::Rps | Dimension::Rpm));
        // What leases can take is counted there at once, and ends at once.
        let (mut wants, mut back, mut ahead) = (Vec::new(), Vec::new(), Vec::new());
        let now = crate::clock::monotonic_ms();
        let taken = self
            .leases
            .take(&mut charges, now, &mut wants, &mut back, &mut ahead);
        self.renew_later(ahead);
        for (i, c) in charges.iter().enumerate() {
            if is_taken(taken, i) {
                self.leases.finish(c, false, &mut back);
            }
        }
        self.give_back(back);
        let mut i = 0;
        charges.retain(|_| {
            i += 1;
            !is_taken(taken, i - 1)
        });
        if charges.is_empty() {
            return;
        }
        let (keys, args) = self.reserve_call(&mut charges, &[]);
        let script = self.reserve.clone();
        // Connecting if need be: the request that ends here may be this instance's first.
        let redis = std::sync::Arc::clone(&self.redis);
        tokio::spawn(async move {
            let Ok(mut conn) = redis.conn().await else {
                return;
            };
            let mut inv = script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &args {
                inv.arg(a);
            }
            let call = inv.invoke_async::<redis::Value>(&mut conn);
            if !matches!(
                tokio::time::timeout(LATE_CALL_TIMEOUT, call).await,
                Ok(Ok(_))
            ) {
                late_call_failed("the request counts of requests that ended early");
            }
        });
    }

    fn known_refusal(&self, charges: &[Charge]) -> Option<Refusal> {
        RedisCounters::known_refusal(self, charges)
    }

    fn counts_spend(&self) -> bool {
        true
    }

    async fn spent(&self, scope: Scope, key: u64) -> Option<u64> {
        let name = counter_name(scope, key, Dimension::Spend);
        let mut c = self.redis.conn().await.ok()?;
        let mut cmd = redis::cmd("HGET");
        cmd.arg(name).arg("s");
        let read = cmd.query_async::<Option<u64>>(&mut c);
        tokio::time::timeout(CALL_TIMEOUT, read).await.ok()?.ok()?
    }

    fn room(&self, scope: Scope, key: u64, dimension: Dimension, limit: u64) -> Room {
        // The shared count as of this process's last charge of that key (asking again
        // would cost a round trip); the reset is the window's end on this process's clock.
        let count = Self::lock(&self.seen)
            .get(&(scope, key, dimension))
            .copied()
            .unwrap_or(0);
        let span = window_ms(dimension);
        let wall = self.clock.now_ms().max(0) as u64;
        Room {
            limit,
            remaining: limit.saturating_sub(count),
            reset: Duration::from_millis(span - wall % span),
        }
    }
}
