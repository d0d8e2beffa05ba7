//! The iSCSI target against real initiators: libiscsi's conformance suite
//! (`iscsi-test-cu`), `iscsi-ls` discovery with and without CHAP, and qemu
//! (`qemu-img`, `qemu-io`) through its libiscsi block driver; plus one
//! export served over NBD and iSCSI at once.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;

use ferry_tests::{
    assert_files_equal, cmd, combined, pattern_image, run, run_output, sparse_image, tempdir,
    Ferry, MIB,
};

const IQN: &str = "iqn.2026-11.dev.ferry";
/// The two initiator names iscsi-test-cu logs in with.
const TEST_INITIATOR_1: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";
const TEST_INITIATOR_2: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2";

/// `ferry serve ARGS --iscsi 127.0.0.1:0`, waiting for the iSCSI portal
/// (and for an NBD listener too when ARGS has `--nbd`).
fn serve_iscsi(args: &[&std::ffi::OsStr]) -> Ferry {
    let mut full: Vec<std::ffi::OsString> = vec!["serve".into()];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    full.extend(["--iscsi".into(), "127.0.0.1:0".into()]);
    let kinds: &[&str] = if args.iter().any(|a| *a == "--nbd") {
        &["iscsi", "nbd"]
    } else {
        &["iscsi"]
    };
    Ferry::spawn(full, kinds)
}

fn portal(ferry: &Ferry) -> String {
    ferry.announced("iscsi").to_owned()
}

fn url(ferry: &Ferry, export: &str) -> String {
    format!("iscsi://{}/{IQN}:{export}/0", portal(ferry))
}

fn secret_file(dir: &Path, name: &str, secret: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p
}

/// Totals of a CUnit "Run Summary" line such as
/// `tests    615    615    598     17      0`: (total, ran, passed, failed).
fn cunit_totals(out: &str, kind: &str) -> (u32, u32, u32, u32) {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(kind))
        .unwrap_or_else(|| panic!("no `{kind}` summary line in:\n{out}"));
    let n: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(n.len() >= 4, "summary line {line:?}");
    (n[0], n[1], n[2], n[3])
}

/// libiscsi's SCSI and iSCSI conformance suite over all its families, with
/// data-loss tests enabled and both of its initiator names on the ACL.
/// tgt passes 598 of 615 here; the bar is more than that and no failures.
/// (libiscsi counts a test that skips itself, for a feature the target
/// declares unsupported, as passed: the README lists those.)
#[test]
fn iscsi_test_cu_all_families_pass() {
    let dir = tempdir();
    let image = sparse_image(dir.path(), "disk.img", 256 * MIB);
    let ferry = serve_iscsi(&[
        image.as_os_str(),
        "--iscsi-allow".as_ref(),
        TEST_INITIATOR_1.as_ref(),
        "--iscsi-allow".as_ref(),
        TEST_INITIATOR_2.as_ref(),
    ]);
    let out = run_output(
        cmd("iscsi-test-cu")
            // No --test: every family (ALL, SCSI, iSCSI, LINUX).
            .arg("--dataloss")
            // A second path to the same LUN, so the MultipathIO tests run
            // (two sessions, one device identifier) instead of skipping.
            .arg(url(&ferry, "disk"))
            .arg(url(&ferry, "disk")),
    );
    let text = combined(&out);
    let failed_tests: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("...FAILED") || l.contains("... FAILED"))
        .collect();
    let (total, ran, passed, failed) = cunit_totals(&text, "tests");
    eprintln!("iscsi-test-cu: {total} tests, {ran} ran, {passed} passed, {failed} failed");
    assert_eq!(failed, 0, "failed tests: {failed_tests:#?}\n{text}");
    assert!(passed > 598, "only {passed} passed (tgt: 598)\n{text}");
    let (_, _, _, asserts_failed) = cunit_totals(&text, "asserts");
    assert_eq!(asserts_failed, 0, "{text}");
    ferry.stop_ok();

    // The ReadOnly suite skips itself on a writable LUN: run it against a
    // read-only export, where every medium write must fail WRITE PROTECTED.
    let ferry = serve_iscsi(&[image.as_os_str(), "--read-only".as_ref()]);
    let out = run_output(
        cmd("iscsi-test-cu")
            .args(["--dataloss", "--test", "SCSI.ReadOnly"])
            .arg(url(&ferry, "disk")),
    );
    let text = combined(&out);
    assert!(!text.contains("not write-protected"), "{text}");
    let (_, ran, passed, failed) = cunit_totals(&text, "tests");
    assert_eq!((ran, passed, failed), (1, 1, 0), "{text}");
    assert_eq!(cunit_totals(&text, "asserts").3, 0, "{text}");
    ferry.stop_ok();
}

