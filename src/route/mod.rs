//! Stage 4, `request_filter`: which targets may serve a model alias, and in which order
//! for this request. An alias has tiers (routes of one priority, lowest first); `*` is the
//! catch-all that passes the client's model through. Within a tier the alias's strategy
//! orders the routes: in turn (`round_robin`), by `weight`, fastest first (`latency`), or
//! cheapest first for the request's estimated tokens (`cost`). Picking a server of a
//! route's upstream is the upstream's balancer's job.

use crate::relay::pricing::{Price, Pricing};
use crate::spec::Strategy;
use crate::upstream::balance::{next_random, p2c_by_scores};
use crate::upstream::{latency, Upstream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One route of an alias: an upstream and the model name it is sent (`None`: the
/// client's own model name, for the `*` alias).
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub model: Option<Arc<str>>,
    /// Share of the tier under `strategy: weighted`.
    pub weight: u32,
    /// The model's context window in tokens, when configured or known from the shipped
    /// table for the model the route sends (for a `*` route without a model, looked up
    /// with the client's model per request).
    pub max_context: Option<u64>,
    pub sends: Sends,
}

/// Which model a route sends, as far as its price and context window go.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sends {
    /// One model whatever the client named (the route's own, else its alias's name):
    /// price and window were resolved when the config was built. The price is the
    /// model's, else its alias's; `None` when neither is priced.
    Fixed { price: Option<Price> },
    /// The client's model (a `*` route without a model): its price and window are
    /// looked up per request.
    Client,
}

impl Route {
    /// The model name sent upstream for a request naming `client_model`.
    pub fn model_for<'a>(&'a self, client_model: &'a str) -> &'a str {
        self.model.as_deref().unwrap_or(client_model)
    }

    /// The price of this route for a request naming `client_model` to `alias`.
    pub fn price(&self, pricing: &Pricing, client_model: &str, alias: &str) -> Option<Price> {
        match self.sends {
            Sends::Fixed { price } => price,
            Sends::Client => pricing.for_route(self.model_for(client_model), alias),
        }
    }

    /// The context window for a request naming `client_model`.
    pub fn context_window(&self, client_model: &str) -> Option<u64> {
        match (self.max_context, self.sends) {
            (Some(w), _) => Some(w),
            // Resolved at build: no window is known.
            (None, Sends::Fixed { .. }) => None,
            (None, Sends::Client) => crate::relay::pricing::shipped_context(client_model),
        }
    }

    /// Whether a request needing `tokens` (input plus output) fits the window.
    pub fn fits(&self, client_model: &str, tokens: u64) -> bool {
        self.context_window(client_model)
            .is_none_or(|w| tokens <= w)
    }
}

/// What the strategies know of one request.
pub struct Need<'a> {
    pub client_model: &'a str,
    pub alias: &'a str,
    /// Estimated prompt tokens (a quarter of the body's bytes).
    pub input_tokens: u64,
    /// `max_tokens`, when the request set it.
    pub output_tokens: u64,
    pub pricing: &'a Pricing,
}

impl Need<'_> {
    /// Input plus output: what must fit a context window.
    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// The routes of one priority, and how a request orders them.
pub struct Tier {
    pub priority: u32,
    pub routes: Vec<Route>,
    pub strategy: Strategy,
    rotor: AtomicUsize,
    seed: AtomicU64,
}

/// A route's place in a request's order, and why (for the explain endpoint).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placed {
    pub route: usize,
    /// The strategy's score: estimated micro-USD under `cost`, the latency score (µs x
    /// (1 + in flight)) under `latency`, the weight under `weighted`; `None` otherwise.
    pub score: Option<f64>,
}

impl Tier {
    pub fn new(priority: u32, routes: Vec<Route>, strategy: Strategy) -> Self {
        Tier {
            priority,
            routes,
            strategy,
            rotor: AtomicUsize::new(0),
            seed: AtomicU64::new(0x2545_f491_4f6c_dd1d),
        }
    }

    /// The order in which this request visits the tier's routes.
    pub fn route_order(&self, need: &Need) -> Vec<Placed> {
        let n = self.routes.len();
        if n <= 1 {
            return (0..n).map(|route| Placed { route, score: None }).collect();
        }
        let start = self.rotor.fetch_add(1, Ordering::Relaxed);
        self.order_from(start, next_random(&self.seed), need)
    }

