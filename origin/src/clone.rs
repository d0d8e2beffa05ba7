//! Clones: a new volume whose content starts as a snapshot of another
//! volume (its parent), sharing the parent's blocks.
//!
//! ```text
//!   clone "web-2", origin persistence       clone "test-1", cloud persistence
//!     its chain (its own snapshots)           nothing of its own: the origin
//!     clone.img: every write batch            keeps none of its writes, the
//!          │                                  edge does (isolated)
//!          └───────────┐   ┌──────────────────────┘
//!              SnapshotView("web", "golden"): read-only
//!                          │
//!   parent "web": ... ─ layer of snapshot "golden" (frozen) ─ ... ─ head
//! ```
//!
//! - **Origin persistence**: the clone's write batches go into its own
//!   delta, `clone.img`, over the view ([`blockcore::CowDevice`]); above
//!   that it is a volume like any other: snapshots, rollback, migration,
//!   move back.
//! - **Cloud persistence** ("test clones"): the origin serves the
//!   snapshot's bytes read-only, tells the edge at attach that it keeps
//!   none of the writes (`Attached { local_writes }`), and refuses write
//!   batches. The edge keeps every write in its local-only overlay and
//!   ships nothing; it refuses to serve such a clone unless the whole
//!   volume is local-only (`--isolated`).
//! - **The parent's snapshot is pinned**: deleting it is refused while a
//!   clone uses it (its layer is what the clone reads). Every other
//!   operation on the parent stays allowed: deleting another snapshot
//!   merges layers without changing what any remaining one shows, and the
//!   view finds its snapshot's layer by name on every call; a rollback
//!   lays a new head and leaves frozen layers alone. Removing the parent
//!   is refused while it has clones, and so is deleting a clone that has
//!   clones of its own.
//! - **Sharing**: a clone's unwritten blocks are the base's bytes, so an
//!   edge that already received them (through the parent or any sibling)
//!   is answered with their signatures, and its cache (keyed by content)
//!   serves them: many clones on one edge hold one copy.
//!
//! # On disk
//!
//! `STATE_DIR/clones`, the registry and the commit point of a create or a
//! delete, UTF-8 text replaced atomically and durably:
//!
//! ```text
//! ferry clones v1
//! clone web-2 web golden origin 1767225600000
//! clone test-1 web golden cloud 1767225660000
//! end
//! ```
//!
//! Each line: `clone NAME PARENT SNAPSHOT origin|cloud CREATED_UNIX_MS`,
//! names %-escaped where they hold anything but letters, digits and
//! `._-`. In the clone's state directory (`volumes/NAME/`), besides what
//! every volume keeps, an origin-persistent clone has its delta
//! `clone.img` and `clone.meta`. A create writes the delta first and the
//! registry last; a crash in between leaves a delta no registry names,
//! which the next create of that name replaces. A delete removes the
//! registry entry first, then the directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use blockcore::{
    BlockDevice, BlockError, CowDevice, DeviceInfo, Extent, Op, Result as BlockResult, WriteFlags,
    ZeroFlags,
};
use bytes::Bytes;
use journal::storage::{read_file, replace_file};

use crate::snapshot::{check_snapshot_name, Chain, SnapshotError};
use crate::{check_name, lock, now_unix_ms, state_err, Origin, OriginError, Volume};

const MAGIC: &str = "ferry clones v1";
const REGISTRY: &str = "clones";
/// The delta of an origin-persistent clone, in its state directory.
const DELTA: &str = "clone.img";

/// Where a clone's writes are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Persistence {
    /// At the origin, in the clone's own delta: shipped by its edge as
    /// write batches like any volume's.
    Origin,
    /// On the edge only: the origin serves the base read-only and never
    /// receives a write.
    Cloud,
}

impl Persistence {
    pub fn as_str(self) -> &'static str {
        match self {
            Persistence::Origin => "origin",
            Persistence::Cloud => "cloud",
        }
    }

    pub fn parse(s: &str) -> Option<Persistence> {
        match s {
            "origin" => Some(Persistence::Origin),
            "cloud" => Some(Persistence::Cloud),
            _ => None,
        }
    }
}

impl std::fmt::Display for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One clone, as registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneInfo {
    pub name: String,
    /// The volume it was cloned from, and the snapshot of it.
    pub parent: String,
    pub snapshot: String,
    pub persistence: Persistence,
    pub created_unix_ms: u64,
}

