//! The origin: serves volumes (any `blockcore` device) to edges over the
//! link, and applies their write batches.
//!
//! ```text
//!   edge ──link──> serve.rs: one task per connection, driving a
//!                  link::session::OriginSession
//!                    Op::Attach ──> Origin::attach: exclusive hold, keys, epoch,
//!                                   next batch, a partial batch to resume
//!                    Op::Read   ──> task: Origin::read (as_of, data or signatures)
//!                    Op::Apply  ──> task: Origin::apply: ApplyJournal begin
//!                                   (blocking pool) ─> device writes + flush ─>
//!                                   commit (blocking pool)
//! ```
//!
//! The session never waits for storage, so heartbeats, reads and batch
//! parts keep flowing while a batch is applied. Applies of one volume are
//! serialized (a reconnected edge's new connection waits for its old one's
//! apply), and re-check ownership under that order, so a connection that
//! lost the volume never changes it.
//!
//! Per volume, the origin keeps a state directory with the apply journal,
//! its snapshots (`snapshot.rs`: a chain of copy-on-write layers whose
//! head is the device everything here uses), the volume's epoch (a random
//! id fixed when the volume is first served and changed only by a
//! rollback to a snapshot: an edge keys its cache by it, so a volume
//! re-created under the same name, or rolled back, is not served from a
//! stale cache) and its fenced edges.
//! Volumes come and go at run time (`add_volume`, `remove_volume`); a
//! removed volume's directory stays, so adding it again resumes it.
//!
//! An operator whose edge is gone for good takes its volume back with
//! `force_release`: the edge is fenced off the volume (durably, before
//! anything else changes), its connection's reads and applies are refused
//! and the connection closed, and its attaches are refused (`Fenced`)
//! until `unfence`, for a rebuilt edge whose journal holds nothing old.
//!
//! A migration (`migration.rs`) asks for a volume's allocation map
//! (`Extents`), and its cut-over releases the volume as migrated to the
//! edge (`Release { CutOver }`): recorded durably, and every other edge's
//! attach is refused (`Migrated`) until the edge moves it back (`Release
//! { Home }`) or an operator force-releases it.
//!
//! One deployment master key (`master.key`) stays at the origin. At attach an edge gets a cache key
//! derived from it and the edge's id (its cache derives the encryption key
//! from that and its own cache id) and the deployment's dedup key, the
//! same for every edge, so clones of one template dedup across volumes and
//! the origin's signature replies name content the edge's cache knows.

mod clone;
mod files;
mod migration;
mod profiles;
mod serve;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blockcore::{BlockDevice, BlockError, WriteEntry};
use bytes::Bytes;
use journal::apply::{Applied, ApplyError, ApplyJournal, Begin};
use journal::storage::{read_file, replace_file, DiskStorage, Storage};
use link::proto::{ErrorCode, MAX_STRING_LEN};
use link::session::{
    AttachGrant, Mistakes, OriginSessionConfig, PartialBatch, ReadAnswer, Refusal,
};
use zeroize::Zeroizing;

pub use clone::{CloneError, CloneInfo, Persistence};
pub use files::VolumeFiles;
use keys::{edge_cache_key, SignatureKey};
use link::BoundedSet;
pub use profiles::{PlanSource, ProfileReport, StoredProfile};
pub use serve::{serve, serve_connection, TlsAcceptor};
pub use snapshot::{
    auto_snapshot_name, check_snapshot_name, SnapshotError, SnapshotInfo, SnapshotList,
};

/// The signatures of chunks an edge was sent, newest kept: what the origin
/// believes the edge's cache holds. A wrong belief (the edge evicted the
/// chunk) costs the edge one more round trip, never wrong data: the edge
/// verifies what it serves by the signature.
///
/// Chunks sent as a demand reply count at once; pushed chunks only after
/// [`PUSH_SETTLE`]: a push may still be in the path (demand replies
/// overtake it), and a read answered with the signature of a chunk the
/// edge does not hold yet costs it that second round trip.
struct KnownSignatures {
    known: BoundedSet<[u8; 32]>,
    settling: VecDeque<(Instant, [u8; 32])>,
}

/// How long after it was read a pushed chunk is assumed to be in the
/// edge's cache.
const PUSH_SETTLE: Duration = Duration::from_secs(2);

impl KnownSignatures {
    fn new(capacity: usize) -> Self {
        KnownSignatures {
            known: BoundedSet::new(capacity),
            settling: VecDeque::new(),
        }
    }

    fn insert_sent(&mut self, sig: [u8; 32]) {
        self.known.insert(sig);
    }

    fn insert_pushed(&mut self, sig: [u8; 32], now: Instant) {
        if self.settling.len() >= self.known.capacity() {
            if let Some((_, s)) = self.settling.pop_front() {
                self.known.insert(s);
            }
        }
        self.settling.push_back((now, sig));
    }

    fn contains(&mut self, sig: &[u8; 32], now: Instant) -> bool {
        while let Some(&(at, s)) = self.settling.front() {
            if now.saturating_duration_since(at) < PUSH_SETTLE {
                break;
            }
            self.settling.pop_front();
            self.known.insert(s);
        }
        self.known.contains(sig)
    }
}

/// Where the origin's blocking file operations run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileIo {
    /// On tokio's blocking pool (a real origin).
    #[default]
    BlockingPool,
    /// On the calling thread (the simulator, over in-memory files).
    Inline,
}

impl FileIo {
    async fn run<R: Send + 'static>(self, f: impl FnOnce() -> R + Send + 'static) -> R {
        match self {
            FileIo::Inline => f(),
            FileIo::BlockingPool => tokio::task::spawn_blocking(f)
                .await
                .expect("a blocking file operation panicked"),
        }
    }
}

/// Tunables of an origin.
#[derive(Clone, Debug)]
pub struct OriginConfig {
    /// Every connection's session settings (pre-shared key, group size,
    /// chunk size, windows).
    pub session: OriginSessionConfig,
    /// How many chunk signatures to remember per edge (what it was sent),
    /// to answer later reads of the same content with signatures.
    pub known_signatures: usize,
    pub file_io: FileIo,
    /// Automatic snapshots kept per volume: one is taken before the
    /// first write batch of a new holder (see `snapshot.rs`), the oldest
    /// beyond this many merged away. 0 (the library's default): none.
    pub auto_snapshots: usize,
    /// Known mistakes, for the simulator's tests only.
    pub mistakes: Mistakes,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            session: OriginSessionConfig::default(),
            // 32 bytes each plus set overhead: ~100 MiB for 1M chunks
            // (64 GiB of 64 KiB chunks).
            known_signatures: 1 << 20,
            file_io: FileIo::default(),
            auto_snapshots: 0,
            mistakes: Mistakes::default(),
        }
    }
}

