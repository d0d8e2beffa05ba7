//! The persisted state of a migration: what the local copy holds (the
//! progress map), where it is, the lifecycle stage and the copy settings,
//! in one checksummed file replaced atomically; and the dirty map of a
//! cut-over volume (what changed since the origin last had it).
//!
//! Pure encode/decode, fuzzed (`fuzz/fuzz_targets/migration_record.rs`):
//! the file is read back after crashes and must never panic the edge.
//!
//! Format (big-endian), `MigrationRecord`:
//!
//! ```text
//!   magic "FERRYMIG" | version u16 (1) | stage u8 | paused u8 (0/1)
//!   | rate_bytes_per_sec u64 (0: unlimited) | volume_epoch u64
//!   | target_len u16 | target (UTF-8 path)
//!   | progress: Bitmap | dirty: Bitmap | crc32 u32 (of all before it)
//! ```
//!
//! `Bitmap` = `size u64 | chunk u32 | words u32 | words × u64`, bit `i` of
//! word `i / 64` (least significant first) is chunk `i`; bits past the
//! last chunk are zero, `words` is exactly `ceil(chunks / 64)`.

use std::fmt;

use crate::stage::Stage;

const MAGIC: &[u8; 8] = b"FERRYMIG";
const VERSION: u16 = 1;
/// Longest target path accepted.
pub const MAX_TARGET_LEN: usize = 4096;
/// Chunks a map may have (4 PiB of 1 MiB chunks): bounds the allocation a
/// damaged file can ask for, and the volumes a migration takes.
pub const MAX_CHUNKS: u64 = 1 << 32;

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    Truncated,
    BadMagic,
    UnsupportedVersion(u16),
    Checksum,
    Invalid(&'static str),
    TrailingBytes,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Truncated => write!(f, "the migration record is truncated"),
            RecordError::BadMagic => write!(f, "not a migration record"),
            RecordError::UnsupportedVersion(v) => {
                write!(f, "migration record version {v} is not supported")
            }
            RecordError::Checksum => write!(f, "the migration record's checksum does not match"),
            RecordError::Invalid(what) => write!(f, "the migration record is invalid: {what}"),
            RecordError::TrailingBytes => write!(f, "the migration record has trailing bytes"),
        }
    }
}

impl std::error::Error for RecordError {}

/// One bit per chunk of a volume.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    size: u64,
    chunk: u32,
    words: Vec<u64>,
    set: u64,
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bitmap")
            .field("size", &self.size)
            .field("chunk", &self.chunk)
            .field("set", &self.set)
            .field("chunks", &self.chunks())
            .finish_non_exhaustive()
    }
}

impl Bitmap {
    /// An empty map of a `size`-byte volume in `chunk`-byte chunks.
    ///
    /// # Panics
    /// If `chunk` is zero or the volume has more than 2^32 chunks.
    pub fn new(size: u64, chunk: u32) -> Bitmap {
        assert!(chunk > 0, "chunk size 0");
        let chunks = size.div_ceil(u64::from(chunk));
        assert!(chunks <= MAX_CHUNKS, "too many chunks");
        Bitmap {
            size,
            chunk,
            words: vec![0; usize::try_from(chunks.div_ceil(64)).expect("bounded")],
            set: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk(&self) -> u32 {
        self.chunk
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk))
    }

    /// The byte range of chunk `i`.
    pub fn range(&self, i: u64) -> (u64, u64) {
        let start = i * u64::from(self.chunk);
        (start, (start + u64::from(self.chunk)).min(self.size))
    }

