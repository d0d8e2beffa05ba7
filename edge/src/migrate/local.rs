//! [`LocalCopy`]: the volume's local persistent storage during and after
//! a migration, with the map of what it holds and the rules that keep it
//! equal to the volume the guest sees.
//!
//! ```text
//!   guest write ──> stripe lock ──> note_write: in-flight copies of the
//!                   chunks are spoiled; local chunks are written here too
//!                   (after the journal, while journaling; alone, with a
//!                   dirty bit, from cut-over on)
//!   guest read  ──> local chunks: here; the rest: journal, cache, origin
//!   copy chunk  ──> begin_copy ──> the volume's view of it ──> written
//!                   here ──> finish_copy: the bit is set unless a guest
//!                   write spoiled it meanwhile (then it is copied again)
//!   save        ──> fdatasync the copy, then replace the record: a bit on
//!                   disk always stands for data on disk
//! ```
//!
//! While writes are still journaled, a write to a local chunk reaches the
//! journal first and the copy second, and the copy is synced before the
//! journal lets go of any batch. A crash can leave the copy without
//! writes the journal kept; [`EdgeVolume::attach_local`] writes the
//! journal's content of every local chunk back into the copy on restart.
//!
//! [`EdgeVolume::attach_local`]: crate::EdgeVolume::attach_local

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use blockcore::storage::{read_file, replace_file, Storage};
use blockcore::{
    BlockDevice, BlockError, DeviceInfo, Extent, FileDevice, Op, OpenOptions, WriteFlags, ZeroFlags,
};
use bytes::Bytes;
use tokio::sync::{Mutex as AsyncMutex, MutexGuard as AsyncGuard};

use lifecycle::{Bitmap, MigrationRecord, RecordError, Stage, MAX_CHUNKS, MAX_TARGET_LEN};

