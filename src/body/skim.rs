//! A JSON walker for a request body's top-level object. It checks the whole document's
//! grammar as serde_json does (strings without raw control characters or bad escapes,
//! numbers in JSON's form, nothing after the object) but builds nothing: it hands over
//! each top-level member's key and the byte range of its value. Strings, most of a chat
//! request, are crossed eight bytes at a time for their first [`SHORT`] bytes and with
//! `memchr` (vector instructions) after that, where serde_json's skipping looked at each
//! byte in turn.

use std::borrow::Cow;
use std::ops::Range;

/// Calls `each` with every member of the JSON object `text` (key unescaped, byte range of
/// the value), in order, then checks that nothing but whitespace follows. Errors name
/// what was wrong and where.
pub fn members(
    text: &str,
    mut each: impl FnMut(&str, Range<usize>) -> Result<(), String>,
) -> Result<(), String> {
    let mut w = Walk {
        b: text.as_bytes(),
        i: 0,
    };
    w.space();
    w.expect(b'{')?;
    w.space();
    if w.peek() == Some(b'}') {
        w.i += 1;
    } else {
        loop {
            let key = w.key(text)?;
            w.space();
            w.expect(b':')?;
            w.space();
            let start = w.i;
            w.value()?;
            each(&key, start..w.i)?;
            w.space();
            match w.next() {
                Some(b',') => w.space(),
                Some(b'}') => break,
                _ => return Err(w.error("expected `,` or `}`")),
            }
        }
    }
    w.space();
    if w.i < w.b.len() {
        return Err(w.error("trailing characters"));
    }
    Ok(())
}

/// The closing brackets of the arrays and objects a value is inside, innermost last: the
/// first 128 in place, any deeper on the heap.
#[derive(Default)]
struct Closers {
    /// Bit n set: level n is an object.
    bits: u128,
    deeper: Vec<bool>,
    depth: usize,
}

impl Closers {
    fn push(&mut self, close: u8) {
        let object = close == b'}';
        if self.depth < 128 {
            self.bits = self.bits & !(1 << self.depth) | (u128::from(object) << self.depth);
        } else {
            self.deeper.push(object);
        }
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth -= 1;
        if self.depth >= 128 {
            self.deeper.pop();
        }
    }

    fn last(&self) -> Option<u8> {
        let level = self.depth.checked_sub(1)?;
        let object = if level < 128 {
            self.bits >> level & 1 == 1
        } else {
            self.deeper[level - 128]
        };
        Some(if object { b'}' } else { b']' })
    }
}

/// Bytes of a string looked at eight at a time ([`short_run`]) before `memchr` takes over.
const SHORT: usize = 16;

/// Where a string's first quote, backslash or control character is among the first
/// [`SHORT`] bytes of `rest`: eight bytes at a time, each byte compared at once with the
/// three by the carry trick (taking 0x01 from every byte of a word sets a byte's top bit
/// where it was zero; a borrow can set a later byte's too, never an earlier one's, so the
/// lowest bit set is exact).
fn short_run(rest: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOP: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    let mut n = 0;
    while n < SHORT {
        let Some(eight) = rest.get(n..n + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            // The body's last few bytes: one at a time.
            let tail = rest.get(n..)?;
            return tail
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .map(|k| n + k);
        };
        let x = u64::from_le_bytes(eight);
        let found = (zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x))
            & TOP;
        if found != 0 {
            return Some(n + found.trailing_zeros() as usize / 8);
        }
        n += 8;
    }
    None
}

/// Whether `bytes` hold a raw control character (below 0x20). The smallest byte of each
/// of sixteen lanes, without a branch, so the compiler does it sixteen bytes at a time.
fn has_control(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(16);
    let mut least = [u8::MAX; 16];
    for chunk in &mut chunks {
        for (l, &c) in least.iter_mut().zip(chunk) {
            *l = (*l).min(c);
        }
    }
    let tail = chunks.remainder().iter();
    least.iter().chain(tail).fold(u8::MAX, |m, &c| m.min(c)) < 0x20
}

struct Walk<'a> {
    b: &'a [u8],
    i: usize,
}

