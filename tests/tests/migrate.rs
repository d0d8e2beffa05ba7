//! Migration end to end through the `ferry` binary and real clients: a
//! volume streamed through an emulated WAN is copied into local storage
//! while fio writes to it, cut over, and then served with the origin
//! stopped, also after the edge restarts; SIGKILLs of the edge in the
//! middle of a copy resume it where the persisted map says and end with a
//! copy equal to the origin's image plus the edge's writes. A cut-over
//! volume moves back shipping only the pieces that changed, its image
//! verified by signature, also when the origin is killed meanwhile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::{
    allocated_bytes, api, cmd, ferry_bin, run, sparse_image, tempdir, wait_until, write_at, Ferry,
    TempDir, Wan, MIB,
};
use serde_json::Value;

const SIZE: u64 = 64 * MIB;
/// Megabytes of the image holding data (the rest are holes).
const DATA_MIB: [u64; 12] = [0, 1, 2, 7, 8, 15, 21, 30, 31, 40, 50, 63];
/// Where fio writes during the copy: holes in the image.
const FIO_AT: u64 = 23 * MIB;
const FIO_LEN: u64 = 6 * MIB;

struct Setup {
    dir: TempDir,
    image: PathBuf,
    origin: Option<Ferry>,
    wan: Wan,
    config: PathBuf,
}

/// An origin serving volume `v`: 64 MiB, 12 MiB of it random data at
/// scattered places, the rest holes; behind the emulated WAN.
fn setup() -> Setup {
    setup_with(&DATA_MIB)
}

/// The same with data in the megabytes `data_mib`.
fn setup_with(data_mib: &[u64]) -> Setup {
    let dir = tempdir();
    let image = sparse_image(dir.path(), "v.img", SIZE);
    for (i, m) in data_mib.iter().enumerate() {
        write_at(
            &image,
            m * MIB,
            &ferry_tests::pattern_bytes(usize::try_from(MIB).unwrap(), i as u64 + 1),
        );
    }
    let origin = start_origin(dir.path(), &image, "127.0.0.1:0");
    let wan = Wan::start(origin.announced("origin"));
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "cache_dir = \"{}\"\ncache_size = \"256M\"\nnbd = [\"127.0.0.1:0\"]\n\
             [link]\nno_tls = true\n\
             [[volume]]\nname = \"v\"\norigin = \"{}\"\nrpo_secs = 1\njournal_size = \"64M\"\n",
            dir.path().join("cache").display(),
            wan.addr()
        ),
    )
    .unwrap();
    Setup {
        dir,
        image,
        origin: Some(origin),
        wan,
        config,
    }
}

fn start_origin(dir: &Path, image: &Path, listen: &str) -> Ferry {
    Ferry::spawn(
        [
            "origin".to_owned(),
            "--listen".into(),
            listen.into(),
            "--state-dir".into(),
            dir.join("origin-state").display().to_string(),
            "--no-tls".into(),
            "--export".into(),
            format!("v={}", image.display()),
        ],
        &["origin", "api"],
    )
}

fn start_edge(config: &Path) -> Ferry {
    Ferry::spawn(
        ["edge".as_ref(), "--config".as_ref(), config.as_os_str()],
        &["nbd", "api"],
    )
}

fn socket(e: &Ferry) -> PathBuf {
    PathBuf::from(e.announced("api"))
}

fn ferry_cli(e: &Ferry, args: &[&str]) -> String {
    run(Command::new(ferry_bin())
        .args(args)
        .arg("--api")
        .arg(socket(e)))
}

fn volume(e: &Ferry) -> Value {
    api(&socket(e), "GET", "/v1/volumes/v", None, 200)
}

/// Waits until the volume is up (the edge attaches in the background).
fn wait_up(e: &Ferry) {
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = volume(e)["state"].as_str().unwrap_or("").to_owned();
            s == "up" || s == "cut_over"
        }),
        "the volume did not come up: {}",
        volume(e)
    );
}

fn migration(e: &Ferry) -> Value {
    api(&socket(e), "GET", "/v1/volumes/v/migration", None, 200)
}

fn wait_stage(e: &Ferry, stage: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(timeout, || {
        last = migration(e);
        last["stage"] == stage
    });
    assert!(reached, "the migration did not reach {stage}: {last}");
    last
}

fn compare(a: &str, b: &Path) {
    run(cmd("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        a,
        &b.display().to_string(),
    ]));
}

fn nbd_uri(e: &Ferry) -> String {
    format!("nbd://{}/v", e.addr())
}

