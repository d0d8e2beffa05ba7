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
//! Per volume, the origin keeps a state directory with the apply journal
//! and the volume's epoch (a random id fixed when the volume is first
//! served: an edge keys its cache by it, so a volume re-created under the
//! same name is not served from a stale cache). One deployment master key
//! (`master.key`) stays at the origin. At attach an edge gets a cache key
//! derived from it and the edge's id (its cache derives the encryption key
//! from that and its own cache id) and the deployment's dedup key, the
//! same for every edge, so clones of one template dedup across volumes and
//! the origin's signature replies name content the edge's cache knows.

mod serve;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blockcore::{BlockDevice, BlockError, WriteEntry};
use bytes::Bytes;
use journal::apply::{Applied, ApplyError, ApplyJournal, Begin};
use journal::storage::{read_file, replace_file, DiskStorage, Storage};
use link::proto::ErrorCode;
use link::session::{
    AttachGrant, Mistakes, OriginSessionConfig, PartialBatch, ReadAnswer, Refusal,
};
use zeroize::Zeroizing;

use keys::{edge_cache_key, SignatureKey};
use link::BoundedSet;
pub use serve::{serve, serve_connection, TlsAcceptor};

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
            mistakes: Mistakes::default(),
        }
    }
}

/// Errors opening an origin.
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
}

/// Who holds a volume: an edge, on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    edge_id: String,
    conn: u64,
}

