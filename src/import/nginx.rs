//! `tollgate import-nginx FILE`: reads an nginx config (following `include`s) and writes
//! the equivalent Tollgate config. Each `upstream` block becomes an upstream; each
//! `location` that proxies to one becomes routes (`*` for a plain `/v1/` pass-through);
//! timeouts, body size, listeners and TLS certificates carry over. Every directive that
//! cannot be translated is reported with its file and line and what to do instead;
//! nothing is dropped silently. Semantics follow nginx's upstream and proxy modules.

use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// One directive of the config, with where it was written.
#[derive(Debug, Clone)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    pub block: Option<Vec<Directive>>,
    pub file: PathBuf,
    pub line: usize,
}

/// Something the importer could not carry over (or carried over with a change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub file: PathBuf,
    pub line: usize,
    pub directive: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.directive,
            self.message
        )
    }
}

pub use super::ImportError;

mod parse;

pub use parse::parse_file;

// ---- translation ----------------------------------------------------------------------

/// The result of an import: the config text and what could not be carried over.
pub struct Import {
    pub yaml: String,
    pub warnings: Vec<Warning>,
}

struct Translator {
    warnings: Vec<Warning>,
    upstreams: BTreeMap<String, Mapping>,
    /// Upstream name -> scheme from the proxy_pass that uses it.
    schemes: BTreeMap<String, String>,
    listen: Vec<String>,
    tls: Vec<Value>,
    max_body: Option<String>,
    pool: Option<u64>,
    threads: Option<u64>,
    max_attempts: Option<u64>,
    models: Mapping,
    /// Upstream -> (connect, read) timeouts from the locations that use it.
    timeouts: BTreeMap<String, (Option<String>, Option<String>)>,
    keys: BTreeMap<String, String>,
}

impl Translator {
    fn warn(&mut self, d: &Directive, message: impl Into<String>) {
        self.warnings.push(Warning {
            file: d.file.clone(),
            line: d.line,
            directive: d.name.clone(),
            message: message.into(),
        });
    }

    fn walk(&mut self, tree: &[Directive], context: &str) {
        for d in tree {
            match (context, d.name.as_str()) {
                ("main", "http") | ("main", "stream") if d.block.is_some() => {
                    if d.name == "stream" {
                        self.warn(
                            d,
                            "TCP/UDP proxying (stream) is not an HTTP gateway's job: left out",
                        );
                    } else {
                        self.walk(d.block.as_deref().unwrap_or_default(), "http");
                    }
                }
                ("main", "events") => {}
                ("main", "worker_processes") => {
                    // `auto` keeps the default thread count.
                    if let Some(n) = d.args.first().and_then(|a| a.parse::<u64>().ok()) {
                        self.threads = Some(n);
                    }
                }
                ("main", "user" | "pid" | "error_log" | "worker_rlimit_nofile" | "pcre_jit") => {
                    self.warn(d, "process settings belong to the systemd unit (systemd/tollgate.service): left out");
                }
                // A file of conf.d holds what an http block would; read it the same way.
                ("http" | "main", "upstream") if d.block.is_some() => self.upstream(d),
                ("http" | "main", "server") if d.block.is_some() => self.server(d),
                ("http" | "main", "client_max_body_size")
                | ("server", "client_max_body_size")
                | ("location", "client_max_body_size") => self.body_size(d),
                (
                    "http" | "main",
                    "include" | "default_type" | "sendfile" | "tcp_nopush" | "tcp_nodelay"
                    | "types" | "server_tokens" | "keepalive_timeout" | "gzip",
                ) => {}
                ("http" | "main", "log_format" | "access_log")
                | ("server", "access_log" | "error_log")
                | ("location", "access_log") => {
                    self.warn(d, "logging is Tollgate's own access log (log.format text|json, log.file): left out");
                }
                (
                    "main" | "http" | "server" | "location",
                    "map" | "geo" | "split_clients" | "if" | "set" | "rewrite" | "return"
                    | "limit_req" | "limit_req_zone" | "limit_conn" | "limit_conn_zone",
                ) => {
                    let hint = if d.name.starts_with("limit_") {
                        "use Tollgate's limits (limits.per_ip, keys[].limits)"
                    } else {
                        "Tollgate routes by model name, not by rewriting requests: express this with model aliases"
                    };
                    self.warn(d, format!("not translated; {hint}"));
                }
                _ => self.warn(
                    d,
                    format!("not translated (unknown in this context: {context})"),
                ),
            }
        }
    }

