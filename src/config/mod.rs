//! Loading and validating configuration. Two layers: `file` is the serde schema users
//! write; [`build`] checks it as a whole (every error at once, each with its path),
//! expands `${ENV}` references and resolves names into the runtime [`Config`] the proxy
//! reads. A config that fails here is never served.

mod build;
pub mod catalogue;
mod check;
pub mod file;
pub mod settings;
pub mod units;

use crate::keys::auth::KeyRing;
use crate::limits::Cidr;
use crate::provider::inspect::Rules;
use crate::route::{Alias, Route, Router, Sends, Tier};
use crate::upstream::{Endpoint, Server, ServerState, Upstream};
use build::*;
use check::*;
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

pub use crate::spec::Failover;

/// Limits of the global and per-IP scopes (key and model limits live on keys and aliases).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub global: crate::limits::Limits,
    pub per_ip: crate::limits::Limits,
}

/// The validated runtime configuration the proxy serves from.
pub struct Config {
    pub server: settings::Server,
    pub pricing: crate::relay::pricing::Pricing,
    pub store: settings::Storage,
    pub budgets: settings::Budgets,
    /// `alerts.webhook`, when budget alerts are posted.
    pub webhook: Option<crate::keys::alerts::Webhook>,
    pub cache: settings::Cache,
    pub cluster: settings::Cluster,
    pub log: settings::Log,
    pub failover: Failover,
    pub limits: Limits,
    pub trusted_proxies: Vec<Cidr>,
    pub listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub keys: KeyRing,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub router: Router,
    pub admin: settings::Admin,
    /// OpenTelemetry traces, when a collector is configured.
    pub tracing: Option<crate::trace::Settings>,
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
        let pricing_file = catalogue::take_file(&mut value);
        let mut file: FileConfig =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note))
                .map_err(|e| {
                    let path = e.path().to_string();
                    let path = if path == "." { String::new() } else { path };
                    ConfigErrors::one(path, e.into_inner().to_string())
                })?;
        file.pricing_file = pricing_file.and_then(|v| v.as_str().map(str::to_string));
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
            .find(|s| *s.name == *name && s.url == url)
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
    check_pricing_and_log(&file, &mut errors);
    let pricing = catalogue::pricing(&file, &mut errors);
    let (aliases, catch_all) = build_models(&file, &upstreams, &pricing, &mut errors);
    let failover = build_failover(&file, &mut errors);
    let tracing = build_tracing(&file, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        pricing,
        log: (&file.log).into(),
        failover,
        listen,
        admin_listen,
        keys: KeyRing::new(file.keys.iter().map(|k| {
            let info = crate::keys::auth::KeyInfo {
                name: k.name.as_str().into(),
                id: crate::keys::owner_id("config", &k.name).into(),
                limits: k.limits,
                models: k.models.clone(),
                budget: k.budget.as_ref().and_then(|b| budget_spec(b).ok()),
            };
            (&k.key, info)
        })),
        store: (&file.store).into(),
        budgets: (&file.budgets).into(),
        webhook: file.alerts.webhook.as_ref().map(Into::into),
        cache: (&file.cache).into(),
        cluster: (&file.cluster).into(),
        limits: Limits {
            global: file.limits.global,
            per_ip: file.limits.per_ip,
        },
        trusted_proxies,
        upstreams,
        router: Router::new(aliases, catch_all),
        server: (&file.server).into(),
        admin: (&file.admin).into(),
        tracing,
    })
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
        assert_eq!(c.server.max_body_size, 32 << 20);
        assert!(c.keys.is_empty());
    }

    #[test]
    fn tracing_settings_are_checked_and_a_base_url_gets_the_traces_path() {
        let parse = |t: &str| Config::parse(&format!("tracing:\n{t}{GOOD}"), &no_env);
        let t = parse("  otlp: {endpoint: \"http://c:4318\"}\n")
            .unwrap()
            .tracing
            .unwrap();
        assert_eq!(
            (t.endpoint.as_str(), t.sample_ratio),
            ("http://c:4318/v1/traces", 1.0)
        );
        let t = parse("  otlp: {endpoint: \"https://c/otlp/v1/traces\"}\n")
            .unwrap()
            .tracing
            .unwrap();
        assert_eq!(t.endpoint, "https://c/otlp/v1/traces");
        let errors = parse(
            "  otlp: {endpoint: \"ftp://c\", protocol: grpc}\n  sample_ratio: 2\n  batch_size: 0\n",
        )
        .err()
        .unwrap()
        .to_string();
        for path in [
            "tracing.otlp.endpoint",
            "tracing.otlp.protocol",
            "tracing.sample_ratio",
            "tracing.batch_size",
        ] {
            assert!(errors.contains(path), "{path}: {errors}");
        }
        let errors = parse("  headers: {x-key: secret-value-1}\n")
            .err()
            .unwrap()
            .to_string();
        assert!(
            errors.contains("tracing.otlp.endpoint: is required"),
            "{errors}"
        );
        assert!(!errors.contains("secret-value-1"));
        assert!(parse("").unwrap().tracing.is_none());
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
