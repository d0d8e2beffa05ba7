//! nbdcopy through ferry: random data in and back out, single connection and
//! multi-conn with many requests in flight.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use ferry_tests::{
    assert_files_equal, cmd, random_image, run, sha256, sparse_image, tempdir, Ferry, MIB,
};

fn round_trip(extra: &[&str]) {
    let dir = tempdir();
    let src = random_image(dir.path(), "src.img", 16 * MIB);
    let export = sparse_image(dir.path(), "export.img", 16 * MIB);
    let out = sparse_image(dir.path(), "out.img", 16 * MIB);
    let ferry = Ferry::start([&export]);
    let uri = ferry.uri("export");

    run(cmd("nbdcopy")
        .args(extra)
        .arg("--flush")
        .arg(&src)
        .arg(&uri));
    run(cmd("nbdcopy").args(extra).arg(&uri).arg(&out));
    assert_files_equal(&src, &out);

    ferry.stop_ok();
    assert_files_equal(&src, &export);
    assert_eq!(sha256(&src), sha256(&export));
}

#[test]
fn copy_in_and_out() {
    round_trip(&["--connections=1"]);
}

#[test]
fn copy_multi_conn_many_requests() {
    round_trip(&["--connections=4", "--requests=64", "--request-size=65536"]);
}

#[test]
fn copy_synchronous() {
    round_trip(&["--synchronous"]);
}
