//! Process lifecycle: SIGTERM under load, SIGINT, Unix sockets, several
//! listeners.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::{
    allocated_bytes, assert_files_equal, assert_range_filled, cmd, json, random_image, read_at,
    run, sparse_image, tempdir, tool, wait_until, Ferry, MIB,
};

const BLOCK: usize = 4096;

#[test]
fn sigterm_during_copy_exits_cleanly_and_image_is_consistent() {
    let dir = tempdir();
    let size = 128 * MIB;
    let src = random_image(dir.path(), "src.img", size);
    let img = sparse_image(dir.path(), "busy.img", size);
    let ferry = Ferry::start([&img]);

    let mut copy = Command::new(tool("nbdcopy"))
        .args(["--connections=2", "--requests=16"])
        .arg(&src)
        .arg(ferry.uri("busy"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nbdcopy");
    // Wait until some data has reached the image, then pull the plug.
    assert!(
        wait_until(Duration::from_secs(30), || allocated_bytes(&img) >= MIB),
        "nbdcopy wrote nothing within 30 s"
    );
    ferry.stop_ok();
    let _ = copy.wait();

    // Every 4 KiB block is either untouched (zero) or exactly the source:
    // no torn or garbage blocks.
    let srcd = std::fs::read(&src).unwrap();
    let imgd = std::fs::read(&img).unwrap();
    assert_eq!(imgd.len(), srcd.len());
    let mut copied = 0;
    for (i, (a, b)) in srcd.chunks(BLOCK).zip(imgd.chunks(BLOCK)).enumerate() {
        if a == b {
            copied += 1;
        } else {
            assert!(
                b.iter().all(|&x| x == 0),
                "block {i} (offset {}) is neither the source nor zero",
                i * BLOCK
            );
        }
    }
    assert!(copied > 0, "nothing copied before SIGTERM");
    eprintln!(
        "{copied} of {} blocks copied before SIGTERM",
        srcd.len() / BLOCK
    );

    // Re-serve: the export reads exactly what is on disk.
    let ferry = Ferry::start([&img]);
    let out = sparse_image(dir.path(), "out.img", size);
    run(cmd("nbdcopy").arg(ferry.uri("busy")).arg(&out));
    ferry.stop_ok();
    assert_files_equal(&img, &out);
}

#[test]
fn sigint_exits_zero() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "int.img", MIB);
    let ferry = Ferry::start([&img]);
    run(cmd("qemu-io").args(["-f", "raw", &ferry.uri("int"), "-c", "write -P 0x77 0 64k"]));
    let st = ferry.stop_with("INT");
    assert!(st.success(), "SIGINT: {st}");
    assert_range_filled(&img, 0, 64 * 1024, 0x77);
}

#[test]
fn unix_socket_and_tcp_listeners() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "sock.img", 4 * MIB);
    let sock = dir.path().join("ferry.sock");
    let ferry = Ferry::start([
        img.as_os_str(),
        "--nbd".as_ref(),
        format!("unix:{}", sock.display()).as_ref(),
        "--nbd".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]);
    assert_eq!(
        ferry.unix_socket(),
        sock,
        "listeners: {:?}",
        ferry.listeners()
    );
    assert_eq!(ferry.listeners().len(), 2);

    let uuri = ferry.unix_uri("sock");
    let v = json(&run(cmd("nbdinfo").arg("--json").arg(&uuri)));
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(4 * MIB),
        "{v:#}"
    );
    let out = run(cmd("qemu-io").args([
        "-f",
        "raw",
        &uuri,
        "-c",
        "write -P 0x3c 1M 128k",
        "-c",
        "read -P 0x3c 1M 128k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // The same export over TCP sees the write made over the socket.
    let out = run(cmd("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &ferry.uri("sock"),
        "-c",
        "read -P 0x3c 1M 128k",
    ]));
    assert!(out.contains("read 131072/131072"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");

    ferry.stop_ok();
    assert_range_filled(&img, MIB, 128 * 1024, 0x3c);
    assert_range_filled(&img, 0, MIB, 0);
    assert!(read_at(&img, MIB + 128 * 1024, 4096)
        .iter()
        .all(|&b| b == 0));
}
