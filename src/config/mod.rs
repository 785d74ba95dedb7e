//! Loading and validating configuration. Two layers: `file` is the serde schema users
//! write; [`build`] checks it as a whole (every error at once, each with its path),
//! expands `${ENV}` references and resolves names into the runtime [`Config`] the proxy
//! reads. A config that fails here is never served.

pub mod file;
pub mod units;

use crate::keys::auth::KeyRing;
use crate::limits::Cidr;
use crate::provider::inspect::Rules;
use crate::route::{Alias, Route, Router, Tier};
use crate::upstream::{Endpoint, Server, ServerState, Upstream};
use file::FileConfig;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use units::Seconds;

/// One problem in a config file, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            path: path.into(),
            message: message.into(),
        }])
    }
}

pub use crate::attempt::Failover;

/// Limits of the global and per-IP scopes (key and model limits live on keys and aliases).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub global: crate::limits::Limits,
    pub per_ip: crate::limits::Limits,
}

/// The validated runtime configuration the proxy serves from.
pub struct Config {
    pub server: file::ServerSection,
    pub pricing: crate::relay::pricing::Pricing,
    pub store: file::StoreSection,
    pub budgets: file::BudgetsSection,
    pub alerts: file::AlertsSection,
    pub cache: file::CacheSection,
    pub cluster: file::ClusterSection,
    pub log: file::LogSection,
    pub failover: Failover,
    pub limits: Limits,
    pub trusted_proxies: Vec<Cidr>,
    pub listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub keys: KeyRing,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub router: Router,
    pub admin: file::AdminSection,
}

impl Config {
    /// What is allowed but risky, for `-t` and the start log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.admin_listen.ip().is_loopback() && self.admin.master_key.is_none() {
            out.push(format!(
                "server.admin_listen {} is not a loopback address and admin.master_key is not set: anyone who can reach it can reload the configuration and clear cooldowns",
                self.admin_listen
            ));
        }
        out
    }

    /// Reads, expands and validates `path`. `env` looks up `${VAR}` references.
    pub fn load(path: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let text = read_capped(path)
            .map_err(|e| ConfigErrors::one("", format!("cannot read {path}: {e}")))?;
        Config::parse(&text, env)
    }

    /// Validates config text. Host names are not resolved here (see [`Config::resolve`]).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        Config::parse_after(text, env, None)
    }

    /// Like [`Config::parse`], for a reload: servers that still exist (same upstream, name
    /// and URL) keep the live state of `previous` (cooldowns, in-flight counts, health).
    pub fn parse_after(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        previous: Option<&Config>,
    ) -> Result<Config, ConfigErrors> {
        if text.len() as u64 > MAX_CONFIG_SIZE {
            return Err(ConfigErrors::one(
                "",
                format!("larger than {} MiB", MAX_CONFIG_SIZE >> 20),
            ));
        }
        check_nesting(text).map_err(|m| ConfigErrors::one("", m))?;
        let mut value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigErrors::one("", format!("not valid YAML: {e}")))?;
        let mut errors = Vec::new();
        expand_env(&mut value, &mut String::new(), env, &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let mut unknown = Vec::new();
        let mut note = |path: serde_ignored::Path| {
            let (parent, field) = split_field(&path);
            unknown.push(ConfigError {
                path: parent,
                message: format!("unknown field `{field}`"),
            });
        };
        let file: FileConfig =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note))
                .map_err(|e| {
                    let path = e.path().to_string();
                    let path = if path == "." { String::new() } else { path };
                    ConfigErrors::one(path, e.into_inner().to_string())
                })?;
        match build(file, previous) {
            Ok(config) if unknown.is_empty() => Ok(config),
            Ok(_) => Err(ConfigErrors(unknown)),
            Err(ConfigErrors(rest)) => {
                unknown.extend(rest);
                Err(ConfigErrors(unknown))
            }
        }
    }

    /// The live state of a server of this config, by name and URL.
    fn server_state(&self, name: &str, url: &str) -> Option<Arc<ServerState>> {
        let upstream = self.upstreams.get(name.split('/').next()?)?;
        upstream
            .servers
            .iter()
            .find(|s| s.name == name && s.url == url)
            .map(|s| Arc::clone(&s.state))
    }

    /// Resolves every server's host name once, blocking; called at start and reload,
    /// never on the request path. Servers that do not resolve stay unusable (and are
    /// retried by the resolver service) instead of failing the start.
    pub fn resolve(&self) {
        for upstream in self.upstreams.values() {
            for server in &upstream.servers {
                if let Err(e) = server.endpoint.resolve_blocking() {
                    log::warn!("server {}: cannot resolve: {e}", server.name);
                }
            }
        }
    }
}