#[test]
fn discovery_lists_every_export_and_honours_the_acl() {
    let dir = tempdir();
    let a = sparse_image(dir.path(), "alpha.img", 4 * MIB);
    let b = sparse_image(dir.path(), "beta.img", 4 * MIB);
    let ferry = serve_iscsi(&[
        a.as_os_str(),
        "--export".as_ref(),
        format!("beta={}", b.display()).as_ref(),
        "--iscsi-allow".as_ref(),
        "iqn.2026-11.test:allowed".as_ref(),
    ]);
    let out = run(cmd("iscsi-ls")
        .args(["-i", "iqn.2026-11.test:allowed", "-s"])
        .arg(format!("iscsi://{}", portal(&ferry))));
    assert!(out.contains(&format!("Target:{IQN}:alpha")), "{out}");
    assert!(out.contains(&format!("Target:{IQN}:beta")), "{out}");
    // -s logs in to each target and lists its LUNs: the disk is LUN 0.
    assert!(out.contains("Lun:0"), "{out}");
    assert!(out.contains("Type:DIRECT_ACCESS"), "{out}");

    // An initiator outside the allow-list sees no targets and cannot log in.
    let denied = run_output(
        cmd("iscsi-ls")
            .args(["-i", "iqn.2026-11.test:stranger", "-s"])
            .arg(format!("iscsi://{}", portal(&ferry))),
    );
    let text = combined(&denied);
    assert!(!text.contains("Lun:0"), "{text}");
    let login = run_output(
        cmd("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512"])
            .arg(format!(
                "json:{{\"driver\":\"iscsi\",\"transport\":\"tcp\",\"portal\":\"{}\",\"target\":\"{IQN}:alpha\",\"lun\":0,\"initiator-name\":\"iqn.2026-11.test:stranger\"}}",
                portal(&ferry)
            )),
    );
    assert!(!login.status.success(), "{}", combined(&login));
    ferry.stop_ok();
}

#[test]
fn chap_one_way_and_mutual_and_wrong_secret_refused() {
    let dir = tempdir();
    let image = pattern_image(dir.path(), "disk.img", 4 * MIB, 3);
    let secret = secret_file(dir.path(), "chap", "correct-horse-battery");
    let mutual = secret_file(dir.path(), "mutual", "target-side-secret");
    let ferry = serve_iscsi(&[
        image.as_os_str(),
        "--iscsi-chap-user".as_ref(),
        "alice".as_ref(),
        "--iscsi-chap-secret-file".as_ref(),
        secret.as_os_str(),
        "--iscsi-discovery-chap".as_ref(),
    ]);
    let p = portal(&ferry);
    // Right secret: discovery and login both work.
    let ok = run(cmd("iscsi-ls")
        .arg("-s")
        .arg(format!("iscsi://alice%correct-horse-battery@{p}")));
    assert!(ok.contains(&format!("Target:{IQN}:disk")), "{ok}");
    assert!(ok.contains("Lun:0"), "{ok}");
    // No credentials and wrong ones are refused.
    for url in [
        format!("iscsi://{p}"),
        format!("iscsi://alice%wrong-secret-here@{p}"),
        format!("iscsi://mallory%correct-horse-battery@{p}"),
    ] {
        let out = run_output(cmd("iscsi-ls").arg("-s").arg(&url));
        let text = combined(&out);
        assert!(
            !out.status.success() || !text.contains("Target:"),
            "{url}: {text}"
        );
    }
    ferry.stop_ok();

    // Mutual CHAP: the target proves itself with its own secret. libiscsi
    // takes the secret it expects from these variables (qemu's driver does
    // not ask for mutual CHAP, so iscsi-ls is the initiator here).
    let ferry = serve_iscsi(&[
        image.as_os_str(),
        "--iscsi-chap-user".as_ref(),
        "alice".as_ref(),
        "--iscsi-chap-secret-file".as_ref(),
        secret.as_os_str(),
        "--iscsi-mutual-user".as_ref(),
        "ferry".as_ref(),
        "--iscsi-mutual-secret-file".as_ref(),
        mutual.as_os_str(),
        "--iscsi-discovery-chap".as_ref(),
    ]);
    let p = portal(&ferry);
    let mutual_ls = |expected: &str| {
        combined(&run_output(
            cmd("iscsi-ls")
                .env("LIBISCSI_CHAP_TARGET_USERNAME", "ferry")
                .env("LIBISCSI_CHAP_TARGET_PASSWORD", expected)
                .arg("-s")
                .arg(format!("iscsi://alice%correct-horse-battery@{p}")),
        ))
    };
    let good = mutual_ls("target-side-secret");
    assert!(good.contains("Lun:0"), "{good}");
    // The initiator refuses a target that cannot prove the expected secret.
    let bad = mutual_ls("not-the-target-secret");
    assert!(!bad.contains("Lun:0"), "{bad}");
    assert!(bad.contains("CHAP_R"), "{bad}");
    ferry.stop_ok();
}

