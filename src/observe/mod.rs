//! Stage 9, `logging`: the one place that records a finished request, whichever path it
//! ended by. Updates the metrics and writes the access-log line (text or JSON) with the
//! key's *name*, never a key. Runs after the response; it must not fail or block.
//! `metrics` holds the Prometheus metrics it (and the connection stage) update.

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::record::{AttemptRecord, StreamEnd, Usage};
use crate::spec::LogFormat;

use crate::metrics;
use crate::spec::text::push_u64;

pub mod answer;
mod handles;
pub mod sink;
pub mod spans;
pub use sink::{flush_logs, LogWriter};

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Why a request did not end normally. Named (`as_str`) only in the access log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The gateway answered with one of its own errors (`GatewayError::kind`).
    Refused(&'static str),
    /// The response began and was cut (never `StreamEnd::Complete`).
    Stream(StreamEnd),
    /// The connection ended with an error outside the gateway's stages.
    Aborted,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Refused(kind) => kind,
            Failure::Stream(end) => end.as_str(),
            Failure::Aborted => "aborted",
        }
    }
}

/// Everything the access log and the metrics need, filled in as the request moves through
/// the stages.
#[derive(Debug)]
pub struct Record {
    pub start: Instant,
    pub wall: SystemTime,
    pub request_id: String,
    pub caller: Arc<str>,
    pub client_ip: String,
    pub method: String,
    pub path: String,
    /// The model the client asked for.
    pub model: Option<String>,
    pub stream: bool,
    pub attempts: Vec<AttemptRecord>,
    /// The server that answered (`upstream/server`), its upstream and the model it was sent.
    pub target: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub upstream_model: Option<String>,
    pub status: u16,
    pub first_byte: Option<Instant>,
    /// When the answer was delivered whole; `None`: the request ends when it is logged.
    pub ended: Option<Instant>,
    pub bytes_in: usize,
    pub bytes_out: usize,
    /// Why the request did not end normally, if it did not.
    pub error: Option<Failure>,
    /// Token usage reported by the upstream, when it reported any.
    pub usage: Option<Usage>,
    /// The limit scope that refused the request, if one did.
    pub limited: Option<&'static str>,
    /// The route strategy of the tier whose target answered.
    pub strategy: Option<&'static str>,
    /// The answer was translated between formats (`openai->anthropic`).
    pub translation: Option<&'static str>,
    /// For an alias with a cache: hit, miss or bypass; and what a hit saved.
    pub cache: Option<crate::cache::Outcome>,
    pub saved: Option<(u64, i64)>,
    /// The caller's key id (`config:NAME` for a config key) and team id.
    pub key_id: Option<Arc<str>>,
    pub team: Option<Arc<str>>,
    /// What the answer cost, micro-USD (`None`: no usage, or no price).
    pub cost_micro: Option<i64>,
    /// Time spent waiting for the client's body and for upstreams (not the gateway's own).
    pub waiting: Duration,
    /// The request's trace, when tracing is on.
    pub trace: Option<Box<spans::Traced>>,
}

impl Record {
    /// A request that starts now, at `wall_ms` on the gateway's clock.
    pub fn at(wall_ms: i64) -> Self {
        Record {
            start: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_millis(wall_ms.max(0) as u64),
            request_id: String::new(),
            caller: crate::record::unnamed(),
            client_ip: "-".into(),
            method: String::new(),
            path: String::new(),
            model: None,
            stream: false,
            attempts: Vec::new(),
            target: None,
            upstream: None,
            upstream_model: None,
            status: 0,
            first_byte: None,
            ended: None,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            usage: None,
            limited: None,
            strategy: None,
            translation: None,
            cache: None,
            saved: None,
            key_id: None,
            team: None,
            cost_micro: None,
            waiting: Duration::ZERO,
            trace: None,
        }
    }
}

/// Records a finished request: metrics, then the access log.
pub fn finish(r: &Record, config: &Config) {
    // One clock read (or none) serves the metrics and the line.
    let total = r
        .ended
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(r.start);
    record_metrics(r, config, total);
    if config.log.access && log::log_enabled!(target: "tollgate::access", log::Level::Info) {
        let write = |line: &str| {
            if !sink::access_line(line) {
                log::info!(target: "tollgate::access", "{line}");
            }
        };
        match config.log.format {
            // Written into a buffer the thread keeps: no allocation a line.
            LogFormat::Text => LINE.with_borrow_mut(|line| {
                line.clear();
                text_line(line, r, total);
                write(line);
            }),
            LogFormat::Json => write(&json_line(r, total)),
        }
    }
}

thread_local! {
    /// The text access-log line being written (a usual line is 400-500 bytes).
    static LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(640));
}

