//! The link's sessions as state machines: [`EdgeSession`] (across
//! connections) and [`OriginSession`] (one connection), over a shared
//! per-connection transport (framing, scheduling, credit, congestion
//! control).
//!
//! Both are sans-IO in quinn-proto's shape: the shell feeds them bytes
//! (`handle_input`), time (`handle_timeout` at `poll_timeout`) and the
//! completions of what they asked for, and polls them for frames to write
//! (`poll_transmit`) and for events or operations (`poll_event`,
//! `poll_op`). Nothing here blocks, sleeps or touches a socket, so the
//! simulator (`sim/`) drives both ends in virtual time exactly as the tokio
//! shells do in real time.

pub mod edge;
pub mod origin;
mod transport;

#[cfg(test)]
mod tests;

pub use edge::{
    Attachment, EdgeEvent, EdgeLinkStats, EdgeSession, EdgeSessionConfig, ReadReply, RequestId,
};
pub use origin::{
    AttachGrant, OriginOp, OriginSession, OriginSessionConfig, OriginSessionStats, PartialBatch,
    ReadAnswer, Refusal,
};
pub use transport::TransportStats;

/// Mistakes this project made or could make, reintroduced on purpose so the
/// simulator's tests can show it finds each of them. All false in every
/// real configuration; nothing outside the simulator sets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mistakes {
    /// The edge answers FLUSH before the journal's sync.
    pub flush_before_sync: bool,
    /// The edge lets the journal forget a batch once it is sent, before
    /// the origin acknowledged it.
    pub ack_before_apply: bool,
    /// The origin applies a batch it had already applied (a resend after
    /// a reconnection) again.
    pub apply_twice: bool,
    /// The first version's link: batches as demand frames of up to 16
    /// MiB, no congestion control, and the link judged alive only by
    /// heartbeat replies (which then queue behind the batches).
    pub heartbeat_liveness: bool,
}
