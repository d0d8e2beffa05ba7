//! qemu-img against ferry: convert into the export + compare, map (hole/data
//! layout through base:allocation), info.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use ferry_tests::{
    assert_files_equal, assert_sparse, cmd, json, pattern_bytes, pattern_image, run, run_output,
    sparse_image, tempdir, write_at, Ferry, MIB,
};

#[test]
fn convert_into_export_then_compare() {
    let dir = tempdir();
    let src = pattern_image(dir.path(), "src.img", 16 * MIB, 7);
    // A zero hole in the middle of the source.
    write_at(&src, 5 * MIB, &vec![0; 2 * MIB as usize]);
    let dst = sparse_image(dir.path(), "dst.img", 16 * MIB);
    let other = pattern_image(dir.path(), "other.img", 16 * MIB, 8);

    let ferry = Ferry::start([&dst]);
    let uri = ferry.uri("dst");
    run(cmd("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));

    let out = run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    assert!(out.contains("Images are identical"), "{out}");

    // compare is meaningful: a different image must be reported (exit 1).
    let diff = run_output(
        cmd("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&other)
            .arg(&uri),
    );
    assert_eq!(
        diff.status.code(),
        Some(1),
        "compare against a different image: {}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert!(String::from_utf8_lossy(&diff.stdout).contains("Content mismatch at offset 0"));

    ferry.stop_ok();
    assert_files_equal(&src, &dst);
}

/// Merge consecutive qemu-img map entries with the same (data, zero) flags.
fn merged_map(v: &serde_json::Value) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().expect("map is an array") {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start && last.2 == data && last.3 == zero => {
                last.1 += len;
            }
            _ => out.push((start, len, data, zero)),
        }
    }
    out
}

#[test]
fn map_reports_holes_and_data() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "holes.img", 8 * MIB);
    write_at(&img, MIB, &pattern_bytes(MIB as usize, 1));
    write_at(&img, 5 * MIB, &pattern_bytes(512 * 1024, 2));
    assert_sparse(&img);

    let ferry = Ferry::start([&img]);
    let out = run(cmd("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(ferry.uri("holes")));
    let map = merged_map(&json(&out));
    let half = 512 * 1024;
    assert_eq!(
        map,
        vec![
            (0, MIB, false, true),
            (MIB, MIB, true, false),
            (2 * MIB, 3 * MIB, false, true),
            (5 * MIB, half, true, false),
            (5 * MIB + half, 3 * MIB - half, false, true),
        ],
        "qemu-img map layout (start, length, data, zero) wrong; raw output:\n{out}"
    );
    ferry.stop_ok();
}

#[test]
fn info_reports_size_and_format() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "info.img", 24 * MIB + 4096);
    let ferry = Ferry::start([&img]);
    let out = run(cmd("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(ferry.uri("info")));
    let v = json(&out);
    assert_eq!(v["virtual-size"].as_u64(), Some(24 * MIB + 4096), "{out}");
    assert_eq!(v["format"].as_str(), Some("raw"), "{out}");
    ferry.stop_ok();
}