/// Replaces `${VAR}` in every string of the document; `$${` is a literal `${`.
fn expand_env(
    value: &mut serde_yaml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    use serde_yaml::Value;
    match value {
        Value::String(s) if s.contains("${") => match expand_str(s, env) {
            Ok(expanded) => *s = expanded,
            Err(message) => errors.push(ConfigError {
                path: path.clone(),
                message,
            }),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k.as_str().unwrap_or("?"));
                expand_env(v, path, env, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("${") {
        if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
            out.push_str(&rest[..pos - 1]);
            out.push_str("${");
            rest = &rest[pos + 2..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${ in value".to_string())?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        match env(name) {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A CA bundle must hold only certificates, at least one, all of them readable: Pingora's
/// TLS set-up would otherwise stop the process.
fn check_ca_file(path: &str) -> Result<(), String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let sections = text.matches("-----BEGIN ").count();
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() || certs.len() != sections {
        return Err(format!(
            "{path}: must contain PEM certificates only (found {} of {sections} sections)",
            certs.len()
        ));
    }
    Ok(())
}

/// The largest config file read: far above any real one, far below a memory problem
/// (`-c /dev/zero` must not read forever).
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// Deepest nesting of `[`/`{` and widest indentation accepted: YAML parsing time grows
/// with the square of the nesting, and real configs nest fewer than ten levels.
const MAX_FLOW_DEPTH: usize = 64;
const MAX_INDENT: usize = 256;

fn read_capped(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_SIZE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_SIZE {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_CONFIG_SIZE >> 20
        )));
    }
    Ok(text)
}

/// Refuses text nested deeper than a config ever is, before the YAML parser sees it.
/// Brackets inside quotes are not counted.
fn check_nesting(text: &str) -> Result<(), String> {
    let (mut depth, mut quote) = (0usize, None::<char>);
    for line in text.lines() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if indent > MAX_INDENT && quote.is_none() {
            return Err(format!("indented more than {MAX_INDENT} columns"));
        }
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Err(format!("nested deeper than {MAX_FLOW_DEPTH} levels"));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        // A quote left open at the end of a plain scalar line is an apostrophe.
        if quote == Some('\'') {
            quote = None;
        }
    }
    Ok(())
}

/// The path of an unknown field's parent, written like every other config path
/// (`upstreams.local.servers[0]`), and the field's name.
fn split_field(path: &serde_ignored::Path) -> (String, String) {
    fn write(p: &serde_ignored::Path, out: &mut String) {
        use serde_ignored::Path;
        match p {
            Path::Root => {}
            Path::Seq { parent, index } => {
                write(parent, out);
                out.push_str(&format!("[{index}]"));
            }
            Path::Map { parent, key } => {
                write(parent, out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => write(parent, out),
        }
    }
    match path {
        serde_ignored::Path::Map { parent, key } => {
            let mut out = String::new();
            write(parent, &mut out);
            (out, key.clone())
        }
        other => {
            let mut out = String::new();
            write(other, &mut out);
            (out, String::new())
        }
    }
}

/// More worker threads than this is a typo, not a machine.
const MAX_THREADS: usize = 1024;

/// A timeout must be positive (zero would fail every request) and at most a day.
fn check_timeout(t: Seconds) -> Result<(), String> {
    if t.0.is_zero() {
        return Err("must be longer than 0s".into());
    }
    if t.0 > Duration::from_secs(86_400) {
        return Err("must be at most 24h".into());
    }
    Ok(())
}

/// Every check of the file, section by section; the runtime config when all pass.
fn build(file: FileConfig, previous: Option<&Config>) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let (listen, admin_listen, trusted_proxies) = build_server(&file, &mut errors);
    check_admin(&file.admin, &mut errors);
    check_cache(&file, &mut errors);
    check_limits(&file, &mut errors);
    check_keys(&file, &mut errors);
    let upstreams = build_upstreams(&file, previous, &mut errors);
    let (aliases, catch_all) = build_models(&file, &upstreams, &mut errors);
    check_pricing_and_log(&file, &mut errors);
    let failover = build_failover(&file, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let pricing = crate::relay::pricing::Pricing::new(
        file.pricing
            .iter()
            .map(|(m, p)| {
                let price =
                    crate::relay::pricing::Price::from_usd(p.input, p.output, p.cached_input);
                (m.clone(), price)
            })
            .collect(),
        true,
    );
    Ok(Config {
        pricing,
        log: file.log.clone(),
        failover,
        listen,
        admin_listen,
        keys: KeyRing::new(file.keys.iter().map(|k| {
            let info = crate::keys::auth::KeyInfo {
                name: k.name.clone(),
                limits: k.limits,
                models: k.models.clone(),
                budget: k.budget.as_ref().and_then(|b| budget_spec(b).ok()),
            };
            (&k.key, info)
        })),
        store: file.store.clone(),
        budgets: file.budgets.clone(),
        alerts: file.alerts.clone(),
        cache: file.cache.clone(),
        cluster: file.cluster.clone(),
        limits: Limits {
            global: file.limits.global,
            per_ip: file.limits.per_ip,
        },
        trusted_proxies,
        upstreams,
        router: Router::new(aliases, catch_all),
        server: file.server,
        admin: file.admin,
    })
}

/// `cache`, `cluster` and each alias's `cache`.
fn check_cache(file: &FileConfig, errors: &mut Vec<ConfigError>) {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    if file.cache.max_size.0 == 0 {
        err("cache.max_size".into(), "must be more than 0 bytes".into());
    }
    if let Some(url) = &file.cluster.redis {
        let u = url.expose();
        let schemes = ["redis://", "rediss://", "redis+unix://", "unix://"];
        if !schemes.iter().any(|s| u.starts_with(s)) || redis::Client::open(u).is_err() {
            // The value is not echoed: it may hold a password in a shape no mask knows.
            err(
                "cluster.redis".into(),
                "is not a redis://, rediss:// or redis+unix:// URL (the value is not shown: it may hold a password)".into(),
            );
        }
    }
    if file.cluster.expected_instances == 0 || file.cluster.expected_instances > 1000 {
        err(
            "cluster.expected_instances".into(),
            "must be between 1 and 1000".into(),
        );
    }
    if file.cluster.slot_ttl.0 < Duration::from_secs(1) {
        err("cluster.slot_ttl".into(), "must be at least 1s".into());
    }
    if file.cache.backend == file::CacheBackendKind::Redis && file.cluster.redis.is_none() {
        err("cache.backend".into(), "redis needs cluster.redis".into());
    }
    for (alias, m) in &file.models {
        if let Some(c) = &m.cache {
            if c.ttl.0.is_zero() || c.ttl.0 > Duration::from_secs(30 * 86_400) {
                err(
                    format!("models.{alias}.cache.ttl"),
                    "must be more than 0 and at most 30 days".into(),
                );
            }
        }
    }
}

impl From<&file::UpstreamSection> for crate::upstream::Settings {
    fn from(s: &file::UpstreamSection) -> Self {
        crate::upstream::Settings {
            provider: s.provider,
            balance: s.balance,
            connect_timeout: s.connect_timeout.0,
            first_byte_timeout: s.first_byte_timeout.0,
            idle_timeout: s.idle_timeout.0,
            stream_usage: s.stream_usage,
            latency_decay: s.latency_decay.0,
            health_check: s
                .health_check
                .as_ref()
                .map(|h| crate::upstream::HealthCheck {
                    path: h.path.clone(),
                    interval: h.interval.0,
                    timeout: h.timeout.0,
                    consecutive_success: h.consecutive_success,
                    consecutive_failure: h.consecutive_failure,
                }),
        }
    }
}

/// A budget as written (config or API), checked: the failing field and why.
pub fn budget_spec(
    b: &file::BudgetSection,
) -> Result<crate::keys::budget::BudgetSpec, (&'static str, String)> {
    crate::keys::budget::BudgetSpec::new(b.max_usd, b.period, b.mode, &b.alert_at)
}

/// A `retry_on` section as the lists `Rules::new` takes.
fn retry_lists(r: &file::RetryOnSection) -> (&[String], &[String]) {
    (&r.status, &r.body_patterns)
}

/// `admin`: a viewer key needs a master key, and must differ from it.
fn check_admin(admin: &file::AdminSection, errors: &mut Vec<ConfigError>) {
    let mut err = |path: &str, message: &str| {
        errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        })
    };
    // Neither secret is ever echoed, only its fault.
    for (path, key) in [
        ("admin.master_key", &admin.master_key),
        ("admin.viewer_key", &admin.viewer_key),
    ] {
        if key
            .as_ref()
            .is_some_and(|k| k.expose().chars().count() < MIN_ADMIN_KEY_CHARS)
        {
            err(
                path,
                "must be at least 16 characters (generate one with: openssl rand -hex 24)",
            );
        }
    }
    match (&admin.master_key, &admin.viewer_key) {
        (None, Some(_)) => err("admin.viewer_key", "needs admin.master_key"),
        (Some(m), Some(v)) if m.expose() == v.expose() => {
            err("admin.viewer_key", "must differ from admin.master_key")
        }
        _ => {}
    }
}

/// The shortest master or viewer key the config accepts.
const MIN_ADMIN_KEY_CHARS: usize = 16;

/// `server`: listeners, admin listener, threads, timeouts, caps, body size, trusted proxies.
fn build_server(
    file: &FileConfig,
    errors: &mut Vec<ConfigError>,
) -> (Vec<SocketAddr>, SocketAddr, Vec<Cidr>) {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    let s = &file.server;
    let mut listen = Vec::new();

    for (i, l) in s.listen.iter().enumerate() {
        match l.parse::<SocketAddr>() {
            Ok(a) => listen.push(a),
            Err(_) => err(
                format!("server.listen[{i}]"),
                format!("{l:?} is not an address like 0.0.0.0:8080"),
            ),
        }
    }
    if let Some(ca) = &s.ca_file {
        if let Err(m) = check_ca_file(ca) {
            err("server.ca_file".into(), m);
        }
    }
    for (i, t) in s.tls.iter().enumerate() {
        if t.listen.parse::<SocketAddr>().is_err() {
            err(
                format!("server.tls[{i}].listen"),
                format!("{:?} is not an address like 0.0.0.0:443", t.listen),
            );
        }
        for (field, path) in [("cert", &t.cert), ("key", &t.key)] {
            if let Err(e) = std::fs::metadata(path) {
                err(
                    format!("server.tls[{i}].{field}"),
                    format!("cannot read {path}: {e}"),
                );
            }
        }
    }
    if listen.is_empty() && s.tls.is_empty() {
        err(
            "server.listen".into(),
            "no listener: give listen or tls".into(),
        );
    }
    let admin_listen = match s.admin_listen.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            err(
                "server.admin_listen".into(),
                format!("{:?} is not an address like 127.0.0.1:9091", s.admin_listen),
            );
            SocketAddr::from(([127, 0, 0, 1], 9091))
        }
    };
    if s.threads == 0 || s.threads > MAX_THREADS {
        err(
            "server.threads".into(),
            format!("must be between 1 and {MAX_THREADS}"),
        );
    }
    for (field, t) in [
        ("header_timeout", s.header_timeout),
        ("body_timeout", s.body_timeout),
        ("keepalive_timeout", s.keepalive_timeout),
    ] {
        if let Err(m) = check_timeout(t) {
            err(format!("server.{field}"), m);
        }
    }
    for (field, n) in [
        ("max_connections", s.max_connections),
        ("max_connections_per_ip", s.max_connections_per_ip),
    ] {
        if n == Some(0) {
            err(format!("server.{field}"), "must be at least 1".into());
        }
    }
    if s.max_body_size.0 == 0 {
        err(
            "server.max_body_size".into(),
            "must be larger than 0".into(),
        );
    }

    let mut trusted_proxies = Vec::new();
    for (i, t) in file.server.trusted_proxies.iter().enumerate() {
        match Cidr::parse(t) {
            Ok(c) => trusted_proxies.push(c),
            Err(m) => err(format!("server.trusted_proxies[{i}]"), m),
        }
    }
    (listen, admin_listen, trusted_proxies)
}