/// The metrics label of a client's model: a configured alias, else `other`.
fn model_label<'a>(r: &'a Record, config: &Config) -> &'a str {
    match r.model.as_deref() {
        Some(m) if config.router.is_configured(m) => m,
        Some(_) => "other",
        None => "none",
    }
}

fn record_metrics(r: &Record, config: &Config, total: Duration) {
    let Some(m) = metrics::get() else { return };
    let model = model_label(r, config);
    let upstream = r.upstream.as_deref().unwrap_or("none");
    let route = handles::route(model, upstream);
    if r.status == 200 {
        route.ok(m).inc();
    } else {
        let mut code_buf = [0u8; 3];
        m.requests
            .with_label_values(&[model, upstream, status_label(r.status, &mut code_buf)])
            .inc();
    }
    route.duration(m).observe(total.as_secs_f64());
    if let Some(t) = r.first_byte {
        route
            .ttft(m)
            .observe(t.duration_since(r.start).as_secs_f64());
    }
    m.overhead
        .observe(total.saturating_sub(r.waiting).as_secs_f64());
    if let Some(t) = r.translation {
        m.translations.with_label_values(&[t]).inc();
    }
    for a in &r.attempts {
        m.attempts
            .with_label_values(&[&*a.upstream, &*a.target, a.outcome.as_str()])
            .inc();
    }
    for pair in r.attempts.windows(2) {
        let level = if pair[1].alias_index == pair[0].alias_index {
            "tier"
        } else {
            "alias"
        };
        m.failovers
            .with_label_values(&[model, pair[0].outcome.as_str(), level])
            .inc();
    }
    if let Some(c) = r.cache {
        m.cache_lookups.with_label_values(&[c.as_str()]).inc();
    }
    if let Some((tokens, micro)) = r.saved {
        m.cache_saved_tokens.inc_by(tokens);
        m.cache_saved_usd.inc_by(crate::spec::usd(micro));
    }
    if let Some(scope) = r.limited {
        m.ratelimited.with_label_values(&[scope]).inc();
    }
    if let Some(Failure::Stream(end)) = r.error {
        m.stream_aborts.with_label_values(&[end.as_str()]).inc();
    }
    // What the request was charged: the figure of its usage row and its budgets (an
    // answer that reported no usage is charged its reservation).
    if let Some(micro) = r.cost_micro.filter(|c| *c > 0) {
        route.cost(m).inc_by(crate::spec::usd(micro));
    }
    if r.target.is_none() || !(200..300).contains(&r.status) {
        return;
    }
    if let (Some(u), Some(first), true) = (r.usage, r.first_byte, r.stream) {
        // The conventions' time per output token: after the first, over the rest.
        if u.output > 1 {
            let rest = first.elapsed().as_secs_f64() / (u.output - 1) as f64;
            let provider = upstream_provider(r, config).unwrap_or("none");
            m.time_per_output_token
                .with_label_values(&[model, provider])
                .observe(rest);
        }
    }
    match r.usage {
        Some(u) => {
            route.input_tokens(m).inc_by(u.input);
            route.output_tokens(m).inc_by(u.output);
            if u.cached > 0 {
                m.tokens
                    .with_label_values(&[model, upstream, "cached_input"])
                    .inc_by(u.cached);
            }
            let written = u.cache_write.saturating_add(u.cache_write_1h);
            if written > 0 {
                m.tokens
                    .with_label_values(&[model, upstream, "cache_write"])
                    .inc_by(written);
            }
            if u.reasoning > 0 {
                m.tokens
                    .with_label_values(&[model, upstream, "reasoning"])
                    .inc_by(u.reasoning);
            }
        }
        None => {
            let reason = if r.error.is_some() {
                "stream_cut"
            } else {
                "not_reported"
            };
            m.usage_unreported.with_label_values(&[model, reason]).inc();
        }
    }
}

/// The conventions' provider name of the upstream that answered.
fn upstream_provider(r: &Record, config: &Config) -> Option<&'static str> {
    r.upstream
        .as_deref()
        .and_then(|u| config.upstreams.get(u))
        .map(|u| spans::provider_name(u.provider))
}

/// The status code as a label, without an allocation.
fn status_label(status: u16, buf: &mut [u8; 3]) -> &str {
    if !(100..1000).contains(&status) {
        return "0";
    }
    buf[0] = b'0' + (status / 100) as u8;
    buf[1] = b'0' + (status / 10 % 10) as u8;
    buf[2] = b'0' + (status % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("0")
}

/// A client-supplied string made safe for a space-separated line.
/// Writes `s` (at most 128 characters) with whitespace, controls and quotes as `_`, so a
/// value cannot split or forge fields of a text line.
fn push_clean(out: &mut String, s: &str) {
    // The usual value is short printable ASCII without a quote: copied as it is.
    if s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
        out.push_str(s);
        return;
    }
    for c in s.chars().take(128) {
        out.push(if c.is_whitespace() || c.is_control() || c == '"' {
            '_'
        } else {
            c
        });
    }
}

