//! The in-process counter backend, on pingora-limits. Counting uses count-min sketches
//! (fixed memory whatever the number of keys or IPs; a hash collision can only
//! over-count, never under-count). Rates use a sliding-window estimate:
//! `previous window x (1 - elapsed fraction) + current window`, the way Cloudflare does.
//! The counters live on the service, so they survive config reloads.

use super::backend::CounterBackend;
use super::{count, Charge, Dimension, Refusal, Room, Scope};
use async_trait::async_trait;
use pingora_limits::estimator::Estimator;
use pingora_limits::rate::{Rate, RateComponents};
use std::time::Duration;

/// Counters of one scope.
struct ScopeCounters {
    rps: Rate,
    rpm: Rate,
    tpm: Rate,
    in_flight: Estimator,
}

impl ScopeCounters {
    fn new(slots: usize) -> Self {
        ScopeCounters {
            rps: Rate::new_with_estimator_config(Duration::from_secs(1), 4, slots),
            rpm: Rate::new_with_estimator_config(Duration::from_secs(60), 4, slots),
            tpm: Rate::new_with_estimator_config(Duration::from_secs(60), 4, slots),
            // pingora-limits' own Inflight uses 4 x 8192.
            in_flight: Estimator::new(4, 8192),
        }
    }

    fn rate(&self, d: Dimension) -> &Rate {
        match d {
            Dimension::Rps => &self.rps,
            Dimension::Tpm => &self.tpm,
            Dimension::Rpm | Dimension::Concurrency | Dimension::Spend => &self.rpm,
        }
    }
}

/// The sliding estimate of a window and the time until the current window ends.
fn estimate(c: RateComponents) -> (f64, Duration) {
    let prev = c.prev_samples.max(0) as f64;
    let curr = c.curr_samples.max(0) as f64;
    let left = c
        .interval
        .mul_f64((1.0 - c.current_interval_fraction).clamp(0.0, 1.0));
    (prev * (1.0 - c.current_interval_fraction) + curr, left)
}

/// Every limit counter of the process.
pub struct LocalCounters {
    scopes: [ScopeCounters; 5],
}

impl Default for LocalCounters {
    fn default() -> Self {
        LocalCounters {
            // In `Scope` order. 4 x 16384 counters per window: about 1 MiB per rate; more
            // room for IPs and keys.
            scopes: [
                ScopeCounters::new(64),
                ScopeCounters::new(16384),
                ScopeCounters::new(16384),
                ScopeCounters::new(4096),
                ScopeCounters::new(4096),
            ],
        }
    }
}

impl LocalCounters {
    fn of(&self, scope: Scope) -> &ScopeCounters {
        &self.scopes[scope as usize]
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
        if c.amount > c.limit {
            let (_, left) = rate.rate_with(&c.key, estimate);
            return Err(c.refusal(left));
        }
        let n = count(c.amount);
        rate.observe(&c.key, n);
        let (est, left) = rate.rate_with(&c.key, estimate);
        if est > c.limit as f64 {
            rate.observe(&c.key, -n);
            return Err(c.refusal(left));
        }
        Ok(())
    }
}

#[async_trait]
impl CounterBackend for LocalCounters {
    async fn reserve(&self, charges: &mut [Charge]) -> Result<(), Refusal> {
        for (i, c) in charges.iter().enumerate() {
            if let Err(r) = self.take(c) {
                self.undo(&charges[..i]);
                return Err(r);
            }
        }
        Ok(())
    }

    fn finish(&self, charges: &[Charge]) {
        for c in charges {
            match (c.dimension, c.settled) {
                (Dimension::Concurrency, _) => self.of(c.scope).in_flight.decr(c.key, 1),
                (Dimension::Tpm, Some(actual)) => {
                    let delta = count(actual).saturating_sub(count(c.amount));
                    if delta != 0 {
                        self.of(c.scope).tpm.observe(&c.key, delta);
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
                    counters.rate(d).observe(&c.key, -count(c.amount));
                }
            }
        }
    }

    fn room(&self, scope: Scope, key: u64, dimension: Dimension, limit: u64) -> Room {
        let (est, left) = self.of(scope).rate(dimension).rate_with(&key, estimate);
        Room {
            limit,
            remaining: (limit as f64 - est).max(0.0) as u64,
            reset: left,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(prev: isize, curr: isize, fraction: f64) -> RateComponents {
        // RateComponents is non-exhaustive: build it through a Rate-shaped closure.
        let r = Rate::new(Duration::from_secs(60));
        r.rate_with(&0u8, |mut c| {
            c.prev_samples = prev;
            c.curr_samples = curr;
            c.current_interval_fraction = fraction;
            c
        })
    }

    #[test]
    fn the_sliding_estimate_weighs_the_previous_window_by_what_is_left() {
        let (est, left) = estimate(comps(60, 0, 0.25));
        assert_eq!(est, 45.0);
        assert_eq!(left, Duration::from_secs(45));
        let (est, _) = estimate(comps(60, 10, 0.5));
        assert_eq!(est, 40.0);
        // Window rollover: the previous window no longer counts once the new one is over.
        let (est, left) = estimate(comps(0, 3, 0.999));
        assert_eq!(est, 3.0);
        assert!(left < Duration::from_millis(100));
    }
}
