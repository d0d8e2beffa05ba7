//! The journal's on-disk formats: the segment header and the records, each
//! with an `encode`/`decode` pair. Integers are big-endian, as in the rest of
//! the crate's formats (`proto`, `apply`).

use bytes::{Buf, BufMut};

use super::Lsn;

/// Bytes in a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 32;
/// Bytes in a segment header.
pub(crate) const SEGMENT_HEADER_LEN: usize = 64;
/// The first bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"FERRYJNL";
/// The segment format this code writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// The body of a `Write` record before its data: the offset.
pub(crate) const WRITE_PREFIX_LEN: usize = 8;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_FLUSH: u8 = 3;
const KIND_CUT: u8 = 4;
const KIND_ACKED: u8 = 5;

/// What a record says, borrowing a `Write`'s data from the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Body<'a> {
    /// The guest wrote `data` at `offset`.
    Write { offset: u64, data: &'a [u8] },
    /// The guest trimmed or zeroed `len` bytes at `offset`.
    Zero { offset: u64, len: u64 },
    /// A FLUSH was answered after every record before this one: a batch
    /// boundary the guest chose.
    Flush,
    /// The shipper sealed batch `seq`: the records `first_lsn..=last_lsn`.
    Cut {
        seq: u64,
        first_lsn: Lsn,
        last_lsn: Lsn,
    },
    /// The origin durably applied every batch up to `seq`, the last of
    /// which ends at `last_lsn`.
    Acked { seq: u64, last_lsn: Lsn },
}

impl Body<'_> {
    fn kind(&self) -> u8 {
        match self {
            Body::Write { .. } => KIND_WRITE,
            Body::Zero { .. } => KIND_ZERO,
            Body::Flush => KIND_FLUSH,
            Body::Cut { .. } => KIND_CUT,
            Body::Acked { .. } => KIND_ACKED,
        }
    }

    /// Bytes of the body that are not a `Write`'s data.
    fn fixed_len(&self) -> usize {
        match self {
            Body::Write { .. } => WRITE_PREFIX_LEN,
            Body::Zero { .. } | Body::Acked { .. } => 16,
            Body::Flush => 0,
            Body::Cut { .. } => 24,
        }
    }

    fn len(&self) -> usize {
        match self {
            Body::Write { data, .. } => WRITE_PREFIX_LEN + data.len(),
            other => other.fixed_len(),
        }
    }

    /// Whether the record carries guest data (and so belongs in a batch).
    pub(crate) fn is_data(&self) -> bool {
        matches!(self, Body::Write { .. } | Body::Zero { .. })
    }
}

/// One journal record.
//
// Format (32-byte header, then the kind's body):
//
//    0  crc32      u32  crc32fast of bytes 4.. to the end of the body
//    4  len        u32  bytes of body after the header
//    8  lsn        u64  log sequence number: previous record's + 1
//   16  timestamp  u64  unix nanoseconds when appended (never decreasing)
//   24  kind       u8   1 Write, 2 Zero, 3 Flush, 4 Cut, 5 Acked
//   25  reserved   [u8; 7] = 0
//   32  body:
//         Write  offset u64 | data [len - 8]        (data at least 1 byte)
//         Zero   offset u64 | length u64            (length at least 1)
//         Flush  (empty)
//         Cut    batch_seq u64 | first_lsn u64 | last_lsn u64
//         Acked  batch_seq u64 | last_lsn u64
//
// `Cut` and `Acked` name their batch's lsn range explicitly: a batch cut at
// a flush ends before newer records that precede the `Cut`, and recovery
// must not depend on older records that trimming may have deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub lsn: Lsn,
    pub timestamp: u64,
    pub body: Body<'a>,
}

/// Why bytes did not decode as a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The buffer ends inside a record (of plausible length).
    Incomplete,
    /// The bytes are not a valid record.
    Corrupt(String),
}

