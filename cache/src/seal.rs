//! Content signatures and per-chunk authenticated encryption, with the
//! on-disk slot record format.
//!
//! The edge keeps fixed-size chunks of remote volumes in *slots* of a local
//! cache file. Each slot holds one [sealed record](seal): a small header
//! (magic, version, generation, slot number, content [`Signature`],
//! plaintext length, header CRC) followed by the chunk encrypted with
//! AES-256-GCM. [`open`] turns a record back into plaintext or into an
//! [`IntegrityError`] naming what failed; it never returns data that did not
//! authenticate, and never panics on arbitrary bytes.
//!
//! # Threat model and bindings
//!
//! The keys ([`Keys`]) come from the caller and live only in memory; the
//! disk holds ciphertext, signatures and bookkeeping. Someone who can read or
//! write the edge's disk but does not hold the keys can:
//!
//! - not learn chunk content, nor (because signatures are *keyed*) confirm a
//!   guess of it;
//! - not alter a record undetected: every header byte is authenticated as
//!   associated data and the ciphertext by the GCM tag;
//! - not move a record to another slot ([`IntegrityError::WrongSlot`], or
//!   [`IntegrityError::Decrypt`] if the slot field was rewritten too);
//! - not replay an older record into the same slot, provided the caller
//!   passes the generation its index expects ([`Expected::with_generation`]):
//!   [`IntegrityError::WrongGeneration`], or `Decrypt` if the generation field
//!   was rewritten (it is associated data and also the nonce);
//! - not pass a record off as other content: its signature is associated
//!   data, so a record that opens carries exactly the signature its sealer
//!   gave it, and [`open`] compares that with the index's
//!   ([`Expected::with_signature`]);
//! - not move a record between two caches of one deployment: each cache has
//!   its own encryption key ([`Keys::derive`]), so a foreign record fails
//!   with `Decrypt`.
//!
//! # Cipher and nonces
//!
//! The cipher is AES-256-GCM from `ring`, which picks its fastest
//! implementation at runtime (AES-NI with PCLMULQDQ, or VAES with
//! VPCLMULQDQ on recent x86-64; the ARMv8 crypto extensions): on the edge's
//! hardware, decrypting a 64 KiB chunk costs a few microseconds, the order
//! of the page-cache `pread` that fetched it.
//!
//! The 96-bit GCM nonce is not stored but derived from the header: the
//! record's generation (u64, little-endian) followed by four zero bytes.
//! GCM fails badly if one nonce is used twice under one key: the XOR of the
//! two plaintexts leaks, and so does the GHASH authentication key, with
//! which anyone who saw both records can forge records that authenticate.
//! Uniqueness therefore rests on two guarantees:
//!
//! 1. **A generation is sealed at most once per encryption key.** The caller
//!    (the slot store) hands generations out from one cache-wide counter that
//!    is persisted and strictly increasing, and never reuses a value, not
//!    even across crashes (a crash may skip values, never repeat one).
//!    [`seal`] cannot check this; it is the contract of its `generation`
//!    argument.
//! 2. **The encryption key is per cache.** Every cache of a deployment gets
//!    the same master key and counts generations from the same start, so
//!    [`Keys::derive`] mixes a 16-byte cache id into the encryption key. The
//!    cache id must be fresh (random) whenever a generation counter starts
//!    over, e.g. when a cache file is recreated. The dedup key, in contrast,
//!    is the same on every cache of the deployment (the origin computes the
//!    same signatures).
//!
//! Why not random nonces, as the XChaCha20-Poly1305 records of format
//! version 1 had: GCM's nonce has 96 bits, and with random nonces NIST SP
//! 800-38D caps one key at 2^32 encryptions (to keep the probability of a
//! repeated nonce below 2^-32). 2^32 seals of 64 KiB are 256 TiB of cache
//! fills: a cache churning at 1 GiB/s gets there in about three days, and a
//! cache lives for months. A counter nonce has no such bound (2^64
//! generations), costs no header bytes (the generation is stored anyway)
//! and cannot repeat by bad luck, only by breaking the counter contract.
//! XChaCha's 192-bit random nonces would lift the bound too, but
//! ChaCha20-Poly1305 in software is several times slower than AES-GCM on
//! AES-NI/VAES hardware, and the cipher dominated the read path.
//!
//! # The signature is authenticated, not recomputed
//!
//! The header's content signature is associated data of the AEAD: a record
//! that opens was sealed, with exactly that signature, by a holder of the
//! encryption key. [`open`] therefore trusts it and does not rehash the
//! plaintext (BLAKE3 over 64 KiB costs about as much as the decryption)
//! unless asked with [`Expected::verify_content`]. What a recomputation
//! adds is a check on the *key holder*: a sealing bug that stored the
//! signature of other content ([`seal`] checks it under
//! `debug_assertions`), or keys whose dedup half differs from the
//! sealer's. Offline checks (the inspect tool's `--verify`) and tests ask
//! for it; the read path does not.
//!
//! # Why the volume is not bound here
//!
//! Many volumes (VMs cloned from one template) share chunks, and the origin
//! may answer a read with a signature instead of data: one stored chunk
//! serves every volume holding that content. The record therefore binds the
//! *content* (its signature), not a volume. The `(volume, chunk index) ->
//! signature` mapping lives in the index, and the volume binding is enforced
//! by [`open`] checking that the record's authenticated signature is exactly
//! the one the index expected ([`Expected::with_signature`]). A chunk read
//! for volume A can thus only ever return content that the index says
//! volume A holds at that position.
//!
//! The alternatives were rejected deliberately:
//!
//! - *Per-volume keys* (or the volume id in the associated data) would make
//!   the same content encrypt differently per volume, so one stored chunk
//!   could not serve several volumes: cross-volume dedup, the point of the
//!   cache for cloned VMs, would be gone.
//! - *Convergent encryption* (key and nonce derived from the content) dedups
//!   the ciphertext itself, but equal plaintexts give equal ciphertexts to
//!   *anyone* who sees the disk or the link, and it enables
//!   confirmation-of-file attacks. Here equality is visible only through
//!   keyed signatures, i.e. only to holders of the dedup key, and the
//!   ciphertext of every seal is fresh (a nonce never used before under a
//!   per-cache key).

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The content signature of a plaintext chunk: `BLAKE3-keyed(dedup key,
/// plaintext)`, 32 bytes.
///
/// - **Why BLAKE3 rather than SHA-256.** Both give 256-bit outputs with
///   128-bit collision resistance, but BLAKE3 is several times faster in
///   software (SIMD across its internal tree of 1 KiB chunks; no reliance on
///   SHA extensions being present on the edge's CPU). The signature is
///   computed on every chunk written (to index it), so it sits on the fill
///   path next to the cipher; reads trust the authenticated copy in the
///   record header instead of recomputing it (see the module docs).
/// - **Why keyed.** Signatures are stored on the edge's disk and sent over
///   the link. A plain hash of plaintext lets anyone who sees it confirm a
///   guess of the content ("does this volume contain this known file /
///   this password-file variant?") by hashing the guess. Keyed with the
///   per-deployment dedup key (BLAKE3 keyed mode is a PRF), a signature
///   reveals nothing about content to someone without the key, beyond the
///   equality of chunks within one deployment, which dedup needs anyway.
/// - **Why trusting it without a byte compare is sound.** Dedup treats equal
///   signatures as equal content and never compares the bytes. With a
///   256-bit output the probability of any accidental collision among `n`
///   chunks is about `n^2 / 2^257`: for 2^40 chunks (64 PiB of 64 KiB
///   chunks) it is below 2^-176, far below the rate of undetected hardware
///   errors. A deliberate collision needs ~2^128 work against BLAKE3, and
///   without the dedup key an attacker cannot even evaluate the function.
pub use keys::{Signature, SignatureKey};

