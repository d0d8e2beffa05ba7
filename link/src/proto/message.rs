//! The messages of the link, their kind codes and payload formats.
//!
//! Each payload is a fixed sequence of big-endian fields; every
//! variable-length field carries its own length and has a limit
//! ([`MAX_STRING_LEN`], [`MAX_DATA_LEN`], ...), and a payload must end
//! exactly after its last field. The encoding is canonical (bools are 0 or
//! 1, enums have one code each), so a decoded message re-encodes to the
//! same bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use blockcore::ExtentKind;

use super::{
    ProtoError, MAX_DATA_LEN, MAX_EXTENTS, MAX_PREFETCH_RANGES, MAX_SIGNATURES, MAX_STRING_LEN,
    MAX_WRITE_ENTRIES, MIN_SIGN_BLOCK,
};

/// A message's kind: the `kind` byte of its frame header.
///
/// The codes are part of the protocol and never change meaning:
///
/// | code | kind | code | kind |
/// |---|---|---|---|
/// | `0x01` | `Hello` | `0x11` | `ReadData` |
/// | `0x02` | `Auth` | `0x12` | `ReadSignatures` |
/// | `0x03` | `Attach` | `0x13` | `Prefetch` |
/// | `0x04` | `Attached` | `0x14` | `Push` |
/// | `0x05` | `Detach` | `0x15` | `PrefetchDone` |
/// | `0x06` | `Detached` | `0x16` | `Extents` |
/// | `0x07` | `Release` | `0x17` | `ExtentMap` |
/// | `0x18` | `Sign` | `0x19` | `Profile` |
/// | `0x1a` | `ProfileStored` | `0x1b` | `Plan` |
/// | `0x10` | `Read` | `0x20` | `WriteBatch` |
/// | `0x21` | `BatchAck` | `0x30` | `Credit` |
/// | `0x31` | `Heartbeat` | `0x32` | `HeartbeatAck` |
/// | `0x33` | `Delivered` | `0x3f` | `Error` |
///
/// `0x00` is never a kind, so a zeroed header is rejected.
/// `Attached`'s flag: the origin keeps none of the volume's writes.
const ATTACHED_LOCAL_WRITES: u8 = 0x01;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Hello,
    Auth,
    Attach,
    Attached,
    Detach,
    Detached,
    Release,
    Read,
    ReadData,
    ReadSignatures,
    Prefetch,
    Push,
    PrefetchDone,
    Extents,
    ExtentMap,
    Sign,
    Profile,
    ProfileStored,
    Plan,
    WriteBatch,
    BatchAck,
    Credit,
    Heartbeat,
    HeartbeatAck,
    Delivered,
    Error,
}

impl Kind {
    /// Every kind, for tests and tools.
    pub const ALL: [Kind; 26] = [
        Kind::Hello,
        Kind::Auth,
        Kind::Attach,
        Kind::Attached,
        Kind::Detach,
        Kind::Detached,
        Kind::Release,
        Kind::Read,
        Kind::ReadData,
        Kind::ReadSignatures,
        Kind::Prefetch,
        Kind::Push,
        Kind::PrefetchDone,
        Kind::Extents,
        Kind::ExtentMap,
        Kind::Sign,
        Kind::Profile,
        Kind::ProfileStored,
        Kind::Plan,
        Kind::WriteBatch,
        Kind::BatchAck,
        Kind::Credit,
        Kind::Heartbeat,
        Kind::HeartbeatAck,
        Kind::Delivered,
        Kind::Error,
    ];

    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Kind::Hello => 0x01,
            Kind::Auth => 0x02,
            Kind::Attach => 0x03,
            Kind::Attached => 0x04,
            Kind::Detach => 0x05,
            Kind::Detached => 0x06,
            Kind::Release => 0x07,
            Kind::Read => 0x10,
            Kind::ReadData => 0x11,
            Kind::ReadSignatures => 0x12,
            Kind::Prefetch => 0x13,
            Kind::Push => 0x14,
            Kind::PrefetchDone => 0x15,
            Kind::Extents => 0x16,
            Kind::ExtentMap => 0x17,
            Kind::Sign => 0x18,
            Kind::Profile => 0x19,
            Kind::ProfileStored => 0x1a,
            Kind::Plan => 0x1b,
            Kind::WriteBatch => 0x20,
            Kind::BatchAck => 0x21,
            Kind::Credit => 0x30,
            Kind::Heartbeat => 0x31,
            Kind::HeartbeatAck => 0x32,
            Kind::Delivered => 0x33,
            Kind::Error => 0x3f,
        }
    }

    /// The inverse of [`Kind::code`].
    pub fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            0x01 => Kind::Hello,
            0x02 => Kind::Auth,
            0x03 => Kind::Attach,
            0x04 => Kind::Attached,
            0x05 => Kind::Detach,
            0x06 => Kind::Detached,
            0x07 => Kind::Release,
            0x10 => Kind::Read,
            0x11 => Kind::ReadData,
            0x12 => Kind::ReadSignatures,
            0x13 => Kind::Prefetch,
            0x14 => Kind::Push,
            0x15 => Kind::PrefetchDone,
            0x16 => Kind::Extents,
            0x17 => Kind::ExtentMap,
            0x18 => Kind::Sign,
            0x19 => Kind::Profile,
            0x1a => Kind::ProfileStored,
            0x1b => Kind::Plan,
            0x20 => Kind::WriteBatch,
            0x21 => Kind::BatchAck,
            0x30 => Kind::Credit,
            0x31 => Kind::Heartbeat,
            0x32 => Kind::HeartbeatAck,
            0x33 => Kind::Delivered,
            0x3f => Kind::Error,
            _ => return None,
        })
    }

    /// Whether frames of this kind may be compressed. Only the kinds that
    /// carry disk data are: compressing control messages gains nothing, and
    /// refusing it keeps zstd away from the unauthenticated handshake.
    pub fn compressible(self) -> bool {
        matches!(self, Kind::ReadData | Kind::Push | Kind::WriteBatch)
    }
}

