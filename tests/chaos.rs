//! Chaos: upstreams that misbehave at every phase of an exchange (bad status lines, CR
//! inside header fields, lengths that lie, resets before and after the header, streams
//! that stop, oversized heads). For each, the client gets a prompt, clear answer (an
//! OpenAI-shaped error, or a cut it can see), normal requests keep being served, and
//! the gateway's memory and descriptors come back near where they started.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, eventually, Gateway};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tollgate::demo::mock::MockUpstream;

/// What an evil upstream does after reading a request.
#[derive(Clone)]
enum Act {
    /// Writes these bytes, then closes.
    Write(Vec<u8>),
    /// Writes these bytes, then resets the connection (RST, not FIN).
    WriteThenReset(Vec<u8>),
    /// Writes these bytes, then keeps the connection open and silent.
    WriteThenHang(Vec<u8>),
}

/// A raw TCP upstream that answers every connection with `act`.
async fn evil(act: Act) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let act = act.clone();
            tokio::spawn(async move {
                // Read the request head and whatever body came with it.
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
                match act {
                    Act::Write(b) => {
                        let _ = s.write_all(&b).await;
                    }
                    Act::WriteThenReset(b) => {
                        let _ = s.write_all(&b).await;
                        // A zero linger never blocks on drop: it is the reset itself.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                    }
                    Act::WriteThenHang(b) => {
                        let _ = s.write_all(&b).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
        }
    });
    addr
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Every case: its name, what the upstream does, and what the client must see.
fn cases() -> Vec<(&'static str, Act, Expect)> {
    let ok_head =
        |extra: &str| format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}\r\n");
    vec![
        (
            "bad status line",
            Act::Write(b"HTTP/1.1 abc OK\r\n\r\n".to_vec()),
            Expect::GatewayError,
        ),
        (
            "not http at all",
            Act::Write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
            Expect::GatewayError,
        ),
        (
            "CR inside a header field",
            Act::Write(b"HTTP/1.1 200 OK\r\nx-evil: a\rb\r\ncontent-length: 2\r\n\r\n{}".to_vec()),
            Expect::GatewayError,
        ),
        (
            "closed before answering",
            Act::Write(Vec::new()),
            Expect::GatewayError,
        ),
        (
            "reset before answering",
            Act::WriteThenReset(Vec::new()),
            Expect::GatewayError,
        ),
        (
            "reset inside the header",
            Act::WriteThenReset(b"HTTP/1.1 200 OK\r\ncontent-ty".to_vec()),
            Expect::GatewayError,
        ),
        (
            "silent inside the header",
            Act::WriteThenHang(b"HTTP/1.1 200 OK\r\ncontent-ty".to_vec()),
            Expect::GatewayError,
        ),
        (
            "a head over 64 KiB",
            Act::Write(
                format!(
                    "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
                    "a".repeat(100 * 1024)
                )
                .into_bytes(),
            ),
            Expect::GatewayError,
        ),
        (
            "content-length longer than the body",
            Act::Write(format!("{}{{\"a\":1}}", ok_head("content-length: 1000\r\n")).into_bytes()),
            Expect::Cut,
        ),
        (
            "content-length longer than the body, then silence",
            Act::WriteThenHang(
                format!("{}{{\"a\":1}}", ok_head("content-length: 1000\r\n")).into_bytes(),
            ),
            Expect::Cut,
        ),
        (
            "reset inside a chunked body",
            Act::WriteThenReset(
                format!("{}5\r\nhel", ok_head("transfer-encoding: chunked\r\n")).into_bytes(),
            ),
            Expect::Cut,
        ),
        (
            "broken chunk size",
            Act::Write(
                format!(
                    "{}zz\r\nhello\r\n0\r\n\r\n",
                    ok_head("transfer-encoding: chunked\r\n")
                )
                .into_bytes(),
            ),
            Expect::Cut,
        ),
        (
            "content-length shorter than what follows",
            Act::Write(
                format!("{}{{}}trailing garbage", ok_head("content-length: 2\r\n")).into_bytes(),
            ),
            Expect::Body("{}"),
        ),
        (
            "two different content-lengths",
            Act::Write(
                format!(
                    "{}{{}}",
                    ok_head("content-length: 2\r\ncontent-length: 7\r\n")
                )
                .into_bytes(),
            ),
            Expect::GatewayErrorOrCut,
        ),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// A 5xx from the gateway with an OpenAI-shaped error body.
    GatewayError,
    /// The status went out, then the body was cut: the client sees an error, not an end.
    Cut,
    /// A complete response with exactly this body.
    Body(&'static str),
    /// Either of the first two (the gateway may or may not have committed).
    GatewayErrorOrCut,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_upstreams_get_clear_answers_and_the_gateway_keeps_serving() {
    let good = MockUpstream::start("good").await.unwrap();
    let mut upstreams = String::new();
    let mut models = String::new();
    let cases = cases();
    for (i, (_, act, _)) in cases.iter().enumerate() {
        let addr = evil(act.clone()).await;
        upstreams.push_str(&format!(
            "  evil{i}:\n    first_byte_timeout: 1s\n    idle_timeout: 1s\n    servers: [{{url: \"http://{addr}\"}}]\n"
        ));
        models.push_str(&format!("  m{i}:\n    routes: [{{upstream: evil{i}}}]\n"));
    }
    let gw = Gateway::start(&format!(
        "upstreams:\n  good:\n    servers: [{{url: \"{}\"}}]\n{upstreams}models:\n  good:\n    routes: [{{upstream: good}}]\n{models}",
        good.url()
    ));
    let c = client();
    let normal = |c: reqwest::Client| {
        let url = gw.url("/v1/chat/completions");
        async move {
            let r = c.post(url).json(&chat("good", false)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap();
        }
    };
    normal(c.clone()).await;
    let pid = gw.pid();
    let (rss0, fds0) = (rss_kib(pid), fds(pid));

    for round in 0..3 {
        for (i, (name, _, expect)) in cases.iter().enumerate() {
            let started = Instant::now();
            let sent = c
                .post(gw.url("/v1/chat/completions"))
                .json(&chat(&format!("m{i}"), false))
                .send()
                .await;
            let outcome = match sent {
                Err(e) => Err(format!("no response: {e}")),
                Ok(r) => {
                    let status = r.status().as_u16();
                    match r.text().await {
                        Ok(body) => Ok((status, body)),
                        Err(_) => Err(format!("cut after status {status}")),
                    }
                }
            };
            let elapsed = started.elapsed();
            assert!(elapsed < Duration::from_secs(5), "{name}: took {elapsed:?}");
            let gateway_error = |o: &Result<(u16, String), String>| {
                matches!(o, Ok((s, body)) if *s >= 500
                    && serde_json::from_str::<serde_json::Value>(body)
                        .is_ok_and(|v| v["error"]["message"].is_string()))
            };
            let cut = |o: &Result<(u16, String), String>| matches!(o, Err(e) if e.starts_with("cut after status 200"));
            let fine = match expect {
                Expect::GatewayError => gateway_error(&outcome),
                Expect::Cut => cut(&outcome),
                Expect::Body(want) => matches!(&outcome, Ok((200, b)) if b == want),
                Expect::GatewayErrorOrCut => gateway_error(&outcome) || cut(&outcome),
            };
            assert!(
                fine,
                "{name} (round {round}): expected {expect:?}, got {outcome:?}"
            );
            // Normal traffic is unaffected.
            normal(c.clone()).await;
        }
    }
    // Nothing is kept per failed exchange: descriptors are back (idle pooled
    // connections to the good upstream aside) and memory is near where it started.
    let settled = eventually(Duration::from_secs(5), || fds(pid) <= fds0 + 2).await;
    assert!(settled, "fds {} -> {}", fds0, fds(pid));
    let rss = rss_kib(pid);
    assert!(
        rss < rss0 + 16 * 1024,
        "RSS grew from {rss0} KiB to {rss} KiB"
    );
    let logs = gw.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}
