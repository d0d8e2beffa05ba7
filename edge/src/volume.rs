//! [`EdgeVolume`]: what happens to a guest's reads and writes on the edge,
//! and to batches once the origin applied them, over any read-through
//! layer (the encrypted cache over the origin in production, a model in
//! the simulator).
//!
//! ```text
//!   read  ──> journal (read-your-writes) ──> absent parts: cache ──> origin
//!   write / trim / zero ──> journal (acknowledged once appended;
//!                           FUA and FLUSH wait for fdatasync)
//!   cut ──> a batch, its ranges remembered until applied
//!   applied(seq) ──> ranges logged (pushes older than them are refused)
//!                ──> chunks dropped from the cache ──> journal.ack(seq)
//!   push(offset, as_of, data) ──> cache, unless a batch applied after
//!                                 `as_of` touched the range
//! ```
//!
//! Why the cache never serves data older than the edge's own writes: a
//! chunk may be cached from the origin while a newer write sits in the
//! journal, but reads consult the journal first, so that write masks it.
//! When the origin acknowledges a batch, its chunks are dropped from the
//! cache *before* the journal lets go of them, so after that every read of
//! them goes to the origin, which has the data. A fill racing this (a
//! demand read or a push begun earlier) is refused by the cache layer's
//! mutation counters, taken before the data was asked for.
//!
//! Pushes need one rule more: the origin reads a push concurrently with
//! applies, so its data may predate a batch the edge has already seen
//! applied (the push was read before the batch and arrived after the
//! ack). Every push carries `as_of`, the newest batch applied when it was
//! read; the edge keeps the ranges of recently applied batches and drops a
//! push that overlaps any applied after `as_of` (or older than the log
//! remembers). The ranges are logged before the cache is invalidated, so a
//! push checked after the log grew is refused by the log, and one checked
//! before by the mutation counters.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use blockcore::{BlockError, Extent, Op, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};
use journal::{Batch, Journal, JournalError, Lsn, PieceData};
use link::session::Mistakes;

use crate::migrate::{local_block_error, CopySource, LocalCopy};

/// What the edge reads through: the cache over the origin.
#[async_trait]
pub trait ReadThrough: Send + Sync + 'static {
    /// The layer's mutation counters at one moment (see [`ReadThrough::offer`]).
    type Snapshot: Send + Sync;

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes>;
    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()>;
    /// Drops cached data of the range (and refuses fills of it begun
    /// before).
    async fn invalidate(&self, offset: u64, len: u64) -> blockcore::Result<()>;
    fn snapshot(&self, offset: u64, len: u64) -> Self::Snapshot;
    /// Offers data obtained outside the layer (a push) for caching, kept
    /// only where nothing changed since `since` was taken.
    async fn offer(&self, offset: u64, data: Bytes, since: &Self::Snapshot);
    /// The range's bytes if the layer holds all of them, without reading
    /// through (what a migration copies without crossing the link).
    async fn read_cached(&self, _offset: u64, _len: usize) -> blockcore::Result<Option<Bytes>> {
        Ok(None)
    }
    /// The byte ranges of the range the layer does not hold (all of it,
    /// for a layer that cannot tell).
    async fn missing(&self, offset: u64, len: u64) -> blockcore::Result<Vec<(u64, u64)>> {
        Ok(vec![(offset, len)])
    }
}

/// Where a migration's copy gets what neither the journal nor the cache
/// holds: the origin, in the link's background class so the copy never
/// queues ahead of the guest's demand reads.
#[async_trait]
pub trait MirrorSource: Send + Sync {
    /// The origin's allocation of the range, and the newest batch the
    /// edge had seen applied when it asked (the map is trusted for a chunk
    /// only if no batch applied since touched it).
    async fn allocation(&self, offset: u64, len: u64) -> blockcore::Result<(Vec<Extent>, u64)>;
    /// The range's bytes from the origin: pieces in order, each read
    /// there with every batch up to its `as_of` applied.
    async fn fetch(&self, offset: u64, len: u64) -> blockcore::Result<Vec<Fetched>>;
}

