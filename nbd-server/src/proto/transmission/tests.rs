use blockcore::Capabilities;
use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::proto::consts::{REPLY_TYPE_ERROR, SIMPLE_REPLY_LEN, STRUCTURED_REPLY_HEADER_LEN};
use crate::proto::handshake::{transmission_flags, ExportInfo, Negotiated, BASE_ALLOCATION_ID};
use crate::proto::testutil::{device, export, ALL_CAPS};

const MAX: u32 = 64 * 1024;

fn header(command: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags: CommandFlags(flags),
        command,
        cookie: 0x0102_0304_0506_0708,
        offset,
        length,
    }
}

/// Test encoder: a request header plus its payload.
fn frame(h: &RequestHeader, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    h.encode(&mut b);
    b.extend_from_slice(payload);
    b.to_vec()
}

fn decode_all(dec: &mut RequestDecoder, buf: &mut BytesMut) -> Vec<Decoded> {
    let mut out = Vec::new();
    while let Some(d) = dec.decode(buf).unwrap() {
        out.push(d);
    }
    out
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

#[test]
fn header_layout_matches_the_spec() {
    let h = header(Command::Write, CommandFlags::FUA, 0x1122, 3);
    let f = frame(&h, b"abc");
    assert_eq!(&f[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&f[4..6], &[0, 1]); // flags
    assert_eq!(&f[6..8], &[0, 1]); // type
    assert_eq!(&f[8..16], &h.cookie.to_be_bytes());
    assert_eq!(&f[16..24], &0x1122u64.to_be_bytes());
    assert_eq!(&f[24..28], &3u32.to_be_bytes());
    assert_eq!(&f[28..], b"abc");
}

#[test]
fn decodes_every_command() {
    let mut dec = RequestDecoder::new(MAX);
    for code in 0..10u16 {
        let cmd = Command::from_code(code);
        assert_eq!(cmd.code(), code);
        let h = header(cmd, 0, 4096, if cmd == Command::Write { 5 } else { 512 });
        let payload: &[u8] = if cmd == Command::Write { b"hello" } else { b"" };
        let mut buf = BytesMut::from(&frame(&h, payload)[..]);
        let Some(Decoded::Request {
            header: got,
            payload: p,
        }) = dec.decode(&mut buf).unwrap()
        else {
            panic!("no request for {cmd:?}");
        };
        assert_eq!(got, h);
        assert_eq!(&p[..], payload);
        assert!(buf.is_empty());
    }
    assert_eq!(Command::from_code(8), Command::Unknown(8));
}

#[test]
fn read_length_is_not_a_payload() {
    // A read of 1 MiB has no payload: decoding must not wait for one.
    let mut dec = RequestDecoder::new(MAX);
    let h = header(Command::Read, 0, 0, 1 << 20);
    let mut buf = BytesMut::from(&frame(&h, &[])[..]);
    assert!(matches!(
        dec.decode(&mut buf).unwrap(),
        Some(Decoded::Request { .. })
    ));
}

#[test]
fn one_byte_at_a_time() {
    let reqs = [
        (header(Command::Write, 0, 0, 7), b"payload".to_vec()),
        (header(Command::Read, 0, 512, 4096), vec![]),
        (header(Command::Write, 1, 8, 0), vec![]),
        (header(Command::Flush, 0, 0, 0), vec![]),
    ];
    let stream: Vec<u8> = reqs.iter().flat_map(|(h, p)| frame(h, p)).collect();
    let mut dec = RequestDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for (i, &b) in stream.iter().enumerate() {
        buf.extend_from_slice(&[b]);
        let before = buf.len();
        if let Some(d) = dec.decode(&mut buf).unwrap() {
            got.push((i, d));
        }
        assert!(buf.len() <= before);
        // Never holds more than one request.
        assert!(buf.len() <= dec.max_frame_len());
    }
    assert!(buf.is_empty());
    assert_eq!(got.len(), reqs.len());
    for ((_, d), (h, p)) in got.iter().zip(&reqs) {
        let Decoded::Request {
            header: gh,
            payload: gp,
        } = d
        else {
            panic!()
        };
        assert_eq!(gh, h);
        assert_eq!(&gp[..], &p[..]);
    }
}

#[test]
fn every_split_point_decodes_the_same() {
    let stream: Vec<u8> = [
        frame(&header(Command::Write, 0, 0, 3), b"abc"),
        frame(&header(Command::Trim, 0, 0, 512), &[]),
    ]
    .concat();
    for i in 0..=stream.len() {
        let mut dec = RequestDecoder::new(MAX);
        let mut buf = BytesMut::from(&stream[..i]);
        let mut got = decode_all(&mut dec, &mut buf);
        buf.extend_from_slice(&stream[i..]);
        got.extend(decode_all(&mut dec, &mut buf));
        assert_eq!(got.len(), 2, "split at {i}");
        assert!(buf.is_empty());
    }
}

#[test]
fn bad_magic_is_fatal() {
    let mut dec = RequestDecoder::new(MAX);
    let mut f = frame(&header(Command::Read, 0, 0, 1), &[]);
    f[0] = 0;
    let mut buf = BytesMut::from(&f[..]);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(RequestError::BadMagic(0x0060_9513))
    ));
}

