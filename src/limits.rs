//! Stage 2, `request_filter`: rate and concurrency limits with pingora-limits, before any
//! upstream work. Scopes: global, client IP, client key, model alias. Dimensions: requests
//! per second and per minute, tokens per minute, requests in flight. Counting uses
//! count-min sketches (fixed memory whatever the number of keys or IPs; a hash collision
//! can only over-count, never under-count). Rates use a sliding-window estimate:
//! `previous window x (1 - elapsed fraction) + current window`, the way Cloudflare does.
//! The counters live on the service, so they survive config reloads; the limits come
//! from the config of the request.

use crate::config::file::LimitSection;
use http::{HeaderName, HeaderValue};
use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::{Rate, RateComponents};
use std::net::IpAddr;
use std::time::Duration;

/// Where a limit applies. Its name is the metrics label and appears in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    Ip,
    Key,
    Model,
    Team,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Ip => "ip",
            Scope::Key => "key",
            Scope::Model => "model",
            Scope::Team => "team",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A measured dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Rps,
    Rpm,
    Tpm,
    Concurrency,
}

impl Dimension {
    pub fn describe(self, limit: u64) -> String {
        match self {
            Dimension::Rps => format!("{limit} requests per second"),
            Dimension::Rpm => format!("{limit} requests per minute"),
            Dimension::Tpm => format!("{limit} tokens per minute"),
            Dimension::Concurrency => format!("{limit} requests in flight"),
        }
    }
}

/// A refused request: which limit, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    pub dimension: Dimension,
    pub limit: u64,
    /// Seconds until the window frees some room (at least 1).
    pub retry_after: u64,
    /// The model alias, for a model-scope refusal.
    pub model: Option<String>,
}

impl Refusal {
    pub fn message(&self) -> String {
        let whose = match (self.scope, &self.model) {
            (Scope::Global, _) => "the gateway's global limit".to_string(),
            (Scope::Ip, _) => "the limit per client IP".to_string(),
            (Scope::Key, _) => "the limit of this API key".to_string(),
            (Scope::Model, Some(m)) => format!("the limit of model `{m}`"),
            (Scope::Model, None) => "the model's limit".to_string(),
            (Scope::Team, _) => "the limit of this key's team".to_string(),
        };
        format!(
            "Rate limit reached: {whose} is {}. Please try again in {}s.",
            self.dimension.describe(self.limit),
            self.retry_after
        )
    }
}

/// The OpenAI-style rate-limit headers of the key scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyHeaders {
    pub requests: Option<Budget>,
    pub tokens: Option<Budget>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
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

/// Counters of one scope.
struct ScopeCounters {
    rps: Rate,
    rpm: Rate,
    tpm: Rate,
    inflight: Inflight,
}

impl ScopeCounters {
    fn new(slots: usize) -> Self {
        ScopeCounters {
            rps: Rate::new_with_estimator_config(Duration::from_secs(1), 4, slots),
            rpm: Rate::new_with_estimator_config(Duration::from_secs(60), 4, slots),
            tpm: Rate::new_with_estimator_config(Duration::from_secs(60), 4, slots),
            inflight: Inflight::new(),
        }
    }

    fn rate(&self, d: Dimension) -> &Rate {
        match d {
            Dimension::Rps => &self.rps,
            Dimension::Tpm => &self.tpm,
            _ => &self.rpm,
        }
    }
}

/// The sliding estimate of a window and the time until the current window ends.
fn estimate(c: RateComponents) -> (f64, Duration) {
    let prev = c.prev_samples.max(0) as f64;
    let curr = c.curr_samples.max(0) as f64;
    let left = c
        .interval
        .mul_f64((1.0 - c.current_interval_fraction).clamp(0.0, 1.0));
    (prev * (1.0 - c.current_interval_fraction) + curr, left)
}

/// All limit counters of the process.
pub struct Counters {
    scopes: [ScopeCounters; 5],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            // 4 x 16384 counters per window: about 1 MiB per rate; more room for IPs.
            scopes: [
                ScopeCounters::new(64),
                ScopeCounters::new(16384),
                ScopeCounters::new(16384),
                ScopeCounters::new(4096),
                ScopeCounters::new(4096),
            ],
        }
    }
}

