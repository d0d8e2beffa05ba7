//! Point-in-time snapshots of a volume, kept at the origin as a chain of
//! copy-on-write layers ([`blockcore::CowDevice`]).
//!
//! ```text
//!   the volume's device (reads, pushes, applies) = the chain's head
//!
//!   head         layer-7.img   writable delta: every write since "before"
//!   "before"     layer-4.img   frozen: "before" is the view down to here
//!   "nightly"    the image     frozen: the oldest snapshot is the image itself
//! ```
//!
//! With no snapshot the head is the image and nothing here costs anything.
//! Each layer below the head is one snapshot: the snapshot's content is
//! what the chain shows from that layer down.
//!
//! - **Create** is O(1): under the volume's apply order (so no batch is
//!   half in it; the batch applied last is recorded), the head is flushed
//!   and frozen, and a new empty delta over it becomes the head.
//! - **Rollback** (only while no edge holds the volume) builds a new head
//!   over the newest snapshot's layer holding the target snapshot's bytes
//!   wherever a layer between them holds data (nothing, for the newest
//!   snapshot), then, under the holder lock, writes a new epoch (so edges'
//!   caches of the old content are never used: an edge that held the
//!   volume before finds the epoch changed and stops), switches the head
//!   and drops the old one. Every snapshot stays. The apply sequence goes
//!   on from where it was.
//! - **Delete** first marks the snapshot `deleting` (durably: it is no
//!   longer listed as usable), then merges its layer away: a delta's
//!   blocks are copied into the layer above where that one has none
//!   ([`blockcore::CowDevice::materialize`], which never changes a byte
//!   any layer shows); the oldest snapshot, the image itself, instead
//!   takes the blocks of the layer above it (that layer masks them, so
//!   only the deleted snapshot's bytes change). Then the catalogue drops
//!   the layer and its files go. A crash part way leaves the deletion
//!   marked: opening the volume finishes it. Deleting every snapshot
//!   leaves the image holding the volume's current content again.
//!
//! While a snapshot exists the image file is the oldest snapshot, not the
//! volume's current content: the volume is the chain, served by the
//! origin. To use the image directly again, delete the snapshots.
//!
//! Reflinks (FICLONE) are not used: on filesystems that have them a
//! snapshot could be a clone of the image, but that would be a second
//! representation beside the chain, with its own rollback and delete,
//! for an optimisation the chain's O(1) create does not need.
//!
//! # On disk
//!
//! In the volume's state directory, `snapshots/`:
//!
//! - `layer-ID.img` and `layer-ID.meta`: one delta each, in the
//!   copy-on-write layer's format (the overlay's: a sparse file exactly the
//!   volume's size, and its metadata, tagged `VOLUME/layer-ID`).
//! - `catalogue`: UTF-8 text, replaced atomically and durably:
//!
//!   ```text
//!   ferry snapshot catalogue v1
//!   size 1073741824
//!   next-layer 5
//!   snapshot 17 1767225600000 1073741824 live nightly
//!   layer 1
//!   snapshot 25 1767229200000 1073741824 live before-migration
//!   layer 4
//!   end
//!   ```
//!
//!   `size` is the volume's size, `next-layer` the next layer id (never
//!   reused). Then, bottom up, each `snapshot APPLIED_SEQ CREATED_UNIX_MS
//!   SIZE live|deleting NAME` is followed by the `layer ID` above it: the
//!   first snapshot is the image, each later one the layer before it, and
//!   the last layer is the head. `end` closes the file.
//!
//! Files in `snapshots/` the catalogue does not name (a create or delete
//! interrupted by a crash) are removed when the volume is opened.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use blockcore::{
    BlockDevice, BlockError, CowDevice, DeviceInfo, Extent, ExtentKind, Result as BlockResult,
    WriteFlags, ZeroFlags,
};
use bytes::Bytes;
use journal::storage::{read_file, replace_file, Storage};

use crate::{
    lock, now_unix_ms, random, state_err, CloneError, FileIo, Origin, OriginError, Volume,
};

/// First line of the catalogue.
const MAGIC: &str = "ferry snapshot catalogue v1";
/// The directory in a volume's state directory.
const DIR: &str = "snapshots";
const CATALOGUE: &str = "catalogue";
/// Copies between layers go in pieces of this size.
const COPY_CHUNK: u64 = 1 << 20;
/// Longest snapshot name.
const MAX_NAME: usize = 64;

/// Errors of snapshot operations (inside [`OriginError::Snapshot`]).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "snapshot name {0:?} is not 1 to {MAX_NAME} letters, digits, '.', '_' or '-' starting \
         with a letter or digit"
    )]
    BadName(String),
    #[error("volume {volume:?} has no snapshot {snapshot:?}")]
    NoSuch { volume: String, snapshot: String },
    #[error("volume {volume:?} already has a snapshot {snapshot:?}")]
    Duplicate { volume: String, snapshot: String },
    #[error(
        "volume {volume:?} holds part of write batch {seq} (its apply failed), so a snapshot \
         now would not sit on a batch boundary; try again once the edge has resent it"
    )]
    HalfApplied { volume: String, seq: u64 },
    #[error("a snapshot operation on volume {0:?} is running; try again when it ends")]
    Busy(String),
    #[error("snapshots of volume {volume:?}: {what}: {source}")]
    Device {
        volume: String,
        what: &'static str,
        #[source]
        source: BlockError,
    },
    #[error("the snapshot catalogue {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("snapshot names starting with {AUTO_PREFIX:?} are the automatic snapshots'")]
    Reserved(String),
}

/// One snapshot, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub created_unix_ms: u64,
    /// The newest write batch applied when it was taken: it holds every
    /// batch up to this one and none after.
    pub applied_seq: u64,
    /// The volume's size.
    pub size: u64,
    /// The layer holding what changed before it: `image` (the volume's
    /// image, for the oldest) or `layer-ID`.
    pub layer: String,
    /// Bytes that layer holds (allocated in the delta file; for the image,
    /// its allocated data).
    pub held_bytes: u64,
    /// Being deleted (a deletion runs, or a crash interrupted one that the
    /// next open finishes): no longer usable.
    pub deleting: bool,
}

/// A volume's snapshots, oldest first, and the writable head above them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
    /// `image` when there is no snapshot, else `layer-ID`.
    pub head: String,
    /// Bytes the head's delta holds (what changed since the newest
    /// snapshot); the image's allocated data when there is no snapshot.
    pub head_bytes: u64,
}

/// Checks a snapshot name: what the catalogue, the API's paths and the
/// CLI's `VOLUME@SNAPSHOT` can carry.
pub fn check_snapshot_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_owned()))
    }
}

/// `auto-YYYYMMDDTHHMMSSZ` for a time in milliseconds since the Unix epoch
/// (UTC): the name of a snapshot taken without one.
pub fn auto_snapshot_name(unix_ms: u64) -> String {
    format!("auto-{}", utc_stamp(unix_ms))
}

/// The prefix of automatic snapshots' names, reserved for them: the
/// retention deletes only these.
const AUTO_PREFIX: &str = "pre-write-";

/// `pre-write-YYYYMMDDTHHMMSSZ`: an automatic snapshot taken at that time.
fn pre_write_name(unix_ms: u64) -> String {
    format!("{AUTO_PREFIX}{}", utc_stamp(unix_ms))
}

/// `YYYYMMDDTHHMMSSZ` (UTC).
fn utc_stamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// One snapshot in the catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    name: String,
    created_unix_ms: u64,
    applied_seq: u64,
    size: u64,
    deleting: bool,
}

/// The chain as recorded: `snapshots[0]` is the image, `snapshots[i]`
/// for `i > 0` the delta `deltas[i - 1]`; the last delta is the head.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Catalogue {
    size: u64,
    next_layer: u64,
    snapshots: Vec<Entry>,
    deltas: Vec<u64>,
}

impl Catalogue {
    /// `base`, or `base-2`, `base-3`... whichever no snapshot has.
    fn free_name(&self, base: &str) -> String {
        let taken = |n: &str| self.snapshots.iter().any(|e| e.name == n);
        // At most as many names are taken as there are snapshots: one of
        // these is free.
        (1..=self.snapshots.len() + 1)
            .map(|i| {
                if i == 1 {
                    base.to_owned()
                } else {
                    format!("{base}-{i}")
                }
            })
            .find(|n| !taken(n))
            .expect("some suffix is free")
    }
    fn empty(size: u64) -> Catalogue {
        Catalogue {
            size,
            next_layer: 1,
            snapshots: Vec::new(),
            deltas: Vec::new(),
        }
    }