#[test]
fn partial_header_is_not_consumed() {
    let mut dec = RequestDecoder::new(MAX);
    let f = frame(&header(Command::Read, 0, 0, 1), &[]);
    let mut buf = BytesMut::from(&f[..27]);
    assert!(dec.decode(&mut buf).unwrap().is_none());
    assert_eq!(buf.len(), 27);
}

#[test]
fn oversized_write_is_skipped_without_buffering() {
    let mut dec = RequestDecoder::new(16);
    let big = header(Command::Write, 0, 0, 1000);
    let next = header(Command::Flush, 0, 0, 0);
    let mut buf = BytesMut::from(&frame(&big, &[])[..]);
    let Some(Decoded::Oversized { header: h }) = dec.decode(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(h, big);
    assert!(dec.is_skipping());
    // Feed the payload in 100-byte chunks: each is dropped at once.
    for _ in 0..9 {
        buf.extend_from_slice(&[0xAB; 100]);
        assert!(dec.decode(&mut buf).unwrap().is_none());
        assert!(buf.is_empty());
    }
    // The last payload chunk arrives together with the next request.
    buf.extend_from_slice(&[0xAB; 100]);
    buf.extend_from_slice(&frame(&next, &[]));
    let Some(Decoded::Request { header: h, .. }) = dec.decode(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(h, next);
    assert!(!dec.is_skipping());
    assert!(buf.is_empty());
}

#[test]
fn write_at_max_payload_is_accepted() {
    let mut dec = RequestDecoder::new(16);
    let h = header(Command::Write, 0, 0, 16);
    let mut buf = BytesMut::from(&frame(&h, &[7; 16])[..]);
    assert!(matches!(
        dec.decode(&mut buf).unwrap(),
        Some(Decoded::Request { payload, .. }) if payload.len() == 16
    ));
}

proptest! {
    #[test]
    fn roundtrip(
        flags in any::<u16>(),
        code in 0u16..12,
        cookie in any::<u64>(),
        offset in any::<u64>(),
        length in 0u32..2048,
        split in any::<prop::sample::Index>(),
    ) {
        let h = RequestHeader {
            flags: CommandFlags(flags),
            command: Command::from_code(code),
            cookie,
            offset,
            length,
        };
        let payload: Vec<u8> = if h.command == Command::Write {
            (0..length).map(|i| (i % 251) as u8).collect()
        } else {
            vec![]
        };
        let f = frame(&h, &payload);
        let at = split.index(f.len() + 1);
        let mut dec = RequestDecoder::new(1024);
        let mut buf = BytesMut::from(&f[..at]);
        let mut got = decode_all(&mut dec, &mut buf);
        buf.extend_from_slice(&f[at..]);
        got.extend(decode_all(&mut dec, &mut buf));
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got.len(), 1);
        match &got[0] {
            Decoded::Request { header, payload: p } => {
                prop_assert_eq!(*header, h);
                prop_assert_eq!(&p[..], &payload[..]);
            }
            Decoded::Oversized { header } => {
                prop_assert_eq!(*header, h);
                prop_assert!(h.command == Command::Write && h.length > 1024);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overconsume(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..20),
        magic_prefix in any::<bool>(),
    ) {
        let mut dec = RequestDecoder::new(64);
        let mut buf = BytesMut::new();
        let n = negotiated(ALL_CAPS, 1, true, true);
        for (i, mut chunk) in chunks.into_iter().enumerate() {
            if magic_prefix && i == 0 && chunk.len() >= 4 {
                chunk[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            buf.extend_from_slice(&chunk);
            loop {
                let before = buf.len();
                match dec.decode(&mut buf) {
                    Ok(Some(Decoded::Request { header, payload })) => {
                        prop_assert!(buf.len() < before);
                        if header.command == Command::Write {
                            prop_assert_eq!(payload.len(), header.length as usize);
                        } else {
                            prop_assert!(payload.is_empty());
                        }
                        let _ = validate(&header, &n);
                    }
                    Ok(Some(Decoded::Oversized { header })) => {
                        prop_assert!(header.length > 64);
                        let _ = validate(&header, &n);
                    }
                    Ok(None) => {
                        prop_assert!(buf.len() <= before);
                        break;
                    }
                    Err(_) => return Ok(()),
                }
                prop_assert!(buf.len() <= before);
            }
            prop_assert!(buf.len() <= dec.max_frame_len() || dec.is_skipping());
        }
    }

    #[test]
    fn validate_never_panics(
        flags in any::<u16>(),
        code in any::<u16>(),
        offset in any::<u64>(),
        length in any::<u32>(),
        min_shift in 0u32..13,
        structured in any::<bool>(),
        meta in any::<bool>(),
        ro in any::<bool>(),
    ) {
        let h = RequestHeader {
            flags: CommandFlags(flags),
            command: Command::from_code(code),
            cookie: 0,
            offset,
            length,
        };
        let caps = Capabilities { read_only: ro, ..ALL_CAPS };
        let n = negotiated(caps, 1 << min_shift, structured, meta);
        if validate(&h, &n).is_ok() && h.command != Command::Disc && h.command != Command::Flush {
            prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= n.export.device.size));
        }
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

const SIZE: u64 = 1 << 20;

fn negotiated(caps: Capabilities, min: u32, structured: bool, meta: bool) -> Negotiated {
    let info: ExportInfo = export("disk", device(SIZE, min, caps));
    let transmission_flags = transmission_flags(&info, structured);
    Negotiated {
        export: info,
        structured_replies: structured,
        base_allocation: (structured && meta).then_some(BASE_ALLOCATION_ID),
        transmission_flags,
    }
}

fn check(n: &Negotiated, cmd: Command, flags: u16, offset: u64, length: u32) -> Result<(), Errno> {
    validate(&header(cmd, flags, offset, length), n)
}

#[test]
fn valid_requests_pass() {
    let n = negotiated(ALL_CAPS, 1, true, true);
    for cmd in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
    ] {
        assert_eq!(check(&n, cmd, 0, 0, 4096), Ok(()), "{cmd:?}");
        assert_eq!(
            check(&n, cmd, CommandFlags::FUA, SIZE - 1, 1),
            Ok(()),
            "{cmd:?}"
        );
    }
    assert_eq!(check(&n, Command::Flush, 0, 0, 0), Ok(()));
    assert_eq!(check(&n, Command::Disc, 0xffff, 5, 5), Ok(()));
    assert_eq!(check(&n, Command::Read, CommandFlags::DF, 0, 1), Ok(()));
    assert_eq!(
        check(
            &n,
            Command::WriteZeroes,
            CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
            0,
            1
        ),
        Ok(())
    );
    assert_eq!(
        check(&n, Command::BlockStatus, CommandFlags::REQ_ONE, 0, 1),
        Ok(())
    );
    // Zero-length cache is a harmless no-op.
    assert_eq!(check(&n, Command::Cache, 0, 0, 0), Ok(()));
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let n = negotiated(ALL_CAPS, 1, true, true);
    assert_eq!(check(&n, Command::Unknown(8), 0, 0, 1), Err(Errno::Inval));
    assert_eq!(check(&n, Command::Read, 1 << 9, 0, 1), Err(Errno::Inval));
    assert_eq!(
        check(&n, Command::Write, CommandFlags::PAYLOAD_LEN, 0, 1),
        Err(Errno::Inval)
    );
    // Flags on the wrong command.
    for (cmd, flag) in [
        (Command::Write, CommandFlags::DF),
        (Command::Write, CommandFlags::NO_HOLE),
        (Command::Trim, CommandFlags::FAST_ZERO),
        (Command::Read, CommandFlags::REQ_ONE),
        (Command::BlockStatus, CommandFlags::DF),
        (Command::Cache, CommandFlags::NO_HOLE),
    ] {
        assert_eq!(
            check(&n, cmd, flag, 0, 1),
            Err(Errno::Inval),
            "{cmd:?} {flag}"
        );
    }
}

#[test]
fn flags_depend_on_negotiation() {
    // DF needs structured replies.
    let n = negotiated(ALL_CAPS, 1, false, false);
    assert_eq!(
        check(&n, Command::Read, CommandFlags::DF, 0, 1),
        Err(Errno::Inval)
    );
    // FUA needs SEND_FUA.
    let nofua = Capabilities {
        flush: false,
        fua: false,
        ..ALL_CAPS
    };
    let n = negotiated(nofua, 1, false, false);
    assert_eq!(
        check(&n, Command::Write, CommandFlags::FUA, 0, 1),
        Err(Errno::Inval)
    );
    // Flush needs SEND_FLUSH.
    assert_eq!(check(&n, Command::Flush, 0, 0, 0), Err(Errno::Inval));
    // Trim needs SEND_TRIM.
    let notrim = Capabilities {
        trim: false,
        ..ALL_CAPS
    };
    let n = negotiated(notrim, 1, false, false);
    assert_eq!(check(&n, Command::Trim, 0, 0, 1), Err(Errno::Inval));
    // FAST_ZERO needs SEND_FAST_ZERO.
    let mut n = negotiated(ALL_CAPS, 1, false, false);
    n.transmission_flags &= !crate::proto::consts::FLAG_SEND_FAST_ZERO;
    assert_eq!(
        check(&n, Command::WriteZeroes, CommandFlags::FAST_ZERO, 0, 1),
        Err(Errno::Inval)
    );
}

#[test]
fn block_status_needs_a_meta_context() {
    let n = negotiated(ALL_CAPS, 1, true, false);
    assert_eq!(check(&n, Command::BlockStatus, 0, 0, 1), Err(Errno::Inval));
    let n = negotiated(ALL_CAPS, 1, false, false);
    assert_eq!(check(&n, Command::BlockStatus, 0, 0, 1), Err(Errno::Inval));
}

#[test]
fn read_only_refuses_writes_with_eperm() {
    let ro = Capabilities {
        read_only: true,
        ..ALL_CAPS
    };
    let n = negotiated(ro, 1, false, false);
    for cmd in [Command::Write, Command::Trim, Command::WriteZeroes] {
        assert_eq!(check(&n, cmd, 0, 0, 1), Err(Errno::Perm), "{cmd:?}");
    }
    assert_eq!(check(&n, Command::Read, 0, 0, 1), Ok(()));
    assert_eq!(check(&n, Command::Flush, 0, 0, 0), Ok(()));
}

#[test]
fn ranges_are_checked() {
    let n = negotiated(ALL_CAPS, 1, true, true);
    for cmd in [
        Command::Read,
        Command::Trim,
        Command::Cache,
        Command::BlockStatus,
    ] {
        assert_eq!(check(&n, cmd, 0, SIZE, 1), Err(Errno::Inval), "{cmd:?}");
        assert_eq!(check(&n, cmd, 0, u64::MAX, 2), Err(Errno::Inval), "{cmd:?}");
    }
    for cmd in [Command::Write, Command::WriteZeroes] {
        assert_eq!(check(&n, cmd, 0, SIZE - 1, 2), Err(Errno::NoSpc), "{cmd:?}");
        assert_eq!(check(&n, cmd, 0, u64::MAX, 1), Err(Errno::NoSpc), "{cmd:?}");
    }
    // Zero lengths.
    for cmd in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::WriteZeroes,
        Command::BlockStatus,
    ] {
        assert_eq!(check(&n, cmd, 0, 0, 0), Err(Errno::Inval), "{cmd:?}");
    }
    // Flush fields are reserved.
    assert_eq!(check(&n, Command::Flush, 0, 1, 0), Err(Errno::Inval));
    assert_eq!(check(&n, Command::Flush, 0, 0, 1), Err(Errno::Inval));
}

#[test]
fn alignment_and_maximum_are_enforced() {
    let n = negotiated(ALL_CAPS, 512, false, false);
    assert_eq!(check(&n, Command::Read, 0, 512, 512), Ok(()));
    assert_eq!(check(&n, Command::Read, 0, 1, 512), Err(Errno::Inval));
    assert_eq!(check(&n, Command::Write, 0, 0, 100), Err(Errno::Inval));
    assert_eq!(check(&n, Command::Trim, 0, 512, 1000), Err(Errno::Inval));

    let mut n = negotiated(ALL_CAPS, 1, false, false);
    n.export.device.block_sizes.max = 4096;
    n.export.device.size = 1 << 30;
    assert_eq!(check(&n, Command::Read, 0, 0, 4097), Err(Errno::Overflow));
    assert_eq!(check(&n, Command::Write, 0, 0, 4097), Err(Errno::Overflow));
    // Commands without a payload may exceed the maximum.
    assert_eq!(check(&n, Command::Trim, 0, 0, 1 << 20), Ok(()));
    assert_eq!(check(&n, Command::WriteZeroes, 0, 0, 1 << 20), Ok(()));
}

// ---------------------------------------------------------------------------
// Reply encoding
// ---------------------------------------------------------------------------

const COOKIE: u64 = 0xdead_beef_0000_0001;

fn structured(out: &[u8]) -> (u16, u16, u64, u32) {
    assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
    (
        u16::from_be_bytes(out[4..6].try_into().unwrap()),
        u16::from_be_bytes(out[6..8].try_into().unwrap()),
        u64::from_be_bytes(out[8..16].try_into().unwrap()),
        u32::from_be_bytes(out[16..20].try_into().unwrap()),
    )
}

#[test]
fn simple_reply_layout() {
    let mut out = BytesMut::new();
    encode_simple_reply(&mut out, COOKIE, None);
    encode_simple_reply(&mut out, COOKIE, Some(Errno::NoSpc));
    assert_eq!(out.len(), 2 * SIMPLE_REPLY_LEN);
    assert_eq!(&out[..4], &[0x67, 0x44, 0x66, 0x98]);
    assert_eq!(&out[4..8], &[0, 0, 0, 0]);
    assert_eq!(&out[8..16], &COOKIE.to_be_bytes());
    assert_eq!(&out[20..24], &28u32.to_be_bytes());
}

#[test]
fn offset_data_and_hole_layout() {
    let mut out = BytesMut::new();
    encode_offset_data_header(&mut out, COOKIE, 4096, 512, false);
    assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_LEN + 8);
    assert_eq!(structured(&out), (0, REPLY_TYPE_OFFSET_DATA, COOKIE, 520));
    assert_eq!(&out[20..28], &4096u64.to_be_bytes());

    let mut out = BytesMut::new();
    encode_offset_hole(&mut out, COOKIE, 8192, 1024, true);
    assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_LEN + 12);
    assert_eq!(structured(&out), (1, REPLY_TYPE_OFFSET_HOLE, COOKIE, 12));
    assert_eq!(&out[20..28], &8192u64.to_be_bytes());
    assert_eq!(&out[28..32], &1024u32.to_be_bytes());
}

#[test]
fn none_layout() {
    let mut out = BytesMut::new();
    encode_structured_none(&mut out, COOKIE);
    assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_LEN);
    assert_eq!(structured(&out), (1, REPLY_TYPE_NONE, COOKIE, 0));
}