/// Errors of the origin's state and of managing its volumes.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("volume name {0:?} is empty or not a plain file name")]
    BadName(String),
    #[error("volume {0:?} is already served")]
    Duplicate(String),
    #[error("no volume {0:?}")]
    NoSuchVolume(String),
    #[error(
        "volume {volume:?} is attached by edge {edge:?}: detach it from that edge first, \
         or, if the edge is gone for good, force-release it (which fences the edge)"
    )]
    Held { volume: String, edge: String },
    #[error(
        "volume {volume:?} was migrated to edge {edge:?}, which serves it from its own copy: \
         move it back first"
    )]
    MigratedAway { volume: String, edge: String },
    #[error("volume {0:?} is not attached by any edge")]
    NotHeld(String),
    #[error("volume {0:?} is applying a write batch; try again")]
    Applying(String),
    #[error("edge id {0:?} is empty or longer than a wire string")]
    BadEdgeId(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Clone(#[from] CloneError),
}

/// Who holds a volume: an edge, on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    edge_id: String,
    conn: u64,
}

/// A volume's counters as they run (see [`VolumeCounters`]).
#[derive(Debug, Default)]
struct VolumeStats {
    bytes_read: AtomicU64,
    bytes_pushed: AtomicU64,
    signature_replies: AtomicU64,
    signature_bytes_saved: AtomicU64,
    bytes_signed: AtomicU64,
    batches_applied: AtomicU64,
    batch_bytes_applied: AtomicU64,
    batches_already_applied: AtomicU64,
    attaches: AtomicU64,
    last_apply_unix_ms: AtomicU64,
}

/// One volume's counters, read at once: plain numbers for an exporter.
/// All count since the volume was opened or added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeCounters {
    /// Data bytes read from the volume and sent as demand replies.
    pub bytes_read: u64,
    /// Data bytes read from the volume and pushed (groups, prefetches).
    pub bytes_pushed: u64,
    /// Demand reads answered with signatures, and the data bytes that did
    /// not cross the link because of them.
    pub signature_replies: u64,
    pub signature_bytes_saved: u64,
    /// Bytes of the volume signed for an edge's comparison (`Sign`: a
    /// move back's), read here and never sent.
    pub bytes_signed: u64,
    /// Batches applied, and the data bytes they carried (zeroed ranges
    /// carry none).
    pub batches_applied: u64,
    pub batch_bytes_applied: u64,
    /// Resent batches found applied before (acknowledged, not applied).
    pub batches_already_applied: u64,
    /// Attaches granted.
    pub attaches: u64,
    /// When a batch was last applied, in milliseconds since the Unix
    /// epoch; 0 if none was.
    pub last_apply_unix_ms: u64,
}

/// One served volume.
pub struct Volume {
    name: String,
    /// The head of `chain`: what reads, pushes and applies use.
    device: Arc<dyn BlockDevice>,
    /// The device it was added with, under its snapshots' layers.
    chain: Arc<snapshot::Chain>,
    /// Changed only by a rollback to a snapshot.
    epoch: AtomicU64,
    /// Its state directory: epoch, fences, apply journal.
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    journal: Arc<Mutex<ApplyJournal>>,
    /// Applies of this volume run one at a time, in the order they come.
    apply_order: tokio::sync::Mutex<()>,
    /// The newest batch applied, for `as_of` (read before a read starts).
    applied: AtomicU64,
    /// Lock order: the origin's volume map, then `holder`, then `fenced`,
    /// then `partial`.
    holder: Mutex<Option<Holder>>,
    /// The last edge granted the volume (since this origin started): whom
    /// an operator means when releasing a volume whose edge is gone.
    last_holder: Mutex<Option<String>>,
    /// Edges an operator fenced off this volume (as persisted in
    /// `dir/fenced`): refused at attach.
    fenced: Mutex<BTreeSet<String>>,
    /// The edge the volume was migrated to (as persisted in
    /// `dir/migrated`): every other edge is refused at attach. Taken
    /// after `holder`, never with `fenced` or `partial`.
    migrated: Mutex<Option<String>>,
    /// A batch an edge was sending when its connection ended.
    partial: Mutex<Option<(String, PartialBatch)>>,
    /// The edge whose first write batch takes an automatic snapshot
    /// first: set at attach for a new holder (or a move back).
    auto_snapshot_for: Mutex<Option<String>>,
    /// What it was cloned from, if it is a clone.
    clone_of: Option<CloneInfo>,
    stats: VolumeStats,
    files: files::FilesCache,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

/// The file in a volume's state directory listing its fenced edges.
const FENCED_FILE: &str = "fenced";
/// Format: `FRYF | count u32 | (len u16 | edge id UTF-8)...`, big-endian.
const FENCED_MAGIC: [u8; 4] = *b"FRYF";

fn encode_fences(fenced: &BTreeSet<String>) -> Vec<u8> {
    let mut out = FENCED_MAGIC.to_vec();
    let count = u32::try_from(fenced.len()).expect("fewer than 2^32 edges");
    out.extend_from_slice(&count.to_be_bytes());
    for id in fenced {
        // At most MAX_STRING_LEN bytes (checked when fenced).
        let len = u16::try_from(id.len()).expect("an edge id fits a wire string");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out
}

fn decode_fences(mut b: &[u8]) -> Option<BTreeSet<String>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = b.split_at_checked(n)?;
        *b = rest;
        Some(head)
    }
    if take(&mut b, 4)? != FENCED_MAGIC {
        return None;
    }
    let count = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
    let mut out = BTreeSet::new();
    for _ in 0..count {
        let len = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
        let id = std::str::from_utf8(take(&mut b, len.into())?).ok()?;
        out.insert(id.to_owned());
    }
    b.is_empty().then_some(out)
}

fn read_fences(storage: &dyn Storage, path: &Path) -> Result<BTreeSet<String>, OriginError> {
    match read_file(storage, path).map_err(state_err(path))? {
        None => Ok(BTreeSet::new()),
        Some(b) => decode_fences(&b).ok_or_else(|| OriginError::State {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a list of edges"),
        }),
    }
}

