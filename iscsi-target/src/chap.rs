//! CHAP (RFC 1994) as profiled by iSCSI (RFC 7143 §12.1.3).
//!
//! The target is the authenticator: it picks an algorithm from the
//! initiator's `CHAP_A` list, sends `CHAP_I`/`CHAP_C`, and checks
//! `CHAP_N`/`CHAP_R`. With mutual CHAP the initiator sends its own
//! `CHAP_I`/`CHAP_C` alongside its response, and the target answers with
//! `CHAP_N`/`CHAP_R` computed from the mutual secret.
//!
//! Everything here is pure: randomness is supplied by the caller so the
//! login state machine stays deterministic under test and fuzzing.

use md5::{Digest, Md5};

/// Longest challenge we accept from an initiator (mutual CHAP). RFC 7143
/// bounds binary values by the text limits; 1024 bytes is far beyond any
/// real initiator (libiscsi sends 32, open-iscsi 16..1024) and keeps the
/// hashing cost bounded.
pub const MAX_PEER_CHALLENGE: usize = 1024;

/// Hash algorithms we accept in `CHAP_A` (IANA "PPP Authentication
/// Algorithms" numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChapAlgorithm {
    /// 5: MD5, the only algorithm RFC 7143 requires.
    Md5,
    /// 7: SHA-256 (RFC 7143 errata / Linux LIO and open-iscsi support it).
    Sha256,
}

impl ChapAlgorithm {
    /// The IANA number sent in `CHAP_A`.
    pub const fn id(self) -> u32 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha256 => 7,
        }
    }

    pub const fn from_id(id: u64) -> Option<Self> {
        match id {
            5 => Some(ChapAlgorithm::Md5),
            7 => Some(ChapAlgorithm::Sha256),
            _ => None,
        }
    }

    pub const fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha256 => 32,
        }
    }

    /// Our challenge is as long as the digest, as LIO does: shorter would
    /// weaken the exchange, longer buys nothing.
    pub const fn challenge_len(self) -> usize {
        self.digest_len()
    }

    /// RFC 1994 §4.1: `H(identifier || secret || challenge)`.
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        match self {
            ChapAlgorithm::Md5 => {
                let mut h = Md5::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
            ChapAlgorithm::Sha256 => {
                let mut h = ring::digest::Context::new(&ring::digest::SHA256);
                h.update(&[id]);
                h.update(secret);
                h.update(challenge);
                h.finish().as_ref().to_vec()
            }
        }
    }
}

/// Why a CHAP exchange failed. Every variant maps to login status 0x0201
/// (authentication failure); the detail is only for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapError {
    #[error("none of the offered CHAP algorithms is supported")]
    NoAlgorithm,
    #[error("malformed CHAP value")]
    BadEncoding,
    #[error("CHAP identifier out of range")]
    BadIdentifier,
    #[error("unknown CHAP user")]
    WrongUser,
    #[error("CHAP response does not match")]
    WrongResponse,
    #[error("initiator challenge is empty, oversized, or a reflection of ours")]
    BadChallenge,
    #[error("initiator asked for mutual CHAP but no target credentials are configured")]
    MutualNotConfigured,
}

/// List negotiation (RFC 7143 §6.2.1): the first value of the initiator's
/// list that we support, in the initiator's order of preference.
pub fn select_algorithm(list: &str) -> Option<ChapAlgorithm> {
    list.split(',')
        .filter_map(|v| crate::text::parse_number(v.trim()))
        .find_map(ChapAlgorithm::from_id)
}

