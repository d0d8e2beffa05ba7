//! The edge: a volume of an origin, presented locally, reading through the
//! encrypted cache and absorbing writes in the journal.
//!
//! ```text
//!   guest (NBD, iSCSI) ──> EdgeDevice                     (device.rs: tasks)
//!                           └─ EdgeVolume                  (volume.rs: the data path)
//!                               ├─ journal::Journal        (write-behind, read-your-writes)
//!                               └─ cache::CachedDevice
//!                                   └─ RemoteDevice ──> LinkClient   (client.rs: tokio shell)
//!                                                        └─ link::session::EdgeSession
//! ```
//!
//! A write on the edge: the guest's NBD or iSCSI request reaches
//! [`EdgeDevice`], whose [`EdgeVolume`] appends it to the journal (and
//! syncs it for FUA or FLUSH); the ship task cuts it into a batch when a
//! flush, the RPO or the batch size says so, and hands it to the
//! [`LinkClient`], whose session streams it to the origin in background
//! frames; the origin applies it (`origin` crate) and acknowledges; the
//! applied task drops the batch's chunks from the cache and lets the
//! journal forget it.

pub mod client;
#[cfg(feature = "device")]
pub mod device;
pub mod migrate;
pub mod volume;

pub use client::{
    link_block_error, EdgeLinkConfig, LinkClient, LinkStatus, Push, PushReceiver, RemoteDevice,
    SignatureStore,
};
#[cfg(feature = "device")]
pub use device::{
    cache_volume_name, EdgeConfig, EdgeDevice, EdgeStatus, MigrateError, PrefetchStatus,
};
pub use link::session::{Attachment, ReadReply};
pub use volume::{
    journal_block_error, AllocationWindow, CopyOutcome, EdgeVolume, Fetched, MirrorSource,
    ReadThrough,
};
