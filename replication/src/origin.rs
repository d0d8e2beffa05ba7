//! The origin: serves volumes (any `blockcore` device) to attached edges
//! over the link, and applies their write batches.
//!
//! ```text
//!   edge ──link──> Origin::serve_connection
//!                    handshake (Hello, Auth with a pre-shared key)
//!                    Attach ──> exclusive hold on the volume, Attached
//!                    Read   ──> task: device.read ──> ReadData (demand)
//!                                     └─> the rest of the 1 MiB group as
//!                                         Push (background, credit-bound)
//!                    Prefetch ──> task: Push... PrefetchDone (background)
//!                    WriteBatch parts ──> ApplyJournal (atomic, once) ──> BatchAck
//! ```
//!
//! A connection's frames are handled in order, and a batch is applied
//! before the frames after it are looked at, so a read sent after a batch
//! sees that batch's data. Reads run concurrently with each other.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use blockcore::{BlockDevice, BlockError};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use crate::apply::{ApplyError, ApplyJournal};
use crate::link::{self, LinkError, LinkSender};
use crate::proto::{Class, ErrorCode, Message, Role, SchedulerConfig, WriteEntry};
use crate::signature::{KnownSignatures, SignatureKey};

/// Tunables of an origin.
#[derive(Clone, Debug)]
pub struct OriginConfig {
    /// Pre-shared key both ends must prove they hold; `None` skips the
    /// proof (TLS with client certificates, or a trusted test link).
    pub psk: Option<[u8; 32]>,
    /// After a demand read, the rest of its aligned group of this many
    /// bytes is pushed unasked (0: never).
    pub group_size: u32,
    /// The chunk size edges cache in; reported at attach.
    pub chunk_size: u32,
    /// Background credit granted to each edge (the edge sends no
    /// background traffic today; kept small).
    pub window: u64,
    pub scheduler: SchedulerConfig,
    /// How many chunk signatures to remember per edge (what it was sent),
    /// to answer later reads of the same content with signatures.
    pub known_signatures: usize,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            psk: None,
            group_size: 1 << 20,
            chunk_size: 64 << 10,
            window: 1 << 20,
            scheduler: SchedulerConfig::default(),
            // 32 bytes each plus set overhead: ~100 MiB for 1M chunks
            // (64 GiB of 64 KiB chunks).
            known_signatures: 1 << 20,
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

struct Volume {
    name: String,
    device: Arc<dyn BlockDevice>,
    epoch: u64,
    apply: tokio::sync::Mutex<ApplyJournal>,
    /// The attached edge: (edge id, connection number).
    holder: Mutex<Option<(String, u64)>>,
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
    stats: Arc<OriginCounters>,
}

/// What signature replies saved.
#[derive(Debug, Default)]
pub struct OriginCounters {
    /// Reads answered with signatures instead of data, and the data bytes
    /// that did not cross the link.
    pub signature_replies: AtomicU64,
    pub signature_bytes_saved: AtomicU64,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("volumes", &self.volumes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> OriginError + '_ {
    move |source| OriginError::State {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a fixed-size secret or id from `path`, creating it with random
/// bytes (owner-only) on first use.
fn load_or_create<const N: usize>(path: &Path) -> Result<[u8; N], OriginError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match fs::read(path) {
        Ok(v) if v.len() == N => Ok(v.try_into().expect("length checked")),
        Ok(v) => Err(OriginError::State {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("{} bytes, expected {N}", v.len())),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; N] = link::random();
            let tmp = path.with_extension("tmp");
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(state_err(&tmp))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(state_err(&tmp))?;
            fs::rename(&tmp, path).map_err(state_err(path))?;
            Ok(bytes)
        }
        Err(e) => Err(state_err(path)(e)),
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
        fs::create_dir_all(state_dir).map_err(state_err(state_dir))?;
        let master_key = Zeroizing::new(load_or_create::<32>(&state_dir.join("master.key"))?);
        let mut map = HashMap::new();
        for (name, device) in volumes {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(OriginError::BadName(name));
            }
            let dir = state_dir.join("volumes").join(&name);
            fs::create_dir_all(&dir).map_err(state_err(&dir))?;
            let epoch = u64::from_be_bytes(load_or_create::<8>(&dir.join("epoch"))?);
            let apply = ApplyJournal::open(&dir.join("apply"), device.as_ref()).await?;
            map.insert(
                name.clone(),
                Arc::new(Volume {
                    name,
                    device,
                    epoch,
                    apply: tokio::sync::Mutex::new(apply),
                    holder: Mutex::new(None),
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
            stats: Arc::new(OriginCounters::default()),
        })
    }

    /// Counters of signature replies.
    pub fn counters(&self) -> &OriginCounters {
        &self.stats
    }

    /// Serves one edge connection until it closes.
    pub async fn serve_connection<S>(self: &Arc<Self>, stream: S) -> Result<(), LinkError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let conn = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, mut rx) = link::spawn(stream, self.config.scheduler, self.config.window);
        link::handshake(&tx, &mut rx, Role::Origin, self.config.psk.as_ref()).await?;
        let mut session = Session {
            origin: self.clone(),
            tx: tx.clone(),
            conn,
            volume: None,
            batch: None,
            pushed: PushedGroups::default(),
            known: None,
        };
        let result = async {
            while let Some(inc) = rx.recv().await {
                session.handle(inc.header.id, inc.msg).await?;
            }
            Ok(())
        }
        .await;
        session.release();
        tx.close();
        result
    }
}

/// Groups recently pushed on a connection, so sequential reads through one
/// group push it once.
#[derive(Default)]
struct PushedGroups {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl PushedGroups {
    const MAX: usize = 1024;