impl Volume {
    /// Opens `name`'s state under `state_dir` (creating its epoch on first
    /// use) and finishes any batch a crash interrupted.
    async fn open(
        storage: Arc<dyn Storage>,
        state_dir: &Path,
        name: String,
        device: Arc<dyn BlockDevice>,
        clone_of: Option<CloneInfo>,
        config: &OriginConfig,
        random: impl FnOnce() -> [u8; 32],
    ) -> Result<Volume, OriginError> {
        let dir = state_dir.join("volumes").join(&name);
        storage.create_dir_all(&dir).map_err(state_err(&dir))?;
        let epoch = u64::from_be_bytes(load_or_create::<8>(
            storage.as_ref(),
            &dir.join("epoch"),
            || random()[..8].try_into().expect("8 of 32 bytes"),
        )?);
        let fenced = read_fences(storage.as_ref(), &dir.join(FENCED_FILE))?;
        let migrated =
            migration::read_migrated(storage.as_ref(), &dir.join(migration::MIGRATED_FILE))?;
        let chain = Arc::new(
            snapshot::Chain::open(storage.clone(), &dir, &name, device, config.file_io).await?,
        );
        let device: Arc<dyn BlockDevice> = chain.clone();
        let mut journal =
            ApplyJournal::open_with(storage.clone(), &dir.join("apply"), device.as_ref()).await?;
        journal.set_apply_twice(config.mistakes.apply_twice);
        let applied = journal.applied();
        Ok(Volume {
            name,
            device,
            chain,
            epoch: AtomicU64::new(epoch),
            dir,
            storage,
            journal: Arc::new(Mutex::new(journal)),
            apply_order: tokio::sync::Mutex::new(()),
            applied: AtomicU64::new(applied),
            holder: Mutex::new(None),
            last_holder: Mutex::new(None),
            fenced: Mutex::new(fenced),
            migrated: Mutex::new(migrated),
            partial: Mutex::new(None),
            auto_snapshot_for: Mutex::new(None),
            clone_of,
            stats: VolumeStats::default(),
            files: files::FilesCache::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.device.info().size
    }

    /// The random id edges key their caches by (see the module docs).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Where its epoch, fences and apply journal live.
    /// What it was cloned from, if it is a clone.
    pub fn clone_of(&self) -> Option<&CloneInfo> {
        self.clone_of.as_ref()
    }

    /// A clone with cloud persistence: the origin keeps none of its
    /// writes.
    pub fn keeps_no_writes(&self) -> bool {
        self.clone_of
            .as_ref()
            .is_some_and(|c| c.persistence == Persistence::Cloud)
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The newest batch applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The edge attached to it, if any.
    pub fn holder(&self) -> Option<String> {
        lock(&self.holder).as_ref().map(|h| h.edge_id.clone())
    }

    /// The last edge that attached it since this origin started.
    pub fn last_holder(&self) -> Option<String> {
        lock(&self.last_holder).clone()
    }

    /// The edges fenced off it, sorted.
    pub fn fenced(&self) -> Vec<String> {
        lock(&self.fenced).iter().cloned().collect()
    }

    pub fn is_fenced(&self, edge_id: &str) -> bool {
        lock(&self.fenced).contains(edge_id)
    }

    pub fn counters(&self) -> VolumeCounters {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VolumeCounters {
            bytes_read: get(&s.bytes_read),
            bytes_pushed: get(&s.bytes_pushed),
            signature_replies: get(&s.signature_replies),
            signature_bytes_saved: get(&s.signature_bytes_saved),
            bytes_signed: get(&s.bytes_signed),
            batches_applied: get(&s.batches_applied),
            batch_bytes_applied: get(&s.batch_bytes_applied),
            batches_already_applied: get(&s.batches_already_applied),
            attaches: get(&s.attaches),
            last_apply_unix_ms: get(&s.last_apply_unix_ms),
        }
    }

    fn held_by(&self, conn: u64) -> bool {
        lock(&self.holder).as_ref().is_some_and(|h| h.conn == conn)
    }

    /// Why connection `conn`, attached as `edge_id`, must close: its edge
    /// was fenced off the volume.
    pub(crate) fn revoked(&self, conn: u64, edge_id: &str) -> Option<Refusal> {
        (!self.held_by(conn) && self.is_fenced(edge_id))
            .then(|| fenced_refusal(&self.name, edge_id))
    }

    /// Replaces the fence list with `fenced`, durably first.
    fn store_fences(
        &self,
        current: &mut BTreeSet<String>,
        fenced: BTreeSet<String>,
    ) -> Result<(), OriginError> {
        let path = self.dir.join(FENCED_FILE);
        replace_file(self.storage.as_ref(), &path, &encode_fences(&fenced))
            .map_err(state_err(&path))?;
        *current = fenced;
        Ok(())
    }
}

/// One read an edge's session asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSpec {
    pub offset: u64,
    pub len: u32,
    /// The edge accepts signatures instead of data.
    pub want_signatures: bool,
    /// The data goes out as a push (never answered with signatures).
    pub push: bool,
}

/// The origin's counters as they run, across its volumes (per volume:
/// [`Volume::counters`]).
#[derive(Debug, Default)]
pub struct OriginCounters {
    /// Reads answered with signatures instead of data, and the data bytes
    /// that did not cross the link.
    pub signature_replies: AtomicU64,
    pub signature_bytes_saved: AtomicU64,
    /// Batches applied now, and resends found applied before.
    pub batches_applied: AtomicU64,
    pub batches_already_applied: AtomicU64,
    /// Connections accepted (each numbered by this count), and those
    /// being served now.
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    /// Attaches refused (no such volume, busy, fenced).
    pub attach_refusals: AtomicU64,
}

/// [`OriginCounters`] read at once: plain numbers for an exporter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginCountersSnapshot {
    pub signature_replies: u64,
    pub signature_bytes_saved: u64,
    pub batches_applied: u64,
    pub batches_already_applied: u64,
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub attach_refusals: u64,
}

impl OriginCounters {
    pub fn snapshot(&self) -> OriginCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OriginCountersSnapshot {
            signature_replies: get(&self.signature_replies),
            signature_bytes_saved: get(&self.signature_bytes_saved),
            batches_applied: get(&self.batches_applied),
            batches_already_applied: get(&self.batches_already_applied),
            connections_accepted: get(&self.connections_accepted),
            connections_active: get(&self.connections_active),
            attach_refusals: get(&self.attach_refusals),
        }
    }
}

/// The served volumes, and names being added (their journals are being
/// opened: a second add of the name must not open them too).
#[derive(Debug, Default)]
struct Volumes {
    served: BTreeMap<String, Arc<Volume>>,
    adding: BTreeSet<String>,
}