    /// The order the next request would take, without moving the tier's rotation (the
    /// `latency` strategy's random pair is shown as its best two).
    pub fn next_order(&self, need: &Need) -> Vec<Placed> {
        self.order_from(self.rotor.load(Ordering::Relaxed), 0, need)
    }

    fn order_from(&self, start: usize, random: u64, need: &Need) -> Vec<Placed> {
        let n = self.routes.len();
        let rotated = (0..n).map(move |i| (start + i) % n.max(1));
        let unscored = |route| Placed { route, score: None };
        match self.strategy {
            Strategy::RoundRobin => rotated.map(unscored).collect(),
            Strategy::Weighted => {
                let total: u64 = self.routes.iter().map(|r| u64::from(r.weight)).sum();
                let mut slot = (start as u64) % total.max(1);
                let mut first = 0;
                for (i, r) in self.routes.iter().enumerate() {
                    if slot < u64::from(r.weight) {
                        first = i;
                        break;
                    }
                    slot -= u64::from(r.weight);
                }
                (0..n)
                    .map(|k| (first + k) % n)
                    .map(|route| Placed {
                        route,
                        score: Some(f64::from(self.routes[route].weight)),
                    })
                    .collect()
            }
            Strategy::Cost => {
                let cost = |r: &Route| {
                    r.price(need.pricing, need.client_model, need.alias)
                        .map(|p| p.most(need.input_tokens, need.output_tokens) as f64)
                };
                let mut order: Vec<Placed> = rotated
                    .map(|route| Placed {
                        route,
                        score: cost(&self.routes[route]),
                    })
                    .collect();
                // Stable: equal prices keep the rotated order, so they share the load.
                // Unpriced routes go last.
                order.sort_by(|a, b| {
                    let key = |p: &Placed| p.score.unwrap_or(f64::INFINITY);
                    key(a).total_cmp(&key(b))
                });
                order
            }
            Strategy::Latency => {
                let scores = self.latency_scores();
                let picked = if random == 0 {
                    let mut by_score: Vec<usize> = (0..n).collect();
                    by_score.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
                    by_score
                } else {
                    p2c_by_scores(&scores, random)
                };
                picked
                    .into_iter()
                    .map(|route| Placed {
                        route,
                        score: Some(scores[route]),
                    })
                    .collect()
            }
        }
    }

