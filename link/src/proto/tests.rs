//! Codec tests: round trips, compression, truncation, malformed input, zip
//! bombs, auth. Scheduler tests live in `sched.rs`.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use blockcore::ExtentKind;

fn raw() -> Encoder {
    Encoder::new(CompressOptions::disabled())
}

fn encode_with(enc: &mut Encoder, id: u64, class: Class, msg: &Message) -> BytesMut {
    let mut out = BytesMut::new();
    let h = enc.encode(id, class, msg, &mut out).unwrap();
    assert_eq!(h.wire_len, out.len());
    out
}

fn decode_one(buf: &mut BytesMut) -> (FrameHeader, Message) {
    Decoder::new().decode(buf).unwrap().expect("a whole frame")
}

/// Deterministic bytes that zstd cannot shrink.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    testkit::pattern(seed, len)
}

/// Text-like bytes that zstd shrinks a lot.
fn text(len: usize) -> Vec<u8> {
    b"ferry block storage edge origin link "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// One message of every kind.
fn samples() -> Vec<Message> {
    vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Edge,
            nonce: [7; 32],
        },
        Message::Auth { proof: [9; 32] },
        Message::Attach {
            volume: "vm-disk-α".into(),
            edge_id: "edge-1".into(),
            resume_seq: 17,
        },
        Message::Attached {
            resume_part: 3,
            size: 1 << 40,
            chunk_size: 65536,
            group_size: 16,
            cache_key: [3; 32],
            dedup_key: [4; 32],
            volume_epoch: 2,
            next_seq: 18,
            local_writes: true,
        },
        Message::Detach,
        Message::Detached,
        Message::Release {
            disposition: Disposition::CutOver,
        },
        Message::Read {
            offset: 4096,
            len: 1 << 20,
            want_signatures: true,
        },
        Message::ReadData {
            as_of: 0,
            offset: 8192,
            data: Bytes::from(text(20_000)),
        },
        Message::ReadSignatures {
            offset: 0,
            chunk_size: 65536,
            sigs: vec![[1; 32], [2; 32]],
        },
        Message::Prefetch {
            ranges: vec![(0, 4096), (1 << 30, 1 << 20)],
        },
        Message::Push {
            as_of: 0,
            offset: 65536,
            data: Bytes::from(noise(5000, 1)),
        },
        Message::PrefetchDone,
        Message::Extents {
            offset: 1 << 20,
            len: 1 << 30,
        },
        Message::ExtentMap {
            offset: 1 << 20,
            extents: vec![
                (4096, 0),
                (1 << 20, EXTENT_HOLE | EXTENT_ZERO),
                (512, EXTENT_ZERO),
            ],
        },
        Message::Sign {
            offset: 1 << 20,
            len: 1 << 20,
            block: 4096,
        },
        Message::Profile {
            data: Bytes::from_static(b"FPRF\x01 a profile"),
        },
        Message::ProfileStored,
        Message::Plan { budget: 256 << 20 },
        Message::WriteBatch {
            seq: 5,
            part: 0,
            last: true,
            entries: vec![
                WriteEntry::Data {
                    offset: 512,
                    data: Bytes::from(text(9000)),
                },
                WriteEntry::Zero {
                    offset: 1 << 20,
                    len: 1 << 21,
                },
            ],
        },
        Message::BatchAck { seq: 5 },
        Message::Credit { bytes: 8 << 20 },
        Message::Heartbeat { nanos: 123 },
        Message::HeartbeatAck { nanos: 123 },
        Message::Delivered {
            bytes: 1 << 40,
            nanos: 987_654_321,
        },
        Message::Error {
            code: ErrorCode::NoSuchVolume,
            message: "no volume vm-disk-β".into(),
        },
    ]
}

#[test]
fn samples_cover_every_kind() {
    let kinds: Vec<Kind> = samples().iter().map(Message::kind).collect();
    assert_eq!(kinds, Kind::ALL);
}

