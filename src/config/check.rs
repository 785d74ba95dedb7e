//! The checks of sections that build nothing: cache, admin, limits, keys, pricing and
//! log. Each pushes every problem it finds, with its path.

use super::*;

/// `cache`, `cluster` and each alias's `cache`.
pub(super) fn check_cache(file: &FileConfig, errors: &mut Vec<ConfigError>) {
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

/// `admin`: a viewer key needs a master key, and must differ from it.
pub(super) fn check_admin(admin: &file::AdminSection, errors: &mut Vec<ConfigError>) {
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
pub(super) const MIN_ADMIN_KEY_CHARS: usize = 16;

/// Limit values of every scope: at most [`crate::limits::MAX_COUNT`].
pub(super) fn check_limits(file: &FileConfig, errors: &mut Vec<ConfigError>) {
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
pub(super) fn check_keys(file: &FileConfig, errors: &mut Vec<ConfigError>) {
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

/// `log` and `store`.
pub(super) fn check_pricing_and_log(file: &FileConfig, errors: &mut Vec<ConfigError>) {
    // The prices themselves are checked as they are built (`catalogue::pricing`).
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
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
    let log_flush = file.log.flush_interval.0;
    if log_flush.is_zero() || log_flush > Duration::from_secs(60) {
        err(
            "log.flush_interval".into(),
            "must be longer than 0s and at most 60s".into(),
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
        if !u.starts_with("http://") && !u.starts_with("https://") {
            err(
                "alerts.webhook.url".into(),
                "must be an http:// or https:// URL".into(),
            );
        }
    }
}