fn ms(r: &Record, t: Option<Instant>) -> Option<f64> {
    t.map(|t| (t.duration_since(r.start).as_secs_f64() * 1e4).round() / 10.0)
}

/// A duration in milliseconds with one decimal, without float formatting.
fn push_ms(out: &mut String, d: std::time::Duration) {
    let tenths = (d.as_micros() + 50) / 100;
    push_u64(out, u64::try_from(tenths / 10).unwrap_or(u64::MAX));
    out.push('.');
    push_u64(out, (tenths % 10) as u64);
}

fn push_or_dash(out: &mut String, v: Option<u64>) {
    match v {
        Some(v) => push_u64(out, v),
        None => out.push('-'),
    }
}

/// `name=value` with a leading space, `-` for no value.
fn push_field(out: &mut String, name: &str, value: Option<&str>) {
    out.push(' ');
    out.push_str(name);
    out.push('=');
    out.push_str(value.unwrap_or("-"));
}

/// One text access-log line, written into a single buffer.
fn text_line(s: &mut String, r: &Record, total: Duration) {
    let wall = r
        .wall
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    crate::clock::push_rfc3339_millis(s, wall);
    push_field(s, "id", Some(&r.request_id));
    push_field(s, "key", Some(&r.caller));
    push_field(s, "key_id", r.key_id.as_deref());
    push_field(s, "team", r.team.as_deref());
    push_field(s, "ip", Some(&r.client_ip));
    push_field(s, "method", Some(&r.method));
    s.push_str(" path=");
    push_clean(s, &r.path);
    s.push_str(" model=");
    match r.model.as_deref() {
        Some(m) => push_clean(s, m),
        None => s.push('-'),
    }
    push_field(s, "stream", Some(if r.stream { "true" } else { "false" }));
    push_field(s, "target", r.target.as_deref());
    push_field(s, "strategy", r.strategy);
    push_field(s, "translation", r.translation);
    push_field(s, "cache", r.cache.map(crate::cache::Outcome::as_str));
    if let Some(t) = &r.trace {
        s.push_str(" trace_id=");
        s.push_str(t.ctx.trace_id_hex());
    }
    s.push_str(" attempts=");
    if r.attempts.is_empty() {
        s.push('-');
    }
    for (i, a) in r.attempts.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&a.target);
        s.push('=');
        s.push_str(a.outcome.as_str());
        if let Some(st) = a.status {
            s.push(':');
            push_u64(s, u64::from(st));
        }
    }
    s.push_str(" status=");
    push_u64(s, u64::from(r.status));
    s.push_str(" duration_ms=");
    push_ms(s, total);
    s.push_str(" ttfb_ms=");
    match r.first_byte {
        Some(t) => push_ms(s, t.duration_since(r.start)),
        None => s.push('-'),
    }
    s.push_str(" tokens_in=");
    push_or_dash(s, r.usage.map(|u| u.input));
    s.push_str(" tokens_out=");
    push_or_dash(s, r.usage.map(|u| u.output));
    s.push_str(" cost_usd=");
    match r.cost_micro {
        Some(c) => {
            if c < 0 {
                s.push('-');
            }
            let c = c.unsigned_abs();
            push_u64(s, c / 1_000_000);
            s.push('.');
            let frac = c % 1_000_000;
            for div in [100_000, 10_000, 1_000, 100, 10, 1] {
                s.push(char::from(b'0' + (frac / div % 10) as u8));
            }
        }
        None => s.push('-'),
    }
    s.push_str(" bytes_in=");
    push_u64(s, r.bytes_in as u64);
    s.push_str(" bytes_out=");
    push_u64(s, r.bytes_out as u64);
    push_field(s, "error", r.error.map(Failure::as_str));
}

