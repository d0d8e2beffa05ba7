//! The origin's end of one connection: [`OriginSession`].
//!
//! ```text
//!   Hello both ways (+ Auth both ways) ──> Attach ──> Op::Attach
//!        attach_done(grant) ──> Attached ──> serving:
//!
//!   Read      ──> Op::Read ── read_done ──> ReadData | ReadSignatures (demand)
//!                   └─ then the rest of its group: Op::Read(push) ... Push (background)
//!   Prefetch  ──> Op::Read(push) ... Push ... PrefetchDone                 (background)
//!   Plan      ──> Op::Plan ── plan_done(ranges) ──> as a Prefetch of them    (background)
//!   Profile   ──> Op::StoreProfile ── profile_done ──> ProfileStored (demand)
//!   WriteBatch parts ──> reassembled ──> Op::Apply, one at a time, in order
//!        apply_done ──> BatchAck (or Error: everything from that batch on
//!                       is dropped until the edge resends it from part 0)
//!   Extents   ──> Op::Extents ── extents_done ──> ExtentMap (demand)
//!   Sign      ──> Op::Sign ── sign_done ──> ReadSignatures (demand)
//!   Heartbeat ──> HeartbeatAck
//!   Detach    ──> (once every batch received is applied) Op::Detach
//!        detach_done ──> Detached ──> waiting for Attach again
//!   Release   ──> (the same) Op::Release ── release_done ──> Detached ──> waiting
//!                   └─ refused: Error, still attached
//! ```
//!
//! The session never waits for storage: reads and applies are operations
//! the shell runs and completes later, so heartbeats, reads and batch
//! parts keep being taken in while a batch is applied. Reads run
//! concurrently with applies; each read says which batch it saw applied
//! (`as_of`, taken before it started), and the edge uses that to refuse
//! pushed data that may predate a batch it already considers applied.
//!
//! Group pushes and prefetches are read from storage only while little
//! background data waits to be sent (`push_backlog`), so a long prefetch
//! neither fills memory nor reads far ahead of the link.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockcore::Extent;
use bytes::Bytes;
use prefetch::layout::FileIndex;

use super::transport::{Transport, TransportStats};
use crate::bounded::BoundedSet;
use crate::cc::CcConfig;
use crate::error::LinkError;
use crate::proto::{
    auth_proof, extent_flags, verify_auth_proof, Class, Disposition, ErrorCode, FrameHeader,
    Message, Role, SchedulerConfig, WriteEntry, DEFAULT_WINDOW, MAX_DATA_LEN, MAX_EXTENTS,
    PROTOCOL_VERSION,
};

/// Marks a file's key in the pushed groups (group indexes stay far below).
const FILE_GROUP: u64 = 1 << 63;
/// An application group's files are pushed up to this many times
/// `file_group_max` bytes in all.
const APP_GROUP_FILES: u64 = 4;
/// Group pushes waiting to be issued, at most: they are optional, and a
/// guest reading many files (a scan, a backup) must not queue without
/// bound; past it, the rest of a group is not pushed.
const MAX_QUEUED_GROUP_BYTES: u64 = 64 << 20;

/// Settings of the origin's sessions.
#[derive(Clone, Debug)]
pub struct OriginSessionConfig {
    /// Pre-shared key both ends must prove they hold; `None` skips the
    /// proof (TLS with client certificates, or a trusted test link).
    pub psk: Option<[u8; 32]>,
    /// A connection with no byte arriving for this long is closed (the
    /// edge heartbeats every second or so).
    pub dead_after: Duration,
    /// The handshake and attach must finish within this.
    pub handshake_timeout: Duration,
    pub scheduler: SchedulerConfig,
    /// Background credit granted to the edge (write-back in flight).
    pub window: u64,
    pub cc: CcConfig,
    /// After a demand read, the rest of its aligned group of this many
    /// bytes is pushed unasked (0: never), unless the read is inside a
    /// file the origin knows (see [`OriginSession::set_files`]).
    pub group_size: u32,
    /// After a demand read inside a known file, the rest of that file is
    /// pushed, at most this many bytes from the read on (again at each
    /// demand read past them), and, the first time, the files it loads
    /// (its application group: each at most this, all at most four times
    /// this); 0: file-aware groups off.
    pub file_group_max: u64,
    /// The chunk size edges cache in; reported at attach.
    pub chunk_size: u32,
    /// Push data read ahead of the link, at most.
    pub push_backlog: u64,
    /// Pushes are read from storage in pieces of at most this.
    pub push_piece: u32,
    /// Complete batches waiting to be applied, at most (more is the edge
    /// breaking the protocol).
    pub max_ready_batches: usize,
}

impl Default for OriginSessionConfig {
    fn default() -> Self {
        OriginSessionConfig {
            psk: None,
            dead_after: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            scheduler: SchedulerConfig::default(),
            window: 4 * DEFAULT_WINDOW,
            cc: CcConfig::default(),
            group_size: 1 << 20,
            file_group_max: 8 << 20,
            chunk_size: 64 << 10,
            push_backlog: 4 << 20,
            push_piece: 1 << 20,
            max_ready_batches: 8,
        }
    }
}

