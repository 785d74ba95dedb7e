//! Leases: a share of a shared counter's room that an instance takes from Redis in the
//! call of one request and spends in this process, so that the requests after it make no
//! call at all.
//!
//! A lease's units are counted in Redis when it is granted (in a rate's window, or as one
//! slot or budget reservation of that size), so a lease never lets a counter pass its
//! limit. What it costs is fairness: room one instance leased and has not used yet is not
//! room for the others. That is bounded: a lease is at most the limit / (16 x
//! `cluster.expected_instances`), Redis grants one only while the room left after it is
//! at least twice its size, and each instance holds at most one open lease per counter;
//! near the limit every request makes its own call, exactly as without leases.
//!
//! A lease takes admissions for at most [`LIFE_MS`] (a rate's, also only until its window
//! ends on Redis's clock), or until it runs out. Then it closes: what it did not use goes
//! back to Redis at once, and when the last request it admitted has ended, what those
//! requests really used (tokens settled, budget costs) follows in one more item. The next
//! lease is twice what the last one used, so a counter under a steady load costs a few
//! calls a second, whatever the rate.

use super::{Charge, Dimension, Scope};
use std::collections::HashMap;
use std::sync::Mutex;

/// A counter, by what names it.
pub(super) type Counter = (Scope, u64, Dimension);

pub(super) fn counter(c: &Charge) -> Counter {
    (c.scope, c.key, c.dimension)
}

/// Whether [`Leases::take`]'s answer `taken` holds charge `i` (only the first 64 can be).
pub(super) fn is_taken(taken: u64, i: usize) -> bool {
    i < 64 && taken & (1 << i) != 0
}

/// A mark with this bit set: the charge was taken from a lease (the rest is its id).
pub(crate) const LEASED: u64 = super::LEASED;

/// How long a lease takes admissions.
pub(super) const LIFE_MS: u64 = 1_000;

/// A rate's lease stops taking admissions this long before its window ends on Redis's
/// clock (the call's latency, and units used late would count in the next window).
const WINDOW_MARGIN_MS: u64 = 100;

/// A lease is renewed ahead (in the background, no request waiting) once this much of it
/// is used, in quarters, or this close to its end.
const RENEW_AT_QUARTERS: u64 = 3;
const RENEW_BEFORE_MS: u64 = 250;

/// A book of leases is forgotten when it has held none for this long.
const IDLE_MS: u64 = 10_000;

#[derive(Debug)]
struct Lease {
    id: u64,
    /// A rate's window, which its units were counted in.
    window: u64,
    /// Units counted or held in Redis for it.
    granted: u64,
    /// A rate: units counted against it (settled tokens included). A slot or budget:
    /// units held by the requests in flight.
    used: u64,
    /// A budget: the cost of requests that ended, not yet added to the spend.
    settled: u64,
    /// Requests admitted from it that have not ended.
    inflight: u64,
    /// The most it held at once (its demand).
    peak: u64,
    /// Monotonic ms after which it takes no admissions.
    until: u64,
    open: bool,
    /// Its successor was asked for ahead.
    renewing: bool,
    /// A budget: the spend Redis reported when it was granted, and the base of its counter.
    figure: u64,
    base: u64,
}

impl Lease {
    fn held(&self) -> u64 {
        self.used.saturating_add(self.settled)
    }

    /// Takes `c` from this lease (it has room). Returns, once per lease, the demand to
    /// renew it ahead with, when it is three-quarters used or near its end.
    fn admit(&mut self, c: &mut Charge, now: u64) -> Option<u64> {
        self.used += c.amount;
        self.inflight += 1;
        self.peak = self.peak.max(self.held());
        c.mark = LEASED | self.id;
        if c.dimension == Dimension::Spend {
            c.base = self.figure.saturating_add(self.settled);
        }
        let late = self.until.saturating_sub(now) <= RENEW_BEFORE_MS;
        let used = self.held().saturating_mul(4) >= self.granted.saturating_mul(RENEW_AT_QUARTERS);
        if self.renewing || !(late || used) {
            return None;
        }
        self.renewing = true;
        Some(if used { self.granted } else { self.peak })
    }
}

