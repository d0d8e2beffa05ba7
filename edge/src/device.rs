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
//!   prefetch:     at start, LinkClient::plan: the origin pushes what the
//!                 volume's boot profiles say a boot reads, in order;
//!                 meanwhile guest reads are recorded (prefetch::Recorder)
//!                 until the boot window closes, and the profile goes to
//!                 the origin for the next boot
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
use prefetch::{RecordWindow, Recorder};
use tokio::sync::Notify;

use crate::client::{
    link_block_error, LinkClient, LinkStatus, Push, PushReceiver, RemoteDevice, SignatureStore,
};
use crate::migrate::{Command, LocalCopy, LocalError, LocalStatus, Refusal, Stage, MIRROR_CHUNK};
use crate::volume::{
    AllocationWindow, CopyOutcome, EdgeVolume, Fetched, MirrorSource, ReadThrough,
};

/// How the edge ships writes and prefetches.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Recovery point objective: uncut writes older than this are shipped
    /// even without a FLUSH.
    pub rpo: Duration,
    /// A batch is cut once this many journal bytes are waiting.
    pub batch_bytes: u64,
    /// Record the reads of this start (the boot) as a profile for the
    /// origin, within this window (`None`: no recording).
    pub profile_window: Option<RecordWindow>,
    /// Ask the origin for the volume's prefetch plan at start, at most
    /// this many bytes (0: no plan).
    pub plan_budget: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            rpo: Duration::from_secs(30),
            batch_bytes: 64 << 20,
            profile_window: Some(RecordWindow::default()),
            plan_budget: 256 << 20,
        }
    }
}

/// Where this start's boot profile and prefetch plan are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefetchStatus {
    /// `off`, `recording`, `sending`, `stored`, `empty` (nothing was
    /// read in the window) or `failed: why`.
    pub profile: String,
    /// Chunks the profile holds (so far, while recording).
    pub profile_chunks: u64,
    /// `off`, `streaming`, `done`, `done, little used` (under a tenth of
    /// what it pushed was read in the boot window: its profiles may be
    /// another image's) or `failed: why`.
    pub plan: String,
    /// Bytes the plan (and other prefetches) pushed.
    pub pushed_bytes: u64,
    /// Of the pushed chunks the cache took: bytes the guest read since,
    /// and bytes not read (yet).
    pub used_bytes: u64,
    pub unread_bytes: u64,
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
    /// The migration, once one started.
    pub migration: Option<LocalStatus>,
    pub batches_shipped: u64,
    pub bytes_shipped: u64,
    pub pushes_kept: u64,
    pub pushes_dropped: u64,
    pub prefetch: PrefetchStatus,
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

    async fn missing(&self, offset: u64, len: u64) -> blockcore::Result<Vec<(u64, u64)>> {
        CachedDevice::missing(self, offset, len).await
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

    async fn read_cached(&self, offset: u64, len: usize) -> blockcore::Result<Option<Bytes>> {
        CachedDevice::read_cached(self, offset, len).await
    }
}

type Volume = EdgeVolume<CachedDevice<RemoteDevice>>;

/// NBD `CACHE` asks the origin for this much at a time (the pushes are
/// held in memory until the cache takes them).
const PREFETCH_PIECE: usize = 8 << 20;

struct Shared {
    volume: Volume,
    client: LinkClient,
    config: EdgeConfig,
    /// The RPO in force, in nanoseconds (changed at run time by
    /// [`EdgeDevice::set_rpo`]).
    rpo_nanos: AtomicU64,
    /// Wakes the shipper to look at a changed RPO.
    rpo_changed: Notify,
    /// Bumped after every batch applied (drains wait on it).
    shipped: tokio::sync::watch::Sender<u64>,
    /// A forced cut-over: the copy ignores the pause and the rate limit.
    copy_forced: std::sync::atomic::AtomicBool,
    /// One lifecycle change at a time.
    lifecycle: tokio::sync::Mutex<()>,
    /// Callers waiting for the running transition task, a cut-over or a
    /// move back (none: no task).
    transition_waiters:
        std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<Result<(), MigrateError>>>>,
    /// When this device started (the attach): profile times count from it.
    started: std::time::Instant,
    /// The boot profile, while its window is open.
    recording: std::sync::Mutex<Option<Recorder>>,
    prefetch: std::sync::Mutex<PrefetchStatus>,
    /// Bytes of prefetch pushes (any but group pushes) taken in.
    prefetch_pushed: AtomicU64,
    /// Chunks prefetch pushes put in the cache that no read has asked for
    /// since, and the bytes of those read.
    unread: std::sync::Mutex<std::collections::HashSet<u64>>,
    prefetch_used: AtomicU64,
    chunk_size: u64,
}