/// What the session asks the origin's storage and state to do.
#[derive(Debug, Clone)]
pub enum OriginOp {
    /// Grant the volume to this edge: [`OriginSession::attach_done`].
    Attach {
        volume: String,
        edge_id: String,
        resume_seq: u64,
    },
    /// Read the volume: [`OriginSession::read_done`]. `push`: the data
    /// goes out as a push; with `want_signatures` too (a plan's piece),
    /// signatures mean the edge holds every chunk and nothing is sent.
    Read {
        tag: u64,
        offset: u64,
        len: u32,
        want_signatures: bool,
        push: bool,
    },
    /// Describe the allocation of a prefix of `[offset, offset + len)`
    /// (inside the volume, `len` > 0): [`OriginSession::extents_done`].
    Extents { tag: u64, offset: u64, len: u64 },
    /// Sign every `block`-byte piece of `[offset, offset + len)` (inside
    /// the volume) as the image holds it now: [`OriginSession::sign_done`].
    Sign {
        tag: u64,
        offset: u64,
        len: u32,
        block: u32,
    },
    /// Apply batch `seq` atomically (or confirm it was applied before):
    /// [`OriginSession::apply_done`]. One at a time, in order.
    Apply { seq: u64, entries: Vec<WriteEntry> },
    /// Release the volume: [`OriginSession::detach_done`]. Asked for only
    /// once every batch received before `Detach` was applied (or failed).
    Detach,
    /// Release the volume as `disposition` says (record it as migrated to
    /// this edge, or clear that record), then as `Detach` does:
    /// [`OriginSession::release_done`]. Asked for at the same point as
    /// `Detach`.
    Release { disposition: Disposition },
    /// Keep this boot profile with the volume (untrusted bytes: check
    /// them): [`OriginSession::profile_done`].
    StoreProfile { tag: u64, data: Bytes },
    /// The volume's prefetch plan, at most `budget` bytes:
    /// [`OriginSession::plan_done`].
    Plan { tag: u64, budget: u64 },
    /// Close the connection; the session is finished.
    Close { reason: LinkError },
}

/// A batch partly received when a connection ended, kept by the origin so
/// the edge can resume it on its next connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialBatch {
    pub seq: u64,
    pub next_part: u32,
    pub entries: Vec<WriteEntry>,
}

/// The origin's answer to `Attach`.
#[derive(Clone, Debug)]
pub struct AttachGrant {
    pub size: u64,
    pub cache_key: [u8; 32],
    pub dedup_key: [u8; 32],
    pub volume_epoch: u64,
    /// The batch the origin expects next.
    pub next_seq: u64,
    /// A partial batch this edge left on an earlier connection.
    pub resume: Option<PartialBatch>,
    /// The origin keeps none of the volume's writes (see
    /// `Message::Attached`).
    pub local_writes: bool,
}

/// The result of a read operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAnswer {
    /// The data, read with every batch up to `as_of` applied.
    Data { as_of: u64, data: Bytes },
    /// The signatures of the chunks (the edge holds them all).
    Signatures {
        chunk_size: u32,
        sigs: Vec<[u8; 32]>,
    },
}

/// Why an operation failed, as the edge is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Counters of one connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginSessionStats {
    pub reads: u64,
    /// Allocation map queries (`Extents`) asked of the storage.
    pub extent_queries: u64,
    /// Signature queries (`Sign`) asked of the storage.
    pub sign_queries: u64,
    pub bytes_read: u64,
    pub bytes_pushed: u64,
    /// Files whose group a demand read pushed (the first time per file).
    pub file_groups: u64,
    /// Demand reads that pushed the rest of their fixed group.
    pub fixed_groups: u64,
    /// Bytes of groups not pushed: this connection had sent them already
    /// (the plan, an earlier group, a demand read) or was about to.
    pub group_bytes_skipped: u64,
    pub batches_applied: u64,
    pub transport: TransportStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Hello,
    Auth,
    /// Waiting for `Attach`.
    Ready,
    /// `Op::Attach` is out.
    Attaching,
    Attached,
    Closed,
}

#[derive(Debug)]
enum ReadCtx {
    /// A read the edge waits for; `group`: the ranges (start, end) to
    /// push after it.
    Demand {
        id: u64,
        offset: u64,
        group: Vec<(u64, u64)>,
    },
    /// A piece of a push (`job`: the prefetch's id, 0 for group pushes).
    Push { job: u64, offset: u64, len: u64 },
}

#[derive(Debug)]
struct PushJob {
    /// The prefetch's request id, or 0 for a group push.
    id: u64,
    pos: u64,
    end: u64,
}

#[derive(Debug)]
struct Assembly {
    id: u64,
    seq: u64,
    next_part: u32,
    entries: Vec<WriteEntry>,
}

