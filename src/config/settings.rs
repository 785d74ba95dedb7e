//! The runtime form of the plain sections: what the file's `server`, `store`, `budgets`,
//! `alerts`, `cache`, `cluster`, `log` and `admin` say, once checked, in the types the
//! gateway reads (durations, byte counts, enums). Nothing here knows serde or the file's
//! spelling; `From` on each file section is the one place the two meet.

use super::file;
use crate::secret::Secret;
pub use crate::spec::{CacheBackendKind, CacheScope, LogFormat, Unpriced};
use std::time::Duration;

/// `server`, less the listeners and trusted proxies (parsed into `Config` itself).
#[derive(Debug, Clone)]
pub struct Server {
    pub threads: usize,
    pub max_body_size: u64,
    pub keepalive_timeout: Duration,
    pub grace_period: Duration,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub upstream_pool_size: usize,
    pub ca_file: Option<String>,
    pub tls: Vec<file::TlsListener>,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
}

impl From<&file::ServerSection> for Server {
    fn from(s: &file::ServerSection) -> Self {
        Server {
            threads: s.threads,
            max_body_size: s.max_body_size.0,
            keepalive_timeout: s.keepalive_timeout.0,
            grace_period: s.grace_period.0,
            pid_file: s.pid_file.clone(),
            upgrade_sock: s.upgrade_sock.clone(),
            upstream_pool_size: s.upstream_pool_size,
            ca_file: s.ca_file.clone(),
            tls: s.tls.clone(),
            header_timeout: s.header_timeout.0,
            body_timeout: s.body_timeout.0,
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
        }
    }
}

/// `store`: the database and how usage reaches it.
#[derive(Debug, Clone)]
pub struct Storage {
    pub url: String,
    pub flush_interval: Duration,
    pub queue_size: usize,
    pub refresh_interval: Duration,
}

impl From<&file::StoreSection> for Storage {
    fn from(s: &file::StoreSection) -> Self {
        Storage {
            url: s.url.clone(),
            flush_interval: s.flush_interval.0,
            queue_size: s.queue_size,
            refresh_interval: s.refresh_interval.0,
        }
    }
}

/// `budgets`: how reservations are sized and what an unpriced model does.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub default_max_tokens: u64,
    pub max_n: u64,
    pub unpriced: Unpriced,
}

impl From<&file::BudgetsSection> for Budgets {
    fn from(s: &file::BudgetsSection) -> Self {
        Budgets {
            default_max_tokens: s.default_max_tokens,
            max_n: s.max_n,
            unpriced: s.unpriced,
        }
    }
}

impl From<&file::WebhookSection> for crate::keys::alerts::Webhook {
    fn from(s: &file::WebhookSection) -> Self {
        crate::keys::alerts::Webhook {
            url: s.url.clone(),
            headers: s.headers.clone().into_iter().collect(),
            timeout: s.timeout.0,
        }
    }
}

/// `cache`: the response cache's size, backend and sharing.
#[derive(Debug, Clone, Copy)]
pub struct Cache {
    pub max_size: u64,
    pub backend: CacheBackendKind,
    pub scope: CacheScope,
}

impl From<&file::CacheSection> for Cache {
    fn from(s: &file::CacheSection) -> Self {
        Cache {
            max_size: s.max_size.0,
            backend: s.backend,
            scope: s.scope,
        }
    }
}

/// `cluster`: state shared between instances.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub redis: Option<Secret>,
    pub on_redis_error: crate::limits::OnRedisError,
    pub expected_instances: u64,
    pub slot_ttl: Duration,
    pub leases: bool,
}

impl From<&file::ClusterSection> for Cluster {
    fn from(s: &file::ClusterSection) -> Self {
        Cluster {
            redis: s.redis.clone(),
            on_redis_error: s.on_redis_error,
            expected_instances: s.expected_instances,
            slot_ttl: s.slot_ttl.0,
            leases: s.leases,
        }
    }
}

/// `log`: the access log's form and destination.
#[derive(Debug, Clone)]
pub struct Log {
    pub format: LogFormat,
    pub file: Option<String>,
    pub access: bool,
    pub flush_interval: Duration,
}

impl From<&file::LogSection> for Log {
    fn from(s: &file::LogSection) -> Self {
        Log {
            format: s.format,
            file: s.file.clone(),
            access: s.access,
            flush_interval: s.flush_interval.0,
        }
    }
}

/// `admin`: who may use the admin API.
#[derive(Debug, Clone, Default)]
pub struct Admin {
    pub master_key: Option<Secret>,
    pub viewer_key: Option<Secret>,
}

impl From<&file::AdminSection> for Admin {
    fn from(s: &file::AdminSection) -> Self {
        Admin {
            master_key: s.master_key.clone(),
            viewer_key: s.viewer_key.clone(),
        }
    }
}