    fn upstream(&mut self, d: &Directive) {
        let Some(name) = d.args.first().cloned() else {
            self.warn(d, "upstream without a name: left out");
            return;
        };
        let mut u = Mapping::new();
        let mut servers = Vec::new();
        let mut balance = "weighted";
        for s in d.block.as_deref().unwrap_or_default() {
            match s.name.as_str() {
                "server" => {
                    if let Some(entry) = self.server_entry(s) {
                        servers.push(entry);
                    }
                }
                "least_conn" => balance = "least_conn",
                "hash" | "ip_hash" | "random" | "sticky" | "ntlm" => {
                    self.warn(s, "sticky or random balancing is not supported: weighted round robin is used; use balance: least_conn for long streams");
                }
                "keepalive" => match s.args.first().and_then(|a| a.parse::<u64>().ok()) {
                    Some(n) => self.pool = Some(self.pool.unwrap_or(0).max(n)),
                    None => self.warn(s, "keepalive without a number: left out"),
                },
                "keepalive_timeout" | "keepalive_requests" | "keepalive_time" => {
                    self.warn(s, "pooled connections are kept for the upstream's idle_timeout and reused without a request cap: left out");
                }
                "zone" => {}
                _ => self.warn(s, "not translated inside upstream"),
            }
        }
        if servers.is_empty() {
            self.warn(d, format!("upstream {name} has no usable server: left out"));
            return;
        }
        u.insert("provider".into(), "generic".into());
        u.insert("balance".into(), balance.into());
        u.insert("servers".into(), Value::Sequence(servers));
        self.upstreams.insert(name, u);
    }

    fn server_entry(&mut self, s: &Directive) -> Option<Value> {
        let addr = s.args.first()?.clone();
        if addr.starts_with("unix:") {
            self.warn(
                s,
                "unix socket servers are not supported: left out; listen on 127.0.0.1 instead",
            );
            return None;
        }
        let mut e = Mapping::new();
        // The scheme and path are settled once the proxy_pass that uses the upstream is known.
        e.insert("url".into(), addr.clone().into());
        for p in &s.args[1..] {
            let (k, v) = p.split_once('=').unwrap_or((p.as_str(), ""));
            match k {
                "weight" => {
                    e.insert(
                        "weight".into(),
                        v.parse::<u64>()
                            .map(Value::from)
                            .unwrap_or_else(|_| v.into()),
                    );
                }
                "max_fails" => {
                    e.insert(
                        "max_fails".into(),
                        v.parse::<u64>()
                            .map(Value::from)
                            .unwrap_or_else(|_| v.into()),
                    );
                }
                "fail_timeout" => {
                    e.insert("fail_timeout".into(), nginx_time(v).into());
                }
                "max_conns" => {
                    if v != "0" {
                        e.insert(
                            "max_conns".into(),
                            v.parse::<u64>()
                                .map(Value::from)
                                .unwrap_or_else(|_| v.into()),
                        );
                    }
                }
                "backup" => {
                    e.insert("backup".into(), true.into());
                }
                "down" => {
                    self.warn(
                        s,
                        format!(
                            "server {addr} is marked down: left out (add it back when it serves)"
                        ),
                    );
                    return None;
                }
                "resolve" => {} // Tollgate re-resolves every 30 s anyway.
                _ => self.warn(s, format!("server parameter {k} is not supported: ignored")),
            }
        }
        Some(Value::Mapping(e))
    }

    fn body_size(&mut self, d: &Directive) {
        match d.args.first().map(|a| nginx_size(a)) {
            Some(Some(v)) => self.max_body = Some(v),
            _ => self.warn(d, "unreadable size: left out"),
        }
    }

