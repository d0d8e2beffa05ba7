//! nbdinfo against ferry: JSON metadata, --map, --list with several exports,
//! --can/--is exit statuses.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use std::process::Command;

use ferry_tests::{
    assert_sparse, cmd, json, pattern_bytes, run, run_output, sparse_image, tempdir, write_at,
    Ferry, MIB,
};

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let v = json(&run(cmd("nbdinfo").arg("--json").arg(uri)));
    assert_eq!(v["protocol"], "newstyle-fixed", "{v:#}");
    v
}

fn export_of(v: &serde_json::Value) -> &serde_json::Value {
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v:#}");
    &exports[0]
}

#[test]
fn json_metadata() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "meta.img", 12 * MIB);
    let ferry = Ferry::start([
        img.as_os_str(),
        "--name".as_ref(),
        "disk0".as_ref(),
        "--description".as_ref(),
        "ferry test disk".as_ref(),
    ]);
    let v = nbdinfo_json(&ferry.uri("disk0"));
    assert_eq!(v["TLS"], false, "{v:#}");
    assert_eq!(v["structured"], true, "structured replies: {v:#}");
    let e = export_of(&v);
    assert_eq!(e["export-name"], "disk0", "{v:#}");
    assert_eq!(e["description"], "ferry test disk", "{v:#}");
    assert_eq!(e["export-size"].as_u64(), Some(12 * MIB), "{v:#}");
    for (k, want) in [
        ("is_read_only", false),
        ("can_multi_conn", true),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_cache", true),
    ] {
        assert_eq!(e[k].as_bool(), Some(want), "{k}: {v:#}");
    }
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{v:#}");

    let min = e["block_size_minimum"]
        .as_u64()
        .expect("block_size_minimum");
    let pref = e["block_size_preferred"]
        .as_u64()
        .expect("block_size_preferred");
    let max = e["block_size_maximum"]
        .as_u64()
        .expect("block_size_maximum");
    assert!(min.is_power_of_two() && pref.is_power_of_two(), "{v:#}");
    assert!(min <= pref && pref <= max, "{v:#}");
    assert_eq!(max, 32 * MIB, "maximum payload should be 32 MiB: {v:#}");

    // The empty export name is the first export.
    let d = nbdinfo_json(&ferry.uri(""));
    assert_eq!(
        export_of(&d)["export-size"].as_u64(),
        Some(12 * MIB),
        "{d:#}"
    );

    // --size agrees.
    let size = run(cmd("nbdinfo").arg("--size").arg(ferry.uri("disk0")));
    assert_eq!(size.trim(), (12 * MIB).to_string());

    // Read-only flag.
    ferry.stop_ok();
    let ferry = Ferry::start([img.as_os_str(), "--read-only".as_ref()]);
    let v = nbdinfo_json(&ferry.uri("meta"));
    assert_eq!(export_of(&v)["is_read_only"], true, "{v:#}");
    assert_eq!(export_of(&v)["export-name"], "meta", "{v:#}");
    ferry.stop_ok();
}

#[test]
fn map_holes_and_data() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "map.img", 8 * MIB);
    write_at(&img, 2 * MIB, &pattern_bytes(MIB as usize, 3));
    write_at(&img, 6 * MIB, &pattern_bytes(256 * 1024, 4));
    assert_sparse(&img);
    let ferry = Ferry::start([&img]);
    let out = run(cmd("nbdinfo")
        .args(["--map", "--json"])
        .arg(ferry.uri("map")));
    // Merge consecutive extents of the same type (the server may split them).
    let mut got: Vec<(u64, u64, String)> = Vec::new();
    for e in json(&out).as_array().expect("map array") {
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let desc = e["description"].as_str().unwrap().to_string();
        match got.last_mut() {
            Some(l) if l.0 + l.1 == off && l.2 == desc => l.1 += len,
            _ => got.push((off, len, desc)),
        }
    }
    let hz = "hole,zero".to_string();
    let data = "data".to_string();
    assert_eq!(
        got,
        vec![
            (0, 2 * MIB, hz.clone()),
            (2 * MIB, MIB, data.clone()),
            (3 * MIB, 3 * MIB, hz.clone()),
            (6 * MIB, 256 * 1024, data),
            (6 * MIB + 256 * 1024, 2 * MIB - 256 * 1024, hz),
        ],
        "nbdinfo --map layout wrong:\n{out}"
    );
    // --totals: exactly 1.25 MiB of data.
    let totals = run(cmd("nbdinfo")
        .args(["--map", "--totals", "--json"])
        .arg(ferry.uri("map")));
    let t = json(&totals);
    let data_bytes: u64 = t
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == 0)
        .map(|e| e["size"].as_u64().unwrap())
        .sum();
    assert_eq!(data_bytes, MIB + 256 * 1024, "{totals}");
    ferry.stop_ok();
}

