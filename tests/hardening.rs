//! Hardening: what an adversarial client tried against the real binary, one regression
//! test per hole, named after what broke. Raw sockets where a polite client would hide
//! the behaviour; assertions on what the client saw, what the upstream received and what
//! the gateway holds (file descriptors).

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, chat_status, client, eventually, eventually_async, scrape, single, Gateway};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::demo::mock::MockUpstream;

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Reads until the gateway closes the connection (or `within` passes); what arrived.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

/// Whether the gateway closed `s` (end of stream or reset, after any answer) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Sends `GET /health` on `s` and checks the answer, so the connection is surely counted.
async fn health_on(s: &mut TcpStream) {
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}

/// Waits until the gateway counts no client connection (`tollgate_client_connections`).
async fn wait_for_no_connections(gw: &Gateway) {
    let none = || async {
        let metrics = common::scrape(gw).await;
        metrics
            .lines()
            .any(|l| l == "tollgate_client_connections 0")
    };
    assert!(
        eventually_async(Duration::from_secs(2), none).await,
        "client connections stay open"
    );
}

/// Regression: a client sending its header one byte at a time was never cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_sent_a_byte_at_a_time_gets_408_at_header_timeout() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server("  header_timeout: 1s\n", &single(&up.url()));
    let s = TcpStream::connect(&gw.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let started = Instant::now();
    let drip = tokio::spawn(async move {
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        for b in head {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Others are served meanwhile.
    assert_eq!(chat_status(&client(), &gw, "m").await, 200);
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), rd.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(elapsed < Duration::from_secs(6), "closed after {elapsed:?}");
    drip.abort();
    assert_eq!(up.hits(), 1, "only the normal request reached the upstream");
}

/// An idle keep-alive connection is closed after `keepalive_timeout`, counted from the end
/// of its last answer, and one that keeps sending requests stays open past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_at_keepalive_timeout() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server("  keepalive_timeout: 1s\n", &single(&up.url()));
    let mut busy = TcpStream::connect(&gw.addr).await.unwrap();
    let mut idle = TcpStream::connect(&gw.addr).await.unwrap();
    health_on(&mut idle).await;
    let answered = Instant::now();
    for _ in 0..6 {
        health_on(&mut busy).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // 1.8 s of requests 0.3 s apart: never idle for 1 s.
    health_on(&mut busy).await;
    assert!(closed_within(&mut idle, Duration::from_secs(3)).await);
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(950),
        "closed after {idle_for:?}"
    );
    assert!(
        closed_within(&mut busy, Duration::from_millis(2500)).await,
        "and the busy one once it idles"
    );
}

/// Regression: idle connections and half headers were kept until the fd limit ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_and_their_fds_given_back() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server("  header_timeout: 5s\n", &single(&up.url()));
    let pid = gw.pid();
    assert!(eventually(Duration::from_secs(5), || fds(pid) > 0).await);
    // A steady baseline: one request served and its usage row written, so the store's
    // files (database, WAL, shared memory) are already open.
    assert_eq!(chat_status(&client(), &gw, "m").await, 200);
    let written = || async {
        scrape(&gw)
            .await
            .contains("tollgate_usage_rows_total{result=\"written\"} 1")
    };
    assert!(eventually_async(Duration::from_secs(5), written).await);
    let baseline = fds(pid);
    let mut conns = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(&gw.addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost:")
                .await
                .unwrap();
        }
        conns.push(s);
    }
    assert!(
        eventually(Duration::from_secs(4), || fds(pid) >= baseline + 95).await,
        "the gateway holds them: {} fds, baseline {baseline}",
        fds(pid)
    );
    assert!(
        eventually(Duration::from_secs(12), || fds(pid) <= baseline + 2).await,
        "still {} fds, baseline {baseline}",
        fds(pid)
    );
    for s in &mut conns {
        assert!(closed_within(s, Duration::from_secs(2)).await);
    }
    assert_eq!(chat_status(&client(), &gw, "m").await, 200);
}

