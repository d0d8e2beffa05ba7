//! `NbdDevice` against real NBD servers: `qemu-nbd` serving a qcow2 image
//! (reads must equal `qemu-img convert -O raw`), `nbdkit memory` for
//! writes, trims and zeroes (plus the conformance suite), and an nbdkit
//! killed while a request is in flight. As everywhere in ferry's tests, a
//! missing tool is a failure, never a skip (scripts/install-deps.sh).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockcore::{BlockDevice, BlockError, ExtentKind, WriteFlags, ZeroFlags};
use bytes::Bytes;
use nbd_server::client::{NbdConfig, NbdDevice};

const MIB: u64 = 1024 * 1024;

/// Fails the test, naming the tool, when `tool` is not installed.
fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "missing tool {tool}: run scripts/install-deps.sh");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_until_socket(cmd: &mut Command, socket: &Path) -> Proc {
    let child = Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // Until a connection is accepted, not until the file exists: the
    // socket file appears at bind(), before the server listens, and a
    // connect in between is refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "{cmd:?} never listened on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// A 64 MiB qcow2 with data at a few places and holes elsewhere, and its
/// raw conversion.
fn qcow2_image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("disk.qcow2");
    let raw = dir.join("disk.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xa1 0 1M",
            "-c",
            "write -P 0x5c 3M 64k",
            "-c",
            "write -P 0x11 10000 777",
            "-c",
            "write -z 5M 1M",
            "-c",
            "write -P 0xee 63M 1M",
        ])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    (img, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_qcow2_through_qemu_nbd_equal_its_raw_conversion() {
    for tool in ["qemu-nbd", "qemu-img", "qemu-io"] {
        require(tool);
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = qcow2_image(dir.path());
    let socket = dir.path().join("qemu.sock");
    let _server = spawn_until_socket(
        Command::new("qemu-nbd")
            .args(["-f", "qcow2", "--persistent", "--shared=4", "-k"])
            .arg(&socket)
            .arg(&img),
        &socket,
    );
    let dev = NbdDevice::connect(&unix_uri(&socket, ""), NbdConfig::default())
        .await
        .unwrap();
    let info = dev.info();
    assert_eq!(info.size, 64 * MIB);
    assert!(info.caps.extents, "qemu-nbd offers base:allocation");
    let want = std::fs::read(&raw).unwrap();
    // Whole-device read (split into 32 MiB requests) and odd-sized reads.
    let got = dev
        .read(0, usize::try_from(info.size).unwrap())
        .await
        .unwrap();
    assert!(
        got[..] == want[..],
        "qcow2 contents differ from the raw conversion"
    );
    for (off, len) in [
        (9999u64, 5000usize),
        (3 * MIB - 1, 65_538),
        (63 * MIB, 1 << 20),
    ] {
        let got = dev.read(off, len).await.unwrap();
        let at = usize::try_from(off).unwrap();
        assert!(got[..] == want[at..at + len], "read at {off}");
    }
    // Extents: whatever qemu calls zero really is zero, and the written
    // data is never reported as a hole.
    let mut pos = 0;
    while pos < info.size {
        let ext = dev.extents(pos, info.size - pos).await.unwrap();
        for e in &ext {
            let r = usize::try_from(e.offset).unwrap()..usize::try_from(e.offset + e.len).unwrap();
            if e.kind.reads_zero() {
                assert!(want[r].iter().all(|&b| b == 0), "{e:?} is not zero");
            }
        }
        let last = ext.last().unwrap();
        pos = last.offset + last.len;
    }
    let first = dev.extents(0, MIB).await.unwrap();
    assert_eq!(first[0].kind, ExtentKind::Data);
    let hole = dev.extents(20 * MIB, MIB).await.unwrap();
    assert!(hole[0].kind.reads_zero(), "{hole:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_trims_and_zeroes_against_nbdkit_memory() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbdkit.sock");
    let _server = spawn_until_socket(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["memory", "size=64M"]),
        &socket,
    );
    let dev = NbdDevice::connect(&unix_uri(&socket, ""), NbdConfig::default())
        .await
        .unwrap();
    let caps = dev.info().caps;
    assert!(
        caps.trim && caps.write_zeroes && caps.flush && caps.extents,
        "{caps:?}"
    );
    let data = Bytes::from((0..4 * MIB).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    dev.write(MIB, data.clone(), WriteFlags { fua: true })
        .await
        .unwrap();
    dev.flush().await.unwrap();
    assert_eq!(dev.read(MIB, data.len()).await.unwrap(), data);
    // Trim the first MiB of it, zero the next (without holes), leave the
    // rest.
    dev.trim(MIB, MIB, WriteFlags::default()).await.unwrap();
    dev.write_zeroes(2 * MIB, MIB, ZeroFlags::default())
        .await
        .unwrap();
    let got = dev.read(MIB, data.len()).await.unwrap();
    let m = usize::try_from(MIB).unwrap();
    assert!(got[..2 * m].iter().all(|&b| b == 0));
    assert_eq!(got[2 * m..], data[2 * m..]);
    let ext = dev.extents(MIB, 4 * MIB).await.unwrap();
    assert!(ext[0].kind.reads_zero(), "{ext:?}");
    assert_eq!(ext.last().unwrap().kind, ExtentKind::Data, "{ext:?}");
    // A fast zero nbdkit can do (memory zeroes are cheap) or refuses.
    match dev
        .write_zeroes(
            0,
            MIB,
            ZeroFlags {
                fast_only: true,
                may_trim: true,
                fua: false,
            },
        )
        .await
    {
        Ok(()) | Err(BlockError::Unsupported { .. }) => {}
        Err(e) => panic!("{e}"),
    }
    dev.prefetch(0, 8 * MIB).await.unwrap();
    // Past the end is refused locally, before the server sees it.
    assert!(matches!(
        dev.read(64 * MIB - 1, 2).await,
        Err(BlockError::OutOfRange { .. })
    ));
}

#[test]
fn conformance_against_nbdkit_memory() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbdkit.sock");
    let _server = spawn_until_socket(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["memory", "size=1M"]),
        &socket,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let uri = unix_uri(&socket, "");
    blockcore::conformance::run_with(
        blockcore::conformance::Settings {
            cases: 24,
            max_steps: 30,
        },
        || {
            rt.block_on(NbdDevice::connect(&uri, NbdConfig::default()))
                .unwrap()
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_request_gives_an_error_not_a_hang() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("slow.sock");
    // Every read takes 20 s: the request is certainly in flight when the
    // server dies.
    let mut server = spawn_until_socket(
        Command::new("nbdkit")
            .args(["-f", "--filter=delay", "-U"])
            .arg(&socket)
            .args(["memory", "size=16M", "rdelay=20"]),
        &socket,
    );
    let dev = NbdDevice::connect(&unix_uri(&socket, ""), NbdConfig::default())
        .await
        .unwrap();
    let started = Instant::now();
    let read = tokio::spawn(async move { dev.read(0, 4096).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.0.kill().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the read hung after the server died")
        .unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, BlockError::Io { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