/// A piece of data a [`MirrorSource`] fetched.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub offset: u64,
    pub as_of: u64,
    pub data: Bytes,
}

/// What copying one chunk came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Local now.
    Copied { source: CopySource, bytes: u64 },
    /// Already local or being copied by another task.
    Skipped,
    /// A guest write or a newer batch overtook the copy: try again.
    Overtaken,
}

/// How much of the origin's allocation map the copy asks for at a time.
const ALLOCATION_WINDOW: u64 = 1 << 30;

/// A window of the origin's allocation map, as the copy last asked for it.
#[derive(Debug, Default)]
pub struct AllocationWindow {
    extents: Vec<Extent>,
    /// The newest batch applied the edge had seen when it asked.
    as_of: u64,
}

impl AllocationWindow {
    fn covers(&self, offset: u64, len: u64) -> bool {
        let end = self.extents.last().map_or(0, |e| e.offset + e.len);
        self.extents.first().is_some_and(|e| e.offset <= offset) && offset + len <= end
    }

    /// Whether the extents cover the range without a gap and all read as
    /// zero.
    fn reads_zero(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let mut at = offset;
        for e in &self.extents {
            let e_end = e.offset + e.len;
            if e_end <= at {
                continue;
            }
            if e.offset > at || !e.kind.reads_zero() {
                return false;
            }
            at = e_end;
            if at >= end {
                return true;
            }
        }
        false
    }
}

/// Writes up to this size are copied into a buffer of their own before the
/// journal keeps them (see [`EdgeVolume::write`]).
const JOURNAL_COPY_MAX: usize = 256 << 10;

/// Applied batches whose ranges are remembered for the push rule, at
/// most; older pushes are refused.
const ACKED_LOG_BATCHES: usize = 4096;

/// The ranges of recently applied batches (see the module docs).
#[derive(Debug)]
struct AckedLog {
    batches: VecDeque<(u64, Vec<(u64, u64)>)>,
    /// Batches before this one are forgotten.
    first: u64,
    /// The newest batch applied.
    newest: u64,
}

impl AckedLog {
    fn new(acked: u64) -> Self {
        AckedLog {
            batches: VecDeque::new(),
            first: acked + 1,
            newest: acked,
        }
    }

    fn record(&mut self, seq: u64, ranges: Vec<(u64, u64)>) {
        if seq <= self.newest {
            return;
        }
        self.newest = seq;
        self.batches.push_back((seq, ranges));
        while self.batches.len() > ACKED_LOG_BATCHES {
            if let Some((old, _)) = self.batches.pop_front() {
                self.first = old + 1;
            }
        }
    }

    /// Whether data read with every batch up to `as_of` applied is still
    /// current for `[offset, offset + len)`.
    fn current(&self, as_of: u64, offset: u64, len: u64) -> bool {
        if as_of >= self.newest {
            return true;
        }
        if as_of + 1 < self.first {
            return false;
        }
        let end = offset.saturating_add(len);
        !self
            .batches
            .iter()
            .filter(|(seq, _)| *seq > as_of)
            .any(|(_, ranges)| ranges.iter().any(|&(s, e)| s < end && offset < e))
    }
}

#[derive(Debug)]
struct ShipState {
    /// Batches cut and not yet applied: their ranges.
    cut: BTreeMap<u64, Vec<(u64, u64)>>,
    /// The same batches' last journal records.
    cut_last_lsn: BTreeMap<u64, Lsn>,
    acked: AckedLog,
}

/// Journaled writes still on their way into the local copy, by journal
/// record: the journal may not forget a batch before its writes are in the
/// copy (see [`EdgeVolume::applied`]).
#[derive(Debug, Default)]
struct CopyWrites {
    lsns: Mutex<BTreeMap<Lsn, usize>>,
    done: tokio::sync::Notify,
}