    /// Records `group`; false if it was pushed recently.
    fn insert(&mut self, group: u64) -> bool {
        if !self.set.insert(group) {
            return false;
        }
        self.order.push_back(group);
        if self.order.len() > Self::MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// A write batch being received in parts.
struct PendingBatch {
    seq: u64,
    next_part: u32,
    entries: Vec<WriteEntry>,
}

struct Session {
    origin: Arc<Origin>,
    tx: LinkSender,
    conn: u64,
    volume: Option<Arc<Volume>>,
    batch: Option<PendingBatch>,
    pushed: PushedGroups,
    /// What the attached edge was sent (shared by its connections).
    known: Option<Arc<Mutex<KnownSignatures>>>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error {
        code,
        message: message.into(),
    }
}

fn block_error(e: &BlockError) -> Message {
    let code = match e {
        BlockError::OutOfRange { .. }
        | BlockError::Misaligned { .. }
        | BlockError::TooLarge { .. } => ErrorCode::OutOfRange,
        BlockError::Unsupported { .. } | BlockError::ReadOnly { .. } => ErrorCode::Unsupported,
        BlockError::ShuttingDown { .. } => ErrorCode::ShuttingDown,
        BlockError::NoSpace { .. } | BlockError::Io { .. } => ErrorCode::Io,
    };
    error(code, e.to_string())
}

impl Session {
    fn reply(&self, id: u64, msg: Message) -> Result<(), LinkError> {
        self.tx.send(id, Class::Demand, msg)
    }

    /// The attached volume, if this connection still holds it.
    fn held(&self) -> Option<&Arc<Volume>> {
        let v = self.volume.as_ref()?;
        let holder = v.holder.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(&*holder, Some((_, c)) if *c == self.conn).then_some(v)
    }

    fn release(&mut self) {
        if let Some(v) = self.volume.take() {
            let mut holder = v.holder.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(&*holder, Some((_, c)) if *c == self.conn) {
                *holder = None;
                tracing::info!(volume = %v.name, "edge detached");
            }
        }
    }

    async fn handle(&mut self, id: u64, msg: Message) -> Result<(), LinkError> {
        match msg {
            Message::Attach {
                volume,
                edge_id,
                resume_seq,
            } => self.attach(id, &volume, edge_id, resume_seq).await,
            Message::Detach => {
                self.release();
                self.reply(id, Message::Detached)
            }
            Message::Heartbeat { nanos } => self.reply(id, Message::HeartbeatAck { nanos }),
            Message::Read {
                offset,
                len,
                want_signatures,
            } => {
                let Some(v) = self.held().cloned() else {
                    return self.reply(id, error(ErrorCode::NotAttached, "attach first"));
                };
                self.read(id, &v, offset, len, want_signatures);
                Ok(())
            }
            Message::Prefetch { ranges } => {
                let Some(v) = self.held().cloned() else {
                    return self.reply(id, error(ErrorCode::NotAttached, "attach first"));
                };
                let tx = self.tx.clone();
                let signer = self.signer();
                tokio::spawn(async move {
                    for (offset, len) in ranges {
                        if push(&tx, &v, id, offset, u64::from(len), signer.as_ref())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let _ = tx.send(id, Class::Background, Message::PrefetchDone);
                });
                Ok(())
            }
            Message::WriteBatch {
                seq,
                part,
                last,
                entries,
            } => self.write_batch(id, seq, part, last, entries).await,
            other => {
                tracing::warn!(kind = ?other.kind(), "origin: unexpected message from an edge");
                self.reply(
                    id,
                    error(
                        ErrorCode::Protocol,
                        format!("unexpected {:?}", other.kind()),
                    ),
                )
            }
        }
    }

    async fn attach(
        &mut self,
        id: u64,
        name: &str,
        edge_id: String,
        resume_seq: u64,
    ) -> Result<(), LinkError> {
        self.release();
        let Some(v) = self.origin.volumes.get(name).cloned() else {
            return self.reply(
                id,
                error(ErrorCode::NoSuchVolume, format!("no volume {name:?}")),
            );
        };
        {
            let mut holder = v.holder.lock().unwrap_or_else(PoisonError::into_inner);
            match &*holder {
                // The same edge reconnecting takes over from its old,
                // possibly not yet noticed-dead, connection.
                Some((other, _)) if *other != edge_id => {
                    let message = format!("volume {name:?} is attached by edge {other:?}");
                    drop(holder);
                    return self.reply(id, error(ErrorCode::VolumeBusy, message));
                }
                _ => *holder = Some((edge_id.clone(), self.conn)),
            }
        }
        let next_seq = v.apply.lock().await.applied() + 1;
        tracing::info!(volume = %name, edge = %edge_id, resume_seq, next_seq, "edge attached");
        let size = v.device.info().size;
        self.volume = Some(v.clone());
        self.batch = None;
        self.known = Some(
            self.origin
                .known
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(edge_id.clone())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(KnownSignatures::new(
                        self.origin.config.known_signatures,
                    )))
                })
                .clone(),
        );
        self.reply(
            id,
            Message::Attached {
                size,
                chunk_size: self.origin.config.chunk_size,
                group_size: self.origin.config.group_size,
                cache_key: *edge_cache_key(&self.origin.master_key, &edge_id),
                dedup_key: *self.origin.signature_key.dedup_key(),
                volume_epoch: v.epoch,
                next_seq,
            },
        )
    }

