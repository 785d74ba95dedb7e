//! The Tollgate config written from what [`Translator`] read: sections in the order the
//! reference documents them.

use super::{map, seconds, Route, Translator};
use serde_yaml::{Mapping, Value};

/// How one alias's routes share a tier: its strategy, and each route's weight under it.
struct Sharing {
    strategy: &'static str,
    weights: Option<Vec<u64>>,
}

impl Translator {
    pub(super) fn emit(&mut self) -> String {
        let mut root = Mapping::new();
        let mut put = |k: &str, v: Value| {
            root.insert(Value::String(k.into()), v);
        };
        // LiteLLM's proxy listens on port 4000: clients keep their address.
        put(
            "server",
            map(vec![(
                "listen",
                Value::Sequence(vec!["0.0.0.0:4000".into()]),
            )]),
        );
        if let Some(k) = &self.master_key {
            put("admin", map(vec![("master_key", k.clone().into())]));
        }
        if let Some(u) = &self.store_url {
            put("store", map(vec![("url", u.clone().into())]));
        }
        if let Some(r) = &self.redis {
            put("cluster", map(vec![("redis", r.clone().into())]));
        }
        if let Some(n) = self.concurrency {
            put(
                "limits",
                map(vec![("global", map(vec![("concurrency", n.into())]))]),
            );
        }
        let mut failover = Vec::new();
        if let Some(n) = self.max_attempts {
            failover.push(("max_attempts", n.into()));
        }
        if let Some(c) = self.cooldown {
            failover.push(("cooldown", seconds(c).into()));
        }
        if !failover.is_empty() {
            put("failover", map(failover));
        }
        if self.json_logs {
            put("log", map(vec![("format", "json".into())]));
        }
        if let Some((backend, _)) = &self.cache {
            put("cache", map(vec![("backend", backend.clone().into())]));
        }
        let upstreams = self.upstreams_section();
        put("upstreams", upstreams);
        let models = self.models_section();
        put("models", models);
        if !self.pricing.is_empty() {
            let pricing = self.pricing_section();
            put("pricing", pricing);
        }
        serde_yaml::to_string(&Value::Mapping(root)).unwrap_or_default()
    }

    fn upstreams_section(&self) -> Value {
        let mut out = Mapping::new();
        for (name, u) in &self.upstreams {
            let mut server = vec![("url", Value::from(u.url.clone()))];
            if let Some(k) = &u.api_key {
                server.push(("api_key", k.clone().into()));
            }
            if let Some(n) = self.allowed_fails {
                server.push(("max_fails", n.into()));
                let window = self.cooldown.unwrap_or(60.0);
                server.push(("fail_timeout", seconds(window).into()));
            }
            let mut up = vec![
                ("provider", Value::from(u.provider)),
                ("servers", Value::Sequence(vec![map(server)])),
            ];
            if let Some(t) = u.first_byte_timeout.as_ref().or(self.timeout.as_ref()) {
                up.push(("first_byte_timeout", t.clone().into()));
            }
            if u.stream_usage {
                up.push(("stream_usage", true.into()));
            }
            out.insert(name.clone().into(), map(up));
        }
        Value::Mapping(out)
    }

