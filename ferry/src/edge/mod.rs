//! `ferry edge`: a long-running daemon serving many volumes, from one or
//! several origins, through one cache, one NBD listener (volumes are export
//! names) and one iSCSI portal (a target per volume). Volumes come from the
//! configuration file (the desired state, [`config::EdgeFile`]) or the
//! command line, and are added, changed and removed at run time through the
//! management API ([`api`]), without disturbing the others.
//!
//! Per volume the stack is `Metered (per protocol) -> [LocalOverlay] ->
//! EdgeDevice`: its own link to its origin, journal, RPO and local-only
//! ranges; the cache is shared, so clones of one template and repeated
//! content are stored once.
//!
//! ```text
//!   API: POST /v1/volumes ──> attach (link) ─> cache (opened by the first
//!        volume, with its keys) ─> journal ─> EdgeDevice ─> NBD export +
//!        iSCSI target ─> the file rewritten
//!        DELETE /v1/volumes/NAME ──> exports stop (in-flight requests
//!        finish) ─> journal drained to the origin ─> Detach ─> file rewritten
//! ```

pub mod api;
pub mod config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blockcore::{BlockDevice, LocalOverlay};
use cache::{Cache, CacheConfig};
use edge::migrate::{LocalCopy, NewCopy, Stage};
use edge::{EdgeConfig, EdgeDevice, EdgeLinkConfig, EdgeStatus, LinkClient, MigrateError};
use journal::{Journal, JournalOptions};
use nbd_server::{Export, Server, ServerConfig};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use self::config::{EdgeFile, VolumeChange, VolumeSpec};
use crate::api::ApiError;
use crate::config::{read_key_file, IscsiSettings, ListenAddr, DEFAULT_NBD_ADDR};
use crate::metrics::RequestMetrics;

/// The edge device with a local-only overlay in front.
pub type EdgeOverlay = LocalOverlay<Arc<EdgeDevice>>;

/// The overlay image of a volume; its metadata sits next to it
/// (`overlay-VOLUME.meta`).
pub fn overlay_path(cache_dir: &Path, volume: &str) -> PathBuf {
    cache_dir.join(format!("overlay-{volume}.img"))
}

/// How long removing a volume waits for its clients to finish their
/// requests.
const CLIENT_DRAIN: Duration = Duration::from_secs(30);
/// How long a first attach may take before the API call fails.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// The default wait for a flush or removal to reach the origin.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a volume's migration record sits (`cache_dir/migrations/NAME`).
pub fn migration_record_path(cache_dir: &Path, volume: &str) -> PathBuf {
    cache_dir.join("migrations").join(volume).join("record")
}

/// A volume being served.
pub struct Served {
    pub spec: Mutex<VolumeSpec>,
    /// The edge device over the origin; `None` for a volume that was
    /// already cut over when the daemon started (served from its local
    /// copy alone, the origin never contacted).
    pub device: Option<Arc<EdgeDevice>>,
    /// The local copy, once a migration started.
    pub local: Mutex<Option<Arc<LocalCopy>>>,
    pub overlay: Option<Arc<EdgeOverlay>>,
    pub size: u64,
    pub attached_at: Instant,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Served {
    /// Ships every journaled write to the origin (waiting up to `timeout`)
    /// and makes the local-only overlay durable.
    async fn flush(&self, timeout: Duration) -> Result<(), ApiError> {
        if let Some(o) = &self.overlay {
            o.flush()
                .await
                .map_err(|e| ApiError::internal(format!("flushing the local-only overlay: {e}")))?;
        }
        let device = match (&self.device, self.local()) {
            (Some(d), Some(l)) if l.stage().journals_writes() => d,
            (Some(d), None) => d,
            (_, Some(l)) => {
                // From cut-over on, the copy holds the writes.
                return l
                    .flush()
                    .await
                    .map_err(|e| ApiError::internal(format!("flushing the local copy: {e}")));
            }
            (None, None) => return Ok(()),
        };
        match tokio::time::timeout(timeout, device.drain()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::internal(format!("the journal failed: {e}"))),
            Err(_) => {
                let s = device.status();
                Err(ApiError::timeout(format!(
                    "{} bytes in {} writes are still unshipped after {:.0} s (link {}: {}); \
                     they stay in the journal: retry when the origin is reachable",
                    s.journal.unshipped_bytes,
                    s.journal.unshipped_records,
                    timeout.as_secs_f64(),
                    if s.link.link.connected { "up" } else { "down" },
                    s.link.link.last_error.as_deref().unwrap_or("no error"),
                )))
            }
        }
    }

    /// The edge device's status (`None` for a volume served from its
    /// local copy alone since start).
    pub fn status(&self) -> Option<EdgeStatus> {
        self.device.as_ref().map(|d| d.status())
    }

    pub fn local(&self) -> Option<Arc<LocalCopy>> {
        lock(&self.local).clone()
    }

    /// What the exports serve.
    fn top(&self) -> Arc<dyn BlockDevice> {
        match (&self.overlay, &self.device, self.local()) {
            (Some(o), _, _) => o.clone(),
            (None, Some(d), _) => d.clone(),
            (None, None, Some(l)) => l,
            (None, None, None) => unreachable!("a served volume has a device or a local copy"),
        }
    }
}

fn migrate_error(e: MigrateError) -> ApiError {
    match e {
        MigrateError::Refused(r) => ApiError::conflict(r.to_string()),
        MigrateError::Local(m) => ApiError::internal(format!("the local copy: {m}")),
        MigrateError::Link(m) => ApiError::bad_gateway(format!("the origin: {m}")),
        MigrateError::Timeout(m) => ApiError::timeout(m),
    }
}

/// Where a volume is in its life.
#[derive(Debug, Clone)]
pub enum Slot {
    /// Declared in the file; attaching in the background (the origin may be
    /// down), retrying.
    Attaching {
        since: Instant,
        attempts: u32,
        last_error: Option<String>,
        cancel: CancellationToken,
    },
    Up(Arc<Served>),
    /// Its exports are gone; its journal is being drained to the origin.
    Removing {
        served: Arc<Served>,
        last_error: Option<String>,
    },
}

