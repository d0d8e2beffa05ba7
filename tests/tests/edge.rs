//! `ferry origin` and `ferry edge` joined by the WAN link emulator (25 ms
//! each way, 100 Mbit/s), driven by real clients: qemu-img, fio with
//! verification, nbdcopy; `ferry edge flush` then the origin's image
//! compared byte for byte; the edge SIGKILLed in the middle of a write
//! workload; the link cut during I/O.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::nbd::Client;
use ferry_tests::{
    assert_files_equal, cmd, ferry_bin, random_image, run, tempdir, Ferry, TempDir, Wan, MIB,
};

const SIZE: u64 = 64 * MIB;

struct Site {
    dir: TempDir,
    image: PathBuf,
    reference: PathBuf,
}

fn site() -> Site {
    let dir = tempdir();
    let image = random_image(dir.path(), "disk.img", SIZE);
    let reference = dir.path().join("reference.img");
    std::fs::copy(&image, &reference).unwrap();
    Site {
        dir,
        image,
        reference,
    }
}

fn origin(s: &Site) -> Ferry {
    Ferry::spawn(
        [
            "origin".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--export".as_ref(),
            format!("vol={}", s.image.display()).as_ref(),
            "--state-dir".as_ref(),
            s.dir.path().join("origin-state").as_os_str(),
            "--no-tls".as_ref(),
        ],
        &["origin"],
    )
}

fn edge(s: &Site, origin_addr: &str, extra: &[&str]) -> Ferry {
    edge_in(s, "edge", origin_addr, extra)
}

/// An edge with its cache and journal in `cache` (a directory of the
/// site): another directory is another edge.
fn edge_in(s: &Site, cache: &str, origin_addr: &str, extra: &[&str]) -> Ferry {
    let mut args: Vec<std::ffi::OsString> = vec![
        "edge".into(),
        "--origin".into(),
        origin_addr.into(),
        "--volume".into(),
        "vol".into(),
        "--cache-dir".into(),
        s.dir.path().join(cache).into(),
        "--cache-size".into(),
        "32M".into(),
        "--nbd".into(),
        "127.0.0.1:0".into(),
        "--no-tls".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    if extra.contains(&"--iscsi") {
        Ferry::spawn(args, &["nbd", "iscsi", "control"])
    } else {
        Ferry::spawn(args, &["nbd", "control"])
    }
}

fn edge_ctl(e: &Ferry, what: &str) -> String {
    run(std::process::Command::new(ferry_bin())
        .args(["edge", what, "--control"])
        .arg(e.announced("control")))
}

/// A counter from `ferry edge status`.
fn stat(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .parse()
        .unwrap()
}

fn compare(uri: &str, image: &Path) {
    run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", uri])
        .arg(image));
}

/// Edges take turns on one volume: each one's journal numbers its
/// batches from its own start, behind the volume's sequence at the
/// origin once another edge wrote; they are renumbered for the origin,
/// so none is taken for a batch already applied and dropped.
#[test]
fn edges_taking_turns_on_a_volume_lose_none_of_their_writes() {
    let s = site();
    let o = origin(&s);
    let addr = o.announced("origin").to_owned();
    let turns = [("edge", 0x11, 0), ("edge-b", 0x22, 1), ("edge", 0x33, 2)];
    for (cache, byte, at) in turns {
        let e = edge_in(&s, cache, &addr, &["--rpo", "600"]);
        // Three batches per turn, so the sequences drift apart.
        for part in 0..3u64 {
            let off = at * 4 * MIB + part * MIB;
            run(cmd("qemu-io").args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {byte} {off} 1M"),
                &e.uri("vol"),
            ]));
            edge_ctl(&e, "flush");
        }
        e.stop_ok();
    }
    for (_, byte, at) in turns {
        ferry_tests::assert_range_filled(&s.image, at * 4 * MIB, 3 * MIB, byte);
    }
    o.stop_ok();
}

