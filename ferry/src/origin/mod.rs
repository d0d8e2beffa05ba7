//! `ferry origin`: serve raw images or existing NBD exports to edges over
//! the replication link. Volumes come from `--export` and from
//! `STATE_DIR/exports.toml` (what the management API added), and are added
//! and removed at run time through the API ([`api`]), which also
//! force-releases a volume from an edge that is gone (fencing that edge)
//! and serves the origin's metrics.

pub mod api;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use blockcore::{BlockDevice, FileDevice, OpenOptions};
use nbd_server::client::{NbdConfig, NbdDevice, NbdUri};
use origin::{Origin, OriginConfig};
use tokio::net::TcpListener;

use crate::config::{read_key_file, Engine};

/// What `ferry origin` was asked to do.
#[derive(Debug, Clone)]
pub struct OriginArgs {
    pub listen: String,
    pub exports: Vec<(String, PathBuf)>,
    pub state_dir: PathBuf,
    /// The management API's socket (default `STATE_DIR/api.sock`).
    pub api: Option<PathBuf>,
    /// A plain-TCP listener for `GET /metrics`.
    pub metrics: Option<String>,
    pub psk_file: Option<PathBuf>,
    pub no_tls: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub engine: Engine,
    /// Automatic snapshots kept per volume (0: none).
    pub auto_snapshots: usize,
}

/// A volume's backing device: an NBD export when `source` is an NBD URI
/// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, e.g. a
/// `qemu-nbd` serving a qcow2), else a raw image file.
pub async fn open_volume(source: &Path, engine: Engine) -> anyhow::Result<Arc<dyn BlockDevice>> {
    if let Some(uri) = source.to_str().filter(|s| NbdUri::is_nbd_uri(s)) {
        let dev = NbdDevice::connect(uri, NbdConfig::default())
            .await
            .with_context(|| format!("connecting to the NBD export {uri}"))?;
        return Ok(Arc::new(dev));
    }
    let dev = FileDevice::open(
        source,
        &OpenOptions {
            read_only: false,
            engine: engine.into(),
        },
    )
    .with_context(|| format!("opening {}", source.display()))?;
    Ok(Arc::new(dev))
}

/// The exports the API added, kept in the state directory so a restart
/// serves them again.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportsFile {
    #[serde(default, rename = "export")]
    pub exports: Vec<SavedExport>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SavedExport {
    pub name: String,
    pub source: PathBuf,
}

impl ExportsFile {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("exports.toml")
    }

    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        use blockcore::storage::{replace_file, DiskStorage};
        let path = Self::path(state_dir);
        let text = format!(
            "# The exports ferry's management API added; rewritten on every change.\n{}",
            toml::to_string(self)?
        );
        replace_file(&DiskStorage, &path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Serves until SIGINT/SIGTERM. `on_listening` is told each bound address
/// with its kind (`origin`, `api`, `metrics`).
pub async fn run(args: OriginArgs, mut on_listening: impl FnMut(&str, &str)) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key, args.no_tls) {
        (Some(cert), Some(key), false) => {
            if args.tls_client_ca.is_none() && args.psk_file.is_none() {
                bail!(
                    "edges must authenticate: give --tls-client-ca (edge certificates) or \
                     --psk-file (a pre-shared key)"
                );
            }
            Some(tokio_rustls::TlsAcceptor::from(link::tls::server_config(
                cert,
                key,
                args.tls_client_ca.as_deref(),
            )?))
        }
        (None, None, true) => None,
        (_, _, true) => bail!("--no-tls conflicts with the TLS options"),
        _ => bail!(
            "the link needs TLS: give --tls-cert and --tls-key (and --tls-client-ca or \
             --psk-file), or --no-tls on both ends for a trusted network"
        ),
    };
    let psk = args
        .psk_file
        .as_deref()
        .map(read_key_file)
        .transpose()?
        .map(|k| *k);
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let saved = ExportsFile::load(&args.state_dir)?;
    let mut sources: Vec<(String, PathBuf)> = args.exports.clone();
    for e in &saved.exports {
        match sources.iter().find(|(n, _)| *n == e.name) {
            Some((_, p)) if *p != e.source => bail!(
                "volume {} is --export {} but {} says {}: remove one of them",
                e.name,
                p.display(),
                ExportsFile::path(&args.state_dir).display(),
                e.source.display()
            ),
            Some(_) => {}
            None => sources.push((e.name.clone(), e.source.clone())),
        }
    }
    let mut volumes: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for (name, path) in &sources {
        let dev = open_volume(path, args.engine)
            .await
            .with_context(|| format!("opening volume {name}"))?;
        tracing::info!(volume = %name, source = %path.display(), size = dev.info().size, "volume ready");
        volumes.push((name.clone(), dev));
    }
    let origin = Arc::new(
        Origin::open(&args.state_dir, volumes, {
            let mut c = OriginConfig::default();
            c.session.psk = psk;
            c.auto_snapshots = args.auto_snapshots;
            c
        })
        .await
        .with_context(|| format!("opening the origin state in {}", args.state_dir.display()))?,
    );
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?.to_string();
    tracing::info!(address = %local, "listening for edges");
    on_listening("origin", &local);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = crate::serve::ListenerTasks::new();
    let api: Arc<dyn crate::api::Api> = Arc::new(api::OriginApi::new(
        origin.clone(),
        args.state_dir.clone(),
        args.engine,
        sources,
    ));
    let api_path = args
        .api
        .clone()
        .unwrap_or_else(|| args.state_dir.join("api.sock"));
    let unix = crate::serve::bind_unix(&api_path)
        .with_context(|| format!("the API socket {}", api_path.display()))?;
    {
        let (api, stop) = (api.clone(), stop.clone());
        tasks.spawn(async move { crate::api::http::serve_unix(unix, api, stop).await });
    }
    if let Some(addr) = &args.metrics {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("the metrics listener {addr}"))?;
        on_listening("metrics", &l.local_addr()?.to_string());
        let (api, stop) = (api.clone(), stop.clone());
        tasks.spawn(async move { crate::api::http::serve_metrics(l, api, stop).await });
    }
    on_listening("api", &api_path.display().to_string());
    let accept = origin::serve(origin, listener, tls);
    let outcome = tokio::select! {
        r = accept => r.context("accepting edges"),
        Some(done) = tasks.join_next() => match done {
            Ok(r) => r,
            Err(e) => Err(e.into()),
        },
        s = crate::serve::shutdown_signal() => {
            tracing::info!(signal = s?, "origin shutting down");
            Ok(())
        }
    };
    stop.cancel();
    let _ = std::fs::remove_file(&api_path);
    outcome
}