/// Regression: a body that stalls half way was never cut off, and held the key's
/// concurrency slot all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_at_body_timeout_and_holds_no_concurrency_slot() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server(
        "  body_timeout: 1s\n",
        &format!(
            "keys:\n  - {{name: a, key: tg-key-a-00000000, limits: {{concurrency: 1}}}}\n{}",
            single(&up.url())
        ),
    );
    let mut s = TcpStream::connect(&gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tg-key-a-00000000\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let started = Instant::now();
    // The same key is served while the upload stalls.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("tg-key-a-00000000")
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer = read_until_closed(&mut s, Duration::from_secs(8)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(answer.contains("nothing arrived for 1s"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_eq!(up.hits(), 1);
}

/// A body the answer did not need (a health check's) never holds the connection: whether
/// it came whole or stalled part way, the connection is closed after the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_left_unread_after_an_answer_never_holds_the_connection() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server("  body_timeout: 30s\n", &single(&up.url()));
    for request in [
        &b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nabcd"[..],
        b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{",
    ] {
        let mut s = TcpStream::connect(&gw.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let started = Instant::now();
        let answer = read_until_closed(&mut s, Duration::from_secs(8)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
        // Far less than the 30 s a stalled body may take.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "closed after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(up.hits(), 0);
}

/// The per-IP cap: connections over it are closed on arrival, logged, and the IP can
/// connect again once one of its connections ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_ip_cap_are_closed_on_arrival() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server("  max_connections_per_ip: 2\n", &single(&up.url()));
    let c = client();
    // The harness's readiness probe may still be counted for a moment.
    wait_for_no_connections(&gw).await;
    let mut a = TcpStream::connect(&gw.addr).await.unwrap();
    let mut b = TcpStream::connect(&gw.addr).await.unwrap();
    health_on(&mut a).await;
    health_on(&mut b).await;
    let mut third = TcpStream::connect(&gw.addr).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(2)).await);
    assert!(!closed_within(&mut b, Duration::from_millis(300)).await);
    // A refused connection never counts as open (the gauge once dropped by one for each).
    let open = common::scrape(&gw).await;
    assert!(
        open.lines().any(|l| l == "tollgate_client_connections 2"),
        "{open}"
    );
    drop(a);
    drop(b);
    let connects = || async { c.get(gw.url("/health")).send().await.is_ok() };
    let ok = eventually_async(Duration::from_millis(2500), connects).await;
    assert!(ok, "the IP can connect again");
    let logs = gw.logs();
    assert!(
        logs.contains("the cap of 2 (server.max_connections_per_ip) is reached"),
        "{logs}"
    );
    let metrics = common::scrape(&gw).await;
    assert!(
        metrics.contains(
            "tollgate_client_connections_refused_total{reason=\"max_connections_per_ip\"}"
        ),
        "{metrics}"
    );
}

/// The total cap closes what is over it, whoever it comes from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_closed_on_arrival() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server("  max_connections: 3\n", &single(&up.url()));
    wait_for_no_connections(&gw).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(&gw.addr).await.unwrap();
        health_on(&mut s).await;
        held.push(s);
    }
    let mut over = TcpStream::connect(&gw.addr).await.unwrap();
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);
    held.clear();
    assert!(
        eventually(Duration::from_secs(3), || {
            std::net::TcpStream::connect(&gw.addr)
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_millis(500)))?;
                    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
                    let mut out = Vec::new();
                    s.read_to_end(&mut out)?;
                    Ok(out.starts_with(b"HTTP/1.1 200"))
                })
                .unwrap_or(false)
        })
        .await
    );
    assert!(gw
        .logs()
        .contains("the cap of 3 (server.max_connections) is reached"));
}

