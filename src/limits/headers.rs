//! The `x-ratelimit-*` headers of the key scope, written the way OpenAI writes them, so
//! that clients built for OpenAI pace themselves against the gateway's own limits.

use crate::spec::text::push_u64;
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
        // The values share one buffer; each header is a slice of it.
        let mut text = String::with_capacity(96);
        // For each limit present, where its three values end in `text`.
        let mut ends: [Option<[usize; 3]>; 2] = [None; 2];
        for (i, budget) in [self.requests, self.tokens].into_iter().enumerate() {
            if let Some(b) = budget {
                push_u64(&mut text, b.limit);
                let limit = text.len();
                push_u64(&mut text, b.remaining);
                let remaining = text.len();
                push_openai_duration(&mut text, b.reset);
                ends[i] = Some([limit, remaining, text.len()]);
            }
        }
        let shared = bytes::Bytes::from(text);
        let mut out = Vec::with_capacity(6);
        let mut start = 0;
        for (names, ends) in NAMES.into_iter().zip(ends) {
            let Some(ends) = ends else { continue };
            for (name, end) in names.into_iter().zip(ends) {
                if let Ok(v) = HeaderValue::from_maybe_shared(shared.slice(start..end)) {
                    out.push((name, v));
                }
                start = end;
            }
        }
        out
    }
}

/// Appends a duration the way OpenAI writes it in `x-ratelimit-reset-*`: `120ms`, `17s`,
/// `6m0s`, `1h2m3s`.
pub fn push_openai_duration(out: &mut String, d: Duration) {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        push_u64(out, ms);
        out.push_str("ms");
        return;
    }
    let secs = d.as_secs() + u64::from(d.subsec_millis() > 0);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        push_u64(out, h);
        out.push('h');
    }
    if h > 0 || m > 0 {
        push_u64(out, m);
        out.push('m');
    }
    push_u64(out, s);
    out.push('s');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai_duration(d: Duration) -> String {
        let mut out = String::new();
        push_openai_duration(&mut out, d);
        out
    }

    #[test]
    fn durations_are_written_like_openai() {
        assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(openai_duration(Duration::from_secs(17)), "17s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(7200)), "2h0m0s");
    }

    #[test]
    fn each_limit_gives_its_three_headers_from_one_buffer() {
        let room = |limit, remaining, reset| Room {
            limit,
            remaining,
            reset,
        };
        let both = KeyHeaders {
            requests: Some(room(60, 59, Duration::from_millis(1500))),
            tokens: Some(room(100_000, 0, Duration::from_secs(3723))),
        };
        let text = |h: &KeyHeaders| -> Vec<(String, String)> {
            h.pairs()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect()
        };
        let want = [
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "2s"),
            ("x-ratelimit-limit-tokens", "100000"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1h2m3s"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        assert_eq!(text(&both), want);
        let tokens = KeyHeaders {
            requests: None,
            ..both
        };
        assert_eq!(text(&tokens), want[3..]);
        assert!(KeyHeaders::default().pairs().is_empty());
    }
}
