//! Prometheus metrics, in the default registry of prometheus 0.14 (served on the admin
//! listener at `/metrics`). Names follow Prometheus conventions: `tollgate_` prefix, base
//! units, `_total` counters, HELP on every metric. Labels are bounded: configured aliases
//! (anything else is `other`), upstream and server names from the config, status codes
//! and fixed reason sets; never a key, a user or a raw client-supplied string.

use prometheus::{
    register_counter_vec, register_gauge_vec, register_histogram, register_histogram_vec,
    register_int_counter, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
    CounterVec, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec,
};
use std::sync::LazyLock;

/// Latency buckets (seconds) from the OpenTelemetry GenAI conventions, extended for long generations.
const LATENCY: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    30.0, 60.0, 120.0, 300.0,
];
/// Time per output token buckets (seconds), from the OpenTelemetry GenAI conventions.
const TOKEN_TIME: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// Buckets for the gateway's own time, far below upstream latencies.
const OVERHEAD: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Every metric of the gateway.
pub struct Metrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttft: HistogramVec,
    pub overhead: Histogram,
    pub tokens: IntCounterVec,
    pub usage_unreported: IntCounterVec,
    pub cost: CounterVec,
    pub attempts: IntCounterVec,
    pub failovers: IntCounterVec,
    pub upstream_up: IntGaugeVec,
    pub upstream_in_flight: IntGaugeVec,
    pub upstream_cooldown: GaugeVec,
    pub upstream_latency: GaugeVec,
    pub route_skips: IntCounterVec,
    pub translations: IntCounterVec,
    pub cache_lookups: IntCounterVec,
    pub limits_redis_errors: IntCounter,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub cache_evictions: IntCounter,
    pub cache_saved_tokens: IntCounter,
    pub cache_saved_usd: prometheus::Counter,
    pub ratelimited: IntCounterVec,
    pub stream_aborts: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub client_connections: IntGauge,
    pub client_connections_refused: IntCounterVec,
    pub client_timeouts: IntCounterVec,
    pub sse_filter_bypassed: IntCounter,
    pub store_queue: IntGauge,
    pub usage_rows: IntCounterVec,
    pub store_flush: Histogram,
    pub budget_refusals: IntCounterVec,
    pub unpriced: IntCounter,
    pub alerts: IntCounterVec,
    pub trace_spans: IntCounterVec,
    pub time_per_output_token: HistogramVec,
}

