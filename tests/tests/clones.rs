//! Clones of a snapshot, driven through `ferry clone` and `ferry volume
//! add`: ten clones of one base on one edge read one after the other (the
//! second to the tenth together cost at most 5% of the first's link
//! bytes: the origin answers with signatures, the shared cache serves
//! them); a clone's writes reach its own delta at the origin and nowhere
//! else (the base image is untouched, a sibling does not see them); a
//! cloud-persistent clone is refused unless the edge keeps all of its
//! writes, and then never ships a byte; the base snapshot cannot be
//! deleted under a clone; clones survive an origin restart.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::{
    api, cmd, ferry_bin, random_image, read_at, run, run_fail, sha256, tempdir, Ferry, TempDir, MIB,
};
use serde_json::Value;

const SIZE: u64 = 16 * MIB;

struct Lab {
    dir: TempDir,
    image: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempdir();
        let image = random_image(dir.path(), "base.img", SIZE);
        Lab { dir, image }
    }

    fn origin(&self) -> Ferry {
        Ferry::spawn(
            [
                "origin".as_ref(),
                "--listen".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--export".as_ref(),
                format!("base={}", self.image.display()).as_ref(),
                "--state-dir".as_ref(),
                self.dir.path().join("origin-state").as_os_str(),
                "--no-tls".as_ref(),
            ],
            &["origin", "api"],
        )
    }

    /// Edge daemon `name`, its volumes added through the CLI.
    fn edge(&self, name: &str) -> Ferry {
        let config = self.dir.path().join(format!("{name}.toml"));
        let cache = self.dir.path().join(format!("{name}-cache"));
        std::fs::write(
            &config,
            format!(
                "cache_dir = \"{}\"\ncache_size = \"256M\"\nnbd = [\"127.0.0.1:0\"]\n\
                 [link]\nno_tls = true\n",
                cache.display()
            ),
        )
        .unwrap();
        Ferry::spawn(
            ["edge".as_ref(), "--config".as_ref(), config.as_os_str()],
            &["nbd", "api"],
        )
    }
}

fn origin_api(o: &Ferry) -> PathBuf {
    PathBuf::from(o.announced("api"))
}

fn edge_api(e: &Ferry) -> PathBuf {
    PathBuf::from(e.announced("api"))
}

/// `ferry ARGS --api SOCKET`.
fn cli(socket: &Path, args: &[&str]) -> String {
    run(Command::new(ferry_bin())
        .args(args)
        .arg("--api")
        .arg(socket))
}

fn cli_fails(socket: &Path, args: &[&str]) -> String {
    let (status, out) = run_fail(
        Command::new(ferry_bin())
            .args(args)
            .arg("--api")
            .arg(socket),
    );
    assert!(!status.success(), "{args:?} should fail: {out}");
    out
}

fn edge_volume(e: &Ferry, name: &str) -> Value {
    api(
        &edge_api(e),
        "GET",
        &format!("/v1/volumes/{name}"),
        None,
        200,
    )
}

fn origin_volume(o: &Ferry, name: &str) -> Value {
    api(
        &origin_api(o),
        "GET",
        &format!("/v1/volumes/{name}"),
        None,
        200,
    )
}

fn wire_in(e: &Ferry, name: &str) -> u64 {
    edge_volume(e, name)["link"]["wire_bytes_in"]
        .as_u64()
        .expect("link bytes")
}

