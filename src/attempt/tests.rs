//! The attempt loop on its own, against real mock upstreams on loopback: which
//! targets it tries in which order, what it records, and what it cools down.
use super::*;
use crate::config::Config;
use crate::demo::mock::{MockUpstream, Reply};
use crate::transport::pool::{Dial, Pool};
use pingora_core::connectors::TransportConnector;
use pingora_http::RequestHeader;
use std::time::Duration;

async fn attempt(
    config: &Config,
    model: &str,
) -> (Result<Winner, GatewayError>, Vec<AttemptRecord>) {
    let connections = Connections {
        dialer: Box::new(Dial(TransportConnector::new(None))),
        pool: Pool::new(8),
    };
    attempt_over(&connections, config, model).await
}

async fn attempt_over(
    connections: &Connections,
    config: &Config,
    model: &str,
) -> (Result<Winner, GatewayError>, Vec<AttemptRecord>) {
    let req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    let out = Outgoing::new(
        &req,
        "/chat/completions",
        "test-request",
        "127.0.0.1",
        false,
    );
    let body = Bytes::from(format!(r#"{{"model":"{model}","messages":[]}}"#));
    let rewrite = |_: &str, _: bool| body.clone();
    let alias = config.router.resolve(model).unwrap().clone();
    let need = Need {
        client_model: model,
        alias: &alias.name,
        input_tokens: body.len() as u64 / 4,
        output_tokens: 0,
        pricing: &config.pricing,
    };
    let plan = Plan {
        connections,
        router: &config.router,
        failover: &config.failover,
        out: &out,
        body: &body,
        default_max_tokens: 4096,
        need: &need,
        rewrite: &rewrite,
        wants_usage: false,
        cooldowns: &crate::upstream::shared::LocalCooldowns,
        trace: None,
        clock: &crate::clock::SystemClock,
    };
    let mut attempts = Vec::new();
    let result = run(&plan, &alias, &mut attempts).await;
    (result, attempts)
}

fn config(text: &str) -> Config {
    let c = Config::parse(text, &|_| None).unwrap();
    c.resolve();
    c
}

fn outcomes(attempts: &[AttemptRecord]) -> Vec<(String, &'static str)> {
    attempts
        .iter()
        .map(|a| (a.upstream.to_string(), a.outcome.as_str()))
        .collect()
}

#[tokio::test]
async fn a_rate_limited_tier_is_cooled_for_its_hint_and_the_next_tier_answers() {
    let a = MockUpstream::start("a").await.unwrap();
    let b = MockUpstream::start("b").await.unwrap();
    a.set_default(Reply::Status {
        status: 429,
        headers: vec![("retry-after".into(), "7".into())],
        body: r#"{"error":{"message":"slow down","type":"rate_limit_exceeded"}}"#.into(),
    });
    let c = config(&format!(
        "upstreams:\n  a: {{servers: [{{url: \"{}\"}}]}}\n  b: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: a, priority: 1}}\n      - {{upstream: b, priority: 2}}\n",
        a.url(),
        b.url()
    ));
    let (result, attempts) = attempt(&c, "m").await;
    let winner = result.unwrap();
    assert_eq!(&*winner.upstream.name, "b");
    assert_eq!(winner.sent.status(), 200);
    assert_eq!(
        outcomes(&attempts),
        [("a".to_string(), "transient"), ("b".to_string(), "ok")]
    );
    assert_eq!(attempts[0].status, Some(429));
    let server_a = &c.upstreams["a"].servers[0];
    let (left, reason) = server_a.state.health.cooldown(now_ms()).unwrap();
    assert_eq!(reason, crate::upstream::health::Reason::Transient);
    assert!(
        left > Duration::from_secs(6) && left <= Duration::from_secs(7),
        "{left:?}"
    );
    assert_eq!((a.hits(), b.hits()), (1, 1));
}

#[tokio::test]
async fn attempts_stop_at_max_attempts_and_the_last_error_says_so() {
    let ups: Vec<MockUpstream> = futures_util::future::join_all(
        (0..5).map(|i| async move { MockUpstream::start(&format!("s{i}")).await.unwrap() }),
    )
    .await;
    for u in &ups {
        u.set_default(Reply::error(503, r#"{"error":{"message":"overloaded"}}"#));
    }
    let servers: Vec<String> = ups
        .iter()
        .map(|u| format!("{{url: \"{}\"}}", u.url()))
        .collect();
    let c = config(&format!(
        "failover: {{max_attempts: 3}}\nupstreams:\n  u: {{servers: [{}]}}\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
        servers.join(", ")
    ));
    let (result, attempts) = attempt(&c, "m").await;
    let Err(e) = result else {
        panic!("every server answered 503")
    };
    assert_eq!(e.status(), 503);
    let message = e.to_string();
    assert!(
        message.starts_with("All 3 upstream attempts for model `m` failed"),
        "{message}"
    );
    assert_eq!(message.matches("(transient 503)").count(), 3, "{message}");
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a.outcome.as_str() == "transient"));
    assert_eq!(ups.iter().map(MockUpstream::hits).sum::<usize>(), 3);
}

#[tokio::test]
async fn a_quota_failure_cools_for_the_quota_cooldown_and_a_refused_connection_is_a_transport_failure(
) {
    let quota = MockUpstream::start("q").await.unwrap();
    let ok = MockUpstream::start("ok").await.unwrap();
    quota.set_default(Reply::error(
        429,
        r#"{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}"#,
    ));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let c = config(&format!(
        "failover: {{quota_cooldown: 1h}}\nupstreams:\n  dead: {{servers: [{{url: \"http://127.0.0.1:{closed_port}\"}}]}}\n  q: {{servers: [{{url: \"{}\"}}]}}\n  ok: {{servers: [{{url: \"{}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: dead, priority: 1}}\n      - {{upstream: q, priority: 2}}\n      - {{upstream: ok, priority: 3}}\n",
        quota.url(),
        ok.url()
    ));
    let (result, attempts) = attempt(&c, "m").await;
    assert_eq!(&*result.unwrap().upstream.name, "ok");
    assert_eq!(
        outcomes(&attempts),
        [
            ("dead".to_string(), "connect_error"),
            ("q".to_string(), "quota"),
            ("ok".to_string(), "ok")
        ]
    );
    let (left, reason) = c.upstreams["q"].servers[0]
        .state
        .health
        .cooldown(now_ms())
        .unwrap();
    assert_eq!(reason, crate::upstream::health::Reason::Quota);
    assert!(left > Duration::from_secs(3500), "{left:?}");
}

/// Upstreams scripted in memory, reached through the dialer: each address answers
/// every request with its raw HTTP response after its delay, timed by tokio's clock,
/// so that tests run with paused time and never wait for real.
#[derive(Default)]
struct Scripted {
    scripts: std::sync::Mutex<std::collections::HashMap<String, (Duration, &'static str)>>,
    hits: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Scripted {
    fn answer(&self, addr: &str, delay: Duration, response: &'static str) {
        let mut scripts = self.scripts.lock().unwrap();
        scripts.insert(addr.to_string(), (delay, response));
    }

    fn hits(&self, addr: &str) -> usize {
        self.hits.lock().unwrap().get(addr).copied().unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl crate::transport::pool::Dialer for std::sync::Arc<Scripted> {
    async fn dial(
        &self,
        peer: &pingora_core::upstreams::peer::HttpPeer,
    ) -> pingora_core::Result<pingora_core::protocols::Stream> {
        use pingora_core::upstreams::peer::Peer;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = peer.address().to_string();
        if !self.scripts.lock().unwrap().contains_key(&addr) {
            return pingora_core::Error::e_explain(
                pingora_core::ErrorType::ConnectRefused,
                "nothing scripted",
            );
        }
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let me = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let Ok(n) = server.read(&mut buf).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                // Each test request is one JSON object: its last byte ends it.
                if seen.ends_with(b"}") {
                    seen.clear();
                    *me.hits.lock().unwrap().entry(addr.clone()).or_default() += 1;
                    // The script as it is now: a pooled connection follows changes.
                    let (delay, response) = me.scripts.lock().unwrap()[&addr];
                    tokio::time::sleep(delay).await;
                    if server.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Box::new(client))
    }
}

const OK: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
const SLOW_DOWN: &str = "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-type: application/json\r\ncontent-length: 33\r\n\r\n{\"error\":{\"message\":\"slow down\"}}";

fn scripted() -> (std::sync::Arc<Scripted>, Connections) {
    let s = std::sync::Arc::new(Scripted::default());
    let connections = Connections {
        dialer: Box::new(std::sync::Arc::clone(&s)),
        pool: Pool::new(8),
    };
    (s, connections)
}

fn two_tiers(extra: &str) -> Config {
    config(&format!(
        "upstreams:\n  a: {{{extra}servers: [{{url: \"http://127.0.0.11:80\"}}]}}\n  b: {{servers: [{{url: \"http://127.0.0.12:80\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: a, priority: 1}}\n      - {{upstream: b, priority: 2}}\n"
    ))
}

#[tokio::test(start_paused = true)]
async fn a_slow_first_byte_times_out_after_first_byte_timeout_and_the_next_tier_answers() {
    let (up, connections) = scripted();
    up.answer("127.0.0.11:80", Duration::from_secs(600), OK);
    up.answer("127.0.0.12:80", Duration::from_millis(250), OK);
    let c = two_tiers("first_byte_timeout: 20s, ");
    let started = tokio::time::Instant::now();
    let (result, attempts) = attempt_over(&connections, &c, "m").await;
    assert_eq!(&*result.unwrap().upstream.name, "b");
    assert_eq!(
        outcomes(&attempts),
        [("a".to_string(), "timeout"), ("b".to_string(), "ok")]
    );
    // 20 s waiting for a, 250 ms for b, on the paused clock: nothing else waited.
    assert_eq!(started.elapsed(), Duration::from_millis(20_250));
    assert_eq!((up.hits("127.0.0.11:80"), up.hits("127.0.0.12:80")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_cooled_tier_is_skipped_until_its_hint_has_passed_then_tried_again() {
    let (up, connections) = scripted();
    up.answer("127.0.0.11:80", Duration::ZERO, SLOW_DOWN);
    up.answer("127.0.0.12:80", Duration::ZERO, OK);
    let c = two_tiers("");
    let (result, attempts) = attempt_over(&connections, &c, "m").await;
    assert_eq!(&*result.unwrap().upstream.name, "b");
    assert_eq!(attempts.len(), 2);

    // Within its 7 s hint, a is not asked again.
    tokio::time::advance(Duration::from_millis(6_900)).await;
    let (result, attempts) = attempt_over(&connections, &c, "m").await;
    assert_eq!(&*result.unwrap().upstream.name, "b");
    assert_eq!(outcomes(&attempts), [("b".to_string(), "ok")]);
    assert_eq!(up.hits("127.0.0.11:80"), 1);

    // Once it has passed, a is first again.
    tokio::time::advance(Duration::from_millis(200)).await;
    up.answer("127.0.0.11:80", Duration::ZERO, OK);
    let (result, attempts) = attempt_over(&connections, &c, "m").await;
    assert_eq!(&*result.unwrap().upstream.name, "a");
    assert_eq!(outcomes(&attempts), [("a".to_string(), "ok")]);
    assert_eq!((up.hits("127.0.0.11:80"), up.hits("127.0.0.12:80")), (2, 2));
}