/// Which end of the link a peer is. Bound into the auth proof so a proof
/// cannot be reflected back to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Next to the VM; serves the disk and caches it.
    Edge,
    /// Where the disk lives.
    Origin,
}

impl Role {
    /// The wire code (also the role byte of the auth proof).
    pub fn code(self) -> u8 {
        match self {
            Role::Edge => 1,
            Role::Origin => 2,
        }
    }

    /// The inverse of [`Role::code`].
    pub fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Edge),
            2 => Some(Role::Origin),
            _ => None,
        }
    }
}

/// Why a request failed, carried by [`Message::Error`].
///
/// Codes are stable. Unknown codes decode to [`ErrorCode::Unknown`] rather
/// than failing the frame: a newer peer's new error still fails just the
/// request it answers, not the whole link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: the origin has no volume of that name.
    NoSuchVolume,
    /// 2: another edge holds the volume.
    VolumeBusy,
    /// 3: the origin's storage failed.
    Io,
    /// 4: a range past the end of the volume.
    OutOfRange,
    /// 5: the peer broke the protocol; the link is closed after this.
    Protocol,
    /// 6: the auth proof did not verify.
    AuthFailed,
    /// 7: a version, message or feature this peer does not support.
    Unsupported,
    /// 8: a volume request before `Attach` (or after `Detach`), or on a
    /// connection that no longer holds the volume.
    NotAttached,
    /// 9: the peer is shutting down; retry elsewhere or later.
    ShuttingDown,
    /// 10: an operator fenced this edge off the volume (force-released
    /// it): it may not attach it again until unfenced. Not worth a retry.
    Fenced,
    /// 11: the volume was migrated to (cut over to) another edge, which
    /// serves it from its own copy: no other edge may attach it until it
    /// is moved back (`Release { Home }` from that edge) or an operator
    /// force-releases it. Not worth a retry.
    Migrated,
    /// Any other code, kept as sent (never one of the codes above: those
    /// decode to their own variants).
    Unknown(u16),
}

impl ErrorCode {
    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::NoSuchVolume => 1,
            ErrorCode::VolumeBusy => 2,
            ErrorCode::Io => 3,
            ErrorCode::OutOfRange => 4,
            ErrorCode::Protocol => 5,
            ErrorCode::AuthFailed => 6,
            ErrorCode::Unsupported => 7,
            ErrorCode::NotAttached => 8,
            ErrorCode::ShuttingDown => 9,
            ErrorCode::Fenced => 10,
            ErrorCode::Migrated => 11,
            ErrorCode::Unknown(code) => code,
        }
    }

    /// The inverse of [`ErrorCode::code`]; total, so decoding never fails
    /// on the code.
    pub fn from_code(code: u16) -> ErrorCode {
        match code {
            1 => ErrorCode::NoSuchVolume,
            2 => ErrorCode::VolumeBusy,
            3 => ErrorCode::Io,
            4 => ErrorCode::OutOfRange,
            5 => ErrorCode::Protocol,
            6 => ErrorCode::AuthFailed,
            7 => ErrorCode::Unsupported,
            8 => ErrorCode::NotAttached,
            9 => ErrorCode::ShuttingDown,
            10 => ErrorCode::Fenced,
            11 => ErrorCode::Migrated,
            other => ErrorCode::Unknown(other),
        }
    }
}

/// What a [`Message::Release`] leaves behind at the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// 1: the edge now holds the whole volume and serves it alone (a
    /// migration's cut-over): the origin records, durably, that the volume
    /// was migrated to this edge and refuses every other edge's attach
    /// ([`ErrorCode::Migrated`]) until the volume comes home.
    CutOver,
    /// 2: the volume is home again (a move back is complete): the origin
    /// clears the record. Only the edge it was migrated to may send it
    /// (or any edge, when there is no record).
    Home,
}

impl Disposition {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Disposition::CutOver => 1,
            Disposition::Home => 2,
        }
    }

    /// The inverse of [`Disposition::code`].
    pub fn from_code(code: u8) -> Option<Disposition> {
        match code {
            1 => Some(Disposition::CutOver),
            2 => Some(Disposition::Home),
            _ => None,
        }
    }
}

/// Flag of a run in a [`Message::ExtentMap`]: not allocated (NBD's
/// `NBD_STATE_HOLE`).
pub const EXTENT_HOLE: u8 = 1;
/// Flag of a run in a [`Message::ExtentMap`]: reads as zeroes (NBD's
/// `NBD_STATE_ZERO`).
pub const EXTENT_ZERO: u8 = 2;
/// Every flag a run may carry; the other bits are reserved (and refused).
pub const EXTENT_FLAGS: u8 = EXTENT_HOLE | EXTENT_ZERO;

