//! `ferry serve`: export raw images over NBD and iSCSI until SIGINT/SIGTERM.
//!
//! Both front ends serve the very same device stack of each export, so a
//! write through one is read back through the other.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blockcore::{BlockDevice, FileDevice, OpenOptions, ReadAhead, Stats};
use nbd_server::{Export, Server, ServerConfig, TlsMode};
use tokio::net::{TcpListener, UnixListener};

use cache::{Cache, CacheConfig, CachedDevice, WriteMode};

use crate::config::{
    read_key_file, CacheSettings, CacheWriteMode, ExportConfig, IscsiSettings, ListenAddr,
    ServeConfig, TlsPolicy, DEFAULT_NBD_ADDR, IQN_PREFIX,
};

/// How long shutdown waits for in-flight requests before flushing anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The device stack of one export, kept so its counters can be reported.
#[derive(Debug)]
pub struct ServedExport {
    pub name: String,
    pub stats: Arc<Stats<Arc<dyn BlockDevice>>>,
}

/// The cache exports are read through, and how writes treat it.
#[derive(Debug, Clone)]
pub struct SharedCache {
    pub cache: Arc<Cache>,
    pub mode: WriteMode,
}

/// Opens the cache directory `settings` names (creating it if needed).
pub fn open_cache(settings: &CacheSettings) -> anyhow::Result<SharedCache> {
    let key = read_key_file(&settings.key_file)?;
    let config = CacheConfig {
        chunk_size: u32::try_from(settings.chunk_size.0).context("cache chunk size too large")?,
        capacity: settings.size.0,
        ..CacheConfig::default()
    };
    let cache = Cache::open(&settings.dir, &key, &config)
        .with_context(|| format!("opening the cache in {}", settings.dir.display()))?;
    let stats = cache.stats();
    tracing::info!(
        dir = %settings.dir.display(),
        slots = stats.slots,
        used = stats.used_slots,
        "cache ready"
    );
    Ok(SharedCache {
        cache: Arc::new(cache),
        mode: match settings.write_mode {
            CacheWriteMode::Through => WriteMode::Through,
            CacheWriteMode::Around => WriteMode::Around,
        },
    })
}

/// Opens an export's image and stacks its layers:
/// `Stats -> [ReadAhead ->] [CachedDevice ->] FileDevice`.
pub fn open_export(
    cfg: &ExportConfig,
    cache: Option<&SharedCache>,
) -> anyhow::Result<(Export, ServedExport)> {
    let opts = OpenOptions {
        read_only: cfg.read_only,
        engine: cfg.engine.into(),
    };
    let file = FileDevice::open(&cfg.path, &opts)
        .with_context(|| format!("opening {}", cfg.path.display()))?;
    tracing::info!(
        export = %cfg.name,
        path = %cfg.path.display(),
        size = file.info().size,
        engine = %file.engine(),
        read_only = cfg.read_only,
        readahead = cfg.readahead,
        "export ready"
    );
    // The cache knows the image as a volume named after the export.
    let cached: Arc<dyn BlockDevice> = match cache {
        Some(c) => Arc::new(
            CachedDevice::new(file, c.cache.clone(), &cfg.name, c.mode)
                .with_context(|| format!("registering export {} in the cache", cfg.name))?,
        ),
        None => Arc::new(file),
    };
    let base: Arc<dyn BlockDevice> = if cfg.readahead {
        Arc::new(ReadAhead::new(cached))
    } else {
        cached
    };
    let stats = Arc::new(Stats::new(base));
    let export = Export {
        name: cfg.name.clone(),
        description: cfg.description.clone(),
        device: Arc::clone(&stats) as Arc<dyn BlockDevice>,
    };
    Ok((
        export,
        ServedExport {
            name: cfg.name.clone(),
            stats,
        },
    ))
}

/// Tasks serving listeners; the first to end ends the process.
pub(crate) type ListenerTasks = tokio::task::JoinSet<anyhow::Result<()>>;

/// Binds every NBD address and serves `server` on each (in `tasks`).
/// Returns the addresses as bound (port 0 resolved) and the Unix socket
/// paths to remove at exit.
pub(crate) async fn serve_nbd(
    server: &Server,
    listen: &[ListenAddr],
    tasks: &mut ListenerTasks,
) -> anyhow::Result<(Vec<String>, Vec<PathBuf>)> {
    let (mut shown, mut sockets) = (Vec::new(), Vec::new());
    for addr in listen {
        let server = server.clone();
        match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a)
                    .await
                    .with_context(|| format!("listening on {a}"))?;
                shown.push(l.local_addr()?.to_string());
                tasks.spawn(async move { Ok(server.serve_tcp(l).await?) });
            }
            ListenAddr::Unix(path) => {
                let l = bind_unix(path)?;
                shown.push(format!("unix:{}", path.display()));
                sockets.push(path.clone());
                tasks.spawn(async move { Ok(server.serve_unix(l).await?) });
            }
        }
    }
    Ok((shown, sockets))
}

