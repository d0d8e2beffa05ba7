//! Fuzzes ferry's NBD client codec with hostile server bytes: the reply
//! decoder (`client::ClientTransmission::decode`) and, when byte 0 bit 1 is
//! set, the client handshake (`client::ClientHandshake::advance`).
//!
//! Input layout:
//! - byte 0: bit 0 structured replies negotiated, bit 1 fuzz the handshake
//!   instead, bits 2-7 the size of the pieces the input is fed in (+1);
//! - byte 1: number of requests in flight (0-7), then per request: command
//!   u8 (mod 8), length u16 (big-endian);
//! - the rest: what the server sends.
//!
//! Invariants checked: nothing panics; the decoder never asks to buffer
//! more than one maximum chunk; a successful read yields exactly its
//! length, a block status at least one extent; a completed request is no
//! longer in flight; after a protocol error nothing more is decoded.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_server::client::{
    ClientHandshake, ClientOptions, ClientStep, ClientTransmission, Outcome, Progress, Request,
};
use nbd_server::proto::{Command, CommandFlags};

fn handshake(piece: usize, wire: &[u8]) {
    let mut hs = ClientHandshake::new(ClientOptions::new("fuzz")).expect("short name");
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in wire.chunks(piece) {
        input.extend_from_slice(chunk);
        match hs.advance(&mut input, &mut out) {
            Ok(ClientStep::NeedInput) => {}
            Ok(ClientStep::Done(_)) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let piece = usize::from(data[0] >> 2) + 1;
    if data[0] & 2 != 0 {
        handshake(piece, &data[1..]);
        return;
    }
    let structured = data[0] & 1 != 0;
    let mut t = ClientTransmission::new(structured, Some(1));
    let mut rest = &data[2..];
    let mut out = BytesMut::new();
    let mut lengths = std::collections::HashMap::new();
    for _ in 0..(data[1] % 8) {
        let [c, hi, lo, tail @ ..] = rest else { return };
        rest = tail;
        let command = Command::from_code(u16::from(*c % 8));
        let length = u32::from(u16::from_be_bytes([*hi, *lo]));
        let cookie = t.start(
            Request {
                command,
                flags: CommandFlags::default(),
                offset: 4096,
                length,
            },
            &mut out,
        );
        // NBD_CMD_DISC has no reply: the client does not track it.
        if command != Command::Disc {
            lengths.insert(cookie, length);
        }
    }
    let mut input = BytesMut::new();
    for chunk in rest.chunks(piece) {
        input.extend_from_slice(chunk);
        loop {
            match t.decode(&mut input) {
                Ok(Progress::NeedInput(n)) => {
                    assert!(n <= 20 + 16 * 1024 * 1024 + 8, "asked for {n} bytes");
                    break;
                }
                Ok(Progress::Chunk) => {}
                Ok(Progress::Complete(c)) => {
                    let len = lengths.remove(&c.cookie).expect("completed twice");
                    match c.result {
                        Ok(Outcome::Data(d)) => assert_eq!(d.len() as u64, u64::from(len)),
                        Ok(Outcome::Extents(e)) => assert!(!e.is_empty()),
                        Ok(Outcome::Done) | Err(_) => {}
                    }
                    assert_eq!(t.in_flight(), lengths.len());
                }
                Err(_) => return,
            }
        }
    }
});