    fn models_section(&mut self) -> Value {
        let names: Vec<String> = self.aliases.keys().cloned().collect();
        for alias in self.fallbacks.keys().chain(self.context_fallbacks.keys()) {
            if alias != "*" && !names.contains(alias) {
                self.warnings.push(super::Warning {
                    path: "fallbacks".into(),
                    message: format!(
                        "{alias} is not a model_name of model_list; its fallbacks are left out"
                    ),
                });
            }
        }
        let mut out = Mapping::new();
        let aliases = std::mem::take(&mut self.aliases);
        for (alias, routes) in &aliases {
            let sharing = self.sharing(routes);
            let mut m = Vec::new();
            let list = routes
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut route = vec![("upstream", Value::from(r.upstream.clone()))];
                    if let Some(model) = &r.model {
                        route.push(("model", model.clone().into()));
                    }
                    if r.priority != 1 {
                        route.push(("priority", r.priority.into()));
                    }
                    if let Some(w) = sharing.weights.as_ref().map(|w| w[i]) {
                        route.push(("weight", w.into()));
                    }
                    if let Some(c) = r.max_context {
                        route.push(("max_context", c.into()));
                    }
                    map(route)
                })
                .collect();
            m.push(("routes", Value::Sequence(list)));
            if sharing.strategy != "round_robin" {
                m.push(("strategy", sharing.strategy.into()));
            }
            let limits = self.alias_limits(alias, routes);
            if !limits.is_empty() {
                m.push(("limits", map(limits)));
            }
            for (key, context) in [("fallbacks", false), ("context_fallbacks", true)] {
                let to = self.fallbacks_of(alias, context, &names);
                if !to.is_empty() {
                    m.push((
                        key,
                        Value::Sequence(to.into_iter().map(Value::from).collect()),
                    ));
                }
            }
            if let Some((_, ttl)) = &self.cache {
                m.push(("cache", map(vec![("ttl", ttl.clone().into())])));
            }
            out.insert(alias.clone().into(), map(m));
        }
        for (path, name, target) in std::mem::take(&mut self.group_aliases) {
            match out.get(target.as_str()).cloned() {
                Some(copy) if !out.contains_key(name.as_str()) => {
                    out.insert(name.into(), copy);
                }
                Some(_) => self.warnings.push(super::Warning {
                    path,
                    message: format!("{name} is already a model_name; left as it is"),
                }),
                None => self.warnings.push(super::Warning {
                    path,
                    message: format!("{target} is not a model_name of model_list; {name} left out"),
                }),
            }
        }
        self.aliases = aliases;
        Value::Mapping(out)
    }

    /// The strategy of an alias, from `routing_strategy`, and its routes' weights.
    fn sharing(&mut self, routes: &[Route]) -> Sharing {
        let (path, strategy) = self
            .strategy
            .clone()
            .unwrap_or_else(|| (String::new(), "simple-shuffle".into()));
        let (strategy, note) = match strategy.as_str() {
            "simple-shuffle" => ("weighted", None),
            "usage-based-routing" | "usage-based-routing-v2" => ("weighted", Some("routes are weighted by their rpm (or tpm); Tollgate does not route by each deployment's usage so far")),
            "latency-based-routing" => ("latency", None),
            "cost-based-routing" => ("cost", None),
            "least-busy" => ("round_robin", Some("between routes requests go in turn; in-flight balancing is per upstream (balance: least_conn)")),
            _ => ("round_robin", Some("unknown strategy; round_robin is written")),
        };
        if let Some(note) = note {
            if !self.warnings.iter().any(|w| w.path == path) {
                self.warnings.push(super::Warning {
                    path,
                    message: note.into(),
                });
            }
        }
        if strategy != "weighted" {
            return Sharing {
                strategy,
                weights: None,
            };
        }
        match weights(routes).filter(|_| routes.len() > 1) {
            Some(w) => Sharing {
                strategy,
                weights: Some(w),
            },
            None => Sharing {
                strategy: "round_robin",
                weights: None,
            },
        }
    }

    /// The alias's `rpm` and `tpm`: the sum of its deployments' when every one has one.
    fn alias_limits(&mut self, alias: &str, routes: &[Route]) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        for (name, get) in [
            ("rpm", (|r: &Route| r.rpm) as fn(&Route) -> Option<f64>),
            ("tpm", |r: &Route| r.tpm),
        ] {
            let given: Vec<f64> = routes.iter().filter_map(get).collect();
            if given.is_empty() {
                continue;
            }
            if given.len() < routes.len() {
                self.warnings.push(super::Warning {
                    path: format!("model_list.{alias}.{name}"),
                    message: "only some deployments set it; no limit is written for the alias"
                        .into(),
                });
                continue;
            }
            let sum: f64 = given.iter().sum();
            out.push((name, (sum as u64).into()));
            if routes.len() > 1 {
                self.warnings.push(super::Warning {
                    path: format!("model_list.{alias}.{name}"),
                    message: format!("the deployments' {name} are summed into models.{alias}.limits.{name} (Tollgate limits the alias, not each deployment)"),
                });
            }
        }
        out
    }

    /// The fallbacks of `alias`: its own, else those given for `*`, else the defaults;
    /// only aliases that exist.
    fn fallbacks_of(&mut self, alias: &str, context: bool, names: &[String]) -> Vec<String> {
        let table = if context {
            &self.context_fallbacks
        } else {
            &self.fallbacks
        };
        let wanted = table
            .get(alias)
            .or_else(|| table.get("*"))
            .cloned()
            .unwrap_or_else(|| {
                if context {
                    Vec::new()
                } else {
                    self.default_fallbacks.clone()
                }
            });
        let mut out = Vec::new();
        for to in wanted {
            if to == alias {
                continue;
            }
            if names.contains(&to) {
                out.push(to);
            } else {
                self.warnings.push(super::Warning {
                    path: format!("fallbacks.{alias}"),
                    message: format!("{to} is not a model_name of model_list; left out"),
                });
            }
        }
        out
    }

    fn pricing_section(&mut self) -> Value {
        let mut out = Mapping::new();
        for (model, [input, output, cached, write]) in &self.pricing {
            if input.is_none() || output.is_none() {
                self.warnings.push(super::Warning {
                    path: format!("pricing.{model}"),
                    message: "only one of input_cost_per_token and output_cost_per_token is given; the other is written as 0".into(),
                });
            }
            let mut p = vec![
                ("input", Value::from(input.unwrap_or(0.0))),
                ("output", Value::from(output.unwrap_or(0.0))),
            ];
            if let Some(c) = cached {
                p.push(("cached_input", (*c).into()));
            }
            if let Some(w) = write {
                p.push(("cache_write", (*w).into()));
            }
            out.insert(model.clone().into(), map(p));
        }
        Value::Mapping(out)
    }
}

/// LiteLLM's shuffle weights: `weight` if any deployment sets it, else `rpm`, else
/// `tpm`; scaled into Tollgate's 1 to 1000. None when no deployment sets any.
fn weights(routes: &[Route]) -> Option<Vec<u64>> {
    let sources: [fn(&Route) -> Option<f64>; 3] = [|r| r.weight, |r| r.rpm, |r| r.tpm];
    let source = sources
        .iter()
        .find(|get| routes.iter().any(|r| get(r).is_some()))?;
    let raw: Vec<f64> = routes
        .iter()
        .map(|r| source(r).unwrap_or(1.0).max(0.0))
        .collect();
    let top = raw.iter().copied().fold(0.0, f64::max);
    let scale = if top > 1000.0 { 1000.0 / top } else { 1.0 };
    Some(
        raw.iter()
            .map(|w| ((w * scale).round() as u64).clamp(1, 1000))
            .collect(),
    )
}
