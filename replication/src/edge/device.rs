//! [`EdgeDevice`]: the remote volume as the edge presents it to a VM.
//!
//! ```text
//!   read  ──> journal (read-your-writes) ──> absent parts:
//!                                            CachedDevice ──> RemoteDevice ──> origin
//!   write / trim / zero ──> journal (acknowledged once appended;
//!                           FUA and FLUSH wait for fdatasync)
//!   shipper task: journal.cut_batch (flush boundary, RPO, size)
//!                 ──> origin applies ──> BatchAck
//!                 ──> drop the batch's chunks from the cache ──> journal.ack
//!   push task:    origin's group pushes ──> cache (only if they cannot
//!                 predate an acknowledged batch)
//! ```
//!
//! A miss may come back as signatures instead of data, when the origin
//! already sent this edge those chunks (a clone of a volume seen before,
//! repeated content): the chunks are then read from the cache by
//! signature and mapped into this volume without crossing the link.
//!
//! Why the cache never serves data older than the edge's own writes: a
//! chunk may be cached from the origin while a newer write sits in the
//! journal, but reads consult the journal first, so that write masks it.
//! When the origin acknowledges the batch, the batch's chunks are dropped
//! from the cache *before* the journal lets go of them (and fills that
//! started earlier are refused by the cache layer's mutation counters), so
//! after that every read of them goes to the origin, which has the data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockcore::{
    check_range, BlockDevice, BlockError, BlockSizes, Capabilities, DeviceInfo, Op, WriteFlags,
    ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use cache::{Cache, CachedDevice, WriteMode};
use tokio::sync::Notify;

use super::{LinkClient, LinkStatus, PushReceiver, RemoteDevice, SignatureStore};
use crate::journal::{Batch, BatchEntry, Journal, JournalError, JournalStats, PieceData};
use crate::link::LinkError;
use crate::proto::{ErrorCode, WriteEntry};

/// Writes up to this size are copied into a buffer of their own before the
/// journal keeps them (see [`EdgeDevice`]'s `write`).
const JOURNAL_COPY_MAX: usize = 256 << 10;

/// How the edge ships writes.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Recovery point objective: uncut writes older than this are shipped
    /// even without a FLUSH.
    pub rpo: Duration,
    /// A batch is cut once this many journal bytes are waiting.
    pub batch_bytes: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            rpo: Duration::from_secs(30),
            batch_bytes: 64 << 20,
        }
    }
}

/// What `ferry edge status` shows.
#[derive(Clone, Debug)]
pub struct EdgeStatus {
    pub link: LinkStatus,
    pub cache: cache::CacheStats,
    pub journal: JournalStats,
    pub batches_shipped: u64,
    pub bytes_shipped: u64,
    pub pushes_kept: u64,
    pub pushes_dropped: u64,
}

#[derive(Default)]
struct Counters {
    batches_shipped: AtomicU64,
    bytes_shipped: AtomicU64,
    pushes_kept: AtomicU64,
    pushes_dropped: AtomicU64,
}

struct Shared {
    journal: Journal,
    cached: CachedDevice<RemoteDevice>,
    client: LinkClient,
    config: EdgeConfig,
    counters: Counters,
    /// Wakes the shipper to cut everything now (a drain).
    drain: Notify,
    /// Bumped after every batch the shipper finishes.
    shipped: tokio::sync::watch::Sender<u64>,
    /// The newest batch the origin acknowledged.
    acked: AtomicU64,
}

/// The edge's block device. See the module docs.
pub struct EdgeDevice {
    shared: Arc<Shared>,
    size: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EdgeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeDevice")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Drop for EdgeDevice {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn journal_error(op: Op, offset: u64, e: JournalError) -> BlockError {
    match e {
        JournalError::Io { source, .. } => BlockError::io(op, offset, source),
        JournalError::InvalidRequest { len, .. } => BlockError::OutOfRange {
            op,
            offset,
            len,
            size: 0,
        },
        other => BlockError::Io {
            op,
            offset,
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// The name a volume has in the edge's cache: the origin's epoch is part of
/// it, so a volume re-created at the origin is never served from an old
/// cache.
pub fn cache_volume_name(volume: &str, epoch: u64) -> String {
    format!("{volume}@{epoch:016x}")
}

/// The cache as the remote device's signature store.
struct CacheSignatures(Arc<Cache>);

impl SignatureStore for CacheSignatures {
    fn get(&self, sig: &[u8; 32]) -> Option<Bytes> {
        match self
            .0
            .get_by_signature(&cache::seal::Signature::from_bytes(*sig))
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "cache lookup by signature failed");
                None
            }
        }
    }
}

