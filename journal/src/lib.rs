//! The edge's write-behind journal: a guest write is acknowledged once it is
//! here, and a background shipper later sends the writes to the origin in
//! batches, each taking the origin from one crash-consistent state to the
//! next.
//!
//! ```text
//!  append_write / append_zero / append_flush    read(offset, len)
//!   │ pwrite into the page cache, on the         │ extent map: newest journaled
//!   │ caller's thread, under the state lock      │ bytes not yet acked by the origin
//!   ▼                                            ▼
//!  ┌─ Mutex<Inner> ──────────────────────────────────────────────────────┐
//!  │ segments · record index (prefix sums) · extent map · batches        │
//!  └──┬──────────────────────────────────────────────▲───────────────────┘
//!     │                                             │ progress (watch):
//!     ▼                                             │ synced lsn, trims, failure
//!  dir/seg-<first lsn, 20 digits>.log ... ◄──── syncer thread: one fdatasync
//!     [header][rec][rec]...   [header][rec]...      for every waiter (group
//!      oldest ───────────────► active               commit), segment roll, trim
//!
//!  a record's life:  appended ─► synced ─► cut into batch N ─► acked ─► trimmed
//!                              (sync)    (Cut record, durable) (Acked, durable)
//! ```
//!
//! # Durability
//!
//! Appends are buffered: [`Journal::append_write`] returns once the record is
//! in the active segment (page cache), not on disk. [`Journal::sync`] makes
//! every record up to an lsn durable; concurrent callers share one
//! `fdatasync`: the syncer thread syncs everything written when it starts, so
//! everyone who asked meanwhile is covered by that sync or the next. A FUA
//! write is `append_write` + `sync`, a FLUSH `append_flush` + `sync`.
//!
//! Why a dedicated thread: every slow file operation (fdatasync, creating a
//! segment, deleting segments) happens there, so callers on the tokio runtime
//! only copy into the page cache and await completions through a `watch`
//! channel; and one thread naturally gives group commit without a leader
//! election among callers.
//!
//! A record never spans segments. When the active segment is full the
//! syncer *rolls*: it syncs the full segment, creates the next with a header
//! that checkpoints the batch state, syncs it and the directory. Appends wait
//! meanwhile, so a segment other than the last is always complete and
//! durable: damage there is corruption, never a torn write.
//!
//! # Batches
//!
//! [`Journal::cut_batch`] seals the next batch (`State::plan_cut` in
//! `state.rs` says where it ends) by durably appending a `Cut` record naming its sequence
//! number and lsn range, so a batch re-sent after a restart
//! ([`Journal::unshipped_batches`]) is identical. Entries are coalesced:
//! overlapping writes and zeroes within the batch ship once, newest wins.
//! [`Journal::ack`] durably appends `Acked`, drops the acknowledged records
//! from the read-your-writes map, and deletes the segments no longer needed.
//!
//! # Space
//!
//! The live segments hold at most `capacity` bytes; an append that does not
//! fit waits (asynchronously) until an acknowledgement frees a segment, and
//! while one waits, [`Journal::cut_batch`] cuts regardless of age so the
//! shipper frees space soonest. `Cut` and `Acked` records (a few dozen bytes
//! per batch) never wait, so the journal can always make progress; they may
//! overshoot `capacity` by that much. While rolling, a fully acknowledged
//! segment may stay on disk next to its successor until the syncer deletes it
//! a moment later.
//!
//! # Memory
//!
//! Write data is kept in memory, newest first, up to
//! [`JournalOptions::memory_limit`] bytes (default 64 MiB); older data is
//! read back from the segment files (usually still in the page cache).
//! Besides that, the journal holds about 200 bytes per live record (a
//! 128-byte index entry, its extent in a B-tree, the memory queue) - e.g.
//! 50 MiB for a full 1 GiB journal of 4 KiB writes; capacity bounds it.
//!
//! One process at a time: the caller must not open a directory twice.
//!
//! # Recovery
//!
//! [`Journal::open`] reads every segment in order and validates every record
//! (crc, lengths, lsn sequence, batch bookkeeping). A torn or damaged tail of
//! the last segment is truncated under [`RecoveryMode::TolerateTailCorruption`]
//! (logged with what was cut); damage anywhere else is an error naming the
//! file and offset. Lsns of records lost in a crash (never synced) are
//! assigned again; every lsn that was durable is never reused.
//!
//! # Failures
//!
//! After any I/O error on the write path the journal refuses further work
//! ([`JournalError::Failed`]): a partly written record or a failed fdatasync
//! leaves the file in an unknown state (the page cache may have dropped the
//! dirty pages). Reopening recovers what is on disk.
//!
//! The format is in `record.rs`; files are reached through the small
//! `storage::Storage` trait so tests inject faults at every operation.

mod batch;
mod extents;
mod record;
mod recovery;
mod state;
/// The file-system trait the journals run over (blockcore's).
pub use blockcore::storage;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use self::batch::{coalesce, Item, Source};
use self::extents::merge_ranges;
use self::record::{Body, Record, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, WRITE_PREFIX_LEN};
use self::state::{CutPlan, RecKind, State};
use self::storage::{DiskStorage, Storage};

pub mod apply;

pub use self::recovery::{inspect, BatchReport, Inspection, SegmentReport, TailDamage};

/// Log sequence number: every record gets the previous record's + 1,
/// starting at 1.
pub type Lsn = u64;

