//! The edge's management API: its routes, request and reply types, and
//! their execution on the [`EdgeDaemon`]. The document generated from
//! these is `ferry/api/edge.openapi.json`.

use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::config::{VolumeChange, VolumeSpec};
use super::{EdgeDaemon, Served, Slot, DEFAULT_FLUSH_TIMEOUT};
use crate::api::{find_route, schema_of, Api, ApiError, HttpRequest, Reply, Route};
use crate::config::ByteSize;
use crate::metrics::{f, Scrape};

/// Every request the edge's API takes, parsed and checked.
#[derive(Debug)]
pub enum Request {
    Status,
    ListVolumes,
    AddVolume(VolumeSpec),
    GetVolume(String),
    ChangeVolume(String, VolumeChange),
    RemoveVolume {
        name: String,
        timeout: Duration,
    },
    FlushVolume {
        name: String,
        timeout: Duration,
    },
    FlushAll {
        timeout: Duration,
    },
    StopProfile(String),
    CacheStatus,
    ResizeCache(CacheResize),
    StartMigration(String, MigrationStart),
    GetMigration(String),
    ChangeMigration(String, MigrationChange),
    CutOver {
        name: String,
        force: bool,
        timeout: Duration,
    },
    MoveBack {
        name: String,
        timeout: Duration,
    },
    Metrics,
    OpenApi,
}

/// `PUT /v1/cache/size`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheResize {
    /// The new capacity.
    pub size: ByteSize,
}

/// `POST /v1/volumes/{name}/migration`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationStart {
    /// The local persistent storage: an absolute path where a sparse raw
    /// image is created (it must not exist, or be empty), or a block
    /// device at least as large as the volume.
    pub target: String,
    /// Limits the copy's use of the link, in Mbit/s (absent or 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
}

/// `PATCH /v1/volumes/{name}/migration`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Mbit/s; 0 removes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
}

/// A volume's lifecycle stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LifecycleStage {
    Streaming,
    Migrating,
    Mirrored,
    CuttingOver,
    CutOver,
    MovingBack,
    OnPremises,
}

impl From<edge::migrate::Stage> for LifecycleStage {
    fn from(s: edge::migrate::Stage) -> Self {
        use edge::migrate::Stage as S;
        match s {
            S::Streaming => LifecycleStage::Streaming,
            S::Migrating => LifecycleStage::Migrating,
            S::Mirrored => LifecycleStage::Mirrored,
            S::CuttingOver => LifecycleStage::CuttingOver,
            S::CutOver => LifecycleStage::CutOver,
            S::MovingBack => LifecycleStage::MovingBack,
            S::OnPremises => LifecycleStage::OnPremises,
        }
    }
}

/// A volume's migration: where its local copy is and how far it got.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct MigrationInfo {
    pub volume: String,
    pub stage: LifecycleStage,
    pub target: String,
    pub paused: bool,
    /// The copy's rate limit in Mbit/s (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_mbit: Option<f64>,
    pub bytes_total: u64,
    /// Bytes the local copy holds (holes at the origin count as held).
    pub bytes_local: u64,
    pub bytes_remaining: u64,
    pub percent: f64,
    /// How the bytes held got there: from the link, the cache, the
    /// origin's holes (nothing sent), the edge's own writes.
    pub bytes_from_link: u64,
    pub bytes_from_cache: u64,
    pub bytes_zero: u64,
    pub bytes_from_journal: u64,
    /// Copies redone because a guest write landed meanwhile.
    pub copies_redone: u64,
    /// Bytes written on the edge since cut-over (what a move back
    /// compares, and ships where they differ).
    pub bytes_dirty: u64,
    /// A move back: write bytes shipped, bytes of the image verified by
    /// signature, bytes found different and shipped again, and bytes of
    /// signatures received.
    pub moveback_bytes_shipped: u64,
    pub moveback_bytes_verified: u64,
    pub moveback_bytes_repaired: u64,
    pub moveback_signature_bytes: u64,
    /// Local bytes per second over the last seconds.
    pub rate_bytes_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<f64>,
}

impl MigrationInfo {
    pub fn of(volume: &str, s: &edge::migrate::LocalStatus) -> MigrationInfo {
        let remaining = s.bytes_total - s.bytes_local;
        MigrationInfo {
            volume: volume.to_owned(),
            stage: s.stage.into(),
            target: s.target.clone(),
            paused: s.paused,
            rate_limit_mbit: (s.rate_limit_bytes_per_sec > 0)
                .then(|| f(s.rate_limit_bytes_per_sec) * 8.0 / 1e6),
            bytes_total: s.bytes_total,
            bytes_local: s.bytes_local,
            bytes_remaining: remaining,
            percent: if s.bytes_total == 0 {
                100.0
            } else {
                100.0 * f(s.bytes_local) / f(s.bytes_total)
            },
            bytes_from_link: s.bytes_link,
            bytes_from_cache: s.bytes_cache,
            bytes_zero: s.bytes_zero,
            bytes_from_journal: s.bytes_journal,
            copies_redone: s.respoiled,
            bytes_dirty: s.bytes_dirty,
            moveback_bytes_shipped: s.moveback_shipped,
            moveback_bytes_verified: s.moveback_verified,
            moveback_bytes_repaired: s.moveback_repaired,
            moveback_signature_bytes: s.moveback_signature_bytes,
            rate_bytes_per_sec: s.rate_bytes_per_sec,
            eta_secs: s.eta.map(|d| d.as_secs_f64()),
        }
    }
}