    fn server(&mut self, d: &Directive) {
        let block = d.block.as_deref().unwrap_or_default();
        let mut cert = None;
        let mut key = None;
        let mut tls_listen = Vec::new();
        for s in block {
            match s.name.as_str() {
                "listen" => {
                    let Some(addr) = s.args.first().map(|a| listen_addr(a)) else {
                        continue;
                    };
                    let ssl = s.args.iter().any(|a| a == "ssl");
                    for extra in s.args.iter().skip(1).filter(|a| {
                        !matches!(a.as_str(), "ssl" | "http2" | "default_server" | "reuseport")
                    }) {
                        self.warn(
                            s,
                            format!("listen parameter {extra} is not supported: ignored"),
                        );
                    }
                    if ssl {
                        tls_listen.push((addr, s.clone()));
                    } else if !self.listen.contains(&addr) {
                        self.listen.push(addr);
                    }
                }
                // Relative paths resolve against the file's directory, as includes do.
                "ssl_certificate" => cert = s.args.first().map(|p| beside(&s.file, p)),
                "ssl_certificate_key" => key = s.args.first().map(|p| beside(&s.file, p)),
                "ssl_protocols"
                | "ssl_ciphers"
                | "ssl_prefer_server_ciphers"
                | "ssl_session_cache"
                | "ssl_session_timeout" => {
                    self.warn(s, "TLS versions and ciphers are rustls's safe defaults (TLS 1.2 and 1.3): left out");
                }
                "http2" => {}
                "server_name" => {}
                "location" => self.location(s),
                "client_max_body_size" => self.body_size(s),
                _ => self.walk(std::slice::from_ref(s), "server"),
            }
        }
        for (addr, l) in tls_listen {
            match (&cert, &key) {
                (Some(c), Some(k)) => {
                    let mut t = Mapping::new();
                    t.insert("listen".into(), addr.into());
                    t.insert("cert".into(), c.clone().into());
                    t.insert("key".into(), k.clone().into());
                    self.tls.push(Value::Mapping(t));
                }
                _ => self.warn(&l, "ssl listener without ssl_certificate and ssl_certificate_key: left out (without any listener Tollgate listens on 0.0.0.0:8080)"),
            }
        }
    }

    fn location(&mut self, d: &Directive) {
        let path = d.args.last().cloned().unwrap_or_default();
        let block = d.block.as_deref().unwrap_or_default();
        let mut target: Option<(String, String, String)> = None;
        let mut connect = None;
        let mut read = None;
        let mut key = None;
        for s in block {
            match s.name.as_str() {
                "proxy_pass" => match s.args.first().and_then(|u| split_proxy_pass(u)) {
                    Some(t) => target = Some(t),
                    None => self.warn(s, "proxy_pass target not understood: left out"),
                },
                "proxy_connect_timeout" => connect = s.args.first().map(|a| nginx_time(a)),
                "proxy_read_timeout" => read = s.args.first().map(|a| nginx_time(a)),
                "proxy_send_timeout" => self.warn(s, "writes to upstreams use the upstream's idle_timeout: left out"),
                "proxy_buffering" | "proxy_request_buffering" | "proxy_http_version" | "proxy_cache" | "chunked_transfer_encoding" => {
                    // Tollgate streams responses unbuffered over HTTP/1.1 and buffers request
                    // bodies (so they can be re-sent on failover) by design.
                }
                "proxy_set_header" => {
                    let header = s.args.first().map(|h| h.to_ascii_lowercase()).unwrap_or_default();
                    match header.as_str() {
                        "connection" | "host" | "x-request-id" | "x-forwarded-for" | "x-real-ip" | "x-forwarded-proto" | "upgrade" => {}
                        "authorization" | "api-key" | "x-api-key" => key = Some(s.clone()),
                        _ => self.warn(s, "extra upstream headers are not supported: left out"),
                    }
                }
                "proxy_next_upstream" => {
                    if s.args.iter().any(|a| a == "off") {
                        self.max_attempts = Some(1);
                    }
                }
                "proxy_next_upstream_tries" => {
                    if let Some(n) = s.args.first().and_then(|a| a.parse::<u64>().ok()).filter(|n| *n > 0) {
                        self.max_attempts = Some(n.min(20));
                    }
                }
                "proxy_next_upstream_timeout" => self.warn(s, "failover is bounded by failover.max_attempts and each upstream's timeouts: left out"),
                "client_max_body_size" => self.body_size(s),
                _ => self.walk(std::slice::from_ref(s), "location"),
            }
        }
        let Some((scheme, upstream, uri)) = target else {
            if !block.iter().any(|s| s.name == "proxy_pass") {
                self.warn(d, format!("location {path} proxies nowhere: left out"));
            }
            return;
        };
        if path == "/health" || path == "/healthz" || uri.ends_with("/health") {
            self.warn(d, format!("location {path}: Tollgate answers /health and /healthz itself (and /ready on the admin listener): left out"));
            return;
        }
        if !self.upstreams.contains_key(&upstream) {
            self.warn(d, format!("proxy_pass to {upstream}, which is no upstream block: define it as an upstream with its address"));
            return;
        }
        self.schemes.insert(upstream.clone(), scheme);
        let t = self.timeouts.entry(upstream.clone()).or_default();
        if connect.is_some() {
            t.0 = connect;
        }
        if read.is_some() {
            t.1 = read;
        }
        if let Some(k) = key {
            let var = format!(
                "{}_API_KEY",
                upstream
                    .to_ascii_uppercase()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            );
            self.warn(&k, format!("the upstream credential becomes api_key: ${{{var}}}: put the key in the environment variable {var} (not in the config)"));
            self.keys.insert(upstream.clone(), var);
        }
        let passthrough = matches!(path.as_str(), "/" | "/v1" | "/v1/") || path.starts_with("/v1/");
        let alias = if passthrough {
            "*".to_string()
        } else {
            upstream.clone()
        };
        if !passthrough {
            self.warn(d, format!("location {path}: Tollgate serves the OpenAI paths under /v1 and routes by model; clients reach upstream {upstream} by sending model \"{upstream}\" (rename the alias as you like, and set routes[].model to the model name its servers expect)"));
        } else if let Some(Value::Mapping(existing)) = self.models.get("*") {
            let same = existing
                .get("routes")
                .and_then(|r| r.as_sequence())
                .and_then(|r| r.first())
                .and_then(|r| r.get("upstream"))
                .and_then(|u| u.as_str())
                == Some(upstream.as_str());
            if !same {
                self.warn(d, format!("location {path} sends /v1 traffic to {upstream} while another location already does for another upstream; Tollgate routes by model, not path: add a model alias for {upstream}"));
                return;
            }
        }
        let mut route = Mapping::new();
        route.insert("upstream".into(), upstream.clone().into());
        let mut model = Mapping::new();
        model.insert(
            "routes".into(),
            Value::Sequence(vec![Value::Mapping(route)]),
        );
        self.models.insert(alias.into(), Value::Mapping(model));
    }