/// The cache's secrets: the chunk encryption key (per cache) and the dedup
/// (signature) key (per deployment), 32 bytes each, and the AES-256-GCM key
/// built from the encryption key once, at construction.
///
/// They come from the caller (in production the origin hands a master key
/// over at attach) and live only in memory, never printed by `Debug`.
/// Deliberately not `Clone`; share one instance with an `Arc`.
///
/// # Zeroization
///
/// The raw key bytes are zeroed on drop. The AES key schedule inside
/// `ring`'s `LessSafeKey` is **not**: `ring` neither zeroes it on drop nor
/// gives access to it, so the expanded round keys (from which the key is
/// easily recovered: AES-256's first two round keys *are* the key) stay in
/// freed memory until it is reused. Moves may also leave transient copies
/// of the raw bytes on the stack. Zeroization here limits copies; it is no
/// defence against someone who can read the process's memory.
///
/// [`Zeroize::zeroize`] clears the raw bytes only (the dedup key and the
/// spare copy of the encryption key) and leaves the cipher working: call it
/// only on keys that are about to be dropped.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Keys {
    encryption: [u8; 32],
    dedup: [u8; 32],
    /// Built once from `encryption`. Cannot be zeroized (see above).
    #[zeroize(skip)]
    aead: LessSafeKey,
}

/// BLAKE3 `derive_key` context for the per-cache chunk encryption key (key
/// material: master key || cache id). Never change: it would silently
/// change the key derived from every master key.
const ENCRYPTION_KEY_CONTEXT: &str =
    "ferry cache 2025 seal v2 per-cache AES-256-GCM chunk encryption key";
use keys::DEDUP_KEY_CONTEXT;

impl Keys {
    /// Builds keys from raw bytes; the caller should zeroize its own copies
    /// afterwards. The two keys must be independent secrets.
    ///
    /// The AEAD nonce is the record generation, so `encryption` must be
    /// unique to one generation counter: never give the same encryption key
    /// to two caches, nor to one cache whose counter was reset (see the
    /// module docs, "Cipher and nonces"). [`Keys::derive`] takes care of
    /// this with a per-cache id. `dedup` must be the deployment's dedup key
    /// wherever signatures are compared (index, origin, other caches).
    pub fn from_bytes(encryption: [u8; 32], dedup: [u8; 32]) -> Self {
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &encryption).expect("32 bytes is an AES-256 key"),
        );
        Self {
            encryption,
            dedup,
            aead,
        }
    }

    /// Derives both keys from the deployment's 32-byte master key with
    /// BLAKE3's key derivation mode and distinct context strings, so the two
    /// keys are independent and neither reveals the other or the master:
    ///
    /// - the encryption key from `master || cache_id`: one key per cache, so
    ///   that caches counting generations from the same start never share a
    ///   nonce under one key. `cache_id` must be unique per cache and fresh
    ///   (random) whenever the cache's generation counter starts over;
    /// - the dedup key from `master` alone: the same on every cache of the
    ///   deployment and at the origin, which computes the same signatures.
    pub fn derive(master: &[u8; 32], cache_id: &[u8; 16]) -> Self {
        Self::derive_with_dedup_key(
            master,
            &blake3::derive_key(DEDUP_KEY_CONTEXT, master),
            cache_id,
        )
    }

    /// As [`Keys::derive`], with the dedup key given rather than derived
    /// from the same master: an edge gets a cache master key of its own
    /// from the origin and the deployment's dedup key beside it, so its key
    /// opens no other edge's cache while signatures still match everywhere.
    pub fn derive_with_dedup_key(
        cache_master: &[u8; 32],
        dedup_key: &[u8; 32],
        cache_id: &[u8; 16],
    ) -> Self {
        let mut encryption = blake3::Hasher::new_derive_key(ENCRYPTION_KEY_CONTEXT);
        encryption.update(cache_master);
        encryption.update(cache_id);
        Self::from_bytes(*encryption.finalize().as_bytes(), *dedup_key)
    }

    /// The content signature of `plaintext` under this deployment's dedup
    /// key.
    pub fn signature(&self, plaintext: &[u8]) -> Signature {
        Signature::from_bytes(*blake3::keyed_hash(&self.dedup, plaintext).as_bytes())
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

/// The AEAD nonce of the record sealed at `generation`: the generation
/// (little-endian) followed by four zero bytes. Unique per seal under one
/// key by the generation contract (see the module docs).
fn nonce(generation: u64) -> Nonce {
    let mut nonce = [0; NONCE_LEN];
    nonce[..8].copy_from_slice(&generation.to_le_bytes());
    Nonce::assume_unique_for_key(nonce)
}

/// What failed when a record was checked. Each error concerns one record
/// (one chunk) only; none of them ever comes with plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The record is shorter than its header, or than the ciphertext and tag
    /// its header announces.
    #[error("record truncated: need {needed} bytes, have {len}")]
    Truncated { needed: usize, len: usize },
    /// Not a sealed record (an all-zero slot that was never written reads as
    /// `found == 0`).
    #[error("bad record magic {found:#010x}")]
    BadMagic { found: u32 },
    /// A record format version this code does not know.
    #[error("unsupported record version {0}")]
    UnsupportedVersion(u8),
    /// The header CRC does not match: a torn write or bit rot in the header.
    #[error("record header checksum mismatch (torn write or bit rot)")]
    HeaderChecksum,
    /// Header flags this version does not define.
    #[error("unknown record flags {0:#04x}")]
    UnknownFlags(u8),
    /// The record names another slot than the one it was read from: it was
    /// copied or misdirected.
    #[error("record belongs to slot {found}, read from slot {expected}")]
    WrongSlot { expected: u64, found: u64 },
    /// The record's generation is not the one the index expects: an old
    /// record replayed into a reused slot (`found < expected`), or an index
    /// that lags the data.
    #[error("record generation {found}, expected {expected}")]
    WrongGeneration { expected: u64, found: u64 },
    /// Authentication failed: wrong encryption key (e.g. keys derived for
    /// another cache id), or the ciphertext, tag or an authenticated header
    /// field was altered.
    #[error("record failed authentication (wrong key or tampered data)")]
    Decrypt,
    /// The content does not have the expected signature: either the record
    /// holds other content than the index expects (`expected` is the index's
    /// signature, `found` the record's), or, with
    /// [`Expected::verify_content`], the decrypted plaintext does not hash
    /// to the signature in its own header (`expected` is the header's,
    /// `found` the recomputed one; wrong dedup key or a sealing bug).
    #[error("signature mismatch: expected {expected}, found {found}")]
    SignatureMismatch {
        expected: Signature,
        found: Signature,
    },
}

