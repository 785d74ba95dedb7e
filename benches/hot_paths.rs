//! Criterion benchmarks of the per-request hot paths: target selection, limiter checks,
//! the body scan and model rewrite, and SSE usage parsing. Run: `cargo bench --bench hot_paths`.

// Set-up failures should stop a benchmark loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use std::sync::Arc;
use std::time::Duration;
use tollgate::clock::monotonic_ms as now_ms;
use tollgate::config::file::{Balance, Provider, Strategy, UpstreamSection};
use tollgate::limits::{
    key_hash, Admission, Charge, CounterBackend, Dimension, LocalCounters, Scope,
};
use tollgate::provider::inspect::Rules;
use tollgate::relay::pricing::Pricing;
use tollgate::relay::usage::UsageScanner;
use tollgate::route::{Need, Route, Sends, Tier};
use tollgate::upstream::health::Reason;
use tollgate::upstream::{Endpoint, InFlight, Server, Upstream};

fn upstream(balance: Balance, n: usize) -> Upstream {
    let section = UpstreamSection::new(Provider::Generic, balance);
    let servers = (0..n)
        .map(|i| {
            Server::new(
                format!("s{i}"),
                Endpoint::parse(&format!("http://10.0.0.{}:8000/v1", i + 1)).unwrap(),
                None,
                1 + i % 3,
                false,
            )
        })
        .collect();
    Upstream::new("u".into(), &section, servers, Rules::default(), None)
}

fn selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for (name, balance) in [
        ("weighted", Balance::Weighted),
        ("least_conn", Balance::LeastConn),
        ("latency", Balance::Latency),
    ] {
        let u = upstream(balance, 8);
        for (i, s) in u.servers.iter().enumerate() {
            let ms = Duration::from_millis(5 + 7 * i as u64);
            s.state
                .latency
                .observe(ms, now_ms(), Duration::from_secs(10));
        }
        let _busy: Vec<InFlight> = u
            .servers
            .iter()
            .take(3)
            .map(|s| InFlight::new(&s.state))
            .collect();
        g.bench_function(BenchmarkId::new(name, "8 servers"), |b| {
            b.iter(|| black_box(u.pick(|_| true).map(|s| s.weight)))
        });
        let cooling = upstream(balance, 8);
        for s in cooling.servers.iter().take(4) {
            s.state
                .health
                .cool(now_ms(), Duration::from_secs(3600), Reason::Quota);
        }
        g.bench_function(BenchmarkId::new(name, "8 servers, 4 cooling"), |b| {
            b.iter(|| black_box(cooling.pick(|_| true).map(|s| s.weight)))
        });
    }
    g.finish();
}

fn limiter(c: &mut Criterion) {
    let counters: Arc<dyn CounterBackend> = Arc::new(LocalCounters::default());
    let key = key_hash("team-a");
    let charge = |dimension, limit, amount| Charge::new(Scope::Key, key, dimension, limit, amount);
    let mut request = [charge(Dimension::Rpm, u64::MAX / 2, 1)];
    let mut model = [
        charge(Dimension::Concurrency, 1 << 40, 1),
        charge(Dimension::Tpm, u64::MAX / 2, 300),
    ];
    // The in-process backend never waits: each stage's future is ready at once.
    c.bench_function("limits/request+slot+tokens+settle", |b| {
        b.iter(|| {
            let mut adm = Admission::new(Arc::clone(&counters));
            adm.admit(&mut request).now_or_never().unwrap().unwrap();
            adm.admit(&mut model).now_or_never().unwrap().unwrap();
            adm.settle_tokens(280);
            black_box(counters.room(Scope::Key, key, Dimension::Tpm, u64::MAX / 2))
        })
    });
}

fn chat_body(size: usize) -> Bytes {
    let filler = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    let body = serde_json::json!({
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": &filler[..size.saturating_sub(150)]}],
        "temperature": 0.2, "model": "gpt-4o", "stream": true, "max_tokens": 256
    });
    Bytes::from(body.to_string())
}

fn body_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("body");
    for (label, size) in [("1KB", 1024), ("1MB", 1 << 20)] {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("scan", label), |b| {
            b.iter(|| black_box(tollgate::body::scan(&body, "/chat/completions").unwrap()))
        });
        let facts = tollgate::body::scan(&body, "/chat/completions").unwrap();
        g.bench_function(BenchmarkId::new("rewrite_model", label), |b| {
            b.iter(|| {
                black_box(tollgate::body::rewrite_model(
                    &body,
                    &facts,
                    "llama-3-70b-instruct",
                ))
            })
        });
    }
    g.finish();
}

fn sse_usage(c: &mut Criterion) {
    let events = tollgate::demo::mock::chat_events("gpt-4o", &"token ".repeat(200), true);
    let chunks: Vec<Bytes> = events.into_iter().map(Bytes::from).collect();
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut g = c.benchmark_group("usage");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("sse stream of 200 chunks", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(true);
            for c in &chunks {
                s.feed(c);
            }
            black_box(s.finish())
        })
    });
    let json = Bytes::from(
        r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#,
    );
    g.bench_function("json body", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(false);
            s.feed(&json);
            black_box(s.finish())
        })
    });
    g.finish();
}

/// Each route strategy ordering a tier of 8 routes (one server each) for one request.
fn strategies(c: &mut Criterion) {
    let mut g = c.benchmark_group("strategy");
    let pricing = Pricing::new(Default::default(), true);
    let models = [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-5",
        "gpt-5-mini",
        "o3",
        "o4-mini",
    ];
    for (name, strategy) in [
        ("round_robin", Strategy::RoundRobin),
        ("weighted", Strategy::Weighted),
        ("latency", Strategy::Latency),
        ("cost", Strategy::Cost),
    ] {
        let routes = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let u = upstream(Balance::Weighted, 1);
                let ms = Duration::from_millis(5 + 7 * i as u64);
                u.servers[0]
                    .state
                    .latency
                    .observe(ms, now_ms(), Duration::from_secs(10));
                Route {
                    upstream: Arc::new(u),
                    model: Some(Arc::from(*m)),
                    weight: 1 + i as u32 % 3,
                    max_context: None,
                    sends: Sends::Client,
                }
            })
            .collect();
        let tier = Tier::new(1, routes, strategy);
        let need = Need {
            client_model: "m",
            alias: "m",
            input_tokens: 300,
            output_tokens: 256,
            pricing: &pricing,
        };
        g.bench_function(BenchmarkId::new(name, "8 routes"), |b| {
            b.iter(|| black_box(tier.route_order(&need)[0].route))
        });
    }
    g.finish();
}

criterion_group!(benches, selection, strategies, limiter, body_scan, sse_usage);
criterion_main!(benches);
