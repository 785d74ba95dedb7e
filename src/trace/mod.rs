//! Distributed tracing (`tracing.*`): the trace a request belongs to, the sampling
//! decision, and the OTLP export of finished spans.
//!
//! A request's trace context is decided when it arrives: the client's W3C `traceparent`
//! (and `tracestate`) is read, the parent-based sampler of the OpenTelemetry SDK decides,
//! and span ids are drawn for the request's SERVER span and, as they happen, for each
//! upstream attempt's CLIENT span (whose id goes upstream in `traceparent`). The spans
//! themselves are written once, when the request has ended (`observe::spans`), from what
//! the access log records, straight into OTLP protobuf (`wire`): nothing is kept open
//! while a stream runs. Unsampled requests still carry their trace id upstream (flag
//! `00`) and are never exported.

mod export;
pub mod wire;

pub use export::Exporter;
pub use opentelemetry::trace::{SpanId, TraceId};

use crate::secret::Secret;
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, ShouldSample};
use std::sync::Arc;
use std::time::Duration;

/// What `tracing:` configures, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The OTLP/HTTP traces URL (`…/v1/traces`).
    pub endpoint: String,
    /// Extra request headers for the collector (an API key, say).
    pub headers: Vec<(String, Secret)>,
    /// The share of new traces recorded, 0 to 1. A sampled or unsampled `traceparent`
    /// from the client decides for its request instead.
    pub sample_ratio: f64,
    pub service_name: String,
    /// Prompts and answers as span events (off by default).
    pub capture_content: bool,
    /// At most this many bytes of each prompt or answer event.
    pub content_limit: usize,
    /// Spans waiting for export; past this, spans are dropped and counted.
    pub queue: usize,
    /// Spans per export request.
    pub batch: usize,
    /// How long spans may wait before a partial batch is sent.
    pub delay: Duration,
    /// Per export request.
    pub timeout: Duration,
}

/// The tracing of a running gateway: the sampler and the exporter's queue.
pub struct Tracer {
    sampler: Sampler,
    ids: RandomIdGenerator,
    exporter: Exporter,
}

/// One request's place in a trace.
#[derive(Debug, Clone)]
pub struct TraceCtx {
    pub trace_id: TraceId,
    /// The gateway's SERVER span.
    pub span_id: SpanId,
    /// The client's span, when the client sent a valid `traceparent`.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    /// The client's `tracestate`, passed on unchanged.
    pub state: Option<String>,
    /// The trace id in hex, written once for the log, the answer and the upstream.
    hex: TraceIdHex,
}

/// A trace id as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy)]
struct TraceIdHex([u8; 32]);

impl TraceIdHex {
    fn new(id: TraceId) -> TraceIdHex {
        let mut out = [0u8; 32];
        for (i, b) in id.to_bytes().iter().enumerate() {
            out[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
            out[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 15)];
        }
        TraceIdHex(out)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Tracer {
    /// Starts the exporter's thread.
    pub fn start(settings: Settings) -> std::io::Result<Arc<Tracer>> {
        let exporter = Exporter::start(&settings)?;
        Ok(Arc::new(Tracer {
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))),
            ids: RandomIdGenerator::default(),
            exporter,
        }))
    }

    /// The trace context of a request that sent these `traceparent` and `tracestate`
    /// values (if any): the client's trace continued, or a new one.
    pub fn begin(&self, traceparent: Option<&[u8]>, tracestate: Option<&[u8]>) -> TraceCtx {
        let remote = traceparent.and_then(parse_traceparent);
        let trace_id = remote.map_or_else(|| self.ids.new_trace_id(), |r| r.0);
        let parent_cx = remote.map(|(t, s, flags)| {
            Context::new().with_remote_span_context(SpanContext::new(
                t,
                s,
                flags,
                true,
                TraceState::NONE,
            ))
        });
        let decision = self.sampler.should_sample(
            parent_cx.as_ref(),
            trace_id,
            "",
            &SpanKind::Server,
            &[],
            &[],
        );
        let sampled = matches!(
            decision.decision,
            opentelemetry_sdk::trace::SamplingDecision::RecordAndSample
        );
        TraceCtx {
            trace_id,
            hex: TraceIdHex::new(trace_id),
            span_id: self.ids.new_span_id(),
            parent: remote.map(|r| r.1),
            sampled,
            state: remote
                .and(tracestate)
                .filter(|s| s.len() <= 512 && s.iter().all(|b| (0x20..0x7f).contains(b)))
                .map(|s| String::from_utf8_lossy(s).into_owned()),
        }
    }

    /// Queues `n` finished spans written by [`wire::span`]; a full queue drops them
    /// (counted).
    pub fn export(&self, spans: &[u8], n: usize) {
        self.exporter.push(spans, n);
    }

    /// Sends what is queued and waits up to `timeout` for it to be exported.
    pub fn flush(&self, timeout: Duration) {
        self.exporter.flush(timeout);
    }
}