impl Walk<'_> {
    fn error(&self, what: &str) -> String {
        if self.i >= self.b.len() {
            format!("{what} (the body ends early)")
        } else {
            format!("{what} at byte {}", self.i)
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected `{}`", char::from(c))))
        }
    }

    fn space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A member's key, unescaped when it holds escapes.
    fn key<'t>(&mut self, text: &'t str) -> Result<Cow<'t, str>, String> {
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a key"));
        }
        let start = self.i;
        let escaped = self.string()?;
        let quoted = &text[start..self.i];
        if !escaped {
            return Ok(Cow::Borrowed(&quoted[1..quoted.len() - 1]));
        }
        serde_json::from_str::<String>(quoted)
            .map(Cow::Owned)
            .map_err(|e| format!("a key at byte {start}: {e}"))
    }

    /// Crosses a string from its opening quote; true when it holds an escape.
    fn string(&mut self) -> Result<bool, String> {
        self.i += 1;
        let mut escaped = false;
        loop {
            let rest = &self.b[self.i..];
            // A short run (keys, roles, names) eight bytes at a time; a long one with
            // memchr, then a check for control characters sixteen bytes at a time.
            let n = match short_run(rest) {
                Some(n) => n,
                None if rest.len() <= SHORT => {
                    self.i = self.b.len();
                    return Err(self.error("unterminated string"));
                }
                None => {
                    let Some(n) = memchr::memchr2(b'"', b'\\', rest) else {
                        self.i = self.b.len();
                        return Err(self.error("unterminated string"));
                    };
                    if has_control(&rest[SHORT..n]) {
                        self.i += rest.iter().position(|&c| c < 0x20).unwrap_or(n);
                        return Err(self.error("control character in a string"));
                    }
                    n
                }
            };
            self.i += n;
            match self.b[self.i] {
                b'"' => {
                    self.i += 1;
                    return Ok(escaped);
                }
                b'\\' => {}
                _ => return Err(self.error("control character in a string")),
            }
            escaped = true;
            match self.b.get(self.i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 2,
                Some(b'u') => {
                    let hex = self.b.get(self.i + 2..self.i + 6);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return Err(self.error("bad \\u escape"));
                    }
                    self.i += 6;
                }
                _ => return Err(self.error("bad escape")),
            }
        }
    }

    /// Crosses one value, however deeply nested (as serde_json skips one: without a limit
    /// and without recursion, so no body can exhaust the stack).
    fn value(&mut self) -> Result<(), String> {
        let mut open = Closers::default();
        loop {
            match self.peek() {
                Some(c @ (b'{' | b'[')) => {
                    let close = if c == b'{' { b'}' } else { b']' };
                    self.i += 1;
                    self.space();
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        open.push(close);
                        if close == b'}' {
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.word(b"true")?,
                Some(b'f') => self.word(b"false")?,
                Some(b'n') => self.word(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                _ => return Err(self.error("expected a value")),
            }
            // After a value: close what it ended, until a `,` opens the next one.
            loop {
                let Some(close) = open.last() else {
                    return Ok(());
                };
                self.space();
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        self.space();
                        if close == b'}' {
                            self.member_key()?;
                        }
                        break;
                    }
                    Some(c) if c == close => {
                        self.i += 1;
                        open.pop();
                    }
                    _ => {
                        return Err(self.error(&format!("expected `,` or `{}`", char::from(close))))
                    }
                }
            }
        }
    }

    /// A nested object's key and its colon, up to the value.
    fn member_key(&mut self) -> Result<(), String> {
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a key"));
        }
        self.string()?;
        self.space();
        self.expect(b':')?;
        self.space();
        Ok(())
    }

    fn word(&mut self, word: &[u8]) -> Result<(), String> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.error("expected a value"))
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<(), String> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.some_digits()?;
        }
        Ok(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Result<(), String> {
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(self.error("expected a digit"));
        }
        self.digits();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Whether serde_json takes `text` as a JSON object.
    fn serde_takes(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
            && text.trim_start().starts_with('{')
    }

    fn skim_takes(text: &str) -> bool {
        members(text, |_, _| Ok(())).is_ok()
    }

    #[test]
    fn the_first_special_byte_of_a_run_is_found_exactly() {
        for len in 0..40 {
            for at in 0..len {
                for c in [b'"', b'\\', 0u8, 0x1f] {
                    let mut s = vec![b'a'; len];
                    // Bytes after the first that would confuse a borrow.
                    for (i, b) in s.iter_mut().enumerate().skip(at + 1) {
                        *b = [0u8, b'"', 0x21, 0x5c, 0x80][i % 5];
                    }
                    s[at] = c;
                    let want = (at < SHORT).then_some(at);
                    assert_eq!(short_run(&s), want, "{s:?}");
                }
            }
            let clean: Vec<u8> = (0..len)
                .map(|i| [b' ', b'~', 0x7f, 0xc3, 0xa9, 0x21][i % 6])
                .collect();
            assert_eq!(short_run(&clean), None, "{clean:?}");
        }
    }

    #[test]
    fn control_characters_are_found_wherever_they_are_in_a_long_string() {
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 40, 100] {
            for at in 0..len {
                for c in [0u8, 0x0a, 0x1f] {
                    let mut s = vec![b'a'; len];
                    s[at] = c;
                    assert!(has_control(&s), "{len} {at} {c}");
                    let text = format!("{{\"a\":\"{}\"}}", String::from_utf8(s).unwrap());
                    assert!(!skim_takes(&text), "{text:?}");
                }
            }
            let clean: Vec<u8> = (0..len)
                .map(|i| [b' ', b'~', 0x7f, 0xc3, 0xa9, 0x20][i % 6])
                .collect();
            assert!(!has_control(&clean), "{len}");
        }
    }

    #[test]
    fn members_come_with_their_keys_unescaped_and_their_values_in_place() {
        let text = r#" { "model" : "a\"b", "m\u0065ssages":[{"x":[1,2.5e-3,{}]}], "n":null } "#;
        let mut seen = Vec::new();
        members(text, |k, v| {
            seen.push((k.to_string(), text[v].to_string()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("model".to_string(), r#""a\"b""#.to_string()),
                ("messages".into(), r#"[{"x":[1,2.5e-3,{}]}]"#.into()),
                ("n".into(), "null".into()),
            ]
        );
    }

    #[test]
    fn it_takes_and_refuses_what_serde_json_does() {
        for text in [
            "{}",
            " {\"a\":1} \n",
            "{\"a\":[]}",
            "{\"a\":-0.5E+7}",
            "{\"a\":\"\\u00e9\\n\"}",
            "{\"a\":\"é 😀\"}",
            "{\"a\":1,}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":.5}",
            "{\"a\":1e}",
            "{\"a\":tru}",
            "{\"a\":\"\t\"}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12G4\"}",
            "{\"a\":\"x}",
            "{\"a\" 1}",
            "{a:1}",
            "{\"a\":1}x",
            "{\"a\":1}{}",
            "{\"a\":[1 2]}",
            "{\"a\":{\"b\"}}",
            "{\"a\":[1,]}",
            "{,}",
            "[]",
            "",
        ] {
            assert_eq!(skim_takes(text), serde_takes(text), "{text:?}");
        }
        // Nesting has no limit (serde_json's skipping has none), and needs no stack.
        for depth in [1, 127, 128, 129, 300, 100_000] {
            let text = format!(
                "{{\"a\":{}1{}}}",
                "[{\"b\":".repeat(depth),
                "}]".repeat(depth)
            );
            assert!(skim_takes(&text), "depth {depth}");
            let cut = &text[..text.len() - 2];
            assert!(!skim_takes(cut), "depth {depth}, cut");
            let wrong = text.replacen("}]}", "]]}", 1);
            assert!(!skim_takes(&wrong), "depth {depth}, mismatched");
        }
    }

    /// JSON values of every kind, small enough to nest.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| serde_json::json!(f)),
            "\\PC{0,12}|[\"\\\\\u{0}-\u{1f}a]{0,6}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z\"\\\\]{0,6}", inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Any object serde_json writes is walked, member by member, to the same values.
        #[test]
        fn every_written_object_is_walked_to_its_members(
            members_in in proptest::collection::btree_map("[a-z\"\\\\\u{e9}]{0,8}", json_value(), 0..6),
            pretty in any::<bool>(),
        ) {
            let object = serde_json::Value::Object(members_in.clone().into_iter().collect());
            let text = if pretty {
                serde_json::to_string_pretty(&object).unwrap()
            } else {
                object.to_string()
            };
            let mut seen = Vec::new();
            members(&text, |k, v| {
                seen.push((k.to_string(), serde_json::from_str::<serde_json::Value>(&text[v]).unwrap()));
                Ok(())
            }).unwrap();
            // Against serde_json's reading of the same text (its floats need not round-trip).
            let whole: serde_json::Value = serde_json::from_str(&text).unwrap();
            let want: Vec<_> = whole.as_object().unwrap().clone().into_iter().collect();
            prop_assert_eq!(seen.len(), members_in.len());
            prop_assert_eq!(seen, want);
        }

        /// Cut or changed anywhere, a document is taken exactly when serde_json takes it.
        #[test]
        fn a_damaged_document_is_refused_exactly_when_serde_json_refuses_it(
            object in proptest::collection::btree_map("[a-z]{0,4}", json_value(), 0..4),
            cut in any::<proptest::sample::Index>(),
            at in any::<proptest::sample::Index>(),
            byte in prop_oneof![Just(b'"'), Just(b'\\'), Just(b','), Just(b'}'), Just(b']'), Just(b'{'), Just(b'['), Just(b':'), Just(b' '), Just(b'\n'), Just(b'0'), Just(b'-'), Just(b'e'), Just(b'.'), Just(b'u'), Just(0x01)],
            how in 0..3u8,
        ) {
            let text = serde_json::Value::Object(object.into_iter().collect()).to_string();
            let mut bytes = text.into_bytes();
            match how {
                0 => bytes.truncate(cut.index(bytes.len() + 1)),
                1 => { let i = at.index(bytes.len()); bytes[i] = byte; }
                _ => { let i = at.index(bytes.len() + 1); bytes.insert(i, byte); }
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                prop_assert_eq!(skim_takes(text), serde_takes(text), "{:?}", text);
            }
        }
    }
}
