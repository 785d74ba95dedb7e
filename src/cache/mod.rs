//! The response cache: exact-match answers for aliases that opt in (`models.ALIAS.cache`),
//! kept in memory (`memory`) or shared between instances through Redis (`redis`).
//!
//! The key is a SHA-256 over the caller's scope (its key id, its team id, or nothing for
//! `cache.scope: global`), the path, the alias and the request body normalised as JSON
//! (object members sorted, no whitespace), so two requests that differ only in member order
//! or spacing share an entry and answers never cross scopes. Only complete 200 answers are
//! stored: a non-streaming answer as its body, a stream as the bytes of its events (what
//! the client received), replayed as SSE on a hit. Each entry carries its expiry on the
//! wall clock (`clock::Clock`), so tests move time by hand; the backends also drop
//! entries on their own when they expire.

mod memory;
mod redis_backend;

pub use memory::MemoryCache;
pub use redis_backend::RedisCache;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// What a cached alias's answer was, in the `x-tollgate-cache` header, the access log
/// and usage rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    /// `Cache-Control: no-store` (or `no-cache`, which still stores the fresh answer).
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
        }
    }
}

/// One stored answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The alias it belongs to (for `DELETE /admin/cache?model=`).
    pub alias: String,
    /// A stream's events (replayed as SSE) or a JSON body.
    pub stream: bool,
    /// The bytes the client received.
    #[serde(with = "text_bytes")]
    pub body: Bytes,
    /// The usage the upstream reported, saved again by every hit.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// What the answer cost, micro-USD, saved again by every hit.
    pub cost_micro: i64,
    /// When it stops being served, ms since the Unix epoch.
    pub expires_at: i64,
}

impl Entry {
    /// Its size against `cache.max_size`.
    pub fn weight(&self) -> usize {
        self.body.len() + self.alias.len() + 96
    }

    /// Whether it may still be served at `now_ms` (wall clock).
    pub fn fresh(&self, now_ms: i64) -> bool {
        now_ms < self.expires_at
    }

    /// The events of a stored stream, each a chunk ending in its blank line.
    pub fn events(&self) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = &self.body;
        let mut i = 0;
        while i + 1 < b.len() {
            if b[i] == b'\n' && b[i + 1] == b'\n' {
                out.push(b.slice(start..i + 2));
                start = i + 2;
                i += 2;
            } else {
                i += 1;
            }
        }
        if start < b.len() {
            out.push(b.slice(start..));
        }
        out
    }
}

/// Whether a captured answer is whole, and so may be stored: a JSON body that parses to
/// its end, or an event stream whose last event is complete (ends in its blank line) and
/// is the provider's final one: `data: [DONE]` (OpenAI-compatible), `message_stop`
/// (Anthropic) or `response.completed` (the responses API). An upstream that ends its
/// answer by closing the connection (no length, not chunked) gives no other sign of a cut.
pub fn is_complete(stream: bool, body: &[u8]) -> bool {
    if !stream {
        return serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    let Some(events) = text
        .strip_suffix("\n\n")
        .or_else(|| text.strip_suffix("\r\n\r\n"))
    else {
        return false;
    };
    let start = [("\n\n", 2), ("\r\n\r\n", 4)]
        .iter()
        .filter_map(|(sep, len)| events.rfind(sep).map(|i| i + len))
        .max()
        .unwrap_or(0);
    let last = &events[start..];
    last.lines().any(|line| {
        let line = line.trim_end_matches('\r');
        let field = |name: &str| {
            line.strip_prefix(name)
                .map(|v| v.strip_prefix(' ').unwrap_or(v))
        };
        if let Some(event) = field("event:") {
            return matches!(event, "message_stop" | "response.completed");
        }
        let Some(data) = field("data:") else {
            return false;
        };
        if data == "[DONE]" {
            return true;
        }
        #[derive(Deserialize)]
        struct Typed<'a> {
            #[serde(borrow, rename = "type")]
            kind: Option<&'a str>,
        }
        serde_json::from_str::<Typed>(data)
            .ok()
            .and_then(|t| t.kind)
            .is_some_and(|k| matches!(k, "message_stop" | "response.completed"))
    })
}