    fn finish(mut self) -> String {
        let mut root = Mapping::new();
        let mut server = Mapping::new();
        // A TLS-only site stays TLS-only: without `listen: []` Tollgate's default plain
        // listener (0.0.0.0:8080) would open too, and client keys would cross it in clear.
        if !self.listen.is_empty() || !self.tls.is_empty() {
            server.insert(
                "listen".into(),
                Value::Sequence(self.listen.iter().cloned().map(Value::from).collect()),
            );
        }
        if !self.tls.is_empty() {
            server.insert("tls".into(), Value::Sequence(self.tls.clone()));
        }
        if let Some(t) = self.threads {
            server.insert("threads".into(), t.into());
        }
        // nginx's default is 1m; Tollgate's 32MiB: say so when the config relied on it.
        server.insert(
            "max_body_size".into(),
            self.max_body
                .clone()
                .unwrap_or_else(|| "1MiB".into())
                .into(),
        );
        if let Some(p) = self.pool {
            server.insert("upstream_pool_size".into(), p.into());
        }
        root.insert("server".into(), Value::Mapping(server));
        if let Some(n) = self.max_attempts {
            let mut f = Mapping::new();
            f.insert("max_attempts".into(), n.into());
            root.insert("failover".into(), Value::Mapping(f));
        }
        let mut ups = Mapping::new();
        let names: Vec<String> = self.upstreams.keys().cloned().collect();
        for name in names {
            let Some(mut u) = self.upstreams.remove(&name) else {
                continue;
            };
            let scheme = self.schemes.get(&name).cloned();
            let Some(scheme) = scheme else {
                continue; // reported below
            };
            if let Some((connect, read)) = self.timeouts.get(&name) {
                if let Some(c) = connect {
                    u.insert("connect_timeout".into(), c.clone().into());
                }
                if let Some(r) = read {
                    // nginx's read timeout bounds both the wait for the header and the gaps.
                    u.insert("first_byte_timeout".into(), r.clone().into());
                    u.insert("idle_timeout".into(), r.clone().into());
                }
            }
            if let Some(Value::Sequence(servers)) = u.get_mut("servers") {
                for s in servers.iter_mut() {
                    if let Value::Mapping(m) = s {
                        let addr = m
                            .get("url")
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .to_string();
                        m.insert("url".into(), format!("{scheme}://{addr}/v1").into());
                        if let Some(var) = self.keys.get(&name) {
                            m.insert("api_key".into(), format!("${{{var}}}").into());
                        }
                    }
                }
            }
            ups.insert(name.into(), Value::Mapping(u));
        }
        root.insert("upstreams".into(), Value::Mapping(ups));
        root.insert("models".into(), Value::Mapping(self.models.clone()));
        serde_yaml::to_string(&Value::Mapping(root)).unwrap_or_default()
    }
}

