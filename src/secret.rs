//! Secrets (client keys, upstream API keys) wrapped so that `Debug` and `Display` never
//! print them, and a masking helper for the rare place that must show which key it was.

use std::fmt;

/// A credential from the config. Formatting prints `***`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that sends it (an upstream auth header) or hashes it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Text as it may be printed: in every whitespace-separated word that holds an `@`, what
/// stands between the scheme's separator (the first run of `:` and `/`) and the last `@`
/// becomes `***`, whether or not the word parses as a URL (`postgres//u:PW@@host`,
/// `redis:/:PW@host:notaport/0`, `sqlite://u:PW@/x.db`, or a URL inside an error message).
/// A word without `@` holds no userinfo and is kept.
pub fn mask_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for piece in text.split_inclusive(char::is_whitespace) {
        let word = piece.trim_end_matches(char::is_whitespace);
        let Some(at) = word.rfind('@') else {
            out.push_str(piece);
            continue;
        };
        let start = word[..at].find([':', '/']).map_or(0, |i| {
            i + word[i..at].find(|c| c != ':' && c != '/').unwrap_or(at - i)
        });
        out.push_str(&word[..start]);
        out.push_str("***");
        out.push_str(&piece[at..]);
    }
    out
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Masks a credential for display: `sk-ab****cdef` for long values, `****` for short ones,
/// so that an operator can tell two keys apart without the key being recoverable.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 16 {
        return "****".to_string();
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_format_their_value() {
        let s = Secret::new("sk-live-abcdef0123456789");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "sk-live-abcdef0123456789");
    }

    #[test]
    fn mask_keeps_only_the_ends() {
        assert_eq!(mask("sk-abcdefghijklmnopcdef"), "sk-ab****cdef");
        assert_eq!(mask("short"), "****");
    }

    #[test]
    fn credentials_in_a_url_are_masked() {
        assert_eq!(
            mask_userinfo("http://user:pass@host:8000/v1"),
            "http://***@host:8000/v1"
        );
        assert_eq!(mask_userinfo("https://u:p/a@ss@h/v1"), "https://***@h/v1");
        assert_eq!(mask_userinfo("http://host/v1"), "http://host/v1");
        assert_eq!(mask_userinfo("postgres://u@h/db"), "postgres://***@h/db");
    }

    #[test]
    fn the_password_of_a_malformed_url_is_masked_too() {
        for (url, shown) in [
            ("postgres//u:PW@@host", "postgres//***@host"),
            ("redis:/:PW@host:notaport/0", "redis:/:***@host:notaport/0"),
            ("sqlite://u:PW@/x.db", "sqlite://***@/x.db"),
            ("u:PW@host", "u:***@host"),
            ("PW@host", "***@host"),
            ("redis://:PW@", "redis://:***@"),
        ] {
            assert_eq!(mask_userinfo(url), shown, "{url}");
            assert!(!mask_userinfo(url).contains("PW"));
        }
        // Inside an error message: each word on its own, spacing kept.
        assert_eq!(
            mask_userinfo("error connecting to postgres://u:PW@h:5/db: refused\n"),
            "error connecting to postgres://***@h:5/db: refused\n"
        );
    }
}
