//! [`WriteEntry`]: one absolute change to a range of a device, the unit
//! that every layer of write-back carries: the edge journal's batches, the
//! link's `WriteBatch` messages and the origin's apply journal.

use bytes::Bytes;

use crate::{BlockDevice, Result, WriteFlags, ZeroFlags};

/// One change: write `data` at `offset`, or zero `len` bytes at `offset`.
/// Absolute overwrites, so applying an entry twice equals applying it once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteEntry {
    Data { offset: u64, data: Bytes },
    Zero { offset: u64, len: u64 },
}

impl WriteEntry {
    pub fn offset(&self) -> u64 {
        match self {
            WriteEntry::Data { offset, .. } | WriteEntry::Zero { offset, .. } => *offset,
        }
    }

    /// Bytes of the device it covers.
    pub fn len(&self) -> u64 {
        match self {
            WriteEntry::Data { data, .. } => data.len() as u64,
            WriteEntry::Zero { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of data it carries (0 for zeroes).
    pub fn data_len(&self) -> usize {
        match self {
            WriteEntry::Data { data, .. } => data.len(),
            WriteEntry::Zero { .. } => 0,
        }
    }

    /// Applies it to `device` (zeroes may be trimmed), without a flush.
    pub async fn apply_to(&self, device: &dyn BlockDevice) -> Result<()> {
        match self {
            WriteEntry::Data { offset, data } => {
                device
                    .write(*offset, data.clone(), WriteFlags::default())
                    .await
            }
            WriteEntry::Zero { offset, len } => {
                device
                    .write_zeroes(
                        *offset,
                        *len,
                        ZeroFlags {
                            may_trim: true,
                            ..ZeroFlags::default()
                        },
                    )
                    .await
            }
        }
    }
}
