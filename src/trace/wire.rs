//! OTLP spans written straight into protobuf (the `opentelemetry.proto.trace.v1` messages
//! the collector decodes), one request's spans at a time on the thread that ends it:
//! no span objects, no attribute strings copied, nothing for another thread to free.
//! Field numbers are those of the OTLP `.proto` files; `tests/tracing.rs` decodes the
//! result with the `opentelemetry-proto` types.

use super::{SpanId, TraceId};
use std::time::SystemTime;

/// A protobuf writer into one growing buffer. An attribute's lengths are known before
/// it is written; a span's, whose attributes vary, is written after it, in the two bytes
/// kept for it (the content is moved only when it needs one or three or more).
#[derive(Debug, Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `v` as a protobuf varint: the bytes and how many.
fn varint(mut v: u64) -> ([u8; 10], usize) {
    let mut out = [0u8; 10];
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    (out, i + 1)
}

/// How many bytes `v` takes as a varint.
#[inline]
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// How many bytes a length-delimited field of `n` bytes takes, its one-byte key included
/// (every field written through it is numbered below 16).
#[inline]
fn delimited(n: usize) -> usize {
    1 + varint_len(n as u64) + n
}

/// The one-byte key of field `field` (below 16) with wire type `wire`.
#[inline]
const fn key1(field: u32, wire: u32) -> u8 {
    (field << 3 | wire) as u8
}

impl Enc {
    fn key(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    #[inline]
    fn varint(&mut self, v: u64) {
        if v < 0x80 {
            self.buf.push(v as u8);
        } else {
            let (bytes, n) = varint(v);
            self.buf.extend_from_slice(&bytes[..n]);
        }
    }

    /// A length-delimited field written by `f`, its length found afterwards. Two bytes
    /// are kept for it (a message of 128 to 16,383 bytes, as a span is); another length
    /// moves the message.
    pub fn message(&mut self, field: u32, f: impl FnOnce(&mut Enc)) {
        const KEPT: usize = 2;
        self.key(field, LEN);
        self.buf.extend_from_slice(&[0; KEPT]);
        let start = self.buf.len();
        f(self);
        let n = self.buf.len() - start;
        let (len, k) = varint(n as u64);
        if k != KEPT {
            let end = self.buf.len();
            if k > KEPT {
                self.buf.resize(end + k - KEPT, 0);
            }
            self.buf.copy_within(start..end, start + k - KEPT);
            self.buf.truncate(start - KEPT + k + n);
        }
        self.buf[start - KEPT..start - KEPT + k].copy_from_slice(&len[..k]);
    }

    #[inline]
    pub fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, LEN);
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    #[inline]
    pub fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    pub fn uint(&mut self, field: u32, v: u64) {
        self.key(field, VARINT);
        self.varint(v);
    }

    pub fn fixed64(&mut self, field: u32, v: u64) {
        self.key(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn fixed32(&mut self, field: u32, v: u32) {
        self.key(field, FIXED32);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// An attribute value (`AnyValue`).
#[derive(Debug, Clone, Copy)]
pub enum Val<'a> {
    Str(&'a str),
    Int(i64),
    F64(f64),
    Strs(&'a [std::borrow::Cow<'a, str>]),
}

impl Val<'_> {
    /// The `AnyValue` message's length.
    fn len(&self) -> usize {
        match self {
            Val::Str(s) => delimited(s.len()),
            Val::Int(n) => 1 + varint_len(*n as u64),
            Val::F64(_) => 9,
            Val::Strs(list) => delimited(Val::array_len(list)),
        }
    }

    /// An `ArrayValue` of strings' length.
    fn array_len(list: &[std::borrow::Cow<str>]) -> usize {
        list.iter().map(|s| delimited(delimited(s.len()))).sum()
    }

    fn write(&self, e: &mut Enc) {
        match self {
            Val::Str(s) => e.string(1, s),
            Val::Int(n) => e.uint(3, *n as u64),
            Val::F64(x) => {
                e.buf.push(key1(4, FIXED64));
                e.buf.extend_from_slice(&x.to_le_bytes());
            }
            Val::Strs(list) => {
                e.buf.push(key1(5, LEN));
                e.varint(Val::array_len(list) as u64);
                for s in list.iter() {
                    e.buf.push(key1(1, LEN));
                    e.varint(delimited(s.len()) as u64);
                    e.string(1, s);
                }
            }
        }
    }
}

/// Writes `KeyValue` attributes as field `field` (below 16) of the message being
/// written.
pub struct Attrs<'e> {
    enc: &'e mut Enc,
    field: u32,
}

impl Attrs<'_> {
    /// Inlined: at a call site the key is a literal and the value's kind known, so the
    /// lengths fold and the key is copied without a call.
    #[inline(always)]
    pub fn add(&mut self, key: &str, value: Val) {
        // Most attributes are a short key and a short string or a number: every length
        // is one byte.
        let short = |n: usize| n < 0x80;
        match value {
            Val::Str(s) if short(key.len() + s.len() + 6) => {
                let (k, v) = (key.len() as u8, s.len() as u8);
                let kv = 6 + k + v;
                let e = &mut self.enc.buf;
                e.reserve(2 + usize::from(kv));
                e.extend_from_slice(&[key1(self.field, LEN), kv, key1(1, LEN), k]);
                e.extend_from_slice(key.as_bytes());
                e.extend_from_slice(&[key1(2, LEN), 2 + v, key1(1, LEN), v]);
                e.extend_from_slice(s.as_bytes());
                return;
            }
            Val::Int(n) if short(key.len() + 15) => {
                let (v, vn) = varint(n as u64);
                let (k, any) = (key.len() as u8, 1 + vn as u8);
                let e = &mut self.enc.buf;
                e.reserve(6 + usize::from(k + any));
                e.extend_from_slice(&[key1(self.field, LEN), 4 + k + any, key1(1, LEN), k]);
                e.extend_from_slice(key.as_bytes());
                e.extend_from_slice(&[key1(2, LEN), any, key1(3, VARINT)]);
                e.extend_from_slice(&v[..vn]);
                return;
            }
            Val::F64(x) if short(key.len() + 15) => {
                let k = key.len() as u8;
                let e = &mut self.enc.buf;
                e.reserve(15 + usize::from(k));
                e.extend_from_slice(&[key1(self.field, LEN), 13 + k, key1(1, LEN), k]);
                e.extend_from_slice(key.as_bytes());
                e.extend_from_slice(&[key1(2, LEN), 9, key1(4, FIXED64)]);
                e.extend_from_slice(&x.to_le_bytes());
                return;
            }
            _ => {}
        }
        self.add_any(key, value);
    }

