//! ferry's NBD server.
//!
//! - [`proto`]: the protocol as a sans-IO codec: handshake state machine,
//!   request decoder, reply encoders and request validation. No sockets;
//!   fuzzed directly (see `fuzz/`).
//! - [`Server`]: the thin tokio shell that accepts TCP, Unix and TLS clients
//!   and runs requests against `blockcore` devices out of order.
//! - [`client`]: the other side: a sans-IO client codec and
//!   [`client::NbdDevice`], a `blockcore` device backed by a remote export.

pub mod client;
pub mod proto;
mod server;
mod tls;

pub use proto::TlsMode;
pub use server::{Export, Server, ServerConfig, ServerError, MAX_PAYLOAD};
pub use tls::load_tls_config;