/// Served volumes and their state.
pub struct Origin {
    config: OriginConfig,
    master_key: Zeroizing<[u8; 32]>,
    signature_key: SignatureKey,
    storage: Arc<dyn Storage>,
    state_dir: PathBuf,
    /// Per edge id: the signatures of chunks it was sent, across its
    /// volumes and reconnections.
    known: Mutex<HashMap<String, Arc<Mutex<KnownSignatures>>>>,
    volumes: Mutex<Volumes>,
    /// The clone registry as stored (`clone.rs`); shared with background
    /// snapshot deletions, which must not remove a clone's base.
    clones: Arc<Mutex<Vec<CloneInfo>>>,
    /// Clone creates and deletes, one at a time.
    clone_ops: tokio::sync::Mutex<()>,
    /// Bumped whenever an edge is fenced, so every connection checks
    /// whether it was its edge (`serve` then closes it).
    fences: tokio::sync::watch::Sender<u64>,
    stats: OriginCounters,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field(
                "volumes",
                &lock(&self.volumes).served.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> OriginError + '_ {
    move |source| OriginError::State {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a fixed-size secret or id from `path`, creating it with random
/// bytes on first use (atomically and durably).
fn load_or_create<const N: usize>(
    storage: &dyn Storage,
    path: &Path,
    random: impl FnOnce() -> [u8; N],
) -> Result<[u8; N], OriginError> {
    match read_file(storage, path).map_err(state_err(path))? {
        Some(v) if v.len() == N => Ok(v.try_into().expect("length checked")),
        Some(v) => Err(OriginError::State {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("{} bytes, expected {N}", v.len())),
        }),
        None => {
            let bytes = random();
            // Storage creates files owner-only.
            replace_file(storage, path, &bytes).map_err(state_err(path))?;
            Ok(bytes)
        }
    }
}

fn random<const N: usize>() -> [u8; N] {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the system random number generator failed");
    out
}

/// A volume's name is its state directory's: one plain path component.
fn check_name(name: &str) -> Result<(), OriginError> {
    if name.is_empty() || name.len() > 255 || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(OriginError::BadName(name.to_owned()));
    }
    Ok(())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
}

fn fenced_refusal(volume: &str, edge_id: &str) -> Refusal {
    refusal(
        ErrorCode::Fenced,
        format!(
            "edge {edge_id:?} is fenced off volume {volume:?}: an operator force-released it, \
             so it may not write again; rebuild the edge with an empty journal, then unfence \
             it at the origin"
        ),
    )
}

fn not_held() -> Refusal {
    refusal(
        ErrorCode::NotAttached,
        "this connection no longer holds the volume (taken over by a newer connection of \
         this edge, or force-released by an operator)",
    )
}

/// The one mapping of a device error to the link's code.
fn block_refusal(e: &BlockError) -> Refusal {
    let code = match e {
        BlockError::OutOfRange { .. }
        | BlockError::Misaligned { .. }
        | BlockError::TooLarge { .. } => ErrorCode::OutOfRange,
        BlockError::Unsupported { .. } | BlockError::ReadOnly { .. } => ErrorCode::Unsupported,
        BlockError::ShuttingDown { .. } => ErrorCode::ShuttingDown,
        BlockError::NoSpace { .. } | BlockError::Io { .. } => ErrorCode::Io,
    };
    refusal(code, e.to_string())
}

/// The one mapping of an apply failure to the link's code.
fn apply_refusal(e: &ApplyError) -> Refusal {
    let code = match e {
        ApplyError::OutOfOrder { .. } | ApplyError::NotBegun { .. } => ErrorCode::Protocol,
        ApplyError::Device { source, .. } => return block_refusal(source),
        ApplyError::Io { .. } | ApplyError::Corrupt { .. } => ErrorCode::Io,
    };
    refusal(code, e.to_string())
}

/// A name being added: released when the add ends, however it ends.
struct Adding<'a> {
    origin: &'a Origin,
    name: String,
}

impl Drop for Adding<'_> {
    fn drop(&mut self) {
        lock(&self.origin.volumes).adding.remove(&self.name);
    }
}

impl Origin {
    /// Opens the origin's state in `state_dir` for `volumes` (name, device),
    /// finishing any batch a crash interrupted.
    pub async fn open(
        state_dir: &Path,
        volumes: Vec<(String, Arc<dyn BlockDevice>)>,
        config: OriginConfig,
    ) -> Result<Origin, OriginError> {
        Self::open_with(Arc::new(DiskStorage), state_dir, volumes, config, random).await
    }

    /// [`Origin::open`] over another [`Storage`], with the randomness for
    /// new keys and epochs given (the simulator's are seeded).
    pub async fn open_with(
        storage: Arc<dyn Storage>,
        state_dir: &Path,
        volumes: Vec<(String, Arc<dyn BlockDevice>)>,
        config: OriginConfig,
        mut random: impl FnMut() -> [u8; 32],
    ) -> Result<Origin, OriginError> {
        storage
            .create_dir_all(state_dir)
            .map_err(state_err(state_dir))?;
        let master_key = Zeroizing::new(load_or_create::<32>(
            storage.as_ref(),
            &state_dir.join("master.key"),
            &mut random,
        )?);
        let signature_key = SignatureKey::derive(&master_key);
        let origin = Origin {
            config,
            master_key,
            signature_key,
            storage,
            state_dir: state_dir.to_path_buf(),
            known: Mutex::new(HashMap::new()),
            volumes: Mutex::default(),
            clones: Arc::default(),
            clone_ops: tokio::sync::Mutex::new(()),
            fences: tokio::sync::watch::Sender::new(0),
            stats: OriginCounters::default(),
        };
        for (name, device) in volumes {
            origin.add(name, device, None, &mut random).await?;
        }
        origin.open_clones().await?;
        Ok(origin)
    }

    pub fn config(&self) -> &OriginConfig {
        &self.config
    }