    fn encode(&self) -> String {
        let mut s = format!(
            "{MAGIC}\nsize {}\nnext-layer {}\n",
            self.size, self.next_layer
        );
        for (e, d) in self.snapshots.iter().zip(&self.deltas) {
            let state = if e.deleting { "deleting" } else { "live" };
            let _ = writeln!(
                s,
                "snapshot {} {} {} {state} {}",
                e.applied_seq, e.created_unix_ms, e.size, e.name
            );
            let _ = writeln!(s, "layer {d}");
        }
        s.push_str("end\n");
        s
    }

    fn decode(text: &str) -> Result<Catalogue, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("does not start with {MAGIC:?}"));
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| format!("bad number {s:?}"));
        let (mut size, mut next_layer) = (None, None);
        let mut snapshots = Vec::new();
        let mut deltas = Vec::new();
        let mut ended = false;
        for line in lines {
            if ended {
                return Err(format!("{line:?} after the end"));
            }
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["size", n] if size.is_none() => size = Some(num(n)?),
                ["next-layer", n] if next_layer.is_none() => next_layer = Some(num(n)?),
                ["snapshot", seq, created, size, state, name]
                    if snapshots.len() == deltas.len() =>
                {
                    check_snapshot_name(name).map_err(|e| e.to_string())?;
                    if snapshots.iter().any(|e: &Entry| e.name == *name) {
                        return Err(format!("snapshot {name:?} twice"));
                    }
                    let deleting = match *state {
                        "live" => false,
                        "deleting" => true,
                        other => return Err(format!("bad snapshot state {other:?}")),
                    };
                    snapshots.push(Entry {
                        name: (*name).to_owned(),
                        created_unix_ms: num(created)?,
                        applied_seq: num(seq)?,
                        size: num(size)?,
                        deleting,
                    });
                }
                ["layer", id] if deltas.len() + 1 == snapshots.len() => deltas.push(num(id)?),
                ["end"] if snapshots.len() == deltas.len() => ended = true,
                _ => return Err(format!("unexpected line {line:?}")),
            }
        }
        if !ended {
            return Err("no end line (cut short?)".into());
        }
        let size = size.ok_or("no size line")?;
        let next_layer = next_layer.ok_or("no next-layer line")?;
        for (i, d) in deltas.iter().enumerate() {
            if *d == 0 || *d >= next_layer || deltas[..i].contains(d) {
                return Err(format!("bad layer id {d}"));
            }
        }
        Ok(Catalogue {
            size,
            next_layer,
            snapshots,
            deltas,
        })
    }
}

/// What the catalogue says, with the deltas open (parallel to
/// `catalogue.deltas`).
struct State {
    catalogue: Catalogue,
    deltas: Vec<Arc<CowDevice>>,
}

impl State {
    /// The device showing the chain from layer `i` down (0: the image).
    fn layer(&self, base: &Arc<dyn BlockDevice>, i: usize) -> Arc<dyn BlockDevice> {
        match i {
            0 => base.clone(),
            i => self.deltas[i - 1].clone(),
        }
    }

    fn find(&self, volume: &str, name: &str) -> Result<usize, SnapshotError> {
        self.catalogue
            .snapshots
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| SnapshotError::NoSuch {
                volume: volume.to_owned(),
                snapshot: name.to_owned(),
            })
    }

    fn find_live(&self, volume: &str, name: &str) -> Result<usize, SnapshotError> {
        let i = self.find(volume, name)?;
        if self.catalogue.snapshots[i].deleting {
            return Err(SnapshotError::NoSuch {
                volume: volume.to_owned(),
                snapshot: name.to_owned(),
            });
        }
        Ok(i)
    }
}

/// A volume's device: the head of its chain of layers. Everything else in
/// the origin sees only this.
pub(crate) struct Chain {
    volume: String,
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    file_io: FileIo,
    /// The volume's image (or whatever device it was added with).
    base: Arc<dyn BlockDevice>,
    state: Mutex<State>,
    head: RwLock<Arc<dyn BlockDevice>>,
    /// Ranges written while the head is merged into the image.
    dirty: Mutex<Option<Vec<Range<u64>>>>,
    /// Snapshot operations, one at a time (and a clone's create, which
    /// pins a snapshot).
    pub(crate) ops: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("volume", &self.volume)
            .field("layers", &lock(&self.state).catalogue.deltas)
            .finish_non_exhaustive()
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> OriginError {
    SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why: why.into(),
    }
    .into()
}

