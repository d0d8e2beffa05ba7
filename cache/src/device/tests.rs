use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicUsize;

use blockcore::conformance::{self, Settings};
use blockcore::{FileDevice, MemDevice, OpenOptions};
use tokio::sync::Notify;

use super::*;
use crate::index::{Durability, IndexOptions};
use crate::store::CacheConfig;

const CHUNK: u32 = 4096;
const MASTER: [u8; 32] = [0x33; 32];

fn cache_in(dir: &Path, chunks: u64) -> Arc<Cache> {
    let config = CacheConfig {
        chunk_size: CHUNK,
        capacity: chunks * u64::from(CHUNK),
        index: IndexOptions {
            block_cache_bytes: 2 << 20,
            write_buffer_bytes: 1 << 20,
            ..IndexOptions::default()
        },
        fill_durability: Durability::Async,
        memory: 0,
    };
    Arc::new(Cache::open(dir, &MASTER, &config).unwrap())
}

use testkit::pattern;

/// A [`CachedDevice`] that also resizes its cache to a random tiny capacity
/// every few operations, so the conformance suite runs under constant
/// eviction and resizing.
#[derive(Debug)]
struct Resizing<D> {
    dev: CachedDevice<D>,
    rng: std::sync::Mutex<testkit::Rng>,
}

impl<D: BlockDevice + 'static> Resizing<D> {
    fn new(dev: CachedDevice<D>, seed: u64) -> Self {
        Self {
            dev,
            rng: std::sync::Mutex::new(testkit::rng(seed)),
        }
    }

    async fn maybe_resize(&self) {
        let r = self.rng.lock().unwrap().u64(..);
        if r.is_multiple_of(4) {
            let cache = self.dev.cache().clone();
            let chunks = 1 + (r >> 8) % 6;
            tokio::task::spawn_blocking(move || cache.resize(chunks * u64::from(CHUNK)))
                .await
                .unwrap()
                .unwrap();
        }
    }
}

#[async_trait]
impl<D: BlockDevice + 'static> BlockDevice for Resizing<D> {
    fn info(&self) -> DeviceInfo {
        self.dev.info()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.maybe_resize().await;
        self.dev.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.maybe_resize().await;
        self.dev.write(offset, data, flags).await
    }
    async fn flush(&self) -> Result<()> {
        self.dev.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.maybe_resize().await;
        self.dev.trim(offset, len, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.dev.write_zeroes(offset, len, flags).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.dev.extents(offset, len).await
    }
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.maybe_resize().await;
        self.dev.prefetch(offset, len).await
    }
}

const SIZE: u64 = 300_000; // not a multiple of the chunk size

#[test]
fn conformance_over_memory_with_tiny_resizing_caches() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    for mode in [WriteMode::Through, WriteMode::Around] {
        conformance::run_with(
            Settings {
                cases: 24,
                max_steps: 40,
            },
            || {
                let i = n.fetch_add(1, Ordering::Relaxed);
                let cache = cache_in(&dir.path().join(i.to_string()), 1 + i as u64 % 4);
                let mem = MemDevice::from_bytes(&pattern(i as u64, usize::try_from(SIZE).unwrap()));
                Resizing::new(
                    CachedDevice::new(mem, cache, "vol", mode).unwrap(),
                    i as u64,
                )
            },
        );
    }
}

#[test]
fn conformance_over_a_file_with_tiny_resizing_caches() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    conformance::run_with(
        Settings {
            cases: 24,
            max_steps: 40,
        },
        || {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let img = dir.path().join(format!("img-{i}"));
            std::fs::write(&img, pattern(i as u64, usize::try_from(SIZE).unwrap())).unwrap();
            let file = FileDevice::open(&img, &OpenOptions::default()).unwrap();
            let cache = cache_in(&dir.path().join(format!("cache-{i}")), 2);
            Resizing::new(
                CachedDevice::new(file, cache, "vol", WriteMode::Through).unwrap(),
                i as u64,
            )
        },
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn second_read_is_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let cache = cache_in(dir.path(), 128);
        let content = pattern(1, usize::try_from(SIZE).unwrap());
        let dev = CachedDevice::new(
            MemDevice::from_bytes(&content),
            cache,
            "v",
            WriteMode::Through,
        )
        .unwrap();
        assert_eq!(dev.read(0, content.len()).await.unwrap(), content);
        dev.settle().await;
        let inner_after_first = dev.stats().bytes_from_inner;
        assert_eq!(inner_after_first, SIZE);
        // Unaligned reads across chunk boundaries, all hits now.
        for (off, len) in [(0, content.len()), (100, 5000), (4095, 2), (SIZE - 7, 7)] {
            let got = dev.read(off, len).await.unwrap();
            assert_eq!(got[..], content[usize::try_from(off).unwrap()..][..len]);
        }
        assert_eq!(dev.stats().bytes_from_inner, inner_after_first);
        let s = dev.cache_stats();
        assert_eq!(s.used_slots, SIZE.div_ceil(u64::from(CHUNK)));
        assert!(s.hits >= s.used_slots, "{s:?}");
    });
}

