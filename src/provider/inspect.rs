//! Stage 7 (inside the attempt loop): judging an upstream answer before anything reaches
//! the client. Classifies by status and a bounded prefix of the error body into: deliver,
//! transient (cool down briefly, honouring the provider's retry hint), quota (cool down
//! long), credentials (the gateway's key is wrong: cool down long), skip (this target
//! cannot take this request, no cooldown), or context length. Built-in rules cover the
//! error shapes of OpenAI, Anthropic, Azure, Gemini, DeepSeek, OpenRouter, Mistral and Groq
//! (OpenAI-compatible providers reuse shapes, so they apply to every upstream); config
//! adds statuses and body patterns. Pure functions: no I/O, no clock.

use super::duration::parse_duration;
use http::HeaderMap;
use std::time::{Duration, SystemTime};

/// The verdict on one upstream answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Class {
    /// Relay it: success, or an error that is the request's own fault (400, 404, 413...).
    Deliver,
    /// Rate limit, overload, 5xx: cool down for the hint (or the default) and move on.
    Transient { hint: Option<Duration> },
    /// Out of credit, billing, spend cap: cool down for `quota_cooldown` and move on.
    Quota,
    /// 401/403: the gateway's credential for this target is wrong.
    Credentials,
    /// This target cannot serve this request (larger than its per-minute limit); another
    /// may. No cooldown.
    Skip,
    /// The prompt exceeds the model's context: delivered unless the alias has
    /// `context_fallbacks`.
    ContextLength,
}

impl Class {
    /// Outcome name for logs and metrics.
    pub fn outcome(self) -> &'static str {
        match self {
            Class::Deliver => "ok",
            Class::Transient { .. } => "transient",
            Class::Quota => "quota",
            Class::Credentials => "credentials",
            Class::Skip => "too_large_for_target",
            Class::ContextLength => "context_length",
        }
    }
}

/// Status patterns and body patterns from config (`retry_on`), lowercased once.
#[derive(Debug, Default, Clone)]
pub struct Rules {
    statuses: Vec<StatusPattern>,
    patterns: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusPattern {
    Exact(u16),
    Class(u16),
}

impl Rules {
    /// Builds rules from (statuses, body patterns) lists, as `retry_on` writes them;
    /// errors name the bad entry.
    pub fn new<'a>(
        lists: impl IntoIterator<Item = (&'a [String], &'a [String])>,
    ) -> Result<Rules, String> {
        let mut rules = Rules::default();
        for (statuses, patterns) in lists {
            for st in statuses {
                rules.statuses.push(parse_status(st)?);
            }
            for p in patterns {
                if p.is_empty() {
                    return Err("empty body pattern".into());
                }
                rules.patterns.push(p.to_ascii_lowercase());
            }
        }
        Ok(rules)
    }

    fn status_matches(&self, status: u16) -> bool {
        self.statuses.iter().any(|p| match *p {
            StatusPattern::Exact(s) => s == status,
            StatusPattern::Class(c) => status / 100 == c,
        })
    }
}

fn parse_status(s: &str) -> Result<StatusPattern, String> {
    let t = s.trim().to_ascii_lowercase();
    if let Some(c) = t.strip_suffix("xx") {
        if let Ok(c @ 1..=5) = c.parse::<u16>() {
            return Ok(StatusPattern::Class(c));
        }
    } else if let Ok(code @ 100..=599) = t.parse::<u16>() {
        return Ok(StatusPattern::Exact(code));
    }
    Err(format!("{s:?} is not a status like \"429\" or \"5xx\""))
}

/// Body markers of an exhausted account, spend cap or billing problem.
const QUOTA_MARKERS: &[&str] = &[
    "insufficient_quota",
    "credit_balance_exhausted",
    "enforced_spend_limit_reached",
    "insufficient balance",
    "insufficient credits",
    "credit balance is too low",
    "billing_hard_limit_reached",
    "billing_not_active",
];

/// Body markers of a prompt longer than the model's context.
const CONTEXT_MARKERS: &[&str] = &[
    "context_length_exceeded",
    "maximum context length",
    "prompt is too long",
    "context window",
];

