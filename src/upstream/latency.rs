//! How fast a server answers now: a peak-sensitive moving average of its time to first
//! byte (the response header), per server, shared by every alias that reaches it. Read by
//! the `latency` balancer and the `latency` routing strategy; written after each attempt
//! that got a header. Lock-free: two atomics, read and written on the request path.
//!
//! The constants, and why:
//! - A sample above the estimate replaces it at once (peak sensitivity: a server that
//!   slows down loses traffic on its next answer, not after many).
//! - A sample below it is blended in with weight `1 - exp(-gap / DECAY)`, where `gap` is
//!   the time since the last sample: a server answering often converges within about
//!   `DECAY`, one answering rarely takes each sample nearly as it is.
//! - While a server gets no samples, its estimate decays toward zero with the same
//!   `DECAY` when it is read: a slow server that stopped getting traffic looks better and
//!   better until it is picked again (a probe). If it is still slow, the probe's sample
//!   puts the estimate back up at once; if it recovered, it takes its share back. A server
//!   `k` times slower than its peers is probed after about `DECAY x ln(k)`.
//! - A server with no sample yet is as good as the best of its peers (optimistic), and
//!   every estimate is multiplied by `1 + requests in flight` when compared, so a new
//!   server is not flooded: each request sent to it makes it look busier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How fast estimates follow new samples and decay when idle (see the module comment).
pub const DECAY: Duration = Duration::from_secs(10);

/// A server's time-to-first-byte estimate.
#[derive(Debug, Default)]
pub struct Latency {
    /// The estimate in microseconds, as `f64` bits; 0 before the first sample.
    micros: AtomicU64,
    /// When the estimate was last updated (`clock::monotonic_ms`); 0: never.
    at_ms: AtomicU64,
}

impl Latency {
    /// Takes one time-to-first-byte sample at `now_ms`.
    pub fn observe(&self, sample: Duration, now_ms: u64, decay: Duration) {
        let sample = sample.as_secs_f64() * 1e6;
        let at = self.at_ms.load(Ordering::Relaxed);
        let current = f64::from_bits(self.micros.load(Ordering::Relaxed));
        let next = if at == 0 || sample >= current {
            sample
        } else {
            let gap = now_ms.saturating_sub(at) as f64;
            let keep = (-gap / decay.as_millis().max(1) as f64).exp();
            current * keep + sample * (1.0 - keep)
        };
        // Two requests finishing together may interleave these stores; either result is a
        // valid estimate, and the next sample corrects it.
        self.micros.store(next.to_bits(), Ordering::Relaxed);
        self.at_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// The estimate at `now_ms` (decayed while idle), or `None` before the first sample.
    pub fn estimate(&self, now_ms: u64, decay: Duration) -> Option<Duration> {
        let at = self.at_ms.load(Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        let current = f64::from_bits(self.micros.load(Ordering::Relaxed));
        let idle = now_ms.saturating_sub(at) as f64;
        let decayed = current * (-idle / decay.as_millis().max(1) as f64).exp();
        Some(Duration::from_secs_f64(decayed.max(0.0) / 1e6))
    }
}

/// What a candidate costs under the `latency` choice: its estimate (or, before its first
/// sample, the best estimate among its peers) times one plus its requests in flight.
pub fn score(estimate: Option<Duration>, best_known: Duration, in_flight: usize) -> f64 {
    let e = estimate.unwrap_or(best_known).as_secs_f64() * 1e6;
    // A floor of 1 µs, so that busy servers with a zero estimate still compare by load.
    e.max(1.0) * (1 + in_flight) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = DECAY;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_slower_sample_replaces_the_estimate_at_once() {
        let l = Latency::default();
        assert_eq!(l.estimate(1, D), None);
        l.observe(ms(10), 1_000, D);
        l.observe(ms(80), 1_001, D);
        assert_eq!(l.estimate(1_001, D).unwrap().as_millis(), 80);
    }

    #[test]
    fn a_faster_sample_is_blended_by_the_time_since_the_last() {
        let l = Latency::default();
        l.observe(ms(100), 1_000, D);
        // Right after: almost no weight.
        l.observe(ms(10), 1_001, D);
        let e = l.estimate(1_001, D).unwrap().as_secs_f64() * 1e3;
        assert!(e > 99.0, "{e}");
        // One DECAY later: weight 1 - 1/e.
        let l = Latency::default();
        l.observe(ms(100), 1_000, D);
        l.observe(ms(10), 11_000, D);
        let e = l.estimate(11_000, D).unwrap().as_secs_f64() * 1e3;
        let want = 100.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((e - want).abs() < 0.01, "{e} vs {want}");
    }

    #[test]
    fn an_idle_estimate_decays_so_a_slow_server_is_probed_again() {
        let l = Latency::default();
        l.observe(ms(50), 1_000, D);
        let at = |t| l.estimate(t, D).unwrap().as_secs_f64() * 1e3;
        assert!((at(1_000) - 50.0).abs() < 1e-6);
        assert!((at(11_000) - 50.0 / std::f64::consts::E).abs() < 1e-3);
        // 50x slower than a 1 ms peer: looks as good after DECAY x ln(50), about 39 s.
        assert!(at(40_200) < 1.0);
        assert!(at(38_000) > 1.0);
    }

    #[test]
    fn requests_in_flight_make_a_server_look_busier_and_new_servers_are_optimistic() {
        let fast = score(Some(ms(10)), ms(10), 0);
        assert!(score(None, ms(10), 0) <= fast);
        assert!(score(None, ms(10), 1) > fast);
        assert!(score(Some(ms(10)), ms(10), 8) < score(Some(ms(50)), ms(10), 1));
        assert!(score(Some(Duration::ZERO), ms(10), 3) > score(Some(Duration::ZERO), ms(10), 0));
    }
}
