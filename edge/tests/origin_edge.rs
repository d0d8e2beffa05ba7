//! Origin and edge in one process, over loopback TCP through the WAN link
//! emulator: reads, group pushes, write batches applied exactly once, what
//! an outage does to each, detaching, and fencing an edge.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockcore::WriteEntry;
use blockcore::{BlockDevice, MemDevice};
use bytes::Bytes;
use edge::{EdgeLinkConfig, LinkClient, RemoteDevice};
use link::proto::ErrorCode;
use link::LinkError;
use linkemu::{LinkConfig, LinkEmulator};
use origin::{Origin, OriginConfig};
use tokio::net::TcpListener;

use testkit::pattern;

/// Ships batch `seq` and waits until the origin applied it.
async fn ship(client: &LinkClient, seq: u64, entries: Vec<WriteEntry>) -> Result<(), String> {
    let mut applied = client.applied();
    client.wait_batch_room().await.map_err(|e| e.to_string())?;
    client.ship(seq, entries).map_err(|e| e.to_string())?;
    applied
        .wait_for(|a| *a >= seq)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

struct Setup {
    _state: tempfile::TempDir,
    origin: Arc<Origin>,
    image: Arc<MemDevice>,
    origin_addr: SocketAddr,
    link: LinkEmulator,
    server: tokio::task::JoinHandle<()>,
}

const SIZE: usize = 8 << 20;

async fn setup(delay_ms: u64, psk: Option<[u8; 32]>) -> Setup {
    let state = tempfile::tempdir().unwrap();
    let image = Arc::new(MemDevice::from_bytes(&pattern(1, SIZE)));
    let origin = Arc::new(
        Origin::open(
            state.path(),
            vec![("vol".into(), image.clone() as Arc<dyn BlockDevice>)],
            {
                let mut c = OriginConfig::default();
                c.session.psk = psk;
                c
            },
        )
        .await
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = listener.local_addr().unwrap();
    let served = origin.clone();
    let server = tokio::spawn(async move {
        let _ = origin::serve(served, listener, None).await;
    });
    let link = LinkEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        origin_addr,
        LinkConfig::new(Duration::from_millis(delay_ms)),
    )
    .await
    .unwrap();
    Setup {
        _state: state,
        origin,
        image,
        origin_addr,
        link,
        server,
    }
}

fn edge_config(s: &Setup, psk: Option<[u8; 32]>) -> EdgeLinkConfig {
    let mut cfg = EdgeLinkConfig::new(s.link.local_addr().to_string(), "vol");
    cfg.session.psk = psk;
    cfg.session.request_timeout = Duration::from_secs(5);
    cfg.session.heartbeat = Duration::from_millis(200);
    cfg.session.dead_after = Duration::from_millis(1200);
    cfg.session.reconnect_min = Duration::from_millis(20);
    cfg.session.reconnect_max = Duration::from_millis(200);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_match_the_origin_and_groups_are_pushed() {
    let s = setup(5, None).await;
    let (client, mut pushes) = LinkClient::connect(edge_config(&s, None)).await.unwrap();
    let a = client.attachment();
    assert_eq!(a.size, SIZE as u64);
    assert_eq!(a.next_seq, 1);
    let dev = RemoteDevice::new(client.clone());
    let want = pattern(1, SIZE);
    for (off, len) in [
        (0usize, 4096usize),
        (12345, 70_000),
        (SIZE - 1, 1),
        (0, SIZE),
    ] {
        let got = dev.read(off as u64, len).await.unwrap();
        assert_eq!(got[..], want[off..off + len], "read at {off}+{len}");
    }
    // The first read (4 KiB at 0) made the origin push the rest of its
    // 1 MiB group.
    let mut pushed = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while pushed < (1 << 20) - 4096 && Instant::now() < deadline {
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(500), pushes.recv()).await {
            let o = usize::try_from(p.offset).unwrap();
            assert_eq!(p.data[..], want[o..o + p.data.len()]);
            pushed += p.data.len();
        }
    }
    assert!(pushed >= (1 << 20) - 4096, "pushed {pushed}");
    // Out of range is an error, not a hang.
    assert!(dev.read(SIZE as u64 - 10, 20).await.is_err());
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_apply_once_across_a_cut_link() {
    let s = setup(2, Some([9; 32])).await;
    let (client, _pushes) = LinkClient::connect(edge_config(&s, Some([9; 32])))
        .await
        .unwrap();
    let dev = RemoteDevice::new(client.clone());
    for seq in 1..=5u64 {
        let entries = vec![
            WriteEntry::Data {
                offset: seq * 4096,
                data: Bytes::from(vec![u8::try_from(seq).unwrap(); 4096]),
            },
            WriteEntry::Zero {
                offset: (1 << 20) + seq * 8192,
                len: 8192,
            },
        ];
        if seq == 3 {
            // Cut the link while the batch is on its way; it must still be
            // applied exactly once after the client reconnects.
            s.link.cut();
            let ship = tokio::spawn({
                let client = client.clone();
                async move { ship(&client, seq, entries).await }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.link.restore();
            tokio::time::timeout(Duration::from_secs(10), ship)
                .await
                .expect("batch 3 shipped after the link came back")
                .unwrap()
                .unwrap();
        } else {
            ship(&client, seq, entries).await.unwrap();
        }
        // Shipping the same batch again is a no-op.
        ship(&client, seq, vec![]).await.unwrap();
    }
    for seq in 1..=5u64 {
        let got = s.image.read(seq * 4096, 4096).await.unwrap();
        assert!(got.iter().all(|&b| b == u8::try_from(seq).unwrap()));
        let z = s.image.read((1 << 20) + seq * 8192, 8192).await.unwrap();
        assert!(z.iter().all(|&b| b == 0));
    }
    assert!(client.status().link.connects >= 2, "{:?}", client.status());
    // Reads work on the new link too.
    assert_eq!(dev.read(4096, 4096).await.unwrap()[0], 1);
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_reads_after_the_timeout_and_recovers() {
    let s = setup(2, None).await;
    let mut cfg = edge_config(&s, None);
    cfg.session.request_timeout = Duration::from_millis(800);
    let (client, _pushes) = LinkClient::connect(cfg).await.unwrap();
    let dev = RemoteDevice::new(client.clone());
    dev.read(0, 4096).await.unwrap();
    // A short outage: the read waits and succeeds.
    s.link.stall(true);
    let read = tokio::spawn({
        let dev = dev.clone();
        async move { dev.read(65536, 4096).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.link.stall(false);
    assert_eq!(
        read.await.unwrap().unwrap()[..],
        pattern(1, SIZE)[65536..65536 + 4096]
    );
    // An outage longer than the timeout: EIO, never zeroes, never a hang.
    s.link.cut();
    let t = Instant::now();
    let err = dev.read(1 << 20, 4096).await.unwrap_err();
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(err.to_string().contains("origin"), "{err}");
    s.link.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match dev.read(1 << 20, 4096).await {
            Ok(d) => {
                assert_eq!(d[..], pattern(1, SIZE)[1 << 20..(1 << 20) + 4096]);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
        }
    }
    let _ = s.origin_addr;
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_edge_is_refused_and_a_wrong_key_too() {
    let s = setup(1, Some([1; 32])).await;
    let (_first, _p) = LinkClient::connect(edge_config(&s, Some([1; 32])))
        .await
        .unwrap();
    let err = LinkClient::connect(edge_config(&s, Some([1; 32])))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("attached by edge"), "{err}");
    let err = LinkClient::connect(edge_config(&s, Some([2; 32])))
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("key"), "{err}");
    s.server.abort();
}

/// The cache, as far as signature replies care: content by signature.
#[derive(Default)]
struct MemStore {
    chunks: std::sync::Mutex<std::collections::HashMap<[u8; 32], Bytes>>,
}

impl edge::SignatureStore for MemStore {
    fn get(&self, sig: &[u8; 32]) -> Option<Bytes> {
        self.chunks.lock().unwrap().get(sig).cloned()
    }
}

/// A clone read after its template crosses the link as signatures: the
/// origin remembers what it sent this edge, names those chunks, and the
/// edge serves them from its store. A store that lost them falls back to
/// data, never to wrong bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_cross_the_link_as_signatures() {
    const CHUNK: usize = 64 << 10;
    let state = tempfile::tempdir().unwrap();
    let content = pattern(7, SIZE);
    let template = Arc::new(MemDevice::from_bytes(&content));
    let clone = Arc::new(MemDevice::from_bytes(&content));
    let origin = Arc::new(
        Origin::open(
            state.path(),
            vec![
                ("template".into(), template as Arc<dyn BlockDevice>),
                ("clone".into(), clone.clone() as Arc<dyn BlockDevice>),
            ],
            {
                let mut c = OriginConfig::default();
                // No group pushes: every chunk is asked for.
                c.session.group_size = 0;
                c
            },
        )
        .await
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = origin.clone();
    tokio::spawn(origin::serve(served, listener, None));
    let config = |volume: &str| {
        let mut cfg = EdgeLinkConfig::new(addr.to_string(), volume);
        cfg.session.edge_id = "edge-1".into();
        cfg.session.request_timeout = Duration::from_secs(5);
        cfg
    };
    let store = Arc::new(MemStore::default());

    // The template: all data, which the edge keeps by signature.
    let (client, _pushes) = LinkClient::connect(config("template")).await.unwrap();
    let key = keys::SignatureKey::from_dedup_key(*client.attachment().dedup_key);
    let dev = RemoteDevice::new(client.clone()).with_signatures(store.clone());
    for off in (0..SIZE).step_by(CHUNK) {
        let got = dev.read(off as u64, CHUNK).await.unwrap();
        assert_eq!(got[..], content[off..off + CHUNK]);
        store
            .chunks
            .lock()
            .unwrap()
            .insert(*key.signature(&got).as_bytes(), got);
    }
    assert_eq!(client.status().link.bytes_read, SIZE as u64);
    assert_eq!(client.status().signature_hits, 0);
    drop(dev);
    drop(client);

    // The clone: signatures only, served from the store.
    let (client, _pushes) = LinkClient::connect(config("clone")).await.unwrap();
    let dev = RemoteDevice::new(client.clone()).with_signatures(store.clone());
    let got = dev.read(0, SIZE).await.unwrap();
    assert_eq!(got[..], content[..]);
    let st = client.status();
    assert_eq!(st.link.bytes_read, 0, "{st:?}");
    assert_eq!(st.signature_hits, (SIZE / CHUNK) as u64);
    assert_eq!(
        origin
            .counters()
            .signature_bytes_saved
            .load(std::sync::atomic::Ordering::Relaxed),
        SIZE as u64
    );

    // The clone diverges at one chunk, and the store forgets another: the
    // first is new content (data), the second falls back to data.
    let changed = vec![0xa5u8; CHUNK];
    clone
        .write(
            3 * CHUNK as u64,
            Bytes::from(changed.clone()),
            blockcore::WriteFlags::default(),
        )
        .await
        .unwrap();
    store
        .chunks
        .lock()
        .unwrap()
        .remove(key.signature(&content[5 * CHUNK..6 * CHUNK]).as_bytes());
    let got = dev.read(3 * CHUNK as u64, CHUNK).await.unwrap();
    assert_eq!(got[..], changed[..]);
    let got = dev.read(5 * CHUNK as u64, CHUNK).await.unwrap();
    assert_eq!(got[..], content[5 * CHUNK..6 * CHUNK]);
    let st = client.status();
    assert_eq!(st.signature_misses, 1, "{st:?}");
    assert_eq!(st.link.bytes_read, 2 * CHUNK as u64, "{st:?}");

    // A read of many chunks the store holds all but two of (one being
    // stored in the background, say) fetches just those two.
    for c in [8, 11] {
        store.chunks.lock().unwrap().remove(
            key.signature(&content[c * CHUNK..(c + 1) * CHUNK])
                .as_bytes(),
        );
    }
    let got = dev.read(6 * CHUNK as u64, 8 * CHUNK).await.unwrap();
    assert_eq!(got[..], content[6 * CHUNK..14 * CHUNK]);
    let st = client.status();
    assert_eq!(st.signature_misses, 3, "{st:?}");
    assert_eq!(st.signature_hits, (SIZE / CHUNK) as u64 + 6, "{st:?}");
    assert_eq!(st.link.bytes_read, 4 * CHUNK as u64, "{st:?}");
    // A read that is not whole chunks is always data.
    let got = dev.read(100, 5000).await.unwrap();
    assert_eq!(got[..], content[100..5100]);
}

/// Each edge gets a cache key of its own (one edge's key opens no other
/// edge's cache), the same one every time it attaches, and the
/// deployment's dedup key, which is the same for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_get_their_own_cache_keys_and_share_the_dedup_key() {
    let s = setup(0, None).await;
    let attach = |id: &str| {
        let mut cfg = edge_config(&s, None);
        cfg.session.edge_id = id.into();
        async move {
            let (client, _pushes) = LinkClient::connect(cfg).await.unwrap();
            let a = client.attachment().clone();
            drop(client);
            a
        }
    };
    let first = attach("edge-a").await;
    // The volume is held by edge-a until its connection is gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = attach("edge-a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = attach("edge-b").await;
    assert_eq!(*first.cache_key, *again.cache_key);
    assert_ne!(*first.cache_key, *other.cache_key);
    assert_eq!(*first.dedup_key, *other.dedup_key);
    assert_ne!(*first.cache_key, *first.dedup_key);
}

/// `edge_config` for the edge with this id.
fn edge_named(s: &Setup, id: &str) -> EdgeLinkConfig {
    let mut cfg = edge_config(s, None);
    cfg.session.edge_id = id.into();
    cfg
}

/// Batch `seq`: 4 KiB of the byte `seq` at `seq * 4096`.
fn marked(seq: u64) -> Vec<WriteEntry> {
    vec![WriteEntry::Data {
        offset: seq * 4096,
        data: Bytes::from(vec![u8::try_from(seq).unwrap(); 4096]),
    }]
}

/// Whether the image holds batch `seq`'s mark.
async fn has_mark(s: &Setup, seq: u64) -> bool {
    let got = s.image.read(seq * 4096, 4096).await.unwrap();
    got.iter().all(|&b| u64::from(b) == seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_volume_can_be_attached_by_another_edge() {
    let s = setup(2, None).await;
    let (a, _pa) = LinkClient::connect(edge_named(&s, "edge-a")).await.unwrap();
    ship(&a, 1, marked(1)).await.unwrap();
    let err = LinkClient::connect(edge_named(&s, "edge-b"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("attached by edge"), "{err}");

    // Batch 2 is shipped and not waited for: the detach waits for it.
    a.ship(2, marked(2)).unwrap();
    a.detach(Duration::from_secs(5)).await.unwrap();
    assert!(has_mark(&s, 2).await, "detach left a batch behind");
    assert!(matches!(a.finished(), Some(LinkError::Detached)));
    // The origin let go before it confirmed.
    assert_eq!(s.origin.volume("vol").unwrap().holder(), None);
    // The client is done: no reconnection, and calls fail cleanly.
    assert!(matches!(
        a.read(0, 4096).await.unwrap_err(),
        LinkError::Detached
    ));
    assert!(matches!(a.ship(3, marked(3)), Err(LinkError::Detached)));
    assert!(!a.is_connected());
    let st = a.status().link;
    assert!(st.stopped.is_some() && !st.fenced, "{st:?}");
    a.detach(Duration::from_secs(1)).await.unwrap();

    let (b, _pb) = LinkClient::connect(edge_named(&s, "edge-b")).await.unwrap();
    assert_eq!(b.attachment().next_seq, 3);
    assert_eq!(b.read(2 * 4096, 4096).await.unwrap()[..], [2; 4096]);
    ship(&b, 3, marked(3)).await.unwrap();
    let c = s.origin.volume("vol").unwrap().counters();
    assert_eq!((c.attaches, c.batches_applied), (2, 3));
    s.server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_released_edge_is_refused_until_unfenced() {
    let s = setup(2, None).await;
    let (old, _p) = LinkClient::connect(edge_named(&s, "edge-old"))
        .await
        .unwrap();
    ship(&old, 1, marked(1)).await.unwrap();

    assert_eq!(s.origin.force_release("vol").unwrap(), "edge-old");
    // Whatever it still sends is refused; the origin closes its link and
    // the client stops.
    let _ = old.ship(2, marked(2));
    let _ = old.read(0, 4096).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while old.finished().is_none() {
        assert!(Instant::now() < deadline, "{:?}", old.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fenced = |e: &LinkError| {
        matches!(
            e,
            LinkError::Refused {
                code: ErrorCode::Fenced,
                ..
            }
        )
    };
    assert!(old.finished().is_some_and(|e| fenced(&e)));
    assert!(fenced(&old.read(0, 4096).await.unwrap_err()));
    assert!(old.ship(2, marked(2)).is_err());
    let st = old.status().link;
    assert!(st.fenced, "{st:?}");
    assert!(st.last_error.unwrap_or_default().contains("fenced"));

    // Reconnecting with the same id (the edge restarted) is refused too,
    // with the way out.
    let err = LinkClient::connect(edge_named(&s, "edge-old"))
        .await
        .unwrap_err();
    assert!(fenced(&err), "{err}");
    assert!(err.to_string().contains("unfence"), "{err}");
    assert!(!has_mark(&s, 2).await, "a fenced edge wrote");

    // Another edge may take the volume meanwhile.
    let (other, _p) = LinkClient::connect(edge_named(&s, "edge-new"))
        .await
        .unwrap();
    other.detach(Duration::from_secs(5)).await.unwrap();

    // Unfenced (rebuilt), the edge attaches and writes again.
    assert!(s.origin.unfence("vol", "edge-old").unwrap());
    let (again, _p) = LinkClient::connect(edge_named(&s, "edge-old"))
        .await
        .unwrap();
    assert_eq!(again.attachment().next_seq, 2);
    ship(&again, 2, marked(2)).await.unwrap();
    assert!(has_mark(&s, 2).await);
    assert!(s.origin.counters().snapshot().attach_refusals >= 1);
    s.server.abort();
}

/// An origin serving `volumes` from `state`, straight on loopback.
async fn start_origin(
    state: &std::path::Path,
    volumes: Vec<(String, Arc<dyn BlockDevice>)>,
) -> (Arc<Origin>, SocketAddr, tokio::task::JoinHandle<()>) {
    let origin = Arc::new(
        Origin::open(state, volumes, OriginConfig::default())
            .await
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = origin.clone();
    let server = tokio::spawn(async move {
        let _ = origin::serve(served, listener, None).await;
    });
    (origin, addr, server)
}

fn edge_at(addr: SocketAddr, id: &str) -> EdgeLinkConfig {
    let mut cfg = EdgeLinkConfig::new(addr.to_string(), "vol");
    cfg.session.edge_id = id.into();
    cfg.session.request_timeout = Duration::from_secs(5);
    cfg.session.reconnect_min = Duration::from_millis(20);
    cfg.session.reconnect_max = Duration::from_millis(200);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allocation_map_of_a_sparse_file_crosses_the_link() {
    use blockcore::{Extent, ExtentKind, FileDevice, OpenOptions, WriteFlags};
    const FILE: u64 = 40 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.raw");
    std::fs::File::create(&path).unwrap().set_len(FILE).unwrap();
    let file = Arc::new(FileDevice::open(&path, &OpenOptions::default()).unwrap());
    // Data: 1 MiB at 2 MiB, then 16 KiB pieces every 32 KiB from 8 MiB to
    // 32 MiB (1536 runs: more than the file device describes at once, so
    // the map takes several queries), and the last 64 KiB; holes
    // everywhere else.
    let mut written = vec![(2u64 << 20, 1u64 << 20)];
    written.extend((0..768).map(|i| ((8 << 20) + i * (32 << 10), 16 << 10)));
    written.push((FILE - (64 << 10), 64 << 10));
    for &(off, len) in &written {
        let data = Bytes::from(pattern(off, usize::try_from(len).unwrap()));
        file.write(off, data, WriteFlags::default()).await.unwrap();
    }
    file.flush().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let (_origin, addr, server) = start_origin(
        state.path(),
        vec![("vol".into(), file.clone() as Arc<dyn BlockDevice>)],
    )
    .await;
    let (client, _pushes) = LinkClient::connect(edge_at(addr, "edge-a")).await.unwrap();

    // What the file itself says, asked until covered.
    let mut local: Vec<Extent> = Vec::new();
    let mut at = 0;
    while at < FILE {
        for e in file.extents(at, FILE - at).await.unwrap() {
            at = e.offset + e.len;
            match local.last_mut() {
                Some(l) if l.kind == e.kind => l.len += e.len,
                _ => local.push(e),
            }
        }
    }
    let map = client.allocation(0, FILE).await.unwrap();
    assert_eq!(map, local);
    // Contiguous over the whole file, alternating kinds (merged).
    assert_eq!(map[0].offset, 0);
    for w in map.windows(2) {
        assert_eq!(w[0].offset + w[0].len, w[1].offset);
        assert_ne!(w[0].kind, w[1].kind);
    }
    assert_eq!(map.last().map(|e| e.offset + e.len), Some(FILE));
    // What was written is data; the gaps between are holes.
    let kind_at = |off: u64| {
        map.iter()
            .find(|e| e.offset <= off && off < e.offset + e.len)
            .unwrap()
            .kind
    };
    for &(off, len) in &written {
        assert_eq!(kind_at(off), ExtentKind::Data, "at {off}");
        assert_eq!(
            kind_at(off + len - 1),
            ExtentKind::Data,
            "at {}",
            off + len - 1
        );
    }
    for hole in [
        0,
        (2 << 20) - 1,
        3 << 20,
        (8 << 20) - 1,
        (8 << 20) + (16 << 10),
        (8 << 20) + (32 << 10) - 1,
        36 << 20,
    ] {
        assert_eq!(kind_at(hole), ExtentKind::Hole, "at {hole}: {map:?}");
    }
    assert_eq!(map.len(), 3 + 2 * 768 + 1, "{map:?}");
    // What reads as zero does, through the link.
    for e in map.iter().filter(|e| e.kind.reads_zero()) {
        let mut off = e.offset;
        while off < e.offset + e.len {
            let n = (e.offset + e.len - off).min(4 << 20);
            let got = client.read(off, u32::try_from(n).unwrap()).await.unwrap();
            assert!(got.iter().all(|&b| b == 0), "non-zero in a hole at {off}");
            off += n;
        }
    }

    // One query: a prefix, from where it was asked. Over more runs than
    // the file device describes at once (1024), it stops short.
    let part = client.extents(5 << 20, 25 << 20).await.unwrap();
    assert_eq!(part[0].offset, 5 << 20);
    assert_eq!(part[0].kind, ExtentKind::Hole);
    let end = part.last().map(|e| e.offset + e.len).unwrap();
    assert!(end > 8 << 20 && end < 30 << 20, "ends at {end}");
    assert_eq!(part[0].offset + part[0].len, map[2].offset + map[2].len);
    assert_eq!(part[1..], map[3..2 + part.len()], "a prefix of the map");
    // The device says the same, and it has the capability.
    let dev = RemoteDevice::new(client.clone());
    assert!(dev.info().caps.extents);
    let first = dev.extents(0, FILE).await.unwrap();
    assert_eq!(first[0], map[0]);
    assert!(dev.extents(FILE - 1, 2).await.is_err());
    assert!(client.extents(0, 0).await.is_err());
    assert!(client.allocation(0, 0).await.unwrap().is_empty());
    // Out of range is the origin's refusal, not a hang.
    let err = client.extents(FILE - 4096, 8192).await.unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::Refused {
                code: ErrorCode::OutOfRange,
                ..
            }
        ),
        "{err}"
    );
    server.abort();
}

fn is_migrated(e: &LinkError) -> bool {
    matches!(
        e,
        LinkError::Refused {
            code: ErrorCode::Migrated,
            ..
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_over_volume_is_refused_to_other_edges_until_it_comes_home() {
    let state = tempfile::tempdir().unwrap();
    let image = Arc::new(MemDevice::from_bytes(&pattern(1, SIZE)));
    let vols = || vec![("vol".to_owned(), image.clone() as Arc<dyn BlockDevice>)];
    let (origin, addr, server) = start_origin(state.path(), vols()).await;

    // Edge a ships a batch, and releases the volume as migrated to it:
    // the release waits for the batch shipped just before.
    let (a, _p) = LinkClient::connect(edge_at(addr, "edge-a")).await.unwrap();
    ship(&a, 1, marked(1)).await.unwrap();
    a.ship(2, marked(2)).unwrap();
    a.release(link::proto::Disposition::CutOver, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(a.finished(), Some(LinkError::Detached)));
    let v = origin.volume("vol").unwrap();
    assert_eq!(v.migrated_to().as_deref(), Some("edge-a"));
    assert_eq!(v.holder(), None);
    assert_eq!(v.applied(), 2, "the release left a batch behind");

    // Another edge is refused, told who holds it and what to do.
    let err = LinkClient::connect(edge_at(addr, "edge-b"))
        .await
        .unwrap_err();
    assert!(is_migrated(&err), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("edge-a") && msg.contains("move it back"),
        "{msg}"
    );

    // The record survives a restart of the origin.
    server.abort();
    let _ = server.await;
    drop((v, origin));
    let (origin, addr, server) = start_origin(state.path(), vols()).await;
    let v = origin.volume("vol").unwrap();
    assert_eq!(v.migrated_to().as_deref(), Some("edge-a"));
    let err = LinkClient::connect(edge_at(addr, "edge-b"))
        .await
        .unwrap_err();
    assert!(is_migrated(&err), "{err}");

    // Edge a comes back (moving the volume back), ships what it wrote
    // meanwhile, and brings the volume home.
    let (a, _p) = LinkClient::connect(edge_at(addr, "edge-a")).await.unwrap();
    assert_eq!(a.attachment().next_seq, 3);
    a.ship(3, marked(3)).unwrap();
    a.release(link::proto::Disposition::Home, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(has_mark_in(&image, 3).await);
    assert_eq!(v.migrated_to(), None);

    // Any edge may attach it now; home again with no record is a detach.
    let (b, _p) = LinkClient::connect(edge_at(addr, "edge-b")).await.unwrap();
    assert_eq!(b.read(3 * 4096, 4096).await.unwrap()[..], [3; 4096]);
    b.release(link::proto::Disposition::Home, Duration::from_secs(5))
        .await
        .unwrap();
    server.abort();
    let _ = server.await;
    drop((v, origin));
    let (origin, _addr, server) = start_origin(state.path(), vols()).await;
    assert_eq!(origin.volume("vol").unwrap().migrated_to(), None);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_release_brings_a_cut_over_volume_home() {
    let state = tempfile::tempdir().unwrap();
    let image = Arc::new(MemDevice::from_bytes(&pattern(1, SIZE)));
    let (origin, addr, server) = start_origin(
        state.path(),
        vec![("vol".to_owned(), image.clone() as Arc<dyn BlockDevice>)],
    )
    .await;
    let (a, _p) = LinkClient::connect(edge_at(addr, "edge-a")).await.unwrap();
    a.release(link::proto::Disposition::CutOver, Duration::from_secs(5))
        .await
        .unwrap();
    // Its edge is gone for good: the operator takes the volume back.
    assert_eq!(origin.force_release("vol").unwrap(), "edge-a");
    let v = origin.volume("vol").unwrap();
    assert_eq!(v.migrated_to(), None);
    assert_eq!(v.fenced(), ["edge-a"]);
    let err = LinkClient::connect(edge_at(addr, "edge-a"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::Refused {
                code: ErrorCode::Fenced,
                ..
            }
        ),
        "{err}"
    );
    let (b, _p) = LinkClient::connect(edge_at(addr, "edge-b")).await.unwrap();
    b.detach(Duration::from_secs(5)).await.unwrap();
    server.abort();
}

/// Whether `image` holds batch `seq`'s mark.
async fn has_mark_in(image: &MemDevice, seq: u64) -> bool {
    let got = image.read(seq * 4096, 4096).await.unwrap();
    got.iter().all(|&b| u64::from(b) == seq)
}
