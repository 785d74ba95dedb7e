//! The config file schema, exactly as users write it. Every struct names its defaults;
//! a field no struct knows is an error (collected by `Config::parse`, all of them with
//! their paths, alongside every other error); nothing here resolves references or touches the network: that
//! is `config::build`'s job.

use super::units::{ByteSize, Seconds};
use crate::limits::Limits;
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

mod server;
mod tracing;
pub use crate::spec::{CacheBackendKind, CacheScope, LogFormat};
pub use server::{ServerSection, TlsListener};
pub use tracing::{OtlpSection, TracingSection};

#[derive(Debug, Deserialize, Default)]

pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    /// Client keys. With none, the gateway is open to anyone who can reach it.
    #[serde(default)]
    pub keys: Vec<KeySection>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelSection>,
    #[serde(default)]
    pub failover: FailoverSection,
    #[serde(default)]
    pub limits: LimitsSection,
    /// USD per million tokens, by upstream model name or alias.
    #[serde(default)]
    pub pricing: BTreeMap<String, Price>,
    /// `pricing.file`: a price catalogue (see `config::catalogue`), taken out of
    /// `pricing` before the rest is read.
    #[serde(skip)]
    pub pricing_file: Option<String>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub admin: AdminSection,
    /// Where keys, teams, usage and the audit log are kept.
    #[serde(default)]
    pub store: StoreSection,
    /// How budgets reserve and what they do with unpriced models.
    #[serde(default)]
    pub budgets: BudgetsSection,
    /// Where budget alerts go.
    #[serde(default)]
    pub alerts: AlertsSection,
    /// The response cache (each alias opts in with `models.ALIAS.cache`).
    #[serde(default)]
    pub cache: CacheSection,
    /// State shared between instances.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// OpenTelemetry traces.
    #[serde(default)]
    pub tracing: TracingSection,
}

/// The database.
#[derive(Debug, Deserialize, Clone)]
pub struct StoreSection {
    /// `sqlite:///path/to/file.db` (default `sqlite:///var/lib/tollgate/tollgate.db`) or
    /// `postgres://user:password@host:port/database`, which several instances may share.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// How often queued usage rows are written. Default 1s.
    #[serde(default = "default_flush_interval")]
    pub flush_interval: Seconds,
    /// Usage rows kept waiting while the database is slow or down; past this they are
    /// dropped and counted. Default 100000.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// How often keys and teams are re-read in full from a PostgreSQL store, the safety
    /// net under change notifications (which apply within a second). Default 30s.
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: Seconds,
}

/// The response cache.
#[derive(Debug, Deserialize, Clone)]
pub struct CacheSection {
    /// Most bytes of answers kept in memory (`backend: memory`). Default 256MiB.
    #[serde(default = "default_cache_size")]
    pub max_size: ByteSize,
    /// `memory` (default): this process only; `redis`: shared through `cluster.redis`.
    #[serde(default)]
    pub backend: CacheBackendKind,
    /// Whose requests share answers: `key` (default), `team` (a key without a team keeps
    /// its own), or `global`.
    #[serde(default)]
    pub scope: CacheScope,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            max_size: default_cache_size(),
            backend: CacheBackendKind::default(),
            scope: CacheScope::default(),
        }
    }
}

fn default_cache_size() -> ByteSize {
    ByteSize(256 << 20)
}

/// State shared between instances.
#[derive(Debug, Deserialize, Clone)]
pub struct ClusterSection {
    /// `redis://[:PASSWORD@]HOST:PORT/DB` (or `rediss://` for TLS): when set, rate and
    /// concurrency limits are counted there for every instance, and `cache.backend:
    /// redis` keeps answers there.
    #[serde(default)]
    pub redis: Option<crate::secret::Secret>,
    /// While Redis cannot be reached: `local` (count in this process at `limit /
    /// expected_instances`) or `refuse` (503). Default `local`.
    #[serde(default)]
    pub on_redis_error: crate::limits::OnRedisError,
    /// How many instances share the limits (for the `local` fallback). Default 1.
    #[serde(default = "default_instances")]
    pub expected_instances: u64,
    /// How long a concurrency slot outlives an instance that died holding it. Default 30s.
    #[serde(default = "default_slot_ttl")]
    pub slot_ttl: Seconds,
    /// Whether instances take leases of room under large limits and budgets and spend
    /// them in process (no Redis call for most requests). Default true.
    #[serde(default = "default_leases")]
    pub leases: bool,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            redis: None,
            on_redis_error: Default::default(),
            expected_instances: default_instances(),
            slot_ttl: default_slot_ttl(),
            leases: default_leases(),
        }
    }
}

