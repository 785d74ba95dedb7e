//! Driving the leases of the shared counters: what they give back, closing them when
//! their time is up or the process stops, and renewing them ahead of need.

use super::{late_call_failed, RedisCounters, Return};
use crate::limits::lease::counter;
use crate::limits::{Charge, Dimension};

impl RedisCounters {
    /// Sends what leases give back, in one call nothing waits for.
    pub(super) fn give_back(&self, back: Vec<Return>) {
        let items = self.items(back);
        self.finish_later(items);
    }

    /// Closes the leases past their time (run a few times a second).
    pub fn sweep(&self) {
        let mut back = Vec::new();
        self.leases.sweep(crate::clock::monotonic_ms(), &mut back);
        self.give_back(back);
    }

    /// Gives back every open lease's unused units (the instance stops), waiting for the
    /// call.
    pub async fn close_leases(&self) {
        let mut back = Vec::new();
        self.leases.close_all(&mut back);
        let items = self.items(back);
        if items.is_empty() {
            return;
        }
        let mut inv = self.finish.prepare_invoke();
        for (key, arg) in &items {
            inv.key(key);
            inv.arg(arg);
        }
        if let Err(e) = self.run::<()>(&mut inv).await {
            late_call_failed(&format!("the unused units of leases ({e})"));
        }
    }

    /// Queues leases to renew ahead and wakes the task that asks for them.
    pub(super) fn renew_later(&self, ahead: Vec<(Charge, u64)>) {
        if ahead.is_empty() {
            return;
        }
        Self::lock(&self.ahead).extend(ahead);
        self.ahead_ready.notify_one();
    }

    /// Asks for the leases queued to renew ahead, in one call no request waits for. A
    /// refusal or an error leaves them to the next request that finds its lease spent.
    pub async fn renew(&self) {
        let queued = std::mem::take(&mut *Self::lock(&self.ahead));
        if queued.is_empty() {
            return;
        }
        let (mut charges, wants): (Vec<Charge>, Vec<u64>) = queued.into_iter().unzip();
        match self.call_reserve(&mut charges, &wants).await {
            Ok(out) if out.first() == Some(&0) => {
                let now = crate::clock::monotonic_ms();
                self.note_counted(&mut charges, &out, now, true);
            }
            Ok(_) => {}
            Err(e) => {
                self.unreachable(&e);
                // A call that timed out may still have run: its slot and budget
                // reservations are given back (a rate's units, if any were counted, stay
                // until their window ends: fewer admitted, never more).
                let back = charges
                    .iter()
                    .filter(|c| matches!(c.dimension, Dimension::Concurrency | Dimension::Spend))
                    .map(|c| Return::Held {
                        counter: counter(c),
                        id: c.mark,
                        amount: 0,
                        cost: None,
                        base: c.base,
                        last: true,
                    })
                    .collect();
                self.give_back(back);
            }
        }
    }
}
