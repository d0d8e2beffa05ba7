//! The origin's management API: volumes added and removed at run time, a
//! volume force-released from an edge that is gone (fencing it, so it can
//! never write again), a volume's snapshots (taken, listed, rolled back
//! to, deleted), clones of a snapshot (created, listed, deleted), and the
//! origin's metrics. The document generated
//! from these routes is `ferry/api/origin.openapi.json`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use origin::{CloneError, Origin, OriginError, Persistence, SnapshotError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ExportsFile, SavedExport};
use crate::api::{find_route, schema_of, Api, ApiError, HttpRequest, Reply, Route};
use crate::config::Engine;
use crate::metrics::{f, Scrape};

/// `POST /v1/volumes`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddExport {
    pub name: String,
    /// A raw image's path, or an NBD URI (`nbd://HOST:PORT/NAME`,
    /// `nbd+unix:///NAME?socket=PATH`).
    pub source: String,
}

/// `POST /v1/volumes/{name}/release`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Must be true: the edge loses the volume and is fenced off it, and
    /// whatever it had not shipped is lost.
    pub force: bool,
    /// The edge to fence when none holds the volume now (its connection
    /// already ended); default: the one holding it, else the last one that
    /// held it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<String>,
}

/// `POST /v1/volumes/{name}/unfence`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Unfence {
    pub edge: String,
}

/// A volume as the origin sees it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct OriginVolumeInfo {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub size: u64,
    /// The volume's epoch (hex): edges key their caches by it.
    pub epoch: String,
    /// The edge holding it now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached_by: Option<String>,
    /// The last edge that attached it (since this origin started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attached_by: Option<String>,
    /// Edges refused from now on.
    pub fenced: Vec<String>,
    /// The edge the volume was migrated to (cut over): it serves the
    /// volume from its own copy, and every other edge is refused until it
    /// moves the volume back (or a forced release brings it home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_to: Option<String>,
    /// What it was cloned from, if it is a clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneBase>,
    /// The newest write batch applied.
    pub applied_seq: u64,
    pub bytes_read: u64,
    pub bytes_pushed: u64,
    pub signature_replies: u64,
    pub signature_bytes_saved: u64,
    /// Bytes signed for an edge's comparison (a move back's), not sent.
    #[serde(default)]
    pub bytes_signed: u64,
    pub batches_applied: u64,
    pub batch_bytes_applied: u64,
    pub attaches: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct OriginVolumeList {
    pub volumes: Vec<OriginVolumeInfo>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct OriginSummary {
    pub version: String,
    pub uptime_secs: f64,
    pub connections_active: u64,
    pub connections_accepted: u64,
    pub attach_refusals: u64,
    pub volumes: Vec<OriginVolumeInfo>,
}

/// `DELETE /v1/volumes/{name}`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ExportRemoved {
    pub name: String,
}

/// A release or unfence.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct Fencing {
    pub name: String,
    pub edge: String,
    /// Whether that edge is fenced off the volume now.
    pub fenced: bool,
}

