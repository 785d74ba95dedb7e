//! `tollgate import-litellm FILE`: reads a LiteLLM proxy config (`model_list`,
//! `router_settings`, `litellm_settings`, `general_settings`) and writes the equivalent
//! Tollgate config. Each deployment becomes a route of the alias its `model_name` names,
//! on an upstream per distinct provider, base URL and credential; `order` becomes the
//! route's tier, `weight` (or `rpm`) its share. `os.environ/NAME` becomes `${NAME}`. Every
//! setting without an equivalent is reported with its path; nothing is dropped silently.

use super::ImportError;
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// A setting the importer could not carry over (or carried over with a change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The Tollgate config, and what did not carry over.
pub struct Import {
    pub yaml: String,
    pub warnings: Vec<Warning>,
}

/// LiteLLM's hosted providers that Tollgate serves: prefix, Tollgate provider, base URL.
const HOSTED: &[(&str, &str, &str)] = &[
    ("openai", "openai", "https://api.openai.com/v1"),
    (
        "text-completion-openai",
        "openai",
        "https://api.openai.com/v1",
    ),
    ("anthropic", "anthropic", "https://api.anthropic.com/v1"),
    (
        "gemini",
        "gemini",
        "https://generativelanguage.googleapis.com/v1beta",
    ),
    ("groq", "openai", "https://api.groq.com/openai/v1"),
    ("deepseek", "openai", "https://api.deepseek.com/v1"),
    ("mistral", "openai", "https://api.mistral.ai/v1"),
    ("together_ai", "openai", "https://api.together.xyz/v1"),
    (
        "fireworks_ai",
        "openai",
        "https://api.fireworks.ai/inference/v1",
    ),
    ("openrouter", "openai", "https://openrouter.ai/api/v1"),
    ("xai", "openai", "https://api.x.ai/v1"),
    ("perplexity", "openai", "https://api.perplexity.ai"),
    ("deepinfra", "openai", "https://api.deepinfra.com/v1/openai"),
    ("cerebras", "openai", "https://api.cerebras.ai/v1"),
];

/// OpenAI-compatible servers of one's own: prefix, and LiteLLM's default base URL.
const SELF_HOSTED: &[(&str, Option<&str>)] = &[
    ("hosted_vllm", None),
    ("openai_like", None),
    ("custom_openai", None),
    ("litellm_proxy", None),
    ("huggingface", None),
    ("xinference", None),
    ("llamafile", Some("http://127.0.0.1:8080/v1")),
    ("lm_studio", Some("http://localhost:1234/v1")),
    ("ollama", Some("http://localhost:11434")),
    ("ollama_chat", Some("http://localhost:11434")),
];

/// LiteLLM's per-token prices, in the order Tollgate's `input`, `output`, `cached_input`
/// and `cache_write` take them.
const PRICE_FIELDS: [&str; 4] = [
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
];

/// The Azure OpenAI API version written when a deployment names none.
const AZURE_API_VERSION: &str = "2024-10-21";

/// Reads `path` and translates it.
pub fn import(path: &Path) -> Result<Import, ImportError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ImportError(format!("{}: {e}", path.display())))?;
    translate(&text)
}

/// Translates the text of a LiteLLM config.
pub fn translate(text: &str) -> Result<Import, ImportError> {
    let doc: Value =
        serde_yaml::from_str(text).map_err(|e| ImportError(format!("not a YAML document: {e}")))?;
    let Value::Mapping(root) = doc else {
        return Err(ImportError(
            "expected a mapping of settings (model_list, router_settings, ...)".into(),
        ));
    };
    let mut t = Translator::default();
    t.run(root);
    let yaml = t.emit();
    Ok(Import {
        yaml,
        warnings: t.warnings,
    })
}

/// The settings of one mapping, taken one at a time; what is left is reported.
struct Fields {
    path: String,
    map: Mapping,
}