    /// Counters across volumes and connections.
    pub fn counters(&self) -> &OriginCounters {
        &self.stats
    }

    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        lock(&self.volumes).served.get(name).cloned()
    }

    /// Every served volume, by name.
    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        lock(&self.volumes).served.values().cloned().collect()
    }

    /// Serves another volume from now on, with the same state handling as
    /// [`Origin::open`]: a name served before finds its epoch, fences and
    /// apply journal (finishing a batch a crash interrupted).
    pub async fn add_volume(
        &self,
        name: String,
        device: Arc<dyn BlockDevice>,
    ) -> Result<Arc<Volume>, OriginError> {
        let v = self.add(name, device, None, random).await?;
        tracing::info!(target: "ferry::audit", volume = %v.name, epoch = v.epoch(), size = v.size(), "volume added");
        Ok(v)
    }

    /// A volume's state directory.
    fn volume_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("volumes").join(name)
    }

    async fn add(
        &self,
        name: String,
        device: Arc<dyn BlockDevice>,
        clone_of: Option<CloneInfo>,
        random: impl FnOnce() -> [u8; 32],
    ) -> Result<Arc<Volume>, OriginError> {
        check_name(&name)?;
        let _adding = {
            let mut vols = lock(&self.volumes);
            if vols.served.contains_key(&name) || !vols.adding.insert(name.clone()) {
                return Err(OriginError::Duplicate(name));
            }
            Adding {
                origin: self,
                name: name.clone(),
            }
        };
        let v = Volume::open(
            self.storage.clone(),
            &self.state_dir,
            name,
            device,
            clone_of,
            &self.config,
            random,
        )
        .await?;
        let v = Arc::new(v);
        lock(&self.volumes).served.insert(v.name.clone(), v.clone());
        Ok(v)
    }

    /// Stops serving `name`: later attaches get `NoSuchVolume`. Refused
    /// while an edge holds it, while it has clones, and for a clone
    /// ([`Origin::delete_clone`]). Its state directory stays, so adding
    /// the name again finds its epoch, fences and apply journal.
    pub fn remove_volume(&self, name: &str) -> Result<Arc<Volume>, OriginError> {
        if let Some(c) = self.volume(name).and_then(|v| v.clone_of.clone()) {
            return Err(CloneError::IsAClone {
                volume: name.to_owned(),
                parent: c.parent,
                snapshot: c.snapshot,
            }
            .into());
        }
        self.check_no_clones(name)?;
        self.unserve(name)
    }

    /// [`Origin::remove_volume`] without the clone checks.
    fn unserve(&self, name: &str) -> Result<Arc<Volume>, OriginError> {
        // Under the map's lock, which attach takes too: no edge attaches
        // between the check and the removal.
        let mut vols = lock(&self.volumes);
        let v = vols
            .served
            .get(name)
            .cloned()
            .ok_or_else(|| OriginError::NoSuchVolume(name.to_owned()))?;
        if let Some(h) = lock(&v.holder).as_ref() {
            return Err(OriginError::Held {
                volume: name.to_owned(),
                edge: h.edge_id.clone(),
            });
        }
        // An apply past its ownership check when its connection ended is
        // still using the journal, which a re-add would open a second
        // time. None can pass that check from now on (nobody holds the
        // volume, and nobody can attach it while the map is locked).
        if v.apply_order.try_lock().is_err() {
            return Err(OriginError::Applying(name.to_owned()));
        }
        // Nor may a snapshot operation still work on its files.
        if v.chain.busy() {
            return Err(SnapshotError::Busy(name.to_owned()).into());
        }
        vols.served.remove(name);
        drop(vols);
        tracing::info!(target: "ferry::audit", volume = %name, "volume removed");
        Ok(v)
    }

    /// For an operator whose edge is gone for good: takes `name` from the
    /// edge holding it, or else from the edge it was migrated to, and
    /// fences that edge off it (see [`Origin::fence`]; a migrated volume
    /// comes home by force). Returns the edge's id.
    pub fn force_release(&self, name: &str) -> Result<String, OriginError> {
        let v = self
            .volume(name)
            .ok_or_else(|| OriginError::NoSuchVolume(name.to_owned()))?;
        let mut holder = lock(&v.holder);
        let held = holder.as_ref().map(|h| h.edge_id.clone());
        let Some(edge_id) = held.or_else(|| v.migrated_to()) else {
            return Err(OriginError::NotHeld(name.to_owned()));
        };
        self.fence_held(&v, &mut holder, &edge_id)?;
        Ok(edge_id)
    }

    /// Fences `edge_id` off `name`, attached or not (an edge whose
    /// connection already ended must not come back either): persisted in
    /// the volume's state directory before anything else changes, so it
    /// survives a restart. From then on the edge's attaches are refused
    /// (`Fenced`), and so are reads and applies still arriving on its
    /// connection (`NotAttached`; `serve` also closes the connection); the
    /// partial batch kept for it is dropped, and a migration record naming
    /// it is cleared (the volume comes home by force: nobody could attach
    /// it otherwise). An apply already writing finishes: it was accepted
    /// while the edge held the volume. Does small durable writes on the
    /// calling thread. Returns whether it was not fenced before.
    pub fn fence(&self, name: &str, edge_id: &str) -> Result<bool, OriginError> {
        let v = self
            .volume(name)
            .ok_or_else(|| OriginError::NoSuchVolume(name.to_owned()))?;
        let mut holder = lock(&v.holder);
        self.fence_held(&v, &mut holder, edge_id)
    }

    /// [`Origin::fence`] under `v`'s holder lock, so no attach slips in
    /// between the fence and the release.
    fn fence_held(
        &self,
        v: &Volume,
        holder: &mut Option<Holder>,
        edge_id: &str,
    ) -> Result<bool, OriginError> {
        // No edge with another id can attach (ids come off the wire), and
        // the fence file keeps ids of that length.
        if edge_id.is_empty() || edge_id.len() > MAX_STRING_LEN {
            return Err(OriginError::BadEdgeId(edge_id.to_owned()));
        }
        let newly = {
            let mut fenced = lock(&v.fenced);
            let newly = !fenced.contains(edge_id);
            if newly {
                let mut next = fenced.clone();
                next.insert(edge_id.to_owned());
                v.store_fences(&mut fenced, next)?;
            }
            newly
        };
        // Fenced first: a crash before the record is cleared leaves the
        // volume refusing every edge, not open to the migrated one.
        v.force_home(edge_id)?;
        let held = holder.as_ref().is_some_and(|h| h.edge_id == edge_id);
        if held {
            *holder = None;
        }
        {
            let mut partial = lock(&v.partial);
            if partial.as_ref().is_some_and(|(e, _)| e == edge_id) {
                *partial = None;
            }
        }
        self.fences.send_modify(|n| *n += 1);
        if held {
            tracing::warn!(target: "ferry::audit", volume = %v.name, edge = %edge_id, "force-released: edge fenced");
        } else {
            tracing::warn!(target: "ferry::audit", volume = %v.name, edge = %edge_id, "edge fenced");
        }
        Ok(newly)
    }

    /// Lets a fenced edge attach `name` again (rebuilt, with an emptied
    /// journal: what an old one still holds would land on the volume).
    /// Returns whether it was fenced.
    pub fn unfence(&self, name: &str, edge_id: &str) -> Result<bool, OriginError> {
        let v = self
            .volume(name)
            .ok_or_else(|| OriginError::NoSuchVolume(name.to_owned()))?;
        let mut fenced = lock(&v.fenced);
        if !fenced.contains(edge_id) {
            return Ok(false);
        }
        let mut next = fenced.clone();
        next.remove(edge_id);
        v.store_fences(&mut fenced, next)?;
        drop(fenced);
        tracing::warn!(target: "ferry::audit", volume = %name, edge = %edge_id, "unfenced: the edge may attach again");
        Ok(true)
    }

    /// Changes whenever an edge is fenced.
    pub(crate) fn fence_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.fences.subscribe()
    }

    /// A number for a new connection (ownership is per connection).
    pub fn new_connection(&self) -> u64 {
        self.stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }

    /// Grants `name` to `edge_id` on connection `conn`: the volume, and
    /// what the session answers `Attach` with. The same edge reconnecting
    /// takes over from its old (possibly not yet noticed dead) connection;
    /// another edge, or a fenced one, is refused.
    pub fn attach(
        &self,
        conn: u64,
        name: &str,
        edge_id: &str,
    ) -> Result<(Arc<Volume>, AttachGrant), Refusal> {
        let granted = self.grant(conn, name, edge_id);
        if let Err(r) = &granted {
            self.stats.attach_refusals.fetch_add(1, Ordering::Relaxed);
            tracing::info!(volume = %name, edge = %edge_id, code = ?r.code, reason = %r.message, "attach refused");
        }
        granted
    }

    fn grant(
        &self,
        conn: u64,
        name: &str,
        edge_id: &str,
    ) -> Result<(Arc<Volume>, AttachGrant), Refusal> {
        let v = {
            // The map's lock first: a removal cannot pass between the
            // lookup and taking the hold (see `remove_volume`).
            let vols = lock(&self.volumes);
            let Some(v) = vols.served.get(name).cloned() else {
                return Err(refusal(
                    ErrorCode::NoSuchVolume,
                    format!("no volume {name:?}"),
                ));
            };
            let mut holder = lock(&v.holder);
            if v.is_fenced(edge_id) {
                return Err(fenced_refusal(name, edge_id));
            }
            if let Some(to) = v.migrated_to().filter(|to| to != edge_id) {
                return Err(migration::migrated_refusal(name, &to));
            }
            match &*holder {
                Some(h) if h.edge_id != edge_id => {
                    return Err(refusal(
                        ErrorCode::VolumeBusy,
                        format!("volume {name:?} is attached by edge {:?}", h.edge_id),
                    ));
                }
                _ => {
                    *holder = Some(Holder {
                        edge_id: edge_id.to_owned(),
                        conn,
                    });
                    let before = lock(&v.last_holder).replace(edge_id.to_owned());
                    // A new holder, or a move back (the edge that owns the
                    // content ships it home): its writes are preceded by
                    // an automatic snapshot. A reconnection is not new.
                    let new = before.as_deref() != Some(edge_id) || v.migrated_to().is_some();
                    if new && self.config.auto_snapshots > 0 && !v.keeps_no_writes() {
                        *lock(&v.auto_snapshot_for) = Some(edge_id.to_owned());
                    }
                }
            }
            drop(holder);
            v
        };
        v.stats.attaches.fetch_add(1, Ordering::Relaxed);
        let next_seq = v.applied() + 1;
        let resume = lock(&v.partial)
            .take()
            .filter(|(e, p)| e == edge_id && p.seq == next_seq)
            .map(|(_, p)| p);
        tracing::info!(volume = %name, edge = %edge_id, next_seq, resume_part = resume.as_ref().map(|p| p.next_part), "edge attached");
        let grant = AttachGrant {
            size: v.size(),
            cache_key: *edge_cache_key(&self.master_key, edge_id),
            dedup_key: *self.signature_key.dedup_key(),
            volume_epoch: v.epoch(),
            next_seq,
            resume,
            local_writes: v.keeps_no_writes(),
        };
        Ok((v, grant))
    }

    /// Connection `conn` ends or detaches: it lets go of `v` (if it still
    /// holds it), leaving the batch it was receiving for the edge's next
    /// connection.
    pub fn release(&self, conn: u64, v: &Volume, partial: Option<PartialBatch>) {
        migration::release_held(v, &mut lock(&v.holder), conn, partial);
    }

    /// The signer for an edge's chunks: what it was sent, to answer later
    /// reads with signatures.
    pub fn signer(self: &Arc<Self>, edge_id: &str) -> Signer {
        let known = lock(&self.known)
            .entry(edge_id.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(KnownSignatures::new(
                    self.config.known_signatures,
                )))
            })
            .clone();
        Signer {
            origin: self.clone(),
            known,
        }
    }

    /// Reads for connection `conn`: data with its `as_of` (the newest batch
    /// applied before the read started), or the chunks' signatures when the
    /// edge accepts them and was sent every one before.
    pub async fn read(
        &self,
        conn: u64,
        v: &Volume,
        spec: ReadSpec,
        signer: Option<&Signer>,
    ) -> Result<ReadAnswer, Refusal> {
        let ReadSpec {
            offset,
            len,
            want_signatures,
            push,
        } = spec;
        if !v.held_by(conn) {
            return Err(not_held());
        }
        let as_of = v.applied();
        let data = v
            .device
            .read(offset, len as usize)
            .await
            .map_err(|e| block_refusal(&e))?;
        let answer = match signer {
            Some(s) => s.answer(offset, as_of, data, want_signatures, push).await,
            None => ReadAnswer::Data { as_of, data },
        };
        let c = &v.stats;
        match &answer {
            ReadAnswer::Data { data, .. } if push => {
                c.bytes_pushed
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            ReadAnswer::Data { data, .. } => {
                c.bytes_read.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            ReadAnswer::Signatures { .. } => {
                c.signature_replies.fetch_add(1, Ordering::Relaxed);
                c.signature_bytes_saved
                    .fetch_add(u64::from(len), Ordering::Relaxed);
            }
        }
        Ok(answer)
    }

    /// The keyed signature of every `block`-byte piece of `v`'s bytes
    /// from `offset` to `offset + len` as they are now (the last piece may
    /// be short), for connection `conn`: what a move back verifies the
    /// image by. Every batch the edge had acknowledged is in it (applied
    /// before its ack).
    pub async fn sign(
        self: &Arc<Self>,
        conn: u64,
        v: &Volume,
        offset: u64,
        len: u32,
        block: u32,
    ) -> Result<Vec<[u8; 32]>, Refusal> {
        if !v.held_by(conn) || block == 0 {
            return Err(not_held());
        }
        let data = v
            .device
            .read(offset, len as usize)
            .await
            .map_err(|e| block_refusal(&e))?;
        let origin = self.clone();
        let sign = move || {
            data.chunks(block as usize)
                .map(|piece| *origin.signature_key.signature(piece).as_bytes())
                .collect::<Vec<_>>()
        };
        v.stats
            .bytes_signed
            .fetch_add(u64::from(len), Ordering::Relaxed);
        let sigs = match self.config.file_io {
            FileIo::Inline => sign(),
            // About 8 µs per 64 KiB: off the async threads.
            FileIo::BlockingPool => tokio::task::spawn_blocking(sign)
                .await
                .map_err(|e| refusal(ErrorCode::Io, e.to_string()))?,
        };
        Ok(sigs)
    }

    /// Applies batch `seq` for connection `conn` (see the module docs).
    pub async fn apply(
        &self,
        conn: u64,
        v: &Volume,
        seq: u64,
        entries: Vec<WriteEntry>,
    ) -> Result<Applied, Refusal> {
        if v.keeps_no_writes() {
            return Err(refusal(
                ErrorCode::Unsupported,
                format!(
                    "volume {:?} is a clone with cloud persistence: the origin keeps none of \
                     its writes (the edge must keep them locally)",
                    v.name
                ),
            ));
        }
        let _in_order = v.apply_order.lock().await;
        // Re-checked in order: another connection of the same edge may
        // have taken the volume over meanwhile, or an operator fenced it.
        if !v.held_by(conn) {
            return Err(not_held());
        }
        let first = {
            let mut armed = lock(&v.auto_snapshot_for);
            let first = armed.is_some() && *armed == v.holder();
            if first {
                *armed = None;
            }
            first
        };
        if first {
            self.auto_snapshot_held(v).await;
        }
        let file_io = self.config.file_io;
        let journal = v.journal.clone();
        let bytes: u64 = entries.iter().map(|e| e.data_len() as u64).sum();
        let entries = Arc::new(entries);
        let logged = entries.clone();
        let begin = file_io
            .run(move || lock(&journal).begin(seq, &logged))
            .await
            .map_err(|e| apply_failed(v, seq, &e))?;
        if begin == Begin::Already {
            self.stats
                .batches_already_applied
                .fetch_add(1, Ordering::Relaxed);
            v.stats
                .batches_already_applied
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Applied::Already);
        }
        ApplyJournal::write(seq, &entries, v.device.as_ref())
            .await
            .map_err(|e| apply_failed(v, seq, &e))?;
        let journal = v.journal.clone();
        file_io
            .run(move || lock(&journal).commit(seq))
            .await
            .map_err(|e| apply_failed(v, seq, &e))?;
        v.applied.fetch_max(seq, Ordering::AcqRel);
        self.stats.batches_applied.fetch_add(1, Ordering::Relaxed);
        v.stats.batches_applied.fetch_add(1, Ordering::Relaxed);
        v.stats
            .batch_bytes_applied
            .fetch_add(bytes, Ordering::Relaxed);
        v.stats
            .last_apply_unix_ms
            .store(now_unix_ms(), Ordering::Relaxed);
        Ok(Applied::Now)
    }
}