// Format: the slot record, version 2. All integers little-endian.
//
//   offset  size  field
//        0     4  magic          b"FRYC"
//        4     1  version        2
//        5     1  flags          0; no flags are defined in version 2
//        6     2  reserved       written as 0, ignored on read (authenticated)
//        8     8  generation     from the cache-wide seal counter: unique per
//                                seal under one encryption key; also the
//                                AEAD nonce (see below)
//       16     8  slot           the slot number the record is stored in
//       24    32  signature      keyed BLAKE3 of the plaintext
//       56     4  plaintext_len  length of the chunk (may be < chunk size
//                                for a volume's last chunk)
//       60     4  header_crc     crc32 (crc32fast) of bytes 0..60
//       64     n  ciphertext     n = plaintext_len, AES-256-GCM
//     64+n    16  tag            GCM tag
//
// The AEAD nonce is not stored: it is the generation field (bytes 8..16)
// followed by four zero bytes. The associated data is the whole 64-byte
// header, CRC included, so slot, generation, signature and plaintext length
// (and the format fields) are all authenticated. The CRC is a fast
// torn-write / bit-rot check that does not need the key (recovery,
// `peek_header`) and runs before the AEAD; it is no defence against
// deliberate tampering, the tag is. Bytes after the tag (the rest of a
// fixed-size slot) are not part of the record and are ignored.
//
// Version 1 (88-byte header with a stored random 24-byte nonce,
// XChaCha20-Poly1305) is not read: such records fail with
// `UnsupportedVersion(1)`. Cache content can be fetched again from the
// origin, so an old cache file is dropped, not migrated.

/// Record magic: "FeRrY Cache".
pub const MAGIC: [u8; 4] = *b"FRYC";
/// The record format version written by [`seal`].
pub const VERSION: u8 = 2;
/// Size of the record header in bytes.
pub const HEADER_LEN: usize = 64;
/// Size of the GCM tag after the ciphertext.
pub const TAG_LEN: usize = 16;

const OFF_VERSION: usize = 4;
const OFF_FLAGS: usize = 5;
const OFF_GENERATION: usize = 8;
const OFF_SLOT: usize = 16;
const OFF_SIGNATURE: usize = 24;
const OFF_PLAINTEXT_LEN: usize = 56;
const OFF_CRC: usize = 60;

const _: () = assert!(OFF_CRC + 4 == HEADER_LEN);
const _: () = assert!(TAG_LEN == ring::aead::MAX_TAG_LEN);

/// The size of a slot holding chunks of `chunk_size` bytes: the largest
/// record [`seal`] writes for such a chunk.
///
/// Not rounded to any alignment; a store using `O_DIRECT` must round its
/// slot stride up itself.
pub const fn record_len(chunk_size: usize) -> usize {
    HEADER_LEN + chunk_size + TAG_LEN
}

/// A record header as stored, readable without the key. Its fields passed
/// the magic, version and CRC checks but are *not* authenticated until the
/// record is [`open`]ed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub version: u8,
    pub flags: u8,
    pub generation: u64,
    pub slot: u64,
    pub signature: Signature,
    pub plaintext_len: u32,
}

impl RecordHeader {
    /// Total length of the record this header announces (header,
    /// ciphertext, tag).
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.plaintext_len as usize + TAG_LEN
    }
}

/// What [`open`] checks a record against, besides the key.
///
/// The slot is always checked; the generation and signature when the caller
/// knows them (from the index). Recovery, rebuilding the index from the
/// slots, opens with the slot only and learns generation and signature from
/// the authenticated [`Opened`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The slot the record was read from.
    pub slot: u64,
    /// The slot generation the index recorded, if known.
    pub generation: Option<u64>,
    /// The content signature the index maps the requested (volume, chunk)
    /// to, if known. This is where the volume binding is enforced.
    pub signature: Option<Signature>,
    /// Whether to recompute the plaintext's signature after decryption and
    /// require it to equal the header's. Off by default: the header's
    /// signature is authenticated (see the module docs).
    pub verify_content: bool,
}

impl Expected {
    /// Expect a record stored in `slot`, any generation, any content, and
    /// trust its authenticated signature.
    pub const fn slot(slot: u64) -> Self {
        Self {
            slot,
            generation: None,
            signature: None,
            verify_content: false,
        }
    }

    /// Also require this generation (rejects replayed old records).
    #[must_use]
    pub const fn with_generation(mut self, generation: u64) -> Self {
        self.generation = Some(generation);
        self
    }

    /// Also require this content signature.
    #[must_use]
    pub const fn with_signature(mut self, signature: Signature) -> Self {
        self.signature = Some(signature);
        self
    }

    /// Also recompute the plaintext's signature and require it to equal the
    /// header's ([`IntegrityError::SignatureMismatch`] otherwise). Costs a
    /// BLAKE3 pass over the chunk, about as much as the decryption; for
    /// offline verification (the inspect tool's `--verify`) and tests, not
    /// for the read path.
    #[must_use]
    pub const fn verify_content(mut self) -> Self {
        self.verify_content = true;
        self
    }
}