#[test]
fn writes_update_or_drop_cached_chunks() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        for (i, mode) in [WriteMode::Through, WriteMode::Around]
            .into_iter()
            .enumerate()
        {
            let cache = cache_in(&dir.path().join(i.to_string()), 128);
            let dev = CachedDevice::new(MemDevice::new(64 * 1024), cache, "v", mode).unwrap();
            dev.read(0, 64 * 1024).await.unwrap();
            dev.settle().await;
            // A whole chunk and a partial one.
            let whole = Bytes::from(pattern(2, 4096));
            dev.write(8192, whole.clone(), WriteFlags::default())
                .await
                .unwrap();
            dev.write(20_000, Bytes::from_static(b"abc"), WriteFlags::default())
                .await
                .unwrap();
            dev.settle().await;
            let before = dev.stats().bytes_from_inner;
            assert_eq!(dev.read(8192, 4096).await.unwrap(), whole);
            let from_inner = dev.stats().bytes_from_inner - before;
            match mode {
                WriteMode::Through => assert_eq!(from_inner, 0, "whole chunk written through"),
                WriteMode::Around => assert_eq!(from_inner, 4096, "written around"),
            }
            assert_eq!(&dev.read(20_000, 3).await.unwrap()[..], b"abc");
            dev.write_zeroes(8000, 300, ZeroFlags::default())
                .await
                .unwrap();
            assert!(dev.read(8000, 300).await.unwrap().iter().all(|&b| b == 0));
            dev.trim(0, 64 * 1024, WriteFlags::default()).await.unwrap();
            assert!(dev
                .read(0, 64 * 1024)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0));
        }
    });
}

/// A device whose reads wait at a gate while it is closed.
#[derive(Debug)]
struct Gated {
    inner: MemDevice,
    closed: std::sync::atomic::AtomicBool,
    arrived: Notify,
    open: Notify,
}

#[async_trait]
impl BlockDevice for Gated {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        // Read first, then wait: the data is the old content.
        let data = self.inner.read(offset, len).await?;
        if self.closed.load(Ordering::Acquire) {
            let opened = self.open.notified();
            self.arrived.notify_one();
            opened.await;
        }
        Ok(data)
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.inner.trim(offset, len, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
}

#[test]
fn a_fill_racing_a_write_never_caches_stale_data() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        for (i, mode) in [WriteMode::Through, WriteMode::Around]
            .into_iter()
            .enumerate()
        {
            let cache = cache_in(&dir.path().join(i.to_string()), 16);
            let gated = Gated {
                inner: MemDevice::from_bytes(&pattern(3, 16384)),
                closed: true.into(),
                arrived: Notify::new(),
                open: Notify::new(),
            };
            let dev = Arc::new(CachedDevice::new(gated, cache, "v", mode).unwrap());
            // A miss reads the old content and stalls before filling.
            let reader = tokio::spawn({
                let dev = dev.clone();
                async move { dev.read(0, 4096).await.unwrap() }
            });
            dev.inner().arrived.notified().await;
            // Meanwhile a write replaces chunk 0, whole and partly.
            let new = Bytes::from(pattern(4, 4096));
            dev.write(0, new.clone(), WriteFlags::default())
                .await
                .unwrap();
            dev.inner().closed.store(false, Ordering::Release);
            dev.inner().open.notify_one();
            let old = reader.await.unwrap();
            assert_eq!(old, pattern(3, 4096), "the racing read saw the old data");
            dev.settle().await;
            assert_eq!(
                dev.read(0, 4096).await.unwrap(),
                new,
                "{mode:?}: stale fill cached"
            );
        }
    });
}