/// Mbit/s to bytes/s (0 or absent: no limit).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked finite and >= 0; saturates
fn rate_bytes(mbit: Option<f64>) -> Result<u64, ApiError> {
    match mbit {
        None | Some(0.0) => Ok(0),
        // A tiny positive rate is one byte/s, not "no limit".
        Some(m) if m.is_finite() && m > 0.0 => Ok(((m * 1e6 / 8.0) as u64).max(1)),
        Some(m) => Err(ApiError::bad_request(format!(
            "rate_mbit {m} is not a non-negative number"
        ))),
    }
}

/// Where a volume is in its life.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Declared, not attached yet (the origin is unreachable or refused;
    /// see `error`); retried in the background.
    Attaching,
    /// Served, link up.
    Up,
    /// Served from the cache and journal while the link is down.
    LinkDown,
    /// Its exports are gone; its journal is being drained to the origin.
    Removing,
    /// Served from its local copy alone; the origin no longer serves it.
    CutOver,
    /// Not served (its guest moves on premises); the origin is getting
    /// what it lacks.
    MovingBack,
    /// Moved back: the origin serves it, this edge does not.
    OnPremises,
}

/// A volume's state and counters.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct VolumeInfo {
    pub name: String,
    pub state: VolumeState,
    /// Why it is not up, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub spec: VolumeSpec,
    /// The volume's size in bytes (0 until attached).
    pub size: u64,
    pub nbd_export: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iscsi_target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<VolumeCacheInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<JournalInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_only: Option<OverlayInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PrefetchInfo>,
    /// The lifecycle stage (streaming until a migration starts).
    pub stage: LifecycleStage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationInfo>,
}

/// A volume's link to its origin.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct LinkInfo {
    pub up: bool,
    pub connects: u64,
    /// Times the link was declared dead for lack of progress.
    pub deaths: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub rtt_ms: f64,
    pub queue_delay_ms: f64,
    pub window_bytes: u64,
    pub delivery_rate_bytes_per_sec: u64,
    /// Payload bytes by class: demand reads, pushes, write batches.
    pub demand_bytes: u64,
    pub push_bytes: u64,
    pub write_bytes: u64,
    /// Bytes on the wire (after compression), each way.
    pub wire_bytes_in: u64,
    pub wire_bytes_out: u64,
    pub signature_hits: u64,
    pub signature_misses: u64,
}

/// A volume's reads through the shared cache.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct VolumeCacheInfo {
    pub bytes_from_cache: u64,
    pub bytes_from_origin: u64,
    /// Of the bytes this volume read: the share the cache served.
    pub hit_ratio: f64,
    pub pushes_kept: u64,
    pub pushes_dropped: u64,
}

/// A volume's boot profile (recorded from its attach) and prefetch plan
/// (pushed at its attach, from the profiles the origin keeps).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct PrefetchInfo {
    /// `off`, `recording`, `sending`, `stored`, `empty` (nothing read in
    /// the window) or `failed: why`.
    pub profile: String,
    /// Chunks the profile holds (so far, while recording).
    pub profile_chunks: u64,
    /// `off`, `streaming`, `done`, `done, little used` (under a tenth of
    /// what it pushed was read in the boot window) or `failed: why`.
    pub plan: String,
    /// Bytes the plan (and other prefetches) pushed.
    pub pushed_bytes: u64,
    /// Of those the cache took: bytes read since, and bytes not read.
    pub used_bytes: u64,
    pub unread_bytes: u64,
}

/// A volume's write journal.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct JournalInfo {
    pub rpo_secs: f64,
    pub unshipped_bytes: u64,
    pub unshipped_records: u64,
    pub batches_in_flight: u64,
    /// Age of the oldest write the origin has not applied: the real
    /// recovery point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_unshipped_age_secs: Option<f64>,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub appends_waiting: u64,
    pub batches_shipped: u64,
    pub bytes_shipped: u64,
}

/// A volume's local-only ranges.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct OverlayInfo {
    pub local_only_bytes: u64,
    pub allocated_bytes: u64,
}

/// `GET /v1/volumes`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct VolumeList {
    pub volumes: Vec<VolumeInfo>,
}

