//! `ferry edge`: attach to a volume of an origin and serve it over NBD
//! and/or iSCSI, reading through the local cache and absorbing writes in
//! the journal.
//! `ferry edge flush` / `ferry edge status` talk to a running edge through
//! its control socket.
//!
//! With local-only ranges (`--local-only`, `--isolated`) the stack is
//! `Stats -> LocalOverlay -> EdgeDevice`: writes inside the ranges stay in
//! `<cache-dir>/overlay-<volume>.img` and are never shipped; reads there
//! come from the overlay where it was written, else the journal, cache and
//! origin.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blockcore::{BlockDevice, LocalOverlay, LocalRanges, Stats};
use cache::{Cache, CacheConfig};
use edge::{EdgeConfig, EdgeDevice, EdgeLinkConfig, EdgeStatus, LinkClient};
use journal::{Journal, JournalOptions};
use nbd_server::{Export, Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::{read_key_file, ListenAddr, DEFAULT_NBD_ADDR};

/// What `ferry edge` was asked to do.
#[derive(Debug, Clone)]
pub struct EdgeArgs {
    pub origin: String,
    pub volume: String,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub cache_memory: u64,
    pub journal_size: u64,
    pub rpo: Duration,
    pub nbd: Vec<ListenAddr>,
    /// iSCSI portals; the volume is LUN 0 of `iqn.2026-11.dev.ferry:VOLUME`.
    pub iscsi: Vec<String>,
    /// Ranges whose writes stay in a local overlay, never shipped.
    pub local_only: Option<LocalRanges>,
    pub psk_file: Option<PathBuf>,
    pub no_tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub control: Option<PathBuf>,
    pub request_timeout: Duration,
    pub edge_id: Option<String>,
}

/// The control socket's default path for a volume.
pub fn default_control(cache_dir: &Path, volume: &str) -> PathBuf {
    cache_dir.join(format!("edge-{volume}.sock"))
}

/// The edge device with a local-only overlay in front.
pub type EdgeOverlay = LocalOverlay<Arc<EdgeDevice>>;

/// The overlay image of a volume; its metadata sits next to it
/// (`overlay-VOLUME.meta`).
pub fn overlay_path(cache_dir: &Path, volume: &str) -> PathBuf {
    cache_dir.join(format!("overlay-{volume}.img"))
}

/// A running edge: the device, its NBD and iSCSI servers, its control
/// socket.
pub struct RunningEdge {
    pub device: Arc<EdgeDevice>,
    /// The local-only overlay, when ranges were given.
    pub overlay: Option<Arc<EdgeOverlay>>,
    pub server: Server,
    pub listeners: Vec<String>,
    pub iscsi: Option<iscsi_target::server::Server>,
    pub iscsi_listeners: Vec<String>,
    pub control: PathBuf,
    /// NBD Unix sockets, removed at exit.
    sockets: Vec<PathBuf>,
    tasks: crate::serve::ListenerTasks,
}

/// Attaches and starts serving; returns once listening. Writes to
/// `args.local_only` stay in a local overlay that is never shipped.
pub async fn start(args: &EdgeArgs) -> anyhow::Result<RunningEdge> {
    let tls = match (&args.tls_ca, args.no_tls) {
        (Some(ca), false) => {
            let identity = match (&args.tls_cert, &args.tls_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                (None, None) => None,
                _ => bail!("--tls-cert and --tls-key go together"),
            };
            let config = link::tls::client_config(ca, identity)?;
            let host = args.tls_server_name.clone().unwrap_or_else(|| {
                args.origin
                    .rsplit_once(':')
                    .map_or(args.origin.as_str(), |(h, _)| h)
                    .trim_matches(|c| c == '[' || c == ']')
                    .to_owned()
            });
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| anyhow::anyhow!("{host:?} is not a valid TLS server name"))?;
            Some((config, name))
        }
        (None, true) => None,
        (Some(_), true) => bail!("--no-tls conflicts with --tls-ca"),
        (None, false) => bail!(
            "the link needs TLS: give --tls-ca (the CA of the origin's certificate), or \
             --no-tls on both ends for a trusted network"
        ),
    };
    let psk = args
        .psk_file
        .as_deref()
        .map(read_key_file)
        .transpose()?
        .map(|k| *k);
    let mut link = EdgeLinkConfig::new(&args.origin, &args.volume);
    link.session.psk = psk;
    link.tls = tls;
    link.session.request_timeout = args.request_timeout;
    if let Some(id) = &args.edge_id {
        link.session.edge_id.clone_from(id);
    } else {
        // Stable across restarts of this edge, so the origin lets it take
        // its volume back after a crash.
        link.session.edge_id = stable_edge_id(&args.cache_dir)?;
    }
    let (client, pushes) = LinkClient::connect(link)
        .await
        .with_context(|| format!("attaching volume {} at {}", args.volume, args.origin))?;
    let a = client.attachment().clone();
    tracing::info!(volume = %args.volume, size = a.size, next_seq = a.next_seq, "attached");

    let cache_dir = args.cache_dir.clone();
    let cache_config = CacheConfig {
        chunk_size: a.chunk_size,
        capacity: args.cache_size,
        memory: args.cache_memory,
        ..CacheConfig::default()
    };
    let (key, dedup) = (a.cache_key.clone(), a.dedup_key.clone());
    let cache = tokio::task::spawn_blocking(move || {
        Cache::open_with_dedup_key(&cache_dir, &key, &dedup, &cache_config)
    })
    .await?
    .with_context(|| format!("opening the cache in {}", args.cache_dir.display()))?;
    let journal_dir = args.cache_dir.join("journals").join(&args.volume);
    let journal_opts = JournalOptions {
        capacity: args.journal_size,
        ..JournalOptions::default()
    };
    let journal = tokio::task::spawn_blocking(move || Journal::open(&journal_dir, journal_opts))
        .await?
        .context("opening the write journal")?;
    let device = Arc::new(
        EdgeDevice::start(
            client,
            pushes,
            Arc::new(cache),
            journal,
            EdgeConfig {
                rpo: args.rpo,
                ..EdgeConfig::default()
            },
        )
        .context("starting the edge device")?,
    );
    let overlay = match &args.local_only {
        None => None,
        Some(ranges) => {
            let image = overlay_path(&args.cache_dir, &args.volume);
            // Bound to the volume's epoch: a re-created volume never shows
            // through an old overlay's local data.
            let tag = format!("{}@{:016x}", args.volume, a.volume_epoch);
            let (inner, ranges) = (device.clone(), ranges.clone());
            let opened = tokio::task::spawn_blocking(move || {
                LocalOverlay::open_tagged(inner, &image, &ranges, &tag)
            })
            .await?
            .with_context(|| {
                format!(
                    "opening the local-only overlay in {}",
                    args.cache_dir.display()
                )
            })?;
            Some(Arc::new(opened))
        }
    };
    let top: Arc<dyn BlockDevice> = match &overlay {
        Some(o) => o.clone(),
        None => device.clone(),
    };
    let stats = Arc::new(Stats::new(top));
    let export = Export {
        name: args.volume.clone(),
        description: format!("{} from {}", args.volume, args.origin),
        device: stats,
    };
    let server = Server::new(vec![export.clone()], ServerConfig::default())?;
    let mut tasks = crate::serve::ListenerTasks::new();
    // Both front ends serve the same device: the journal orders their
    // writes, and each reads the other's.
    let mut iscsi_listeners = Vec::new();
    let iscsi = if args.iscsi.is_empty() {
        None
    } else {
        crate::config::check_iscsi_name(&args.volume)?;
        let settings = crate::config::IscsiSettings {
            listen: args.iscsi.clone(),
            ..Default::default()
        };
        let target = crate::serve::iscsi_server(&settings, std::slice::from_ref(&export))?;
        iscsi_listeners = crate::serve::serve_iscsi(&target, &args.iscsi, &mut tasks).await?;
        Some(target)
    };
    // NBD listens on its default address unless only iSCSI was asked for.
    let listen = if args.nbd.is_empty() && args.iscsi.is_empty() {
        vec![ListenAddr::Tcp(DEFAULT_NBD_ADDR.into())]
    } else {
        args.nbd.clone()
    };
    let (listeners, sockets) = crate::serve::serve_nbd(&server, &listen, &mut tasks).await?;
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| default_control(&args.cache_dir, &args.volume));
    let control_listener = crate::serve::bind_unix(&control)
        .with_context(|| format!("control socket {}", control.display()))?;
    let dev = device.clone();
    let ov = overlay.clone();
    tasks.spawn(async move { serve_control(control_listener, dev, ov).await });
    Ok(RunningEdge {
        device,
        overlay,
        server,
        listeners,
        iscsi,
        iscsi_listeners,
        control,
        sockets,
        tasks,
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

impl std::fmt::Debug for RunningEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningEdge")
            .field("listeners", &self.listeners)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl RunningEdge {
    /// Serves until a signal, then drains iSCSI and NBD clients, flushes the journal
    /// (durably: unshipped writes stay in it for the next start) and exits.
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
        if let Some(target) = &self.iscsi {
            target.shutdown();
            if !target.drain(Duration::from_secs(30)).await {
                tracing::warn!("iSCSI sessions still busy at shutdown");
            }
        }
        self.server.shutdown();
        let drained = self.server.drain(Duration::from_secs(30)).await;
        let _ = std::fs::remove_file(&self.control);
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
        let status = self.device.status();
        tracing::info!("edge status at exit:\n{}", format_status(&status));
        drained.context("flushing the journal at shutdown")?;
        outcome
    }
}

async fn serve_control(
    listener: UnixListener,
    dev: Arc<EdgeDevice>,
    overlay: Option<Arc<EdgeOverlay>>,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let dev = dev.clone();
        let overlay = overlay.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match line.trim() {
                    "flush" => match flush_all(&dev, overlay.as_deref()).await {
                        Ok(()) => "ok\n".to_owned(),
                        Err(e) => format!("error {e}\n"),
                    },
                    "status" => format!(
                        "{}{}ok\n",
                        format_status(&dev.status()),
                        overlay.as_deref().map(format_overlay).unwrap_or_default()
                    ),
                    other => format!("error unknown command {other:?}\n"),
                };
                if w.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Ships every journaled write, and makes the local-only overlay durable
/// (it is never shipped).
async fn flush_all(dev: &EdgeDevice, overlay: Option<&EdgeOverlay>) -> anyhow::Result<()> {
    dev.drain().await?;
    if let Some(o) = overlay {
        o.flush().await?;
    }
    Ok(())
}

/// The overlay's status lines.
pub fn format_overlay(o: &EdgeOverlay) -> String {
    let local: u64 = o.ranges().iter().map(|r| r.end - r.start).sum();
    let allocated = o
        .allocated_bytes()
        .map_or_else(|e| format!("unknown ({e})"), |b| b.to_string());
    format!("local_only_bytes: {local}\noverlay_allocated_bytes: {allocated}\n")
}

/// The status as `key: value` lines.
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
         pushes_dropped: {}\n",
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
    )
}

/// Sends one control command to a running edge and returns its reply
/// (without the final `ok`), failing on `error`.
pub async fn control(path: &Path, command: &str) -> anyhow::Result<String> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("connecting to the edge's control socket {}", path.display()))?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{command}\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let mut out = String::new();
    while let Some(line) = lines.next_line().await? {
        if line == "ok" {
            return Ok(out);
        }
        if let Some(e) = line.strip_prefix("error ") {
            bail!("the edge says: {e}");
        }
        out.push_str(&line);
        out.push('\n');
    }
    bail!("the edge closed the control socket without answering")
}
