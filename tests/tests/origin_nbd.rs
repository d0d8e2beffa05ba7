//! `ferry origin` serving an existing NBD export: qemu-nbd serves a qcow2
//! image on a Unix socket, the origin opens it as
//! `--export vol=nbd+unix:///?socket=...`, and an edge behind the WAN link
//! emulator serves it. The edge's view must equal `qemu-img convert -O raw`
//! of the qcow2, and writes through the edge, once `ferry edge flush`
//! returns, must be in the qcow2.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use ferry_tests::{
    assert_files_equal, cmd, ferry_bin, run, send_signal, tempdir, wait_until, write_at, Ferry,
    Wan, MIB,
};

/// `qemu-nbd` serving `image` on `socket`; SIGTERM (a clean qcow2 close)
/// on drop.
struct QemuNbd(Option<Child>);

impl QemuNbd {
    fn start(image: &Path, socket: &Path) -> QemuNbd {
        let child = cmd("qemu-nbd")
            .args(["-f", "qcow2", "--persistent", "--shared=4", "-k"])
            .arg(socket)
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let q = QemuNbd(Some(child));
        // Accepting, not merely created: the file appears at bind(),
        // before qemu-nbd listens.
        assert!(
            wait_until(Duration::from_secs(20), || {
                std::os::unix::net::UnixStream::connect(socket).is_ok()
            }),
            "qemu-nbd never listened on {}",
            socket.display()
        );
        q
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            send_signal(c.id(), "TERM");
            let exited = wait_until(Duration::from_secs(20), || {
                c.try_wait().ok().flatten().is_some()
            });
            if !exited {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn to_raw(qcow2: &Path, raw: &Path) {
    run(cmd("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow2)
        .arg(raw));
}

fn qcow2_with_data(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run(cmd("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("32M"));
    // Data in places, holes and a zeroed cluster elsewhere.
    run(cmd("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xa1 0 2M",
            "-c",
            "write -P 0x3c 5M 192k",
            "-c",
            "write -P 0x42 9000 1234",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0xee 31M 1M",
        ])
        .arg(&img));
    img
}

#[test]
fn the_origin_serves_a_qcow2_through_qemu_nbd_and_writes_land_in_it() {
    let dir = tempdir();
    let image = qcow2_with_data(dir.path());
    let reference = dir.path().join("reference.raw");
    to_raw(&image, &reference);
    let socket = dir.path().join("qemu-nbd.sock");
    let mut qemu = QemuNbd::start(&image, &socket);

    let origin = Ferry::spawn(
        [
            "origin".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--export".as_ref(),
            format!("vol=nbd+unix:///?socket={}", socket.display()).as_ref(),
            "--state-dir".as_ref(),
            dir.path().join("origin-state").as_os_str(),
            "--no-tls".as_ref(),
        ],
        &["origin"],
    );
    let wan = Wan::start(origin.announced("origin"));
    let edge = Ferry::spawn(
        [
            "edge".as_ref(),
            "--origin".as_ref(),
            wan.addr().as_ref(),
            "--volume".as_ref(),
            "vol".as_ref(),
            "--cache-dir".as_ref(),
            dir.path().join("edge").as_os_str(),
            "--cache-size".as_ref(),
            "16M".as_ref(),
            "--nbd".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--no-tls".as_ref(),
        ],
        &["nbd", "control"],
    );
    let uri = edge.uri("vol");

    // Cold reads stream from qemu-nbd through the origin and the WAN.
    run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&reference));

    // Writes through the edge, mirrored into the reference.
    run(cmd("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 1M",
        "-c",
        "write -P 0x77 20M 64k",
        "-c",
        "write -P 0x01 8M 4k",
        &uri,
    ]));
    write_at(&reference, MIB, &vec![0x5a; 1 << 20]);
    write_at(&reference, 20 * MIB, &vec![0x77; 64 << 10]);
    write_at(&reference, 8 * MIB, &vec![0x01; 4 << 10]);
    run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&reference));

    // Ship everything to the origin, which writes it into the qcow2.
    let out = run(std::process::Command::new(ferry_bin())
        .args(["edge", "flush", "--control"])
        .arg(edge.announced("control")));
    assert!(out.contains("flushed"), "{out}");

    edge.stop_ok();
    origin.stop_ok();
    qemu.stop();
    let after = dir.path().join("after.raw");
    to_raw(&image, &after);
    assert_files_equal(&after, &reference);
}

#[test]
fn the_origin_refuses_an_unreachable_nbd_export() {
    let dir = tempdir();
    let missing = dir.path().join("nobody-listens.sock");
    let out = std::process::Command::new(ferry_bin())
        .args(["origin", "--listen", "127.0.0.1:0", "--no-tls", "--export"])
        .arg(format!("vol=nbd+unix:///?socket={}", missing.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NBD export"), "{err}");
}
