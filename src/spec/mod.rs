//! Plain values that many layers share and that import nothing from the crate: how a
//! tier orders its routes and an upstream balances its servers, what an unpriced model
//! does under a budget, the failover settings, and how micro-USD read as dollars. Config files spell them; the
//! request path reads them; neither needs the other to do so. Beside them, small readers
//! and writers of text (`text`: numbers and hex; `json`: a walk that picks members out of
//! a large document).

use serde::Deserialize;

pub mod json;
pub mod text;

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
/// A model with no price under an enforced budget: refused, or counted as zero.
pub enum Unpriced {
    #[default]
    Refuse,
    Allow,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted round robin (pingora-load-balancing).
    #[default]
    Weighted,
    /// Fewest requests in flight relative to weight; streams count until they end.
    LeastConn,
    /// Power of two choices over each server's time-to-first-byte estimate (a
    /// peak-sensitive moving average) times one plus its requests in flight.
    Latency,
}

/// How the routes of one tier are ordered for a request.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// In turn, starting one further on each request.
    #[default]
    RoundRobin,
    /// In proportion to `routes[].weight`.
    Weighted,
    /// Fastest first: power of two choices over the routes' time-to-first-byte estimates.
    Latency,
    /// Cheapest first for the request's estimated tokens; equal prices in turn.
    Cost,
}

impl Strategy {
    /// The name in the config, the access log and the explain endpoint.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::Latency => "latency",
            Strategy::Cost => "cost",
        }
    }
}

impl Balance {
    /// The name in the config and the explain endpoint.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Weighted => "weighted",
            Balance::LeastConn => "least_conn",
            Balance::Latency => "latency",
        }
    }
}

/// Micro-USD as a dollar amount for messages: `$12.50`, `$0.0001`, never rounded to zero.
pub fn dollars(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    let mut frac = format!("{:06}", m % 1_000_000);
    while frac.len() > 2 && frac.ends_with('0') {
        frac.pop();
    }
    format!("{sign}${}.{frac}", m / 1_000_000)
}

/// Micro-USD as dollars, for display (JSON `*_usd` fields); never summed.
pub fn usd(micro: i64) -> f64 {
    micro as f64 / 1e6
}

/// Failover settings in effect (see `failover` in the config reference).
#[derive(Debug, Clone)]
pub struct Failover {
    pub max_attempts: usize,
    pub cooldown: std::time::Duration,
    pub max_cooldown: std::time::Duration,
    pub quota_cooldown: std::time::Duration,
    pub error_body_limit: usize,
}

/// Where cached answers are kept.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheBackendKind {
    #[default]
    Memory,
    Redis,
}

/// Whose requests share cached answers.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    #[default]
    Key,
    Team,
    Global,
}

/// The access log's form.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