impl CopyWrites {
    fn enter(&self, lsn: Lsn) -> CopyWriteGuard<'_> {
        *lock(&self.lsns).entry(lsn).or_default() += 1;
        CopyWriteGuard { writes: self, lsn }
    }

    /// Waits until no write of a record up to `lsn` is on its way.
    async fn wait_through(&self, lsn: Lsn) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if lock(&self.lsns).range(..=lsn).next().is_none() {
                return;
            }
            done.await;
        }
    }
}

struct CopyWriteGuard<'a> {
    writes: &'a CopyWrites,
    lsn: Lsn,
}

impl Drop for CopyWriteGuard<'_> {
    fn drop(&mut self) {
        let mut lsns = lock(&self.writes.lsns);
        if let Some(n) = lsns.get_mut(&self.lsn) {
            *n -= 1;
            if *n == 0 {
                lsns.remove(&self.lsn);
            }
        }
        drop(lsns);
        self.writes.done.notify_waiters();
    }
}

/// Counters of the shipping side.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    pub batches_shipped: AtomicU64,
    pub bytes_shipped: AtomicU64,
    pub pushes_kept: AtomicU64,
    pub pushes_dropped: AtomicU64,
}

/// One edge volume's data path. See the module docs.
#[derive(Debug)]
pub struct EdgeVolume<R> {
    journal: Journal,
    cache: R,
    size: u64,
    mistakes: Mistakes,
    state: Mutex<ShipState>,
    /// Data bytes of the batches cut, by seq, to count them when applied.
    cut_bytes: Mutex<BTreeMap<u64, u64>>,
    /// One `applied` at a time: a later one must not let the journal
    /// forget a batch whose chunks an earlier one is still dropping.
    applying: tokio::sync::Mutex<()>,
    counters: VolumeCounters,
    /// The local copy, once a migration started (see [`crate::migrate`]).
    local: OnceLock<Arc<LocalCopy>>,
    copy_writes: CopyWrites,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The one mapping of a journal failure to a block error.
pub fn journal_block_error(op: Op, offset: u64, e: JournalError) -> BlockError {
    match e {
        JournalError::Io { source, .. } if source.raw_os_error() == Some(libc_enospc()) => {
            BlockError::NoSpace { op, offset }
        }
        JournalError::Io { source, .. } => BlockError::io(op, offset, source),
        JournalError::InvalidRequest { len, .. } => BlockError::OutOfRange {
            op,
            offset,
            len,
            size: 0,
        },
        e @ (JournalError::Config(_)
        | JournalError::Corrupt { .. }
        | JournalError::Failed(_)
        | JournalError::UnknownBatch { .. }
        | JournalError::UnknownLsn { .. }) => BlockError::Io {
            op,
            offset,
            source: std::io::Error::other(e.to_string()),
        },
    }
}

/// ENOSPC, without a libc dependency for one constant.
const fn libc_enospc() -> i32 {
    28
}

/// A batch's sequence number and the ranges it wrote.
type BatchRanges = (u64, Vec<(u64, u64)>);

fn ranges(batch: &Batch) -> Vec<(u64, u64)> {
    batch
        .entries
        .iter()
        .map(|e| (e.offset(), e.offset() + e.len()))
        .collect()
}

impl<R: ReadThrough> EdgeVolume<R> {
    /// A volume of `size` bytes over `journal` and `cache`.
    pub fn new(journal: Journal, cache: R, size: u64, mistakes: Mistakes) -> Self {
        let acked = journal.stats().acked_seq;
        EdgeVolume {
            journal,
            cache,
            size,
            mistakes,
            state: Mutex::new(ShipState {
                cut: BTreeMap::new(),
                cut_last_lsn: BTreeMap::new(),
                acked: AckedLog::new(acked),
            }),
            cut_bytes: Mutex::new(BTreeMap::new()),
            applying: tokio::sync::Mutex::new(()),
            counters: VolumeCounters::default(),
            local: OnceLock::new(),
            copy_writes: CopyWrites::default(),
        }
    }