/// The flags of an [`ExtentMap`](Message::ExtentMap) run of this kind, as
/// NBD's `base:allocation` context reports it.
pub fn extent_flags(kind: ExtentKind) -> u8 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero => EXTENT_ZERO,
        ExtentKind::Hole => EXTENT_HOLE | EXTENT_ZERO,
    }
}

/// The kind of a run with these flags. A hole not known to read as zero
/// is data (its bytes must be read); as NBD clients take it.
pub fn extent_kind(flags: u8) -> ExtentKind {
    match (flags & EXTENT_HOLE != 0, flags & EXTENT_ZERO != 0) {
        (true, true) => ExtentKind::Hole,
        (false, true) => ExtentKind::Zero,
        (_, false) => ExtentKind::Data,
    }
}

/// One change in a [`Message::WriteBatch`]: blockcore's, so the journal,
/// the link and the apply journal carry the same type.
pub use blockcore::WriteEntry;

// Format (WriteEntry): tag u8 (1 Data, 2 Zero), then
//   Data: offset u64 | data_len u32 | data
//   Zero: offset u64 | len u64
const ENTRY_DATA: u8 = 1;
const ENTRY_ZERO: u8 = 2;
/// Encoded bytes of a data entry besides its data.
pub(crate) const DATA_ENTRY_OVERHEAD: usize = 1 + 8 + 4;
/// Encoded bytes of a zero entry.
pub(crate) const ZERO_ENTRY_LEN: usize = 1 + 8 + 8;
/// Encoded bytes of a write batch besides its entries.
pub(crate) const WRITE_BATCH_OVERHEAD: usize = 8 + 4 + 1 + 4;
/// Encoded bytes of a `ReadData` or `Push` besides its data.
pub(crate) const DATA_MESSAGE_OVERHEAD: usize = 8 + 8 + 4;
/// Encoded bytes of one run of an `ExtentMap`.
const EXTENT_RUN_LEN: usize = 8 + 1;

/// Encoded bytes of one entry.
pub(crate) fn entry_encoded_len(e: &WriteEntry) -> usize {
    match e {
        WriteEntry::Data { data, .. } => DATA_ENTRY_OVERHEAD + data.len(),
        WriteEntry::Zero { .. } => ZERO_ENTRY_LEN,
    }
}

