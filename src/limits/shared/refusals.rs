//! The request rates this process saw refused in their current window, so that the next
//! request over the same limit is refused without a round trip until the window frees
//! room. Only request counts are remembered: a token refusal says nothing about a
//! smaller request. A rate a request was taken back from (`undo`) is forgotten, and a
//! refusal that may have overtaken that give-back (sent without waiting) is not
//! remembered.

use super::super::lease::{counter, Counter};
use super::super::{Charge, Dimension, Refusal};
use super::RedisCounters;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub(super) struct Refusals {
    /// Counter -> until (monotonic ms).
    refused: Mutex<HashMap<Counter, u64>>,
    /// Counter -> when a request was taken back from it (monotonic ms).
    undone: Mutex<HashMap<Counter, u64>>,
}

fn is_rate(c: &Charge) -> bool {
    matches!(c.dimension, Dimension::Rps | Dimension::Rpm)
}

impl Refusals {
    /// The refusal of the first of `charges` refused in its window, if any.
    pub(super) fn known(&self, charges: &[Charge], now: u64) -> Option<Refusal> {
        let mut refused = RedisCounters::lock(&self.refused);
        if refused.is_empty() {
            return None;
        }
        refused.retain(|_, until| *until > now);
        charges.iter().find_map(|c| {
            let until = *refused.get(&counter(c))?;
            Some(c.refusal(Duration::from_millis(until.saturating_sub(now))))
        })
    }

    /// `c` was refused at `now` until `left` from now. `in_flight` is how long a give-back
    /// may take to arrive (the call timeout).
    pub(super) fn remember(&self, c: &Charge, now: u64, left: Duration, in_flight: Duration) {
        if !is_rate(c) {
            return;
        }
        {
            let mut undone = RedisCounters::lock(&self.undone);
            undone.retain(|_, at| now.saturating_sub(*at) < in_flight.as_millis() as u64);
            if undone.contains_key(&counter(c)) {
                return;
            }
        }
        RedisCounters::lock(&self.refused).insert(counter(c), now + left.as_millis() as u64);
    }

    /// Requests were taken back from these charges' rates at `now`.
    pub(super) fn undone(&self, charges: &[Charge], now: u64) {
        let (mut refused, mut undone) = (
            RedisCounters::lock(&self.refused),
            RedisCounters::lock(&self.undone),
        );
        for c in charges.iter().filter(|c| is_rate(c)) {
            refused.remove(&counter(c));
            undone.insert(counter(c), now);
        }
    }
}