#[test]
fn codes_round_trip() {
    for k in Kind::ALL {
        assert_eq!(Kind::from_code(k.code()), Some(k));
    }
    let known = (0..=255u8).filter_map(Kind::from_code).count();
    assert_eq!(known, Kind::ALL.len());
    assert_eq!(Kind::from_code(0), None);
    for code in 0..=20u16 {
        assert_eq!(ErrorCode::from_code(code).code(), code);
    }
    assert_eq!(ErrorCode::from_code(5), ErrorCode::Protocol);
    assert_eq!(ErrorCode::from_code(10), ErrorCode::Fenced);
    assert_eq!(ErrorCode::from_code(11), ErrorCode::Migrated);
    // Every code up to the newest has its own variant; past it, Unknown.
    for code in 1..=11u16 {
        assert!(!matches!(ErrorCode::from_code(code), ErrorCode::Unknown(_)));
    }
    assert_eq!(ErrorCode::from_code(12), ErrorCode::Unknown(12));
    for d in [Disposition::CutOver, Disposition::Home] {
        assert_eq!(Disposition::from_code(d.code()), Some(d));
    }
    assert_eq!(
        (0..=255u8).filter_map(Disposition::from_code).count(),
        2,
        "codes 1 and 2 only"
    );
    // The flags are NBD's base:allocation bits.
    assert_eq!((EXTENT_HOLE, EXTENT_ZERO), (1, 2));
    for kind in [ExtentKind::Data, ExtentKind::Zero, ExtentKind::Hole] {
        assert_eq!(extent_kind(extent_flags(kind)), kind);
    }
    assert_eq!(extent_flags(ExtentKind::Hole), 3);
    // A hole not known to read as zero has to be read.
    assert_eq!(extent_kind(EXTENT_HOLE), ExtentKind::Data);
    for r in [Role::Edge, Role::Origin] {
        assert_eq!(Role::from_code(r.code()), Some(r));
    }
    for c in [Class::Demand, Class::Background] {
        assert_eq!(Class::from_code(c.code()), Some(c));
    }
}

#[test]
fn every_kind_round_trips_raw_and_compressed() {
    let mut enc_raw = raw();
    let mut enc_z = Encoder::default();
    for (i, msg) in samples().into_iter().enumerate() {
        for enc in [&mut enc_raw, &mut enc_z] {
            let id = i as u64 * 1000;
            let mut buf = encode_with(enc, id, Class::Background, &msg);
            let wire_len = buf.len();
            let (h, got) = decode_one(&mut buf);
            assert!(buf.is_empty());
            assert_eq!(got, msg);
            assert_eq!(
                (h.kind, h.class, h.id, h.wire_len),
                (msg.kind(), Class::Background, id, wire_len)
            );
        }
    }
}

#[test]
fn raw_frame_layout() {
    let mut buf = encode_with(
        &mut raw(),
        0x0102_0304_0506_0708,
        Class::Background,
        &Message::Credit { bytes: 0xaabb },
    );
    assert_eq!(
        &buf[..],
        &[
            0, 0, 0, 20, // len: 12 + 8
            0x30, 0, 1, 0, // kind Credit, flags, class background, reserved
            1, 2, 3, 4, 5, 6, 7, 8, // id
            0, 0, 0, 0, 0, 0, 0xaa, 0xbb, // bytes
        ]
    );
    assert_eq!(decode_one(&mut buf).1, Message::Credit { bytes: 0xaabb });
}

#[test]
fn compressible_data_is_compressed() {
    let msg = Message::ReadData {
        as_of: 0,
        offset: 0,
        data: Bytes::from(text(1 << 20)),
    };
    let mut buf = encode_with(&mut Encoder::default(), 1, Class::Demand, &msg);
    assert!(buf.len() < 20_000, "compressed to {}", buf.len());
    assert_eq!(buf[5], FLAG_COMPRESSED);
    let (h, got) = decode_one(&mut buf);
    assert!(h.compressed);
    assert_eq!(got, msg);
}

#[test]
fn compression_can_be_disabled() {
    let msg = Message::Push {
        as_of: 0,
        offset: 0,
        data: Bytes::from(vec![0; 1 << 16]),
    };
    let buf = encode_with(&mut raw(), 1, Class::Demand, &msg);
    assert_eq!(buf[5], 0);
    assert_eq!(buf.len(), HEADER_LEN + msg.payload_len());
}

#[test]
fn incompressible_data_goes_raw() {
    let msg = Message::Push {
        as_of: 0,
        offset: 0,
        data: Bytes::from(noise(1 << 20, 42)),
    };
    let mut buf = encode_with(&mut Encoder::default(), 1, Class::Demand, &msg);
    assert_eq!(buf[5], 0);
    assert_eq!(decode_one(&mut buf).1, msg);
}

#[test]
fn incompressible_sample_skips_compression() {
    // Only the first 4 KiB is noise: the probe says no, so the compressible
    // rest is never tried.
    let mut data = noise(4096, 3);
    data.extend(text(1 << 20));
    let msg = Message::ReadData {
        as_of: 0,
        offset: 0,
        data: Bytes::from(data),
    };
    let buf = encode_with(&mut Encoder::default(), 1, Class::Demand, &msg);
    assert_eq!(buf[5], 0);
    // Without the probe it would have been compressed.
    let mut enc = Encoder::new(CompressOptions {
        sample_len: usize::MAX,
        ..CompressOptions::default()
    });
    assert_eq!(
        encode_with(&mut enc, 1, Class::Demand, &msg)[5],
        FLAG_COMPRESSED
    );
}

