//! Stage 1, `request_filter`: who is calling. Maps the presented client key to a config
//! key or a stored key by SHA-256 digest, confirmed with a constant-time comparison. It
//! never logs or returns the key itself, and it does no I/O.

use crate::keys::budget::BudgetSpec;
use crate::keys::{Directory, Rejected, StoredKey, StoredTeam};
use crate::limits::Limits;
use crate::secret::Secret;
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

impl Directory {
    /// The caller for a presented key (`None` when the request carried none), or why it
    /// is refused: the config's keys (`KeyRing`, reloaded with the file) are looked up
    /// first, then the keys managed at run time.
    pub fn authenticate(
        &self,
        config_keys: &KeyRing,
        presented: Option<&str>,
    ) -> Result<Caller, Rejected> {
        let snapshot = self.snapshot();
        // Open only while no key was ever configured or stored: deleting the last stored
        // key must not open the gateway.
        if config_keys.is_empty() && snapshot.keys.is_empty() {
            return Ok(Caller::Anonymous);
        }
        // One digest serves both lookups: SHA-256 is the largest single cost of a request
        // with a key, so the digests of keys that matched are remembered.
        let presented = presented.ok_or(Rejected::Unknown)?;
        let (d, remembered) = self.digests.of(presented);
        let found = match config_keys.by_digest(&d) {
            Some(c) => Ok(c),
            None => snapshot.find_digest(&d, self.now()).map(Caller::Stored),
        };
        if found.is_ok() && !remembered {
            self.digests.remember(presented, d);
        }
        found
    }
}

/// The configured client keys, stored only as digests.
#[derive(Default)]
pub struct KeyRing {
    by_digest: HashMap<[u8; 32], Arc<KeyInfo>, foldhash::fast::RandomState>,
}

/// What the gateway knows about a config-file key.
#[derive(Debug, PartialEq)]
pub struct KeyInfo {
    /// The key's name, and the owner id usage rows are kept under (`config:NAME`), made
    /// once and shared with every request's record and usage row.
    pub name: Arc<str>,
    pub id: Arc<str>,
    pub limits: Limits,
    /// Aliases it may call (`None`: all).
    pub models: Option<Vec<String>>,
    pub budget: Option<BudgetSpec>,
}

/// The outcome of authentication for one request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No keys are configured or stored: the gateway is open.
    Anonymous,
    /// A key of the config file.
    Key(Arc<KeyInfo>),
    /// A key managed through the admin API.
    Stored(Arc<StoredKey>),
}

impl PartialEq for Caller {
    fn eq(&self, other: &Caller) -> bool {
        match (self, other) {
            (Caller::Anonymous, Caller::Anonymous) => true,
            (Caller::Key(a), Caller::Key(b)) => a == b,
            (Caller::Stored(a), Caller::Stored(b)) => a.rec.id == b.rec.id,
            _ => false,
        }
    }
}

impl Caller {
    /// The name used in logs; never the key.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => "-",
            Caller::Key(k) => &k.name,
            Caller::Stored(k) => &k.rec.name,
        }
    }

    /// The id usage rows and spend are kept under: a stored key's id, `config:NAME`
    /// for a config key, `-` for anonymous callers.
    pub fn id(&self) -> Arc<str> {
        match self {
            Caller::Anonymous => crate::record::unnamed(),
            Caller::Key(k) => Arc::clone(&k.id),
            Caller::Stored(k) => Arc::clone(&k.id),
        }
    }

    /// [`name`](Self::name), shared rather than copied.
    pub fn shared_name(&self) -> Arc<str> {
        match self {
            Caller::Anonymous => crate::record::unnamed(),
            Caller::Key(k) => Arc::clone(&k.name),
            Caller::Stored(k) => Arc::clone(&k.name),
        }
    }

    pub fn team(&self) -> Option<&Arc<StoredTeam>> {
        match self {
            Caller::Stored(k) => k.team.as_ref(),
            _ => None,
        }
    }

    /// Whether the key, and its team, may call `model`.
    pub fn may_use(&self, model: &str) -> bool {
        let allows =
            |list: &Option<Vec<String>>| list.as_ref().is_none_or(|l| l.iter().any(|m| m == model));
        match self {
            Caller::Anonymous => true,
            Caller::Key(k) => allows(&k.models),
            Caller::Stored(k) => {
                allows(&k.rec.models) && k.team.as_ref().is_none_or(|t| allows(&t.rec.models))
            }
        }
    }

    /// The key scope's counter key and limits.
    pub fn key_limits(&self) -> Option<(u64, &Limits)> {
        match self {
            Caller::Anonymous => None,
            Caller::Key(k) => Some((crate::limits::key_hash(&k.name), &k.limits)),
            Caller::Stored(k) => Some((crate::limits::key_hash(&k.rec.id), &k.rec.limits)),
        }
    }

    /// The team scope's counter key and limits.
    pub fn team_limits(&self) -> Option<(u64, &Limits)> {
        self.team()
            .map(|t| (crate::limits::key_hash(&t.rec.id), &t.rec.limits))
    }
}

impl KeyRing {
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a Secret, KeyInfo)>) -> Self {
        let by_digest = keys
            .into_iter()
            .map(|(key, info)| (crate::keys::digest(key.expose()), Arc::new(info)))
            .collect();
        KeyRing { by_digest }
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Every config key.
    pub fn infos(&self) -> impl Iterator<Item = &KeyInfo> {
        self.by_digest.values().map(|k| &**k)
    }

    /// The config keys that carry a budget.
    pub fn budgets(&self) -> Vec<(String, BudgetSpec)> {
        self.by_digest
            .values()
            .filter_map(|k| k.budget.clone().map(|b| (k.name.to_string(), b)))
            .collect()
    }

    /// Authenticates a presented key (`None` when the request carried none).
    /// Returns `None` when keys are configured and this one is not among them.
    pub fn authenticate(&self, presented: Option<&str>) -> Option<Caller> {
        if self.by_digest.is_empty() {
            return Some(Caller::Anonymous);
        }
        self.by_digest(&crate::keys::digest(presented?))
    }

    /// The config key whose digest is `d`.
    fn by_digest(&self, d: &[u8; 32]) -> Option<Caller> {
        // The map lookup only finds a candidate by digest; the equality that decides is
        // constant-time, so response timing says nothing about how close a guess was.
        let (stored, name) = self.by_digest.get_key_value(d)?;
        bool::from(stored.ct_eq(d)).then(|| Caller::Key(Arc::clone(name)))
    }
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
        let info = KeyInfo {
            name: "team-a".into(),
            id: "config:team-a".into(),
            limits: Limits::default(),
            models: None,
            budget: None,
        };
        let ring = KeyRing::new([(&k, info)]);
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
