//! The access profile and its encoding.
//!
//! ```text
//!   "FPRF" | version u8 | chunk_size u32 | volume_size u64 | count u32
//!   | count × (chunk delta: zigzag varint | at_ms delta: varint | count: varint)
//!   | crc32 u32   (of everything before it; integers big-endian)
//! ```
//!
//! Touches are in first-touch order, so `at_ms` never decreases and its
//! deltas are small; chunk deltas are signed (a boot jumps around the
//! disk) and mostly small too. A 1,500-chunk boot encodes in about 6 KB.

use thiserror::Error;

const MAGIC: [u8; 4] = *b"FPRF";
/// The encoding's version; a decoder refuses any other.
pub const PROFILE_VERSION: u8 = 1;
/// Touches in one profile, at most (64 GiB of 64 KiB chunks: far more than
/// any boot window reads).
pub const MAX_TOUCHES: usize = 1 << 20;
const HEADER_LEN: usize = 4 + 1 + 4 + 8 + 4;

/// One chunk a recording saw read, the first time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Touch {
    /// The chunk's index (byte offset / chunk size).
    pub chunk: u64,
    /// Milliseconds from the attach to the first read of the chunk.
    pub at_ms: u32,
    /// Reads of the chunk within the window (at least 1).
    pub count: u32,
}

/// The chunks one boot (or workload start) read, in first-touch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub chunk_size: u32,
    pub volume_size: u64,
    pub touches: Vec<Touch>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("not a profile: {0}")]
    NotAProfile(&'static str),
    #[error("profile version {0} is not supported (this build reads version {PROFILE_VERSION})")]
    Version(u8),
    #[error("the profile's checksum does not match: it is damaged")]
    Checksum,
    #[error("the profile is inconsistent: {0}")]
    Invalid(&'static str),
}

impl Profile {
    /// Chunks of the volume (the last may be short).
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.chunk_size, self.volume_size)
    }

    /// Checks what [`Profile::decode`] checks: a usable geometry, every
    /// chunk inside the volume and touched once, times in order, counts
    /// of at least one.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.chunk_size < 512 || !self.chunk_size.is_power_of_two() {
            return Err(ProfileError::Invalid(
                "the chunk size is not a power of two of at least 512",
            ));
        }
        if self.touches.len() > MAX_TOUCHES {
            return Err(ProfileError::Invalid("more touches than a profile holds"));
        }
        let chunks = self.chunk_count();
        let mut seen = std::collections::HashSet::with_capacity(self.touches.len());
        let mut last_ms = 0;
        for t in &self.touches {
            if t.chunk >= chunks {
                return Err(ProfileError::Invalid("a chunk lies beyond the volume"));
            }
            if !seen.insert(t.chunk) {
                return Err(ProfileError::Invalid("a chunk is touched twice"));
            }
            if t.at_ms < last_ms {
                return Err(ProfileError::Invalid("touch times go backwards"));
            }
            if t.count == 0 {
                return Err(ProfileError::Invalid("a touch with no reads"));
            }
            last_ms = t.at_ms;
        }
        Ok(())
    }

    /// The profile's bytes. Panics if it does not [`validate`](Self::validate):
    /// profiles are built by [`Recorder`](crate::Recorder) or decoded.
    pub fn encode(&self) -> Vec<u8> {
        self.validate().expect("a valid profile");
        let mut out = Vec::with_capacity(HEADER_LEN + 4 + self.touches.len() * 5);
        out.extend_from_slice(&MAGIC);
        out.push(PROFILE_VERSION);
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.volume_size.to_be_bytes());
        let n = u32::try_from(self.touches.len()).expect("at most MAX_TOUCHES");
        out.extend_from_slice(&n.to_be_bytes());
        let (mut chunk, mut ms) = (0u64, 0u32);
        for t in &self.touches {
            // Two's-complement difference: any jump fits, wrapping back on
            // decode.
            put_varint(&mut out, zigzag(t.chunk.wrapping_sub(chunk).cast_signed()));
            put_varint(&mut out, u64::from(t.at_ms - ms));
            put_varint(&mut out, u64::from(t.count));
            (chunk, ms) = (t.chunk, t.at_ms);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Parses and checks a profile (untrusted bytes: a damaged one is an
    /// error, never a panic).
    pub fn decode(bytes: &[u8]) -> Result<Profile, ProfileError> {
        if bytes.len() < HEADER_LEN + 4 {
            return Err(ProfileError::NotAProfile("too short"));
        }
        if bytes[..4] != MAGIC {
            return Err(ProfileError::NotAProfile("wrong magic"));
        }
        if bytes[4] != PROFILE_VERSION {
            return Err(ProfileError::Version(bytes[4]));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_be_bytes() != crc {
            return Err(ProfileError::Checksum);
        }
        let be32 = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let chunk_size = be32(5);
        let volume_size = u64::from_be_bytes(body[9..17].try_into().expect("8 bytes"));
        let n = be32(17) as usize;
        if n > MAX_TOUCHES {
            return Err(ProfileError::Invalid("more touches than a profile holds"));
        }
        // Each touch takes at least three bytes: a count beyond that is a
        // lie, refused before allocating for it.
        let mut rest = &body[HEADER_LEN..];
        if n > rest.len() / 3 {
            return Err(ProfileError::Invalid("fewer bytes than its touches need"));
        }
        let mut touches = Vec::with_capacity(n);
        let (mut chunk, mut ms) = (0u64, 0u32);
        for _ in 0..n {
            let delta = unzigzag(take_varint(&mut rest)?);
            chunk = chunk.wrapping_add(delta.cast_unsigned());
            let dms = u32::try_from(take_varint(&mut rest)?)
                .map_err(|_| ProfileError::Invalid("a time beyond u32 milliseconds"))?;
            ms = ms
                .checked_add(dms)
                .ok_or(ProfileError::Invalid("a time beyond u32 milliseconds"))?;
            let count = u32::try_from(take_varint(&mut rest)?)
                .map_err(|_| ProfileError::Invalid("a read count beyond u32"))?;
            touches.push(Touch {
                chunk,
                at_ms: ms,
                count,
            });
        }
        if !rest.is_empty() {
            return Err(ProfileError::Invalid("bytes after the last touch"));
        }
        let p = Profile {
            chunk_size,
            volume_size,
            touches,
        };
        p.validate()?;
        Ok(p)
    }
}

pub(crate) fn chunk_count(chunk_size: u32, volume_size: u64) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    volume_size.div_ceil(u64::from(chunk_size))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)).cast_unsigned()
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1).cast_signed() ^ -(v & 1).cast_signed()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).expect("7 bits") | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).expect("below 0x80"));
}

