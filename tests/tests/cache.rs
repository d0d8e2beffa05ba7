//! `ferry serve --cache-dir`: exports read through the encrypted cache, with
//! real clients (qemu-img, fio with verification, nbdcopy), across restarts,
//! and `ferry cache inspect` on the result, including a tampered data file
//! and a wrong key.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_tests::{
    assert_files_equal, cmd, ferry_bin, random_image, run, run_fail, run_output, tempdir, Ferry,
    MIB,
};

const SIZE: u64 = 48 * MIB;

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{}\n", format!("{byte:02x}").repeat(32))).unwrap();
    p
}

/// `ferry serve IMAGE` with a cache of `cache_mib` MiB in `dir/cache`.
fn serve(image: &Path, dir: &Path, key: &Path, cache_mib: u64) -> Ferry {
    Ferry::start([
        image.as_os_str(),
        "--name".as_ref(),
        "disk".as_ref(),
        "--cache-dir".as_ref(),
        dir.join("cache").as_os_str(),
        "--cache-size".as_ref(),
        format!("{cache_mib}M").as_ref(),
        "--cache-key-file".as_ref(),
        key.as_os_str(),
    ])
}

fn inspect(dir: &Path, key: Option<&Path>) -> std::process::Output {
    let mut c = std::process::Command::new(ferry_bin());
    c.args(["cache", "inspect"]).arg(dir.join("cache"));
    if let Some(key) = key {
        c.arg("--verify").arg("--key-file").arg(key);
    }
    run_output(&mut c)
}

/// A counter from the `cache statistics` line ferry logs at shutdown.
fn stat(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("cache statistics"))
        .unwrap_or_else(|| panic!("no cache statistics in the log:\n{log}"));
    let field = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    field.trim_matches('"').parse().unwrap()
}

#[test]
fn real_clients_read_and_write_through_the_cache() {
    let dir = tempdir();
    let image = random_image(dir.path(), "disk.img", SIZE);
    let reference = dir.path().join("reference.img");
    std::fs::copy(&image, &reference).unwrap();
    let key = key_file(dir.path(), "key", 0x11);
    // A cache smaller than the image: reads evict as they go.
    let ferry = serve(&image, dir.path(), &key, 16);
    let uri = ferry.uri("disk");
    for _ in 0..2 {
        run(cmd("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri])
            .arg(&reference));
    }
    // Random writes with verification, through the cache: 16 KiB writes
    // replace parts of 64 KiB chunks (dropped from the cache), 128 KiB
    // writes whole chunks (stored by write-through). Each pass is verified
    // as it goes and again on a fresh connection.
    for bs in ["16k", "128k"] {
        for verify_only in [false, true] {
            let mut c = cmd("fio");
            c.args([
                "--name=cache",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--iodepth=8",
                "--offset=8M",
                "--size=24M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--randseed=7",
                "--verify_state_save=0",
                "--output-format=terse",
            ])
            .arg(format!("--bs={bs}"))
            .arg(format!("--uri={uri}"));
            if verify_only {
                c.arg("--verify_only=1");
            }
            let out = run(&mut c);
            assert!(!out.to_lowercase().contains("bad header"), "{out}");
        }
    }
    // What the client reads equals what is on disk.
    let copy = dir.path().join("copy.img");
    run(cmd("nbdcopy").arg(&uri).arg(&copy));
    assert_files_equal(&copy, &image);
    let log = ferry.stop_ok_log();
    assert!(stat(&log, "hits") > 0, "{log}");
    assert!(stat(&log, "evictions") > 0, "{log}");
    assert_eq!(stat(&log, "integrity_errors"), 0, "{log}");

    let out = inspect(dir.path(), Some(&key));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("chunks authenticated and match their signatures"),
        "{text}"
    );
    assert!(text.contains("disk"), "{text}");
}

