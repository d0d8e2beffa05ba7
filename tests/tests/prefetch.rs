//! Boot profiles end to end, through the emulated WAN (25 ms each way,
//! 100 Mbit/s): an edge records the reads of a "boot" (small serial reads
//! scattered over the disk, as a boot loader and init make), hands the
//! profile to the origin, and the next edge, with an empty cache, gets
//! the reads pushed in that order before it asks: its demand reads drop
//! by at least 90%, and every byte it reads is still the origin's. That
//! edge restarted with its cache warm is pushed the plan's chunks no
//! second time; a plan the boot does not read is reported.

use std::path::PathBuf;
use std::time::Duration;

use std::process::Command;

use ferry_tests::{
    api, ferry_bin, json, pattern_bytes, read_at, run, sparse_image, tempdir, wait_until, write_at,
    Ferry, Wan, MIB,
};
use serde_json::Value;

const SIZE: u64 = 256 * MIB;
/// Reads of the boot, each in a 1 MiB group of its own (so the group push
/// after a demand read never serves the next read: only the plan can).
const READS: u64 = 120;
const READ_LEN: u32 = 32 * 1024;

/// Where boot read `i` goes: a fixed jumble of groups, at an odd offset
/// inside each.
fn boot_read(i: u64) -> u64 {
    let group = (i * 97 + 13) % (SIZE / MIB);
    group * MIB + (i % 7) * 64 * 1024 + 4096
}

fn origin(dir: &std::path::Path, image: &std::path::Path) -> Ferry {
    Ferry::spawn(
        [
            "origin".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--export".as_ref(),
            format!("vol={}", image.display()).as_ref(),
            "--state-dir".as_ref(),
            dir.join("origin-state").as_os_str(),
            "--no-tls".as_ref(),
        ],
        &["origin", "api"],
    )
}

fn edge(dir: &std::path::Path, origin: &str, cache: &str) -> Ferry {
    Ferry::spawn(
        [
            "edge".as_ref(),
            "--origin".as_ref(),
            origin.as_ref(),
            "--volume".as_ref(),
            "vol".as_ref(),
            "--cache-dir".as_ref(),
            dir.join(cache).as_os_str(),
            "--cache-size".as_ref(),
            "256M".as_ref(),
            // The boot is over once no new chunk was read for 2 s.
            "--profile-quiet".as_ref(),
            "2".as_ref(),
            "--nbd".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--no-tls".as_ref(),
        ],
        &["nbd", "api"],
    )
}

fn volume(e: &Ferry) -> Value {
    let socket = PathBuf::from(e.announced("api"));
    api(&socket, "GET", "/v1/volumes/vol", None, 200)
}

/// Demand bytes the edge fetched, and bytes the origin pushed it.
fn link_bytes(e: &Ferry) -> (u64, u64) {
    let v = volume(e);
    let l = &v["link"];
    (
        l["demand_bytes"].as_u64().expect("demand bytes"),
        l["push_bytes"].as_u64().expect("push bytes"),
    )
}

