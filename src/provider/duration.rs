//! The one reader of the durations providers write in rate-limit and retry fields:
//! `x-ratelimit-reset-*` (OpenAI, Azure, Groq) and Gemini's `retryDelay`.

use std::time::Duration;

/// A Go-style duration as OpenAI, Azure and Groq write resets: `1s`, `6m0s`, `20ms`,
/// `2m59.56s`, `1h2m3s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && (0.0..1e9).contains(&secs))
            .then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0.0f64;
    let mut rest = s;
    let mut any = false;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, scale) = if rest.starts_with("ms") {
            ("ms", 1e-3)
        } else if rest.starts_with('h') {
            ("h", 3600.0)
        } else if rest.starts_with('m') {
            ("m", 60.0)
        } else if rest.starts_with('s') {
            ("s", 1.0)
        } else {
            return None;
        };
        rest = &rest[unit.len()..];
        total += value * scale;
        any = true;
    }
    (any && total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn openai_style_resets_are_read() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(
            parse_duration("2m59.56s"),
            Some(Duration::from_secs_f64(179.56))
        );
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "s", "1x", "-1s", "1.2.3s", "3d", "1e300", "inf", "NaN"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_text_parses_or_not_without_panicking(s in "[0-9.hmsun]{0,12}|\\PC{0,24}") {
            let _ = parse_duration(&s);
        }
    }
}