/// Classifies an upstream answer. `body` is the (bounded) start of the error body.
/// `wall_ms`: when the answer arrived (milliseconds since the Unix epoch), for a
/// `retry-after` written as a date.
pub fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    rules: &Rules,
    wall_ms: i64,
) -> Class {
    if status < 400 {
        return Class::Deliver;
    }
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    let has = |m: &str| text.contains(m);
    let hint = retry_hint(headers, &text, wall_ms);

    if QUOTA_MARKERS.iter().any(|m| has(m)) || status == 402 {
        return Class::Quota;
    }
    // Gemini says "exceeded your current quota" both for per-minute limits (with a
    // RetryInfo delay) and for exhausted daily or billing quota (without one).
    if has("exceeded your current quota") || has("resource_exhausted") {
        return match hint {
            Some(_) => Class::Transient { hint },
            None => Class::Quota,
        };
    }
    if status == 401 || status == 403 {
        return Class::Credentials;
    }
    if CONTEXT_MARKERS.iter().any(|m| has(m)) {
        return Class::ContextLength;
    }
    // OpenAI's 429 "Request too large ... on tokens per min": this request exceeds this
    // target's whole per-minute budget, which waiting does not fix; another target may fit.
    if status == 429 && has("request too large") {
        return Class::Skip;
    }
    if matches!(status, 408 | 429) || status >= 500 {
        return Class::Transient { hint };
    }
    if rules.status_matches(status) || rules.patterns.iter().any(|p| has(p)) {
        return Class::Transient { hint };
    }
    Class::Deliver
}

/// The provider's hint of when to come back, in order of precision: `retry-after-ms`,
/// `retry-after` (seconds or an HTTP date), a `retryDelay` in the body (Gemini),
/// `x-ratelimit-reset-requests` / `-tokens` (durations like `6m0s`, the later of the two).
/// A date counts from `wall_ms`.
pub fn retry_hint(headers: &HeaderMap, lowercase_body: &str, wall_ms: i64) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_millis(ms as u64));
        }
    }
    if let Some(v) = header("retry-after") {
        if let Ok(secs) = v.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Some(Duration::from_secs_f64(secs));
            }
        } else if let Ok(at) = httpdate::parse_http_date(v) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_millis(wall_ms.max(0) as u64);
            return Some(at.duration_since(now).unwrap_or_default());
        }
    }
    if let Some(pos) = lowercase_body.find("\"retrydelay\"") {
        let rest = &lowercase_body[pos + "\"retrydelay\"".len()..];
        let value = rest
            .trim_start()
            .trim_start_matches(':')
            .trim_start()
            .trim_start_matches('"');
        let end = value.find('"').unwrap_or(value.len());
        if let Some(d) = parse_duration(&value[..end]) {
            return Some(d);
        }
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|h| header(h).and_then(parse_duration))
        .max()
}

#[cfg(test)]
mod tests {
    /// When the answers of these tests arrived: 2023-11-14T22:13:20Z.
    pub(super) const NOW: i64 = 1_700_000_000_000;
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    fn class(status: u16, headers: &[(&str, &str)], body: &str) -> Class {
        classify(status, &h(headers), body.as_bytes(), &Rules::default(), NOW)
    }