/// The shared cache.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct CacheInfo {
    pub dir: String,
    /// False until the first volume attaches (the origin hands out its keys).
    pub open: bool,
    /// The configured capacity (what a resize sets).
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub chunk_size: u64,
    pub hits: u64,
    pub memory_hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
    pub evictions: u64,
    pub dedup_hits: u64,
    pub dedup_bytes: u64,
    pub integrity_errors: u64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct EdgeSummary {
    pub version: String,
    pub uptime_secs: f64,
    /// Whether API changes are saved to a configuration file.
    pub persisted: bool,
    pub volumes: Vec<VolumeInfo>,
    pub cache: CacheInfo,
}

/// `DELETE /v1/volumes/{name}`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct Removed {
    pub name: String,
    /// Every journaled write was applied at the origin before removal.
    pub flushed: bool,
}

/// `POST /v1/volumes/{name}/profile/stop`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ProfileStopped {
    pub volume: String,
    /// Chunks the boot profile holds.
    pub chunks: u64,
    /// The origin stored it (the reply waits up to 30 s for that; a
    /// profile not stored by then is still on its way, see `prefetch`
    /// in the volume's status).
    pub stored: bool,
}

/// `POST /v1/volumes/{name}/flush`, `POST /v1/flush`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct Flushed {
    /// The volumes whose every journaled write the origin has applied.
    pub volumes: Vec<String>,
    pub seconds: f64,
}

const MOVEBACK_QUERY: &[(&str, &str)] = &[(
    "timeout_secs",
    "How long to wait for the origin to have every write and verify the image (default \
     120); the move back goes on in the background after",
)];

const TIMEOUT_QUERY: &[(&str, &str)] = &[(
    "timeout_secs",
    "How long to wait for the origin to apply the journal (default 120)",
)];

const CUTOVER_QUERY: &[(&str, &str)] = &[
    (
        "timeout_secs",
        "How long to wait for the copy (when forced) and the journal to drain (default 120); \
         the cut-over goes on in the background after",
    ),
    (
        "force",
        "true: finish the copy now at full rate (ignoring a pause and the rate limit), then \
         cut over",
    ),
];

