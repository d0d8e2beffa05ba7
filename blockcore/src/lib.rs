//! `blockcore`: the one block-device abstraction that every ferry backend,
//! layer and front end speaks.
//!
//! ```text
//!   NBD server ──┐                      ┌── FileDevice (io_uring | pread/pwrite)
//!   iSCSI target ┼── Arc<dyn BlockDevice> ─┤
//!   edge / tools ┘      │                 └── MemDevice (sparse, in memory)
//!                       │
//!            layers wrap any device and are devices themselves:
//!            ReadAhead<D>, Stats<D>, LocalOverlay<D>, CowDevice
//! ```
//!
//! Buffers are owned (`bytes::Bytes`): a read returns the bytes it produced,
//! a write hands its buffer over. That lets an io_uring engine keep the
//! buffer alive until the kernel completes, lets layers return slices of
//! their own buffers without copying, and lets the portable engine move the
//! buffer into a blocking thread.
//!
//! Every device validates its own ranges with [`check_range`]; front ends
//! validate protocol rules (alignment, request size) before calling in, and
//! map [`BlockError`] to their wire status in one exhaustive `match`.

mod device;
mod entry;
mod error;
pub mod file;
pub mod layers;
pub mod mem;
pub mod storage;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use device::{
    check_range, BlockDevice, BlockSizes, Capabilities, DeviceInfo, Extent, ExtentKind, Op,
    WriteFlags, ZeroFlags,
};
pub use entry::WriteEntry;
pub use error::{BlockError, Result};
pub use file::{FileDevice, FileEngine, OpenOptions};
pub use layers::cow::CowDevice;
pub use layers::overlay::{LocalOverlay, LocalRanges};
pub use layers::readahead::{ReadAhead, ReadAheadConfig, ReadAheadStats};
pub use layers::stats::{OpStats, Stats, StatsSnapshot};
pub use mem::MemDevice;