/// Limit values of every scope: at most [`crate::limits::MAX_COUNT`].
fn check_limits(file: &FileConfig, errors: &mut Vec<ConfigError>) {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    let mut limit_sections = vec![
        ("limits.global".to_string(), &file.limits.global),
        ("limits.per_ip".to_string(), &file.limits.per_ip),
    ];
    limit_sections.extend(
        file.keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("keys[{i}].limits"), &k.limits)),
    );
    limit_sections.extend(
        file.models
            .iter()
            .map(|(alias, m)| (format!("models.{alias}.limits"), &m.limits)),
    );
    for (path, l) in limit_sections {
        for (field, v) in [
            ("rps", l.rps),
            ("rpm", l.rpm),
            ("tpm", l.tpm),
            ("concurrency", l.concurrency),
        ] {
            if v.is_some_and(|v| v > crate::limits::MAX_COUNT) {
                err(
                    format!("{path}.{field}"),
                    format!("must be at most {}", crate::limits::MAX_COUNT),
                );
            }
        }
    }
}

/// `keys`: names and keys present and unique.
fn check_keys(file: &FileConfig, errors: &mut Vec<ConfigError>) {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    let mut seen_names = HashSet::new();
    let mut seen_keys = HashSet::new();
    for (i, k) in file.keys.iter().enumerate() {
        if k.name.trim().is_empty() {
            err(format!("keys[{i}].name"), "must not be empty".into());
        } else if !seen_names.insert(k.name.as_str()) {
            err(
                format!("keys[{i}].name"),
                format!("duplicate key name {:?}", k.name),
            );
        }
        if let Some(b) = &k.budget {
            if let Err((field, message)) = budget_spec(b) {
                err(format!("keys[{i}].budget.{field}"), message);
            }
        }
        if k.models
            .as_ref()
            .is_some_and(|m| m.iter().any(|m| m.trim().is_empty()))
        {
            err(
                format!("keys[{i}].models"),
                "names must not be empty".into(),
            );
        }
        if k.key.is_empty() {
            err(format!("keys[{i}].key"), "must not be empty".into());
        } else if !seen_keys.insert(k.key.expose()) {
            err(
                format!("keys[{i}].key"),
                "the same key is configured twice".into(),
            );
        }
        let admin = [&file.admin.master_key, &file.admin.viewer_key];
        for (which, secret) in ["master_key", "viewer_key"].iter().zip(admin) {
            if secret
                .as_ref()
                .is_some_and(|s| s.expose() == k.key.expose())
            {
                err(
                    format!("keys[{i}].key"),
                    format!(
                        "must differ from admin.{which} (a client could then run the admin API)"
                    ),
                );
            }
        }
    }
}