/// Merges ranges into sorted, disjoint, non-touching ones.
fn coalesce(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.retain(|r| !r.is_empty());
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Copies `r` of `from` onto `to`.
async fn copy(from: &dyn BlockDevice, to: &dyn BlockDevice, r: Range<u64>) -> BlockResult<()> {
    let mut pos = r.start;
    while pos < r.end {
        let n = (r.end - pos).min(COPY_CHUNK);
        let data = from
            .read(pos, usize::try_from(n).expect("a chunk fits"))
            .await?;
        to.write(pos, data, WriteFlags::default()).await?;
        pos += n;
    }
    Ok(())
}

/// Bytes of `dev` its extents call data.
async fn data_bytes(dev: &dyn BlockDevice) -> BlockResult<u64> {
    let size = dev.info().size;
    let (mut pos, mut total) = (0, 0);
    while pos < size {
        let extents = dev.extents(pos, size - pos).await?;
        let before = pos;
        for e in extents {
            if e.kind == ExtentKind::Data {
                total += e.len;
            }
            pos = e.offset + e.len;
        }
        if pos <= before {
            break;
        }
    }
    Ok(total)
}

impl Chain {
    /// Opens `volume`'s chain over `base` from its state directory `vol_dir`,
    /// removing files no catalogue names and finishing a deletion a crash
    /// interrupted. With no catalogue the head is `base` and nothing is
    /// written.
    pub(crate) async fn open(
        storage: Arc<dyn Storage>,
        vol_dir: &Path,
        volume: &str,
        base: Arc<dyn BlockDevice>,
        file_io: FileIo,
    ) -> Result<Chain, OriginError> {
        let dir = vol_dir.join(DIR);
        let path = dir.join(CATALOGUE);
        let size = base.info().size;
        let catalogue = match read_file(storage.as_ref(), &path).map_err(state_err(&path))? {
            None => Catalogue::empty(size),
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| corrupt(&path, "not UTF-8"))?;
                let mut c = Catalogue::decode(&text).map_err(|why| corrupt(&path, why))?;
                if c.snapshots.is_empty() {
                    c.size = size;
                } else if c.size != size {
                    return Err(corrupt(
                        &path,
                        format!(
                            "the snapshots were taken of a {}-byte volume, but {volume:?} now \
                             has {size} bytes; refusing to lay them over another image",
                            c.size
                        ),
                    ));
                }
                c
            }
        };
        let mut deltas: Vec<Arc<CowDevice>> = Vec::new();
        for &id in &catalogue.deltas {
            let below = deltas
                .last()
                .map_or_else(|| base.clone(), |d| d.clone() as Arc<dyn BlockDevice>);
            let (file, tag) = (layer_path(&dir, id), layer_tag(volume, id));
            let d = file_io
                .run(move || CowDevice::open_existing(below, &file, &tag))
                .await
                .map_err(state_err(&layer_path(&dir, id)))?;
            deltas.push(Arc::new(d));
        }
        let head = deltas
            .last()
            .map_or_else(|| base.clone(), |d| d.clone() as Arc<dyn BlockDevice>);
        let chain = Chain {
            volume: volume.to_owned(),
            dir,
            storage,
            file_io,
            base,
            state: Mutex::new(State { catalogue, deltas }),
            head: RwLock::new(head),
            dirty: Mutex::new(None),
            ops: tokio::sync::Mutex::new(()),
        };
        chain.remove_strays()?;
        loop {
            let deleting = {
                let st = lock(&chain.state);
                st.catalogue.snapshots.iter().position(|e| e.deleting)
            };
            let Some(i) = deleting else { break };
            tracing::info!(volume = %chain.volume, snapshot = %lock(&chain.state).catalogue.snapshots[i].name, "finishing a snapshot deletion a crash interrupted");
            chain.finish_delete(i, None).await?;
        }
        Ok(chain)
    }

    /// The device showing live snapshot `name`: a clone's base.
    pub(crate) fn snapshot_layer(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let st = lock(&self.state);
        let i = st.find_live(&self.volume, name).ok()?;
        Some(st.layer(&self.base, i))
    }

    /// Whether a snapshot operation runs now.
    pub(crate) fn busy(&self) -> bool {
        self.ops.try_lock().is_err()
    }

    fn head(&self) -> Arc<dyn BlockDevice> {
        self.head
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_head(&self, head: Arc<dyn BlockDevice>) {
        *self.head.write().unwrap_or_else(PoisonError::into_inner) = head;
    }

    fn note(&self, offset: u64, len: u64) {
        if let Some(v) = lock(&self.dirty).as_mut() {
            v.push(offset..offset.saturating_add(len));
        }
    }

    fn device_err(&self, what: &'static str) -> impl FnOnce(BlockError) -> OriginError + '_ {
        move |source| {
            SnapshotError::Device {
                volume: self.volume.clone(),
                what,
                source,
            }
            .into()
        }
    }

    /// Removes files in the directory the catalogue does not name.
    fn remove_strays(&self) -> Result<(), OriginError> {
        let names = match self.storage.list(&self.dir) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(state_err(&self.dir)(e)),
        };
        let known = lock(&self.state).catalogue.deltas.clone();
        let mut removed = false;
        for name in names {
            let Some(rest) = name.strip_prefix("layer-") else {
                continue;
            };
            let id = rest.split('.').next().and_then(|i| i.parse::<u64>().ok());
            if id.is_some_and(|id| known.contains(&id)) && !has_extension(&name, "probe") {
                continue;
            }
            let p = self.dir.join(&name);
            tracing::info!(file = %p.display(), "removing a snapshot layer file no catalogue names");
            self.storage.remove(&p).map_err(state_err(&p))?;
            removed = true;
        }
        if removed {
            self.storage
                .sync_dir(&self.dir)
                .map_err(state_err(&self.dir))?;
        }
        Ok(())
    }

    /// Writes the catalogue (atomically, durably) and makes it current.
    async fn store(&self, catalogue: Catalogue) -> Result<(), OriginError> {
        let path = self.dir.join(CATALOGUE);
        let (storage, dir, p) = (self.storage.clone(), self.dir.clone(), path.clone());
        let text = catalogue.encode();
        self.file_io
            .run(move || {
                storage.create_dir_all(&dir)?;
                replace_file(storage.as_ref(), &p, text.as_bytes())
            })
            .await
            .map_err(state_err(&path))?;
        lock(&self.state).catalogue = catalogue;
        Ok(())
    }

    /// Creates the empty delta `id` over `below`.
    async fn new_delta(
        &self,
        id: u64,
        below: Arc<dyn BlockDevice>,
    ) -> Result<Arc<CowDevice>, OriginError> {
        let (storage, dir) = (self.storage.clone(), self.dir.clone());
        let (file, tag) = (layer_path(&self.dir, id), layer_tag(&self.volume, id));
        self.file_io
            .run(move || {
                storage.create_dir_all(&dir)?;
                CowDevice::open(below, &file, &tag)
            })
            .await
            .map(Arc::new)
            .map_err(state_err(&layer_path(&self.dir, id)))
    }

    async fn remove_delta(&self, d: &CowDevice) -> Result<(), OriginError> {
        let file = d.delta().to_path_buf();
        let f = file.clone();
        self.file_io
            .run(move || CowDevice::remove_files(&f))
            .await
            .map_err(state_err(&file))
    }

    fn info_of(cat: &Catalogue, i: usize, held_bytes: u64) -> SnapshotInfo {
        let e = &cat.snapshots[i];
        SnapshotInfo {
            name: e.name.clone(),
            created_unix_ms: e.created_unix_ms,
            applied_seq: e.applied_seq,
            size: e.size,
            layer: match i {
                0 => "image".to_owned(),
                i => format!("layer-{}", cat.deltas[i - 1]),
            },
            held_bytes,
            deleting: e.deleting,
        }
    }

    /// Bytes the layer of snapshot `i` holds (for `i` past the last
    /// snapshot: the head).
    async fn held_bytes(&self, deltas: &[Arc<CowDevice>], i: usize) -> Result<u64, OriginError> {
        match i.checked_sub(1) {
            None => data_bytes(self.base.as_ref())
                .await
                .map_err(self.device_err("mapping the image")),
            Some(d) => deltas[d]
                .allocated_bytes()
                .map_err(state_err(deltas[d].delta())),
        }
    }

    /// The snapshots and the head, with the bytes each layer holds, as
    /// the catalogue is at one moment (an operation may run meanwhile).
    pub(crate) async fn list(&self) -> Result<SnapshotList, OriginError> {
        let (cat, deltas) = {
            let st = lock(&self.state);
            (st.catalogue.clone(), st.deltas.clone())
        };
        let mut snapshots = Vec::with_capacity(cat.snapshots.len());
        for i in 0..cat.snapshots.len() {
            let held = self.held_bytes(&deltas, i).await?;
            snapshots.push(Self::info_of(&cat, i, held));
        }
        Ok(SnapshotList {
            snapshots,
            head: cat
                .deltas
                .last()
                .map_or_else(|| "image".to_owned(), |id| format!("layer-{id}")),
            head_bytes: self.held_bytes(&deltas, deltas.len()).await?,
        })
    }

    /// Takes snapshot `name` of `v` (see the module docs).
    async fn create(&self, v: &Volume, name: Option<&str>) -> Result<SnapshotInfo, OriginError> {
        // No batch is half applied while this is held: the snapshot sits
        // on a batch boundary, and `applied` names it.
        let _no_writes = v.apply_order.lock().await;
        self.create_held(v, name).await
    }

    /// [`Chain::create`] with `v`'s applies held off by the caller.
    pub(crate) async fn create_held(
        &self,
        v: &Volume,
        name: Option<&str>,
    ) -> Result<SnapshotInfo, OriginError> {
        let now = now_unix_ms();
        let name = {
            let st = lock(&self.state);
            let taken = |n: &str| st.catalogue.snapshots.iter().any(|e| e.name == n);
            match name {
                Some(n) if taken(n) => {
                    return Err(SnapshotError::Duplicate {
                        volume: self.volume.clone(),
                        snapshot: n.to_owned(),
                    }
                    .into())
                }
                Some(n) => n.to_owned(),
                None => st.catalogue.free_name(&auto_snapshot_name(now)),
            }
        };
        if let Some(seq) = lock(&v.journal).pending() {
            return Err(SnapshotError::HalfApplied {
                volume: self.volume.clone(),
                seq,
            }
            .into());
        }
        let head = self.head();
        head.flush()
            .await
            .map_err(self.device_err("flushing the head"))?;
        let applied_seq = v.applied();
        let mut next = lock(&self.state).catalogue.clone();
        let id = next.next_layer;
        next.next_layer += 1;
        next.snapshots.push(Entry {
            name,
            created_unix_ms: now,
            applied_seq,
            size: head.info().size,
            deleting: false,
        });
        next.deltas.push(id);
        let delta = self.new_delta(id, head).await?;
        self.store(next).await?;
        let (cat, deltas) = {
            let mut st = lock(&self.state);
            st.deltas.push(delta.clone());
            self.set_head(delta);
            (st.catalogue.clone(), st.deltas.clone())
        };
        let i = cat.snapshots.len() - 1;
        let info = Self::info_of(&cat, i, self.held_bytes(&deltas, i).await?);
        tracing::info!(target: "ferry::audit", volume = %self.volume, snapshot = %info.name, applied_seq, layer = %info.layer, "snapshot taken");
        Ok(info)
    }

    /// A rollback needs the volume at home: no edge holds it, none cut it
    /// over.
    fn check_home(&self, v: &Volume) -> Result<(), OriginError> {
        if let Some(edge) = v.holder() {
            return Err(OriginError::Held {
                volume: self.volume.clone(),
                edge,
            });
        }
        if let Some(edge) = v.migrated_to() {
            return Err(OriginError::MigratedAway {
                volume: self.volume.clone(),
                edge,
            });
        }
        Ok(())
    }

    /// Makes `v`'s content snapshot `name`'s (see the module docs).
    async fn rollback(&self, v: &Volume, name: &str) -> Result<SnapshotInfo, OriginError> {
        // A name that is not there is the more useful answer, held or not.
        lock(&self.state).find_live(&self.volume, name)?;
        self.check_home(v)?;
        let (k, target, newest, between, mut next) = {
            let st = lock(&self.state);
            let k = st.find_live(&self.volume, name)?;
            let n = st.catalogue.snapshots.len();
            (
                k,
                st.layer(&self.base, k),
                st.layer(&self.base, n - 1),
                st.deltas[k..n - 1].to_vec(),
                st.catalogue.clone(),
            )
        };
        let size = target.info().size;
        let id = next.next_layer;
        next.next_layer += 1;
        next.deltas.pop();
        next.deltas.push(id);
        let fresh = self.new_delta(id, newest).await?;
        let built = async {
            let mut ranges = Vec::new();
            for d in &between {
                ranges.extend(
                    d.data_ranges(0, size)
                        .await
                        .map_err(self.device_err("mapping a layer"))?,
                );
            }
            for r in coalesce(ranges) {
                copy(target.as_ref(), fresh.as_ref(), r)
                    .await
                    .map_err(self.device_err("copying the snapshot's blocks"))?;
            }
            fresh
                .flush()
                .await
                .map_err(self.device_err("flushing the new head"))
        }
        .await;
        if let Err(e) = built {
            let _ = self.remove_delta(&fresh).await;
            return Err(e);
        }
        let committed = self.switch_head(v, k, next, &fresh);
        let (old_head, info, epoch) = match committed {
            Ok(c) => c,
            Err(e) => {
                let _ = self.remove_delta(&fresh).await;
                return Err(e);
            }
        };
        self.remove_delta(&old_head).await?;
        tracing::warn!(target: "ferry::audit", volume = %self.volume, snapshot = %name, epoch = format!("{epoch:016x}"), "rolled back to a snapshot: edges' caches of the volume are void");
        let deltas = lock(&self.state).deltas.clone();
        let held_bytes = self.held_bytes(&deltas, k).await?;
        Ok(SnapshotInfo { held_bytes, ..info })
    }

    /// The end of a rollback to snapshot `k`: with the holder's lock
    /// held (no edge attaches between the check and the switch) and no
    /// apply running, a new epoch, the catalogue `next` with `fresh` as
    /// the head, and `fresh` serving. Small durable writes on the calling
    /// thread. Returns the old head, the snapshot, the new epoch.
    fn switch_head(
        &self,
        v: &Volume,
        k: usize,
        next: Catalogue,
        fresh: &Arc<CowDevice>,
    ) -> Result<(Arc<CowDevice>, SnapshotInfo, u64), OriginError> {
        let holder = lock(&v.holder);
        if let Some(h) = holder.as_ref() {
            return Err(OriginError::Held {
                volume: self.volume.clone(),
                edge: h.edge_id.clone(),
            });
        }
        // An edge that cut the volume over owns its content; a move back
        // ships that edge's changes onto this image.
        if let Some(edge) = v.migrated_to() {
            return Err(OriginError::MigratedAway {
                volume: self.volume.clone(),
                edge,
            });
        }
        // An apply past its ownership check (its connection ended
        // meanwhile) would write into the old head.
        let Ok(_no_writes) = v.apply_order.try_lock() else {
            return Err(OriginError::Applying(self.volume.clone()));
        };
        // The epoch first: a crash before the catalogue then costs edges
        // their caches, and never serves them stale data.
        let old = v.epoch();
        let epoch = loop {
            let e = u64::from_be_bytes(random::<8>());
            if e != old {
                break e;
            }
        };
        let path = v.dir.join("epoch");
        replace_file(v.storage.as_ref(), &path, &epoch.to_be_bytes()).map_err(state_err(&path))?;
        v.epoch.store(epoch, Ordering::Release);
        let cat = self.dir.join(CATALOGUE);
        replace_file(self.storage.as_ref(), &cat, next.encode().as_bytes())
            .map_err(state_err(&cat))?;
        let mut st = lock(&self.state);
        st.catalogue = next;
        let old_head = st.deltas.pop().expect("a snapshot means a delta");
        st.deltas.push(fresh.clone());
        self.set_head(fresh.clone());
        *lock(&v.partial) = None;
        let info = Self::info_of(&st.catalogue, k, 0);
        drop(st);
        drop(holder);
        Ok((old_head, info, epoch))
    }

    /// Deletes snapshot `name`, merging its layer away.
    async fn delete(&self, v: &Volume, name: &str) -> Result<(), OriginError> {
        let (k, mark) = {
            let st = lock(&self.state);
            let k = st.find(&self.volume, name)?;
            let mut next = st.catalogue.clone();
            let mark = !next.snapshots[k].deleting;
            next.snapshots[k].deleting = true;
            (k, mark.then_some(next))
        };
        // Marked first: from now on it is not usable, and a crash leaves
        // the deletion for the next open to finish.
        if let Some(next) = mark {
            self.store(next).await?;
        }
        self.finish_delete(k, Some(&v.apply_order)).await?;
        tracing::info!(target: "ferry::audit", volume = %self.volume, snapshot = %name, "snapshot deleted");
        Ok(())
    }

    /// Merges away the layer of snapshot `k` (marked deleting). `writers`
    /// is the volume's apply order, or `None` while it is being opened
    /// (nothing writes then).
    async fn finish_delete(
        &self,
        k: usize,
        writers: Option<&tokio::sync::Mutex<()>>,
    ) -> Result<(), OriginError> {
        let size = self.base.info().size;
        if k > 0 {
            // The delta of snapshot k goes into the layer above it, where
            // that one has nothing; then the layer above reads past it.
            let (gone, child, below) = {
                let st = lock(&self.state);
                (
                    st.deltas[k - 1].clone(),
                    st.deltas[k].clone(),
                    st.layer(&self.base, k - 1),
                )
            };
            for r in gone
                .data_ranges(0, size)
                .await
                .map_err(self.device_err("mapping a layer"))?
            {
                child
                    .materialize(r.start, r.end - r.start)
                    .await
                    .map_err(self.device_err("merging a layer"))?;
            }
            child
                .flush()
                .await
                .map_err(self.device_err("flushing a merged layer"))?;
            let mut next = lock(&self.state).catalogue.clone();
            next.snapshots.remove(k);
            next.deltas.remove(k - 1);
            self.store(next).await?;
            child.rebase(below).map_err(state_err(child.delta()))?;
            lock(&self.state).deltas.remove(k - 1);
            return self.remove_delta(&gone).await;
        }
        // The oldest snapshot is the image: the layer above it is merged
        // down into the image (which that layer masks wherever it writes).
        let (up, is_head, above) = {
            let st = lock(&self.state);
            (
                st.deltas[0].clone(),
                st.deltas.len() == 1,
                st.deltas.get(1).cloned(),
            )
        };
        let track = is_head && writers.is_some();
        if let Some(w) = writers.filter(|_| track) {
            // Started with writes held off: none is in flight unrecorded.
            let _no_writes = w.lock().await;
            *lock(&self.dirty) = Some(Vec::new());
        }
        let merged = async {
            let ranges = up
                .data_ranges(0, size)
                .await
                .map_err(self.device_err("mapping a layer"))?;
            for r in ranges {
                copy(up.as_ref(), self.base.as_ref(), r)
                    .await
                    .map_err(self.device_err("merging into the image"))?;
            }
            self.base
                .flush()
                .await
                .map_err(self.device_err("flushing the image"))?;
            // Writes to the head meanwhile, copied with writes held off.
            let _no_writes = match writers {
                Some(w) if is_head => Some(w.lock().await),
                _ => None,
            };
            if track {
                let dirty = lock(&self.dirty).take().unwrap_or_default();
                for r in coalesce(dirty) {
                    copy(up.as_ref(), self.base.as_ref(), r)
                        .await
                        .map_err(self.device_err("merging into the image"))?;
                }
                self.base
                    .flush()
                    .await
                    .map_err(self.device_err("flushing the image"))?;
            }
            let mut next = lock(&self.state).catalogue.clone();
            next.snapshots.remove(0);
            next.deltas.remove(0);
            self.store(next).await?;
            match &above {
                Some(a) => a.rebase(self.base.clone()).map_err(state_err(a.delta()))?,
                None => self.set_head(self.base.clone()),
            }
            lock(&self.state).deltas.remove(0);
            Ok::<(), OriginError>(())
        }
        .await;
        *lock(&self.dirty) = None;
        merged?;
        self.remove_delta(&up).await
    }

    /// The device showing snapshot `name` (tests).
    #[cfg(test)]
    fn view(&self, name: &str) -> Arc<dyn BlockDevice> {
        let st = lock(&self.state);
        let i = st.find_live(&self.volume, name).expect("a snapshot");
        st.layer(&self.base, i)
    }
}