#[test]
fn qemu_img_convert_and_compare_over_iscsi() {
    let dir = tempdir();
    let src = pattern_image(dir.path(), "src.img", 24 * MIB, 11);
    let dst = sparse_image(dir.path(), "dst.img", 24 * MIB);
    let other = pattern_image(dir.path(), "other.img", 24 * MIB, 12);
    let ferry = serve_iscsi(&[dst.as_os_str()]);
    let target = url(&ferry, "dst");
    run(cmd("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&target));
    let out = run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&target));
    assert!(out.contains("Images are identical"), "{out}");
    let diff = run_output(
        cmd("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&other)
            .arg(&target),
    );
    assert_eq!(diff.status.code(), Some(1), "{}", combined(&diff));
    // qemu-img info sees the size through READ CAPACITY.
    let info = run(cmd("qemu-img").args(["info", "-f", "raw"]).arg(&target));
    assert!(info.contains(&format!("({} bytes)", 24 * MIB)), "{info}");
    ferry.stop_ok();
    assert_files_equal(&src, &dst);
}

#[test]
fn qemu_io_patterns_and_one_export_over_nbd_and_iscsi() {
    let dir = tempdir();
    let image = sparse_image(dir.path(), "shared.img", 16 * MIB);
    let ferry = serve_iscsi(&[image.as_os_str(), "--nbd".as_ref(), "127.0.0.1:0".as_ref()]);
    let iscsi = url(&ferry, "shared");
    let nbd = format!("nbd://{}/shared", ferry.announced("nbd"));
    // Write through iSCSI (unaligned length to exercise R2T splitting:
    // 3 MiB + 4 KiB crosses several bursts), read back through NBD.
    run(cmd("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 3076K",
            "-c",
            "write -z 2M 64K",
        ])
        .arg(&iscsi));
    let out = run(cmd("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 1M 1M",
            "-c",
            "read -P 0 2M 64K",
            "-c",
            "read -P 0x5a 2112K 1988K",
            "-c",
            "read -P 0 0 1M",
        ])
        .arg(&nbd));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // And the other way: write through NBD, read through iSCSI.
    run(cmd("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xc3 8M 256K"])
        .arg(&nbd));
    let out = run(cmd("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0xc3 8M 256K",
            "-c",
            "read -P 0 9M 4K",
        ])
        .arg(&iscsi));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A pattern mismatch is reported (the check can fail).
    let out = run_output(
        cmd("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x11 8M 4K"])
            .arg(&iscsi),
    );
    assert!(
        combined(&out).contains("Pattern verification failed"),
        "{}",
        combined(&out)
    );
    ferry.stop_ok();
}
