//! fio's nbd engine against ferry: random writes with crc32c verification,
//! then a verify-only pass on a fresh connection, after a restart, and after
//! corrupting a block on disk (which must be detected).

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use std::ffi::OsString;
use std::process::Command;

use ferry_tests::{
    allocated_bytes, cmd, combined, json, run, run_output, sparse_image, tempdir, write_at, Ferry,
    MIB,
};

const SIZE: u64 = 32 * MIB;

fn fio_cmd(uri: &str, verify_only: bool) -> Command {
    let mut c = cmd("fio");
    c.args([
        "--name=verify",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--randseed=1234",
        "--numjobs=1",
        "--verify_state_save=0",
        "--output-format=json",
    ])
    .arg(format!("--uri={uri}"));
    if verify_only {
        c.arg("--verify_only=1");
    }
    c
}

/// Run fio, assert success and no verify complaints, return its JSON.
fn fio(uri: &str, verify_only: bool) -> serde_json::Value {
    let out = run(&mut fio_cmd(uri, verify_only));
    // fio may print warnings before the JSON document.
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio:\n{out}"));
    assert!(
        !out[..start].to_lowercase().contains("verify"),
        "fio verify messages:\n{out}"
    );
    let v = json(&out[start..]);
    assert_eq!(
        v["jobs"][0]["error"].as_i64(),
        Some(0),
        "fio job error: {v:#}"
    );
    v
}

fn read_bytes(v: &serde_json::Value) -> Option<u64> {
    v["jobs"][0]["read"]["io_bytes"].as_u64()
}

fn check(extra: &[&str]) {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "fio.img", SIZE);
    let mut args: Vec<OsString> = vec![img.clone().into_os_string()];
    args.extend(extra.iter().map(OsString::from));
    let ferry = Ferry::start(&args);
    let uri = ferry.uri("fio");

    // Write phase: every block written once, then all read back and verified.
    let v = fio(&uri, false);
    assert_eq!(
        v["jobs"][0]["write"]["io_bytes"].as_u64(),
        Some(SIZE),
        "{v:#}"
    );
    assert_eq!(read_bytes(&v), Some(SIZE), "verify read: {v:#}");

    // Verify-only pass on a new connection.
    let v = fio(&uri, true);
    assert_eq!(read_bytes(&v), Some(SIZE), "{v:#}");
    ferry.stop_ok();
    assert!(allocated_bytes(&img) >= SIZE, "image not fully written");

    // ...and after a restart the data is still there.
    let ferry = Ferry::start(&args);
    let v = fio(&ferry.uri("fio"), true);
    assert_eq!(read_bytes(&v), Some(SIZE), "{v:#}");
    ferry.stop_ok();

    // The verify pass is real: corrupt one block on disk and it must fail.
    write_at(&img, 5 * MIB + 4096, &[0x5a; 4096]);
    let ferry = Ferry::start(&args);
    let out = run_output(&mut fio_cmd(&ferry.uri("fio"), true));
    assert!(
        !out.status.success(),
        "fio verify did not notice a corrupted block:\n{}",
        combined(&out)
    );
    ferry.stop_ok();
}

#[test]
fn randwrite_verify_default_engine() {
    check(&[]);
}

/// The read-ahead layer under a real client: its buffers must never serve
/// data older than a completed write.
#[test]
fn randwrite_verify_with_readahead() {
    check(&["--readahead"]);
}

#[test]
fn randwrite_verify_portable_engine() {
    check(&["--engine", "portable"]);
}