fn layer_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("layer-{id}.img"))
}

fn layer_tag(volume: &str, id: u64) -> String {
    format!("{volume}/layer-{id}")
}

#[async_trait]
impl BlockDevice for Chain {
    fn info(&self) -> DeviceInfo {
        self.head().info()
    }

    async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
        self.head().read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> BlockResult<()> {
        self.note(offset, data.len() as u64);
        self.head().write(offset, data, flags).await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.head().flush().await
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
        self.note(offset, len);
        self.head().trim(offset, len, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.note(offset, len);
        self.head().write_zeroes(offset, len, flags).await
    }

    async fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.head().extents(offset, len).await
    }

    async fn prefetch(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.head().prefetch(offset, len).await
    }
}

impl Origin {
    /// The served volume `name`, for a snapshot operation: `None` once
    /// it was removed (an operation that looked it up before must not go
    /// on with files a re-added volume will open).
    fn snapshot_volume(&self, name: &str) -> Result<Arc<Volume>, OriginError> {
        self.volume(name)
            .ok_or_else(|| OriginError::NoSuchVolume(name.to_owned()))
    }

    /// Whether `v` is still the volume served as `name` (checked with
    /// snapshot operations held off).
    fn still_served(&self, name: &str, v: &Arc<Volume>) -> Result<(), OriginError> {
        if self.volume(name).is_some_and(|now| Arc::ptr_eq(&now, v)) {
            Ok(())
        } else {
            Err(OriginError::NoSuchVolume(name.to_owned()))
        }
    }