/// A fixed hash of a scope key, so one sketch serves every key of a scope: 64-bit FNV-1a,
/// the same in every process and Rust version (std's `DefaultHasher` promises neither,
/// and counters shared between instances must agree on their keys).
pub fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What one request holds against the limits: concurrency slots (released on drop, so
/// by any path the request ends) and the token charges to correct with real usage.
#[derive(Default)]
pub struct Admission {
    guards: Vec<Guard>,
    charges: Vec<(Scope, u64, isize)>,
    counted: Vec<(Scope, Dimension, u64)>,
    pub key_headers: Option<KeyHeaders>,
}

impl Counters {
    /// Counts one request against `limits` of `scope` (rps, rpm), or refuses it. A
    /// refused request is not counted anywhere (earlier scopes are rolled back).
    pub fn admit_request(
        &self,
        scope: Scope,
        key: u64,
        limits: &LimitSection,
        adm: &mut Admission,
    ) -> Result<(), Refusal> {
        let c = &self.scopes[scope.index()];
        for (dim, limit) in [(Dimension::Rps, limits.rps), (Dimension::Rpm, limits.rpm)] {
            let Some(limit) = limit else { continue };
            let rate = c.rate(dim);
            rate.observe(&key, 1);
            let (est, left) = rate.rate_with(&key, estimate);
            if est > limit as f64 {
                rate.observe(&key, -1);
                self.roll_back(adm);
                return Err(refusal(scope, dim, limit, left));
            }
            adm.counted.push((scope, dim, key));
        }
        Ok(())
    }

    /// Takes a concurrency slot of `scope`, or refuses (rolling back what `adm` counted).
    /// Taken once the request body is in, so a client stalling its upload holds no slot.
    pub fn admit_concurrency(
        &self,
        scope: Scope,
        key: u64,
        limits: &LimitSection,
        adm: &mut Admission,
    ) -> Result<(), Refusal> {
        let c = &self.scopes[scope.index()];
        if let Some(limit) = limits.concurrency {
            let (guard, now) = c.inflight.incr(key, 1);
            if now > count(limit) {
                drop(guard);
                self.roll_back(adm);
                return Err(refusal(
                    scope,
                    Dimension::Concurrency,
                    limit,
                    Duration::from_secs(1),
                ));
            }
            adm.guards.push(guard);
        }
        Ok(())
    }

    /// Charges an estimate of the request's tokens against `scope`'s tpm, or refuses when
    /// it would exceed what is left of the window.
    pub fn admit_tokens(
        &self,
        scope: Scope,
        key: u64,
        limits: &LimitSection,
        tokens: u64,
        adm: &mut Admission,
    ) -> Result<(), Refusal> {
        let Some(limit) = limits.tpm else {
            return Ok(());
        };
        let rate = &self.scopes[scope.index()].tpm;
        // A request that alone exceeds the limit is refused before it touches a counter: a
        // client number never reaches the sketch unbounded (it would wrap the counter).
        if tokens > limit {
            self.roll_back(adm);
            let (_, left) = rate.rate_with(&key, estimate);
            return Err(refusal(scope, Dimension::Tpm, limit, left));
        }
        let n = count(tokens);
        rate.observe(&key, n);
        let (est, left) = rate.rate_with(&key, estimate);
        if est > limit as f64 {
            rate.observe(&key, -n);
            self.roll_back(adm);
            return Err(refusal(scope, Dimension::Tpm, limit, left));
        }
        adm.charges.push((scope, key, n));
        Ok(())
    }

    /// Replaces every token estimate of `adm` by the real usage.
    pub fn settle_tokens(&self, adm: &mut Admission, actual: u64) {
        let actual = count(actual);
        for (scope, key, charged) in adm.charges.drain(..) {
            let delta = actual.saturating_sub(charged);
            if delta != 0 {
                self.scopes[scope.index()].tpm.observe(&key, delta);
            }
        }
    }

    fn roll_back(&self, adm: &mut Admission) {
        for (scope, dim, key) in adm.counted.drain(..) {
            self.scopes[scope.index()].rate(dim).observe(&key, -1);
        }
        for (scope, key, n) in adm.charges.drain(..) {
            self.scopes[scope.index()].tpm.observe(&key, -n);
        }
        adm.guards.clear();
    }

    /// The key scope's current budgets, for the `x-ratelimit-*` headers.
    pub fn key_headers(&self, key: u64, limits: &LimitSection) -> Option<KeyHeaders> {
        let c = &self.scopes[Scope::Key.index()];
        let budget = |rate: &Rate, limit: u64| {
            let (est, left) = rate.rate_with(&key, estimate);
            Budget {
                limit,
                remaining: (limit as f64 - est).max(0.0) as u64,
                reset: left,
            }
        };
        let h = KeyHeaders {
            requests: limits.rpm.map(|l| budget(&c.rpm, l)),
            tokens: limits.tpm.map(|l| budget(&c.tpm, l)),
        };
        (h.requests.is_some() || h.tokens.is_some()).then_some(h)
    }
}

fn refusal(scope: Scope, dimension: Dimension, limit: u64, left: Duration) -> Refusal {
    Refusal {
        scope,
        dimension,
        limit,
        retry_after: crate::error::retry_after_secs(left),
        model: None,
    }
}

/// Estimated tokens of a request before it is sent: a quarter of the prompt bytes (about
/// four bytes a token for English text and JSON) plus the completion budget it asks for.
/// Saturates instead of wrapping, whatever the client asked for.
pub fn estimate_tokens(body_len: usize, max_tokens: Option<u64>) -> u64 {
    (body_len as u64 / 4).saturating_add(max_tokens.unwrap_or(0))
}

/// The largest limit the config accepts and the largest amount one request adds to a
/// counter (about 10^12): far above any real rate, far below where a sum of them wraps.
pub const MAX_COUNT: u64 = 1 << 40;

/// A number of requests or tokens as a counter increment, capped at [`MAX_COUNT`].
fn count(n: u64) -> isize {
    isize::try_from(n.min(MAX_COUNT)).unwrap_or(isize::MAX)
}

/// An address range of trusted proxies: `10.0.0.0/8`, `::1`, `192.168.1.7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn bits(ip: IpAddr) -> (u128, u8) {
            match ip {
                IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        }
        let ip = match ip {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let ((a, la), (b, lb)) = (bits(self.net), bits(ip));
        if la != lb {
            return false;
        }
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        a & mask == b & mask
    }
}

