//! `ferry origin`: serve raw images or existing NBD exports to edges over
//! the replication link.

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
    pub psk_file: Option<PathBuf>,
    pub no_tls: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub engine: Engine,
}

/// A volume's backing device: an NBD export when `source` is an NBD URI
/// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, e.g. a
/// `qemu-nbd` serving a qcow2), else a raw image file.
async fn open_volume(source: &Path, engine: Engine) -> anyhow::Result<Arc<dyn BlockDevice>> {
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

/// Serves until SIGINT/SIGTERM. `on_listening` gets the bound address.
pub async fn run(args: OriginArgs, on_listening: impl FnOnce(&str)) -> anyhow::Result<()> {
    if args.exports.is_empty() {
        bail!("nothing to serve: give --export NAME=PATH");
    }
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
    let mut volumes: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for (name, path) in &args.exports {
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
    on_listening(&local);
    let accept = origin::serve(origin, listener, tls);
    tokio::select! {
        r = accept => r.context("accepting edges")?,
        s = crate::serve::shutdown_signal() => {
            tracing::info!(signal = s?, "origin shutting down");
        }
    }
    Ok(())
}
