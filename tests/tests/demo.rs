//! `ferry demo`, the README's first command: an origin and an edge joined by
//! the emulated WAN, the edge exported over NBD. Real clients read the demo
//! disk through it, write to it, and `ferry edge flush` ships the write back
//! to the origin's image.

use ferry_tests::{assert_files_equal, cmd, ferry_bin, run, tempdir, Ferry};

#[test]
fn the_demo_serves_its_disk_through_the_edge() {
    let dir = tempdir();
    let demo = Ferry::spawn(
        [
            "demo".as_ref(),
            "--dir".as_ref(),
            dir.path().as_os_str(),
            "--size-mib".as_ref(),
            "32".as_ref(),
            "--nbd".as_ref(),
            "127.0.0.1:0".as_ref(),
        ],
        &["nbd"],
    );
    let uri = demo.uri("demo");
    let image = dir.path().join("demo.img");
    let reference = dir.path().join("reference.img");
    std::fs::copy(&image, &reference).unwrap();
    let info = run(cmd("nbdinfo").arg(&uri));
    assert!(info.contains("export-size: 33554432"), "{info}");
    run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&reference));
    let label = run(cmd("qemu-io").args(["-f", "raw", "-c", "read -v 0 32", &uri]));
    assert!(label.contains("ferry.demo.disk"), "{label}");
    run(cmd("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 1M 1M", &uri]));
    let control = dir.path().join("edge").join("api.sock");
    run(std::process::Command::new(ferry_bin())
        .args(["edge", "flush", "--control"])
        .arg(&control));
    let view = dir.path().join("view.img");
    run(cmd("nbdcopy").arg(&uri).arg(&view));
    assert_files_equal(&view, &image);
    let status = run(std::process::Command::new(ferry_bin())
        .args(["edge", "status", "--control"])
        .arg(&control));
    assert!(status.contains("journal_unshipped_records: 0"), "{status}");
    assert!(status.contains("batches_shipped: 1"), "{status}");
    demo.stop_ok();
}
