//! `ferry demo`: ferry's main job on one machine. It makes a sparse demo
//! disk, serves it from an origin, joins an edge to it through an emulated
//! WAN link (25 ms each way, 100 Mbit/s), exports the edge over NBD, prints
//! how to connect, and shows the edge's live status until Ctrl-C.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use std::sync::Arc;
use std::time::Duration;

use blockcore::{BlockDevice, FileDevice, OpenOptions};
use linkemu::{LinkConfig, LinkEmulator};
use origin::{Origin, OriginConfig};

use crate::config::ListenAddr;
use crate::edge::config::{EdgeFile, VolumeSpec};
use crate::edge::{EdgeStart, Slot};

/// Builds a sparse image of `size_mib` MiB: a readable label in the first
/// sector, a few patterned data extents, holes everywhere else, so `nbdinfo
/// --map` and `qemu-img map` have something to show.
pub fn make_demo_image(path: &Path, size_mib: u64) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let size = size_mib * 1024 * 1024;
    file.set_len(size)?;
    let label = format!(
        "ferry demo disk: {size_mib} MiB, sparse. Data at 0, 1/4, 1/2 and 3/4 of the disk; holes elsewhere.\n"
    );
    file.write_all_at(label.as_bytes(), 0)?;
    let extent: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    for quarter in 1..4 {
        let offset = size / 4 * quarter;
        let len = extent
            .len()
            .min(usize::try_from(size - offset).unwrap_or(usize::MAX));
        file.write_all_at(&extent[..len], offset)?;
    }
    file.sync_all()?;
    Ok(())
}

/// Serves the demo until Ctrl-C.
pub async fn run(
    dir: Option<PathBuf>,
    size_mib: u64,
    listen: Vec<ListenAddr>,
) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("ferry-demo"));
    // Each run starts from scratch: a rebuilt image, a fresh origin state,
    // cache and journal.
    for sub in ["origin-state", "edge"] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = dir.join("demo.img");
    make_demo_image(&image, size_mib)?;

    // The origin, on premises.
    let device: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(&image, &OpenOptions::default())
            .with_context(|| format!("opening {}", image.display()))?,
    );
    let origin = Arc::new(
        Origin::open(
            &dir.join("origin-state"),
            vec![("demo".into(), device)],
            OriginConfig::default(),
        )
        .await?,
    );
    let origin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin_listener.local_addr()?;
    tokio::spawn(origin::serve(origin, origin_listener, None));
    // The WAN between them.
    let wan = Arc::new(
        LinkEmulator::start(
            "127.0.0.1:0".parse().expect("address"),
            origin_addr,
            LinkConfig::new(Duration::from_millis(25)).with_bandwidth(100_000_000 / 8),
        )
        .await?,
    );
    // The edge, in the cloud.
    let mut file = EdgeFile::new(dir.join("edge"));
    file.cache_size = crate::config::ByteSize(256 << 20);
    file.cache_memory = crate::config::ByteSize(64 << 20);
    file.nbd = listen;
    file.link.no_tls = true;
    file.volumes.push(VolumeSpec {
        journal_size: crate::config::ByteSize(256 << 20),
        rpo_secs: 5.0,
        ..VolumeSpec::new("demo", wan.local_addr().to_string())
    });
    let edge = crate::edge::start(EdgeStart {
        file,
        file_path: None,
        attach_first: true,
    })
    .await?;
    {
        let mut out = std::io::stdout().lock();
        for l in &edge.listeners {
            let _ = writeln!(out, "listening nbd {l}");
        }
        let uri = match edge.listeners[0].strip_prefix("unix:") {
            Some(path) => format!("nbd+unix:///demo?socket={path}"),
            None => format!("nbd://{}/demo", edge.listeners[0]),
        };
        let _ = writeln!(
            out,
            "\nferry demo: {image} ({size_mib} MiB, sparse) is served by an origin; an edge\n\
             reaches it through an emulated WAN (25 ms each way, 100 Mbit/s) and exports it\n\
             as \"demo\", reading through an encrypted cache and journaling writes\n\
             (shipped back every 5 s). Try, from another terminal:\n  \
               nbdinfo {uri}\n  \
               qemu-io -f raw -c 'read -v 0 128' {uri}\n  \
               qemu-img convert -p -O qcow2 {uri} /tmp/demo-copy.qcow2\n  \
               qemu-io -f raw -c 'write -P 0x5a 0 1M' {uri}\n  \
               ferry status --api {api}\n  \
               ferry flush --api {api}\n  \
               qemu-system-x86_64 -drive file={uri},format=raw,if=virtio ...\n\
             Ctrl-C stops it; the status line below refreshes every 5 s.",
            image = image.display(),
            api = edge.api.display(),
        );
        let _ = out.flush();
    }
    let Some((_, Slot::Up(served))) = edge.daemon.volumes().into_iter().next() else {
        anyhow::bail!("the demo volume did not attach");
    };
    let shown = wan.clone();
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.tick().await;
        loop {
            every.tick().await;
            let Some(s) = served.status() else {
                continue;
            };
            let l = shown.stats();
            let age = s
                .journal
                .oldest_unshipped_age
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
            println!(
                "status: cache hit ratio {:.2} ({} hits), WAN {:.1} MiB to the edge / {:.1} MiB to the origin, \
                 journal {} writes unshipped (oldest {age}), {} batches shipped",
                s.cache.hit_rate(),
                s.cache.hits,
                mib(l.bytes_to_client),
                mib(l.bytes_to_target),
                s.journal.unshipped_records,
                s.batches_shipped,
            );
        }
    });
    let result = edge.run_until_signal().await;
    ticker.abort();
    drop(wan);
    result
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}