/// One edge connection at the origin. See the module docs.
#[derive(Debug)]
pub struct OriginSession {
    cfg: OriginSessionConfig,
    stage: Stage,
    since: Instant,
    nonce: [u8; 32],
    peer_nonce: [u8; 32],
    transport: Transport,
    ops: VecDeque<OriginOp>,
    size: u64,
    next_tag: u64,
    reads: BTreeMap<u64, ReadCtx>,
    /// Allocation queries being answered: tag -> (request id, offset, len).
    extents: BTreeMap<u64, (u64, u64, u64)>,
    /// Signature queries being answered: tag -> (request id, offset, len,
    /// block).
    signs: BTreeMap<u64, (u64, u64, u32, u32)>,
    /// Profiles being stored: tag -> request id.
    profiles: BTreeMap<u64, u64>,
    /// Plans being made: tag -> request id.
    plans: BTreeMap<u64, u64>,
    push_jobs: VecDeque<PushJob>,
    /// A plan's pushes: issued only while `push_jobs` is empty, so the
    /// groups of what the guest reads now go first.
    plan_jobs: VecDeque<PushJob>,
    /// The plan's ranges, start -> end: a demand read inside one pushes
    /// no group (the plan predicted the read; the rest of its group is
    /// what it predicted not to be read).
    planned: BTreeMap<u64, u64>,
    /// Prefetch id -> its jobs not fully issued plus its pieces being
    /// read; at 0 its `PrefetchDone` goes out.
    prefetches: BTreeMap<u64, u64>,
    push_in_flight: u64,
    /// Groups pushed on this connection, so sequential reads through one
    /// group push it once: fixed groups by index, files as
    /// `FILE_GROUP | file`.
    pushed: BoundedSet<u64>,
    /// What this connection sent the edge or queued for it (demand reads,
    /// the plan, group pushes): a group push leaves those out, so that an
    /// application group does not send again the libraries the plan or
    /// an earlier group sent. Cleared past a bound (pushes are optional;
    /// forgetting only costs bytes).
    sent: SentRanges,
    /// The volume's files, once the origin mapped them.
    files: Option<Arc<FileIndex>>,
    assembly: Option<Assembly>,
    ready: VecDeque<(u64, u64, Vec<WriteEntry>)>,
    applying: Option<(u64, u64)>,
    /// After a failed apply: parts are dropped until this batch restarts.
    failed_from: Option<u64>,
    attach_id: u64,
    /// `Detach` or `Release` arrived (its id, and the release's
    /// disposition); the operation waits for the applies.
    detach_pending: Option<(u64, Option<Disposition>)>,
    stats: OriginSessionStats,
}