/// Errors of clone operations (inside [`OriginError::Clone`]).
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("volume {0:?} is not a clone")]
    NotAClone(String),
    #[error(
        "volume {volume:?} is a clone of {parent}@{snapshot}: delete it as a clone (its writes \
         go with it)"
    )]
    IsAClone {
        volume: String,
        parent: String,
        snapshot: String,
    },
    #[error("volume {volume:?} has clones ({}): delete them first", clones.join(", "))]
    HasClones { volume: String, clones: Vec<String> },
    #[error(
        "snapshot {volume}@{snapshot} is the base of clones ({}): delete them first",
        clones.join(", ")
    )]
    Pinned {
        volume: String,
        snapshot: String,
        clones: Vec<String>,
    },
    #[error(
        "volume {0:?} is a clone with cloud persistence: its writes live on its edge, so the \
         origin has nothing to snapshot"
    )]
    CloudPersistent(String),
    #[error(
        "{dir} holds the state of an earlier volume named {name:?} (removed, not deleted): \
         choose another name, or remove that directory"
    )]
    StaleState { name: String, dir: PathBuf },
    #[error("the clone registry {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// Names as the registry writes them: `%XX` for anything but letters,
/// digits and `._-`, so spaces and newlines cannot split a line.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

fn encode(clones: &[CloneInfo]) -> String {
    let mut out = format!("{MAGIC}\n");
    for c in clones {
        let _ = writeln!(
            out,
            "clone {} {} {} {} {}",
            escape(&c.name),
            escape(&c.parent),
            escape(&c.snapshot),
            c.persistence,
            c.created_unix_ms
        );
    }
    out.push_str("end\n");
    out
}

fn decode(text: &str) -> Result<Vec<CloneInfo>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(format!("does not start with {MAGIC:?}"));
    }
    let mut clones: Vec<CloneInfo> = Vec::new();
    for line in lines {
        match line.split(' ').collect::<Vec<_>>()[..] {
            ["clone", name, parent, snapshot, persistence, created] => {
                let field = |s: &str| unescape(s).ok_or_else(|| format!("bad name in {line:?}"));
                let c = CloneInfo {
                    name: field(name)?,
                    parent: field(parent)?,
                    snapshot: field(snapshot)?,
                    persistence: Persistence::parse(persistence)
                        .ok_or_else(|| format!("bad persistence in {line:?}"))?,
                    created_unix_ms: created
                        .parse()
                        .map_err(|_| format!("bad time in {line:?}"))?,
                };
                if clones.iter().any(|o| o.name == c.name) {
                    return Err(format!("clone {:?} registered twice", c.name));
                }
                clones.push(c);
            }
            ["end"] => return Ok(clones),
            _ => return Err(format!("unexpected line {line:?}")),
        }
    }
    Err("no end line (cut short?)".into())
}

/// A parent's snapshot as a read-only device: the chain from the
/// snapshot's layer down, found by name on every call (a merge of another
/// snapshot may move it to another layer without changing a byte).
pub(crate) struct SnapshotView {
    chain: Arc<Chain>,
    snapshot: String,
    info: DeviceInfo,
}

impl std::fmt::Debug for SnapshotView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView")
            .field("chain", &self.chain)
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

impl SnapshotView {
    fn new(chain: Arc<Chain>, snapshot: String) -> Self {
        let mut info = chain.info();
        info.caps.read_only = true;
        info.caps.trim = false;
        info.caps.write_zeroes = false;
        info.caps.fast_zero = false;
        SnapshotView {
            chain,
            snapshot,
            info,
        }
    }

    fn layer(&self, op: Op, offset: u64) -> BlockResult<Arc<dyn BlockDevice>> {
        self.chain.snapshot_layer(&self.snapshot).ok_or_else(|| {
            // Pinned while a clone exists: only a bug gets here.
            BlockError::Io {
                op,
                offset,
                source: std::io::Error::other(format!(
                    "the clone's base snapshot {:?} is gone",
                    self.snapshot
                )),
            }
        })
    }
}

