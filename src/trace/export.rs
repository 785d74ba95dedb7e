//! The OTLP/HTTP exporter: a bounded buffer of encoded spans and one thread that sends
//! them in batches as protobuf (`application/x-protobuf`) to `tracing.otlp.endpoint`.
//! The request path only appends its spans' bytes under a lock and never wakes the
//! thread unless a batch is full: a full buffer drops the spans (counted in
//! `tollgate_trace_spans_total{result="dropped"}`, logged at most every 10 s), and a slow
//! or unreachable collector only ever delays this thread.

use super::wire::Preamble;
use super::Settings;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Warnings about dropped or failed spans, at most one per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Pending {
    /// `ScopeSpans.spans` entries, ready to be wrapped in a request.
    bytes: Vec<u8>,
    spans: usize,
    /// When the oldest span waiting arrived.
    since: Option<Instant>,
    /// Flushes asked for, and done.
    asked: u64,
    done: u64,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the exporter: a batch is full, a flush is asked, or the gateway stops.
    wake: Condvar,
    /// Wakes those waiting for a flush.
    flushed: Condvar,
    queue: usize,
    batch: usize,
}

fn lock(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn count(result: &str, n: usize) {
    if let Some(m) = crate::metrics::get() {
        m.trace_spans.with_label_values(&[result]).inc_by(n as u64);
    }
}

/// The request path's end of the export buffer.
pub struct Exporter {
    shared: Arc<Shared>,
    /// When the last warning about dropped spans was logged (ms since `epoch`, plus the
    /// interval, so that the first drop warns).
    warned_at: AtomicU64,
    epoch: Instant,
}

impl Exporter {
    pub fn start(settings: &Settings) -> std::io::Result<Exporter> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            queue: settings.queue.max(1),
            batch: settings.batch.max(1),
        });
        let sender = Sender::new(settings, Arc::clone(&shared));
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || sender.run())?;
        Ok(Exporter {
            shared,
            warned_at: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Queues `spans` spans encoded in `bytes`; a full buffer drops them.
    pub fn push(&self, bytes: &[u8], spans: usize) {
        let s = &self.shared;
        let mut p = lock(&s.pending);
        if p.spans + spans > s.queue {
            drop(p);
            self.dropped(spans);
            return;
        }
        // The exporter is woken by the first span of a batch (to time `batch_delay`
        // from it) and by the one that fills it, not by every span.
        let first = p.spans == 0;
        if first {
            p.since = Some(Instant::now());
        }
        p.bytes.extend_from_slice(bytes);
        p.spans += spans;
        let full = p.spans >= s.batch;
        drop(p);
        if first || full {
            s.wake.notify_one();
        }
    }

    fn dropped(&self, spans: usize) {
        count("dropped", spans);
        let every = WARN_EVERY.as_millis() as u64;
        let now = self.epoch.elapsed().as_millis() as u64 + every;
        let last = self.warned_at.load(Ordering::Relaxed);
        if now >= last + every
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!("tracing: the export queue is full; spans are being dropped (see tollgate_trace_spans_total)");
        }
    }

    /// Sends what is queued and waits up to `timeout` for it to be exported.
    pub fn flush(&self, timeout: Duration) {
        let s = &self.shared;
        let mut p = lock(&s.pending);
        p.asked += 1;
        let want = p.asked;
        s.wake.notify_one();
        let deadline = Instant::now() + timeout;
        while p.done < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            p = s
                .flushed
                .wait_timeout(p, left)
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
    }
}

/// The exporter thread's side.
struct Sender {
    shared: Arc<Shared>,
    endpoint: String,
    headers: Vec<(String, String)>,
    preamble: Preamble,
    delay: Duration,
    timeout: Duration,
    warned: Option<Instant>,
}

impl Sender {
    fn new(s: &Settings, shared: Arc<Shared>) -> Sender {
        Sender {
            shared,
            endpoint: s.endpoint.clone(),
            headers: s
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
            preamble: Preamble::new(&s.service_name),
            delay: s.delay,
            timeout: s.timeout,
            warned: None,
        }
    }

    fn run(mut self) {
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
        let shared = Arc::clone(&self.shared);
        let mut spare = Vec::new();
        loop {
            let mut p = lock(&shared.pending);
            // Wait for a full batch, a flush, the stop, or `delay` after the first span.
            while p.spans < shared.batch && p.asked == p.done && !p.closed {
                let left = match p.since {
                    None => Duration::from_secs(3600),
                    Some(t) => self.delay.saturating_sub(t.elapsed()),
                };
                if left.is_zero() {
                    break;
                }
                p = shared
                    .wake
                    .wait_timeout(p, left)
                    .map_or_else(|e| e.into_inner().0, |r| r.0);
            }
            let asked = p.asked;
            let closed = p.closed;
            let n = std::mem::take(&mut p.spans);
            p.since = None;
            std::mem::swap(&mut p.bytes, &mut spare);
            drop(p);
            if n > 0 {
                self.send(client.as_ref(), &spare, n);
            }
            spare.clear();
            let mut p = lock(&shared.pending);
            p.done = asked;
            drop(p);
            shared.flushed.notify_all();
            if closed {
                return;
            }
        }
    }

    fn send(&mut self, client: Option<&reqwest::blocking::Client>, spans: &[u8], n: usize) {
        let Some(client) = client else {
            count("failed", n);
            return;
        };
        let body = self.preamble.request(spans);
        let mut request = client
            .post(&self.endpoint)
            .header("content-type", "application/x-protobuf");
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let failure = match request.body(body).send() {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("the collector answered {}", r.status().as_u16())),
            Err(e) => Some(format!(
                "the collector: {}",
                crate::transport::client_error(&e)
            )),
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
