//! The edge-origin link protocol as a pure, sans-IO layer: no sockets, no
//! runtime, no clocks (callers pass times in, e.g. [`Message::Heartbeat`]).
//!
//! One TCP (+TLS) connection carries many requests at once. Every message
//! travels in one frame:
//!
//! ```text
//!  0       4      5       6       7          8                16
//!  ┌───────┬──────┬───────┬───────┬──────────┬────────────────┬─────────────┐
//!  │ len   │ kind │ flags │ class │ reserved │ id             │ payload ... │
//!  │ u32   │ u8   │ u8    │ u8    │ u8 = 0   │ u64            │ len - 12    │
//!  └───────┴──────┴───────┴───────┴──────────┴────────────────┴─────────────┘
//!   len counts the bytes after itself (12 + payload); big-endian throughout.
//!   flags bit 0: the payload is one zstd frame (ReadData, Push, WriteBatch).
//!   class 0 demand, 1 background; id 0 for unsolicited frames.
//! ```
//!
//! A session, edge on the left:
//!
//! ```text
//!  Hello{Edge, nonce_e}        ──>   <── Hello{Origin, nonce_o}
//!  Auth{proof(Edge, e, o)}     ──>   <── Auth{proof(Origin, o, e)}
//!  Attach{volume, ...}         ──>   <── Attached{size, ..., next_seq, resume_part}
//!  Credit{window}              <──>                     (background credit)
//!  Read{off, len}     id 7     ──>   <── ReadData{off, as_of, data}  id 7
//!  Prefetch{ranges}   id 8     ──>   <── Push ... Push, PrefetchDone id 8
//!  Extents{off, len}  id 9     ──>   <── ExtentMap{off, [(len, flags)...]} id 9
//!  Sign{off, len, block} id 10 ──>   <── ReadSignatures{off, block, [sig...]} id 10
//!  WriteBatch{seq, part, ...}  ──>   (background, 64 KiB parts)
//!                              <──   Delivered{bytes, nanos}  (as they arrive)
//!                              <──   BatchAck{seq}          (once applied)
//!  Heartbeat{nanos}            ──>   <── HeartbeatAck{nanos}
//! ```
//!
//! The pieces:
//!
//! - [`message`]: [`Message`], its payload formats and limits, kind codes.
//! - [`frame`]: the frame header, [`Encoder`] (with zstd compression when
//!   it pays) and the incremental [`Decoder`].
//! - [`auth`]: the pre-shared-key proof exchanged in [`Message::Auth`].
//! - [`sched`]: the sender's [`Scheduler`] (demand before background,
//!   background cut into small frames and held to the peer's credit) and
//!   the receiver's [`CreditGranter`].
//!
//! Background frames (pushes, write batches) count against two limits:
//! the receiver's credit (its memory) and the sender's congestion window
//! (`crate::cc`: the queue in the path), fed by `Delivered`.
//!
//! Any [`ProtoError`] from decoding means the peer broke the protocol (or
//! the stream is corrupt): the link is closed, there is no resync.

pub mod auth;
pub mod frame;
pub mod message;
pub mod sched;

#[cfg(test)]
mod tests;

pub use auth::{auth_proof, verify_auth_proof, AUTH_CONTEXT};
pub use frame::{Class, CompressOptions, Decoder, Encoder, FrameHeader, FLAG_COMPRESSED};
pub use message::{
    extent_flags, extent_kind, Disposition, ErrorCode, Kind, Message, Role, WriteEntry,
    EXTENT_FLAGS, EXTENT_HOLE, EXTENT_ZERO,
};
pub use sched::{
    split_batch, CreditGranter, Scheduler, SchedulerConfig, Transmit, DEFAULT_BACKGROUND_DATA,
    DEFAULT_WINDOW, DEMAND_DATA_CUT, WRITE_PART_MAX,
};

/// The protocol version sent in [`Message::Hello`].
///
/// 2: `ReadData` and `Push` carry `as_of`, `Attached` carries
/// `resume_part`, `Delivered` feeds the congestion controller, and write
/// batches travel as background frames.
///
/// 3: the allocation map (`Extents`, `ExtentMap`) and `Release` (a
/// detach that records a migration's cut-over or its move back), with
/// the `Migrated` error. A version 2 peer would close the link on the
/// first of these, mid-migration; the version makes the mismatch a clear
/// refusal at the handshake instead.
///
/// 4: `Sign` (the signatures of the origin's image, piece by piece), which
/// a move back ships and verifies by.
///
/// 5: `Attached` carries flags (`local_writes`: a clone whose writes the
/// origin does not keep), which an older edge would not know to honour.
///
/// 6: `Profile`/`ProfileStored` (boot profiles the origin keeps) and
/// `Plan` (the pushes planned from them).
pub const PROTOCOL_VERSION: u16 = 6;

/// Bytes in a frame header, the `len` field included.
pub const HEADER_LEN: usize = 16;

/// The most data one message carries ([`Message::ReadData`],
/// [`Message::Push`], one [`WriteEntry::Data`]).
pub const MAX_DATA_LEN: usize = 16 << 20;