/// The edge's routes; the order is the document's.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/v1/status",
        summary: "The edge: version, uptime, every volume and the cache",
        request: None,
        reply: (200, Some(schema_of::<EdgeSummary>)),
        errors: &[],
        query: &[],
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/volumes",
        summary: "List the volumes with their state and counters",
        request: None,
        reply: (200, Some(schema_of::<VolumeList>)),
        errors: &[],
        query: &[],
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes",
        summary: "Add a volume: attach it at its origin and serve it over NBD (and iSCSI)",
        request: Some(schema_of::<VolumeSpec>),
        reply: (201, Some(schema_of::<VolumeInfo>)),
        errors: &[409, 502, 504],
        query: &[],
        example: Some(r#"{"name": "walk", "origin": "{origin}", "rpo_secs": 5}"#),
    },
    Route {
        method: "GET",
        path: "/v1/volumes/{name}",
        summary: "One volume's state and counters",
        request: None,
        reply: (200, Some(schema_of::<VolumeInfo>)),
        errors: &[404],
        query: &[],
        example: None,
    },
    Route {
        method: "PATCH",
        path: "/v1/volumes/{name}",
        summary: "Change a running volume (its RPO)",
        request: Some(schema_of::<VolumeChange>),
        reply: (200, Some(schema_of::<VolumeInfo>)),
        errors: &[404, 409],
        query: &[],
        example: Some(r#"{"rpo_secs": 2}"#),
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/flush",
        summary: "Ship every journaled write of a volume and wait until the origin applied it",
        request: None,
        reply: (200, Some(schema_of::<Flushed>)),
        errors: &[404, 409, 504],
        query: TIMEOUT_QUERY,
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/profile/stop",
        summary: "End a volume's boot profile window now (the boot is over) and send the profile to the origin",
        request: None,
        reply: (200, Some(schema_of::<ProfileStopped>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "DELETE",
        path: "/v1/volumes/{name}",
        summary: "Remove a volume: stop its exports, drain its journal to the origin, detach",
        request: None,
        reply: (200, Some(schema_of::<Removed>)),
        errors: &[404, 504],
        query: TIMEOUT_QUERY,
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/migration",
        summary: "Start migrating a volume: copy it in the background into local storage",
        request: Some(schema_of::<MigrationStart>),
        reply: (201, Some(schema_of::<MigrationInfo>)),
        errors: &[400, 404, 409],
        query: &[],
        example: Some(r#"{"target": "{dir}/walk.raw", "rate_mbit": 50}"#),
    },
    Route {
        method: "GET",
        path: "/v1/volumes/{name}/migration",
        summary: "A volume's migration: stage, bytes local and remaining, rate, ETA",
        request: None,
        reply: (200, Some(schema_of::<MigrationInfo>)),
        errors: &[404, 409],
        query: &[],
        example: None,
    },
    Route {
        method: "PATCH",
        path: "/v1/volumes/{name}/migration",
        summary: "Pause, resume or rate-limit a volume's migration",
        request: Some(schema_of::<MigrationChange>),
        reply: (200, Some(schema_of::<MigrationInfo>)),
        errors: &[404, 409],
        query: &[],
        example: Some(r#"{"paused": false, "rate_mbit": 0}"#),
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/cutover",
        summary: "Cut a migrated volume over: drain its journal, release it at the origin, \
                  serve it from its local copy alone",
        request: None,
        reply: (200, Some(schema_of::<MigrationInfo>)),
        errors: &[404, 409, 502, 504],
        query: CUTOVER_QUERY,
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/volumes/{name}/moveback",
        summary: "Move a volume back on premises: stop serving it, ship what the origin lacks, \
                  verify the origin's image by signature, and hand the volume back",
        request: None,
        reply: (200, Some(schema_of::<super::MovedBack>)),
        errors: &[404, 409, 502, 504],
        query: MOVEBACK_QUERY,
        example: None,
    },
    Route {
        method: "POST",
        path: "/v1/flush",
        summary: "Flush every volume to its origin",
        request: None,
        reply: (200, Some(schema_of::<Flushed>)),
        errors: &[504],
        query: TIMEOUT_QUERY,
        example: None,
    },
    Route {
        method: "GET",
        path: "/v1/cache",
        summary: "The shared cache's size, occupancy and counters",
        request: None,
        reply: (200, Some(schema_of::<CacheInfo>)),
        errors: &[],
        query: &[],
        example: None,
    },
    Route {
        method: "PUT",
        path: "/v1/cache/size",
        summary: "Resize the cache while in use (shrinking evicts)",
        request: Some(schema_of::<CacheResize>),
        reply: (200, Some(schema_of::<CacheInfo>)),
        errors: &[409],
        query: &[],
        example: Some(r#"{"size": "96M"}"#),
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

fn timeout(req: &HttpRequest) -> Result<Duration, ApiError> {
    Ok(req
        .query_f64("timeout_secs")?
        .map_or(DEFAULT_FLUSH_TIMEOUT, Duration::from_secs_f64))
}

/// Parses an HTTP request into a [`Request`]; nothing runs before this
/// succeeds.
pub fn parse(req: &HttpRequest) -> Result<Request, ApiError> {
    let (route, params) = find_route(ROUTES, &req.method, &req.path)?;
    let name = || params.first().cloned().unwrap_or_default();
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
        ("PATCH", "/v1/volumes/{name}") => Request::ChangeVolume(name(), req.json()?),
        ("POST", "/v1/volumes/{name}/flush") => Request::FlushVolume {
            name: name(),
            timeout: timeout(req)?,
        },
        ("DELETE", "/v1/volumes/{name}") => Request::RemoveVolume {
            name: name(),
            timeout: timeout(req)?,
        },
        ("POST", "/v1/volumes/{name}/profile/stop") => Request::StopProfile(name()),
        ("POST", "/v1/flush") => Request::FlushAll {
            timeout: timeout(req)?,
        },
        ("POST", "/v1/volumes/{name}/migration") => Request::StartMigration(name(), req.json()?),
        ("GET", "/v1/volumes/{name}/migration") => Request::GetMigration(name()),
        ("PATCH", "/v1/volumes/{name}/migration") => Request::ChangeMigration(name(), req.json()?),
        ("POST", "/v1/volumes/{name}/cutover") => Request::CutOver {
            name: name(),
            force: req.query_bool("force")?,
            timeout: timeout(req)?,
        },
        ("POST", "/v1/volumes/{name}/moveback") => Request::MoveBack {
            name: name(),
            timeout: timeout(req)?,
        },
        ("GET", "/v1/cache") => Request::CacheStatus,
        ("PUT", "/v1/cache/size") => Request::ResizeCache(req.json()?),
        ("GET", "/metrics") => Request::Metrics,
        ("GET", "/v1/openapi.json") => Request::OpenApi,
        (m, p) => return Err(ApiError::internal(format!("route {m} {p} has no parser"))),
    })
}

/// The edge's [`Api`].
#[derive(Debug)]
pub struct EdgeApi {
    daemon: Arc<EdgeDaemon>,
}

impl EdgeApi {
    pub fn new(daemon: Arc<EdgeDaemon>) -> Self {
        EdgeApi { daemon }
    }

    /// Runs a parsed request.
    pub async fn execute(&self, req: Request) -> Result<Reply, ApiError> {
        let d = &self.daemon;
        match req {
            Request::Status => Reply::ok(&self.summary()),
            Request::ListVolumes => Reply::ok(&VolumeList {
                volumes: self.volume_infos(),
            }),
            Request::AddVolume(spec) => {
                let name = spec.name.clone();
                d.add(spec).await?;
                Reply::with_status(201, &self.info(&name)?)
            }
            Request::GetVolume(name) => Reply::ok(&self.info(&name)?),
            Request::ChangeVolume(name, change) => {
                d.change(&name, change).await?;
                Reply::ok(&self.info(&name)?)
            }
            Request::RemoveVolume { name, timeout } => {
                d.remove(&name, timeout).await?;
                Reply::ok(&Removed {
                    name,
                    flushed: true,
                })
            }
            Request::StopProfile(name) => {
                let (chunks, stored) = d.stop_profile(&name).await?;
                Reply::ok(&ProfileStopped {
                    volume: name,
                    chunks,
                    stored,
                })
            }
            Request::FlushVolume { name, timeout } => {
                let t = std::time::Instant::now();
                d.flush(&name, timeout).await?;
                Reply::ok(&Flushed {
                    volumes: vec![name],
                    seconds: t.elapsed().as_secs_f64(),
                })
            }
            Request::FlushAll { timeout } => {
                let t = std::time::Instant::now();
                let served: Vec<(String, Arc<Served>)> = d
                    .volumes()
                    .into_iter()
                    .filter_map(|(n, s)| match s {
                        Slot::Up(s) | Slot::Removing { served: s, .. } => Some((n, s)),
                        Slot::Attaching { .. } => None,
                    })
                    .collect();
                let results =
                    futures::future::join_all(served.iter().map(|(_, s)| s.flush(timeout))).await;
                let mut done = Vec::new();
                for ((name, _), r) in served.into_iter().zip(results) {
                    r.map_err(|e| ApiError {
                        message: format!("volume {name}: {}", e.message),
                        ..e
                    })?;
                    done.push(name);
                }
                Reply::ok(&Flushed {
                    volumes: done,
                    seconds: t.elapsed().as_secs_f64(),
                })
            }
            Request::StartMigration(name, start) => {
                let rate = rate_bytes(start.rate_mbit)?;
                let copy = d
                    .migrate_start(&name, std::path::PathBuf::from(start.target), rate)
                    .await?;
                Reply::with_status(201, &MigrationInfo::of(&name, &copy.status()))
            }
            Request::GetMigration(name) => Reply::ok(&self.migration(&name)?),
            Request::ChangeMigration(name, change) => {
                let rate = change.rate_mbit.map(|m| rate_bytes(Some(m))).transpose()?;
                let copy = d.migrate_change(&name, change.paused, rate).await?;
                Reply::ok(&MigrationInfo::of(&name, &copy.status()))
            }
            Request::CutOver {
                name,
                force,
                timeout,
            } => {
                let copy = d.cutover(&name, force, timeout).await?;
                Reply::ok(&MigrationInfo::of(&name, &copy.status()))
            }
            Request::MoveBack { name, timeout } => Reply::ok(&d.moveback(&name, timeout).await?),
            Request::CacheStatus => Reply::ok(&self.cache_info()),
            Request::ResizeCache(r) => {
                d.resize_cache(r.size.0).await?;
                Reply::ok(&self.cache_info())
            }
            Request::Metrics => Ok(Reply::Metrics(self.metrics())),
            Request::OpenApi => Ok(Reply::Json {
                status: 200,
                body: crate::api::openapi::document(self.title(), ROUTES),
            }),
        }
    }

    fn migration(&self, name: &str) -> Result<MigrationInfo, ApiError> {
        let local = match self.daemon.volume(name)? {
            Slot::Up(s) | Slot::Removing { served: s, .. } => s.local(),
            Slot::Attaching { .. } => None,
        };
        local
            .map(|l| MigrationInfo::of(name, &l.status()))
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "volume {name} is not migrating: start with `ferry migrate start`"
                ))
            })
    }

    fn info(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let slot = self.daemon.volume(name)?;
        Ok(self.volume_info(name, &slot))
    }

    fn volume_infos(&self) -> Vec<VolumeInfo> {
        self.daemon
            .volumes()
            .iter()
            .map(|(n, s)| self.volume_info(n, s))
            .collect()
    }

    fn volume_info(&self, name: &str, slot: &Slot) -> VolumeInfo {
        let daemon = &self.daemon;
        let mut info = VolumeInfo {
            name: name.to_owned(),
            state: VolumeState::Attaching,
            error: None,
            spec: daemon
                .spec(name)
                .unwrap_or_else(|| VolumeSpec::new(name, "unknown:0")),
            size: 0,
            nbd_export: name.to_owned(),
            iscsi_target: daemon.has_iscsi().then(|| super::target_name(name)),
            link: None,
            cache: None,
            journal: None,
            local_only: None,
            prefetch: None,
            stage: LifecycleStage::Streaming,
            migration: None,
        };
        let served = match slot {
            Slot::Attaching { last_error, .. } => {
                info.error.clone_from(last_error);
                return info;
            }
            Slot::Up(s) => s,
            Slot::Removing { served, last_error } => {
                info.state = VolumeState::Removing;
                info.error.clone_from(last_error);
                served
            }
        };
        info.spec = super::lock(&served.spec).clone();
        info.size = served.size;
        if let Some(local) = served.local() {
            let m = MigrationInfo::of(name, &local.status());
            info.stage = m.stage;
            info.migration = Some(m);
        }
        let by_stage = match info.stage {
            LifecycleStage::CutOver => Some(VolumeState::CutOver),
            LifecycleStage::MovingBack => Some(VolumeState::MovingBack),
            LifecycleStage::OnPremises => Some(VolumeState::OnPremises),
            _ => None,
        };
        let Some(s) = served.status() else {
            // Cut over or moved back before this start: no link, cache or
            // journal.
            if info.state != VolumeState::Removing {
                info.state = by_stage.unwrap_or(VolumeState::CutOver);
            }
            return info;
        };
        let l = &s.link.link;
        if let Some(state) = by_stage.filter(|_| info.state != VolumeState::Removing) {
            info.state = state;
        } else if info.state != VolumeState::Removing {
            info.state = if l.connected {
                VolumeState::Up
            } else {
                VolumeState::LinkDown
            };
            if !l.connected {
                info.error.clone_from(&l.last_error);
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        info.link = Some(LinkInfo {
            up: l.connected,
            connects: l.connects,
            deaths: l.deaths,
            last_error: l.last_error.clone(),
            rtt_ms: ms(l.transport.cc.srtt),
            queue_delay_ms: ms(l.transport.cc.queue_delay),
            window_bytes: l.transport.cc.cwnd,
            delivery_rate_bytes_per_sec: l.transport.cc.delivery_rate,
            demand_bytes: l.bytes_read,
            push_bytes: l.bytes_pushed,
            write_bytes: l.batch_bytes_sent,
            wire_bytes_in: l.transport.bytes_in,
            wire_bytes_out: l.transport.bytes_out,
            signature_hits: s.link.signature_hits,
            signature_misses: s.link.signature_misses,
        });
        let layer = &s.cache_layer;
        let read = layer.bytes_from_cache + layer.bytes_from_inner;
        info.cache = Some(VolumeCacheInfo {
            bytes_from_cache: layer.bytes_from_cache,
            bytes_from_origin: layer.bytes_from_inner,
            hit_ratio: if read == 0 {
                0.0
            } else {
                f(layer.bytes_from_cache) / f(read)
            },
            pushes_kept: s.pushes_kept,
            pushes_dropped: s.pushes_dropped,
        });
        let p = &s.prefetch;
        info.prefetch = Some(PrefetchInfo {
            profile: p.profile.clone(),
            profile_chunks: p.profile_chunks,
            plan: p.plan.clone(),
            pushed_bytes: p.pushed_bytes,
            used_bytes: p.used_bytes,
            unread_bytes: p.unread_bytes,
        });
        let j = &s.journal;
        info.journal = Some(JournalInfo {
            rpo_secs: s.rpo.as_secs_f64(),
            unshipped_bytes: j.unshipped_bytes,
            unshipped_records: j.unshipped_records,
            batches_in_flight: j.batches_in_flight,
            oldest_unshipped_age_secs: j.oldest_unshipped_age.map(|d| d.as_secs_f64()),
            used_bytes: j.used_bytes,
            capacity_bytes: j.capacity,
            appends_waiting: j.appends_waiting,
            batches_shipped: s.batches_shipped,
            bytes_shipped: s.bytes_shipped,
        });
        info.local_only = served.overlay.as_ref().map(|o| OverlayInfo {
            local_only_bytes: o.ranges().iter().map(|r| r.end - r.start).sum(),
            allocated_bytes: o.allocated_bytes().unwrap_or(0),
        });
        info
    }

    fn cache_info(&self) -> CacheInfo {
        let d = &self.daemon;
        let file = d.file();
        let mut info = CacheInfo {
            dir: file.cache_dir.display().to_string(),
            open: false,
            capacity_bytes: file.cache_size.0,
            used_bytes: 0,
            chunk_size: 0,
            hits: 0,
            memory_hits: 0,
            misses: 0,
            hit_ratio: 0.0,
            evictions: 0,
            dedup_hits: 0,
            dedup_bytes: 0,
            integrity_errors: 0,
        };
        if let Some(cache) = d.cache() {
            let s = cache.stats();
            let chunk = u64::from(cache.chunk_size());
            info.open = true;
            info.capacity_bytes = s.slots * chunk;
            info.used_bytes = s.used_slots * chunk;
            info.chunk_size = chunk;
            info.hits = s.hits;
            info.memory_hits = s.memory_hits;
            info.misses = s.misses;
            info.hit_ratio = s.hit_rate();
            info.evictions = s.evictions;
            info.dedup_hits = s.dedup_hits;
            info.dedup_bytes = s.dedup_bytes;
            info.integrity_errors = s.integrity_errors;
        }
        info
    }

    fn summary(&self) -> EdgeSummary {
        EdgeSummary {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.daemon.started.elapsed().as_secs_f64(),
            persisted: self.daemon.persisted(),
            volumes: self.volume_infos(),
            cache: self.cache_info(),
        }
    }

    /// Every metric, read now.
    fn metrics(&self) -> String {
        let mut m = Scrape::new();
        let daemon = &self.daemon;
        m.gauge(
            "ferry_edge_uptime_seconds",
            "Seconds since the edge started.",
            &[],
            daemon.started.elapsed().as_secs_f64(),
        );
        let mut by_state = std::collections::BTreeMap::new();
        for (name, slot) in daemon.volumes() {
            let info = self.volume_info(&name, &slot);
            *by_state.entry(info.state).or_insert(0u64) += 1;
            let vl = [("volume", name.as_str())];
            let up = matches!(info.state, VolumeState::Up);
            m.gauge(
                "ferry_edge_volume_up",
                "1 when the volume is served with its link up.",
                &vl,
                f(u64::from(up)),
            );
            if let Some(mig) = &info.migration {
                m.gauge(
                    "ferry_edge_migration_local_bytes",
                    "Bytes of the volume its local copy holds.",
                    &vl,
                    f(mig.bytes_local),
                );
                m.gauge(
                    "ferry_edge_migration_remaining_bytes",
                    "Bytes of the volume its local copy still lacks.",
                    &vl,
                    f(mig.bytes_remaining),
                );
                m.gauge(
                    "ferry_edge_migration_dirty_bytes",
                    "Bytes written on the edge since cut-over.",
                    &vl,
                    f(mig.bytes_dirty),
                );
                for (source, bytes) in [
                    ("link", mig.bytes_from_link),
                    ("cache", mig.bytes_from_cache),
                    ("zero", mig.bytes_zero),
                    ("journal", mig.bytes_from_journal),
                ] {
                    m.counter(
                        "ferry_edge_migration_copied_bytes_total",
                        "Bytes the migration copied, by where they came from.",
                        &[("volume", name.as_str()), ("source", source)],
                        bytes,
                    );
                }
            }
            let (Some(l), Some(c), Some(j)) = (&info.link, &info.cache, &info.journal) else {
                continue;
            };
            m.gauge(
                "ferry_edge_volume_size_bytes",
                "The volume's size.",
                &vl,
                f(info.size),
            );
            m.gauge(
                "ferry_edge_link_up",
                "1 while the volume's link is up.",
                &vl,
                f(u64::from(l.up)),
            );
            m.counter(
                "ferry_edge_link_connects_total",
                "Times the volume's link was established (the first included).",
                &vl,
                l.connects,
            );
            m.counter(
                "ferry_edge_link_deaths_total",
                "Times the link was declared dead for lack of progress.",
                &vl,
                l.deaths,
            );
            m.gauge(
                "ferry_edge_link_rtt_seconds",
                "Smoothed round-trip time to the origin.",
                &vl,
                l.rtt_ms / 1000.0,
            );
            m.gauge(
                "ferry_edge_link_queue_delay_seconds",
                "Queueing delay the congestion controller measures on the path.",
                &vl,
                l.queue_delay_ms / 1000.0,
            );
            m.gauge(
                "ferry_edge_link_window_bytes",
                "Background bytes the congestion controller allows in flight.",
                &vl,
                f(l.window_bytes),
            );
            for (class, bytes) in [
                ("demand", l.demand_bytes),
                ("push", l.push_bytes),
                ("writes", l.write_bytes),
            ] {
                m.counter(
                    "ferry_edge_link_payload_bytes_total",
                    "Payload bytes over the link by class, before compression.",
                    &[("volume", name.as_str()), ("class", class)],
                    bytes,
                );
            }
            for (dir, bytes) in [("in", l.wire_bytes_in), ("out", l.wire_bytes_out)] {
                m.counter(
                    "ferry_edge_link_wire_bytes_total",
                    "Bytes on the wire (after compression and framing), by direction.",
                    &[("volume", name.as_str()), ("direction", dir)],
                    bytes,
                );
            }
            m.counter(
                "ferry_edge_signature_hits_total",
                "Reads the origin answered with signatures of chunks the cache held.",
                &vl,
                l.signature_hits,
            );
            m.counter(
                "ferry_edge_signature_misses_total",
                "Signature answers naming chunks the cache no longer held (fetched).",
                &vl,
                l.signature_misses,
            );
            for (source, bytes) in [
                ("cache", c.bytes_from_cache),
                ("origin", c.bytes_from_origin),
            ] {
                m.counter(
                    "ferry_edge_volume_read_bytes_total",
                    "Bytes the volume's reads got from the cache or fetched from the origin.",
                    &[("volume", name.as_str()), ("source", source)],
                    bytes,
                );
            }
            m.counter(
                "ferry_edge_pushes_kept_total",
                "Pushed chunks stored in the cache.",
                &vl,
                c.pushes_kept,
            );
            m.counter(
                "ferry_edge_pushes_dropped_total",
                "Pushed chunks dropped (stale or no room).",
                &vl,
                c.pushes_dropped,
            );
            m.gauge(
                "ferry_edge_journal_unshipped_bytes",
                "Journaled write bytes the origin has not applied.",
                &vl,
                f(j.unshipped_bytes),
            );
            m.gauge(
                "ferry_edge_journal_unshipped_records",
                "Journaled writes the origin has not applied.",
                &vl,
                f(j.unshipped_records),
            );
            m.gauge(
                "ferry_edge_journal_oldest_unshipped_age_seconds",
                "Age of the oldest write the origin has not applied (0: none).",
                &vl,
                j.oldest_unshipped_age_secs.unwrap_or(0.0),
            );
            m.gauge(
                "ferry_edge_journal_used_bytes",
                "Bytes of live journal segments.",
                &vl,
                f(j.used_bytes),
            );
            m.gauge(
                "ferry_edge_journal_capacity_bytes",
                "The journal's capacity.",
                &vl,
                f(j.capacity_bytes),
            );
            m.gauge(
                "ferry_edge_rpo_seconds",
                "The recovery point objective in force.",
                &vl,
                j.rpo_secs,
            );
            m.counter(
                "ferry_edge_batches_shipped_total",
                "Write batches the origin applied.",
                &vl,
                j.batches_shipped,
            );
            m.counter(
                "ferry_edge_shipped_bytes_total",
                "Write bytes the origin applied.",
                &vl,
                j.bytes_shipped,
            );
        }
        for (state, n) in by_state {
            let state = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            m.gauge(
                "ferry_edge_volumes",
                "Volumes on this edge by state.",
                &[("state", state.as_str())],
                f(n),
            );
        }
        let c = self.cache_info();
        m.gauge(
            "ferry_edge_cache_capacity_bytes",
            "The shared cache's capacity.",
            &[],
            f(c.capacity_bytes),
        );
        m.gauge(
            "ferry_edge_cache_used_bytes",
            "Bytes of the shared cache holding chunks.",
            &[],
            f(c.used_bytes),
        );
        for (tier, n) in [
            ("memory", c.memory_hits),
            ("disk", c.hits.saturating_sub(c.memory_hits)),
        ] {
            m.counter(
                "ferry_edge_cache_hits_total",
                "Chunk lookups the cache answered, by tier.",
                &[("tier", tier)],
                n,
            );
        }
        m.counter(
            "ferry_edge_cache_misses_total",
            "Chunk lookups the cache could not answer.",
            &[],
            c.misses,
        );
        m.counter(
            "ferry_edge_cache_evictions_total",
            "Chunks evicted from the cache.",
            &[],
            c.evictions,
        );
        m.counter(
            "ferry_edge_cache_dedup_hits_total",
            "Fills answered by content the cache already held.",
            &[],
            c.dedup_hits,
        );
        m.counter(
            "ferry_edge_cache_integrity_errors_total",
            "Cache records that failed authentication.",
            &[],
            c.integrity_errors,
        );
        m.render(Some(&daemon.metrics))
    }
}

#[async_trait::async_trait]
impl Api for EdgeApi {
    fn title(&self) -> &'static str {
        "ferry edge management API"
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
    use std::collections::BTreeMap;

    fn req(method: &str, path: &str, body: &str) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            path: path.into(),
            query: BTreeMap::new(),
            body: bytes::Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn every_route_parses_and_bad_requests_say_why() {
        assert!(matches!(
            parse(&req("GET", "/v1/volumes", "")).unwrap(),
            Request::ListVolumes
        ));
        let Request::AddVolume(spec) = parse(&req(
            "POST",
            "/v1/volumes",
            r#"{"name":"a","origin":"h:1","journal_size":"64M"}"#,
        ))
        .unwrap() else {
            panic!("not an add");
        };
        assert_eq!(spec.journal_size, ByteSize(64 << 20));
        assert!(matches!(
            parse(&req("DELETE", "/v1/volumes/a", "")).unwrap(),
            Request::RemoveVolume { name, .. } if name == "a"
        ));
        let e = parse(&req("POST", "/v1/volumes", "{nope")).unwrap_err();
        assert_eq!((e.status, e.error.as_str()), (400, "bad_request"));
        assert!(e.message.contains("malformed JSON"), "{e}");
        let e = parse(&req(
            "POST",
            "/v1/volumes",
            r#"{"name":"a","origin":"h:1","bogus":1}"#,
        ))
        .unwrap_err();
        assert!(e.message.contains("bogus"), "{e}");
        assert_eq!(parse(&req("GET", "/v2/x", "")).unwrap_err().status, 404);
        assert_eq!(
            parse(&req("PUT", "/v1/volumes", "")).unwrap_err().status,
            405
        );
        assert_eq!(
            parse(&req("GET", "/v1/volumes", "{}")).unwrap_err().status,
            400
        );
        let mut q = req("POST", "/v1/flush", "");
        q.query.insert("timeout_secs".into(), "soon".into());
        assert!(parse(&q).unwrap_err().message.contains("timeout_secs"));
    }

    #[test]
    fn the_committed_document_matches_the_code() {
        let doc = crate::api::openapi::render("ferry edge management API", ROUTES);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/edge.openapi.json");
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