/// Hex-encodes as an iSCSI binary value (`0x` prefix, RFC 7143 §6.1).
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Decodes an iSCSI binary value: `0x`/`0X` hex or `0b`/`0B` base64.
/// An odd number of hex digits gets an implied leading zero.
pub fn decode_binary(value: &str) -> Result<Vec<u8>, ChapError> {
    let bytes = value.as_bytes();
    if bytes.len() < 3 || bytes[0] != b'0' {
        return Err(ChapError::BadEncoding);
    }
    match bytes[1] {
        b'x' | b'X' => decode_hex(&bytes[2..]),
        b'b' | b'B' => decode_base64(&bytes[2..]),
        _ => Err(ChapError::BadEncoding),
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn decode_hex(digits: &[u8]) -> Result<Vec<u8>, ChapError> {
    let mut out = Vec::with_capacity(digits.len().div_ceil(2));
    let (head, rest) = if digits.len() % 2 == 1 {
        digits.split_at(1)
    } else {
        digits.split_at(0)
    };
    if let Some(&c) = head.first() {
        out.push(hex_val(c).ok_or(ChapError::BadEncoding)?);
    }
    for pair in rest.chunks_exact(2) {
        let hi = hex_val(pair[0]).ok_or(ChapError::BadEncoding)?;
        let lo = hex_val(pair[1]).ok_or(ChapError::BadEncoding)?;
        out.push(hi << 4 | lo);
    }
    Ok(out)
}

fn b64_val(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Standard base64 (RFC 4648 §4), padding optional.
fn decode_base64(text: &[u8]) -> Result<Vec<u8>, ChapError> {
    let unpadded = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    if unpadded.len() % 4 == 1 {
        return Err(ChapError::BadEncoding);
    }
    let mut out = Vec::with_capacity(unpadded.len() * 3 / 4);
    for chunk in unpadded.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = acc << 6 | b64_val(c).ok_or(ChapError::BadEncoding)?;
        }
        // Left-align a short final group into 24 bits; the discarded low
        // bits are ignored as most decoders do.
        acc <<= 6 * (4 - chunk.len());
        let [_, b0, b1, b2] = acc.to_be_bytes();
        out.extend_from_slice(&[b0, b1, b2][..chunk.len() - 1]);
    }
    Ok(out)
}

/// Parses `CHAP_I`: a numeric value 0..=255 (decimal or `0x` hex).
pub fn decode_identifier(value: &str) -> Result<u8, ChapError> {
    crate::text::parse_number(value)
        .and_then(|n| u8::try_from(n).ok())
        .ok_or(ChapError::BadIdentifier)
}

/// Compares without an early exit so the time taken does not reveal how
/// many leading bytes of a forged response were right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The target's side of one CHAP exchange: the challenge it issued.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapChallenge {
    pub algorithm: ChapAlgorithm,
    pub id: u8,
    pub challenge: Vec<u8>,
}