    /// What pushes and reads need to sign chunks for this edge.
    fn signer(&self) -> Option<Signer> {
        self.known.clone().map(|known| Signer {
            origin: self.origin.clone(),
            known,
        })
    }

    fn read(&mut self, id: u64, v: &Arc<Volume>, offset: u64, len: u32, want_signatures: bool) {
        let size = v.device.info().size;
        let group = u64::from(self.origin.config.group_size);
        // The rest of the group, pushed after the reply, once per group.
        let push_range = (group > u64::from(len)
            && offset
                .checked_add(u64::from(len))
                .is_some_and(|e| e <= size))
        .then(|| offset / group)
        .filter(|g| self.pushed.insert(*g))
        .map(|g| (g * group, ((g + 1) * group).min(size)));
        let tx = self.tx.clone();
        let v = v.clone();
        let signer = self.signer();
        tokio::spawn(async move {
            let reply = match v.device.read(offset, len as usize).await {
                Ok(data) => match &signer {
                    Some(s) => s.answer(offset, data, want_signatures).await,
                    None => Message::ReadData { offset, data },
                },
                Err(e) => block_error(&e),
            };
            if tx.send(id, Class::Demand, reply).is_err() {
                return;
            }
            if let Some((start, end)) = push_range {
                let end_req = offset + u64::from(len);
                // Before and after the requested range.
                let _ = push(&tx, &v, 0, start, offset - start, signer.as_ref()).await;
                let _ = push(
                    &tx,
                    &v,
                    0,
                    end_req,
                    end.saturating_sub(end_req),
                    signer.as_ref(),
                )
                .await;
            }
        });
    }

