//! Request and token rates in this process: a count-min sketch per window, two windows a
//! rate (the one filling and the one before), as pingora-limits' `Rate` keeps them. Keys
//! arrive already hashed ([`super::key_hash`]), so a sketch mixes each key once, with a
//! seed of the process's own, and takes its four row indices from the one mixed value
//! (pingora-limits hashes the key four times a read, twice a rate, and reads the clock on
//! every call). The clock is read by the caller, once a charge, so the window logic is a
//! function of the time it is given.

use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Rows of a sketch: each key is counted in one cell of each; a read takes the smallest.
const ROWS: usize = 4;

/// A count-min sketch: a hash collision can only over-count, never under-count.
struct Sketch {
    cells: Box<[AtomicIsize]>,
    /// Cells a row, less one (rows are powers of two wide, at most 2^16).
    mask: u64,
}

impl Sketch {
    fn new(width: usize) -> Sketch {
        let width = width.next_power_of_two().clamp(1, 1 << 16);
        Sketch {
            cells: (0..ROWS * width).map(|_| AtomicIsize::new(0)).collect(),
            mask: width as u64 - 1,
        }
    }

    /// The cell of `mixed` in each row: 16 bits of it a row.
    fn cells(&self, mixed: u64) -> [&AtomicIsize; ROWS] {
        let width = self.mask as usize + 1;
        std::array::from_fn(|row| {
            let column = ((mixed >> (16 * row)) & self.mask) as usize;
            &self.cells[row * width + column]
        })
    }