/// Binds every iSCSI portal and serves `target` on each (in `tasks`);
/// returns the addresses as bound.
pub(crate) async fn serve_iscsi(
    target: &iscsi_target::server::Server,
    listen: &[String],
    tasks: &mut ListenerTasks,
) -> anyhow::Result<Vec<String>> {
    let mut shown = Vec::new();
    for addr in listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for iSCSI on {addr}"))?;
        shown.push(l.local_addr()?.to_string());
        let target = target.clone();
        tasks.spawn(async move { Ok(target.serve(l).await?) });
    }
    Ok(shown)
}

/// Binds a Unix socket, replacing a stale socket file left by an earlier
/// run (and refusing to delete anything else).
pub(crate) fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    remove_stale_socket(path)?;
    UnixListener::bind(path).with_context(|| format!("listening on unix:{}", path.display()))
}

/// A socket file left by a previous run would make bind fail; anything
/// else at that path is not ours to delete.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display())),
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}

/// The iSCSI target name of an export.
pub fn target_name(export: &str) -> String {
    format!("{IQN_PREFIX}:{export}")
}

/// The CHAP settings of every target.
fn chap_config(
    settings: &IscsiSettings,
) -> anyhow::Result<Option<iscsi_target::login::ChapConfig>> {
    use iscsi_target::login::ChapConfig;
    Ok(match (&settings.chap_user, &settings.chap_secret_file) {
        (Some(user), Some(file)) => Some(ChapConfig {
            user: user.clone(),
            secret: IscsiSettings::read_secret(file)?,
            mutual: match (&settings.mutual_user, &settings.mutual_secret_file) {
                (Some(name), Some(file)) => Some((name.clone(), IscsiSettings::read_secret(file)?)),
                _ => None,
            },
        }),
        _ => None,
    })
}

/// One export's target: its login settings and its LUN map (the device as
/// LUN 0).
pub fn iscsi_target_config(
    settings: &IscsiSettings,
    export: &str,
    device: Arc<dyn BlockDevice>,
) -> anyhow::Result<(
    iscsi_target::login::TargetConfig,
    Arc<iscsi_target::scsi::LunMap>,
)> {
    use iscsi_target::login::TargetConfig;
    use iscsi_target::scsi::{Lun, LunIdentity, LunMap};
    let lun = Lun::new(
        device,
        LunIdentity {
            volume_name: export.to_owned(),
            vendor: "FERRY".into(),
            product: "ferry disk".into(),
            revision: env!("CARGO_PKG_VERSION").chars().take(4).collect(),
        },
    );
    Ok((
        TargetConfig {
            name: target_name(export),
            alias: Some(export.to_owned()),
            allowed_initiators: settings.allowed_initiators.clone(),
            chap: chap_config(settings)?,
        },
        Arc::new(LunMap::new(vec![(0, Arc::new(lun))])),
    ))
}

/// Builds the iSCSI portal configuration: one target per export, each with
/// the export as LUN 0 (more can be added at run time).
pub fn iscsi_server(
    settings: &IscsiSettings,
    exports: &[Export],
) -> anyhow::Result<iscsi_target::server::Server> {
    use iscsi_target::login::LoginConfig;
    let mut targets = Vec::new();
    let mut luns = std::collections::HashMap::new();
    for e in exports {
        let (target, map) = iscsi_target_config(settings, &e.name, Arc::clone(&e.device))?;
        luns.insert(target.name.clone(), map);
        targets.push(target);
    }
    let login = LoginConfig {
        targets,
        discovery_chap: if settings.discovery_chap {
            chap_config(settings)?
        } else {
            None
        },
        ..LoginConfig::default()
    };
    Ok(iscsi_target::server::Server::new(
        iscsi_target::server::ServerConfig { login, luns },
    ))
}

