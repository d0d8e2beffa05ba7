//! Layers that wrap any [`BlockDevice`](crate::BlockDevice), in the spirit of nbdkit filters.
pub mod cow;
pub mod overlay;
pub mod readahead;
pub mod stats;
