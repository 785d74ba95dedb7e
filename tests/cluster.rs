//! Several instances sharing their rate and concurrency limits through a real Redis
//! (`redis-server`, started by the test on a unix socket in a temporary directory and
//! stopped by pid), and, where it says so, one real PostgreSQL store: what each instance
//! admitted, and what reached the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::time::{Duration, Instant};
use tollgate::demo::mock::{MockUpstream, Reply};

const KEY: &str = "cluster-key-0000000";

fn config(url: &str, redis: &str, limits: &str, cluster: &str) -> String {
    format!(
        "cluster:\n  redis: \"{redis}\"\n{cluster}keys:\n  - {{name: shared, key: {KEY}, limits: {{{limits}}}}}\nupstreams:\n  u:\n    servers: [{{url: \"{url}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n"
    )
}

/// The same, with every instance's store in one PostgreSQL.
fn config_pg(url: &str, redis: &str, limits: &str, pg: &Postgres) -> String {
    format!(
        "store:\n  url: \"{}\"\n  flush_interval: 200ms\n{}",
        pg.url,
        config(url, redis, limits, "")
    )
}

/// Three instances of one config.
fn three(text: &str) -> [Gateway; 3] {
    [
        Gateway::start(text),
        Gateway::start(text),
        Gateway::start(text),
    ]
}