fn default_instances() -> u64 {
    1
}

fn default_leases() -> bool {
    true
}

fn default_slot_ttl() -> Seconds {
    Seconds(Duration::from_secs(30))
}

/// `models.ALIAS.cache`: answers of this alias are cached.
#[derive(Debug, Deserialize, Clone, Copy)]
pub struct ModelCacheSection {
    /// How long an answer is served from the cache.
    pub ttl: Seconds,
}

pub const DEFAULT_STORE_URL: &str = "sqlite:///var/lib/tollgate/tollgate.db";

fn default_store_url() -> String {
    DEFAULT_STORE_URL.to_string()
}

fn default_refresh_interval() -> Seconds {
    Seconds(Duration::from_secs(30))
}

fn default_flush_interval() -> Seconds {
    Seconds(Duration::from_secs(1))
}

fn default_queue_size() -> usize {
    100_000
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            url: default_store_url(),
            flush_interval: default_flush_interval(),
            refresh_interval: default_refresh_interval(),
            queue_size: default_queue_size(),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
pub struct BudgetsSection {
    /// Output tokens reserved for a request that sets no `max_tokens`. Default 4096.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// The most choices (`n`, `best_of`) one request may ask for; more is a 400. The
    /// reservation counts the output of every choice. Default 16.
    #[serde(default = "default_max_n")]
    pub max_n: u64,
    /// A model with no price under an enforced budget: `refuse` (default) or `allow`
    /// (counted as zero, and in `tollgate_unpriced_requests_total`).
    #[serde(default)]
    pub unpriced: Unpriced,
}

fn default_max_tokens() -> u64 {
    4096
}

fn default_max_n() -> u64 {
    16
}

impl Default for BudgetsSection {
    fn default() -> Self {
        BudgetsSection {
            default_max_tokens: default_max_tokens(),
            max_n: default_max_n(),
            unpriced: Unpriced::Refuse,
        }
    }
}

/// A budget as written in the config or sent to the admin API.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    /// The cap in US dollars.
    pub max_usd: f64,
    /// `daily`, `weekly` (from Monday), `monthly` (calendar periods in UTC) or `total`.
    pub period: crate::keys::budget::Period,
    /// `enforce` (default: refuse what does not fit) or `track` (count and alert only).
    #[serde(default)]
    pub mode: crate::keys::budget::Mode,
    /// Fractions of `max_usd` at which an alert is sent. Default [0.8, 1.0].
    #[serde(default = "default_alert_at")]
    pub alert_at: Vec<f64>,
}

pub fn default_alert_at() -> Vec<f64> {
    vec![0.8, 1.0]
}

#[derive(Debug, Deserialize, Clone, Default)]
pub struct AlertsSection {
    #[serde(default)]
    pub webhook: Option<WebhookSection>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct WebhookSection {
    /// `http://` or `https://` URL receiving a JSON POST per alert.
    pub url: Secret,
    /// Extra request headers (an authorization token, say); values are secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Per delivery attempt. Default 5s.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: Seconds,
}

fn default_webhook_timeout() -> Seconds {
    Seconds(Duration::from_secs(5))
}

/// The admin listener's access.
#[derive(Debug, Deserialize, Default, Clone)]

pub struct AdminSection {
    /// When set, `/admin/*` requires `Authorization: Bearer MASTER_KEY` (`/health`,
    /// `/ready` and `/metrics` stay open for probes and scrapers). Default: unset, which
    /// is only safe while `admin_listen` is a loopback address.
    #[serde(default)]
    pub master_key: Option<crate::secret::Secret>,
    /// A second key that may only read `/admin/*` (the console's read-only sign-in). Needs
    /// `master_key`.
    #[serde(default)]
    pub viewer_key: Option<crate::secret::Secret>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq)]

pub struct Price {
    /// USD per million input tokens.
    pub input: f64,
    /// USD per million output tokens.
    pub output: f64,
    /// USD per million input tokens read from the provider's prompt cache. Default: the
    /// input price.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// USD per million input tokens written to the prompt cache for 5 minutes. Default:
    /// 1.25 x the input price.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// USD per million input tokens written to the prompt cache for an hour. Default: 2 x
    /// the input price.
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
}

#[derive(Debug, Deserialize, Clone)]

