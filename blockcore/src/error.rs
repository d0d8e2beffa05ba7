//! The one error type of the block layer.
//!
//! Variants name the operation that failed; front ends map them to NBD errno
//! values or SCSI sense data in a single exhaustive `match` (no `_` arm), so a
//! new variant is a compile error at every protocol edge until it is mapped.

use std::io;

use crate::Op;

/// Result of a block-device operation.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the device (or its offset
    /// overflows).
    #[error(
        "{op} of {len} bytes at offset {offset} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange {
        op: Op,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The request is not aligned to the device's minimum block size.
    #[error("{op} of {len} bytes at offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        op: Op,
        offset: u64,
        len: u64,
        align: u32,
    },
    /// The request is larger than the device accepts in one call.
    #[error("{op} of {len} bytes exceeds the maximum of {max} bytes per request")]
    TooLarge { op: Op, len: u64, max: u64 },
    /// The device (or export) is read-only.
    #[error("{op} refused: the device is read-only")]
    ReadOnly { op: Op },
    /// The device cannot do this operation (or cannot do it fast, for a
    /// write-zeroes that asked for the fast path only).
    #[error("{op} is not supported by this device")]
    Unsupported { op: Op },
    /// The backing store ran out of space.
    #[error("{op} at offset {offset} failed: no space left on the backing store")]
    NoSpace { op: Op, offset: u64 },
    /// Any other I/O failure of the backing store.
    #[error("{op} at offset {offset} failed: {source}")]
    Io {
        op: Op,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The device is shutting down and takes no new work.
    #[error("{op} refused: the device is shutting down")]
    ShuttingDown { op: Op },
}

impl BlockError {
    /// Wraps an I/O error, turning "disk full" into [`BlockError::NoSpace`] so
    /// front ends can answer `ENOSPC` rather than `EIO`.
    pub fn io(op: Op, offset: u64, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => BlockError::NoSpace { op, offset },
            Some(libc::EOPNOTSUPP) => BlockError::Unsupported { op },
            _ => BlockError::Io { op, offset, source },
        }
    }

    /// The operation that failed.
    pub fn op(&self) -> Op {
        match self {
            BlockError::OutOfRange { op, .. }
            | BlockError::Misaligned { op, .. }
            | BlockError::TooLarge { op, .. }
            | BlockError::ReadOnly { op }
            | BlockError::Unsupported { op }
            | BlockError::NoSpace { op, .. }
            | BlockError::Io { op, .. }
            | BlockError::ShuttingDown { op } => *op,
        }
    }
}