/// Waits until the edge's cache holds `bytes`: fills are written in the
/// background, and a read racing them fetches what is not stored yet.
fn wait_cache_holds(eapi: &Path, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let used = api(eapi, "GET", "/v1/cache", None, 200)["used_bytes"]
            .as_u64()
            .expect("cache bytes");
        if used >= bytes {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache holds {used} bytes after 30 s, not {bytes}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn ten_clones_on_one_edge_share_the_base_and_keep_their_writes_apart() {
    let lab = Lab::new();
    let base_sum = sha256(&lab.image);
    let o = lab.origin();
    let oapi = origin_api(&o);
    let addr = o.announced("origin").to_owned();
    cli(&oapi, &["snapshot", "create", "base@golden"]);
    let e = lab.edge("edge");
    let eapi = edge_api(&e);
    let nbd = e.announced("nbd").to_owned();

    // Each clone is read whole, one after the other, and must read as
    // the base: the first fetches the base over the link, the others
    // find it in the shared cache by signature.
    let mut link_bytes = Vec::new();
    for i in 1..=10 {
        let name = format!("c{i}");
        let out = cli(&oapi, &["clone", "create", "base@golden", &name]);
        assert!(out.contains("origin persistence"), "{out}");
        cli(&eapi, &["volume", "add", &name, "--origin", &addr]);
        run(cmd("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &lab.image.display().to_string(),
            &format!("nbd://{nbd}/{name}"),
        ]));
        link_bytes.push(wire_in(&e, &name));
        if i == 1 {
            wait_cache_holds(&eapi, SIZE);
        }
    }
    let first = link_bytes[0];
    let rest: u64 = link_bytes[1..].iter().sum();
    eprintln!("link bytes in, clone 1: {first}; clones 2-10: {rest} ({link_bytes:?})");
    assert!(first >= SIZE, "clone 1 fetched the base: {first}");
    assert!(
        rest * 20 <= first,
        "clones 2-10 took {rest} bytes, more than 5% of clone 1's {first}"
    );

    // A write to c3 lands in c3's delta only.
    let pattern = "write -P 0x5a 1M 64k";
    run(cmd("qemu-io").args(["-f", "raw", "-c", pattern, &format!("nbd://{nbd}/c3")]));
    api(&eapi, "POST", "/v1/volumes/c3/flush", None, 200);
    assert!(origin_volume(&o, "c3")["batch_bytes_applied"].as_u64() >= Some(65_536));
    let c3 = origin_volume(&o, "c3");
    assert_eq!(c3["clone_of"]["volume"], "base", "{c3}");
    assert_eq!(c3["clone_of"]["snapshot"], "golden", "{c3}");
    let c4 = cmd("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5a 1M 64k"])
        .arg(format!("nbd://{nbd}/c4"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&c4.stdout);
    assert!(said.contains("Pattern verification failed"), "{said}");

    // The base snapshot is pinned; the base volume cannot go.
    let pinned = cli_fails(&oapi, &["snapshot", "delete", "base@golden"]);
    assert!(
        pinned.contains("c1") && pinned.contains("base of clones"),
        "{pinned}"
    );
    let parent = api(&oapi, "DELETE", "/v1/volumes/base", None, 409);
    assert!(parent.to_string().contains("has clones"), "{parent}");
    let a_clone = api(&oapi, "DELETE", "/v1/volumes/c2", None, 409);
    assert!(
        a_clone.to_string().contains("ferry clone delete c2"),
        "{a_clone}"
    );
    // Deleting a clone an edge holds is refused; once it is off the edge,
    // it goes with its writes.
    let held = cli_fails(&oapi, &["clone", "delete", "c10"]);
    assert!(held.contains("attached"), "{held}");
    cli(&eapi, &["volume", "rm", "c10"]);
    cli(&oapi, &["clone", "delete", "c10"]);
    let listed = cli(&oapi, &["clone", "list"]);
    assert!(listed.contains("c9") && !listed.contains("c10"), "{listed}");

    // An origin restart serves the clones again, c3's write included (read
    // by another edge, with a cache of its own).
    drop(e);
    o.stop_ok();
    let o = lab.origin();
    let list: Value =
        serde_json::from_str(&cli(&origin_api(&o), &["clone", "list", "--json"])).unwrap();
    assert_eq!(list["clones"].as_array().unwrap().len(), 9, "{list}");
    assert!(list["clones"][0]["served"].as_bool().unwrap(), "{list}");
    let e = lab.edge("edge-2");
    let addr = o.announced("origin").to_owned();
    cli(&edge_api(&e), &["volume", "add", "c3", "--origin", &addr]);
    let nbd = e.announced("nbd");
    run(cmd("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 1M 64k",
        &format!("nbd://{nbd}/c3"),
    ]));
    drop(e);
    drop(o);
    assert_eq!(sha256(&lab.image), base_sum, "the base image is untouched");
}

#[test]
fn a_cloud_clone_keeps_every_write_on_the_edge() {
    let lab = Lab::new();
    let o = lab.origin();
    let oapi = origin_api(&o);
    let addr = o.announced("origin").to_owned();
    cli(&oapi, &["snapshot", "create", "base@t0"]);
    let out = cli(
        &oapi,
        &[
            "clone",
            "create",
            "base@t0",
            "test-1",
            "--persistence",
            "cloud",
        ],
    );
    assert!(out.contains("--isolated"), "{out}");
    let e = lab.edge("edge");
    let eapi = edge_api(&e);
    let refused = cli_fails(&eapi, &["volume", "add", "test-1", "--origin", &addr]);
    assert!(
        refused.contains("cloud persistence") && refused.contains("--isolated"),
        "{refused}"
    );
    cli(
        &eapi,
        &["volume", "add", "test-1", "--origin", &addr, "--isolated"],
    );
    let uri = format!("nbd://{}/test-1", e.announced("nbd"));
    run(cmd("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 0 2M", &uri]));
    run(cmd("qemu-io").args(["-f", "raw", "-c", "write -z 8M 1M", &uri]));
    api(&eapi, "POST", "/v1/volumes/test-1/flush", None, 200);
    run(cmd("qemu-io").args(["-f", "raw", "-c", "read -P 0x77 0 2M", &uri]));
    run(cmd("qemu-io").args(["-f", "raw", "-c", "read -P 0 8M 1M", &uri]));
    let v = edge_volume(&e, "test-1");
    assert_eq!(v["journal"]["bytes_shipped"], 0, "{v}");
    assert_eq!(v["link"]["write_bytes"], 0, "{v}");
    let at_origin = origin_volume(&o, "test-1");
    assert_eq!(at_origin["batches_applied"], 0, "{at_origin}");
    assert_eq!(at_origin["clone_of"]["persistence"], "cloud", "{at_origin}");
    // And the origin keeps nothing of it to snapshot.
    let snap = cli_fails(&oapi, &["snapshot", "create", "test-1"]);
    assert!(snap.contains("cloud persistence"), "{snap}");
    let copy = lab.dir.path().join("test-1.img");
    run(cmd("qemu-img")
        .args(["convert", "-O", "raw", &uri])
        .arg(&copy));
    // Unwritten ranges read the snapshot.
    let want = read_at(&lab.image, 4 * MIB, 1 << 20);
    assert!(read_at(&copy, 4 * MIB, 1 << 20) == want);
    assert!(read_at(&copy, 0, 1 << 20).iter().all(|&b| b == 0x77));
}