    /// The local copy, if a migration started.
    pub fn local(&self) -> Option<&Arc<LocalCopy>> {
        self.local.get()
    }

    /// Routes reads of local chunks to `copy` and writes into it from now
    /// on. A copy opened after a crash while writes were journaled may
    /// lack writes the journal kept (it is synced only before the journal
    /// lets go of a batch): the journal's content of every local chunk is
    /// written into it first. From `cutting-over` on, the copy was synced
    /// at the switch and has every later write, which the journal does
    /// not: nothing is replayed.
    pub async fn attach_local(&self, copy: Arc<LocalCopy>) -> blockcore::Result<()> {
        let replay = if copy.stage().journals_writes() {
            copy.local_chunks()
        } else {
            Vec::new()
        };
        for chunk in replay {
            let (s, e) = copy.range(chunk);
            let pieces = self
                .journal
                .read(s, e - s)
                .map_err(|err| journal_block_error(Op::Write, s, err))?;
            for p in pieces {
                let n = p.len;
                match p.data {
                    PieceData::Absent => {}
                    PieceData::Data(d) => {
                        copy.device()
                            .write(p.offset, d, WriteFlags::default())
                            .await?;
                    }
                    PieceData::Zero => {
                        copy.device()
                            .write_zeroes(p.offset, n, ZeroFlags::default())
                            .await?;
                    }
                }
            }
        }
        copy.device().flush().await?;
        self.local.set(copy).map_err(|_| BlockError::Io {
            op: Op::Write,
            offset: 0,
            source: std::io::Error::other("the volume already has a local copy"),
        })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn cache(&self) -> &R {
        &self.cache
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn counters(&self) -> &VolumeCounters {
        &self.counters
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> blockcore::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(BlockError::OutOfRange {
                op,
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        self.check(Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let Some(local) = self.local.get() else {
            return self.read_view(offset, len).await;
        };
        let runs = local.runs(offset, len as u64);
        if let [(_, _, true)] = runs.as_slice() {
            return local.device().read(offset, len).await;
        }
        let mut out = BytesMut::with_capacity(len);
        for (s, n, is_local) in runs {
            let n_usize = usize::try_from(n).expect("within the request");
            if is_local {
                out.extend_from_slice(&local.device().read(s, n_usize).await?);
            } else {
                local.note_demand(s, n);
                out.extend_from_slice(&self.read_view(s, n_usize).await?);
            }
        }
        Ok(out.freeze())
    }

    /// A read through the journal, then the cache and the origin.
    async fn read_view(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        let pieces = self
            .journal
            .read(offset, len as u64)
            .map_err(|e| journal_block_error(Op::Read, offset, e))?;
        if let [p] = pieces.as_slice() {
            match &p.data {
                PieceData::Absent => return self.cache.read(offset, len).await,
                PieceData::Data(d) => return Ok(d.clone()),
                PieceData::Zero => return Ok(Bytes::from(vec![0u8; len])),
            }
        }
        let mut out = BytesMut::with_capacity(len);
        for p in pieces {
            let n = usize::try_from(p.len).expect("piece within the request");
            match p.data {
                PieceData::Data(d) => out.extend_from_slice(&d),
                PieceData::Zero => out.resize(out.len() + n, 0),
                PieceData::Absent => out.extend_from_slice(&self.cache.read(p.offset, n).await?),
            }
        }
        Ok(out.freeze())
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> blockcore::Result<()> {
        self.check(Op::Write, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        // The journal keeps write data in memory until the origin has it. A
        // small write usually arrives as a slice of a much larger receive
        // buffer (64 KiB per NBD request); keeping the slice would pin that
        // whole buffer and make every write allocate fresh memory, which
        // the kernel zeroes page by page (1.3 ms stalls every 32 writes).
        let data = if data.len() <= JOURNAL_COPY_MAX {
            Bytes::copy_from_slice(&data)
        } else {
            data
        };
        if let Some(local) = self.local.get() {
            let len = data.len() as u64;
            return self
                .write_with_local(local, offset, Some(data), len, fua)
                .await;
        }
        self.journal_write(offset, data, fua).await
    }

    async fn journal_write(&self, offset: u64, data: Bytes, fua: bool) -> blockcore::Result<()> {
        let j = &self.journal;
        let lsn = j
            .append_write(offset, data)
            .await
            .map_err(|e| journal_block_error(Op::Write, offset, e))?;
        if fua {
            j.sync(lsn)
                .await
                .map_err(|e| journal_block_error(Op::Write, offset, e))?;
        }
        Ok(())
    }

    async fn journal_zero(&self, offset: u64, len: u64, fua: bool) -> blockcore::Result<()> {
        let j = &self.journal;
        let lsn = j
            .append_zero(offset, len)
            .await
            .map_err(|e| journal_block_error(Op::WriteZeroes, offset, e))?;
        if fua {
            j.sync(lsn)
                .await
                .map_err(|e| journal_block_error(Op::WriteZeroes, offset, e))?;
        }
        Ok(())
    }

    /// A write (`Some(data)`) or zeroing (`None`, `len` bytes) of a
    /// migrating volume: under the stripes of its chunks, to the journal
    /// while the stage journals writes, and to the local chunks of the
    /// copy (see [`crate::migrate::local`]).
    async fn write_with_local(
        &self,
        local: &LocalCopy,
        offset: u64,
        data: Option<Bytes>,
        len: u64,
        fua: bool,
    ) -> blockcore::Result<()> {
        let op = if data.is_some() {
            Op::Write
        } else {
            Op::WriteZeroes
        };
        let _stripes = local.lock_range(offset, len).await;
        let noted = local.note_write(offset, len);
        if !noted.journal {
            // From cut-over on the copy is the volume: the dirty bit
            // first, then the data, durable by itself for FUA.
            local.persist_dirty(noted.newly_dirty, op, offset).await?;
            return Self::write_copy(local, offset, data.as_ref(), &noted.local, fua).await;
        }
        let j = &self.journal;
        let lsn = match &data {
            Some(d) => j.append_write(offset, d.clone()).await,
            None => j.append_zero(offset, len).await,
        }
        .map_err(|e| journal_block_error(op, offset, e))?;
        // Until the copy has it, the journal keeps the write's batch (a
        // batch is acknowledged a round trip after its cut, long after
        // this registration that follows the append).
        let _on_its_way = (!noted.local.is_empty()).then(|| self.copy_writes.enter(lsn));
        let copied = Self::write_copy(local, offset, data.as_ref(), &noted.local, false).await;
        if let Err(e) = &copied {
            // The journal has the write: the guest's view is whole, the
            // copy gives those chunks up and copies them again.
            tracing::warn!(offset, len, error = %e, "writing into the local copy failed; its chunks will be copied again");
            local.forget(offset, len);
        }
        if fua {
            j.sync(lsn)
                .await
                .map_err(|e| journal_block_error(op, offset, e))?;
        }
        Ok(())
    }

    /// Writes `data` (or zeroes) into the copy's `parts` of a write at
    /// `offset`.
    async fn write_copy(
        local: &LocalCopy,
        offset: u64,
        data: Option<&Bytes>,
        parts: &[(u64, u64)],
        fua: bool,
    ) -> blockcore::Result<()> {
        for &(s, n) in parts {
            match data {
                Some(d) => {
                    let from = usize::try_from(s - offset).expect("within the write");
                    let part = d.slice(from..from + usize::try_from(n).expect("within the write"));
                    local.device().write(s, part, WriteFlags { fua }).await?;
                }
                None => {
                    local
                        .device()
                        .write_zeroes(
                            s,
                            n,
                            ZeroFlags {
                                fua,
                                may_trim: true,
                                ..ZeroFlags::default()
                            },
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> blockcore::Result<()> {
        self.check(Op::WriteZeroes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(local) = self.local.get() {
            return self.write_with_local(local, offset, None, len, fua).await;
        }
        self.journal_zero(offset, len, fua).await
    }

    /// A FLUSH: a batch boundary, answered once everything before it is
    /// durable in the journal.
    pub async fn flush(&self) -> blockcore::Result<()> {
        if let Some(local) = self.local.get() {
            if !local.stage().journals_writes() {
                // The copy holds every write from cut-over on: it and its
                // dirty map are what a FLUSH makes durable.
                local.device().flush().await?;
                return local
                    .save()
                    .await
                    .map_err(|e| local_block_error(Op::Flush, 0, e));
            }
        }
        let j = &self.journal;
        let lsn = j
            .append_flush()
            .await
            .map_err(|e| journal_block_error(Op::Flush, 0, e))?;
        if self.mistakes.flush_before_sync {
            return Ok(());
        }
        j.sync(lsn)
            .await
            .map_err(|e| journal_block_error(Op::Flush, 0, e))
    }

    pub async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        self.check(Op::Prefetch, offset, len)?;
        self.cache.prefetch(offset, len).await
    }

    /// What of the range a prefetch would have to fetch from the origin;
    /// `None` once a migration's local copy serves part of the volume
    /// (the copy, not the cache, says what is here: [`Self::prefetch`]).
    pub async fn missing(
        &self,
        offset: u64,
        len: u64,
    ) -> blockcore::Result<Option<Vec<(u64, u64)>>> {
        self.check(Op::Prefetch, offset, len)?;
        if self.local.get().is_some() {
            return Ok(None);
        }
        self.cache.missing(offset, len).await.map(Some)
    }

    /// The batches a previous run cut and the origin has not acknowledged,
    /// to ship first.
    pub fn unshipped(&self) -> Result<Vec<Batch>, JournalError> {
        let batches = self.journal.unshipped_batches()?;
        for b in &batches {
            self.note_cut(b);
        }
        Ok(batches)
    }

    /// Cuts the next batch if one is due (see [`Journal::cut_batch`]).
    pub async fn cut(
        &self,
        max_bytes: u64,
        max_age: Duration,
    ) -> Result<Option<Batch>, JournalError> {
        let batch = self.journal.cut_batch(max_bytes, max_age).await?;
        if let Some(b) = &batch {
            self.note_cut(b);
        }
        Ok(batch)
    }

    fn note_cut(&self, b: &Batch) {
        {
            let mut st = lock(&self.state);
            st.cut.insert(b.seq, ranges(b));
            st.cut_last_lsn.insert(b.seq, b.last_lsn);
        }
        lock(&self.cut_bytes).insert(b.seq, b.data_bytes());
    }

    /// The origin applied every batch up to `seq`: log their ranges, drop
    /// their chunks from the cache, then let the journal forget them (see
    /// the module docs for why in this order).
    pub async fn applied(&self, seq: u64) -> Result<(), JournalError> {
        let _one_at_a_time = self.applying.lock().await;
        let (done, last_lsn): (Vec<BatchRanges>, Option<Lsn>) = {
            let mut st = lock(&self.state);
            let later = st.cut.split_off(&(seq + 1));
            let done = std::mem::replace(&mut st.cut, later);
            let later = st.cut_last_lsn.split_off(&(seq + 1));
            let lsns = std::mem::replace(&mut st.cut_last_lsn, later);
            for (s, r) in &done {
                st.acked.record(*s, r.clone());
            }
            (done.into_iter().collect(), lsns.into_values().max())
        };
        if done.is_empty() {
            return Ok(());
        }
        for (_, ranges) in &done {
            for &(s, e) in ranges {
                if let Err(err) = self.cache.invalidate(s, e - s).await {
                    tracing::error!(error = %err, "cache invalidation after a batch failed");
                }
            }
        }
        let newest = done.last().map_or(seq, |(s, _)| *s);
        if let Some(local) = self.local.get() {
            // The copy gets these writes after the journal; they must be
            // in it, and durable there, before the journal forgets them.
            if let Some(lsn) = last_lsn {
                self.copy_writes.wait_through(lsn).await;
            }
            if let Err(e) = local.device().flush().await {
                return Err(JournalError::Failed(
                    format!("syncing the local copy before acknowledging batch {newest}: {e}")
                        .into(),
                ));
            }
        }
        self.journal.ack(newest).await?;
        let bytes: u64 = {
            let mut cb = lock(&self.cut_bytes);
            let later = cb.split_off(&(newest + 1));
            std::mem::replace(&mut *cb, later).values().sum()
        };
        self.counters
            .batches_shipped
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        self.counters
            .bytes_shipped
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Copies one chunk of the volume into the local copy: the journal's
    /// content over the origin's (known zero from its allocation map,
    /// from the cache, or fetched in the background). The journal is read
    /// first: a batch it lets go of meanwhile was logged as applied
    /// before, so data or a map from before that batch is caught by the
    /// applied log and the copy is redone (as the read path relies on).
    pub async fn copy_chunk(
        &self,
        local: &LocalCopy,
        chunk: u64,
        source: &dyn MirrorSource,
        allocation: &tokio::sync::Mutex<AllocationWindow>,
    ) -> blockcore::Result<CopyOutcome> {
        if !local.begin_copy(chunk).await {
            return Ok(CopyOutcome::Skipped);
        }
        match self.copy_chunk_data(local, chunk, source, allocation).await {
            Ok(Some((from, bytes))) => {
                if local.finish_copy(chunk, from, bytes).await {
                    Ok(CopyOutcome::Copied {
                        source: from,
                        bytes,
                    })
                } else {
                    Ok(CopyOutcome::Overtaken)
                }
            }
            Ok(None) => {
                local.abort_copy(chunk);
                Ok(CopyOutcome::Overtaken)
            }
            Err(e) => {
                local.abort_copy(chunk);
                Err(e)
            }
        }
    }

    async fn copy_chunk_data(
        &self,
        local: &LocalCopy,
        chunk: u64,
        source: &dyn MirrorSource,
        allocation: &tokio::sync::Mutex<AllocationWindow>,
    ) -> blockcore::Result<Option<(CopySource, u64)>> {
        let (start, end) = local.range(chunk);
        let len = end - start;
        let n = usize::try_from(len).expect("a chunk fits in memory");
        let pieces = self
            .journal
            .read(start, len)
            .map_err(|e| journal_block_error(Op::Read, start, e))?;
        let journaled = pieces.iter().all(|p| !matches!(p.data, PieceData::Absent));
        let (base, from) = if journaled {
            (None, CopySource::Journal)
        } else if self.origin_zero(start, len, source, allocation).await? {
            (None, CopySource::Zero)
        } else if let Some(d) = self.cache.read_cached(start, n).await? {
            (Some(d), CopySource::Cache)
        } else {
            let fetched = source.fetch(start, len).await?;
            let mut out = BytesMut::with_capacity(n);
            {
                let st = lock(&self.state);
                for f in &fetched {
                    if !st.acked.current(f.as_of, f.offset, f.data.len() as u64) {
                        return Ok(None);
                    }
                }
            }
            // Sorted by offset by the source; a request resent after a
            // reconnection may bring pieces twice.
            let mut at = start;
            for f in fetched {
                let f_end = f.offset + f.data.len() as u64;
                if f_end <= at {
                    continue;
                }
                if f.offset > at {
                    break;
                }
                let skip = usize::try_from(at - f.offset).expect("within a piece");
                let take = usize::try_from(f_end.min(end) - at).expect("within the chunk");
                out.extend_from_slice(&f.data[skip..skip + take]);
                at += take as u64;
            }
            if at != end {
                return Err(BlockError::io(
                    Op::Read,
                    at,
                    std::io::Error::other("the origin's pieces do not cover the chunk"),
                ));
            }
            (Some(out.freeze()), CopySource::Link)
        };
        let data = if pieces.iter().all(|p| matches!(p.data, PieceData::Absent)) {
            base.unwrap_or_else(|| Bytes::from(vec![0u8; n]))
        } else {
            let mut out = match base {
                Some(b) => BytesMut::from(&b[..]),
                None => BytesMut::zeroed(n),
            };
            for p in pieces {
                let s = usize::try_from(p.offset - start).expect("within the chunk");
                let e = s + usize::try_from(p.len).expect("within the chunk");
                match p.data {
                    PieceData::Absent => {}
                    PieceData::Data(d) => out[s..e].copy_from_slice(&d),
                    PieceData::Zero => out[s..e].fill(0),
                }
            }
            out.freeze()
        };
        local.write_chunk(start, data).await?;
        Ok(Some((from, len)))
    }

    /// Whether the origin's image reads as zero over the range, by its
    /// allocation map (asked for a window at a time).
    async fn origin_zero(
        &self,
        offset: u64,
        len: u64,
        source: &dyn MirrorSource,
        window: &tokio::sync::Mutex<AllocationWindow>,
    ) -> blockcore::Result<bool> {
        let mut window = window.lock().await;
        for attempt in 0..2 {
            if !window.covers(offset, len) || attempt == 1 {
                let want = ALLOCATION_WINDOW.min(self.size - offset).max(len);
                let (extents, as_of) = source.allocation(offset, want).await?;
                *window = AllocationWindow { extents, as_of };
            }
            let current = lock(&self.state).acked.current(window.as_of, offset, len);
            if current {
                return Ok(window.reads_zero(offset, len));
            }
        }
        // Batches keep landing in the range: read it instead.
        Ok(false)
    }

    /// The newest batch applied, as the edge saw it.
    pub fn newest_applied(&self) -> u64 {
        lock(&self.state).acked.newest
    }

    /// Offers pushed data, read at the origin with batches up to `as_of`
    /// applied, to the cache. Returns whether it was kept.
    pub async fn offer_push(&self, offset: u64, as_of: u64, data: Bytes) -> bool {
        // Order matters: the counters first, then the log (see the module
        // docs).
        let since = self.cache.snapshot(offset, data.len() as u64);
        let current = lock(&self.state)
            .acked
            .current(as_of, offset, data.len() as u64);
        if !current {
            self.counters.pushes_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.counters.pushes_kept.fetch_add(1, Ordering::Relaxed);
        self.cache.offer(offset, data, &since).await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acked_log_refuses_what_a_later_batch_touched() {
        let mut log = AckedLog::new(3);
        assert!(log.current(3, 0, 100));
        assert!(!log.current(2, 0, 100), "older than the log");
        log.record(4, vec![(1000, 2000)]);
        log.record(5, vec![(5000, 6000)]);
        assert!(log.current(5, 1000, 10));
        assert!(log.current(3, 0, 1000), "touches nothing applied since");
        assert!(!log.current(3, 1999, 2));
        assert!(!log.current(4, 4000, 1001));
        assert!(log.current(4, 1000, 1000), "batch 4 is in the data");
        for seq in 6..6 + ACKED_LOG_BATCHES as u64 {
            log.record(seq, vec![]);
        }
        assert!(!log.current(4, 1_000_000, 1), "forgotten: refused");
    }
}