#[test]
fn error_layout_and_truncation() {
    let mut out = BytesMut::new();
    encode_structured_error(&mut out, COOKIE, Errno::Io, "disk on fire", true);
    assert_eq!(structured(&out), (1, REPLY_TYPE_ERROR, COOKIE, 6 + 12));
    assert_eq!(&out[20..24], &5u32.to_be_bytes());
    assert_eq!(&out[24..26], &12u16.to_be_bytes());
    assert_eq!(&out[26..], b"disk on fire");

    let long = "é".repeat(3000); // 6000 bytes
    let mut out = BytesMut::new();
    encode_structured_error(&mut out, COOKIE, Errno::Inval, &long, false);
    let (flags, _, _, len) = structured(&out);
    assert_eq!(flags, 0);
    let msg_len = usize::from(u16::from_be_bytes(out[24..26].try_into().unwrap()));
    assert_eq!(msg_len, 4096);
    assert_eq!(len as usize, 6 + msg_len);
    assert_eq!(out.len(), 20 + 6 + msg_len);
    assert!(std::str::from_utf8(&out[26..]).is_ok());
}

#[test]
fn block_status_layout() {
    let mut out = BytesMut::new();
    encode_block_status(&mut out, COOKIE, 7, &[(4096, 0), (512, 3)], true);
    assert_eq!(
        structured(&out),
        (1, REPLY_TYPE_BLOCK_STATUS, COOKIE, 4 + 16)
    );
    assert_eq!(
        &out[20..],
        &[0, 0, 0, 7, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3]
    );
}
