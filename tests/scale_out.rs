//! Several instances sharing one PostgreSQL store (and one Redis): keys made or changed
//! through any instance apply on all within a second, usage from all lands in one
//! database, and budgets are not overspent across instances. The servers are real
//! (`postgres` and `redis-server`, started by the tests in temporary directories on unix
//! sockets, as an unprivileged user for PostgreSQL, and stopped by pid).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tollgate::demo::mock::MockUpstream;

const MASTER: &str = "scale-out-master-key";
/// A config key, so that a key an instance does not know yet is refused (a gateway with no
/// key at all is open to anyone).
const CONFIG_KEY: &str = "scale-out-config-key-0";

fn config(store: &str, redis: Option<&str>, upstream: &str) -> String {
    let cluster = redis.map_or_else(String::new, |r| format!("cluster:\n  redis: \"{r}\"\n"));
    format!(
        "store:\n  url: \"{store}\"\n  flush_interval: 200ms\n  refresh_interval: 1s\n{cluster}admin:\n  master_key: {MASTER}\nkeys:\n  - {{name: operator, key: {CONFIG_KEY}}}\nupstreams:\n  u:\n    servers: [{{url: \"{upstream}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u, model: gpt-4o-mini}}]\n"
    )
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client().request(m, gw.admin_url(path)).bearer_auth(MASTER);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let _ = r.bytes().await;
    s
}