/// Bodies are stored as text (JSON and SSE are UTF-8; the gateway stores nothing else).
mod text_bytes {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(text) => s.serialize_str(text),
            Err(_) => Err(serde::ser::Error::custom("body is not UTF-8")),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Ok(Bytes::from(String::deserialize(d)?))
    }
}

/// A cache key: SHA-256 of the scope, path, alias and normalised body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// `None` when the body is not JSON (such a request is not cached).
    pub fn new(scope: &str, path: &str, alias: &str, body: &[u8]) -> Option<Key> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        // serde_json's maps are sorted by key: writing the value normalises member order
        // and whitespace at once.
        let normal = serde_json::to_vec(&value).ok()?;
        let mut h = Sha256::new();
        for part in [scope.as_bytes(), path.as_bytes(), alias.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(&normal);
        Some(Key(h.finalize().into()))
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Where entries live.
#[async_trait]
pub trait CacheBackend: Send + Sync {
    /// The entry stored under `key` for `alias`, if any (the caller checks its expiry).
    async fn get(&self, key: &Key, alias: &str) -> Option<Entry>;
    /// Stores `entry` for `ttl`.
    async fn put(&self, key: Key, entry: Entry, ttl: Duration);
    /// Drops every entry, or those of one alias; returns how many when known.
    async fn clear(&self, alias: Option<&str>) -> Result<u64, String>;
    /// Entries and bytes held, for the metrics (`None` when the backend cannot tell).
    fn size(&self) -> Option<(u64, u64)>;
}

/// What the client asked of the cache with `Cache-Control` and `x-tollgate-cache-ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    /// `no-cache`: do not answer from the cache, but store the fresh answer.
    pub no_lookup: bool,
    /// `no-store`: neither read nor write.
    pub no_store: bool,
    /// `x-tollgate-cache-ttl`: a shorter time to keep the answer.
    pub ttl: Option<Duration>,
}