    /// Any attribute, its lengths as long as they need.
    #[inline(never)]
    fn add_any(&mut self, key: &str, value: Val) {
        let any = value.len();
        let kv = delimited(key.len()) + delimited(any);
        let e = &mut *self.enc;
        e.buf.reserve(delimited(kv));
        e.buf.push(key1(self.field, LEN));
        e.varint(kv as u64);
        e.string(1, key);
        e.buf.push(key1(2, LEN));
        e.varint(any as u64);
        value.write(e);
    }

    #[inline(always)]
    pub fn str(&mut self, key: &str, value: &str) {
        self.add(key, Val::Str(value));
    }

    #[inline(always)]
    pub fn int(&mut self, key: &str, value: u64) {
        self.add(key, Val::Int(i64::try_from(value).unwrap_or(i64::MAX)));
    }
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

/// The fixed part of one span.
pub struct Head<'a> {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub parent_is_remote: bool,
    pub state: Option<&'a str>,
    /// The span's name, in pieces written one after another.
    pub name: &'a [&'a str],
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub error: bool,
}

/// One `Span`, as an entry of `ScopeSpans.spans`: its head, then the attributes and
/// events `body` writes.
/// Only sampled spans are written: the sampled flag is always set.
pub fn span(enc: &mut Enc, h: &Head, body: impl FnOnce(&mut Attrs, &mut Events)) {
    enc.message(2, |e| {
        e.bytes(1, &h.trace_id.to_bytes());
        e.bytes(2, &h.span_id.to_bytes());
        if let Some(s) = h.state.filter(|s| !s.is_empty()) {
            e.string(3, s);
        }
        if let Some(p) = h.parent {
            e.bytes(4, &p.to_bytes());
        }
        e.key(5, LEN);
        e.varint(h.name.iter().map(|p| p.len()).sum::<usize>() as u64);
        for piece in h.name {
            e.buf.extend_from_slice(piece.as_bytes());
        }
        e.uint(6, h.kind as u64);
        e.fixed64(7, unix_nanos(h.start));
        e.fixed64(8, unix_nanos(h.end));
        let mut events = Events::default();
        body(&mut Attrs { enc: e, field: 9 }, &mut events);
        for ev in events.list.into_iter().flatten() {
            e.message(11, |e| {
                e.fixed64(1, unix_nanos(ev.at));
                e.string(2, ev.name);
                let mut a = Attrs { enc: e, field: 3 };
                if let Some((k, v)) = ev.attr {
                    a.str(k, &v);
                }
            });
        }
        if h.error {
            e.message(15, |e| e.uint(3, 2));
        }
        // W3C flags, and whether the parent is remote (OTLP's SPAN_FLAGS_CONTEXT_* bits).
        let remote = if h.parent_is_remote { 0x300 } else { 0x100 };
        e.fixed32(16, 1 | remote);
    });
}

/// A span's events: at most three (the first token, the prompt, the completion).
#[derive(Default)]
pub struct Events {
    list: [Option<Event>; 3],
}

impl Events {
    /// Adds `ev`; a fourth is not kept.
    pub fn push(&mut self, ev: Event) {
        if let Some(slot) = self.list.iter_mut().find(|s| s.is_none()) {
            *slot = Some(ev);
        }
    }
}