fn apply_failed(v: &Volume, seq: u64, e: &ApplyError) -> Refusal {
    tracing::error!(volume = %v.name, seq, error = %e, "applying a write batch failed");
    apply_refusal(e)
}

/// Signs chunks for one edge: remembers what it was sent, and answers a
/// read whose every chunk it was sent before with signatures.
#[derive(Clone)]
pub struct Signer {
    origin: Arc<Origin>,
    known: Arc<Mutex<KnownSignatures>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// The signatures of `data` at `offset`, one per whole chunk, or `None`
    /// when the range is not made of whole chunks (the edge's cache keeps
    /// whole chunks only).
    async fn sign(&self, offset: u64, data: &Bytes) -> Option<Vec<[u8; 32]>> {
        let chunk = self.origin.config.session.chunk_size as usize;
        if chunk == 0
            || data.is_empty()
            || !offset.is_multiple_of(chunk as u64)
            || !data.len().is_multiple_of(chunk)
        {
            return None;
        }
        let origin = self.origin.clone();
        let one_chunk = data.len() == chunk;
        let data = data.clone();
        // About 8 µs per 64 KiB: off the async threads for large reads.
        let sign = move || {
            data.chunks(chunk)
                .map(|c| *origin.signature_key.signature(c).as_bytes())
                .collect::<Vec<_>>()
        };
        if one_chunk || self.origin.config.file_io == FileIo::Inline {
            Some(sign())
        } else {
            tokio::task::spawn_blocking(sign).await.ok()
        }
    }

