//! Token usage read from responses as they stream by: the `usage` object of a JSON
//! response (OpenAI `prompt_tokens`/`completion_tokens`, Anthropic and Responses API
//! `input_tokens`/`output_tokens`), or of SSE events (OpenAI's final usage chunk,
//! Anthropic's `message_start`/`message_delta`, the Responses API's `response.completed`).
//! Only lines or bodies that mention `"usage"` are parsed; memory is bounded.

use crate::provider::gemini::UsageMetadata;
use memchr::memmem;
use serde::Deserialize;
use serde_json::Value;

pub use crate::record::Usage;

/// Largest JSON body kept to read its usage, and largest SSE line.
const MAX_KEPT: usize = 4 << 20;

/// Feeds response body chunks; reports the usage found.
pub struct UsageScanner {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
    found: Option<Usage>,
}

impl UsageScanner {
    pub fn new(sse: bool) -> Self {
        UsageScanner {
            sse,
            buf: Vec::new(),
            overflow: false,
            found: None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.buf.len() + chunk.len() > MAX_KEPT {
                self.overflow = true;
                self.buf = Vec::new();
            } else if !self.overflow {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest = chunk;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            if self.buf.is_empty() {
                self.line(&rest[..nl]);
            } else {
                self.buf.extend_from_slice(&rest[..nl]);
                let line = std::mem::take(&mut self.buf);
                self.line(&line);
            }
            rest = &rest[nl + 1..];
        }
        if self.buf.len() + rest.len() <= MAX_KEPT {
            self.buf.extend_from_slice(rest);
        } else {
            self.buf.clear();
        }
    }

    fn line(&mut self, line: &[u8]) {
        if let Some(data) = line.strip_prefix(b"data:") {
            self.event_data(data);
        }
    }

    /// The data of one SSE event another reader already split off (a translated
    /// stream's): read for usage like a `data:` line.
    pub fn event_data(&mut self, data: &[u8]) {
        if !may_have_usage(data) {
            return;
        }
        // The members that can hold usage, read as types (the rest of the event is
        // skipped, not built); an event of another shape is read as a whole.
        match serde_json::from_slice::<Envelope>(data) {
            Ok(e) => self.merge_envelope(e),
            Err(_) => {
                if let Ok(v) = serde_json::from_slice::<Value>(data) {
                    self.merge(&v);
                }
            }
        }
    }

    fn merge_envelope(&mut self, e: Envelope) {
        if let Some(u) = e.usage_metadata {
            self.merge_max(gemini(&u));
        }
        let nested = [e.message, e.response].into_iter().flatten();
        for fields in e.usage.into_iter().chain(nested.filter_map(|n| n.usage)) {
            if let Some(n) = fields.normalise() {
                self.merge_max(n);
            }
        }
    }

    /// Usage counts only grow over a stream: keep the largest of each.
    fn merge_max(&mut self, n: Usage) {
        let f = self.found.get_or_insert_with(Usage::default);
        f.input = f.input.max(n.input);
        f.output = f.output.max(n.output);
        f.cached = f.cached.max(n.cached);
        f.cache_write = f.cache_write.max(n.cache_write);
        f.cache_write_1h = f.cache_write_1h.max(n.cache_write_1h);
        f.reasoning = f.reasoning.max(n.reasoning);
    }

    fn merge(&mut self, v: &Value) {
        if let Some(n) = gemini_usage(&v["usageMetadata"]) {
            // Cumulative on every partial answer: the largest is the last.
            self.merge_max(n);
        }
        for u in [&v["usage"], &v["message"]["usage"], &v["response"]["usage"]] {
            if !u.is_object() {
                continue;
            }
            let Ok(fields) = UsageFields::deserialize(u) else {
                continue;
            };
            let Some(n) = fields.normalise() else {
                continue;
            };
            self.merge_max(n);
        }
    }

    /// The usage seen, once the body ended. `None` when the response carried none.
    pub fn finish(&mut self) -> Option<Usage> {
        if !self.sse && !self.overflow {
            if let Some(u) = json_usage(&self.buf) {
                self.found = Some(u);
            }
            self.buf = Vec::new();
        }
        self.found
    }
}

/// Finds `"usage`, the start of both `"usage"` and Gemini's `"usageMetadata"`.
static USAGE_START: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"usage"));

