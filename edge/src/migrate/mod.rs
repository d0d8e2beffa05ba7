//! Migration: the volume's local persistent storage, filled in the
//! background while the guest runs, then served alone after cut-over, and
//! the lifecycle that orders it all.
//!
//! - [`lifecycle`] (its own crate, pure): the stages, which command may
//!   move a volume on, and the persisted record with the progress and
//!   dirty maps.
//! - [`local`]: [`LocalCopy`], the copy and the rules that keep it equal
//!   to what the guest sees.
//!
//! The copy itself runs in [`EdgeDevice`](crate::EdgeDevice)'s mirror
//! task; [`EdgeVolume`](crate::EdgeVolume) routes reads and writes.

pub mod local;

pub use lifecycle::{Bitmap, Command, MigrationRecord, RecordError, Refusal, Stage};
pub use local::{
    local_block_error, CopySource, LocalCopy, LocalError, LocalStatus, NewCopy, MIRROR_CHUNK,
};

#[cfg(test)]
mod tests;