/// One served volume.
pub struct Volume {
    name: String,
    device: Arc<dyn BlockDevice>,
    epoch: u64,
    journal: Arc<Mutex<ApplyJournal>>,
    /// Applies of this volume run one at a time, in the order they come.
    apply_order: tokio::sync::Mutex<()>,
    /// The newest batch applied, for `as_of` (read before a read starts).
    applied: AtomicU64,
    holder: Mutex<Option<Holder>>,
    /// A batch an edge was sending when its connection ended.
    partial: Mutex<Option<(String, PartialBatch)>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// The newest batch applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    fn held_by(&self, conn: u64) -> bool {
        lock(&self.holder).as_ref().is_some_and(|h| h.conn == conn)
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

/// What signature replies saved.
#[derive(Debug, Default)]
pub struct OriginCounters {
    /// Reads answered with signatures instead of data, and the data bytes
    /// that did not cross the link.
    pub signature_replies: AtomicU64,
    pub signature_bytes_saved: AtomicU64,
    /// Batches applied now, and resends found applied before.
    pub batches_applied: AtomicU64,
    pub batches_already_applied: AtomicU64,
}

/// Served volumes and their state.
pub struct Origin {
    config: OriginConfig,
    master_key: Zeroizing<[u8; 32]>,
    signature_key: SignatureKey,
    /// Per edge id: the signatures of chunks it was sent, across its
    /// volumes and reconnections.
    known: Mutex<HashMap<String, Arc<Mutex<KnownSignatures>>>>,
    volumes: HashMap<String, Arc<Volume>>,
    connections: AtomicU64,
    stats: OriginCounters,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("volumes", &self.volumes.keys().collect::<Vec<_>>())
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

fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
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
        let mut map = HashMap::new();
        for (name, device) in volumes {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(OriginError::BadName(name));
            }
            let dir = state_dir.join("volumes").join(&name);
            storage.create_dir_all(&dir).map_err(state_err(&dir))?;
            let epoch = u64::from_be_bytes(load_or_create::<8>(
                storage.as_ref(),
                &dir.join("epoch"),
                || random()[..8].try_into().expect("8 of 32 bytes"),
            )?);
            let mut journal =
                ApplyJournal::open_with(storage.clone(), &dir.join("apply"), device.as_ref())
                    .await?;
            journal.set_apply_twice(config.mistakes.apply_twice);
            let applied = journal.applied();
            map.insert(
                name.clone(),
                Arc::new(Volume {
                    name,
                    device,
                    epoch,
                    journal: Arc::new(Mutex::new(journal)),
                    apply_order: tokio::sync::Mutex::new(()),
                    applied: AtomicU64::new(applied),
                    holder: Mutex::new(None),
                    partial: Mutex::new(None),
                }),
            );
        }
        let signature_key = SignatureKey::derive(&master_key);
        Ok(Origin {
            config,
            master_key,
            signature_key,
            known: Mutex::new(HashMap::new()),
            volumes: map,
            connections: AtomicU64::new(0),
            stats: OriginCounters::default(),
        })
    }

    pub fn config(&self) -> &OriginConfig {
        &self.config
    }

    /// Counters of signature replies and applies.
    pub fn counters(&self) -> &OriginCounters {
        &self.stats
    }

    pub fn volume(&self, name: &str) -> Option<&Arc<Volume>> {
        self.volumes.get(name)
    }

    /// A number for a new connection (ownership is per connection).
    pub fn new_connection(&self) -> u64 {
        self.connections.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Grants `name` to `edge_id` on connection `conn`: the volume, and
    /// what the session answers `Attach` with. The same edge reconnecting
    /// takes over from its old (possibly not yet noticed dead) connection;
    /// another edge is refused.
    pub fn attach(
        &self,
        conn: u64,
        name: &str,
        edge_id: &str,
    ) -> Result<(Arc<Volume>, AttachGrant), Refusal> {
        let Some(v) = self.volumes.get(name).cloned() else {
            return Err(refusal(
                ErrorCode::NoSuchVolume,
                format!("no volume {name:?}"),
            ));
        };
        {
            let mut holder = lock(&v.holder);
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
                }
            }
        }
        let next_seq = v.applied() + 1;
        let resume = lock(&v.partial)
            .take()
            .filter(|(e, p)| e == edge_id && p.seq == next_seq)
            .map(|(_, p)| p);
        tracing::info!(volume = %name, edge = %edge_id, next_seq, resume_part = resume.as_ref().map(|p| p.next_part), "edge attached");
        let grant = AttachGrant {
            size: v.device.info().size,
            cache_key: *edge_cache_key(&self.master_key, edge_id),
            dedup_key: *self.signature_key.dedup_key(),
            volume_epoch: v.epoch,
            next_seq,
            resume,
        };
        Ok((v, grant))
    }

    /// Connection `conn` ends or detaches: it lets go of `v` (if it still
    /// holds it), leaving the batch it was receiving for the edge's next
    /// connection.
    pub fn release(&self, conn: u64, v: &Volume, partial: Option<PartialBatch>) {
        let mut holder = lock(&v.holder);
        if let Some(h) = holder.as_ref().filter(|h| h.conn == conn) {
            if let Some(p) = partial {
                *lock(&v.partial) = Some((h.edge_id.clone(), p));
            }
            tracing::info!(volume = %v.name, edge = %h.edge_id, "edge detached");
            *holder = None;
        }
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
            return Err(refusal(ErrorCode::NotAttached, "the volume was taken over"));
        }
        let as_of = v.applied();
        let data = v
            .device
            .read(offset, len as usize)
            .await
            .map_err(|e| block_refusal(&e))?;
        Ok(match signer {
            Some(s) if push => {
                if let Some(sigs) = s.sign(offset, &data).await {
                    s.remember_pushed(&sigs);
                }
                ReadAnswer::Data { as_of, data }
            }
            Some(s) => s.answer(offset, as_of, data, want_signatures).await,
            None => ReadAnswer::Data { as_of, data },
        })
    }

    /// Applies batch `seq` for connection `conn` (see the module docs).
    pub async fn apply(
        &self,
        conn: u64,
        v: &Volume,
        seq: u64,
        entries: Vec<WriteEntry>,
    ) -> Result<Applied, Refusal> {
        let _in_order = v.apply_order.lock().await;
        // Re-checked in order: another connection of the same edge may
        // have taken the volume over meanwhile.
        if !v.held_by(conn) {
            return Err(refusal(ErrorCode::NotAttached, "the volume was taken over"));
        }
        let file_io = self.config.file_io;
        let journal = v.journal.clone();
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
    /// sent every one of these chunks before, else the data (remembered).
    async fn answer(
        &self,
        offset: u64,
        as_of: u64,
        data: Bytes,
        want_signatures: bool,
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
        self.remember(&sigs);
        ReadAnswer::Data { as_of, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
