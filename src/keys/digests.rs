//! The SHA-256 digests of keys that authenticated recently, so that a key presented again
//! skips the hash (3,500 instructions, the largest single cost of a request with a key).
//!
//! What is kept is not the key: an entry is found by a 128-bit tag, two SipHashes of the
//! presented key under this process's random keys, and holds only the digest. Without
//! those random keys a tag cannot be aimed at, so a wrong key finds an entry with odds of
//! about one in 2^128 per guess. The digest found is looked up exactly as a fresh one
//! would be, so a key blocked, rotated, expired or deleted since is refused as before.
//! Only digests that matched a key are remembered (a flood of wrong keys neither fills
//! the memo nor slows the right ones), at most [`MAX_ENTRIES`] of them; past that the
//! memo starts over.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::RwLock;

/// Keys remembered at most (about 80 bytes each).
pub const MAX_ENTRIES: usize = 65_536;

pub struct Digests {
    /// Tags are already uniform: a light hasher for the map (foldhash), the keyed ones
    /// below for the tags.
    seen: RwLock<HashMap<u128, [u8; 32], foldhash::fast::RandomState>>,
    first: RandomState,
    second: RandomState,
}

impl Default for Digests {
    fn default() -> Self {
        Digests {
            seen: RwLock::new(HashMap::default()),
            first: RandomState::new(),
            second: RandomState::new(),
        }
    }
}

impl Digests {
    fn tag(&self, key: &str) -> u128 {
        let a = self.first.hash_one(key.as_bytes());
        let b = self.second.hash_one(key.as_bytes());
        (u128::from(a) << 64) | u128::from(b)
    }

    /// The digest of `key`, and whether it came from the memo.
    pub fn of(&self, key: &str) -> ([u8; 32], bool) {
        let tag = self.tag(key);
        let seen = self.seen.read().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = seen.get(&tag) {
            return (*d, true);
        }
        (super::digest(key), false)
    }

    /// Remembers the digest of `key`, which just authenticated.
    pub fn remember(&self, key: &str, digest: [u8; 32]) {
        let tag = self.tag(key);
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_ENTRIES {
            seen.clear();
        }
        seen.insert(tag, digest);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_key_gives_its_own_digest_and_no_other_key_finds_it() {
        let d = Digests::default();
        let (first, memo) = d.of("tg-k1-secret");
        assert!(!memo);
        assert_eq!(first, crate::keys::digest("tg-k1-secret"));
        d.remember("tg-k1-secret", first);
        assert_eq!(d.of("tg-k1-secret"), (first, true));
        for other in ["tg-k1-secreT", "tg-k1-secret ", "", "tg-k1-secre"] {
            assert_eq!(
                d.of(other),
                (crate::keys::digest(other), false),
                "{other:?}"
            );
        }
    }

    #[test]
    fn the_memo_starts_over_when_full() {
        let d = Digests::default();
        for i in 0..MAX_ENTRIES {
            let k = format!("k{i}");
            d.remember(&k, crate::keys::digest(&k));
        }
        assert_eq!(d.len(), MAX_ENTRIES);
        d.remember("one-more", crate::keys::digest("one-more"));
        assert_eq!(d.len(), 1);
        assert!(d.of("one-more").1);
        assert!(!d.of("k0").1);
    }
}
