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
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use blockcore::{BlockError, Op};
use bytes::{Bytes, BytesMut};
use journal::{Batch, Journal, JournalError, PieceData};
use link::session::Mistakes;

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
    acked: AckedLog,
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
                acked: AckedLog::new(acked),
            }),
            cut_bytes: Mutex::new(BTreeMap::new()),
            applying: tokio::sync::Mutex::new(()),
            counters: VolumeCounters::default(),
        }
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

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> blockcore::Result<()> {
        self.check(Op::WriteZeroes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
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

    /// A FLUSH: a batch boundary, answered once everything before it is
    /// durable in the journal.
    pub async fn flush(&self) -> blockcore::Result<()> {
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
        lock(&self.state).cut.insert(b.seq, ranges(b));
        lock(&self.cut_bytes).insert(b.seq, b.data_bytes());
    }

    /// The origin applied every batch up to `seq`: log their ranges, drop
    /// their chunks from the cache, then let the journal forget them (see
    /// the module docs for why in this order).
    pub async fn applied(&self, seq: u64) -> Result<(), JournalError> {
        let _one_at_a_time = self.applying.lock().await;
        let done: Vec<(u64, Vec<(u64, u64)>)> = {
            let mut st = lock(&self.state);
            let later = st.cut.split_off(&(seq + 1));
            let done = std::mem::replace(&mut st.cut, later);
            for (s, r) in &done {
                st.acked.record(*s, r.clone());
            }
            done.into_iter().collect()
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