    fn remember(&self, sigs: &[[u8; 32]]) {
        let mut known = lock(&self.known);
        for s in sigs {
            known.insert_sent(*s);
        }
    }

    fn remember_pushed(&self, sigs: &[[u8; 32]]) {
        let now = Instant::now();
        let mut known = lock(&self.known);
        for s in sigs {
            known.insert_pushed(*s, now);
        }
    }

    /// The answer to a read: signatures when the edge accepts them and was
    /// sent every one of these chunks before, else the data (remembered as
    /// sent, or as pushed for a `push`: a push answered by signatures is
    /// not sent at all).
    async fn answer(
        &self,
        offset: u64,
        as_of: u64,
        data: Bytes,
        want_signatures: bool,
        push: bool,
    ) -> ReadAnswer {
        let Some(sigs) = self.sign(offset, &data).await else {
            return ReadAnswer::Data { as_of, data };
        };
        let all_known = want_signatures && {
            let now = Instant::now();
            let mut known = lock(&self.known);
            sigs.iter().all(|s| known.contains(s, now))
        };
        if all_known {
            let c = &self.origin.stats;
            c.signature_replies.fetch_add(1, Ordering::Relaxed);
            c.signature_bytes_saved
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return ReadAnswer::Signatures {
                chunk_size: self.origin.config.session.chunk_size,
                sigs,
            };
        }
        if push {
            self.remember_pushed(&sigs);
        } else {
            self.remember(&sigs);
        }
        ReadAnswer::Data { as_of, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockcore::storage::mem::MemStorage;
    use blockcore::MemDevice;

    const SIZE: u64 = 1 << 20;

    fn device() -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::new(SIZE))
    }

    pub(crate) async fn open(storage: &MemStorage, names: &[&str]) -> Origin {
        let mut n = 0u8;
        let config = OriginConfig {
            file_io: FileIo::Inline,
            ..OriginConfig::default()
        };
        let volumes = names.iter().map(|v| ((*v).to_owned(), device())).collect();
        Origin::open_with(
            Arc::new(storage.clone()),
            Path::new("/state"),
            volumes,
            config,
            || {
                n += 1;
                [n; 32]
            },
        )
        .await
        .unwrap()
    }

    fn batch() -> Vec<WriteEntry> {
        vec![
            WriteEntry::Data {
                offset: 4096,
                data: Bytes::from(vec![7; 4096]),
            },
            WriteEntry::Zero {
                offset: 65536,
                len: 8192,
            },
        ]
    }

    const READ: ReadSpec = ReadSpec {
        offset: 0,
        len: 4096,
        want_signatures: false,
        push: false,
    };