/// Imports the nginx config at `path`.
pub fn import(path: &Path) -> Result<Import, ImportError> {
    let tree = parse_file(path)?;
    let mut t = Translator {
        warnings: Vec::new(),
        upstreams: BTreeMap::new(),
        schemes: BTreeMap::new(),
        listen: Vec::new(),
        tls: Vec::new(),
        max_body: None,
        pool: None,
        threads: None,
        max_attempts: None,
        models: Mapping::new(),
        timeouts: BTreeMap::new(),
        keys: BTreeMap::new(),
    };
    // Upstream blocks first, so locations anywhere can refer to them.
    let mut upstream_blocks = Vec::new();
    collect(&tree, "upstream", &mut upstream_blocks);
    for u in &upstream_blocks {
        t.upstream(u);
    }
    let rest = without(&tree, "upstream");
    t.walk(&rest, "main");
    for (name, _) in t
        .upstreams
        .iter()
        .filter(|(n, _)| !t.schemes.contains_key(*n))
    {
        if let Some(d) = upstream_blocks
            .iter()
            .find(|d| d.args.first() == Some(name))
        {
            t.warnings.push(Warning {
                file: d.file.clone(),
                line: d.line,
                directive: "upstream".into(),
                message: format!("upstream {name} is not used by any proxy_pass: left out"),
            });
        }
    }
    if t.models.is_empty() {
        return Err(ImportError(
            "no location proxies to an upstream block: nothing to import".into(),
        ));
    }
    let warnings = std::mem::take(&mut t.warnings);
    Ok(Import {
        yaml: t.finish(),
        warnings,
    })
}

fn collect(tree: &[Directive], name: &str, out: &mut Vec<Directive>) {
    for d in tree {
        if d.name == name && d.block.is_some() {
            out.push(d.clone());
        } else if let Some(b) = &d.block {
            collect(b, name, out);
        }
    }
}

fn without(tree: &[Directive], name: &str) -> Vec<Directive> {
    tree.iter()
        .filter(|d| !(d.name == name && d.block.is_some()))
        .map(|d| {
            let mut d = d.clone();
            if let Some(b) = &d.block {
                d.block = Some(without(b, name));
            }
            d
        })
        .collect()
}

/// A path from a directive, made absolute against the directory of its file.
fn beside(file: &Path, p: &str) -> String {
    if Path::new(p).is_absolute() {
        return p.to_string();
    }
    file.parent()
        .unwrap_or(Path::new("."))
        .join(p)
        .display()
        .to_string()
}

/// `http://name[/uri]` -> (scheme, name, uri).
fn split_proxy_pass(url: &str) -> Option<(String, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (host, uri) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    Some((scheme.to_string(), host.to_string(), uri.to_string()))
}

/// nginx times: `30` (seconds), `500ms`, `10s`, `5m`, `1h`, `1d` -> `30s` style.
fn nginx_time(v: &str) -> String {
    if v.chars().all(|c| c.is_ascii_digit()) {
        format!("{v}s")
    } else {
        v.to_string()
    }
}

/// nginx sizes: `1024`, `10k`, `10m`, `1g` (binary units) -> Tollgate sizes.
fn nginx_size(v: &str) -> Option<String> {
    let lower = v.to_ascii_lowercase();
    let (num, unit) = lower.split_at(
        lower
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(lower.len()),
    );
    let n: u64 = num.parse().ok()?;
    let unit = match unit {
        "" => "",
        "k" => "KiB",
        "m" => "MiB",
        "g" => "GiB",
        _ => return None,
    };
    Some(if n == 0 {
        "1GiB".to_string()
    } else {
        format!("{n}{unit}")
    })
}

/// `443`, `*:80`, `127.0.0.1:8080`, `[::]:80` -> an address Tollgate listens on.
fn listen_addr(a: &str) -> String {
    if a.chars().all(|c| c.is_ascii_digit()) {
        format!("0.0.0.0:{a}")
    } else if let Some(port) = a.strip_prefix("*:") {
        format!("0.0.0.0:{port}")
    } else if a.contains(':') {
        a.to_string()
    } else {
        format!("{a}:80")
    }
}