    /// Takes a snapshot of `volume` now, named `name` (default
    /// `auto-YYYYMMDDTHHMMSSZ`, with `-2`, `-3`... if taken): O(1), on a
    /// batch boundary (it holds every batch applied so far and none of the
    /// next), durable when this returns. For operators, and before a
    /// migration or a move back.
    pub async fn snapshot(
        &self,
        volume: &str,
        name: Option<&str>,
    ) -> Result<SnapshotInfo, OriginError> {
        if let Some(n) = name {
            check_snapshot_name(n)?;
            if n.starts_with(AUTO_PREFIX) {
                return Err(SnapshotError::Reserved(n.to_owned()).into());
            }
        }
        let v = self.snapshot_volume(volume)?;
        if v.keeps_no_writes() {
            return Err(CloneError::CloudPersistent(volume.to_owned()).into());
        }
        let _one_at_a_time = v.chain.ops.lock().await;
        self.still_served(volume, &v)?;
        v.chain.create(&v, name).await
    }

    /// `volume`'s snapshots, oldest first.
    pub async fn snapshots(&self, volume: &str) -> Result<SnapshotList, OriginError> {
        self.snapshot_volume(volume)?.chain.list().await
    }

    /// Makes `volume`'s content exactly snapshot `snapshot`'s, and gives
    /// the volume a new epoch (edges' caches of it are void). Refused
    /// while an edge holds the volume. The snapshot, and every other,
    /// stays.
    pub async fn rollback(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, OriginError> {
        let v = self.snapshot_volume(volume)?;
        let _one_at_a_time = v.chain.ops.lock().await;
        self.still_served(volume, &v)?;
        v.chain.rollback(&v, snapshot).await
    }

    /// Deletes `volume`'s snapshot `snapshot`, keeping every other
    /// snapshot's bytes and the volume's.
    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), OriginError> {
        let v = self.snapshot_volume(volume)?;
        let _one_at_a_time = v.chain.ops.lock().await;
        self.still_served(volume, &v)?;
        // Under the snapshot lock, which a clone's create holds while it
        // pins: no clone appears between this check and the merge.
        let clones = self.clones_of(volume, Some(snapshot));
        if !clones.is_empty() {
            return Err(CloneError::Pinned {
                volume: volume.to_owned(),
                snapshot: snapshot.to_owned(),
                clones,
            }
            .into());
        }
        v.chain.delete(&v, snapshot).await
    }
}