impl Fields {
    fn new(path: &str, v: Value, warnings: &mut Vec<Warning>) -> Fields {
        let map = match v {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                warn(warnings, path, "expected a mapping; left out");
                Mapping::new()
            }
        };
        Fields {
            path: path.to_string(),
            map,
        }
    }

    fn at(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// The value of `name` (a null counts as absent).
    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    /// Reports every setting not taken.
    fn rest(self, warnings: &mut Vec<Warning>) {
        for (k, _) in self.map {
            let name = text(&k).unwrap_or_else(|| "?".into());
            warn(
                warnings,
                &join(&self.path, &name),
                "has no equivalent in Tollgate; not carried over",
            );
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn warn(warnings: &mut Vec<Warning>, path: &str, message: &str) {
    warnings.push(Warning {
        path: path.to_string(),
        message: message.to_string(),
    });
}

/// A scalar as text.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// A string setting as Tollgate writes it: `os.environ/NAME` becomes `${NAME}`; a literal
/// `${` is escaped so that it is not read as a variable.
fn value(s: &str) -> String {
    match s.strip_prefix("os.environ/") {
        Some(name) => format!("${{{}}}", name.trim()),
        None => s.replace("${", "$${"),
    }
}

fn is_env(s: &str) -> bool {
    s.starts_with("os.environ/")
}

/// Seconds as a Tollgate duration (`30s`, `1500ms`).
fn seconds(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{}s", s as u64)
    } else {
        format!("{}ms", (s * 1000.0).round() as u64)
    }
}

fn list_of_strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items.iter().filter_map(text).collect(),
        other => text(other).into_iter().collect(),
    }
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert(Value::String(k.into()), v);
    }
    Value::Mapping(m)
}

/// One upstream: a provider, a base URL and a credential.
#[derive(Clone, PartialEq)]
struct Upstream {
    provider: &'static str,
    url: String,
    api_key: Option<String>,
    stream_usage: bool,
    first_byte_timeout: Option<String>,
}

/// One route of an alias.
struct Route {
    upstream: String,
    /// The model sent upstream; none for a wildcard (the client's model).
    model: Option<String>,
    priority: u64,
    weight: Option<f64>,
    rpm: Option<f64>,
    tpm: Option<f64>,
    max_context: Option<u64>,
}

#[derive(Default)]
struct Translator {
    warnings: Vec<Warning>,
    upstreams: BTreeMap<String, Upstream>,
    aliases: BTreeMap<String, Vec<Route>>,
    /// Alias -> (fallbacks, context fallbacks).
    fallbacks: BTreeMap<String, Vec<String>>,
    context_fallbacks: BTreeMap<String, Vec<String>>,
    default_fallbacks: Vec<String>,
    group_aliases: Vec<(String, String, String)>,
    strategy: Option<(String, String)>,
    max_attempts: Option<u64>,
    cooldown: Option<f64>,
    allowed_fails: Option<u64>,
    timeout: Option<String>,
    redis: Option<String>,
    cache: Option<(String, String)>,
    /// Model -> USD per million tokens, in the order of [`PRICE_FIELDS`].
    pricing: BTreeMap<String, [Option<f64>; 4]>,
    master_key: Option<String>,
    store_url: Option<String>,
    concurrency: Option<u64>,
    json_logs: bool,
}

impl Translator {
    fn warn(&mut self, path: &str, message: &str) {
        warn(&mut self.warnings, path, message);
    }

    fn run(&mut self, root: Mapping) {
        let mut top = Fields {
            path: String::new(),
            map: root,
        };
        if let Some(list) = top.take("model_list") {
            match list {
                Value::Sequence(items) => {
                    for (i, d) in items.into_iter().enumerate() {
                        self.deployment(&format!("model_list[{i}]"), d);
                    }
                }
                _ => self.warn("model_list", "expected a list of deployments; left out"),
            }
        }
        // litellm_settings first: router_settings, where both set a thing, wins.
        if let Some(v) = top.take("litellm_settings") {
            self.litellm_settings(v);
        }
        if let Some(v) = top.take("router_settings") {
            self.router_settings(v);
        }
        if let Some(v) = top.take("general_settings") {
            self.general_settings(v);
        }
        if let Some(v) = top.take("environment_variables") {
            let names: Vec<String> = match &v {
                Value::Mapping(m) => m.keys().filter_map(text).collect(),
                _ => Vec::new(),
            };
            self.warn(
                "environment_variables",
                &format!(
                    "set {} in the gateway's environment (values are not copied)",
                    names.join(", ")
                ),
            );
        }
        top.rest(&mut self.warnings);
    }