/// An authenticated, decrypted record. `Debug` shows the plaintext's length,
/// not volume data.
#[derive(Clone, PartialEq, Eq)]
pub struct Opened {
    /// The signature authenticated in the record's header: the one its
    /// sealer gave the content. Recomputed from the plaintext (and found
    /// equal) only when [`Expected::verify_content`] was asked.
    pub signature: Signature,
    /// The slot generation the record was sealed with.
    pub generation: u64,
    /// The chunk.
    pub plaintext: Bytes,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("signature", &self.signature)
            .field("generation", &self.generation)
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

/// Seals `plaintext` into a record for `slot` at `generation`, appending
/// exactly `HEADER_LEN + plaintext.len() + TAG_LEN` bytes to `out`.
///
/// `generation` is also the AEAD nonce: it must never have been sealed
/// before under these keys, not for another slot, not after a crash (see
/// the module docs, "Cipher and nonces"). Sealing two different plaintexts
/// at one generation leaks their XOR and lets whoever sees both records
/// forge records under this key.
///
/// `signature` must be `keys.signature(plaintext)`; the caller has it
/// already (it is the dedup lookup key), so it is not recomputed here
/// except by a debug assertion. [`open`] trusts it (it is authenticated),
/// so a wrong one is caught only by [`Expected::verify_content`] or by an
/// index lookup that expects the right one.
///
/// The plaintext is copied into `out` once and encrypted there in place.
///
/// # Panics
///
/// If `plaintext` is longer than `u32::MAX` bytes; with debug assertions,
/// if `signature` is not the plaintext's.
pub fn seal(
    keys: &Keys,
    slot: u64,
    generation: u64,
    signature: &Signature,
    plaintext: &[u8],
    out: &mut BytesMut,
) {
    debug_assert!(
        keys.signature(plaintext) == *signature,
        "seal: signature does not match the plaintext"
    );
    let plaintext_len = u32::try_from(plaintext.len()).expect("chunk longer than u32::MAX");

    let start = out.len();
    out.reserve(record_len(plaintext.len()));
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(0); // flags
    out.put_u16_le(0); // reserved
    out.put_u64_le(generation);
    out.put_u64_le(slot);
    out.put_slice(signature.as_bytes());
    out.put_u32_le(plaintext_len);
    let crc = crc32fast::hash(&out[start..start + OFF_CRC]);
    out.put_u32_le(crc);
    debug_assert_eq!(out.len() - start, HEADER_LEN);
    out.put_slice(plaintext);

    let (header, body) = out[start..].split_at_mut(HEADER_LEN);
    let tag = keys
        .aead
        .seal_in_place_separate_tag(nonce(generation), Aad::from(&*header), body)
        .expect("AES-GCM fails only beyond 64 GiB per message");
    out.put_slice(tag.as_ref());
}

/// Reads and checks a record header without the key: length, magic,
/// version, CRC and flags. Needs only the first [`HEADER_LEN`] bytes of the
/// record; does not check that the body is present.
///
/// For inspection and recovery. The fields are unauthenticated (the CRC
/// detects accidents, not tampering) until [`open`] succeeds.
pub fn peek_header(record: &[u8]) -> Result<RecordHeader, IntegrityError> {
    let header = header_bytes(record)?;
    parse_header(header)
}

/// Authenticates and decrypts `record` (as read from slot `expected.slot`;
/// trailing slot bytes past the record are ignored) into a fresh buffer.
///
/// Checks, in order: length, magic, version, header CRC, flags, slot,
/// generation and signature against `expected`, body length, the AEAD tag
/// (nonce from the generation, the whole header as associated data), and,
/// only with [`Expected::verify_content`], that the plaintext's recomputed
/// signature equals the header's. Any failure is an [`IntegrityError`] and
/// no plaintext is returned; arbitrary input never panics.
pub fn open(keys: &Keys, expected: &Expected, record: &[u8]) -> Result<Opened, IntegrityError> {
    let (header_raw, header) = check(expected, record)?;
    let len = header.plaintext_len as usize;
    let mut plaintext = BytesMut::from(&record[HEADER_LEN..HEADER_LEN + len]);
    let tag = tag_at(record, HEADER_LEN + len);
    finish(keys, expected, &header_raw, &header, &mut plaintext, tag)?;
    Ok(Opened {
        signature: header.signature,
        generation: header.generation,
        plaintext: plaintext.freeze(),
    })
}

/// Like [`open`], but decrypts inside `record`'s own buffer (e.g. the slot
/// just read from disk) and returns the plaintext as a view of it: no copy
/// and no allocation.
pub fn open_in_place(
    keys: &Keys,
    expected: &Expected,
    mut record: BytesMut,
) -> Result<Opened, IntegrityError> {
    let (header_raw, header) = check(expected, &record)?;
    let len = header.plaintext_len as usize;
    record.advance(HEADER_LEN);
    let tag = tag_at(&record, len);
    record.truncate(len);
    finish(keys, expected, &header_raw, &header, &mut record, tag)?;
    Ok(Opened {
        signature: header.signature,
        generation: header.generation,
        plaintext: record.freeze(),
    })
}

/// The key-less checks shared by [`open`] and [`open_in_place`]. On success
/// the record holds the whole header, ciphertext and tag.
fn check(
    expected: &Expected,
    record: &[u8],
) -> Result<([u8; HEADER_LEN], RecordHeader), IntegrityError> {
    let header_raw = *header_bytes(record)?;
    let header = parse_header(&header_raw)?;
    if header.slot != expected.slot {
        return Err(IntegrityError::WrongSlot {
            expected: expected.slot,
            found: header.slot,
        });
    }
    if let Some(generation) = expected.generation {
        if header.generation != generation {
            return Err(IntegrityError::WrongGeneration {
                expected: generation,
                found: header.generation,
            });
        }
    }
    if let Some(signature) = &expected.signature {
        if !signature.ct_eq(&header.signature) {
            return Err(IntegrityError::SignatureMismatch {
                expected: *signature,
                found: header.signature,
            });
        }
    }
    let needed = header.record_len();
    if record.len() < needed {
        return Err(IntegrityError::Truncated {
            needed,
            len: record.len(),
        });
    }
    Ok((header_raw, header))
}

/// The tag at `off`; `check` made sure it is there.
fn tag_at(record: &[u8], off: usize) -> Tag {
    let mut tag = [0; TAG_LEN];
    tag.copy_from_slice(&record[off..off + TAG_LEN]);
    Tag::from(tag)
}

/// Decrypts `buf` in place and, if `expected` asks for it, verifies the
/// recomputed signature. On error `buf` must be discarded (a failed tag
/// leaves it zeroed).
fn finish(
    keys: &Keys,
    expected: &Expected,
    header_raw: &[u8; HEADER_LEN],
    header: &RecordHeader,
    buf: &mut [u8],
    tag: Tag,
) -> Result<(), IntegrityError> {
    keys.aead
        .open_in_place_separate_tag(
            nonce(header.generation),
            Aad::from(header_raw),
            tag,
            buf,
            0..,
        )
        .map_err(|_| IntegrityError::Decrypt)?;
    if expected.verify_content {
        let found = keys.signature(buf);
        if !found.ct_eq(&header.signature) {
            // The plaintext authenticated, so only a holder of the
            // encryption key could have produced this: a sealing bug, or
            // keys whose dedup half differs from the sealer's.
            return Err(IntegrityError::SignatureMismatch {
                expected: header.signature,
                found,
            });
        }
    }
    Ok(())
}

fn header_bytes(record: &[u8]) -> Result<&[u8; HEADER_LEN], IntegrityError> {
    record
        .first_chunk::<HEADER_LEN>()
        .ok_or(IntegrityError::Truncated {
            needed: HEADER_LEN,
            len: record.len(),
        })
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<RecordHeader, IntegrityError> {
    let magic: [u8; 4] = field(h, 0);
    if magic != MAGIC {
        return Err(IntegrityError::BadMagic {
            found: u32::from_le_bytes(magic),
        });
    }
    let version = h[OFF_VERSION];
    if version != VERSION {
        return Err(IntegrityError::UnsupportedVersion(version));
    }
    let crc = u32::from_le_bytes(field(h, OFF_CRC));
    if crc32fast::hash(&h[..OFF_CRC]) != crc {
        return Err(IntegrityError::HeaderChecksum);
    }
    let flags = h[OFF_FLAGS];
    if flags != 0 {
        return Err(IntegrityError::UnknownFlags(flags));
    }
    Ok(RecordHeader {
        version,
        flags,
        generation: u64::from_le_bytes(field(h, OFF_GENERATION)),
        slot: u64::from_le_bytes(field(h, OFF_SLOT)),
        signature: Signature::from_bytes(field(h, OFF_SIGNATURE)),
        plaintext_len: u32::from_le_bytes(field(h, OFF_PLAINTEXT_LEN)),
    })
}

/// The `N` header bytes at `off` (offsets are constants inside the header).
fn field<const N: usize>(h: &[u8; HEADER_LEN], off: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&h[off..off + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHUNK: usize = 64 * 1024;
    const MASTER: [u8; 32] = [7; 32];
    const CACHE_A: [u8; 16] = [0xa1; 16];
    const CACHE_B: [u8; 16] = [0xb2; 16];

    fn keys() -> Keys {
        Keys::derive(&MASTER, &CACHE_A)
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| {
                #[allow(clippy::cast_possible_truncation)]
                let b = (i as u8).wrapping_mul(31) ^ seed ^ ((i >> 8) as u8);
                b
            })
            .collect()
    }

    fn sealed(keys: &Keys, slot: u64, generation: u64, plaintext: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        seal(
            keys,
            slot,
            generation,
            &keys.signature(plaintext),
            plaintext,
            &mut out,
        );
        out
    }

    /// Recomputes the header CRC after a deliberate header edit, as an
    /// attacker (who knows the format but not the key) would.
    fn fix_crc(record: &mut [u8]) {
        let crc = crc32fast::hash(&record[..OFF_CRC]);
        record[OFF_CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    /// Both modes of [`open`]: trusting the authenticated signature, and
    /// recomputing it.
    fn modes(exp: Expected) -> [Expected; 2] {
        [exp, exp.verify_content()]
    }

    #[test]
    fn round_trip() {
        let keys = keys();
        for len in [0, 1, 15, 16, 17, 1000, 4096, CHUNK] {
            let pt = data(len, 3);
            let record = sealed(&keys, 42, 9, &pt);
            assert_eq!(record.len(), HEADER_LEN + len + TAG_LEN);
            assert!(record.len() <= record_len(CHUNK));
            let sig = keys.signature(&pt);
            let base = Expected::slot(42).with_generation(9).with_signature(sig);
            for exp in modes(base) {
                let opened = open(&keys, &exp, &record).unwrap();
                assert_eq!(opened.plaintext, pt);
                assert_eq!(opened.signature, sig);
                assert_eq!(opened.generation, 9);
                // Slot only (recovery) works too.
                assert_eq!(open(&keys, &Expected::slot(42), &record).unwrap(), opened);
                let in_place = open_in_place(&keys, &exp, record.clone()).unwrap();
                assert_eq!(in_place, opened);
            }
        }
    }

    #[test]
    fn header_layout() {
        assert_eq!(HEADER_LEN, 64);
        assert_eq!(record_len(CHUNK), 64 + CHUNK + 16);
        let keys = keys();
        let pt = data(100, 1);
        let record = sealed(&keys, 0x0102, 0x0a0b_0c0d, &pt);
        assert_eq!(&record[..4], b"FRYC");
        assert_eq!(record[OFF_VERSION], 2);
        assert_eq!(&record[6..8], &[0, 0]);
        assert_eq!(
            record[OFF_GENERATION..OFF_SLOT],
            0x0a0b_0c0d_u64.to_le_bytes()
        );
        assert_eq!(record[OFF_SLOT..OFF_SIGNATURE], 0x0102_u64.to_le_bytes());
        assert_eq!(
            record[OFF_SIGNATURE..OFF_PLAINTEXT_LEN],
            *keys.signature(&pt).as_bytes()
        );
        assert_eq!(record[OFF_PLAINTEXT_LEN..OFF_CRC], 100_u32.to_le_bytes());
        // A version 1 record (valid CRC) is refused, not misparsed.
        let mut v1 = record.to_vec();
        v1[OFF_VERSION] = 1;
        fix_crc(&mut v1);
        assert_eq!(
            peek_header(&v1).unwrap_err(),
            IntegrityError::UnsupportedVersion(1)
        );
    }

    #[test]
    fn nonce_is_the_generation_and_is_not_stored() {
        // An independent AES-256-GCM seal with nonce = generation (LE) ||
        // 0u32 and the header as associated data gives exactly the record's
        // body: the nonce layout is part of the format.
        let keys = keys();
        let pt = data(1000, 6);
        let generation = 0x1122_3344_5566_7788_u64;
        let record = sealed(&keys, 3, generation, &pt);
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &keys.encryption).unwrap());
        let mut n = [0; NONCE_LEN];
        n[..8].copy_from_slice(&generation.to_le_bytes());
        let mut body = pt.clone();
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from(&record[..HEADER_LEN]),
                &mut body,
            )
            .unwrap();
        body.extend_from_slice(tag.as_ref());
        assert_eq!(&record[HEADER_LEN..], &body[..]);
    }

    #[test]
    fn ciphertext_is_not_plaintext() {
        let keys = keys();
        let pt = data(4096, 1);
        let record = sealed(&keys, 0, 0, &pt);
        assert_ne!(&record[HEADER_LEN..HEADER_LEN + pt.len()], &pt[..]);
    }

    #[test]
    fn open_in_place_does_not_copy() {
        let keys = keys();
        let pt = data(CHUNK, 5);
        let record = sealed(&keys, 1, 1, &pt);
        let body_ptr = record[HEADER_LEN..].as_ptr();
        let opened = open_in_place(&keys, &Expected::slot(1), record).unwrap();
        assert_eq!(opened.plaintext.as_ptr(), body_ptr);
        assert_eq!(opened.plaintext, pt);
    }

    #[test]
    fn seal_appends_to_existing_buffer() {
        let keys = keys();
        let (a, b) = (data(100, 1), data(200, 2));
        let mut out = BytesMut::new();
        seal(&keys, 1, 1, &keys.signature(&a), &a, &mut out);
        let first = out.len();
        seal(&keys, 2, 2, &keys.signature(&b), &b, &mut out);
        let one = open(&keys, &Expected::slot(1), &out[..first]).unwrap();
        let two = open(&keys, &Expected::slot(2), &out[first..]).unwrap();
        assert_eq!((one.plaintext, two.plaintext), (a.into(), b.into()));
    }

    #[test]
    fn trailing_slot_bytes_are_ignored() {
        let keys = keys();
        let pt = data(1000, 4);
        let mut record = sealed(&keys, 3, 1, &pt);
        record.resize(record_len(4096), 0xee);
        let opened = open(&keys, &Expected::slot(3), &record).unwrap();
        assert_eq!(opened.plaintext, pt);
        let opened = open_in_place(&keys, &Expected::slot(3), record).unwrap();
        assert_eq!(opened.plaintext, pt);
    }

    #[test]
    fn truncated_record() {
        let keys = keys();
        let record = sealed(&keys, 3, 1, &data(1000, 4));
        for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, record.len() - 1] {
            let err = open(&keys, &Expected::slot(3), &record[..cut]).unwrap_err();
            assert!(matches!(err, IntegrityError::Truncated { len, .. } if len == cut));
        }
        // The header alone is enough to peek.
        assert_eq!(peek_header(&record[..HEADER_LEN]).unwrap().slot, 3);
    }