fn has_extension(name: &str, ext: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

impl Chain {
    /// The batch the newest live snapshot holds up to.
    fn newest_applied_seq(&self) -> Option<u64> {
        let st = lock(&self.state);
        st.catalogue
            .snapshots
            .iter()
            .rev()
            .find(|e| !e.deleting)
            .map(|e| e.applied_seq)
    }

    /// Automatic snapshots beyond the newest `keep`, oldest first.
    fn auto_surplus(&self, keep: usize) -> Vec<String> {
        let st = lock(&self.state);
        let auto: Vec<&Entry> = st
            .catalogue
            .snapshots
            .iter()
            .filter(|e| !e.deleting && e.name.starts_with(AUTO_PREFIX))
            .collect();
        let n = auto.len().saturating_sub(keep);
        auto[..n].iter().map(|e| e.name.clone()).collect()
    }
}

impl Origin {
    /// Before the first write batch of a new holder, with `v`'s applies
    /// held off by the caller: an automatic snapshot (unless the newest
    /// snapshot already holds every batch applied), then the automatic
    /// snapshots beyond the retention are deleted in the background (a
    /// merge copies data; the batch does not wait for it). Nothing here
    /// stops the batch: a failure is logged.
    pub(crate) async fn auto_snapshot_held(&self, v: &Volume) {
        let Ok(one_at_a_time) = v.chain.ops.try_lock() else {
            tracing::warn!(volume = %v.name, "no automatic snapshot: a snapshot operation is running");
            return;
        };
        if v.chain.newest_applied_seq() == Some(v.applied()) {
            return;
        }
        let name = lock(&v.chain.state)
            .catalogue
            .free_name(&pre_write_name(now_unix_ms()));
        if let Err(e) = v.chain.create_held(v, Some(&name)).await {
            tracing::warn!(volume = %v.name, error = %e, "no automatic snapshot before the first write batch");
            return;
        }
        let surplus = v.chain.auto_surplus(self.config.auto_snapshots);
        drop(one_at_a_time);
        let Some(served) = self.volume(&v.name).filter(|s| std::ptr::eq(s.as_ref(), v)) else {
            return;
        };
        if surplus.is_empty() {
            return;
        }
        let clones = self.clones.clone();
        tokio::spawn(async move {
            for name in surplus {
                let _one_at_a_time = served.chain.ops.lock().await;
                // Re-checked under the lock a clone's create holds.
                let pinned = lock(&clones)
                    .iter()
                    .any(|c| c.parent == served.name && c.snapshot == name);
                if pinned || served.chain.snapshot_layer(&name).is_none() {
                    continue;
                }
                match served.chain.delete(&served, &name).await {
                    Ok(()) => {
                        tracing::info!(volume = %served.name, snapshot = %name, "automatic snapshot past the retention deleted");
                    }
                    Err(e) => {
                        tracing::warn!(volume = %served.name, snapshot = %name, error = %e, "deleting an automatic snapshot past the retention");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::OriginConfig;
    use blockcore::{MemDevice, WriteEntry};
    use std::sync::atomic::AtomicBool;

    /// Not a multiple of any block size.
    pub(crate) const SIZE: u64 = (1 << 20) + 1000;

    pub(crate) fn u(v: u64) -> usize {
        usize::try_from(v).unwrap()
    }

    /// What the image holds before anything is written: non-zero, by
    /// position.
    pub(crate) fn image_bytes() -> Vec<u8> {
        #[allow(clippy::cast_possible_truncation)]
        (0..SIZE).map(|i| (i % 249) as u8 + 1).collect()
    }

    pub(crate) fn image() -> Arc<MemDevice> {
        Arc::new(MemDevice::from_bytes(&image_bytes()))
    }

    pub(crate) async fn open(dir: &Path, base: Arc<dyn BlockDevice>) -> Origin {
        Origin::open(dir, vec![("vol".into(), base)], OriginConfig::default())
            .await
            .expect("open the origin")
    }

    pub(crate) async fn content(dev: &dyn BlockDevice) -> Vec<u8> {
        dev.read(0, u(dev.info().size)).await.unwrap().to_vec()
    }

    pub(crate) fn write(offset: u64, len: u64, byte: u8) -> WriteEntry {
        WriteEntry::Data {
            offset,
            data: Bytes::from(vec![byte; u(len)]),
        }
    }

    /// Applies `entries` as batch `seq` for the edge on `conn` and to
    /// `model`.
    pub(crate) async fn apply(
        o: &Origin,
        conn: u64,
        v: &Volume,
        seq: u64,
        entries: Vec<WriteEntry>,
        model: &mut [u8],
    ) {
        for e in &entries {
            match e {
                WriteEntry::Data { offset, data } => {
                    model[u(*offset)..u(*offset) + data.len()].copy_from_slice(data);
                }
                WriteEntry::Zero { offset, len } => model[u(*offset)..u(offset + len)].fill(0),
            }
        }
        o.apply(conn, v, seq, entries).await.expect("apply");
    }

    fn layer_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("volumes/vol/snapshots"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| n.starts_with("layer-"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn names(l: &SnapshotList) -> Vec<&str> {
        l.snapshots.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn catalogues_round_trip_and_garbage_is_refused() {
        let c = Catalogue {
            size: SIZE,
            next_layer: 9,
            snapshots: vec![
                Entry {
                    name: "nightly".into(),
                    created_unix_ms: 1_767_225_600_000,
                    applied_seq: 17,
                    size: SIZE,
                    deleting: false,
                },
                Entry {
                    name: "auto-20260101T000000Z".into(),
                    created_unix_ms: 1_767_225_600_001,
                    applied_seq: 25,
                    size: SIZE,
                    deleting: true,
                },
            ],
            deltas: vec![3, 8],
        };
        let text = c.encode();
        assert_eq!(Catalogue::decode(&text), Ok(c.clone()));
        assert!(text.contains("snapshot 25 1767225600001 1049576 deleting auto-"));
        let empty = Catalogue::empty(5);
        assert_eq!(Catalogue::decode(&empty.encode()), Ok(empty));
        // Any cut is refused (the `end` line), and so is what is not one.
        let lines: Vec<&str> = text.lines().collect();
        for n in 0..lines.len() {
            let cut = lines[..n].join("\n");
            assert!(Catalogue::decode(&cut).is_err(), "cut to {n} lines");
        }
        let bad = |from: &str, to: &str| {
            let t = text.replacen(from, to, 1);
            assert_ne!(t, text, "{from}");
            assert!(Catalogue::decode(&t).is_err(), "{from} -> {to}");
        };
        bad("ferry snapshot catalogue v1", "ferry snapshot catalogue v2");
        bad("layer 8", "layer 9");
        bad("layer 8", "layer 3");
        bad("layer 8", "layer 0");
        bad(" deleting ", " gone ");
        bad("auto-20260101T000000Z", "nightly");
        bad("nightly", "bad/name");
        bad("size 1049576", "size lots");
        bad("layer 3\n", "");
        bad("end\n", "end\nlayer 4\n");
    }

    #[test]
    fn snapshot_names_are_checked_and_auto_names_are_utc() {
        for ok in ["a", "nightly", "before-migration.2", "A_1", &"x".repeat(64)] {
            assert!(check_snapshot_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", ".x", "-x", "a/b", "a@b", "a b", "é", &"x".repeat(65)] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400_000), "20000229T000000Z");
        assert_eq!(utc_stamp(1_709_210_096_999), "20240229T123456Z");
        assert_eq!(utc_stamp(4_102_444_799_000), "20991231T235959Z");
        assert_eq!(
            auto_snapshot_name(1_767_225_600_000),
            "auto-20260101T000000Z"
        );
        assert!(check_snapshot_name(&auto_snapshot_name(u64::from(u32::MAX) * 1000)).is_ok());
    }

    #[tokio::test]
    async fn a_new_holders_first_batch_takes_an_automatic_snapshot_and_old_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let config = OriginConfig {
            auto_snapshots: 2,
            ..OriginConfig::default()
        };
        let o = Origin::open(dir.path(), vec![("vol".into(), image() as _)], config)
            .await
            .unwrap();
        let autos = |l: &SnapshotList| {
            l.snapshots
                .iter()
                .filter(|s| s.name.starts_with(AUTO_PREFIX))
                .map(|s| (s.name.clone(), s.applied_seq))
                .collect::<Vec<_>>()
        };
        let mut model = image_bytes();
        let (v, _) = o.attach(1, "vol", "edge-1").unwrap();
        apply(&o, 1, &v, 1, vec![write(0, 5000, 1)], &mut model).await;
        apply(&o, 1, &v, 2, vec![write(9000, 5000, 2)], &mut model).await;
        let l = o.snapshots("vol").await.unwrap();
        assert_eq!(autos(&l).len(), 1, "{l:?}");
        assert_eq!(autos(&l)[0].1, 0, "taken before the first batch");
        let first = autos(&l)[0].0.clone();
        assert!(content(v.chain.view(&first).as_ref()).await == image_bytes());
        // The same edge reconnecting is no new holder.
        o.release(1, &v, None);
        let (v, _) = o.attach(2, "vol", "edge-1").unwrap();
        apply(&o, 2, &v, 3, vec![write(1, 10, 3)], &mut model).await;
        assert_eq!(autos(&o.snapshots("vol").await.unwrap()).len(), 1);
        // Two more holders: two more snapshots, each before its writes;
        // the oldest goes past the retention of two.
        for (i, edge) in [(3, "edge-2"), (4, "edge-3")] {
            o.release(i - 1, &v, None);
            let (w, _) = o.attach(i, "vol", edge).unwrap();
            let before = model.clone();
            apply(&o, i, &w, i + 1, vec![write(100 * i, 77, 4)], &mut model).await;
            let l = o.snapshots("vol").await.unwrap();
            let (newest, seq) = autos(&l).last().cloned().unwrap();
            assert_eq!(seq, i, "{l:?}");
            assert!(content(w.chain.view(&newest).as_ref()).await == before);
        }
        let mut left = Vec::new();
        for _ in 0..200 {
            left = autos(&o.snapshots("vol").await.unwrap());
            if left.len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(left.iter().map(|a| a.1).collect::<Vec<_>>(), vec![3, 4]);
        assert!(!left.iter().any(|a| a.0 == first));
        assert!(content(v.device().as_ref()).await == model);
        // The prefix is theirs.
        let reserved = o.snapshot("vol", Some("pre-write-mine")).await.unwrap_err();
        assert!(
            matches!(reserved, OriginError::Snapshot(SnapshotError::Reserved(_))),
            "{reserved}"
        );
    }

    #[tokio::test]
    async fn snapshots_freeze_the_content_and_rollback_restores_it_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let base = image();
        let o = open(dir.path(), base.clone()).await;
        let (v, _) = o.attach(1, "vol", "edge-1").unwrap();
        let mut model = image_bytes();
        let batch1 = vec![
            write(5000, 70_000, 0x11),
            WriteEntry::Zero {
                offset: 300_000,
                len: 10_000,
            },
        ];
        apply(&o, 1, &v, 1, batch1, &mut model).await;
        let one = o.snapshot("vol", Some("one")).await.unwrap();
        assert_eq!((one.applied_seq, one.layer.as_str()), (1, "image"));
        assert_eq!(one.size, SIZE);
        let at_one = model.clone();
        apply(&o, 1, &v, 2, vec![write(60_000, 100_001, 0x22)], &mut model).await;
        let two = o.snapshot("vol", None).await.unwrap();
        assert!(two.name.starts_with("auto-"), "{two:?}");
        assert_eq!((two.applied_seq, two.layer.as_str()), (2, "layer-1"));
        let at_two = model.clone();
        let batch3 = vec![
            write(0, 4096, 0x33),
            WriteEntry::Zero {
                offset: 1000,
                len: 1000,
            },
        ];
        apply(&o, 1, &v, 3, batch3, &mut model).await;
        assert!(content(v.device().as_ref()).await == model);
        assert!(content(v.chain.view("one").as_ref()).await == at_one);
        assert!(content(v.chain.view(&two.name).as_ref()).await == at_two);
        // The image itself is the oldest snapshot now.
        assert!(content(base.as_ref()).await == at_one);
        let dup = o.snapshot("vol", Some("one")).await.unwrap_err();
        assert!(
            matches!(dup, OriginError::Snapshot(SnapshotError::Duplicate { .. })),
            "{dup}"
        );

        // Refused while an edge holds the volume, naming it.
        let held = o.rollback("vol", "one").await.unwrap_err();
        assert!(matches!(held, OriginError::Held { .. }), "{held}");
        assert!(held.to_string().contains("edge-1"), "{held}");
        assert!(content(v.device().as_ref()).await == model);
        o.release(1, &v, None);
        let missing = o.rollback("vol", "three").await.unwrap_err();
        assert!(
            matches!(missing, OriginError::Snapshot(SnapshotError::NoSuch { .. })),
            "{missing}"
        );

        let epoch = v.epoch();
        let back = o.rollback("vol", "one").await.unwrap();
        assert_eq!(back.name, "one");
        assert!(content(v.device().as_ref()).await == at_one);
        assert_ne!(v.epoch(), epoch, "a rollback gives a new epoch");
        assert_eq!(v.applied(), 3, "the batch sequence goes on");
        let (v2, grant) = o.attach(2, "vol", "edge-2").unwrap();
        assert_eq!(grant.volume_epoch, v.epoch());
        assert_eq!(grant.next_seq, 4);
        // Every snapshot stays: on to the newer one, and back again.
        let mut model = at_one.clone();
        apply(&o, 2, &v2, 4, vec![write(900_000, 5000, 0x44)], &mut model).await;
        o.release(2, &v2, None);
        o.rollback("vol", &two.name).await.unwrap();
        assert!(content(v.device().as_ref()).await == at_two);
        o.rollback("vol", "one").await.unwrap();
        assert!(content(v.device().as_ref()).await == at_one);
        assert!(content(v.chain.view(&two.name).as_ref()).await == at_two);
        let list = o.snapshots("vol").await.unwrap();
        assert_eq!(names(&list), ["one", two.name.as_str()]);
        assert_eq!(list.head, "layer-5");
        assert!(list.snapshots[1].held_bytes >= 100_001, "{list:?}");
        // Old heads are gone from the disk.
        assert_eq!(
            layer_files(dir.path()),
            ["layer-1.img", "layer-1.meta", "layer-5.img", "layer-5.meta"]
        );
    }

    /// Snapshots `sN` show `at[N - 1]`, the volume `model`.
    async fn check(v: &Volume, at: &[Vec<u8>], names: &[&str], model: &[u8]) {
        for n in names {
            let i = usize::from(n.as_bytes()[1] - b'1');
            assert!(
                content(v.chain.view(n).as_ref()).await == at[i],
                "snapshot {n} changed"
            );
        }
        assert!(
            content(v.device().as_ref()).await == model,
            "the head changed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn deleting_any_snapshot_keeps_every_other_byte() {
        let dir = tempfile::tempdir().unwrap();
        let base = image();
        let o = Arc::new(open(dir.path(), base.clone()).await);
        let (v, _) = o.attach(1, "vol", "e").unwrap();
        let mut model = image_bytes();
        let mut at = Vec::new();
        for (seq, name) in [(1, "s1"), (2, "s2"), (3, "s3")] {
            let b = u8::try_from(seq).unwrap();
            let batch = vec![
                write(seq * 150_000 + 7, 200_000, b),
                write(seq * 3000, 10, b + 0x10),
                WriteEntry::Zero {
                    offset: 900_000 + seq * 1000,
                    len: 500,
                },
            ];
            apply(&o, 1, &v, seq, batch, &mut model).await;
            o.snapshot("vol", Some(name)).await.unwrap();
            at.push(model.clone());
        }
        apply(&o, 1, &v, 4, vec![write(100, 300_000, 0x99)], &mut model).await;

        // The middle one: its delta goes into the layer above.
        o.delete_snapshot("vol", "s2").await.unwrap();
        check(&v, &at, &["s1", "s3"], &model).await;
        assert_eq!(names(&o.snapshots("vol").await.unwrap()), ["s1", "s3"]);
        assert!(!layer_files(dir.path()).contains(&"layer-1.img".to_owned()));
        // The oldest: the layer above goes into the image.
        o.delete_snapshot("vol", "s1").await.unwrap();
        check(&v, &at, &["s3"], &model).await;
        assert!(content(base.as_ref()).await == at[2], "the image is s3 now");
        let list = o.snapshots("vol").await.unwrap();
        assert_eq!(list.snapshots[0].layer, "image");
        // The last: the head goes into the image, while batches apply.
        let writer = {
            let (o, v) = (o.clone(), v.clone());
            let mut model = model.clone();
            tokio::spawn(async move {
                for seq in 5..40u64 {
                    let b = u8::try_from(seq).unwrap();
                    let at = (seq * 37_813) % (SIZE - 70_000);
                    apply(&o, 1, &v, seq, vec![write(at, 65_536 + seq, b)], &mut model).await;
                    tokio::task::yield_now().await;
                }
                model
            })
        };
        o.delete_snapshot("vol", "s3").await.unwrap();
        let model = writer.await.unwrap();
        check(&v, &at, &[], &model).await;
        assert!(
            content(base.as_ref()).await == model,
            "with no snapshot left, the image is the volume"
        );
        let list = o.snapshots("vol").await.unwrap();
        assert!(
            list.snapshots.is_empty() && list.head == "image",
            "{list:?}"
        );
        assert!(layer_files(dir.path()).is_empty());
        let err = o.delete_snapshot("vol", "s3").await.unwrap_err();
        assert!(
            matches!(err, OriginError::Snapshot(SnapshotError::NoSuch { .. })),
            "{err}"
        );
    }

    const BATCHES: u64 = 120;
    const RANGES: u64 = 16;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn snapshots_taken_while_batches_apply_sit_on_batch_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let o = Arc::new(open(dir.path(), image()).await);
        let (v, _) = o.attach(1, "vol", "e").unwrap();
        // Batch k writes k into every byte of 16 ranges: a snapshot must
        // show one k everywhere, the one it records.
        let writer = {
            let (o, v) = (o.clone(), v.clone());
            tokio::spawn(async move {
                for k in 1..=BATCHES {
                    let b = u8::try_from(k).unwrap();
                    let entries = (0..RANGES)
                        .map(|j| write(j * 65_536 + 100, 20_000, b))
                        .collect();
                    o.apply(1, &v, k, entries).await.unwrap();
                }
            })
        };
        let mut taken = Vec::new();
        let mut i = 0;
        while !writer.is_finished() && taken.len() < 40 {
            taken.push(o.snapshot("vol", Some(&format!("s{i}"))).await.unwrap());
            i += 1;
            tokio::time::sleep(std::time::Duration::from_micros(300 * (i % 7))).await;
        }
        writer.await.unwrap();
        assert!(taken.len() >= 3, "only {} snapshots", taken.len());
        let image = image_bytes();
        let mut seqs = Vec::new();
        for s in &taken {
            let got = content(v.chain.view(&s.name).as_ref()).await;
            for j in 0..RANGES {
                let r = u(j * 65_536 + 100)..u(j * 65_536 + 20_100);
                let want: Vec<u8> = if s.applied_seq == 0 {
                    image[r.clone()].to_vec()
                } else {
                    vec![u8::try_from(s.applied_seq).unwrap(); r.len()]
                };
                assert!(
                    got[r] == want[..],
                    "snapshot {} (applied {}) is not that batch's boundary in range {j}",
                    s.name,
                    s.applied_seq
                );
            }
            seqs.push(s.applied_seq);
        }
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
        assert!(
            seqs.iter().any(|&s| s > 0 && s < BATCHES),
            "no snapshot landed while batches applied: {seqs:?}"
        );
    }

    #[tokio::test]
    async fn the_chain_survives_a_restart_and_a_rollback_does_too() {
        let dir = tempfile::tempdir().unwrap();
        let base = image();
        let mut model = image_bytes();
        let (before, at_a) = {
            let o = open(dir.path(), base.clone()).await;
            let (v, _) = o.attach(1, "vol", "e").unwrap();
            apply(&o, 1, &v, 1, vec![write(10, 300_000, 1)], &mut model).await;
            o.snapshot("vol", Some("a")).await.unwrap();
            let at_a = model.clone();
            apply(&o, 1, &v, 2, vec![write(200_000, 300_000, 2)], &mut model).await;
            o.snapshot("vol", Some("b")).await.unwrap();
            apply(&o, 1, &v, 3, vec![write(400_000, 10, 3)], &mut model).await;
            (o.snapshots("vol").await.unwrap(), at_a)
        };
        let o = open(dir.path(), base.clone()).await;
        let v = o.volume("vol").unwrap();
        assert_eq!(o.snapshots("vol").await.unwrap(), before);
        assert!(content(v.device().as_ref()).await == model);
        assert!(content(v.chain.view("a").as_ref()).await == at_a);
        assert_eq!(v.applied(), 3);
        o.rollback("vol", "a").await.unwrap();
        let epoch = v.epoch();
        drop((v, o));
        let o = open(dir.path(), base.clone()).await;
        let v = o.volume("vol").unwrap();
        assert!(
            content(v.device().as_ref()).await == at_a,
            "the rollback was lost"
        );
        assert_eq!(v.epoch(), epoch, "the new epoch was lost");
        assert_eq!(names(&o.snapshots("vol").await.unwrap()), ["a", "b"]);
        // Another image under the volume's name is refused.
        drop((v, o));
        let other: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(SIZE + 512));
        let err = Origin::open(
            dir.path(),
            vec![("vol".into(), other)],
            OriginConfig::default(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("another image"), "{err}");
    }

    /// Rewrites the catalogue of the test volume by hand.
    fn edit_catalogue(dir: &Path, edit: impl FnOnce(String) -> String) {
        let p = dir.join("volumes/vol/snapshots/catalogue");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, edit(text)).unwrap();
    }

    #[tokio::test]
    async fn a_deletion_cut_short_by_a_crash_is_finished_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let base = image();
        let mut model = image_bytes();
        let mut at = Vec::new();
        {
            let o = open(dir.path(), base.clone()).await;
            let (v, _) = o.attach(1, "vol", "e").unwrap();
            for seq in 1..=3u64 {
                let b = u8::try_from(seq).unwrap();
                apply(
                    &o,
                    1,
                    &v,
                    seq,
                    vec![write(seq * 100_000, 250_000, b)],
                    &mut model,
                )
                .await;
                o.snapshot("vol", Some(&format!("s{seq}"))).await.unwrap();
                at.push(model.clone());
            }
            apply(&o, 1, &v, 4, vec![write(0, 50_000, 4)], &mut model).await;
        }
        // A crash in the middle of deleting s1: marked, and the image
        // part-way through taking the layer above (which masks it).
        edit_catalogue(dir.path(), |t| t.replace(" live s1", " deleting s1"));
        base.write(
            200_000,
            Bytes::from(vec![2u8; 50_000]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        // And a crash in the middle of deleting s3 (the layer above it is
        // the head), and of a create that never reached the catalogue.
        edit_catalogue(dir.path(), |t| t.replace(" live s3", " deleting s3"));
        let snaps = dir.path().join("volumes/vol/snapshots");
        for stray in ["layer-77.img", "layer-77.meta", "layer-2.probe"] {
            std::fs::write(snaps.join(stray), b"x").unwrap();
        }
        let o = open(dir.path(), base.clone()).await;
        let v = o.volume("vol").unwrap();
        assert_eq!(names(&o.snapshots("vol").await.unwrap()), ["s2"]);
        assert!(content(v.chain.view("s2").as_ref()).await == at[1]);
        assert!(content(base.as_ref()).await == at[1], "s2 is the image now");
        assert!(content(v.device().as_ref()).await == model);
        assert_eq!(
            layer_files(dir.path()),
            ["layer-3.img", "layer-3.meta"],
            "only the head is left"
        );
    }

    /// A device whose writes fail while `fail` is set.
    #[derive(Debug)]
    struct Flaky {
        dev: MemDevice,
        fail: AtomicBool,
    }

    #[async_trait]
    impl BlockDevice for Flaky {
        fn info(&self) -> DeviceInfo {
            self.dev.info()
        }
        async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
            self.dev.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> BlockResult<()> {
            if self.fail.load(Ordering::Relaxed) && offset > 0 {
                return Err(BlockError::io(
                    blockcore::Op::Write,
                    offset,
                    std::io::Error::other("injected"),
                ));
            }
            self.dev.write(offset, data, flags).await
        }
        async fn flush(&self) -> BlockResult<()> {
            self.dev.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
            self.dev.trim(offset, len, flags).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
            self.dev.write_zeroes(offset, len, flags).await
        }
    }

    #[tokio::test]
    async fn a_half_applied_batch_holds_snapshots_off_until_it_is_resent() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            dev: MemDevice::new(SIZE),
            fail: AtomicBool::new(true),
        });
        let o = open(dir.path(), flaky.clone()).await;
        let (v, _) = o.attach(1, "vol", "e").unwrap();
        // The first entry lands, the second fails.
        let batch = || vec![write(0, 4096, 7), write(8192, 4096, 7)];
        o.apply(1, &v, 1, batch()).await.unwrap_err();
        let err = o.snapshot("vol", Some("x")).await.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::Snapshot(SnapshotError::HalfApplied { seq: 1, .. })
            ),
            "{err}"
        );
        flaky.fail.store(false, Ordering::Relaxed);
        o.apply(1, &v, 1, batch()).await.unwrap();
        let s = o.snapshot("vol", Some("x")).await.unwrap();
        assert_eq!(s.applied_seq, 1);
        for bad in ["", "a/b"] {
            let err = o.snapshot("vol", Some(bad)).await.unwrap_err();
            assert!(
                matches!(err, OriginError::Snapshot(SnapshotError::BadName(_))),
                "{err}"
            );
        }
        let err = o.snapshot("nope", None).await.unwrap_err();
        assert!(matches!(err, OriginError::NoSuchVolume(_)), "{err}");
    }

    const CRASH_SIZE: u64 = 32 << 20;
    const MIB: u64 = 1 << 20;

    /// Batch `seq` (1 to 4) of the crash test: 8 MiB each, overlapping.
    fn crash_batch(seq: u64) -> Vec<WriteEntry> {
        let b = u8::try_from(seq).unwrap();
        vec![
            write((seq - 1) * 4 * MIB, 8 * MIB, b),
            WriteEntry::Zero {
                offset: 24 * MIB + seq * 4096,
                len: 4096,
            },
        ]
    }

    fn crash_image() -> Vec<u8> {
        #[allow(clippy::cast_possible_truncation)]
        (0..CRASH_SIZE)
            .map(|i| (i / 4096 % 200) as u8 + 30)
            .collect()
    }

    /// The image's content after batches `1..=n`.
    fn crash_model(n: u64) -> Vec<u8> {
        let mut m = crash_image();
        for seq in 1..=n {
            for e in crash_batch(seq) {
                match e {
                    WriteEntry::Data { offset, data } => {
                        m[u(offset)..u(offset) + data.len()].copy_from_slice(&data);
                    }
                    WriteEntry::Zero { offset, len } => m[u(offset)..u(offset + len)].fill(0),
                }
            }
        }
        m
    }

    fn crash_device(dir: &Path) -> Arc<dyn BlockDevice> {
        Arc::new(
            blockcore::FileDevice::open(dir.join("image.raw"), &blockcore::OpenOptions::default())
                .unwrap(),
        )
    }

    /// The child: three snapshots, each with 8 MiB of its own, then the
    /// deletion of one of them; killed somewhere in it (or after).
    async fn crash_child(child: &testkit::crash::Child) {
        let dir = child.dir().join(format!("round-{}", child.round()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("image.raw"), crash_image()).unwrap();
        let o = open(&dir.join("state"), crash_device(&dir)).await;
        let (v, _) = o.attach(1, "vol", "e").unwrap();
        for seq in 1..=4 {
            o.apply(1, &v, seq, crash_batch(seq)).await.unwrap();
            if seq < 4 {
                o.snapshot("vol", Some(&format!("s{seq}"))).await.unwrap();
            }
        }
        child.report("ready");
        let target = format!("s{}", child.round() % 3 + 1);
        o.delete_snapshot("vol", &target).await.unwrap();
        child.report("deleted");
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    #[test]
    fn a_killed_deletion_leaves_the_old_state_or_the_new_never_a_mix() {
        use testkit::crash::{self, CrashTest, Verdict};
        let rt = tokio::runtime::Runtime::new().unwrap();
        if let Some(child) = crash::child() {
            rt.block_on(crash_child(&child));
            return;
        }
        let t = CrashTest::new(crash::name(
            module_path!(),
            "a_killed_deletion_leaves_the_old_state_or_the_new_never_a_mix",
        ));
        let mut outcomes = Vec::new();
        for round in 0..9u64 {
            let lines = t.run(round, |l| {
                if l == "ready" {
                    Verdict::KillAfter(std::time::Duration::from_millis(round * 4 % 25))
                } else {
                    Verdict::Continue
                }
            });
            assert!(lines.iter().any(|l| l == "ready"), "{lines:?}");
            let target = format!("s{}", round % 3 + 1);
            let dir = t.dir().join(format!("round-{round}"));
            let gone = rt.block_on(async {
                let o = open(&dir.join("state"), crash_device(&dir)).await;
                let v = o.volume("vol").unwrap();
                let listed = o.snapshots("vol").await.unwrap();
                let listed: Vec<String> = names(&listed).iter().map(|n| (*n).to_owned()).collect();
                let gone = !listed.contains(&target);
                let mut want: Vec<String> = (1..=3).map(|i| format!("s{i}")).collect();
                if gone {
                    want.retain(|n| *n != target);
                }
                assert_eq!(listed, want, "round {round}");
                for n in &listed {
                    let seq = u64::from(n.as_bytes()[1] - b'0');
                    assert!(
                        content(v.chain.view(n).as_ref()).await == crash_model(seq),
                        "round {round}: snapshot {n} is not what it was"
                    );
                }
                assert!(
                    content(v.device().as_ref()).await == crash_model(4),
                    "round {round}: the volume is not what it was"
                );
                gone
            });
            if lines.iter().any(|l| l == "deleted") {
                assert!(gone, "round {round}: a deletion reported done came back");
            }
            outcomes.push(gone);
        }
        eprintln!("deleted when killed, by round: {outcomes:?}");
    }
}