/// The largest guest write (and so record) by default: NBD's limit.
pub const MAX_WRITE: u64 = 32 << 20;
/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
/// Default bound on write data held in memory.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;
/// Adjacent data of a batch is merged into entries of at most this size
/// (a single larger write stays one entry).
pub const MAX_ENTRY_BYTES: usize = 4 << 20;

/// Writes of up to this size are copied behind their header and written
/// with one `pwrite`; larger ones take two rather than a copy.
const COPY_LIMIT: usize = 64 << 10;

/// What to do with a damaged record at recovery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Truncate a torn or damaged tail of the last segment (where a crash
    /// during an unsynced write leaves one); anything else is an error.
    #[default]
    TolerateTailCorruption,
    /// Any damage is an error.
    AbsoluteConsistency,
}

/// The source of record timestamps (unix nanoseconds), injectable for tests.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Arc::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        }))
    }

    /// A clock reading `f`.
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Now, in unix nanoseconds.
    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

/// How to open a journal.
#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// Bound on the bytes of live segments (`--journal-size`).
    pub capacity: u64,
    /// Size at which the active segment is closed and a new one started.
    pub segment_size: u64,
    /// The largest write accepted; `capacity` and `segment_size` must hold
    /// at least one such record.
    pub max_write: u64,
    /// Bound on write data kept in memory for reads and batches.
    pub memory_limit: u64,
    pub recovery: RecoveryMode,
    pub clock: Clock,
    /// Where `fdatasync`, segment rolls and trims run.
    pub sync_mode: SyncMode,
}

/// When a batch is due ([`Journal::batch_due`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// A batch can be cut now.
    Now,
    /// The oldest uncut write reaches the age limit after this long
    /// (sooner if a flush or more data arrives).
    After(Duration),
    /// Nothing to cut until more is appended.
    OnAppend,
}

/// Where the journal's slow file operations run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// On a syncer thread of its own (group commit; callers on the tokio
    /// runtime only copy into the page cache).
    #[default]
    Thread,
    /// Inside the call that needs them, on the caller's thread: no thread,
    /// so a single-threaded simulation over in-memory storage is
    /// deterministic. Every future then completes when first polled,
    /// except appends waiting for space.
    Inline,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            capacity: 1 << 30,
            segment_size: DEFAULT_SEGMENT_SIZE,
            max_write: MAX_WRITE,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            recovery: RecoveryMode::default(),
            clock: Clock::system(),
            sync_mode: SyncMode::default(),
        }
    }
}

impl JournalOptions {
    /// Bytes of the largest record.
    fn max_record(&self) -> u64 {
        (RECORD_HEADER_LEN + WRITE_PREFIX_LEN) as u64 + self.max_write
    }

    /// The largest record body recovery accepts.
    fn max_body(&self) -> usize {
        usize::try_from(self.max_write)
            .unwrap_or(usize::MAX)
            .saturating_add(WRITE_PREFIX_LEN)
    }

    fn validate(&self) -> Result<(), JournalError> {
        let need = SEGMENT_HEADER_LEN as u64 + self.max_record();
        if self.max_write == 0 || self.max_write > u64::from(u32::MAX) - WRITE_PREFIX_LEN as u64 {
            return Err(JournalError::Config(format!(
                "max_write {} must be between 1 and {}",
                self.max_write,
                u64::from(u32::MAX) - WRITE_PREFIX_LEN as u64
            )));
        }
        if self.capacity < need {
            return Err(JournalError::Config(format!(
                "capacity {} cannot hold one record of the largest write ({} bytes) and a \
                 segment header: it must be at least {need}",
                self.capacity, self.max_write
            )));
        }
        if self.segment_size < need {
            return Err(JournalError::Config(format!(
                "segment size {} cannot hold one record of the largest write ({} bytes): it \
                 must be at least {need}",
                self.segment_size, self.max_write
            )));
        }
        Ok(())
    }
}

/// Errors of the journal; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("invalid journal configuration: {0}")]
    Config(String),
    #[error("journal {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal corrupt: {path} at offset {offset}: {why}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("journal unusable after an earlier failure ({0}); reopen it to recover")]
    Failed(Arc<str>),
    #[error("invalid {op} of {len} bytes at {offset}: {why}")]
    InvalidRequest {
        op: &'static str,
        offset: u64,
        len: u64,
        why: &'static str,
    },
    #[error("no batch {seq} to acknowledge: the newest batch cut is {newest}")]
    UnknownBatch { seq: u64, newest: u64 },
    #[error("lsn {lsn} was never appended (the newest is {newest})")]
    UnknownLsn { lsn: Lsn, newest: Lsn },
}

/// What the journal holds for one part of a [`Journal::read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceData {
    /// The newest journaled bytes.
    Data(Bytes),
    /// Journaled zeroes (trim or write-zeroes).
    Zero,
    /// Not in the journal: read from the origin (or its cache).
    Absent,
}

/// One part of a [`Journal::read`]; the parts cover the request in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub data: PieceData,
}

/// One change of a batch: an absolute overwrite of a range (blockcore's
/// type, which the link and the origin's apply journal carry too).
pub use blockcore::WriteEntry;

/// A sealed batch: the coalesced effect of records `first_lsn..=last_lsn`,
/// sorted by offset, non-overlapping. Applying it to the state after batch
/// `seq - 1` gives a crash-consistent state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub seq: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub entries: Vec<WriteEntry>,
}