    #[tokio::test]
    async fn volumes_come_and_go_and_keep_their_state() {
        let storage = MemStorage::default();
        let origin = open(&storage, &["b"]).await;
        let added = origin.add_volume("a".into(), device()).await.unwrap();
        assert_eq!(added.size(), SIZE);
        let names: Vec<String> = origin.volumes().iter().map(|v| v.name().into()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(
            origin.add_volume("a".into(), device()).await,
            Err(OriginError::Duplicate(_))
        ));
        for bad in ["", ".", "..", "x/y", ".hidden", "nul\0"] {
            let added = origin.add_volume(bad.into(), device()).await;
            assert!(matches!(added, Err(OriginError::BadName(_))), "{bad:?}");
        }

        // Held: refused, naming the edge and the way out.
        let (v, _) = origin.attach(1, "a", "edge-1").unwrap();
        assert_eq!(v.holder().as_deref(), Some("edge-1"));
        origin.apply(1, &v, 1, batch()).await.unwrap();
        let err = origin.remove_volume("a").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, OriginError::Held { .. }), "{err}");
        assert!(
            msg.contains("edge-1") && msg.contains("force-release"),
            "{msg}"
        );

        // Released: removed; attaches find nothing.
        origin.release(1, &v, None);
        let epoch = v.epoch();
        let removed = origin.remove_volume("a").unwrap();
        assert_eq!(removed.name(), "a");
        assert!(origin.volume("a").is_none());
        let r = origin.attach(2, "a", "edge-1").unwrap_err();
        assert_eq!(r.code, ErrorCode::NoSuchVolume);
        assert!(matches!(
            origin.remove_volume("a"),
            Err(OriginError::NoSuchVolume(_))
        ));

        // Added again: its epoch and applied batches are still there.
        let again = origin.add_volume("a".into(), device()).await.unwrap();
        assert_eq!(again.epoch(), epoch);
        assert_eq!(again.applied(), 1);
        let (_, grant) = origin.attach(3, "a", "edge-1").unwrap();
        assert_eq!(grant.next_seq, 2);
    }

    #[tokio::test]
    async fn a_force_released_edge_stays_fenced_until_unfenced() {
        let storage = MemStorage::default();
        let origin = open(&storage, &["vol"]).await;
        assert!(matches!(
            origin.force_release("vol"),
            Err(OriginError::NotHeld(_))
        ));
        let (v, _) = origin.attach(1, "vol", "old").unwrap();
        assert_eq!(origin.force_release("vol").unwrap(), "old");
        assert_eq!(v.holder(), None);
        assert_eq!(v.fenced(), ["old"]);
        // What still arrives on its connection is refused.
        let r = origin.read(1, &v, READ, None).await.unwrap_err();
        assert_eq!(r.code, ErrorCode::NotAttached);
        let r = origin.apply(1, &v, 1, batch()).await.unwrap_err();
        assert_eq!(r.code, ErrorCode::NotAttached);
        assert_eq!(v.applied(), 0);
        assert_eq!(v.revoked(1, "old").map(|r| r.code), Some(ErrorCode::Fenced));
        // Its attaches are refused; another edge's are not.
        let r = origin.attach(2, "vol", "old").unwrap_err();
        assert_eq!(r.code, ErrorCode::Fenced);
        assert!(r.message.contains("unfence"), "{}", r.message);
        let (v2, _) = origin.attach(3, "vol", "new").unwrap();
        origin.release(3, &v2, None);
        assert_eq!(origin.counters().snapshot().attach_refusals, 1);

        // The fence survives a restart, until unfenced.
        drop((v, v2, origin));
        let origin = open(&storage, &["vol"]).await;
        assert_eq!(origin.volume("vol").unwrap().fenced(), ["old"]);
        assert_eq!(
            origin.attach(4, "vol", "old").unwrap_err().code,
            ErrorCode::Fenced
        );
        assert!(origin.unfence("vol", "old").unwrap());
        assert!(!origin.unfence("vol", "old").unwrap());
        let (v, _) = origin.attach(5, "vol", "old").unwrap();
        origin.apply(5, &v, 1, batch()).await.unwrap();
        drop((v, origin));
        let origin = open(&storage, &["vol"]).await;
        assert!(origin.volume("vol").unwrap().fenced().is_empty());
    }

    #[tokio::test]
    async fn fencing_an_edge_that_left_drops_its_partial_batch() {
        let storage = MemStorage::default();
        let origin = open(&storage, &["vol"]).await;
        let (v, _) = origin.attach(1, "vol", "e").unwrap();
        let partial = PartialBatch {
            seq: 1,
            next_part: 3,
            entries: batch(),
        };
        origin.release(1, &v, Some(partial));
        assert!(origin.fence("vol", "e").unwrap());
        assert!(!origin.fence("vol", "e").unwrap());
        assert!(matches!(
            origin.fence("vol", ""),
            Err(OriginError::BadEdgeId(_))
        ));
        assert!(origin.unfence("vol", "e").unwrap());
        let (_, grant) = origin.attach(2, "vol", "e").unwrap();
        assert!(grant.resume.is_none(), "the partial batch was dropped");
    }

    #[tokio::test]
    async fn counters_count_per_volume_and_per_origin() {
        let storage = MemStorage::default();
        let origin = open(&storage, &["vol"]).await;
        let conn = origin.new_connection();
        let (v, _) = origin.attach(conn, "vol", "e").unwrap();
        origin.read(conn, &v, READ, None).await.unwrap();
        let push = ReadSpec {
            offset: 8192,
            len: 8192,
            push: true,
            ..READ
        };
        origin.read(conn, &v, push, None).await.unwrap();
        origin.apply(conn, &v, 1, batch()).await.unwrap();
        origin.apply(conn, &v, 1, batch()).await.unwrap();
        let c = v.counters();
        assert_eq!((c.bytes_read, c.bytes_pushed), (4096, 8192));
        assert_eq!((c.batches_applied, c.batch_bytes_applied), (1, 4096));
        assert_eq!(c.batches_already_applied, 1);
        assert_eq!(c.attaches, 1);
        assert!(c.last_apply_unix_ms > 0);
        let o = origin.counters().snapshot();
        assert_eq!((o.connections_accepted, o.batches_applied), (1, 1));
        assert_eq!(o.attach_refusals, 0);
    }

    #[test]
    fn fence_lists_round_trip_and_reject_garbage() {
        let set: BTreeSet<String> = ["a".to_owned(), "edge-β\n2".to_owned()].into();
        let b = encode_fences(&set);
        assert_eq!(decode_fences(&b), Some(set));
        assert_eq!(
            decode_fences(&encode_fences(&BTreeSet::new())),
            Some(BTreeSet::new())
        );
        for cut in 0..b.len() {
            assert_eq!(decode_fences(&b[..cut]), None, "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(decode_fences(&long), None);
    }

    #[test]
    fn pushed_chunks_count_as_known_only_once_they_had_time_to_arrive() {
        let t0 = Instant::now();
        let mut k = KnownSignatures::new(4);
        k.insert_sent([1; 32]);
        k.insert_pushed([2; 32], t0);
        assert!(k.contains(&[1; 32], t0), "a demand reply counts at once");
        assert!(!k.contains(&[2; 32], t0 + Duration::from_millis(100)));
        assert!(k.contains(&[2; 32], t0 + PUSH_SETTLE));
        // Settling is bounded too: past capacity the oldest settle early.
        for i in 10..20u8 {
            k.insert_pushed([i; 32], t0);
        }
        assert!(k.settling.len() <= 4);
        assert!(!k.contains(&[3; 32], t0 + PUSH_SETTLE));
    }
}