/// The unit of the copy and of both maps.
pub const MIRROR_CHUNK: u32 = 1 << 20;
/// Write stripes: a write holds the stripes of its chunks while it
/// reaches the journal and the copy, so no copy or stage change slips in
/// between.
const STRIPES: usize = 64;
/// Demand reads remembered for the copy to take first.
const DEMAND_QUEUE: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a local copy cannot be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Target { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: RecordError,
    },
    #[error(
        "the volume changed at the origin since the copy began (epoch {recorded:016x}, now \
         {current:016x}): the local copy is stale"
    )]
    Stale { recorded: u64, current: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the bytes of a copied chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopySource {
    /// Entirely the edge's own writes (the journal).
    Journal,
    /// A hole or zeroes at the origin: nothing crossed the link.
    Zero,
    /// The edge's cache: nothing crossed the link.
    Cache,
    /// Fetched from the origin.
    Link,
}

/// Counters of the copy.
#[derive(Debug, Default)]
pub struct CopyCounters {
    pub bytes_zero: AtomicU64,
    pub bytes_cache: AtomicU64,
    pub bytes_journal: AtomicU64,
    pub bytes_link: AtomicU64,
    /// Copies redone because a guest write landed in the chunk meanwhile.
    pub respoiled: AtomicU64,
    /// A move back: write bytes it shipped (pieces of dirty chunks that
    /// differ at the origin), bytes of the image it verified, bytes of
    /// signatures it took from the origin for both, and bytes it found
    /// different in the verification and shipped again.
    pub moveback_shipped: AtomicU64,
    pub moveback_verified: AtomicU64,
    pub moveback_signature_bytes: AtomicU64,
    pub moveback_repaired: AtomicU64,
}

/// What `ferry migrate status` shows.
#[derive(Clone, Debug)]
pub struct LocalStatus {
    pub stage: Stage,
    pub paused: bool,
    pub rate_limit_bytes_per_sec: u64,
    pub target: String,
    pub bytes_total: u64,
    pub bytes_local: u64,
    /// Bytes changed on the edge since cut-over.
    pub bytes_dirty: u64,
    pub bytes_zero: u64,
    pub bytes_cache: u64,
    pub bytes_journal: u64,
    pub bytes_link: u64,
    pub respoiled: u64,
    pub moveback_shipped: u64,
    pub moveback_verified: u64,
    pub moveback_signature_bytes: u64,
    pub moveback_repaired: u64,
    /// Local bytes per second over the last few seconds.
    pub rate_bytes_per_sec: f64,
    pub eta: Option<Duration>,
}

struct State {
    /// The record as it is in memory; bits may be ahead of the file.
    record: MigrationRecord,
    /// Chunks being copied, and whether a guest write spoiled the copy.
    copying: HashMap<u64, bool>,
    /// The record changed since it was last saved.
    unsaved: bool,
    /// Chunks guest reads found missing, for the copy to take first.
    demand: VecDeque<u64>,
    /// (when, bytes local) samples for the rate.
    samples: VecDeque<(Instant, u64)>,
}

/// See the module docs.
pub struct LocalCopy {
    device: Arc<dyn BlockDevice>,
    /// Holes of a regular file read as zeroes, so zero chunks are
    /// punched (the copy stays sparse); a block device gets real zeroes.
    sparse: bool,
    storage: Arc<dyn Storage>,
    record_path: PathBuf,
    size: u64,
    state: Mutex<State>,
    stripes: Box<[AsyncMutex<()>]>,
    /// Serialises saves, so an older snapshot never replaces a newer one.
    saving: AsyncMutex<()>,
    counters: CopyCounters,
    /// Wakes the copy (resume, rate change, demand read).
    pub(crate) wake: tokio::sync::Notify,
    /// Changes when the stage, the pause or the rate changes.
    changed: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for LocalCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCopy")
            .field("record", &self.record_path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Settings of a new migration.
#[derive(Clone, Debug)]
pub struct NewCopy {
    /// A path that does not exist yet (or an empty file): a sparse raw
    /// image is created there; or a block device at least as large as the
    /// volume.
    pub target: PathBuf,
    pub size: u64,
    pub volume_epoch: u64,
    pub rate_bytes_per_sec: u64,
}

impl LocalCopy {
    /// Creates the local copy and its record (stage `migrating`).
    pub fn create(
        storage: Arc<dyn Storage>,
        record_path: &Path,
        new: &NewCopy,
    ) -> Result<LocalCopy, LocalError> {
        let target = &new.target;
        // The size comes from the origin: a map that large is refused,
        // never allocated.
        if new.size.div_ceil(u64::from(MIRROR_CHUNK)) > MAX_CHUNKS {
            return Err(LocalError::Target {
                path: target.clone(),
                reason: format!(
                    "the volume's {} bytes are more than a migration takes ({} chunks of {} \
                     bytes)",
                    new.size, MAX_CHUNKS, MIRROR_CHUNK
                ),
            });
        }
        let shown = target.to_string_lossy().into_owned();
        if shown.len() > MAX_TARGET_LEN || target.to_str().is_none() {
            return Err(LocalError::Target {
                path: target.clone(),
                reason: format!("the path must be UTF-8 and at most {MAX_TARGET_LEN} bytes"),
            });
        }
        if !target.is_absolute() {
            return Err(LocalError::Target {
                path: target.clone(),
                reason: "give an absolute path".into(),
            });
        }
        match std::fs::metadata(target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(target)
                    .map_err(io_err(target))?;
                f.set_len(new.size).map_err(io_err(target))?;
                f.sync_all().map_err(io_err(target))?;
                if let Some(dir) = target.parent() {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io_err(dir))?;
                }
            }
            Err(e) => return Err(io_err(target)(e)),
            Ok(m) if m.is_file() && m.len() == 0 => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(target)
                    .map_err(io_err(target))?;
                f.set_len(new.size).map_err(io_err(target))?;
                f.sync_all().map_err(io_err(target))?;
            }
            Ok(m) if m.is_file() => {
                return Err(LocalError::Target {
                    path: target.clone(),
                    reason: "the file exists and is not empty: give a new path (ferry creates \
                             a sparse raw image there) or an empty file, so nothing of value is \
                             overwritten"
                        .into(),
                });
            }
            Ok(m) if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {}
            Ok(_) => {
                return Err(LocalError::Target {
                    path: target.clone(),
                    reason: "neither a regular file nor a block device".into(),
                });
            }
        }
        let record = MigrationRecord {
            stage: Stage::Migrating,
            paused: false,
            rate_bytes_per_sec: new.rate_bytes_per_sec,
            volume_epoch: new.volume_epoch,
            target: shown,
            progress: Bitmap::new(new.size, MIRROR_CHUNK),
            dirty: Bitmap::new(new.size, MIRROR_CHUNK),
        };
        let copy = Self::with_record(storage, record_path, record, new.size)?;
        copy.write_record(&lock(&copy.state).record)?;
        Ok(copy)
    }

    /// Opens the copy a previous run recorded at `record_path`, if any.
    pub fn open(
        storage: Arc<dyn Storage>,
        record_path: &Path,
        size: u64,
        volume_epoch: u64,
    ) -> Result<Option<LocalCopy>, LocalError> {
        let Some(bytes) = read_file(storage.as_ref(), record_path).map_err(io_err(record_path))?
        else {
            return Ok(None);
        };
        let record = MigrationRecord::decode(&bytes).map_err(|source| LocalError::Record {
            path: record_path.to_owned(),
            source,
        })?;
        if record.progress.size() != size {
            return Err(LocalError::Target {
                path: record.target.clone().into(),
                reason: format!(
                    "the record is of a {} byte volume and the volume has {size} bytes",
                    record.progress.size()
                ),
            });
        }
        if record.stage.uses_origin() && record.volume_epoch != volume_epoch {
            return Err(LocalError::Stale {
                recorded: record.volume_epoch,
                current: volume_epoch,
            });
        }
        Self::with_record(storage, record_path, record, size).map(Some)
    }

    /// The stage a record at `record_path` is in, without opening the
    /// copy (the daemon decides from it whether to attach at all).
    pub fn recorded_stage(
        storage: &dyn Storage,
        record_path: &Path,
    ) -> Result<Option<Stage>, LocalError> {
        let Some(bytes) = read_file(storage, record_path).map_err(io_err(record_path))? else {
            return Ok(None);
        };
        MigrationRecord::decode(&bytes)
            .map(|r| Some(r.stage))
            .map_err(|source| LocalError::Record {
                path: record_path.to_owned(),
                source,
            })
    }

    /// The size a record at `record_path` was made for.
    pub fn recorded_size(storage: &dyn Storage, record_path: &Path) -> Result<u64, LocalError> {
        let bytes = read_file(storage, record_path)
            .map_err(io_err(record_path))?
            .ok_or_else(|| LocalError::Target {
                path: record_path.to_owned(),
                reason: "no migration record".into(),
            })?;
        MigrationRecord::decode(&bytes)
            .map(|r| r.progress.size())
            .map_err(|source| LocalError::Record {
                path: record_path.to_owned(),
                source,
            })
    }

    fn with_record(
        storage: Arc<dyn Storage>,
        record_path: &Path,
        record: MigrationRecord,
        size: u64,
    ) -> Result<LocalCopy, LocalError> {
        let target = PathBuf::from(&record.target);
        let file = FileDevice::open(&target, &OpenOptions::default()).map_err(io_err(&target))?;
        if file.info().size < size {
            return Err(LocalError::Target {
                path: target,
                reason: format!("holds {} bytes, the volume has {size}", file.info().size),
            });
        }
        let sparse = std::fs::metadata(&target)
            .map_err(io_err(&target))?
            .is_file();
        let (changed, _) = tokio::sync::watch::channel(());
        Ok(LocalCopy {
            device: Arc::new(file),
            sparse,
            storage,
            record_path: record_path.to_owned(),
            size,
            state: Mutex::new(State {
                record,
                copying: HashMap::new(),
                unsaved: false,
                demand: VecDeque::new(),
                samples: VecDeque::new(),
            }),
            stripes: (0..STRIPES).map(|_| AsyncMutex::new(())).collect(),
            saving: AsyncMutex::new(()),
            counters: CopyCounters::default(),
            wake: tokio::sync::Notify::new(),
            changed,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub fn counters(&self) -> &CopyCounters {
        &self.counters
    }

    pub fn stage(&self) -> Stage {
        lock(&self.state).record.stage
    }

    pub fn paused(&self) -> bool {
        lock(&self.state).record.paused
    }

    pub fn rate_limit(&self) -> u64 {
        lock(&self.state).record.rate_bytes_per_sec
    }

    /// Changes with the stage, the pause and the rate.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// The chunk range `i` covers.
    pub fn range(&self, chunk: u64) -> (u64, u64) {
        lock(&self.state).record.progress.range(chunk)
    }

    pub fn chunks(&self) -> u64 {
        lock(&self.state).record.progress.chunks()
    }

    pub fn is_complete(&self) -> bool {
        lock(&self.state).record.progress.is_full()
    }

    pub fn bytes_remaining(&self) -> u64 {
        let st = lock(&self.state);
        st.record.progress.size() - st.record.progress.bytes_set()
    }

    /// The local chunks, in order.
    pub fn local_chunks(&self) -> Vec<u64> {
        lock(&self.state).record.progress.iter_set().collect()
    }

    /// The dirty chunks (changed since cut-over), in order.
    pub fn dirty_chunks(&self) -> Vec<u64> {
        lock(&self.state).record.dirty.iter_set().collect()
    }

    /// Forgets that `chunks` changed since cut-over (a move back shipped
    /// them and the origin applied them), durably.
    pub async fn clear_dirty(&self, chunks: &[u64]) -> Result<(), LocalError> {
        {
            let mut st = lock(&self.state);
            for &c in chunks {
                if st.record.dirty.clear(c) {
                    st.unsaved = true;
                }
            }
        }
        self.save().await
    }

    /// `[offset, offset + len)` cut into runs, each local or not.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let st = lock(&self.state);
        let map = &st.record.progress;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = offset + len;
        for c in map.chunks_of(offset, len) {
            let (s, e) = map.range(c);
            let (s, e) = (s.max(offset), e.min(end));
            let local = map.get(c);
            match out.last_mut() {
                Some(last) if last.2 == local && last.0 + last.1 == s => last.1 += e - s,
                _ => out.push((s, e - s, local)),
            }
        }
        out
    }

    /// Remembers that a guest read found these chunks missing.
    pub fn note_demand(&self, offset: u64, len: u64) {
        let mut st = lock(&self.state);
        let chunks = st.record.progress.chunks_of(offset, len);
        let mut added = false;
        for c in chunks {
            if !st.record.progress.get(c) && !st.demand.contains(&c) {
                if st.demand.len() >= DEMAND_QUEUE {
                    st.demand.pop_front();
                }
                st.demand.push_back(c);
                added = true;
            }
        }
        drop(st);
        if added {
            self.wake.notify_one();
        }
    }

    /// The next chunk to copy: demand reads first, then ascending from
    /// `cursor`. `None` when every chunk is local or being copied.
    pub fn next_to_copy(&self, cursor: &mut u64) -> Option<u64> {
        let mut st = lock(&self.state);
        while let Some(c) = st.demand.pop_front() {
            if !st.record.progress.get(c) && !st.copying.contains_key(&c) {
                return Some(c);
            }
        }
        let n = st.record.progress.chunks();
        let mut from = *cursor;
        for _ in 0..=st.copying.len() {
            let c = st.record.progress.next_clear(from)?;
            if !st.copying.contains_key(&c) {
                *cursor = c + 1;
                return Some(c);
            }
            from = if c + 1 >= n { 0 } else { c + 1 };
        }
        None
    }

    /// Starts copying `chunk`; false if it is local or being copied.
    /// Under the chunk's stripe: a write holds it from its check until its
    /// journal append returns, so a copy begun after the check reads that
    /// write from the journal, and one begun before is spoiled by it.
    pub async fn begin_copy(&self, chunk: u64) -> bool {
        let _stripe = self.stripes[stripe(chunk)].lock().await;
        let mut st = lock(&self.state);
        if st.record.progress.get(chunk) || st.copying.contains_key(&chunk) {
            return false;
        }
        st.copying.insert(chunk, false);
        true
    }

    /// Ends a copy whose data is written: the chunk becomes local unless a
    /// guest write spoiled the copy (false: copy it again).
    pub async fn finish_copy(&self, chunk: u64, source: CopySource, bytes: u64) -> bool {
        // The stripe orders this against writes between their check and
        // their copy write: a write checked before the bit is set and
        // written after would miss the copy.
        let _stripe = self.stripes[stripe(chunk)].lock().await;
        let mut st = lock(&self.state);
        let spoiled = st.copying.remove(&chunk).unwrap_or(true);
        if spoiled {
            self.counters.respoiled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        st.record.progress.set(chunk);
        st.unsaved = true;
        let counter = match source {
            CopySource::Journal => &self.counters.bytes_journal,
            CopySource::Zero => &self.counters.bytes_zero,
            CopySource::Cache => &self.counters.bytes_cache,
            CopySource::Link => &self.counters.bytes_link,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        let local = st.record.progress.bytes_set();
        push_sample(&mut st.samples, local);
        true
    }

    /// Gives up a copy (it failed).
    pub fn abort_copy(&self, chunk: u64) {
        lock(&self.state).copying.remove(&chunk);
    }

    /// Locks the stripes of the range's chunks, in order.
    pub async fn lock_range(&self, offset: u64, len: u64) -> Vec<AsyncGuard<'_, ()>> {
        let c = u64::from(MIRROR_CHUNK);
        let first = offset / c;
        let last = (offset + len.max(1) - 1) / c;
        let mut stripes: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last).map(stripe).collect()
        };
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[s].lock().await);
        }
        guards
    }

    /// A guest write to `[offset, offset + len)`, under
    /// [`lock_range`](Self::lock_range): spoils in-flight copies of its
    /// chunks, marks them dirty from cut-over on, and says which parts are
    /// local (to be written here too), whether the write goes to the
    /// journal, and whether a dirty bit was newly set (then
    /// [`persist_dirty`](Self::persist_dirty) must run before the data is
    /// written).
    pub fn note_write(&self, offset: u64, len: u64) -> NotedWrite {
        let mut st = lock(&self.state);
        let journal = st.record.stage.journals_writes();
        let chunks = st.record.progress.chunks_of(offset, len);
        let mut newly_dirty = false;
        for c in chunks.clone() {
            if let Some(spoiled) = st.copying.get_mut(&c) {
                *spoiled = true;
            }
            if !journal && st.record.dirty.set(c) {
                newly_dirty = true;
            }
        }
        if newly_dirty {
            st.unsaved = true;
        }
        drop(st);
        let local = self
            .runs(offset, len)
            .into_iter()
            .filter(|r| r.2)
            .map(|(s, l, _)| (s, l))
            .collect();
        NotedWrite {
            journal,
            local,
            newly_dirty,
        }
    }

    /// Moves to `stage`: persisted before it returns; on a failure the
    /// stage stays what it was.
    pub async fn set_stage(&self, stage: Stage) -> Result<(), LocalError> {
        self.set_stage_after(stage, async { Ok(()) }).await
    }

    /// [`set_stage`](Self::set_stage), running `first` before the record
    /// is written. Every stripe is held throughout, so no write is between
    /// its check and its writes while the stage changes, and the copy is
    /// synced before the record names the new stage: what the copy holds
    /// at the switch is durable (the cut-over relies on this, and syncs the
    /// journal in `first`, since the journal stops getting writes there).
    pub async fn set_stage_after(
        &self,
        stage: Stage,
        first: impl std::future::Future<Output = Result<(), LocalError>>,
    ) -> Result<(), LocalError> {
        // Stripes before `saving`, as writes take them.
        let _all = self
            .lock_range(0, u64::from(MIRROR_CHUNK) * STRIPES as u64)
            .await;
        let _one = self.saving.lock().await;
        first.await?;
        let mut record = lock(&self.state).record.clone();
        record.stage = stage;
        self.flush_copy().await?;
        self.write_record_blocking(record).await?;
        lock(&self.state).record.stage = stage;
        self.changed.send_replace(());
        self.wake.notify_one();
        Ok(())
    }

    pub async fn set_paused(&self, paused: bool) -> Result<(), LocalError> {
        {
            let mut st = lock(&self.state);
            st.record.paused = paused;
            st.unsaved = true;
        }
        self.save().await?;
        self.changed.send_replace(());
        self.wake.notify_one();
        Ok(())
    }

    pub async fn set_rate(&self, bytes_per_sec: u64) -> Result<(), LocalError> {
        {
            let mut st = lock(&self.state);
            st.record.rate_bytes_per_sec = bytes_per_sec;
            st.unsaved = true;
        }
        self.save().await?;
        self.changed.send_replace(());
        self.wake.notify_one();
        Ok(())
    }

    /// Progress (or a setting) changed since the last save.
    pub fn has_unsaved(&self) -> bool {
        lock(&self.state).unsaved
    }

    /// Makes the copy durable, then the record (see the module docs).
    pub async fn save(&self) -> Result<(), LocalError> {
        let _one = self.saving.lock().await;
        let record = {
            let mut st = lock(&self.state);
            if !st.unsaved {
                return Ok(());
            }
            st.unsaved = false;
            st.record.clone()
        };
        let written = match self.flush_copy().await {
            Ok(()) => self.write_record_blocking(record).await,
            Err(e) => Err(e),
        };
        if written.is_err() {
            lock(&self.state).unsaved = true;
        }
        written
    }

    async fn flush_copy(&self) -> Result<(), LocalError> {
        self.device.flush().await.map_err(|e| LocalError::Io {
            path: PathBuf::from(&lock(&self.state).record.target),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Gives up `[offset, offset + len)`'s chunks (a write to them reached
    /// the journal but not the copy): they are read through the journal
    /// and copied again. Under the range's stripes.
    pub fn forget(&self, offset: u64, len: u64) {
        let mut st = lock(&self.state);
        for c in st.record.progress.chunks_of(offset, len) {
            if st.record.progress.clear(c) {
                st.unsaved = true;
            }
        }
    }

    async fn write_record_blocking(&self, record: MigrationRecord) -> Result<(), LocalError> {
        let storage = self.storage.clone();
        let path = self.record_path.clone();
        tokio::task::spawn_blocking(move || {
            replace_file(storage.as_ref(), &path, &record.encode()).map_err(io_err(&path))
        })
        .await
        .map_err(|e| LocalError::Io {
            path: self.record_path.clone(),
            source: std::io::Error::other(e),
        })?
    }

    fn write_record(&self, record: &MigrationRecord) -> Result<(), LocalError> {
        if let Some(dir) = self.record_path.parent() {
            self.storage.create_dir_all(dir).map_err(io_err(dir))?;
        }
        replace_file(self.storage.as_ref(), &self.record_path, &record.encode())
            .map_err(io_err(&self.record_path))
    }

    /// Writes a chunk's copied data: real bytes, or zeroes (a hole in a
    /// sparse file).
    pub async fn write_chunk(&self, offset: u64, data: Bytes) -> blockcore::Result<()> {
        if data.iter().all(|&b| b == 0) {
            let len = data.len() as u64;
            return self
                .device
                .write_zeroes(
                    offset,
                    len,
                    ZeroFlags {
                        may_trim: self.sparse,
                        ..ZeroFlags::default()
                    },
                )
                .await;
        }
        self.device.write(offset, data, WriteFlags::default()).await
    }

    #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52
    pub fn status(&self) -> LocalStatus {
        let st = lock(&self.state);
        let local = st.record.progress.bytes_set();
        let rate = rate_of(&st.samples);
        let remaining = st.record.progress.size() - local;
        let c = &self.counters;
        LocalStatus {
            stage: st.record.stage,
            paused: st.record.paused,
            rate_limit_bytes_per_sec: st.record.rate_bytes_per_sec,
            target: st.record.target.clone(),
            bytes_total: st.record.progress.size(),
            bytes_local: local,
            bytes_dirty: st.record.dirty.bytes_set(),
            bytes_zero: c.bytes_zero.load(Ordering::Relaxed),
            bytes_cache: c.bytes_cache.load(Ordering::Relaxed),
            bytes_journal: c.bytes_journal.load(Ordering::Relaxed),
            bytes_link: c.bytes_link.load(Ordering::Relaxed),
            respoiled: c.respoiled.load(Ordering::Relaxed),
            moveback_shipped: c.moveback_shipped.load(Ordering::Relaxed),
            moveback_verified: c.moveback_verified.load(Ordering::Relaxed),
            moveback_signature_bytes: c.moveback_signature_bytes.load(Ordering::Relaxed),
            moveback_repaired: c.moveback_repaired.load(Ordering::Relaxed),
            rate_bytes_per_sec: rate,
            eta: (remaining == 0)
                .then_some(Duration::ZERO)
                .or_else(|| (rate > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / rate))),
        }
    }
}

/// What [`LocalCopy::note_write`] found.
#[derive(Debug)]
pub struct NotedWrite {
    /// The write goes to the journal (and on to the origin).
    pub journal: bool,
    /// `(offset, len)` parts to write into the local copy.
    pub local: Vec<(u64, u64)>,
    /// A chunk became dirty: its bit must be saved before a FUA write is
    /// acknowledged.
    pub newly_dirty: bool,
}

fn stripe(chunk: u64) -> usize {
    usize::try_from(chunk % STRIPES as u64).expect("small")
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

fn push_sample(samples: &mut VecDeque<(Instant, u64)>, local: u64) {
    let now = Instant::now();
    samples.push_back((now, local));
    while samples
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        && samples.len() > 2
    {
        samples.pop_front();
    }
}

#[allow(clippy::cast_precision_loss)] // byte counts far below 2^52
fn rate_of(samples: &VecDeque<(Instant, u64)>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
            (b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64()
        }
        _ => 0.0,
    }
}

/// A cut-over volume served from its local copy alone: every chunk is
/// local, writes mark the dirty map (saved before the data is written),
/// so a move back ships only what changed.
#[async_trait]
impl BlockDevice for LocalCopy {
    fn info(&self) -> DeviceInfo {
        let mut info = self.device.info();
        info.size = self.size;
        info.caps.extents = false;
        info.caps.prefetch = false;
        info
    }

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        blockcore::check_range(&self.info(), Op::Read, offset, len as u64)?;
        self.device.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockcore::Result<()> {
        blockcore::check_range(&self.info(), Op::Write, offset, data.len() as u64)?;
        let len = data.len() as u64;
        let _stripes = self.lock_range(offset, len).await;
        let noted = self.note_write(offset, len);
        self.persist_dirty(noted.newly_dirty, Op::Write, offset)
            .await?;
        self.device.write(offset, data, flags).await
    }

    async fn flush(&self) -> blockcore::Result<()> {
        self.device.flush().await?;
        self.save()
            .await
            .map_err(|e| local_block_error(Op::Flush, 0, e))
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> blockcore::Result<()> {
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                fua: flags.fua,
                may_trim: true,
                ..ZeroFlags::default()
            },
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockcore::Result<()> {
        blockcore::check_range(&self.info(), Op::WriteZeroes, offset, len)?;
        let _stripes = self.lock_range(offset, len).await;
        let noted = self.note_write(offset, len);
        self.persist_dirty(noted.newly_dirty, Op::WriteZeroes, offset)
            .await?;
        self.device.write_zeroes(offset, len, flags).await
    }

    async fn extents(&self, offset: u64, len: u64) -> blockcore::Result<Vec<Extent>> {
        self.device.extents(offset, len).await
    }
}

impl LocalCopy {
    /// Before a write that goes to the copy alone: a newly set dirty bit
    /// is durable before the data can be (a write intent, as in md's
    /// bitmap), so a crash never leaves changed data that a move back
    /// would not ship. One save per chunk first written after cut-over.
    pub(crate) async fn persist_dirty(
        &self,
        newly_dirty: bool,
        op: Op,
        offset: u64,
    ) -> blockcore::Result<()> {
        if newly_dirty {
            self.save()
                .await
                .map_err(|e| local_block_error(op, offset, e))?;
        }
        Ok(())
    }
}

/// The one mapping of a local-copy failure to a block error.
pub fn local_block_error(op: Op, offset: u64, e: LocalError) -> BlockError {
    match e {
        LocalError::Io { source, .. } if source.raw_os_error() == Some(28) => {
            BlockError::NoSpace { op, offset }
        }
        LocalError::Io { source, .. } => BlockError::io(op, offset, source),
        e @ (LocalError::Target { .. } | LocalError::Record { .. } | LocalError::Stale { .. }) => {
            BlockError::io(op, offset, std::io::Error::other(e.to_string()))
        }
    }
}
