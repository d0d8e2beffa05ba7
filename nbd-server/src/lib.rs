//! NBD server.
pub mod proto;