    fn add(&self, mixed: u64, n: isize) {
        for cell in self.cells(mixed) {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn get(&self, mixed: u64) -> isize {
        self.cells(mixed)
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    fn clear(&self) {
        for cell in self.cells.iter() {
            cell.store(0, Ordering::Relaxed);
        }
    }
}

/// A rate over a window of `interval`: `previous x (1 - elapsed fraction) + current`.
pub struct Window {
    slots: [Sketch; 2],
    /// Which slot is filling.
    current: AtomicUsize,
    /// When the filling slot's window began (the caller's milliseconds).
    began: AtomicU64,
    interval_ms: u64,
    seed: u64,
}

impl Window {
    /// A rate over `interval`, with sketches `width` cells a row.
    pub fn new(interval: Duration, width: usize, seed: u64) -> Window {
        Window {
            slots: [Sketch::new(width), Sketch::new(width)],
            current: AtomicUsize::new(0),
            began: AtomicU64::new(0),
            interval_ms: (interval.as_millis() as u64).max(1),
            seed,
        }
    }

    /// Moves to a new window when the current one is over, and says how far into its
    /// window `now` is (0 when it starts one). The first caller past the end resets; a
    /// window with no traffic in it starts again with the next one (as pingora-limits'
    /// `Rate` does).
    fn roll(&self, now: u64) -> u64 {
        let began = self.began.load(Ordering::Acquire);
        let past = now.saturating_sub(began);
        if past < self.interval_ms {
            return past;
        }
        let current = self.current.load(Ordering::Acquire);
        if self
            .began
            .compare_exchange(began, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // The slot before the ending one is cleared and filled next; the ending one
            // becomes the previous window, or is cleared too when it is two windows old.
            self.slots[1 - current].clear();
            self.current.store(1 - current, Ordering::Release);
            if past >= 2 * self.interval_ms {
                self.slots[current].clear();
            }
        }
        0
    }

    /// Counts `n` for `key` (negative to take back) at `now`.
    pub fn add(&self, now: u64, key: u64, n: isize) {
        self.roll(now);
        let slot = &self.slots[self.current.load(Ordering::Acquire)];
        slot.add(mix(key ^ self.seed), n);
    }

    /// Counts `n` for `key` at `now` and gives the estimate with it counted: [`add`] then
    /// [`estimate`], with the key mixed and the window rolled once.
    ///
    /// [`add`]: Window::add
    /// [`estimate`]: Window::estimate
    pub fn add_and_estimate(&self, now: u64, key: u64, n: isize) -> (f64, Duration) {
        let mixed = mix(key ^ self.seed);
        let into = self.roll(now);
        let current = self.current.load(Ordering::Acquire);
        self.slots[current].add(mixed, n);
        self.estimate_mixed(into, current, mixed)
    }

    /// The sliding estimate for `key` at `now`, and the time until its window ends.
    pub fn estimate(&self, now: u64, key: u64) -> (f64, Duration) {
        let mixed = mix(key ^ self.seed);
        let into = self.roll(now);
        let current = self.current.load(Ordering::Acquire);
        self.estimate_mixed(into, current, mixed)
    }

    /// The estimate `into` milliseconds into the window of slot `current`. Just after a
    /// roll, the slot before holds the window that ended (or nothing, when it ended two
    /// windows ago) and the current one holds what was counted since.
    fn estimate_mixed(&self, into: u64, current: usize, mixed: u64) -> (f64, Duration) {
        let previous = self.slots[1 - current].get(mixed);
        let filling = self.slots[current].get(mixed);
        sliding(previous, filling, into, self.interval_ms)
    }
}

/// The sliding estimate from a window's counts, `into` milliseconds into the current one.
fn sliding(previous: isize, filling: isize, into: u64, interval_ms: u64) -> (f64, Duration) {
    let fraction = (into as f64 / interval_ms as f64).clamp(0.0, 1.0);
    let estimate = previous.max(0) as f64 * (1.0 - fraction) + filling.max(0) as f64;
    let left = Duration::from_millis(interval_ms.saturating_sub(into));
    (estimate, left)
}

/// splitmix64's finaliser: every bit of the key moves every row's index.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed of the process's own, so which keys share cells cannot be known from outside.
pub fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x746f_6c6c_6761_7465u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;

    #[test]
    fn the_sliding_estimate_weighs_the_previous_window_by_what_is_left() {
        let (est, left) = sliding(60, 0, 15_000, MINUTE);
        assert_eq!(est, 45.0);
        assert_eq!(left, Duration::from_secs(45));
        assert_eq!(sliding(60, 10, 30_000, MINUTE).0, 40.0);
        // A count taken back below zero counts as nothing.
        assert_eq!(sliding(-3, 2, 0, MINUTE).0, 2.0);
    }

    #[test]
    fn counts_move_from_window_to_window_and_age_out() {
        let w = Window::new(Duration::from_secs(60), 1024, random_seed());
        let (a, b) = (super::super::key_hash("a"), super::super::key_hash("b"));
        let t0 = 1_000_000;
        w.add(t0, a, 30);
        w.add(t0 + 1, b, 7);
        assert_eq!(w.estimate(t0 + 2, a).0, 30.0);
        assert_eq!(w.estimate(t0 + 2, b).0, 7.0);
        // Half a window later it is still the current one.
        w.add(t0 + 30_000, a, 10);
        let (est, left) = w.estimate(t0 + 30_000, a);
        assert_eq!((est, left), (40.0, Duration::from_secs(30)));
        // The window ends: what it counted is the previous window's, weighed by what is
        // left of the new one.
        assert_eq!(w.estimate(t0 + MINUTE, a).0, 40.0);
        w.add(t0 + MINUTE + 15_000, a, 5);
        let (est, left) = w.estimate(t0 + MINUTE + 15_000, a);
        assert_eq!(est, 40.0 * 0.75 + 5.0);
        assert_eq!(left, Duration::from_secs(45));
        // Two windows on, nothing counted is recent.
        assert_eq!(w.estimate(t0 + 3 * MINUTE + 20_000, a).0, 0.0);
        assert_eq!(w.estimate(t0 + 3 * MINUTE + 20_001, b).0, 0.0);
        w.add(t0 + 3 * MINUTE + 20_002, b, 1);
        assert_eq!(w.estimate(t0 + 3 * MINUTE + 20_003, b).0, 1.0);
    }

    #[test]
    fn counting_and_estimating_in_one_call_is_the_two_calls() {
        let seed = random_seed();
        let (one, two) = (
            Window::new(Duration::from_secs(60), 1024, seed),
            Window::new(Duration::from_secs(60), 1024, seed),
        );
        let k = super::super::key_hash("k");
        for (t, n) in [
            (1_000_000, 3),
            (1_020_000, 2),
            (1_070_000, 4),
            (1_300_000, 1),
        ] {
            two.add(t, k, n);
            assert_eq!(one.add_and_estimate(t, k, n), two.estimate(t, k), "at {t}");
        }
    }

    #[test]
    fn a_key_never_counts_less_than_it_was_given_among_many() {
        // A narrow sketch: collisions happen, and may only add. A fixed seed: which keys
        // collide does not change from run to run.
        let w = Window::new(Duration::from_secs(1), 64, 1);
        let keys: Vec<u64> = (0..500)
            .map(|i| super::super::key_hash(&format!("k{i}")))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            w.add(5, *k, i as isize % 7 + 1);
        }
        for (i, k) in keys.iter().enumerate() {
            assert!(w.estimate(6, *k).0 >= (i % 7 + 1) as f64);
        }
        // Wide enough, each is exact.
        let w = Window::new(Duration::from_secs(1), 16384, 1);
        for (i, k) in keys.iter().enumerate() {
            w.add(5, *k, i as isize % 7 + 1);
        }
        let exact = keys
            .iter()
            .enumerate()
            .filter(|(i, k)| w.estimate(6, **k).0 == (i % 7 + 1) as f64)
            .count();
        assert_eq!(exact, keys.len());
    }
}