impl OriginSession {
    /// A new connection: `nonce` is fresh randomness for the handshake.
    /// Our `Hello` is queued at once.
    pub fn new(cfg: OriginSessionConfig, now: Instant, nonce: [u8; 32]) -> Self {
        let mut transport = Transport::new(now, cfg.scheduler, cfg.window, cfg.cc, false);
        let _ = transport.queue(
            0,
            Class::Demand,
            Message::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Origin,
                nonce,
            },
        );
        OriginSession {
            cfg,
            stage: Stage::Hello,
            since: now,
            nonce,
            peer_nonce: [0; 32],
            transport,
            ops: VecDeque::new(),
            size: 0,
            next_tag: 1,
            reads: BTreeMap::new(),
            extents: BTreeMap::new(),
            signs: BTreeMap::new(),
            profiles: BTreeMap::new(),
            plans: BTreeMap::new(),
            push_jobs: VecDeque::new(),
            plan_jobs: VecDeque::new(),
            planned: BTreeMap::new(),
            prefetches: BTreeMap::new(),
            push_in_flight: 0,
            pushed: BoundedSet::new(1024),
            sent: SentRanges::default(),
            files: None,
            assembly: None,
            ready: VecDeque::new(),
            applying: None,
            failed_from: None,
            attach_id: 0,
            detach_pending: None,
            stats: OriginSessionStats::default(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.stage == Stage::Closed
    }

    pub fn stats(&self, now: Instant) -> OriginSessionStats {
        let mut s = self.stats.clone();
        s.transport = self.transport.stats(now);
        s
    }

    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        if self.stage == Stage::Closed {
            return;
        }
        match self.transport.input(data, now) {
            Ok(frames) => {
                for (header, msg) in frames {
                    if let Err(e) = self.on_frame(header, msg) {
                        self.fail(e);
                        return;
                    }
                    if self.stage == Stage::Closed {
                        return;
                    }
                }
                self.pump_pushes();
            }
            Err(e) => self.fail(LinkError::Proto(e)),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stage == Stage::Closed {
            return;
        }
        self.transport.handle_timeout(now);
        let attached = matches!(self.stage, Stage::Attached | Stage::Attaching);
        if !attached && now.saturating_duration_since(self.since) >= self.cfg.handshake_timeout {
            self.close(LinkError::Timeout(self.cfg.handshake_timeout));
            return;
        }
        let silent = self.transport.silent_for(now);
        if silent >= self.cfg.dead_after {
            self.close(LinkError::Silent(silent));
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stage == Stage::Closed {
            return None;
        }
        let mut at = self.transport.last_rx + self.cfg.dead_after;
        if !matches!(self.stage, Stage::Attached | Stage::Attaching) {
            at = at.min(self.since + self.cfg.handshake_timeout);
        }
        Some(match self.transport.poll_timeout() {
            Some(t) => at.min(t),
            None => at,
        })
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        let frame = self.transport.poll_transmit(now);
        // Room may have opened for more push reads.
        self.pump_pushes();
        frame
    }

    /// Whether [`OriginSession::poll_transmit`] would yield a frame now.
    pub fn can_transmit(&self, now: Instant) -> bool {
        self.stage != Stage::Closed && self.transport.can_transmit(now)
    }

    pub fn poll_op(&mut self) -> Option<OriginOp> {
        self.ops.pop_front()
    }

    /// The batch being received, if any, for the origin to keep when the
    /// connection ends.
    pub fn take_partial(&mut self) -> Option<PartialBatch> {
        self.assembly.take().map(|a| PartialBatch {
            seq: a.seq,
            next_part: a.next_part,
            entries: a.entries,
        })
    }

    // --- completions ---------------------------------------------------

    pub fn attach_done(&mut self, result: Result<AttachGrant, Refusal>) {
        if self.stage != Stage::Attaching {
            return;
        }
        let id = self.attach_id;
        match result {
            Ok(g) => {
                self.size = g.size;
                let mut resume_part = 0;
                if let Some(p) = g.resume.filter(|p| p.seq == g.next_seq) {
                    resume_part = p.next_part;
                    self.assembly = Some(Assembly {
                        id: 0,
                        seq: p.seq,
                        next_part: p.next_part,
                        entries: p.entries,
                    });
                }
                self.stage = Stage::Attached;
                self.reply(
                    id,
                    Message::Attached {
                        size: g.size,
                        chunk_size: self.cfg.chunk_size,
                        group_size: self.cfg.group_size,
                        cache_key: g.cache_key,
                        dedup_key: g.dedup_key,
                        volume_epoch: g.volume_epoch,
                        next_seq: g.next_seq,
                        resume_part,
                        local_writes: g.local_writes,
                    },
                );
            }
            Err(r) => {
                self.stage = Stage::Ready;
                self.reply(id, refusal_message(r));
            }
        }
    }

    pub fn read_done(&mut self, tag: u64, result: Result<ReadAnswer, Refusal>) {
        let Some(ctx) = self.reads.remove(&tag) else {
            return;
        };
        match ctx {
            ReadCtx::Demand { id, offset, group } => {
                let ok = result.is_ok();
                let msg = match result {
                    Ok(ReadAnswer::Data { as_of, data }) => {
                        self.stats.bytes_read += data.len() as u64;
                        Message::ReadData {
                            offset,
                            as_of,
                            data,
                        }
                    }
                    Ok(ReadAnswer::Signatures { chunk_size, sigs }) => Message::ReadSignatures {
                        offset,
                        chunk_size,
                        sigs,
                    },
                    Err(r) => refusal_message(r),
                };
                self.reply(id, msg);
                let queued: u64 = self
                    .push_jobs
                    .iter()
                    .filter(|j| j.id == 0)
                    .map(|j| j.end - j.pos)
                    .sum();
                let mut room = MAX_QUEUED_GROUP_BYTES.saturating_sub(queued);
                for (start, end) in group.into_iter().filter(|_| ok) {
                    // Only what the edge was not sent (the read itself
                    // among it) nor is about to be.
                    let unsent = self.sent.gaps(start, end);
                    let skipped = (end - start) - unsent.iter().map(|(a, b)| b - a).sum::<u64>();
                    self.stats.group_bytes_skipped += skipped;
                    for (pos, end) in unsent {
                        let end = end.min(pos.saturating_add(room));
                        if pos < end {
                            room -= end - pos;
                            self.sent.insert(pos, end);
                            self.push_jobs.push_back(PushJob { id: 0, pos, end });
                        }
                    }
                }
            }
            ReadCtx::Push { job, offset, len } => {
                self.push_in_flight -= len;
                // A failed push read is dropped: pushes are optional; so
                // is one answered by signatures (the edge holds it all).
                if let Ok(ReadAnswer::Data { as_of, data }) = result {
                    self.stats.bytes_pushed += data.len() as u64;
                    self.send(
                        job,
                        Class::Background,
                        Message::Push {
                            offset,
                            as_of,
                            data,
                        },
                    );
                }
                self.prefetch_unit_done(job);
            }
        }
        self.pump_pushes();
    }

    pub fn apply_done(&mut self, seq: u64, result: Result<(), Refusal>) {
        let Some((id, applying)) = self.applying else {
            return;
        };
        if applying != seq {
            return;
        }
        self.applying = None;
        match result {
            Ok(()) => {
                self.stats.batches_applied += 1;
                self.reply(id, Message::BatchAck { seq });
            }
            Err(r) => {
                self.ready.clear();
                self.assembly = None;
                self.failed_from = Some(seq);
                self.reply(id, refusal_message(r));
            }
        }
        self.pump_apply();
        self.pump_detach();
    }

    /// The allocation of a prefix of what [`OriginOp::Extents`] asked:
    /// contiguous extents from its offset (as [`BlockDevice::extents`]
    /// returns them). They are answered cut to the asked range and to
    /// [`MAX_EXTENTS`] runs; should they not start at the offset, the
    /// edge is told the storage failed.
    ///
    /// [`BlockDevice::extents`]: blockcore::BlockDevice::extents
    pub fn extents_done(&mut self, tag: u64, result: Result<Vec<Extent>, Refusal>) {
        let Some((id, offset, len)) = self.extents.remove(&tag) else {
            return;
        };
        let msg = match result.map(|e| extent_runs(offset, len, &e)) {
            Ok(extents) if !extents.is_empty() => Message::ExtentMap { offset, extents },
            Ok(_) => Message::Error {
                code: ErrorCode::Io,
                message: format!(
                    "the volume's storage described none of the {len} bytes at {offset}"
                ),
            },
            Err(r) => refusal_message(r),
        };
        self.reply(id, msg);
    }

    /// The signatures [`OriginOp::Sign`] asked for, one per piece in
    /// order; a wrong count is answered as a storage failure.
    pub fn sign_done(&mut self, tag: u64, result: Result<Vec<[u8; 32]>, Refusal>) {
        let Some((id, offset, len, block)) = self.signs.remove(&tag) else {
            return;
        };
        let pieces = u64::from(len).div_ceil(u64::from(block));
        let msg = match result {
            Ok(sigs) if sigs.len() as u64 == pieces => Message::ReadSignatures {
                offset,
                chunk_size: block,
                sigs,
            },
            Ok(sigs) => Message::Error {
                code: ErrorCode::Io,
                message: format!(
                    "the volume's storage signed {} of the {pieces} pieces at {offset}",
                    sigs.len()
                ),
            },
            Err(r) => refusal_message(r),
        };
        self.reply(id, msg);
    }

    /// The end of [`OriginOp::StoreProfile`]: stored, or why not.
    pub fn profile_done(&mut self, tag: u64, result: Result<(), Refusal>) {
        let Some(id) = self.profiles.remove(&tag) else {
            return;
        };
        let msg = match result {
            Ok(()) => Message::ProfileStored,
            Err(r) => refusal_message(r),
        };
        self.reply(id, msg);
    }

    /// The end of [`OriginOp::Plan`]: the ranges to push, in order (the
    /// plan's request then goes on as a `Prefetch` of them), or why not.
    pub fn plan_done(&mut self, tag: u64, result: Result<Vec<(u64, u32)>, Refusal>) {
        let Some(id) = self.plans.remove(&tag) else {
            return;
        };
        match result {
            Ok(ranges) => {
                for &(offset, len) in &ranges {
                    let end = offset.saturating_add(u64::from(len)).min(self.size);
                    if offset < end {
                        self.planned.insert(offset, end);
                        self.sent.insert(offset, end);
                    }
                }
                self.prefetch(id, ranges, true);
            }
            Err(r) => self.reply(id, refusal_message(r)),
        }
        self.pump_pushes();
    }

    pub fn detach_done(&mut self) {
        if self.stage == Stage::Attached {
            self.stage = Stage::Ready;
            // Pushes are for the volume's holder only.
            self.push_jobs.clear();
            self.prefetches.clear();
            self.reply(self.attach_id, Message::Detached);
        }
    }

    /// The outcome of [`OriginOp::Release`]: released (answered as a
    /// detach), or refused (the edge is told why and keeps the volume).
    pub fn release_done(&mut self, result: Result<(), Refusal>) {
        match result {
            Ok(()) => self.detach_done(),
            Err(r) => {
                if self.stage == Stage::Attached {
                    self.reply(self.attach_id, refusal_message(r));
                }
            }
        }
    }

    /// The origin took the volume from this connection (an operator
    /// fenced its edge): tells the edge why, on id 0, and closes. What
    /// it was sending is dropped; nothing more is asked for.
    pub fn revoke(&mut self, refusal: Refusal) {
        if self.stage == Stage::Closed {
            return;
        }
        self.assembly = None;
        self.ready.clear();
        self.push_jobs.clear();
        let error = LinkError::Refused {
            code: refusal.code,
            message: refusal.message.clone(),
        };
        self.reply(0, refusal_message(refusal));
        self.close(error);
    }

    // --- internals -----------------------------------------------------

    fn reply(&mut self, id: u64, msg: Message) {
        self.send(id, Class::Demand, msg);
    }

    fn send(&mut self, id: u64, class: Class, msg: Message) {
        if let Err(e) = self.transport.queue(id, class, msg) {
            self.fail(LinkError::Proto(e));
        }
    }

    fn close(&mut self, reason: LinkError) {
        if self.stage != Stage::Closed {
            self.stage = Stage::Closed;
            self.ops.push_back(OriginOp::Close { reason });
        }
    }

    fn fail(&mut self, e: LinkError) {
        let _ = self.transport.queue(
            0,
            Class::Demand,
            Message::Error {
                code: e.code(),
                message: e.to_string(),
            },
        );
        self.close(e);
    }

    fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    fn on_frame(&mut self, header: FrameHeader, msg: Message) -> Result<(), LinkError> {
        let id = header.id;
        match (self.stage, msg) {
            (
                Stage::Hello,
                Message::Hello {
                    version,
                    role,
                    nonce,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(LinkError::Unsupported(format!(
                        "protocol version {version}; this origin speaks {PROTOCOL_VERSION}"
                    )));
                }
                if role != Role::Edge {
                    return Err(LinkError::Handshake(format!(
                        "the peer says it is {role:?}, not an edge"
                    )));
                }
                self.peer_nonce = nonce;
                if let Some(psk) = self.cfg.psk {
                    let proof = auth_proof(&psk, Role::Origin, &self.nonce, &nonce);
                    self.reply(0, Message::Auth { proof });
                    self.stage = Stage::Auth;
                } else {
                    self.stage = Stage::Ready;
                }
                Ok(())
            }
            (Stage::Auth, Message::Auth { proof }) => {
                let psk = self.cfg.psk.unwrap_or_default();
                if verify_auth_proof(&psk, Role::Edge, &self.peer_nonce, &self.nonce, &proof) {
                    self.stage = Stage::Ready;
                    Ok(())
                } else {
                    Err(LinkError::AuthFailed)
                }
            }
            (
                Stage::Ready,
                Message::Attach {
                    volume,
                    edge_id,
                    resume_seq,
                },
            ) => {
                self.attach_id = id;
                self.stage = Stage::Attaching;
                self.ops.push_back(OriginOp::Attach {
                    volume,
                    edge_id,
                    resume_seq,
                });
                Ok(())
            }
            (_, Message::Heartbeat { nanos }) if self.stage != Stage::Hello => {
                self.reply(0, Message::HeartbeatAck { nanos });
                Ok(())
            }
            (_, Message::Error { code, message }) if id == 0 => {
                Err(LinkError::Refused { code, message })
            }
            // An edge's error about one of our frames: nothing to undo.
            (_, Message::HeartbeatAck { .. } | Message::Error { .. }) => Ok(()),
            (Stage::Attached, msg) => self.on_attached_frame(id, msg),
            (
                Stage::Ready | Stage::Attaching,
                msg @ (Message::Read { .. }
                | Message::Prefetch { .. }
                | Message::Extents { .. }
                | Message::Sign { .. }
                | Message::Profile { .. }
                | Message::Plan { .. }
                | Message::WriteBatch { .. }
                | Message::Detach
                | Message::Release { .. }),
            ) => {
                self.reply(
                    id,
                    Message::Error {
                        code: ErrorCode::NotAttached,
                        message: format!("{:?} before Attach", msg.kind()),
                    },
                );
                Ok(())
            }
            (_, msg) => Err(LinkError::Unexpected(format!(
                "{:?} in the {:?} stage",
                msg.kind(),
                self.stage
            ))),
        }
    }

    fn on_attached_frame(&mut self, id: u64, msg: Message) -> Result<(), LinkError> {
        match msg {
            Message::Read {
                offset,
                len,
                want_signatures,
            } => {
                self.read(id, offset, len, want_signatures);
                Ok(())
            }
            Message::Prefetch { ranges } => {
                self.prefetch(id, ranges, false);
                Ok(())
            }
            Message::Plan { budget } => {
                let tag = self.tag();
                self.plans.insert(tag, id);
                self.ops.push_back(OriginOp::Plan { tag, budget });
                Ok(())
            }
            Message::WriteBatch {
                seq,
                part,
                last,
                entries,
            } => self.write_batch(id, seq, part, last, entries),
            Message::Extents { offset, len } => {
                self.extent_query(id, offset, len);
                Ok(())
            }
            Message::Sign { offset, len, block } => {
                self.sign_query(id, offset, len, block);
                Ok(())
            }
            Message::Profile { data } => {
                let tag = self.tag();
                self.profiles.insert(tag, id);
                self.ops.push_back(OriginOp::StoreProfile { tag, data });
                Ok(())
            }
            Message::Detach => {
                self.detach_pending = Some((id, None));
                self.pump_detach();
                Ok(())
            }
            Message::Release { disposition } => {
                self.detach_pending = Some((id, Some(disposition)));
                self.pump_detach();
                Ok(())
            }
            other => Err(LinkError::Unexpected(format!(
                "{:?} from an edge",
                other.kind()
            ))),
        }
    }

    /// Queues the pushes of prefetch `id` (of a plan: `planned`), behind
    /// those queued before.
    fn prefetch(&mut self, id: u64, ranges: Vec<(u64, u32)>, planned: bool) {
        let mut pieces = 0;
        for (offset, len) in ranges {
            let end = offset.saturating_add(u64::from(len)).min(self.size);
            if offset < end {
                pieces += 1;
                let queue = if planned {
                    &mut self.plan_jobs
                } else {
                    &mut self.push_jobs
                };
                queue.push_back(PushJob {
                    id,
                    pos: offset,
                    end,
                });
            }
        }
        if pieces == 0 {
            self.send(id, Class::Background, Message::PrefetchDone);
        } else {
            *self.prefetches.entry(id).or_default() += pieces;
        }
    }

    fn read(&mut self, id: u64, offset: u64, len: u32, want_signatures: bool) {
        let end = offset.checked_add(u64::from(len));
        if len as usize > MAX_DATA_LEN || end.is_none_or(|e| e > self.size) {
            self.reply(
                id,
                Message::Error {
                    code: ErrorCode::OutOfRange,
                    message: format!(
                        "read of {len} bytes at {offset} is outside the volume of {} bytes",
                        self.size
                    ),
                },
            );
            return;
        }
        self.stats.reads += 1;
        self.sent.insert(offset, offset + u64::from(len));
        let push = self.group_after(offset, len);
        let tag = self.tag();
        self.reads.insert(
            tag,
            ReadCtx::Demand {
                id,
                offset,
                group: push,
            },
        );
        self.ops.push_back(OriginOp::Read {
            tag,
            offset,
            len,
            want_signatures,
            push: false,
        });
    }

    /// What to push after a demand read: nothing inside a planned range
    /// (the plan predicted the read and what follows it); inside a known
    /// file, the rest of the file (at most `file_group_max` ahead; its
    /// application group once per connection); elsewhere, the rest of the
    /// read's fixed group (once per connection). What the connection sent
    /// is left out when the pushes are queued.
    fn group_after(&mut self, offset: u64, len: u32) -> Vec<(u64, u64)> {
        let planned = self
            .planned
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &end)| offset < end);
        if planned {
            return Vec::new();
        }
        let file_max = self.cfg.file_group_max;
        if let Some(files) = self.files.as_ref().filter(|_| file_max > 0) {
            if let Some((file, mut ranges)) = files.group(offset, file_max) {
                // The next `file_max` bytes of the file from the read on,
                // every time (what was sent is left out when queued): a
                // file longer than that streams ahead of its reader, one
                // demand read per `file_max`, instead of stopping there.
                if !self.pushed.insert(FILE_GROUP | u64::from(file)) {
                    return clip(ranges, self.size);
                }
                self.stats.file_groups += 1;
                // Then what it loads (the application group), each file
                // once per connection, all of them within a few files'
                // worth.
                let mut left = APP_GROUP_FILES * file_max;
                for &dep in files.group_files(file) {
                    if left == 0 || !self.pushed.insert(FILE_GROUP | u64::from(dep)) {
                        continue;
                    }
                    let whole = files.whole(dep, file_max.min(left));
                    left -= whole.iter().map(|r| r.1).sum::<u64>();
                    ranges.extend(whole);
                }
                return clip(ranges, self.size);
            }
        }
        let group = u64::from(self.cfg.group_size);
        let fixed: Vec<_> = (group > u64::from(len))
            .then(|| offset / group)
            .filter(|g| self.pushed.insert(*g))
            .map(|g| (g * group, ((g + 1) * group).min(self.size)))
            .into_iter()
            .collect();
        self.stats.fixed_groups += fixed.len() as u64;
        fixed
    }

