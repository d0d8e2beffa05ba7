//! The [`BlockDevice`] trait and the plain data types around it.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{BlockError, Result};

/// The operation a request or an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Extents,
    Prefetch,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write-zeroes",
            Op::Extents => "extents query",
            Op::Prefetch => "prefetch",
        })
    }
}

/// Block-size limits, as NBD's `NBD_INFO_BLOCK_SIZE` and SCSI's Block Limits
/// VPD page advertise them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit: every offset and length must be a multiple.
    pub min: u32,
    /// Size below which read-modify-write or other penalties apply.
    pub preferred: u32,
    /// Largest payload of one read or write.
    pub max: u32,
}

impl BlockSizes {
    /// Byte-addressable, 4 KiB preferred, 32 MiB per request (NBD's
    /// conventional maximum payload).
    pub const DEFAULT: BlockSizes = BlockSizes {
        min: 1,
        preferred: 4096,
        max: 32 * 1024 * 1024,
    };
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a device can do. Layers pass their inner device's capabilities
/// through, narrowing them where they must.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    /// `flush` makes earlier completed writes durable (else it is a no-op
    /// because every write already is, or nothing is ever durable).
    pub flush: bool,
    /// Writes honour [`WriteFlags::fua`] natively (they are still correct
    /// without it: the device then flushes after the write).
    pub fua: bool,
    /// `trim` deallocates; trimmed ranges read back as zeroes.
    pub trim: bool,
    /// `write_zeroes` is cheaper than writing a buffer of zeroes.
    pub write_zeroes: bool,
    /// `write_zeroes` with [`ZeroFlags::fast_only`] can succeed.
    pub fast_zero: bool,
    /// `extents` reports real allocation rather than "all data".
    pub extents: bool,
    /// `prefetch` does something useful.
    pub prefetch: bool,
    /// Several clients may use the device at once and a flush from any of
    /// them covers writes completed by all of them (NBD's
    /// `NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
}

impl Capabilities {
    /// A writable device that can do everything; devices narrow it with
    /// struct-update syntax (`Capabilities { prefetch: false, ..Capabilities::ALL }`).
    pub const ALL: Capabilities = Capabilities {
        read_only: false,
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        extents: true,
        prefetch: true,
        multi_conn: true,
    };
}

/// The static description of a device: size, limits and capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub size: u64,
    pub block_sizes: BlockSizes,
    pub caps: Capabilities,
}

/// Flags of a write or trim.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the call returns.
    pub fua: bool,
}

/// Flags of a write-zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Force unit access: the zeroes are durable when the call returns.
    pub fua: bool,
    /// The device may deallocate the range instead of writing zeroes
    /// (NBD: the absence of `NBD_CMD_FLAG_NO_HOLE`; SCSI: the UNMAP bit).
    pub may_trim: bool,
    /// Fail with [`BlockError::Unsupported`] rather than zero slowly
    /// (NBD's `NBD_CMD_FLAG_FAST_ZERO`).
    pub fast_only: bool,
}

/// What a run of bytes is, as an allocation query reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated, holds data (which may happen to be zero).
    Data,
    /// Allocated and known to read as zeroes.
    Zero,
    /// Not allocated; reads as zeroes.
    Hole,
}

impl ExtentKind {
    /// Whether the run is known to read as zeroes.
    pub fn reads_zero(self) -> bool {
        matches!(self, ExtentKind::Zero | ExtentKind::Hole)
    }
}

/// A run of bytes of one [`ExtentKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// A block device: the one abstraction every backend, layer and front end
/// speaks.
///
/// Contract, which the [`conformance`](crate::conformance) suite checks for
/// every implementation:
/// - Offsets and lengths are in bytes; anything past [`DeviceInfo::size`] is
///   [`BlockError::OutOfRange`] and has no effect.
/// - A read returns exactly `len` bytes: what the last completed write put
///   there, or zeroes for never-written, trimmed or zeroed bytes.
/// - A write or zero that returns `Ok` is visible to every later read from
///   any caller; one that returns `Err` may have been partly applied only
///   where the error says the device is broken (`Io`), never silently.
/// - `flush` makes every write that completed before it durable.
/// - `extents` returns a non-empty run of contiguous extents starting at
///   `offset` and covering a prefix of `[offset, offset + len)`.
///
/// Calls may run concurrently; the device orders nothing between calls that
/// are in flight at the same time, as a disk would.
#[async_trait]
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Size, limits and capabilities. Cheap; may change only through an
    /// explicit resize of the device.
    fn info(&self) -> DeviceInfo;

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes>;

    /// Writes `data` at `offset`.
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Discards `[offset, offset + len)`; it then reads as zeroes.
    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;

    /// Describes the allocation of a prefix of `[offset, offset + len)`.
    ///
    /// The default reports one data extent: correct for any device, merely
    /// uninformative.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info(), Op::Extents, offset, len)?;
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }

    /// Hints that `[offset, offset + len)` will be read soon. The default
    /// does nothing; read-ahead and cache layers fetch the range.
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.info(), Op::Prefetch, offset, len)
    }
}

/// Checks that `[offset, offset + len)` lies within the device, and that a
/// mutating operation is not sent to a read-only device.
pub fn check_range(info: &DeviceInfo, op: Op, offset: u64, len: u64) -> Result<()> {
    if info.caps.read_only && matches!(op, Op::Write | Op::Trim | Op::WriteZeroes) {
        return Err(BlockError::ReadOnly { op });
    }
    match offset.checked_add(len) {
        Some(end) if end <= info.size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            op,
            offset,
            len,
            size: info.size,
        }),
    }
}

macro_rules! forward_block_device {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<D: BlockDevice + ?Sized> BlockDevice for $ptr<D> {
            fn info(&self) -> DeviceInfo {
                (**self).info()
            }
            async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
                (**self).read(offset, len).await
            }
            async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
                (**self).write(offset, data, flags).await
            }
            async fn flush(&self) -> Result<()> {
                (**self).flush().await
            }
            async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
                (**self).trim(offset, len, flags).await
            }
            async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
                (**self).write_zeroes(offset, len, flags).await
            }
            async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
                (**self).extents(offset, len).await
            }
            async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
                (**self).prefetch(offset, len).await
            }
        }
    )*};
}

forward_block_device!(Arc, Box);

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64, read_only: bool) -> DeviceInfo {
        DeviceInfo {
            size,
            block_sizes: BlockSizes::DEFAULT,
            caps: Capabilities {
                read_only,
                ..Capabilities::ALL
            },
        }
    }

    #[test]
    fn range_checks_reject_overflow_and_past_end() {
        let i = info(1000, false);
        assert!(check_range(&i, Op::Read, 0, 1000).is_ok());
        assert!(check_range(&i, Op::Read, 1000, 0).is_ok());
        assert!(matches!(
            check_range(&i, Op::Read, 999, 2),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&i, Op::Write, u64::MAX, 2),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn read_only_refuses_mutations_but_not_reads() {
        let i = info(1000, true);
        assert!(check_range(&i, Op::Read, 0, 10).is_ok());
        assert!(check_range(&i, Op::Flush, 0, 0).is_ok());
        for op in [Op::Write, Op::Trim, Op::WriteZeroes] {
            assert!(matches!(
                check_range(&i, op, 0, 10),
                Err(BlockError::ReadOnly { .. })
            ));
        }
    }
}