#[test]
fn a_volume_migrates_under_writes_cuts_over_and_runs_without_its_origin() {
    let mut lab = setup();
    let e = start_edge(&lab.config);
    wait_up(&e);
    let target = lab.dir.path().join("local").join("v.raw");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();

    // Writes during the whole copy, into 6 MiB that were holes: once
    // shipped they are data at the origin too, which the copy may fetch.
    let mut fio = cmd("fio");
    fio.args([
        "--ioengine=nbd",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=8",
        &format!("--offset={FIO_AT}"),
        &format!("--size={FIO_LEN}"),
        "--time_based",
        "--runtime=8",
        "--output-format=terse",
        "--name=v",
        &format!("--uri={}", nbd_uri(&e)),
    ]);
    let fio = fio.stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let started: Value = serde_json::from_str(&ferry_cli(
        &e,
        &[
            "migrate",
            "start",
            "v",
            "--target",
            target.to_str().unwrap(),
            // Slow at first (12 MiB of data take 12 s at 8 Mbit/s), so the
            // early cut-over below is certainly early.
            "--rate",
            "8",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(started["stage"], "migrating", "{started}");
    assert_eq!(started["bytes_total"], SIZE);

    // An early cut-over is refused with the remaining bytes.
    let early = ferry_tests::http_unix(&socket(&e), "POST", "/v1/volumes/v/cutover", None, None);
    assert_eq!(early.status, 409, "{}", early.body);
    assert!(early.body.contains("bytes"), "{}", early.body);
    let fio = fio.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&fio.stdout);
    assert!(fio.status.success(), "fio failed: {out}");
    for line in out.lines().filter(|l| l.starts_with("3;")) {
        assert_eq!(line.split(';').nth(4), Some("0"), "fio saw errors: {line}");
    }
    // Full speed for the rest, followed by `ferry migrate status --wait`
    // (a progress bar on stderr until the copy is complete).
    ferry_cli(&e, &["migrate", "rate", "v", "0"]);
    let mut wait = Command::new(ferry_bin());
    wait.args(["migrate", "status", "v", "--wait", "--api"])
        .arg(socket(&e))
        .stderr(std::process::Stdio::piped());
    let mut wait = wait.spawn().unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || wait
            .try_wait()
            .unwrap()
            .is_some()),
        "`ferry migrate status --wait` did not end: {}",
        migration(&e)
    );
    let waited = wait.wait_with_output().unwrap();
    let bar = String::from_utf8_lossy(&waited.stderr);
    assert!(waited.status.success(), "{bar}");
    assert!(bar.contains("100"), "no finished progress bar: {bar}");
    let done = wait_stage(&e, "mirrored", Duration::from_secs(30));
    assert_eq!(done["bytes_remaining"], 0, "{done}");
    // Holes never crossed the link: what came over it is at most the
    // image's data and the range fio wrote (what of it was still in the
    // journal was copied from there).
    let from_link = done["bytes_from_link"].as_u64().unwrap();
    let data = DATA_MIB.len() as u64 * MIB + FIO_LEN;
    assert!(
        from_link <= data,
        "{from_link} bytes came over the link for {data} bytes of data: {done}"
    );
    assert!(done["bytes_zero"].as_u64().unwrap() >= 32 * MIB, "{done}");

    // Mirrored: reads of local chunks come from the copy, writes still
    // reach the origin.
    run(cmd("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 3M 1M", &nbd_uri(&e)]));
    let cut: Value =
        serde_json::from_str(&ferry_cli(&e, &["migrate", "cutover", "v", "--json"])).unwrap();
    assert_eq!(cut["stage"], "cut-over", "{cut}");
    // The journal drained first: the origin has every write, and the copy
    // is exactly the origin's image.
    compare(&lab.image.display().to_string(), &target);
    ferry_tests::assert_range_filled(&lab.image, 3 * MIB, MIB, 0x5c);
    assert!(
        allocated_bytes(&target) < SIZE / 2,
        "the copy is not sparse: {} bytes allocated",
        allocated_bytes(&target)
    );

    // The origin goes away; the volume keeps running from the copy.
    lab.origin.take().unwrap().stop_ok();
    run(cmd("qemu-io").args(["-f", "raw", "-c", "write -P 0x6d 10M 2M", &nbd_uri(&e)]));
    compare(&nbd_uri(&e), &target);
    ferry_tests::assert_range_filled(&target, 10 * MIB, 2 * MIB, 0x6d);
    let status = ferry_cli(&e, &["status"]);
    assert!(status.contains("cut-over"), "{status}");
    let m = migration(&e);
    assert_eq!(
        m["bytes_dirty"],
        2 * MIB,
        "the dirty map counts the 2 MiB written: {m}"
    );

    // A restart with the origin still down: served from the copy alone.
    e.stop_ok();
    let e = start_edge(&lab.config);
    wait_up(&e);
    let v = volume(&e);
    assert_eq!(v["state"], "cut_over", "{v}");
    assert_eq!(v["stage"], "cut-over", "{v}");
    assert_eq!(v["migration"]["bytes_dirty"], 2 * MIB, "{v}");
    compare(&nbd_uri(&e), &target);
    // Pausing or a second migration of a cut-over volume is refused.
    let r = ferry_tests::http_unix(
        &socket(&e),
        "PATCH",
        "/v1/volumes/v/migration",
        Some(r#"{"paused": true}"#),
        None,
    );
    assert_eq!(r.status, 409, "{}", r.body);
    e.stop_ok();
    drop(lab.wan);
}