fn build() -> prometheus::Result<Metrics> {
    let m = Metrics {
        requests: register_int_counter_vec!("tollgate_requests_total", "Client requests answered, by model alias, upstream and status code.", &["model", "upstream", "code"])?,
        duration: register_histogram_vec!("tollgate_request_duration_seconds", "Time from the request header to the end of the response.", &["model", "upstream"], LATENCY.to_vec())?,
        ttft: register_histogram_vec!(
            "tollgate_time_to_first_token_seconds",
            "Time from the request header to the first response body byte sent to the client.",
            &["model", "upstream"],
            LATENCY.to_vec()
        )?,
        overhead: register_histogram!(
            "tollgate_overhead_seconds",
            "Time spent in the gateway itself: the request's duration minus waiting for the client's body and for upstreams.",
            OVERHEAD.to_vec()
        )?,
        tokens: register_int_counter_vec!("tollgate_tokens_total", "Tokens reported by upstreams, by type (input, output, cached_input, cache_write, reasoning).", &["model", "upstream", "type"])?,
        usage_unreported: register_int_counter_vec!(
            "tollgate_usage_unreported_total",
            "Responses without token usage, by reason (stream_cut: the stream ended early; not_reported: the upstream sent none).",
            &["model", "reason"]
        )?,
        cost: register_counter_vec!("tollgate_cost_usd_total", "What requests were charged in US dollars: the figure of usage rows and budgets.", &["model", "upstream"])?,
        attempts: register_int_counter_vec!("tollgate_upstream_attempts_total", "Upstream attempts by outcome.", &["upstream", "server", "outcome"])?,
        failovers: register_int_counter_vec!(
            "tollgate_failovers_total",
            "Moves to another target after a failed attempt, by reason and level (tier: within the alias; alias: to a fallback alias).",
            &["model", "reason", "level"]
        )?,
        upstream_up: register_int_gauge_vec!("tollgate_upstream_up", "1 when the server can take traffic (resolved, healthy, not cooling down).", &["upstream", "server"])?,
        upstream_in_flight: register_int_gauge_vec!("tollgate_upstream_in_flight", "Requests in flight on the server, streams included.", &["upstream", "server"])?,
        upstream_cooldown: register_gauge_vec!("tollgate_upstream_cooldown_seconds", "Seconds left in the server's cooldown (0 when not cooling).", &["upstream", "server"])?,
        upstream_latency: register_gauge_vec!(
            "tollgate_upstream_latency_estimate_seconds",
            "The server's time-to-first-byte estimate (peak-sensitive moving average, decayed while idle); absent before its first answer.",
            &["upstream", "server"]
        )?,
        route_skips: register_int_counter_vec!(
            "tollgate_route_skips_total",
            "Requests for which targets were passed over before any attempt, by reason (context: the route's context window is too small; quota: the provider's rate-limit headers say it has no room until its reset).",
            &["reason"]
        )?,
        translations: register_int_counter_vec!(
            "tollgate_translations_total",
            "Requests answered by an upstream of another format than the client's, by direction (openai->anthropic, anthropic->openai, openai->gemini).",
            &["direction"]
        )?,
        limits_redis_errors: register_int_counter!("tollgate_limits_redis_errors_total", "Limit checks that could not reach the shared counters (Redis) and fell back to cluster.on_redis_error.")?,
        cache_lookups: register_int_counter_vec!(
            "tollgate_cache_lookups_total",
            "Requests of cached aliases by cache result (hit, miss, bypass).",
            &["result"]
        )?,
        cache_entries: register_int_gauge!("tollgate_cache_entries", "Answers held by the in-memory cache.")?,
        cache_bytes: register_int_gauge!("tollgate_cache_bytes", "Bytes of answers held by the in-memory cache (bounded by cache.max_size).")?,
        cache_evictions: register_int_counter!("tollgate_cache_evictions_total", "Answers the in-memory cache dropped to stay within cache.max_size.")?,
        cache_saved_tokens: register_int_counter!("tollgate_cache_saved_tokens_total", "Tokens (input and output) that cache hits did not spend.")?,
        cache_saved_usd: prometheus::register_counter!("tollgate_cache_saved_usd_total", "US dollars that cache hits did not spend, from the pricing table.")?,
        ratelimited: register_int_counter_vec!("tollgate_ratelimited_total", "Requests refused by a rate or concurrency limit, by scope.", &["scope"])?,
        stream_aborts: register_int_counter_vec!("tollgate_stream_aborts_total", "Responses cut after they began, by reason.", &["reason"])?,
        config_reloads: register_int_counter_vec!("tollgate_config_reloads_total", "Configuration reloads by result.", &["result"])?,
        build_info: register_int_gauge_vec!("tollgate_build_info", "Build information; always 1.", &["version"])?,
        client_connections: register_int_gauge!("tollgate_client_connections", "Client connections open now, all listeners together.")?,
        client_connections_refused: register_int_counter_vec!(
            "tollgate_client_connections_refused_total",
            "Client connections closed on arrival, by reason (max_connections, max_connections_per_ip).",
            &["reason"]
        )?,
        client_timeouts: register_int_counter_vec!(
            "tollgate_client_timeouts_total",
            "Client connections closed because the client was too slow, by phase (header: header_timeout; body: body_timeout).",
            &["phase"]
        )?,
        sse_filter_bypassed: register_int_counter!(
            "tollgate_sse_filter_bypassed_total",
            "Streams whose usage-chunk filter met an event over its size cap and passed the rest through unfiltered."
        )?,
        store_queue: register_int_gauge!("tollgate_store_queue_rows", "Usage rows waiting to be written to the store.")?,
        usage_rows: register_int_counter_vec!("tollgate_usage_rows_total", "Usage rows by fate: written to the store, or dropped because the queue was full.", &["result"])?,
        store_flush: register_histogram!("tollgate_store_flush_duration_seconds", "Time to write one batch of usage rows.", LATENCY.to_vec())?,
        budget_refusals: register_int_counter_vec!("tollgate_budget_refusals_total", "Requests refused because a budget had no room, by scope (key or team).", &["scope"])?,
        unpriced: register_int_counter!("tollgate_unpriced_requests_total", "Answers from a model with no price, counted as zero cost (budgets.unpriced: allow).")?,
        alerts: register_int_counter_vec!("tollgate_budget_alerts_total", "Budget alerts by result (sent or failed).", &["result"])?,
        trace_spans: register_int_counter_vec!(
            "tollgate_trace_spans_total",
            "Trace spans by fate (exported; dropped: the export queue was full; failed: the collector could not take them).",
            &["result"]
        )?,
        time_per_output_token: register_histogram_vec!(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, of streamed answers (OpenTelemetry GenAI gen_ai.server.time_per_output_token).",
            &["gen_ai_request_model", "gen_ai_provider_name"],
            TOKEN_TIME.to_vec()
        )?,
    };
    m.build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    Ok(m)
}

static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match build() {
    Ok(m) => Some(m),
    Err(e) => {
        log::error!("metrics could not be registered: {e}");
        None
    }
});

/// The gateway's metrics; `None` only if registration failed (logged once).
pub fn get() -> Option<&'static Metrics> {
    METRICS.as_ref()
}

/// Registers every metric now, so a scrape shows them before the first request.
pub fn init() {
    let _ = get();
}
