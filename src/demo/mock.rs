//! An OpenAI-compatible upstream that answers from a script: the backend of `tollgate
//! demo` (no key, no other server needed) and the fixture of the integration tests. By
//! default it answers like a model server (chat, completions, embeddings, responses,
//! Anthropic messages, SSE streams); a script can make it answer with any status, stream
//! slowly, cut a stream, hang, or close the connection, and it records what it received.
//! It is a real HTTP/1.1 server on loopback (hyper), not a stand-in inside the gateway.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer like a model server, streaming when the request asks for it.
    Model,
    /// A fixed status, headers and body.
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// An SSE response: each event is written as one chunk, `gap` apart. With `cut`, the
    /// connection is dropped after the last event instead of ending the body.
    Stream {
        events: Vec<String>,
        gap: Duration,
        cut: bool,
    },
    /// Wait, then answer with the inner reply.
    Delay(Duration, Box<Reply>),
    /// Read the request and never answer.
    Hang,
    /// Close the connection without answering.
    Close,
}

impl Reply {
    /// A JSON error body with a status, the way providers send them.
    pub fn error(status: u16, body: &str) -> Reply {
        Reply::Status {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
        }
    }
}

/// How many of the latest requests a mock keeps for [`MockUpstream::received`]; the
/// hit counter counts them all.
pub const KEPT_REQUESTS: usize = 4096;

/// What the upstream received, for assertions.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

