//! ferry's edge cache: fixed-size chunks of volume data, encrypted at rest,
//! deduplicated by content signature, indexed in RocksDB, and bounded by an
//! elastic capacity with scan-resistant eviction.
//!
//! - [`Cache`] ([`store`]): the cache itself, a synchronous thread-safe API
//!   over the pieces below.
//! - [`CachedDevice`] ([`device`]): the `blockcore` layer that puts a cache
//!   in front of any block device.
//! - [`seal`]: content signatures and per-chunk authenticated encryption,
//!   with the on-disk slot record format.
//! - [`slots`]: the data file of fixed-size slots.
//! - [`index`]: the RocksDB index (signature -> slot, (volume, chunk) ->
//!   signature, volumes).
//! - [`policy`]: the eviction policy (S3-FIFO with pinning and resize).
//! - [`inspect`]: offline inspection and verification of a cache directory.

pub mod device;
pub mod index;
pub mod inspect;
pub mod policy;
pub mod seal;
pub mod slots;
pub mod store;

pub use device::{CachedDevice, CachedDeviceStats, EpochSnapshot, WriteMode};
pub use store::{Cache, CacheConfig, CacheError, CacheStats, PutOutcome, VerifyReport, Volume};