impl Batch {
    /// Bytes of data the entries carry.
    pub fn data_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.data_len() as u64).sum()
    }
}

/// A snapshot of the journal's state. "Bytes" of records are their encoded
/// size in the journal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// The newest record appended, and the newest known durable.
    pub last_lsn: Lsn,
    pub durable_lsn: Lsn,
    /// Data records (writes, zeroes) not yet in any batch.
    pub uncut_records: u64,
    pub uncut_bytes: u64,
    /// Data records the origin has not acknowledged (cut or not): what the
    /// edge alone holds.
    pub unshipped_records: u64,
    pub unshipped_bytes: u64,
    /// Batches cut and not acknowledged.
    pub batches_in_flight: u64,
    pub last_cut_seq: u64,
    pub acked_seq: u64,
    /// Age of the oldest unacknowledged write: the real recovery point.
    pub oldest_unshipped_age: Option<Duration>,
    /// Bytes of live segments, against the capacity.
    pub used_bytes: u64,
    pub capacity: u64,
    pub segments: u64,
    /// Write data held in memory, and extents in the read-your-writes map
    /// (with the live records, what the journal's memory grows with).
    pub memory_bytes: u64,
    pub extents: u64,
    /// Appends waiting for space.
    pub appends_waiting: u64,
    /// `fdatasync` calls on segments so far.
    pub syncs: u64,
}

/// What the syncer publishes to waiters.
#[derive(Clone, Debug, Default)]
struct Progress {
    synced: Lsn,
    trimmed: u64,
    failed: Option<Arc<str>>,
}

/// Everything behind the lock.
#[derive(Debug)]
struct Inner {
    st: State,
    failed: Option<Arc<str>>,
    /// The syncer's work: sync up to this lsn, roll, trim, stop.
    sync_requested: Lsn,
    synced_lsn: Lsn,
    rolling: bool,
    trim_wanted: u64,
    trimmed: u64,
    shutdown: bool,
    space_waiters: u64,
    syncs: u64,
}

/// Where an append can go now.
enum Place {
    Here,
    Roll,
    WaitSpace,
    Wait,
}

impl Inner {
    fn check(&self) -> Result<(), JournalError> {
        match &self.failed {
            Some(why) => Err(JournalError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    fn place(&self, size: u64, meta: bool, opts: &JournalOptions) -> Place {
        if self.rolling {
            return Place::Wait;
        }
        let active = self.st.segments.back().expect("a live segment");
        let fits = active.len + size <= opts.segment_size;
        if meta {
            return if fits { Place::Here } else { Place::Roll };
        }
        if fits && self.st.used + size <= opts.capacity {
            return Place::Here;
        }
        // Rolling frees the active segment once it is done (and an empty
        // one has nothing to roll away from: its successor would have the
        // same first lsn).
        let after_roll = self.st.used - self.st.reclaimable() + SEGMENT_HEADER_LEN as u64 + size;
        if active.records > 0
            && (!fits || self.st.segment_done(active))
            && after_roll <= opts.capacity
        {
            Place::Roll
        } else {
            Place::WaitSpace
        }
    }
}

/// A record to append, owning its data.
enum NewRecord {
    Write { offset: u64, data: Bytes },
    Zero { offset: u64, len: u64 },
    Flush,
    Cut(CutPlan),
    Acked { seq: u64, last_lsn: Lsn },
}

impl NewRecord {
    fn body(&self) -> Body<'_> {
        match self {
            NewRecord::Write { offset, data } => Body::Write {
                offset: *offset,
                data,
            },
            NewRecord::Zero { offset, len } => Body::Zero {
                offset: *offset,
                len: *len,
            },
            NewRecord::Flush => Body::Flush,
            NewRecord::Cut(p) => Body::Cut {
                seq: p.seq,
                first_lsn: p.first_lsn,
                last_lsn: p.last_lsn,
            },
            NewRecord::Acked { seq, last_lsn } => Body::Acked {
                seq: *seq,
                last_lsn: *last_lsn,
            },
        }
    }

    /// Bookkeeping records never wait for space (see the module docs).
    fn is_meta(&self) -> bool {
        matches!(self, NewRecord::Cut(_) | NewRecord::Acked { .. })
    }
}

#[derive(Debug)]
struct Shared {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    opts: JournalOptions,
    inner: Mutex<Inner>,
    /// Wakes the syncer.
    work: Condvar,
    progress: watch::Sender<Progress>,
    /// Woken on every data append, failure, and when an append starts
    /// waiting for space (for [`Journal::wait_batch_ready`]).
    appended: Notify,
    /// One cut at a time (so plan and Cut record agree), one ack at a time
    /// (so Acked records stay in order).
    cut_lock: tokio::sync::Mutex<()>,
    ack_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, g: &Inner) {
        self.progress.send_modify(|p| {
            p.synced = g.synced_lsn;
            p.trimmed = g.trimmed;
            p.failed.clone_from(&g.failed);
        });
    }

    /// Marks the journal failed (the first failure wins) and wakes everyone.
    fn fail(&self, g: &mut Inner, op: &'static str, path: &Path, err: io::Error) -> JournalError {
        tracing::error!(op, path = %path.display(), error = %err, "journal failed");
        if g.failed.is_none() {
            g.failed = Some(format!("{op} {}: {err}", path.display()).into());
        }
        self.publish(g);
        self.work.notify_all();
        self.appended.notify_waiters();
        JournalError::Io {
            op,
            path: path.to_owned(),
            source: err,
        }
    }

    fn now(&self) -> u64 {
        self.opts.clock.now()
    }

    /// In [`SyncMode::Inline`], does the syncer's pending work now. Call
    /// with the lock released, after asking for work.
    fn inline_work(&self) {
        if self.opts.sync_mode == SyncMode::Inline {
            syncer::run_inline(self);
        }
    }
}

/// Counts an append waiting for space while it waits (cancellation too).
struct SpaceWait<'a> {
    shared: &'a Shared,
    counted: bool,
}