async fn status(gw: &Gateway, stream: bool) -> u16 {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat("m", stream))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let _ = r.bytes().await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpm_limit_admits_exactly_the_limit_across_three_instances() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let up = MockUpstream::start("u").await.unwrap();
    let text = config_pg(&up.url(), &redis.url, "rpm: 30", &pg);
    let gws = three(&text);
    away_from_a_minute_boundary().await;
    let mut admitted = [0; 3];
    let mut refused = 0;
    for i in 0..90 {
        match status(&gws[i % 3], false).await {
            200 => admitted[i % 3] += 1,
            429 => refused += 1,
            s => panic!("status {s}"),
        }
    }
    assert_eq!(admitted.iter().sum::<usize>(), 30, "{admitted:?}");
    assert_eq!(refused, 60);
    assert_eq!(up.hits(), 30);
    // Each instance admitted its share of the round robin, not 30 on its own.
    assert!(admitted.iter().all(|&n| n == 10), "{admitted:?}");
    // The one database holds the usage of all three.
    let rows = || pg.psql("SELECT COUNT(*) FROM usage WHERE status = 200");
    assert!(
        eventually(Duration::from_secs(5), || rows() == "30").await,
        "{}",
        rows()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_never_above_the_limit_across_instances() {
    let redis = Redis::start();
    let up = MockUpstream::start("u").await.unwrap();
    // Streams that last about a second.
    up.set_default(Reply::Stream {
        events: (0..5)
            .map(|i| format!(r#"{{"choices":[{{"delta":{{"content":"{i}"}}}}]}}"#))
            .collect(),
        gap: Duration::from_millis(200),
        cut: false,
    });
    let pg = Postgres::start();
    let text = config_pg(&up.url(), &redis.url, "concurrency: 2", &pg);
    let gws = three(&text);
    let statuses = futures_util::future::join_all((0..6).map(|i| status(&gws[i % 3], true))).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 4);
    assert_eq!(up.hits(), 2);
    // Every slot is given back when the streams end (in a call made just after the last
    // byte, so wait for it rather than race it).
    assert!(
        eventually(Duration::from_secs(5), || redis.slots_held() == 0).await,
        "slots were never given back: {}",
        redis.slots_held()
    );
    let statuses = futures_util::future::join_all((0..2).map(|i| status(&gws[i], true))).await;
    assert_eq!(statuses, [200, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_local_mode_serves_and_refuse_mode_answers_503_until_it_is_back() {
    let redis = Redis::start();
    let up = MockUpstream::start("u").await.unwrap();
    // Leases off: a lease taken before Redis stopped would serve the next request.
    let local = Gateway::start(&config(
        &up.url(),
        &redis.url,
        "rpm: 1000",
        "  leases: false\n",
    ));
    let strict = Gateway::start(&config(
        &up.url(),
        &redis.url,
        "rpm: 1000",
        "  on_redis_error: refuse\n  leases: false\n",
    ));
    assert_eq!(status(&local, false).await, 200);
    assert_eq!(status(&strict, false).await, 200);
    let dir = redis.stop();
    for gw in [&local, &strict] {
        let started = Instant::now();
        let s = status(gw, false).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(s, if std::ptr::eq(gw, &local) { 200 } else { 503 });
    }
    let r = client()
        .post(strict.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "limits_unavailable");
    let metrics = scrape(&local).await;
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_limits_redis_errors_total "))
        .unwrap();
    assert_ne!(errors, "tollgate_limits_redis_errors_total 0");
    assert!(
        eventually(Duration::from_secs(2), || local
            .logs()
            .contains("limits: Redis unavailable"))
        .await
    );
    // Redis comes back on the same socket: shared counting resumes by itself.
    let _redis = Redis::start_in(dir);
    let back = eventually_async(Duration::from_secs(5), || async {
        status(&strict, false).await == 200
    })
    .await;
    assert!(back, "the refusing instance did not recover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_held_by_an_instance_killed_with_kill_9_come_back_within_slot_ttl() {
    let redis = Redis::start();
    let up = MockUpstream::start("u").await.unwrap();
    up.set_default(Reply::Hang);
    let text = config(&up.url(), &redis.url, "concurrency: 1", "  slot_ttl: 2s\n");
    let doomed = Gateway::start(&text);
    let other = Gateway::start(&text);
    // The doomed instance takes the only slot with a request that never ends.
    let hold = tokio::spawn({
        let url = doomed.url("/v1/chat/completions");
        async move {
            let _ = client()
                .post(url)
                .bearer_auth(KEY)
                .json(&chat("m", false))
                .send()
                .await;
        }
    });
    assert!(eventually(Duration::from_secs(5), || up.hits() == 1).await);
    up.set_default(Reply::Model);
    assert_eq!(status(&other, false).await, 429);
    std::process::Command::new("kill")
        .args(["-KILL", &doomed.pid().to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    let mut back = None;
    while killed.elapsed() < Duration::from_secs(6) {
        if status(&other, false).await == 200 {
            back = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = back.expect("the slot never came back");
    assert!(back <= Duration::from_millis(2600), "{back:?}");
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_answer_seen_by_one_instance_cools_the_target_on_all_and_a_clear_clears_all() {
    let redis = Redis::start();
    let broke = MockUpstream::start("broke").await.unwrap();
    let spare = MockUpstream::start("spare").await.unwrap();
    broke.set_default(Reply::error(
        429,
        r#"{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}"#,
    ));
    let text = format!(
        "cluster:\n  redis: \"{}\"\nupstreams:\n  broke: {{servers: [{{url: \"{}\", name: b}}]}}\n  spare: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: broke, priority: 1}}\n      - {{upstream: spare, priority: 2}}\n",
        redis.url,
        broke.url(),
        spare.url()
    );
    let gws = three(&text);
    let cooling = |gw: &Gateway| {
        let url = gw.admin_url("/admin/cooldowns");
        async move {
            let v: serde_json::Value = client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["cooldowns"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .any(|c| c["target"] == "broke/b" && c["reason"] == "quota")
                })
                .unwrap_or(false)
        }
    };
    // Instance 1 meets the quota answer and fails over.
    let r = client()
        .post(gws[0].url("/v1/chat/completions"))
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!((broke.hits(), spare.hits()), (1, 1));
    // Instances 2 and 3 learn it without asking the broke target themselves.
    for gw in &gws[1..] {
        let learned = eventually_async(Duration::from_secs(2), || cooling(gw)).await;
        assert!(learned, "the cooldown did not reach an instance");
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat("m", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    }
    assert_eq!((broke.hits(), spare.hits()), (1, 3));
    // An instance started later reads the cooldowns still running.
    let late = Gateway::start(&text);
    let learned = eventually_async(Duration::from_secs(3), || cooling(&late)).await;
    assert!(learned, "a new instance did not read the running cooldown");
    // DELETE /admin/cooldowns on instance 3 clears it on instance 1 too.
    let r = client()
        .delete(gws[2].admin_url("/admin/cooldowns"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cleared =
        eventually_async(Duration::from_secs(2), || async { !cooling(&gws[0]).await }).await;
    assert!(cleared, "the clear did not reach instance 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_rejected_before_their_model_is_admitted_still_count_toward_request_rates() {
    let redis = Redis::start();
    let up = MockUpstream::start("u").await.unwrap();
    let text = config(&up.url(), &redis.url, "rpm: 4", "");
    let gws = [Gateway::start(&text), Gateway::start(&text)];
    away_from_a_minute_boundary().await;
    // Four requests for a model that does not exist: refused after their body is read,
    // before the stage that sends both stages' charges to Redis.
    for i in 0..4 {
        let r = client()
            .post(gws[i % 2].url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&chat("no-such-model", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
    }
    // They were counted, in a call nothing waited for: once it has landed, the key's
    // minute is used up on both instances. (Asking before it lands would be admitted.)
    let counted = eventually(Duration::from_secs(3), || minute_count(&redis) == "4").await;
    assert!(counted, "requests for an unknown model were not counted");
    for gw in &gws {
        assert_eq!(status(gw, false).await, 429);
    }
    assert_eq!(up.hits(), 0);
}

/// Redis's count of script calls (`EVALSHA`) so far.
fn script_calls(redis: &Redis) -> u64 {
    redis
        .cli(&["info", "commandstats"])
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("calls=").nth(1)?.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// The key's request count in the current minute, in Redis.
fn minute_count(redis: &Redis) -> String {
    let name = redis.cli(&["--scan", "--pattern", "*:key:*:rpm"]);
    redis.cli(&["hget", name.trim(), "c"]).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_large_limits_leases_spare_most_redis_calls_and_give_back_what_is_unused() {
    let redis = Redis::start();
    let up = MockUpstream::start("u").await.unwrap();
    let text = config(
        &up.url(),
        &redis.url,
        "rpm: 4800, concurrency: 3000",
        "  expected_instances: 3\n",
    );
    let gws = three(&text);
    away_from_a_minute_boundary().await;
    let before = script_calls(&redis);
    for i in 0..300 {
        assert_eq!(status(&gws[i % 3], false).await, 200);
    }
    let calls = script_calls(&redis) - before;
    eprintln!("300 requests, {calls} script calls");
    assert!(calls < 100, "{calls} script calls for 300 requests");
    // Once the leases close, Redis holds what was used, not what was leased.
    let exact = eventually(Duration::from_secs(5), || minute_count(&redis) == "300").await;
    assert!(exact, "the minute's count is {}", minute_count(&redis));
    let released = eventually(Duration::from_secs(5), || redis.slots_held() == 0).await;
    assert!(released, "{} slots still held", redis.slots_held());
    assert_eq!(up.hits(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_never_let_a_limit_be_passed_and_fall_short_by_at_most_a_lease_per_instance() {
    let redis = Redis::start();
    let up = MockUpstream::start("u").await.unwrap();
    // Leases of at most 480 / (16 x 3) = 10 requests.
    let text = config(
        &up.url(),
        &redis.url,
        "rpm: 480",
        "  expected_instances: 3\n",
    );
    let gws = three(&text);
    away_from_a_minute_boundary().await;
    let mut admitted = 0;
    for i in 0..600 {
        match status(&gws[i % 3], false).await {
            200 => admitted += 1,
            429 => {}
            s => panic!("status {s}"),
        }
    }
    eprintln!("rpm 480 over 3 instances with leases: {admitted} admitted");
    assert!((450..=480).contains(&admitted), "{admitted} admitted");
    assert_eq!(up.hits(), admitted);
}