    #[test]
    fn reference_error_shapes_classify_as_documented() {
        // OpenAI
        assert_eq!(
            class(
                429,
                &[],
                r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#
            ),
            Class::Quota
        );
        assert_eq!(
            class(
                429,
                &[("retry-after", "7")],
                r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000. Please try again in 6.596s.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#
            ),
            Class::Transient {
                hint: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            class(
                429,
                &[],
                r#"{"error":{"message":"Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.","type":"tokens","code":"rate_limit_exceeded"}}"#
            ),
            Class::Skip
        );
        assert_eq!(
            class(
                429,
                &[],
                r#"{"error":{"code":"credit_balance_exhausted","message":"x"}}"#
            ),
            Class::Quota
        );
        // Anthropic
        assert_eq!(
            class(
                429,
                &[("retry-after", "2")],
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"r"}"#
            ),
            Class::Transient {
                hint: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(
            class(
                429,
                &[],
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"spend","details":{"error_code":"enforced_spend_limit_reached"}}}"#
            ),
            Class::Quota
        );
        assert_eq!(
            class(
                529,
                &[],
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            Class::Transient { hint: None }
        );
        assert_eq!(
            class(
                400,
                &[],
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#
            ),
            Class::Quota
        );
        // Azure
        assert_eq!(
            class(
                429,
                &[("retry-after", "12")],
                r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded token rate limit. Please retry after 12 seconds."}}"#
            ),
            Class::Transient {
                hint: Some(Duration::from_secs(12))
            }
        );
        // Gemini: per-minute with RetryInfo is transient; without a delay it is quota.
        let gemini = r#"[{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}]"#;
        assert_eq!(
            class(429, &[], gemini),
            Class::Transient {
                hint: Some(Duration::from_secs(22))
            }
        );
        assert_eq!(
            class(
                429,
                &[],
                r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED"}}"#
            ),
            Class::Quota
        );
        // DeepSeek
        assert_eq!(
            class(
                402,
                &[],
                r#"{"error":{"message":"Insufficient Balance","type":"unknown_error","param":null,"code":"invalid_request_error"}}"#
            ),
            Class::Quota
        );
        assert_eq!(
            class(503, &[], "Server Overloaded"),
            Class::Transient { hint: None }
        );
        // OpenRouter
        assert_eq!(
            class(
                402,
                &[],
                r#"{"error":{"code":402,"message":"Insufficient credits. Add more using https://openrouter.ai/credits","metadata":{}}}"#
            ),
            Class::Quota
        );
        // Mistral
        assert_eq!(
            class(
                429,
                &[],
                r#"{"object":"error","message":"Rate limit exceeded","type":"rate_limited","param":null,"code":"1300"}"#
            ),
            Class::Transient { hint: None }
        );
        // Groq
        assert_eq!(
            class(
                429,
                &[("retry-after", "3")],
                r#"{"error":{"message":"Rate limit reached for model llama on tokens per minute (TPM)","type":"tokens","code":"rate_limit_exceeded"}}"#
            ),
            Class::Transient {
                hint: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn request_errors_are_delivered_and_credentials_are_flagged() {
        assert_eq!(
            class(
                400,
                &[],
                r#"{"error":{"message":"Invalid 'messages'","type":"invalid_request_error"}}"#
            ),
            Class::Deliver
        );
        assert_eq!(class(404, &[], "{}"), Class::Deliver);
        assert_eq!(class(413, &[], "request entity too large"), Class::Deliver);
        assert_eq!(
            class(
                400,
                &[],
                r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","code":"context_length_exceeded"}}"#
            ),
            Class::ContextLength
        );
        assert_eq!(
            class(401, &[], r#"{"error":{"code":"invalid_api_key"}}"#),
            Class::Credentials
        );
        assert_eq!(class(403, &[], "forbidden"), Class::Credentials);
        assert_eq!(class(200, &[], "insufficient_quota"), Class::Deliver);
    }

    #[test]
    fn config_rules_extend_the_presets() {
        let rules = Rules::new([(
            &vec!["409".into(), "4xx".into()][..],
            &vec!["Try Later".into()][..],
        )])
        .unwrap();
        assert_eq!(
            classify(418, &HeaderMap::new(), b"teapot", &rules, NOW),
            Class::Transient { hint: None }
        );
        let only_body = Rules::new([(&vec![][..], &vec!["try later".into()][..])]).unwrap();
        assert_eq!(
            classify(400, &HeaderMap::new(), b"please TRY LATER", &only_body, NOW),
            Class::Transient { hint: None }
        );
        assert_eq!(
            classify(400, &HeaderMap::new(), b"bad", &only_body, NOW),
            Class::Deliver
        );
        assert!(Rules::new([(&vec!["6xx".into()][..], &vec![][..])]).is_err());
        assert!(Rules::new([(&vec!["abc".into()][..], &vec![][..])]).is_err());
    }

    #[test]
    fn retry_hints_are_read_in_order_of_precision() {
        assert_eq!(
            retry_hint(
                &h(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
                "",
                NOW
            ),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_hint(&h(&[("retry-after", "2")]), "", NOW),
            Some(Duration::from_secs(2))
        );
        let at = |ms: i64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64);
        let future = httpdate::fmt_http_date(at(NOW + 30_000));
        let d = retry_hint(&h(&[("retry-after", &future)]), "", NOW);
        assert_eq!(d, Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(at(NOW - 5_000));
        let d = retry_hint(&h(&[("retry-after", &past)]), "", NOW);
        assert_eq!(d, Some(Duration::ZERO));
        assert_eq!(
            retry_hint(
                &h(&[
                    ("x-ratelimit-reset-requests", "12ms"),
                    ("x-ratelimit-reset-tokens", "6m0s")
                ]),
                "",
                NOW
            ),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            retry_hint(&HeaderMap::new(), r#"{"retrydelay": "1.5s"}"#, NOW),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_hint(&h(&[("retry-after", "soon")]), "", NOW), None);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use tests::NOW;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any status, hint headers and body: a class, never a panic; a 2xx is never
        /// classified as a failure to retry.
        #[test]
        fn any_answer_is_classified(
            status in 100u16..600,
            body in proptest::collection::vec(any::<u8>(), 0..400),
            retry_after in "\\PC{0,12}",
            reset in "[0-9a-z.]{0,10}",
        ) {
            let mut headers = HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&retry_after) {
                headers.insert(http::header::RETRY_AFTER, v);
            }
            if let Ok(v) = http::HeaderValue::from_str(&reset) {
                headers.insert("x-ratelimit-reset-requests", v);
            }
            let class = classify(status, &headers, &body, &Rules::default(), NOW);
            if (200..300).contains(&status) {
                prop_assert_eq!(class.outcome(), classify(200, &HeaderMap::new(), b"", &Rules::default(), NOW).outcome());
            }
            let _ = retry_hint(&headers, &String::from_utf8_lossy(&body).to_lowercase(), NOW);
        }
    }
}