impl SpaceWait<'_> {
    fn start(&mut self, g: &mut Inner) {
        if !self.counted {
            self.counted = true;
            g.space_waiters += 1;
            // The shipper cuts regardless of age while appends wait.
            self.shared.appended.notify_waiters();
        }
        // A done segment awaiting deletion (deletion goes oldest first):
        // make sure a trim round runs.
        let front = g.st.segments.front().expect("a live segment");
        if g.st.segments.len() > 1 && g.st.segment_done(front) {
            g.trim_wanted += 1;
            self.shared.work.notify_one();
        }
    }

    fn stop(&mut self, g: &mut Inner) {
        if self.counted {
            self.counted = false;
            g.space_waiters -= 1;
        }
    }
}

impl Drop for SpaceWait<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.shared.lock().space_waiters -= 1;
        }
    }
}

/// The write-behind journal. Thread-safe; share it in an `Arc`.
///
/// The async methods need no particular executor except
/// [`Journal::wait_batch_ready`] (tokio timers). Appends, [`Journal::read`]
/// and batch building do their `pwrite`/`pread` on the caller's thread, as
/// blockcore's file backend does for small buffered writes.
pub struct Journal {
    shared: Arc<Shared>,
    syncer: Option<JoinHandle<()>>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, recovering what is
    /// there. Blocking: it reads every segment.
    pub fn open(dir: impl AsRef<Path>, options: JournalOptions) -> Result<Self, JournalError> {
        Self::open_with(Arc::new(DiskStorage), dir.as_ref(), options)
    }