/// Whether an SSE data line may carry usage: a `"usage"` or `"usageMetadata"` member
/// whose value is not `null` (OpenAI sends `"usage":null` on every chunk but the last
/// when the client asks for usage). Only such lines are parsed.
fn may_have_usage(data: &[u8]) -> bool {
    USAGE_START.find_iter(data).any(|at| {
        let rest = &data[at + b"\"usage".len()..];
        let Some(rest) = rest
            .strip_prefix(b"\"")
            .or_else(|| rest.strip_prefix(b"Metadata\""))
        else {
            return false;
        };
        rest.trim_ascii_start()
            .strip_prefix(b":")
            .is_some_and(|v| !v.trim_ascii_start().starts_with(b"null"))
    })
}

/// Gemini's `usageMetadata`: the prompt count includes cached tokens; reasoning
/// ("thoughts") tokens are billed as output.
fn gemini_usage(v: &Value) -> Option<Usage> {
    if !v.is_object() {
        return None;
    }
    let u = UsageMetadata::deserialize(v).ok()?;
    Some(gemini(&u))
}

fn gemini(u: &UsageMetadata) -> Usage {
    Usage {
        input: u.prompt_token_count,
        output: u.candidates_token_count + u.thoughts_token_count,
        cached: u.cached_content_token_count.min(u.prompt_token_count),
        reasoning: u.thoughts_token_count,
        ..Default::default()
    }
}

/// An SSE event's members that may hold usage: OpenAI's and Anthropic's `usage`,
/// Anthropic's `message.usage` (`message_start`), the Responses API's `response.usage`,
/// Gemini's `usageMetadata`.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(default)]
    usage: Option<UsageFields>,
    #[serde(default)]
    message: Option<Nested>,
    #[serde(default)]
    response: Option<Nested>,
    #[serde(default, rename = "usageMetadata")]
    usage_metadata: Option<UsageMetadata>,
}

#[derive(serde::Deserialize)]
struct Nested {
    #[serde(default)]
    usage: Option<UsageFields>,
}

/// The usage of a JSON response body. Only the usage object is parsed, found from the
/// end because every provider writes it after the (much longer) content: one reverse
/// search for `"usage`, the start of both `"usage"` and Gemini's `"usageMetadata"`. A
/// quote inside a JSON string is always escaped, so either name followed by a colon is a
/// member name. The finder is built once: `memmem::rfind` builds one per call, which cost
/// more than the search on a 1 KB answer.
static USAGE_FROM_END: std::sync::LazyLock<memmem::FinderRev<'static>> =
    std::sync::LazyLock::new(|| memmem::FinderRev::new(b"\"usage"));

fn json_usage(body: &[u8]) -> Option<Usage> {
    let mut end = body.len();
    while let Some(at) = USAGE_FROM_END.rfind(&body[..end]) {
        end = at;
        let after = &body[at + b"\"usage".len()..];
        let (gemini, rest) = if let Some(rest) = after.strip_prefix(b"Metadata\"") {
            (true, rest)
        } else if let Some(rest) = after.strip_prefix(b"\"") {
            (false, rest)
        } else {
            continue;
        };
        let Some(value) = rest.trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let mut de = serde_json::Deserializer::from_slice(value);
        if gemini {
            return gemini_usage(&Value::deserialize(&mut de).ok()?);
        }
        if !value.trim_ascii_start().starts_with(b"{") {
            // `"usage": null`: the response says it has none.
            return None;
        }
        return UsageFields::deserialize(&mut de).ok()?.normalise();
    }
    None
}

/// The usage members of both dialects (unknown members are ignored).
#[derive(serde::Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
    completion_tokens_details: Option<OutputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

