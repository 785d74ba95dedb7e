//! Balancers: how a server of an upstream is picked. Weighted round robin is
//! pingora-load-balancing's; least connections is here. Routing strategies across routes
//! plug in beside them.

use super::{index_of, ServerState};
use pingora_load_balancing::selection::{BackendIter, BackendSelection};
use pingora_load_balancing::Backend;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Least-connections selection: the server with the fewest requests in flight relative to
/// its weight; ties go round robin so equal servers share evenly.
pub struct LeastConn {
    backends: Box<[Backend]>,
    load: Arc<[Arc<ServerState>]>,
    rotor: AtomicUsize,
}

impl BackendSelection for LeastConn {
    type Iter = LeastConnIter;
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

    fn iter(self: &Arc<Self>, _key: &[u8]) -> LeastConnIter {
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
        LeastConnIter {
            order: order.into_iter().map(|(i, _)| i).collect(),
            pos: 0,
            selection: Arc::clone(self),
        }
    }
}

pub struct LeastConnIter {
    order: Vec<usize>,
    pos: usize,
    selection: Arc<LeastConn>,
}

impl BackendIter for LeastConnIter {
    fn next(&mut self) -> Option<&Backend> {
        let i = *self.order.get(self.pos)?;
        self.pos += 1;
        self.selection.backends.get(i)
    }
}
