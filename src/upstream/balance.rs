//! Balancers: how a server of an upstream is picked. Weighted round robin is
//! pingora-load-balancing's; least connections and the fastest (`latency`) are here, as
//! `BackendSelection`s that read server state living outside the selector.

use super::{index_of, latency, ServerState};
use pingora_load_balancing::selection::{BackendIter, BackendSelection};
use pingora_load_balancing::Backend;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Least-connections selection: the server with the fewest requests in flight relative to
/// its weight; ties go round robin so equal servers share evenly.
pub struct LeastConn {
    backends: Box<[Backend]>,
    load: Arc<[Arc<ServerState>]>,
    rotor: AtomicUsize,
}

impl BackendSelection for LeastConn {
    type Iter = Ordered<LeastConn>;
    type Config = Arc<[Arc<ServerState>]>;

    fn build_with_config(backends: &BTreeSet<Backend>, load: &Self::Config) -> Self {
        LeastConn {
            backends: backends.iter().cloned().collect(),
            load: Arc::clone(load),
            rotor: AtomicUsize::new(0),
        }
    }

    fn build(backends: &BTreeSet<Backend>) -> Self {
        LeastConn {
            backends: backends.iter().cloned().collect(),
            load: Arc::from(Vec::new()),
            rotor: AtomicUsize::new(0),
        }
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Ordered<LeastConn> {
        let n = self.backends.len();
        let start = self.rotor.fetch_add(1, Ordering::Relaxed);
        let in_flight = |i: usize| {
            self.load
                .get(index_of(&self.backends[i]))
                .map_or(0, |s| s.in_flight())
        };
        let mut order: Vec<(usize, usize)> = (0..n)
            .map(|k| (start + k) % n.max(1))
            .map(|i| (i, in_flight(i)))
            .collect();
        // Compare in_flight/weight without division: a/wa < b/wb  <=>  a*wb < b*wa.
        // The sort is stable, so the rotated order breaks ties.
        order.sort_by(|&(a, la), &(b, lb)| {
            (la * self.backends[b].weight).cmp(&(lb * self.backends[a].weight))
        });
        Ordered {
            order: order.into_iter().map(|(i, _)| i).collect(),
            pos: 0,
            selection: Arc::clone(self),
        }
    }
}

impl Backends for LeastConn {
    fn backends(&self) -> &[Backend] {
        &self.backends
    }
}

/// The backends a selection orders.
pub trait Backends {
    fn backends(&self) -> &[Backend];
}

/// A fixed order over a selection's backends, computed when the iterator is made.
pub struct Ordered<S> {
    order: Vec<usize>,
    pos: usize,
    selection: Arc<S>,
}

impl<S: Backends> BackendIter for Ordered<S> {
    fn next(&mut self) -> Option<&Backend> {
        let i = *self.order.get(self.pos)?;
        self.pos += 1;
        self.selection.backends().get(i)
    }
}

/// Power of two choices over time to first byte: two servers drawn at random, the one
/// with the lower [`latency::score`] first, then the other, then the rest by score (what
/// the caller cannot use is skipped in that order). See `latency` for the estimate.
pub struct Fastest {
    backends: Box<[Backend]>,
    load: Arc<[Arc<ServerState>]>,
    decay: Duration,
    seed: AtomicU64,
}

/// What [`Fastest`] reads: every server's state, and the upstream's `latency_decay`.
pub type FastestConfig = (Arc<[Arc<ServerState>]>, Duration);

impl BackendSelection for Fastest {
    type Iter = Ordered<Fastest>;
    type Config = FastestConfig;

    fn build_with_config(backends: &BTreeSet<Backend>, config: &Self::Config) -> Self {
        Fastest {
            backends: backends.iter().cloned().collect(),
            load: Arc::clone(&config.0),
            decay: config.1,
            seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    fn build(backends: &BTreeSet<Backend>) -> Self {
        Self::build_with_config(backends, &(Arc::from(Vec::new()), latency::DECAY))
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Ordered<Fastest> {
        let states: Vec<Option<&Arc<ServerState>>> = self
            .backends
            .iter()
            .map(|b| self.load.get(index_of(b)))
            .collect();
        let order = p2c_order(&states, self.decay, next_random(&self.seed));
        Ordered {
            order,
            pos: 0,
            selection: Arc::clone(self),
        }
    }
}

impl Backends for Fastest {
    fn backends(&self) -> &[Backend] {
        &self.backends
    }
}

/// A cheap shared random stream (splitmix64 over an atomic counter): P2C needs only that
/// two draws differ from request to request, not cryptographic quality.
pub(crate) fn next_random(seed: &AtomicU64) -> u64 {
    let mut z = seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The P2C order of candidates by their state (`None`: unknown, last): two drawn with
/// `random`, the better first, then the other, then the rest by score.
pub(crate) fn p2c_order(
    states: &[Option<&Arc<ServerState>>],
    decay: Duration,
    random: u64,
) -> Vec<usize> {
    let now = crate::clock::monotonic_ms();
    let estimates: Vec<Option<Duration>> = states
        .iter()
        .map(|s| s.and_then(|s| s.latency.estimate(now, decay)))
        .collect();
    let best_known = estimates
        .iter()
        .flatten()
        .min()
        .copied()
        .unwrap_or_default();
    let scores: Vec<f64> = states
        .iter()
        .zip(&estimates)
        .map(|(s, e)| match s {
            Some(s) => latency::score(*e, best_known, s.in_flight()),
            None => f64::INFINITY,
        })
        .collect();
    p2c_by_scores(&scores, random)
}

/// Power of two choices over `scores` (lower is better): two drawn with `random`, the
/// better first, then the other, then the rest by score.
pub(crate) fn p2c_by_scores(scores: &[f64], random: u64) -> Vec<usize> {
    let n = scores.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    if n >= 2 {
        let i = (random % n as u64) as usize;
        let j = (i + 1 + ((random >> 32) % (n as u64 - 1)) as usize) % n;
        let (first, second) = if scores[j] < scores[i] {
            (j, i)
        } else {
            (i, j)
        };
        order.retain(|&k| k != first && k != second);
        order.insert(0, second);
        order.insert(0, first);
    }
    order
}
