//! The multi-volume edge daemon driven through its management API and the
//! `ferry` CLI: ten volumes added to a running edge and served over NBD and
//! iSCSI, five removed while fio runs on the other five, a restart from the
//! configuration file, a cache resize under reads, every documented
//! endpoint walked (errors included, and the TLS listener's token), and
//! `/metrics` parsed by `promtool` and checked against known traffic.

// Metric samples are counts, exact in an f64: comparing them exactly is right.
#![allow(clippy::float_cmp)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::{
    api, assert_range_filled, cmd, ferry_bin, http_unix, random_image, run, tempdir, wait_until,
    Ferry, TempDir, MIB,
};
use serde_json::Value;

const SIZE: u64 = 16 * MIB;

struct Origin {
    dir: TempDir,
    images: Vec<PathBuf>,
    ferry: Ferry,
}

/// An origin serving `names`, each a random image of `SIZE`.
fn origin(names: &[String]) -> Origin {
    let dir = tempdir();
    let mut args: Vec<String> = vec![
        "origin".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state-dir".into(),
        dir.path().join("origin-state").display().to_string(),
        "--no-tls".into(),
    ];
    let mut images = Vec::new();
    for n in names {
        let image = random_image(dir.path(), &format!("{n}.img"), SIZE);
        args.push("--export".into());
        args.push(format!("{n}={}", image.display()));
        images.push(image);
    }
    let ferry = Ferry::spawn(args, &["origin"]);
    Origin { dir, images, ferry }
}

fn write_config(path: &Path, cache_dir: &Path, extra: &str) {
    std::fs::write(
        path,
        format!(
            "cache_dir = \"{}\"\ncache_size = \"256M\"\nnbd = [\"127.0.0.1:0\"]\nmetrics = \"127.0.0.1:0\"\n{extra}\n[iscsi]\nlisten = [\"127.0.0.1:0\"]\n[link]\nno_tls = true\n",
            cache_dir.display()
        ),
    )
    .unwrap();
}