/// A message of the link. The frame's `id` ties replies to requests: a
/// reply carries its request's id; unsolicited frames carry 0.
///
/// Format: each variant's doc gives its payload, fields in order,
/// big-endian. `str` is `len u16 | UTF-8 bytes` (at most
/// [`MAX_STRING_LEN`]); `data` is `len u32 | bytes` (at most
/// [`MAX_DATA_LEN`]); `bool` is one byte, 0 or 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First frame each way. The receiver answers a version it cannot speak
    /// with `Error { Unsupported }` and closes.
    ///
    /// Format: `version u16 | role u8 (1 edge, 2 origin) | nonce [32]`.
    Hello {
        version: u16,
        role: Role,
        /// Fresh random bytes for this connection, bound into both proofs.
        nonce: [u8; 32],
    },
    /// Second frame each way: proves knowledge of the pre-shared key (see
    /// [`auth_proof`](super::auth_proof)). Nothing else is accepted before
    /// the peer's proof verifies.
    ///
    /// Format: `proof [32]`.
    Auth { proof: [u8; 32] },
    /// Edge → origin: serve `volume` to this edge. `resume_seq` is the first
    /// journal sequence the edge still holds unacknowledged (0 if none), so
    /// the origin can tell which batches it has already applied.
    ///
    /// Format: `volume str | edge_id str | resume_seq u64`.
    Attach {
        volume: String,
        edge_id: String,
        resume_seq: u64,
    },
    /// Origin → edge, answering `Attach`.
    ///
    /// Format: `size u64 | chunk_size u32 | group_size u32 | cache_key [32]
    /// | dedup_key [32] | volume_epoch u64 | next_seq u64 | resume_part u32
    /// | flags u8` (bit 0: `local_writes`; every other bit must be clear).
    Attached {
        /// Volume size in bytes.
        size: u64,
        /// Bytes per chunk, the unit of signatures and of the edge cache.
        chunk_size: u32,
        /// Chunks per group: the unit the origin pushes after a demand read.
        group_size: u32,
        /// This edge's cache master key: the cache derives its encryption
        /// key from it. Per edge, so one edge's key opens no other cache.
        cache_key: [u8; 32],
        /// The deployment's dedup key chunk signatures are keyed with: the
        /// same for every edge, so signatures mean the same everywhere.
        dedup_key: [u8; 32],
        /// Changes whenever the volume changed behind the edge's back (a
        /// restore, another writer): cached data of another epoch is stale.
        volume_epoch: u64,
        /// The write batch sequence the origin expects next.
        next_seq: u64,
        /// Parts of batch `next_seq` the origin already holds from this
        /// edge (an earlier connection ended mid-batch): shipping resumes
        /// at this part.
        resume_part: u32,
        /// The origin keeps none of this volume's writes (a clone with
        /// cloud persistence): the edge must keep them itself, and the
        /// origin refuses write batches.
        local_writes: bool,
    },
    /// Edge → origin: stop serving the volume. Format: empty.
    Detach,
    /// Origin → edge: detached; every batch received before `Detach` was
    /// answered (the edge sends `Detach` only once all of its batches were
    /// acknowledged). Format: empty.
    Detached,
    /// Edge → origin: like `Detach` (answered by `Detached` once every
    /// batch received before it was applied, or by `Error` with the
    /// volume still attached), and the origin records how the volume is
    /// left: migrated to this edge, or home again (see [`Disposition`]).
    ///
    /// Format: `disposition u8 (1 cut-over, 2 home)`.
    Release { disposition: Disposition },
    /// Edge → origin: read `len` bytes at `offset`. Answered by `ReadData`
    /// or, with `want_signatures`, by `ReadSignatures`.
    ///
    /// Format: `offset u64 | len u32 | want_signatures bool`.
    Read {
        offset: u64,
        len: u32,
        want_signatures: bool,
    },
    /// Origin → edge: the bytes at `offset`, read with every batch up to
    /// `as_of` applied. A reply may take several `ReadData` frames with the
    /// read's id, in offset order (the scheduler cuts large ones); the read
    /// is complete once they cover its range.
    ///
    /// Format: `offset u64 | as_of u64 | data`. Compressible.
    ReadData {
        offset: u64,
        as_of: u64,
        data: Bytes,
    },
    /// Origin → edge: the signature of every chunk overlapping the read
    /// (one per chunk, from the chunk holding `offset`). The edge serves
    /// the chunks it holds and asks for the rest with plain `Read`s.
    ///
    /// Format: `offset u64 | chunk_size u32 | count u32 | count × [32]`.
    ReadSignatures {
        /// Start of the first chunk.
        offset: u64,
        chunk_size: u32,
        sigs: Vec<[u8; 32]>,
    },
    /// Edge → origin: send these `(offset, len)` ranges in the background.
    /// Answered by `Push` frames with the prefetch's id, then
    /// `PrefetchDone`.
    ///
    /// Format: `count u32 | count × (offset u64 | len u32)`.
    Prefetch { ranges: Vec<(u64, u32)> },
    /// Origin → edge: data the edge did not ask for right now: a prefetch
    /// (id = the prefetch's id) or the rest of a group after a demand read
    /// (id 0). Sent in the background class.
    ///
    /// `as_of`: every batch up to it was applied when the data was read
    /// (some later ones may have been too, in part): the edge keeps the
    /// data only if no batch it has since seen applied touched the range.
    ///
    /// Format: `offset u64 | as_of u64 | data`. Compressible.
    Push {
        offset: u64,
        as_of: u64,
        data: Bytes,
    },
    /// Origin → edge: every `Push` of the prefetch with this id was sent.
    /// Format: empty.
    PrefetchDone,
    /// Edge → origin: how `[offset, offset + len)` is allocated (NBD's
    /// `base:allocation`). `len` is not 0. Answered by `ExtentMap`, which
    /// may cover only a prefix: the edge asks again from where it ended.
    ///
    /// Format: `offset u64 | len u64`.
    Extents { offset: u64, len: u64 },
    /// Origin → edge, answering `Extents`: consecutive runs from `offset`
    /// (the request's), each `(len, flags)`, flags [`EXTENT_HOLE`] and
    /// [`EXTENT_ZERO`]. At least one run and at most [`MAX_EXTENTS`];
    /// every `len` is non-zero. Together they cover at least one byte and
    /// never more than was asked.
    ///
    /// Format: `offset u64 | count u32 | count × (len u64 | flags u8)`.
    ExtentMap {
        offset: u64,
        extents: Vec<(u64, u8)>,
    },
    /// Edge → origin: the signature of every `block`-byte piece of
    /// `[offset, offset + len)` as the origin's image holds it now (the
    /// last piece may be short), keyed like chunk signatures. A move back
    /// compares them with its own copy's: only pieces that differ cross,
    /// and the whole image is verified without copying it back. Answered
    /// by `ReadSignatures` with `chunk_size` = `block`.
    ///
    /// Format: `offset u64 | len u32 | block u32`; `len` is 1 to
    /// [`MAX_DATA_LEN`], `block` at least 512.
    Sign { offset: u64, len: u32, block: u32 },
    /// Edge → origin: an access profile the edge recorded while the
    /// volume booted (the `prefetch` crate's encoding, opaque here); the
    /// origin keeps it with the volume and plans the pushes of later
    /// attaches from it. Answered by `ProfileStored`, or `Error`.
    ///
    /// Format: `data` (1 to [`MAX_DATA_LEN`] bytes).
    Profile { data: Bytes },
    /// Origin → edge: the profile with this id is stored. Format: empty.
    ProfileStored,
    /// Edge → origin: push the volume's prefetch plan (at most `budget`
    /// bytes; what its profiles say a boot reads, first needed first).
    /// Answered like a `Prefetch` of the plan's ranges: `Push` frames with
    /// this id, then `PrefetchDone` (at once when there is no plan).
    ///
    /// Format: `budget u64`.
    Plan { budget: u64 },
    /// Either way: the sender may send this many more background bytes
    /// (counted as whole encoded frames, see [`Scheduler`](super::Scheduler)).
    ///
    /// Format: `bytes u64`.
    Credit { bytes: u64 },
    /// Edge → origin: part of journal batch `seq`. A batch may span several
    /// frames, `part` 0, 1, ... in order; the origin applies the whole batch
    /// atomically once the part with `last` arrives.
    ///
    /// Format: `seq u64 | part u32 | last bool | count u32 | count × entry`,
    /// entry = `1 u8 | offset u64 | data` or `2 u8 | offset u64 | len u64`.
    /// Compressible.
    WriteBatch {
        seq: u64,
        part: u32,
        last: bool,
        entries: Vec<WriteEntry>,
    },
    /// Origin → edge: batch `seq` (and every one before it) is durably
    /// applied.
    ///
    /// Format: `seq u64`.
    BatchAck { seq: u64 },
    /// Either way: liveness and RTT probe; `nanos` is the sender's clock,
    /// echoed back. Format: `nanos u64`.
    Heartbeat { nanos: u64 },
    /// The echo of a `Heartbeat`. Format: `nanos u64`.
    HeartbeatAck { nanos: u64 },
    /// Either way: the sender has received `bytes` of background frames
    /// on this connection in all (whole encoded frames), and its clock read
    /// `nanos` (from an arbitrary zero) when the last of them arrived. The
    /// peer's congestion controller takes one-way delay samples from it.
    ///
    /// Format: `bytes u64 | nanos u64`.
    Delivered { bytes: u64, nanos: u64 },
    /// Either way: the request with this frame's id failed (id 0: the link
    /// failed, and the sender closes it).
    ///
    /// Format: `code u16 | message str`.
    Error { code: ErrorCode, message: String },
}

