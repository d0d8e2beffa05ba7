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
    origin_of(dir, &[("vol", image)])
}

/// An origin exporting each (name, image).
fn origin_of(dir: &std::path::Path, exports: &[(&str, &std::path::Path)]) -> Ferry {
    let mut args: Vec<std::ffi::OsString> =
        vec!["origin".into(), "--listen".into(), "127.0.0.1:0".into()];
    for (name, image) in exports {
        args.push("--export".into());
        args.push(format!("{name}={}", image.display()).into());
    }
    args.extend([
        "--state-dir".into(),
        dir.join("origin-state").into_os_string(),
        "--no-tls".into(),
    ]);
    Ferry::spawn(args, &["origin", "api"])
}

fn edge(dir: &std::path::Path, origin: &str, cache: &str) -> Ferry {
    edge_quiet(dir, origin, cache, 2)
}

/// An edge whose boot window closes after `quiet` seconds without a new
/// chunk read.
fn edge_quiet(dir: &std::path::Path, origin: &str, cache: &str, quiet: u32) -> Ferry {
    edge_of(dir, origin, cache, quiet, "vol")
}

fn edge_of(dir: &std::path::Path, origin: &str, cache: &str, quiet: u32, name: &str) -> Ferry {
    let quiet = quiet.to_string();
    Ferry::spawn(
        [
            "edge".as_ref(),
            "--origin".as_ref(),
            origin.as_ref(),
            "--volume".as_ref(),
            name.as_ref(),
            "--cache-dir".as_ref(),
            dir.join(cache).as_os_str(),
            "--cache-size".as_ref(),
            "256M".as_ref(),
            "--profile-quiet".as_ref(),
            quiet.as_ref(),
            "--nbd".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--no-tls".as_ref(),
        ],
        &["nbd", "api"],
    )
}

fn volume(e: &Ferry) -> Value {
    volume_of(e, "vol")
}

fn volume_of(e: &Ferry, name: &str) -> Value {
    let socket = PathBuf::from(e.announced("api"));
    api(&socket, "GET", &format!("/v1/volumes/{name}"), None, 200)
}

/// Demand bytes the edge fetched, and bytes the origin pushed it.
fn link_bytes(e: &Ferry) -> (u64, u64) {
    link_bytes_of(e, "vol")
}

fn link_bytes_of(e: &Ferry, name: &str) -> (u64, u64) {
    let v = volume_of(e, name);
    let l = &v["link"];
    (
        l["demand_bytes"].as_u64().expect("demand bytes"),
        l["push_bytes"].as_u64().expect("push bytes"),
    )
}

/// Waits until the edge takes in no more pushes (nothing new for half a
/// second; pieces may arrive out of order) and returns the bytes pushed.
fn pushes_settled(e: &Ferry) -> u64 {
    let mut last = u64::MAX;
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = link_bytes(e).1;
            std::mem::replace(&mut last, now) == now
        }),
        "pushes went on for 10 s"
    );
    last
}

/// The boot: every read in order, checked against the image, with a
/// guest's few milliseconds of work between reads.
fn boot(e: &Ferry, image: &std::path::Path) {
    boot_of(e, image, "vol");
}

