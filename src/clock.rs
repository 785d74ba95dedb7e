//! Time, in two kinds. Wall-clock time for what depends on the calendar (budget periods,
//! key expiry, usage timestamps): the [`Clock`] trait, so tests move it by hand
//! (`ManualClock`). Monotonic time for cooldowns, health and the attempt loop:
//! [`monotonic_ms`], read from tokio's clock, so tests run with paused time
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) and never sleep.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;

/// Milliseconds on the process's monotonic clock (never 0). Outside a runtime with paused
/// time this is the system's monotonic clock; under paused time it moves only with
/// `tokio::time::advance` or the runtime's auto-advance, together with every timeout.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    let now = tokio::time::Instant::now().into_std();
    now.saturating_duration_since(start).as_millis() as u64 + 1
}

/// Milliseconds since the Unix epoch, UTC.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        ManualClock(AtomicI64::new(now_ms))
    }

    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::Relaxed);
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `2026-12-02T17:06:45Z` (whole seconds) for a millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// `2026-12-02`, the UTC day of a millisecond timestamp.
pub fn day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// A time given as RFC 3339 (`2026-12-02T10:00:00Z`, any offset) or as a date
/// (`2026-12-02`, midnight UTC), in milliseconds.
pub fn parse_time(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s.trim()) {
        return Some(t.timestamp_millis());
    }
    let d = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()?;
    Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_print_in_utc() {
        let t = parse_time("2026-12-02T10:00:00+01:00").unwrap();
        assert_eq!(rfc3339(t), "2026-12-02T09:00:00Z");
        assert_eq!(parse_time("2024-02-29"), parse_time("2024-02-29T00:00:00Z"));
        assert_eq!(day(t), "2026-12-02");
        assert_eq!(parse_time("2023-02-29"), None);
        assert_eq!(parse_time("yesterday"), None);
        let c = ManualClock::new(5);
        c.advance(10);
        assert_eq!(c.now_ms(), 15);
    }
}
