//! [`EdgeDevice`]: an [`EdgeVolume`] over the encrypted cache and the
//! origin, with the tasks that ship its journal and take in pushes.
//!
//! ```text
//!   NBD / iSCSI ──> EdgeDevice ──> EdgeVolume ──> journal
//!                                      └──> CachedDevice ──> RemoteDevice ──> LinkClient
//!   ship task:    batch due (flush, RPO, size) and room on the link
//!                 ──> EdgeVolume::cut ──> LinkClient::ship
//!   applied task: LinkClient::applied ──> EdgeVolume::applied
//!   push task:    LinkClient pushes ──> EdgeVolume::offer_push
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockcore::{BlockDevice, BlockSizes, Capabilities, DeviceInfo, WriteFlags, ZeroFlags};
use bytes::Bytes;
use cache::{Cache, CachedDevice, EpochSnapshot, WriteMode};
use journal::{Journal, JournalError, JournalStats};
use link::session::Mistakes;
use tokio::sync::Notify;

use crate::client::{LinkClient, LinkStatus, PushReceiver, RemoteDevice, SignatureStore};
use crate::volume::{EdgeVolume, ReadThrough};

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
    /// The whole cache's counters (it may be shared by many volumes).
    pub cache: cache::CacheStats,
    /// This volume's reads: bytes served from the cache and fetched.
    pub cache_layer: cache::CachedDeviceStats,
    /// The recovery point objective in force.
    pub rpo: Duration,
    pub journal: JournalStats,
    pub batches_shipped: u64,
    pub bytes_shipped: u64,
    pub pushes_kept: u64,
    pub pushes_dropped: u64,
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

#[async_trait]
impl<D: BlockDevice + 'static> ReadThrough for CachedDevice<D> {
    type Snapshot = EpochSnapshot;

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        BlockDevice::read(self, offset, len).await
    }

    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        BlockDevice::prefetch(self, offset, len).await
    }

    async fn invalidate(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        CachedDevice::invalidate(self, offset, len).await
    }

    fn snapshot(&self, offset: u64, len: u64) -> EpochSnapshot {
        CachedDevice::snapshot(self, offset, len)
    }

    async fn offer(&self, offset: u64, data: Bytes, since: &EpochSnapshot) {
        CachedDevice::offer(self, offset, data, since).await;
    }
}

type Volume = EdgeVolume<CachedDevice<RemoteDevice>>;

struct Shared {
    volume: Volume,
    client: LinkClient,
    config: EdgeConfig,
    /// The RPO in force, in nanoseconds (changed at run time by
    /// [`EdgeDevice::set_rpo`]).
    rpo_nanos: AtomicU64,
    /// Wakes the shipper to look at a changed RPO.
    rpo_changed: Notify,
    /// Wakes the shipper to cut everything now (a drain).
    drain: Notify,
    /// Bumped after every batch applied, and when a drain finds nothing.
    shipped: tokio::sync::watch::Sender<u64>,
}

/// The edge's block device. See the module docs.
pub struct EdgeDevice {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EdgeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeDevice")
            .field("size", &self.shared.volume.size())
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

impl EdgeDevice {
    /// Builds the edge's device over an attached `client`, a cache (opened
    /// with the attachment's key) and the journal, and starts the shipper
    /// (which first re-ships the batches a previous run cut), the task
    /// that settles applied batches, and the push task.
    pub fn start(
        client: LinkClient,
        pushes: PushReceiver,
        cache: Arc<Cache>,
        journal: Journal,
        config: EdgeConfig,
    ) -> blockcore::Result<EdgeDevice> {
        let a = client.attachment();
        let size = a.size;
        let name = cache_volume_name(client.volume(), a.volume_epoch);
        let remote = RemoteDevice::new(client.clone())
            .with_signatures(Arc::new(CacheSignatures(cache.clone())));
        // Write-around: the layer never sees the edge's writes (they go to
        // the journal); its invalidations come from applied batches.
        let cached = CachedDevice::new(remote, cache, &name, WriteMode::Around)?;
        let (shipped, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            volume: EdgeVolume::new(journal, cached, size, Mistakes::default()),
            client,
            rpo_nanos: AtomicU64::new(duration_nanos(config.rpo)),
            rpo_changed: Notify::new(),
            config,
            drain: Notify::new(),
            shipped,
        });
        let tasks = vec![
            tokio::spawn(ship_loop(shared.clone())),
            tokio::spawn(applied_loop(shared.clone())),
            tokio::spawn(push_loop(shared.clone(), pushes)),
        ];
        Ok(EdgeDevice { shared, tasks })
    }

