//! `ferry demo`: make a small sparse demo disk and serve it, printing how to
//! connect real clients to it.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{
    ByteSize, CacheSettings, CacheWriteMode, Engine, ExportConfig, ListenAddr, ServeConfig,
};

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

/// Writes a fresh random 32-byte key, readable by the owner only.
fn write_random_key(path: &Path) -> anyhow::Result<()> {
    use ring::rand::{SecureRandom, SystemRandom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(&mut key[..])
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&key[..]))
        .with_context(|| format!("writing {}", path.display()))
}

/// Serves the demo image until Ctrl-C.
pub async fn run(
    dir: Option<PathBuf>,
    size_mib: u64,
    listen: Vec<ListenAddr>,
) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("ferry-demo"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = dir.join("demo.img");
    make_demo_image(&image, size_mib)?;
    // The image was just rebuilt, so a cache from an earlier run (which may
    // hold that run's writes) no longer matches it: start a fresh one, with
    // a fresh key.
    let cache_dir = dir.join("cache");
    let key_file = dir.join("cache.key");
    if cache_dir.exists() {
        std::fs::remove_dir_all(&cache_dir)
            .with_context(|| format!("removing the old demo cache {}", cache_dir.display()))?;
    }
    write_random_key(&key_file)?;
    let config = ServeConfig {
        listen,
        tls: None,
        cache: Some(CacheSettings {
            dir: cache_dir.clone(),
            size: ByteSize(256 << 20),
            key_file: key_file.clone(),
            chunk_size: ByteSize(64 << 10),
            write_mode: CacheWriteMode::Through,
        }),
        exports: vec![ExportConfig {
            name: "demo".into(),
            path: image.clone(),
            description: "ferry demo disk".into(),
            read_only: false,
            readahead: true,
            engine: Engine::Auto,
        }],
    };
    crate::serve::run(config, |addr| {
        let uri = match addr.strip_prefix("unix:") {
            Some(path) => format!("nbd+unix:///demo?socket={path}"),
            None => format!("nbd://{addr}/demo"),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "listening nbd {addr}\n\n\
             ferry demo: serving {image} ({size_mib} MiB, sparse) as export \"demo\"\n\
             Try, from another terminal:\n  \
               nbdinfo {uri}\n  \
               nbdinfo --map {uri}\n  \
               qemu-io -f raw -c 'read -v 0 128' {uri}\n  \
               qemu-img convert -p -O qcow2 {uri} /tmp/demo-copy.qcow2\n  \
               qemu-system-x86_64 -drive file={uri},format=raw,if=virtio ...\n\
             Reads go through an encrypted 256 MiB cache in {cache}.\n\
             Ctrl-C stops the server (in-flight requests finish, data is flushed); then\n  \
               ferry cache inspect {cache} --verify --key-file {key}",
            image = image.display(),
            cache = cache_dir.display(),
            key = key_file.display(),
        );
        let _ = out.flush();
    })
    .await
}
