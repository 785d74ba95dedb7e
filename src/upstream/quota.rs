//! What a target's provider says is left of its own rate limits, read from every answer's
//! headers: OpenAI, Azure and Groq send `x-ratelimit-remaining-{requests,tokens}` with
//! `x-ratelimit-reset-{requests,tokens}` (`1s`, `6m0s`, `20ms`); Anthropic sends
//! `anthropic-ratelimit-{requests,tokens}-{remaining,reset}` (the reset as an RFC 3339
//! time). A target whose remaining requests or tokens will not cover a request is passed
//! over until its reset, so the gateway avoids the 429 instead of reacting to it. Each
//! request sent to a target takes its share off what is left, so that requests in flight
//! together do not all count on the same last slot; the next answer's headers correct it.

use crate::provider::duration::parse_duration;
use http::{HeaderMap, HeaderName};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The remaining and reset fields of each provider and dimension, as names built once
/// (a lookup by `&str` parses the name every time).
const OPENAI_REQUESTS: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const OPENAI_TOKENS: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
const ANTHROPIC_REQUESTS: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    HeaderName::from_static("anthropic-ratelimit-requests-reset"),
];
const ANTHROPIC_TOKENS: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
];

/// Unknown: the provider has said nothing.
const UNKNOWN: u64 = u64::MAX;

/// When a provider gives a remaining count but no reset, how long it is believed.
const DEFAULT_RESET: Duration = Duration::from_secs(1);

/// One dimension: what is left, and until when (`clock::monotonic_ms`) that holds.
#[derive(Debug)]
struct Left {
    remaining: AtomicU64,
    until_ms: AtomicU64,
}

impl Default for Left {
    fn default() -> Self {
        Left {
            remaining: AtomicU64::new(UNKNOWN),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl Left {
    fn set(&self, remaining: u64, reset: Duration, now_ms: u64) {
        self.remaining.store(remaining, Ordering::Relaxed);
        let until = now_ms.saturating_add(reset.as_millis() as u64);
        self.until_ms.store(until, Ordering::Relaxed);
    }

    /// What is left at `now_ms` (`None`: unknown, or the window has reset).
    fn at(&self, now_ms: u64) -> Option<(u64, Duration)> {
        let until = self.until_ms.load(Ordering::Relaxed);
        let remaining = self.remaining.load(Ordering::Relaxed);
        (remaining != UNKNOWN && now_ms < until)
            .then(|| (remaining, Duration::from_millis(until - now_ms)))
    }

    fn take(&self, n: u64) {
        let _ = self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r != UNKNOWN).then(|| r.saturating_sub(n))
            });
    }
}

/// A target's provider-reported room.
#[derive(Debug, Default)]
pub struct Quota {
    requests: Left,
    tokens: Left,
}

/// What a target's provider says is left, for the explain endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub requests: Option<(u64, Duration)>,
    pub tokens: Option<(u64, Duration)>,
}

impl Quota {
    /// Reads the rate-limit headers of an answer received at `now_ms`; `wall_ms` reads the
    /// wall clock, only for Anthropic's reset times.
    pub fn observe(&self, headers: &HeaderMap, now_ms: u64, wall_ms: impl Fn() -> i64) {
        // Most answers of self-hosted servers carry none: one pass over the names (no
        // hashing) says so before four lookups.
        let any = headers.keys().any(|k| {
            let k = k.as_str();
            k.starts_with("x-ratelimit-remaining-") || k.starts_with("anthropic-ratelimit-")
        });
        if !any {
            return;
        }
        let get = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        for (left, [remaining, reset], anthropic) in [
            (&self.requests, &OPENAI_REQUESTS, false),
            (&self.tokens, &OPENAI_TOKENS, false),
            (&self.requests, &ANTHROPIC_REQUESTS, true),
            (&self.tokens, &ANTHROPIC_TOKENS, true),
        ] {
            let Some(n) = get(remaining).and_then(|v| v.trim().parse::<u64>().ok()) else {
                continue;
            };
            let reset = get(reset)
                .and_then(|v| {
                    if anthropic {
                        until_time(v, wall_ms())
                    } else {
                        parse_duration(v)
                    }
                })
                .unwrap_or(DEFAULT_RESET);
            left.set(n.min(UNKNOWN - 1), reset, now_ms);
        }
    }

    /// Whether what is left at `now_ms` covers one more request of `tokens` tokens.
    pub fn covers(&self, now_ms: u64, tokens: u64) -> bool {
        let short = |left: &Left, need: u64| left.at(now_ms).is_some_and(|(r, _)| r < need);
        !short(&self.requests, 1) && !short(&self.tokens, tokens.max(1))
    }

    /// Takes one request of `tokens` off what is left.
    pub fn spend(&self, tokens: u64) {
        self.requests.take(1);
        self.tokens.take(tokens);
    }

    pub fn room(&self, now_ms: u64) -> Room {
        Room {
            requests: self.requests.at(now_ms),
            tokens: self.tokens.at(now_ms),
        }
    }
}

/// The time from `wall_ms` until an RFC 3339 time (zero when it has passed).
fn until_time(s: &str, wall_ms: i64) -> Option<Duration> {
    let t = chrono::DateTime::parse_from_rfc3339(s.trim()).ok()?;
    let ms = t.timestamp_millis().saturating_sub(wall_ms).max(0);
    Some(Duration::from_millis(ms as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn no_requests_left_steers_away_until_the_reset() {
        let q = Quota::default();
        assert!(q.covers(1_000, 500));
        q.observe(
            &headers(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2s"),
            ]),
            1_000,
            || 0,
        );
        assert!(!q.covers(1_000, 1));
        assert!(!q.covers(2_999, 1));
        assert!(q.covers(3_000, 1));
    }

    #[test]
    fn too_few_tokens_left_steers_away_only_larger_requests() {
        let q = Quota::default();
        q.observe(
            &headers(&[
                ("x-ratelimit-remaining-requests", "10"),
                ("x-ratelimit-remaining-tokens", "1000"),
                ("x-ratelimit-reset-tokens", "500ms"),
            ]),
            1_000,
            || 0,
        );
        assert!(q.covers(1_000, 1000));
        assert!(!q.covers(1_000, 1001));
        q.spend(600);
        assert!(!q.covers(1_000, 500));
        assert!(q.covers(1_500, 5000), "reset");
    }

    #[test]
    fn anthropic_resets_are_times() {
        let q = Quota::default();
        let wall = chrono::DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .timestamp_millis();
        q.observe(
            &headers(&[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-12-03T10:00:05Z"),
            ]),
            100,
            || wall,
        );
        assert_eq!(q.room(100).requests, Some((0, Duration::from_secs(5))),);
        assert!(!q.covers(5_099, 1));
        assert!(q.covers(5_100, 1));
    }

    proptest! {
        #[test]
        fn any_header_value_is_read_without_panicking(v in "\\PC{0,24}") {
            let q = Quota::default();
            if let Ok(value) = v.parse::<http::HeaderValue>() {
                let mut h = HeaderMap::new();
                h.insert("x-ratelimit-remaining-requests", value.clone());
                h.insert("x-ratelimit-reset-requests", value.clone());
                h.insert("anthropic-ratelimit-tokens-remaining", value.clone());
                h.insert("anthropic-ratelimit-tokens-reset", value);
                q.observe(&h, 1, || 0);
                let _ = q.covers(1, 1);
            }
        }
    }
}