impl<'a> Record<'a> {
    /// Bytes of the whole record on disk.
    pub(crate) fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.body.len()
    }

    /// Encodes everything but a `Write`'s data: the header (its crc already
    /// covering the data) and the fixed part of the body. The data follows
    /// these bytes on disk, so a large write is not copied to be journaled.
    pub(crate) fn encode_prefix(&self) -> Vec<u8> {
        let body_len = u32::try_from(self.body.len()).expect("record bodies fit u32");
        let mut buf = Vec::with_capacity(RECORD_HEADER_LEN + self.body.fixed_len());
        buf.put_u32(0); // crc, filled in below
        buf.put_u32(body_len);
        buf.put_u64(self.lsn);
        buf.put_u64(self.timestamp);
        buf.put_u8(self.body.kind());
        buf.put_bytes(0, 7);
        let mut data: &[u8] = &[];
        match self.body {
            Body::Write { offset, data: d } => {
                buf.put_u64(offset);
                data = d;
            }
            Body::Zero { offset, len } => {
                buf.put_u64(offset);
                buf.put_u64(len);
            }
            Body::Flush => {}
            Body::Cut {
                seq,
                first_lsn,
                last_lsn,
            } => {
                buf.put_u64(seq);
                buf.put_u64(first_lsn);
                buf.put_u64(last_lsn);
            }
            Body::Acked { seq, last_lsn } => {
                buf.put_u64(seq);
                buf.put_u64(last_lsn);
            }
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[4..]);
        crc.update(data);
        let crc = crc.finalize();
        buf[..4].copy_from_slice(&crc.to_be_bytes());
        buf
    }

    /// Encodes the whole record.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut buf = self.encode_prefix();
        if let Body::Write { data, .. } = self.body {
            buf.extend_from_slice(data);
        }
        buf
    }

    /// Decodes the record at the start of `buf`, returning it and its
    /// length. A record whose body would exceed `max_body` bytes is corrupt
    /// (the writer never produces one), so a damaged length field is not
    /// mistaken for a record still being written.
    pub(crate) fn decode(buf: &'a [u8], max_body: usize) -> Result<(Self, usize), DecodeError> {
        if buf.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Incomplete);
        }
        let mut h = &buf[..RECORD_HEADER_LEN];
        let crc = h.get_u32();
        let len = h.get_u32() as usize;
        let lsn = h.get_u64();
        let timestamp = h.get_u64();
        let kind = h.get_u8();
        if len > max_body {
            return Err(DecodeError::Corrupt(format!(
                "record length {len} exceeds the largest possible {max_body}"
            )));
        }
        let total = RECORD_HEADER_LEN + len;
        if buf.len() < total {
            return Err(DecodeError::Incomplete);
        }
        let actual = crc32fast::hash(&buf[4..total]);
        if actual != crc {
            return Err(DecodeError::Corrupt(format!(
                "crc mismatch (stored {crc:#010x}, computed {actual:#010x})"
            )));
        }
        if h.iter().any(|&b| b != 0) {
            return Err(DecodeError::Corrupt(
                "reserved header bytes are not zero".into(),
            ));
        }
        let mut b = &buf[RECORD_HEADER_LEN..total];
        let bad_len =
            |what: &str| DecodeError::Corrupt(format!("{what} record with a {len}-byte body"));
        let body = match kind {
            KIND_WRITE => {
                if len <= WRITE_PREFIX_LEN {
                    return Err(bad_len("write"));
                }
                let offset = b.get_u64();
                Body::Write { offset, data: b }
            }
            KIND_ZERO => {
                if len != 16 {
                    return Err(bad_len("zero"));
                }
                let offset = b.get_u64();
                let len = b.get_u64();
                if len == 0 {
                    return Err(DecodeError::Corrupt("zero record of length 0".into()));
                }
                Body::Zero { offset, len }
            }
            KIND_FLUSH => {
                if len != 0 {
                    return Err(bad_len("flush"));
                }
                Body::Flush
            }
            KIND_CUT => {
                if len != 24 {
                    return Err(bad_len("cut"));
                }
                Body::Cut {
                    seq: b.get_u64(),
                    first_lsn: b.get_u64(),
                    last_lsn: b.get_u64(),
                }
            }
            KIND_ACKED => {
                if len != 16 {
                    return Err(bad_len("acked"));
                }
                Body::Acked {
                    seq: b.get_u64(),
                    last_lsn: b.get_u64(),
                }
            }
            other => return Err(DecodeError::Corrupt(format!("unknown record kind {other}"))),
        };
        if let Body::Write { offset, data } = body {
            if offset.checked_add(data.len() as u64).is_none() {
                return Err(DecodeError::Corrupt("write range overflows u64".into()));
            }
        }
        if let Body::Zero { offset, len } = body {
            if offset.checked_add(len).is_none() {
                return Err(DecodeError::Corrupt("zero range overflows u64".into()));
            }
        }
        Ok((
            Record {
                lsn,
                timestamp,
                body,
            },
            total,
        ))
    }
}

