//! A volume's lifecycle, without I/O: its own crate so the fuzz targets
//! and the simulator take it without the edge's runtime.
//!
//! - [`stage`]: the stages a volume goes through and which command may
//!   move it on ([`Stage::check`]); a refusal explains itself.
//! - [`record`]: the edge's persisted migration record (stage, settings,
//!   the progress map of what the local copy holds and the dirty map of
//!   what changed since cut-over), checksummed, decoded defensively.
//!
//! The edge's `migrate` module does the I/O: the local copy, the copy
//! task, the cut-over.

pub mod record;
pub mod stage;

pub use record::{Bitmap, MigrationRecord, RecordError, MAX_CHUNKS, MAX_TARGET_LEN};
pub use stage::{Command, Refusal, Stage};
