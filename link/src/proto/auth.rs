//! The pre-shared-key proof of [`Message::Auth`](super::Message::Auth).
//!
//! Each side proves it holds the key by MACing both nonces of this
//! connection under it:
//!
//! ```text
//! proof = BLAKE3-keyed(psk, "ferry link auth v1" || role || own nonce || peer nonce)
//! ```
//!
//! Both nonces make a proof good for this connection only (no replay); the
//! role byte makes the two proofs of a connection differ, so a peer cannot
//! answer a challenge by reflecting the other side's proof back. The link
//! runs inside TLS, which this does not replace: it only says the peer holds
//! the deployment's key.

use super::message::Role;

/// The domain-separation prefix of every proof.
pub const AUTH_CONTEXT: &[u8] = b"ferry link auth v1";

/// The proof `role` sends, given its own nonce and the peer's.
pub fn auth_proof(
    psk: &[u8; 32],
    role: Role,
    own_nonce: &[u8; 32],
    peer_nonce: &[u8; 32],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(psk);
    h.update(AUTH_CONTEXT);
    h.update(&[role.code()]);
    h.update(own_nonce);
    h.update(peer_nonce);
    *h.finalize().as_bytes()
}

/// Whether `proof` is what a peer of `peer_role` holding `psk` sends on
/// this connection (`peer_nonce` from its `Hello`, `own_nonce` from ours).
/// Compares in constant time.
pub fn verify_auth_proof(
    psk: &[u8; 32],
    peer_role: Role,
    peer_nonce: &[u8; 32],
    own_nonce: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    let expected = auth_proof(psk, peer_role, peer_nonce, own_nonce);
    // blake3::Hash's equality is constant-time.
    blake3::Hash::from_bytes(expected) == blake3::Hash::from_bytes(*proof)
}
