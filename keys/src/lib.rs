//! Content signatures and the key derivations every part of a deployment
//! must agree on, in one small crate: the cache (which links RocksDB), the
//! origin and the edge all use these, so the same bytes get the same
//! signature everywhere.
//!
//! ```text
//!   deployment master key (origin only)
//!     ├─ dedup key  = derive_key(DEDUP_KEY_CONTEXT, master)   same everywhere
//!     │    └─ signature(chunk) = BLAKE3-keyed(dedup key, chunk)
//!     └─ edge cache key = derive_key(EDGE_CACHE_KEY_CONTEXT, master || edge id)
//!          (each edge's cache derives its encryption key from this)
//! ```

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// BLAKE3 `derive_key` context for the dedup signature key (key material:
/// the master key). Never change: every cache and origin of a deployment
/// must compute the same signatures (the string says "cache 2025 seal v1"
/// for that reason).
pub const DEDUP_KEY_CONTEXT: &str = "ferry cache 2025 seal v1 chunk dedup signature key";

/// BLAKE3 `derive_key` context of an edge's cache master key (key
/// material: the deployment master key, then the edge's id).
pub const EDGE_CACHE_KEY_CONTEXT: &str = "ferry origin 2026 edge cache master key v1";

/// A chunk's content signature: BLAKE3 keyed with the deployment's dedup
/// key. Collision-resistant, so dedup trusts it without comparing bytes;
/// keyed, so a signature confirms nothing about content to anyone without
/// the key (the argument is in `cache/src/seal.rs`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Signature([u8; 32]);

impl Signature {
    /// Length of a signature in bytes.
    pub const LEN: usize = 32;

    /// Wraps raw signature bytes (as stored in the index or received from
    /// the origin).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw signature bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time comparison, for checks on data read from disk.
    pub fn ct_eq(&self, other: &Self) -> bool {
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(other.0)
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// The deployment's dedup key: what computes signatures. Zeroed on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SignatureKey([u8; 32]);

impl SignatureKey {
    /// Derives the dedup key from the deployment's master key.
    pub fn derive(master: &[u8; 32]) -> Self {
        Self(blake3::derive_key(DEDUP_KEY_CONTEXT, master))
    }

    /// The key as an edge receives it at attach.
    pub fn from_dedup_key(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// The raw key, as edges are given it at attach.
    pub fn dedup_key(&self) -> &[u8; 32] {
        &self.0
    }

    /// The content signature of `plaintext`.
    pub fn signature(&self, plaintext: &[u8]) -> Signature {
        Signature(*blake3::keyed_hash(&self.0, plaintext).as_bytes())
    }
}

impl fmt::Debug for SignatureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignatureKey").finish_non_exhaustive()
    }
}

/// The cache master key of edge `edge_id`: derived from the deployment's
/// master key and the edge's id, so the key one edge holds opens no other
/// edge's cache. (The dedup key is the deployment's, shared by all edges,
/// so that signatures name the same content everywhere.)
pub fn edge_cache_key(master: &[u8; 32], edge_id: &str) -> Zeroizing<[u8; 32]> {
    let mut h = blake3::Hasher::new_derive_key(EDGE_CACHE_KEY_CONTEXT);
    h.update(master);
    h.update(edge_id.as_bytes());
    Zeroizing::new(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_depend_on_key_and_content() {
        let a = SignatureKey::derive(&[9; 32]);
        let b = SignatureKey::derive(&[8; 32]);
        let data = vec![0x5a; 65536];
        assert_eq!(a.signature(&data), a.signature(&data));
        assert_ne!(a.signature(&data), b.signature(&data));
        assert_ne!(a.signature(&data), a.signature(&data[1..]));
        let same = SignatureKey::from_dedup_key(*a.dedup_key());
        assert_eq!(same.signature(&data), a.signature(&data));
        assert!(a.signature(&data).ct_eq(&same.signature(&data)));
    }

    #[test]
    fn edge_keys_differ_per_edge_and_master() {
        let k1 = edge_cache_key(&[1; 32], "edge-a");
        assert_eq!(*k1, *edge_cache_key(&[1; 32], "edge-a"));
        assert_ne!(*k1, *edge_cache_key(&[1; 32], "edge-b"));
        assert_ne!(*k1, *edge_cache_key(&[2; 32], "edge-a"));
        assert_ne!(*k1, *SignatureKey::derive(&[1; 32]).dedup_key());
    }

    #[test]
    fn debug_hides_the_key() {
        let k = SignatureKey::derive(&[7; 32]);
        assert!(!format!("{k:?}").contains('7'));
    }
}