impl Message {
    /// This message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Auth { .. } => Kind::Auth,
            Message::Attach { .. } => Kind::Attach,
            Message::Attached { .. } => Kind::Attached,
            Message::Detach => Kind::Detach,
            Message::Detached => Kind::Detached,
            Message::Release { .. } => Kind::Release,
            Message::Read { .. } => Kind::Read,
            Message::ReadData { .. } => Kind::ReadData,
            Message::ReadSignatures { .. } => Kind::ReadSignatures,
            Message::Prefetch { .. } => Kind::Prefetch,
            Message::Push { .. } => Kind::Push,
            Message::PrefetchDone => Kind::PrefetchDone,
            Message::Extents { .. } => Kind::Extents,
            Message::ExtentMap { .. } => Kind::ExtentMap,
            Message::Sign { .. } => Kind::Sign,
            Message::Profile { .. } => Kind::Profile,
            Message::ProfileStored => Kind::ProfileStored,
            Message::Plan { .. } => Kind::Plan,
            Message::WriteBatch { .. } => Kind::WriteBatch,
            Message::BatchAck { .. } => Kind::BatchAck,
            Message::Credit { .. } => Kind::Credit,
            Message::Heartbeat { .. } => Kind::Heartbeat,
            Message::HeartbeatAck { .. } => Kind::HeartbeatAck,
            Message::Delivered { .. } => Kind::Delivered,
            Message::Error { .. } => Kind::Error,
        }
    }

    /// Checks every limit the decoder enforces, so whatever encodes also
    /// decodes: string, vector and data lengths, and that no range wraps
    /// past `u64::MAX`.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let kind = self.kind();
        match self {
            Message::Attach {
                volume, edge_id, ..
            } => {
                check_len(kind, "volume", volume.len(), MAX_STRING_LEN)?;
                check_len(kind, "edge_id", edge_id.len(), MAX_STRING_LEN)?;
            }
            Message::Read { offset, len, .. } => check_range(kind, *offset, u64::from(*len))?,
            Message::ReadData { offset, data, .. } | Message::Push { offset, data, .. } => {
                check_len(kind, "data", data.len(), MAX_DATA_LEN)?;
                check_range(kind, *offset, data.len() as u64)?;
            }
            Message::ReadSignatures { sigs, .. } => {
                check_len(kind, "sigs", sigs.len(), MAX_SIGNATURES)?;
            }
            Message::Prefetch { ranges } => {
                check_len(kind, "ranges", ranges.len(), MAX_PREFETCH_RANGES)?;
                for &(offset, len) in ranges {
                    check_range(kind, offset, u64::from(len))?;
                }
            }
            Message::Sign { offset, len, block } => {
                if *len == 0 || *len as usize > MAX_DATA_LEN {
                    return Err(ProtoError::BadValue {
                        kind,
                        field: "len",
                        value: u64::from(*len),
                    });
                }
                if *block < MIN_SIGN_BLOCK {
                    return Err(ProtoError::BadValue {
                        kind,
                        field: "block",
                        value: u64::from(*block),
                    });
                }
                check_range(kind, *offset, u64::from(*len))?;
            }
            Message::Extents { offset, len } => {
                if *len == 0 {
                    return Err(ProtoError::BadValue {
                        kind,
                        field: "len",
                        value: 0,
                    });
                }
                check_range(kind, *offset, *len)?;
            }
            Message::ExtentMap { offset, extents } => {
                check_len(kind, "extents", extents.len(), MAX_EXTENTS)?;
                if extents.is_empty() {
                    // The count: a map must describe at least one byte.
                    return Err(ProtoError::BadValue {
                        kind,
                        field: "extents",
                        value: 0,
                    });
                }
                let mut total = 0u64;
                for &(len, flags) in extents {
                    if len == 0 {
                        return Err(ProtoError::BadValue {
                            kind,
                            field: "extents",
                            value: 0,
                        });
                    }
                    if flags & !EXTENT_FLAGS != 0 {
                        return Err(ProtoError::BadValue {
                            kind,
                            field: "flags",
                            value: flags.into(),
                        });
                    }
                    total = total.checked_add(len).ok_or(ProtoError::RangeOverflow {
                        kind,
                        offset: *offset,
                        len: u64::MAX,
                    })?;
                }
                check_range(kind, *offset, total)?;
            }
            Message::WriteBatch { entries, .. } => {
                check_len(kind, "entries", entries.len(), MAX_WRITE_ENTRIES)?;
                for entry in entries {
                    match entry {
                        WriteEntry::Data { offset, data } => {
                            check_len(kind, "data", data.len(), MAX_DATA_LEN)?;
                            check_range(kind, *offset, data.len() as u64)?;
                        }
                        WriteEntry::Zero { offset, len } => check_range(kind, *offset, *len)?,
                    }
                }
            }
            Message::Profile { data } => {
                check_len(kind, "data", data.len(), MAX_DATA_LEN)?;
                if data.is_empty() {
                    return Err(ProtoError::BadValue {
                        kind,
                        field: "data",
                        value: 0,
                    });
                }
            }
            Message::Error { message, .. } => {
                check_len(kind, "message", message.len(), MAX_STRING_LEN)?;
            }
            Message::Hello { .. }
            | Message::ProfileStored
            | Message::Plan { .. }
            | Message::Auth { .. }
            | Message::Attached { .. }
            | Message::Detach
            | Message::Detached
            | Message::Release { .. }
            | Message::PrefetchDone
            | Message::BatchAck { .. }
            | Message::Credit { .. }
            | Message::Heartbeat { .. }
            | Message::HeartbeatAck { .. }
            | Message::Delivered { .. } => {}
        }
        Ok(())
    }

    /// The length of this message's payload, uncompressed.
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Hello { .. } => 2 + 1 + 32,
            Message::Auth { .. } => 32,
            Message::Attach {
                volume, edge_id, ..
            } => 2 + volume.len() + 2 + edge_id.len() + 8,
            Message::Attached { .. } => 8 + 4 + 4 + 32 + 32 + 8 + 8 + 4 + 1,
            Message::Detach
            | Message::Detached
            | Message::PrefetchDone
            | Message::ProfileStored => 0,
            Message::Profile { data } => 4 + data.len(),
            Message::Release { .. } => 1,
            Message::Read { .. } => 8 + 4 + 1,
            Message::ReadData { data, .. } | Message::Push { data, .. } => {
                DATA_MESSAGE_OVERHEAD + data.len()
            }
            Message::ReadSignatures { sigs, .. } => 8 + 4 + 4 + 32 * sigs.len(),
            Message::Prefetch { ranges } => 4 + 12 * ranges.len(),
            Message::ExtentMap { extents, .. } => 8 + 4 + EXTENT_RUN_LEN * extents.len(),
            Message::WriteBatch { entries, .. } => {
                WRITE_BATCH_OVERHEAD + entries.iter().map(entry_encoded_len).sum::<usize>()
            }
            Message::BatchAck { .. }
            | Message::Plan { .. }
            | Message::Credit { .. }
            | Message::Heartbeat { .. }
            | Message::HeartbeatAck { .. } => 8,
            // offset + length; offset + length + block; cumulative
            // (acked, delivered)
            Message::Extents { .. } | Message::Sign { .. } | Message::Delivered { .. } => 16,
            Message::Error { message, .. } => 2 + 2 + message.len(),
        }
    }

    /// Appends the payload (uncompressed). Call [`Message::validate`] first:
    /// lengths over their limits would not fit their prefixes.
    pub(crate) fn encode_payload(&self, out: &mut BytesMut) {
        match self {
            Message::Hello {
                version,
                role,
                nonce,
            } => {
                out.put_u16(*version);
                out.put_u8(role.code());
                out.put_slice(nonce);
            }
            Message::Auth { proof } => out.put_slice(proof),
            Message::Attach {
                volume,
                edge_id,
                resume_seq,
            } => {
                put_str(out, volume);
                put_str(out, edge_id);
                out.put_u64(*resume_seq);
            }
            Message::Attached {
                size,
                chunk_size,
                group_size,
                cache_key,
                dedup_key,
                volume_epoch,
                next_seq,
                resume_part,
                local_writes,
            } => {
                out.put_u64(*size);
                out.put_u32(*chunk_size);
                out.put_u32(*group_size);
                out.put_slice(cache_key);
                out.put_slice(dedup_key);
                out.put_u64(*volume_epoch);
                out.put_u64(*next_seq);
                out.put_u32(*resume_part);
                out.put_u8(if *local_writes {
                    ATTACHED_LOCAL_WRITES
                } else {
                    0
                });
            }
            Message::Detach
            | Message::Detached
            | Message::PrefetchDone
            | Message::ProfileStored => {}
            Message::Profile { data } => put_data(out, data),
            Message::Release { disposition } => out.put_u8(disposition.code()),
            Message::Read {
                offset,
                len,
                want_signatures,
            } => {
                out.put_u64(*offset);
                out.put_u32(*len);
                out.put_u8(u8::from(*want_signatures));
            }
            Message::ReadData {
                offset,
                as_of,
                data,
            }
            | Message::Push {
                offset,
                as_of,
                data,
            } => {
                out.put_u64(*offset);
                out.put_u64(*as_of);
                put_data(out, data);
            }
            Message::ReadSignatures {
                offset,
                chunk_size,
                sigs,
            } => {
                out.put_u64(*offset);
                out.put_u32(*chunk_size);
                put_count(out, sigs.len());
                for sig in sigs {
                    out.put_slice(sig);
                }
            }
            Message::Prefetch { ranges } => {
                put_count(out, ranges.len());
                for &(offset, len) in ranges {
                    out.put_u64(offset);
                    out.put_u32(len);
                }
            }
            Message::Extents { offset, len } => {
                out.put_u64(*offset);
                out.put_u64(*len);
            }
            Message::Sign { offset, len, block } => {
                out.put_u64(*offset);
                out.put_u32(*len);
                out.put_u32(*block);
            }
            Message::ExtentMap { offset, extents } => {
                out.put_u64(*offset);
                put_count(out, extents.len());
                for &(len, flags) in extents {
                    out.put_u64(len);
                    out.put_u8(flags);
                }
            }
            Message::WriteBatch {
                seq,
                part,
                last,
                entries,
            } => {
                out.put_u64(*seq);
                out.put_u32(*part);
                out.put_u8(u8::from(*last));
                put_count(out, entries.len());
                for entry in entries {
                    match entry {
                        WriteEntry::Data { offset, data } => {
                            out.put_u8(ENTRY_DATA);
                            out.put_u64(*offset);
                            put_data(out, data);
                        }
                        WriteEntry::Zero { offset, len } => {
                            out.put_u8(ENTRY_ZERO);
                            out.put_u64(*offset);
                            out.put_u64(*len);
                        }
                    }
                }
            }
            Message::BatchAck { seq } => out.put_u64(*seq),
            Message::Plan { budget } => out.put_u64(*budget),
            Message::Credit { bytes } => out.put_u64(*bytes),
            Message::Heartbeat { nanos } | Message::HeartbeatAck { nanos } => out.put_u64(*nanos),
            Message::Delivered { bytes, nanos } => {
                out.put_u64(*bytes);
                out.put_u64(*nanos);
            }
            Message::Error { code, message } => {
                out.put_u16(code.code());
                put_str(out, message);
            }
        }
    }

    /// Parses a whole (decompressed) payload of the given kind. Data fields
    /// are slices of `payload`, not copies. Never allocates more than the
    /// payload's length times a small constant (a decoded [`WriteEntry`] is
    /// at most about 3x its 13 encoded bytes), and never on the word of a
    /// count alone: counts are checked against the bytes left first.
    pub(crate) fn decode_payload(kind: Kind, payload: Bytes) -> Result<Message, ProtoError> {
        let mut b = Body { kind, buf: payload };
        let msg = match kind {
            Kind::Hello => Message::Hello {
                version: b.u16("version")?,
                role: {
                    let code = b.u8("role")?;
                    Role::from_code(code).ok_or(ProtoError::BadValue {
                        kind,
                        field: "role",
                        value: code.into(),
                    })?
                },
                nonce: b.array("nonce")?,
            },
            Kind::Auth => Message::Auth {
                proof: b.array("proof")?,
            },
            Kind::Attach => Message::Attach {
                volume: b.string("volume")?,
                edge_id: b.string("edge_id")?,
                resume_seq: b.u64("resume_seq")?,
            },
            Kind::Attached => Message::Attached {
                size: b.u64("size")?,
                chunk_size: b.u32("chunk_size")?,
                group_size: b.u32("group_size")?,
                cache_key: b.array("cache_key")?,
                dedup_key: b.array("dedup_key")?,
                volume_epoch: b.u64("volume_epoch")?,
                next_seq: b.u64("next_seq")?,
                resume_part: b.u32("resume_part")?,
                local_writes: {
                    let flags = b.u8("flags")?;
                    if flags & !ATTACHED_LOCAL_WRITES != 0 {
                        return Err(ProtoError::BadValue {
                            kind,
                            field: "flags",
                            value: flags.into(),
                        });
                    }
                    flags & ATTACHED_LOCAL_WRITES != 0
                },
            },
            Kind::Detach => Message::Detach,
            Kind::Detached => Message::Detached,
            Kind::Release => {
                let code = b.u8("disposition")?;
                Message::Release {
                    disposition: Disposition::from_code(code).ok_or(ProtoError::BadValue {
                        kind,
                        field: "disposition",
                        value: code.into(),
                    })?,
                }
            }
            Kind::Read => Message::Read {
                offset: b.u64("offset")?,
                len: b.u32("len")?,
                want_signatures: b.bool("want_signatures")?,
            },
            Kind::ReadData => Message::ReadData {
                offset: b.u64("offset")?,
                as_of: b.u64("as_of")?,
                data: b.data("data")?,
            },
            Kind::ReadSignatures => {
                let offset = b.u64("offset")?;
                let chunk_size = b.u32("chunk_size")?;
                let count = b.count("sigs", MAX_SIGNATURES, 32)?;
                let mut sigs = Vec::with_capacity(count);
                for _ in 0..count {
                    sigs.push(b.array("sigs")?);
                }
                Message::ReadSignatures {
                    offset,
                    chunk_size,
                    sigs,
                }
            }
            Kind::Prefetch => {
                let count = b.count("ranges", MAX_PREFETCH_RANGES, 12)?;
                let mut ranges = Vec::with_capacity(count);
                for _ in 0..count {
                    ranges.push((b.u64("ranges")?, b.u32("ranges")?));
                }
                Message::Prefetch { ranges }
            }
            Kind::Push => Message::Push {
                offset: b.u64("offset")?,
                as_of: b.u64("as_of")?,
                data: b.data("data")?,
            },
            Kind::PrefetchDone => Message::PrefetchDone,
            Kind::Profile => Message::Profile {
                data: b.data("data")?,
            },
            Kind::ProfileStored => Message::ProfileStored,
            Kind::Plan => Message::Plan {
                budget: b.u64("budget")?,
            },
            Kind::Extents => Message::Extents {
                offset: b.u64("offset")?,
                len: b.u64("len")?,
            },
            Kind::Sign => Message::Sign {
                offset: b.u64("offset")?,
                len: b.u32("len")?,
                block: b.u32("block")?,
            },
            Kind::ExtentMap => {
                let offset = b.u64("offset")?;
                let count = b.count("extents", MAX_EXTENTS, EXTENT_RUN_LEN)?;
                let mut extents = Vec::with_capacity(count);
                for _ in 0..count {
                    extents.push((b.u64("extents")?, b.u8("flags")?));
                }
                Message::ExtentMap { offset, extents }
            }
            Kind::WriteBatch => {
                let seq = b.u64("seq")?;
                let part = b.u32("part")?;
                let last = b.bool("last")?;
                let count = b.count("entries", MAX_WRITE_ENTRIES, DATA_ENTRY_OVERHEAD)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(match b.u8("entries")? {
                        ENTRY_DATA => WriteEntry::Data {
                            offset: b.u64("entries")?,
                            data: b.data("entries")?,
                        },
                        ENTRY_ZERO => WriteEntry::Zero {
                            offset: b.u64("entries")?,
                            len: b.u64("entries")?,
                        },
                        tag => {
                            return Err(ProtoError::BadValue {
                                kind,
                                field: "entries",
                                value: tag.into(),
                            })
                        }
                    });
                }
                Message::WriteBatch {
                    seq,
                    part,
                    last,
                    entries,
                }
            }
            Kind::BatchAck => Message::BatchAck { seq: b.u64("seq")? },
            Kind::Credit => Message::Credit {
                bytes: b.u64("bytes")?,
            },
            Kind::Heartbeat => Message::Heartbeat {
                nanos: b.u64("nanos")?,
            },
            Kind::HeartbeatAck => Message::HeartbeatAck {
                nanos: b.u64("nanos")?,
            },
            Kind::Delivered => Message::Delivered {
                bytes: b.u64("bytes")?,
                nanos: b.u64("nanos")?,
            },
            Kind::Error => Message::Error {
                code: ErrorCode::from_code(b.u16("code")?),
                message: b.string("message")?,
            },
        };
        if !b.buf.is_empty() {
            return Err(ProtoError::TrailingBytes {
                kind,
                extra: b.buf.len(),
            });
        }
        msg.validate()?;
        Ok(msg)
    }
}