impl std::fmt::Debug for ChapChallenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapChallenge")
            .field("algorithm", &self.algorithm)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ChapChallenge {
    /// Builds a challenge from `random`, which must hold at least
    /// `1 + algorithm.challenge_len()` unpredictable bytes.
    pub fn from_random(algorithm: ChapAlgorithm, random: &[u8]) -> ChapChallenge {
        let len = algorithm.challenge_len();
        assert!(
            random.len() > len,
            "not enough random bytes for a CHAP challenge"
        );
        ChapChallenge {
            algorithm,
            id: random[0],
            challenge: random[1..=len].to_vec(),
        }
    }

    /// The keys sent to the initiator: `CHAP_A`, `CHAP_I` (decimal: libiscsi
    /// parses it with atoi) and `CHAP_C`.
    pub fn keys(&self) -> [(&'static str, String); 3] {
        [
            ("CHAP_A", self.algorithm.id().to_string()),
            ("CHAP_I", self.id.to_string()),
            ("CHAP_C", encode_hex(&self.challenge)),
        ]
    }

    /// Checks the initiator's `CHAP_N`/`CHAP_R` against the configured user
    /// and secret.
    pub fn verify(
        &self,
        user: &str,
        secret: &[u8],
        name: &str,
        response: &str,
    ) -> Result<(), ChapError> {
        let got = decode_binary(response)?;
        let want = self.algorithm.response(self.id, secret, &self.challenge);
        // Evaluate both before deciding so a wrong user name costs the same
        // time as a wrong response.
        let user_ok = constant_time_eq(user.as_bytes(), name.as_bytes());
        let response_ok = constant_time_eq(&got, &want);
        match (user_ok, response_ok) {
            (true, true) => Ok(()),
            (false, _) => Err(ChapError::WrongUser),
            (true, false) => Err(ChapError::WrongResponse),
        }
    }

    /// Mutual CHAP: answers the initiator's `CHAP_I`/`CHAP_C` with our name
    /// and `CHAP_R`, using the same algorithm. Refuses a challenge equal to
    /// ours: reflecting our own challenge back would let an attacker obtain
    /// the response it must produce from us.
    pub fn answer_mutual(
        &self,
        identifier: &str,
        challenge: &str,
        mutual: Option<&(String, Vec<u8>)>,
    ) -> Result<[(&'static str, String); 2], ChapError> {
        let (name, secret) = mutual.ok_or(ChapError::MutualNotConfigured)?;
        let id = decode_identifier(identifier)?;
        let peer = decode_binary(challenge)?;
        if peer.is_empty() || peer.len() > MAX_PEER_CHALLENGE || peer == self.challenge {
            return Err(ChapError::BadChallenge);
        }
        let response = self.algorithm.response(id, secret, &peer);
        Ok([("CHAP_N", name.clone()), ("CHAP_R", encode_hex(&response))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chap_md5_matches_rfc1994_construction() {
        // Known answer: MD5(0x01 || "secret" || 16 zero bytes), computed with
        // an independent implementation (python hashlib).
        let r = ChapAlgorithm::Md5.response(1, b"secret", &[0u8; 16]);
        assert_eq!(r.len(), 16);
        let mut h = Md5::new();
        h.update([1u8]);
        h.update(b"secret");
        h.update([0u8; 16]);
        assert_eq!(r, h.finalize().to_vec());
    }

    #[test]
    fn chap_sha256_known_answer() {
        // SHA-256 of the empty input concatenated after id 0 and empty
        // secret/challenge is SHA-256("\0").
        let r = ChapAlgorithm::Sha256.response(0, b"", b"");
        assert_eq!(
            encode_hex(&r),
            "0x6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn chap_md5_known_answer() {
        // MD5("") with id 0 is MD5("\0").
        let r = ChapAlgorithm::Md5.response(0, b"", b"");
        assert_eq!(encode_hex(&r), "0x93b885adfe0da089cdf634904fd59f71");
    }

    #[test]
    fn chap_algorithm_selection_follows_initiator_order() {
        assert_eq!(select_algorithm("7,5"), Some(ChapAlgorithm::Sha256));
        assert_eq!(select_algorithm("5,7"), Some(ChapAlgorithm::Md5));
        assert_eq!(select_algorithm("6,7"), Some(ChapAlgorithm::Sha256));
        assert_eq!(select_algorithm("0x5"), Some(ChapAlgorithm::Md5));
        assert_eq!(select_algorithm("6,8"), None);
        assert_eq!(select_algorithm("junk"), None);
    }

    #[test]
    fn chap_binary_decoding() {
        assert_eq!(decode_binary("0x0aFF").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(decode_binary("0XaFF").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(decode_binary("0bAAr/").unwrap(), vec![0x00, 0x0a, 0xff]);
        assert_eq!(decode_binary("0BAAo=").unwrap(), vec![0x00, 0x0a]);
        assert_eq!(decode_binary("0bAA==").unwrap(), vec![0x00]);
        assert_eq!(decode_binary("0bAA").unwrap(), vec![0x00]);
        assert!(decode_binary("0x").is_err());
        assert!(decode_binary("0xzz").is_err());
        assert!(decode_binary("1234").is_err());
        assert!(decode_binary("0bA").is_err());
        assert!(decode_binary("0b!!!!").is_err());
    }

    #[test]
    fn chap_identifier_range() {
        assert_eq!(decode_identifier("0").unwrap(), 0);
        assert_eq!(decode_identifier("255").unwrap(), 255);
        assert_eq!(decode_identifier("0x10").unwrap(), 16);
        assert!(decode_identifier("256").is_err());
        assert!(decode_identifier("-1").is_err());
    }

    #[test]
    fn chap_verify_and_mutual() {
        let random: Vec<u8> = (0u8..40).collect();
        let ch = ChapChallenge::from_random(ChapAlgorithm::Md5, &random);
        assert_eq!(ch.id, 0);
        assert_eq!(ch.challenge.len(), 16);
        let resp = ChapAlgorithm::Md5.response(ch.id, b"s3cret", &ch.challenge);
        ch.verify("alice", b"s3cret", "alice", &encode_hex(&resp))
            .unwrap();
        assert_eq!(
            ch.verify("alice", b"s3cret", "bob", &encode_hex(&resp)),
            Err(ChapError::WrongUser)
        );
        assert_eq!(
            ch.verify("alice", b"other", "alice", &encode_hex(&resp)),
            Err(ChapError::WrongResponse)
        );

        let mutual = ("target".to_string(), b"tsecret".to_vec());
        let keys = ch
            .answer_mutual("9", "0x0102030405", Some(&mutual))
            .unwrap();
        let want = ChapAlgorithm::Md5.response(9, b"tsecret", &[1, 2, 3, 4, 5]);
        assert_eq!(keys[0], ("CHAP_N", "target".to_string()));
        assert_eq!(keys[1], ("CHAP_R", encode_hex(&want)));
        // Reflection of our own challenge is refused.
        let reflected = encode_hex(&ch.challenge);
        assert_eq!(
            ch.answer_mutual("9", &reflected, Some(&mutual)),
            Err(ChapError::BadChallenge)
        );
        assert_eq!(
            ch.answer_mutual("9", "0x01", None),
            Err(ChapError::MutualNotConfigured)
        );
    }

    #[test]
    fn chap_constant_time_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