/// Sends `head` and `body_len` bytes of body on a blocking socket (the way Python's
/// clients do: the whole body first), then reads the answer to the end.
fn upload_then_read(addr: &str, head: &str, body_len: usize) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_write_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(head.as_bytes())?;
    let piece = vec![b' '; 64 * 1024];
    let mut left = body_len;
    while left > 0 {
        let n = left.min(piece.len());
        s.write_all(&piece[..n])?;
        left -= n;
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Regression: a client still uploading got a reset instead of the 413 (or 401) the
/// gateway answered early, and the OpenAI SDK retried the whole upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_or_401_reaches_a_client_that_is_still_uploading() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server(
        "  max_body_size: 1MiB\n",
        &format!(
            "keys:\n  - {{name: a, key: tg-key-a-00000000}}\n{}",
            single(&up.url())
        ),
    );
    let len = 8 << 20;
    for (key, status) in [("tg-key-a-00000000", "413"), ("wrong-key-00000000", "401")] {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
        );
        let addr = gw.addr.clone();
        let answer = tokio::task::spawn_blocking(move || upload_then_read(&addr, &head, len))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{status}: the upload failed: {e}"));
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer:?}"
        );
    }
    // Chunked, so the size is only found while reading.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tg-key-a-00000000\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let addr = gw.addr.clone();
    let answer = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(head.as_bytes())?;
        let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
        for _ in 0..48 {
            s.write_all(chunk.as_bytes())?;
        }
        s.write_all(b"0\r\n\r\n")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .unwrap()
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer:?}");
    assert_eq!(up.hits(), 0);
}

/// Regression: a request with both Transfer-Encoding and Content-Length kept its
/// connection open (RFC 9112 6.1: chunked wins, and the connection closes after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_with_content_length_is_read_as_chunked_and_closes() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(&gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 200 "), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let got = up.last().unwrap();
    assert_eq!(&got.body[..], body.as_bytes());
}

/// Regression: a malformed chunked body was answered 500 and counted as a server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_a_400_not_a_server_error() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    let mut s = TcpStream::connect(&gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("chunked framing"), "{answer}");
    assert_eq!(up.hits(), 0);
    let metrics = common::scrape(&gw).await;
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_requests_total{"))
        .collect();
    assert!(
        requests.iter().any(|l| l.contains("code=\"400\"")),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|l| l.contains("code=\"5")),
        "{requests:?}"
    );
}

/// Regression: with `stream_usage` on, an SSE event that never ended was held (and
/// rescanned on every chunk) without bound, and the client got nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_event_that_never_ends_is_passed_through_not_held() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    stream_usage: true\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
        up.url()
    ));
    let piece = "x".repeat(64 * 1024);
    let mut events = vec![format!("data: {piece}")];
    events.extend(std::iter::repeat_n(piece, 31));
    up.push([tollgate::demo::mock::Reply::Stream {
        events,
        gap: Duration::from_millis(5),
        cut: true,
    }]);
    let c = client();
    let mut r = c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = 0;
    while let Ok(Some(chunk)) = r.chunk().await {
        got += chunk.len();
    }
    assert!(got >= 2 << 20, "the client got {got} bytes");
    let metrics = common::scrape(&gw).await;
    assert!(
        metrics.contains("tollgate_sse_filter_bypassed_total 1"),
        "{metrics}"
    );
    assert!(up
        .last()
        .unwrap()
        .body
        .windows(13)
        .any(|w| w == b"include_usage"));
}

/// Counts the HTTP responses in `bytes` (each starts with a status line).
fn responses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text[i + 9..i + 12].parse().ok())
        .collect()
}