#[async_trait]
impl BlockDevice for SnapshotView {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
        self.layer(Op::Read, offset)?.read(offset, len).await
    }

    async fn write(&self, _: u64, _: Bytes, _: WriteFlags) -> BlockResult<()> {
        Err(BlockError::ReadOnly { op: Op::Write })
    }

    async fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    async fn trim(&self, _: u64, _: u64, _: WriteFlags) -> BlockResult<()> {
        Err(BlockError::ReadOnly { op: Op::Trim })
    }

    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> BlockResult<()> {
        Err(BlockError::ReadOnly {
            op: Op::WriteZeroes,
        })
    }

    async fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.layer(Op::Extents, offset)?.extents(offset, len).await
    }

    async fn prefetch(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.layer(Op::Prefetch, offset)?
            .prefetch(offset, len)
            .await
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> OriginError {
    CloneError::Corrupt {
        path: path.to_path_buf(),
        why: why.into(),
    }
    .into()
}

impl Origin {
    fn registry_path(&self) -> PathBuf {
        self.state_dir.join(REGISTRY)
    }

    /// The registry as stored (empty if there is none).
    pub(crate) fn load_clones(&self) -> Result<Vec<CloneInfo>, OriginError> {
        let path = self.registry_path();
        match read_file(self.storage.as_ref(), &path).map_err(state_err(&path))? {
            None => Ok(Vec::new()),
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| corrupt(&path, "not UTF-8"))?;
                decode(&text).map_err(|why| corrupt(&path, why))
            }
        }
    }

    /// Writes `next` as the registry (atomically, durably), then makes it
    /// current.
    async fn store_clones(&self, next: Vec<CloneInfo>) -> Result<(), OriginError> {
        let path = self.registry_path();
        let (storage, p, text) = (self.storage.clone(), path.clone(), encode(&next));
        self.config
            .file_io
            .run(move || replace_file(storage.as_ref(), &p, text.as_bytes()))
            .await
            .map_err(state_err(&path))?;
        *lock(&self.clones) = next;
        Ok(())
    }

    /// Every clone, in the order they were created.
    pub fn clones(&self) -> Vec<CloneInfo> {
        lock(&self.clones).clone()
    }

    /// The clones whose parent is `volume` (of `snapshot`, if given).
    pub(crate) fn clones_of(&self, volume: &str, snapshot: Option<&str>) -> Vec<String> {
        lock(&self.clones)
            .iter()
            .filter(|c| c.parent == volume && snapshot.is_none_or(|s| c.snapshot == s))
            .map(|c| c.name.clone())
            .collect()
    }

    /// Refuses while `volume` has clones (their base is in it).
    pub(crate) fn check_no_clones(&self, volume: &str) -> Result<(), OriginError> {
        let clones = self.clones_of(volume, None);
        if clones.is_empty() {
            return Ok(());
        }
        Err(CloneError::HasClones {
            volume: volume.to_owned(),
            clones,
        }
        .into())
    }

    /// The device a clone is served from, over its parent's chain.
    async fn clone_device(
        &self,
        parent: &Volume,
        c: &CloneInfo,
        create: bool,
    ) -> Result<Arc<dyn BlockDevice>, OriginError> {
        let view: Arc<dyn BlockDevice> =
            Arc::new(SnapshotView::new(parent.chain.clone(), c.snapshot.clone()));
        match c.persistence {
            Persistence::Cloud => Ok(view),
            Persistence::Origin => {
                let dir = self.volume_dir(&c.name);
                let (storage, d) = (self.storage.clone(), dir.clone());
                let file = dir.join(DELTA);
                let tag = format!("{}/clone", c.name);
                let f = file.clone();
                let delta = self
                    .config
                    .file_io
                    .run(move || {
                        if create {
                            storage.create_dir_all(&d)?;
                            CowDevice::open(view, &f, &tag)
                        } else {
                            CowDevice::open_existing(view, &f, &tag)
                        }
                    })
                    .await
                    .map_err(state_err(&file))?;
                Ok(Arc::new(delta))
            }
        }
    }

    /// Opens the registered clones (after the volumes they come from):
    /// at start. A clone whose parent is not served is left unserved,
    /// with a warning, until the parent is served again and the origin
    /// restarted.
    pub(crate) async fn open_clones(&self) -> Result<(), OriginError> {
        let mut waiting = self.load_clones()?;
        lock(&self.clones).clone_from(&waiting);
        loop {
            let ready = waiting
                .iter()
                .position(|c| self.volume(&c.parent).is_some());
            let Some(i) = ready else { break };
            let c = waiting.remove(i);
            let parent = self.volume(&c.parent).expect("checked");
            let device = self.clone_device(&parent, &c, false).await?;
            self.add(c.name.clone(), device, Some(c.clone()), crate::random)
                .await?;
        }
        for c in waiting {
            tracing::warn!(clone = %c.name, parent = %c.parent, snapshot = %c.snapshot, "not serving a clone: its parent volume is not served (serve it again and restart)");
        }
        Ok(())
    }

    /// Creates clone `name` of `parent`'s snapshot `snapshot` and serves
    /// it from now on. O(1): nothing is copied.
    pub async fn create_clone(
        &self,
        parent: &str,
        snapshot: &str,
        name: String,
        persistence: Persistence,
    ) -> Result<CloneInfo, OriginError> {
        check_name(&name)?;
        check_snapshot_name(snapshot)?;
        let _one_change = self.clone_ops.lock().await;
        if self.volume(&name).is_some() || lock(&self.clones).iter().any(|c| c.name == name) {
            return Err(OriginError::Duplicate(name));
        }
        let p = self
            .volume(parent)
            .ok_or_else(|| OriginError::NoSuchVolume(parent.to_owned()))?;
        if let Some(of) = p.clone_of.as_ref() {
            if of.persistence == Persistence::Cloud {
                return Err(CloneError::CloudPersistent(parent.to_owned()).into());
            }
        }
        // Held across the registry's commit: the snapshot cannot be
        // deleted between the check and the pin.
        let _no_snapshot_ops = p.chain.ops.lock().await;
        if p.chain.snapshot_layer(snapshot).is_none() {
            return Err(SnapshotError::NoSuch {
                volume: parent.to_owned(),
                snapshot: snapshot.to_owned(),
            }
            .into());
        }
        let dir = self.volume_dir(&name);
        if self.storage.open(&dir.join("epoch"), false).is_ok() {
            return Err(CloneError::StaleState { name, dir }.into());
        }
        // A delta a crash left before its registry entry: replaced.
        let stray = dir.join(DELTA);
        self.config
            .file_io
            .run(move || match CowDevice::remove_files(&stray) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            })
            .await
            .map_err(state_err(&dir))?;
        let info = CloneInfo {
            name: name.clone(),
            parent: parent.to_owned(),
            snapshot: snapshot.to_owned(),
            persistence,
            created_unix_ms: now_unix_ms(),
        };
        let device = self.clone_device(&p, &info, true).await?;
        let mut next = lock(&self.clones).clone();
        next.push(info.clone());
        self.store_clones(next).await?;
        if let Err(e) = self
            .add(name.clone(), device, Some(info.clone()), crate::random)
            .await
        {
            // Registered but not served: undone, so the name is free.
            let mut next = lock(&self.clones).clone();
            next.retain(|c| c.name != name);
            self.store_clones(next).await?;
            return Err(e);
        }
        tracing::info!(target: "ferry::audit", clone = %name, parent, snapshot, %persistence, "clone created");
        Ok(info)
    }

    /// Deletes clone `name`: stops serving it and removes its state and
    /// its writes. Refused while an edge holds it or it was migrated to
    /// one, and while it has clones of its own.
    pub async fn delete_clone(&self, name: &str) -> Result<CloneInfo, OriginError> {
        let _one_change = self.clone_ops.lock().await;
        let Some(info) = lock(&self.clones).iter().find(|c| c.name == name).cloned() else {
            return Err(match self.volume(name) {
                Some(_) => CloneError::NotAClone(name.to_owned()).into(),
                None => OriginError::NoSuchVolume(name.to_owned()),
            });
        };
        self.check_no_clones(name)?;
        if let Some(v) = self.volume(name) {
            if let Some(edge) = v.migrated_to() {
                return Err(OriginError::MigratedAway {
                    volume: name.to_owned(),
                    edge,
                });
            }
            self.unserve(name)?;
        }
        let mut next = lock(&self.clones).clone();
        next.retain(|c| c.name != name);
        self.store_clones(next).await?;
        let dir = self.volume_dir(name);
        let (storage, d) = (self.storage.clone(), dir.clone());
        self.config
            .file_io
            .run(move || storage.remove_dir_all(&d))
            .await
            .map_err(state_err(&dir))?;
        tracing::info!(target: "ferry::audit", clone = %name, parent = %info.parent, snapshot = %info.snapshot, "clone deleted");
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{apply, content, image, image_bytes, open, write};
    use blockcore::WriteEntry;
    use link::proto::ErrorCode;

    #[test]
    fn the_registry_round_trips_odd_names() {
        let clones = vec![
            CloneInfo {
                name: "web 2\nx%".into(),
                parent: "wéb".into(),
                snapshot: "golden".into(),
                persistence: Persistence::Origin,
                created_unix_ms: 1_767_225_600_000,
            },
            CloneInfo {
                name: "t".into(),
                parent: "web".into(),
                snapshot: "s.1".into(),
                persistence: Persistence::Cloud,
                created_unix_ms: 0,
            },
        ];
        let text = encode(&clones);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert_eq!(decode(&text).unwrap(), clones);
        assert_eq!(decode(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_registry_is_refused() {
        let good = encode(&[CloneInfo {
            name: "a".into(),
            parent: "b".into(),
            snapshot: "c".into(),
            persistence: Persistence::Cloud,
            created_unix_ms: 5,
        }]);
        for bad in [
            String::new(),
            good.replace("end\n", ""),
            good.replace("cloud", "edge"),
            good.replace(" 5\n", " five\n"),
            good.replace("clone a", "clone %G1"),
            good.replace("ferry clones v1", "ferry clones v2"),
            good.replace("end\n", "clone a b c cloud 5\nend\n"),
        ] {
            assert!(decode(&bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_clone_starts_as_its_snapshot_and_keeps_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let base = image();
        let mut model = image_bytes();
        let (at_golden, clone_model) = {
            let o = open(dir.path(), base.clone()).await;
            let (v, _) = o.attach(1, "vol", "edge-1").unwrap();
            o.snapshot("vol", Some("s0")).await.unwrap();
            apply(&o, 1, &v, 1, vec![write(5000, 70_000, 0x11)], &mut model).await;
            o.snapshot("vol", Some("golden")).await.unwrap();
            let at_golden = model.clone();
            apply(&o, 1, &v, 2, vec![write(60_000, 100_001, 0x22)], &mut model).await;

            let c = o
                .create_clone("vol", "golden", "c1".into(), Persistence::Origin)
                .await
                .unwrap();
            assert_eq!((c.parent.as_str(), c.snapshot.as_str()), ("vol", "golden"));
            let (cv, grant) = o.attach(2, "c1", "edge-1").unwrap();
            assert!(!grant.local_writes);
            assert!(content(cv.device().as_ref()).await == at_golden);
            let mut clone_model = at_golden.clone();
            let batch = vec![
                write(0, 4096, 0x33),
                WriteEntry::Zero {
                    offset: 70_000,
                    len: 10_000,
                },
            ];
            apply(&o, 2, &cv, 1, batch, &mut clone_model).await;
            assert!(content(cv.device().as_ref()).await == clone_model);
            assert!(
                content(v.device().as_ref()).await == model,
                "the parent is untouched"
            );

            // The base is pinned; the parent's other snapshots are not,
            // and merging them away changes nothing the clone reads (s0
            // is the image: its deletion merges layers under the clone).
            let pinned = o.delete_snapshot("vol", "golden").await.unwrap_err();
            assert!(
                matches!(pinned, OriginError::Clone(CloneError::Pinned { .. })),
                "{pinned}"
            );
            assert!(pinned.to_string().contains("c1"), "{pinned}");
            o.snapshot("vol", Some("later")).await.unwrap();
            o.delete_snapshot("vol", "later").await.unwrap();
            o.delete_snapshot("vol", "s0").await.unwrap();
            assert!(content(cv.device().as_ref()).await == clone_model);
            assert!(content(v.device().as_ref()).await == model);

            let has = o.remove_volume("vol").unwrap_err();
            assert!(
                matches!(has, OriginError::Clone(CloneError::HasClones { .. })),
                "{has}"
            );
            let is = o.remove_volume("c1").unwrap_err();
            assert!(
                matches!(is, OriginError::Clone(CloneError::IsAClone { .. })),
                "{is}"
            );
            // A clone's own snapshots lie over its delta.
            o.snapshot("c1", Some("mine")).await.unwrap();
            o.release(1, &v, None);
            o.release(2, &cv, None);
            (at_golden, clone_model)
        };

        // Restarted: the clone is served again, writes and all.
        let o = open(dir.path(), base.clone()).await;
        assert_eq!(o.clones().len(), 1);
        let cv = o.volume("c1").expect("the clone is served after a restart");
        assert_eq!(cv.clone_of().unwrap().snapshot, "golden");
        assert!(content(cv.device().as_ref()).await == clone_model);
        assert!(content(o.volume("vol").unwrap().device().as_ref()).await == model);

        // A second clone of the same snapshot sees the snapshot, not its
        // sibling's writes.
        o.create_clone("vol", "golden", "c2".into(), Persistence::Origin)
            .await
            .unwrap();
        let c2 = o.volume("c2").unwrap();
        assert!(content(c2.device().as_ref()).await == at_golden);

        let (held, _) = o.attach(3, "c1", "edge-9").unwrap();
        let busy = o.delete_clone("c1").await.unwrap_err();
        assert!(matches!(busy, OriginError::Held { .. }), "{busy}");
        o.release(3, &held, None);
        o.delete_clone("c1").await.unwrap();
        o.delete_clone("c2").await.unwrap();
        assert!(!dir.path().join("volumes/c1").exists(), "its state goes");
        assert!(o.volume("c1").is_none() && o.clones().is_empty());
        let not = o.delete_clone("vol").await.unwrap_err();
        assert!(
            matches!(not, OriginError::Clone(CloneError::NotAClone(_))),
            "{not}"
        );
        // Unpinned now.
        o.delete_snapshot("vol", "golden").await.unwrap();
        drop(o);
        let o = open(dir.path(), base).await;
        assert!(o.volume("c1").is_none() && o.clones().is_empty());
    }

    #[tokio::test]
    async fn a_cloud_clone_serves_its_snapshot_and_takes_no_writes() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), image()).await;
        let mut model = image_bytes();
        let (v, _) = o.attach(1, "vol", "e").unwrap();
        apply(&o, 1, &v, 1, vec![write(1, 9000, 7)], &mut model).await;
        o.snapshot("vol", Some("t")).await.unwrap();
        apply(&o, 1, &v, 2, vec![write(0, 100, 8)], &mut model).await;
        let at_t = {
            let mut m = model.clone();
            m[..100].copy_from_slice(&image_bytes()[..100]);
            m[1..9001].fill(7);
            m
        };
        o.create_clone("vol", "t", "test-1".into(), Persistence::Cloud)
            .await
            .unwrap();
        let (cv, grant) = o.attach(2, "test-1", "e").unwrap();
        assert!(grant.local_writes, "the edge is told to keep the writes");
        assert!(content(cv.device().as_ref()).await == at_t);
        let refused = o.apply(2, &cv, 1, vec![write(0, 10, 1)]).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unsupported);
        assert!(refused.message.contains("cloud persistence"), "{refused:?}");
        assert!(content(cv.device().as_ref()).await == at_t);
        for e in [
            o.snapshot("test-1", None).await.unwrap_err(),
            o.create_clone("test-1", "x", "n".into(), Persistence::Origin)
                .await
                .unwrap_err(),
        ] {
            assert!(
                matches!(e, OriginError::Clone(CloneError::CloudPersistent(_))),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn clone_creation_refuses_what_it_cannot_honour() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), image()).await;
        o.snapshot("vol", Some("s")).await.unwrap();
        let no_snap = o
            .create_clone("vol", "nope", "c".into(), Persistence::Origin)
            .await
            .unwrap_err();
        assert!(
            matches!(no_snap, OriginError::Snapshot(SnapshotError::NoSuch { .. })),
            "{no_snap}"
        );
        let no_vol = o
            .create_clone("none", "s", "c".into(), Persistence::Origin)
            .await
            .unwrap_err();
        assert!(matches!(no_vol, OriginError::NoSuchVolume(_)), "{no_vol}");
        let taken = o
            .create_clone("vol", "s", "vol".into(), Persistence::Origin)
            .await
            .unwrap_err();
        assert!(matches!(taken, OriginError::Duplicate(_)), "{taken}");
        let bad = o
            .create_clone("vol", "s", "a/b".into(), Persistence::Origin)
            .await
            .unwrap_err();
        assert!(matches!(bad, OriginError::BadName(_)), "{bad}");
        // An earlier volume's state under the name is not taken over.
        std::fs::create_dir_all(dir.path().join("volumes/old")).unwrap();
        std::fs::write(dir.path().join("volumes/old/epoch"), [1u8; 8]).unwrap();
        let stale = o
            .create_clone("vol", "s", "old".into(), Persistence::Origin)
            .await
            .unwrap_err();
        assert!(
            matches!(stale, OriginError::Clone(CloneError::StaleState { .. })),
            "{stale}"
        );
        assert!(o.clones().is_empty());
    }
}
