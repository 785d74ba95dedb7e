//! Time, in two kinds. Wall-clock time for what depends on the calendar (budget periods,
//! key expiry, usage timestamps): the [`Clock`] trait, so tests move it by hand
//! (`ManualClock`). Monotonic time for cooldowns, health and the attempt loop:
//! [`monotonic_ms`], the kernel's coarse clock, and under test tokio's, so tests run with
//! paused time (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) and never
//! sleep. [`within`] and [`add_wait`] read the clock only for a future that has to wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::Poll;
use std::time::Duration;

/// Milliseconds on the system's monotonic clock (never 0), for cooldowns, health, rate
/// windows and leases: what needs milliseconds, not microseconds. Read from the kernel's
/// coarse clock ([`coarse_ms`]), which costs a few nanoseconds where the precise one costs
/// about 20 on a virtual machine, and runs behind it by at most one scheduler tick (4 ms at
/// 250 Hz). Under test, read from tokio's clock instead, so unit tests run with paused
/// time and move it with `tokio::time::advance`.
pub fn monotonic_ms() -> u64 {
    #[cfg(not(test))]
    {
        coarse_ms()
    }
    #[cfg(test)]
    {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(std::time::Instant::now);
        let now = tokio::time::Instant::now().into_std();
        now.saturating_duration_since(start).as_millis() as u64 + 1
    }
}

/// The kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`, updated once a tick), in
/// milliseconds since boot, plus one.
pub fn coarse_ms() -> u64 {
    use nix::time::ClockId;
    // Not on this kernel (before 2.6.32): the precise clock, on the same time base.
    millis_plus_one(ClockId::CLOCK_MONOTONIC_COARSE)
        .or_else(|| millis_plus_one(ClockId::CLOCK_MONOTONIC))
        .unwrap_or(1)
}

/// The clock `id` in milliseconds, plus one (so never 0).
fn millis_plus_one(id: nix::time::ClockId) -> Option<u64> {
    let t = nix::time::clock_gettime(id).ok()?;
    Some(t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000 + 1)
}

/// `fut`'s output, or `None` when it waits longer than `wait`. The timer, and the clock
/// read it takes, are made only when `fut` has to wait: most reads and writes on the
/// request path are ready at once.
pub async fn within<F: Future>(wait: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// `fut`'s output, adding to `waited` how long it waited: from its first poll that could
/// not finish to its end. The clock is read only when it waits (a request body that came
/// with its header does not).
pub async fn add_wait<F: Future>(waited: &mut Duration, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    // tokio's clock: the system's, or paused time under test.
    let mut since: Option<tokio::time::Instant> = None;
    let out = std::future::poll_fn(|cx| {
        let polled = fut.as_mut().poll(cx);
        if polled.is_pending() {
            since.get_or_insert_with(tokio::time::Instant::now);
        }
        polled
    })
    .await;
    if let Some(since) = since {
        *waited += since.elapsed();
    }
    out
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

/// `2026-12-02`, the UTC day of a millisecond timestamp (empty outside years 0 to 9999).
/// Written by hand: it runs for every usage row, and chrono's formatter cost 2,400
/// instructions a call.
pub fn day(ms: i64) -> String {
    let mut s = String::with_capacity(10);
    push_day(&mut s, ms);
    s
}

/// [`day`], appended to `out`.
pub fn push_day(out: &mut String, ms: i64) {
    if in_range(ms) {
        push_date(out, ms.div_euclid(DAY_MS));
    }
}

/// `2026-12-02T17:06:45.123Z`, a millisecond timestamp as the access log writes it
/// (nothing outside years 0 to 9999).
pub fn push_rfc3339_millis(out: &mut String, ms: i64) {
    if !in_range(ms) {
        return;
    }
    thread_local! {
        /// The last second written and its text up to the milliseconds: a busy thread
        /// writes the same second many times over.
        static SECOND: std::cell::RefCell<(i64, String)> =
            std::cell::RefCell::new((i64::MIN, String::with_capacity(20)));
    }
    let second = ms.div_euclid(1000);
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            text.clear();
            push_date(text, ms.div_euclid(DAY_MS));
            let secs = ms.rem_euclid(DAY_MS) / 1000;
            text.push('T');
            push_digits(text, secs / 3600, 2);
            text.push(':');
            push_digits(text, secs / 60 % 60, 2);
            text.push(':');
            push_digits(text, secs % 60, 2);
            text.push('.');
            *cached = second;
        }
        out.push_str(text);
    });
    push_digits(out, ms.rem_euclid(1000), 3);
    out.push('Z');
}

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// Years 0 to 9999: what four digits hold.
fn in_range(ms: i64) -> bool {
    (-62_167_219_200_000..253_402_300_800_000).contains(&ms)
}