impl Directives {
    pub fn read(headers: &http::HeaderMap) -> Directives {
        let mut d = Directives::default();
        for v in headers.get_all(http::header::CACHE_CONTROL) {
            for part in v.to_str().unwrap_or_default().split(',') {
                match part.trim().to_ascii_lowercase().as_str() {
                    "no-cache" => d.no_lookup = true,
                    "no-store" => d.no_store = true,
                    _ => {}
                }
            }
        }
        d.ttl = headers
            .get("x-tollgate-cache-ttl")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| humantime::parse_duration(v.trim()).ok());
        d
    }

    /// The time to keep an answer: the alias's `ttl`, shortened by the request's.
    pub fn ttl(&self, alias_ttl: Duration) -> Duration {
        self.ttl.map_or(alias_ttl, |t| t.min(alias_ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn member_order_and_whitespace_do_not_change_the_key_but_scope_and_stream_do() {
        let a = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        let b = br#"{ "temperature": 0, "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }"#;
        let k = |scope, body: &[u8]| Key::new(scope, "/v1/chat/completions", "m", body).unwrap();
        assert_eq!(k("key:1", a), k("key:1", b));
        assert_ne!(k("key:1", a), k("key:2", a));
        let streamed = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true}"#;
        assert_ne!(k("key:1", a), k("key:1", streamed));
        assert_ne!(
            Key::new("", "/v1/chat/completions", "m", a),
            Key::new("", "/v1/completions", "m", a)
        );
        // Parts cannot run into each other: ("ab", "c") differs from ("a", "bc").
        assert_ne!(Key::new("ab", "c", "m", a), Key::new("a", "bc", "m", a));
        assert!(Key::new("", "/", "m", b"not json").is_none());
    }

    #[test]
    fn cache_control_and_ttl_headers_are_read() {
        let mut h = http::HeaderMap::new();
        h.insert("cache-control", "No-Cache".parse().unwrap());
        h.insert("x-tollgate-cache-ttl", "30s".parse().unwrap());
        let d = Directives::read(&h);
        assert!(d.no_lookup && !d.no_store);
        assert_eq!(d.ttl(Duration::from_secs(600)), Duration::from_secs(30));
        assert_eq!(d.ttl(Duration::from_secs(10)), Duration::from_secs(10));
        h.insert("cache-control", "max-age=0, no-store".parse().unwrap());
        assert!(Directives::read(&h).no_store);
    }

    #[test]
    fn an_entry_expires_at_its_ttl_on_a_clock_the_test_moves() {
        use crate::clock::{Clock, ManualClock};
        let clock = ManualClock::new(1_000_000);
        let e = Entry {
            alias: "m".into(),
            stream: false,
            body: Bytes::from_static(b"{}"),
            input_tokens: 0,
            output_tokens: 0,
            cost_micro: 0,
            expires_at: clock.now_ms() + 600_000,
        };
        assert!(e.fresh(clock.now_ms()));
        clock.advance(599_999);
        assert!(e.fresh(clock.now_ms()));
        clock.advance(1);
        assert!(!e.fresh(clock.now_ms()));
    }

    #[test]
    fn only_whole_answers_are_complete() {
        assert!(is_complete(
            false,
            br#"{"choices":[{"message":{"content":"4"}}]}"#
        ));
        assert!(is_complete(false, b"{\"a\":1}\n"));
        assert!(!is_complete(
            false,
            br#"{"choices":[{"message":{"content":"4"#
        ));
        assert!(!is_complete(false, b""));
        let done = "data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert!(is_complete(true, done.as_bytes()));
        assert!(is_complete(true, done.replace('\n', "\r\n").as_bytes()));
        assert!(!is_complete(true, b"data: [DONE]\r\n\r\ndata: {}\r\n\r\n"));
        // Cut before the sentinel, or inside its event.
        assert!(!is_complete(true, b"data: {\"choices\":[]}\n\n"));
        assert!(!is_complete(
            true,
            b"data: {\"choices\":[]}\n\ndata: [DONE]"
        ));
        assert!(!is_complete(true, b"data: {\"choices\":[]}\n\ndata: [DO"));
        // A sentinel that is not the last event.
        assert!(!is_complete(true, b"data: [DONE]\n\ndata: {}\n\n"));
        // Anthropic's and the responses API's final events.
        assert!(is_complete(
            true,
            b"event: message_delta\ndata: {\"type\":\"message_delta\"}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        ));
        assert!(!is_complete(
            true,
            b"event: message_delta\ndata: {\"type\":\"message_delta\"}\n\n"
        ));
        assert!(is_complete(
            true,
            b"data: {\"type\":\"response.completed\",\"response\":{}}\n\n"
        ));
    }

    #[test]
    fn a_stored_stream_replays_event_by_event() {
        let e = Entry {
            alias: "m".into(),
            stream: true,
            body: Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n"),
            input_tokens: 1,
            output_tokens: 2,
            cost_micro: 3,
            expires_at: 4,
        };
        let events = e.events();
        assert_eq!(events.len(), 3);
        assert_eq!(&events[2][..], b"data: [DONE]\n\n");
        assert_eq!(events.concat(), e.body.to_vec());
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), e);
    }

    proptest! {
        #[test]
        fn events_always_reassemble_the_body(body in "[a-z\\n:{}\\[\\] ]{0,200}") {
            let e = Entry { alias: String::new(), stream: true, body: Bytes::from(body.clone()), input_tokens: 0, output_tokens: 0, cost_micro: 0, expires_at: 0 };
            prop_assert_eq!(e.events().concat(), body.into_bytes());
        }
    }
}
