//! `NbdDevice` against ferry's own NBD server, in process: the blockcore
//! conformance suite over TCP and Unix sockets, request splitting, many
//! requests in flight, and servers that misbehave or die.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockcore::{BlockDevice, BlockError, BlockSizes, MemDevice, WriteFlags, ZeroFlags};
use bytes::Bytes;
use nbd_server::client::{NbdConfig, NbdDevice};
use nbd_server::{Export, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `dev` as export "mem" on a loopback port; returns the NBD URI.
async fn serve_tcp(dev: Arc<dyn BlockDevice>) -> String {
    let server = Server::new(
        vec![Export {
            name: "mem".into(),
            description: String::new(),
            device: dev,
        }],
        ServerConfig::default(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve_tcp(listener).await });
    format!("nbd://{addr}/mem")
}

fn small_blocks(dev: MemDevice) -> MemDevice {
    // A 64 KiB maximum makes the suite's 200 KB requests split.
    dev.with_block_sizes(BlockSizes {
        min: 1,
        preferred: 4096,
        max: 64 * 1024,
    })
}

#[test]
fn conformance_over_tcp() {
    let rt = runtime();
    blockcore::conformance::run(|| {
        rt.block_on(async {
            let uri = serve_tcp(Arc::new(small_blocks(MemDevice::new(1 << 20)))).await;
            NbdDevice::connect(&uri, NbdConfig::default())
                .await
                .unwrap()
        })
    });
}

#[test]
fn conformance_over_unix_without_structured_replies() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    blockcore::conformance::run(|| {
        let sock = dir.path().join(format!(
            "s{}",
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        rt.block_on(async {
            let server = Server::new(
                vec![Export {
                    name: "mem".into(),
                    description: String::new(),
                    device: Arc::new(MemDevice::new(300_000)),
                }],
                ServerConfig::default(),
            )
            .unwrap();
            let listener = UnixListener::bind(&sock).unwrap();
            tokio::spawn(async move { server.serve_unix(listener).await });
            let uri = format!("nbd+unix:///mem?socket={}", sock.display());
            let config = NbdConfig {
                structured_replies: false,
                ..NbdConfig::default()
            };
            let dev = NbdDevice::connect(&uri, config).await.unwrap();
            assert!(!dev.info().caps.extents);
            dev
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_and_block_sizes_follow_the_server() {
    let mem = Arc::new(small_blocks(MemDevice::new(1 << 20)));
    let dev = NbdDevice::connect(&serve_tcp(mem.clone()).await, NbdConfig::default())
        .await
        .unwrap();
    let info = dev.info();
    assert_eq!(info.size, 1 << 20);
    assert_eq!(info.block_sizes.max, 64 * 1024);
    assert!(info.caps.flush && info.caps.fua && info.caps.write_zeroes && info.caps.trim);
    assert!(info.caps.extents && info.caps.multi_conn && !info.caps.read_only);
    // A read-only export refuses writes locally.
    let ro = Arc::new(MemDevice::new(4096).read_only());
    let dev = NbdDevice::connect(&serve_tcp(ro).await, NbdConfig::default())
        .await
        .unwrap();
    assert!(dev.info().caps.read_only);
    assert!(matches!(
        dev.write(0, Bytes::from_static(b"x"), WriteFlags::default())
            .await,
        Err(BlockError::ReadOnly { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_requests_in_flight_on_one_connection() {
    let mem = Arc::new(small_blocks(MemDevice::new(16 << 20)));
    let dev = Arc::new(
        NbdDevice::connect(&serve_tcp(mem.clone()).await, NbdConfig::default())
            .await
            .unwrap(),
    );
    // 64 concurrent writes of distinct patterns, big ones split, then
    // concurrent reads checked against the backing device.
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let dev = dev.clone();
        tasks.push(tokio::spawn(async move {
            let len = if i % 4 == 0 { 200_000 } else { 4096 };
            let data = Bytes::from(vec![u8::try_from(i).unwrap(); len]);
            dev.write(i * 131_072, data, WriteFlags { fua: i % 3 == 0 })
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    dev.flush().await.unwrap();
    let mut reads = Vec::new();
    for i in 0..64u64 {
        let dev = dev.clone();
        let mem = mem.clone();
        reads.push(tokio::spawn(async move {
            let got = dev.read(i * 131_072, 200_000).await.unwrap();
            let want = mem.read(i * 131_072, 200_000).await.unwrap();
            assert_eq!(got, want);
        }));
    }
    for t in reads {
        t.await.unwrap();
    }
    // Zeroes and trims are visible through the backing device.
    dev.write_zeroes(0, 4096, ZeroFlags::default())
        .await
        .unwrap();
    dev.trim(131_072, 4096, WriteFlags::default())
        .await
        .unwrap();
    assert!(mem.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    assert!(mem
        .read(131_072, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    // A whole-device read bigger than the maximum request.
    let all = dev.read(0, 16 << 20).await.unwrap();
    assert_eq!(all, mem.read(0, 16 << 20).await.unwrap());
}

/// A fake server: completes the handshake for a 1 MiB export, then hands
/// the socket to `then`.
async fn fake_server<F, Fut>(then: F) -> String
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&0x4e42_444d_4147_4943u64.to_be_bytes());
        out.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        out.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&out).await.unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).await.unwrap();
        // Answer each option: refuse everything but GO, which gets the
        // export's size and flags (HAS_FLAGS | SEND_FLUSH).
        loop {
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).await.unwrap();
            let option = u32::from_be_bytes(hdr[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await.unwrap();
            let reply = |ty: u32, data: &[u8]| {
                let mut r = Vec::new();
                r.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
                r.extend_from_slice(&option.to_be_bytes());
                r.extend_from_slice(&ty.to_be_bytes());
                r.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
                r.extend_from_slice(data);
                r
            };
            if option == 7 {
                let mut info = vec![0u8, 0];
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&5u16.to_be_bytes());
                s.write_all(&reply(3, &info)).await.unwrap();
                s.write_all(&reply(1, &[])).await.unwrap();
                break;
            }
            s.write_all(&reply((1 << 31) | 1, &[])).await.unwrap();
        }
        then(s).await;
    });
    format!("nbd://{addr}/x")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_mid_request_fails_it_quickly() {
    let uri = fake_server(|mut s| async move {
        // Take the request, then die without answering.
        let mut hdr = [0u8; 28];
        s.read_exact(&mut hdr).await.unwrap();
        drop(s);
    })
    .await;
    let dev = NbdDevice::connect(&uri, NbdConfig::default())
        .await
        .unwrap();
    let started = Instant::now();
    let err = dev.read(0, 4096).await.unwrap_err();
    assert!(matches!(err, BlockError::Io { .. }), "{err}");
    assert!(err.to_string().contains("closed"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The next call tries to reconnect, which fails (nobody listens).
    assert!(matches!(
        dev.read(0, 4096).await,
        Err(BlockError::Io { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out_instead_of_hanging() {
    let uri = fake_server(|s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let config = NbdConfig {
        request_timeout: Duration::from_millis(300),
        ..NbdConfig::default()
    };
    let dev = NbdDevice::connect(&uri, config).await.unwrap();
    let started = Instant::now();
    let err = dev.flush().await.unwrap_err();
    let io = match &err {
        BlockError::Io { source, .. } => source.kind(),
        other => panic!("{other}"),
    };
    assert_eq!(io, std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_breaks_the_protocol_fails_requests() {
    let uri = fake_server(|mut s| async move {
        let mut hdr = [0u8; 28];
        s.read_exact(&mut hdr).await.unwrap();
        // A reply for a cookie never sent.
        let mut r = Vec::new();
        r.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&0xdead_beefu64.to_be_bytes());
        s.write_all(&r).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let dev = NbdDevice::connect(&uri, NbdConfig::default())
        .await
        .unwrap();
    let err = dev.flush().await.unwrap_err();
    assert!(err.to_string().contains("protocol error"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_reconnects_after_the_server_restarts() {
    let mem = Arc::new(MemDevice::new(1 << 20));
    mem.write(0, Bytes::from_static(b"hello"), WriteFlags::default())
        .await
        .unwrap();
    let server = Server::new(
        vec![Export {
            name: "mem".into(),
            description: String::new(),
            device: mem.clone(),
        }],
        ServerConfig::default(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = server.clone();
    let task = tokio::spawn(async move { first.serve_tcp(listener).await });
    let dev = NbdDevice::connect(&format!("nbd://{addr}/mem"), NbdConfig::default())
        .await
        .unwrap();
    assert_eq!(&dev.read(0, 5).await.unwrap()[..], b"hello");
    // Kill every connection, then listen again on the same port.
    server.shutdown();
    task.await.unwrap().unwrap();
    server.drain(Duration::from_secs(5)).await.unwrap();
    let _ = dev.read(0, 5).await; // may fail: the old connection is gone
    let server = Server::new(
        vec![Export {
            name: "mem".into(),
            description: String::new(),
            device: mem.clone(),
        }],
        ServerConfig::default(),
    )
    .unwrap();
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move { server.serve_tcp(listener).await });
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(d) = dev.read(0, 5).await {
            assert_eq!(&d[..], b"hello");
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the device never reconnected");
}