#[test]
fn small_and_control_payloads_go_raw() {
    let mut enc = Encoder::default();
    let tiny = Message::Push {
        as_of: 0,
        offset: 0,
        data: Bytes::from(vec![0; 100]),
    };
    assert_eq!(encode_with(&mut enc, 1, Class::Demand, &tiny)[5], 0);
    let err = Message::Error {
        code: ErrorCode::Io,
        message: "x".repeat(4000),
    };
    assert_eq!(encode_with(&mut enc, 1, Class::Demand, &err)[5], 0);
}

#[test]
fn every_truncation_is_incomplete() {
    let mut enc = Encoder::default();
    let mut dec = Decoder::new();
    for msg in samples() {
        let full = encode_with(&mut enc, 77, Class::Demand, &msg);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(
                dec.decode(&mut buf),
                Ok(None),
                "{:?} cut at {cut}",
                msg.kind()
            );
            assert_eq!(&buf[..], &full[..cut]);
        }
    }
}

#[test]
fn byte_at_a_time_stream_decodes_every_frame() {
    let mut enc = Encoder::default();
    let mut stream = BytesMut::new();
    for (i, msg) in samples().iter().enumerate() {
        enc.encode(i as u64, Class::Demand, msg, &mut stream)
            .unwrap();
    }
    let mut dec = Decoder::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &b in &stream {
        buf.put_u8(b);
        while let Some((_, m)) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(got, samples());
}

#[test]
fn oversize_length_is_rejected_from_four_bytes() {
    let mut dec = Decoder::new();
    let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
    assert!(
        matches!(dec.decode(&mut buf), Err(ProtoError::FrameTooLarge { len, .. }) if len == u64::from(u32::MAX))
    );
    // Nothing was reserved for it.
    assert!(buf.capacity() < 1024);

    let max = u32::try_from(12 + MAX_PAYLOAD_LEN).unwrap();
    let mut buf = BytesMut::from(&(max + 1).to_be_bytes()[..]);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let mut buf = BytesMut::from(&max.to_be_bytes()[..]);
    assert_eq!(dec.decode(&mut buf), Ok(None));

    // A lower configured limit.
    let mut small = Decoder::with_max_payload(4096);
    let frame = encode_with(
        &mut raw(),
        1,
        Class::Demand,
        &Message::ReadData {
            as_of: 0,
            offset: 0,
            data: Bytes::from(vec![0; 4096]),
        },
    );
    let mut buf = BytesMut::from(&frame[..4]);
    assert!(matches!(
        small.decode(&mut buf),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let mut buf = BytesMut::from(&[0, 0, 0, 11][..]);
    assert_eq!(
        small.decode(&mut buf),
        Err(ProtoError::FrameTooShort { len: 11 })
    );
}

#[test]
fn encoder_refuses_what_the_decoder_would() {
    let mut enc = Encoder::default();
    let mut out = BytesMut::from(&b"keep"[..]);
    let cases = [
        Message::Attach {
            volume: "v".repeat(MAX_STRING_LEN + 1),
            edge_id: String::new(),
            resume_seq: 0,
        },
        Message::Read {
            offset: u64::MAX,
            len: 1,
            want_signatures: false,
        },
        Message::ReadData {
            as_of: 0,
            offset: 0,
            data: Bytes::from(vec![0; MAX_DATA_LEN + 1]),
        },
        Message::Prefetch {
            ranges: vec![(0, 1); MAX_PREFETCH_RANGES + 1],
        },
        Message::Extents { offset: 0, len: 0 },
        Message::Sign {
            offset: 0,
            len: 0,
            block: 4096,
        },
        Message::Sign {
            offset: 0,
            len: u32::try_from(MAX_DATA_LEN).unwrap() + 1,
            block: 4096,
        },
        Message::Sign {
            offset: 0,
            len: 4096,
            block: 511,
        },
        Message::Sign {
            offset: u64::MAX - 10,
            len: 4096,
            block: 4096,
        },
        Message::Extents {
            offset: u64::MAX,
            len: 1,
        },
        Message::ExtentMap {
            offset: 0,
            extents: Vec::new(),
        },
        Message::ExtentMap {
            offset: 0,
            extents: vec![(1, 0); MAX_EXTENTS + 1],
        },
        Message::ExtentMap {
            offset: 0,
            extents: vec![(4096, 0), (0, EXTENT_HOLE)],
        },
        Message::ExtentMap {
            offset: 0,
            extents: vec![(4096, 4)],
        },
        Message::ExtentMap {
            offset: 1,
            extents: vec![(u64::MAX, 0)],
        },
        Message::ExtentMap {
            offset: 0,
            extents: vec![(u64::MAX, 0), (1, 0)],
        },
        Message::WriteBatch {
            seq: 0,
            part: 0,
            last: true,
            entries: vec![WriteEntry::Zero {
                offset: 1,
                len: u64::MAX,
            }],
        },
    ];
    for msg in cases {
        assert!(
            enc.encode(1, Class::Demand, &msg, &mut out).is_err(),
            "{msg:?}"
        );
        assert_eq!(&out[..], b"keep");
    }
    // Two full data entries: each within limits, together over a frame.
    let two = Message::WriteBatch {
        seq: 0,
        part: 0,
        last: true,
        entries: vec![
            WriteEntry::Data {
                offset: 0,
                data: Bytes::from(vec![0; MAX_DATA_LEN]),
            };
            2
        ],
    };
    assert!(matches!(
        enc.encode(1, Class::Demand, &two, &mut out),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert_eq!(&out[..], b"keep");
}

/// A frame header by hand.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(u32::try_from(12 + payload.len()).unwrap());
    b.put_u8(kind);
    b.put_u8(flags);
    b.put_u8(0);
    b.put_u8(0);
    b.put_u64(1);
    b.put_slice(payload);
    b
}

#[test]
fn malformed_headers_are_named() {
    let mut dec = Decoder::new();
    let mut check = |mut b: BytesMut, want: ProtoError| {
        // Header errors come without waiting for the payload.
        b.truncate(HEADER_LEN);
        assert_eq!(dec.decode(&mut b), Err(want));
    };
    check(frame(0, 0, &[0; 8]), ProtoError::UnknownKind(0));
    check(frame(0x7f, 0, &[0; 8]), ProtoError::UnknownKind(0x7f));
    check(frame(0x30, 2, &[0; 8]), ProtoError::BadFlags(2));
    check(
        frame(0x30, 1, &[0; 8]),
        ProtoError::CompressionNotAllowed { kind: Kind::Credit },
    );
    let mut b = frame(0x30, 0, &[0; 8]);
    b[6] = 2;
    check(b, ProtoError::BadClass(2));
    let mut b = frame(0x30, 0, &[0; 8]);
    b[7] = 1;
    check(b, ProtoError::BadReserved(1));
}

#[test]
fn malformed_payloads_are_named() {
    let mut dec = Decoder::new();
    let mut check = |mut b: BytesMut, want: ProtoError| assert_eq!(dec.decode(&mut b), Err(want));
    check(
        frame(0x30, 0, &[0; 9]),
        ProtoError::TrailingBytes {
            kind: Kind::Credit,
            extra: 1,
        },
    );
    check(
        frame(0x30, 0, &[0; 7]),
        ProtoError::Truncated {
            kind: Kind::Credit,
            field: "bytes",
        },
    );
    let mut read = vec![0; 12];
    read.push(2);
    check(
        frame(0x10, 0, &read),
        ProtoError::BadValue {
            kind: Kind::Read,
            field: "want_signatures",
            value: 2,
        },
    );
    // `Attached` with an unknown flag bit: an older or newer peer's
    // meaning this edge cannot honour.
    let mut attached = vec![0; 8 + 4 + 4 + 32 + 32 + 8 + 8 + 4];
    attached.push(0x03);
    check(
        frame(0x04, 0, &attached),
        ProtoError::BadValue {
            kind: Kind::Attached,
            field: "flags",
            value: 3,
        },
    );
    let mut hello = vec![0, 1, 3];
    hello.extend([0; 32]);
    check(
        frame(0x01, 0, &hello),
        ProtoError::BadValue {
            kind: Kind::Hello,
            field: "role",
            value: 3,
        },
    );
    let mut attach = vec![0, 2, 0xff, 0xfe, 0, 0];
    attach.extend([0; 8]);
    check(
        frame(0x03, 0, &attach),
        ProtoError::BadUtf8 {
            kind: Kind::Attach,
            field: "volume",
        },
    );
    let mut long = vec![0x10, 0x01];
    long.extend(vec![b'a'; 4097]);
    check(
        frame(0x3f, 0, &[&[0, 1][..], &long].concat()),
        ProtoError::TooLong {
            kind: Kind::Error,
            field: "message",
            len: 4097,
            max: 4096,
        },
    );
    // A count the bytes left cannot hold: refused before any allocation.
    check(
        frame(0x13, 0, &[0, 0, 0x10, 0]),
        ProtoError::Truncated {
            kind: Kind::Prefetch,
            field: "ranges",
        },
    );
    check(
        frame(0x12, 0, &[&[0; 12][..], &[0, 1, 0, 1]].concat()),
        ProtoError::TooLong {
            kind: Kind::ReadSignatures,
            field: "sigs",
            len: 65537,
            max: 65536,
        },
    );
    let mut batch = vec![0; 13];
    batch.extend([0, 0, 0, 1, 3]);
    batch.extend([0; 16]);
    check(
        frame(0x20, 0, &batch),
        ProtoError::BadValue {
            kind: Kind::WriteBatch,
            field: "entries",
            value: 3,
        },
    );
    let mut push = u64::MAX.to_be_bytes().to_vec();
    push.extend(9u64.to_be_bytes());
    push.extend([0, 0, 0, 1, 0]);
    check(
        frame(0x14, 0, &push),
        ProtoError::RangeOverflow {
            kind: Kind::Push,
            offset: u64::MAX,
            len: 1,
        },
    );
}

#[test]
fn malformed_migration_messages_are_named() {
    let mut dec = Decoder::new();
    let mut check = |mut b: BytesMut, want: ProtoError| assert_eq!(dec.decode(&mut b), Err(want));
    let release = Kind::Release.code();
    for code in [0, 3, 0xff] {
        check(
            frame(release, 0, &[code]),
            ProtoError::BadValue {
                kind: Kind::Release,
                field: "disposition",
                value: code.into(),
            },
        );
    }
    check(
        frame(release, 0, &[]),
        ProtoError::Truncated {
            kind: Kind::Release,
            field: "disposition",
        },
    );
    check(
        frame(release, 0, &[1, 0]),
        ProtoError::TrailingBytes {
            kind: Kind::Release,
            extra: 1,
        },
    );

    let extents = |offset: u64, len: u64| [offset.to_be_bytes(), len.to_be_bytes()].concat();
    let kind = Kind::Extents.code();
    check(
        frame(kind, 0, &extents(4096, 0)),
        ProtoError::BadValue {
            kind: Kind::Extents,
            field: "len",
            value: 0,
        },
    );
    check(
        frame(kind, 0, &extents(u64::MAX, 1)),
        ProtoError::RangeOverflow {
            kind: Kind::Extents,
            offset: u64::MAX,
            len: 1,
        },
    );
    check(
        frame(kind, 0, &extents(0, 1)[..15]),
        ProtoError::Truncated {
            kind: Kind::Extents,
            field: "len",
        },
    );

    let map = |offset: u64, runs: &[(u64, u8)]| {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend(u32::try_from(runs.len()).unwrap().to_be_bytes());
        for &(len, flags) in runs {
            p.extend(len.to_be_bytes());
            p.push(flags);
        }
        p
    };
    let kind = Kind::ExtentMap.code();
    let bad = |field, value| ProtoError::BadValue {
        kind: Kind::ExtentMap,
        field,
        value,
    };
    // No run at all, a run of no bytes, a reserved flag.
    check(frame(kind, 0, &map(0, &[])), bad("extents", 0));
    check(
        frame(kind, 0, &map(0, &[(4096, 0), (0, 1)])),
        bad("extents", 0),
    );
    check(frame(kind, 0, &map(0, &[(4096, 8)])), bad("flags", 8));
    check(frame(kind, 0, &map(0, &[(4096, 0x83)])), bad("flags", 0x83));
    // Past 2^64, by the end or by the sum.
    check(
        frame(kind, 0, &map(1 << 20, &[(u64::MAX - 4096, 0)])),
        ProtoError::RangeOverflow {
            kind: Kind::ExtentMap,
            offset: 1 << 20,
            len: u64::MAX - 4096,
        },
    );
    check(
        frame(kind, 0, &map(0, &[(u64::MAX, 0), (1, 2)])),
        ProtoError::RangeOverflow {
            kind: Kind::ExtentMap,
            offset: 0,
            len: u64::MAX,
        },
    );
    // Too many runs, or more than the bytes left hold: refused on the
    // count, before any allocation.
    let mut many = map(0, &[]);
    many[8..12].copy_from_slice(&u32::try_from(MAX_EXTENTS + 1).unwrap().to_be_bytes());
    many.extend(vec![0; 9 * (MAX_EXTENTS + 1)]);
    check(
        frame(kind, 0, &many),
        ProtoError::TooLong {
            kind: Kind::ExtentMap,
            field: "extents",
            len: MAX_EXTENTS as u64 + 1,
            max: MAX_EXTENTS as u64,
        },
    );
    let mut short = map(0, &[(4096, 0)]);
    short[8..12].copy_from_slice(&2u32.to_be_bytes());
    check(
        frame(kind, 0, &short),
        ProtoError::Truncated {
            kind: Kind::ExtentMap,
            field: "extents",
        },
    );
    let mut trailing = map(0, &[(4096, 3)]);
    trailing.push(0);
    check(
        frame(kind, 0, &trailing),
        ProtoError::TrailingBytes {
            kind: Kind::ExtentMap,
            extra: 1,
        },
    );
    // The most runs there may be, each of the largest size that fits.
    let full: Vec<(u64, u8)> = (0..MAX_EXTENTS)
        .map(|i| (u64::MAX / MAX_EXTENTS as u64, u8::try_from(i % 4).unwrap()))
        .collect();
    let mut b = frame(kind, 0, &map(0, &full));
    assert_eq!(
        dec.decode(&mut b).unwrap().unwrap().1,
        Message::ExtentMap {
            offset: 0,
            extents: full
        }
    );
}

/// A compressed frame of `kind` whose zstd payload is `z`.
fn zframe(kind: Kind, z: &[u8]) -> BytesMut {
    frame(kind.code(), FLAG_COMPRESSED, z)
}

fn read_data_payload(data: &[u8]) -> Vec<u8> {
    let mut p = BytesMut::new();
    Message::ReadData {
        as_of: 0,
        offset: 0,
        data: Bytes::copy_from_slice(data),
    }
    .encode_payload(&mut p);
    p.to_vec()
}

#[test]
fn zip_bomb_is_rejected_before_inflating() {
    // 17 MiB of zeros compress to a few hundred bytes.
    let payload = read_data_payload(&vec![0; 17 << 20]);
    let z = zstd::bulk::compress(&payload, 1).unwrap();
    assert!(z.len() < 4096);
    let mut buf = zframe(Kind::ReadData, &z);
    assert!(matches!(
        Decoder::new().decode(&mut buf),
        Err(ProtoError::InflatesTooLarge { size, .. }) if size == payload.len() as u64
    ));

    // A lower limit bites too, with an honest size under the default.
    let payload = read_data_payload(&vec![0; 1 << 20]);
    let z = zstd::bulk::compress(&payload, 1).unwrap();
    let mut dec = Decoder::with_max_payload(64 << 10);
    assert!(matches!(
        dec.decode(&mut zframe(Kind::ReadData, &z)),
        Err(ProtoError::InflatesTooLarge { .. })
    ));
    let (_, m) = Decoder::new()
        .decode(&mut zframe(Kind::ReadData, &z))
        .unwrap()
        .unwrap();
    assert_eq!(
        m,
        Message::ReadData {
            as_of: 0,
            offset: 0,
            data: Bytes::from(vec![0; 1 << 20])
        }
    );
}

#[test]
fn bad_compressed_payloads_are_rejected() {
    let payload = read_data_payload(&text(10_000));
    let z = zstd::bulk::compress(&payload, 1).unwrap();
    let mut dec = Decoder::new();
    let bad = |reason| Err(ProtoError::BadCompression { reason });

    // A streamed zstd frame does not declare its size.
    let mut streamed = Vec::new();
    {
        let mut w = zstd::stream::Encoder::new(&mut streamed, 1).unwrap();
        std::io::Write::write_all(&mut w, &payload).unwrap();
        w.finish().unwrap();
    }
    assert_eq!(
        dec.decode(&mut zframe(Kind::ReadData, &streamed)),
        bad("no content size")
    );
    assert_eq!(
        dec.decode(&mut zframe(Kind::ReadData, b"not zstd at all")),
        bad("not a zstd frame")
    );
    let mut twice = z.clone();
    twice.extend_from_slice(&z);
    assert_eq!(
        dec.decode(&mut zframe(Kind::ReadData, &twice)),
        bad("trailing bytes after the zstd frame")
    );
    let mut cut = z.clone();
    cut.truncate(z.len() - 3);
    assert!(matches!(
        dec.decode(&mut zframe(Kind::ReadData, &cut)),
        Err(ProtoError::BadCompression { .. })
    ));
    // The decompressed payload is parsed like a raw one.
    let mut trailing = payload.clone();
    trailing.push(0);
    let z = zstd::bulk::compress(&trailing, 1).unwrap();
    assert_eq!(
        dec.decode(&mut zframe(Kind::ReadData, &z)),
        Err(ProtoError::TrailingBytes {
            kind: Kind::ReadData,
            extra: 1
        })
    );
}

#[test]
fn auth_proofs_verify_and_mismatch() {
    let psk = [0x42; 32];
    let (edge_nonce, origin_nonce) = ([1; 32], [2; 32]);
    let edge_proof = auth_proof(&psk, Role::Edge, &edge_nonce, &origin_nonce);
    let origin_proof = auth_proof(&psk, Role::Origin, &origin_nonce, &edge_nonce);
    // Each side checks the other's.
    assert!(verify_auth_proof(
        &psk,
        Role::Edge,
        &edge_nonce,
        &origin_nonce,
        &edge_proof
    ));
    assert!(verify_auth_proof(
        &psk,
        Role::Origin,
        &origin_nonce,
        &edge_nonce,
        &origin_proof
    ));
    // The spec'd construction.
    let mut input = AUTH_CONTEXT.to_vec();
    input.push(1);
    input.extend(edge_nonce);
    input.extend(origin_nonce);
    assert_eq!(edge_proof, *blake3::keyed_hash(&psk, &input).as_bytes());

    // Wrong key, reflected proof, swapped or replayed nonces, a flipped bit.
    assert!(!verify_auth_proof(
        &[0x43; 32],
        Role::Edge,
        &edge_nonce,
        &origin_nonce,
        &edge_proof
    ));
    assert!(!verify_auth_proof(
        &psk,
        Role::Origin,
        &edge_nonce,
        &origin_nonce,
        &edge_proof
    ));
    assert!(!verify_auth_proof(
        &psk,
        Role::Edge,
        &origin_nonce,
        &edge_nonce,
        &edge_proof
    ));
    assert!(!verify_auth_proof(
        &psk,
        Role::Edge,
        &edge_nonce,
        &[3; 32],
        &edge_proof
    ));
    let mut flipped = edge_proof;
    flipped[31] ^= 1;
    assert!(!verify_auth_proof(
        &psk,
        Role::Edge,
        &edge_nonce,
        &origin_nonce,
        &flipped
    ));
    assert_ne!(edge_proof, origin_proof);
}

// ---- property tests ----

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,24}",
        any::<String>().prop_filter("within the limit", |s| s.len() <= MAX_STRING_LEN),
    ]
}

/// Data that is sometimes compressible.
fn arb_data() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..3000).prop_map(Bytes::from),
        (0usize..20_000, any::<u8>()).prop_map(|(n, b)| Bytes::from(vec![b; n])),
        (0usize..20_000).prop_map(|n| Bytes::from(text(n))),
    ]
}

