//! Stage 9, `logging`: the one place that records a finished request, whichever path it
//! ended by. Writes the access log line (key *name*, never the key). Runs after the
//! response; it must not fail or block the request.

use crate::failover::AttemptRecord;
use crate::usage::Usage;
use std::fmt::Write;
use std::time::Instant;

/// Everything the access log needs, filled in as the request moves through the stages.
#[derive(Debug)]
pub struct Record {
    pub start: Instant,
    pub request_id: String,
    pub caller: String,
    pub client_ip: String,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    pub stream: bool,
    pub attempts: Vec<AttemptRecord>,
    pub target: Option<String>,
    pub status: u16,
    pub first_byte: Option<Instant>,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub error: Option<&'static str>,
    /// Token usage reported by the upstream, when it reported any.
    pub usage: Option<Usage>,
    /// The limit scope that refused the request, if one did.
    pub limited: Option<&'static str>,
}

impl Record {
    pub fn new() -> Self {
        Record {
            start: Instant::now(),
            request_id: String::new(),
            caller: "-".into(),
            client_ip: "-".into(),
            method: String::new(),
            path: String::new(),
            model: None,
            stream: false,
            attempts: Vec::new(),
            target: None,
            status: 0,
            first_byte: None,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            usage: None,
            limited: None,
        }
    }
}

impl Default for Record {
    fn default() -> Self {
        Record::new()
    }
}

/// Writes the access log line for a finished request (target `tollgate::access`).
pub fn access_log(r: &Record) {
    if !log::log_enabled!(target: "tollgate::access", log::Level::Info) {
        return;
    }
    let ms = |t: Option<Instant>| t.map(|t| t.duration_since(r.start).as_secs_f64() * 1000.0);
    let mut attempts = String::new();
    for (i, a) in r.attempts.iter().enumerate() {
        let _ = write!(
            attempts,
            "{}{}={}",
            if i == 0 { "" } else { "," },
            a.target,
            a.outcome
        );
        if let Some(s) = a.status {
            let _ = write!(attempts, ":{s}");
        }
    }
    log::info!(
        target: "tollgate::access",
        "id={} key={} ip={} method={} path={} model={} stream={} target={} attempts={} status={} duration_ms={:.1} ttfb_ms={} bytes_in={} bytes_out={} error={}",
        r.request_id,
        r.caller,
        r.client_ip,
        r.method,
        r.path,
        r.model.as_deref().unwrap_or("-"),
        r.stream,
        r.target.as_deref().unwrap_or("-"),
        if attempts.is_empty() { "-" } else { &attempts },
        r.status,
        r.start.elapsed().as_secs_f64() * 1000.0,
        ms(r.first_byte).map_or("-".to_string(), |v| format!("{v:.1}")),
        r.bytes_in,
        r.bytes_out,
        r.error.unwrap_or("-"),
    );
}
