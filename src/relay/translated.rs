//! Relaying an answer in another format than the client's. A complete answer (and any
//! error answer) is read whole, translated and written with its length; a stream is
//! translated event by event as the upstream's reads arrive, never held back. Usage is
//! read from the upstream's own bytes, before translation, so accounting is the same as
//! for pass-through.

use super::{downstream_header, is_event_stream, Answer, Relayed, Stamp, StreamEnd};
use crate::provider::translate::Translation;
use crate::relay::usage::UsageScanner;
use crate::transport::h1::Error as H1Error;
use crate::transport::pool::Connections;
use bytes::Bytes;
use http::HeaderValue;
use pingora_core::{Error, ErrorType};
use pingora_proxy::Session;
use std::time::Instant;

/// The largest complete answer translated; a larger one is refused (502) rather than
/// held without bound.
const MAX_ANSWER: usize = 32 << 20;

/// What the client gets for an answer the gateway could not translate.
fn untranslatable(t: Translation, why: &str) -> (u16, Vec<u8>) {
    let message = format!("The upstream's answer could not be translated: {why}");
    let body = t.error(502, message.as_bytes());
    (502, body)
}

/// Relays `answer`, translated by `t`. `include_usage`: an OpenAI client asked for the
/// usage chunk.
pub async fn relay(
    session: &mut Session,
    connections: &Connections,
    answer: Answer,
    t: Translation,
    include_usage: bool,
    stamp: &Stamp<'_>,
    relayed: &mut Relayed,
) -> pingora_core::Result<()> {
    let Answer {
        mut sent,
        idle_timeout,
        price,
        created,
        ..
    } = answer;
    let status = sent.status();
    let sse = status < 300 && is_event_stream(&sent.head);
    let mut usage = UsageScanner::new(sse);
    let prefix: Vec<Bytes> = std::mem::take(&mut sent.prefix);
    let headers = &mut sent.head.headers;
    headers.remove(http::header::CONTENT_LENGTH);
    headers.remove(http::header::CONTENT_ENCODING);
    if !sse {
        let mut up = sent.conn;
        let mut chunks = prefix;
        if !sent.ended {
            let read =
                super::read_whole(session, &mut up, &mut chunks, idle_timeout, MAX_ANSWER).await;
            // An answer past the cap is refused rather than held without bound.
            let failed = match read {
                Ok(true) => None,
                Ok(false) => Some(StreamEnd::UpstreamError),
                Err(end) => Some(end),
            };
            if let Some(end) = failed {
                relayed.end = Some(end);
                return Error::e_explain(ErrorType::ReadError, "upstream answer not read whole");
            }
        }
        let body: Vec<u8> = chunks.concat();
        connections.give_back(up, sent.pool_key, idle_timeout);
        usage.feed(&body);
        relayed.usage = usage.finish();
        let (status, out) = if status < 300 {
            match t.answer(&body, created) {
                Ok(out) => (status, out),
                Err(why) => untranslatable(t, &why),
            }
        } else {
            (status, t.error(status, &body))
        };
        let mut head = sent.head;
        head.status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        head.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        head.headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        if let (Some(p), Some(u), true) = (price, relayed.usage, status < 300) {
            head.headers
                .insert(super::COST_HEADER, super::cost_value(p.cost(&u)));
        }
        let header = downstream_header(head, !session.is_http2(), stamp);
        relayed.status = status;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        let out = Bytes::from(out);
        relayed.first_byte = Some(Instant::now());
        relayed.bytes = out.len();
        if let Some(c) = relayed.capture.as_mut() {
            c.keep(&out);
        }
        relayed.end = Some(StreamEnd::Complete);
        return session.write_response_body(Some(out), true).await;
    }

    let http1 = !session.is_http2();
    let header = downstream_header(sent.head, http1, stamp);
    relayed.status = header.status.as_u16();
    session
        .write_response_header(Box::new(header), false)
        .await?;
    let mut stream = t.stream(created, include_usage);
    let mut up = sent.conn;
    let mut out = Vec::with_capacity(1024);
    for chunk in prefix {
        stream.feed(&chunk, &mut out, |data| usage.event_data(data));
    }
    let mut end = if sent.ended {
        Some(StreamEnd::Complete)
    } else {
        None
    };
    loop {
        if !out.is_empty() {
            // Copied, so that `out` keeps its capacity for the next read.
            let chunk = Bytes::copy_from_slice(&out);
            out.clear();
            relayed.first_byte.get_or_insert_with(Instant::now);
            relayed.bytes += chunk.len();
            if let Some(c) = relayed.capture.as_mut() {
                c.keep(&chunk);
            }
            if session
                .write_response_body(Some(chunk), false)
                .await
                .is_err()
            {
                end = Some(StreamEnd::ClientGone);
                break;
            }
        }
        if end.is_some() {
            break;
        }
        let read = tokio::select! {
            biased;
            chunk = up.read_body(idle_timeout) => chunk,
            _ = session.downstream_session.read_body_or_idle(true) => {
                end = Some(StreamEnd::ClientGone);
                break;
            }
        };
        match read {
            Ok(Some(chunk)) => {
                stream.feed(&chunk, &mut out, |data| usage.event_data(data));
            }
            Ok(None) => end = Some(StreamEnd::Complete),
            Err(H1Error::Timeout) => end = Some(StreamEnd::UpstreamTimeout),
            Err(_) => end = Some(StreamEnd::UpstreamError),
        }
    }
    let mut end = end.unwrap_or(StreamEnd::UpstreamError);
    let mut tail = Vec::new();
    match end {
        StreamEnd::Complete => {
            if !stream.finish(&mut tail, |data| usage.event_data(data)) {
                // The upstream ended its body without ending the answer.
                end = StreamEnd::UpstreamError;
            }
        }
        StreamEnd::UpstreamTimeout => stream.fail(
            "The upstream stopped sending in the middle of the stream (idle timeout).",
            &mut tail,
        ),
        StreamEnd::UpstreamError => stream.fail(
            "The upstream connection failed in the middle of the stream.",
            &mut tail,
        ),
        StreamEnd::ClientGone => {}
    }
    // After the last event (one the upstream did not end with a blank line counts too).
    relayed.usage = usage.finish();
    if !tail.is_empty() {
        let tail = Bytes::from(tail);
        relayed.bytes += tail.len();
        if let Some(c) = relayed.capture.as_mut() {
            c.keep(&tail);
        }
        let _ = session.write_response_body(Some(tail), false).await;
    }
    relayed.end = Some(end);
    match end {
        StreamEnd::Complete => {
            connections.give_back(up, sent.pool_key, idle_timeout);
            Ok(())
        }
        StreamEnd::ClientGone => {
            drop(up);
            Error::e_explain(
                ErrorType::ConnectionClosed,
                "client disconnected mid-response",
            )
        }
        _ => {
            drop(up);
            Error::e_explain(ErrorType::ReadError, "upstream failed mid-response")
        }
    }
}