/// The edge's block device. See the module docs.
pub struct EdgeDevice {
    shared: Arc<Shared>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
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
        // The journal's batches in the origin's numbering. With every batch
        // cut also applied, the next one cut is the origin's next; with
        // batches in flight (a restart), they keep the numbers they were
        // shipped under.
        let stats = journal.stats();
        let journal_err = |e| crate::volume::journal_block_error(blockcore::Op::Write, 0, e);
        let stored = journal.link_seq_offset().map_err(journal_err)?;
        let offset = if stats.last_cut_seq > stats.acked_seq {
            stored
        } else {
            let next = i128::from(a.next_seq) - i128::from(stats.last_cut_seq) - 1;
            i64::try_from(next).unwrap_or(stored)
        };
        if offset != stored {
            journal.set_link_seq_offset(offset).map_err(journal_err)?;
            tracing::info!(volume = %client.volume(), offset, next_seq = a.next_seq, journal_seq = stats.last_cut_seq, "the journal's batches are renumbered for the origin");
        }
        client.set_seq_offset(offset);
        let remote = RemoteDevice::new(client.clone())
            .with_signatures(Arc::new(CacheSignatures(cache.clone())));
        // Write-around: the layer never sees the edge's writes (they go to
        // the journal); its invalidations come from applied batches.
        let cached = CachedDevice::new(remote, cache, &name, WriteMode::Around)?;
        let (shipped, _) = tokio::sync::watch::channel(0);
        let chunk = client.attachment().chunk_size;
        let recorder = config
            .profile_window
            .filter(|_| chunk >= 512 && chunk.is_power_of_two())
            .map(|w| Recorder::new(chunk, size, w));
        let prefetch = PrefetchStatus {
            profile: if recorder.is_some() {
                "recording"
            } else {
                "off"
            }
            .to_owned(),
            plan: if config.plan_budget > 0 {
                "streaming"
            } else {
                "off"
            }
            .to_owned(),
            ..PrefetchStatus::default()
        };
        let shared = Arc::new(Shared {
            volume: EdgeVolume::new(journal, cached, size, Mistakes::default()),
            client,
            rpo_nanos: AtomicU64::new(duration_nanos(config.rpo)),
            rpo_changed: Notify::new(),
            config,
            shipped,
            copy_forced: std::sync::atomic::AtomicBool::new(false),
            lifecycle: tokio::sync::Mutex::new(()),
            transition_waiters: std::sync::Mutex::new(Vec::new()),
            started: std::time::Instant::now(),
            recording: std::sync::Mutex::new(recorder),
            prefetch: std::sync::Mutex::new(prefetch),
            prefetch_pushed: AtomicU64::new(0),
            unread: std::sync::Mutex::new(std::collections::HashSet::new()),
            prefetch_used: AtomicU64::new(0),
            chunk_size: u64::from(chunk.max(1)),
        });
        let mut tasks = vec![
            tokio::spawn(ship_loop(shared.clone())),
            tokio::spawn(applied_loop(shared.clone())),
            tokio::spawn(push_loop(shared.clone(), pushes)),
            tokio::spawn(profile_loop(shared.clone())),
        ];
        if shared.config.plan_budget > 0 {
            tasks.push(tokio::spawn(plan_task(shared.clone())));
        }
        Ok(EdgeDevice {
            shared,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }

    /// The volume's size and the origin's epoch of it.
    pub fn attachment(&self) -> &link::session::Attachment {
        self.shared.client.attachment()
    }

    /// The local copy, if a migration started.
    pub fn local(&self) -> Option<Arc<LocalCopy>> {
        self.shared.volume.local().cloned()
    }

    /// Gives the volume its local copy (a new migration, or one a previous
    /// run recorded) and carries on with what its stage asks: the copy
    /// while migrating, the rest of a cut-over interrupted by a crash.
    pub async fn attach_local(&self, copy: Arc<LocalCopy>) -> Result<(), MigrateError> {
        self.shared
            .volume
            .attach_local(copy.clone())
            .await
            .map_err(|e| MigrateError::Local(e.to_string()))?;
        match copy.stage() {
            Stage::Migrating => self.spawn(mirror_loop(self.shared.clone(), copy)),
            Stage::CuttingOver => {
                // Interrupted by a crash: it completes now.
                drop(self.finish_cutover_in_background(copy));
            }
            Stage::MovingBack => {
                // The same.
                drop(self.finish_moveback_in_background(Some(copy)));
            }
            _ => {}
        }
        Ok(())
    }

    /// Pauses or resumes the copy.
    pub async fn set_copy_paused(&self, paused: bool) -> Result<(), MigrateError> {
        let local = self.migrating()?;
        let command = if paused {
            Command::Pause
        } else {
            Command::Resume
        };
        local.stage().check(command)?;
        local.set_paused(paused).await?;
        // A forced cut-over that timed out gave way to the user's word.
        self.shared.copy_forced.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Limits the copy to `bytes_per_sec` (0: no limit).
    pub async fn set_copy_rate(&self, bytes_per_sec: u64) -> Result<(), MigrateError> {
        let local = self.migrating()?;
        local.stage().check(Command::SetRate)?;
        local.set_rate(bytes_per_sec).await?;
        self.shared.copy_forced.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn migrating(&self) -> Result<Arc<LocalCopy>, MigrateError> {
        self.local().ok_or_else(|| {
            MigrateError::Refused(
                Stage::Streaming
                    .check(Command::Pause)
                    .expect_err("streaming refuses a pause"),
            )
        })
    }

    /// Cuts the volume over to its local copy: once every chunk is local
    /// (`force`: finishes the copy first, at full rate), drains the
    /// journal to the origin, releases the volume there as migrated to
    /// this edge, and serves it from the copy alone. Each step is
    /// persisted first, so a crash resumes the cut-over on restart.
    pub async fn cutover(&self, force: bool, timeout: Duration) -> Result<(), MigrateError> {
        let _one = self.shared.lifecycle.lock().await;
        let local = self.migrating()?;
        let remaining = local.bytes_remaining();
        let next = local.stage().check(Command::CutOver { remaining, force })?;
        let deadline = tokio::time::Instant::now() + timeout;
        if next == Stage::Migrating {
            self.shared.copy_forced.store(true, Ordering::Relaxed);
            local.wake.notify_one();
            let mut changed = local.watch();
            while local.stage() == Stage::Migrating {
                if tokio::time::timeout_at(deadline, changed.changed())
                    .await
                    .is_err()
                {
                    return Err(MigrateError::Timeout(format!(
                        "the copy still lacks {} bytes; it goes on at full rate and the \
                         cut-over can be asked again",
                        local.bytes_remaining()
                    )));
                }
            }
            local.stage().check(Command::CutOver {
                remaining: 0,
                force,
            })?;
        }
        if local.stage() != Stage::CuttingOver {
            // From here writes go to the copy alone: what the journal got
            // before must be durable there, or a power loss would drop
            // writes the copy holds and the dirty map does not name.
            let journal = self.shared.volume.journal();
            let synced = async {
                journal
                    .sync_all()
                    .await
                    .map(|_| ())
                    .map_err(|e| LocalError::Io {
                        path: journal.dir().to_owned(),
                        source: std::io::Error::other(e.to_string()),
                    })
            };
            local.set_stage_after(Stage::CuttingOver, synced).await?;
        }
        let done = self.finish_cutover_in_background(local);
        match tokio::time::timeout_at(deadline, done).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(MigrateError::Link("the cut-over task ended".into())),
            Err(_) => Err(MigrateError::Timeout(
                "the journal is not drained to the origin yet; the cut-over goes on in the \
                 background"
                    .into(),
            )),
        }
    }

    /// Runs the rest of a cut-over in a task of its own (one at a time),
    /// so a caller giving up does not stop it halfway.
    fn finish_cutover_in_background(
        &self,
        local: Arc<LocalCopy>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), MigrateError>> {
        self.finish_in_background("cut-over", move |shared| async move {
            finish_cutover(&shared, &local).await
        })
    }

    /// The same for the rest of a move back.
    fn finish_moveback_in_background(
        &self,
        local: Option<Arc<LocalCopy>>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), MigrateError>> {
        self.finish_in_background("move back", move |shared| async move {
            finish_moveback(&shared, local.as_ref()).await
        })
    }

    /// Runs `work` in a task unless one is running already (the stage
    /// allows one transition at a time); the receiver gets its outcome.
    fn finish_in_background<F, Fut>(
        &self,
        what: &'static str,
        work: F,
    ) -> tokio::sync::oneshot::Receiver<Result<(), MigrateError>>
    where
        F: FnOnce(Arc<Shared>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), MigrateError>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut waiters = self
            .shared
            .transition_waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        waiters.push(tx);
        if waiters.len() == 1 {
            let shared = self.shared.clone();
            self.spawn(async move {
                let r = work(shared.clone()).await;
                if let Err(e) = &r {
                    tracing::error!(volume = %shared.client.volume(), error = %e, "the {what} failed");
                }
                let waiters = std::mem::take(
                    &mut *shared
                        .transition_waiters
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                for w in waiters {
                    let _ = w.send(match &r {
                        Ok(()) => Ok(()),
                        Err(e) => Err(MigrateError::Link(e.to_string())),
                    });
                }
            });
        }
        rx
    }

    /// Brings the volume home (see [`finish_moveback`]): from streaming,
    /// migrating or mirrored (the journal holds every write the origin
    /// lacks), or from cut-over (the dirty map names the chunks changed
    /// since). The guest must have stopped: the caller takes the volume's
    /// exports away first. Each step is persisted first (with a local
    /// copy), so a crash resumes the move back on restart; waits up to
    /// `timeout`, the move back going on in the background after that.
    pub async fn move_back(&self, timeout: Duration) -> Result<(), MigrateError> {
        let one = self.shared.lifecycle.lock().await;
        let local = self.local();
        let stage = local.as_ref().map_or(Stage::Streaming, |l| l.stage());
        stage.check(Command::MoveBack)?;
        if let Some(l) = &local {
            if stage != Stage::MovingBack {
                // The copy task stops at the change.
                l.set_stage(Stage::MovingBack).await?;
                tracing::info!(target: "ferry::audit", volume = %self.shared.client.volume(), from = %stage, "move back started");
            }
        }
        let done = self.finish_moveback_in_background(local);
        drop(one);
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(MigrateError::Link("the move back task ended".into())),
            Err(_) => Err(MigrateError::Timeout(
                "the move back goes on in the background; `ferry moveback` again waits for it"
                    .into(),
            )),
        }
    }

    /// Ships everything journaled before the call and waits until the
    /// origin has applied it: the step before moving a VM back or
    /// detaching. A barrier: writes that arrive meanwhile are shipped in
    /// their turn but not waited for, so a busy volume cannot hold it up.
    pub async fn drain(&self) -> Result<(), JournalError> {
        drain_journal(&self.shared).await
    }

    /// Changes the recovery point objective; the shipper applies it at
    /// once (a shorter RPO makes overdue writes ship now).
    pub fn set_rpo(&self, rpo: Duration) {
        self.shared
            .rpo_nanos
            .store(duration_nanos(rpo), Ordering::Relaxed);
        self.shared.rpo_changed.notify_one();
    }

    /// Whether the link's session is over for good (released, detached,
    /// fenced): nothing more goes over it.
    pub fn link_finished(&self) -> bool {
        self.shared.client.finished().is_some()
    }

    /// Asks the origin to release the volume (after a [`drain`](Self::drain),
    /// nothing is left to ship), so another edge may attach it; the link
    /// then closes.
    pub async fn detach(&self, timeout: Duration) -> Result<(), link::LinkError> {
        self.shared.client.detach(timeout).await
    }

    /// Ends the boot profile's window now (the boot is over: `ferry edge
    /// profile stop`) and hands the profile to the origin. Returns the
    /// chunks it holds and whether the origin stored it within
    /// `wait` (the store goes on in the background after that), or an
    /// error saying why there is no recording to stop.
    pub async fn stop_profile(&self, wait: Duration) -> Result<(u64, bool), String> {
        let recorder = lock(&self.shared.recording).take();
        let Some(recorder) = recorder else {
            let state = self.shared.prefetch_status().profile;
            return Err(format!(
                "no boot profile is being recorded (profile: {state})"
            ));
        };
        let chunks = recorder.len() as u64;
        let shared = self.shared.clone();
        let store = tokio::spawn(async move { store_recorded(&shared, recorder).await });
        let stored = matches!(tokio::time::timeout(wait, store).await, Ok(Ok(true)));
        Ok((chunks, stored))
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
            migration: v.local().map(|l| l.status()),
            batches_shipped: c.batches_shipped.load(Ordering::Relaxed),
            bytes_shipped: c.bytes_shipped.load(Ordering::Relaxed),
            pushes_kept: c.pushes_kept.load(Ordering::Relaxed),
            pushes_dropped: c.pushes_dropped.load(Ordering::Relaxed),
            prefetch: self.shared.prefetch_status(),
        }
    }
}

