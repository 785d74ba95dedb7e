//! `tracing`: OpenTelemetry traces sent to an OTLP collector.

use super::super::units::{ByteSize, Seconds};
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Deserialize, Clone, Default)]
pub struct TracingSection {
    /// Where spans go. Without it, nothing is traced.
    #[serde(default)]
    pub otlp: Option<OtlpSection>,
    /// The share of new traces recorded, 0 to 1. Default 1. A client's `traceparent`
    /// decides for its own request (parent-based sampling).
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// `service.name` of the spans. Default `tollgate`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Prompts and answers as span events. Default false: they may hold personal data.
    #[serde(default)]
    pub capture_content: bool,
    /// At most this much of each prompt or answer event. Default 4KiB, at most 1MiB.
    #[serde(default)]
    pub content_limit: Option<ByteSize>,
    /// Spans waiting for export; past this they are dropped and counted. Default 2048.
    #[serde(default)]
    pub queue_size: Option<usize>,
    /// Spans per export request. Default 512.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Longest a span waits for its batch to fill. Default 1s.
    #[serde(default)]
    pub batch_delay: Option<Seconds>,
    /// Extra headers of export requests (a collector's API key); values are secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct OtlpSection {
    /// The collector's OTLP/HTTP URL: a base (`http://collector:4318`, to which
    /// `/v1/traces` is added) or the full traces URL.
    pub endpoint: Secret,
    /// `http/protobuf` (the only one served).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Per export request. Default 10s.
    #[serde(default = "default_timeout")]
    pub timeout: Seconds,
}

fn default_timeout() -> Seconds {
    Seconds(Duration::from_secs(10))
}