/// `(offset, data)` whose range does not wrap.
fn arb_placed() -> impl Strategy<Value = (u64, Bytes)> {
    arb_data().prop_flat_map(|d| {
        let max = u64::MAX - d.len() as u64;
        (0..=max, Just(d))
    })
}

fn arb_entry() -> impl Strategy<Value = WriteEntry> {
    prop_oneof![
        arb_placed().prop_map(|(offset, data)| WriteEntry::Data { offset, data }),
        any::<u64>()
            .prop_flat_map(|len| (0..=u64::MAX - len, Just(len)))
            .prop_map(|(offset, len)| WriteEntry::Zero { offset, len }),
    ]
}

fn arb_range() -> impl Strategy<Value = (u64, u32)> {
    any::<u32>().prop_flat_map(|len| (0..=u64::MAX - u64::from(len), Just(len)))
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u16>(),
            prop_oneof![Just(Role::Edge), Just(Role::Origin)],
            any::<[u8; 32]>()
        )
            .prop_map(|(version, role, nonce)| Message::Hello {
                version,
                role,
                nonce
            }),
        any::<[u8; 32]>().prop_map(|proof| Message::Auth { proof }),
        (arb_string(), arb_string(), any::<u64>()).prop_map(|(volume, edge_id, resume_seq)| {
            Message::Attach {
                volume,
                edge_id,
                resume_seq,
            }
        }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(size, chunk_size, group_size, cache_key, dedup_key, volume_epoch, next_seq)| {
                    Message::Attached {
                        resume_part: 3,
                        size,
                        chunk_size,
                        group_size,
                        cache_key,
                        dedup_key,
                        volume_epoch,
                        next_seq,
                        local_writes: next_seq & 1 == 1,
                    }
                }
            ),
        Just(Message::Detach),
        Just(Message::Detached),
        (arb_range(), any::<bool>()).prop_map(|((offset, len), want_signatures)| Message::Read {
            offset,
            len,
            want_signatures
        }),
        arb_placed().prop_map(|(offset, data)| Message::ReadData {
            as_of: 0,
            offset,
            data
        }),
        (
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(any::<[u8; 32]>(), 0..40)
        )
            .prop_map(|(offset, chunk_size, sigs)| Message::ReadSignatures {
                offset,
                chunk_size,
                sigs
            }),
        prop::collection::vec(arb_range(), 0..40).prop_map(|ranges| Message::Prefetch { ranges }),
        arb_placed().prop_map(|(offset, data)| Message::Push {
            as_of: 0,
            offset,
            data
        }),
        Just(Message::PrefetchDone),
        prop::collection::vec(any::<u8>(), 1..300)
            .prop_map(|data| Message::Profile { data: data.into() }),
        Just(Message::ProfileStored),
        any::<u64>().prop_map(|budget| Message::Plan { budget }),
        prop_oneof![Just(Disposition::CutOver), Just(Disposition::Home)]
            .prop_map(|disposition| Message::Release { disposition }),
        (1..=u64::MAX)
            .prop_flat_map(|len| (0..=u64::MAX - len, Just(len)))
            .prop_map(|(offset, len)| Message::Extents { offset, len }),
        (1..=u32::try_from(MAX_DATA_LEN).unwrap(), 512..=u32::MAX)
            .prop_flat_map(|(len, block)| (0..=u64::MAX - u64::from(len), Just(len), Just(block)))
            .prop_map(|(offset, len, block)| Message::Sign { offset, len, block }),
        prop::collection::vec((1..=1u64 << 40, 0..=EXTENT_FLAGS), 1..40)
            .prop_flat_map(|extents| {
                let total: u64 = extents.iter().map(|&(l, _)| l).sum();
                (0..=u64::MAX - total, Just(extents))
            })
            .prop_map(|(offset, extents)| Message::ExtentMap { offset, extents }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            prop::collection::vec(arb_entry(), 0..8)
        )
            .prop_map(|(seq, part, last, entries)| Message::WriteBatch {
                seq,
                part,
                last,
                entries
            }),
        any::<u64>().prop_map(|seq| Message::BatchAck { seq }),
        any::<u64>().prop_map(|bytes| Message::Credit { bytes }),
        any::<u64>().prop_map(|nanos| Message::Heartbeat { nanos }),
        any::<u64>().prop_map(|nanos| Message::HeartbeatAck { nanos }),
        (any::<u64>(), any::<u64>()).prop_map(|(bytes, nanos)| Message::Delivered { bytes, nanos }),
        (any::<u16>(), arb_string()).prop_map(|(code, message)| Message::Error {
            code: ErrorCode::from_code(code),
            message
        }),
    ]
}

