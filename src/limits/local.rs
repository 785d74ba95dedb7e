//! The in-process counter backend. Counting uses count-min sketches (fixed memory whatever
//! the number of keys or IPs; a hash collision can only over-count, never under-count):
//! rates in [`Window`]s, with a sliding-window estimate (`previous window x (1 - elapsed
//! fraction) + current window`, the way Cloudflare does), requests in flight in
//! pingora-limits' `Estimator`. The counters live on the service, so they survive config
//! reloads.

use super::backend::CounterBackend;
use super::window::{random_seed, Window};
use super::{count, Charge, Dimension, Refusal, Room, Scope};
use crate::clock::monotonic_ms;
use async_trait::async_trait;
use pingora_limits::estimator::Estimator;
use std::time::Duration;

/// Counters of one scope.
struct ScopeCounters {
    rps: Window,
    rpm: Window,
    tpm: Window,
    in_flight: Estimator,
}

impl ScopeCounters {
    fn new(slots: usize, seed: u64) -> Self {
        ScopeCounters {
            rps: Window::new(Duration::from_secs(1), slots, seed),
            rpm: Window::new(Duration::from_secs(60), slots, seed),
            tpm: Window::new(Duration::from_secs(60), slots, seed),
            // pingora-limits' own Inflight uses 4 x 8192.
            in_flight: Estimator::new(4, 8192),
        }
    }

    fn rate(&self, d: Dimension) -> &Window {
        match d {
            Dimension::Rps => &self.rps,
            Dimension::Tpm => &self.tpm,
            Dimension::Rpm | Dimension::Concurrency | Dimension::Spend => &self.rpm,
        }
    }
}

/// Every limit counter of the process.
pub struct LocalCounters {
    scopes: [ScopeCounters; 5],
}

impl Default for LocalCounters {
    fn default() -> Self {
        let seed = random_seed();
        LocalCounters {
            // In `Scope` order. 4 x 16384 counters per window: about 1 MiB per rate; more
            // room for IPs and keys.
            scopes: [
                ScopeCounters::new(64, seed),
                ScopeCounters::new(16384, seed),
                ScopeCounters::new(16384, seed),
                ScopeCounters::new(4096, seed),
                ScopeCounters::new(4096, seed),
            ],
        }
    }
}

impl LocalCounters {
    fn of(&self, scope: Scope) -> &ScopeCounters {
        &self.scopes[scope as usize]
    }

    /// Counts every charge, or refuses the first that does not fit and counts none.
    fn take_all(&self, charges: &[Charge]) -> Result<(), Refusal> {
        for (i, c) in charges.iter().enumerate() {
            if let Err(r) = self.take(c) {
                self.undo(&charges[..i]);
                return Err(r);
            }
        }
        Ok(())
    }

    /// Counts one charge, or refuses it without counting.
    fn take(&self, c: &Charge) -> Result<(), Refusal> {
        let counters = self.of(c.scope);
        if c.dimension == Dimension::Spend {
            // Budgets in one process are counted by `keys::budget`.
            return Ok(());
        }
        if c.dimension == Dimension::Concurrency {
            let now = counters.in_flight.incr(c.key, 1);
            if now > count(c.limit) {
                counters.in_flight.decr(c.key, 1);
                return Err(c.refusal(Duration::from_secs(1)));
            }
            return Ok(());
        }
        let rate = counters.rate(c.dimension);
        // A charge that alone exceeds its limit is refused before it touches a counter: a
        // client's number never reaches the sketch unbounded (it would wrap the counter).
        let now = monotonic_ms();
        if c.amount > c.limit {
            let (_, left) = rate.estimate(now, c.key);
            return Err(c.refusal(left));
        }
        let n = count(c.amount);
        let (est, left) = rate.add_and_estimate(now, c.key, n);
        if est > c.limit as f64 {
            rate.add(now, c.key, -n);
            return Err(c.refusal(left));
        }
        Ok(())
    }
}

#[async_trait]
impl CounterBackend for LocalCounters {
    async fn reserve(&self, charges: &mut [Charge]) -> Result<(), Refusal> {
        self.take_all(charges)
    }

    fn reserve_now(&self, charges: &mut [Charge]) -> Option<Result<(), Refusal>> {
        Some(self.take_all(charges))
    }

    fn finish(&self, charges: &[Charge]) {
        for c in charges {
            match (c.dimension, c.settled) {
                (Dimension::Concurrency, _) => self.of(c.scope).in_flight.decr(c.key, 1),
                (Dimension::Tpm, Some(actual)) => {
                    let delta = count(actual).saturating_sub(count(c.amount));
                    if delta != 0 {
                        self.of(c.scope).tpm.add(monotonic_ms(), c.key, delta);
                    }
                }
                _ => {}
            }
        }
    }

    fn undo(&self, charges: &[Charge]) {
        for c in charges {
            let counters = self.of(c.scope);
            match c.dimension {
                Dimension::Concurrency => counters.in_flight.decr(c.key, 1),
                Dimension::Spend => {}
                d => {
                    counters
                        .rate(d)
                        .add(monotonic_ms(), c.key, -count(c.amount));
                }
            }
        }
    }

    fn room(&self, scope: Scope, key: u64, dimension: Dimension, limit: u64) -> Room {
        let (est, left) = self.of(scope).rate(dimension).estimate(monotonic_ms(), key);
        Room {
            limit,
            remaining: (limit as f64 - est).max(0.0) as u64,
            reset: left,
        }
    }
}