/// Why a lifecycle command failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the local copy: {0}")]
    Local(String),
    #[error("the link to the origin: {0}")]
    Link(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl From<LocalError> for MigrateError {
    fn from(e: LocalError) -> Self {
        MigrateError::Local(e.to_string())
    }
}

/// The rest of a cut-over, from `cutting-over`: every write journaled
/// before the stage changed reaches the origin, the origin records the
/// volume as migrated to this edge, and the stage becomes `cut-over`.
async fn finish_cutover(shared: &Arc<Shared>, local: &Arc<LocalCopy>) -> Result<(), MigrateError> {
    drain_retrying(shared, "cut-over").await?;
    shared
        .client
        .release(link::proto::Disposition::CutOver, Duration::from_secs(60))
        .await
        .map_err(|e| MigrateError::Link(e.to_string()))?;
    local.set_stage(Stage::CutOver).await?;
    tracing::info!(target: "ferry::audit", volume = %shared.client.volume(), "cut over: served from the local copy alone");
    Ok(())
}

async fn drain_journal(shared: &Shared) -> Result<(), JournalError> {
    let journal = shared.volume.journal();
    // A boundary of the drain's own, as a guest FLUSH is: the shipper cuts
    // up to it when it is due and never into writes the guest makes after
    // the drain began (cutting "everything now" would, on a loaded machine,
    // end a batch in the middle of the guest's next writes).
    let barrier = journal.append_flush().await?;
    journal.sync(barrier).await?;
    let mut shipped = shared.shipped.subscribe();
    loop {
        if journal.unshipped_through(barrier) == 0 {
            return Ok(());
        }
        if let Some(e) = shared.client.finished() {
            return Err(JournalError::Failed(
                format!("the link to the origin ended ({e}) with writes unshipped").into(),
            ));
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), shipped.changed()).await;
    }
}