    async fn write_batch(
        &mut self,
        id: u64,
        seq: u64,
        part: u32,
        last: bool,
        entries: Vec<WriteEntry>,
    ) -> Result<(), LinkError> {
        let Some(v) = self.held().cloned() else {
            return self.reply(id, error(ErrorCode::NotAttached, "attach first"));
        };
        let pending = match self.batch.take() {
            Some(p) if p.seq == seq && p.next_part == part => p,
            _ if part == 0 => PendingBatch {
                seq,
                next_part: 0,
                entries: Vec::new(),
            },
            _ => {
                return self.reply(
                    id,
                    error(
                        ErrorCode::Protocol,
                        format!("batch {seq} part {part} out of order"),
                    ),
                )
            }
        };
        let mut pending = pending;
        pending.next_part += 1;
        pending.entries.extend(entries);
        if !last {
            self.batch = Some(pending);
            return Ok(());
        }
        let mut apply = v.apply.lock().await;
        // Re-check under the lock: another connection of the same edge may
        // have taken the volume over meanwhile.
        if self.held().is_none() {
            return self.reply(
                id,
                error(ErrorCode::NotAttached, "the volume was taken over"),
            );
        }
        match apply.apply(seq, &pending.entries, v.device.as_ref()).await {
            Ok(_) => self.reply(id, Message::BatchAck { seq }),
            Err(e) => {
                tracing::error!(volume = %v.name, seq, error = %e, "applying a write batch failed");
                let code = match e {
                    ApplyError::OutOfOrder { .. } => ErrorCode::Protocol,
                    _ => ErrorCode::Io,
                };
                self.reply(id, error(code, e.to_string()))
            }
        }
    }
}

/// Background bytes a connection may have queued before pushes wait.
const BACKGROUND_BACKLOG: u64 = 4 << 20;

/// Pushes `[offset, offset + len)` (clamped to the volume) as background
/// `Push` frames with request id `id`.
/// The cache master key of edge `edge_id`: derived from the deployment's
/// master key and the edge's id, so the key one edge holds opens no other
/// edge's cache. (The dedup key is the deployment's, shared by all edges,
/// so that signatures name the same content everywhere.)
fn edge_cache_key(master: &[u8; 32], edge_id: &str) -> Zeroizing<[u8; 32]> {
    let mut h = blake3::Hasher::new_derive_key("ferry origin 2026 edge cache master key v1");
    h.update(master);
    h.update(edge_id.as_bytes());
    Zeroizing::new(*h.finalize().as_bytes())
}

/// Signs chunks for one edge: remembers what it was sent, and answers a
/// read whose every chunk it was sent before with signatures.
#[derive(Clone)]
struct Signer {
    origin: Arc<Origin>,
    known: Arc<Mutex<KnownSignatures>>,
}

impl Signer {
    /// The signatures of `data` at `offset`, one per whole chunk, or `None`
    /// when the range is not made of whole chunks (the edge's cache keeps
    /// whole chunks only).
    async fn sign(&self, offset: u64, data: &Bytes) -> Option<Vec<[u8; 32]>> {
        let chunk = self.origin.config.chunk_size as usize;
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
                .map(|c| origin.signature_key.signature(c))
                .collect::<Vec<_>>()
        };
        if one_chunk {
            Some(sign())
        } else {
            tokio::task::spawn_blocking(sign).await.ok()
        }
    }

    fn remember(&self, sigs: &[[u8; 32]]) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for s in sigs {
            known.insert(*s);
        }
    }

    /// The reply to a read: signatures when the edge accepts them and was
    /// sent every one of these chunks before, else the data (remembered).
    async fn answer(&self, offset: u64, data: Bytes, want_signatures: bool) -> Message {
        let Some(sigs) = self.sign(offset, &data).await else {
            return Message::ReadData { offset, data };
        };
        let all_known = want_signatures && {
            let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            sigs.iter().all(|s| known.contains(s))
        };
        if all_known {
            let c = &self.origin.stats;
            c.signature_replies.fetch_add(1, Ordering::Relaxed);
            c.signature_bytes_saved
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return Message::ReadSignatures {
                offset,
                chunk_size: self.origin.config.chunk_size,
                sigs,
            };
        }
        self.remember(&sigs);
        Message::ReadData { offset, data }
    }
}

async fn push(
    tx: &LinkSender,
    v: &Volume,
    id: u64,
    offset: u64,
    len: u64,
    signer: Option<&Signer>,
) -> Result<(), LinkError> {
    let size = v.device.info().size;
    let end = offset.saturating_add(len).min(size);
    let mut pos = offset;
    while pos < end {
        // Reads of 1 MiB at most: the scheduler cuts them into frames anyway,
        // and the backlog check runs between reads.
        let n = (end - pos).min(1 << 20);
        let data: Bytes = match v.device.read(pos, usize::try_from(n).expect("fits")).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(volume = %v.name, offset = pos, error = %e, "push read failed");
                return Ok(());
            }
        };
        if let Some(s) = signer {
            if let Some(sigs) = s.sign(pos, &data).await {
                s.remember(&sigs);
            }
        }
        tx.background_room(BACKGROUND_BACKLOG).await?;
        tx.send(id, Class::Background, Message::Push { offset: pos, data })?;
        pos += n;
    }
    Ok(())
}