impl EdgeDevice {
    /// Builds the edge's device over an attached `client`, a cache (opened
    /// with the attachment's key) and the journal, and starts the shipper
    /// (which first re-ships the batches a previous run cut) and the push
    /// task.
    pub fn start(
        client: LinkClient,
        pushes: PushReceiver,
        cache: Arc<Cache>,
        journal: Journal,
        config: EdgeConfig,
    ) -> blockcore::Result<EdgeDevice> {
        let a = client.attachment();
        let size = a.size;
        let name = cache_volume_name(&client.inner.cfg.volume, a.volume_epoch);
        let remote = RemoteDevice::new(client.clone())
            .with_signatures(Arc::new(CacheSignatures(cache.clone())));
        // Write-around: the layer never sees the edge's writes (they go to
        // the journal); its invalidations come from the shipper.
        let cached = CachedDevice::new(remote, cache, &name, WriteMode::Around)?;
        let (shipped, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            journal,
            cached,
            client,
            config,
            counters: Counters::default(),
            drain: Notify::new(),
            shipped,
            acked: AtomicU64::new(0),
        });
        let tasks = vec![
            tokio::spawn(ship_loop(shared.clone())),
            tokio::spawn(push_loop(shared.clone(), pushes)),
        ];
        Ok(EdgeDevice {
            shared,
            size,
            tasks,
        })
    }

    /// Ships everything journaled before the call and waits until the
    /// origin has applied it: the step before moving a VM back or
    /// detaching. A barrier: writes that arrive meanwhile are shipped in
    /// their turn but not waited for, so a busy volume cannot hold it up.
    pub async fn drain(&self) -> Result<(), JournalError> {
        let barrier = self.shared.journal.sync_all().await?;
        let mut shipped = self.shared.shipped.subscribe();
        loop {
            if self.shared.journal.unshipped_through(barrier) == 0 {
                return Ok(());
            }
            self.shared.drain.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(200), shipped.changed()).await;
        }
    }

    /// Link, cache and journal state.
    pub fn status(&self) -> EdgeStatus {
        let c = &self.shared.counters;
        EdgeStatus {
            link: self.shared.client.status(),
            cache: self.shared.cached.cache_stats(),
            journal: self.shared.journal.stats(),
            batches_shipped: c.batches_shipped.load(Ordering::Relaxed),
            bytes_shipped: c.bytes_shipped.load(Ordering::Relaxed),
            pushes_kept: c.pushes_kept.load(Ordering::Relaxed),
            pushes_dropped: c.pushes_dropped.load(Ordering::Relaxed),
        }
    }
}