    /// The chunks overlapping `[offset, offset + len)`.
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let c = u64::from(self.chunk);
        offset / c..(offset + len).div_ceil(c).min(self.chunks())
    }

    pub fn get(&self, i: u64) -> bool {
        let (w, b) = (i / 64, i % 64);
        usize::try_from(w)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|word| word & (1 << b) != 0)
    }

    /// Sets chunk `i`; returns whether it was clear.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.chunks() {
            return false;
        }
        let (w, b) = (usize::try_from(i / 64).expect("bounded"), i % 64);
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        if !was {
            self.set += 1;
        }
        !was
    }

    /// Clears chunk `i`; returns whether it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.chunks() {
            return false;
        }
        let (w, b) = (usize::try_from(i / 64).expect("bounded"), i % 64);
        let was = self.words[w] & (1 << b) != 0;
        if was {
            self.set -= 1;
        }
        self.words[w] &= !(1 << b);
        was
    }

    /// Chunks set.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn is_full(&self) -> bool {
        self.set == self.chunks()
    }

    /// Bytes of the volume in chunks set (the last chunk may be short).
    pub fn bytes_set(&self) -> u64 {
        if self.is_full() {
            return self.size;
        }
        let last = self.chunks().checked_sub(1);
        let short = last.filter(|&l| self.get(l)).map_or(0, |l| {
            let (s, e) = self.range(l);
            u64::from(self.chunk) - (e - s)
        });
        self.set * u64::from(self.chunk) - short
    }

    /// The first chunk at or after `from` that is clear, wrapping around
    /// to the start.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        if self.is_full() {
            return None;
        }
        let n = self.chunks();
        let from = if from >= n { 0 } else { from };
        self.scan_clear(from, n)
            .or_else(|| self.scan_clear(0, from))
    }

    fn scan_clear(&self, from: u64, to: u64) -> Option<u64> {
        let mut i = from;
        while i < to {
            let w = self.words[usize::try_from(i / 64).expect("bounded")];
            if w == u64::MAX && i.is_multiple_of(64) {
                i += 64;
                continue;
            }
            if w & (1 << (i % 64)) == 0 {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// The chunks set, in order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.chunks()).filter(|&i| self.get(i))
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.chunk.to_be_bytes());
        let words = u32::try_from(self.words.len()).expect("bounded by MAX_CHUNKS");
        out.extend_from_slice(&words.to_be_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_be_bytes());
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Bitmap, RecordError> {
        let size = r.u64()?;
        let chunk = r.u32()?;
        if chunk == 0 {
            return Err(RecordError::Invalid("chunk size 0"));
        }
        let chunks = size.div_ceil(u64::from(chunk));
        if chunks > MAX_CHUNKS {
            return Err(RecordError::Invalid("too many chunks"));
        }
        let words = u64::from(r.u32()?);
        if words != chunks.div_ceil(64) {
            return Err(RecordError::Invalid(
                "bitmap length does not match the size",
            ));
        }
        // Checked against the bytes present before allocating.
        let words = usize::try_from(words).map_err(|_| RecordError::Truncated)?;
        if r.remaining() < words.saturating_mul(8) {
            return Err(RecordError::Truncated);
        }
        let mut v = Vec::with_capacity(words);
        let mut set = 0u64;
        for _ in 0..words {
            let w = r.u64()?;
            set += u64::from(w.count_ones());
            v.push(w);
        }
        let tail = chunks % 64;
        if tail != 0 && v.last().is_some_and(|w| w >> tail != 0) {
            return Err(RecordError::Invalid("bits set past the last chunk"));
        }
        Ok(Bitmap {
            size,
            chunk,
            words: v,
            set,
        })
    }
}

/// What the edge keeps about a volume's migration (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRecord {
    pub stage: Stage,
    pub paused: bool,
    /// The copy's rate limit, bytes per second; 0 is unlimited.
    pub rate_bytes_per_sec: u64,
    /// The origin's epoch of the volume when the copy began: a volume
    /// re-created or rolled back at the origin makes the copy stale.
    pub volume_epoch: u64,
    /// The local copy (a raw file or a block device).
    pub target: String,
    /// Chunks the local copy holds.
    pub progress: Bitmap,
    /// Chunks written on the edge since cut-over (what a move back ships).
    pub dirty: Bitmap,
}