/// Drains the journal, retrying while the link may come back (an origin
/// restarting, a link cut for a while).
async fn drain_retrying(shared: &Shared, why: &str) -> Result<(), MigrateError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match drain_journal(shared).await {
            Ok(()) => return Ok(()),
            Err(e) if shared.client.finished().is_some() => {
                return Err(MigrateError::Link(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "draining the journal for the {why}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The piece a dirty chunk is compared in: a guest's 4 KiB write ships
/// 4 KiB, for a signature of 32 bytes per 4 KiB of dirty chunk.
const DIFF_BLOCK: u32 = 4096;
/// Bytes one signature query covers: the local side reads this much at
/// once, the origin signs it in one read.
const SIGN_SPAN: u64 = 8 << 20;
/// Signature queries in flight: enough to hide a WAN round trip behind
/// the disks' reading.
const SIGN_PARALLEL: usize = 4;
/// Verification passes before a move back gives up on an origin whose
/// image keeps differing.
const VERIFY_ROUNDS: usize = 3;

/// The rest of a move back, from `moving-back` (see
/// [`EdgeDevice::move_back`]):
///
/// 0. The journal is drained (after a crash it may hold step 1's pieces).
/// 1. Dirty chunks (cut-over only): each is compared with the origin's
///    image in [`DIFF_BLOCK`] pieces by signature, and only the pieces
///    that differ go into the journal, which ships them as batches.
/// 2. The journal is drained: the origin has applied every write; the
///    dirty map is cleared.
/// 3. Verification: every chunk the local copy holds is compared with the
///    origin's image by signature, in the link's chunk size; pieces that
///    differ are shipped again and compared again, up to
///    [`VERIFY_ROUNDS`] times.
/// 4. `Release { Home }`: the origin clears its migration record; any edge
///    may attach the volume again, or it runs on premises.
/// 5. The stage becomes `on-premises`.
///
/// Every step is idempotent: a crash or a restarted origin anywhere makes
/// the next run redo at most the comparisons.
async fn finish_moveback(
    shared: &Arc<Shared>,
    local: Option<&Arc<LocalCopy>>,
) -> Result<(), MigrateError> {
    let volume = shared.client.volume().to_owned();
    if let Some(local) = local {
        // What a run before a crash put in the journal reaches the origin
        // first, so the comparison finds it there and ships nothing twice.
        drain_retrying(shared, "move back").await?;
        let dirty = local.dirty_chunks();
        if !dirty.is_empty() {
            let spans = chunk_spans(local, &dirty);
            let shipped = retrying(shared, "comparing the changed chunks", || {
                compare_and_ship(shared, local, &spans, DIFF_BLOCK, true)
            })
            .await?;
            let bytes: u64 = shipped.iter().map(|&(_, n)| n).sum();
            local
                .counters()
                .moveback_shipped
                .fetch_add(bytes, Ordering::Relaxed);
            tracing::info!(volume = %volume, dirty_chunks = dirty.len(), shipped = bytes, "move back: the changed pieces are in the journal");
        }
        drain_retrying(shared, "move back").await?;
        local.clear_dirty(&dirty).await?;
        let block = shared
            .client
            .attachment()
            .chunk_size
            .max(link::proto::MIN_SIGN_BLOCK);
        let mut suspects = chunk_spans(local, &local.local_chunks());
        let mut round = 0;
        loop {
            let verified: u64 = suspects.iter().map(|&(_, n)| n).sum();
            // Differing pieces are shipped again as they are found, but
            // not after the last repair.
            let repair = round < VERIFY_ROUNDS;
            let differ = retrying(shared, "verifying the origin's image", || {
                compare_and_ship(shared, local, &suspects, block, repair)
            })
            .await?;
            local
                .counters()
                .moveback_verified
                .fetch_add(verified, Ordering::Relaxed);
            if differ.is_empty() {
                tracing::info!(volume = %volume, bytes = verified, round, "move back: the origin's image equals the edge's copy");
                break;
            }
            let bytes: u64 = differ.iter().map(|&(_, n)| n).sum();
            if !repair {
                return Err(MigrateError::Local(format!(
                    "the origin's image still differs from the edge's copy in {} pieces \
                     ({bytes} bytes) after {VERIFY_ROUNDS} repairs: is something else \
                     writing to it? The move back stops here, and resumes with \
                     `ferry moveback`",
                    differ.len()
                )));
            }
            tracing::warn!(volume = %volume, pieces = differ.len(), bytes, round, "move back: the origin's image differs from the edge's copy; those pieces were shipped again");
            local
                .counters()
                .moveback_repaired
                .fetch_add(bytes, Ordering::Relaxed);
            drain_retrying(shared, "move back").await?;
            suspects = differ;
            round += 1;
        }
    } else {
        drain_retrying(shared, "move back").await?;
    }
    shared
        .client
        .release(link::proto::Disposition::Home, Duration::from_secs(60))
        .await
        .map_err(|e| MigrateError::Link(e.to_string()))?;
    if let Some(local) = local {
        local.set_stage(Stage::OnPremises).await?;
    }
    tracing::info!(target: "ferry::audit", volume = %volume, "moved back: the volume is home at its origin");
    Ok(())
}

/// Runs `attempt` until it succeeds or the link is over for good.
async fn retrying<T, F, Fut>(shared: &Shared, what: &str, mut attempt: F) -> Result<T, MigrateError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MigrateError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e @ MigrateError::Link(_)) if shared.client.finished().is_none() => {
                tracing::warn!(error = %e, "{what}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `chunks` (in order) as spans of the volume of at most [`SIGN_SPAN`]
/// bytes, neighbours joined.
fn chunk_spans(local: &LocalCopy, chunks: &[u64]) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        let (start, end) = local.range(c);
        match spans.last_mut() {
            Some((s, n)) if *s + *n == start && *n + (end - start) <= SIGN_SPAN => {
                *n += end - start;
            }
            _ => spans.push((start, end - start)),
        }
    }
    spans
}

/// Compares the `block`-byte pieces of `spans` with the origin's image by
/// signature and returns those that differ, as `(offset, len)` in order;
/// with `ship` their data from the copy goes into the journal as each span
/// is compared, so memory holds at most [`SIGN_PARALLEL`] spans.
async fn compare_and_ship(
    shared: &Shared,
    local: &LocalCopy,
    spans: &[(u64, u64)],
    block: u32,
    ship: bool,
) -> Result<Vec<(u64, u64)>, MigrateError> {
    use futures::stream::{self, StreamExt};
    let key = Arc::new(keys::SignatureKey::from_dedup_key(
        *shared.client.attachment().dedup_key,
    ));
    let mut compared = stream::iter(spans.iter().copied())
        .map(|(offset, len)| {
            let key = key.clone();
            async move {
                let n = u32::try_from(len).expect("spans are at most SIGN_SPAN");
                let (theirs, ours) = tokio::join!(
                    shared.client.signatures(offset, n, block),
                    local.device().read(offset, n as usize)
                );
                let theirs = theirs.map_err(|e| MigrateError::Link(e.to_string()))?;
                let ours = ours.map_err(|e| MigrateError::Local(e.to_string()))?;
                local
                    .counters()
                    .moveback_signature_bytes
                    .fetch_add(32 * theirs.len() as u64, Ordering::Relaxed);
                let data = ours.clone();
                let mine = tokio::task::spawn_blocking(move || {
                    data.chunks(block as usize)
                        .map(|piece| *key.signature(piece).as_bytes())
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(|e| MigrateError::Local(e.to_string()))?;
                // Copies, not slices: a slice would keep the whole span's
                // buffer alive until the journal lets go of the piece.
                Ok::<_, MigrateError>(
                    mine.iter()
                        .zip(&theirs)
                        .enumerate()
                        .filter(|(_, (a, b))| a != b)
                        .map(|(i, _)| {
                            let from = i * block as usize;
                            let to = (from + block as usize).min(ours.len());
                            (
                                offset + from as u64,
                                Bytes::copy_from_slice(&ours[from..to]),
                            )
                        })
                        .collect::<Vec<_>>(),
                )
            }
        })
        .buffered(SIGN_PARALLEL);
    let mut differ = Vec::new();
    while let Some(pieces) = compared.next().await {
        let pieces = pieces?;
        if ship {
            ship_pieces(shared, &pieces).await?;
        }
        differ.extend(pieces.iter().map(|(o, d)| (*o, d.len() as u64)));
    }
    Ok(differ)
}

/// Appends `pieces` to the journal as writes (zeroes as zero records),
/// neighbours joined up to a chunk; returns the bytes appended.
async fn ship_pieces(shared: &Shared, pieces: &[(u64, Bytes)]) -> Result<u64, MigrateError> {
    let journal = shared.volume.journal();
    let mut runs: Vec<(u64, Vec<Bytes>, u64)> = Vec::new();
    for (offset, data) in pieces {
        let len = data.len() as u64;
        match runs.last_mut() {
            Some((s, parts, n)) if *s + *n == *offset && *n + len <= u64::from(MIRROR_CHUNK) => {
                parts.push(data.clone());
                *n += len;
            }
            _ => runs.push((*offset, vec![data.clone()], len)),
        }
    }
    let mut bytes = 0;
    for (offset, parts, len) in runs {
        let appended = if parts.iter().all(|p| p.iter().all(|&b| b == 0)) {
            journal.append_zero(offset, len).await
        } else {
            let mut data = bytes::BytesMut::with_capacity(usize::try_from(len).expect("a chunk"));
            for p in &parts {
                data.extend_from_slice(p);
            }
            journal.append_write(offset, data.freeze()).await
        };
        appended.map_err(|e| MigrateError::Local(format!("the journal: {e}")))?;
        bytes += len;
    }
    Ok(bytes)
}

/// Chunks copied at once: enough to keep a WAN link's pipe full.
const COPY_PARALLEL: usize = 4;
/// New progress is saved at most this often: what a crash can cost is
/// this much copying (12 MB at 100 Mbit/s), for a few syncs a second.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// The origin as the copy's source, through the link.
struct LinkSource {
    shared: Arc<Shared>,
}

#[async_trait]
impl MirrorSource for LinkSource {
    async fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> blockcore::Result<(Vec<blockcore::Extent>, u64)> {
        let as_of = self.shared.volume.newest_applied();
        let extents = self
            .shared
            .client
            .allocation(offset, len)
            .await
            .map_err(|e| link_block_error(blockcore::Op::Read, offset, e))?;
        Ok((extents, as_of))
    }

    async fn fetch(&self, offset: u64, len: u64) -> blockcore::Result<Vec<Fetched>> {
        let mut pushes = self
            .shared
            .client
            .fetch_background(offset, len)
            .await
            .map_err(|e| link_block_error(blockcore::Op::Read, offset, e))?;
        pushes.sort_by_key(|p| p.offset);
        Ok(pushes
            .into_iter()
            .map(|p| Fetched {
                offset: p.offset,
                as_of: p.as_of,
                data: p.data,
            })
            .collect())
    }
}

/// A token bucket over the bytes the copy takes from the link.
struct Pace {
    tokens: f64,
    at: tokio::time::Instant,
}

/// Chunks are charged when they start (so copies in parallel cannot
/// overshoot the rate) and refunded when they did not cross the link
/// (holes, the cache, the journal). The bucket starts empty, so a restart
/// does not bring a burst.
impl Pace {
    const BURST: f64 = 2.0 * (1 << 20) as f64;

    fn new() -> Pace {
        Pace {
            tokens: 0.0,
            at: tokio::time::Instant::now(),
        }
    }

    /// How long until the next copy may start at `rate` bytes/s (0: none).
    #[allow(clippy::cast_precision_loss)] // rates and chunk sizes are far below 2^52
    fn delay(&mut self, rate: u64) -> Duration {
        if rate == 0 {
            self.tokens = Self::BURST;
            return Duration::ZERO;
        }
        let now = tokio::time::Instant::now();
        let rate = rate as f64;
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(Self::BURST);
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    #[allow(clippy::cast_precision_loss)] // chunk sizes are far below 2^52
    fn charge(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }

    #[allow(clippy::cast_precision_loss)] // chunk sizes are far below 2^52
    fn refund(&mut self, bytes: u64) {
        self.tokens = (self.tokens + bytes as f64).min(Self::BURST);
    }
}

/// Fills the local copy: demand-read chunks first, then in ascending
/// order, a few at a time, paced by the rate limit; saves its progress
/// soon after it grows (at most every `SAVE_EVERY`); moves the stage to
/// `mirrored` once every chunk is local.
async fn mirror_loop(shared: Arc<Shared>, local: Arc<LocalCopy>) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let source = LinkSource {
        shared: shared.clone(),
    };
    let window = tokio::sync::Mutex::new(AllocationWindow::default());
    let volume = &shared.volume;
    let mut cursor = 0u64;
    let mut running = FuturesUnordered::new();
    let mut pace = Pace::new();
    // The first progress is saved at once; later saves at most every
    // SAVE_EVERY.
    let mut last_save = tokio::time::Instant::now()
        .checked_sub(SAVE_EVERY)
        .unwrap_or_else(tokio::time::Instant::now);
    let mut failures = 0u32;
    let mut retry_at: Option<tokio::time::Instant> = None;
    tracing::info!(volume = %shared.client.volume(), remaining = local.bytes_remaining(), "migration copy running");
    loop {
        if local.stage() != Stage::Migrating {
            break;
        }
        // Also while paused or waiting for the rate limit: what finished
        // last is saved (a save with nothing new costs nothing).
        if local.has_unsaved() && last_save.elapsed() >= SAVE_EVERY {
            last_save = tokio::time::Instant::now();
            if let Err(e) = local.save().await {
                tracing::error!(error = %e, "saving the copy's progress failed");
            }
        }
        // Progress waiting to be saved wakes the loop when it is due, also
        // while the pace or a slow chunk holds it.
        let save_at = if local.has_unsaved() {
            last_save + SAVE_EVERY
        } else {
            tokio::time::Instant::now() + Duration::from_secs(3600)
        };
        let forced = shared.copy_forced.load(Ordering::Relaxed);
        let paused = local.paused() && !forced;
        let rate = if forced { 0 } else { local.rate_limit() };
        let mut wait = None;
        if retry_at.is_some_and(|t| tokio::time::Instant::now() < t) {
            wait = retry_at;
        } else {
            retry_at = None;
            while !paused && running.len() < COPY_PARALLEL {
                let d = pace.delay(rate);
                if !d.is_zero() {
                    wait = Some(tokio::time::Instant::now() + d);
                    break;
                }
                let Some(chunk) = local.next_to_copy(&mut cursor) else {
                    break;
                };
                let (start, end) = local.range(chunk);
                if rate > 0 {
                    pace.charge(end - start);
                }
                let (local, source, window) = (&local, &source, &window);
                running.push(async move {
                    let r = volume.copy_chunk(local, chunk, source, window).await;
                    (chunk, r)
                });
            }
        }
        if running.is_empty() {
            if local.is_complete() {
                if let Err(e) = local.save().await {
                    tracing::error!(error = %e, "saving the copy's progress failed");
                }
                match local.stage().check(Command::CopyComplete) {
                    Ok(next) => {
                        if let Err(e) = local.set_stage(next).await {
                            tracing::error!(error = %e, "recording the finished copy failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        tracing::info!(volume = %shared.client.volume(), "migration copy complete: mirrored");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the copy finished in an unexpected stage");
                    }
                }
                break;
            }
            let until =
                wait.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                () = local.wake.notified() => {}
                () = tokio::time::sleep_until(until.min(save_at)) => {}
            }
            continue;
        }
        tokio::select! {
            Some((chunk, r)) = running.next() => match r {
                Ok(CopyOutcome::Copied { source, bytes }) => {
                    failures = 0;
                    if source != crate::migrate::CopySource::Link {
                        pace.refund(bytes);
                    }
                }
                // An overtaken copy may have crossed the link: no refund.
                Ok(CopyOutcome::Overtaken) => {}
                Ok(CopyOutcome::Skipped) => {
                    let (start, end) = local.range(chunk);
                    pace.refund(end - start);
                }
                Err(e) => {
                    failures += 1;
                    let backoff = Duration::from_millis(200 << failures.min(5));
                    tracing::warn!(chunk, error = %e, "copying a chunk failed; retrying");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    // Come back to it after a wrap-around.
                }
            },
            () = local.wake.notified() => {}
            () = tokio::time::sleep_until(save_at) => {}
        }
    }
    // In-flight copies are dropped with the loop; their chunks stay clear.
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
        tokio::select! {
            biased;
            () = shared.rpo_changed.notified() => continue,
            r = v.journal().wait_batch_ready(cfg.batch_bytes, rpo) => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "journal failed; the shipper stops");
                    return;
                }
            }
        }
        while client.batch_room() > 0 {
            match v.cut(cfg.batch_bytes, rpo).await {
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
        shared.take_push(p).await;
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Offers pushed data to the cache; a prefetch's (not a group push's)
    /// is counted, and its chunks the cache took are unread until read.
    async fn take_push(&self, p: Push) {
        let (offset, len) = (p.offset, p.data.len() as u64);
        let kept = self.volume.offer_push(p.offset, p.as_of, p.data).await;
        if p.id != 0 {
            self.prefetch_pushed.fetch_add(len, Ordering::Relaxed);
            if kept {
                // The cache keeps whole chunks only.
                let c = self.chunk_size;
                let mut unread = lock(&self.unread);
                unread.extend(offset.div_ceil(c)..(offset + len) / c);
            }
        }
    }

    fn note_read(&self, offset: u64, len: usize) {
        // A read outside the volume is refused by the volume, not noted.
        let size = self.volume.size();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return;
        }
        if let Some(r) = lock(&self.recording).as_mut() {
            r.note_read(offset, len as u64, self.started.elapsed());
        }
        let mut unread = lock(&self.unread);
        if !unread.is_empty() && len > 0 {
            let c = self.chunk_size;
            for chunk in offset / c..=(offset + len as u64 - 1) / c {
                if unread.remove(&chunk) {
                    self.prefetch_used.fetch_add(c, Ordering::Relaxed);
                }
            }
        }
    }

    fn prefetch_status(&self) -> PrefetchStatus {
        let mut s = lock(&self.prefetch).clone();
        if let Some(r) = lock(&self.recording).as_ref() {
            s.profile_chunks = r.len() as u64;
        }
        s.pushed_bytes = self.prefetch_pushed.load(Ordering::Relaxed);
        s.used_bytes = self.prefetch_used.load(Ordering::Relaxed);
        s.unread_bytes = lock(&self.unread).len() as u64 * self.chunk_size;
        s
    }

    fn set_prefetch(&self, f: impl FnOnce(&mut PrefetchStatus)) {
        f(&mut lock(&self.prefetch));
    }
}

/// Streams the volume's prefetch plan once, at start (the session sends
/// the request again after a reconnection until the plan is through).
async fn plan_task(shared: Arc<Shared>) {
    let state = match shared.client.plan(shared.config.plan_budget).await {
        Ok(()) => "done".to_owned(),
        Err(e) => {
            tracing::warn!(volume = %shared.client.volume(), error = %e, "the prefetch plan did not stream");
            format!("failed: {e}")
        }
    };
    shared.set_prefetch(|s| s.plan = state);
}

/// Closes the boot profile's window when it is due and hands the profile
/// to the origin (unless `stop_profile` took it first).
async fn profile_loop(shared: Arc<Shared>) {
    let recorder = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut g = lock(&shared.recording);
        match g.as_ref() {
            None => return,
            Some(r) if r.is_done(shared.started.elapsed()) => break g.take(),
            Some(_) => {}
        }
    };
    if let Some(r) = recorder {
        store_recorded(&shared, r).await;
    }
}

/// Finishes a boot profile and stores it at the origin; true once stored.
async fn store_recorded(shared: &Shared, recorder: Recorder) -> bool {
    // A plan the boot hardly read is reported, not silently kept on.
    let s = shared.prefetch_status();
    if s.plan == "done" && s.pushed_bytes > 0 && s.used_bytes * 10 < s.pushed_bytes {
        tracing::warn!(volume = %shared.client.volume(), pushed = s.pushed_bytes, used = s.used_bytes, "the prefetch plan was hardly used in the boot window; were its profiles recorded from another image of this volume?");
        shared.set_prefetch(|s| "done, little used".clone_into(&mut s.plan));
    }
    let Some(profile) = recorder.finish() else {
        shared.set_prefetch(|s| "empty".clone_into(&mut s.profile));
        return false;
    };
    let chunks = profile.touches.len() as u64;
    shared.set_prefetch(|s| {
        "sending".clone_into(&mut s.profile);
        s.profile_chunks = chunks;
    });
    let (state, stored) = match shared.client.store_profile(profile.encode().into()).await {
        Ok(()) => {
            tracing::info!(volume = %shared.client.volume(), chunks, "boot profile stored at the origin");
            ("stored".to_owned(), true)
        }
        Err(e) => {
            tracing::warn!(volume = %shared.client.volume(), error = %e, "the origin did not keep the boot profile");
            (format!("failed: {e}"), false)
        }
    };
    shared.set_prefetch(|s| s.profile = state);
    stored
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
        self.shared.note_read(offset, len);
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

    /// NBD `CACHE`, SCSI PRE-FETCH: what the cache lacks is asked of the
    /// origin as background pushes (a link `Prefetch` whose pushes come
    /// back here), so it never queues ahead of demand reads the way
    /// reading the range through would; in pieces of at most
    /// `PREFETCH_PIECE`, each put in the cache before the next is asked
    /// for. Returns once the cache holds it all (a read after `CACHE`
    /// hits).
    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        let Some(missing) = self.shared.volume.missing(offset, len).await? else {
            return self.shared.volume.prefetch(offset, len).await;
        };
        for (start, n) in missing {
            for piece in (start..start + n).step_by(PREFETCH_PIECE) {
                let piece_len = (start + n - piece).min(PREFETCH_PIECE as u64);
                let pushes = self
                    .shared
                    .client
                    .fetch_background(piece, piece_len)
                    .await
                    .map_err(|e| link_block_error(blockcore::Op::Prefetch, piece, e))?;
                for p in pushes {
                    self.shared.take_push(p).await;
                }
            }
        }
        self.shared.volume.cache().settle().await;
        Ok(())
    }
}
