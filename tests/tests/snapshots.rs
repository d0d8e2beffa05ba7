//! Snapshots of a volume at the origin, driven through `ferry snapshot` and
//! the origin's API with an edge writing: a rollback restores exactly the
//! snapshot's bytes (`qemu-img compare` against a copy taken when it was
//! taken, through an edge whose cache holds newer data); a snapshot taken
//! while an edge ships batches holds all of one batch and none of the
//! next; a rollback is refused while an edge holds the volume; deleting a
//! middle snapshot keeps the others' bytes; all of it survives a SIGKILL
//! of the origin.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::{
    api, assert_files_equal, cmd, ferry_bin, http_unix, random_image, run, run_fail, tempdir,
    wait_until, Ferry, TempDir, MIB,
};
use serde_json::Value;

const SIZE: u64 = 16 * MIB;

struct Site {
    dir: TempDir,
    image: PathBuf,
}

fn site() -> Site {
    let dir = tempdir();
    let image = random_image(dir.path(), "disk.img", SIZE);
    Site { dir, image }
}

impl Site {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ferry origin` serving the image as `vol`, its state in the site.
    fn origin(&self) -> Ferry {
        self.origin_with(&[])
    }

    fn origin_with(&self, extra: &[&str]) -> Ferry {
        Ferry::spawn(
            [
                "origin".as_ref(),
                "--listen".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--export".as_ref(),
                format!("vol={}", self.image.display()).as_ref(),
                "--state-dir".as_ref(),
                self.path("origin-state").as_os_str(),
                "--no-tls".as_ref(),
            ]
            .into_iter()
            .chain(extra.iter().map(std::ffi::OsStr::new)),
            &["origin", "api"],
        )
    }

    /// An edge for `vol` with its cache in `cache` (kept across runs):
    /// writes wait in its journal until flushed (long RPO), so each
    /// `flush` ships one batch.
    fn edge(&self, origin: &Ferry, cache: &str) -> Ferry {
        Ferry::spawn(
            [
                "edge".as_ref(),
                "--origin".as_ref(),
                origin.announced("origin").as_ref(),
                "--volume".as_ref(),
                "vol".as_ref(),
                "--cache-dir".as_ref(),
                self.path(cache).as_os_str(),
                "--cache-size".as_ref(),
                "64M".as_ref(),
                "--rpo".as_ref(),
                "600".as_ref(),
                "--nbd".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--no-tls".as_ref(),
            ],
            &["nbd", "api"],
        )
    }
}

fn origin_api(o: &Ferry) -> PathBuf {
    PathBuf::from(o.announced("api"))
}

/// `ferry snapshot ARGS --api ORIGIN_API`.
fn snapshot_cli(o: &Ferry, args: &[&str]) -> String {
    run(Command::new(ferry_bin())
        .arg("snapshot")
        .args(args)
        .arg("--api")
        .arg(origin_api(o)))
}

fn snapshot_json(o: &Ferry, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = snapshot_cli(o, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn volume(o: &Ferry) -> Value {
    api(&origin_api(o), "GET", "/v1/volumes/vol", None, 200)
}

/// Every journaled write of the edge applied at the origin.
fn flush(e: &Ferry) {
    api(
        Path::new(e.announced("api")),
        "POST",
        "/v1/volumes/vol/flush",
        None,
        200,
    );
}

fn qemu_io(e: &Ferry, cmds: &[&str]) {
    let mut c = cmd("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(c.arg(e.uri("vol")));
    assert!(!out.contains("failed"), "{out}");
}

/// The volume as the edge serves it, copied into `to`.
fn capture(e: &Ferry, to: &Path) {
    run(cmd("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &e.uri("vol")])
        .arg(to));
}

fn compare(e: &Ferry, with: &Path) {
    run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &e.uri("vol")])
        .arg(with));
}

/// Stops the edge (everything shipped) and waits until the origin saw it
/// let go of the volume.
fn stop_edge(o: &Ferry, e: Ferry) {
    flush(&e);
    e.stop_ok();
    assert!(
        wait_until(Duration::from_secs(30), || volume(o)
            .get("attached_by")
            .is_none()),
        "the origin still sees the edge: {}",
        volume(o)
    );
}

fn snapshot_names(o: &Ferry) -> Vec<(String, u64)> {
    let l = api(
        &origin_api(o),
        "GET",
        "/v1/volumes/vol/snapshots",
        None,
        200,
    );
    l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["applied_seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn automatic_snapshots_precede_each_new_edges_writes_and_keep_the_newest() {
    let s = site();
    let o = s.origin_with(&["--auto-snapshots", "2"]);
    let mut before = Vec::new();
    // Three edges one after the other (their own caches: new holders),
    // each writing; the same edge reconnecting takes none.
    for (i, cache) in ["c1", "c2", "c3"].into_iter().enumerate() {
        let e = s.edge(&o, cache);
        let at = s.path(&format!("before-{cache}.raw"));
        capture(&e, &at);
        before.push(at);
        qemu_io(&e, &[&format!("write -P 0x{:02x} {}M 1M", 0x61 + i, 2 * i)]);
        flush(&e);
        qemu_io(&e, &["write -P 0x70 10M 64k"]);
        flush(&e);
        stop_edge(&o, e);
    }
    let e = s.edge(&o, "c3");
    qemu_io(&e, &["write -P 0x71 11M 64k"]);
    stop_edge(&o, e);
    let names = || -> Vec<String> {
        snapshot_names(&o)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with("pre-write-"))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), || names().len() == 2),
        "the oldest automatic snapshot is merged away: {:?}",
        snapshot_names(&o)
    );
    let kept = names();
    // Each holds the volume as it was before its edge's first write.
    for (name, at) in kept.iter().zip(&before[1..]) {
        snapshot_cli(&o, &["rollback", &format!("vol@{name}")]);
        let e = s.edge(&o, "check");
        compare(&e, at);
        stop_edge(&o, e);
    }
    let out = run_fail(
        Command::new(ferry_bin())
            .args(["snapshot", "create", "vol@pre-write-x", "--api"])
            .arg(origin_api(&o)),
    )
    .1;
    assert!(out.contains("automatic"), "{out}");
}

#[test]
fn a_rollback_restores_the_snapshot_exactly_and_no_edge_serves_the_old_cache() {
    let s = site();
    let o = s.origin();
    let e = s.edge(&o, "cache");
    qemu_io(&e, &["write -P 0x11 0 1M", "write -P 0x22 5M 512k"]);
    flush(&e);
    let first = snapshot_json(&o, &["create", "vol@first"]);
    assert_eq!(first["name"], "first");
    assert_eq!(first["layer"], "image");
    assert!(first["applied_seq"].as_u64().unwrap() >= 1, "{first}");
    let at_first = s.path("at-first.raw");
    capture(&e, &at_first);

    qemu_io(
        &e,
        &[
            "write -P 0x33 512k 2M",
            "write -z 8M 1M",
            "write -P 0x44 15M 4k",
            "write -P 0x45 3000 1000",
        ],
    );
    flush(&e);
    // No name: an automatic one.
    let second = snapshot_json(&o, &["create", "vol"]);
    let second_name = second["name"].as_str().unwrap().to_owned();
    assert!(second_name.starts_with("auto-"), "{second}");
    assert!(second["applied_seq"].as_u64() > first["applied_seq"].as_u64());
    let at_second = s.path("at-second.raw");
    capture(&e, &at_second);

    // Newer data everywhere it matters, read through the edge so that its
    // cache holds it.
    qemu_io(&e, &["write -P 0x55 3M 6M", "write -P 0x56 14M 2M"]);
    flush(&e);
    let now = s.path("now.raw");
    capture(&e, &now);
    // The image itself is the oldest snapshot from then on.
    assert_files_equal(&s.image, &at_first);

    // Refused while the edge holds the volume, naming it.
    let holder = volume(&o)["attached_by"].as_str().unwrap().to_owned();
    let (st, out) = run_fail(
        Command::new(ferry_bin())
            .args(["snapshot", "rollback", "vol@first", "--api"])
            .arg(origin_api(&o)),
    );
    assert!(!st.success());
    assert!(out.contains(&holder) && out.contains("attached"), "{out}");
    let r = http_unix(
        &origin_api(&o),
        "POST",
        "/v1/volumes/vol/snapshots/first/rollback",
        None,
        None,
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"], "conflict");
    compare(&e, &now);

    let epoch = volume(&o)["epoch"].as_str().unwrap().to_owned();
    stop_edge(&o, e);
    let back = snapshot_json(&o, &["rollback", "vol@first"]);
    assert_eq!(back["snapshot"]["name"], "first");
    assert_ne!(back["epoch"].as_str().unwrap(), epoch);
    assert_eq!(volume(&o)["epoch"], back["epoch"]);
    // The same cache directory: what it holds is of the old epoch.
    let e = s.edge(&o, "cache");
    compare(&e, &at_first);
    // Writes after a rollback land on top of it.
    qemu_io(&e, &["write -P 0x66 1M 64k"]);
    flush(&e);
    qemu_io(&e, &["read -P 0x66 1M 64k"]);
    stop_edge(&o, e);

    // Every snapshot is still there: on to the second, then back.
    snapshot_cli(&o, &["rollback", &format!("vol@{second_name}")]);
    let e = s.edge(&o, "cache");
    compare(&e, &at_second);
    stop_edge(&o, e);
    let out = snapshot_cli(&o, &["rollback", "vol@first"]);
    assert!(out.contains("rolled back to first"), "{out}");
    let e = s.edge(&o, "cache");
    compare(&e, &at_first);

    let table = snapshot_cli(&o, &["list", "vol"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SNAPSHOT"), "{table}");
    assert!(
        lines[1].starts_with("first ") && lines[1].contains("image"),
        "{table}"
    );
    assert!(lines[2].starts_with(&second_name), "{table}");
    assert!(lines[3].starts_with("(current)"), "{table}");
    let names: Vec<String> = snapshot_names(&o).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["first".to_owned(), second_name]);
    // A snapshot that is not there, and a bad name.
    let r = http_unix(
        &origin_api(&o),
        "POST",
        "/v1/volumes/vol/snapshots/nope/rollback",
        None,
        None,
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = http_unix(
        &origin_api(&o),
        "POST",
        "/v1/volumes/vol/snapshots",
        Some(r#"{"name": "bad name"}"#),
        None,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = http_unix(
        &origin_api(&o),
        "POST",
        "/v1/volumes/vol/snapshots",
        Some(r#"{"name": "first"}"#),
        None,
    );
    assert_eq!(r.status, 409, "{}", r.body);
    e.stop_ok();
    o.stop_ok();
}

/// Ranges every step writes its counter into (64 KiB each, 256 KiB apart).
const RANGES: u64 = 24;
const RANGE: u64 = 64 * 1024;

fn range_at(j: u64) -> u64 {
    j * 4 * RANGE + 4096
}

/// What step `k` (from 1) writes.
fn counter(k: u64) -> u8 {
    u8::try_from(k % 250).unwrap() + 1
}

#[test]
fn a_snapshot_taken_while_an_edge_ships_batches_sits_on_a_batch_boundary() {
    let s = site();
    let o = s.origin();
    let e = s.edge(&o, "cache");
    let seq0 = volume(&o)["applied_seq"].as_u64().unwrap();
    // Step k writes counter(k) into every byte of every range, then
    // flushes: one batch, k = its sequence number - seq0.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let nbd = e.addr();
        let edge_api = PathBuf::from(e.announced("api"));
        std::thread::spawn(move || {
            let stream = std::net::TcpStream::connect(nbd).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut client = ferry_tests::nbd::Client::handshake(stream, "vol").unwrap();
            let mut step = 0u64;
            while !stop.load(Ordering::Relaxed) {
                step += 1;
                let data = vec![counter(step); usize::try_from(RANGE).unwrap()];
                for j in 0..RANGES {
                    assert_eq!(client.write(range_at(j), &data).unwrap().error, 0);
                }
                assert_eq!(client.flush().unwrap().error, 0);
                api(&edge_api, "POST", "/v1/volumes/vol/flush", None, 200);
            }
            step
        })
    };
    let mut taken = Vec::new();
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(100 + 60 * i));
        let snap = api(
            &origin_api(&o),
            "POST",
            "/v1/volumes/vol/snapshots",
            Some(&format!(r#"{{"name": "b{i}"}}"#)),
            201,
        );
        taken.push((
            snap["name"].as_str().unwrap().to_owned(),
            snap["applied_seq"].as_u64().unwrap(),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let steps = writer.join().unwrap();
    let seqs: Vec<u64> = taken.iter().map(|t| t.1).collect();
    // The last snapshot may coincide with the last step (taken as its
    // batch was applied, just before the writer saw the stop): at least
    // one must fall strictly between the first batch and the last.
    assert!(
        seqs.iter().any(|&q| q > seq0 && q < seq0 + steps),
        "the snapshots did not land while batches were shipped: {seqs:?}, {steps} steps"
    );
    assert_eq!(snapshot_names(&o), taken);
    assert_eq!(volume(&o)["applied_seq"].as_u64(), Some(seq0 + steps));
    stop_edge(&o, e);

    // Each snapshot, rolled back to and read through an edge: one counter
    // everywhere, the one its sequence number names.
    let original = std::fs::read(s.path("disk.img")).unwrap();
    for (name, seq) in &taken {
        snapshot_cli(&o, &["rollback", &format!("vol@{name}")]);
        let e = s.edge(&o, "cache");
        let mut client = ferry_tests::nbd::Client::handshake(e.connect(), "vol").unwrap();
        for j in 0..RANGES {
            let r = client
                .read(range_at(j), u32::try_from(RANGE).unwrap())
                .unwrap();
            assert_eq!(r.error, 0);
            let at = usize::try_from(range_at(j)).unwrap();
            let want: Vec<u8> = match seq - seq0 {
                0 => original[at..at + usize::try_from(RANGE).unwrap()].to_vec(),
                step => vec![counter(step); usize::try_from(RANGE).unwrap()],
            };
            assert!(
                r.data == want,
                "snapshot {name} (batch {seq}) is not that batch's boundary in range {j}: \
                 found {:?}",
                &r.data[..8]
            );
        }
        client.disconnect();
        stop_edge(&o, e);
    }
    o.stop_ok();
}

#[test]
fn deleting_a_middle_snapshot_keeps_the_others_and_all_of_it_survives_a_killed_origin() {
    let s = site();
    let o = s.origin();
    let e = s.edge(&o, "cache");
    let mut copies = Vec::new();
    for (i, w) in [
        ["write -P 0x10 0 3M", "write -z 12M 64k"],
        ["write -P 0x20 2M 3M", "write -P 0x21 12M 4k"],
        ["write -P 0x30 4M 3M", "write -P 0x31 12M 100k"],
    ]
    .iter()
    .enumerate()
    {
        qemu_io(&e, w);
        flush(&e);
        snapshot_cli(&o, &["create", &format!("vol@s{}", i + 1)]);
        let copy = s.path(&format!("s{}.raw", i + 1));
        capture(&e, &copy);
        copies.push(copy);
    }
    qemu_io(&e, &["write -P 0x40 1M 6M"]);
    flush(&e);
    let now = s.path("now.raw");
    capture(&e, &now);

    // Deleted while the edge keeps the volume: it goes on serving it.
    let out = snapshot_cli(&o, &["delete", "vol@s2"]);
    assert!(out.contains("deleted vol@s2"), "{out}");
    let listed = snapshot_names(&o);
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["s1", "s3"]);
    compare(&e, &now);
    let r = http_unix(
        &origin_api(&o),
        "DELETE",
        "/v1/volumes/vol/snapshots/s2",
        None,
        None,
    );
    assert_eq!(r.status, 404, "{}", r.body);

    // SIGKILL the origin, start it again on the same state: the chain and
    // the catalogue are found back.
    stop_edge(&o, e);
    let epoch = volume(&o)["epoch"].clone();
    let st = o.stop_with("KILL");
    assert!(!st.success());
    let o = s.origin();
    assert_eq!(snapshot_names(&o), listed);
    assert_eq!(volume(&o)["epoch"], epoch);
    let e = s.edge(&o, "cache");
    compare(&e, &now);
    stop_edge(&o, e);
    for (name, copy) in [("s3", &copies[2]), ("s1", &copies[0])] {
        snapshot_cli(&o, &["rollback", &format!("vol@{name}")]);
        let e = s.edge(&o, "cache");
        compare(&e, copy);
        stop_edge(&o, e);
    }
    // Deleting the rest leaves the image holding the volume again.
    snapshot_cli(&o, &["delete", "vol@s1"]);
    snapshot_cli(&o, &["delete", "vol@s3"]);
    assert!(snapshot_names(&o).is_empty());
    o.stop_ok();
    assert_files_equal(&s.image, &copies[0]);
}