#[derive(Debug, Default)]
struct Book {
    leases: Vec<Lease>,
    /// What the last lease closed used, to size the next.
    demand: u64,
    /// When it last granted or closed a lease (monotonic ms).
    touched: u64,
}

/// What goes back to Redis: one FINISH item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Return {
    /// Adds `delta` to the count of `window`.
    Rate {
        counter: Counter,
        window: u64,
        delta: i128,
    },
    /// Sets reservation `id` to `amount` (0: drops it), adds `cost` to the spend.
    Held {
        counter: Counter,
        id: u64,
        amount: u64,
        cost: Option<u64>,
        base: u64,
        /// The reservation is gone: the heartbeat forgets it.
        last: bool,
    },
}

/// What Redis granted a request's charge beyond its amount.
pub(super) struct Grant {
    pub extra: u64,
    /// The lease's id (a slot or budget's reservation id; any fresh id for a rate).
    pub id: u64,
    /// A rate's window and the ms left in it.
    pub window: u64,
    pub left_ms: u64,
    /// A budget's spend before the request.
    pub figure: u64,
    /// Asked for ahead, with no request: the lease starts unused.
    pub ahead: bool,
}

/// Every lease this instance holds.
pub(super) struct Leases {
    books: Mutex<HashMap<Counter, Book>>,
    /// `cluster.expected_instances`, or 0 when leases are off.
    instances: u64,
}