fn start_edge(config: &Path) -> Ferry {
    Ferry::spawn(
        ["edge".as_ref(), "--config".as_ref(), config.as_os_str()],
        &["nbd", "iscsi", "metrics", "api"],
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

/// Writes 1 MiB of `byte` at `offset` through a raw NBD client that never
/// sends FLUSH (qemu-io flushes when it closes the image).
fn write_unflushed(e: &Ferry, export: &str, offset: u64, byte: u8) {
    let mut c = ferry_tests::nbd::Client::handshake(e.connect(), export).unwrap();
    let r = c
        .write(offset, &vec![byte; usize::try_from(MIB).unwrap()])
        .unwrap();
    assert_eq!(r.error, 0);
}

fn volumes(e: &Ferry) -> Vec<Value> {
    api(&socket(e), "GET", "/v1/volumes", None, 200)["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn names_in(text: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.contains(prefix)))
        .map(|w| {
            w.rsplit(':')
                .next()
                .unwrap_or(w)
                .trim_matches('"')
                .to_owned()
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn ten_volumes_come_and_go_on_a_running_edge_without_disturbing_the_others() {
    let names: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    let o = origin(&names);
    let origin_addr = o.ferry.announced("origin").to_owned();
    let dir = tempdir();
    let config = dir.path().join("edge.toml");
    write_config(&config, &dir.path().join("cache"), "");
    let e = start_edge(&config);

    // Ten volumes through the CLI; the five to be removed keep their writes
    // in the journal (long RPO) so that only the removal ships them.
    for (i, n) in names.iter().enumerate() {
        let rpo = if i < 5 { "600" } else { "1" };
        let out = ferry_cli(
            &e,
            &[
                "volume",
                "add",
                n,
                "--origin",
                &origin_addr,
                "--rpo",
                rpo,
                "--journal-size",
                "64M",
                "--json",
            ],
        );
        let info: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(info["state"], "up", "{out}");
        assert_eq!(info["size"], SIZE, "{out}");
    }
    let nbd = e.addr().to_string();
    let iscsi = e.announced("iscsi").to_owned();
    let exports = run(cmd("nbdinfo").args(["--list", "--json", &format!("nbd://{nbd}")]));
    let listed: Value = serde_json::from_str(&exports).unwrap();
    assert_eq!(
        listed["exports"].as_array().map(Vec::len),
        Some(10),
        "{exports}"
    );
    let targets = run(cmd("iscsi-ls").arg(format!("iscsi://{iscsi}")));
    assert_eq!(
        names_in(&targets, "iqn.2026-11.dev.ferry:"),
        names,
        "{targets}"
    );
    // Every volume reads back as its origin image, over NBD and iSCSI.
    for (i, n) in names.iter().enumerate() {
        let uri = if i % 2 == 0 {
            format!("nbd://{nbd}/{n}")
        } else {
            format!("iscsi://{iscsi}/iqn.2026-11.dev.ferry:{n}/0")
        };
        run(cmd("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri])
            .arg(&o.images[i]));
    }
    for (i, n) in names.iter().enumerate().take(5) {
        write_unflushed(&e, n, MIB, 0x50 + u8::try_from(i).unwrap());
    }
    for v in volumes(&e).iter().take(5) {
        assert!(
            v["journal"]["unshipped_bytes"].as_u64().unwrap() >= MIB,
            "the write should wait in the journal: {v}"
        );
    }

    // fio on the five survivors while the other five are removed.
    let mut fio = cmd("fio");
    fio.args([
        "--ioengine=nbd",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=8",
        "--size=8M",
        "--time_based",
        "--runtime=20",
        "--output-format=terse",
    ]);
    for n in &names[5..] {
        fio.arg(format!("--name={n}"));
        fio.arg(format!("--uri=nbd://{nbd}/{n}"));
    }
    let fio = fio.stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    for n in &names[..5] {
        let out = ferry_cli(&e, &["volume", "rm", n, "--json"]);
        let removed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(removed["flushed"], true, "{out}");
    }
    let fio = fio.wait_with_output().unwrap();
    let fio_out = String::from_utf8_lossy(&fio.stdout);
    assert!(
        fio.status.success(),
        "fio on the survivors failed: {fio_out}"
    );
    // Terse format v3: field 5 is the job's error code.
    for line in fio_out.lines().filter(|l| l.starts_with("3;")) {
        assert_eq!(
            line.split(';').nth(4),
            Some("0"),
            "a survivor saw errors: {line}"
        );
    }

    // The removed volumes' writes are at the origin; they are gone from
    // both front ends and from the file.
    for i in 0..5u8 {
        assert_range_filled(&o.images[usize::from(i)], MIB, MIB, 0x50 + i);
    }
    let left: Vec<String> = volumes(&e)
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, names[5..].to_vec());
    let exports = run(cmd("nbdinfo").args(["--list", "--json", &format!("nbd://{nbd}")]));
    let listed: Value = serde_json::from_str(&exports).unwrap();
    assert_eq!(
        listed["exports"].as_array().map(Vec::len),
        Some(5),
        "{exports}"
    );
    let targets = run(cmd("iscsi-ls").arg(format!("iscsi://{iscsi}")));
    assert_eq!(
        names_in(&targets, "iqn.2026-11.dev.ferry:"),
        names[5..].to_vec(),
        "{targets}"
    );
    let (st, _) = ferry_tests::run_fail(cmd("nbdinfo").arg(format!("nbd://{nbd}/v0")));
    assert!(!st.success(), "a removed export still answers");
    let saved = std::fs::read_to_string(&config).unwrap();
    assert_eq!(saved.matches("[[volume]]").count(), 5, "{saved}");

    // A restart from the file finds every volume back, and serves what was
    // written before it.
    ferry_cli(&e, &["flush"]);
    e.stop_ok();
    let e = start_edge(&config);
    assert!(
        wait_until(Duration::from_secs(60), || volumes(&e)
            .iter()
            .filter(|v| v["state"] == "up")
            .count()
            == 5),
        "not every volume came back: {:?}",
        volumes(&e)
    );
    let nbd = e.addr().to_string();
    for (i, n) in names.iter().enumerate().skip(5) {
        run(cmd("qemu-img")
            .args([
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &format!("nbd://{nbd}/{n}"),
            ])
            .arg(&o.images[i]));
    }
    let table = ferry_cli(&e, &["status"]);
    for n in &names[5..] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(n.as_str()) && l.contains(" up ")),
            "{table}"
        );
    }
    e.stop_ok();
    drop(o.dir);
}

#[test]
fn the_cache_is_resized_while_reads_run() {
    let names = vec!["r".to_owned()];
    let o = origin(&names);
    let dir = tempdir();
    let config = dir.path().join("edge.toml");
    write_config(&config, &dir.path().join("cache"), "");
    let e = start_edge(&config);
    let sock = socket(&e);
    let spec = format!(
        r#"{{"name": "r", "origin": "{}", "journal_size": "64M"}}"#,
        o.ferry.announced("origin")
    );
    api(&sock, "POST", "/v1/volumes", Some(&spec), 201);
    let uri = format!("nbd://{}/r", e.addr());
    let image = o.images[0].clone();
    let reader = std::thread::spawn(move || {
        for _ in 0..4 {
            run(cmd("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw", &uri])
                .arg(&image));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    // Smaller than the volume (evicting while reads fill it), then larger.
    let small = api(
        &sock,
        "PUT",
        "/v1/cache/size",
        Some(r#"{"size": "4M"}"#),
        200,
    );
    assert_eq!(small["capacity_bytes"], 4 * MIB, "{small}");
    std::thread::sleep(Duration::from_millis(500));
    let out = ferry_cli(&e, &["cache", "resize", "96M", "--json"]);
    let big: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(big["capacity_bytes"], 96 * MIB, "{out}");
    reader.join().expect("reads through the resizes");
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains("cache_size = \"96M\""), "{saved}");
    e.stop_ok();
}

/// Resolves `#/components/schemas/X` references.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Checks `body` against `schema`'s required and known top-level properties.
fn check_shape(doc: &Value, schema: &Value, body: &Value, what: &str) {
    let schema = resolve(doc, schema);
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {body}"));
    for k in obj.keys() {
        assert!(
            props.contains_key(k),
            "{what}: {k:?} is not in the documented schema"
        );
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        let r = r.as_str().unwrap();
        assert!(
            obj.contains_key(r),
            "{what}: documented field {r:?} is missing: {body}"
        );
    }
}

#[test]
fn every_documented_endpoint_does_what_the_document_says() {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ferry/api/edge.openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let o = origin(&["walk".to_owned()]);
    let dir = tempdir();
    let (cert, key, _) = ferry_tests::self_signed_cert(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let config = dir.path().join("edge.toml");
    write_config(
        &config,
        &dir.path().join("cache"),
        &format!(
            "[api_tcp]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\n",
            cert.display(),
            key.display(),
            token.display()
        ),
    );
    let e = Ferry::spawn(
        ["edge".as_ref(), "--config".as_ref(), config.as_os_str()],
        &["nbd", "iscsi", "metrics", "api", "api-tcp"],
    );
    let sock = socket(&e);
    let origin_addr = o.ferry.announced("origin").to_owned();

    // Every documented operation, the add first and the remove last.
    let mut ops: Vec<(String, String, Value)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops.push((method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    // The migration starts before its other calls; the cut-over ends it
    // (the volume is then served from its copy), and the move back brings
    // it home, before the removal.
    let rank = |(m, p, _): &(String, String, Value)| match (m.as_str(), p.as_str()) {
        ("POST", "/v1/volumes") => 0,
        ("POST", "/v1/volumes/{name}/migration") => 1,
        ("POST", "/v1/volumes/{name}/cutover") => 3,
        ("POST", "/v1/volumes/{name}/moveback") => 4,
        ("DELETE", _) => 5,
        _ => 2,
    };
    let copy = dir.path().join("walk.raw");
    ops.sort_by_key(rank);
    assert!(ops.len() >= 12, "{} operations documented", ops.len());
    for (method, path, op) in &ops {
        let concrete = path.replace("{name}", "walk");
        let body = op
            .get("requestBody")
            .map(|_| match (method.as_str(), path.as_str()) {
                ("POST", "/v1/volumes") => {
                    format!(r#"{{"name": "walk", "origin": "{origin_addr}", "rpo_secs": 5}}"#)
                }
                ("POST", "/v1/volumes/{name}/migration") => {
                    format!(r#"{{"target": "{}", "rate_mbit": 800}}"#, copy.display())
                }
                ("PATCH", "/v1/volumes/{name}/migration") => r#"{"paused": false}"#.to_owned(),
                ("PATCH", _) => r#"{"rpo_secs": 2}"#.to_owned(),
                ("PUT", "/v1/cache/size") => r#"{"size": "96M"}"#.to_owned(),
                other => panic!("no example body for {other:?}"),
            });
        let (code, reply) = op["responses"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(c, _)| c.starts_with('2'))
            .map(|(c, r)| (c.parse::<u16>().unwrap(), r.clone()))
            .unwrap();
        // The copy may still be running under load: a forced cut-over
        // waits for it instead of refusing (the refusal has its own test).
        let target = match (method.as_str(), path.as_str()) {
            ("POST", "/v1/volumes/{name}/cutover") => format!("{concrete}?force=true"),
            _ => concrete.clone(),
        };
        let r = http_unix(&sock, method, &target, body.as_deref(), None);
        assert_eq!(r.status, code, "{method} {concrete}: {}", r.body);
        let (ctype, media) = reply["content"].as_object().unwrap().iter().next().unwrap();
        let got = r.header("content-type").unwrap_or("");
        assert_eq!(
            got.split(';').next(),
            ctype.split(';').next(),
            "{method} {concrete}: content type"
        );
        if ctype.starts_with("application/json") {
            check_shape(
                &doc,
                &media["schema"],
                &r.json(),
                &format!("{method} {concrete}"),
            );
        }
        if method == "PATCH" && path == "/v1/volumes/{name}" {
            assert_eq!(r.json()["spec"]["rpo_secs"], 2.0);
        }
        if path == "/v1/volumes/{name}/migration" && method == "POST" {
            // The cut-over below needs the whole copy.
            let done = wait_until(Duration::from_secs(60), || {
                api(&sock, "GET", "/v1/volumes/walk/migration", None, 200)["bytes_remaining"] == 0
            });
            assert!(done, "the walk volume's copy did not finish");
        }
    }

    // Errors: each documented for the route it came from, and a JSON body
    // naming the problem.
    let documented = |method: &str, path: &str, code: u16| {
        doc["paths"][path][method.to_lowercase()]["responses"]
            .get(code.to_string())
            .is_some()
    };
    let long = format!(r#"{{"name": "x{}", "origin": "h:1"}}"#, "y".repeat(70_000));
    for (method, path, doc_path, body, ctype, code, error) in [
        (
            "GET",
            "/v1/volumes/nope",
            "/v1/volumes/{name}",
            None,
            None,
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/v1/volumes/nope",
            "/v1/volumes/{name}",
            None,
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/volumes",
            "/v1/volumes",
            Some("{\"name\": "),
            None,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/volumes",
            "/v1/volumes",
            Some(r#"{"name": "BAD", "origin": "h:1"}"#),
            None,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/volumes",
            "/v1/volumes",
            Some(long.as_str()),
            None,
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/volumes",
            "/v1/volumes",
            Some("name=x"),
            Some("text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "PUT",
            "/v1/cache/size",
            "/v1/cache/size",
            Some(r#"{"size": "lots"}"#),
            None,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/flush?timeout_secs=soon",
            "/v1/flush",
            None,
            None,
            400,
            "bad_request",
        ),
    ] {
        let r = http_unix(&sock, method, path, body, ctype);
        assert_eq!(r.status, code, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["error"], error, "{method} {path}: {}", r.body);
        assert!(!r.json()["message"].as_str().unwrap_or("").is_empty());
        assert!(
            documented(method, doc_path, code),
            "{method} {doc_path} does not document {code}"
        );
    }
    let r = http_unix(&sock, "PUT", "/v1/volumes", None, None);
    assert_eq!(r.status, 405, "{}", r.body);
    // A volume whose origin does not have it: the origin's refusal, named.
    let r = http_unix(
        &sock,
        "POST",
        "/v1/volumes",
        Some(&format!(
            r#"{{"name": "absent", "origin": "{origin_addr}"}}"#
        )),
        None,
    );
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.json()["message"].as_str().unwrap().contains("absent"),
        "{}",
        r.body
    );

    // The TCP listener wants TLS and the token.
    let url = format!("https://{}/v1/status", e.announced("api-tcp"));
    let curl = |auth: Option<&str>| {
        let mut c = cmd("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&cert)
            .arg(&url);
        if let Some(a) = auth {
            c.args(["-H", &format!("Authorization: Bearer {a}")]);
        }
        run(&mut c)
    };
    assert_eq!(curl(None), "401");
    assert_eq!(curl(Some("wrong-token-wrong-token")), "401");
    assert_eq!(curl(Some("0123456789abcdef0123")), "200");
    // The metrics listener serves nothing else.
    let murl = format!("http://{}/v1/status", e.announced("metrics"));
    assert_eq!(
        run(cmd("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &murl])),
        "404"
    );
    e.stop_ok();
}

/// Runs `promtool check metrics` (Prometheus's own parser and linter) on
/// a scrape.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut promtool = cmd("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// The value of the sample `name{labels}` in a text exposition.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_parse_with_promtool_and_count_known_traffic() {
    let o = origin(&["m".to_owned()]);
    let dir = tempdir();
    let config = dir.path().join("edge.toml");
    write_config(&config, &dir.path().join("cache"), "");
    let e = start_edge(&config);
    let spec = format!(
        r#"{{"name": "m", "origin": "{}"}}"#,
        o.ferry.announced("origin")
    );
    api(&socket(&e), "POST", "/v1/volumes", Some(&spec), 201);
    let nbd = format!("nbd://{}/m", e.addr());
    let iscsi = format!("iscsi://{}/iqn.2026-11.dev.ferry:m/0", e.announced("iscsi"));
    let scrape = || {
        run(cmd("curl").args([
            "-s",
            "--fail",
            &format!("http://{}/metrics", e.announced("metrics")),
        ]))
    };
    let before = scrape();
    run(cmd("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 7 0 64K",
        "-c",
        "write -P 8 1M 128K",
        &nbd,
    ]));
    run(cmd("qemu-io").args(["-f", "raw", "-c", "read 4M 1M", &iscsi]));
    ferry_cli(&e, &["flush", "m"]);
    let text = scrape();
    promtool_check(&text);
    let series = |name: &str, protocol: &str, op: &str| {
        format!(r#"{name}{{op="{op}",protocol="{protocol}",volume="m"}}"#)
    };
    let delta = |s: &str| {
        sample(&text, s)
            - if before.contains(s) {
                sample(&before, s)
            } else {
                0.0
            }
    };
    assert_eq!(
        delta(&series("ferry_edge_request_bytes_total", "nbd", "write")),
        f64::from(192 * 1024)
    );
    assert_eq!(
        delta(&series("ferry_edge_requests_total", "nbd", "write")),
        2.0
    );
    assert!(
        delta(&series("ferry_edge_request_bytes_total", "iscsi", "read")) >= f64::from(1 << 20)
    );
    assert_eq!(
        sample(
            &text,
            &series("ferry_edge_request_duration_seconds_count", "nbd", "write")
        ),
        sample(&text, &series("ferry_edge_requests_total", "nbd", "write"))
    );
    assert_eq!(sample(&text, r#"ferry_edge_volumes{state="up"}"#), 1.0);
    assert_eq!(sample(&text, r#"ferry_edge_link_up{volume="m"}"#), 1.0);
    assert_eq!(
        sample(&text, r#"ferry_edge_journal_unshipped_bytes{volume="m"}"#),
        0.0
    );
    assert!(
        sample(
            &text,
            r#"ferry_edge_link_payload_bytes_total{class="demand",volume="m"}"#
        ) >= f64::from(1 << 20)
    );
    assert!(
        sample(
            &text,
            r#"ferry_edge_link_payload_bytes_total{class="writes",volume="m"}"#
        ) >= f64::from(192 * 1024)
    );
    assert!(
        sample(&text, r#"ferry_edge_shipped_bytes_total{volume="m"}"#) >= f64::from(192 * 1024)
    );
    assert!(sample(&text, "ferry_edge_cache_used_bytes") > 0.0);
    e.stop_ok();
}

/// An edge is SIGKILLed with writes still in its journal; the operator
/// force-releases its volume at the origin. The old edge, restarted with
/// the same cache (the same edge id), is refused: its journal never
/// reaches the volume, while a new edge attaches and serves it. The
/// origin's API and metrics show the fence.
#[test]
fn a_force_released_edge_never_writes_again() {
    let dir = tempdir();
    let image = random_image(dir.path(), "f.img", SIZE);
    let reference = dir.path().join("reference.img");
    std::fs::copy(&image, &reference).unwrap();
    let o = Ferry::spawn(
        [
            "origin".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--export".as_ref(),
            format!("f={}", image.display()).as_ref(),
            "--state-dir".as_ref(),
            dir.path().join("origin-state").as_os_str(),
            "--metrics".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--no-tls".as_ref(),
        ],
        &["origin", "metrics", "api"],
    );
    let origin_api = PathBuf::from(o.announced("api"));
    let config = dir.path().join("edge-a.toml");
    let cache_a = dir.path().join("cache-a");
    write_config(&config, &cache_a, "");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap()
            + &format!(
                "[[volume]]\nname = \"f\"\norigin = \"{}\"\nrpo_secs = 600\njournal_size = \"64M\"\n",
                o.announced("origin")
            ),
    )
    .unwrap();
    let a = start_edge(&config);
    assert!(wait_until(Duration::from_secs(20), || volumes(&a)
        .first()
        .is_some_and(|v| v["state"] == "up")));
    // No FLUSH (qemu-io would send one on close, and a FLUSH cuts a batch
    // and ships it at once): the write is in the journal's file, which
    // outlives the process.
    write_unflushed(&a, "f", 2 * MIB, 0x77);
    let unshipped = volumes(&a)[0]["journal"]["unshipped_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        unshipped >= MIB,
        "the write waits in the journal (RPO 600 s): {unshipped}"
    );
    let edge_a = std::fs::read_to_string(cache_a.join("edge-id")).unwrap();
    a.stop_with("KILL");

    let out = run(Command::new(ferry_bin())
        .args(["origin", "release", "f", "--force", "--json", "--api"])
        .arg(&origin_api));
    let released: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(released["edge"], edge_a.trim(), "{out}");
    let v = api(&origin_api, "GET", "/v1/volumes/f", None, 200);
    assert_eq!(v["fenced"], serde_json::json!([edge_a.trim()]), "{v}");
    assert!(v.get("attached_by").is_none(), "{v}");

    // The old edge comes back with its journal: refused, and it says why.
    let a = start_edge(&config);
    assert!(
        wait_until(Duration::from_secs(20), || volumes(&a).first().is_some_and(
            |v| {
                v["state"] == "attaching"
                    && v["error"].as_str().is_some_and(|e| e.contains("fenced"))
            }
        )),
        "{:?}",
        volumes(&a)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ferry_tests::read_at(&image, 2 * MIB, usize::try_from(MIB).unwrap()),
        ferry_tests::read_at(&reference, 2 * MIB, usize::try_from(MIB).unwrap()),
        "the fenced edge's write reached the volume"
    );
    a.stop_ok();

    // Another edge attaches and serves the origin's data.
    let b = Ferry::spawn(
        [
            "edge".as_ref(),
            "--origin".as_ref(),
            o.announced("origin").as_ref(),
            "--volume".as_ref(),
            "f".as_ref(),
            "--cache-dir".as_ref(),
            dir.path().join("cache-b").as_os_str(),
            "--nbd".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--no-tls".as_ref(),
        ],
        &["nbd", "api"],
    );
    run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &b.uri("f")])
        .arg(&reference));
    let v = api(&origin_api, "GET", "/v1/volumes/f", None, 200);
    assert_ne!(v["attached_by"], edge_a.trim(), "{v}");
    assert!(v["attached_by"].is_string(), "{v}");
    let status = run(Command::new(ferry_bin())
        .args(["origin", "status", "--api"])
        .arg(&origin_api));
    assert!(status.contains(edge_a.trim()), "{status}");

    // The origin's metrics parse, and count the refusal.
    let text = run(cmd("curl").args([
        "-s",
        "--fail",
        &format!("http://{}/metrics", o.announced("metrics")),
    ]));
    promtool_check(&text);
    assert!(
        sample(&text, "ferry_origin_attach_refusals_total") >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"ferry_origin_volume_fenced_edges{volume="f"}"#),
        1.0
    );
    assert_eq!(
        sample(&text, r#"ferry_origin_volume_attached{volume="f"}"#),
        1.0
    );
    assert!(
        sample(
            &text,
            r#"ferry_origin_read_bytes_total{class="demand",volume="f"}"#
        ) > 0.0
    );
    b.stop_ok();
    o.stop_ok();
}

/// Volumes added to and removed from a running origin through its API,
/// kept across a restart in its state directory.
#[test]
fn an_origin_takes_volumes_at_run_time_and_keeps_them() {
    let dir = tempdir();
    let image = random_image(dir.path(), "late.img", SIZE);
    let state = dir.path().join("origin-state");
    let start = || {
        Ferry::spawn(
            [
                "origin".as_ref(),
                "--listen".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--state-dir".as_ref(),
                state.as_os_str(),
                "--no-tls".as_ref(),
            ],
            &["origin", "api"],
        )
    };
    let o = start();
    let sock = PathBuf::from(o.announced("api"));
    assert_eq!(
        api(&sock, "GET", "/v1/volumes", None, 200)["volumes"],
        serde_json::json!([])
    );
    let body = format!(r#"{{"name": "late", "source": "{}"}}"#, image.display());
    let v = api(&sock, "POST", "/v1/volumes", Some(&body), 201);
    assert_eq!(v["size"], SIZE, "{v}");
    let r = http_unix(&sock, "POST", "/v1/volumes", Some(&body), None);
    assert_eq!(r.status, 409, "{}", r.body);
    let r = http_unix(
        &sock,
        "POST",
        "/v1/volumes",
        Some(r#"{"name": "x", "source": "/nonexistent"}"#),
        None,
    );
    assert_eq!(r.status, 502, "{}", r.body);
    // An edge streams it; while attached it cannot be removed.
    let e = Ferry::spawn(
        [
            "edge".as_ref(),
            "--origin".as_ref(),
            o.announced("origin").as_ref(),
            "--volume".as_ref(),
            "late".as_ref(),
            "--cache-dir".as_ref(),
            dir.path().join("cache").as_os_str(),
            "--nbd".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--no-tls".as_ref(),
        ],
        &["nbd", "api"],
    );
    run(cmd("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &e.uri("late")])
        .arg(&image));
    let r = http_unix(&sock, "DELETE", "/v1/volumes/late", None, None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("detach"), "{}", r.body);
    // Removing it at the edge detaches it at the origin.
    ferry_cli(&e, &["volume", "rm", "late"]);
    assert!(wait_until(Duration::from_secs(10), || {
        api(&sock, "GET", "/v1/volumes/late", None, 200)
            .get("attached_by")
            .is_none()
    }));
    e.stop_ok();
    o.stop_ok();
    // Kept across a restart; then removed for good.
    let o = start();
    let sock = PathBuf::from(o.announced("api"));
    assert_eq!(
        api(&sock, "GET", "/v1/volumes/late", None, 200)["size"],
        SIZE
    );
    api(&sock, "DELETE", "/v1/volumes/late", None, 200);
    o.stop_ok();
    let o = start();
    let sock = PathBuf::from(o.announced("api"));
    assert_eq!(
        api(&sock, "GET", "/v1/volumes", None, 200)["volumes"],
        serde_json::json!([])
    );
    o.stop_ok();
}