/// The client's IP: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(xff) = forwarded_for else {
        return peer;
    };
    let mut ip = peer;
    for hop in xff.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(h) => {
                ip = h;
                if !is_trusted(h) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    ip
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(prev: isize, curr: isize, fraction: f64) -> RateComponents {
        // RateComponents is non-exhaustive: build it through a Rate-shaped closure.
        let r = Rate::new(Duration::from_secs(60));
        r.rate_with(&0u8, |mut c| {
            c.prev_samples = prev;
            c.curr_samples = curr;
            c.current_interval_fraction = fraction;
            c
        })
    }

    #[test]
    fn the_sliding_estimate_weighs_the_previous_window_by_what_is_left() {
        let (est, left) = estimate(comps(60, 0, 0.25));
        assert_eq!(est, 45.0);
        assert_eq!(left, Duration::from_secs(45));
        let (est, _) = estimate(comps(60, 10, 0.5));
        assert_eq!(est, 40.0);
        // Window rollover: the previous window no longer counts once the new one is over.
        let (est, left) = estimate(comps(0, 3, 0.999));
        assert_eq!(est, 3.0);
        assert!(left < Duration::from_millis(100));
    }

    #[test]
    fn a_burst_over_rpm_is_refused_and_keys_are_independent() {
        let c = Counters::default();
        let limits = LimitSection {
            rpm: Some(60),
            ..Default::default()
        };
        let (a, b) = (key_hash("a"), key_hash("b"));
        let mut passed = 0;
        let mut refused = None;
        for _ in 0..100 {
            match c.admit_request(Scope::Key, a, &limits, &mut Admission::default()) {
                Ok(()) => passed += 1,
                Err(r) => refused = Some(r),
            }
        }
        assert_eq!(passed, 60);
        let r = refused.unwrap();
        assert_eq!(
            (r.scope, r.dimension, r.limit),
            (Scope::Key, Dimension::Rpm, 60)
        );
        assert!((1..=60).contains(&r.retry_after));
        assert!(c
            .admit_request(Scope::Key, b, &limits, &mut Admission::default())
            .is_ok());
        let h = c.key_headers(a, &limits).unwrap();
        assert_eq!(h.requests.unwrap().remaining, 0);
    }

    #[test]
    fn a_refusal_rolls_back_what_earlier_scopes_counted() {
        let c = Counters::default();
        let open = LimitSection {
            rpm: Some(1000),
            ..Default::default()
        };
        let closed = LimitSection {
            rpm: Some(0),
            ..Default::default()
        };
        let mut adm = Admission::default();
        c.admit_request(Scope::Key, 1, &open, &mut adm).unwrap();
        assert!(c.admit_request(Scope::Ip, 2, &closed, &mut adm).is_err());
        let h = c.key_headers(1, &open).unwrap();
        assert_eq!(h.requests.unwrap().remaining, 1000);
    }

    #[test]
    fn concurrency_slots_are_released_when_the_admission_drops() {
        let c = Counters::default();
        let limits = LimitSection {
            concurrency: Some(2),
            ..Default::default()
        };
        let mut one = Admission::default();
        let mut two = Admission::default();
        c.admit_concurrency(Scope::Key, 7, &limits, &mut one)
            .unwrap();
        c.admit_concurrency(Scope::Key, 7, &limits, &mut two)
            .unwrap();
        let r = c
            .admit_concurrency(Scope::Key, 7, &limits, &mut Admission::default())
            .unwrap_err();
        assert_eq!(r.dimension, Dimension::Concurrency);
        drop(one);
        assert!(c
            .admit_concurrency(Scope::Key, 7, &limits, &mut Admission::default())
            .is_ok());
    }

    #[test]
    fn key_hashes_are_stable_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(key_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn an_estimate_over_the_limit_is_refused_without_touching_the_counter() {
        let c = Counters::default();
        let limits = LimitSection {
            tpm: Some(1000),
            ..Default::default()
        };
        for huge in [u64::MAX, i64::MAX as u64, 1 << 40, 1001] {
            let r = c
                .admit_tokens(Scope::Key, 3, &limits, huge, &mut Admission::default())
                .unwrap_err();
            assert_eq!(r.dimension, Dimension::Tpm);
        }
        assert_eq!(estimate_tokens(usize::MAX, Some(u64::MAX)), u64::MAX);
        // The window is untouched: 1000 tokens fit, one more does not.
        let mut adm = Admission::default();
        c.admit_tokens(Scope::Key, 3, &limits, 1000, &mut adm)
            .unwrap();
        assert!(c
            .admit_tokens(Scope::Key, 3, &limits, 1, &mut Admission::default())
            .is_err());
        // Settling with an absurd reported usage saturates instead of wrapping negative.
        c.settle_tokens(&mut adm, u64::MAX);
        assert!(c
            .admit_tokens(Scope::Key, 3, &limits, 1, &mut Admission::default())
            .is_err());
    }

    #[test]
    fn token_estimates_are_settled_with_real_usage() {
        let c = Counters::default();
        let limits = LimitSection {
            tpm: Some(1000),
            ..Default::default()
        };
        let mut adm = Admission::default();
        c.admit_tokens(Scope::Key, 3, &limits, 100, &mut adm)
            .unwrap();
        c.settle_tokens(&mut adm, 900);
        assert_eq!(
            c.key_headers(3, &limits).unwrap().tokens.unwrap().remaining,
            100
        );
        let r = c
            .admit_tokens(Scope::Key, 3, &limits, 101, &mut Admission::default())
            .unwrap_err();
        assert_eq!(r.dimension, Dimension::Tpm);
        assert!(c
            .admit_tokens(Scope::Key, 3, &limits, 100, &mut Admission::default())
            .is_ok());
    }

    #[test]
    fn durations_are_written_like_openai() {
        assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(openai_duration(Duration::from_secs(17)), "17s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "2s");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = [
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("::1").unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_ip(ip("203.0.113.9"), Some("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some("1.2.3.4, 10.9.9.9"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some("garbage"), &trusted),
            ip("10.1.2.3")
        );
        assert_eq!(
            client_ip(ip("::1"), Some("2001:db8::1"), &trusted),
            ip("2001:db8::1")
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!Cidr::parse("10.0.0.0/8")
            .unwrap()
            .contains(ip("2001:db8::1")));
    }
}