#[test]
fn list_several_exports() {
    let dir = tempdir();
    let main = sparse_image(dir.path(), "main.img", 3 * MIB);
    let a = sparse_image(dir.path(), "a.img", MIB);
    let b = sparse_image(dir.path(), "b.img", 2 * MIB);
    let ferry = Ferry::start([
        main.as_os_str(),
        "--description".as_ref(),
        "the main disk".as_ref(),
        "--export".as_ref(),
        format!("alpha={}", a.display()).as_ref(),
        "--export".as_ref(),
        format!("beta={}", b.display()).as_ref(),
    ]);
    let out = run(cmd("nbdinfo").args(["--list", "--json"]).arg(ferry.uri("")));
    let v = json(&out);
    let mut names: Vec<(String, u64)> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("alpha".to_string(), MIB),
            ("beta".to_string(), 2 * MIB),
            ("main".to_string(), 3 * MIB),
        ],
        "nbdinfo --list:\n{out}"
    );
    let main_desc = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["export-name"] == "main")
        .map(|e| e["description"].clone());
    assert_eq!(main_desc, Some("the main disk".into()), "{out}");

    // Each export is reachable by name with its own size.
    for (name, size) in [("alpha", MIB), ("beta", 2 * MIB), ("main", 3 * MIB)] {
        let v = nbdinfo_json(&ferry.uri(name));
        assert_eq!(export_of(&v)["export-size"].as_u64(), Some(size), "{v:#}");
    }
    // An unknown export is refused.
    let out = run_output(cmd("nbdinfo").arg(ferry.uri("nope")));
    assert!(!out.status.success(), "unknown export accepted");
    ferry.stop_ok();
}

fn status(c: &mut Command) -> Option<i32> {
    run_output(c).status.code()
}

#[test]
fn can_and_is_exit_statuses() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "can.img", MIB);
    let rw = Ferry::start([&img]);
    let ro = Ferry::start([img.as_os_str(), "--read-only".as_ref()]);
    // nbdinfo(1): exit 0 = true, 2 = false, 1 = error.
    let nbdinfo = || cmd("nbdinfo");
    assert_eq!(
        status(nbdinfo().args(["--can", "multi-conn"]).arg(rw.uri("can"))),
        Some(0)
    );
    assert_eq!(
        status(nbdinfo().args(["--can", "write"]).arg(rw.uri("can"))),
        Some(0)
    );
    assert_eq!(
        status(nbdinfo().args(["--can", "trim"]).arg(rw.uri("can"))),
        Some(0)
    );
    assert_eq!(
        status(nbdinfo().args(["--can", "zero"]).arg(rw.uri("can"))),
        Some(0)
    );
    assert_eq!(
        status(nbdinfo().args(["--can", "flush"]).arg(rw.uri("can"))),
        Some(0)
    );
    assert_eq!(
        status(nbdinfo().args(["--is", "read-only"]).arg(rw.uri("can"))),
        Some(2)
    );
    assert_eq!(
        status(nbdinfo().args(["--can", "write"]).arg(ro.uri("can"))),
        Some(2)
    );
    assert_eq!(
        status(nbdinfo().args(["--is", "read-only"]).arg(ro.uri("can"))),
        Some(0)
    );
    assert_eq!(
        status(nbdinfo().args(["--can", "multi-conn"]).arg(ro.uri("can"))),
        Some(0)
    );
    assert_eq!(
        status(nbdinfo().args(["--can", "connect"]).arg(ro.uri("can"))),
        Some(0)
    );
    rw.stop_ok();
    ro.stop_ok();
}
