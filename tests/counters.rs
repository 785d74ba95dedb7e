//! One contract for every place limit counters live: each case runs against
//! `LocalCounters` (this process) and `RedisCounters` (a real redis-server of the test's
//! own, exact mode: no leases). What the admission logic relies on must hold for both:
//! a refusal counts nothing and names the first charge that did not fit, a slot is held
//! until its request ends, an undo takes back everything, and tokens count what was used.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{away_from_a_minute_boundary, Redis};
use std::time::{Duration, Instant};
use tollgate::limits::{
    key_hash, Charge, CounterBackend, Dimension, LocalCounters, OnRedisError, RedisCounters,
    Refusal, Scope, SharedOptions,
};

/// The backends under test; the Redis server lives as long as its counters.
fn backends() -> Vec<(&'static str, Box<dyn CounterBackend>, Option<Redis>)> {
    let redis = Redis::start();
    let shared = RedisCounters::new(
        &redis.url,
        SharedOptions {
            on_error: OnRedisError::Refuse,
            instances: 1,
            slot_ttl: Duration::from_secs(30),
            leases: false,
            clock: std::sync::Arc::new(tollgate::clock::SystemClock),
        },
    )
    .unwrap();
    vec![
        ("local", Box::new(LocalCounters::default()), None),
        ("redis", Box::new(shared), Some(redis)),
    ]
}

fn charge(scope: Scope, key: &str, dimension: Dimension, limit: u64, amount: u64) -> Charge {
    Charge::new(scope, key_hash(key), dimension, limit, amount)
}

async fn reserve(b: &dyn CounterBackend, charges: &[Charge]) -> Result<Vec<Charge>, Refusal> {
    let mut c = charges.to_vec();
    b.reserve(&mut c).await.map(|()| c)
}

/// Reserves `charges` once what was given back has arrived (a shared backend gives back
/// without waiting for the answer), within 5 s.
async fn reserve_once_given_back(
    name: &str,
    b: &dyn CounterBackend,
    charges: &[Charge],
) -> Vec<Charge> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match reserve(b, charges).await {
            Ok(c) => return c,
            Err(r) => assert!(
                Instant::now() < deadline,
                "{name}: still refused after what was given back: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_counts_nothing_and_names_the_first_charge_that_did_not_fit() {
    away_from_a_minute_boundary().await;
    for (name, b, _redis) in backends() {
        let b = b.as_ref();
        let first = [
            charge(Scope::Key, "k1", Dimension::Rpm, 3, 1),
            charge(Scope::Global, "", Dimension::Rpm, 4, 1),
        ];
        for i in 0..3 {
            assert!(reserve(b, &first).await.is_ok(), "{name}: request {i}");
        }
        let r = reserve(b, &first).await.unwrap_err();
        assert_eq!(
            (r.scope, r.dimension, r.limit),
            (Scope::Key, Dimension::Rpm, 3),
            "{name}"
        );
        assert!(r.retry_after >= 1, "{name}: {r:?}");
        // The refused request did not count toward the global limit: one more fits there.
        let second = [
            charge(Scope::Key, "k2", Dimension::Rpm, 3, 1),
            charge(Scope::Global, "", Dimension::Rpm, 4, 1),
        ];
        assert!(reserve(b, &second).await.is_ok(), "{name}");
        let r = reserve(b, &second).await.unwrap_err();
        assert_eq!((r.scope, r.limit), (Scope::Global, 4), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_is_held_until_its_request_ends() {
    for (name, b, _redis) in backends() {
        let b = b.as_ref();
        let slot = [charge(Scope::Key, "k", Dimension::Concurrency, 2, 1)];
        let a = reserve(b, &slot).await.unwrap();
        let _b = reserve(b, &slot).await.unwrap();
        let r = reserve(b, &slot).await.unwrap_err();
        assert_eq!(
            (r.dimension, r.limit),
            (Dimension::Concurrency, 2),
            "{name}"
        );
        b.finish(&a);
        let c = reserve_once_given_back(name, b, &slot).await;
        assert!(reserve(b, &slot).await.is_err(), "{name}: two held again");
        b.finish(&c);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_takes_back_rates_and_slots() {
    away_from_a_minute_boundary().await;
    for (name, b, _redis) in backends() {
        let b = b.as_ref();
        let both = [
            charge(Scope::Key, "k", Dimension::Rpm, 1, 1),
            charge(Scope::Key, "k", Dimension::Concurrency, 1, 1),
        ];
        let held = reserve(b, &both).await.unwrap();
        assert!(reserve(b, &both).await.is_err(), "{name}");
        b.undo(&held);
        // Both the request and the slot are back: the same fits again, once.
        let again = reserve_once_given_back(name, b, &both).await;
        b.finish(&again);
        let rate = [charge(Scope::Key, "k", Dimension::Rpm, 1, 1)];
        let r = reserve(b, &rate).await.unwrap_err();
        assert_eq!(
            r.dimension,
            Dimension::Rpm,
            "{name}: the finished one counts"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_count_what_was_used_in_place_of_the_estimate() {
    away_from_a_minute_boundary().await;
    for (name, b, _redis) in backends() {
        let b = b.as_ref();
        let estimate = [charge(Scope::Key, "k", Dimension::Tpm, 100, 80)];
        let mut held = reserve(b, &estimate).await.unwrap();
        let r = reserve(b, &estimate).await.unwrap_err();
        assert_eq!((r.dimension, r.limit), (Dimension::Tpm, 100), "{name}");
        held[0].settled = Some(10);
        b.finish(&held);
        // 10 used, not 80: another 80 fits, and then nothing more of that size.
        reserve_once_given_back(name, b, &estimate).await;
        assert!(reserve(b, &estimate).await.is_err(), "{name}");
    }
}