    #[test]
    fn every_byte_flip_is_detected_exhaustively() {
        let keys = keys();
        let pt = data(300, 9);
        let record = sealed(&keys, 11, 2, &pt);
        for exp in modes(Expected::slot(11)) {
            for pos in 0..record.len() {
                for mask in [0x01, 0x80, 0xff] {
                    let mut bad = record.to_vec();
                    bad[pos] ^= mask;
                    let err = open(&keys, &exp, &bad).unwrap_err();
                    let expected_kind = match pos {
                        0..=3 => matches!(err, IntegrityError::BadMagic { .. }),
                        4 => matches!(err, IntegrityError::UnsupportedVersion(_)),
                        5..HEADER_LEN => err == IntegrityError::HeaderChecksum,
                        _ => err == IntegrityError::Decrypt,
                    };
                    assert!(expected_kind, "flip {mask:#x} at {pos}: {err:?}");
                    let err2 = open_in_place(&keys, &exp, BytesMut::from(&bad[..])).unwrap_err();
                    assert_eq!(err, err2);
                }
            }
        }
    }

    #[test]
    fn header_edit_with_fixed_crc_fails_authentication() {
        // Every header field past the version, edited by someone who also
        // recomputes the CRC, is caught by the AEAD (it is associated data;
        // the generation is also the nonce).
        let keys = keys();
        let record = sealed(&keys, 11, 2, &data(300, 9));
        for pos in 6..OFF_CRC {
            let mut bad = record.to_vec();
            bad[pos] ^= 0x10;
            fix_crc(&mut bad);
            let slot = u64::from_le_bytes(field(bad.first_chunk().unwrap(), OFF_SLOT));
            let err = open(&keys, &Expected::slot(slot), &bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    IntegrityError::Decrypt | IntegrityError::Truncated { .. }
                ),
                "edit at {pos}: {err:?}"
            );
        }
        // A forged flag is rejected before the AEAD.
        let mut bad = record.to_vec();
        bad[OFF_FLAGS] = 1;
        fix_crc(&mut bad);
        assert_eq!(
            open(&keys, &Expected::slot(11), &bad).unwrap_err(),
            IntegrityError::UnknownFlags(1)
        );
    }

    #[test]
    fn forged_signature_field_fails_authentication() {
        // The hot path trusts the header signature without rehashing: an
        // attacker who swaps in the signature the index expects (and fixes
        // the CRC) must be stopped by the AEAD, not by a recomputation.
        let keys = keys();
        let record = sealed(&keys, 5, 1, &data(4096, 1));
        let wanted = keys.signature(&data(4096, 2));
        let mut forged = record.to_vec();
        forged[OFF_SIGNATURE..OFF_PLAINTEXT_LEN].copy_from_slice(wanted.as_bytes());
        fix_crc(&mut forged);
        let exp = Expected::slot(5).with_signature(wanted);
        assert_eq!(
            open(&keys, &exp, &forged).unwrap_err(),
            IntegrityError::Decrypt
        );
        assert_eq!(
            open_in_place(&keys, &exp, BytesMut::from(&forged[..])).unwrap_err(),
            IntegrityError::Decrypt
        );
    }

    #[test]
    fn wrong_key_is_decrypt_error() {
        let record = sealed(&keys(), 5, 1, &data(4096, 1));
        let other = Keys::derive(&[8; 32], &CACHE_A);
        assert_eq!(
            open(&other, &Expected::slot(5), &record).unwrap_err(),
            IntegrityError::Decrypt
        );
        // Same dedup key, other encryption key.
        let k = keys();
        let other = Keys::from_bytes([1; 32], k.dedup);
        assert_eq!(
            open(&other, &Expected::slot(5), &record).unwrap_err(),
            IntegrityError::Decrypt
        );
    }

    #[test]
    fn other_cache_id_does_not_open() {
        // A record sealed by cache A does not open with the keys of cache B
        // of the same deployment (same master), although both share the
        // dedup key and so agree on signatures.
        let a = Keys::derive(&MASTER, &CACHE_A);
        let b = Keys::derive(&MASTER, &CACHE_B);
        let pt = data(4096, 1);
        assert_eq!(a.signature(&pt), b.signature(&pt));
        assert_eq!(a.dedup, b.dedup);
        assert_ne!(a.encryption, b.encryption);
        let record = sealed(&a, 5, 1, &pt);
        for exp in modes(Expected::slot(5).with_generation(1)) {
            assert_eq!(
                open(&b, &exp, &record).unwrap_err(),
                IntegrityError::Decrypt
            );
            assert_eq!(
                open_in_place(&b, &exp, record.clone()).unwrap_err(),
                IntegrityError::Decrypt
            );
            assert!(open(&a, &exp, &record).is_ok());
        }
        // Both caches sealing the same content at the same (slot,
        // generation), which their independent counters may well hand out,
        // still use different keys: the ciphertexts are unrelated.
        let from_b = sealed(&b, 5, 1, &pt);
        assert_eq!(record[..HEADER_LEN], from_b[..HEADER_LEN]);
        assert_ne!(record[HEADER_LEN..], from_b[HEADER_LEN..]);
    }

    #[test]
    fn verify_content_catches_a_wrong_signature() {
        // A record sealed by keys whose dedup half differs from the
        // opener's carries a signature the opener would not compute. It
        // authenticates (same encryption key), so only `verify_content`
        // notices.
        let sealer = Keys::from_bytes([3; 32], [4; 32]);
        let opener = Keys::from_bytes([3; 32], [5; 32]);
        let pt = data(4096, 1);
        let record = sealed(&sealer, 5, 1, &pt);
        let header_sig = sealer.signature(&pt);

        let trusted = open(&opener, &Expected::slot(5), &record).unwrap();
        assert_eq!(trusted.signature, header_sig);
        assert_eq!(trusted.plaintext, pt);

        let want = IntegrityError::SignatureMismatch {
            expected: header_sig,
            found: opener.signature(&pt),
        };
        let exp = Expected::slot(5).verify_content();
        assert_eq!(open(&opener, &exp, &record).unwrap_err(), want);
        assert_eq!(
            open_in_place(&opener, &exp, record.clone()).unwrap_err(),
            want
        );
        // With the sealer's own keys it verifies.
        assert_eq!(open(&sealer, &exp, &record).unwrap(), trusted);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "signature does not match the plaintext")]
    fn seal_checks_the_signature_in_debug_builds() {
        let keys = keys();
        let sig = keys.signature(&data(10, 1));
        seal(&keys, 0, 1, &sig, &data(10, 2), &mut BytesMut::new());
    }

    #[test]
    fn record_moved_to_another_slot() {
        let keys = keys();
        let record = sealed(&keys, 5, 1, &data(4096, 1));
        assert_eq!(
            open(&keys, &Expected::slot(6), &record).unwrap_err(),
            IntegrityError::WrongSlot {
                expected: 6,
                found: 5
            }
        );
        // Rewriting the slot field (and the CRC) to match does not help.
        let mut moved = record.to_vec();
        moved[OFF_SLOT..OFF_SLOT + 8].copy_from_slice(&6u64.to_le_bytes());
        fix_crc(&mut moved);
        assert_eq!(
            open(&keys, &Expected::slot(6), &moved).unwrap_err(),
            IntegrityError::Decrypt
        );
    }

    #[test]
    fn old_generation_replayed() {
        let keys = keys();
        let old = sealed(&keys, 5, 1, &data(4096, 1));
        let new = sealed(&keys, 5, 2, &data(4096, 2));
        let exp = Expected::slot(5).with_generation(2);
        assert!(open(&keys, &exp, &new).is_ok());
        assert_eq!(
            open(&keys, &exp, &old).unwrap_err(),
            IntegrityError::WrongGeneration {
                expected: 2,
                found: 1
            }
        );
        // Forging the generation field (and so the nonce) is caught by the
        // AEAD.
        let mut forged = old.to_vec();
        forged[OFF_GENERATION..OFF_GENERATION + 8].copy_from_slice(&2u64.to_le_bytes());
        fix_crc(&mut forged);
        assert_eq!(
            open(&keys, &exp, &forged).unwrap_err(),
            IntegrityError::Decrypt
        );
        // With only the expected signature, the replay is caught as other
        // content.
        let exp = Expected::slot(5).with_signature(keys.signature(&data(4096, 2)));
        assert!(matches!(
            open(&keys, &exp, &old).unwrap_err(),
            IntegrityError::SignatureMismatch { .. }
        ));
    }

    #[test]
    fn expected_signature_mismatch() {
        let keys = keys();
        let record = sealed(&keys, 5, 1, &data(4096, 1));
        let wanted = keys.signature(&data(4096, 2));
        let err = open(&keys, &Expected::slot(5).with_signature(wanted), &record).unwrap_err();
        assert_eq!(
            err,
            IntegrityError::SignatureMismatch {
                expected: wanted,
                found: keys.signature(&data(4096, 1))
            }
        );
    }

    #[test]
    fn generations_give_distinct_ciphertexts() {
        // The nonce is the generation: the same content in the same slot
        // under the same key encrypts differently at each generation, with
        // the same signature.
        let keys = keys();
        let pt = data(4096, 1);
        let records: Vec<_> = (1..=4).map(|g| sealed(&keys, 5, g, &pt)).collect();
        for (i, a) in records.iter().enumerate() {
            for b in &records[i + 1..] {
                assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
                assert_eq!(
                    peek_header(a).unwrap().signature,
                    peek_header(b).unwrap().signature
                );
            }
        }
        // Deterministic: sealing is a function of (keys, slot, generation,
        // plaintext). This is why a generation must never be sealed twice
        // with other content.
        assert_eq!(sealed(&keys, 5, 1, &pt), records[0]);
    }

    #[test]
    fn dedup_keys_separate_signatures() {
        let pt = data(4096, 1);
        let a = Keys::derive(&[1; 32], &CACHE_A);
        let b = Keys::derive(&[2; 32], &CACHE_A);
        assert_ne!(a.signature(&pt), b.signature(&pt));
        assert_eq!(
            a.signature(&pt),
            Keys::derive(&[1; 32], &CACHE_A).signature(&pt)
        );
        // The dedup key does not depend on the cache id: every cache of a
        // deployment (and the origin) computes the same signatures.
        assert_eq!(
            a.signature(&pt),
            Keys::derive(&[1; 32], &CACHE_B).signature(&pt)
        );
        // Keyed: not the plain hash of the content.
        assert_ne!(a.signature(&pt).as_bytes(), blake3::hash(&pt).as_bytes());
        // The derived keys are distinct from each other and the master.
        assert_ne!(a.encryption, a.dedup);
        assert_ne!(a.encryption, [1; 32]);
        assert_ne!(a.dedup, [1; 32]);
    }

    #[test]
    fn peek_header_reads_fields_without_key() {
        let keys = keys();
        let pt = data(777, 1);
        let record = sealed(&keys, 123, 456, &pt);
        let h = peek_header(&record).unwrap();
        assert_eq!(h.version, VERSION);
        assert_eq!(h.flags, 0);
        assert_eq!((h.slot, h.generation, h.plaintext_len), (123, 456, 777));
        assert_eq!(h.signature, keys.signature(&pt));
        assert_eq!(h.record_len(), record.len());
        assert_eq!(&record[..4], b"FRYC");
    }

    #[test]
    fn empty_slot_is_bad_magic() {
        let zeros = vec![0u8; record_len(4096)];
        assert_eq!(
            peek_header(&zeros).unwrap_err(),
            IntegrityError::BadMagic { found: 0 }
        );
        assert_eq!(
            open(&keys(), &Expected::slot(0), &zeros).unwrap_err(),
            IntegrityError::BadMagic { found: 0 }
        );
    }

    #[test]
    fn signature_formatting_and_bytes() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x01;
        let sig = Signature::from_bytes(bytes);
        assert_eq!(sig.as_bytes(), &bytes);
        let hex = sig.to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("ab00") && hex.ends_with("0001"));
        assert_eq!(format!("{sig:?}"), format!("Signature({hex})"));
        assert!(Signature::from_bytes([0; 32]) < sig);
        let set: std::collections::HashSet<_> = [sig, sig].into_iter().collect();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn keys_debug_is_opaque_and_zeroize_clears() {
        let mut k = Keys::from_bytes([0xa5; 32], [0x5a; 32]);
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "Keys { .. }");
        k.zeroize();
        assert_eq!(k.encryption, [0; 32]);
        assert_eq!(k.dedup, [0; 32]);
    }

    #[test]
    fn keys_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Keys>();
    }

    #[test]
    fn expected_builders() {
        let sig = Signature::from_bytes([9; 32]);
        let exp = Expected::slot(3);
        assert!(!exp.verify_content);
        assert_eq!((exp.generation, exp.signature), (None, None));
        let exp = exp.with_generation(4).with_signature(sig).verify_content();
        assert_eq!(
            exp,
            Expected {
                slot: 3,
                generation: Some(4),
                signature: Some(sig),
                verify_content: true,
            }
        );
    }

    #[test]
    fn error_messages_name_the_failure() {
        let e = IntegrityError::WrongSlot {
            expected: 1,
            found: 2,
        };
        assert_eq!(e.to_string(), "record belongs to slot 2, read from slot 1");
        assert!(IntegrityError::Decrypt.to_string().contains("wrong key"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_byte_flip_never_yields_plaintext(
            len in 0usize..=8192,
            pos in any::<prop::sample::Index>(),
            mask in 1u8..=255,
            verify in any::<bool>(),
        ) {
            let keys = keys();
            let record = sealed(&keys, 9, 3, &data(len, 7));
            let mut bad = record.to_vec();
            let pos = pos.index(bad.len());
            bad[pos] ^= mask;
            let mut exp = Expected::slot(9);
            exp.verify_content = verify;
            prop_assert!(open(&keys, &exp, &bad).is_err());
            prop_assert!(open_in_place(&keys, &exp, BytesMut::from(&bad[..])).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let keys = keys();
            let _ = peek_header(&bytes);
            for exp in modes(Expected::slot(0)) {
                prop_assert!(open(&keys, &exp, &bytes).is_err());
                prop_assert!(open_in_place(&keys, &exp, BytesMut::from(&bytes[..])).is_err());
            }
        }

        #[test]
        fn arbitrary_valid_looking_headers_never_panic(
            slot in 0u64..4,
            generation in any::<u64>(),
            plaintext_len in any::<u32>(),
            tail in prop::collection::vec(any::<u8>(), 0..256),
            sig in any::<[u8; 32]>(),
        ) {
            // Past magic, version and CRC, so the length and AEAD paths see
            // hostile values.
            let mut rec = Vec::with_capacity(HEADER_LEN + tail.len());
            rec.extend_from_slice(&MAGIC);
            rec.extend_from_slice(&[VERSION, 0, 0, 0]);
            rec.extend_from_slice(&generation.to_le_bytes());
            rec.extend_from_slice(&slot.to_le_bytes());
            rec.extend_from_slice(&sig);
            rec.extend_from_slice(&plaintext_len.to_le_bytes());
            rec.extend_from_slice(&[0; 4]);
            prop_assert_eq!(rec.len(), HEADER_LEN);
            fix_crc(&mut rec);
            rec.extend_from_slice(&tail);
            let keys = keys();
            let h = peek_header(&rec).unwrap();
            prop_assert_eq!(h.plaintext_len, plaintext_len);
            for s in 0..4 {
                for exp in modes(Expected::slot(s).with_generation(generation)) {
                    prop_assert!(open(&keys, &exp, &rec).is_err());
                    prop_assert!(open_in_place(&keys, &exp, BytesMut::from(&rec[..])).is_err());
                }
            }
        }
    }

    #[test]
    fn signature_key_matches_every_cache_of_the_deployment() {
        let master = [5u8; 32];
        let pt = data(4096, 9);
        let sk = SignatureKey::derive(&master);
        for id in [[0u8; 16], [1u8; 16]] {
            assert_eq!(Keys::derive(&master, &id).signature(&pt), sk.signature(&pt));
        }
        assert_ne!(
            SignatureKey::derive(&[6u8; 32]).signature(&pt),
            sk.signature(&pt)
        );
    }
}
