//! Stage 1, `request_filter`: who is calling. Maps the presented client key to a key
//! name by SHA-256 digest, confirmed with a constant-time comparison. It never logs or
//! returns the key itself, and it does no I/O.

use crate::config::file::LimitSection;
use crate::secret::Secret;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Where client keys are looked up. The config's keys (`KeyRing`, reloaded with the
/// file) are the one implementation today; a store of keys managed at run time (a
/// database) plugs in here, consulted with the config the request started with.
pub trait KeyStore: Send + Sync {
    /// The caller for a presented key (`None` when the request carried none), or `None`
    /// when the key is not valid.
    fn authenticate(&self, config_keys: &KeyRing, presented: Option<&str>) -> Option<Caller>;
}

/// The keys of the config file only.
pub struct ConfigKeys;

impl KeyStore for ConfigKeys {
    fn authenticate(&self, config_keys: &KeyRing, presented: Option<&str>) -> Option<Caller> {
        config_keys.authenticate(presented)
    }
}

/// The configured client keys, stored only as digests.
#[derive(Default)]
pub struct KeyRing {
    by_digest: HashMap<[u8; 32], Arc<KeyInfo>>,
}

/// What the gateway knows about a client key: its name and its limits.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub name: String,
    pub limits: LimitSection,
}

/// The outcome of authentication for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No keys are configured: the gateway is open.
    Anonymous,
    /// A configured key.
    Key(Arc<KeyInfo>),
}

impl Caller {
    /// The name used in logs and metrics labels; never the key.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => "-",
            Caller::Key(k) => &k.name,
        }
    }
}

impl KeyRing {
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a str, &'a Secret, LimitSection)>) -> Self {
        let by_digest = keys
            .into_iter()
            .map(|(name, key, limits)| {
                let info = KeyInfo {
                    name: name.to_string(),
                    limits,
                };
                (digest(key.expose()), Arc::new(info))
            })
            .collect();
        KeyRing { by_digest }
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Authenticates a presented key (`None` when the request carried none).
    /// Returns `None` when keys are configured and this one is not among them.
    pub fn authenticate(&self, presented: Option<&str>) -> Option<Caller> {
        if self.by_digest.is_empty() {
            return Some(Caller::Anonymous);
        }
        let d = digest(presented?);
        // The map lookup only finds a candidate by digest; the equality that decides is
        // constant-time, so response timing says nothing about how close a guess was.
        let (stored, name) = self.by_digest.get_key_value(&d)?;
        bool::from(stored.ct_eq(&d)).then(|| Caller::Key(Arc::clone(name)))
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Takes the client key from `Authorization: Bearer KEY`, or from `x-api-key` (the
/// Anthropic SDK's header) when the bearer is absent.
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Option<&'a str> {
    if let Some(v) = authorization {
        let v = std::str::from_utf8(v).ok()?.trim();
        let (scheme, rest) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    x_api_key
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_keys_authenticate() {
        let k = Secret::new("tg-team-a-0123456789");
        let ring = KeyRing::new([("team-a", &k, LimitSection::default())]);
        let caller = ring.authenticate(Some("tg-team-a-0123456789")).unwrap();
        assert_eq!(caller.name(), "team-a");
        assert_eq!(ring.authenticate(Some("tg-team-a-012345678")), None);
        assert_eq!(ring.authenticate(None), None);
    }

    #[test]
    fn an_empty_ring_admits_everyone() {
        assert_eq!(
            KeyRing::default().authenticate(None),
            Some(Caller::Anonymous)
        );
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        assert_eq!(presented_key(Some(b"Bearer abc"), None), Some("abc"));
        assert_eq!(presented_key(Some(b"bearer  abc "), None), Some("abc"));
        assert_eq!(presented_key(Some(b"Basic abc"), Some(b"x")), None);
        assert_eq!(presented_key(None, Some(b"xyz")), Some("xyz"));
        assert_eq!(presented_key(None, None), None);
    }
}
