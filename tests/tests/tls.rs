//! TLS: nbds:// with libnbd and qemu's tls-creds-x509; `require` refuses
//! plaintext, `on` allows both.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;

use ferry_tests::{
    assert_files_equal, cmd, json, pattern_image, run, run_output, self_signed_cert, sparse_image,
    tempdir, Ferry, MIB,
};

fn tls_uri(ferry: &Ferry, name: &str, ca_dir: &Path) -> String {
    format!(
        "nbds://localhost:{}/{}?tls-certificates={}",
        ferry.port(),
        name,
        ca_dir.display()
    )
}

fn serve_tls(img: &Path, cert: &Path, key: &Path, mode: Option<&str>) -> Ferry {
    let mut args = vec![
        img.as_os_str().to_owned(),
        "--tls-cert".into(),
        cert.as_os_str().to_owned(),
        "--tls-key".into(),
        key.as_os_str().to_owned(),
    ];
    if let Some(m) = mode {
        args.push("--tls".into());
        args.push(m.into());
    }
    Ferry::start(&args)
}

#[test]
fn require_refuses_plaintext() {
    let dir = tempdir();
    let (cert, key, ca) = self_signed_cert(dir.path());
    let img = sparse_image(dir.path(), "secure.img", 4 * MIB);
    let ferry = serve_tls(&img, &cert, &key, None);

    let v = json(&run(cmd("nbdinfo")
        .arg("--json")
        .arg(tls_uri(&ferry, "secure", &ca))));
    assert_eq!(v["TLS"], true, "{v:#}");
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(4 * MIB),
        "{v:#}"
    );

    let plain = run_output(cmd("nbdinfo").arg("--json").arg(ferry.uri("secure")));
    assert!(
        !plain.status.success(),
        "plaintext connection accepted by a TLS-require server:\n{}",
        String::from_utf8_lossy(&plain.stdout)
    );
    let plain = run_output(cmd("nbdinfo").arg("--list").arg(ferry.uri("")));
    assert!(!plain.status.success(), "plaintext --list accepted");

    // A client that does not trust the certificate is refused.
    let other = tempdir();
    let (_, _, other_ca) = self_signed_cert(other.path());
    let untrusted = run_output(cmd("nbdinfo").arg(tls_uri(&ferry, "secure", &other_ca)));
    assert!(
        !untrusted.status.success(),
        "untrusted certificate accepted"
    );

    ferry.stop_ok();
}

#[test]
fn tls_on_allows_both() {
    let dir = tempdir();
    let (cert, key, ca) = self_signed_cert(dir.path());
    let img = sparse_image(dir.path(), "both.img", 2 * MIB);
    let ferry = serve_tls(&img, &cert, &key, Some("on"));

    let v = json(&run(cmd("nbdinfo")
        .arg("--json")
        .arg(tls_uri(&ferry, "both", &ca))));
    assert_eq!(v["TLS"], true, "{v:#}");
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(2 * MIB),
        "{v:#}"
    );
    let v = json(&run(cmd("nbdinfo").arg("--json").arg(ferry.uri("both"))));
    assert_eq!(v["TLS"], false, "{v:#}");
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(2 * MIB),
        "{v:#}"
    );
    ferry.stop_ok();
}

#[test]
fn qemu_over_tls() {
    let dir = tempdir();
    let (cert, key, ca) = self_signed_cert(dir.path());
    let src = pattern_image(dir.path(), "src.img", 8 * MIB, 42);
    let img = sparse_image(dir.path(), "q.img", 8 * MIB);
    let ferry = serve_tls(&img, &cert, &key, None);

    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        ca.display()
    );
    let nbd_opts = format!(
        "driver=nbd,host=localhost,port={},export=q,tls-creds=tls0",
        ferry.port()
    );
    let src_opts = format!(
        "driver=raw,file.driver=file,file.filename={}",
        src.display()
    );

    let info = run(cmd("qemu-img").args([
        "info",
        "--output=json",
        "--object",
        &object,
        "--image-opts",
        &nbd_opts,
    ]));
    assert_eq!(
        json(&info)["virtual-size"].as_u64(),
        Some(8 * MIB),
        "{info}"
    );

    run(cmd("qemu-img").args([
        "convert",
        "-n",
        "--object",
        &object,
        "--image-opts",
        "--target-image-opts",
        &src_opts,
        &nbd_opts,
    ]));
    let out = run(cmd("qemu-img").args([
        "compare",
        "--object",
        &object,
        "--image-opts",
        &src_opts,
        &nbd_opts,
    ]));
    assert!(out.contains("Images are identical"), "{out}");

    ferry.stop_ok();
    assert_files_equal(&src, &img);
}

/// Many requests in flight over TLS, both directions: TLS replies sit in
/// rustls' buffer until flushed, so a server that loses a flush under load
/// stalls here (nbdcopy would hang until the test times out).
#[test]
fn nbdcopy_both_ways_over_tls_with_deep_queues() {
    let dir = tempdir();
    let (cert, key, ca) = self_signed_cert(dir.path());
    let src = pattern_image(dir.path(), "src.img", 64 * MIB, 7);
    let img = sparse_image(dir.path(), "disk.img", 64 * MIB);
    let ferry = serve_tls(&img, &cert, &key, None);
    let uri = tls_uri(&ferry, "disk", &ca);
    let out = dir.path().join("out.img");
    run(cmd("timeout")
        .arg("120")
        .arg("nbdcopy")
        .args(["--connections=4", "--requests=64", "--flush"])
        .arg(&src)
        .arg(&uri));
    run(cmd("timeout")
        .arg("120")
        .arg("nbdcopy")
        .args(["--connections=4", "--requests=64"])
        .arg(&uri)
        .arg(&out));
    ferry.stop_ok();
    assert_files_equal(&src, &out);
    assert_files_equal(&src, &img);
}