    /// The volume's files (the origin maps them after the attach): from
    /// now on a demand read inside a file pushes the rest of that file
    /// instead of its fixed group.
    pub fn set_files(&mut self, files: Arc<FileIndex>) {
        self.files = Some(files);
    }

    fn extent_query(&mut self, id: u64, offset: u64, len: u64) {
        // `len` > 0 and no wrap: the decoder checked.
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            self.reply(
                id,
                Message::Error {
                    code: ErrorCode::OutOfRange,
                    message: format!(
                        "allocation query of {len} bytes at {offset} is outside the volume of {} bytes",
                        self.size
                    ),
                },
            );
            return;
        }
        self.stats.extent_queries += 1;
        let tag = self.tag();
        self.extents.insert(tag, (id, offset, len));
        self.ops.push_back(OriginOp::Extents { tag, offset, len });
    }

    fn sign_query(&mut self, id: u64, offset: u64, len: u32, block: u32) {
        // `len` and `block` in bounds, no wrap: the decoder checked.
        if offset + u64::from(len) > self.size {
            self.reply(
                id,
                Message::Error {
                    code: ErrorCode::OutOfRange,
                    message: format!(
                        "signatures of {len} bytes at {offset} asked, outside the volume of {} bytes",
                        self.size
                    ),
                },
            );
            return;
        }
        self.stats.sign_queries += 1;
        let tag = self.tag();
        self.signs.insert(tag, (id, offset, len, block));
        self.ops.push_back(OriginOp::Sign {
            tag,
            offset,
            len,
            block,
        });
    }

    /// Starts push reads while the backlog has room.
    fn pump_pushes(&mut self) {
        if self.stage != Stage::Attached {
            return;
        }
        let piece = u64::from(self.cfg.push_piece.max(4096));
        loop {
            let (queue, planned) = if !self.push_jobs.is_empty() {
                (&mut self.push_jobs, false)
            } else if !self.plan_jobs.is_empty() {
                (&mut self.plan_jobs, true)
            } else {
                return;
            };
            let backlog = self.transport.queued(Class::Background) as u64 + self.push_in_flight;
            if backlog >= self.cfg.push_backlog {
                return;
            }
            let job = queue.front_mut().expect("not empty");
            let n = (job.end - job.pos).min(piece);
            let (id, offset) = (job.id, job.pos);
            job.pos += n;
            let finished = job.pos >= job.end;
            if finished {
                queue.pop_front();
            }
            let tag = self.tag();
            self.push_in_flight += n;
            self.reads.insert(
                tag,
                ReadCtx::Push {
                    job: id,
                    offset,
                    len: n,
                },
            );
            if let Some(units) = self.prefetches.get_mut(&id) {
                // The piece counts while it is read...
                *units += 1;
            }
            if finished {
                // ...and the job stops counting once its last piece is out.
                self.prefetch_unit_done(id);
            }
            // A plan's piece the edge was sent before (a warm restart)
            // may be answered by signatures: the piece is then not sent.
            self.ops.push_back(OriginOp::Read {
                tag,
                offset,
                len: u32::try_from(n).unwrap_or(u32::MAX),
                want_signatures: planned,
                push: true,
            });
        }
    }

    /// One unit of prefetch `job` (a job fully issued, or a piece read and
    /// queued) is done; the last one sends its `PrefetchDone`.
    fn prefetch_unit_done(&mut self, job: u64) {
        if job == 0 {
            return;
        }
        if let Some(left) = self.prefetches.get_mut(&job) {
            *left -= 1;
            if *left == 0 {
                self.prefetches.remove(&job);
                self.send(job, Class::Background, Message::PrefetchDone);
            }
        }
    }

    fn write_batch(
        &mut self,
        id: u64,
        seq: u64,
        part: u32,
        last: bool,
        entries: Vec<WriteEntry>,
    ) -> Result<(), LinkError> {
        if let Some(f) = self.failed_from {
            if seq == f && part == 0 {
                self.failed_from = None;
            } else {
                return Ok(());
            }
        }
        let continues = self
            .assembly
            .as_ref()
            .is_some_and(|a| a.seq == seq && a.next_part == part);
        if !continues {
            if part != 0 {
                self.assembly = None;
                self.failed_from = Some(seq);
                self.reply(
                    id,
                    Message::Error {
                        code: ErrorCode::Protocol,
                        message: format!(
                            "batch {seq} part {part} out of order: resend from part 0"
                        ),
                    },
                );
                return Ok(());
            }
            self.assembly = Some(Assembly {
                id,
                seq,
                next_part: 0,
                entries: Vec::new(),
            });
        }
        let a = self.assembly.as_mut().expect("set above");
        a.id = id;
        a.next_part += 1;
        a.entries.extend(entries);
        if !last {
            return Ok(());
        }
        let a = self.assembly.take().expect("set above");
        if self.ready.len() >= self.cfg.max_ready_batches {
            return Err(LinkError::Unexpected(format!(
                "more than {} complete batches waiting",
                self.cfg.max_ready_batches
            )));
        }
        self.ready.push_back((a.id, a.seq, a.entries));
        self.pump_apply();
        Ok(())
    }

    /// Asks to release the volume once nothing received is left to apply,
    /// so `Detached` means every batch before it was answered.
    fn pump_detach(&mut self) {
        if self.applying.is_some() || !self.ready.is_empty() {
            return;
        }
        if let Some((id, release)) = self.detach_pending.take() {
            self.attach_id = id;
            self.ops.push_back(match release {
                None => OriginOp::Detach,
                Some(disposition) => OriginOp::Release { disposition },
            });
        }
    }

    fn pump_apply(&mut self) {
        if self.applying.is_some() {
            return;
        }
        if let Some((id, seq, entries)) = self.ready.pop_front() {
            self.applying = Some((id, seq));
            self.ops.push_back(OriginOp::Apply { seq, entries });
        }
    }
}

