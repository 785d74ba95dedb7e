//! `server`: listeners, threads, client limits and timeouts, and the process's files.

use super::super::units::{ByteSize, Seconds};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Deserialize)]

pub struct ServerSection {
    /// Proxy listeners. Default `["0.0.0.0:8080"]`. Port 0 picks a free port, printed at start.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Admin and metrics listener. Default `127.0.0.1:9091`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Worker threads of the proxy service. Default 2.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Largest request body accepted; larger ones get 413. Default 32MiB.
    #[serde(default = "default_max_body_size")]
    pub max_body_size: ByteSize,
    /// How long an idle client connection is kept open between requests. Default 60s.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: Seconds,
    /// How long a stopping process keeps serving in-flight requests. Default 30s.
    #[serde(default = "default_grace_period")]
    pub grace_period: Seconds,
    /// Where the daemon writes its pid. Default `/tmp/tollgate.pid`.
    #[serde(default = "default_pid_file")]
    pub pid_file: String,
    /// Socket through which a new process takes over the listeners on upgrade.
    /// Default `/tmp/tollgate_upgrade.sock`.
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
    /// Idle upstream connections kept for reuse, all servers together. Default 128.
    #[serde(default = "default_pool_size")]
    pub upstream_pool_size: usize,
    /// Peers (addresses or CIDR ranges) whose `X-Forwarded-For` is believed when
    /// finding the client IP. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// PEM bundle of the certificate authorities trusted for https upstreams, instead of
    /// the system's. Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// TLS listeners (rustls), each with its certificate chain and key (PEM files).
    #[serde(default)]
    pub tls: Vec<TlsListener>,
    /// Longest time a client may take to send a whole request header, counted from the
    /// connection's start (or, between keep-alive requests, from the next request's first
    /// byte). Past it the connection gets 408 and is closed. Default 10s.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Seconds,
    /// Longest pause while a request body is being read; past it the request gets 408 and
    /// its connection is closed. Default 60s.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: Seconds,
    /// Client connections open at once, all listeners together; a connection over the
    /// cap is closed at once and logged. Default: half the process's open-file limit
    /// (a proxied request also holds an upstream connection), at least 64.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Client connections open at once from one IP address (the TCP peer). Default: no cap.
    #[serde(default)]
    pub max_connections_per_ip: Option<usize>,
}

#[derive(Debug, Deserialize, Clone)]

pub struct TlsListener {
    pub listen: String,
    pub cert: String,
    pub key: String,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            threads: default_threads(),
            max_body_size: default_max_body_size(),
            keepalive_timeout: default_keepalive_timeout(),
            grace_period: default_grace_period(),
            pid_file: default_pid_file(),
            upgrade_sock: default_upgrade_sock(),
            upstream_pool_size: default_pool_size(),
            trusted_proxies: Vec::new(),
            tls: Vec::new(),
            ca_file: None,
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            max_connections: None,
            max_connections_per_ip: None,
        }
    }
}

fn default_listen() -> Vec<String> {
    vec!["0.0.0.0:8080".to_string()]
}
fn default_admin_listen() -> String {
    "127.0.0.1:9091".to_string()
}
fn default_threads() -> usize {
    2
}
fn default_max_body_size() -> ByteSize {
    ByteSize(32 << 20)
}
fn default_header_timeout() -> Seconds {
    Seconds(Duration::from_secs(10))
}
fn default_body_timeout() -> Seconds {
    Seconds(Duration::from_secs(60))
}
fn default_keepalive_timeout() -> Seconds {
    Seconds(Duration::from_secs(60))
}
fn default_grace_period() -> Seconds {
    Seconds(Duration::from_secs(30))
}
fn default_pid_file() -> String {
    "/tmp/tollgate.pid".to_string()
}
fn default_upgrade_sock() -> String {
    "/tmp/tollgate_upgrade.sock".to_string()
}
fn default_pool_size() -> usize {
    128
}
