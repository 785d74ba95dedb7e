use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(5);

/// A connection to a loopback server that answers with `parts`, written one at a
/// time with a pause between them (so the reader sees them split), then closes.
async fn answered_with(parts: &[&'static [u8]]) -> Conn {
    answered_with_owned(parts.iter().map(|p| p.to_vec()).collect()).await
}

pub(super) async fn answered_with_owned(parts: Vec<Vec<u8>>) -> Conn {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Take the request first: closing with unread input would be a reset.
        let mut request = [0u8; 1024];
        let _ = s.read(&mut request).await;
        for p in parts {
            s.write_all(&p).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut conn = Conn::new(Box::new(pingora_core::protocols::l4::stream::Stream::from(
        tcp,
    )));
    conn.send(
        b"POST /v1/x HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n",
        b"{}",
        WAIT,
    )
    .await
    .unwrap();
    conn
}

pub(super) async fn body_of(conn: &mut Conn) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(chunk) = conn.read_body(WAIT).await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[tokio::test]
async fn a_chunked_body_split_anywhere_is_decoded_and_the_connection_is_reusable() {
    let mut conn = answered_with(&[
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r",
        b"\nhel",
        b"lo\r\n6\r\n world\r",
        b"\n0\r\nx-trailer: t\r\n",
        b"\r\n",
    ])
    .await;
    let head = conn.read_head(WAIT, false).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(body_of(&mut conn).await.unwrap(), b"hello world");
    assert!(conn.into_reusable().is_some());
}

#[tokio::test]
async fn interim_responses_are_skipped_and_a_length_body_ends_at_its_length() {
    let mut conn = answered_with(&[
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many Requests\r\ncontent-length: 5\r\n\r\nab",
        b"cde",
    ])
    .await;
    let head = conn.read_head(WAIT, false).await.unwrap();
    assert_eq!(head.status, 429);
    assert_eq!(head.headers["content-length"], "5");
    assert_eq!(body_of(&mut conn).await.unwrap(), b"abcde");
    assert!(conn.into_reusable().is_some());
}

#[tokio::test]
async fn bytes_past_the_body_make_the_connection_unusable() {
    let mut conn = answered_with(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"]).await;
    conn.read_head(WAIT, false).await.unwrap();
    assert_eq!(body_of(&mut conn).await.unwrap(), b"ok");
    assert!(conn.into_reusable().is_none());
}

#[tokio::test]
async fn a_body_without_length_runs_to_the_close_and_is_not_reused() {
    let mut conn = answered_with(&[b"HTTP/1.1 200 OK\r\n\r\nall ", b"of it"]).await;
    conn.read_head(WAIT, false).await.unwrap();
    assert_eq!(body_of(&mut conn).await.unwrap(), b"all of it");
    assert!(conn.into_reusable().is_none());
}

#[tokio::test]
async fn connection_close_and_plain_http_1_0_are_not_reused() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
        &b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
    ] {
        let mut conn = answered_with(&[answer]).await;
        conn.read_head(WAIT, false).await.unwrap();
        assert!(conn.read_body(WAIT).await.unwrap().is_none());
        assert!(conn.into_reusable().is_none());
    }
    let mut conn =
        answered_with(&[b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"])
            .await;
    conn.read_head(WAIT, false).await.unwrap();
    assert!(conn.read_body(WAIT).await.unwrap().is_none());
    assert!(conn.into_reusable().is_some());
}

#[tokio::test]
async fn transfer_encoding_beats_content_length_and_the_connection_is_not_reused() {
    let mut conn = answered_with(&[
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ])
    .await;
    let head = conn.read_head(WAIT, false).await.unwrap();
    assert!(!head.headers.contains_key("content-length"));
    assert_eq!(body_of(&mut conn).await.unwrap(), b"ok");
    assert!(conn.into_reusable().is_none());
}

#[tokio::test]
async fn a_cut_body_is_an_error_not_an_end() {
    let mut conn =
        answered_with(&[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel"]).await;
    conn.read_head(WAIT, false).await.unwrap();
    assert!(matches!(body_of(&mut conn).await, Err(Error::Closed)));
    let mut conn = answered_with(&[b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhel"]).await;
    conn.read_head(WAIT, false).await.unwrap();
    assert!(matches!(body_of(&mut conn).await, Err(Error::Closed)));
}

#[tokio::test]
async fn malformed_responses_are_refused() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"[..],
        &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
    ] {
        let mut conn = answered_with(&[answer]).await;
        let result = match conn.read_head(WAIT, false).await {
            Ok(_) => body_of(&mut conn).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            matches!(result, Err(Error::Malformed(_))),
            "{:?} gave {result:?}",
            String::from_utf8_lossy(answer)
        );
    }
}

#[tokio::test]
async fn no_header_in_time_is_a_timeout_and_nothing_received() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { listener.accept().await.unwrap() });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut conn = Conn::new(Box::new(pingora_core::protocols::l4::stream::Stream::from(
        tcp,
    )));
    let result = conn.read_head(Duration::from_millis(50), false).await;
    assert!(matches!(result, Err(Error::Timeout)));
    assert!(!conn.received_anything());
    drop(server);
}

#[tokio::test]
async fn the_read_size_grows_with_a_bulk_body_and_shrinks_when_it_thins() {
    static BIG: [u8; 300_000] = [b'x'; 300_000];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n493e0\r\n")
            .await
            .unwrap();
        s.write_all(&BIG).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            s.write_all(b"2\r\nab\r\n").await.unwrap();
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut conn = Conn::new(Box::new(pingora_core::protocols::l4::stream::Stream::from(
        tcp,
    )));
    conn.read_head(WAIT, false).await.unwrap();
    let mut total = 0;
    let mut largest = 0;
    while total < BIG.len() {
        total += conn.read_body(WAIT).await.unwrap().unwrap().len();
        largest = largest.max(conn.read_size);
    }
    assert_eq!(largest, MAX_READ);
    assert_eq!(body_of(&mut conn).await.unwrap(), b"ababababab");
    assert!(conn.read_size < MAX_READ, "read size {}", conn.read_size);
}

/// Between SSE events a stream holds no read buffer of its own: each event is read
/// through the thread's scratch buffer and handed out whole.
#[tokio::test]
async fn a_stream_waiting_for_its_next_event_holds_no_read_buffer() {
    let mut conn = answered_with(&[
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        b"b\r\ndata: one\n\n\r\n",
        b"b\r\ndata: two\n\n\r\n",
        b"0\r\n\r\n",
    ])
    .await;
    conn.read_head(WAIT, false).await.unwrap();
    let mut events = Vec::new();
    while let Some(piece) = conn.read_body(WAIT).await.unwrap() {
        events.push(piece);
        // What is held is what arrived and is not yet handed out (the chunk's CRLF),
        // not MIN_READ reserved for the next read.
        assert!(
            conn.buf.capacity() < MIN_READ / 8,
            "{} held",
            conn.buf.capacity()
        );
    }
    assert_eq!(events.concat(), b"data: one\n\ndata: two\n\n");
}