#[test]
fn the_edge_serves_the_origin_volume_and_ships_writes_back() {
    let s = site();
    let o = origin(&s);
    let wan = Wan::start(o.announced("origin"));
    let e = edge(&s, &wan.addr(), &["--rpo", "1"]);
    let uri = e.uri("vol");
    // Cold, then partly cached.
    compare(&uri, &s.reference);
    compare(&uri, &s.reference);
    // Random writes through the edge, verified as they go and again on a
    // fresh connection.
    for verify_only in [false, true] {
        let mut c = cmd("fio");
        c.args([
            "--name=edge",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k,64k",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--size=16M",
            "--offset=4M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randseed=11",
            "--output-format=terse",
        ])
        .arg(format!("--uri={uri}"));
        if verify_only {
            c.arg("--verify_only=1");
        }
        let out = run(&mut c);
        assert!(!out.to_lowercase().contains("bad header"), "{out}");
    }
    let status = edge_ctl(&e, "status");
    assert!(status.contains("link: up"), "{status}");
    edge_ctl(&e, "flush");
    let status = edge_ctl(&e, "status");
    assert!(status.contains("journal_unshipped_records: 0"), "{status}");
    // The origin's image is now exactly what the edge serves.
    let view = s.dir.path().join("edge-view.img");
    run(cmd("nbdcopy").arg(&uri).arg(&view));
    assert_files_equal(&view, &s.image);
    assert_ne!(
        std::fs::read(&s.image).unwrap(),
        std::fs::read(&s.reference).unwrap()
    );
    e.stop_ok();
    o.stop_ok();
}

/// The same edge volume over iSCSI and NBD at once: qemu-img compares it
/// (cold, through the WAN) over iSCSI, qemu-io writes through iSCSI and
/// reads back through NBD, and after `ferry edge flush` the origin's image
/// is what both serve.
#[test]
fn the_edge_serves_the_volume_over_iscsi_too() {
    let s = site();
    let o = origin(&s);
    let wan = Wan::start(o.announced("origin"));
    let e = edge(&s, &wan.addr(), &["--iscsi", "127.0.0.1:0"]);
    let iscsi = format!(
        "iscsi://{}/iqn.2026-11.dev.ferry:vol/0",
        e.announced("iscsi")
    );
    let nbd = e.uri("vol");
    compare(&iscsi, &s.reference);
    run(cmd("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 5M 1M",
        "-c",
        "write -z 9M 128K",
        &iscsi,
    ]));
    let out = run(cmd("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x3c 5M 1M",
        "-c",
        "read -P 0 9M 128K",
        &nbd,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    edge_ctl(&e, "flush");
    let status = edge_ctl(&e, "status");
    assert!(status.contains("journal_unshipped_records: 0"), "{status}");
    compare(&iscsi, &s.image);
    ferry_tests::assert_range_filled(&s.image, 5 * MIB, MIB, 0x3c);
    ferry_tests::assert_range_filled(&s.image, 9 * MIB, 128 * 1024, 0);
    e.stop_ok();
    o.stop_ok();
}

/// Writes `seed`-stamped 4 KiB blocks at `blocks` through a raw NBD
/// client, then FLUSHes; returns once the flush is answered.
fn write_and_flush(c: &mut Client, blocks: &[u64], seed: u64) {
    for &b in blocks {
        let mut data = vec![0u8; 4096];
        data[..8].copy_from_slice(&b.to_le_bytes());
        data[8..16].copy_from_slice(&seed.to_le_bytes());
        data[16..].fill(u8::try_from(seed % 251).unwrap());
        let r = c.write(b * 4096, &data).unwrap();
        assert_eq!(r.error, 0);
    }
    assert_eq!(c.flush().unwrap().error, 0);
}

#[test]
fn killing_the_edge_loses_no_flushed_write() {
    let s = site();
    let o = origin(&s);
    let wan = Wan::start(o.announced("origin"));
    // What the guest was told is durable: block -> seed of its last
    // flushed write.
    let mut durable = std::collections::HashMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..5u64 {
        // A long RPO: nothing ships on its own, so the journal alone holds
        // the writes when the edge dies (except what the previous restart
        // re-shipped).
        let e = edge(&s, &wan.addr(), &["--rpo", "3600"]);
        let mut client = Client::handshake(e.connect(), "vol").unwrap();
        for step in 0..20u64 {
            let seed = round * 1000 + step + 1;
            let blocks: Vec<u64> = (0..8)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % (SIZE / 4096)
                })
                .collect();
            write_and_flush(&mut client, &blocks, seed);
            for b in blocks {
                durable.insert(b, seed);
            }
        }
        // Unflushed writes in flight, then SIGKILL.
        for i in 0..16u64 {
            let _ = client.send(0, NBD_CMD_WRITE, i * 4096, 4096, &[0xee; 4096]);
        }
        e.stop_with("KILL");

        let e = edge(&s, &wan.addr(), &["--rpo", "3600"]);
        let mut client = Client::handshake(e.connect(), "vol").unwrap();
        for (&b, &seed) in &durable {
            let r = client.read(b * 4096, 4096).unwrap();
            assert_eq!(r.error, 0);
            let got_seed = u64::from_le_bytes(r.data[8..16].try_into().unwrap());
            let got_block = u64::from_le_bytes(r.data[..8].try_into().unwrap());
            assert_eq!((got_block, got_seed), (b, seed), "round {round}: block {b}");
        }
        drop(client);
        if round == 4 {
            edge_ctl(&e, "flush");
            let view = s.dir.path().join("edge-view.img");
            run(cmd("nbdcopy").arg(e.uri("vol")).arg(&view));
            assert_files_equal(&view, &s.image);
        }
        e.stop_with("KILL");
    }
    o.stop_ok();
}

