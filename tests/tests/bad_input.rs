//! Protocol abuse over raw TCP with a minimal hand-written NBD client: the
//! server must drop the offending connection cleanly and keep serving others.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use ferry_tests::nbd::{self, Client};
use ferry_tests::{assert_range_filled, sparse_image, tempdir, write_at, Ferry, MIB};

/// A fresh well-behaved client still works: READ returns the right data.
fn assert_serving(ferry: &mut Ferry, expect: &[u8]) {
    assert!(ferry.is_running(), "ferry died:\n{}", ferry.stderr());
    let mut c = Client::handshake(ferry.connect(), "").expect("handshake after abuse");
    let r = c.read(0, u32::try_from(expect.len()).unwrap()).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data == expect, "READ after abuse returned wrong data");
    c.disconnect();
}

fn setup(size: u64) -> (ferry_tests::TempDir, std::path::PathBuf, Ferry, Vec<u8>) {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "raw.img", size);
    let head = ferry_tests::pattern_bytes(4096, 77);
    write_at(&img, 0, &head);
    let ferry = Ferry::start([&img]);
    (dir, img, ferry, head)
}

#[test]
fn handshake_works_and_reports_size() {
    let (_d, _img, ferry, head) = setup(8 * MIB);
    let mut c = Client::handshake(ferry.connect(), "").unwrap();
    assert_eq!(c.size, 8 * MIB);
    assert!(c.transmission_flags & 1 != 0, "NBD_FLAG_HAS_FLAGS not set");
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data == head);
    let r = c.write(4096, &[0x42; 512]).unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(c.flush().unwrap().error, 0);
    let r = c.read(4096, 512).unwrap();
    assert!(r.data.iter().all(|&b| b == 0x42));
    c.disconnect();
    ferry.stop_ok();
}

#[test]
fn garbage_client_flags() {
    let (_d, _img, mut ferry, head) = setup(8 * MIB);
    let mut s = ferry.connect();
    nbd::read_greeting(&mut s).unwrap();
    // An HTTP request where the 4-byte client flags belong.
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let (closed, _) = nbd::wait_closed(&mut s);
    assert!(closed, "server kept a garbage connection open");
    assert_serving(&mut ferry, &head);
    ferry.stop_ok();
}

#[test]
fn truncated_handshake_then_disconnect() {
    let (_d, _img, mut ferry, head) = setup(8 * MIB);
    for cut in [0usize, 2, 4 + 8 + 4 + 2] {
        let mut s = ferry.connect();
        nbd::read_greeting(&mut s).unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&3u32.to_be_bytes());
        msg.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
        msg.extend_from_slice(&100u32.to_be_bytes());
        s.write_all(&msg[..cut]).unwrap();
        s.shutdown(Shutdown::Both).unwrap();
    }
    // Connect and vanish before even reading the greeting.
    drop(ferry.connect());
    assert_serving(&mut ferry, &head);
    ferry.stop_ok();
}

#[test]
fn bad_request_magic_disconnects() {
    let (_d, _img, mut ferry, head) = setup(8 * MIB);
    let mut c = Client::handshake(ferry.connect(), "").unwrap();
    let mut req = nbd::request(0, nbd::CMD_READ, 1, 0, 512);
    req[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.stream.write_all(&req).unwrap();
    let (closed, got) = nbd::wait_closed(&mut c.stream);
    assert!(
        closed,
        "server did not disconnect after a bad request magic"
    );
    assert!(
        got.len() < 16 + 512,
        "server answered a request with bad magic with data ({} bytes)",
        got.len()
    );
    assert_serving(&mut ferry, &head);
    ferry.stop_ok();
}

#[test]
fn read_past_end_is_einval_and_connection_survives() {
    let (_d, _img, ferry, head) = setup(8 * MIB);
    let mut c = Client::handshake(ferry.connect(), "").unwrap();
    let r = c.read(8 * MIB - 512, 1024).unwrap();
    assert_eq!(r.error, nbd::EINVAL, "READ past the end");
    let r = c.read(8 * MIB, 512).unwrap();
    assert_eq!(r.error, nbd::EINVAL, "READ at the end");
    let r = c.read(u64::MAX - 100, 512).unwrap();
    assert_eq!(r.error, nbd::EINVAL, "READ with offset overflow");
    // Same connection still serves.
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data == head);
    let r = c.write(8 * MIB - 512, &[1; 1024]).unwrap();
    assert!(
        r.error == nbd::ENOSPC || r.error == nbd::EINVAL,
        "WRITE past the end: error {}",
        r.error
    );
    let r = c.read(8 * MIB - 512, 512).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0), "partial write past the end");
    c.disconnect();
    ferry.stop_ok();
}

#[test]
fn oversized_write_is_refused_and_nothing_written() {
    let (_d, img, mut ferry, head) = setup(64 * MIB);
    let mut c = Client::handshake(ferry.connect(), "").unwrap();
    let len: u32 = 40 * 1024 * 1024;
    let cookie = c.send(0, nbd::CMD_WRITE, MIB, len, &[]).unwrap();
    // Stream the payload from another thread; the server may hang up midway.
    let mut w = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0xee_u8; 1 << 20];
        for _ in 0..40 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    match c.reply(0) {
        Ok(r) => {
            assert_eq!(r.cookie, cookie);
            assert!(
                r.error == nbd::EOVERFLOW,
                "oversized WRITE got error {} (want EOVERFLOW)",
                r.error
            );
        }
        Err(e) => eprintln!("server disconnected on oversized write: {e}"),
    }
    let _ = c.stream.shutdown(Shutdown::Both);
    writer.join().unwrap();
    assert_serving(&mut ferry, &head);
    ferry.stop_ok();
    assert_range_filled(&img, 4096, 64 * MIB - 4096, 0);
}

#[test]
fn client_vanishes_mid_write_payload() {
    let (_d, img, mut ferry, head) = setup(8 * MIB);
    let mut c = Client::handshake(ferry.connect(), "").unwrap();
    // 1 MiB WRITE at 2 MiB, but only half of the payload arrives.
    c.send(0, nbd::CMD_WRITE, 2 * MIB, 1 << 20, &vec![0xcc; 512 * 1024])
        .unwrap();
    c.stream.shutdown(Shutdown::Both).unwrap();
    drop(c);

    // Another client sees nothing of the half-sent write.
    std::thread::sleep(Duration::from_millis(100));
    let mut c2 = Client::handshake(ferry.connect(), "").unwrap();
    let r = c2.read(2 * MIB, 1 << 20).unwrap();
    assert_eq!(r.error, 0);
    assert!(
        r.data.iter().all(|&b| b == 0),
        "a partial WRITE payload was applied"
    );
    c2.disconnect();
    assert_serving(&mut ferry, &head);
    ferry.stop_ok();
    assert_range_filled(&img, 2 * MIB, MIB, 0);
}