impl Leases {
    /// `instances`: how many instances share the counters (`cluster.expected_instances`);
    /// `enabled`: `cluster.leases`.
    pub fn new(enabled: bool, instances: u64) -> Self {
        Leases {
            books: Mutex::new(HashMap::new()),
            instances: if enabled { instances.max(1) } else { 0 },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Counter, Book>> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How much to ask beyond `c.amount` (0: the charge is counted on its own).
    fn want(&self, c: &Charge, demand: u64) -> u64 {
        if self.instances == 0 {
            return 0;
        }
        let amount = c.amount.max(1);
        let cap = c.limit / (16 * self.instances);
        if cap < amount.saturating_mul(2) {
            return 0;
        }
        cap.min(amount.saturating_mul(8).max(demand.saturating_mul(2)))
            .saturating_sub(amount)
    }

    /// Takes each charge from its counter's open lease where that has room, marking it
    /// with the lease. Returns which were taken (bit i: charge i) and, in `wants`, the
    /// lease to ask for each of the others. Leases found expired or full are closed, their
    /// returns added to `out`; leases nearly used up or near their end are to be renewed
    /// ahead: `ahead` gets a charge of nothing and the lease to ask for, for each.
    pub fn take(
        &self,
        charges: &mut [Charge],
        now: u64,
        wants: &mut Vec<u64>,
        out: &mut Vec<Return>,
        ahead: &mut Vec<(Charge, u64)>,
    ) -> u64 {
        wants.clear();
        if self.instances == 0 {
            wants.resize(charges.len(), 0);
            return 0;
        }
        let mut books = self.lock();
        let mut taken = 0;
        for (i, c) in charges.iter_mut().enumerate() {
            let mut demand = 0;
            let key = counter(c);
            if let Some(book) = books.get_mut(&key) {
                close_expired(book, key, now, out);
                if let Some(l) = book.leases.iter_mut().find(|l| l.open) {
                    if i < 64 && l.held().saturating_add(c.amount) <= l.granted {
                        if let Some(demand) = l.admit(c, now) {
                            let want = self.want(c, demand);
                            if want > 0 {
                                let next = Charge {
                                    amount: 0,
                                    mark: 0,
                                    settled: None,
                                    ..*c
                                };
                                ahead.push((next, want));
                            }
                        }
                        taken |= 1 << i;
                        wants.push(0);
                        continue;
                    }
                    // Spent: its successor is asked for with this request.
                    close(l, key, out, &mut book.demand);
                    book.leases.retain(|l| l.open || l.inflight > 0);
                }
                demand = book.demand;
            }
            wants.push(self.want(c, demand));
        }
        taken
    }

    /// Takes back what [`Leases::take`] took for the charges of `taken` (the request was
    /// refused).
    pub fn untake(&self, charges: &[Charge], taken: u64, out: &mut Vec<Return>) {
        for (i, c) in charges.iter().enumerate() {
            if is_taken(taken, i) {
                self.finish(c, true, out);
            }
        }
    }

    /// Opens the lease Redis granted with charge `c` (already counted there: `c.amount`
    /// plus `g.extra`), closing the counter's open one if any.
    pub fn grant(&self, c: &mut Charge, g: &Grant, now: u64, out: &mut Vec<Return>) {
        let mut books = self.lock();
        let key = counter(c);
        let book = books.entry(key).or_default();
        for l in book.leases.iter_mut().filter(|l| l.open) {
            close(l, key, out, &mut book.demand);
        }
        book.leases.retain(|l| l.open || l.inflight > 0);
        let mut until = now + LIFE_MS;
        if matches!(
            c.dimension,
            Dimension::Rps | Dimension::Rpm | Dimension::Tpm
        ) {
            until = until.min(now + g.left_ms.saturating_sub(WINDOW_MARGIN_MS));
        }
        book.touched = now;
        // A lease asked for ahead holds no request yet.
        let inflight = u64::from(!g.ahead);
        book.leases.push(Lease {
            id: g.id,
            window: g.window,
            granted: c.amount.saturating_add(g.extra),
            used: c.amount,
            settled: 0,
            inflight,
            peak: c.amount,
            until,
            open: true,
            renewing: false,
            figure: g.figure,
            base: c.base,
        });
        if !g.ahead {
            c.mark = LEASED | g.id;
        }
    }

    /// A request admitted from a lease ended (`undo`: it was refused at a later stage and
    /// counts nowhere): its settled tokens or cost go to the lease; a closed lease whose
    /// last request this was returns its final figures.
    pub fn finish(&self, c: &Charge, undo: bool, out: &mut Vec<Return>) {
        let mut books = self.lock();
        let key = counter(c);
        let Some(book) = books.get_mut(&key) else {
            return;
        };
        let id = c.mark & !LEASED;
        let Some(at) = book.leases.iter().position(|l| l.id == id) else {
            return;
        };
        let l = &mut book.leases[at];
        match c.dimension {
            Dimension::Concurrency | Dimension::Spend => {
                l.used = l.used.saturating_sub(c.amount);
                if !undo && c.dimension == Dimension::Spend {
                    l.settled = l.settled.saturating_add(c.settled.unwrap_or(0));
                }
            }
            _ => {
                let used = match (undo, c.settled) {
                    (true, _) => l.used.saturating_sub(c.amount),
                    (false, Some(s)) => (l.used - c.amount.min(l.used)).saturating_add(s),
                    (false, None) => l.used,
                };
                l.used = used;
            }
        }
        l.inflight = l.inflight.saturating_sub(1);
        if !l.open && l.inflight == 0 {
            let l = book.leases.swap_remove(at);
            out.extend(last_return(&l, key));
        }
    }

    /// Closes every lease past its time, and forgets books idle for long (run a few times
    /// a second).
    pub fn sweep(&self, now: u64, out: &mut Vec<Return>) {
        let mut books = self.lock();
        if books.is_empty() {
            return;
        }
        books.retain(|key, book| {
            close_expired(book, *key, now, out);
            !book.leases.is_empty() || now.saturating_sub(book.touched) < IDLE_MS
        });
    }

    /// Closes every open lease (the instance stops): their unused units go back.
    pub fn close_all(&self, out: &mut Vec<Return>) {
        let mut books = self.lock();
        for (key, book) in books.iter_mut() {
            for l in book.leases.iter_mut().filter(|l| l.open) {
                close(l, *key, out, &mut book.demand);
            }
            book.leases.retain(|l| l.open || l.inflight > 0);
        }
    }
}

fn close_expired(book: &mut Book, key: Counter, now: u64, out: &mut Vec<Return>) {
    let mut closed = false;
    for l in book.leases.iter_mut().filter(|l| l.open && l.until <= now) {
        close(l, key, out, &mut book.demand);
        closed = true;
    }
    if closed {
        book.touched = now;
        book.leases.retain(|l| l.open || l.inflight > 0);
    }
}

/// Stops a lease taking admissions and gives back what it has not used; a lease with no
/// request in flight returns everything (the caller drops it).
fn close(l: &mut Lease, key: Counter, out: &mut Vec<Return>, demand: &mut u64) {
    l.open = false;
    *demand = l.peak;
    if l.inflight == 0 {
        out.extend(last_return(l, key));
        return;
    }
    match key.2 {
        Dimension::Concurrency | Dimension::Spend => {
            out.push(Return::Held {
                counter: key,
                id: l.id,
                amount: l.used,
                cost: (l.settled > 0).then_some(l.settled),
                base: l.base,
                last: false,
            });
            l.granted = l.used;
            l.figure = l.figure.saturating_add(l.settled);
            l.settled = 0;
        }
        _ => {
            if l.used != l.granted {
                out.push(Return::Rate {
                    counter: key,
                    window: l.window,
                    delta: i128::from(l.used) - i128::from(l.granted),
                });
            }
            l.granted = l.used;
        }
    }
}

/// The final return of a lease no request holds any more.
fn last_return(l: &Lease, key: Counter) -> Option<Return> {
    match key.2 {
        Dimension::Concurrency | Dimension::Spend => Some(Return::Held {
            counter: key,
            id: l.id,
            amount: 0,
            cost: (key.2 == Dimension::Spend && l.settled > 0).then_some(l.settled),
            base: l.base,
            last: true,
        }),
        _ => (l.used != l.granted).then_some(Return::Rate {
            counter: key,
            window: l.window,
            delta: i128::from(l.used) - i128::from(l.granted),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(limit: u64) -> Charge {
        Charge::new(Scope::Key, 7, Dimension::Rpm, limit, 1)
    }

    fn granted(leases: &Leases, c: &mut Charge, extra: u64, now: u64) -> Vec<Return> {
        let mut out = Vec::new();
        let g = Grant {
            extra,
            id: 42,
            window: 9,
            left_ms: 30_000,
            figure: 0,
            ahead: false,
        };
        leases.grant(c, &g, now, &mut out);
        out
    }

    #[test]
    fn a_lease_is_sized_from_the_limit_and_what_the_last_one_used() {
        let leases = Leases::new(true, 2);
        // 1,600 / (16 x 2) = 50 at most; a first lease is 8 units.
        assert_eq!(leases.want(&rpm(1_600), 0), 7);
        assert_eq!(leases.want(&rpm(1_600), 20), 39);
        assert_eq!(leases.want(&rpm(1_600), 1_000), 49);
        // Too small a limit: every request counts on its own.
        assert_eq!(leases.want(&rpm(63), 0), 0);
        assert_eq!(Leases::new(false, 2).want(&rpm(1_000_000), 0), 0);
        let tokens = Charge::new(Scope::Key, 7, Dimension::Tpm, 320_000, 600);
        assert_eq!(leases.want(&tokens, 0), 4_200);
    }

    #[test]
    fn requests_take_a_lease_until_it_is_spent_then_the_rest_goes_back() {
        let leases = Leases::new(true, 1);
        let mut first = rpm(1_000);
        assert!(granted(&leases, &mut first, 4, 0).is_empty());
        assert_eq!(first.mark, LEASED | 42);
        let (mut wants, mut out, mut ahead) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..4 {
            let mut c = [rpm(1_000)];
            assert_eq!(leases.take(&mut c, 10, &mut wants, &mut out, &mut ahead), 1);
            assert_eq!(c[0].mark, LEASED | 42);
        }
        // Three quarters used: its successor was asked for ahead, once, at twice its size.
        assert_eq!(ahead.len(), 1);
        assert_eq!((ahead[0].0.amount, ahead[0].1), (0, 9));
        // Spent: closed, and the next lease is asked for at twice its demand.
        let mut c = [rpm(1_000)];
        assert_eq!(leases.take(&mut c, 10, &mut wants, &mut out, &mut ahead), 0);
        assert_eq!(wants, [9]);
        assert!(out.is_empty(), "a spent lease has nothing to give back");
        // A lease past its time gives back what it did not use.
        let mut second = rpm(1_000);
        granted(&leases, &mut second, 9, 20);
        let mut c = [rpm(1_000)];
        assert_eq!(
            leases.take(&mut c, 20 + LIFE_MS, &mut wants, &mut out, &mut ahead),
            0
        );
        assert_eq!(
            out,
            [Return::Rate {
                counter: counter(&second),
                window: 9,
                delta: -9
            }]
        );
    }

    #[test]
    fn settled_tokens_of_a_closed_lease_go_back_when_its_last_request_ends() {
        let leases = Leases::new(true, 1);
        let mut c = Charge::new(Scope::Key, 7, Dimension::Tpm, 1_000_000, 100);
        granted(&leases, &mut c, 700, 0);
        let mut out = Vec::new();
        leases.sweep(LIFE_MS, &mut out);
        // Closed with one request in flight: 700 unused units back now.
        assert_eq!(
            out,
            [Return::Rate {
                counter: counter(&c),
                window: 9,
                delta: -700
            }]
        );
        out.clear();
        c.settled = Some(130);
        leases.finish(&c, false, &mut out);
        assert_eq!(
            out,
            [Return::Rate {
                counter: counter(&c),
                window: 9,
                delta: 30
            }]
        );
    }

    #[test]
    fn a_budget_lease_holds_settled_costs_until_it_closes() {
        let leases = Leases::new(true, 1);
        let mut c = Charge {
            base: 5,
            ..Charge::new(Scope::Team, 3, Dimension::Spend, 1_000_000, 40)
        };
        let mut out = Vec::new();
        leases.grant(
            &mut c,
            &Grant {
                extra: 280,
                id: 77,
                window: 0,
                left_ms: 0,
                figure: 500,
                ahead: false,
            },
            0,
            &mut out,
        );
        // A second request takes 40 more; the first ends costing 25.
        let (mut wants, mut ahead) = (Vec::new(), Vec::new());
        let mut second = [Charge { ..c }];
        second[0].mark = 0;
        assert_eq!(
            leases.take(&mut second, 1, &mut wants, &mut out, &mut ahead),
            1
        );
        assert_eq!(second[0].base, 500);
        c.settled = Some(25);
        leases.finish(&c, false, &mut out);
        assert!(out.is_empty());
        // Closed: the reservation shrinks to what is in flight, the cost is added.
        leases.sweep(LIFE_MS, &mut out);
        let key = counter(&c);
        assert_eq!(
            out,
            [Return::Held {
                counter: key,
                id: 77,
                amount: 40,
                cost: Some(25),
                base: 5,
                last: false
            }]
        );
        out.clear();
        second[0].settled = Some(10);
        leases.finish(&second[0], false, &mut out);
        assert_eq!(
            out,
            [Return::Held {
                counter: key,
                id: 77,
                amount: 0,
                cost: Some(10),
                base: 5,
                last: true
            }]
        );
    }

    #[test]
    fn a_refused_request_gives_its_units_back_to_the_lease() {
        let leases = Leases::new(true, 1);
        let mut first = Charge::new(Scope::Key, 1, Dimension::Concurrency, 1_000, 1);
        granted(&leases, &mut first, 1, 0);
        let (mut wants, mut out, mut ahead) = (Vec::new(), Vec::new(), Vec::new());
        let mut c = [Charge { mark: 0, ..first }];
        assert_eq!(leases.take(&mut c, 1, &mut wants, &mut out, &mut ahead), 1);
        leases.untake(&c, 1, &mut out);
        let mut again = [Charge { mark: 0, ..first }];
        assert_eq!(
            leases.take(&mut again, 1, &mut wants, &mut out, &mut ahead),
            1
        );
        assert!(out.is_empty());
    }
}