#[test]
fn a_damaged_chunk_is_served_from_the_inner_device() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let cache = cache_in(dir.path(), 16);
        let content = pattern(5, 8 * 4096);
        let dev = CachedDevice::new(
            MemDevice::from_bytes(&content),
            cache.clone(),
            "v",
            WriteMode::Through,
        )
        .unwrap();
        dev.read(0, content.len()).await.unwrap();
        dev.settle().await;
        let vol = dev.volume();
        let sig = cache.index().get_mapping(vol.id, 2).unwrap().unwrap();
        let loc = cache.index().lookup_signature(&sig).unwrap().unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("data"))
            .unwrap();
        f.write_all_at(
            &[0xff; 16],
            crate::slots::HEADER_BLOCK + loc.slot * crate::slots::stride_for(CHUNK) + 1000,
        )
        .unwrap();
        assert_eq!(dev.read(0, content.len()).await.unwrap(), content);
        assert_eq!(dev.cache_stats().integrity_errors, 1);
        assert_eq!(dev.stats().bytes_from_inner, content.len() as u64 + 4096);
        dev.settle().await;
        // Repaired by the refill.
        assert!(cache.verify().unwrap().damaged.is_empty());
        assert_eq!(dev.read(8192, 4096).await.unwrap(), content[8192..12288]);
    });
}

#[test]
fn ten_clones_share_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let cache = cache_in(dir.path(), 1024);
        let template = pattern(6, 64 * 4096);
        for v in 0..10 {
            let dev = CachedDevice::new(
                MemDevice::from_bytes(&template),
                cache.clone(),
                &format!("clone-{v}"),
                WriteMode::Through,
            )
            .unwrap();
            assert_eq!(dev.read(0, template.len()).await.unwrap(), template);
            dev.settle().await;
        }
        let s = cache.stats();
        assert_eq!(s.used_slots, 64);
        assert_eq!(s.dedup_hits, 9 * 64);
        assert_eq!(s.dedup_bytes, 9 * template.len() as u64);
        let report = cache.verify().unwrap();
        assert_eq!((report.resident, report.mappings), (64, 640));
        for c in 0..64 {
            let sig = cache.signature(&template[c * 4096..(c + 1) * 4096]);
            assert!(cache.contains(&sig).unwrap());
        }
    });
}

#[test]
fn prefetch_fills_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let cache = cache_in(dir.path(), 128);
        let content = pattern(7, usize::try_from(SIZE).unwrap());
        let dev = CachedDevice::new(
            MemDevice::from_bytes(&content),
            cache,
            "v",
            WriteMode::Through,
        )
        .unwrap();
        assert!(dev.info().caps.prefetch);
        dev.prefetch(0, SIZE).await.unwrap();
        dev.settle().await;
        let fetched = dev.stats().bytes_from_inner;
        assert_eq!(fetched, SIZE);
        assert_eq!(dev.read(0, content.len()).await.unwrap(), content);
        assert_eq!(dev.stats().bytes_from_inner, fetched);
    });
}

#[test]
fn offers_are_kept_only_for_untouched_whole_chunks() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let cache = cache_in(dir.path(), 64);
        let content = pattern(8, 16 * 4096);
        let dev = CachedDevice::new(
            MemDevice::from_bytes(&content),
            cache,
            "v",
            WriteMode::Around,
        )
        .unwrap();
        // Chunks 0..8 requested; chunk 3 is written before the data
        // arrives, and the offer starts mid-chunk 0.
        let since = dev.snapshot(0, 8 * 4096);
        dev.write(
            3 * 4096 + 10,
            Bytes::from_static(b"new"),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        dev.offer(100, Bytes::copy_from_slice(&content[100..8 * 4096]), &since)
            .await;
        dev.settle().await;
        let cached: Vec<u64> = (0..8)
            .filter(|&c| dev.cache().get(dev.volume(), c).unwrap().is_some())
            .collect();
        assert_eq!(cached, vec![1, 2, 4, 5, 6, 7]);
        // invalidate drops chunks like a write would.
        dev.invalidate(4096, 2 * 4096).await.unwrap();
        assert!(dev.cache().get(dev.volume(), 1).unwrap().is_none());
        assert!(dev.cache().get(dev.volume(), 2).unwrap().is_none());
        assert!(dev.cache().get(dev.volume(), 4).unwrap().is_some());
        let mut expect = content.clone();
        expect[3 * 4096 + 10..3 * 4096 + 13].copy_from_slice(b"new");
        assert_eq!(dev.read(0, expect.len()).await.unwrap(), expect);
    });
}