    fn deployment(&mut self, path: &str, d: Value) {
        let mut f = Fields::new(path, d, &mut self.warnings);
        let Some(alias) = f.take("model_name").as_ref().and_then(text) else {
            self.warn(path, "has no model_name; left out");
            return;
        };
        let params = f.take("litellm_params").unwrap_or(Value::Null);
        let info = f.take("model_info").unwrap_or(Value::Null);
        f.rest(&mut self.warnings);
        let mut p = Fields::new(&join(path, "litellm_params"), params, &mut self.warnings);
        let mut info = Fields::new(&join(path, "model_info"), info, &mut self.warnings);
        let Some(model) = p.take("model").as_ref().and_then(text) else {
            self.warn(&p.at("model"), "is missing; deployment left out");
            return;
        };
        let api_base = p.take("api_base").as_ref().and_then(text);
        let api_key = p.take("api_key").as_ref().and_then(text);
        let api_version = p.take("api_version").as_ref().and_then(text);
        let base_model = info.take("base_model").as_ref().and_then(text);
        let Some((upstream, name_hint, routed)) = self.target(
            &p.at("model"),
            &model,
            api_base.as_deref(),
            api_key.as_deref(),
            api_version.as_deref(),
            base_model.as_deref(),
        ) else {
            return;
        };
        let wildcard = routed.is_none();
        if alias.contains('*') && !(alias == "*" && wildcard) {
            self.warn(
                &join(path, "model_name"),
                "a wildcard other than \"*\" to a provider's \"*\" has no equivalent (Tollgate's \"*\" alias passes any model to one set of routes); deployment left out",
            );
            return;
        }
        if wildcard && alias != "*" {
            self.warn(
                &p.at("model"),
                "a provider wildcard needs model_name \"*\"; deployment left out",
            );
            return;
        }
        let mut upstream = upstream;
        for key in ["timeout", "stream_timeout"] {
            if let Some(t) = p.take(key).as_ref().and_then(number) {
                upstream.first_byte_timeout.get_or_insert(seconds(t));
            }
        }
        if let Some(k) = &api_key {
            if !is_env(k) {
                self.warn(
                    &p.at("api_key"),
                    "a literal key was copied into the config; consider ${VARIABLE} (the value is not shown)",
                );
            }
        }
        let upstream_name = self.upstream(&name_hint, upstream);
        let order = p.take("order").as_ref().and_then(number);
        let max_context = info
            .take("max_input_tokens")
            .as_ref()
            .and_then(number)
            .map(|n| n as u64);
        let route = Route {
            upstream: upstream_name,
            model: routed.clone(),
            priority: order.map_or(1, |o| o.max(1.0) as u64),
            weight: p.take("weight").as_ref().and_then(number),
            rpm: p.take("rpm").as_ref().and_then(number),
            tpm: p.take("tpm").as_ref().and_then(number),
            max_context,
        };
        let priced = routed.clone().unwrap_or_else(|| alias.clone());
        for fields in [&mut p, &mut info] {
            for (i, field) in PRICE_FIELDS.iter().enumerate() {
                if let Some(usd) = fields.take(field).as_ref().and_then(number) {
                    // Per million tokens, rounded to 9 decimals (1e-6 x 2e-7 is not exact).
                    let per_million = (usd * 1e15).round() / 1e9;
                    self.pricing.entry(priced.clone()).or_default()[i] = Some(per_million);
                }
            }
        }
        for quiet in ["id", "mode", "max_tokens", "max_output_tokens"] {
            info.take(quiet);
        }
        p.rest(&mut self.warnings);
        info.rest(&mut self.warnings);
        self.aliases.entry(alias).or_default().push(route);
    }