/// Serves `config` until SIGINT or SIGTERM, then drains and flushes.
/// `on_listening` is told each bound address with its protocol (`nbd`
/// with `IP:PORT` or `unix:PATH`, `iscsi` with `IP:PORT`).
pub async fn run(
    config: ServeConfig,
    mut on_listening: impl FnMut(&str, &str),
) -> anyhow::Result<()> {
    config.validate()?;
    let cache = config.cache.as_ref().map(open_cache).transpose()?;
    let mut exports = Vec::new();
    let mut served = Vec::new();
    for e in &config.exports {
        let (export, s) = open_export(e, cache.as_ref())?;
        exports.push(export);
        served.push(s);
    }
    let mut server_config = ServerConfig::default();
    if let Some(tls) = &config.tls {
        server_config.tls = Some(nbd_server::load_tls_config(&tls.cert, &tls.key)?);
        server_config.tls_mode = match tls.mode {
            TlsPolicy::On => TlsMode::On,
            TlsPolicy::Require => TlsMode::Require,
        };
    }
    let iscsi = config
        .iscsi
        .as_ref()
        .map(|settings| iscsi_server(settings, &exports))
        .transpose()?;
    let server = Server::new(exports, server_config)?;

    // NBD listens on its default address unless only iSCSI was asked for.
    let iscsi_only = config.iscsi.as_ref().is_some_and(|i| !i.listen.is_empty());
    let listen = if config.listen.is_empty() && !iscsi_only {
        vec![ListenAddr::Tcp(DEFAULT_NBD_ADDR.to_owned())]
    } else {
        config.listen.clone()
    };
    let mut tasks = ListenerTasks::new();
    let (bound, sockets) = serve_nbd(&server, &listen, &mut tasks).await?;
    for shown in &bound {
        tracing::info!(address = %shown, "listening for NBD clients");
        on_listening("nbd", shown);
    }
    if let (Some(target), Some(settings)) = (&iscsi, &config.iscsi) {
        let listen = if settings.listen.is_empty() {
            vec![crate::config::DEFAULT_ISCSI_ADDR.to_owned()]
        } else {
            settings.listen.clone()
        };
        for shown in serve_iscsi(target, &listen, &mut tasks).await? {
            tracing::info!(address = %shown, "listening for iSCSI initiators");
            on_listening("iscsi", &shown);
        }
    }

    let outcome = tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(signal = signal?, "shutting down: finishing in-flight requests");
            // A second signal means "now": the image's page cache survives
            // the process, only requests still in flight are cut off.
            tokio::spawn(async {
                if let Ok(signal) = nth_shutdown_signal(2).await {
                    tracing::warn!(signal, "second signal: exiting without waiting");
                    std::process::exit(130);
                }
            });
            Ok(())
        }
        Some(done) = tasks.join_next() => match done {
            Ok(r) => r,
            Err(e) => Err(anyhow::Error::from(e)),
        },
    };
    if let Some(target) = &iscsi {
        // Sessions end first so their in-flight commands finish before
        // the final flush below.
        target.shutdown();
        if !target.drain(DRAIN_TIMEOUT).await {
            tracing::warn!("iSCSI sessions still busy at shutdown");
        }
    }
    server.shutdown();
    let drained = server.drain(DRAIN_TIMEOUT).await;
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    for s in &served {
        let snapshot = s.stats.snapshot();
        tracing::info!(export = %s.name, "statistics:\n{snapshot}");
    }
    if let Some(c) = &cache {
        let st = c.cache.stats();
        tracing::info!(
            hits = st.hits,
            misses = st.misses,
            hit_rate = format!("{:.3}", st.hit_rate()),
            stored = st.stores,
            dedup_hits = st.dedup_hits,
            dedup_bytes = st.dedup_bytes,
            evictions = st.evictions,
            integrity_errors = st.integrity_errors,
            fill_rate = format!("{:.3}", st.fill_rate()),
            "cache statistics"
        );
    }
    drained.context("flushing exports at shutdown")?;
    outcome
}

/// SIGTERM and SIGINT as they arrive: how many so far, and the last one.
static SIGNALS: std::sync::OnceLock<tokio::sync::watch::Receiver<(u64, &'static str)>> =
    std::sync::OnceLock::new();

/// Catches SIGTERM and SIGINT from now on (`main` calls it first thing):
/// a signal that arrives while a command still binds and announces its
/// listeners, before anything awaits it, is then kept for
/// [`shutdown_signal`] rather than killing the process unhandled.
pub fn install_shutdown_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if SIGNALS.get().is_some() {
        return Ok(());
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::watch::channel((0, ""));
    if SIGNALS.set(rx).is_ok() {
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                tx.send_modify(|(n, last)| {
                    *n += 1;
                    *last = name;
                });
            }
        });
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT since
/// [`install_shutdown_signals`] (installing it if needed), naming it.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    nth_shutdown_signal(1).await
}

/// Resolves once `n` SIGTERMs or SIGINTs have arrived, naming the last.
pub async fn nth_shutdown_signal(n: u64) -> anyhow::Result<&'static str> {
    install_shutdown_signals()?;
    let mut rx = SIGNALS.get().expect("installed just above").clone();
    let seen = rx
        .wait_for(|(count, _)| *count >= n)
        .await
        .map_err(|_| anyhow::anyhow!("the signal watcher stopped"))?;
    Ok(seen.1)
}
