//! Properties of the stream translators.

use super::from_chat::{anthropic_tool_stream, read_chat_stream};
use super::to_chat::{openai_tool_chunks, read_anthropic_stream};
use super::*;
use proptest::prelude::*;
use serde_json::json;

/// Argument text cut into 1..6 pieces at arbitrary char boundaries.
fn pieces(text: &str, cuts: &[usize]) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for c in at.into_iter().chain([chars.len()]) {
        out.push(chars[from..c].iter().collect());
        from = c;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// However the upstream stream is cut into reads, the client gets the same bytes,
    /// and streamed tool arguments concatenate to exactly the upstream's JSON.
    #[test]
    fn anthropic_to_chat_is_independent_of_reads(
        city in "[a-zA-Z \\\\\"é{}]{0,24}",
        arg_cuts in proptest::collection::vec(any::<usize>(), 0..5),
        read_cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let args = json!({"city": city}).to_string();
        let ps = pieces(&args, &arg_cuts);
        let refs: Vec<&str> = ps.iter().map(String::as_str).collect();
        let wire = anthropic_sse(&anthropic_tool_stream(&refs));
        let (whole, complete) = run_stream(Translation::ChatToMessages, true, &wire, &[]);
        prop_assert!(complete);
        let (cut, _) = run_stream(Translation::ChatToMessages, true, &wire, &read_cuts);
        prop_assert_eq!(&cut, &whole);
        let s = read_chat_stream(&whole);
        prop_assert_eq!(&s.calls[0].2, &args);
    }

    #[test]
    fn chat_to_anthropic_is_independent_of_reads(
        path in "[a-z/. \\\\\"]{0,24}",
        arg_cuts in proptest::collection::vec(any::<usize>(), 0..5),
        read_cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let args = json!({"file": path}).to_string();
        let ps = pieces(&args, &arg_cuts);
        let refs: Vec<&str> = ps.iter().map(String::as_str).collect();
        let wire = openai_sse(&openai_tool_chunks(&refs), true);
        let (whole, complete) = run_stream(Translation::MessagesToChat, false, &wire, &[]);
        prop_assert!(complete);
        let (cut, _) = run_stream(Translation::MessagesToChat, false, &wire, &read_cuts);
        prop_assert_eq!(&cut, &whole);
        let (_, tools, _, _, ok) = read_anthropic_stream(&whole);
        prop_assert!(ok);
        prop_assert_eq!(&tools[0].1, &args);
    }

    /// A token delta in Anthropic's own spelling is copied without being decoded; the
    /// client gets the same bytes as when the event is read in full (any other spelling).
    #[test]
    fn the_token_delta_fast_path_writes_what_the_full_reading_writes(
        texts in proptest::collection::vec("(?s).{0,12}", 1..4),
        thinking in any::<bool>(),
    ) {
        let (kind, field) = if thinking { ("thinking_delta", "thinking") } else { ("text_delta", "text") };
        let start = json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "usage": {"input_tokens": 1, "output_tokens": 1}}});
        let mut exact = format!("event: message_start\ndata: {start}\n\n");
        let mut other = exact.clone();
        for (i, text) in texts.iter().enumerate() {
            let literal = serde_json::to_string(text).unwrap();
            let data = format!(r#"{{"type":"content_block_delta","index":{i},"delta":{{"type":"{kind}","{field}":{literal}}}}}"#);
            prop_assert!(crate::provider::anthropic::token_delta(data.as_bytes()).is_some(), "{}", data);
            exact.push_str(&format!("event: content_block_delta\ndata: {data}\n\n"));
            // serde_json writes members sorted: another spelling, read in full.
            let sorted = json!({"type": "content_block_delta", "index": i, "delta": {"type": kind, field: text}});
            prop_assert!(crate::provider::anthropic::token_delta(sorted.to_string().as_bytes()).is_none());
            other.push_str(&format!("event: content_block_delta\ndata: {sorted}\n\n"));
        }
        let (fast, _) = run_stream(Translation::ChatToMessages, false, exact.as_bytes(), &[]);
        let (full, _) = run_stream(Translation::ChatToMessages, false, other.as_bytes(), &[]);
        prop_assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&full));
    }

    /// After an error event nothing more is emitted, whatever follows upstream.
    #[test]
    fn nothing_follows_an_error(at in 1usize..12, extra in 0usize..6) {
        let mut evs = anthropic_tool_stream(&["{\"a\":", "1}"]);
        let at = at.min(evs.len() - 1);
        evs.insert(at, json!({"type": "error", "error": {"type": "api_error", "message": "boom"}}));
        evs.truncate(at + 1 + extra);
        let (out, complete) = run_stream(Translation::ChatToMessages, true, &anthropic_sse(&evs), &[]);
        prop_assert!(!complete);
        let all = events(&out);
        prop_assert!(all.last().unwrap().1.get("error").is_some());
        prop_assert_eq!(all.iter().filter(|e| e.1.get("error").is_some()).count(), 1);
    }
}