pub struct LogSection {
    /// Access log format: `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// Write logs to this file instead of stderr.
    #[serde(default)]
    pub file: Option<String>,
    /// Write the access log at all. Default true.
    #[serde(default = "default_true")]
    pub access: bool,
    /// While serving, lines are written in batches at least this often (default 100ms);
    /// a stop writes out what is held. Read at start.
    #[serde(default = "default_log_flush")]
    pub flush_interval: Seconds,
}

fn default_log_flush() -> Seconds {
    Seconds(Duration::from_millis(100))
}

fn default_true() -> bool {
    true
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            file: None,
            access: true,
            flush_interval: default_log_flush(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]

pub struct LimitsSection {
    /// Limits over all traffic.
    #[serde(default)]
    pub global: Limits,
    /// Limits per client IP address.
    #[serde(default)]
    pub per_ip: Limits,
}

#[derive(Debug, Deserialize)]

pub struct FailoverSection {
    /// Attempts per client request, all tiers and fallback aliases together. Default 4.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: usize,
    /// Cooldown after a transient failure when the upstream gives no hint. Default 30s.
    #[serde(default = "default_cooldown")]
    pub cooldown: Seconds,
    /// Upper bound on any hinted transient cooldown. Default 5m.
    #[serde(default = "default_max_cooldown")]
    pub max_cooldown: Seconds,
    /// Cooldown after a quota, billing or credential failure. Default 1h.
    #[serde(default = "default_quota_cooldown")]
    pub quota_cooldown: Seconds,
    /// How much of an upstream error body is read to classify it. Default 64KiB.
    #[serde(default = "default_error_body_limit")]
    pub error_body_limit: ByteSize,
    /// Extra statuses and body patterns that mean "try another target".
    #[serde(default)]
    pub retry_on: RetryOnSection,
}

impl Default for FailoverSection {
    fn default() -> Self {
        FailoverSection {
            max_attempts: default_max_attempts(),
            cooldown: default_cooldown(),
            max_cooldown: default_max_cooldown(),
            quota_cooldown: default_quota_cooldown(),
            error_body_limit: default_error_body_limit(),
            retry_on: RetryOnSection::default(),
        }
    }
}

fn default_max_attempts() -> usize {
    4
}
fn default_cooldown() -> Seconds {
    Seconds(Duration::from_secs(30))
}
fn default_max_cooldown() -> Seconds {
    Seconds(Duration::from_secs(300))
}
fn default_quota_cooldown() -> Seconds {
    Seconds(Duration::from_secs(3600))
}
fn default_error_body_limit() -> ByteSize {
    ByteSize(64 << 10)
}

#[derive(Debug, Deserialize, Default, Clone)]

pub struct RetryOnSection {
    /// Exact codes (`"429"`) or classes (`"5xx"`).
    #[serde(default)]
    pub status: Vec<String>,
    /// Case-insensitive substrings of the error body.
    #[serde(default)]
    pub body_patterns: Vec<String>,
}

#[derive(Debug, Deserialize)]

pub struct KeySection {
    /// A name for logs and metrics; the key itself is never printed.
    pub name: String,
    pub key: Secret,
    #[serde(default)]
    pub limits: Limits,
    /// Aliases this key may call. Absent: all.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub budget: Option<BudgetSection>,
}

pub use crate::provider::Provider;
pub use crate::spec::{Balance, Strategy, Unpriced};

#[derive(Debug, Deserialize)]

pub struct UpstreamSection {
    #[serde(default)]
    pub provider: Provider,
    #[serde(default)]
    pub balance: Balance,
    /// TCP (and TLS) connect timeout. Default 10s.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Seconds,
    /// Time from the end of the request to the response header. Default 60s.
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout: Seconds,
    /// Longest gap between two response body chunks (and longest wait on one piece of a
    /// request body write); also how long an idle connection is kept. Default 300s.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Seconds,
    /// Extends `failover.retry_on` for this upstream.
    #[serde(default)]
    pub retry_on: Option<RetryOnSection>,
    /// Active HTTP health checks; off unless present.
    #[serde(default)]
    pub health_check: Option<HealthCheckSection>,
    /// Add `stream_options.include_usage` to streaming chat and completion requests that
    /// lack `stream_options`, so streamed tokens are counted (the extra usage chunk is
    /// removed from what the client receives). Default: true for openai and azure, false
    /// for others (not every server accepts the option).
    #[serde(default)]
    pub stream_usage: Option<bool>,
    /// How fast latency estimates follow new samples and decay when idle (`balance:
    /// latency` and the `latency` strategy). Default 10s.
    #[serde(default = "default_latency_decay")]
    pub latency_decay: Seconds,
    pub servers: Vec<ServerEntry>,
}

fn default_latency_decay() -> Seconds {
    Seconds(crate::upstream::latency::DECAY)
}

impl UpstreamSection {
    /// A section of the given provider and balancing method with every default and no
    /// servers (for building upstreams in code).
    pub fn new(provider: Provider, balance: Balance) -> Self {
        UpstreamSection {
            provider,
            balance,
            connect_timeout: default_connect_timeout(),
            first_byte_timeout: default_first_byte_timeout(),
            idle_timeout: default_idle_timeout(),
            retry_on: None,
            health_check: None,
            stream_usage: None,
            latency_decay: default_latency_decay(),
            servers: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]

pub struct HealthCheckSection {
    /// Path after the server URL. Default `/models`.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between checks. Default 10s.
    #[serde(default = "default_health_interval")]
    pub interval: Seconds,
    /// Connect and response timeout of one check. Default 5s.
    #[serde(default = "default_health_timeout")]
    pub timeout: Seconds,
    /// Passing checks in a row to become healthy again. Default 1.
    #[serde(default = "default_one")]
    pub consecutive_success: usize,
    /// Failing checks in a row to become unhealthy. Default 1.
    #[serde(default = "default_one")]
    pub consecutive_failure: usize,
}

fn default_health_path() -> String {
    "/models".to_string()
}
fn default_health_interval() -> Seconds {
    Seconds(Duration::from_secs(10))
}
fn default_health_timeout() -> Seconds {
    Seconds(Duration::from_secs(5))
}
fn default_one() -> usize {
    1
}

fn default_connect_timeout() -> Seconds {
    Seconds(Duration::from_secs(10))
}
fn default_first_byte_timeout() -> Seconds {
    Seconds(Duration::from_secs(60))
}
fn default_idle_timeout() -> Seconds {
    Seconds(Duration::from_secs(300))
}

#[derive(Debug, Deserialize)]

pub struct ServerEntry {
    /// Base URL, e.g. `https://api.openai.com/v1`. The client's path after `/v1` is appended.
    pub url: String,
    /// Optional display name; default `host:port`, with `#N` when a host repeats.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Relative share of traffic. Default 1.
    #[serde(default = "default_weight")]
    pub weight: usize,
    /// Used only when no non-backup server of the upstream is usable. Default false.
    #[serde(default)]
    pub backup: bool,
    /// Connection failures or timeouts within `fail_timeout` that cool the server down
    /// for `fail_timeout` (nginx semantics). 0 never does. Default 1.
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    /// Default 10s.
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: Seconds,
    /// Most requests in flight on this server (nginx `max_conns`); past it the server is
    /// skipped like a busy one. Default: unlimited.
    #[serde(default)]
    pub max_conns: Option<usize>,
}

fn default_max_fails() -> u32 {
    1
}
fn default_fail_timeout() -> Seconds {
    Seconds(Duration::from_secs(10))
}

fn default_weight() -> usize {
    1
}

#[derive(Debug, Deserialize)]

pub struct ModelSection {
    pub routes: Vec<RouteSection>,
    /// Aliases tried in order when every tier of this one is exhausted (L2 failover).
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Aliases tried when an upstream says the request exceeds the model's context
    /// length (which would otherwise be returned to the client).
    #[serde(default)]
    pub context_fallbacks: Vec<String>,
    /// Limits over all requests for this alias.
    #[serde(default)]
    pub limits: Limits,
    /// How the routes of one tier are ordered. Default `round_robin`.
    #[serde(default)]
    pub strategy: Strategy,
    /// Cache this alias's answers (off unless present).
    #[serde(default)]
    pub cache: Option<ModelCacheSection>,
}

#[derive(Debug, Deserialize)]

pub struct RouteSection {
    pub upstream: String,
    /// Model name sent upstream. Default: the alias (or, for `*`, the client's model).
    #[serde(default)]
    pub model: Option<String>,
    /// Tier: lower is tried first; equal priorities are balanced together. Default 1.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Share of the tier's requests under `strategy: weighted` (1 to 1000). Default 1.
    #[serde(default = "default_route_weight")]
    pub weight: u32,
    /// The model's context window in tokens: requests estimated larger skip this route.
    /// Default: the shipped model table's, where the model is known.
    #[serde(default)]
    pub max_context: Option<u64>,
}

fn default_route_weight() -> u32 {
    1
}

fn default_priority() -> u32 {
    1
}