    /// Opens the journal over another [`Storage`] (the simulator's, or a
    /// fault-injecting one).
    pub fn open_with(
        storage: Arc<dyn Storage>,
        dir: &Path,
        opts: JournalOptions,
    ) -> Result<Self, JournalError> {
        opts.validate()?;
        let st = recovery::open_state(storage.as_ref(), dir, &opts)?;
        let synced = st.next_lsn - 1;
        let inner = Inner {
            st,
            failed: None,
            sync_requested: synced,
            synced_lsn: synced,
            rolling: false,
            // Delete any segments recovery found fully acknowledged.
            trim_wanted: 1,
            trimmed: 0,
            shutdown: false,
            space_waiters: 0,
            syncs: 0,
        };
        let (progress, _) = watch::channel(Progress {
            synced,
            trimmed: 0,
            failed: None,
        });
        let shared = Arc::new(Shared {
            storage,
            dir: dir.to_owned(),
            opts,
            inner: Mutex::new(inner),
            work: Condvar::new(),
            progress,
            appended: Notify::new(),
            cut_lock: tokio::sync::Mutex::new(()),
            ack_lock: tokio::sync::Mutex::new(()),
        });
        let syncer = match shared.opts.sync_mode {
            SyncMode::Thread => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("journal-sync".into())
                        .spawn(move || syncer::run(&s))
                        .map_err(|source| JournalError::Io {
                            op: "spawn the syncer thread for",
                            path: dir.to_owned(),
                            source,
                        })?,
                )
            }
            SyncMode::Inline => {
                shared.inline_work();
                None
            }
        };
        Ok(Self { shared, syncer })
    }

    /// Journals a guest write (buffered; see [`Journal::sync`]). `data` is
    /// kept, not copied, while within the memory bound: pass a buffer of its
    /// own, not a slice of a much larger one.
    pub async fn append_write(&self, offset: u64, data: Bytes) -> Result<Lsn, JournalError> {
        let len = data.len() as u64;
        Self::check_range("write", offset, len)?;
        if len > self.shared.opts.max_write {
            return Err(JournalError::InvalidRequest {
                op: "write",
                offset,
                len,
                why: "larger than max_write",
            });
        }
        self.append(NewRecord::Write { offset, data }).await
    }

    /// Journals a trim or write-zeroes: the range reads as zeroes.
    pub async fn append_zero(&self, offset: u64, len: u64) -> Result<Lsn, JournalError> {
        Self::check_range("zero", offset, len)?;
        self.append(NewRecord::Zero { offset, len }).await
    }

    /// Journals that a FLUSH was answered here: a batch boundary. Follow it
    /// with [`Journal::sync`] before answering the FLUSH.
    pub async fn append_flush(&self) -> Result<Lsn, JournalError> {
        self.append(NewRecord::Flush).await
    }

    fn check_range(op: &'static str, offset: u64, len: u64) -> Result<(), JournalError> {
        let why = if len == 0 {
            "empty"
        } else if offset.checked_add(len).is_none() {
            "range overflows u64"
        } else {
            return Ok(());
        };
        Err(JournalError::InvalidRequest {
            op,
            offset,
            len,
            why,
        })
    }

    async fn append(&self, rec: NewRecord) -> Result<Lsn, JournalError> {
        let size = (RECORD_HEADER_LEN + rec.body().len_for_size()) as u64;
        let meta = rec.is_meta();
        let shared = &*self.shared;
        let mut rx = shared.progress.subscribe();
        let mut space = SpaceWait {
            shared,
            counted: false,
        };
        loop {
            // Any progress after this point wakes us, so a change between
            // the check below and the await is not missed.
            rx.mark_unchanged();
            {
                let mut g = shared.lock();
                g.check()?;
                match g.place(size, meta, &shared.opts) {
                    Place::Here => {
                        space.stop(&mut g);
                        let lsn = Self::write_record(shared, &mut g, &rec, size)?;
                        drop(g);
                        if !meta {
                            shared.appended.notify_waiters();
                        }
                        return Ok(lsn);
                    }
                    Place::Roll => {
                        g.rolling = true;
                        shared.work.notify_one();
                    }
                    Place::WaitSpace => space.start(&mut g),
                    Place::Wait => {}
                }
            }
            shared.inline_work();
            if rx.changed().await.is_err() {
                return Err(JournalError::Failed("the journal is closed".into()));
            }
        }
    }

    /// Writes one record at the end of the active segment and takes it into
    /// the state.
    fn write_record(
        shared: &Shared,
        g: &mut Inner,
        rec: &NewRecord,
        size: u64,
    ) -> Result<Lsn, JournalError> {
        let lsn = g.st.next_lsn;
        let timestamp = shared.now().max(g.st.last_ts);
        let record = Record {
            lsn,
            timestamp,
            body: rec.body(),
        };
        debug_assert_eq!(record.encoded_len() as u64, size);
        let mut buf = record.encode_prefix();
        let data_pos = g.st.segments.back().expect("a live segment").len + buf.len() as u64;
        let seg = g.st.segments.back().expect("a live segment");
        let (file, pos) = (seg.file.clone(), seg.len);
        let data: &[u8] = match rec {
            NewRecord::Write { data, .. } => data,
            _ => &[],
        };
        let written = if data.len() <= COPY_LIMIT {
            buf.extend_from_slice(data);
            file.write_all_at(&buf, pos)
        } else {
            file.write_all_at(&buf, pos)
                .and_then(|()| file.write_all_at(data, data_pos))
        };
        if let Err(e) = written {
            let path = seg.path.clone();
            return Err(shared.fail(g, "append to", &path, e));
        }
        let mem = match rec {
            NewRecord::Write { data, .. } => Some(data.clone()),
            _ => None,
        };
        if let Err(why) = g.st.note_record(&record, data_pos, size, mem) {
            // The record was built from this very state: a bug.
            let path = g.st.segments.back().expect("a live segment").path.clone();
            return Err(shared.fail(g, "account for", &path, io::Error::other(why)));
        }
        Ok(lsn)
    }

    /// Makes every record up to `lsn` durable. Concurrent callers share one
    /// `fdatasync`.
    pub async fn sync(&self, lsn: Lsn) -> Result<(), JournalError> {
        let shared = &*self.shared;
        let mut rx = shared.progress.subscribe();
        {
            let mut g = shared.lock();
            g.check()?;
            if lsn >= g.st.next_lsn {
                return Err(JournalError::UnknownLsn {
                    lsn,
                    newest: g.st.next_lsn - 1,
                });
            }
            if lsn <= g.synced_lsn {
                return Ok(());
            }
            if lsn > g.sync_requested {
                g.sync_requested = lsn;
                shared.work.notify_one();
            }
        }
        shared.inline_work();
        let p = rx
            .wait_for(|p| p.synced >= lsn || p.failed.is_some())
            .await
            .map_err(|_| JournalError::Failed("the journal is closed".into()))?;
        if p.synced >= lsn {
            Ok(())
        } else {
            Err(JournalError::Failed(p.failed.clone().expect("checked")))
        }
    }

    /// Makes every record appended so far durable; returns the newest lsn.
    pub async fn sync_all(&self) -> Result<Lsn, JournalError> {
        let last = self.shared.lock().st.next_lsn - 1;
        if last > 0 {
            self.sync(last).await?;
        }
        Ok(last)
    }

    /// What the journal holds for `offset..offset + len`: pieces covering
    /// the range in order. Data not held in memory is read from the
    /// segment files on this thread.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<Piece>, JournalError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset
            .checked_add(len)
            .ok_or(JournalError::InvalidRequest {
                op: "read",
                offset,
                len,
                why: "range overflows u64",
            })?;
        let mut pieces: Vec<Piece> = Vec::new();
        let mut reads = Vec::new();
        {
            let g = self.shared.lock();
            let push = |pieces: &mut Vec<Piece>, offset: u64, len: u64, data: PieceData| {
                if let Some(last) = pieces.last_mut() {
                    let same = matches!(
                        (&last.data, &data),
                        (PieceData::Zero, PieceData::Zero) | (PieceData::Absent, PieceData::Absent)
                    );
                    if same && last.offset + last.len == offset {
                        last.len += len;
                        return;
                    }
                }
                pieces.push(Piece { offset, len, data });
            };
            let mut cursor = offset;
            for (s, e, ext) in g.st.extents.overlapping(offset, end) {
                if s > cursor {
                    push(&mut pieces, cursor, s - cursor, PieceData::Absent);
                }
                match ext.data_off {
                    None => push(&mut pieces, s, e - s, PieceData::Zero),
                    Some(off) => {
                        let rec = g.st.record(ext.lsn).expect("extents name live records");
                        let (a, b) = (
                            usize::try_from(off).expect("in memory"),
                            usize::try_from(off + e - s).expect("in memory"),
                        );
                        if let Some(m) = &rec.mem {
                            push(&mut pieces, s, e - s, PieceData::Data(m.slice(a..b)));
                        } else {
                            reads.push((pieces.len(), rec.file.clone(), rec.data_pos + off));
                            push(&mut pieces, s, e - s, PieceData::Data(Bytes::new()));
                        }
                    }
                }
                cursor = e;
            }
            if cursor < end {
                push(&mut pieces, cursor, end - cursor, PieceData::Absent);
            }
        }
        for (i, file, pos) in reads {
            let mut buf = vec![0; usize::try_from(pieces[i].len).expect("in memory")];
            file.read_exact_at(&mut buf, pos)
                .map_err(|source| JournalError::Io {
                    op: "read back",
                    path: self.shared.dir.clone(),
                    source,
                })?;
            pieces[i].data = PieceData::Data(buf.into());
        }
        Ok(pieces)
    }

    /// Seals the next batch if one is due (see the module docs): appends a
    /// durable `Cut` record and returns the batch. `max_bytes` bounds the
    /// journal bytes of a batch (one larger record is a batch alone);
    /// `max_age` is the RPO: uncut data older than that is cut even without
    /// a flush. If the returned future is dropped after the cut, the batch
    /// is still cut: [`Journal::unshipped_batches`] returns it.
    pub async fn cut_batch(
        &self,
        max_bytes: u64,
        max_age: Duration,
    ) -> Result<Option<Batch>, JournalError> {
        let _one_at_a_time = self.shared.cut_lock.lock().await;
        let plan = {
            let g = self.shared.lock();
            g.check()?;
            g.st.plan_cut(
                max_bytes,
                nanos(max_age),
                self.shared.now(),
                g.space_waiters > 0,
            )
        };
        let Some(plan) = plan else {
            return Ok(None);
        };
        let lsn = self.append(NewRecord::Cut(plan)).await?;
        let items = batch_items(&self.shared.lock().st, plan.first_lsn, plan.last_lsn);
        let batch = self.coalesce(plan.seq, plan.first_lsn, plan.last_lsn, &items)?;
        self.sync(lsn).await?;
        Ok(Some(batch))
    }

    /// Waits until [`Journal::cut_batch`] with these limits would cut a
    /// batch: a flush after data, more than `max_bytes`, data older than
    /// `max_age`, or appends waiting for space. Uses tokio's timer. (If
    /// everything is cut already, appends waiting for space wait for
    /// acknowledgements, which this does not wait for.)
    pub async fn wait_batch_ready(
        &self,
        max_bytes: u64,
        max_age: Duration,
    ) -> Result<(), JournalError> {
        loop {
            let notified = self.shared.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.batch_due(max_bytes, max_age)? {
                Due::Now => return Ok(()),
                Due::After(d) => {
                    tokio::select! {
                        biased;
                        () = &mut notified => {}
                        () = tokio::time::sleep(d) => {}
                    }
                }
                Due::OnAppend => notified.await,
            }
        }
    }

    /// When [`Journal::cut_batch`] with these limits would cut a batch,
    /// as far as the journal knows now (see [`Journal::wait_batch_ready`]).
    pub fn batch_due(&self, max_bytes: u64, max_age: Duration) -> Result<Due, JournalError> {
        let age = nanos(max_age);
        let g = self.shared.lock();
        g.check()?;
        let now = self.shared.now();
        if g.st
            .plan_cut(max_bytes, age, now, g.space_waiters > 0)
            .is_some()
        {
            return Ok(Due::Now);
        }
        Ok(g.st
            .oldest_data_after(g.st.log.cut_last_lsn)
            .map_or(Due::OnAppend, |ts| {
                Due::After(Duration::from_nanos(
                    ts.saturating_add(age).saturating_sub(now),
                ))
            }))
    }

    /// The batches cut and not acknowledged, oldest first, exactly as they
    /// were (or would have been) returned by [`Journal::cut_batch`]: for
    /// re-shipping after a reconnect or restart.
    pub fn unshipped_batches(&self) -> Result<Vec<Batch>, JournalError> {
        // One look at the state for all of them, so an ack racing this
        // cannot trim records out from under a batch being described.
        let batches: Vec<_> = {
            let g = self.shared.lock();
            g.check()?;
            g.st.in_flight
                .iter()
                .map(|b| (*b, batch_items(&g.st, b.first_lsn, b.last_lsn)))
                .collect()
        };
        batches
            .into_iter()
            .map(|(b, items)| self.coalesce(b.seq, b.first_lsn, b.last_lsn, &items))
            .collect()
    }

    fn coalesce(
        &self,
        seq: u64,
        first_lsn: Lsn,
        last_lsn: Lsn,
        items: &[Item],
    ) -> Result<Batch, JournalError> {
        let entries = coalesce(items).map_err(|source| JournalError::Io {
            op: "read back batch data from",
            path: self.shared.dir.clone(),
            source,
        })?;
        Ok(Batch {
            seq,
            first_lsn,
            last_lsn,
            entries,
        })
    }

    /// Records that the origin durably applied every batch up to `seq`
    /// (acknowledgements are cumulative; repeating one is harmless). Appends
    /// a durable `Acked` record, forgets the acknowledged records and
    /// deletes the segments no longer needed. Returns the guest ranges the
    /// journal no longer covers at all (no newer write holds them), so the
    /// caller can refresh its cache for them.
    pub async fn ack(&self, seq: u64) -> Result<Vec<Range<u64>>, JournalError> {
        let _in_order = self.shared.ack_lock.lock().await;
        let last_lsn = {
            let g = self.shared.lock();
            g.check()?;
            if seq <= g.st.acked_seq {
                return Ok(Vec::new());
            }
            if seq > g.st.log.cut_seq {
                return Err(JournalError::UnknownBatch {
                    seq,
                    newest: g.st.log.cut_seq,
                });
            }
            g.st.in_flight
                .iter()
                .find(|b| b.seq == seq)
                .expect("batches after the acknowledged one are in flight")
                .last_lsn
        };
        let lsn = self.append(NewRecord::Acked { seq, last_lsn }).await?;
        self.sync(lsn).await?;
        let mut rx = self.shared.progress.subscribe();
        let (ended, wanted) = {
            let mut g = self.shared.lock();
            let ended = g.st.apply_ack(seq, last_lsn);
            g.trim_wanted += 1;
            self.shared.work.notify_one();
            (ended, g.trim_wanted)
        };
        self.shared.inline_work();
        let p = rx
            .wait_for(|p| p.trimmed >= wanted || p.failed.is_some())
            .await
            .map_err(|_| JournalError::Failed("the journal is closed".into()))?;
        if let Some(why) = &p.failed {
            return Err(JournalError::Failed(why.clone()));
        }
        Ok(merge_ranges(ended))
    }

    /// Data records at or before `lsn` that the origin has not yet
    /// acknowledged: what a barrier taken at `lsn` still waits for.
    pub fn unshipped_through(&self, lsn: Lsn) -> u64 {
        let g = self.shared.lock();
        let st = &g.st;
        let acked = st.acked_last_lsn;
        if lsn <= acked {
            return 0;
        }
        st.cum_at(lsn).1.saturating_sub(st.cum_at(acked).1)
    }

    /// A snapshot of the journal's counters.
    pub fn stats(&self) -> JournalStats {
        let g = self.shared.lock();
        let st = &g.st;
        let (uncut_bytes, uncut_records) = st.uncut();
        let (unshipped_bytes, unshipped_records) = st.data_after(st.acked_last_lsn);
        let now = self.shared.now();
        JournalStats {
            last_lsn: st.next_lsn - 1,
            durable_lsn: g.synced_lsn,
            uncut_records,
            uncut_bytes,
            unshipped_records,
            unshipped_bytes,
            batches_in_flight: st.in_flight.len() as u64,
            last_cut_seq: st.log.cut_seq,
            acked_seq: st.acked_seq,
            oldest_unshipped_age: st
                .oldest_data_after(st.acked_last_lsn)
                .map(|ts| Duration::from_nanos(now.saturating_sub(ts))),
            used_bytes: st.used,
            capacity: self.shared.opts.capacity,
            segments: st.segments.len() as u64,
            memory_bytes: st.mem_bytes,
            extents: st.extents.len() as u64,
            appends_waiting: g.space_waiters,
            syncs: g.syncs,
        }
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What the origin's numbering of write batches adds to this
    /// journal's (kept in `link-seq-offset` beside the segments; 0 if it
    /// was never set). A journal numbers its batches from 1; the volume's
    /// sequence at the origin goes on across edges, so an edge that starts
    /// with a new journal, or comes back after another edge wrote, ships
    /// its batch `s` as the origin's `s + offset`.
    pub fn link_seq_offset(&self) -> Result<i64, JournalError> {
        let path = self.shared.dir.join(SEQ_OFFSET_FILE);
        let io = |source| JournalError::Io {
            op: "read",
            path: path.clone(),
            source,
        };
        match storage::read_file(self.shared.storage.as_ref(), &path).map_err(io)? {
            None => Ok(0),
            Some(b) => {
                let bytes: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                    io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} bytes, expected 8", b.len()),
                    ))
                })?;
                Ok(i64::from_be_bytes(bytes))
            }
        }
    }

    /// Sets [`Journal::link_seq_offset`], atomically and durably.
    pub fn set_link_seq_offset(&self, offset: i64) -> Result<(), JournalError> {
        let path = self.shared.dir.join(SEQ_OFFSET_FILE);
        storage::replace_file(self.shared.storage.as_ref(), &path, &offset.to_be_bytes()).map_err(
            |source| JournalError::Io {
                op: "write",
                path: path.clone(),
                source,
            },
        )
    }
}