fn boot_of(e: &Ferry, image: &std::path::Path, name: &str) {
    let mut c = ferry_tests::nbd::Client::handshake(e.connect(), name).unwrap();
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

/// A volume's first boot ever, no profile: the origin plans it from the
/// files the boot loader's configuration names (kernel, initramfs, init
/// and what it loads), so the boot's reads find them pushed; and a read
/// inside a file no plan named pushes the rest of that file, not a fixed
/// 1 MiB group.
#[test]
fn a_first_boot_is_planned_from_the_volumes_files_and_a_file_read_pushes_the_file() {
    use prefetch::layout::{scan, Limits};
    let dir = tempdir();
    let disk = ferry_tests::disk::build_disk(dir.path());
    let image = dir.path().join("disk.img");
    std::fs::write(&image, &disk.bytes).unwrap();
    let layout = scan(&disk.bytes, Limits::default());
    let extents = |fs: usize, path: &str| {
        let f = layout.resolve(fs, path).unwrap();
        (f.extents.clone(), f.size)
    };
    let served = origin(dir.path(), &image);
    let wan = Wan::start(served.announced("origin"));
    let e = edge(dir.path(), &wan.addr(), "cache");
    assert!(
        wait_until(Duration::from_secs(30), || volume(&e)["prefetch"]["plan"]
            == "done"),
        "{}",
        volume(&e)["prefetch"]
    );
    let planned = volume(&e)["prefetch"]["pushed_bytes"].as_u64().unwrap();
    // The boot: each boot file read whole, in the boot loader's 32 KiB
    // pieces, checked against the file.
    let mut client = ferry_tests::nbd::Client::handshake(e.connect(), "vol").unwrap();
    let mut read_file = |fs: usize, path: &str, limit: u64| -> u64 {
        let (ext, size) = extents(fs, path);
        let mut got = Vec::new();
        for (start, len) in ext {
            for off in (start..start + len).step_by(READ_LEN as usize) {
                let n = u32::try_from((start + len - off).min(u64::from(READ_LEN))).unwrap();
                let r = client.read(off, n).unwrap();
                assert_eq!(r.error, 0, "{path} at {off}");
                got.extend_from_slice(&r.data);
                if got.len() as u64 >= limit {
                    break;
                }
            }
        }
        got.truncate(usize::try_from(size.min(limit)).unwrap());
        if limit >= size {
            assert!(
                got == disk.files[path],
                "{path} read through the edge differs"
            );
        }
        size.min(limit)
    };
    let boot_files = [
        (0, "/syslinux.cfg"),
        (0, "/vmlinuz"),
        (0, "/initrd.img"),
        (1, "/usr/sbin/myinit"),
        (1, "/usr/lib/x86_64-linux-gnu/libc.so.6"),
        (1, "/etc/fstab"),
    ];
    let (before, _) = link_bytes(&e);
    let boot_bytes: u64 = boot_files
        .iter()
        .map(|&(fs, p)| read_file(fs, p, u64::MAX))
        .sum();
    let (after_boot, _) = link_bytes(&e);
    eprintln!(
        "first boot from files: plan pushed {planned} bytes; the boot read {boot_bytes}, \
         of which {} on demand",
        after_boot - before
    );
    assert!(
        planned >= boot_bytes,
        "the plan pushed {planned} bytes for {boot_bytes} of boot files"
    );
    assert!(
        (after_boot - before) * 10 <= boot_bytes,
        "boot files read on demand: {} of {boot_bytes}",
        after_boot - before
    );
    // The origin shows the plan as files in boot order.
    let origin_api = served.announced("api").to_owned();
    let listing = json(&run(Command::new(ferry_bin()).args([
        "origin",
        "profiles",
        "vol",
        "--json",
        "--api",
        &origin_api,
    ])));
    assert_eq!(listing["plan_from"], "boot files", "{listing}");
    let files: Vec<&str> = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let at = |p: &str| {
        files
            .iter()
            .position(|f| *f == p)
            .unwrap_or_else(|| panic!("{p} not in {files:?}"))
    };
    assert!(at("/syslinux.cfg") < at("/vmlinuz") && at("/vmlinuz") < at("/initrd.img"));
    assert!(at("/initrd.img") < at("/usr/sbin/myinit"));
    let vmlinuz = &listing["files"][at("/vmlinuz")];
    assert_eq!(vmlinuz["size"].as_u64(), Some(1 << 20));
    assert_eq!(vmlinuz["planned_bytes"].as_u64(), Some(1 << 20));
    let text =
        run(Command::new(ferry_bin()).args(["origin", "profiles", "vol", "--api", &origin_api]));
    assert!(
        text.contains("plan from boot files") && text.contains("/initrd.img"),
        "{text}"
    );
    // Not a boot file: the first read fetches on demand and pushes the
    // rest of the file (3 MiB, not a 1 MiB group); reading it whole then
    // costs (almost) no demand bytes.
    let (_, pushed_before) = link_bytes(&e);
    let first = read_file(1, "/usr/bin/big", u64::from(READ_LEN));
    assert_eq!(first, u64::from(READ_LEN));
    // Until the push is over: most of the file arrived, and nothing more
    // for half a second (pieces may arrive out of order).
    let pushed = pushes_settled(&e);
    assert!(
        pushed >= pushed_before + (3 << 20) - (256 << 10),
        "the rest of the file was not pushed: {pushed} after {pushed_before}"
    );
    let (demand_before, _) = link_bytes(&e);
    let whole = read_file(1, "/usr/bin/big", u64::MAX);
    let (demand_after, _) = link_bytes(&e);
    eprintln!(
        "a 3 MiB file after its first read: {} bytes on demand",
        demand_after - demand_before
    );
    assert_eq!(whole, 3 << 20);
    assert!(
        demand_after - demand_before <= 64 << 10,
        "{}",
        demand_after - demand_before
    );
    drop(client);
    e.stop_ok();
}

/// NBD `CACHE` on an edge asks the origin for what the cache lacks as
/// background pushes (a link `Prefetch`), not as demand reads: afterwards
/// reading the range costs no demand byte, and a second `CACHE` of it
/// moves nothing.
#[test]
fn nbd_cache_reaches_the_origin_as_pushes() {
    let dir = tempdir();
    let image = sparse_image(dir.path(), "disk.img", SIZE);
    write_at(&image, 8 * MIB, &pattern_bytes(4 << 20, 7));
    let served = origin(dir.path(), &image);
    let wan = Wan::start(served.announced("origin"));
    let e = edge(dir.path(), &wan.addr(), "cache");
    let mut client = ferry_tests::nbd::Client::handshake(e.connect(), "vol").unwrap();
    // One chunk read first: it and the rest of its 1 MiB group (pushed
    // after it) are cached, and not asked for again.
    assert_eq!(client.read(8 * MIB, 4096).unwrap().error, 0);
    pushes_settled(&e);
    let (demand_0, pushed_0) = link_bytes(&e);
    assert_eq!(client.cache(8 * MIB, 4 << 20).unwrap().error, 0);
    let (demand_1, pushed_1) = link_bytes(&e);
    eprintln!(
        "CACHE of 4 MiB: {} bytes pushed, {} on demand",
        pushed_1 - pushed_0,
        demand_1 - demand_0
    );
    assert_eq!(demand_1, demand_0, "CACHE read through on demand");
    assert_eq!(pushed_1 - pushed_0, 3 << 20, "the three groups not cached");
    // The pushes reach the cache a moment after the origin sent its last.
    assert!(wait_until(Duration::from_secs(5), || {
        let r = client.read(8 * MIB + (4 << 20) - 4096, 4096).unwrap();
        r.error == 0 && link_bytes(&e).0 == demand_0
    }));
    for off in (8 * MIB..12 * MIB).step_by(READ_LEN as usize) {
        let r = client.read(off, READ_LEN).unwrap();
        assert!(
            r.data == read_at(&image, off, READ_LEN as usize),
            "at {off}"
        );
    }
    assert_eq!(link_bytes(&e).0, demand_0, "the range was in the cache");
    assert_eq!(client.cache(8 * MIB, 4 << 20).unwrap().error, 0);
    assert_eq!(
        link_bytes(&e).1,
        pushed_1,
        "a cached range is not pushed again"
    );
    // Out of range: an error, not a hang.
    assert_ne!(client.cache(SIZE - 4096, 8192).unwrap().error, 0);
    drop(client);
    e.stop_ok();
}

/// `ferry edge profile stop VOLUME` ends the boot window at once (the
/// boot is over, no need to wait for the reads to go quiet) and returns
/// once the origin stored the profile; a second stop says there is
/// nothing to stop.
#[test]
fn profile_stop_ends_the_boot_window_now() {
    let dir = tempdir();
    let image = sparse_image(dir.path(), "disk.img", SIZE);
    let served = origin(dir.path(), &image);
    let wan = Wan::start(served.announced("origin"));
    let e = edge_quiet(dir.path(), &wan.addr(), "cache", 600);
    let mut client = ferry_tests::nbd::Client::handshake(e.connect(), "vol").unwrap();
    for i in 0..5 {
        assert_eq!(client.read(i * 3 * MIB, 4096).unwrap().error, 0);
    }
    assert_eq!(volume(&e)["prefetch"]["profile"], "recording");
    let socket = e.announced("api").to_owned();
    let stop = || {
        let mut c = Command::new(ferry_bin());
        c.args(["edge", "profile", "stop", "vol", "--api", &socket]);
        c
    };
    let out = run(&mut stop());
    // The reply comes once the origin has the profile: an edge stopped
    // right after loses nothing.
    assert!(
        out.contains("5 chunks; the origin stored the profile"),
        "{out}"
    );
    assert_eq!(volume(&e)["prefetch"]["profile"], "stored");
    assert_eq!(volume(&e)["prefetch"]["profile_chunks"].as_u64(), Some(5));
    let (_, text) = ferry_tests::run_fail(&mut stop());
    assert!(
        text.contains("no boot profile is being recorded (profile: stored)"),
        "{text}"
    );
    let profiles = dir.path().join("origin-state/volumes/vol/profiles");
    assert_eq!(std::fs::read_dir(&profiles).unwrap().count(), 1);
    drop(client);
    e.stop_ok();
}

/// Hotspots: a second volume copied from the same template, never booted,
/// on another edge with an empty cache, is planned from the first
/// volume's boot (where its bytes match): its first boot's demand reads
/// drop by at least 90% too, and the origin says where the plan came
/// from.
#[test]
fn a_copy_of_a_booted_template_is_planned_from_its_boot() {
    let dir = tempdir();
    let image = sparse_image(dir.path(), "disk.img", SIZE);
    for i in 0..READS {
        let offset = boot_read(i) & !(MIB - 1);
        write_at(&image, offset, &pattern_bytes(1 << 20, i));
    }
    let copy = dir.path().join("copy.img");
    std::fs::copy(&image, &copy).unwrap();
    let served = origin_of(dir.path(), &[("vol", &image), ("copy", &copy)]);
    let wan = Wan::start(served.announced("origin"));
    let e1 = edge(dir.path(), &wan.addr(), "cache-1");
    boot(&e1, &image);
    let (demand_1, _) = link_bytes(&e1);
    assert!(
        wait_until(Duration::from_secs(30), || volume(&e1)["prefetch"]
            ["profile"]
            == "stored"),
        "{}",
        volume(&e1)["prefetch"]
    );
    e1.stop_ok();
    let e2 = edge_of(dir.path(), &wan.addr(), "cache-2", 2, "copy");
    assert!(
        wait_until(Duration::from_secs(30), || volume_of(&e2, "copy")
            ["prefetch"]["plan"]
            == "done"),
        "{}",
        volume_of(&e2, "copy")["prefetch"]
    );
    boot_of(&e2, &copy, "copy");
    let (demand_2, pushed_2) = link_bytes_of(&e2, "copy");
    eprintln!("hotspots: the template's first boot {demand_1} demand bytes; its copy's first boot {demand_2}, pushed {pushed_2}");
    assert!(demand_2 * 10 <= demand_1, "{demand_2} vs {demand_1}");
    let origin_api = served.announced("api").to_owned();
    let listing = json(&run(Command::new(ferry_bin()).args([
        "origin",
        "profiles",
        "copy",
        "--json",
        "--api",
        &origin_api,
    ])));
    assert_eq!(listing["plan_from"], "hotspots", "{listing}");
    e2.stop_ok();
}