/// How long until `gw` answers `key` with `want` (polling every 20 ms, for up to 3 s).
async fn until_status(gw: &Gateway, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        if status(gw, key).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still not {want} after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_or_blocked_on_one_instance_applies_on_all_within_a_second() {
    let pg = Postgres::start();
    let up = MockUpstream::start("u").await.unwrap();
    let text = config(&pg.url, None, &up.url());
    let gws = [
        Gateway::start(&text),
        Gateway::start(&text),
        Gateway::start(&text),
    ];
    // All three migrated the one database (one after the other) and agree on it.
    // (5 and 6, the latest migrations, drop the usage rows' indexes by team and by key.)
    assert_eq!(pg.psql("SELECT MAX(version) FROM tollgate_schema"), "6");
    assert_eq!(
        pg.psql("SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'usage'"),
        "usage_ts"
    );
    // Closed to keys it does not know (the config key closes it).
    assert_eq!(status(&gws[1], "tg-not-a-key").await, 401);

    let (s, v) = admin(
        &gws[0],
        "POST",
        "/admin/keys",
        Some(json!({"name": "shared"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (id, key) = (v["id"].as_str().unwrap(), v["key"].as_str().unwrap());
    for gw in &gws[1..] {
        let took = until_status(gw, key, 200).await;
        eprintln!("a new key applied after {took:?}");
        assert!(took < Duration::from_secs(1), "a new key took {took:?}");
    }

    let path = format!("/admin/keys/{id}");
    let (s, v) = admin(&gws[2], "PATCH", &path, Some(json!({"blocked": true}))).await;
    assert_eq!(s, 200, "{v}");
    for gw in &gws[..2] {
        let took = until_status(gw, key, 401).await;
        eprintln!("a block applied after {took:?}");
        assert!(took < Duration::from_secs(1), "a block took {took:?}");
    }
    // Instance 1's view of the key says blocked too.
    let (_, shown) = admin(&gws[0], "GET", &path, None).await;
    assert_eq!(shown["blocked"], json!(true), "{shown}");

    // Usage from every instance lands in the one database, and any instance reports it.
    // Answered: the first 200 of instances 2 and 3, and any poll of instances 1 and 2 that
    // came before the block reached them.
    let served = up.hits();
    assert!((2..=4).contains(&served), "{served}");
    let rows = || pg.psql("SELECT COUNT(*) FROM usage WHERE status = 200");
    assert!(
        eventually(Duration::from_secs(5), || rows() == served.to_string()).await,
        "usage rows: {}",
        rows()
    );
    let (s, spend) = admin(&gws[0], "GET", "/admin/spend?group_by=key", None).await;
    assert_eq!(s, 200, "{spend}");
    assert_eq!(spend["data"][0]["key_id"], json!(id), "{spend}");
    assert_eq!(spend["data"][0]["requests"], json!(served), "{spend}");
    assert!(
        spend["data"][0]["spend_micro_usd"].as_i64().unwrap() > 0,
        "{spend}"
    );
    // The other reports read the one database too.
    let (s, usage) = admin(&gws[1], "GET", &format!("/admin/usage?key={id}"), None).await;
    assert_eq!(s, 200, "{usage}");
    assert_eq!(usage["data"].as_array().unwrap().len(), served, "{usage}");
    let (s, audit) = admin(&gws[2], "GET", "/admin/audit", None).await;
    assert_eq!(s, 200, "{audit}");
    assert_eq!(audit["data"].as_array().unwrap().len(), 2, "{audit}");
    // The audit log holds both changes, whichever instance made them.
    let actions = pg.psql("SELECT string_agg(action, ',' ORDER BY ts) FROM audit");
    assert_eq!(actions, "key.create,key.update");

    // A change no notification announced (made in the database directly) still applies
    // within the full re-read's interval (`store.refresh_interval`, 1 s here).
    pg.psql(&format!("UPDATE keys SET blocked = 0 WHERE id = '{id}'"));
    for gw in &gws {
        let took = until_status(gw, key, 200).await;
        assert!(
            took < Duration::from_millis(2500),
            "a re-read took {took:?}"
        );
    }
}

/// A team with a budget of `max_micro` and a key in it, made through `gws[0]` and known
/// to all of `gws`; returns the key.
async fn budgeted_key(gws: &[Gateway], max_micro: i64) -> String {
    let budget = json!({"max_usd": max_micro as f64 / 1e6, "period": "daily"});
    let (s, team) = admin(
        &gws[0],
        "POST",
        "/admin/teams",
        Some(json!({"name": "t", "budget": budget})),
    )
    .await;
    assert_eq!(s, 201, "{team}");
    let (s, v) = admin(
        &gws[0],
        "POST",
        "/admin/keys",
        Some(json!({"name": "k", "team": team["id"]})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let path = format!("/admin/keys/{}", v["id"].as_str().unwrap());
    for gw in gws {
        let seen = eventually_async(Duration::from_secs(3), || async {
            admin(gw, "GET", &path, None).await.0 == 200
        })
        .await;
        assert!(seen, "the key did not reach every instance");
    }
    v["key"].as_str().unwrap().to_string()
}

/// One small chat request (its reservation is close to its cost: `max_tokens` 10).
async fn spend_once(gw: &Gateway, key: &str) -> u16 {
    let mut body = chat("m", false);
    body["max_tokens"] = json!(10);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let _ = r.bytes().await;
    s
}

/// 90 requests in turn over `gws`, each settled before the next (30 ms apart, and with
/// `redis`, once no budget reservation is left in it): how many each instance got
/// answered, and how many were refused with 402.
async fn ninety(gws: &[Gateway], key: &str, redis: Option<&Redis>) -> (Vec<usize>, usize) {
    let mut admitted = vec![0; gws.len()];
    let mut refused = 0;
    for i in 0..90 {
        match spend_once(&gws[i % gws.len()], key).await {
            200 => admitted[i % gws.len()] += 1,
            402 => refused += 1,
            s => panic!("status {s}"),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        if let Some(r) = redis {
            let settled = eventually(Duration::from_secs(5), || reservations(r) == 0).await;
            assert!(settled, "a reservation was never settled");
        }
    }
    (admitted, refused)
}

/// What the budget counters in `redis` hold as spent (their `s` fields, summed).
fn shared_spend(redis: &Redis) -> i64 {
    let keys = redis_cli_out(redis, &["--scan", "--pattern", "*:spend"]);
    keys.lines()
        .map(|k| {
            redis_cli_out(redis, &["hget", k, "s"])
                .trim()
                .parse::<i64>()
                .unwrap_or(0)
        })
        .sum()
}

/// Budget reservations held in `redis` now (`r:` fields of the budget hashes).
fn reservations(redis: &Redis) -> usize {
    let keys = redis_cli_out(redis, &["--scan", "--pattern", "*:spend"]);
    keys.lines()
        .map(|k| {
            redis_cli_out(redis, &["hkeys", k])
                .lines()
                .filter(|f| f.starts_with("r:"))
                .count()
        })
        .sum()
}

fn redis_cli_out(redis: &Redis, args: &[&str]) -> String {
    redis.cli(args)
}

const BUDGET_MICRO: i64 = 100;

/// A PostgreSQL, a Redis, and `n` instances sharing them in front of `upstream`, with
/// `cluster_extra` lines in their `cluster` section.
fn shared(upstream: &str, n: usize, cluster_extra: &str) -> (Postgres, Redis, Vec<Gateway>) {
    let pg = Postgres::start();
    let redis = Redis::start();
    let text = config(&pg.url, Some(&redis.url), upstream)
        .replace("cluster:\n", &format!("cluster:\n{cluster_extra}"));
    let gws = (0..n).map(|_| Gateway::start(&text)).collect();
    (pg, redis, gws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_budget_shared_by_three_instances_admits_what_one_instance_would() {
    let up = MockUpstream::start("u").await.unwrap();
    // One instance on its own store: what the budget admits.
    let alone = {
        let gw = Gateway::start(&config_without_store(&up.url()));
        let key = budgeted_key(std::slice::from_ref(&gw), BUDGET_MICRO).await;
        let (admitted, refused) = ninety(std::slice::from_ref(&gw), &key, None).await;
        assert_eq!(admitted[0] + refused, 90);
        admitted[0]
    };
    assert!(alone > 3 && alone < 90, "one instance admitted {alone}");
    let hits_alone = up.hits();

    // Three instances sharing PostgreSQL and Redis admit the same, in turn.
    let (pg, redis, gws) = shared(&up.url(), 3, "");
    let key = budgeted_key(&gws, BUDGET_MICRO).await;
    let (admitted, refused) = ninety(&gws, &key, Some(&redis)).await;
    eprintln!("alone: {alone}; three instances: {admitted:?}");
    assert_eq!(admitted.iter().sum::<usize>(), alone, "{admitted:?}");
    assert_eq!(refused, 90 - alone);
    assert!(admitted.iter().all(|&n| n >= alone / 3), "{admitted:?}");
    assert_eq!(up.hits() - hits_alone, alone);
    // The durable record: what was spent, never more than the budget.
    let spent = || {
        pg.psql("SELECT COALESCE(SUM(cost_micro_usd), 0) FROM usage WHERE status = 200")
            .parse::<i64>()
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(5), || pg
            .psql("SELECT COUNT(*) FROM usage WHERE status = 200")
            == alone.to_string())
        .await
    );
    assert!(spent() > 0 && spent() <= BUDGET_MICRO, "spent {}", spent());

    // Redis flushed: a new instance starts its counter from what PostgreSQL recorded, so
    // the spent budget stays spent.
    redis_cli_out(&redis, &["FLUSHALL"]);
    let fourth = Gateway::start(&config(&pg.url, Some(&redis.url), &up.url()));
    assert_eq!(spend_once(&fourth, &key).await, 402);
    assert_eq!(up.hits() - hits_alone, alone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_burst_over_three_instances_never_overspends_a_budget() {
    let up = MockUpstream::start("u").await.unwrap();
    let (pg, _redis, gws) = shared(&up.url(), 3, "");
    let key = budgeted_key(&gws, BUDGET_MICRO).await;
    let burst = (0..60).map(|i| spend_once(&gws[i % 3], &key));
    let statuses = futures_util::future::join_all(burst).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 402),
        "{statuses:?}"
    );
    assert!(ok > 0 && ok < 60, "{ok} admitted");
    let rows = || pg.psql("SELECT COUNT(*) FROM usage WHERE status = 200");
    assert!(eventually(Duration::from_secs(5), || rows() == ok.to_string()).await);
    let spent: i64 = pg
        .psql("SELECT SUM(cost_micro_usd) FROM usage WHERE status = 200")
        .parse()
        .unwrap();
    eprintln!("burst: {ok} of 60 admitted, {spent} of {BUDGET_MICRO} micro-USD spent");
    assert!(spent <= BUDGET_MICRO, "spent {spent}");
}

fn config_without_store(upstream: &str) -> String {
    format!(
        "admin:\n  master_key: {MASTER}\nupstreams:\n  u:\n    servers: [{{url: \"{upstream}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u, model: gpt-4o-mini}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_reservation_held_by_an_instance_killed_with_kill_9_expires_within_slot_ttl() {
    use tollgate::demo::mock::Reply;
    let up = MockUpstream::start("u").await.unwrap();
    let (_pg, _redis, gws) = shared(&up.url(), 2, "  slot_ttl: 2s\n");
    let key = budgeted_key(&gws, BUDGET_MICRO).await;
    // The doomed instance reserves nearly the whole budget for a request that never ends.
    up.set_default(Reply::Hang);
    let hold = tokio::spawn({
        let (url, key) = (gws[0].url("/v1/chat/completions"), key.clone());
        async move {
            let mut body = chat("m", false);
            body["max_tokens"] = json!(160);
            let _ = client().post(url).bearer_auth(key).json(&body).send().await;
        }
    });
    assert!(eventually(Duration::from_secs(5), || up.hits() == 1).await);
    up.set_default(Reply::Model);
    assert_eq!(spend_once(&gws[1], &key).await, 402);
    // Past slot_ttl the reservation still holds: the live instance's heartbeat renews it.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(spend_once(&gws[1], &key).await, 402);
    std::process::Command::new("kill")
        .args(["-KILL", &gws[0].pid().to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    let back = loop {
        if spend_once(&gws[1], &key).await == 200 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "the reservation never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("the dead instance's reservation expired after {back:?}");
    assert!(back <= Duration::from_millis(2600), "{back:?}");
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_instance_recounts_budgets_from_the_shared_store() {
    let up = MockUpstream::start("u").await.unwrap();
    let pg = Postgres::start();
    let text = config(&pg.url, None, &up.url());
    let gws = [Gateway::start(&text), Gateway::start(&text)];
    let key = budgeted_key(&gws, BUDGET_MICRO).await;
    // Instance 1 spends the budget on its own.
    let mut admitted = 0;
    while spend_once(&gws[0], &key).await == 200 {
        admitted += 1;
        assert!(admitted < 90, "the budget never ran out");
    }
    // After a flush and a periodic re-read (200 ms and 1 s here), instance 2 counts that
    // spend (its /v1/key/info shows it): without the recount it would admit its own 19
    // or so.
    let spent = |gw: &Gateway| {
        let url = gw.url("/v1/key/info");
        let key = key.clone();
        async move {
            let info = get_json_as(url, &key).await;
            info["budgets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["spend_usd"].as_f64().unwrap())
                .fold(0.0, f64::max)
        }
    };
    let on_first = spent(&gws[0]).await;
    assert!(on_first > 0.0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            spent(&gws[1]).await >= on_first
        })
        .await,
        "instance 2 never counted instance 1's spend"
    );
    assert_eq!(spend_once(&gws[1], &key).await, 402);
    let hits = up.hits();
    assert_eq!(hits, admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_budgets_are_enforced_by_each_instance_and_sharing_resumes() {
    let up = MockUpstream::start("u").await.unwrap();
    // The store is re-read hourly here: what instance 2 learns of instance 1's spend, it
    // learns through Redis.
    let pg = Postgres::start();
    let redis = Redis::start();
    let text = config(&pg.url, Some(&redis.url), &up.url())
        .replace("refresh_interval: 1s", "refresh_interval: 1h");
    let gws = [Gateway::start(&text), Gateway::start(&text)];
    let key = budgeted_key(&gws, BUDGET_MICRO).await;
    // A request on each instance counted in Redis, instance 2's settled there before
    // instance 1 asks (so that instance 1's figure holds both); then Redis goes away.
    assert_eq!(spend_once(&gws[1], &key).await, 200);
    assert!(eventually(Duration::from_secs(5), || shared_spend(&redis) > 0).await);
    assert_eq!(spend_once(&gws[0], &key).await, 200);
    let dir = redis.stop();
    // Instance 1 goes on against its own figure (local mode): answers, never an error or
    // a hang, until the budget it knows of is spent.
    let mut admitted = 0;
    loop {
        let started = Instant::now();
        let s = spend_once(&gws[0], &key).await;
        assert!(started.elapsed() < Duration::from_secs(2), "a request hung");
        match s {
            200 => admitted += 1,
            402 => break,
            s => panic!("status {s}"),
        }
        assert!(admitted < 90, "the budget was not enforced without Redis");
    }
    assert!(
        gws[0].logs().contains("Redis unavailable"),
        "{}",
        gws[0].logs()
    );
    // Redis back, empty. Instance 2 knows of one request only: on its own figure it would
    // admit about 18 more. Instance 1's next request (refused: it knows the budget is
    // spent) raises the shared counter to its figure, and from then on instance 2
    // refuses too: the counting is shared again.
    let redis = Redis::start_in(dir);
    let back = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        assert_eq!(spend_once(&gws[0], &key).await, 402);
        // Its first call after the restart may still find the old connection broken.
        let shared = redis_cli_out(&redis, &["--scan", "--pattern", "*:spend"]);
        if !shared.trim().is_empty() {
            eprintln!("instance 1 reached Redis after {:?}", back.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance 1 never reached Redis again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Shared again, instance 2 admits at most what that figure leaves of the budget (one
    // request at most: instance 1 refused once its next reservation no longer fitted).
    let mut more = 0;
    while spend_once(&gws[1], &key).await == 200 {
        more += 1;
        assert!(
            more <= 1,
            "instance 2 does not share the counter again (shared spend {})",
            shared_spend(&redis)
        );
    }
    assert_eq!(up.hits(), 2 + admitted + more);
    let recorded = || {
        pg.psql("SELECT COALESCE(SUM(cost_micro_usd), 0) FROM usage")
            .parse::<i64>()
            .unwrap()
    };
    let rows = || pg.psql("SELECT COUNT(*) FROM usage WHERE status = 200");
    let answered = up.hits().to_string();
    assert!(eventually(Duration::from_secs(5), || rows() == answered).await);
    assert!(
        recorded() <= BUDGET_MICRO,
        "spent {} of {BUDGET_MICRO}",
        recorded()
    );
    eprintln!("without Redis instance 1 admitted {admitted} more; after, instance 2 {more}");
}

/// Three instances cross a team budget's thresholds and refuse it together: each alert
/// (per threshold, and the refusal) reaches the webhook once, claimed in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_crossed_by_three_instances_together_is_sent_once() {
    let up = MockUpstream::start("u").await.unwrap();
    let hook = MockUpstream::start("hook").await.unwrap();
    hook.set_default(tollgate::demo::mock::Reply::error(200, "{}"));
    let pg = Postgres::start();
    let redis = Redis::start();
    let text = format!(
        "{}alerts:\n  webhook:\n    url: {}/alerts\n",
        config(&pg.url, Some(&redis.url), &up.url()),
        hook.url().trim_end_matches("/v1")
    );
    let gws: Vec<Gateway> = (0..3).map(|_| Gateway::start(&text)).collect();
    let key = budgeted_key(&gws, BUDGET_MICRO).await;
    // Rounds of one request on each instance at once, until every instance refuses.
    let mut refused = [false; 3];
    for _ in 0..60 {
        let round = futures_util::future::join_all(gws.iter().map(|gw| spend_once(gw, &key))).await;
        for (i, s) in round.iter().enumerate() {
            assert!(*s == 200 || *s == 402, "status {s}");
            refused[i] |= *s == 402;
        }
        if refused.iter().all(|r| *r) {
            break;
        }
    }
    assert!(refused.iter().all(|r| *r), "not every instance refused");
    // Every instance refused a request (and the reservations keep spend under 100 %):
    // without the claim each would have sent its own refusal alert.
    let alerts = || {
        let mut seen: Vec<String> = hook
            .received()
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                format!("{} {}", v["event"].as_str().unwrap(), v["fraction"])
            })
            .collect();
        seen.sort();
        seen
    };
    assert!(
        eventually(Duration::from_secs(5), || alerts().len() >= 2).await,
        "{:?}",
        alerts()
    );
    // Each instance refused, so each queued the refusal alert: the others lost the claim.
    // Once two have said so, a duplicate would already have been posted.
    let claimed_elsewhere = || async {
        futures_util::future::join_all(gws.iter().map(scrape))
            .await
            .iter()
            .filter(|m| m.contains("tollgate_budget_alerts_total{result=\"claimed_elsewhere\"}"))
            .count()
    };
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            claimed_elsewhere().await >= 2
        })
        .await,
        "instances that left an alert to another: {}",
        claimed_elsewhere().await
    );
    assert_eq!(alerts(), ["budget_exceeded null", "budget_threshold 0.8"],);
}

/// `/v1/key/info` on any instance reads the shared counter: what another instance spent
/// a moment ago shows at once, long before the periodic re-read of the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_info_on_any_instance_shows_what_every_instance_spent() {
    let up = MockUpstream::start("u").await.unwrap();
    let pg = Postgres::start();
    let redis = Redis::start();
    let text = config(&pg.url, Some(&redis.url), &up.url())
        .replace("refresh_interval: 1s", "refresh_interval: 1h");
    let gws: Vec<Gateway> = (0..2).map(|_| Gateway::start(&text)).collect();
    let key = budgeted_key(&gws, 1_000_000).await;
    for _ in 0..3 {
        assert_eq!(spend_once(&gws[0], &key).await, 200);
    }
    assert!(eventually(Duration::from_secs(5), || reservations(&redis) == 0).await);
    let spent = |v: &Value| v["budgets"][0]["spend_usd"].as_f64().unwrap();
    let first = get_json_as(gws[0].url("/v1/key/info"), &key).await;
    let second = get_json_as(gws[1].url("/v1/key/info"), &key).await;
    assert!(spent(&first) > 0.0, "{first}");
    assert_eq!(spent(&second), spent(&first), "{second}");
    // The figure is the shared counter's: the sum of what the rows record.
    let rows = || pg.psql("SELECT COUNT(*) FROM usage WHERE status = 200");
    assert!(eventually(Duration::from_secs(5), || rows() == "3").await);
    let recorded: i64 = pg
        .psql("SELECT SUM(cost_micro_usd) FROM usage")
        .parse()
        .unwrap();
    assert_eq!((spent(&second) * 1e6).round() as i64, recorded);
}

/// One figure everywhere: 1,000 concurrent requests over 2 instances sharing PostgreSQL
/// and Redis, mixing whole answers, streams with and without usage, cache hits and budget
/// refusals. The usage rows, `/admin/spend`, the budget (on either instance's
/// `/v1/key/info`) and the cost counters of `/metrics` summed over the instances agree to
/// the micro-USD, and the budget is never overshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_requests_over_two_instances_give_one_figure_everywhere() {
    const BUDGET: i64 = 1_000;
    let up = MockUpstream::start("u").await.unwrap();
    let pg = Postgres::start();
    let redis = Redis::start();
    let text = format!(
        "store:\n  url: \"{}\"\n  flush_interval: 200ms\n  refresh_interval: 1s\ncluster:\n  redis: \"{}\"\n  on_redis_error: refuse\ncache:\n  backend: redis\nadmin:\n  master_key: {MASTER}\nkeys:\n  - {{name: operator, key: {CONFIG_KEY}}}\nupstreams:\n  u:\n    servers: [{{url: \"{url}\"}}]\n    stream_usage: true\n  bare:\n    servers: [{{url: \"{url}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u, model: gpt-4o-mini}}]\n    cache: {{ttl: 10m}}\n  bare:\n    routes: [{{upstream: bare, model: gpt-4o-mini}}]\n",
        pg.url,
        redis.url,
        url = up.url()
    );
    let gws: Vec<Gateway> = (0..2).map(|_| Gateway::start(&text)).collect();
    let key = budgeted_key(&gws, BUDGET).await;
    // The repeated question is answered once before the burst, and asked again until the
    // other instance has it from the shared cache: whether the burst would store it before
    // the budget ran out was a race.
    let same = json!({"model": "m", "stream": false, "max_tokens": 10,
        "messages": [{"role": "user", "content": "the same question"}]});
    let ask = |gw: &Gateway| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&same)
            .send()
    };
    let first = ask(&gws[0]).await.unwrap();
    assert_eq!(first.status(), 200);
    let mut warm = 1;
    loop {
        let r = ask(&gws[1]).await.unwrap();
        assert_eq!(r.status(), 200);
        warm += 1;
        if r.headers()
            .get("x-tollgate-cache")
            .is_some_and(|v| v == "hit")
        {
            break;
        }
        assert!(warm < 50, "the answer never reached the shared cache");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = (0..1000).map(|i| {
        let gw = &gws[i % 2];
        let key = key.clone();
        async move {
            // A fifth ask the same question (cache hits), a fifth stream with usage, a
            // fifth stream without it (charged their reservation), the rest whole answers.
            let (model, stream, text) = match i % 5 {
                0 => ("m", false, "the same question".to_string()),
                1 => ("m", true, format!("stream {i}")),
                2 => ("bare", true, format!("bare stream {i}")),
                _ => ("m", false, format!("question {i}")),
            };
            let body = json!({"model": model, "stream": stream, "max_tokens": 10,
                "messages": [{"role": "user", "content": text}]});
            // A 503 (Redis slower than a request may wait, on a saturated machine) is
            // counted nowhere: asked again, a few times, as a client would.
            let mut status = 503;
            for _ in 0..5 {
                let r = client()
                    .post(gw.url("/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                status = r.status().as_u16();
                let _ = r.bytes().await;
                if status != 503 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            status
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let answered = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    // With `on_redis_error: refuse`, a call to Redis that takes longer than a request may
    // wait (a saturated instance) is a 503: never counted anywhere but refused.
    let unavailable = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(answered + refused + unavailable, 1000, "{statuses:?}");
    assert!(
        answered > 50 && refused > 10,
        "{answered} answered, {refused} refused"
    );
    let ok = answered + warm;

    // Every answered request has its row (a hit too), once every reservation settled.
    assert!(
        eventually(Duration::from_secs(10), || reservations(&redis) == 0).await,
        "reservations left: {}",
        reservations(&redis)
    );
    let rows = || pg.psql("SELECT COUNT(*) FROM usage");
    assert!(
        eventually(Duration::from_secs(10), || rows() == ok.to_string()).await,
        "{} rows for {ok} answers",
        rows()
    );
    let hits: i64 = pg
        .psql("SELECT COUNT(*) FROM usage WHERE cache = 'hit'")
        .parse()
        .unwrap();
    assert!(hits > 0, "no cache hit");
    let recorded: i64 = pg
        .psql("SELECT SUM(cost_micro_usd) FROM usage")
        .parse()
        .unwrap();
    eprintln!("{ok} answered ({hits} hits), {refused} refused, {unavailable} unavailable; {recorded} of {BUDGET} micro-USD");
    assert!(recorded > 0 && recorded <= BUDGET, "spent {recorded}");

    // The budget, on each instance.
    for gw in &gws {
        let info = get_json_as(gw.url("/v1/key/info"), &key).await;
        let spent = (info["budgets"][0]["spend_usd"].as_f64().unwrap() * 1e6).round() as i64;
        assert_eq!(spent, recorded, "{info}");
    }
    // The spend report.
    let (s, spend) = admin(&gws[1], "GET", "/admin/spend?group_by=team", None).await;
    assert_eq!(s, 200, "{spend}");
    let reported: i64 = spend["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["spend_micro_usd"].as_i64().unwrap())
        .sum();
    assert_eq!(reported, recorded, "{spend}");
    // The metrics, summed over both instances.
    let mut metered = 0.0;
    for gw in &gws {
        metered += scrape(gw)
            .await
            .lines()
            .filter(|l| l.starts_with("tollgate_cost_usd_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>();
    }
    assert_eq!((metered * 1e6).round() as i64, recorded);
}
