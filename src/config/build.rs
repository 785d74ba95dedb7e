//! Building the runtime specs from the file: the server's listeners, upstreams with
//! their servers, aliases with their tiers, and failover.

use super::*;

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

/// `server`: listeners, admin listener, threads, timeouts, caps, body size, trusted proxies.
pub(super) fn build_server(
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

/// `upstreams`: servers, timeouts, credentials, retry rules and health checks; servers
/// that exist in `previous` keep their live state.
pub(super) fn build_upstreams(
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
pub(super) fn build_models(
    file: &FileConfig,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    pricing: &crate::relay::pricing::Pricing,
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
            // The model a route sends: its own, else (a named alias being matched exactly)
            // the alias's name; only a `*` route sends whatever the client named, and its
            // window and price are looked up per request.
            let sent = match (model.as_deref(), alias.as_str()) {
                (Some(m), _) => Some(m),
                (None, "*") => None,
                (None, name) => Some(name),
            };
            let max_context = r
                .max_context
                .or_else(|| sent.and_then(crate::relay::pricing::shipped_context));
            let sends = match sent {
                Some(m) => Sends::Fixed {
                    price: pricing.for_route(m, alias),
                },
                None => Sends::Client,
            };
            by_priority.entry(r.priority).or_default().push(Route {
                upstream: Arc::clone(upstream),
                model,
                weight: r.weight,
                max_context,
                sends,
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

/// `failover`: attempts, cooldowns and the global retry rules.
pub(super) fn build_failover(file: &FileConfig, errors: &mut Vec<ConfigError>) -> Failover {
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

/// `tracing`: the exporter's settings, or `None` when no collector is configured.
pub(super) fn build_tracing(
    file: &FileConfig,
    errors: &mut Vec<ConfigError>,
) -> Option<crate::trace::Settings> {
    let t = &file.tracing;
    let mut err = |path: &str, message: String| {
        errors.push(ConfigError {
            path: format!("tracing.{path}"),
            message,
        })
    };
    let ratio = t.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        err("sample_ratio", "must be from 0 to 1".into());
    }
    let content_limit = t.content_limit.map_or(4096, |b| b.0);
    if content_limit > 1 << 20 {
        err("content_limit", "must be at most 1MiB".into());
    }
    let queue = t.queue_size.unwrap_or(2048);
    if !(1..=1_000_000).contains(&queue) {
        err("queue_size", "must be from 1 to 1000000".into());
    }
    let batch = t.batch_size.unwrap_or(512);
    if !(1..=queue.max(1)).contains(&batch) {
        err("batch_size", "must be from 1 to queue_size".into());
    }
    let delay = t.batch_delay.map_or(Duration::from_secs(1), |d| d.0);
    if delay.is_zero() || delay > Duration::from_secs(60) {
        err("batch_delay", "must be from 1ms to 60s".into());
    }
    let service_name = t.service_name.clone().unwrap_or_else(|| "tollgate".into());
    if service_name.trim().is_empty() {
        err("service_name", "must not be empty".into());
    }
    for name in t.headers.keys() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            err("headers", format!("{name:?} is not a header name"));
        }
    }
    let Some(otlp) = &t.otlp else {
        if !t.headers.is_empty() || t.sample_ratio.is_some() || t.capture_content {
            err(
                "otlp.endpoint",
                "is required when tracing is configured".into(),
            );
        }
        return None;
    };
    match otlp.protocol.as_deref() {
        None | Some("http/protobuf") => {}
        Some("grpc") => err(
            "otlp.protocol",
            "grpc is not served; point otlp.endpoint at the collector's OTLP/HTTP port (4318)"
                .into(),
        ),
        Some(other) => err("otlp.protocol", format!("{other:?} is not http/protobuf")),
    }
    let url = otlp.endpoint.expose().trim();
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        err("otlp.endpoint", "must be an http:// or https:// URL".into());
        return None;
    };
    // A base URL (no path) gets the traces path, as OTEL_EXPORTER_OTLP_ENDPOINT does.
    let endpoint = match rest.find('/') {
        None => format!("{url}/v1/traces"),
        Some(i) if &rest[i..] == "/" => format!("{}v1/traces", url),
        Some(_) => url.to_string(),
    };
    if otlp.timeout.0.is_zero() || otlp.timeout.0 > Duration::from_secs(60) {
        err("otlp.timeout", "must be from 1ms to 60s".into());
    }
    Some(crate::trace::Settings {
        endpoint,
        headers: t
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        sample_ratio: ratio,
        service_name,
        capture_content: t.capture_content,
        content_limit: content_limit as usize,
        queue,
        batch,
        delay,
        timeout: otlp.timeout.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route's price is resolved when the config is built: its model's (the alias's
    /// name when it names none), else its alias's; a route of `*` passes the client's
    /// model and is priced per request.
    #[test]
    fn route_prices_are_resolved_at_build() {
        let text = r#"
upstreams:
  local: {servers: [{url: "http://127.0.0.1:8000/v1"}]}
pricing:
  named-model: {input: 1, output: 2}
  cheap: {input: 3, output: 4}
models:
  cheap:
    routes:
      - {upstream: local, model: named-model}
      - {upstream: local, model: tollgate-unlisted-model}
      - {upstream: local}
  gpt-4o:
    routes:
      - {upstream: local}
  plain:
    routes:
      - {upstream: local}
  "*":
    routes:
      - {upstream: local}
"#;
        let c = Config::parse(text, &|_| None).unwrap();
        let prices = |alias: &str| -> Vec<Sends> {
            let a = c.router.resolve(alias).unwrap();
            a.tiers[0].routes.iter().map(|r| r.sends).collect()
        };
        let fixed = |price| Sends::Fixed { price };
        let named = c.pricing.get("named-model");
        let alias = c.pricing.get("cheap");
        assert!(named.is_some() && alias.is_some() && named != alias);
        assert_eq!(prices("cheap"), [fixed(named), fixed(alias), fixed(alias)]);
        // A named alias without a model sends its own name: priced as that name.
        let shipped = c.pricing.get("gpt-4o");
        assert!(shipped.is_some());
        assert_eq!(prices("gpt-4o"), [fixed(shipped)]);
        assert_eq!(prices("plain"), [fixed(None)]);
        assert_eq!(prices("some-client-model"), [Sends::Client]);
        let star = &c.router.resolve("named-model").unwrap().tiers[0].routes[0];
        assert_eq!(star.price(&c.pricing, "named-model", "*"), named);
    }
}
