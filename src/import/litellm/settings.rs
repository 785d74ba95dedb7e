//! The settings sections of a LiteLLM config: `litellm_settings` (with its cache),
//! `router_settings` and `general_settings`.

use super::{is_env, list_of_strings, number, seconds, text, truthy, value, Fields, Translator};
use serde_yaml::Value;

impl Translator {
    pub(super) fn litellm_settings(&mut self, v: Value) {
        let mut f = Fields::new("litellm_settings", v, &mut self.warnings);
        self.common_settings(&mut f);
        if let Some(t) = f.take("request_timeout").as_ref().and_then(number) {
            self.timeout = Some(seconds(t));
        }
        let cache_on = f.take("cache").is_some_and(|v| truthy(&v));
        let params = f.take("cache_params");
        if cache_on {
            self.cache_params(params.unwrap_or(Value::Null));
        } else if params.is_some() {
            self.warn(
                "litellm_settings.cache_params",
                "cache is not on; not carried over",
            );
        }
        if f.take("json_logs").is_some_and(|v| truthy(&v)) {
            self.json_logs = true;
        }
        if f.take("drop_params").is_some_and(|v| truthy(&v)) {
            self.warn(
                "litellm_settings.drop_params",
                "Tollgate does not drop parameters: one a provider cannot take is refused with a 400 naming it",
            );
        }
        if f.take("set_verbose").is_some() {
            self.warn(
                "litellm_settings.set_verbose",
                "use RUST_LOG=debug for verbose logs",
            );
        }
        f.rest(&mut self.warnings);
    }

    fn cache_params(&mut self, v: Value) {
        let mut f = Fields::new("litellm_settings.cache_params", v, &mut self.warnings);
        let kind = f
            .take("type")
            .as_ref()
            .and_then(text)
            .unwrap_or("redis".into());
        if f.take("mode")
            .as_ref()
            .and_then(text)
            .is_some_and(|m| m == "default_off")
        {
            self.warn(
                &f.at("mode"),
                "caching on request only has no equivalent (Tollgate caches the aliases that set cache); no alias is cached",
            );
            f.rest(&mut self.warnings);
            return;
        }
        let ttl = f
            .take("ttl")
            .as_ref()
            .and_then(number)
            .map_or("10m".to_string(), seconds);
        let backend = match kind.as_str() {
            "redis" => {
                if let Some(url) = redis_url(&mut f) {
                    self.redis.get_or_insert(url);
                }
                "redis"
            }
            "local" | "in-memory" => "memory",
            other => {
                self.warn(
                    &f.at("type"),
                    &format!("a {other} cache has no equivalent; an in-memory exact-match cache is configured instead"),
                );
                "memory"
            }
        };
        if backend == "redis" && self.redis.is_none() {
            self.warn(
                &f.path,
                "a redis cache without host or url; an in-memory cache is configured instead",
            );
            self.cache = Some(("memory".into(), ttl));
        } else {
            self.cache = Some((backend.into(), ttl));
        }
        self.warn(
            &f.path,
            "LiteLLM shares cached answers between all keys; Tollgate shares them within one key (cache.scope: key); set cache.scope: global for LiteLLM's behaviour",
        );
        for quiet in ["supported_call_types", "namespace"] {
            if f.take(quiet).is_some() {
                self.warn(&f.at(quiet), "not carried over");
            }
        }
        f.rest(&mut self.warnings);
    }

    /// Settings that both litellm_settings and router_settings may hold.
    fn common_settings(&mut self, f: &mut Fields) {
        if let Some(n) = f.take("num_retries").as_ref().and_then(number) {
            self.max_attempts = Some((n.max(0.0) as u64 + 1).min(20));
        }
        for (key, into_context) in [("fallbacks", false), ("context_window_fallbacks", true)] {
            if let Some(v) = f.take(key) {
                let path = f.at(key);
                for (alias, to) in self.fallback_pairs(&path, v) {
                    let target = if into_context {
                        &mut self.context_fallbacks
                    } else {
                        &mut self.fallbacks
                    };
                    target.insert(alias, to);
                }
            }
        }
        if let Some(v) = f.take("default_fallbacks") {
            self.default_fallbacks = list_of_strings(&v);
        }
        if f.take("content_policy_fallbacks").is_some() {
            self.warn(
                &f.at("content_policy_fallbacks"),
                "has no equivalent (a content-policy refusal is answered to the client); not carried over",
            );
        }
    }