fn arb_class() -> impl Strategy<Value = Class> {
    prop_oneof![Just(Class::Demand), Just(Class::Background)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_round_trip(msg in arb_message(), id in any::<u64>(), class in arb_class(), compress in any::<bool>()) {
        let opts = if compress { CompressOptions::default() } else { CompressOptions::disabled() };
        let mut enc = Encoder::new(opts);
        let mut buf = BytesMut::new();
        let h = enc.encode(id, class, &msg, &mut buf).unwrap();
        prop_assert!(h.wire_len <= HEADER_LEN + msg.payload_len());
        prop_assert!(!h.compressed || (compress && msg.kind().compressible()));
        let raw_len = HEADER_LEN + msg.payload_len();
        prop_assert!(h.compressed || buf.len() == raw_len);
        let (got_h, got) = Decoder::new().decode(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got_h, h);
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn prop_truncations_never_decode(msg in arb_message(), compress in any::<bool>(), cut in any::<prop::sample::Index>()) {
        let opts = if compress { CompressOptions::default() } else { CompressOptions::disabled() };
        let mut full = BytesMut::new();
        Encoder::new(opts).encode(1, Class::Demand, &msg, &mut full).unwrap();
        let cut = cut.index(full.len());
        let mut buf = BytesMut::from(&full[..cut]);
        prop_assert_eq!(Decoder::new().decode(&mut buf), Ok(None));
        prop_assert_eq!(&buf[..], &full[..cut]);
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), max in 0usize..4096) {
        let mut dec = Decoder::with_max_payload(max);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some((h, _))) => prop_assert_eq!(buf.len() + h.wire_len, before),
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before);
                    prop_assert!(buf.len() < dec.max_frame_len());
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Valid frames with a few bytes overwritten: whatever still decodes
    /// re-encodes to a frame that decodes to the same message.
    #[test]
    fn prop_mutated_frames_never_panic(
        msg in arb_message(),
        compress in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let opts = if compress { CompressOptions::default() } else { CompressOptions::disabled() };
        let mut buf = BytesMut::new();
        Encoder::new(opts).encode(1, Class::Demand, &msg, &mut buf).unwrap();
        for (at, b) in edits {
            let i = at.index(buf.len());
            buf[i] = b;
        }
        let mutated = buf.clone();
        if let Ok(Some((h, m))) = Decoder::new().decode(&mut buf) {
            let mut again = BytesMut::new();
            raw().encode(h.id, h.class, &m, &mut again).unwrap();
            // The encoding is canonical: a raw frame re-encodes byte for byte.
            if !h.compressed {
                prop_assert_eq!(&again[..], &mutated[..h.wire_len]);
            }
            let (h2, m2) = Decoder::new().decode(&mut again).unwrap().unwrap();
            prop_assert_eq!((h2.kind, h2.id, h2.class), (h.kind, h.id, h.class));
            prop_assert_eq!(m2, m);
        }
    }
}