impl MigrationRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.target.len() + self.progress.words.len() * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.push(self.stage.code());
        out.push(u8::from(self.paused));
        out.extend_from_slice(&self.rate_bytes_per_sec.to_be_bytes());
        out.extend_from_slice(&self.volume_epoch.to_be_bytes());
        let target = self.target.as_bytes();
        assert!(
            target.len() <= MAX_TARGET_LEN,
            "target path checked when set"
        );
        out.extend_from_slice(&u16::try_from(target.len()).expect("bounded").to_be_bytes());
        out.extend_from_slice(target);
        self.progress.encode_into(&mut out);
        self.dirty.encode_into(&mut out);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<MigrationRecord, RecordError> {
        if bytes.len() < MAGIC.len() + 2 + 4 {
            return Err(RecordError::Truncated);
        }
        if &bytes[..8] != MAGIC {
            return Err(RecordError::BadMagic);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let version = u16::from_be_bytes([body[8], body[9]]);
        if version != VERSION {
            return Err(RecordError::UnsupportedVersion(version));
        }
        if crc32fast::hash(body) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
            return Err(RecordError::Checksum);
        }
        let mut r = Reader { buf: &body[10..] };
        let stage = Stage::from_code(r.u8()?).ok_or(RecordError::Invalid("unknown stage"))?;
        let paused = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(RecordError::Invalid("paused is not a bool")),
        };
        let rate_bytes_per_sec = r.u64()?;
        let volume_epoch = r.u64()?;
        let len = usize::from(r.u16()?);
        if len > MAX_TARGET_LEN {
            return Err(RecordError::Invalid("target path too long"));
        }
        let target = std::str::from_utf8(r.take(len)?)
            .map_err(|_| RecordError::Invalid("target path is not UTF-8"))?
            .to_owned();
        let progress = Bitmap::decode_from(&mut r)?;
        let dirty = Bitmap::decode_from(&mut r)?;
        if progress.size != dirty.size || progress.chunk != dirty.chunk {
            return Err(RecordError::Invalid(
                "the two maps disagree on the geometry",
            ));
        }
        if r.remaining() != 0 {
            return Err(RecordError::TrailingBytes);
        }
        Ok(MigrationRecord {
            stage,
            paused,
            rate_bytes_per_sec,
            volume_epoch,
            target,
            progress,
            dirty,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(size: u64, chunk: u32, set: &[u64]) -> MigrationRecord {
        let mut progress = Bitmap::new(size, chunk);
        for &i in set {
            progress.set(i);
        }
        MigrationRecord {
            stage: Stage::Migrating,
            paused: true,
            rate_bytes_per_sec: 12_500_000,
            volume_epoch: 7,
            target: "/var/lib/vm/disk.raw".into(),
            dirty: Bitmap::new(size, chunk),
            progress,
        }
    }

    #[test]
    fn the_last_chunk_counts_its_own_length() {
        let mut m = Bitmap::new(10 << 20 | 4096, 1 << 20);
        assert_eq!(m.chunks(), 11);
        assert!(m.set(10));
        assert!(!m.set(10), "already set");
        assert_eq!(m.bytes_set(), 4096);
        m.set(0);
        assert_eq!(m.bytes_set(), (1 << 20) + 4096);
        assert_eq!(m.range(10), (10 << 20, (10 << 20) + 4096));
        assert_eq!(m.chunks_of((1 << 20) - 1, 2), 0..2);
        assert_eq!(m.chunks_of(0, 0), 0..0);
        assert_eq!(m.next_clear(0), Some(1));
        assert_eq!(m.next_clear(10), Some(1), "wraps around");
        for i in 0..11 {
            m.set(i);
        }
        assert!(m.is_full());
        assert_eq!(m.bytes_set(), m.size());
        assert_eq!(m.next_clear(3), None);
        assert!(!m.set(11), "past the end");
    }

    #[test]
    fn damaged_records_are_refused_not_trusted() {
        let good = record(100 << 20, 1 << 20, &[0, 5, 99]).encode();
        assert_eq!(
            MigrationRecord::decode(&good).unwrap(),
            record(100 << 20, 1 << 20, &[0, 5, 99])
        );
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(MigrationRecord::decode(&bad).is_err(), "flip at byte {i}");
        }
        for n in 0..good.len() {
            assert!(MigrationRecord::decode(&good[..n]).is_err(), "cut at {n}");
        }
    }

    proptest! {
        #[test]
        // Up to 16 GiB: maps of up to 512 KiB, quick enough for 256 cases.
        fn records_round_trip(size in 0u64..(1 << 34), chunk_shift in 12u32..24,
                              picks in proptest::collection::vec(any::<u64>(), 0..50)) {
            let chunk = 1u32 << chunk_shift;
            let n = size.div_ceil(u64::from(chunk));
            let set: Vec<u64> = if n == 0 { vec![] } else { picks.iter().map(|p| p % n).collect() };
            let r = record(size, chunk, &set);
            let back = MigrationRecord::decode(&r.encode()).unwrap();
            prop_assert_eq!(&back, &r);
            let mut distinct = set.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(back.progress.count(), distinct.len() as u64);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = MigrationRecord::decode(&bytes);
        }
    }
}