fn push_date(out: &mut String, days: i64) {
    let (y, m, d) = civil(days);
    push_digits(out, y, 4);
    out.push('-');
    push_digits(out, m, 2);
    out.push('-');
    push_digits(out, d, 2);
}

/// `n` (not negative) in exactly `width` decimal digits.
fn push_digits(out: &mut String, n: i64, width: u32) {
    let mut div = 10i64.pow(width - 1);
    while div > 0 {
        out.push(char::from(b'0' + (n / div % 10) as u8));
        div /= 10;
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (the days-to-civil
/// algorithm of H. Hinnant's date library).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
    fn hand_written_dates_agree_with_chrono() {
        // Every day from 1900 to 2200, and times in a day, against chrono's formatter.
        let mut ms = parse_time("1900-01-01").unwrap() + 45_296_789;
        let end = parse_time("2200-01-01").unwrap();
        while ms < end {
            let t = chrono::DateTime::from_timestamp_millis(ms).unwrap();
            assert_eq!(day(ms), t.format("%Y-%m-%d").to_string());
            let mut s = String::new();
            push_rfc3339_millis(&mut s, ms);
            assert_eq!(s, t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string());
            ms += DAY_MS + 1_001;
        }
        let mut s = String::new();
        push_rfc3339_millis(&mut s, 0);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        // Within one second the second's text is reused; across seconds, and back to an
        // earlier one, it is not.
        for ms in [
            1_796_617_652_020,
            1_796_617_652_999,
            1_796_617_653_000,
            1_796_617_652_500,
            -1,
            0,
            -1000,
            -1001,
        ] {
            let mut s = String::new();
            push_rfc3339_millis(&mut s, ms);
            let t = chrono::DateTime::from_timestamp_millis(ms).unwrap();
            assert_eq!(s, t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(), "{ms}");
        }
        assert_eq!(day(-1), "1969-12-31");
        assert_eq!(day(parse_time("0000-01-01").unwrap()), "0000-01-01");
    }

    #[test]
    fn times_parse_and_print_in_utc() {
        let t = parse_time("2026-12-02T10:00:00+01:00").unwrap();
        assert_eq!(rfc3339(t), "2026-12-02T09:00:00Z");
        assert_eq!(parse_time("2024-02-29"), parse_time("2024-02-29T00:00:00Z"));
        assert_eq!(day(t), "2026-12-02");
        assert_eq!(day(i64::MAX), "");
        assert_eq!(parse_time("2023-02-29"), None);
        assert_eq!(parse_time("yesterday"), None);
        let c = ManualClock::new(5);
        c.advance(10);
        assert_eq!(c.now_ms(), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_is_timed_only_when_it_waits_and_a_timer_fires_only_on_a_wait() {
        let mut waited = Duration::ZERO;
        assert_eq!(add_wait(&mut waited, async { 7 }).await, 7);
        assert_eq!(waited, Duration::ZERO);
        let slow = tokio::time::sleep(Duration::from_millis(300));
        add_wait(&mut waited, slow).await;
        assert_eq!(waited, Duration::from_millis(300));

        assert_eq!(within(Duration::ZERO, async { 1 }).await, Some(1));
        let slow = tokio::time::sleep(Duration::from_secs(2));
        assert_eq!(within(Duration::from_secs(1), slow).await, None);
        let quick = tokio::time::sleep(Duration::from_millis(999));
        assert_eq!(within(Duration::from_secs(1), quick).await, Some(()));
    }

    #[test]
    fn the_coarse_clock_keeps_within_a_tick_of_the_precise_one() {
        let precise = || millis_plus_one(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let mut last = coarse_ms();
        for _ in 0..5 {
            let before = precise();
            let coarse = coarse_ms();
            let after = precise();
            // A tick is at most 10 ms (100 Hz); the coarse clock never runs ahead.
            assert!(coarse <= after, "{coarse} > {after}");
            assert!(
                coarse + 10 >= before,
                "{coarse} is more than a tick behind {before}"
            );
            assert!(coarse >= last);
            last = coarse;
            std::thread::sleep(std::time::Duration::from_millis(7));
        }
        assert!(last > 1);
    }
}