/// `upstreams`: servers, timeouts, credentials, retry rules and health checks; servers
/// that exist in `previous` keep their live state.
fn build_upstreams(
    file: &FileConfig,
    previous: Option<&Config>,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, Arc<Upstream>> {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    let mut upstreams = BTreeMap::new();
    for (name, u) in &file.upstreams {
        let path = format!("upstreams.{name}");
        if u.servers.is_empty() {
            err(
                format!("{path}.servers"),
                "at least one server is required".into(),
            );
        }
        let mut timeouts = vec![
            ("connect_timeout", u.connect_timeout),
            ("first_byte_timeout", u.first_byte_timeout),
            ("idle_timeout", u.idle_timeout),
        ];
        if let Some(h) = &u.health_check {
            timeouts.extend([
                ("health_check.interval", h.interval),
                ("health_check.timeout", h.timeout),
            ]);
        }
        for (field, t) in timeouts {
            if let Err(m) = check_timeout(t) {
                err(format!("{path}.{field}"), m);
            }
        }
        let mut servers = Vec::new();
        let mut display_names: HashMap<String, usize> = HashMap::new();
        for (i, entry) in u.servers.iter().enumerate() {
            let spath = format!("{path}.servers[{i}]");
            let endpoint = match Endpoint::parse(&entry.url) {
                Ok(e) => e,
                Err(m) => {
                    err(format!("{spath}.url"), m);
                    continue;
                }
            };
            if entry.weight == 0 || entry.weight > 1000 {
                err(
                    format!("{spath}.weight"),
                    "must be between 1 and 1000".into(),
                );
            }
            let needs_key = crate::provider::needs_api_key(u.provider);
            if needs_key && entry.api_key.as_ref().is_none_or(|k| k.is_empty()) {
                err(
                    format!("{spath}.api_key"),
                    format!("required for provider {:?}", u.provider).to_lowercase(),
                );
            }
            if entry.api_key.as_ref().is_some_and(|k| {
                k.expose()
                    .bytes()
                    .any(|b| b.is_ascii_control() || b == b' ')
            }) {
                // The key goes into a header field as is.
                err(
                    format!("{spath}.api_key"),
                    "must not contain spaces or control characters".into(),
                );
            }
            let base = entry
                .name
                .clone()
                .unwrap_or_else(|| endpoint.authority().to_string());
            let n = display_names.entry(base.clone()).or_insert(0);
            *n += 1;
            let short = if *n == 1 { base } else { format!("{base}#{n}") };
            let mut server = Server::new(
                format!("{name}/{short}"),
                endpoint,
                entry.api_key.clone(),
                entry.weight.clamp(1, 1000),
                entry.backup,
            );
            server.max_fails = entry.max_fails;
            server.fail_timeout = entry.fail_timeout.0;
            server.url = entry.url.clone();
            server.max_conns = entry.max_conns;
            if entry.max_conns == Some(0) {
                err(
                    format!("{spath}.max_conns"),
                    "must be at least 1 (leave it out for no limit)".into(),
                );
            }
            if let Some(state) = previous.and_then(|p| p.server_state(&server.name, &server.url)) {
                server.state = state;
            }
            servers.push(server);
        }
        if !u.servers.is_empty() && u.servers.iter().all(|s| s.backup) {
            err(
                format!("{path}.servers"),
                "every server is a backup; at least one must not be".into(),
            );
        }
        // A bad global rule is reported once, under failover.retry_on.
        if let Some(Err(m)) = u.retry_on.as_ref().map(|r| Rules::new([retry_lists(r)])) {
            err(format!("{path}.retry_on"), m);
        }
        let rules = Rules::new(
            std::iter::once(&file.failover.retry_on)
                .chain(u.retry_on.as_ref())
                .map(retry_lists),
        )
        .unwrap_or_default();
        if let Some(hc) = &u.health_check {
            if !hc.path.starts_with('/') {
                err(
                    format!("{path}.health_check.path"),
                    "must start with /".into(),
                );
            }
            if hc.interval.0 < std::time::Duration::from_millis(100) {
                err(
                    format!("{path}.health_check.interval"),
                    "must be at least 100ms".into(),
                );
            }
        }
        if u.servers.len() > 1000 {
            err(
                format!("{path}.servers"),
                "at most 1000 servers per upstream".into(),
            );
        }
        upstreams.insert(
            name.clone(),
            Arc::new(Upstream::new(
                name.clone(),
                u,
                servers,
                rules,
                file.server.ca_file.clone(),
            )),
        );
    }

    upstreams
}

/// `models`: routes to known upstreams, tiers, fallbacks.
fn build_models(
    file: &FileConfig,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    errors: &mut Vec<ConfigError>,
) -> (HashMap<String, Arc<Alias>>, Option<Arc<Alias>>) {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    let mut aliases = HashMap::new();
    let mut catch_all = None;
    for (alias, m) in &file.models {
        let path = format!("models.{alias}");
        if alias.trim().is_empty() {
            err(path.clone(), "alias must not be empty".into());
        }
        if m.routes.is_empty() {
            err(
                format!("{path}.routes"),
                "at least one route is required".into(),
            );
        }
        let mut by_priority: BTreeMap<u32, Vec<Route>> = BTreeMap::new();
        for (i, r) in m.routes.iter().enumerate() {
            let Some(upstream) = upstreams.get(&r.upstream) else {
                err(
                    format!("{path}.routes[{i}].upstream"),
                    format!("no upstream named {:?}", r.upstream),
                );
                continue;
            };
            let model = match (&r.model, alias.as_str()) {
                (Some(m), _) => Some(Arc::<str>::from(m.as_str())),
                (None, "*") => None,
                (None, a) => Some(Arc::<str>::from(a)),
            };
            if r.weight == 0 || r.weight > 1000 {
                err(
                    format!("{path}.routes[{i}].weight"),
                    "must be between 1 and 1000".into(),
                );
            }
            if r.max_context == Some(0) {
                err(
                    format!("{path}.routes[{i}].max_context"),
                    "must be at least 1 token".into(),
                );
            }
            let max_context = r.max_context.or_else(|| {
                model
                    .as_deref()
                    .and_then(crate::relay::pricing::shipped_context)
            });
            by_priority.entry(r.priority).or_default().push(Route {
                upstream: Arc::clone(upstream),
                model,
                weight: r.weight,
                max_context,
            });
        }
        let tiers = by_priority
            .into_iter()
            .map(|(priority, routes)| Tier::new(priority, routes, m.strategy))
            .collect();
        for (field, list) in [
            ("fallbacks", &m.fallbacks),
            ("context_fallbacks", &m.context_fallbacks),
        ] {
            for (i, f) in list.iter().enumerate() {
                if f == alias || f == "*" || !file.models.contains_key(f) {
                    err(
                        format!("{path}.{field}[{i}]"),
                        if f == alias {
                            "an alias cannot fall back to itself".to_string()
                        } else {
                            format!("no model alias named {f:?}")
                        },
                    );
                }
            }
        }
        let a = Arc::new(Alias {
            name: alias.clone(),
            tiers,
            fallbacks: m.fallbacks.clone(),
            context_fallbacks: m.context_fallbacks.clone(),
            limits: m.limits,
            cache_ttl: m.cache.map(|c| c.ttl.0),
        });
        if alias == "*" {
            catch_all = Some(a);
        } else {
            aliases.insert(alias.clone(), a);
        }
    }
    if file.models.is_empty() {
        err(
            "models".into(),
            "at least one model alias is required".into(),
        );
    }

    (aliases, catch_all)
}

/// `pricing` and `log`.
fn check_pricing_and_log(file: &FileConfig, errors: &mut Vec<ConfigError>) {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    for (model, price) in &file.pricing {
        let ok =
            |v: f64| v.is_finite() && (0.0..=crate::relay::pricing::MAX_USD_PER_MTOK).contains(&v);
        if !(ok(price.input) && ok(price.output) && price.cached_input.is_none_or(ok)) {
            err(
                format!("pricing.{model}"),
                format!(
                    "prices must be numbers of USD per million tokens from 0 to {}",
                    crate::relay::pricing::MAX_USD_PER_MTOK
                ),
            );
        }
    }
    if let Some(f) = &file.log.file {
        if f.trim().is_empty() {
            err("log.file".into(), "must not be empty".into());
        }
    }
    if let Err(e) = crate::store::location(&file.store.url) {
        err(
            "store.url".into(),
            e.0.trim_start_matches("store.url: ").to_string(),
        );
    }
    let flush = file.store.flush_interval.0;
    if flush.is_zero() || flush > Duration::from_secs(3600) {
        err(
            "store.flush_interval".into(),
            "must be longer than 0s and at most 1h".into(),
        );
    }
    let refresh = file.store.refresh_interval.0;
    if refresh < Duration::from_secs(1) || refresh > Duration::from_secs(86_400) {
        err(
            "store.refresh_interval".into(),
            "must be from 1s to 24h".into(),
        );
    }
    if !(1..=10_000_000).contains(&file.store.queue_size) {
        err(
            "store.queue_size".into(),
            "must be from 1 to 10000000".into(),
        );
    }
    if !(1..=crate::limits::MAX_COUNT).contains(&file.budgets.default_max_tokens) {
        err(
            "budgets.default_max_tokens".into(),
            format!("must be from 1 to {}", crate::limits::MAX_COUNT),
        );
    }
    if !(1..=128).contains(&file.budgets.max_n) {
        err("budgets.max_n".into(), "must be from 1 to 128".into());
    }
    if let Some(w) = &file.alerts.webhook {
        let u = w.url.expose();
        if !u.starts_with("http://") {
            err(
                "alerts.webhook.url".into(),
                "must be an http:// URL (put a local relay in front of an https receiver)".into(),
            );
        }
    }
}

/// `failover`: attempts, cooldowns and the global retry rules.
fn build_failover(file: &FileConfig, errors: &mut Vec<ConfigError>) -> Failover {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    let f = &file.failover;
    if f.max_attempts == 0 || f.max_attempts > 20 {
        err(
            "failover.max_attempts".into(),
            "must be between 1 and 20".into(),
        );
    }
    if f.max_cooldown.0 < f.cooldown.0 {
        err(
            "failover.max_cooldown".into(),
            "must not be shorter than failover.cooldown".into(),
        );
    }
    if let Err(m) = Rules::new([retry_lists(&f.retry_on)]) {
        err("failover.retry_on".into(), m);
    }
    Failover {
        max_attempts: f.max_attempts,
        cooldown: f.cooldown.0,
        max_cooldown: f.max_cooldown.0,
        quota_cooldown: f.quota_cooldown.0,
        error_body_limit: f.error_body_limit.0.clamp(1024, 16 << 20) as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const GOOD: &str = r#"
upstreams:
  local:
    servers:
      - url: http://127.0.0.1:8000/v1
models:
  small:
    routes:
      - {upstream: local}
"#;

    #[test]
    fn minimal_config_is_valid_with_defaults() {
        let c = Config::parse(GOOD, &no_env).unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(c.server.max_body_size.0, 32 << 20);
        assert!(c.keys.is_empty());
    }

    #[test]
    fn a_viewer_key_needs_a_different_master_key() {
        let with = |admin: &str| {
            Config::parse(&format!("admin:\n{admin}{GOOD}"), &no_env)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(with("  viewer_key: reader-key-0000-0000\n")
            .contains("admin.viewer_key: needs admin.master_key"));
        assert!(
            with("  master_key: same-key-0000-0000\n  viewer_key: same-key-0000-0000\n")
                .contains("admin.viewer_key: must differ from admin.master_key")
        );
        assert_eq!(
            with("  master_key: master-key-0000-0000\n  viewer_key: reader-key-0000-0000\n"),
            ""
        );
    }

    #[test]
    fn strategies_weights_and_windows_are_checked() {
        let text = "upstreams:\n  u: {servers: [{url: \"http://127.0.0.1:1/v1\"}]}\nmodels:\n  m:\n    strategy: cost\n    routes:\n      - {upstream: u, weight: 0}\n      - {upstream: u, model: gpt-4o, max_context: 0}\n      - {upstream: u, model: gpt-4o}\n";
        let e = Config::parse(text, &no_env).err().unwrap().to_string();
        assert!(
            e.contains("models.m.routes[0].weight: must be between 1 and 1000"),
            "{e}"
        );
        assert!(
            e.contains("models.m.routes[1].max_context: must be at least 1 token"),
            "{e}"
        );
        let ok = text
            .replace("weight: 0", "weight: 3")
            .replace(", max_context: 0", ", max_context: 9000");
        let c = Config::parse(&ok, &no_env).unwrap();
        let tier = &c.router.resolve("m").unwrap().tiers[0];
        assert_eq!(tier.strategy, file::Strategy::Cost);
        assert_eq!(tier.routes[0].weight, 3);
        assert_eq!(tier.routes[1].max_context, Some(9000));
        // The shipped table's window for a known model.
        assert_eq!(tier.routes[2].max_context, Some(128_000));
        assert!(Config::parse(
            &text.replace("strategy: cost", "strategy: fastest"),
            &no_env
        )
        .is_err());
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let text = r#"
server:
  listen: ["nowhere"]
upstreams:
  openai:
    provider: openai
    servers:
      - url: ftp://x
      - url: https://api.openai.com/v1
models:
  gpt-4o:
    routes:
      - {upstream: openai}
      - {upstream: azure, priority: 2}
"#;
        let errs = Config::parse(text, &no_env).err().unwrap().to_string();
        assert!(errs.contains("server.listen[0]: \"nowhere\""), "{errs}");
        assert!(errs.contains("upstreams.openai.servers[0].url"), "{errs}");
        assert!(
            errs.contains("upstreams.openai.servers[1].api_key: required for provider openai"),
            "{errs}"
        );
        assert!(
            errs.contains("models.gpt-4o.routes[1].upstream: no upstream named \"azure\""),
            "{errs}"
        );
    }

    #[test]
    fn unknown_fields_are_errors_with_a_path() {
        let text = GOOD.replace("servers:", "colour: red\n    servers:");
        let errs = Config::parse(&text, &no_env).err().unwrap().to_string();
        assert!(errs.starts_with("upstreams.local"), "{errs}");
        assert!(errs.contains("unknown field `colour`"), "{errs}");
    }

    #[test]
    fn env_references_expand_and_missing_ones_are_errors() {
        let text = format!("{GOOD}keys:\n  - {{name: a, key: \"${{TG_TEST_KEY}}\"}}\n");
        let env = |n: &str| (n == "TG_TEST_KEY").then(|| "secret-value-123".to_string());
        let c = Config::parse(&text, &env).unwrap();
        assert_eq!(c.keys.len(), 1);
        let errs = Config::parse(&text, &no_env).err().unwrap().to_string();
        assert_eq!(
            errs,
            "keys[0].key: environment variable TG_TEST_KEY is not set"
        );
        assert_eq!(expand_str("a$${b}", &no_env).unwrap(), "a${b}");
    }

    #[test]
    fn equal_priorities_form_one_tier_in_order() {
        let text = r#"
upstreams:
  a: {servers: [{url: "http://127.0.0.1:1/v1"}]}
  b: {servers: [{url: "http://127.0.0.1:2/v1"}]}
models:
  m:
    routes:
      - {upstream: b, priority: 2}
      - {upstream: a, priority: 1, model: other}
      - {upstream: b, priority: 1}
"#;
        let c = Config::parse(text, &no_env).unwrap();
        let alias = c.router.resolve("m").unwrap();
        assert_eq!(alias.tiers.len(), 2);
        assert_eq!(alias.tiers[0].routes.len(), 2);
        assert_eq!(alias.tiers[0].routes[0].model.as_deref(), Some("other"));
        assert_eq!(alias.tiers[1].priority, 2);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text: a config or errors, never a panic.
        #[test]
        fn any_text_is_a_config_or_errors(text in "[a-z_:{}\\[\\], \n\"'0-9.$-]{0,300}") {
            let _ = Config::parse(&text, &|_| None);
        }

        /// Any value in any known field: a config or errors with paths.
        #[test]
        fn any_value_in_a_known_field_is_handled(
            field in prop::sample::select(vec!["threads", "max_body_size", "header_timeout", "body_timeout", "keepalive_timeout", "max_connections", "listen", "admin_listen"]),
            value in "\\PC{0,20}",
        ) {
            let text = format!(
                "server:\n  {field}: {}\nupstreams:\n  u:\n    servers: [{{url: \"http://127.0.0.1:1\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
                serde_json::to_string(&value).unwrap()
            );
            if let Err(errors) = Config::parse(&text, &|_| None) {
                prop_assert!(!errors.0.is_empty());
            }
        }
    }
}