    /// The upstream a deployment's `model` names, a name for it, and the model routed
    /// (none for a provider wildcard).
    fn target(
        &mut self,
        path: &str,
        model: &str,
        api_base: Option<&str>,
        api_key: Option<&str>,
        api_version: Option<&str>,
        base_model: Option<&str>,
    ) -> Option<(Upstream, String, Option<String>)> {
        let (prefix, rest) = match model.split_once('/') {
            Some((p, r)) if is_provider(p) => (p.to_string(), r.to_string()),
            _ => {
                let inferred = if api_base.is_some() {
                    "openai"
                } else if model.starts_with("claude") {
                    "anthropic"
                } else if model.starts_with("gemini") {
                    "gemini"
                } else {
                    "openai"
                };
                self.warn(
                    path,
                    &format!("no provider prefix; served as {inferred}/{model}"),
                );
                (inferred.to_string(), model.to_string())
            }
        };
        let routed = (rest != "*").then(|| rest.clone());
        let key = api_key.map(value);
        let mut up = Upstream {
            provider: "generic",
            url: String::new(),
            api_key: key.clone(),
            stream_usage: false,
            first_byte_timeout: None,
        };
        if prefix == "azure" {
            let Some(base) = api_base else {
                self.warn(path, "an azure deployment needs api_base; left out");
                return None;
            };
            let version = api_version.map(value).unwrap_or_else(|| {
                self.warn(
                    path,
                    &format!("no api_version: {AZURE_API_VERSION} is written"),
                );
                AZURE_API_VERSION.to_string()
            });
            up.provider = "azure";
            up.url = format!(
                "{}/openai/deployments/{rest}?api-version={version}",
                value(base).trim_end_matches('/')
            );
            // Azure takes the deployment from the URL: the model named is the one priced.
            let priced = base_model
                .map(|b| b.strip_prefix("azure/").unwrap_or(b).to_string())
                .unwrap_or(rest.clone());
            return Some((up, format!("azure-{rest}"), Some(priced)));
        }
        if let Some((_, provider, default)) = HOSTED.iter().find(|(p, _, _)| *p == prefix) {
            up.provider = provider;
            up.url = match api_base {
                Some(b) => base_url(provider, b),
                None => default.to_string(),
            };
            if *provider == "openai" && key.is_none() {
                // Tollgate's openai provider needs a credential; a keyless server is generic.
                up.provider = "generic";
            }
            let hint = match api_base {
                None => prefix.clone(),
                Some(b) => format!("{prefix}-{}", host_name(b)),
            };
            return Some((up, hint, routed));
        }
        if let Some((_, default)) = SELF_HOSTED.iter().find(|(p, _)| *p == prefix) {
            let Some(base) = api_base.or(*default) else {
                self.warn(
                    path,
                    &format!("{prefix} needs api_base (the server's URL); left out"),
                );
                return None;
            };
            up.url = base_url("generic", base);
            up.stream_usage = prefix == "hosted_vllm";
            if api_base.is_some_and(is_env) {
                self.warn(
                    path,
                    "api_base comes from the environment: its value must include the version prefix (/v1)",
                );
            }
            return Some((up, format!("{prefix}-{}", host_name(base)), routed));
        }
        self.warn(
            path,
            &format!("provider {prefix} is not served by Tollgate (openai, azure, anthropic, gemini and OpenAI-compatible servers are); deployment left out"),
        );
        None
    }

    /// The name of an upstream equal to `up`, adding it under a name from `hint` if new.
    fn upstream(&mut self, hint: &str, up: Upstream) -> String {
        if let Some((name, _)) = self.upstreams.iter().find(|(_, u)| **u == up) {
            return name.clone();
        }
        let mut name = hint.to_string();
        let mut n = 2;
        while self.upstreams.contains_key(&name) {
            name = format!("{hint}-{n}");
            n += 1;
        }
        self.upstreams.insert(name.clone(), up);
        name
    }
}

/// Whether `prefix` is a LiteLLM provider prefix (rather than part of a model name).
fn is_provider(prefix: &str) -> bool {
    prefix == "azure"
        || HOSTED.iter().any(|(p, _, _)| *p == prefix)
        || SELF_HOSTED.iter().any(|(p, _)| *p == prefix)
        || UNSERVED.contains(&prefix)
}

/// Providers LiteLLM knows that Tollgate does not serve (reported, not guessed at).
const UNSERVED: &[&str] = &[
    "bedrock",
    "bedrock_converse",
    "vertex_ai",
    "vertex_ai_beta",
    "sagemaker",
    "sagemaker_chat",
    "cohere",
    "cohere_chat",
    "replicate",
    "azure_ai",
    "azure_text",
    "watsonx",
    "databricks",
    "cloudflare",
    "predibase",
    "ai21",
    "nlp_cloud",
    "aleph_alpha",
    "petals",
    "palm",
    "triton",
    "clarifai",
    "voyage",
    "dashscope",
    "snowflake",
];

/// A base URL as Tollgate wants it: with its version prefix.
fn base_url(provider: &str, base: &str) -> String {
    let url = value(base).trim_end_matches('/').to_string();
    if is_env(base) {
        return url;
    }
    let path = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.find('/').map_or("", |i| &rest[i..]));
    match provider {
        "anthropic" if !url.ends_with("/v1") => format!("{url}/v1"),
        "anthropic" => url,
        _ if path.is_empty() => format!("{url}/v1"),
        _ => url,
    }
}

/// A short name from a base URL's host and port (`vllm-8000`).
fn host_name(base: &str) -> String {
    if is_env(base) {
        return base["os.environ/".len()..].to_ascii_lowercase();
    }
    let host = base
        .split_once("://")
        .map_or(base, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or_default();
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

mod emit;
mod settings;

#[cfg(test)]
mod tests;