impl TraceCtx {
    /// A new span id (an upstream attempt's).
    pub fn new_span() -> SpanId {
        RandomIdGenerator::default().new_span_id()
    }

    /// The `traceparent` value that makes `span` the parent of what it calls.
    pub fn traceparent(&self, span: SpanId) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        s.push_str(self.trace_id_hex());
        s.push('-');
        crate::spec::text::push_hex(&mut s, u64::from_be_bytes(span.to_bytes()), 16);
        s.push_str(if self.sampled { "-01" } else { "-00" });
        s
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> &str {
        self.hex.as_str()
    }
}

/// A W3C `traceparent`: `VERSION-TRACEID-PARENTID-FLAGS`, lowercase hex. Version `ff`,
/// all-zero ids and malformed values are ignored (a new trace starts); a later version's
/// extra fields are ignored, as the recommendation asks.
pub fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    let v = std::str::from_utf8(v).ok()?.trim();
    if v.len() < 55 || !v.is_char_boundary(55) {
        return None;
    }
    let (head, rest) = v.split_at(55);
    let mut parts = head.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if ![version, trace, span, flags].iter().all(|p| lower_hex(p)) || version == "ff" {
        return None;
    }
    let extra_allowed = version != "00" && (rest.is_empty() || rest.starts_with('-'));
    if !rest.is_empty() && !extra_allowed {
        return None;
    }
    let trace = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace, span, TraceFlags::new(flags & 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ratio: f64) -> Settings {
        Settings {
            endpoint: "http://127.0.0.1:9/v1/traces".into(),
            headers: Vec::new(),
            sample_ratio: ratio,
            service_name: "t".into(),
            capture_content: false,
            content_limit: 1024,
            queue: 16,
            batch: 8,
            delay: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
        }
    }

    #[test]
    fn traceparent_is_read_strictly() {
        let good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, f) = parse_traceparent(good).unwrap();
        assert_eq!(t.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.to_string(), "00f067aa0ba902b7");
        assert!(f.is_sampled());
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!parse_traceparent(unsampled).unwrap().2.is_sampled());
        // A later version may append fields.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"[..],
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            b"garbage",
        ] {
            assert!(
                parse_traceparent(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_clients_sampling_decision_is_honoured_and_new_traces_follow_the_ratio() {
        let none = Tracer::start(settings(0.0)).unwrap();
        let all = Tracer::start(settings(1.0)).unwrap();
        let sampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let c = none.begin(Some(sampled), Some(b"a=1"));
        assert!(c.sampled);
        assert_eq!(c.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.parent.unwrap().to_string(), "00f067aa0ba902b7");
        assert_eq!(c.state.as_deref(), Some("a=1"));
        assert!(!all.begin(Some(unsampled), None).sampled);
        assert!(all.begin(None, None).sampled);
        assert!(!none.begin(None, None).sampled);
        // A state without a valid parent is dropped with it.
        assert!(all.begin(Some(b"bad"), Some(b"a=1")).state.is_none());
        let c = all.begin(None, None);
        let s = TraceCtx::new_span();
        assert_eq!(c.traceparent(s), format!("00-{}-{}-01", c.trace_id, s));
        assert_eq!(c.trace_id_hex(), c.trace_id.to_string());
    }
}
