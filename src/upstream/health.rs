//! Whether a server may take traffic now: passive health (cooldowns set by `inspect`'s
//! verdicts and nginx-style `max_fails`/`fail_timeout` for connection failures) and the
//! verdict of its active check (`check.rs` runs those and writes it here). All
//! state is atomics read on the request path without locks; time comes from one process
//! clock in milliseconds (`clock::monotonic_ms`), passed in explicitly so the logic is tested without sleeping.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

/// Why a server is cooling down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// Rate limit, overload, 5xx: short, or the provider's hint.
    Transient = 1,
    /// Out of credit, billing, spend cap: long (`quota_cooldown`).
    Quota = 2,
    /// The upstream rejected the gateway's credential (401/403).
    Credentials = 3,
    /// `max_fails` connection failures or timeouts within `fail_timeout`.
    Unreachable = 4,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Transient => "transient",
            Reason::Quota => "quota",
            Reason::Credentials => "credentials",
            Reason::Unreachable => "unreachable",
        }
    }

    /// The reason named by [`Reason::as_str`].
    pub fn parse(s: &str) -> Option<Reason> {
        [
            Reason::Transient,
            Reason::Quota,
            Reason::Credentials,
            Reason::Unreachable,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    fn from_u8(v: u8) -> Option<Reason> {
        match v {
            1 => Some(Reason::Transient),
            2 => Some(Reason::Quota),
            3 => Some(Reason::Credentials),
            4 => Some(Reason::Unreachable),
            _ => None,
        }
    }
}

/// Health of one server.
pub struct Health {
    cooling_until: AtomicU64,
    reason: AtomicU8,
    fails: AtomicU32,
    fails_since: AtomicU64,
    active_ok: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            cooling_until: AtomicU64::new(0),
            reason: AtomicU8::new(0),
            fails: AtomicU32::new(0),
            fails_since: AtomicU64::new(0),
            active_ok: AtomicBool::new(true),
        }
    }
}

impl Health {
    /// Whether the server is skipped at `now`: cooling down or failing active checks.
    pub fn unavailable(&self, now: u64) -> bool {
        !self.active_ok.load(Ordering::Relaxed) || now < self.cooling_until.load(Ordering::Relaxed)
    }

    /// Like [`Health::unavailable`], but a cooldown for a transient failure or for
    /// unreachability does not count: used when nothing else is left (see `failover`).
    pub fn unavailable_unless_last_resort(&self, now: u64) -> bool {
        if !self.active_ok.load(Ordering::Relaxed) {
            return true;
        }
        matches!(
            self.cooldown(now),
            Some((_, Reason::Quota | Reason::Credentials))
        )
    }

    /// Cools the server down for `duration` from `now`. A longer cooldown already in
    /// place is kept (a quota cooldown is not shortened by a later rate limit).
    pub fn cool(&self, now: u64, duration: Duration, reason: Reason) {
        let until = now + duration.as_millis() as u64;
        let previous = self.cooling_until.fetch_max(until, Ordering::Relaxed);
        if previous < until {
            self.reason.store(reason as u8, Ordering::Relaxed);
        }
    }

    /// Ends a cooldown now (an operator's `DELETE /admin/cooldowns/...`).
    pub fn clear(&self) {
        self.cooling_until.store(0, Ordering::Relaxed);
        self.reason.store(0, Ordering::Relaxed);
        self.fails.store(0, Ordering::Relaxed);
    }

    /// Time left and reason, when cooling at `now`.
    pub fn cooldown(&self, now: u64) -> Option<(Duration, Reason)> {
        let until = self.cooling_until.load(Ordering::Relaxed);
        (now < until).then(|| {
            let reason =
                Reason::from_u8(self.reason.load(Ordering::Relaxed)).unwrap_or(Reason::Transient);
            (Duration::from_millis(until - now), reason)
        })
    }

    /// Counts a connection failure or timeout (nginx `max_fails` within `fail_timeout`);
    /// at `max_fails` the server cools for `fail_timeout`. `max_fails` 0 never marks it.
    pub fn record_failure(&self, now: u64, max_fails: u32, fail_timeout: Duration) {
        if max_fails == 0 {
            return;
        }
        let window = fail_timeout.as_millis() as u64;
        let since = self.fails_since.load(Ordering::Relaxed);
        if now.saturating_sub(since) > window {
            self.fails_since.store(now, Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= max_fails {
            self.fails.store(0, Ordering::Relaxed);
            self.cool(now, fail_timeout, Reason::Unreachable);
        }
    }

    /// A response came back: the failure count starts over.
    pub fn record_success(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    pub fn active_ok(&self) -> bool {
        self.active_ok.load(Ordering::Relaxed)
    }

    pub fn set_active_ok(&self, ok: bool) {
        self.active_ok.store(ok, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cooldown_ends_when_its_time_is_up() {
        let h = Health::default();
        h.cool(1_000, Duration::from_secs(2), Reason::Transient);
        assert!(h.unavailable(1_000));
        assert!(h.unavailable(2_999));
        assert_eq!(
            h.cooldown(2_000),
            Some((Duration::from_millis(1_000), Reason::Transient))
        );
        assert!(!h.unavailable(3_000));
        assert_eq!(h.cooldown(3_000), None);
    }

    #[test]
    fn a_longer_cooldown_is_not_shortened() {
        let h = Health::default();
        h.cool(0, Duration::from_secs(3600), Reason::Quota);
        h.cool(10, Duration::from_secs(2), Reason::Transient);
        assert_eq!(h.cooldown(10).unwrap().1, Reason::Quota);
        assert!(h.unavailable(3_000_000));
        h.clear();
        assert!(!h.unavailable(10));
    }

    #[test]
    fn max_fails_within_fail_timeout_marks_the_server() {
        let h = Health::default();
        let t = Duration::from_secs(10);
        h.record_failure(1_000, 3, t);
        h.record_failure(2_000, 3, t);
        assert!(!h.unavailable(2_000));
        // The window expired: counting starts over.
        h.record_failure(20_000, 3, t);
        assert!(!h.unavailable(20_000));
        h.record_failure(21_000, 3, t);
        h.record_failure(22_000, 3, t);
        assert_eq!(h.cooldown(22_000).unwrap().1, Reason::Unreachable);
        assert!(!h.unavailable(32_000));
        let never = Health::default();
        never.record_failure(1, 0, t);
        assert!(!never.unavailable(1));
    }

    #[test]
    fn a_last_resort_ignores_transient_cooldowns_only() {
        let h = Health::default();
        h.cool(0, Duration::from_secs(30), Reason::Transient);
        assert!(h.unavailable(10) && !h.unavailable_unless_last_resort(10));
        h.cool(0, Duration::from_secs(3600), Reason::Quota);
        assert!(h.unavailable_unless_last_resort(10));
        let down = Health::default();
        down.set_active_ok(false);
        assert!(down.unavailable_unless_last_resort(10));
    }

    #[test]
    fn failing_active_checks_make_a_server_unavailable() {
        let h = Health::default();
        h.set_active_ok(false);
        assert!(h.unavailable(0));
        h.set_active_ok(true);
        assert!(!h.unavailable(0));
    }
}