/// The daemon's shared state.
pub struct EdgeDaemon {
    /// The desired state, and where to save it (`None`: from the command
    /// line, not saved).
    file: Mutex<EdgeFile>,
    file_path: Option<PathBuf>,
    /// Serializes changes (add, remove, resize), so the file and the
    /// served set move together.
    changes: tokio::sync::Mutex<()>,
    volumes: Mutex<BTreeMap<String, Slot>>,
    /// Opened by the first volume attached (the origin hands out the keys).
    cache: Mutex<Option<OpenCache>>,
    link: LinkBase,
    nbd: Server,
    iscsi: Option<(iscsi_target::server::Server, IscsiSettings)>,
    pub metrics: RequestMetrics,
    pub started: Instant,
}

impl std::fmt::Debug for EdgeDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeDaemon").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct OpenCache {
    cache: Arc<Cache>,
    /// The keys it was opened with: every later volume must bring the same
    /// (origins of one deployment do).
    cache_key: Zeroizing<[u8; 32]>,
    dedup_key: Zeroizing<[u8; 32]>,
}

/// What every volume's link shares.
#[derive(Clone)]
struct LinkBase {
    edge_id: String,
    psk: Option<[u8; 32]>,
    tls: Option<Arc<rustls::ClientConfig>>,
    tls_server_name: Option<String>,
    request_timeout: Duration,
    prefetch: crate::edge::config::PrefetchSettings,
}

impl LinkBase {
    fn config(&self, spec: &VolumeSpec) -> anyhow::Result<EdgeLinkConfig> {
        let mut link = EdgeLinkConfig::new(&spec.origin, &spec.name);
        link.session.psk = self.psk;
        link.session.request_timeout = self.request_timeout;
        link.session.edge_id.clone_from(&self.edge_id);
        if let Some(config) = &self.tls {
            let host = self.tls_server_name.clone().unwrap_or_else(|| {
                spec.origin
                    .rsplit_once(':')
                    .map_or(spec.origin.as_str(), |(h, _)| h)
                    .trim_matches(|c| c == '[' || c == ']')
                    .to_owned()
            });
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| anyhow::anyhow!("{host:?} is not a valid TLS server name"))?;
            link.tls = Some((config.clone(), name));
        }
        Ok(link)
    }
}

/// The iSCSI target name of a volume.
pub fn target_name(volume: &str) -> String {
    crate::serve::target_name(volume)
}

impl EdgeDaemon {
    pub fn file(&self) -> EdgeFile {
        lock(&self.file).clone()
    }

    pub fn persisted(&self) -> bool {
        self.file_path.is_some()
    }

    pub fn has_iscsi(&self) -> bool {
        self.iscsi.is_some()
    }