fn take_varint(rest: &mut &[u8]) -> Result<u64, ProfileError> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some((&b, tail)) = rest.split_first() else {
            return Err(ProfileError::Invalid("a touch is cut short"));
        };
        *rest = tail;
        let bits = u64::from(b & 0x7f);
        if i == 9 && bits > 1 {
            return Err(ProfileError::Invalid("a number beyond u64"));
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            // One encoding per number: a profile re-encodes to its bytes.
            if b == 0 && i > 0 {
                return Err(ProfileError::Invalid("a number is not minimally encoded"));
            }
            return Ok(v);
        }
    }
    Err(ProfileError::Invalid("a number beyond u64"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Profile {
        Profile {
            chunk_size: 65536,
            volume_size: 10 * 65536 + 100,
            touches: vec![
                Touch {
                    chunk: 3,
                    at_ms: 0,
                    count: 2,
                },
                Touch {
                    chunk: 10,
                    at_ms: 5,
                    count: 1,
                },
                Touch {
                    chunk: 0,
                    at_ms: 5,
                    count: 7,
                },
            ],
        }
    }

    #[test]
    fn a_profile_survives_encoding_and_every_damage_is_refused() {
        let p = sample();
        let bytes = p.encode();
        assert_eq!(Profile::decode(&bytes), Ok(p));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Profile::decode(&bad).is_err(), "flipping byte {i}");
        }
        for n in 0..bytes.len() {
            assert!(Profile::decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        // A padded number (0x83 0x00 for 3) is refused: one encoding each.
        let mut padded = bytes[..HEADER_LEN].to_vec();
        padded.extend_from_slice(&[0x86, 0x00]);
        padded.extend_from_slice(&bytes[HEADER_LEN + 1..bytes.len() - 4]);
        let crc = crc32fast::hash(&padded);
        padded.extend_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            Profile::decode(&padded),
            Err(ProfileError::Invalid(_))
        ));
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert_eq!(Profile::decode(&v2), Err(ProfileError::Version(2)));
    }

    #[test]
    fn inconsistent_profiles_are_refused_even_with_a_good_checksum() {
        let mut beyond = sample();
        beyond.touches[1].chunk = 11;
        let mut twice = sample();
        twice.touches[2].chunk = 3;
        let mut backwards = sample();
        backwards.touches[2].at_ms = 4;
        for p in [beyond, twice, backwards] {
            assert!(p.validate().is_err());
            // Encoded by hand past `encode`'s own check.
            let mut bytes = sample().encode();
            bytes.truncate(HEADER_LEN);
            let (mut c, mut ms) = (0u64, 0u32);
            for t in &p.touches {
                put_varint(&mut bytes, zigzag(t.chunk.wrapping_sub(c).cast_signed()));
                put_varint(&mut bytes, u64::from(t.at_ms.wrapping_sub(ms)));
                put_varint(&mut bytes, u64::from(t.count));
                (c, ms) = (t.chunk, t.at_ms);
            }
            let crc = crc32fast::hash(&bytes);
            bytes.extend_from_slice(&crc.to_be_bytes());
            assert!(matches!(
                Profile::decode(&bytes),
                Err(ProfileError::Invalid(_))
            ));
        }
    }

    proptest! {
        #[test]
        fn any_recorded_order_round_trips(
            chunks in proptest::sample::subsequence((0u64..5000).collect::<Vec<_>>(), 0..300),
            shuffle in any::<u64>(),
            gaps in proptest::collection::vec(0u32..100_000, 300),
        ) {
            // A permutation of the chosen chunks, times in order.
            let mut chunks = chunks;
            let len = chunks.len();
            for i in 0..len {
                let j = usize::try_from((shuffle.rotate_left(u32::try_from(i % 64).unwrap()) ^ i as u64) % len as u64).unwrap();
                chunks.swap(i, j);
            }
            let mut at = 0u32;
            let touches = chunks.iter().zip(&gaps).map(|(&chunk, &g)| {
                at += g;
                Touch { chunk, at_ms: at, count: g % 7 + 1 }
            }).collect();
            let p = Profile { chunk_size: 4096, volume_size: 5000 * 4096, touches };
            prop_assert_eq!(Profile::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = Profile::decode(&bytes) {
                prop_assert_eq!(p.encode(), bytes);
            }
        }
    }
}
