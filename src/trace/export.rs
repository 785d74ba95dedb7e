//! The OTLP/HTTP exporter: a bounded queue of finished spans and one thread that sends
//! them in batches as protobuf (`application/x-protobuf`) to `tracing.otlp.endpoint`.
//! Nothing here runs on the request path but the queue push: a full queue drops the span
//! (counted in `tollgate_trace_spans_total{result="dropped"}`, logged at most every 10 s),
//! and a slow or unreachable collector only ever delays this thread.

use super::{Settings, SpanData};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use prost::Message as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

enum Msg {
    Span(Box<SpanData>),
    /// Send what is queued, then answer.
    Flush(SyncSender<()>),
}

/// The request path's end of the export queue.
pub struct Exporter {
    tx: SyncSender<Msg>,
    /// When the last warning about dropped spans was logged (ms since `epoch`).
    warned_at: AtomicU64,
    epoch: Instant,
}

/// Warnings about dropped or failed spans, at most one per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

fn count(result: &str, n: usize) {
    if let Some(m) = crate::metrics::get() {
        m.trace_spans.with_label_values(&[result]).inc_by(n as u64);
    }
}

impl Exporter {
    pub fn start(settings: &Settings) -> std::io::Result<Exporter> {
        let (tx, rx) = sync_channel(settings.queue.max(1));
        let sender = Sender::new(settings);
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || sender.run(rx))?;
        Ok(Exporter {
            tx,
            warned_at: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub fn push(&self, span: SpanData) {
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                count("dropped", 1);
                let now = self.epoch.elapsed().as_millis() as u64 + WARN_EVERY.as_millis() as u64;
                let last = self.warned_at.load(Ordering::Relaxed);
                if now >= last + WARN_EVERY.as_millis() as u64
                    && self
                        .warned_at
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    log::warn!("tracing: the export queue is full; spans are being dropped (see tollgate_trace_spans_total)");
                }
            }
        }
    }

    pub fn flush(&self, timeout: Duration) {
        let (done, wait) = sync_channel(1);
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

/// The exporter thread's side.
struct Sender {
    endpoint: String,
    headers: Vec<(String, String)>,
    resource: ResourceAttributesWithSchema,
    batch: usize,
    delay: Duration,
    timeout: Duration,
    warned: Option<Instant>,
}

impl Sender {
    fn new(s: &Settings) -> Sender {
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(s.service_name.clone())
            .build();
        Sender {
            endpoint: s.endpoint.clone(),
            headers: s
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
            resource: (&resource).into(),
            batch: s.batch.max(1),
            delay: s.delay,
            timeout: s.timeout,
            warned: None,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        // Built on this thread: the blocking client runs its own small runtime.
        let client = reqwest::blocking::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .build();
        let client = match client {
            Ok(c) => Some(c),
            Err(e) => {
                log::error!(
                    "tracing: cannot build the OTLP client: {e}; spans will not be exported"
                );
                None
            }
        };
        let mut batch: Vec<SpanData> = Vec::with_capacity(self.batch);
        let mut due: Option<Instant> = None;
        loop {
            let wait = due.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(Msg::Span(span)) => {
                    if batch.is_empty() {
                        due = Some(Instant::now() + self.delay);
                    }
                    batch.push(*span);
                    if batch.len() >= self.batch {
                        self.send(client.as_ref(), &mut batch);
                        due = None;
                    }
                }
                Ok(Msg::Flush(done)) => {
                    self.send(client.as_ref(), &mut batch);
                    due = None;
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.send(client.as_ref(), &mut batch);
                    due = None;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.send(client.as_ref(), &mut batch);
                    return;
                }
            }
        }
    }

    fn send(&mut self, client: Option<&reqwest::blocking::Client>, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let spans = std::mem::replace(batch, Vec::with_capacity(self.batch));
        let Some(client) = client else {
            count("failed", n);
            return;
        };
        let body = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &self.resource),
        }
        .encode_to_vec();
        let mut request = client
            .post(&self.endpoint)
            .header("content-type", "application/x-protobuf");
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let failure = match request.body(body).send() {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("the collector answered {}", r.status().as_u16())),
            // Without the URL: it may hold a credential.
            Err(e) => Some(describe(&e)),
        };
        match failure {
            None => count("exported", n),
            Some(why) => {
                count("failed", n);
                if self.warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
                    self.warned = Some(Instant::now());
                    log::warn!("tracing: {n} spans not exported: {why}");
                }
            }
        }
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "the collector did not answer in time".into()
    } else if e.is_connect() {
        "cannot connect to the collector".into()
    } else {
        "the export request failed".into()
    }
}