/// `extents` as the runs of an `ExtentMap` from `offset`: from the first
/// one that starts at `offset` on, as long as they are contiguous, cut at
/// `offset + len` and at [`MAX_EXTENTS`] runs, neighbours of one kind
/// merged, empty ones skipped. Empty if none starts at `offset`.
fn extent_runs(offset: u64, len: u64, extents: &[Extent]) -> Vec<(u64, u8)> {
    let end = offset.saturating_add(len);
    let mut at = offset;
    let mut runs: Vec<(u64, u8)> = Vec::new();
    for e in extents.iter().filter(|e| e.len > 0) {
        if e.offset != at || at >= end {
            break;
        }
        let n = e.len.min(end - at);
        let flags = extent_flags(e.kind);
        let full = runs.len() == MAX_EXTENTS;
        match runs.last_mut() {
            Some((l, f)) if *f == flags => *l += n,
            _ if full => break,
            _ => runs.push((n, flags)),
        }
        at += n;
    }
    runs
}

fn refusal_message(r: Refusal) -> Message {
    Message::Error {
        code: r.code,
        message: r.message,
    }
}

/// `(start, len)` ranges as `(start, end)`, inside a volume of `size`.
fn clip(ranges: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    ranges
        .into_iter()
        .map(|(s, l)| (s.min(size), (s + l).min(size)))
        .collect()
}

/// Byte ranges, merged where they touch, forgotten all at once past a
/// bound (a boot's reads and pushes make a few thousand runs).
#[derive(Debug, Default)]
struct SentRanges {
    set: rangemap::RangeSet<u64>,
    inserts: usize,
}

impl SentRanges {
    const MAX_INSERTS: usize = 1 << 16;

    fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if self.inserts >= Self::MAX_INSERTS {
            self.set = rangemap::RangeSet::new();
            self.inserts = 0;
        }
        self.inserts += 1;
        self.set.insert(start..end);
    }

    /// The parts of `start..end` not in the set, in order.
    fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if start >= end {
            return Vec::new();
        }
        self.set
            .gaps(&(start..end))
            .map(|r| (r.start, r.end))
            .collect()
    }
}