#[test]
fn a_restart_serves_from_the_persistent_cache() {
    let dir = tempdir();
    let image = random_image(dir.path(), "disk.img", 8 * MIB);
    let key = key_file(dir.path(), "key", 0x22);
    let ferry = serve(&image, dir.path(), &key, 64);
    let copy = dir.path().join("copy.img");
    run(cmd("nbdcopy").arg(ferry.uri("disk")).arg(&copy));
    let log = ferry.stop_ok_log();
    assert_eq!(stat(&log, "hits"), 0, "cold cache: {log}");
    assert!(stat(&log, "stored") > 0, "{log}");

    let ferry = serve(&image, dir.path(), &key, 64);
    std::fs::remove_file(&copy).unwrap();
    run(cmd("nbdcopy").arg(ferry.uri("disk")).arg(&copy));
    assert_files_equal(&copy, &image);
    let log = ferry.stop_ok_log();
    // Every 64 KiB chunk of the image is a hit after the restart.
    assert_eq!(stat(&log, "misses"), 0, "{log}");
    assert!(stat(&log, "hits") >= 8 * MIB / (64 * 1024), "{log}");
}

#[test]
fn inspect_finds_a_tampered_chunk_and_a_wrong_key() {
    let dir = tempdir();
    let image = random_image(dir.path(), "disk.img", 4 * MIB);
    let key = key_file(dir.path(), "key", 0x33);
    let ferry = serve(&image, dir.path(), &key, 64);
    run(cmd("nbdcopy")
        .arg(ferry.uri("disk"))
        .arg(dir.path().join("copy.img")));
    ferry.stop_ok();

    let clean = inspect(dir.path(), Some(&key));
    assert!(clean.status.success());
    let text = String::from_utf8_lossy(&clean.stdout).into_owned();
    assert!(text.contains("64 used"), "{text}");

    // The wrong key: every chunk fails, and serving with it still returns
    // the image's data (each damaged chunk is refetched).
    let wrong = key_file(dir.path(), "wrong", 0x44);
    let out = inspect(dir.path(), Some(&wrong));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("64 of 64 chunks FAILED"), "{text}");
    assert!(text.contains("failed authentication"), "{text}");

    // One flipped byte inside slot 0's ciphertext: the structure is intact
    // (inspect without a key passes), verification names exactly that slot.
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("cache/data"))
        .unwrap();
    let mut b = [0u8; 1];
    data.read_exact_at(&mut b, 4096 + 1000).unwrap();
    data.write_all_at(&[!b[0]], 4096 + 1000).unwrap();
    drop(data);
    let out = inspect(dir.path(), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (_, text) = run_fail(
        std::process::Command::new(ferry_bin())
            .args(["cache", "inspect"])
            .arg(dir.path().join("cache"))
            .arg("--verify")
            .arg("--key-file")
            .arg(&key),
    );
    assert!(text.contains("1 of 64 chunks FAILED"), "{text}");
    assert!(text.contains("slot 0:"), "{text}");

    // Served anyway: the damaged chunk comes from the image again.
    let ferry = serve(&image, dir.path(), &key, 64);
    let copy = dir.path().join("copy2.img");
    run(cmd("nbdcopy").arg(ferry.uri("disk")).arg(&copy));
    assert_files_equal(&copy, &image);
    let log = ferry.stop_ok_log();
    assert_eq!(stat(&log, "integrity_errors"), 1, "{log}");
    // ...and repaired.
    assert!(inspect(dir.path(), Some(&key)).status.success());
}

#[test]
fn bad_cache_options_fail_clearly() {
    let dir = tempdir();
    let image = random_image(dir.path(), "disk.img", MIB);
    let short = dir.path().join("short.key");
    std::fs::write(&short, "abc").unwrap();
    let (_, text) = run_fail(
        std::process::Command::new(ferry_bin())
            .arg("serve")
            .arg(&image)
            .args(["--nbd", "127.0.0.1:0", "--cache-size", "16M", "--cache-dir"])
            .arg(dir.path().join("cache"))
            .arg("--cache-key-file")
            .arg(&short),
    );
    assert!(text.contains("32 raw bytes or 64 hex digits"), "{text}");
    let key = key_file(dir.path(), "key", 1);
    let (_, text) = run_fail(
        std::process::Command::new(ferry_bin())
            .arg("serve")
            .arg(&image)
            .args([
                "--nbd",
                "127.0.0.1:0",
                "--cache-size",
                "16M",
                "--cache-chunk-size",
                "3000",
            ])
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--cache-key-file")
            .arg(&key),
    );
    assert!(text.contains("power of two"), "{text}");
    let (_, text) = run_fail(
        std::process::Command::new(ferry_bin())
            .args(["cache", "inspect"])
            .arg(dir.path()),
    );
    assert!(text.contains("not a ferry cache directory"), "{text}");
}
