//! ferry's NBD client: the same sans-IO split as the server.
//!
//! - [`handshake`]: [`ClientHandshake`], the fixed newstyle client side
//!   (structured replies, `base:allocation`, `OPT_GO` with block sizes,
//!   `OPT_EXPORT_NAME` fallback), fed bytes and polled for bytes.
//! - [`transmission`]: [`ClientTransmission`], request encoding and reply
//!   decoding (simple and structured) matched by cookie.
//! - [`uri`]: `nbd://` and `nbd+unix://` URIs.
//! - [`NbdDevice`]: the tokio shell, a [`blockcore::BlockDevice`] over one
//!   connection with many requests in flight.

mod device;
pub mod handshake;
pub mod transmission;
pub mod uri;

#[cfg(test)]
mod tests;

pub use device::{NbdConfig, NbdConnectError, NbdDevice, DEFAULT_MAX_REQUEST};
pub use handshake::{
    ClientHandshake, ClientHandshakeError, ClientNegotiated, ClientOptions, ClientStep,
    ServerBlockSizes,
};
pub use transmission::{
    ClientTransmission, Completion, Outcome, Progress, ProtocolError, ReplyError, Request,
};
pub use uri::{NbdUri, Transport, UriError};
