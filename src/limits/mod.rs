//! Stage 2, `request_filter`: rate and concurrency limits, before any upstream work.
//! Scopes: global, client IP, client key, team, model alias. Dimensions: requests per
//! second and per minute, tokens per minute, requests in flight. A request is admitted in
//! two stages: its request rates before the body is read ([`admit_request`]); the model's
//! rates, every scope's in-flight slot and token estimate once the body is in
//! ([`admit_model`]), so a client stalling its upload holds no slot. Each stage is one
//! all-or-nothing call to a [`CounterBackend`]; the limits come from the config of the
//! request, the counters from the service (they outlive reloads).

mod backend;
mod client_ip;
mod headers;
mod lease;
mod local;
mod scripts;
mod shared;
mod window;

pub use backend::CounterBackend;
pub use client_ip::{client_ip, Cidr};
pub use headers::{KeyHeaders, Room};
pub use local::LocalCounters;
pub use shared::{OnRedisError, RedisCounters, SharedOptions};

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Limits of one scope, as the config file, the admin API and the store write them.
/// Absent dimensions are unlimited.
#[derive(Debug, Deserialize, Serialize, Default, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rps: Option<u64>,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (input + output) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests in flight, streams included until they end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
}

/// Where a limit applies. Its name is the metrics label and appears in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

/// A measured dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    Rps,
    Rpm,
    Tpm,
    Concurrency,
    /// A budget's spend in micro-USD (counted by a shared backend only; in one process
    /// budgets are counted by `keys::budget`).
    Spend,
}

