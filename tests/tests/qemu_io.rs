//! qemu-io against ferry: pattern writes/reads, FUA, write-zeroes, discard,
//! flush, parallel aio, and a read-only export refusing writes. Every data
//! check is repeated on the image file after ferry has shut down.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use ferry_tests::{
    assert_range_filled, cmd, combined, run, run_output, sparse_image, tempdir, write_at, Ferry,
    KIB, MIB,
};

const PATTERN_FAIL: &str = "Pattern verification failed";

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = cmd("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(&mut c);
    assert!(
        !out.contains(PATTERN_FAIL),
        "qemu-io reported a pattern mismatch:\n{out}"
    );
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("error") && !lower.contains("failed"),
        "qemu-io reported an error:\n{out}"
    );
    out
}

#[test]
fn pattern_fua_zero_discard_flush() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "disk.img", 8 * MIB);
    // 2 MiB..4 MiB starts non-zero so write-zeroes and discard are observable.
    write_at(&img, 2 * MIB, &vec![0x11; 2 * MIB as usize]);
    let ferry = Ferry::start([&img]);
    let uri = ferry.uri("disk");

    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -f -P 0xcd 1M 64k",
            "read -P 0xcd 1M 64k",
            "read -P 0x11 2M 2M",
            "write -z 2M 512k",
            "read -P 0 2M 512k",
            "read -P 0x11 2560k 512k",
            "discard 3M 1M",
            "read -P 0 3M 1M",
            "flush",
            "read -P 0 4M 4M",
        ],
    );
    for needle in [
        "wrote 1048576/1048576 bytes at offset 0",
        "read 1048576/1048576 bytes at offset 0",
        "wrote 65536/65536 bytes at offset 1048576",
        "wrote 524288/524288 bytes at offset 2097152",
        "discard 1048576/1048576 bytes at offset 3145728",
        "read 4194304/4194304 bytes at offset 4194304",
    ] {
        assert!(
            out.contains(needle),
            "missing {needle:?} in qemu-io output:\n{out}"
        );
    }

    // The harness really checks patterns: a wrong pattern must be reported.
    let bad = run_output(cmd("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0xff 0 4k"]));
    assert!(
        combined(&bad).contains(PATTERN_FAIL),
        "reading 0xab with pattern 0xff was not reported as a mismatch:\n{}",
        combined(&bad)
    );

    ferry.stop_ok();
    assert_range_filled(&img, 0, MIB, 0xab);
    assert_range_filled(&img, MIB, 64 * KIB, 0xcd);
    assert_range_filled(&img, MIB + 64 * KIB, MIB - 64 * KIB, 0);
    assert_range_filled(&img, 2 * MIB, 512 * KIB, 0);
    assert_range_filled(&img, 2 * MIB + 512 * KIB, 512 * KIB, 0x11);
    assert_range_filled(&img, 3 * MIB, MIB, 0);
    assert_range_filled(&img, 4 * MIB, 4 * MIB, 0);
}

#[test]
fn parallel_aio_writes() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "aio.img", 16 * MIB);
    let ferry = Ferry::start([&img]);
    let uri = ferry.uri("aio");

    // 16 writes of 512 KiB in flight at once, each with its own pattern, some
    // with FUA, then aio_flush and read every one back.
    let mut cmds: Vec<String> = Vec::new();
    for i in 0..16u64 {
        let fua = if i % 3 == 0 { "-f " } else { "" };
        cmds.push(format!(
            "aio_write {fua}-P {:#04x} {} 512k",
            0x20 + i,
            i * MIB
        ));
    }
    cmds.push("aio_flush".into());
    for i in 0..16u64 {
        cmds.push(format!("read -P {:#04x} {} 512k", 0x20 + i, i * MIB));
        cmds.push(format!("read -P 0 {} 512k", i * MIB + 512 * KIB));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&uri, &refs);
    assert_eq!(
        out.matches("wrote 524288/524288 bytes").count(),
        16,
        "not all aio writes completed:\n{out}"
    );

    ferry.stop_ok();
    for i in 0..16u64 {
        assert_range_filled(&img, i * MIB, 512 * KIB, 0x20 + u8::try_from(i).unwrap());
        assert_range_filled(&img, i * MIB + 512 * KIB, 512 * KIB, 0);
    }
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "ro.img", 4 * MIB);
    write_at(&img, 0, &vec![0x5a; 64 * 1024]);
    let ferry = Ferry::start([img.as_os_str(), "--read-only".as_ref()]);
    let uri = ferry.uri("ro");

    // Opening read-write must fail, naming the read-only export.
    let out = run_output(cmd("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0xab 0 4k"]));
    let text = combined(&out);
    assert!(
        !text.contains("wrote 4096/4096"),
        "write to a read-only export succeeded:\n{text}"
    );
    // qemu reports the refused read-write open as EACCES ("Permission
    // denied") or as a read-only error, depending on version.
    assert!(
        text.contains("Permission denied") || text.to_lowercase().contains("read-only"),
        "expected a read-only error from qemu-io, got:\n{text}"
    );

    // Opened read-only (-r), reads work and writes are refused by qemu.
    let out = run(cmd("qemu-io").args(["-r", "-f", "raw", &uri, "-c", "read -P 0x5a 0 64k"]));
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    assert!(!out.contains(PATTERN_FAIL), "{out}");
    let out =
        run_output(cmd("qemu-io").args(["-r", "-f", "raw", &uri, "-c", "write -P 0xab 0 4k"]));
    let text = combined(&out);
    assert!(!text.contains("wrote 4096/4096"), "{text}");
    assert!(
        text.contains("Operation not permitted") || text.to_lowercase().contains("read-only"),
        "expected EPERM/read-only from qemu-io, got:\n{text}"
    );

    ferry.stop_ok();
    assert_range_filled(&img, 0, 64 * KIB, 0x5a);
    assert_range_filled(&img, 64 * KIB, 4 * MIB - 64 * KIB, 0);
}