/// See [`Journal::link_seq_offset`].
const SEQ_OFFSET_FILE: &str = "link-seq-offset";

/// The data records of a batch, oldest first, with where their data is.
fn batch_items(st: &State, first_lsn: Lsn, last_lsn: Lsn) -> Vec<Item> {
    let start = first_lsn.max(st.records.front().map_or(first_lsn, |r| r.lsn));
    (start..=last_lsn)
        .filter_map(|lsn| st.record(lsn))
        .filter_map(|r| {
            let source = match r.kind {
                RecKind::Write { .. } => Some(match &r.mem {
                    Some(m) => Source::Mem(m.clone()),
                    None => Source::File(r.file.clone(), r.data_pos),
                }),
                RecKind::Zero { .. } => None,
                _ => return None,
            };
            let (offset, end) = r.kind.range()?;
            Some(Item {
                offset,
                end,
                source,
            })
        })
        .collect()
}

impl Drop for Journal {
    /// Syncs what was appended (unless the journal failed) and stops the
    /// syncer thread.
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock();
            g.shutdown = true;
            g.sync_requested = g.st.next_lsn - 1;
        }
        self.shared.work.notify_all();
        self.shared.inline_work();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

impl Body<'_> {
    /// Body bytes, for sizing a record before it has an lsn.
    fn len_for_size(&self) -> usize {
        Record {
            lsn: 0,
            timestamp: 0,
            body: *self,
        }
        .encoded_len()
            - RECORD_HEADER_LEN
    }
}