async fn ship(shared: &Shared, batch: Batch) {
    let entries: Vec<WriteEntry> = batch
        .entries
        .iter()
        .map(|e| match e {
            BatchEntry::Data { offset, data } => WriteEntry::Data {
                offset: *offset,
                data: data.clone(),
            },
            BatchEntry::Zero { offset, len } => WriteEntry::Zero {
                offset: *offset,
                len: *len,
            },
        })
        .collect();
    let bytes = batch.data_bytes();
    let mut delay = Duration::from_millis(100);
    loop {
        match shared.client.ship_batch(batch.seq, entries.clone()).await {
            Ok(()) => break,
            Err(e) => {
                // The link itself retries forever; an error here is the
                // origin refusing or failing to apply. Keep the batch and
                // try again: dropping it would lose acknowledged writes.
                let level_error = matches!(
                    e,
                    LinkError::Refused {
                        code: ErrorCode::Io | ErrorCode::Protocol,
                        ..
                    }
                );
                if level_error {
                    tracing::error!(seq = batch.seq, error = %e, "the origin did not apply a batch; retrying");
                } else {
                    tracing::warn!(seq = batch.seq, error = %e, "shipping a batch failed; retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    // The origin has it: drop the batch's chunks from the cache before the
    // journal stops masking them (see the module docs).
    shared.acked.fetch_max(batch.seq, Ordering::AcqRel);
    for e in &batch.entries {
        if let Err(err) = shared.cached.invalidate(e.offset(), e.len()).await {
            tracing::error!(error = %err, "cache invalidation after a batch failed");
        }
    }
    match shared.journal.ack(batch.seq).await {
        Ok(_) => {}
        Err(e) => tracing::error!(seq = batch.seq, error = %e, "journal ack failed"),
    }
    shared
        .counters
        .batches_shipped
        .fetch_add(1, Ordering::Relaxed);
    shared
        .counters
        .bytes_shipped
        .fetch_add(bytes, Ordering::Relaxed);
    shared.shipped.send_modify(|n| *n += 1);
}

async fn ship_loop(shared: Arc<Shared>) {
    match shared.journal.unshipped_batches() {
        Ok(batches) => {
            for b in batches {
                ship(&shared, b).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "reading unshipped batches failed"),
    }
    let cfg = shared.config.clone();
    loop {
        let draining = tokio::select! {
            r = shared.journal.wait_batch_ready(cfg.batch_bytes, cfg.rpo) => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "journal failed; the shipper stops");
                    return;
                }
                false
            }
            () = shared.drain.notified() => true,
        };
        let max_age = if draining { Duration::ZERO } else { cfg.rpo };
        loop {
            match shared.journal.cut_batch(cfg.batch_bytes, max_age).await {
                Ok(Some(b)) => ship(&shared, b).await,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "cutting a batch failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
        // A drain with nothing left to cut still wakes its waiter.
        shared.shipped.send_modify(|n| *n += 1);
    }
}

async fn push_loop(shared: Arc<Shared>, mut pushes: PushReceiver) {
    while let Some(p) = pushes.recv().await {
        // Order matters: counters first, then the acked check (see
        // `LinkClient::push_predates`); a batch acknowledged after the check
        // bumps the counters and the cache refuses the fill.
        let since = shared.cached.snapshot(p.offset, p.data.len() as u64);
        let acked = shared.acked.load(Ordering::Acquire);
        if shared.client.push_predates(p.offset, acked) {
            shared
                .counters
                .pushes_dropped
                .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        shared.counters.pushes_kept.fetch_add(1, Ordering::Relaxed);
        shared.cached.offer(p.offset, p.data, &since).await;
    }
}

#[async_trait]
impl BlockDevice for EdgeDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size,
            block_sizes: BlockSizes::DEFAULT,
            caps: Capabilities {
                read_only: false,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                extents: false,
                prefetch: true,
                multi_conn: true,
            },
        }
    }

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        check_range(&self.info(), Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let pieces = self
            .shared
            .journal
            .read(offset, len as u64)
            .map_err(|e| journal_error(Op::Read, offset, e))?;
        if let [p] = pieces.as_slice() {
            match &p.data {
                PieceData::Absent => return self.shared.cached.read(offset, len).await,
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
                PieceData::Absent => {
                    out.extend_from_slice(&self.shared.cached.read(p.offset, n).await?);
                }
            }
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockcore::Result<()> {
        check_range(&self.info(), Op::Write, offset, data.len() as u64)?;
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
        let j = &self.shared.journal;
        let lsn = j
            .append_write(offset, data)
            .await
            .map_err(|e| journal_error(Op::Write, offset, e))?;
        if flags.fua {
            j.sync(lsn)
                .await
                .map_err(|e| journal_error(Op::Write, offset, e))?;
        }
        Ok(())
    }

    async fn flush(&self) -> blockcore::Result<()> {
        let j = &self.shared.journal;
        let lsn = j
            .append_flush()
            .await
            .map_err(|e| journal_error(Op::Flush, 0, e))?;
        j.sync(lsn)
            .await
            .map_err(|e| journal_error(Op::Flush, 0, e))
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> blockcore::Result<()> {
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                fua: flags.fua,
                may_trim: true,
                fast_only: false,
            },
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockcore::Result<()> {
        check_range(&self.info(), Op::WriteZeroes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let j = &self.shared.journal;
        let lsn = j
            .append_zero(offset, len)
            .await
            .map_err(|e| journal_error(Op::WriteZeroes, offset, e))?;
        if flags.fua {
            j.sync(lsn)
                .await
                .map_err(|e| journal_error(Op::WriteZeroes, offset, e))?;
        }
        Ok(())
    }

    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        self.shared.cached.prefetch(offset, len).await
    }
}