    /// Each route's latency score: the best of its upstream's servers that can take a
    /// request now (servers without a sample count as the best known of the tier).
    fn latency_scores(&self) -> Vec<f64> {
        let now = crate::clock::monotonic_ms();
        let estimate = |r: &Route, s: &crate::upstream::Server| {
            s.state.latency.estimate(now, r.upstream.latency_decay)
        };
        let best_known: Duration = self
            .routes
            .iter()
            .flat_map(|r| r.upstream.servers.iter().map(move |s| estimate(r, s)))
            .flatten()
            .min()
            .unwrap_or_default();
        self.routes
            .iter()
            .map(|r| {
                r.upstream
                    .servers
                    .iter()
                    .filter(|s| s.usable(now))
                    .map(|s| latency::score(estimate(r, s), best_known, s.state.in_flight()))
                    .min_by(f64::total_cmp)
                    .unwrap_or(f64::INFINITY)
            })
            .collect()
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
    /// How long answers are cached (`models.ALIAS.cache.ttl`); `None`: not cached.
    pub cache_ttl: Option<Duration>,
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
    /// Looked up once a request: hashed with foldhash (seeded per process), which costs
    /// a fraction of SipHash for the same protection against chosen names.
    aliases: HashMap<String, Arc<Alias>, foldhash::fast::RandomState>,
    catch_all: Option<Arc<Alias>>,
}

impl Router {
    pub fn new(aliases: HashMap<String, Arc<Alias>>, catch_all: Option<Arc<Alias>>) -> Self {
        Router {
            aliases: aliases.into_iter().collect(),
            catch_all,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::{Balance, Provider, UpstreamSection};
    use crate::upstream::{Endpoint, Server};

    fn route(model: &str, weight: u32) -> Route {
        let section = UpstreamSection::new(Provider::Generic, Balance::Weighted);
        let server = Server::new(
            format!("{model}/s"),
            Endpoint::parse("http://127.0.0.1:9/v1").unwrap(),
            None,
            1,
            false,
        );
        let upstream = Upstream::new(
            model.into(),
            &section,
            vec![server],
            Default::default(),
            None,
        );
        Route {
            upstream: Arc::new(upstream),
            model: Some(Arc::from(model)),
            weight,
            max_context: None,
            sends: Sends::Client,
        }
    }

    fn firsts(tier: &Tier, need: &Need, n: usize) -> Vec<usize> {
        (0..n).map(|_| tier.route_order(need)[0].route).collect()
    }

    fn need(pricing: &Pricing) -> Need<'_> {
        Need {
            client_model: "m",
            alias: "m",
            input_tokens: 1000,
            output_tokens: 100,
            pricing,
        }
    }

    #[test]
    fn weighted_takes_each_route_first_in_proportion() {
        let pricing = Pricing::new(HashMap::new(), true);
        let tier = Tier::new(1, vec![route("a", 3), route("b", 1)], Strategy::Weighted);
        assert_eq!(firsts(&tier, &need(&pricing), 8), [0, 0, 0, 1, 0, 0, 0, 1]);
        // Every order still holds every route.
        let order: Vec<usize> = tier
            .route_order(&need(&pricing))
            .iter()
            .map(|p| p.route)
            .collect();
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn cost_puts_the_cheapest_first_and_shares_equal_prices() {
        let pricing = Pricing::new(HashMap::new(), true);
        let tier = Tier::new(
            1,
            vec![
                route("gpt-4o", 1),
                route("gpt-4o-mini", 1),
                route("local", 1),
                route("gpt-4o-mini-2024-07-18", 1),
            ],
            Strategy::Cost,
        );
        let n = need(&pricing);
        for _ in 0..4 {
            let order: Vec<usize> = tier.route_order(&n).iter().map(|p| p.route).collect();
            // The two mini deployments share the first place; gpt-4o next; unpriced last.
            assert!(matches!(order[0], 1 | 3), "{order:?}");
            assert_eq!(&order[2..], [0, 2]);
        }
        let mut seen = firsts(&tier, &n, 4);
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, [1, 3]);
    }

    #[test]
    fn latency_prefers_the_faster_route_and_next_order_does_not_rotate() {
        let pricing = Pricing::new(HashMap::new(), true);
        let tier = Tier::new(
            1,
            vec![route("slow", 1), route("fast", 1)],
            Strategy::Latency,
        );
        let now = crate::clock::monotonic_ms();
        let decay = crate::upstream::latency::DECAY;
        let sample = |r: usize, ms| {
            tier.routes[r].upstream.servers[0].state.latency.observe(
                Duration::from_millis(ms),
                now,
                decay,
            )
        };
        sample(0, 80);
        sample(1, 5);
        let n = need(&pricing);
        assert_eq!(firsts(&tier, &n, 5), [1, 1, 1, 1, 1]);
        assert_eq!(tier.next_order(&n)[0].route, 1);
        let rr = Tier::new(1, vec![route("a", 1), route("b", 1)], Strategy::RoundRobin);
        assert_eq!(rr.next_order(&n)[0].route, rr.next_order(&n)[0].route);
        assert_eq!(firsts(&rr, &n, 4), [0, 1, 0, 1]);
    }

    #[test]
    fn a_route_fits_by_its_window_or_the_shipped_one_for_the_catch_all() {
        let mut r = route("x", 1);
        r.max_context = Some(32_000);
        assert!(r.fits("m", 32_000));
        assert!(!r.fits("m", 32_001));
        r.max_context = None;
        assert!(r.fits("m", u64::MAX), "unknown windows never skip");
        r.model = None;
        assert!(!r.fits("gpt-4o", 200_000));
        assert!(r.fits("gpt-4.1", 200_000));
        // Resolved at build (a named alias's route): no window known, nothing looked up.
        r.sends = Sends::Fixed { price: None };
        assert!(r.fits("gpt-4o", 200_000));
    }
}