/// The largest payload (as sent, and after decompression): a full
/// [`MAX_DATA_LEN`] block plus room for the message's own fields, so a
/// 16 MiB read fits in one frame.
pub const MAX_PAYLOAD_LEN: usize = MAX_DATA_LEN + 4096;

/// The longest string field, in bytes of UTF-8.
pub const MAX_STRING_LEN: usize = 4096;

/// The most signatures in one [`Message::ReadSignatures`] (a 16 MiB read of
/// 256-byte chunks).
pub const MAX_SIGNATURES: usize = 1 << 16;

/// The smallest piece [`Message::Sign`] may ask signatures of: it bounds
/// the reply to `MAX_DATA_LEN / 512` signatures, below [`MAX_SIGNATURES`].
pub const MIN_SIGN_BLOCK: u32 = 512;

/// The most ranges in one [`Message::Prefetch`].
pub const MAX_PREFETCH_RANGES: usize = 1 << 16;

/// The most entries in one [`Message::WriteBatch`] frame.
pub const MAX_WRITE_ENTRIES: usize = 1 << 16;

/// The most runs in one [`Message::ExtentMap`] (36 KiB encoded); a map
/// with more stops short and the edge asks again from where it ended.
pub const MAX_EXTENTS: usize = 4096;

/// Everything that can be wrong with a frame, a message, or the peer's use
/// of credit. Decoding errors are fatal to the link.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The `len` field cannot even hold the rest of the header.
    #[error("frame length {len} is shorter than the 12 header bytes it must cover")]
    FrameTooShort { len: u32 },
    /// The `len` field (or an encoded payload) is over the limit; raised as
    /// soon as the four length bytes are in, before any allocation.
    #[error("frame length {len} exceeds the limit of {max}")]
    FrameTooLarge { len: u64, max: u64 },
    /// No message has this kind code.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// A flag bit other than COMPRESSED is set.
    #[error("frame flags {0:#04x} set reserved bits")]
    BadFlags(u8),
    /// COMPRESSED on a kind that never carries bulk data.
    #[error("{kind:?} frames may not be compressed")]
    CompressionNotAllowed { kind: Kind },
    /// The class byte is neither demand (0) nor background (1).
    #[error("unknown frame class {0}")]
    BadClass(u8),
    /// The reserved header byte is not 0.
    #[error("reserved header byte is {0:#04x}, not 0")]
    BadReserved(u8),
    /// The payload ends inside a field (or a count promises more items than
    /// the bytes left could hold).
    #[error("{kind:?} payload ends inside field `{field}`")]
    Truncated { kind: Kind, field: &'static str },
    /// The payload goes on after the message's last field.
    #[error("{kind:?} payload has {extra} trailing bytes")]
    TrailingBytes { kind: Kind, extra: usize },
    /// A string, vector or data field is over its limit.
    #[error("{kind:?} field `{field}` has length {len}, over the limit of {max}")]
    TooLong {
        kind: Kind,
        field: &'static str,
        len: u64,
        max: u64,
    },
    /// A string field is not UTF-8.
    #[error("{kind:?} field `{field}` is not UTF-8")]
    BadUtf8 { kind: Kind, field: &'static str },
    /// An enumerated field (bool, role, entry tag) has no meaning for this
    /// value.
    #[error("{kind:?} field `{field}` has invalid value {value}")]
    BadValue {
        kind: Kind,
        field: &'static str,
        value: u64,
    },
    /// `offset + len` of a range does not fit in a u64.
    #[error("{kind:?} range {offset} + {len} overflows")]
    RangeOverflow { kind: Kind, offset: u64, len: u64 },
    /// A COMPRESSED payload is not exactly one zstd frame declaring its
    /// content size, or does not decompress to that size.
    #[error("bad compressed payload: {reason}")]
    BadCompression { reason: &'static str },
    /// A COMPRESSED payload would inflate past the payload limit (a zip
    /// bomb); raised from the zstd frame header, before decompressing.
    #[error("compressed payload declares {size} bytes, over the limit of {max}")]
    InflatesTooLarge { size: u64, max: u64 },
    /// The scheduler could only queue this write batch by splitting it, and
    /// only whole batches (part 0, last) can be split.
    #[error("write batch {seq} part {part} is over the frame limit and is not a whole batch")]
    UnsplittableBatch { seq: u64, part: u32 },
    /// A background frame the scheduler cannot split is larger than its
    /// background frame limit, so it might never fit the peer's window.
    #[error("background {kind:?} frame of {len} bytes is over the limit of {max}")]
    BackgroundFrameTooLarge { kind: Kind, len: u64, max: u64 },
    /// A `Delivered` report that goes backwards or counts bytes never sent.
    #[error("peer reports {reported} background bytes delivered; {sent} were sent, {delivered} reported before")]
    BadDelivered {
        reported: u64,
        sent: u64,
        delivered: u64,
    },
    /// The peer sent more background bytes than it was granted.
    #[error("peer sent {received} background bytes against {granted} granted")]
    CreditExceeded { granted: u64, received: u64 },
}
