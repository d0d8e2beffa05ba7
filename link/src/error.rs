//! [`LinkError`]: everything that ends a request or a connection of the
//! link, and its one mapping to a wire [`ErrorCode`].

use std::sync::Arc;
use std::time::Duration;

use crate::proto::{ErrorCode, ProtoError};

/// Errors of the link. Cloneable, so one failure can complete many waiters.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket (or TLS) failed.
    #[error("link I/O: {0}")]
    Io(Arc<std::io::Error>),
    /// The peer broke the protocol (or the stream is corrupt).
    #[error("link protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("the link is closed")]
    Closed,
    #[error("link handshake: {0}")]
    Handshake(String),
    /// The peer's pre-shared-key proof did not verify.
    #[error("the peer does not hold the pre-shared key")]
    AuthFailed,
    /// A protocol version or feature this end does not speak.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A message that makes no sense where it came.
    #[error("the peer answered out of protocol: {0}")]
    Unexpected(String),
    /// The peer answered a request (or the handshake) with an error.
    #[error("the peer refused: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Nothing at all arrived for this long: the link is dead.
    #[error("no byte arrived from the peer for {0:?}")]
    Silent(Duration),
    /// The origin's volume is not the one this edge attached to.
    #[error("the volume changed at the origin: it was {was}, it is now {now}")]
    VolumeChanged { was: String, now: String },
    /// This edge detached from the volume: the session is over.
    #[error("the edge detached from the volume")]
    Detached,
}

impl From<std::io::Error> for LinkError {
    fn from(e: std::io::Error) -> Self {
        LinkError::Io(Arc::new(e))
    }
}

impl LinkError {
    /// The code this error is reported to the peer with, when it is.
    pub fn code(&self) -> ErrorCode {
        match self {
            LinkError::Proto(_) | LinkError::Unexpected(_) | LinkError::Handshake(_) => {
                ErrorCode::Protocol
            }
            LinkError::AuthFailed => ErrorCode::AuthFailed,
            LinkError::Unsupported(_) => ErrorCode::Unsupported,
            LinkError::Refused { code, .. } => *code,
            LinkError::Detached => ErrorCode::NotAttached,
            LinkError::Io(_)
            | LinkError::Closed
            | LinkError::Timeout(_)
            | LinkError::Silent(_)
            | LinkError::VolumeChanged { .. } => ErrorCode::Io,
        }
    }
}