#[test]
fn sigkill_in_the_middle_of_a_copy_resumes_where_the_map_says() {
    // 40 MiB of data: at 4 Mbit/s the copy takes about 80 s of uptime, so
    // all 20 kills (about 1.5 s of uptime each, one chunk per restart
    // unpaced) land in the middle of it.
    let data: Vec<u64> = (0..SIZE / MIB).filter(|m| m % 8 < 5).collect();
    let lab = setup_with(&data);
    let target = lab.dir.path().join("v.raw");
    let mut e = start_edge(&lab.config);
    wait_up(&e);
    let started: Value = serde_json::from_str(&ferry_cli(
        &e,
        &[
            "migrate",
            "start",
            "v",
            "--target",
            target.to_str().unwrap(),
            "--rate",
            "4",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(started["stage"], "migrating");
    let mut rng = testkit::rng(testkit::fresh_seed("migrate-sigkill"));
    // What the persisted map held at the previous restart.
    let mut saved = 0u64;
    let mut mid_copy = 0;
    let mut resumed_with_progress = 0;
    for round in 0..20u64 {
        std::thread::sleep(Duration::from_millis(rng.u64(700..1500)));
        // A write that may or may not reach the journal before the kill.
        let at = rng.u64(0..SIZE / MIB) * MIB + rng.u64(0..256) * 4096;
        let mut nbd = ferry_tests::nbd::Client::handshake(e.connect(), "v").unwrap();
        let written = nbd
            .write(at, &ferry_tests::pattern_bytes(4096, round))
            .unwrap();
        assert_eq!(written.error, 0);
        drop(nbd);
        e.signal("KILL");
        drop(e);
        e = start_edge(&lab.config);
        wait_up(&e);
        let m = migration(&e);
        let now = m["bytes_local"].as_u64().unwrap();
        // The map only grows while migrating (writes to copied chunks go
        // to the copy too): a restart never loses what was saved.
        assert!(
            now >= saved,
            "round {round}: the saved map went back from {saved} to {now} bytes: {m}"
        );
        if m["stage"] == "migrating" {
            mid_copy += 1;
            if now > saved {
                resumed_with_progress += 1;
            }
        }
        saved = now;
    }
    assert!(
        mid_copy >= 15,
        "the copy finished too early: only {mid_copy} of 20 kills landed in the middle"
    );
    assert!(
        resumed_with_progress >= mid_copy / 2,
        "only {resumed_with_progress} of {mid_copy} restarts found more progress saved"
    );
    // Full speed for the rest, then everything shipped: the copy equals the
    // origin's image, which holds the edge's writes.
    api(
        &socket(&e),
        "PATCH",
        "/v1/volumes/v/migration",
        Some(r#"{"rate_mbit": 0}"#),
        200,
    );
    wait_stage(&e, "mirrored", Duration::from_secs(120));
    ferry_cli(&e, &["flush", "v"]);
    compare(&lab.image.display().to_string(), &target);
    compare(&nbd_uri(&e), &target);
    e.stop_ok();
}

/// The lab with `v` migrated into `v.raw` and cut over: the lab, the
/// origin's address (for a restart where the WAN relays to), the edge and
/// the copy.
fn cut_over_lab() -> (Setup, String, Ferry, PathBuf) {
    let lab = setup();
    let origin_addr = lab.origin.as_ref().unwrap().announced("origin").to_owned();
    let e = start_edge(&lab.config);
    wait_up(&e);
    let target = lab.dir.path().join("v.raw");
    migrate_and_cut_over(&e, &target);
    (lab, origin_addr, e, target)
}

/// Migrates `v` into `target` at full speed and cuts it over.
fn migrate_and_cut_over(e: &Ferry, target: &Path) {
    ferry_cli(
        e,
        &[
            "migrate",
            "start",
            "v",
            "--target",
            target.to_str().unwrap(),
            "--wait",
        ],
    );
    wait_stage(e, "mirrored", Duration::from_secs(60));
    let cut: Value =
        serde_json::from_str(&ferry_cli(e, &["migrate", "cutover", "v", "--json"])).unwrap();
    assert_eq!(cut["stage"], "cut-over", "{cut}");
}

fn moveback_json(e: &Ferry) -> Value {
    serde_json::from_str(&ferry_cli(e, &["moveback", "v", "--json"])).unwrap()
}

#[test]
fn a_cut_over_volume_moves_back_shipping_only_the_pieces_that_changed() {
    let (mut lab, origin_addr, e, target) = cut_over_lab();
    // The origin is stopped after the cut-over, as it may be; the guest
    // goes on writing on the edge.
    lab.origin.take().unwrap().stop_ok();
    let mut nbd = ferry_tests::nbd::Client::handshake(e.connect(), "v").unwrap();
    let mut changed = 0u64;
    // 1 MiB into a hole.
    let w = nbd
        .write(
            5 * MIB,
            &ferry_tests::pattern_bytes(usize::try_from(MIB).unwrap(), 71),
        )
        .unwrap();
    assert_eq!(w.error, 0);
    changed += MIB;
    // 40 scattered 4 KiB writes into the image's data, none overlapping.
    let data: Vec<u64> = DATA_MIB.iter().copied().filter(|&m| m != 8).collect();
    for i in 0..40u64 {
        let at = data[usize::try_from(i).unwrap() % data.len()] * MIB + (i * 37 % 256) * 4096;
        let w = nbd
            .write(at, &ferry_tests::pattern_bytes(4096, 100 + i))
            .unwrap();
        assert_eq!(w.error, 0);
        changed += 4096;
    }
    // Half a megabyte of data zeroed (shipped as a zero record).
    run(cmd("qemu-io").args(["-f", "raw", "-c", "write -z 8M 512k", &nbd_uri(&e)]));
    changed += 512 * 1024;
    // 64 KiB written again with what the origin holds: dirty, not changed.
    let same = ferry_tests::read_at(&lab.image, 15 * MIB, 65536);
    let w = nbd.write(15 * MIB, &same).unwrap();
    assert_eq!(w.error, 0);
    drop(nbd);
    let dirty = migration(&e)["bytes_dirty"].as_u64().unwrap();
    assert!(dirty >= 10 * MIB, "{}", migration(&e));

    // Behind everyone's back, 4 KiB of the origin's image change where the
    // edge wrote nothing: the verification finds the 64 KiB piece and
    // repairs it from the edge's copy.
    write_at(
        &lab.image,
        45 * MIB + 8192,
        &ferry_tests::pattern_bytes(4096, 999),
    );

    // The origin comes back where it was; the volume goes home.
    lab.origin = Some(start_origin(lab.dir.path(), &lab.image, &origin_addr));
    let before = lab.wan.link.stats();
    // A second caller at the same time joins the same move back.
    let sock = socket(&e);
    let other = std::thread::spawn(move || {
        ferry_tests::http_unix(&sock, "POST", "/v1/volumes/v/moveback", None, None)
    });
    let m = moveback_json(&e);
    let other = other.join().unwrap();
    let after = lab.wan.link.stats();
    assert_eq!(other.status, 200, "{}", other.body);
    assert!(other.body.contains("on-premises"), "{}", other.body);
    eprintln!(
        "move back: {m}; link bytes to the origin {}, back {}; {changed} bytes changed",
        after.bytes_to_target - before.bytes_to_target,
        after.bytes_to_client - before.bytes_to_client
    );
    assert_eq!(m["stage"], "on-premises", "{m}");
    // Only the pieces that differ were shipped, and the whole image was
    // verified by signature without copying it back.
    let shipped = m["bytes_shipped"].as_u64().unwrap();
    assert!(
        shipped >= changed && shipped * 10 <= changed * 11,
        "{shipped} bytes shipped for {changed} bytes changed in {dirty} bytes of dirty chunks: {m}"
    );
    assert_eq!(
        m["bytes_verified"],
        SIZE + 65536,
        "the whole image, then the repaired piece: {m}"
    );
    assert_eq!(m["bytes_repaired"], 65536, "{m}");
    let sigs = m["signature_bytes"].as_u64().unwrap();
    let up = after.bytes_to_target - before.bytes_to_target;
    let down = after.bytes_to_client - before.bytes_to_client;
    // On the wire, frames and handshakes included (the zeroes travel as
    // a zero record, so the data is at most what was changed, plus the
    // repair).
    assert!(
        up * 10 <= (changed + 65536) * 11 + sigs,
        "{up} bytes went to the origin for {changed} bytes changed: {m}"
    );
    assert!(
        down <= sigs * 2 + 64 * 1024,
        "{down} bytes came back for {sigs} bytes of signatures: {m}"
    );
    // The origin read and signed the whole image for the comparisons
    // (the changed chunks at 4 KiB, then all of it), and sent none of it.
    let at_origin = api(
        Path::new(lab.origin.as_ref().unwrap().announced("api")),
        "GET",
        "/v1/volumes/v",
        None,
        200,
    );
    let signed = at_origin["bytes_signed"].as_u64().unwrap();
    assert!(signed >= SIZE + dirty, "{at_origin}");
    // The origin's image is the edge's view, byte for byte.
    compare(&lab.image.display().to_string(), &target);
    ferry_tests::assert_range_filled(&lab.image, 8 * MIB, 512 * 1024, 0);

    // Not served here any more, also after a restart (which never
    // contacts the origin); a removal forgets it.
    let (_, out) =
        ferry_tests::run_fail(cmd("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &nbd_uri(&e)]));
    assert!(!out.is_empty(), "the moved-back volume is still exported");
    e.stop_ok();
    let e = start_edge(&lab.config);
    assert!(
        wait_until(Duration::from_secs(30), || volume(&e)["state"]
            == "on_premises"),
        "{}",
        volume(&e)
    );
    let status = ferry_cli(&e, &["status"]);
    assert!(status.contains("on-premises"), "{status}");
    ferry_cli(&e, &["volume", "rm", "v"]);
    let list = api(&socket(&e), "GET", "/v1/volumes", None, 200);
    assert_eq!(list["volumes"].as_array().map(Vec::len), Some(0), "{list}");
    e.stop_ok();
}

#[test]
fn a_move_back_survives_a_killed_origin_and_a_killed_edge_and_ends_equal_to_the_edge() {
    let (mut lab, origin_addr, e, target) = cut_over_lab();
    // 40 MiB changed on the edge: about 3.5 s of shipping at 100 Mbit/s.
    let mut nbd = ferry_tests::nbd::Client::handshake(e.connect(), "v").unwrap();
    for m in 0..40u64 {
        let w = nbd
            .write(
                (m + 12) * MIB,
                &ferry_tests::pattern_bytes(usize::try_from(MIB).unwrap(), 500 + m),
            )
            .unwrap();
        assert_eq!(w.error, 0);
    }
    drop(nbd);
    // Started, not waited for: it goes on in the background.
    let r = ferry_tests::http_unix(
        &socket(&e),
        "POST",
        "/v1/volumes/v/moveback?timeout_secs=0.5",
        None,
        None,
    );
    assert_eq!(r.status, 504, "{}", r.body);
    std::thread::sleep(Duration::from_millis(500));
    let m = migration(&e);
    assert_eq!(
        m["stage"], "moving-back",
        "the move back ended too soon: {m}"
    );
    lab.origin.take().unwrap().signal("KILL");
    std::thread::sleep(Duration::from_secs(1));
    lab.origin = Some(start_origin(lab.dir.path(), &lab.image, &origin_addr));
    // The edge reconnects (attached for the migration, for the move back,
    // and now again) and goes on; killed in turn, it resumes the move back
    // on restart (the stage is persisted) without being asked.
    assert!(
        wait_until(Duration::from_secs(20), || e
            .stderr()
            .matches("attached to the origin")
            .count()
            >= 3),
        "the edge did not reconnect to the restarted origin"
    );
    let m = migration(&e);
    assert_eq!(
        m["stage"], "moving-back",
        "the move back ended too soon: {m}"
    );
    e.signal("KILL");
    drop(e);
    let e = start_edge(&lab.config);
    assert!(
        wait_until(Duration::from_secs(60), || volume(&e)["state"]
            == "on_premises"),
        "the move back did not resume: {}",
        volume(&e)
    );
    let m = moveback_json(&e);
    eprintln!("move back after both restarts: {m}");
    assert_eq!(m["stage"], "on-premises", "{m}");
    // The journal the killed edge left was shipped first: the comparison
    // found every piece at the origin and shipped none again.
    assert_eq!(m["bytes_shipped"], 0, "{m}");
    compare(&lab.image.display().to_string(), &target);
    e.stop_ok();
}
