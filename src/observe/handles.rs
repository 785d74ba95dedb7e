//! The metrics every answered request updates, resolved once per (model, upstream) pair
//! and thread rather than by a label lookup per metric per request (each lookup hashes its
//! labels, takes a lock and clones the metric). Label sets are bounded by the config:
//! aliases (or `other`, `none`) times upstreams; past [`MAX_PAIRS`] the table starts over.

use crate::metrics::Metrics;
use prometheus::{Counter, Histogram, IntCounter};
use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

const MAX_PAIRS: usize = 4096;

/// One pair's metrics, each made on first use (a series appears in `/metrics` only once
/// it has counted something, as with a label lookup).
pub struct Route {
    model: Box<str>,
    upstream: Box<str>,
    ok: OnceCell<IntCounter>,
    duration: OnceCell<Histogram>,
    ttft: OnceCell<Histogram>,
    cost: OnceCell<Counter>,
    input_tokens: OnceCell<IntCounter>,
    output_tokens: OnceCell<IntCounter>,
}

impl Route {
    fn pair(&self) -> [&str; 2] {
        [&self.model, &self.upstream]
    }

    fn with<'a>(&'a self, kind: &'a str) -> [&'a str; 3] {
        [&self.model, &self.upstream, kind]
    }

    /// `tollgate_requests_total` with code 200, the usual one.
    pub fn ok(&self, m: &Metrics) -> &IntCounter {
        self.ok
            .get_or_init(|| m.requests.with_label_values(&self.with("200")))
    }

    pub fn duration(&self, m: &Metrics) -> &Histogram {
        self.duration
            .get_or_init(|| m.duration.with_label_values(&self.pair()))
    }

    pub fn ttft(&self, m: &Metrics) -> &Histogram {
        self.ttft
            .get_or_init(|| m.ttft.with_label_values(&self.pair()))
    }

    pub fn cost(&self, m: &Metrics) -> &Counter {
        self.cost
            .get_or_init(|| m.cost.with_label_values(&self.pair()))
    }

    pub fn input_tokens(&self, m: &Metrics) -> &IntCounter {
        self.input_tokens
            .get_or_init(|| m.tokens.with_label_values(&self.with("input")))
    }

    pub fn output_tokens(&self, m: &Metrics) -> &IntCounter {
        self.output_tokens
            .get_or_init(|| m.tokens.with_label_values(&self.with("output")))
    }
}

/// Pairs made so far, and each model's upstreams.
type Fast = foldhash::fast::RandomState;
type Table = (
    usize,
    HashMap<Box<str>, HashMap<Box<str>, Rc<Route>, Fast>, Fast>,
);

thread_local! {
    static ROUTES: RefCell<Table> = RefCell::new((0, HashMap::default()));
}

/// The metrics of `model` (its label) served by `upstream`.
pub fn route(model: &str, upstream: &str) -> Rc<Route> {
    ROUTES.with_borrow_mut(|(pairs, by_model)| {
        if let Some(r) = by_model.get(model).and_then(|u| u.get(upstream)) {
            return Rc::clone(r);
        }
        if *pairs >= MAX_PAIRS {
            by_model.clear();
            *pairs = 0;
        }
        let r = Rc::new(Route {
            model: model.into(),
            upstream: upstream.into(),
            ok: OnceCell::new(),
            duration: OnceCell::new(),
            ttft: OnceCell::new(),
            cost: OnceCell::new(),
            input_tokens: OnceCell::new(),
            output_tokens: OnceCell::new(),
        });
        *pairs += 1;
        by_model
            .entry(model.into())
            .or_default()
            .insert(upstream.into(), Rc::clone(&r));
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair's metrics are the registry's own series, made only once used.
    #[test]
    fn a_pair_counts_into_the_registry_and_makes_only_the_series_it_uses() {
        let m = crate::metrics::get().unwrap();
        let r = route("handles-test", "u");
        r.ok(m).inc();
        r.input_tokens(m).inc_by(7);
        assert!(Rc::ptr_eq(&r, &route("handles-test", "u")));
        let requests = m.requests.with_label_values(&["handles-test", "u", "200"]);
        assert_eq!(requests.get(), 1);
        let input = m.tokens.with_label_values(&["handles-test", "u", "input"]);
        assert_eq!(input.get(), 7);
        let families = prometheus::gather();
        let series = |name: &str| {
            families
                .iter()
                .filter(|f| f.name() == name)
                .flat_map(|f| f.get_metric())
                .filter(|s| s.get_label().iter().any(|l| l.value() == "handles-test"))
                .count()
        };
        assert_eq!(series("tollgate_requests_total"), 1);
        assert_eq!(series("tollgate_tokens_total"), 1);
        assert_eq!(series("tollgate_cost_usd_total"), 0);
        assert_eq!(series("tollgate_request_duration_seconds"), 0);
    }
}