    /// The volumes, by name.
    pub fn volumes(&self) -> Vec<(String, Slot)> {
        lock(&self.volumes)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn volume(&self, name: &str) -> Result<Slot, ApiError> {
        lock(&self.volumes).get(name).cloned().ok_or_else(|| {
            ApiError::not_found(format!(
                "no volume {name:?} on this edge: `ferry volume list` shows the volumes"
            ))
        })
    }

    /// The spec the file holds for `name`.
    pub fn spec(&self, name: &str) -> Option<VolumeSpec> {
        lock(&self.file)
            .volumes
            .iter()
            .find(|v| v.name == name)
            .cloned()
    }

    pub fn cache(&self) -> Option<Arc<Cache>> {
        lock(&self.cache).as_ref().map(|c| c.cache.clone())
    }

    fn save(&self) -> Result<(), ApiError> {
        if let Some(path) = &self.file_path {
            let file = self.file();
            file.save(path)
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// Attaches `spec` and builds its device stack (not yet exported).
    async fn open_volume(&self, spec: &VolumeSpec) -> anyhow::Result<Served> {
        let file = self.file();
        let record = migration_record_path(&file.cache_dir, &spec.name);
        let storage: Arc<dyn blockcore::storage::Storage> =
            Arc::new(blockcore::storage::DiskStorage);
        let recorded = LocalCopy::recorded_stage(storage.as_ref(), &record)
            .with_context(|| format!("reading the migration record of {}", spec.name))?;
        if matches!(recorded, Some(Stage::CutOver | Stage::OnPremises)) {
            // Cut over (the origin no longer serves it) or moved back (the
            // origin serves it, not this edge): never contact it.
            let size = LocalCopy::recorded_size(storage.as_ref(), &record)?;
            let copy =
                tokio::task::spawn_blocking(move || LocalCopy::open(storage, &record, size, 0))
                    .await??
                    .context("the migration record vanished")?;
            match recorded {
                Some(Stage::CutOver) => {
                    tracing::info!(volume = %spec.name, size, "cut over: serving the local copy alone");
                }
                _ => {
                    tracing::info!(volume = %spec.name, size, "moved back: not served here; `ferry volume rm` forgets it");
                }
            }
            return Ok(Served {
                spec: Mutex::new(spec.clone()),
                size,
                device: None,
                local: Mutex::new(Some(Arc::new(copy))),
                overlay: None,
                attached_at: Instant::now(),
            });
        }
        let (client, pushes) = LinkClient::connect(self.link.config(spec)?)
            .await
            .with_context(|| format!("attaching volume {} at {}", spec.name, spec.origin))?;
        let a = client.attachment().clone();
        if a.local_writes && !spec.isolated {
            anyhow::bail!(
                "volume {} is a clone with cloud persistence: its origin keeps none of its \
                 writes, so this edge must keep them all; add it with --isolated \
                 (`isolated = true`)",
                spec.name
            );
        }
        tracing::info!(volume = %spec.name, origin = %spec.origin, size = a.size, next_seq = a.next_seq, local_writes = a.local_writes, "attached");
        let cache = self.open_cache(&file, &a).await?;
        let journal_dir = file.cache_dir.join("journals").join(&spec.name);
        let journal_opts = JournalOptions {
            capacity: spec.journal_size.0,
            ..JournalOptions::default()
        };
        let journal =
            tokio::task::spawn_blocking(move || Journal::open(&journal_dir, journal_opts))
                .await?
                .with_context(|| format!("opening the write journal of {}", spec.name))?;
        let device = Arc::new(
            EdgeDevice::start(
                client,
                pushes,
                cache,
                journal,
                EdgeConfig {
                    rpo: spec.rpo(),
                    profile_window: self.link.prefetch.window(),
                    plan_budget: self.link.prefetch.budget.0,
                    ..EdgeConfig::default()
                },
            )
            .context("starting the edge device")?,
        );
        let local = if recorded.is_some() {
            let (size, epoch) = (a.size, a.volume_epoch);
            let copy =
                tokio::task::spawn_blocking(move || LocalCopy::open(storage, &record, size, epoch))
                    .await?
                    .with_context(|| format!("opening the local copy of {}", spec.name))?
                    .context("the migration record vanished")?;
            let copy = Arc::new(copy);
            device
                .attach_local(copy.clone())
                .await
                .with_context(|| format!("resuming the migration of {}", spec.name))?;
            tracing::info!(volume = %spec.name, stage = %copy.stage(), remaining = copy.bytes_remaining(), "migration resumed");
            Some(copy)
        } else {
            None
        };
        let overlay = match spec.local_ranges()? {
            None => None,
            Some(ranges) => {
                let image = overlay_path(&file.cache_dir, &spec.name);
                // Bound to the volume's epoch: a re-created volume never
                // shows through an old overlay's local data.
                let tag = format!("{}@{:016x}", spec.name, a.volume_epoch);
                let inner = device.clone();
                let opened = tokio::task::spawn_blocking(move || {
                    LocalOverlay::open_tagged(inner, &image, &ranges, &tag)
                })
                .await?
                .with_context(|| format!("opening the local-only overlay of {}", spec.name))?;
                Some(Arc::new(opened))
            }
        };
        Ok(Served {
            spec: Mutex::new(spec.clone()),
            size: a.size,
            device: Some(device),
            local: Mutex::new(local),
            overlay,
            attached_at: Instant::now(),
        })
    }

    /// The shared cache, opened with the first attachment's keys; later
    /// attachments must bring the same keys.
    async fn open_cache(
        &self,
        file: &EdgeFile,
        a: &edge::Attachment,
    ) -> anyhow::Result<Arc<Cache>> {
        if let Some(open) = lock(&self.cache).clone() {
            if *open.cache_key != *a.cache_key || *open.dedup_key != *a.dedup_key {
                bail!(
                    "this origin belongs to another deployment (its master key differs from the \
                     one the cache was opened with): serve its volumes from another edge, or \
                     give both origins the same master.key"
                );
            }
            return Ok(open.cache);
        }
        let cache_dir = file.cache_dir.clone();
        let cache_config = CacheConfig {
            chunk_size: a.chunk_size,
            capacity: file.cache_size.0,
            memory: file.cache_memory.0,
            ..CacheConfig::default()
        };
        let (key, dedup) = (a.cache_key.clone(), a.dedup_key.clone());
        let cache = tokio::task::spawn_blocking(move || {
            Cache::open_with_dedup_key(&cache_dir, &key, &dedup, &cache_config)
        })
        .await?
        .with_context(|| format!("opening the cache in {}", file.cache_dir.display()))?;
        let mut slot = lock(&self.cache);
        // Two first volumes may race here: the first one in wins.
        if let Some(open) = slot.clone() {
            return Ok(open.cache);
        }
        let cache = Arc::new(cache);
        *slot = Some(OpenCache {
            cache: cache.clone(),
            cache_key: a.cache_key.clone(),
            dedup_key: a.dedup_key.clone(),
        });
        Ok(cache)
    }

    /// Exports a volume over NBD and iSCSI; not one moving back or moved
    /// back (its guest runs on premises now).
    async fn export(&self, name: &str, served: &Served) -> anyhow::Result<()> {
        if served
            .local()
            .is_some_and(|l| matches!(l.stage(), Stage::MovingBack | Stage::OnPremises))
        {
            return Ok(());
        }
        let top = served.top();
        let origin = lock(&served.spec).origin.clone();
        self.nbd.add_export(Export {
            name: name.to_owned(),
            description: format!("{name} from {origin}"),
            device: self.metrics.metered(name, "nbd", top.clone()),
        })?;
        if let Some((target, settings)) = &self.iscsi {
            let device: Arc<dyn BlockDevice> = self.metrics.metered(name, "iscsi", top);
            let (config, luns) = crate::serve::iscsi_target_config(settings, name, device)?;
            if let Err(e) = target.add_target(config, luns) {
                let _ = self.nbd.remove_export(name, Duration::ZERO).await;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Stops serving a volume's clients: in-flight requests finish first.
    async fn unexport(&self, name: &str) {
        if let Some((target, _)) = &self.iscsi {
            if let Err(e) = target.remove_target(&target_name(name), CLIENT_DRAIN).await {
                tracing::debug!(volume = %name, error = %e, "removing the iSCSI target");
            }
        }
        if let Err(e) = self.nbd.remove_export(name, CLIENT_DRAIN).await {
            tracing::debug!(volume = %name, error = %e, "removing the NBD export");
        }
    }

    /// Adds a volume: attach, export, and record it in the file.
    pub async fn add(&self, spec: VolumeSpec) -> Result<Arc<Served>, ApiError> {
        spec.validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if self.iscsi.is_some() {
            crate::config::check_iscsi_name(&spec.name)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let _changing = self.changes.lock().await;
        if lock(&self.volumes).contains_key(&spec.name) {
            return Err(ApiError::conflict(format!(
                "volume {:?} is already on this edge: remove it first to change its origin, \
                 journal or local-only ranges (PATCH changes its RPO)",
                spec.name
            )));
        }
        let served = match tokio::time::timeout(ATTACH_TIMEOUT, self.open_volume(&spec)).await {
            Ok(Ok(s)) => Arc::new(s),
            Ok(Err(e)) => return Err(ApiError::bad_gateway(format!("{e:#}"))),
            Err(_) => {
                return Err(ApiError::timeout(format!(
                    "attaching {} at {} took longer than {} s: is the origin reachable?",
                    spec.name,
                    spec.origin,
                    ATTACH_TIMEOUT.as_secs()
                )))
            }
        };
        self.export(&spec.name, &served)
            .await
            .map_err(|e| ApiError::internal(format!("exporting {}: {e:#}", spec.name)))?;
        lock(&self.volumes).insert(spec.name.clone(), Slot::Up(served.clone()));
        {
            let mut file = lock(&self.file);
            file.volumes.retain(|v| v.name != spec.name);
            file.volumes.push(spec.clone());
        }
        self.save()?;
        tracing::info!(volume = %spec.name, "volume added");
        Ok(served)
    }

    /// Changes what can change on a running volume.
    pub async fn change(&self, name: &str, change: VolumeChange) -> Result<(), ApiError> {
        let _changing = self.changes.lock().await;
        let Slot::Up(served) = self.volume(name)? else {
            return Err(ApiError::conflict(format!(
                "volume {name} is not up (attaching or being removed)"
            )));
        };
        if let Some(rpo) = change.rpo_secs {
            let mut spec = lock(&served.spec).clone();
            spec.rpo_secs = rpo;
            spec.validate()
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if let Some(d) = &served.device {
                d.set_rpo(spec.rpo());
            }
            *lock(&served.spec) = spec.clone();
            let mut file = lock(&self.file);
            if let Some(v) = file.volumes.iter_mut().find(|v| v.name == name) {
                *v = spec;
            }
        }
        self.save()
    }

    /// Removes a volume: its clients finish, its journal is drained to the
    /// origin (up to `timeout`), the origin is told to release it, and the
    /// file forgets it. When the drain times out the volume stays in
    /// `removing` with its journal intact; removing it again resumes.
    pub async fn remove(&self, name: &str, timeout: Duration) -> Result<(), ApiError> {
        let _changing = self.changes.lock().await;
        let served = match self.volume(name)? {
            Slot::Attaching { cancel, .. } => {
                cancel.cancel();
                lock(&self.volumes).remove(name);
                lock(&self.file).volumes.retain(|v| v.name != name);
                self.save()?;
                tracing::info!(volume = %name, "volume removed before it attached");
                return Ok(());
            }
            Slot::Up(s) | Slot::Removing { served: s, .. } => s,
        };
        lock(&self.volumes).insert(
            name.to_owned(),
            Slot::Removing {
                served: served.clone(),
                last_error: None,
            },
        );
        self.unexport(name).await;
        if let Err(e) = served.flush(timeout).await {
            lock(&self.volumes).insert(
                name.to_owned(),
                Slot::Removing {
                    served,
                    last_error: Some(e.message.clone()),
                },
            );
            return Err(e);
        }
        let attached = served
            .device
            .as_ref()
            .filter(|_| served.local().is_none_or(|l| l.stage().uses_origin()));
        if let Some(device) = attached {
            if let Err(e) = device.detach(Duration::from_secs(10)).await {
                // Nothing is lost: every write was applied. The origin
                // releases the volume when it notices the link is gone.
                tracing::warn!(volume = %name, error = %e, "the origin did not confirm the detach");
            }
        }
        if served
            .local()
            .is_some_and(|l| l.stage() == Stage::OnPremises)
        {
            // Moved back: its record must not make a volume of that name
            // added later look moved back too. The copy itself stays.
            let record = migration_record_path(&self.file().cache_dir, name);
            if let Err(e) = std::fs::remove_file(&record) {
                tracing::warn!(volume = %name, error = %e, "removing the migration record");
            }
        }
        self.forget(name)?;
        tracing::info!(volume = %name, "volume removed: flushed to its origin and detached");
        Ok(())
    }

    /// Drops a volume from the served set and the file.
    fn forget(&self, name: &str) -> Result<(), ApiError> {
        lock(&self.volumes).remove(name);
        lock(&self.file).volumes.retain(|v| v.name != name);
        self.metrics.forget(name, &["nbd", "iscsi"]);
        self.save()
    }

    /// Moves a volume back on premises (see [`EdgeDevice::move_back`]):
    /// its exports go first (the guest must have stopped, it runs on
    /// premises next), then every write the origin lacks is shipped, the
    /// origin's image is verified against the edge's copy, and the origin
    /// takes the volume back. A volume with a local copy stays listed as
    /// `on-premises` (not served) until removed; a streaming volume is
    /// removed.
    pub async fn moveback(&self, name: &str, timeout: Duration) -> Result<MovedBack, ApiError> {
        let started = Instant::now();
        let served = self.up(name)?;
        let local = served.local();
        let stage = local.as_ref().map_or(Stage::Streaming, |l| l.stage());
        if stage == Stage::OnPremises {
            return Ok(MovedBack::of(name, local.as_deref(), 0, started));
        }
        stage
            .check(edge::migrate::Command::MoveBack)
            .map_err(|r| migrate_error(r.into()))?;
        if served.overlay.is_some() {
            return Err(ApiError::conflict(format!(
                "volume {name} has local-only ranges, which the origin never had: moving it \
                 back would lose them"
            )));
        }
        self.unexport(name).await;
        let device = match &served.device {
            Some(d) if !d.link_finished() => d.clone(),
            _ => {
                // Cut over: its link ended with the release, or was never
                // opened in this run. It is opened again.
                let Some(l) = &local else {
                    return Err(ApiError::internal("the volume has no edge device"));
                };
                if l.stage() == Stage::CutOver {
                    l.set_stage(Stage::MovingBack)
                        .await
                        .map_err(|e| migrate_error(e.into()))?;
                    tracing::info!(target: "ferry::audit", volume = %name, from = %stage, "move back started");
                }
                let changing = self.changes.lock().await;
                // A concurrent call may have opened it again meanwhile: one
                // link and one journal per volume, so this call joins it.
                let current = self.up(name)?;
                if !Arc::ptr_eq(&current, &served) {
                    drop(changing);
                    return self
                        .finish_moveback(name, &current, timeout, 0, started)
                        .await;
                }
                let spec = lock(&served.spec).clone();
                let reopened =
                    match tokio::time::timeout(ATTACH_TIMEOUT, self.open_volume(&spec)).await {
                        Ok(Ok(s)) => Arc::new(s),
                        Ok(Err(e)) => return Err(ApiError::bad_gateway(format!("{e:#}"))),
                        Err(_) => {
                            return Err(ApiError::timeout(format!(
                                "attaching {name} at {} took longer than {} s: is the origin \
                                 reachable? `ferry moveback` again retries",
                                spec.origin,
                                ATTACH_TIMEOUT.as_secs()
                            )))
                        }
                    };
                lock(&self.volumes).insert(name.to_owned(), Slot::Up(reopened.clone()));
                drop(changing);
                return self
                    .finish_moveback(name, &reopened, timeout, 0, started)
                    .await;
            }
        };
        let unshipped = device.status().journal.unshipped_bytes;
        self.finish_moveback(name, &served, timeout, unshipped, started)
            .await
    }

    async fn finish_moveback(
        &self,
        name: &str,
        served: &Arc<Served>,
        timeout: Duration,
        unshipped: u64,
        started: Instant,
    ) -> Result<MovedBack, ApiError> {
        let Some(device) = served.device.clone() else {
            return Err(ApiError::internal("the volume has no edge device"));
        };
        let local = served.local();
        match device.move_back(timeout).await {
            Ok(()) => {}
            // Finished by the task a restart resumed, before this call.
            Err(MigrateError::Refused(_))
                if local
                    .as_ref()
                    .is_some_and(|l| l.stage() == Stage::OnPremises) => {}
            Err(e) => return Err(migrate_error(e)),
        }
        let _changing = self.changes.lock().await;
        match &local {
            Some(l) => {
                // Home: the link and the journal are done with; the slot
                // keeps the copy for status until the volume is removed.
                let home = Arc::new(Served {
                    spec: Mutex::new(lock(&served.spec).clone()),
                    size: served.size,
                    device: None,
                    local: Mutex::new(Some(l.clone())),
                    overlay: None,
                    attached_at: served.attached_at,
                });
                lock(&self.volumes).insert(name.to_owned(), Slot::Up(home));
            }
            None => self.forget(name)?,
        }
        Ok(MovedBack::of(name, local.as_deref(), unshipped, started))
    }

    /// Flushes one volume to its origin.
    pub async fn flush(&self, name: &str, timeout: Duration) -> Result<(), ApiError> {
        match self.volume(name)? {
            Slot::Up(s) | Slot::Removing { served: s, .. } => s.flush(timeout).await,
            Slot::Attaching { .. } => Err(ApiError::conflict(format!(
                "volume {name} is not attached yet: nothing to flush"
            ))),
        }
    }

    /// Ends a volume's boot profile window now (`ferry edge profile
    /// stop`): returns the chunks the profile holds and whether the
    /// origin stored it (within 30 s; the store goes on after that).
    pub async fn stop_profile(&self, name: &str) -> Result<(u64, bool), ApiError> {
        let served = match self.volume(name)? {
            Slot::Up(s) | Slot::Removing { served: s, .. } => s,
            Slot::Attaching { .. } => {
                return Err(ApiError::conflict(format!(
                    "volume {name} is not attached yet: no boot is being recorded"
                )))
            }
        };
        let device = served.device.as_ref().ok_or_else(|| {
            ApiError::conflict(format!(
                "volume {name} is served from its local copy: no boot is being recorded"
            ))
        })?;
        let device = device.clone();
        device
            .stop_profile(std::time::Duration::from_secs(30))
            .await
            .map_err(|e| ApiError::conflict(format!("volume {name}: {e}")))
    }

    /// Resizes the shared cache (and records the size in the file).
    pub async fn resize_cache(&self, bytes: u64) -> Result<(), ApiError> {
        let _changing = self.changes.lock().await;
        let chunk = self
            .cache()
            .map_or(64 * 1024, |c| u64::from(c.chunk_size()));
        if bytes < 16 * chunk {
            return Err(ApiError::bad_request(format!(
                "a cache of {bytes} bytes is too small: give at least {} bytes",
                16 * chunk
            )));
        }
        if let Some(cache) = self.cache() {
            tokio::task::spawn_blocking(move || cache.resize(bytes))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::conflict(format!("resizing the cache: {e}")))?;
        }
        lock(&self.file).cache_size = crate::config::ByteSize(bytes);
        self.save()?;
        tracing::info!(bytes, "cache resized");
        Ok(())
    }

    fn up(&self, name: &str) -> Result<Arc<Served>, ApiError> {
        match self.volume(name)? {
            Slot::Up(s) => Ok(s),
            _ => Err(ApiError::conflict(format!(
                "volume {name} is not up (attaching or being removed)"
            ))),
        }
    }

    /// Starts migrating a volume to local storage at `target` (see
    /// [`edge::migrate`]).
    pub async fn migrate_start(
        &self,
        name: &str,
        target: PathBuf,
        rate_bytes_per_sec: u64,
    ) -> Result<Arc<LocalCopy>, ApiError> {
        let _changing = self.changes.lock().await;
        let served = self.up(name)?;
        if let Some(l) = served.local() {
            return Err(migrate_error(MigrateError::Refused(
                l.stage()
                    .check(edge::migrate::Command::StartMigration)
                    .expect_err("a migrating volume refuses a second start"),
            )));
        }
        let Some(device) = served.device.clone() else {
            return Err(ApiError::internal("the volume has no edge device"));
        };
        if served.overlay.is_some() {
            return Err(ApiError::conflict(format!(
                "volume {name} has local-only ranges; migrating such a volume is not supported yet"
            )));
        }
        let record = migration_record_path(&self.file().cache_dir, name);
        let new = NewCopy {
            target,
            size: served.size,
            volume_epoch: device.attachment().volume_epoch,
            rate_bytes_per_sec,
        };
        let storage: Arc<dyn blockcore::storage::Storage> =
            Arc::new(blockcore::storage::DiskStorage);
        let copy = tokio::task::spawn_blocking(move || LocalCopy::create(storage, &record, &new))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let copy = Arc::new(copy);
        device
            .attach_local(copy.clone())
            .await
            .map_err(migrate_error)?;
        *lock(&served.local) = Some(copy.clone());
        tracing::info!(target: "ferry::audit", volume = %name, target = %copy.status().target, "migration started");
        Ok(copy)
    }

    /// Pauses, resumes or re-rates a volume's migration.
    pub async fn migrate_change(
        &self,
        name: &str,
        paused: Option<bool>,
        rate_bytes_per_sec: Option<u64>,
    ) -> Result<Arc<LocalCopy>, ApiError> {
        let served = self.up(name)?;
        let (Some(device), Some(local)) = (served.device.clone(), served.local()) else {
            return Err(ApiError::conflict(format!(
                "volume {name} is not migrating: start with `ferry migrate start`"
            )));
        };
        if let Some(p) = paused {
            device.set_copy_paused(p).await.map_err(migrate_error)?;
        }
        if let Some(r) = rate_bytes_per_sec {
            device.set_copy_rate(r).await.map_err(migrate_error)?;
        }
        Ok(local)
    }

    /// Cuts a volume over to its local copy.
    pub async fn cutover(
        &self,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<Arc<LocalCopy>, ApiError> {
        let served = self.up(name)?;
        let (Some(device), Some(local)) = (served.device.clone(), served.local()) else {
            if let Some(l) = served.local() {
                return Err(migrate_error(MigrateError::Refused(
                    l.stage()
                        .check(edge::migrate::Command::CutOver {
                            remaining: 0,
                            force,
                        })
                        .expect_err("a cut-over volume refuses a cut-over"),
                )));
            }
            return Err(ApiError::conflict(format!(
                "volume {name} is not migrating: start with `ferry migrate start`"
            )));
        };
        device
            .cutover(force, timeout)
            .await
            .map_err(migrate_error)?;
        Ok(local)
    }

    /// Attaches a volume of the file in the background, retrying until it
    /// attaches or is removed.
    fn attach_in_background(self: &Arc<Self>, spec: VolumeSpec) {
        let cancel = CancellationToken::new();
        lock(&self.volumes).insert(
            spec.name.clone(),
            Slot::Attaching {
                since: Instant::now(),
                attempts: 0,
                last_error: None,
                cancel: cancel.clone(),
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let result = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = tokio::time::timeout(ATTACH_TIMEOUT, this.open_volume(&spec)) => r,
                };
                let error = match result {
                    Ok(Ok(served)) => {
                        let served = Arc::new(served);
                        let _changing = this.changes.lock().await;
                        if cancel.is_cancelled() {
                            return;
                        }
                        match this.export(&spec.name, &served).await {
                            Ok(()) => {
                                lock(&this.volumes).insert(spec.name.clone(), Slot::Up(served));
                                tracing::info!(volume = %spec.name, attempts, "volume up");
                                return;
                            }
                            Err(e) => format!("{e:#}"),
                        }
                    }
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(_) => format!("no answer within {} s", ATTACH_TIMEOUT.as_secs()),
                };
                tracing::warn!(volume = %spec.name, attempts, %error, retry_in = ?backoff, "attach failed");
                if let Some(Slot::Attaching {
                    attempts: a,
                    last_error,
                    ..
                }) = lock(&this.volumes).get_mut(&spec.name)
                {
                    *a = attempts;
                    *last_error = Some(error);
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
    }
}

/// What `ferry moveback` reports.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
pub struct MovedBack {
    pub volume: String,
    /// `on-premises` for a volume with a local copy (listed, not served,
    /// until removed); `streaming` for one without (removed from this
    /// edge).
    pub stage: api::LifecycleStage,
    /// Write bytes shipped to the origin: the pieces of changed chunks
    /// that differed there (cut-over), or the journal's unshipped bytes.
    pub bytes_shipped: u64,
    /// Bytes of the origin's image compared with the edge's copy by
    /// signature, and the bytes found different and shipped again.
    pub bytes_verified: u64,
    pub bytes_repaired: u64,
    /// Bytes of signatures the origin sent for the comparisons.
    pub signature_bytes: u64,
    pub seconds: f64,
}

impl MovedBack {
    fn of(name: &str, local: Option<&LocalCopy>, unshipped: u64, started: Instant) -> MovedBack {
        let s = local.map(LocalCopy::status);
        MovedBack {
            volume: name.to_owned(),
            stage: s
                .as_ref()
                .map_or(api::LifecycleStage::Streaming, |s| s.stage.into()),
            bytes_shipped: s.as_ref().map_or(unshipped, |s| s.moveback_shipped),
            bytes_verified: s.as_ref().map_or(0, |s| s.moveback_verified),
            bytes_repaired: s.as_ref().map_or(0, |s| s.moveback_repaired),
            signature_bytes: s.as_ref().map_or(0, |s| s.moveback_signature_bytes),
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// How the daemon was asked to start.
#[derive(Debug, Clone)]
pub struct EdgeStart {
    pub file: EdgeFile,
    /// Where the file lives (API changes are saved there); `None` when it
    /// was built from command-line flags.
    pub file_path: Option<PathBuf>,
    /// Attach the file's volumes before returning, failing on the first
    /// that does not attach (the command-line mode); otherwise they attach
    /// in the background, retrying.
    pub attach_first: bool,
}

/// A running edge daemon.
pub struct RunningEdge {
    pub daemon: Arc<EdgeDaemon>,
    pub listeners: Vec<String>,
    pub iscsi_listeners: Vec<String>,
    pub api: PathBuf,
    pub api_tcp: Option<String>,
    pub metrics: Option<String>,
    sockets: Vec<PathBuf>,
    tasks: crate::serve::ListenerTasks,
    stop: CancellationToken,
}

impl std::fmt::Debug for RunningEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningEdge")
            .field("listeners", &self.listeners)
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

fn link_base(file: &EdgeFile) -> anyhow::Result<LinkBase> {
    let l = &file.link;
    let tls = match (&l.tls_ca, l.no_tls) {
        (Some(ca), false) => {
            let identity = match (&l.tls_cert, &l.tls_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                (None, None) => None,
                _ => bail!("the link's tls_cert and tls_key go together"),
            };
            Some(link::tls::client_config(ca, identity)?)
        }
        (None, true) => None,
        (Some(_), true) => bail!("no_tls conflicts with tls_ca"),
        (None, false) => bail!(
            "the link needs TLS: give --tls-ca ([link] tls_ca, the CA of the origin's \
             certificate), or --no-tls ([link] no_tls = true) on both ends for a trusted network"
        ),
    };
    let psk = l
        .psk_file
        .as_deref()
        .map(read_key_file)
        .transpose()?
        .map(|k| *k);
    let edge_id = match &l.edge_id {
        Some(id) => id.clone(),
        // Stable across restarts of this edge, so the origin lets it take
        // its volumes back after a crash.
        None => stable_edge_id(&file.cache_dir)?,
    };
    Ok(LinkBase {
        edge_id,
        psk,
        tls,
        tls_server_name: l.tls_server_name.clone(),
        request_timeout: Duration::try_from_secs_f64(l.request_timeout_secs)
            .context("request_timeout_secs")?,
        prefetch: file.prefetch.clone(),
    })
}

/// Starts the daemon: listeners, the API, and the file's volumes.
pub async fn start(how: EdgeStart) -> anyhow::Result<RunningEdge> {
    let EdgeStart {
        file,
        file_path,
        attach_first,
    } = how;
    file.validate()?;
    std::fs::create_dir_all(&file.cache_dir)
        .with_context(|| format!("creating {}", file.cache_dir.display()))?;
    let link = link_base(&file)?;
    let nbd = Server::new(Vec::new(), ServerConfig::default())?;
    let mut tasks = crate::serve::ListenerTasks::new();
    let mut iscsi_listeners = Vec::new();
    let iscsi = match &file.iscsi {
        Some(settings) => {
            let listen = if settings.listen.is_empty() {
                vec![crate::config::DEFAULT_ISCSI_ADDR.to_owned()]
            } else {
                settings.listen.clone()
            };
            let target = crate::serve::iscsi_server(settings, &[])?;
            iscsi_listeners = crate::serve::serve_iscsi(&target, &listen, &mut tasks).await?;
            Some((target, settings.clone()))
        }
        None => None,
    };
    let listen = if file.nbd.is_empty() && file.iscsi.is_none() {
        vec![ListenAddr::Tcp(DEFAULT_NBD_ADDR.into())]
    } else {
        file.nbd.clone()
    };
    let (listeners, mut sockets) = crate::serve::serve_nbd(&nbd, &listen, &mut tasks).await?;
    let api_path = file.api_path();
    let initial = file.volumes.clone();
    let daemon = Arc::new(EdgeDaemon {
        file: Mutex::new(EdgeFile {
            volumes: Vec::new(),
            ..file.clone()
        }),
        file_path,
        changes: tokio::sync::Mutex::new(()),
        volumes: Mutex::new(BTreeMap::new()),
        cache: Mutex::new(None),
        link,
        nbd,
        iscsi,
        metrics: RequestMetrics::new("ferry_edge"),
        started: Instant::now(),
    });
    // Volumes stay in the file while they attach: the file is the desired
    // state, whatever the origins say right now.
    lock(&daemon.file).volumes.clone_from(&initial);
    for spec in initial {
        if attach_first {
            let served = Arc::new(daemon.open_volume(&spec).await?);
            daemon.export(&spec.name, &served).await?;
            lock(&daemon.volumes).insert(spec.name.clone(), Slot::Up(served));
        } else {
            daemon.attach_in_background(spec);
        }
    }
    let stop = CancellationToken::new();
    let api: Arc<dyn crate::api::Api> = Arc::new(api::EdgeApi::new(daemon.clone()));
    let unix = crate::serve::bind_unix(&api_path)
        .with_context(|| format!("the API socket {}", api_path.display()))?;
    sockets.push(api_path.clone());
    {
        let (api, stop) = (api.clone(), stop.clone());
        tasks.spawn(async move { crate::api::http::serve_unix(unix, api, stop).await });
    }
    let mut api_tcp = None;
    if let Some(t) = &file.api_tcp {
        let token = Zeroizing::new(
            std::fs::read_to_string(&t.token_file)
                .with_context(|| format!("reading the API token {}", t.token_file.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
        );
        anyhow::ensure!(
            token.len() >= 16,
            "the API token in {} must be at least 16 characters",
            t.token_file.display()
        );
        let tls =
            tokio_rustls::TlsAcceptor::from(nbd_server::load_tls_config(&t.tls_cert, &t.tls_key)?);
        let l = tokio::net::TcpListener::bind(&t.listen)
            .await
            .with_context(|| format!("the API's TCP listener {}", t.listen))?;
        api_tcp = Some(l.local_addr()?.to_string());
        let (api, stop) = (api.clone(), stop.clone());
        tasks.spawn(async move { crate::api::http::serve_tls(l, tls, token, api, stop).await });
    }
    let mut metrics = None;
    if let Some(addr) = &file.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("the metrics listener {addr}"))?;
        metrics = Some(l.local_addr()?.to_string());
        let (api, stop) = (api.clone(), stop.clone());
        tasks.spawn(async move { crate::api::http::serve_metrics(l, api, stop).await });
    }
    Ok(RunningEdge {
        daemon,
        listeners,
        iscsi_listeners,
        api: api_path,
        api_tcp,
        metrics,
        sockets,
        tasks,
        stop,
    })
}

/// The edge's id, kept in the cache directory (written atomically: a crash
/// while creating it must not leave an empty id behind).
fn stable_edge_id(cache_dir: &Path) -> anyhow::Result<String> {
    use blockcore::storage::{read_file, replace_file, DiskStorage};
    std::fs::create_dir_all(cache_dir)?;
    let path = cache_dir.join("edge-id");
    let existing = read_file(&DiskStorage, &path)
        .with_context(|| format!("reading {}", path.display()))?
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .filter(|s| !s.is_empty());
    if let Some(id) = existing {
        return Ok(id);
    }
    let id = format!("edge-{:016x}", u64::from_be_bytes(link::io::random()));
    replace_file(&DiskStorage, &path, id.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

impl RunningEdge {
    /// Serves until a signal, then drains iSCSI and NBD clients, makes every
    /// journal durable (unshipped writes stay in it for the next start) and
    /// exits.
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let outcome = tokio::select! {
            s = crate::serve::shutdown_signal() => {
                tracing::info!(signal = s?, "edge shutting down");
                Ok(())
            }
            Some(done) = self.tasks.join_next() => match done {
                Ok(r) => r,
                Err(e) => Err(e.into()),
            },
        };
        self.stop.cancel();
        let d = &self.daemon;
        if let Some((target, _)) = &d.iscsi {
            target.shutdown();
            if !target.drain(Duration::from_secs(30)).await {
                tracing::warn!("iSCSI sessions still busy at shutdown");
            }
        }
        d.nbd.shutdown();
        let drained = d.nbd.drain(Duration::from_secs(30)).await;
        for (name, slot) in d.volumes() {
            match slot {
                Slot::Up(s) | Slot::Removing { served: s, .. } => {
                    if let Some(o) = &s.overlay {
                        if let Err(e) = o.flush().await {
                            tracing::error!(volume = %name, error = %e, "flushing the overlay at exit");
                        }
                    }
                    if let Err(e) = s.top().flush().await {
                        tracing::error!(volume = %name, error = %e, "syncing the journal at exit");
                    }
                    if let Some(l) = s.local() {
                        if let Err(e) = l.save().await {
                            tracing::error!(volume = %name, error = %e, "saving the migration's progress at exit");
                        }
                    }
                    if let Some(status) = s.status() {
                        tracing::info!(volume = %name, "status at exit:\n{}", format_status(&status));
                    }
                }
                Slot::Attaching { cancel, .. } => cancel.cancel(),
            }
        }
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
        drained.context("flushing the journals at shutdown")?;
        outcome
    }
}

/// The status as `key: value` lines (`ferry edge status`).
pub fn format_status(s: &EdgeStatus) -> String {
    let age = s
        .journal
        .oldest_unshipped_age
        .map_or_else(|| "none".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
    let l = &s.link.link;
    let cc = &l.transport.cc;
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    format!(
        "link: {}\n\
         link_connects: {}\n\
         link_deaths: {}\n\
         link_last_error: {}\n\
         link_rtt_ms: {}\n\
         link_queue_delay_ms: {}\n\
         link_window_bytes: {}\n\
         link_delivery_rate_bytes_per_sec: {}\n\
         bytes_fetched: {}\n\
         bytes_pushed: {}\n\
         signature_hits: {}\n\
         signature_misses: {}\n\
         cache_hits: {}\n\
         cache_memory_hits: {}\n\
         cache_misses: {}\n\
         cache_hit_ratio: {:.3}\n\
         cache_fill_rate: {:.3}\n\
         journal_unshipped_bytes: {}\n\
         journal_unshipped_records: {}\n\
         journal_batches_in_flight: {}\n\
         journal_oldest_unshipped_age: {age}\n\
         journal_used_bytes: {}\n\
         journal_appends_waiting: {}\n\
         batches_shipped: {}\n\
         bytes_shipped: {}\n\
         batch_bytes_sent: {}\n\
         pushes_kept: {}\n\
         pushes_dropped: {}\n\
         prefetch_profile: {} ({} chunks)\n\
         prefetch_plan: {}\n\
         prefetch_pushed_bytes: {}\n\
         prefetch_used_bytes: {}\n\
         prefetch_unread_bytes: {}\n",
        if l.connected { "up" } else { "down" },
        l.connects,
        l.deaths,
        l.last_error.as_deref().unwrap_or("none"),
        ms(cc.srtt),
        ms(cc.queue_delay),
        cc.cwnd,
        cc.delivery_rate,
        l.bytes_read,
        l.bytes_pushed,
        s.link.signature_hits,
        s.link.signature_misses,
        s.cache.hits,
        s.cache.memory_hits,
        s.cache.misses,
        s.cache.hit_rate(),
        s.cache.fill_rate(),
        s.journal.unshipped_bytes,
        s.journal.unshipped_records,
        s.journal.batches_in_flight,
        s.journal.used_bytes,
        s.journal.appends_waiting,
        s.batches_shipped,
        s.bytes_shipped,
        l.batch_bytes_sent,
        s.pushes_kept,
        s.pushes_dropped,
        s.prefetch.profile,
        s.prefetch.profile_chunks,
        s.prefetch.plan,
        s.prefetch.pushed_bytes,
        s.prefetch.used_bytes,
        s.prefetch.unread_bytes,
    )
}

/// The overlay's status lines.
pub fn format_overlay(o: &EdgeOverlay) -> String {
    let local: u64 = o.ranges().iter().map(|r| r.end - r.start).sum();
    let allocated = o
        .allocated_bytes()
        .map_or_else(|e| format!("unknown ({e})"), |b| b.to_string());
    format!("local_only_bytes: {local}\noverlay_allocated_bytes: {allocated}\n")
}
