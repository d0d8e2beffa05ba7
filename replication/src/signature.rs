//! Content signatures as the edge's cache computes them, so the origin can
//! answer a read by naming chunks the edge already holds instead of
//! sending them again (clones of one template, a VM moved back and forth,
//! repeated content within a disk).
//!
//! A signature is the keyed BLAKE3 of a chunk's plaintext under the
//! deployment's dedup key, derived from the master key the origin hands
//! to edges at attach. It must equal `cache::seal::SignatureKey`'s; the
//! test below checks it against the cache crate, which the origin does not
//! link (it would bring RocksDB into every origin and fuzz build).

use std::collections::{HashSet, VecDeque};

/// Must match `cache::seal`'s context string.
const DEDUP_KEY_CONTEXT: &str = "ferry cache 2025 seal v1 chunk dedup signature key";

/// The deployment's dedup key.
pub struct SignatureKey([u8; 32]);

impl SignatureKey {
    pub fn derive(master: &[u8; 32]) -> Self {
        Self(blake3::derive_key(DEDUP_KEY_CONTEXT, master))
    }

    /// The key as an edge receives it at attach.
    pub fn from_dedup_key(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// The key itself, as edges are given it at attach.
    pub fn dedup_key(&self) -> &[u8; 32] {
        &self.0
    }

    /// The signature of one chunk's plaintext.
    pub fn signature(&self, chunk: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, chunk).as_bytes()
    }
}

impl std::fmt::Debug for SignatureKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureKey").finish_non_exhaustive()
    }
}

/// The signatures of chunks an edge was sent, newest kept: what the
/// origin believes the edge's cache holds. Bounded; the oldest are
/// forgotten first. A wrong belief (the edge evicted the chunk) costs the
/// edge one more round trip, never wrong data: the edge verifies what it
/// serves by the signature.
#[derive(Debug)]
pub struct KnownSignatures {
    set: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    capacity: usize,
}

impl KnownSignatures {
    pub fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn insert(&mut self, sig: [u8; 32]) {
        if self.set.insert(sig) {
            self.order.push_back(sig);
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    pub fn contains(&self, sig: &[u8; 32]) -> bool {
        self.set.contains(sig)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_signatures_forget_the_oldest() {
        let mut k = KnownSignatures::new(2);
        k.insert([1; 32]);
        k.insert([2; 32]);
        k.insert([1; 32]);
        k.insert([3; 32]);
        assert!(!k.contains(&[1; 32]));
        assert!(k.contains(&[2; 32]) && k.contains(&[3; 32]));
        assert_eq!(k.len(), 2);
    }

    #[cfg(feature = "edge")]
    #[test]
    fn signatures_match_the_cache() {
        let master = [9u8; 32];
        let data = vec![0x5au8; 65536];
        let ours = SignatureKey::derive(&master).signature(&data);
        let cache = cache::seal::SignatureKey::derive(&master).signature(&data);
        assert_eq!(&ours, cache.as_bytes());
        assert_ne!(ours, SignatureKey::derive(&[8u8; 32]).signature(&data));
    }
}