    /// `[{alias: [fallback, ...]}, ...]` as pairs.
    fn fallback_pairs(&mut self, path: &str, v: Value) -> Vec<(String, Vec<String>)> {
        let Value::Sequence(items) = v else {
            self.warn(path, "expected a list of {alias: [fallbacks]}; left out");
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items {
            if let Value::Mapping(m) = item {
                for (k, v) in m {
                    if let Some(alias) = text(&k) {
                        out.push((alias, list_of_strings(&v)));
                    }
                }
            }
        }
        out
    }

    pub(super) fn router_settings(&mut self, v: Value) {
        let mut f = Fields::new("router_settings", v, &mut self.warnings);
        self.common_settings(&mut f);
        if let Some(s) = f.take("routing_strategy").as_ref().and_then(text) {
            self.strategy = Some((f.at("routing_strategy"), s));
        }
        if let Some(t) = f.take("cooldown_time").as_ref().and_then(number) {
            self.cooldown = Some(t);
        }
        if let Some(n) = f.take("allowed_fails").as_ref().and_then(number) {
            self.allowed_fails = Some(n as u64);
        }
        if let Some(t) = f.take("timeout").as_ref().and_then(number) {
            self.timeout = Some(seconds(t));
        }
        let mut redis = Fields::new(&f.path, Value::Null, &mut self.warnings);
        for (from, to) in [
            ("redis_host", "host"),
            ("redis_port", "port"),
            ("redis_password", "password"),
            ("redis_url", "url"),
        ] {
            if let Some(v) = f.take(from) {
                redis.map.insert(Value::String(to.into()), v);
            }
        }
        if let Some(url) = redis_url(&mut redis) {
            self.redis = Some(url);
        }
        if let Some(Value::Mapping(m)) = f.take("model_group_alias") {
            for (k, v) in m {
                let target = match &v {
                    Value::Mapping(inner) => inner.get("model").and_then(text),
                    other => text(other),
                };
                if let (Some(name), Some(target)) = (text(&k), target) {
                    self.group_aliases
                        .push((f.at("model_group_alias"), name, target));
                }
            }
        }
        f.take("enable_pre_call_checks"); // always on: routes skip a too-small context
        f.rest(&mut self.warnings);
    }

    pub(super) fn general_settings(&mut self, v: Value) {
        let mut f = Fields::new("general_settings", v, &mut self.warnings);
        if let Some(k) = f.take("master_key").as_ref().and_then(text) {
            if !is_env(&k) && k.chars().count() < 16 {
                self.warn(
                    &f.at("master_key"),
                    "shorter than the 16 characters Tollgate's admin key needs; admin.master_key left unset (set one, e.g. openssl rand -hex 24)",
                );
            } else {
                self.master_key = Some(value(&k));
            }
            self.warn(
                &f.at("master_key"),
                "Tollgate's master key runs the admin API only; clients that called models with it need a client key",
            );
        }
        if let Some(url) = f.take("database_url").as_ref().and_then(text) {
            self.store_url = Some(value(&url));
            self.warn(
                &f.at("database_url"),
                "Tollgate keeps its own tables (keys, teams, usage, audit) in this database beside LiteLLM's; a database of its own is cleaner",
            );
        }
        for key in ["max_parallel_requests", "global_max_parallel_requests"] {
            if let Some(n) = f.take(key).as_ref().and_then(number) {
                self.concurrency = Some(n as u64);
            }
        }
        f.rest(&mut self.warnings);
    }
}

/// `cluster.redis` from `host`/`port`/`password` or `url` settings.
fn redis_url(f: &mut Fields) -> Option<String> {
    if let Some(url) = f.take("url").as_ref().and_then(text) {
        f.take("host");
        f.take("port");
        f.take("password");
        return Some(value(&url));
    }
    let host = value(&text(&f.take("host")?)?);
    let port = f
        .take("port")
        .as_ref()
        .and_then(text)
        .map_or("6379".into(), |p| value(&p));
    let auth = match f.take("password").as_ref().and_then(text) {
        Some(p) => format!(":{}@", value(&p)),
        None => String::new(),
    };
    Some(format!("redis://{auth}{host}:{port}"))
}