fn check_len(kind: Kind, field: &'static str, len: usize, max: usize) -> Result<(), ProtoError> {
    if len > max {
        return Err(ProtoError::TooLong {
            kind,
            field,
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(())
}

fn check_range(kind: Kind, offset: u64, len: u64) -> Result<(), ProtoError> {
    match offset.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(ProtoError::RangeOverflow { kind, offset, len }),
    }
}

// The length conversions below cannot fail once `validate` passed: every
// limit is far below u16/u32::MAX.
fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(u16::try_from(s.len()).expect("string length checked by validate"));
    out.put_slice(s.as_bytes());
}

fn put_data(out: &mut BytesMut, data: &[u8]) {
    out.put_u32(u32::try_from(data.len()).expect("data length checked by validate"));
    out.put_slice(data);
}

fn put_count(out: &mut BytesMut, count: usize) {
    out.put_u32(u32::try_from(count).expect("count checked by validate"));
}

/// A bounds-checked reader over one payload; every shortfall is a
/// [`ProtoError::Truncated`] naming the field.
struct Body {
    kind: Kind,
    buf: Bytes,
}

impl Body {
    fn need(&self, n: usize, field: &'static str) -> Result<(), ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated {
                kind: self.kind,
                field,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtoError> {
        self.need(N, field)?;
        let mut a = [0; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        self.array(field).map(u8::from_be_bytes)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtoError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, ProtoError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ProtoError::BadValue {
                kind: self.kind,
                field,
                value: value.into(),
            }),
        }
    }

    /// A length checked against `max` before anything is taken.
    fn sized(&mut self, field: &'static str, len: usize, max: usize) -> Result<usize, ProtoError> {
        check_len(self.kind, field, len, max)?;
        self.need(len, field)?;
        Ok(len)
    }

    fn data(&mut self, field: &'static str) -> Result<Bytes, ProtoError> {
        let len = usize::try_from(self.u32(field)?).unwrap_or(usize::MAX);
        let len = self.sized(field, len, MAX_DATA_LEN)?;
        Ok(self.buf.split_to(len))
    }

    fn string(&mut self, field: &'static str) -> Result<String, ProtoError> {
        let len = usize::from(self.u16(field)?);
        let len = self.sized(field, len, MAX_STRING_LEN)?;
        let s = std::str::from_utf8(&self.buf[..len])
            .map_err(|_| ProtoError::BadUtf8 {
                kind: self.kind,
                field,
            })?
            .to_owned();
        self.buf.advance(len);
        Ok(s)
    }

    /// A vector's count, refused unless the bytes left can hold `count`
    /// items of at least `min_item_len` bytes, so a forged count never
    /// drives an allocation.
    fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_item_len: usize,
    ) -> Result<usize, ProtoError> {
        let count = usize::try_from(self.u32(field)?).unwrap_or(usize::MAX);
        check_len(self.kind, field, count, max)?;
        self.need(count.saturating_mul(min_item_len), field)?;
        Ok(count)
    }
}
