//! The `x-ratelimit-*` headers of the key scope, written the way OpenAI writes them, so
//! that clients built for OpenAI pace themselves against the gateway's own limits.

use http::{HeaderName, HeaderValue};
use std::time::Duration;

/// The OpenAI-style rate-limit headers of the key scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyHeaders {
    pub requests: Option<Room>,
    pub tokens: Option<Room>,
}

/// What is left of one limit's window, and when the window frees room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

impl KeyHeaders {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    pub fn pairs(&self) -> Vec<(HeaderName, HeaderValue)> {
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ];
        let mut out = Vec::with_capacity(6);
        for (budget, [limit, remaining, reset]) in
            [self.requests, self.tokens].into_iter().zip(NAMES)
        {
            if let Some(b) = budget {
                out.push((limit, HeaderValue::from(b.limit)));
                out.push((remaining, HeaderValue::from(b.remaining)));
                if let Ok(v) = HeaderValue::from_str(&openai_duration(b.reset)) {
                    out.push((reset, v));
                }
            }
        }
        out
    }
}

/// Durations the way OpenAI writes them in `x-ratelimit-reset-*`: `120ms`, `17s`, `6m0s`, `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs() + u64::from(d.subsec_millis() > 0);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_like_openai() {
        assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(openai_duration(Duration::from_secs(17)), "17s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "2s");
    }
}