    /// Ships everything journaled before the call and waits until the
    /// origin has applied it: the step before moving a VM back or
    /// detaching. A barrier: writes that arrive meanwhile are shipped in
    /// their turn but not waited for, so a busy volume cannot hold it up.
    pub async fn drain(&self) -> Result<(), JournalError> {
        let journal = self.shared.volume.journal();
        let barrier = journal.sync_all().await?;
        let mut shipped = self.shared.shipped.subscribe();
        loop {
            if journal.unshipped_through(barrier) == 0 {
                return Ok(());
            }
            self.shared.drain.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(200), shipped.changed()).await;
        }
    }

    /// Changes the recovery point objective; the shipper applies it at
    /// once (a shorter RPO makes overdue writes ship now).
    pub fn set_rpo(&self, rpo: Duration) {
        self.shared
            .rpo_nanos
            .store(duration_nanos(rpo), Ordering::Relaxed);
        self.shared.rpo_changed.notify_one();
    }

    /// Asks the origin to release the volume (after a [`drain`](Self::drain),
    /// nothing is left to ship), so another edge may attach it; the link
    /// then closes.
    pub async fn detach(&self, timeout: Duration) -> Result<(), link::LinkError> {
        self.shared.client.detach(timeout).await
    }

    /// Link, cache and journal state.
    pub fn status(&self) -> EdgeStatus {
        let v = &self.shared.volume;
        let c = v.counters();
        EdgeStatus {
            link: self.shared.client.status(),
            cache: v.cache().cache_stats(),
            cache_layer: v.cache().stats(),
            rpo: self.shared.rpo(),
            journal: v.journal().stats(),
            batches_shipped: c.batches_shipped.load(Ordering::Relaxed),
            bytes_shipped: c.bytes_shipped.load(Ordering::Relaxed),
            pushes_kept: c.pushes_kept.load(Ordering::Relaxed),
            pushes_dropped: c.pushes_dropped.load(Ordering::Relaxed),
        }
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Shared {
    fn rpo(&self) -> Duration {
        Duration::from_nanos(self.rpo_nanos.load(Ordering::Relaxed))
    }
}

/// Cuts batches when they are due and the link has room for them.
async fn ship_loop(shared: Arc<Shared>) {
    let (v, client, cfg) = (&shared.volume, &shared.client, &shared.config);
    match v.unshipped() {
        Ok(batches) => {
            for b in batches {
                if client.wait_batch_room().await.is_err() || client.ship(b.seq, b.entries).is_err()
                {
                    return;
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "reading unshipped batches failed"),
    }
    loop {
        if client.wait_batch_room().await.is_err() {
            return;
        }
        let rpo = shared.rpo();
        let draining = tokio::select! {
            biased;
            () = shared.drain.notified() => true,
            () = shared.rpo_changed.notified() => continue,
            r = v.journal().wait_batch_ready(cfg.batch_bytes, rpo) => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "journal failed; the shipper stops");
                    return;
                }
                false
            }
        };
        let max_age = if draining { Duration::ZERO } else { rpo };
        while client.batch_room() > 0 {
            match v.cut(cfg.batch_bytes, max_age).await {
                Ok(Some(b)) => {
                    if client.ship(b.seq, b.entries).is_err() {
                        return;
                    }
                }
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

/// Settles batches the origin applied.
async fn applied_loop(shared: Arc<Shared>) {
    let mut applied = shared.client.applied();
    loop {
        let seq = *applied.borrow_and_update();
        if seq > 0 {
            if let Err(e) = shared.volume.applied(seq).await {
                tracing::error!(seq, error = %e, "journal ack failed");
            }
            shared.shipped.send_modify(|n| *n += 1);
        }
        if applied.changed().await.is_err() {
            return;
        }
    }
}

async fn push_loop(shared: Arc<Shared>, mut pushes: PushReceiver) {
    while let Some(p) = pushes.recv().await {
        shared.volume.offer_push(p.offset, p.as_of, p.data).await;
    }
}

#[async_trait]
impl BlockDevice for EdgeDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.shared.volume.size(),
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
        self.shared.volume.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockcore::Result<()> {
        self.shared.volume.write(offset, data, flags.fua).await
    }

    async fn flush(&self) -> blockcore::Result<()> {
        self.shared.volume.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> blockcore::Result<()> {
        self.shared
            .volume
            .write_zeroes(offset, len, flags.fua)
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockcore::Result<()> {
        self.shared
            .volume
            .write_zeroes(offset, len, flags.fua)
            .await
    }

    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        self.shared.volume.prefetch(offset, len).await
    }
}