fn json_line(r: &Record, total: Duration) -> String {
    let attempts: Vec<serde_json::Value> = r
        .attempts
        .iter()
        .map(|a| serde_json::json!({"target": a.target, "outcome": a.outcome.as_str(), "status": a.status}))
        .collect();
    let mut v = serde_json::json!({
        "time": humantime::format_rfc3339_millis(r.wall).to_string(),
        "request_id": r.request_id,
        "key": r.caller,
        "key_id": r.key_id,
        "team": r.team,
        "client_ip": r.client_ip,
        "method": r.method,
        "path": r.path,
        "model": r.model,
        "stream": r.stream,
        "target": r.target,
        "strategy": r.strategy,
        "translation": r.translation,
        "cache": r.cache.map(crate::cache::Outcome::as_str),
        "attempts": attempts,
        "status": r.status,
        "duration_ms": (total.as_secs_f64() * 1e4).round() / 10.0,
        "ttfb_ms": ms(r, r.first_byte),
        "tokens_in": r.usage.map(|u| u.input),
        "tokens_out": r.usage.map(|u| u.output),
        "tokens_cached": r.usage.map(|u| u.cached),
        "cost_usd": r.cost_micro.map(crate::spec::usd),
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "error": r.error.map(Failure::as_str),
    });
    if let (Some(t), Some(o)) = (&r.trace, v.as_object_mut()) {
        o.insert("trace_id".into(), t.ctx.trace_id_hex().into());
    }
    v.to_string()
}

/// Sets up logging: `RUST_LOG` levels (default `info`), to stderr or to `file`. Access-log
/// lines are written as they are (their own time first, or a JSON object); other lines get
/// `[time LEVEL target]`.
pub fn init_logging(file: Option<&str>) -> std::io::Result<()> {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // env_logger is built without its colour feature: lines go out as formatted, with no
    // ANSI-stripping copy of every line on its way to a file or journald.
    b.format(|buf, record| {
        if record.target() == "tollgate::access" {
            writeln!(buf, "{}", record.args())
        } else {
            let mut stamp = String::with_capacity(24);
            crate::clock::push_rfc3339_millis(&mut stamp, Clock::now_ms(&SystemClock));
            writeln!(
                buf,
                "[{} {} {}] {}",
                stamp,
                record.level(),
                record.target(),
                record.args()
            )
        }
    });
    let out: Box<dyn std::io::Write + Send> = match file {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        None => Box::new(std::io::stderr()),
    };
    // A second initialisation (tests embedding the library) keeps the first logger.
    if let Some(sink) = sink::LogSink::new(out) {
        b.target(env_logger::Target::Pipe(Box::new(sink)));
        if b.try_init().is_ok() {
            sink::activate();
            // A panic's own message goes to stderr directly; the lines before it should
            // not wait in memory.
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                sink::flush_logs();
                previous(info);
            }));
        }
    }
    Ok(())
}

/// The usage row of a request that reached an upstream, taking the record's strings.
pub fn usage_row(r: &mut Record, now: i64) -> Option<crate::store::usage::UsageRow> {
    let hit = r.cache == Some(crate::cache::Outcome::Hit);
    if r.attempts.is_empty() && !hit {
        return None;
    }
    let (saved_tokens, saved_micro) = r.saved.unwrap_or_default();
    let usage = r.usage.unwrap_or_default();
    let take = std::mem::take::<String>;
    Some(crate::store::usage::UsageRow {
        request_id: take(&mut r.request_id),
        ts: now,
        key_id: r.key_id.take().unwrap_or_else(crate::record::unnamed),
        key_name: Arc::clone(&r.caller),
        team_id: r.team.take(),
        model: r.model.take().unwrap_or_default(),
        upstream: r.upstream.take(),
        upstream_model: r.upstream_model.take(),
        status: r.status,
        stream: r.stream,
        input_tokens: usage.input,
        output_tokens: usage.output,
        cached_tokens: usage.cached,
        cache_write_tokens: usage.cache_write.saturating_add(usage.cache_write_1h),
        reasoning_tokens: usage.reasoning,
        cost_micro: r.cost_micro.unwrap_or(0),
        priced: r.cost_micro.is_some() || r.usage.is_none(),
        cache: r.cache.map(crate::cache::Outcome::as_str),
        saved_tokens,
        saved_micro,
        translation: r.translation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_strings_cannot_split_or_forge_fields() {
        let clean = |v: &str| {
            let mut s = String::new();
            push_clean(&mut s, v);
            s
        };
        assert_eq!(clean("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(clean("a b\tc\"d\ne\u{7f}"), "a_b_c_d_e_");
        assert_eq!(clean("modèle\u{2028}x"), "modèle_x");
        assert_eq!(clean(&"x".repeat(200)).len(), 128);
        assert_eq!(clean(&"é".repeat(200)).chars().count(), 128);
    }

    #[test]
    fn status_labels_are_three_digits() {
        let mut b = [0u8; 3];
        assert_eq!(status_label(200, &mut b), "200");
        assert_eq!(status_label(429, &mut b), "429");
        assert_eq!(status_label(0, &mut b), "0");
    }

    #[test]
    fn durations_are_written_in_tenths_of_a_millisecond() {
        let mut s = String::new();
        push_ms(&mut s, Duration::from_micros(12_345));
        assert_eq!(s, "12.3");
    }
}