const NBD_CMD_WRITE: u16 = 1;

#[test]
fn a_cut_link_stalls_nothing_that_is_local() {
    let s = site();
    let o = origin(&s);
    let wan = Wan::start(o.announced("origin"));
    let e = edge(&s, &wan.addr(), &["--rpo", "1"]);
    let uri = e.uri("vol");
    // Warm the first 4 MiB: read it until a whole pass hits the cache
    // (fills complete in the background).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let before = stat(&edge_ctl(&e, "status"), "cache_hits");
        run(cmd("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4M"])
            .arg(&uri));
        let after = stat(&edge_ctl(&e, "status"), "cache_hits");
        if after - before >= 64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache never warmed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wan.link.cut();
    // Cached reads and writes keep working without the origin.
    let t = std::time::Instant::now();
    let out = ferry_tests::run_output(
        cmd("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "read 0 4M",
                "-c",
                "write -P 0x5a 0 1M",
                "-c",
                "read -P 0x5a 0 1M",
            ])
            .arg(&uri),
    );
    assert!(
        out.status.success() && !ferry_tests::combined(&out).contains("failed"),
        "{}\n--- edge status ---\n{}\n--- edge log ---\n{}",
        ferry_tests::combined(&out),
        edge_ctl(&e, "status"),
        e.stderr()
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    wan.link.restore();
    edge_ctl(&e, "flush");
    let view = s.dir.path().join("edge-view.img");
    run(cmd("nbdcopy").arg(&uri).arg(&view));
    assert_files_equal(&view, &s.image);
    let status = edge_ctl(&e, "status");
    assert!(stat(&status, "link_connects") >= 2, "{status}");
    e.stop_ok();
    o.stop_ok();
}

#[test]
fn killing_the_origin_while_it_applies_batches_loses_nothing() {
    let s = site();
    // A fixed port, so the restarted origin is where the link points.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let origin_at = |s: &Site| {
        Ferry::spawn(
            [
                "origin".as_ref(),
                "--listen".as_ref(),
                format!("127.0.0.1:{port}").as_ref(),
                "--export".as_ref(),
                format!("vol={}", s.image.display()).as_ref(),
                "--state-dir".as_ref(),
                s.dir.path().join("origin-state").as_os_str(),
                "--no-tls".as_ref(),
            ],
            &["origin"],
        )
    };
    let mut o = origin_at(&s);
    let wan = Wan::start(&format!("127.0.0.1:{port}"));
    // Ship as fast as batches are cut, so the origin is usually applying
    // one when it dies.
    let e = edge(&s, &wan.addr(), &["--rpo", "0.05"]);
    let mut client = Client::handshake(e.connect(), "vol").unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..4u64 {
        for step in 0..30u64 {
            let blocks: Vec<u64> = (0..16)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % (SIZE / 4096)
                })
                .collect();
            write_and_flush(&mut client, &blocks, round * 100 + step + 1);
        }
        // Kill it once shipping is under way (batches go one at a time, so
        // one is usually being applied), then wait for the edge to be back.
        let wait_for = |key: &str, above: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let v = stat(&edge_ctl(&e, "status"), key);
                if v > above {
                    return v;
                }
                assert!(std::time::Instant::now() < deadline, "{key} stuck at {v}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let shipped = stat(&edge_ctl(&e, "status"), "batches_shipped");
        wait_for("batches_shipped", shipped);
        let connects = stat(&edge_ctl(&e, "status"), "link_connects");
        o.stop_with("KILL");
        o = origin_at(&s);
        wait_for("link_connects", connects);
    }
    drop(client);
    edge_ctl(&e, "flush");
    let view = s.dir.path().join("edge-view.img");
    run(cmd("nbdcopy").arg(e.uri("vol")).arg(&view));
    assert_files_equal(&view, &s.image);
    let status = edge_ctl(&e, "status");
    assert!(
        stat(&status, "link_connects") >= 5,
        "{status}\n{}",
        e.stderr()
    );
    e.stop_ok();
    o.stop_ok();
}