struct State {
    name: String,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    /// The latest requests, at most [`KEPT_REQUESTS`] (the demo and benchmarks run for long).
    received: Mutex<VecDeque<Received>>,
    hits: AtomicUsize,
    connections: AtomicUsize,
    open_streams: AtomicUsize,
    cut_by_peer: AtomicUsize,
    /// Milliseconds between the events of a model's streamed answer.
    model_gap_ms: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running mock upstream. Stops when the runtime it was started on stops.
#[derive(Clone)]
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl MockUpstream {
    /// Starts on `127.0.0.1:0` on the current Tokio runtime.
    pub async fn start(name: &str) -> std::io::Result<MockUpstream> {
        Self::start_on(name, "127.0.0.1:0".parse().map_err(std::io::Error::other)?).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> std::io::Result<MockUpstream> {
        Self::serve(name, addr, None).await
    }

    /// Starts an HTTPS upstream on `127.0.0.1:0` with a PEM certificate chain and key.
    pub async fn start_tls(
        name: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> std::io::Result<MockUpstream> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(std::io::Error::other)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(std::io::Error::other)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::serve(
            name,
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            Some(acceptor),
        )
        .await
    }

    async fn serve(
        name: &str,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_string(),
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Reply::Model),
            received: Mutex::new(VecDeque::new()),
            hits: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open_streams: AtomicUsize::new(0),
            cut_by_peer: AtomicUsize::new(0),
            model_gap_ms: AtomicU64::new(20),
        });
        let accept_state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accept_state.connections.fetch_add(1, Ordering::Relaxed);
                let state = Arc::clone(&accept_state);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&state), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        Ok(MockUpstream { addr, state })
    }

    /// Starts on its own thread and runtime (for `tollgate demo`, before Pingora starts).
    pub fn start_in_thread(name: &str, addr: SocketAddr) -> std::io::Result<MockUpstream> {
        let (tx, rx) = std::sync::mpsc::channel();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("demo-upstream".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = MockUpstream::start_on(&name, addr).await;
                    let ok = started.is_ok();
                    let _ = tx.send(started);
                    if ok {
                        std::future::pending::<()>().await;
                    }
                });
            })?;
        rx.recv().map_err(std::io::Error::other)?
    }

    /// The base URL to put in a config: `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues replies for the next requests, in order; after them the default applies.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.state.script).extend(replies);
    }

    /// Drops the replies not used yet.
    pub fn clear_script(&self) {
        lock(&self.state.script).clear();
    }

    /// Sets the reply used when the script is empty.
    pub fn set_default(&self, reply: Reply) {
        *lock(&self.state.default) = reply;
    }

    /// Sets the time between the events of a model's streamed answer (20 ms unless set).
    pub fn set_stream_gap(&self, gap: Duration) {
        let ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
        self.state.model_gap_ms.store(ms, Ordering::Relaxed);
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// SSE responses being written right now.
    pub fn open_streams(&self) -> usize {
        self.state.open_streams.load(Ordering::Relaxed)
    }

    /// SSE responses whose reader went away before the end.
    pub fn cut_by_peer(&self) -> usize {
        self.state.cut_by_peer.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> Vec<Received> {
        lock(&self.state.received).iter().cloned().collect()
    }

    pub fn last(&self) -> Option<Received> {
        lock(&self.state.received).back().cloned()
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    state.hits.fetch_add(1, Ordering::Relaxed);
    {
        let mut kept = lock(&state.received);
        if kept.len() == KEPT_REQUESTS {
            kept.pop_front();
        }
        kept.push_back(Received {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(String::new, |p| p.to_string()),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }
    let reply = lock(&state.script)
        .pop_front()
        .unwrap_or_else(|| lock(&state.default).clone());
    answer(&state, reply, parts.uri.path(), &body).await
}

async fn answer(
    state: &Arc<State>,
    mut reply: Reply,
    path: &str,
    body: &Bytes,
) -> Result<Response<Body>, std::io::Error> {
    while let Reply::Delay(d, inner) = reply {
        tokio::time::sleep(d).await;
        reply = *inner;
    }
    match reply {
        Reply::Model => Ok(model_reply(state, path, body)),
        Reply::Status {
            status,
            headers,
            body,
        } => {
            let mut resp = Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
            for (k, v) in headers {
                resp = resp.header(k, v);
            }
            resp.body(full(body)).map_err(std::io::Error::other)
        }
        Reply::Stream { events, gap, cut } => Ok(sse(state, events, gap, cut)),
        Reply::Hang => {
            std::future::pending::<()>().await;
            Err(std::io::Error::other("unreachable"))
        }
        Reply::Close => Err(std::io::Error::other("scripted close")),
        Reply::Delay(..) => Err(std::io::Error::other("nested delay")),
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn json_response(v: Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Counts an open SSE response; notices when the reader left before the end.
struct StreamGuard {
    state: Arc<State>,
    finished: bool,
}

impl StreamGuard {
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.open_streams.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.state.cut_by_peer.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn sse(state: &Arc<State>, events: Vec<String>, gap: Duration, cut: bool) -> Response<Body> {
    state.open_streams.fetch_add(1, Ordering::Relaxed);
    let guard = StreamGuard {
        state: Arc::clone(state),
        finished: false,
    };
    let stream = futures_util::stream::unfold(
        (events.into_iter(), guard, true),
        move |(mut it, mut guard, first)| async move {
            if !first {
                tokio::time::sleep(gap).await;
            }
            match it.next() {
                Some(event) => Some((Ok(Frame::data(Bytes::from(event))), (it, guard, false))),
                None if cut => {
                    guard.finish();
                    Some((
                        Err(std::io::Error::other("scripted cut")),
                        (it, guard, false),
                    ))
                }
                None => {
                    guard.finish();
                    None
                }
            }
        },
    );
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}

/// SSE events of a chat completion streamed word by word, as OpenAI sends them.
pub fn chat_events(model: &str, text: &str, include_usage: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    for w in &words {
        events.push(chunk(json!({"content": w}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [], "usage": usage(8, words.len() as u64)})
        ));
    }
    events.push("data: [DONE]\n\n".to_string());
    events
}

/// SSE events of a message streamed word by word, as Anthropic sends them.
pub fn message_events(model: &str, text: &str) -> Vec<String> {
    // Every event with its members in Anthropic's order (`type` first), as its API
    // writes them.
    let event = |name: &str, data: String| format!("event: {name}\ndata: {data}\n\n");
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let mut events = vec![
        event(
            "message_start",
            format!(
                "{{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_mock\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{},\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":8,\"output_tokens\":1}}}}}}",
                Value::from(model)
            ),
        ),
        event(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#.into(),
        ),
    ];
    for w in &words {
        events.push(event(
            "content_block_delta",
            format!(
                "{{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":{}}}}}",
                Value::from(*w)
            ),
        ));
    }
    events.push(event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#.into(),
    ));
    events.push(event(
        "message_delta",
        format!(
            "{{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{}}}}}",
            words.len()
        ),
    ));
    events.push(event("message_stop", r#"{"type":"message_stop"}"#.into()));
    events
}

/// Gemini's partial answers of a text streamed word by word (`alt=sse`).
pub fn gemini_events(model: &str, text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let n = words.len();
    words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut c = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": w}]}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": i + 1, "totalTokenCount": 9 + i},
                "modelVersion": model, "responseId": "gemini-mock"});
            if i + 1 == n {
                c["candidates"][0]["finishReason"] = json!("STOP");
            }
            format!("data: {c}\r\n\r\n")
        })
        .collect()
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn model_reply(state: &Arc<State>, path: &str, body: &Bytes) -> Response<Body> {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = req["model"].as_str().unwrap_or("mock").to_string();
    let stream = req["stream"].as_bool().unwrap_or(false);
    let prompt = last_user_text(&req);
    let text = format!(
        "Hello from {}. You said: {}",
        state.name,
        prompt.chars().take(200).collect::<String>()
    );
    let suffix = path.rsplit("/v1").next().unwrap_or(path);
    // Azure: `/openai/deployments/{deployment}/chat/completions`.
    let suffix = match suffix.strip_prefix("/openai/deployments/") {
        Some(rest) => rest.find('/').map_or(rest, |i| &rest[i..]),
        None => suffix,
    };
    let gap = Duration::from_millis(state.model_gap_ms.load(Ordering::Relaxed));
    // Gemini: `/v1beta/models/{model}:generateContent` or `:streamGenerateContent`.
    if let Some((head, method)) = path.rsplit_once(':') {
        let model = head.rsplit('/').next().unwrap_or("gemini").to_string();
        let text = format!(
            "Hello from {}. You said: {}",
            state.name,
            gemini_prompt(&req)
        );
        return match method {
            "streamGenerateContent" => sse(state, gemini_events(&model, &text), gap, false),
            _ => json_response(json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": text.split(' ').count(), "totalTokenCount": 8 + text.split(' ').count()},
                "modelVersion": model, "responseId": "gemini-mock"
            })),
        };
    }
    match suffix {
        "/messages" if stream => sse(state, message_events(&model, &text), gap, false),
        "/chat/completions" if stream => {
            let include_usage = req["stream_options"]["include_usage"]
                .as_bool()
                .unwrap_or(false);
            sse(state, chat_events(&model, &text, include_usage), gap, false)
        }
        "/chat/completions" => json_response(json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage(8, text.split(' ').count() as u64)
        })),
        "/completions" => json_response(json!({
            "id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": null}],
            "usage": usage(8, text.split(' ').count() as u64)
        })),
        "/embeddings" => {
            let inputs = match &req["input"] {
                Value::Array(items) => items.len().max(1),
                _ => 1,
            };
            let data: Vec<Value> = (0..inputs)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]}))
                .collect();
            json_response(
                json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 8, "total_tokens": 8}}),
            )
        }
        "/responses" => json_response(json!({
            "id": "resp-mock", "object": "response", "created_at": 0, "model": model, "status": "completed",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
            "usage": {"input_tokens": 8, "output_tokens": text.split(' ').count(), "total_tokens": 8 + text.split(' ').count()}
        })),
        "/messages" => json_response(json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 8, "output_tokens": text.split(' ').count()}
        })),
        "/models" => json_response(
            json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "mock"}]}),
        ),
        _ => {
            let mut r = json_response(
                json!({"error": {"message": "not found", "type": "invalid_request_error", "param": null, "code": null}}),
            );
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

fn gemini_prompt(req: &Value) -> String {
    let last = req["contents"]
        .as_array()
        .and_then(|c| c.iter().rev().find(|c| c["role"] == "user"));
    last.and_then(|c| c["parts"][0]["text"].as_str())
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

fn last_user_text(req: &Value) -> String {
    if let Some(messages) = req["messages"].as_array() {
        if let Some(m) = messages.iter().rev().find(|m| m["role"] == "user") {
            return match &m["content"] {
                Value::String(s) => s.clone(),
                // Content blocks or parts: their text.
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            };
        }
    }
    match &req["prompt"] {
        Value::String(s) => s.clone(),
        _ => req["input"].as_str().unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_latest_requests_are_kept_but_every_hit_counts() {
        let up = MockUpstream::start("u").await.unwrap();
        let c = reqwest::Client::new();
        let url = format!("{}/embeddings", up.url());
        for i in 0..KEPT_REQUESTS + 5 {
            let r = c
                .post(&url)
                .body(format!("{{\"model\":\"m\",\"input\":\"{i}\"}}"))
                .send()
                .await
                .unwrap();
            r.bytes().await.unwrap();
        }
        assert_eq!(up.hits(), KEPT_REQUESTS + 5);
        let kept = up.received();
        assert_eq!(kept.len(), KEPT_REQUESTS);
        assert!(String::from_utf8_lossy(&kept[0].body).contains("\"5\""));
        let last = format!("\"{}\"", KEPT_REQUESTS + 4);
        assert!(String::from_utf8_lossy(&up.last().unwrap().body).contains(&last));
    }
}
