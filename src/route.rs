//! Stage 4, `request_filter`: which targets may serve a model alias. An alias has tiers
//! (routes of one priority, lowest first); `*` is the catch-all that passes the client's
//! model through. This stage only names candidates; picking a server is `select`'s job.

use crate::upstream::Upstream;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One route of an alias: an upstream and the model name it is sent (`None`: the
/// client's own model name, for the `*` alias).
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub model: Option<Arc<str>>,
}

/// The routes of one priority. They are taken in turn, starting one further on each
/// request, so equal-priority routes share the load.
pub struct Tier {
    pub priority: u32,
    pub routes: Vec<Route>,
    rotor: AtomicUsize,
}

impl Tier {
    pub fn new(priority: u32, routes: Vec<Route>) -> Self {
        Tier {
            priority,
            routes,
            rotor: AtomicUsize::new(0),
        }
    }

    /// The order in which this request visits the tier's routes.
    pub fn route_order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.routes.len();
        let start = if n > 1 {
            self.rotor.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        (0..n).map(move |i| (start + i) % n.max(1))
    }
}

pub struct Alias {
    pub name: String,
    pub tiers: Vec<Tier>,
    /// Aliases tried in order after every tier of this one (L2 failover).
    pub fallbacks: Vec<String>,
    /// Aliases tried when an upstream says the prompt exceeds the context length.
    pub context_fallbacks: Vec<String>,
    pub limits: crate::limits::Limits,
}

impl Alias {
    /// True when at least one server of any tier can take a request now.
    pub fn has_usable_target(&self) -> bool {
        let now = crate::clock::monotonic_ms();
        self.tiers.iter().any(|t| {
            t.routes
                .iter()
                .any(|r| r.upstream.servers.iter().any(|s| s.usable(now)))
        })
    }
}

/// Alias lookup.
pub struct Router {
    aliases: HashMap<String, Arc<Alias>>,
    catch_all: Option<Arc<Alias>>,
}

impl Router {
    pub fn new(aliases: HashMap<String, Arc<Alias>>, catch_all: Option<Arc<Alias>>) -> Self {
        Router { aliases, catch_all }
    }

    /// The alias for a client's model, falling back to `*`. `None`: 404 model_not_found.
    pub fn resolve(&self, model: &str) -> Option<&Arc<Alias>> {
        self.aliases.get(model).or(self.catch_all.as_ref())
    }

    /// Configured aliases (not `*`), sorted by name, for `/v1/models`.
    pub fn alias_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.aliases.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Alias>> {
        self.aliases.values().chain(self.catch_all.iter())
    }

    /// Whether a `*` alias passes unknown models through.
    pub fn has_catch_all(&self) -> bool {
        self.catch_all.is_some()
    }

    pub fn is_configured(&self, model: &str) -> bool {
        self.aliases.contains_key(model)
    }
}