mod syncer {
    //! The syncer thread: group commit, segment rolls and trimming.

    use std::sync::Arc;

    use super::record::{Checkpoint, SEGMENT_HEADER_LEN};
    use super::recovery::create_segment;
    use super::storage::StorageFile;
    use super::{Inner, Lsn, Shared};

    /// One round's work, taken under the lock.
    struct Round {
        target: Lsn,
        files: Vec<(Lsn, Arc<dyn StorageFile>, u64)>,
        roll: Option<(Lsn, Checkpoint)>,
        trim: u64,
        last: bool,
    }

    fn has_work(g: &Inner) -> bool {
        g.shutdown
            || (g.failed.is_none()
                && (g.sync_requested > g.synced_lsn || g.rolling || g.trim_wanted > g.trimmed))
    }

    /// The syncer thread's body.
    pub(super) fn run(shared: &Arc<Shared>) {
        let mut g = shared.lock();
        loop {
            while !has_work(&g) {
                g = shared
                    .work
                    .wait(g)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            match round(shared, g) {
                Some(next) => g = next,
                None => return,
            }
        }
    }

    /// [`super::SyncMode::Inline`]: does whatever work is pending, on the
    /// caller's thread.
    pub(super) fn run_inline(shared: &Shared) {
        let mut g = shared.lock();
        while has_work(&g) {
            match round(shared, g) {
                Some(next) => g = next,
                None => return,
            }
        }
    }

    /// One round: sync, roll, trim. `None`: the syncer is done for good
    /// (the journal failed or is closing).
    fn round<'a>(
        shared: &'a Shared,
        mut g: std::sync::MutexGuard<'a, Inner>,
    ) -> Option<std::sync::MutexGuard<'a, Inner>> {
        {
            if g.failed.is_some() {
                return None;
            }
            let round = Round {
                target: g.st.next_lsn - 1,
                files: g
                    .st
                    .segments
                    .iter()
                    .filter(|s| s.synced_len < s.len)
                    .map(|s| (s.first_lsn, s.file.clone(), s.len))
                    .collect(),
                roll: g.rolling.then_some((g.st.next_lsn, g.st.log)),
                trim: g.trim_wanted,
                last: g.shutdown,
            };
            let dir = shared.dir.clone();
            drop(g);

            // Phase 1: sync, and roll (the full segment first, so a
            // segment before the last is always complete on disk).
            let mut synced = 0;
            let mut err = None;
            for (first, file, _) in &round.files {
                if let Err(e) = file.sync_data() {
                    err = Some(("sync", dir.join(super::recovery::segment_name(*first)), e));
                    break;
                }
                synced += 1;
            }
            let mut rolled = None;
            if err.is_none() {
                if let Some((first, checkpoint)) = round.roll {
                    match create_segment(shared.storage.as_ref(), &dir, first, checkpoint) {
                        Ok(seg) => rolled = Some(seg),
                        Err(e) => err = Some(e),
                    }
                }
            }
            g = shared.lock();
            g.syncs += synced;
            if let Some((op, path, e)) = err {
                shared.fail(&mut g, op, &path, e);
                return None;
            }
            for (first, _, len) in &round.files {
                if let Some(s) = g.st.segments.iter_mut().find(|s| s.first_lsn == *first) {
                    s.synced_len = s.synced_len.max(*len);
                }
            }
            g.synced_lsn = g.synced_lsn.max(round.target);
            if let Some(seg) = rolled {
                g.st.used += SEGMENT_HEADER_LEN as u64;
                g.st.segments.push_back(seg);
                g.rolling = false;
            }
            shared.publish(&g);

            // Phase 2: delete the oldest segments nothing needs any more
            // (never the active one), oldest first so a crash midway leaves
            // a contiguous log.
            let n = g.st.segments.len();
            let doomed: Vec<_> =
                g.st.segments
                    .iter()
                    .take(n - 1)
                    .take_while(|s| g.st.segment_done(s))
                    .map(|s| s.path.clone())
                    .collect();
            if !doomed.is_empty() {
                drop(g);
                let mut removed = 0;
                let mut err = None;
                for path in &doomed {
                    match shared.storage.remove(path) {
                        Ok(()) => removed += 1,
                        Err(e) => {
                            err = Some(("delete", path.clone(), e));
                            break;
                        }
                    }
                }
                if err.is_none() {
                    if let Err(e) = shared.storage.sync_dir(&dir) {
                        err = Some(("sync directory", dir.clone(), e));
                    }
                }
                g = shared.lock();
                for _ in 0..removed {
                    g.st.pop_front_segment();
                }
                if let Some((op, path, e)) = err {
                    shared.fail(&mut g, op, &path, e);
                    return None;
                }
                tracing::debug!(segments = removed, "journal trimmed");
            }
            g.trimmed = g.trimmed.max(round.trim);
            shared.publish(&g);
            if round.last && g.sync_requested <= g.synced_lsn {
                return None;
            }
        }
        Some(g)
    }
}
