//! ferry's edge cache: fixed-size chunks of volume data, encrypted at rest,
//! deduplicated by content signature, indexed in RocksDB, and bounded by an
//! elastic capacity with scan-resistant eviction.
//!
//! Being built up (see the cache issue); the pieces so far:
//! - [`seal`]: content signatures and per-chunk authenticated encryption,
//!   with the on-disk slot record format.
//! - [`policy`]: the eviction policy (S3-FIFO with pinning and resize).
//! - next: the RocksDB signature/mapping index (feature `index`), the slot
//!   store and the `CachedDevice` layer.

pub mod policy;
pub mod seal;