impl Dimension {
    pub fn describe(self, limit: u64) -> String {
        match self {
            Dimension::Rps => format!("{limit} requests per second"),
            Dimension::Rpm => format!("{limit} requests per minute"),
            Dimension::Tpm => format!("{limit} tokens per minute"),
            Dimension::Concurrency => format!("{limit} requests in flight"),
            Dimension::Spend => {
                crate::relay::pricing::dollars(i64::try_from(limit).unwrap_or(i64::MAX))
            }
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
    /// The shared counters could not be reached (`cluster.on_redis_error: refuse`): 503.
    pub unavailable: bool,
    /// For a budget (`Spend`): what its owner has spent in the period, micro-USD.
    pub spent: u64,
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

/// One limit a request is checked and counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub scope: Scope,
    /// The scope's key ([`key_hash`] of the key id, team id, IP or alias; 0 for global).
    pub key: u64,
    pub dimension: Dimension,
    pub limit: u64,
    /// 1 for a request or a slot; the token estimate for `Tpm`, settled later.
    pub amount: u64,
    /// The backend's note of what it counted (a shared backend's slot id or window), for
    /// settling, releasing or undoing exactly that; 0 until reserved.
    pub mark: u64,
    /// For `Spend`: what a shared backend starts a missing counter at (the spend this
    /// instance knows of, read from the store at start), so a flushed Redis does not
    /// forget what was spent.
    pub base: u64,
    /// What the request really used, in place of `amount`, once known (`Tpm`, `Spend`).
    pub settled: Option<u64>,
}

impl Charge {
    pub fn new(scope: Scope, key: u64, dimension: Dimension, limit: u64, amount: u64) -> Charge {
        Charge {
            scope,
            key,
            dimension,
            limit,
            amount,
            mark: 0,
            base: 0,
            settled: None,
        }
    }

    /// The refusal of this charge, with the time until its window frees room.
    pub fn refusal(&self, left: Duration) -> Refusal {
        Refusal {
            scope: self.scope,
            dimension: self.dimension,
            limit: self.limit,
            retry_after: crate::error::retry_after_secs(left),
            model: None,
            unavailable: false,
            spent: 0,
        }
    }
}

impl Limits {
    fn requests(&self, scope: Scope, key: u64, out: &mut Vec<Charge>) {
        for (dimension, limit) in [(Dimension::Rps, self.rps), (Dimension::Rpm, self.rpm)] {
            push(out, scope, key, dimension, limit, 1);
        }
    }

    fn slot(&self, scope: Scope, key: u64, out: &mut Vec<Charge>) {
        push(out, scope, key, Dimension::Concurrency, self.concurrency, 1);
    }

    fn tokens(&self, scope: Scope, key: u64, tokens: u64, out: &mut Vec<Charge>) {
        push(out, scope, key, Dimension::Tpm, self.tpm, tokens);
    }
}

/// Adds a charge when the dimension has a limit.
fn push(
    out: &mut Vec<Charge>,
    scope: Scope,
    key: u64,
    dimension: Dimension,
    limit: Option<u64>,
    amount: u64,
) {
    if let Some(limit) = limit {
        out.push(Charge::new(scope, key, dimension, limit, amount));
    }
}

/// What one request holds against the limits: its in-flight slots, token estimates and
/// (with a shared backend) budget reservations, settled with what it used and given back
/// in one call when the admission drops, so by any path the request ends.
#[derive(Default)]
pub struct Admission {
    backend: Option<Arc<dyn CounterBackend>>,
    /// Stage one's charges, when the backend checks them with stage two's.
    deferred: Vec<Charge>,
    held: Vec<Charge>,
    /// The key whose `x-ratelimit-*` headers the answer carries: its counter key and its
    /// rpm and tpm limits. The rooms are read when the headers are written.
    key_room: Option<(u64, Option<u64>, Option<u64>)>,
}

impl Admission {
    pub fn new(backend: Arc<dyn CounterBackend>) -> Self {
        Admission {
            backend: Some(backend),
            deferred: Vec::new(),
            held: Vec::new(),
            key_room: None,
        }
    }

    /// Checks and counts `charges` (with any deferred from stage one) all-or-nothing. A
    /// refusal also takes back what earlier stages of this request counted: a refused
    /// request counts nowhere.
    pub async fn admit(&mut self, charges: &mut [Charge]) -> Result<(), Refusal> {
        let Some(backend) = &self.backend else {
            return Ok(());
        };
        let mut all;
        let charges = if self.deferred.is_empty() {
            charges
        } else {
            all = std::mem::take(&mut self.deferred);
            all.extend_from_slice(charges);
            &mut all[..]
        };
        if charges.is_empty() {
            return Ok(());
        }
        let reserved = match backend.reserve_now(charges) {
            Some(now) => now,
            None => backend.reserve(charges).await,
        };
        match reserved {
            Ok(()) => {
                self.held.extend_from_slice(charges);
                Ok(())
            }
            Err(r) => {
                backend.undo(&self.held);
                self.held.clear();
                Err(r)
            }
        }
    }

    /// Stage one: checked now, or (when the backend says so) sent with stage two, so a
    /// shared backend answers a request in one round trip. A refusal it already knows is
    /// answered at once either way.
    pub async fn admit_early(&mut self, charges: &mut [Charge]) -> Result<(), Refusal> {
        match &self.backend {
            Some(b) if b.defers() => {
                if let Some(r) = b.known_refusal(charges) {
                    return Err(r);
                }
                self.deferred.extend_from_slice(charges);
                Ok(())
            }
            _ => self.admit(charges).await,
        }
    }

    /// Notes the tokens the request used, in place of every token estimate.
    pub fn settle_tokens(&mut self, actual: u64) {
        self.settle(Dimension::Tpm, actual);
    }

    /// Notes what the request cost, in place of every budget reservation.
    pub fn settle_spend(&mut self, cost_micro: u64) {
        self.settle(Dimension::Spend, cost_micro);
    }

    fn settle(&mut self, dimension: Dimension, actual: u64) {
        for c in self.held.iter_mut().filter(|c| c.dimension == dimension) {
            c.settled = Some(actual);
        }
    }

    /// Whether the backend counts budgets (a shared backend).
    pub fn counts_spend(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| b.counts_spend())
    }

    /// The budget reservations a shared backend holds, in the order they were given, each
    /// with the spend it reported in `base` (none while it is unreachable and counting
    /// falls back to this process).
    pub fn spend_held(&self) -> impl Iterator<Item = &Charge> {
        self.held
            .iter()
            .filter(|c| c.dimension == Dimension::Spend && c.mark & COUNTED_HERE == 0)
    }

    /// Notes the key whose rooms the `x-ratelimit-*` headers show.
    fn note_key_headers(&mut self, key: u64, limits: &Limits) {
        self.key_room =
            (limits.rpm.is_some() || limits.tpm.is_some()).then_some((key, limits.rpm, limits.tpm));
    }

    /// The key scope's rooms as they stand now, for the `x-ratelimit-*` headers.
    pub fn key_headers(&self) -> Option<KeyHeaders> {
        let (key, rpm, tpm) = self.key_room?;
        let backend = self.backend.as_ref()?;
        let room = |d, l| backend.room(Scope::Key, key, d, l);
        Some(KeyHeaders {
            requests: rpm.map(|l| room(Dimension::Rpm, l)),
            tokens: tpm.map(|l| room(Dimension::Tpm, l)),
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(backend) = &self.backend {
            if !self.deferred.is_empty() {
                backend.count_later(std::mem::take(&mut self.deferred));
            }
            let ends = |c: &Charge| {
                matches!(c.dimension, Dimension::Concurrency | Dimension::Spend)
                    || c.settled.is_some()
                    || c.mark & LEASED != 0
            };
            if self.held.iter().any(ends) {
                backend.finish(&self.held);
            }
        }
    }
}

/// Who a request counts as, in every scope but the model's.
#[derive(Clone, Copy)]
pub struct Scopes<'a> {
    pub global: &'a Limits,
    pub per_ip: &'a Limits,
    pub client_ip: &'a str,
    /// The key's counter key and limits, when a key called.
    pub key: Option<(u64, &'a Limits)>,
    /// Its team's, when it has one.
    pub team: Option<(u64, &'a Limits)>,
}

/// Stage one, before the body is read: the request rates of the global, IP, key and team
/// scopes.
pub async fn admit_request(adm: &mut Admission, who: &Scopes<'_>) -> Result<(), Refusal> {
    let mut charges = Vec::with_capacity(8);
    who.global.requests(Scope::Global, 0, &mut charges);
    let ip = key_hash(who.client_ip);
    who.per_ip.requests(Scope::Ip, ip, &mut charges);
    if let Some((k, limits)) = who.key {
        limits.requests(Scope::Key, k, &mut charges);
    }
    if let Some((team, limits)) = who.team {
        limits.requests(Scope::Team, team, &mut charges);
    }
    let result = adm.admit_early(&mut charges).await;
    if let Some((k, limits)) = who.key {
        adm.note_key_headers(k, limits);
    }
    result
}

/// Stage two, once the body is in: the model's request rates, then the in-flight slot of
/// every scope, then the token estimate of every scope, then `budgets` (the budget
/// reservations a shared backend counts; none otherwise). `model`: the alias's name and
/// limits.
pub async fn admit_model(
    adm: &mut Admission,
    who: &Scopes<'_>,
    (alias, model_limits): (&str, &Limits),
    tokens: u64,
    budgets: &[Charge],
) -> Result<(), Refusal> {
    let (global, per_ip) = (who.global, who.per_ip);
    let (model, ip) = (key_hash(alias), key_hash(who.client_ip));
    let (key, team) = (who.key, who.team);
    let mut charges = Vec::with_capacity(12);
    let c = &mut charges;
    model_limits.requests(Scope::Model, model, c);
    global.slot(Scope::Global, 0, c);
    per_ip.slot(Scope::Ip, ip, c);
    if let Some((k, limits)) = key {
        limits.slot(Scope::Key, k, c);
    }
    if let Some((t, limits)) = team {
        limits.slot(Scope::Team, t, c);
    }
    model_limits.slot(Scope::Model, model, c);
    global.tokens(Scope::Global, 0, tokens, c);
    per_ip.tokens(Scope::Ip, ip, tokens, c);
    model_limits.tokens(Scope::Model, model, tokens, c);
    if let Some((k, limits)) = key {
        limits.tokens(Scope::Key, k, tokens, c);
    }
    if let Some((t, limits)) = team {
        limits.tokens(Scope::Team, t, tokens, c);
    }
    charges.extend_from_slice(budgets);
    let result = adm.admit(&mut charges).await.map_err(|mut r| {
        if r.scope == Scope::Model {
            r.model = Some(alias.to_string());
        }
        r
    });
    if let Some((k, limits)) = key {
        adm.note_key_headers(k, limits);
    }
    result
}

/// A fixed hash of a scope key, so one sketch serves every key of a scope: 64-bit FNV-1a,
/// the same in every process and Rust version (std's `DefaultHasher` promises neither,
/// and counters shared between instances must agree on their keys).
pub fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Estimated tokens of a request before it is sent: a quarter of the prompt bytes (about
/// four bytes a token for English text and JSON) plus the most output it asks for (its
/// completion budget times its choices). Saturates instead of wrapping, whatever the
/// client asked for.
pub fn estimate_tokens(body_len: usize, output_tokens: u64) -> u64 {
    input_tokens(body_len).saturating_add(output_tokens)
}

/// The input a body of `body_len` bytes is taken to hold before the upstream counts it:
/// a token per four bytes, rounded up. The one estimate token limits, budget reservations
/// and context-window routing all use.
pub fn input_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

/// The largest limit the config accepts and the largest amount one request adds to a
/// counter (about 10^12): far above any real rate, far below where a sum of them wraps.
pub const MAX_COUNT: u64 = 1 << 40;

/// A charge's mark with this bit set: a shared backend could not be reached and counted
/// it in this process.
pub(crate) const COUNTED_HERE: u64 = 1 << 63;

/// A charge's mark with this bit set: a shared backend took it from a lease this process
/// holds (`cluster.leases`), and hears of its end whatever it counts.
pub(crate) const LEASED: u64 = 1 << 62;

/// The largest budget figure a shared counter holds, micro-USD (2^53, where Lua's numbers
/// stop being exact integers; about $9 billion).
pub const MAX_SPEND: u64 = 1 << 53;

/// A number of requests or tokens as a counter increment, capped at [`MAX_COUNT`].
pub(crate) fn count(n: u64) -> isize {
    isize::try_from(n.min(MAX_COUNT)).unwrap_or(isize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (Arc<LocalCounters>, Arc<dyn CounterBackend>) {
        let c = Arc::new(LocalCounters::default());
        let b: Arc<dyn CounterBackend> = c.clone();
        (c, b)
    }

    fn charge(scope: Scope, key: u64, dimension: Dimension, limit: u64, amount: u64) -> Charge {
        Charge::new(scope, key, dimension, limit, amount)
    }

    fn rpm(key: u64, limit: u64) -> Charge {
        charge(Scope::Key, key, Dimension::Rpm, limit, 1)
    }

    #[tokio::test]
    async fn a_burst_over_rpm_is_refused_and_keys_are_independent() {
        let (c, b) = local();
        let (a, other) = (key_hash("a"), key_hash("b"));
        let mut passed = 0;
        let mut refused = None;
        for _ in 0..100 {
            match Admission::new(b.clone()).admit(&mut [rpm(a, 60)]).await {
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
        assert!(Admission::new(b).admit(&mut [rpm(other, 60)]).await.is_ok());
        assert_eq!(c.room(Scope::Key, a, Dimension::Rpm, 60).remaining, 0);
    }

    #[tokio::test]
    async fn a_refusal_rolls_back_what_earlier_charges_and_stages_counted() {
        let (c, b) = local();
        let mut adm = Admission::new(b);
        adm.admit(&mut [rpm(1, 1000)]).await.unwrap();
        let closed = charge(Scope::Ip, 2, Dimension::Rpm, 0, 1);
        let r = adm.admit(&mut [rpm(3, 1000), closed]).await.unwrap_err();
        assert_eq!(r.scope, Scope::Ip);
        assert_eq!(c.room(Scope::Key, 1, Dimension::Rpm, 1000).remaining, 1000);
        assert_eq!(c.room(Scope::Key, 3, Dimension::Rpm, 1000).remaining, 1000);
    }

    #[tokio::test]
    async fn concurrency_slots_are_released_when_the_admission_drops() {
        let (_, b) = local();
        let slot = charge(Scope::Key, 7, Dimension::Concurrency, 2, 1);
        let mut one = Admission::new(b.clone());
        let mut two = Admission::new(b.clone());
        one.admit(&mut [slot]).await.unwrap();
        two.admit(&mut [slot]).await.unwrap();
        let r = Admission::new(b.clone())
            .admit(&mut [slot])
            .await
            .unwrap_err();
        assert_eq!(r.dimension, Dimension::Concurrency);
        drop(one);
        assert!(Admission::new(b).admit(&mut [slot]).await.is_ok());
    }

    #[test]
    fn key_hashes_are_stable_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(key_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[tokio::test]
    async fn an_estimate_over_the_limit_is_refused_without_touching_the_counter() {
        let (_, b) = local();
        let tpm = |n| charge(Scope::Key, 3, Dimension::Tpm, 1000, n);
        for huge in [u64::MAX, i64::MAX as u64, 1 << 40, 1001] {
            let r = Admission::new(b.clone())
                .admit(&mut [tpm(huge)])
                .await
                .unwrap_err();
            assert_eq!(r.dimension, Dimension::Tpm);
        }
        assert_eq!(estimate_tokens(usize::MAX, u64::MAX), u64::MAX);
        // The window is untouched: 1000 tokens fit, one more does not.
        let mut adm = Admission::new(b.clone());
        adm.admit(&mut [tpm(1000)]).await.unwrap();
        assert!(Admission::new(b.clone())
            .admit(&mut [tpm(1)])
            .await
            .is_err());
        // Settling with an absurd reported usage saturates instead of wrapping negative.
        adm.settle_tokens(u64::MAX);
        drop(adm);
        assert!(Admission::new(b).admit(&mut [tpm(1)]).await.is_err());
    }

    #[tokio::test]
    async fn token_estimates_are_settled_with_real_usage() {
        let (c, b) = local();
        let tpm = |n| charge(Scope::Key, 3, Dimension::Tpm, 1000, n);
        let mut adm = Admission::new(b.clone());
        adm.admit(&mut [tpm(100)]).await.unwrap();
        adm.settle_tokens(900);
        // Counted when the request ends.
        assert_eq!(c.room(Scope::Key, 3, Dimension::Tpm, 1000).remaining, 900);
        drop(adm);
        assert_eq!(c.room(Scope::Key, 3, Dimension::Tpm, 1000).remaining, 100);
        let r = Admission::new(b.clone())
            .admit(&mut [tpm(101)])
            .await
            .unwrap_err();
        assert_eq!(r.dimension, Dimension::Tpm);
        assert!(Admission::new(b).admit(&mut [tpm(100)]).await.is_ok());
    }
}