/// The boot: every read in order, checked against the image, with a
/// guest's few milliseconds of work between reads.
fn boot(e: &Ferry, image: &std::path::Path) {
    let mut c = ferry_tests::nbd::Client::handshake(e.connect(), "vol").unwrap();
    for i in 0..READS {
        let offset = boot_read(i);
        let r = c.read(offset, READ_LEN).unwrap();
        assert_eq!(r.error, 0, "read {i}");
        assert!(
            r.data == read_at(image, offset, READ_LEN as usize),
            "read {i} at {offset} differs from the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_recorded_boot_is_pushed_to_the_next_edge_before_it_asks() {
    let dir = tempdir();
    let image = sparse_image(dir.path(), "disk.img", SIZE);
    for i in 0..READS {
        let offset = boot_read(i) & !(MIB - 1);
        write_at(&image, offset, &pattern_bytes(1 << 20, i));
    }
    let o = origin(dir.path(), &image);
    let wan = Wan::start(o.announced("origin"));

    // First boot: nothing planned yet, every read crosses the link.
    let e1 = edge(dir.path(), &wan.addr(), "cache-1");
    // No profile yet: the plan is empty, and done at once.
    assert!(
        wait_until(Duration::from_secs(10), || volume(&e1)["prefetch"]["plan"]
            == "done"),
        "{}",
        volume(&e1)["prefetch"]
    );
    boot(&e1, &image);
    let (demand_1, _) = link_bytes(&e1);
    assert!(
        wait_until(Duration::from_secs(30), || volume(&e1)["prefetch"]
            ["profile"]
            == "stored"),
        "the profile was not stored: {}",
        volume(&e1)["prefetch"]
    );
    assert_eq!(
        volume(&e1)["prefetch"]["profile_chunks"].as_u64(),
        Some(READS)
    );
    e1.stop_ok();
    let profiles = dir.path().join("origin-state/volumes/vol/profiles");
    assert_eq!(std::fs::read_dir(&profiles).unwrap().count(), 1);

    // Second boot, another edge with an empty cache: the plan streams
    // from the attach, ahead of the reads.
    let e2 = edge(dir.path(), &wan.addr(), "cache-2");
    boot(&e2, &image);
    let (demand_2, pushed_2) = link_bytes(&e2);
    let status = volume(&e2)["prefetch"].clone();
    eprintln!(
        "demand bytes: first boot {demand_1}, second {demand_2}; pushed in the second \
         {pushed_2}; prefetch {status}"
    );
    assert!(
        demand_1 >= READS * u64::from(READ_LEN),
        "the first boot read through the link: {demand_1}"
    );
    assert!(
        demand_2 * 10 <= demand_1,
        "the second boot's demand reads did not drop by 90%: {demand_2} vs {demand_1}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || volume(&e2)["prefetch"]["plan"]
            == "done"),
        "{}",
        volume(&e2)["prefetch"]
    );
    let planned = volume(&e2)["prefetch"]["pushed_bytes"].as_u64().unwrap();
    assert!(
        planned >= READS * u64::from(READ_LEN),
        "the plan pushed {planned} bytes"
    );
    // Nearly every chunk it pushed was read by the boot afterwards (one
    // that arrived after the boot had fetched it is not), and every
    // pushed byte the cache took is one or the other.
    let p = volume(&e2)["prefetch"].clone();
    let (used, unread) = (
        p["used_bytes"].as_u64().unwrap(),
        p["unread_bytes"].as_u64().unwrap(),
    );
    assert!(used * 10 >= planned * 9, "{p}");
    assert_eq!(used + unread, planned, "{p}");

    // The second boot's own profile joins the first: two kept.
    assert!(wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(&profiles).unwrap().count() == 2
    }));
    e2.stop_ok();

    // The origin lists them, and the plan they make: every boot chunk.
    let origin_api = o.announced("api").to_owned();
    let listing = json(&run(Command::new(ferry_bin()).args([
        "origin",
        "profiles",
        "vol",
        "--json",
        "--api",
        &origin_api,
    ])));
    let chunks: Vec<u64> = listing["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["chunks"].as_u64().unwrap())
        .collect();
    assert_eq!(chunks, [READS, READS], "{listing}");
    assert_eq!(listing["plan_bytes"].as_u64(), Some(READS * 64 * 1024));
    let text =
        run(Command::new(ferry_bin()).args(["origin", "profiles", "vol", "--api", &origin_api]));
    assert!(text.contains("2 boot profiles"), "{text}");

    // That edge again, its cache warm: the origin sent it every planned
    // chunk before, so the plan sends (almost) nothing again, and the
    // boot reads its cache.
    let e3 = edge(dir.path(), &wan.addr(), "cache-2");
    assert!(
        wait_until(Duration::from_secs(30), || volume(&e3)["prefetch"]["plan"]
            == "done"),
        "{}",
        volume(&e3)["prefetch"]
    );
    boot(&e3, &image);
    let (demand_3, pushed_3) = link_bytes(&e3);
    eprintln!("a warm restart: demand bytes {demand_3}, pushed {pushed_3}");
    assert!(
        pushed_3 * 10 <= planned,
        "a warm restart was pushed {pushed_3} bytes of a {planned}-byte plan again"
    );
    assert!(demand_3 * 10 <= demand_1, "{demand_3}");
    e3.stop_ok();

    // A new edge whose guest reads something else entirely (as if the
    // profiles were another image's): the plan is reported as little
    // used once the boot window closes, not silently kept on.
    let e4 = edge(dir.path(), &wan.addr(), "cache-4");
    let booted: Vec<u64> = (0..READS).map(|i| boot_read(i) / MIB).collect();
    let mut c = ferry_tests::nbd::Client::handshake(e4.connect(), "vol").unwrap();
    for group in (0..SIZE / MIB).filter(|g| !booted.contains(g)).take(20) {
        assert_eq!(c.read(group * MIB, READ_LEN).unwrap().error, 0);
    }
    assert!(
        wait_until(Duration::from_secs(30), || volume(&e4)["prefetch"]["plan"]
            == "done, little used"),
        "{}",
        volume(&e4)["prefetch"]
    );
    assert_eq!(volume(&e4)["prefetch"]["used_bytes"].as_u64(), Some(0));
    drop(c);
    e4.stop_ok();
}