/// The batch state of the log just before a segment's first record, so
/// recovery never needs the (possibly deleted) segments before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The newest batch cut, and the last lsn it covers.
    pub cut_seq: u64,
    pub cut_last_lsn: Lsn,
    /// The newest batch acknowledged, and the last lsn it covers.
    pub acked_seq: u64,
    pub acked_last_lsn: Lsn,
}

/// The header at the start of every segment file.
//
// Format (64 bytes):
//
//    0  magic           [u8; 8] = "FERRYJNL"
//    8  crc32           u32  crc32fast of bytes 12..64
//   12  version         u32  = 1
//   16  first_lsn       u64  lsn of the segment's first record (also in its name)
//   24  cut_seq         u64  checkpoint: the newest batch cut before first_lsn,
//   32  cut_last_lsn    u64    and the last lsn it covers
//   40  acked_seq       u64  checkpoint: the newest batch acknowledged before
//   48  acked_last_lsn  u64    first_lsn, and the last lsn it covers
//   56  reserved        [u8; 8] = 0
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub first_lsn: Lsn,
    pub checkpoint: Checkpoint,
}

impl SegmentHeader {
    pub(crate) fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut buf = Vec::with_capacity(SEGMENT_HEADER_LEN);
        buf.put_slice(&SEGMENT_MAGIC);
        buf.put_u32(0);
        buf.put_u32(FORMAT_VERSION);
        buf.put_u64(self.first_lsn);
        buf.put_u64(self.checkpoint.cut_seq);
        buf.put_u64(self.checkpoint.cut_last_lsn);
        buf.put_u64(self.checkpoint.acked_seq);
        buf.put_u64(self.checkpoint.acked_last_lsn);
        buf.put_bytes(0, 8);
        let crc = crc32fast::hash(&buf[12..]);
        buf[8..12].copy_from_slice(&crc.to_be_bytes());
        buf.try_into().expect("the header is 64 bytes")
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < SEGMENT_HEADER_LEN {
            return Err(DecodeError::Incomplete);
        }
        let buf = &buf[..SEGMENT_HEADER_LEN];
        if buf[..8] != SEGMENT_MAGIC {
            return Err(DecodeError::Corrupt(
                "not a journal segment (bad magic)".into(),
            ));
        }
        let mut b = &buf[8..];
        let crc = b.get_u32();
        let actual = crc32fast::hash(&buf[12..]);
        if crc != actual {
            return Err(DecodeError::Corrupt(format!(
                "segment header crc mismatch (stored {crc:#010x}, computed {actual:#010x})"
            )));
        }
        let version = b.get_u32();
        if version != FORMAT_VERSION {
            return Err(DecodeError::Corrupt(format!(
                "segment format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        let first_lsn = b.get_u64();
        let checkpoint = Checkpoint {
            cut_seq: b.get_u64(),
            cut_last_lsn: b.get_u64(),
            acked_seq: b.get_u64(),
            acked_last_lsn: b.get_u64(),
        };
        if b.iter().any(|&x| x != 0) {
            return Err(DecodeError::Corrupt(
                "reserved header bytes are not zero".into(),
            ));
        }
        if first_lsn == 0 {
            return Err(DecodeError::Corrupt("segment first_lsn 0".into()));
        }
        Ok(SegmentHeader {
            first_lsn,
            checkpoint,
        })
    }
}