/// A span event: a name, a time and at most one attribute.
pub struct Event {
    pub name: &'static str,
    pub at: SystemTime,
    pub attr: Option<(&'static str, String)>,
}

/// The `Resource` and `InstrumentationScope` of every span this process sends, encoded
/// once.
pub struct Preamble {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Preamble {
    pub fn new(service_name: &str) -> Preamble {
        let mut resource = Enc::default();
        {
            let mut a = Attrs {
                enc: &mut resource,
                field: 1,
            };
            a.str("service.name", service_name);
            a.str("service.version", env!("CARGO_PKG_VERSION"));
            a.str("telemetry.sdk.name", "tollgate");
            a.str("telemetry.sdk.language", "rust");
        }
        let mut scope = Enc::default();
        scope.string(1, "tollgate");
        scope.string(2, env!("CARGO_PKG_VERSION"));
        Preamble {
            resource: resource.buf,
            scope: scope.buf,
        }
    }

    /// An `ExportTraceServiceRequest` of spans written by [`span`]: the spans are copied
    /// once, behind lengths computed first.
    pub fn request(&self, spans: &[u8]) -> Vec<u8> {
        let scope_spans = delimited(self.scope.len()) + spans.len();
        let resource_spans = delimited(self.resource.len()) + delimited(scope_spans);
        let mut e = Enc {
            buf: Vec::with_capacity(delimited(resource_spans)),
        };
        e.key(1, LEN);
        e.varint(resource_spans as u64);
        e.bytes(1, &self.resource);
        e.key(2, LEN);
        e.varint(scope_spans as u64);
        e.bytes(1, &self.scope);
        e.buf.extend_from_slice(spans);
        e.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message;
    use std::time::Duration;

    #[test]
    fn spans_decode_as_the_otlp_messages_whatever_their_sizes() {
        let p = Preamble::new("svc");
        let mut enc = Enc::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        for (i, size) in [0usize, 1, 127, 128, 16_383, 16_384, 70_000]
            .iter()
            .enumerate()
        {
            let text = "é".repeat(*size / 2);
            let reasons = vec!["stop".into(), "".into()];
            let h = Head {
                trace_id: TraceId::from(7u128 << 64 | i as u128),
                span_id: SpanId::from(9u64 + i as u64),
                parent: (i % 2 == 1).then(|| SpanId::from(3u64)),
                parent_is_remote: i == 1,
                state: Some("k=v"),
                name: &["chat", " ", "m"],
                kind: if i == 0 { Kind::Server } else { Kind::Client },
                start: t0,
                end: t0 + Duration::from_millis(5),
                error: i == 2,
            };
            span(&mut enc, &h, |a, events| {
                a.str("big", &text);
                a.add("n", Val::Int(-5));
                a.add("f", Val::F64(0.25));
                a.add("list", Val::Strs(&reasons));
                a.str("short", "value");
                a.int("small", 127);
                a.int("large", 128);
                a.str(&"k".repeat(60), &"v".repeat(61));
                a.str(&"k".repeat(60), &"v".repeat(62));
                events.push(Event {
                    name: "e",
                    at: t0,
                    attr: Some(("k", text.clone())),
                });
            });
        }
        let bytes = p.request(&enc.buf);
        let req = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        // Byte for byte what the reference encoder writes: fields in order, lengths as
        // short as they can be.
        assert_eq!(req.encode_to_vec(), bytes);
        let rs = &req.resource_spans[0];
        let service = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(service.key, "service.name");
        let scope = &rs.scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "tollgate");
        assert_eq!(scope.spans.len(), 7);
        for (i, s) in scope.spans.iter().enumerate() {
            assert_eq!(s.trace_id, (7u128 << 64 | i as u128).to_be_bytes());
            assert_eq!(s.span_id, (9u64 + i as u64).to_be_bytes());
            assert_eq!(s.parent_span_id.is_empty(), i % 2 == 0);
            assert_eq!(s.trace_state, "k=v");
            assert_eq!(s.kind, if i == 0 { 2 } else { 3 });
            assert_eq!(s.start_time_unix_nano, 1_700_000_000_123_456_789);
            assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 5_000_000);
            assert_eq!(s.flags, 1 | if i == 1 { 0x300 } else { 0x100 });
            assert_eq!(s.status.as_ref().map(|s| s.code), (i == 2).then_some(2));
            let v = |k: &str| {
                s.attributes
                    .iter()
                    .find(|a| a.key == k)
                    .unwrap()
                    .value
                    .clone()
                    .unwrap()
                    .value
                    .unwrap()
            };
            assert_eq!(
                v("big"),
                Any::StringValue("é".repeat([0, 1, 127, 128, 16_383, 16_384, 70_000][i] / 2))
            );
            assert_eq!(v("n"), Any::IntValue(-5));
            assert_eq!(v("f"), Any::DoubleValue(0.25));
            match v("list") {
                Any::ArrayValue(a) => assert_eq!(a.values.len(), 2),
                other => panic!("{other:?}"),
            }
            assert_eq!(s.events[0].name, "e");
            assert_eq!(s.events[0].attributes[0].key, "k");
        }
    }
}