/// `GET /v1/volumes/{name}/profiles`: the boot profiles edges recorded
/// for a volume, and the plan an attach gets from them.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ProfileListing {
    pub volume: String,
    /// Bytes per chunk, the unit of profiles and plans.
    pub chunk_size: u32,
    /// Oldest first (at most four are kept).
    pub profiles: Vec<ProfileEntry>,
    /// Stored files that do not decode (left out of the plan).
    pub damaged: u64,
    /// The profiles are this parent's (a clone without its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_parent: Option<String>,
    /// The plan's ranges in push order (first needed first), at the
    /// largest budget; an edge's budget takes a prefix.
    pub plan: Vec<PlanRange>,
    pub plan_bytes: u64,
    /// What the plan was made from: `profiles`, `boot files` (no profile
    /// yet: the files a boot reads, found in the volume's filesystems),
    /// or `nothing`.
    pub plan_from: String,
    /// The files the plan pushes, in the order it reaches them first.
    pub files: Vec<PlanFile>,
    /// Partitions or filesystems the origin could not map to files (no
    /// file-aware pushes there), and why.
    pub file_warnings: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct PlanFile {
    /// From its filesystem's root.
    pub path: String,
    pub size: u64,
    /// Bytes of it in the plan.
    pub planned_bytes: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ProfileEntry {
    pub number: u64,
    pub chunks: u64,
    /// Milliseconds from the attach to the last chunk read first.
    pub window_ms: u32,
    pub reads: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct PlanRange {
    pub offset: u64,
    pub len: u32,
}

/// `POST /v1/volumes/{name}/snapshots` (the body may be empty).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or
    /// digit; default `auto-YYYYMMDDTHHMMSSZ` (UTC, now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One snapshot of a volume.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct SnapshotEntry {
    pub name: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The newest write batch applied when it was taken: it holds every
    /// batch up to this one and none after.
    pub applied_seq: u64,
    pub size: u64,
    /// The layer holding what changed before it: `image` for the oldest
    /// (the volume's image itself), else `layer-ID`.
    pub layer: String,
    /// Bytes that layer holds.
    pub held_bytes: u64,
    /// Being deleted (no longer usable).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

impl From<origin::SnapshotInfo> for SnapshotEntry {
    fn from(s: origin::SnapshotInfo) -> Self {
        SnapshotEntry {
            name: s.name,
            created_unix_ms: s.created_unix_ms,
            applied_seq: s.applied_seq,
            size: s.size,
            layer: s.layer,
            held_bytes: s.held_bytes,
            deleting: s.deleting,
        }
    }
}

/// `GET /v1/volumes/{name}/snapshots`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct SnapshotListing {
    pub volume: String,
    /// Oldest first.
    pub snapshots: Vec<SnapshotEntry>,
    /// The writable layer on top: `image` when there is no snapshot.
    pub head: String,
    /// Bytes the head holds: what changed since the newest snapshot.
    pub head_bytes: u64,
}

/// `POST /v1/volumes/{name}/snapshots/{snapshot}/rollback`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct RolledBack {
    pub volume: String,
    pub snapshot: SnapshotEntry,
    /// The volume's new epoch (hex): edges' caches of the old one are void.
    pub epoch: String,
}

/// `DELETE /v1/volumes/{name}/snapshots/{snapshot}`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct SnapshotDeleted {
    pub volume: String,
    pub snapshot: String,
}

/// Where a clone's writes are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClonePersistence {
    /// At the origin, in the clone's own delta (its edge ships them).
    #[default]
    Origin,
    /// On the edge only ("test clones"): the origin never receives a
    /// write, and the edge must serve the clone isolated.
    Cloud,
}

impl From<ClonePersistence> for Persistence {
    fn from(p: ClonePersistence) -> Self {
        match p {
            ClonePersistence::Origin => Persistence::Origin,
            ClonePersistence::Cloud => Persistence::Cloud,
        }
    }
}

impl From<Persistence> for ClonePersistence {
    fn from(p: Persistence) -> Self {
        match p {
            Persistence::Origin => ClonePersistence::Origin,
            Persistence::Cloud => ClonePersistence::Cloud,
        }
    }
}

/// A clone's base: a snapshot of its parent volume.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct CloneBase {
    pub volume: String,
    pub snapshot: String,
    pub persistence: ClonePersistence,
}

/// `POST /v1/clones`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClone {
    /// The new volume's name.
    pub name: String,
    /// The volume to clone, and its snapshot to start from.
    pub volume: String,
    pub snapshot: String,
    /// Default `origin`.
    #[serde(default)]
    pub persistence: ClonePersistence,
}

/// One clone.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct CloneEntry {
    pub name: String,
    #[serde(flatten)]
    pub base: CloneBase,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Whether the origin serves it now (a clone whose parent is not
    /// served waits for it).
    pub served: bool,
}

impl From<origin::CloneInfo> for CloneEntry {
    fn from(c: origin::CloneInfo) -> Self {
        CloneEntry {
            name: c.name,
            base: CloneBase {
                volume: c.parent,
                snapshot: c.snapshot,
                persistence: c.persistence.into(),
            },
            created_unix_ms: c.created_unix_ms,
            served: false,
        }
    }
}

/// `GET /v1/clones`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct CloneListing {
    /// In the order they were created.
    pub clones: Vec<CloneEntry>,
}

pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/v1/status",
        summary: "The origin: version, uptime, connections and every volume",
        request: None,
        reply: (200, Some(schema_of::<OriginSummary>)),
        errors: &[],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/volumes",
        summary: "The volumes served, who holds them, who is fenced",
        request: None,
        reply: (200, Some(schema_of::<OriginVolumeList>)),
        errors: &[],
        query: &[],
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes",
        summary: "Serve another volume (saved in STATE_DIR/exports.toml)",
        request: Some(schema_of::<AddExport>),
        reply: (201, Some(schema_of::<OriginVolumeInfo>)),
        errors: &[409, 502],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/volumes/{name}",
        summary: "One volume",
        request: None,
        reply: (200, Some(schema_of::<OriginVolumeInfo>)),
        errors: &[404],
        query: &[],
        example: None,
    },
    Route {
        method: "DELETE",
        path: "/v1/volumes/{name}",
        summary: "Stop serving a volume (refused while an edge holds it)",
        request: None,
        reply: (200, Some(schema_of::<ExportRemoved>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/release",
        summary: "Force-release a volume from an edge that is gone, fencing that edge",
        request: Some(schema_of::<Release>),
        reply: (200, Some(schema_of::<Fencing>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/unfence",
        summary: "Let a fenced edge (rebuilt, its journal emptied) attach again",
        request: Some(schema_of::<Unfence>),
        reply: (200, Some(schema_of::<Fencing>)),
        errors: &[404],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/volumes/{name}/profiles",
        summary: "The boot profiles edges recorded for a volume, and the prefetch plan they make",
        request: None,
        reply: (200, Some(schema_of::<ProfileListing>)),
        errors: &[404],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/volumes/{name}/snapshots",
        summary: "A volume's snapshots, oldest first, with the bytes each layer holds",
        request: None,
        reply: (200, Some(schema_of::<SnapshotListing>)),
        errors: &[404],
        query: &[],
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/snapshots",
        summary: "Take a snapshot now: O(1), on a write-batch boundary",
        request: Some(schema_of::<CreateSnapshot>),
        reply: (201, Some(schema_of::<SnapshotEntry>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/snapshots/{snapshot}/rollback",
        summary: "Make the volume's content the snapshot's (refused while an edge holds it; \
                  the volume gets a new epoch)",
        request: None,
        reply: (200, Some(schema_of::<RolledBack>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "DELETE",
        path: "/v1/volumes/{name}/snapshots/{snapshot}",
        summary: "Delete a snapshot, merging its layer away (the others keep their bytes)",
        request: None,
        reply: (200, Some(schema_of::<SnapshotDeleted>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/clones",
        summary: "Every clone: its base snapshot, where its writes are kept",
        request: None,
        reply: (200, Some(schema_of::<CloneListing>)),
        errors: &[],
        query: &[],
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/clones",
        summary: "Create a volume from a snapshot of another, sharing its blocks (O(1))",
        request: Some(schema_of::<CreateClone>),
        reply: (201, Some(schema_of::<CloneEntry>)),
        errors: &[400, 404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "DELETE",
        path: "/v1/clones/{name}",
        summary: "Delete a clone and its writes (refused while an edge holds it)",
        request: None,
        reply: (200, Some(schema_of::<CloneEntry>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/metrics",
        summary: "Prometheus metrics (text format 0.0.4)",
        request: None,
        reply: (200, None),
        errors: &[],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/openapi.json",
        summary: "This document",
        request: None,
        reply: (200, Some(schema_of::<serde_json::Value>)),
        errors: &[],
        query: &[],
        example: None,
    },
];

/// Every request the origin's API takes, parsed and checked.
#[derive(Debug)]
pub enum Request {
    Status,
    ListVolumes,
    AddVolume(AddExport),
    GetVolume(String),
    RemoveVolume(String),
    Release(String, Release),
    Unfence(String, Unfence),
    ListSnapshots(String),
    ListProfiles(String),
    CreateSnapshot(String, CreateSnapshot),
    Rollback(String, String),
    DeleteSnapshot(String, String),
    ListClones,
    CreateClone(CreateClone),
    DeleteClone(String),
    Metrics,
    OpenApi,
}

pub fn parse(req: &HttpRequest) -> Result<Request, ApiError> {
    let (route, params) = find_route(ROUTES, &req.method, &req.path)?;
    let name = || params.first().cloned().unwrap_or_default();
    let snapshot = || params.get(1).cloned().unwrap_or_default();
    if route.request.is_none() && !req.body.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} {} takes no body",
            route.method, route.path
        )));
    }
    Ok(match (route.method, route.path) {
        ("GET", "/v1/status") => Request::Status,
        ("GET", "/v1/volumes") => Request::ListVolumes,
        ("POST", "/v1/volumes") => Request::AddVolume(req.json()?),
        ("GET", "/v1/volumes/{name}") => Request::GetVolume(name()),
        ("DELETE", "/v1/volumes/{name}") => Request::RemoveVolume(name()),
        ("POST", "/v1/volumes/{name}/release") => Request::Release(name(), req.json()?),
        ("POST", "/v1/volumes/{name}/unfence") => Request::Unfence(name(), req.json()?),
        ("GET", "/v1/volumes/{name}/snapshots") => Request::ListSnapshots(name()),
        ("GET", "/v1/volumes/{name}/profiles") => Request::ListProfiles(name()),
        ("POST", "/v1/volumes/{name}/snapshots") => Request::CreateSnapshot(
            name(),
            if req.body.is_empty() {
                CreateSnapshot::default()
            } else {
                req.json()?
            },
        ),
        ("POST", "/v1/volumes/{name}/snapshots/{snapshot}/rollback") => {
            Request::Rollback(name(), snapshot())
        }
        ("DELETE", "/v1/volumes/{name}/snapshots/{snapshot}") => {
            Request::DeleteSnapshot(name(), snapshot())
        }
        ("GET", "/metrics") => Request::Metrics,
        ("GET", "/v1/clones") => Request::ListClones,
        ("POST", "/v1/clones") => Request::CreateClone(req.json()?),
        ("DELETE", "/v1/clones/{name}") => Request::DeleteClone(name()),
        ("GET", "/v1/openapi.json") => Request::OpenApi,
        (m, p) => return Err(ApiError::internal(format!("route {m} {p} has no parser"))),
    })
}

/// The one mapping of the origin's errors to API errors.
fn origin_error(e: &OriginError) -> ApiError {
    let m = e.to_string();
    match e {
        OriginError::NoSuchVolume(_) => {
            ApiError::not_found(format!("{m}: `ferry origin volume list` shows the volumes"))
        }
        OriginError::Duplicate(_)
        | OriginError::Held { .. }
        | OriginError::MigratedAway { .. }
        | OriginError::NotHeld(_)
        | OriginError::Applying(_) => ApiError::conflict(m),
        OriginError::BadName(_) | OriginError::BadEdgeId(_) => ApiError::bad_request(m),
        OriginError::State { .. } | OriginError::Apply(_) => ApiError::internal(m),
        OriginError::Snapshot(s) => match s {
            SnapshotError::BadName(_) | SnapshotError::Reserved(_) => ApiError::bad_request(m),
            SnapshotError::NoSuch { volume, .. } => ApiError::not_found(format!(
                "{m}: `ferry snapshot list {volume}` shows its snapshots"
            )),
            SnapshotError::Duplicate { .. }
            | SnapshotError::HalfApplied { .. }
            | SnapshotError::Busy(_) => ApiError::conflict(m),
            SnapshotError::Device { .. } | SnapshotError::Corrupt { .. } => ApiError::internal(m),
        },
        OriginError::Clone(c) => match c {
            CloneError::NotAClone(_) => {
                ApiError::not_found(format!("{m}: `ferry clone list` shows the clones"))
            }
            CloneError::IsAClone { volume, .. } => {
                ApiError::conflict(format!("{m}: `ferry clone delete {volume}`"))
            }
            CloneError::HasClones { .. }
            | CloneError::Pinned { .. }
            | CloneError::CloudPersistent(_)
            | CloneError::StaleState { .. } => ApiError::conflict(m),
            CloneError::Corrupt { .. } => ApiError::internal(m),
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The origin's [`Api`].
pub struct OriginApi {
    origin: Arc<Origin>,
    state_dir: PathBuf,
    engine: Engine,
    /// Where each volume comes from (flags and the exports file).
    sources: Mutex<Vec<(String, PathBuf)>>,
    /// What the API added (and the file keeps).
    saved: Mutex<ExportsFile>,
    /// Serializes adds and removes with the file.
    changes: tokio::sync::Mutex<()>,
    started: Instant,
}

impl std::fmt::Debug for OriginApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginApi").finish_non_exhaustive()
    }
}

impl OriginApi {
    pub fn new(
        origin: Arc<Origin>,
        state_dir: PathBuf,
        engine: Engine,
        sources: Vec<(String, PathBuf)>,
    ) -> Self {
        let saved = ExportsFile::load(&state_dir).unwrap_or_default();
        OriginApi {
            origin,
            state_dir,
            engine,
            sources: Mutex::new(sources),
            saved: Mutex::new(saved),
            changes: tokio::sync::Mutex::new(()),
            started: Instant::now(),
        }
    }

    fn info(&self, v: &origin::Volume) -> OriginVolumeInfo {
        let c = v.counters();
        OriginVolumeInfo {
            name: v.name().to_owned(),
            source: lock(&self.sources)
                .iter()
                .find(|(n, _)| n == v.name())
                .map(|(_, p)| p.display().to_string()),
            size: v.size(),
            epoch: format!("{:016x}", v.epoch()),
            attached_by: v.holder(),
            last_attached_by: v.last_holder(),
            fenced: v.fenced(),
            migrated_to: v.migrated_to(),
            clone_of: v.clone_of().map(|c| CloneBase {
                volume: c.parent.clone(),
                snapshot: c.snapshot.clone(),
                persistence: c.persistence.into(),
            }),
            applied_seq: v.applied(),
            bytes_read: c.bytes_read,
            bytes_pushed: c.bytes_pushed,
            signature_replies: c.signature_replies,
            signature_bytes_saved: c.signature_bytes_saved,
            bytes_signed: c.bytes_signed,
            batches_applied: c.batches_applied,
            batch_bytes_applied: c.batch_bytes_applied,
            attaches: c.attaches,
        }
    }

    fn clone_entry(&self, c: origin::CloneInfo) -> CloneEntry {
        let served = self.origin.volume(&c.name).is_some();
        CloneEntry { served, ..c.into() }
    }

    fn volume(&self, name: &str) -> Result<Arc<origin::Volume>, ApiError> {
        self.origin
            .volume(name)
            .ok_or_else(|| origin_error(&OriginError::NoSuchVolume(name.to_owned())))
    }

    fn infos(&self) -> Vec<OriginVolumeInfo> {
        self.origin.volumes().iter().map(|v| self.info(v)).collect()
    }

    async fn add(&self, a: AddExport) -> Result<OriginVolumeInfo, ApiError> {
        let _changing = self.changes.lock().await;
        if self.origin.volume(&a.name).is_some() {
            return Err(origin_error(&OriginError::Duplicate(a.name)));
        }
        let source = PathBuf::from(&a.source);
        let device = super::open_volume(&source, self.engine)
            .await
            .map_err(|e| ApiError::bad_gateway(format!("opening {}: {e:#}", a.source)))?;
        let v = self
            .origin
            .add_volume(a.name.clone(), device)
            .await
            .map_err(|e| origin_error(&e))?;
        lock(&self.sources).push((a.name.clone(), source.clone()));
        let file = {
            let mut saved = lock(&self.saved);
            saved.exports.retain(|e| e.name != a.name);
            saved.exports.push(SavedExport {
                name: a.name.clone(),
                source,
            });
            saved.clone()
        };
        file.save(&self.state_dir)
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
        Ok(self.info(&v))
    }

    async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let _changing = self.changes.lock().await;
        self.origin
            .remove_volume(name)
            .map_err(|e| origin_error(&e))?;
        lock(&self.sources).retain(|(n, _)| n != name);
        let file = {
            let mut saved = lock(&self.saved);
            saved.exports.retain(|e| e.name != name);
            saved.clone()
        };
        file.save(&self.state_dir)
            .map_err(|e| ApiError::internal(format!("{e:#}")))
    }

    fn release(&self, name: &str, r: &Release) -> Result<Fencing, ApiError> {
        if !r.force {
            return Err(ApiError::bad_request(
                "a release takes the volume from its edge, which loses what it has not shipped: \
                 send {\"force\": true} to mean it",
            ));
        }
        let v = self.volume(name)?;
        // A volume held, or migrated to an edge (which a forced release
        // fences, bringing the volume home).
        let held = v.holder().or_else(|| v.migrated_to());
        let edge = match (&r.edge, held) {
            (None, Some(_)) => self
                .origin
                .force_release(name)
                .map_err(|e| origin_error(&e))?,
            (Some(e), _) => {
                self.origin.fence(name, e).map_err(|e| origin_error(&e))?;
                e.clone()
            }
            (None, None) => {
                let Some(last) = v.last_holder() else {
                    return Err(ApiError::conflict(format!(
                        "volume {name} is not attached and no edge attached it since this \
                         origin started: name the edge to fence (\"edge\": ID)"
                    )));
                };
                self.origin
                    .fence(name, &last)
                    .map_err(|e| origin_error(&e))?;
                last
            }
        };
        Ok(Fencing {
            name: name.to_owned(),
            edge,
            fenced: true,
        })
    }

    pub async fn execute(&self, req: Request) -> Result<Reply, ApiError> {
        match req {
            Request::Status => {
                let c = self.origin.counters().snapshot();
                Reply::ok(&OriginSummary {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    uptime_secs: self.started.elapsed().as_secs_f64(),
                    connections_active: c.connections_active,
                    connections_accepted: c.connections_accepted,
                    attach_refusals: c.attach_refusals,
                    volumes: self.infos(),
                })
            }
            Request::ListVolumes => Reply::ok(&OriginVolumeList {
                volumes: self.infos(),
            }),
            Request::AddVolume(a) => Reply::with_status(201, &self.add(a).await?),
            Request::GetVolume(name) => {
                let v = self.volume(&name)?;
                Reply::ok(&self.info(&v))
            }
            Request::RemoveVolume(name) => {
                self.remove(&name).await?;
                Reply::ok(&ExportRemoved { name })
            }
            Request::Release(name, r) => Reply::ok(&self.release(&name, &r)?),
            Request::Unfence(name, u) => {
                self.volume(&name)?;
                self.origin
                    .unfence(&name, &u.edge)
                    .map_err(|e| origin_error(&e))?;
                Reply::ok(&Fencing {
                    name,
                    edge: u.edge,
                    fenced: false,
                })
            }
            Request::ListSnapshots(name) => {
                let l = self
                    .origin
                    .snapshots(&name)
                    .await
                    .map_err(|e| origin_error(&e))?;
                Reply::ok(&SnapshotListing {
                    volume: name,
                    snapshots: l.snapshots.into_iter().map(SnapshotEntry::from).collect(),
                    head: l.head,
                    head_bytes: l.head_bytes,
                })
            }
            Request::ListProfiles(name) => {
                let r = self
                    .origin
                    .profiles(&name)
                    .await
                    .map_err(|e| origin_error(&e))?;
                Reply::ok(&ProfileListing {
                    volume: name,
                    chunk_size: r.chunk_size,
                    profiles: r
                        .profiles
                        .into_iter()
                        .map(|p| ProfileEntry {
                            number: p.number,
                            chunks: p.chunks,
                            window_ms: p.window_ms,
                            reads: p.reads,
                        })
                        .collect(),
                    damaged: r.damaged,
                    from_parent: r.from_parent,
                    plan: r
                        .plan
                        .into_iter()
                        .map(|(offset, len)| PlanRange { offset, len })
                        .collect(),
                    plan_bytes: r.plan_bytes,
                    plan_from: r.plan_from.as_str().to_owned(),
                    files: r
                        .files
                        .into_iter()
                        .map(|(path, size, planned_bytes)| PlanFile {
                            path,
                            size,
                            planned_bytes,
                        })
                        .collect(),
                    file_warnings: r.file_warnings,
                })
            }
            Request::CreateSnapshot(name, c) => {
                let s = self
                    .origin
                    .snapshot(&name, c.name.as_deref())
                    .await
                    .map_err(|e| origin_error(&e))?;
                Reply::with_status(201, &SnapshotEntry::from(s))
            }
            Request::Rollback(name, snapshot) => {
                let s = self
                    .origin
                    .rollback(&name, &snapshot)
                    .await
                    .map_err(|e| origin_error(&e))?;
                let v = self.volume(&name)?;
                Reply::ok(&RolledBack {
                    volume: name,
                    snapshot: s.into(),
                    epoch: format!("{:016x}", v.epoch()),
                })
            }
            Request::DeleteSnapshot(name, snapshot) => {
                self.origin
                    .delete_snapshot(&name, &snapshot)
                    .await
                    .map_err(|e| origin_error(&e))?;
                Reply::ok(&SnapshotDeleted {
                    volume: name,
                    snapshot,
                })
            }
            Request::ListClones => Reply::ok(&CloneListing {
                clones: self
                    .origin
                    .clones()
                    .into_iter()
                    .map(|c| self.clone_entry(c))
                    .collect(),
            }),
            Request::CreateClone(c) => {
                let made = self
                    .origin
                    .create_clone(&c.volume, &c.snapshot, c.name, c.persistence.into())
                    .await
                    .map_err(|e| origin_error(&e))?;
                Reply::with_status(201, &self.clone_entry(made))
            }
            Request::DeleteClone(name) => {
                let gone = self
                    .origin
                    .delete_clone(&name)
                    .await
                    .map_err(|e| origin_error(&e))?;
                Reply::ok(&CloneEntry::from(gone))
            }
            Request::Metrics => Ok(Reply::Metrics(self.metrics())),
            Request::OpenApi => Ok(Reply::Json {
                status: 200,
                body: crate::api::openapi::document(self.title(), ROUTES),
            }),
        }
    }

    fn metrics(&self) -> String {
        let mut m = Scrape::new();
        let c = self.origin.counters().snapshot();
        m.gauge(
            "ferry_origin_uptime_seconds",
            "Seconds since the origin started.",
            &[],
            self.started.elapsed().as_secs_f64(),
        );
        m.gauge(
            "ferry_origin_connections_active",
            "Edge connections being served.",
            &[],
            f(c.connections_active),
        );
        m.counter(
            "ferry_origin_connections_accepted_total",
            "Edge connections accepted.",
            &[],
            c.connections_accepted,
        );
        m.counter(
            "ferry_origin_attach_refusals_total",
            "Attaches refused (no such volume, held by another edge, fenced).",
            &[],
            c.attach_refusals,
        );
        for v in self.origin.volumes() {
            let i = self.info(&v);
            let l = [("volume", i.name.as_str())];
            m.gauge(
                "ferry_origin_volume_size_bytes",
                "The volume's size.",
                &l,
                f(i.size),
            );
            m.gauge(
                "ferry_origin_volume_attached",
                "1 while an edge holds the volume.",
                &l,
                f(u64::from(i.attached_by.is_some())),
            );
            m.gauge(
                "ferry_origin_volume_fenced_edges",
                "Edges fenced off the volume.",
                &l,
                f(i.fenced.len() as u64),
            );
            m.gauge(
                "ferry_origin_volume_applied_seq",
                "The newest write batch applied.",
                &l,
                f(i.applied_seq),
            );
            for (class, bytes) in [("demand", i.bytes_read), ("push", i.bytes_pushed)] {
                m.counter(
                    "ferry_origin_read_bytes_total",
                    "Bytes read from the volume for edges, by class.",
                    &[("volume", i.name.as_str()), ("class", class)],
                    bytes,
                );
            }
            m.counter(
                "ferry_origin_signature_replies_total",
                "Reads answered with signatures instead of data.",
                &l,
                i.signature_replies,
            );
            m.counter(
                "ferry_origin_signature_bytes_saved_total",
                "Data bytes signature replies kept off the link.",
                &l,
                i.signature_bytes_saved,
            );
            m.counter(
                "ferry_origin_signed_bytes_total",
                "Bytes of the volume signed for an edge's comparison (a move back's).",
                &l,
                i.bytes_signed,
            );
            m.counter(
                "ferry_origin_batches_applied_total",
                "Write batches applied.",
                &l,
                i.batches_applied,
            );
            m.counter(
                "ferry_origin_applied_bytes_total",
                "Data bytes of the write batches applied.",
                &l,
                i.batch_bytes_applied,
            );
            m.counter(
                "ferry_origin_attaches_total",
                "Attaches granted.",
                &l,
                i.attaches,
            );
        }
        m.render(None)
    }
}

#[async_trait::async_trait]
impl Api for OriginApi {
    fn title(&self) -> &'static str {
        "ferry origin management API"
    }

    fn routes(&self) -> &'static [Route] {
        ROUTES
    }

    async fn handle(&self, req: HttpRequest) -> Result<Reply, ApiError> {
        let parsed = parse(&req)?;
        self.execute(parsed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, body: &str) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            path: path.into(),
            query: std::collections::BTreeMap::new(),
            body: bytes::Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn snapshot_requests_parse_into_their_types() {
        let p = |m: &str, path: &str, body: &str| parse(&request(m, path, body));
        assert!(matches!(
            p("POST", "/v1/volumes/vol/snapshots", ""),
            Ok(Request::CreateSnapshot(v, CreateSnapshot { name: None })) if v == "vol"
        ));
        assert!(matches!(
            p("POST", "/v1/volumes/vol/snapshots", r#"{"name": "n1"}"#),
            Ok(Request::CreateSnapshot(_, CreateSnapshot { name: Some(n) })) if n == "n1"
        ));
        assert!(matches!(
            p("POST", "/v1/volumes/vol/snapshots", r#"{"nom": "n1"}"#),
            Err(e) if e.status == 400
        ));
        assert!(matches!(
            p("GET", "/v1/volumes/vol/snapshots", ""),
            Ok(Request::ListSnapshots(v)) if v == "vol"
        ));
        assert!(matches!(
            p("POST", "/v1/volumes/vol/snapshots/n1/rollback", ""),
            Ok(Request::Rollback(v, s)) if v == "vol" && s == "n1"
        ));
        assert!(matches!(
            p("POST", "/v1/volumes/vol/snapshots/n1/rollback", "{}"),
            Err(e) if e.status == 400
        ));
        assert!(matches!(
            p("DELETE", "/v1/volumes/vol/snapshots/n1", ""),
            Ok(Request::DeleteSnapshot(v, s)) if v == "vol" && s == "n1"
        ));
        assert!(matches!(
            p("PUT", "/v1/volumes/vol/snapshots/n1", ""),
            Err(e) if e.status == 405
        ));
    }

    #[test]
    fn snapshot_errors_map_to_their_statuses() {
        let status = |e: SnapshotError| origin_error(&OriginError::Snapshot(e)).status;
        assert_eq!(status(SnapshotError::BadName("a/b".into())), 400);
        let missing = origin_error(&OriginError::Snapshot(SnapshotError::NoSuch {
            volume: "vol".into(),
            snapshot: "x".into(),
        }));
        assert_eq!(missing.status, 404);
        assert!(
            missing.message.contains("ferry snapshot list vol"),
            "{missing}"
        );
        assert_eq!(
            status(SnapshotError::Duplicate {
                volume: "vol".into(),
                snapshot: "x".into()
            }),
            409
        );
        assert_eq!(
            status(SnapshotError::HalfApplied {
                volume: "vol".into(),
                seq: 3
            }),
            409
        );
        let held = origin_error(&OriginError::Held {
            volume: "vol".into(),
            edge: "edge-7".into(),
        });
        assert_eq!(held.status, 409);
        assert!(held.message.contains("edge-7"));
    }

    #[test]
    fn clone_requests_parse_and_default_to_origin_persistence() {
        let p = |m: &str, path: &str, body: &str| parse(&request(m, path, body));
        assert!(matches!(
            p("GET", "/v1/clones", ""),
            Ok(Request::ListClones)
        ));
        assert!(matches!(
            p(
                "POST",
                "/v1/clones",
                r#"{"name": "c", "volume": "v", "snapshot": "s"}"#
            ),
            Ok(Request::CreateClone(CreateClone {
                persistence: ClonePersistence::Origin,
                ..
            }))
        ));
        assert!(matches!(
            p(
                "POST",
                "/v1/clones",
                r#"{"name": "c", "volume": "v", "snapshot": "s", "persistence": "cloud"}"#
            ),
            Ok(Request::CreateClone(CreateClone {
                persistence: ClonePersistence::Cloud,
                ..
            }))
        ));
        for bad in [
            r#"{"name": "c", "volume": "v"}"#,
            r#"{"name": "c", "volume": "v", "snapshot": "s", "persistence": "edge"}"#,
        ] {
            assert!(
                matches!(p("POST", "/v1/clones", bad), Err(e) if e.status == 400),
                "{bad}"
            );
        }
        assert!(matches!(
            p("DELETE", "/v1/clones/c", ""),
            Ok(Request::DeleteClone(c)) if c == "c"
        ));
        let pinned = origin_error(&OriginError::Clone(CloneError::Pinned {
            volume: "v".into(),
            snapshot: "s".into(),
            clones: vec!["c1".into(), "c2".into()],
        }));
        assert_eq!(pinned.status, 409);
        assert!(pinned.message.contains("c1, c2"), "{pinned}");
        let is = origin_error(&OriginError::Clone(CloneError::IsAClone {
            volume: "c1".into(),
            parent: "v".into(),
            snapshot: "s".into(),
        }));
        assert!(is.message.contains("ferry clone delete c1"), "{is}");
    }

    #[test]
    fn the_committed_document_matches_the_code() {
        let doc = crate::api::openapi::render("ferry origin management API", ROUTES);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/origin.openapi.json");
        if std::env::var_os("FERRY_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &doc).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == doc,
            "{path} is out of date: run `FERRY_WRITE_OPENAPI=1 cargo nextest run -p ferry the_committed_document` and commit it"
        );
    }
}
