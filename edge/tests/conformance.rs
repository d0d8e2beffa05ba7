//! `EdgeDevice` held to the blockcore conformance suite: an origin in
//! process, the edge's real cache and journal, batches shipping in the
//! background while the suite's reads, writes, trims and flushes run (a
//! short RPO and small batches keep the shipper busy), and a sequential
//! read of a whole volume through group pushes checked byte for byte.

use std::sync::Arc;
use std::time::Duration;

use blockcore::{BlockDevice, MemDevice};
use cache::{Cache, CacheConfig};
use edge::{EdgeConfig, EdgeDevice, EdgeLinkConfig, LinkClient};
use journal::{Journal, JournalOptions};
use origin::{Origin, OriginConfig};
use tokio::net::TcpListener;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An origin serving `image` as "vol" and an edge attached to it, with
/// its state in `dir`. The temporary directory must outlive the device.
async fn edge_over(
    image: Arc<dyn BlockDevice>,
    dir: &std::path::Path,
    chunk: u32,
    group: u32,
    rpo: Duration,
) -> EdgeDevice {
    let mut config = OriginConfig::default();
    config.session.chunk_size = chunk;
    config.session.group_size = group;
    let origin = Arc::new(
        Origin::open(&dir.join("origin"), vec![("vol".into(), image)], config)
            .await
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(origin::serve(origin, listener, None));
    let mut link = EdgeLinkConfig::new(addr.to_string(), "vol");
    link.session.request_timeout = Duration::from_secs(10);
    let (client, pushes) = LinkClient::connect(link).await.unwrap();
    let a = client.attachment().clone();
    let cache_dir = dir.join("cache");
    let cache = Cache::open_with_dedup_key(
        &cache_dir,
        &a.cache_key,
        &a.dedup_key,
        &CacheConfig {
            chunk_size: a.chunk_size,
            capacity: 64 * u64::from(a.chunk_size),
            memory: 8 * u64::from(a.chunk_size),
            ..CacheConfig::default()
        },
    )
    .unwrap();
    let journal = Journal::open(
        dir.join("journal"),
        JournalOptions {
            capacity: 8 << 20,
            segment_size: 2 << 20,
            max_write: 1 << 20,
            ..JournalOptions::default()
        },
    )
    .unwrap();
    EdgeDevice::start(
        client,
        pushes,
        Arc::new(cache),
        journal,
        EdgeConfig {
            rpo,
            batch_bytes: 64 << 10,
            ..EdgeConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn conformance_with_batches_shipping_underneath() {
    let rt = runtime();
    let dirs = std::sync::Mutex::new(Vec::new());
    blockcore::conformance::run_with(
        blockcore::conformance::Settings {
            cases: 24,
            max_steps: 40,
        },
        || {
            let dir = tempfile::tempdir().unwrap();
            let dev = rt.block_on(edge_over(
                Arc::new(MemDevice::new(300_000)),
                dir.path(),
                4096,
                64 << 10,
                Duration::from_millis(20),
            ));
            dirs.lock().unwrap().push(dir);
            dev
        },
    );
}

fn pattern(len: usize) -> Vec<u8> {
    testkit::pattern(1, len)
}

#[test]
fn a_sequential_read_through_group_pushes_is_exact() {
    let rt = runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let content = pattern(8 << 20);
        let dev = edge_over(
            Arc::new(MemDevice::from_bytes(&content)),
            dir.path(),
            64 << 10,
            1 << 20,
            Duration::from_secs(1),
        )
        .await;
        // Twice: cold (pushes race the reads), then from the cache.
        for round in 0..2 {
            for off in (0..content.len()).step_by(256 << 10) {
                let got = dev.read(off as u64, 256 << 10).await.unwrap();
                assert!(
                    got[..] == content[off..off + (256 << 10)],
                    "round {round}: data differs at {off}"
                );
            }
        }
        let st = dev.status();
        assert!(st.link.link.bytes_pushed > 0, "{st:?}");
    });
}

/// The case the suite reaches only by luck: a chunk cached from the
/// origin, then written, shipped and acknowledged, must be read back new
/// (its cached copy dropped when the batch was applied), and the origin
/// must hold it.
#[test]
fn a_cached_chunk_written_and_shipped_reads_back_new() {
    let rt = runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let content = pattern(4 << 20);
        let image = Arc::new(MemDevice::from_bytes(&content));
        let dev = edge_over(
            image.clone(),
            dir.path(),
            64 << 10,
            1 << 20,
            Duration::from_secs(30),
        )
        .await;
        for round in 0..3u8 {
            let at = (1 << 20) + u64::from(round) * 4096;
            // Cached (and its group pushed), then overwritten in part.
            let _ = dev.read(at & !0xffff, 64 << 10).await.unwrap();
            let new = bytes::Bytes::from(vec![0xc0 | round; 4096]);
            dev.write(at, new.clone(), blockcore::WriteFlags::default())
                .await
                .unwrap();
            dev.flush().await.unwrap();
            dev.drain().await.unwrap();
            assert!(
                dev.read(at, 4096).await.unwrap() == new,
                "round {round}: the edge serves stale data"
            );
            assert!(
                image.read(at, 4096).await.unwrap() == new,
                "round {round}: the origin lacks the write"
            );
            // The rest of the chunk is the origin's old data.
            let whole = dev.read(at & !0xffff, 64 << 10).await.unwrap();
            let o = usize::try_from(at & !0xffff).unwrap();
            let mut want = content[o..o + (64 << 10)].to_vec();
            for r in 0..=round {
                let p = usize::try_from(u64::from(r) * 4096).unwrap();
                want[p..p + 4096].fill(0xc0 | r);
            }
            assert!(whole[..] == want[..], "round {round}: chunk differs");
        }
        let st = dev.status();
        assert_eq!(st.batches_shipped, 3, "{st:?}");
    });
}