#[test]
fn the_link_runs_over_tls_with_a_pre_shared_key() {
    let s = site();
    let (ca, cert, key) = ca_and_leaf(s.dir.path());
    let psk = s.dir.path().join("psk");
    std::fs::write(&psk, "ab".repeat(32)).unwrap();
    let o = Ferry::spawn(
        [
            "origin".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--export".as_ref(),
            format!("vol={}", s.image.display()).as_ref(),
            "--state-dir".as_ref(),
            s.dir.path().join("origin-state").as_os_str(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
            "--psk-file".as_ref(),
            psk.as_os_str(),
        ],
        &["origin"],
    );
    let wan = Wan::start(o.announced("origin"));
    let tls_edge = |extra: &[&std::ffi::OsStr]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "edge".into(),
            "--origin".into(),
            wan.addr().into(),
            "--volume".into(),
            "vol".into(),
            "--cache-dir".into(),
            s.dir.path().join("edge").into(),
            "--nbd".into(),
            "127.0.0.1:0".into(),
            "--tls-ca".into(),
            ca.clone().into(),
            "--tls-server-name".into(),
            "localhost".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_os_string()));
        args
    };
    // Without the key the origin refuses the edge.
    let out = ferry_tests::run_output(std::process::Command::new(ferry_bin()).args(tls_edge(&[])));
    assert!(!out.status.success());
    let e = Ferry::spawn(
        tls_edge(&["--psk-file".as_ref(), psk.as_os_str()]),
        &["nbd", "control"],
    );
    let uri = e.uri("vol");
    compare(&uri, &s.reference);
    run(cmd("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 2M 1M", &uri]));
    edge_ctl(&e, "flush");
    let view = s.dir.path().join("edge-view.img");
    run(cmd("nbdcopy").arg(&uri).arg(&view));
    assert_files_equal(&view, &s.image);
    e.stop_ok();
    o.stop_ok();
    // Neither TLS nor --no-tls: refused with a clear message.
    let out = ferry_tests::run_output(
        std::process::Command::new(ferry_bin())
            .args(["origin", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(s.dir.path().join("x"))
            .arg("--export")
            .arg(format!("vol={}", s.image.display())),
    );
    assert!(!out.status.success());
    assert!(
        ferry_tests::combined(&out).contains("--no-tls"),
        "{}",
        ferry_tests::combined(&out)
    );
}

/// A CA and a leaf certificate for `localhost` / 127.0.0.1 signed by it
/// (rustls, unlike GnuTLS, refuses a self-signed CA as the server's own
/// certificate). Returns (ca cert, leaf cert, leaf key).
fn ca_and_leaf(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    run(cmd("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=ferry test CA", "-keyout"])
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(cmd("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(p("leaf.key"))
        .arg("-out")
        .arg(p("leaf.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(cmd("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p("leaf.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .args(["-CAcreateserial", "-extfile"])
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("leaf.pem")));
    (p("ca.pem"), p("leaf.pem"), p("leaf.key"))
}

/// `--local-only` ranges: writes there stay on the edge (the origin's image
/// does not get them after `ferry edge flush`), writes elsewhere ship, and
/// the edge reads back both, also after a restart with the same flags; a
/// restart with other ranges is refused.
#[test]
fn local_only_ranges_stay_on_the_edge() {
    let s = site();
    let o = origin(&s);
    let wan = Wan::start(o.announced("origin"));
    let flags = ["--local-only", "8M:4M", "--local-only", "40M:1M"];
    let e = edge(&s, &wan.addr(), &flags);
    let uri = e.uri("vol");
    run(cmd("qemu-io").args([
        "-f",
        "raw",
        // Inside, outside, straddling the end of 8M:4M, zeroes inside,
        // and unaligned pieces outside and inside.
        "-c",
        "write -P 0x11 9M 1M",
        "-c",
        "write -P 0x22 20M 1M",
        "-c",
        "write -P 0x33 11776K 1M",
        "-c",
        "write -z 40M 64K",
        "-c",
        "write -P 0x44 41000 1000",
        "-c",
        "write -P 0x55 42045440 1000",
        &uri,
    ]));
    edge_ctl(&e, "flush");
    let status = edge_ctl(&e, "status");
    assert!(status.contains("journal_unshipped_records: 0"), "{status}");
    assert_eq!(stat(&status, "local_only_bytes"), 5 * MIB, "{status}");
    // 1M + 256K + 64K + one 4K block, at least.
    let allocated = stat(&status, "overlay_allocated_bytes");
    assert!(allocated >= MIB + 324 * 1024, "{status}");

    // The origin has what was written outside the ranges, nothing inside.
    let mut expected = ferry_tests::read_at(&s.reference, 0, usize::try_from(SIZE).unwrap());
    let mut fill = |off: u64, len: u64, byte: u8| {
        let r = usize::try_from(off).unwrap()..usize::try_from(off + len).unwrap();
        expected[r].fill(byte);
    };
    fill(20 * MIB, MIB, 0x22);
    fill(12 * MIB, 512 * 1024, 0x33);
    fill(41000, 1000, 0x44);
    let origin_view = s.dir.path().join("origin-expected.img");
    std::fs::write(&origin_view, &expected).unwrap();
    assert_files_equal(&s.image, &origin_view);
    // The edge serves the local writes on top.
    let mut fill = |off: u64, len: u64, byte: u8| {
        let r = usize::try_from(off).unwrap()..usize::try_from(off + len).unwrap();
        expected[r].fill(byte);
    };
    fill(9 * MIB, MIB, 0x11);
    fill(11776 * 1024, MIB, 0x33);
    fill(40 * MIB, 64 * 1024, 0);
    fill(42_045_440, 1000, 0x55);
    let edge_expected = s.dir.path().join("edge-expected.img");
    std::fs::write(&edge_expected, &expected).unwrap();
    let view = s.dir.path().join("edge-view.img");
    run(cmd("nbdcopy").arg(&uri).arg(&view));
    assert_files_equal(&view, &edge_expected);
    e.stop_ok();

    // Other ranges would expose stale data: refused.
    let (_, out) = ferry_tests::run_fail(
        std::process::Command::new(ferry_bin())
            .args([
                "edge",
                "--origin",
                &wan.addr(),
                "--volume",
                "vol",
                "--cache-dir",
            ])
            .arg(s.dir.path().join("edge"))
            .args(["--nbd", "127.0.0.1:0", "--no-tls", "--local-only", "8M:8M"]),
    );
    assert!(out.contains("refusing"), "{out}");

    // The same flags again: the local data is still there.
    let e = edge(&s, &wan.addr(), &flags);
    let view = s.dir.path().join("edge-view-2.img");
    run(cmd("nbdcopy").arg(e.uri("vol")).arg(&view));
    assert_files_equal(&view, &edge_expected);
    e.stop_ok();
    assert_files_equal(&s.image, &origin_view);
    o.stop_ok();
}

/// `--isolated`: nothing is shipped, yet unwritten blocks still come from
/// the origin.
#[test]
fn an_isolated_edge_ships_nothing() {
    let s = site();
    let o = origin(&s);
    let wan = Wan::start(o.announced("origin"));
    let e = edge(&s, &wan.addr(), &["--isolated"]);
    let uri = e.uri("vol");
    run(cmd("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 3M 1M",
        "-c",
        "write -P 0x5b 7000 100",
        &uri,
    ]));
    edge_ctl(&e, "flush");
    let status = edge_ctl(&e, "status");
    assert_eq!(stat(&status, "batches_shipped"), 0, "{status}");
    assert_files_equal(&s.image, &s.reference);
    let mut expected = ferry_tests::read_at(&s.reference, 0, usize::try_from(SIZE).unwrap());
    expected[3 * 1024 * 1024..4 * 1024 * 1024].fill(0x5a);
    expected[7000..7100].fill(0x5b);
    let want = s.dir.path().join("expected.img");
    std::fs::write(&want, &expected).unwrap();
    let view = s.dir.path().join("edge-view.img");
    run(cmd("nbdcopy").arg(&uri).arg(&view));
    assert_files_equal(&view, &want);
    e.stop_ok();
    o.stop_ok();
}
