//! The origin's management API: volumes added and removed at run time, a
//! volume force-released from an edge that is gone (fencing it, so it can
//! never write again), and the origin's metrics. The document generated
//! from these routes is `ferry/api/origin.openapi.json`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use origin::{Origin, OriginError};
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
    /// The newest write batch applied.
    pub applied_seq: u64,
    pub bytes_read: u64,
    pub bytes_pushed: u64,
    pub signature_replies: u64,
    pub signature_bytes_saved: u64,
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
    Metrics,
    OpenApi,
}

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
        ("DELETE", "/v1/volumes/{name}") => Request::RemoveVolume(name()),
        ("POST", "/v1/volumes/{name}/release") => Request::Release(name(), req.json()?),
        ("POST", "/v1/volumes/{name}/unfence") => Request::Unfence(name(), req.json()?),
        ("GET", "/metrics") => Request::Metrics,
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
        | OriginError::NotHeld(_)
        | OriginError::Applying(_) => ApiError::conflict(m),
        OriginError::BadName(_) | OriginError::BadEdgeId(_) => ApiError::bad_request(m),
        OriginError::State { .. } | OriginError::Apply(_) => ApiError::internal(m),
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
            applied_seq: v.applied(),
            bytes_read: c.bytes_read,
            bytes_pushed: c.bytes_pushed,
            signature_replies: c.signature_replies,
            signature_bytes_saved: c.signature_bytes_saved,
            batches_applied: c.batches_applied,
            batch_bytes_applied: c.batch_bytes_applied,
            attaches: c.attaches,
        }
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
        let edge = match (&r.edge, v.holder()) {
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
            "{path} is out of date: run `FERRY_WRITE_OPENAPI=1 cargo nextest run -p ferry openapi` and commit it"
        );
    }
}