/// Regression: of three pipelined requests only the first was answered. They are now
/// answered in order; a pipelined request's body is not mistaken for a header (a body
/// arriving slower than header_timeout is fine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start_with_server("  header_timeout: 1s\n", &single(&up.url()));
    let body =
        |n: u32| format!(r#"{{"model":"m","messages":[{{"role":"user","content":"n{n}"}}]}}"#);
    let req = |n: u32| {
        let b = body(n);
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
            b.len()
        )
    };
    let mut s = TcpStream::connect(&gw.addr).await.unwrap();
    s.write_all(
        format!(
            "{}{}{}",
            req(1),
            req(2),
            "GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while responses(&got).len() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("three answers")
            .unwrap();
        assert!(n > 0, "closed after {:?}", responses(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(responses(&got), [200, 200, 200]);
    let text = String::from_utf8_lossy(&got);
    let (one, two) = (text.find("You said: n1"), text.find("You said: n2"));
    assert!(one.is_some() && one < two, "{text}");
    let bodies: Vec<String> = up
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(bodies, [body(1), body(2)]);

    // The next request's header rides along with this one; its body comes slowly.
    let b3 = body(3);
    let head3 = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        b3.len()
    );
    s.write_all(format!("{}{head3}{}", req(4), &b3[..5]).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&b3.as_bytes()[5..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(&b3.as_bytes()[10..]).await.unwrap();
    let mut got = Vec::new();
    while responses(&got).len() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("two answers")
            .unwrap();
        assert!(n > 0, "closed after {:?}", responses(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(responses(&got), [200, 200]);
}

/// A request header far over Pingora's 1 MiB is refused with 400 and costs nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_header_is_refused_and_normal_requests_go_on() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    let mut s = TcpStream::connect(&gw.addr).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let send = async {
        let _ = wr
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            .await;
        let line = format!("x-filler: {}\r\n", "a".repeat(8000));
        for _ in 0..400 {
            if wr.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    };
    let mut answer = Vec::new();
    let read = async {
        let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut answer)).await;
    };
    tokio::join!(send, read);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert_eq!(chat_status(&client(), &gw, "m").await, 200);
    assert_eq!(up.hits(), 1);
}

/// A shell's soft open-file limit (often 1024) would cap the gateway far below what the
/// machine allows: it is raised to the hard limit at start, and the default connection
/// cap follows from that.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("t.yaml");
    std::fs::write(
        &conf,
        format!(
            "store:\n  url: sqlite://{d}/t.db\nserver:\n  listen: [\"127.0.0.1:0\"]\n  admin_listen: \"127.0.0.1:0\"\n  pid_file: {d}/p.pid\n  upgrade_sock: {d}/u.sock\n{}",
            single("http://127.0.0.1:1"),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} -c {}",
            env!("CARGO_BIN_EXE_tollgate"),
            conf.display()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut pid = None;
    while std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0 {
        if let Some(p) = line.strip_prefix("tollgate: pid ") {
            pid = p.trim().parse::<u32>().ok();
            break;
        }
        line.clear();
    }
    let pid = pid.expect("the gateway printed its pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
    let hard: u64 = numbers[1].parse().unwrap_or(u64::MAX);
    let soft: u64 = numbers[0].parse().unwrap_or(u64::MAX);
    assert_eq!(soft, hard.min(1 << 20), "{files}");
}

/// A request header that is not HTTP gets 400 and a CONNECT 405, each closing its
/// connection; neither reaches the upstream, and the next client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_line_gets_400_and_connect_gets_405() {
    let up = MockUpstream::start("u").await.unwrap();
    let gw = Gateway::start(&single(&up.url()));
    for (head, status) in [
        (&b"this is not http\r\n\r\n"[..], 400),
        (
            &b"CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\n\r\n"[..],
            405,
        ),
    ] {
        let mut s = TcpStream::connect(&gw.addr).await.unwrap();
        s.write_all(head).await.unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert_eq!(
            responses(&got),
            [status],
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(chat_status(&client(), &gw, "m").await, 200);
    assert_eq!(up.hits(), 1);
}

/// When the server starts shutting down (SIGTERM), a keep-alive connection waiting for
/// its next request is closed at once, not at the end of the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let up = MockUpstream::start("u").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "server:\n  listen: [\"127.0.0.1:0\"]\n  admin_listen: \"127.0.0.1:0\"\n  threads: 1\n  grace_period: 30s\n  pid_file: {d}/tollgate.pid\n  upgrade_sock: {d}/upgrade.sock\n{}",
        single(&up.url()),
        d = dir.path().display()
    );
    let gw = Gateway::start(&text);
    let mut s = TcpStream::connect(&gw.addr).await.unwrap();
    health_on(&mut s).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(
        std::path::Path::new(&format!("/proc/{}", gw.pid())).exists(),
        "the gateway is still in its grace period"
    );
}
