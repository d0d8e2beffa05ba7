//! The cache's data file: a header block followed by fixed-size slots, each
//! holding at most one [sealed record](crate::seal).
//!
//! ```text
//!   0        4096          4096 + stride     4096 + 2*stride
//!   +--------+-------------+-----------------+----- ...
//!   | header | slot 0      | slot 1          |
//!   +--------+-------------+-----------------+----- ...
//!            | record | pad|
//! ```
//!
//! The file's length is the slot count: growing the cache extends it,
//! shrinking truncates it (after the store moved the survivors out of the
//! tail). Slots hold no bookkeeping of their own beyond the record header;
//! which slots are in use is the index's business.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::BytesMut;

use crate::seal::record_len;

/// Size of the header block; slots start here. A page, so slots stay
/// page-aligned for `O_DIRECT` and for the page cache.
pub const HEADER_BLOCK: u64 = 4096;
const MAGIC: [u8; 4] = *b"FRYD";
const VERSION: u32 = 1;

// Format: the header block, version 1. Integers little-endian.
//
//   offset  size  field
//        0     4  magic       b"FRYD"
//        4     4  version     1
//        8     4  chunk_size  bytes of plaintext per chunk
//       12     4  stride      bytes per slot: record_len(chunk_size) rounded
//                             up to 4096
//       16    16  cache_id    random, fixed at creation; also stored in the
//                             index and mixed into the encryption key
//       32     4  crc32       crc32fast of bytes 0..32
//       36  4060  zero

/// Errors opening the data file.
#[derive(Debug, thiserror::Error)]
pub enum SlotFileError {
    #[error("data file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("data file {path}: {why}")]
    BadHeader { path: String, why: String },
}

/// The header fields of an existing data file, read without opening it for
/// writing: `(chunk_size, cache_id, slots)`.
pub fn read_header(path: &Path) -> Result<(u32, [u8; 16], u64), SlotFileError> {
    let display = path.display().to_string();
    let io_err = |source| SlotFileError::Io {
        path: display.clone(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut h = [0u8; 36];
    file.read_exact_at(&mut h, 0).map_err(io_err)?;
    let chunk_size = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if h[0..4] != MAGIC
        || crc32fast::hash(&h[0..32]) != u32::from_le_bytes(h[32..36].try_into().expect("4 bytes"))
    {
        return Err(SlotFileError::BadHeader {
            path: display,
            why: "not a ferry cache data file, or a damaged header".into(),
        });
    }
    let len = file.metadata().map_err(io_err)?.len();
    let slots = len.saturating_sub(HEADER_BLOCK) / stride_for(chunk_size);
    Ok((chunk_size, h[16..32].try_into().expect("16 bytes"), slots))
}

/// The slot stride for a chunk size: the largest record, page-aligned.
pub const fn stride_for(chunk_size: u32) -> u64 {
    let len = record_len(chunk_size as usize) as u64;
    len.div_ceil(HEADER_BLOCK) * HEADER_BLOCK
}

/// An open data file.
#[derive(Debug)]
pub struct SlotFile {
    file: File,
    stride: u64,
    record_max: usize,
    cache_id: [u8; 16],
}

fn encode_header(chunk_size: u32, stride: u64, cache_id: [u8; 16]) -> Vec<u8> {
    let mut h = vec![0u8; usize::try_from(HEADER_BLOCK).expect("small")];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&chunk_size.to_le_bytes());
    h[12..16].copy_from_slice(
        &u32::try_from(stride)
            .expect("stride fits u32")
            .to_le_bytes(),
    );
    h[16..32].copy_from_slice(&cache_id);
    let crc = crc32fast::hash(&h[0..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

impl SlotFile {
    /// Opens the data file at `path`, creating it with `new_id` (and no
    /// slots) if it does not exist. Returns the file and whether it was
    /// created. Checks the header's magic, version, checksum, chunk size and
    /// stride.
    pub fn open(
        path: &Path,
        chunk_size: u32,
        new_id: [u8; 16],
    ) -> Result<(SlotFile, bool), SlotFileError> {
        let display = path.display().to_string();
        let io_err = |source| SlotFileError::Io {
            path: display.clone(),
            source,
        };
        let bad = |why: String| SlotFileError::BadHeader {
            path: display.clone(),
            why,
        };
        let stride = stride_for(chunk_size);
        let record_max = record_len(chunk_size as usize);
        let (file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(file) => {
                file.write_all_at(&encode_header(chunk_size, stride, new_id), 0)
                    .and_then(|()| file.sync_all())
                    .map_err(io_err)?;
                (file, true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io_err)?,
                false,
            ),
            Err(e) => return Err(io_err(e)),
        };
        let mut h = [0u8; 36];
        file.read_exact_at(&mut h, 0).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad("shorter than its header (torn creation?)".into())
            } else {
                io_err(e)
            }
        })?;
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        if h[0..4] != MAGIC {
            return Err(bad("not a ferry cache data file (bad magic)".into()));
        }
        if u32_at(4) != VERSION {
            return Err(bad(format!("unsupported version {}", u32_at(4))));
        }
        if crc32fast::hash(&h[0..32]) != u32_at(32) {
            return Err(bad("header checksum mismatch".into()));
        }
        if u32_at(8) != chunk_size {
            return Err(bad(format!(
                "created with chunk size {}, configured {chunk_size}",
                u32_at(8)
            )));
        }
        if u64::from(u32_at(12)) != stride {
            return Err(bad(format!("stride {}, expected {stride}", u32_at(12))));
        }
        let cache_id = h[16..32].try_into().expect("16 bytes");
        Ok((
            SlotFile {
                file,
                stride,
                record_max,
                cache_id,
            },
            created,
        ))
    }

    /// The cache identity stored in the header.
    pub fn cache_id(&self) -> [u8; 16] {
        self.cache_id
    }

    /// Bytes per slot.
    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// The number of whole slots in the file.
    pub fn slot_count(&self) -> io::Result<u64> {
        let len = self.file.metadata()?.len();
        Ok(len.saturating_sub(HEADER_BLOCK) / self.stride)
    }

    /// Sets the number of slots (extending with zeroes or truncating), and
    /// makes the new length durable.
    pub fn set_slot_count(&self, slots: u64) -> io::Result<()> {
        self.file.set_len(HEADER_BLOCK + slots * self.stride)?;
        self.file.sync_all()
    }

    fn offset(&self, slot: u64) -> u64 {
        HEADER_BLOCK + slot * self.stride
    }

    /// Reads the first `len` bytes of `slot` (a record's length from the
    /// index; at most the slot's size) into a fresh buffer.
    pub fn read(&self, slot: u64, len: usize) -> io::Result<BytesMut> {
        let len = len.min(self.record_max);
        let mut buf = BytesMut::zeroed(len);
        self.file.read_exact_at(&mut buf, self.offset(slot))?;
        Ok(buf)
    }

    /// Writes a record into `slot` (not synced; see [`SlotFile::sync`]).
    ///
    /// # Panics
    ///
    /// If the record is larger than a slot.
    pub fn write(&self, slot: u64, record: &[u8]) -> io::Result<()> {
        assert!(record.len() <= self.record_max, "record larger than a slot");
        self.file.write_all_at(record, self.offset(slot))
    }

    /// Makes written slots durable (`fdatasync`).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The file offset of a slot (for tools and tests that patch bytes).
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.offset(slot)
    }
}