/// The split of the output tokens (OpenAI's chat and Responses APIs).
#[derive(serde::Deserialize)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
}

/// Anthropic's split of the prompt-cache writes by how long they are kept.
#[derive(serde::Deserialize)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: u64,
}

#[derive(serde::Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

impl UsageFields {
    /// One meaning for both dialects: OpenAI's prompt tokens include the cached ones;
    /// Anthropic's `input_tokens` exclude cache reads and writes, which are added.
    fn normalise(&self) -> Option<Usage> {
        let output = self.completion_tokens.or(self.output_tokens);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .or(self.output_tokens_details.as_ref())
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0)
            .min(output.unwrap_or(0));
        if let Some(prompt) = self.prompt_tokens {
            let details = self
                .prompt_tokens_details
                .as_ref()
                .or(self.input_tokens_details.as_ref());
            let cached = details.and_then(|d| d.cached_tokens).unwrap_or(0);
            return Some(Usage {
                input: prompt,
                output: output.unwrap_or(0),
                cached: cached.min(prompt),
                reasoning,
                ..Default::default()
            });
        }
        let input = self.input_tokens;
        if input.is_none() && output.is_none() {
            return None;
        }
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        // The Responses API says `input_tokens` with `input_tokens_details` (cached
        // included, as OpenAI does); Anthropic says cache reads apart.
        let (input, cached) = match self.input_tokens_details.as_ref() {
            Some(d) if self.cache_read_input_tokens.is_none() => {
                let input = input.unwrap_or(0);
                (input, d.cached_tokens.unwrap_or(0).min(input))
            }
            _ => (
                input
                    .unwrap_or(0)
                    .saturating_add(read)
                    .saturating_add(written),
                read,
            ),
        };
        // Writes kept an hour are billed dearer than those kept 5 minutes; without the
        // split, every write is a 5-minute one (the API's default).
        let hour = self
            .cache_creation
            .as_ref()
            .map_or(0, |c| c.ephemeral_1h_input_tokens)
            .min(written);
        Some(Usage {
            input,
            output: output.unwrap_or(0),
            cached,
            cache_write: written - hour,
            cache_write_1h: hour,
            reasoning,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anthropic's cache writes split by duration, whole and streamed (the split comes
    /// in `message_start`; `message_delta` repeats the counts in newer API versions).
    #[test]
    fn cache_writes_are_read_by_duration_whole_and_streamed() {
        let want = Some(Usage {
            input: 10 + 200 + 300 + 100,
            output: 50,
            cached: 200,
            cache_write: 300,
            cache_write_1h: 100,
            reasoning: 0,
        });
        let usage = r#"{"input_tokens":10,"cache_read_input_tokens":200,"cache_creation_input_tokens":400,"cache_creation":{"ephemeral_5m_input_tokens":300,"ephemeral_1h_input_tokens":100},"output_tokens":50}"#;
        let mut s = UsageScanner::new(false);
        s.feed(format!(r#"{{"type":"message","content":[],"usage":{usage}}}"#).as_bytes());
        assert_eq!(s.finish(), want);
        let start = usage.replace(r#""output_tokens":50"#, r#""output_tokens":1"#);
        let mut s = UsageScanner::new(true);
        s.feed(format!("event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"m\",\"content\":[],\"usage\":{start}}}}}\n\n").as_bytes());
        s.feed(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n");
        s.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":50}}\n\n");
        assert_eq!(s.finish(), want);
    }

    /// Reasoning tokens, reported apart and priced as the output they are part of.
    #[test]
    fn reasoning_tokens_are_read_from_openai_chat_and_responses_whole_and_streamed() {
        let chat = r#"{"prompt_tokens":120,"completion_tokens":900,"total_tokens":1020,"prompt_tokens_details":{"cached_tokens":100},"completion_tokens_details":{"reasoning_tokens":640}}"#;
        let usage = Usage {
            input: 120,
            output: 900,
            cached: 100,
            reasoning: 640,
            ..Default::default()
        };
        let want = Some(usage);
        let mut s = UsageScanner::new(false);
        s.feed(
            format!(r#"{{"id":"c","object":"chat.completion","choices":[],"usage":{chat}}}"#)
                .as_bytes(),
        );
        assert_eq!(s.finish(), want);
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n");
        s.feed(format!("data: {{\"choices\":[],\"usage\":{chat}}}\n\ndata: [DONE]\n\n").as_bytes());
        assert_eq!(s.finish(), want);
        let responses = r#"{"id":"r","object":"response","output":[],"usage":{"input_tokens":120,"input_tokens_details":{"cached_tokens":100},"output_tokens":900,"output_tokens_details":{"reasoning_tokens":640},"total_tokens":1020}}"#;
        let mut s = UsageScanner::new(false);
        s.feed(responses.as_bytes());
        assert_eq!(s.finish(), want);
        // o-series prices: $2 input, $0.50 cached, $8 output per million tokens, in
        // micro-USD: 20 x 2 + 100 x 0.5 + 900 x 8 = 40 + 50 + 7,200 (reasoning is output).
        let price = crate::relay::pricing::Price::from_usd(2.0, 8.0, Some(0.5));
        assert_eq!(price.cost(&usage), 7_290);
    }

    #[test]
    fn null_usage_on_each_chunk_is_skipped_and_the_final_usage_is_read() {
        let mut s = UsageScanner::new(true);
        for _ in 0..3 {
            s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"usage\\\": 5\"}}],\"usage\" : null}\n\n");
        }
        assert_eq!(s.finish(), None);
        s.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 9,
                output: 3,
                cached: 0,
                ..Default::default()
            })
        );
        assert!(may_have_usage(
            br#"{"usageMetadata": {"promptTokenCount":1}}"#
        ));
        assert!(!may_have_usage(br#"{"usageMetadata":null,"usage":null}"#));
        assert!(!may_have_usage(br#"{"usages":{"a":1}}"#));
    }

    #[test]
    fn gemini_usage_metadata_counts_thoughts_as_output_and_cached_within_the_prompt() {
        let body = br#"{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],"usageMetadata":{"promptTokenCount":100,"candidatesTokenCount":20,"thoughtsTokenCount":5,"cachedContentTokenCount":40,"totalTokenCount":125}}"#;
        let usage = Usage {
            input: 100,
            output: 25,
            cached: 40,
            reasoning: 5,
            ..Default::default()
        };
        let want = Some(usage);
        let mut s = UsageScanner::new(false);
        s.feed(body);
        assert_eq!(s.finish(), want);
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":100,\"candidatesTokenCount\":3}}\n\n");
        s.feed(b"data: ");
        s.feed(&body[..]);
        s.feed(b"\n\n");
        assert_eq!(s.finish(), want);
        // gemini-2.5-flash list prices: $0.30 input, $0.03 cached, $2.50 output per
        // million: 60 x 0.30 + 40 x 0.03 + 25 x 2.50 = 18 + 1.2 + 62.5 = 81.7, rounded up.
        let price = crate::relay::pricing::Price::from_usd(0.30, 2.50, Some(0.03));
        assert_eq!(price.cost(&usage), 82);
    }

    #[test]
    fn json_usage_in_both_dialects() {
        let mut s = UsageScanner::new(false);
        s.feed(br#"{"id":"x","usage":{"prompt_tokens":12,"#);
        s.feed(br#""completion_tokens":30,"total_tokens":42}}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 12,
                output: 30,
                cached: 0,
                ..Default::default()
            })
        );
        let mut s = UsageScanner::new(false);
        s.feed(br#"{"type":"message","usage":{"input_tokens":5,"output_tokens":7}}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 5,
                output: 7,
                cached: 0,
                ..Default::default()
            })
        );
        let mut s = UsageScanner::new(false);
        s.feed(b"{\"data\":[]}");
        assert_eq!(s.finish(), None);
        // A quoted "usage" inside content is not the member; the real one comes later.
        let mut s = UsageScanner::new(false);
        s.feed(br#"{"content":"say \"usage\": {\"prompt_tokens\": 99}","usage" : {"input_tokens":3,"output_tokens":4},"user":null}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 3,
                output: 4,
                cached: 0,
                ..Default::default()
            })
        );
        let mut s = UsageScanner::new(false);
        s.feed(br#"{"usage":null,"choices":[]}"#);
        assert_eq!(s.finish(), None);
        // Content that quotes Gemini's member name does not hide an OpenAI answer's usage.
        let mut s = UsageScanner::new(false);
        s.feed(br#"{"choices":[{"message":{"content":"\"usageMetadata\": {}"}}],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 2,
                output: 1,
                ..Default::default()
            })
        );
    }

    #[test]
    fn cached_tokens_mean_the_same_in_both_dialects() {
        let mut s = UsageScanner::new(false);
        s.feed(br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":60}}}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 100,
                output: 5,
                cached: 60,
                ..Default::default()
            })
        );
        // Anthropic counts cache reads and writes apart from input_tokens.
        let mut s = UsageScanner::new(false);
        s.feed(br#"{"usage":{"input_tokens":10,"cache_read_input_tokens":60,"cache_creation_input_tokens":30,"output_tokens":5}}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 100,
                output: 5,
                cached: 60,
                // Writes not split by duration are 5-minute ones.
                cache_write: 30,
                cache_write_1h: 0,
                reasoning: 0,
            })
        );
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":60,\"output_tokens\":1}}}\n\n");
        s.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n");
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 70,
                output: 7,
                cached: 60,
                ..Default::default()
            })
        );
    }

    #[test]
    fn sse_usage_split_across_chunks() {
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n");
        s.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_");
        s.feed(b"tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 9,
                output: 4,
                cached: 0,
                ..Default::default()
            })
        );
    }

    #[test]
    fn anthropic_stream_usage_accumulates() {
        let mut s = UsageScanner::new(true);
        s.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
        s.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n");
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 25,
                output: 15,
                cached: 0,
                ..Default::default()
            })
        );
    }

    #[test]
    fn a_stream_cut_before_usage_reports_none() {
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"usa");
        assert_eq!(s.finish(), None);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn scan_in_pieces(sse: bool, body: &[u8], cuts: &[usize]) -> Option<Usage> {
        let mut s = UsageScanner::new(sse);
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        for c in cuts {
            s.feed(&body[at..c]);
            at = c;
        }
        s.feed(&body[at..]);
        s.finish()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// However a stream is cut into chunks, the usage found is the same.
        #[test]
        fn usage_does_not_depend_on_chunking(
            texts in proptest::collection::vec("[a-z ]{0,20}", 0..6),
            input in 0u64..1_000_000,
            output in 0u64..1_000_000,
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut body = String::new();
            for t in &texts {
                body.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}],\"usage\":null}}{nl}{nl}"));
            }
            body.push_str(&format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{input},\"completion_tokens\":{output}}}}}{nl}{nl}data: [DONE]{nl}{nl}"));
            let got = scan_in_pieces(true, body.as_bytes(), &cuts);
            prop_assert_eq!(got, Some(Usage { input, output, cached: 0, ..Default::default() }));
        }

        /// Any bytes, as SSE or JSON: a usage or none, never a panic.
        #[test]
        fn any_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            cuts in proptest::collection::vec(any::<usize>(), 0..4),
            sse in any::<bool>(),
        ) {
            let _ = scan_in_pieces(sse, &body, &cuts);
        }

        /// Absurd numbers from an upstream saturate instead of wrapping.
        #[test]
        fn totals_saturate(input in any::<u64>(), output in any::<u64>()) {
            let u = Usage { input, output, cached: 0, ..Default::default() };
            prop_assert!(u.total() >= input.max(output));
        }
    }
}
