//! The client codec against ferry's own server codec (both sans-IO, pumped
//! byte by byte), hand-made server bytes for what ferry's server never
//! sends, and proptests that hostile input never panics the client.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

use super::handshake::{ClientHandshake, ClientHandshakeError, ClientOptions, ClientStep};
use super::transmission::{ClientTransmission, Outcome, Progress, ProtocolError, Request};
use super::ClientNegotiated;
use crate::proto::consts::{
    FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH,
    IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_GO, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_UNSUP,
    STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC,
};
use crate::proto::testutil::TestCatalog;
use crate::proto::{
    encode_block_status, encode_offset_data_header, encode_offset_hole, encode_simple_reply,
    encode_structured_error, encode_structured_none, Command, CommandFlags, Errno, Handshake, Step,
    TlsMode, BASE_ALLOCATION_ID,
};

/// Runs the client handshake against ferry's server handshake, moving at
/// most `chunk` bytes at a time in each direction.
fn negotiate(
    opts: ClientOptions,
    chunk: usize,
) -> Result<(ClientNegotiated, crate::proto::Negotiated), ClientHandshakeError> {
    let catalog = TestCatalog::standard();
    let mut to_client = BytesMut::new();
    let mut server = Handshake::new(TlsMode::Off, &mut to_client);
    let mut client = ClientHandshake::new(opts)?;
    let (mut c_in, mut c_out, mut s_in, mut s_out) = (
        BytesMut::new(),
        BytesMut::new(),
        BytesMut::new(),
        BytesMut::new(),
    );
    let mut client_done = None;
    let mut server_done = None;
    for _ in 0..100_000 {
        // Trickle bytes across.
        let n = chunk.min(to_client.len());
        c_in.extend_from_slice(&to_client.split_to(n));
        if client_done.is_none() {
            if let ClientStep::Done(n) = client.advance(&mut c_in, &mut c_out)? {
                client_done = Some(n);
            }
        }
        let n = chunk.min(c_out.len());
        s_in.extend_from_slice(&c_out.split_to(n));
        if server_done.is_none() {
            match server.advance(&mut s_in, &catalog, &mut s_out) {
                Ok(Step::Transmission(n)) => server_done = Some(n),
                Ok(Step::NeedInput) => {}
                Ok(other) => panic!("server step {other:?}"),
                Err(e) => panic!("server error {e}"),
            }
        }
        to_client.extend_from_slice(&s_out.split());
        if let (Some(c), Some(s)) = (&client_done, &server_done) {
            return Ok((c.clone(), s.clone()));
        }
        if client_done.is_none() && to_client.is_empty() && c_out.is_empty() && c_in.is_empty() {
            // Nobody has anything to say: the client must have an answer.
            if let ClientStep::Done(n) = client.advance(&mut c_in, &mut c_out)? {
                client_done = Some(n);
            }
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn handshake_against_ferry_server_negotiates_everything() {
    for chunk in [1, 7, 4096] {
        let (c, s) = negotiate(ClientOptions::new("disk"), chunk).unwrap();
        assert_eq!(c.size, 1 << 20);
        assert_eq!(c.transmission_flags, s.transmission_flags);
        assert!(c.structured_replies && s.structured_replies);
        assert_eq!(c.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_eq!(s.base_allocation, Some(BASE_ALLOCATION_ID));
        let b = c.block_sizes.unwrap();
        assert_eq!((b.min, b.preferred, b.max), (1, 4096, 32 * 1024 * 1024));
        assert!(c.transmission_flags & FLAG_CAN_MULTI_CONN != 0);
    }
}

#[test]
fn handshake_reads_flags_and_block_sizes_of_other_exports() {
    let (c, _) = negotiate(ClientOptions::new("ro"), 3).unwrap();
    assert!(c.transmission_flags & FLAG_READ_ONLY != 0);
    let (c, _) = negotiate(ClientOptions::new("aligned"), 5).unwrap();
    assert_eq!(c.block_sizes.unwrap().min, 512);
    // The empty name is the default export.
    let (c, s) = negotiate(ClientOptions::new(""), 64).unwrap();
    assert_eq!(s.export.name, "disk");
    assert_eq!(c.size, 1 << 20);
}

#[test]
fn handshake_without_structured_replies() {
    let opts = ClientOptions {
        structured_replies: false,
        ..ClientOptions::new("disk")
    };
    let (c, s) = negotiate(opts, 16).unwrap();
    assert!(!c.structured_replies && !s.structured_replies);
    assert_eq!(c.base_allocation, None);
}

#[test]
fn handshake_reports_unknown_exports() {
    let err = negotiate(ClientOptions::new("nope"), 4096).unwrap_err();
    assert!(
        matches!(err, ClientHandshakeError::ExportRefused { ref export, .. } if export == "nope"),
        "{err}"
    );
}

fn greeting(flags: u16) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u64(NBDMAGIC);
    b.put_u64(IHAVEOPT);
    b.put_u16(flags);
    b
}

fn option_reply(out: &mut BytesMut, option: u32, ty: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(ty);
    out.put_u32(u32::try_from(data.len()).unwrap());
    out.put_slice(data);
}

#[test]
fn handshake_falls_back_to_export_name_and_skips_the_zeroes() {
    // A server without NO_ZEROES, structured replies or OPT_GO.
    let mut hs = ClientHandshake::new(ClientOptions::new("old")).unwrap();
    let mut input = greeting(FLAG_FIXED_NEWSTYLE);
    let mut out = BytesMut::new();
    assert!(matches!(
        hs.advance(&mut input, &mut out).unwrap(),
        ClientStep::NeedInput
    ));
    // Client flags: fixed newstyle only (no NO_ZEROES: not offered).
    assert_eq!(&out[..4], &1u32.to_be_bytes());
    option_reply(&mut input, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"");
    option_reply(&mut input, OPT_GO, REP_ERR_UNSUP, b"");
    assert!(matches!(
        hs.advance(&mut input, &mut out).unwrap(),
        ClientStep::NeedInput
    ));
    input.put_u64(12345);
    input.put_u16(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
    // Zeroes arrive late: not done until all 124 are there.
    input.put_slice(&[0; 100]);
    assert!(matches!(
        hs.advance(&mut input, &mut out).unwrap(),
        ClientStep::NeedInput
    ));
    input.put_slice(&[0; 24]);
    let ClientStep::Done(n) = hs.advance(&mut input, &mut out).unwrap() else {
        panic!("not done");
    };
    assert_eq!(n.size, 12345);
    assert_eq!(n.transmission_flags, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
    assert!(!n.structured_replies);
    assert!(n.block_sizes.is_none());
    assert!(input.is_empty());
}

#[test]
fn handshake_rejects_bad_greetings_and_replies() {
    let mut out = BytesMut::new();
    let mut hs = ClientHandshake::new(ClientOptions::new("x")).unwrap();
    let mut input = BytesMut::from(&b"not an nbd server!"[..]);
    assert!(matches!(
        hs.advance(&mut input, &mut out),
        Err(ClientHandshakeError::BadMagic(_))
    ));
    let mut hs = ClientHandshake::new(ClientOptions::new("x")).unwrap();
    let mut input = BytesMut::new();
    input.put_u64(NBDMAGIC);
    input.put_u64(0x0000_4202_8186_1253);
    input.put_u16(0);
    assert!(matches!(
        hs.advance(&mut input, &mut out),
        Err(ClientHandshakeError::Oldstyle)
    ));
    let mut hs = ClientHandshake::new(ClientOptions::new("x")).unwrap();
    let mut input = greeting(0);
    assert!(matches!(
        hs.advance(&mut input, &mut out),
        Err(ClientHandshakeError::NotFixedNewstyle(0))
    ));
    // GO acknowledged without ever describing the export.
    let mut hs = ClientHandshake::new(ClientOptions {
        structured_replies: false,
        ..ClientOptions::new("x")
    })
    .unwrap();
    let mut input = greeting(FLAG_FIXED_NEWSTYLE);
    option_reply(&mut input, OPT_GO, REP_ACK, b"");
    assert!(matches!(
        hs.advance(&mut input, &mut out),
        Err(ClientHandshakeError::NoExportInfo)
    ));
    // A reply to an option never sent.
    let mut hs = ClientHandshake::new(ClientOptions::new("x")).unwrap();
    let mut input = greeting(FLAG_FIXED_NEWSTYLE);
    option_reply(&mut input, OPT_GO, REP_ACK, b"");
    assert!(matches!(
        hs.advance(&mut input, &mut out),
        Err(ClientHandshakeError::WrongOption { .. })
    ));
    // Absurd block sizes.
    let mut hs = ClientHandshake::new(ClientOptions {
        structured_replies: false,
        ..ClientOptions::new("x")
    })
    .unwrap();
    let mut input = greeting(FLAG_FIXED_NEWSTYLE);
    let mut info = BytesMut::new();
    info.put_u16(3);
    info.put_u32(3);
    info.put_u32(4096);
    info.put_u32(1 << 20);
    option_reply(&mut input, OPT_GO, 3, &info);
    assert!(matches!(
        hs.advance(&mut input, &mut out),
        Err(ClientHandshakeError::BadBlockSizes { min: 3, .. })
    ));
}

fn read(offset: u64, length: u32) -> Request {
    Request {
        command: Command::Read,
        flags: CommandFlags::default(),
        offset,
        length,
    }
}

/// Feeds `bytes` in `chunk`-sized pieces and collects completions.
fn feed(
    t: &mut ClientTransmission,
    bytes: &[u8],
    chunk: usize,
) -> Result<Vec<super::Completion>, ProtocolError> {
    let mut input = BytesMut::new();
    let mut done = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        input.extend_from_slice(piece);
        loop {
            match t.decode(&mut input)? {
                Progress::NeedInput(_) => break,
                Progress::Chunk => {}
                Progress::Complete(c) => done.push(c),
            }
        }
    }
    assert!(input.is_empty(), "bytes left over");
    Ok(done)
}

#[test]
fn simple_replies_carry_read_data_and_errors() {
    for chunk in [1, 5, 1000] {
        let mut t = ClientTransmission::new(false, None);
        let mut req = BytesMut::new();
        let a = t.start(read(0, 4), &mut req);
        let b = t.start(
            Request {
                command: Command::Flush,
                ..read(0, 0)
            },
            &mut req,
        );
        assert_eq!(req.len(), 56);
        let mut wire = BytesMut::new();
        // Out of order: the flush fails first, then the read.
        encode_simple_reply(&mut wire, b, Some(Errno::Io));
        encode_simple_reply(&mut wire, a, None);
        wire.put_slice(b"abcd");
        let done = feed(&mut t, &wire, chunk).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].cookie, b);
        assert_eq!(done[0].result.as_ref().unwrap_err().errno, 5);
        assert_eq!(done[1].cookie, a);
        assert_eq!(
            done[1].result.as_ref().unwrap(),
            &Outcome::Data(bytes::Bytes::from_static(b"abcd"))
        );
        assert_eq!(t.in_flight(), 0);
    }
}

#[test]
fn structured_reads_are_assembled_from_data_and_holes_in_any_order() {
    for chunk in [1, 3, 64, 100_000] {
        let mut t = ClientTransmission::new(true, Some(BASE_ALLOCATION_ID));
        let mut req = BytesMut::new();
        let c = t.start(read(100, 12), &mut req);
        let mut wire = BytesMut::new();
        encode_offset_data_header(&mut wire, c, 108, 4, false);
        wire.put_slice(b"wxyz");
        encode_offset_hole(&mut wire, c, 104, 4, false);
        encode_offset_data_header(&mut wire, c, 100, 4, false);
        wire.put_slice(b"abcd");
        encode_structured_none(&mut wire, c);
        let done = feed(&mut t, &wire, chunk).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[0].result.as_ref().unwrap(),
            &Outcome::Data(bytes::Bytes::from_static(b"abcd\0\0\0\0wxyz"))
        );
    }
}

#[test]
fn structured_errors_and_block_status() {
    let mut t = ClientTransmission::new(true, Some(7));
    let mut req = BytesMut::new();
    let r = t.start(read(0, 8), &mut req);
    let bs = t.start(
        Request {
            command: Command::BlockStatus,
            ..read(0, 4096)
        },
        &mut req,
    );
    let mut wire = BytesMut::new();
    encode_block_status(
        &mut wire,
        bs,
        7,
        &[(512, 0), (3584, STATE_HOLE | STATE_ZERO)],
        true,
    );
    encode_structured_error(&mut wire, r, Errno::Io, "disk on fire", false);
    encode_offset_data_header(&mut wire, r, 0, 8, false);
    wire.put_slice(&[1; 8]);
    encode_structured_none(&mut wire, r);
    let done = feed(&mut t, &wire, 11).unwrap();
    assert_eq!(
        done[0].result.as_ref().unwrap(),
        &Outcome::Extents(vec![(512, 0), (3584, STATE_HOLE | STATE_ZERO)])
    );
    let e = done[1].result.as_ref().unwrap_err();
    assert_eq!((e.errno, e.message.as_str()), (5, "disk on fire"));
    // ERROR_OFFSET carries the offset after the message.
    let c = t.start(read(0, 8), &mut req);
    let mut wire = BytesMut::new();
    wire.put_u32(STRUCTURED_REPLY_MAGIC);
    wire.put_u16(1);
    wire.put_u16(0x8002);
    wire.put_u64(c);
    wire.put_u32(4 + 2 + 2 + 8);
    wire.put_u32(28);
    wire.put_u16(2);
    wire.put_slice(b"no");
    wire.put_u64(4);
    let done = feed(&mut t, &wire, 1).unwrap();
    let e = done[0].result.as_ref().unwrap_err();
    assert_eq!((e.errno, e.offset), (28, Some(4)));
}

#[test]
fn broken_replies_are_protocol_errors() {
    let bad = |structured: bool, build: &dyn Fn(u64, &mut BytesMut)| {
        let mut t = ClientTransmission::new(structured, Some(1));
        let c = t.start(read(100, 8), &mut BytesMut::new());
        let mut wire = BytesMut::new();
        build(c, &mut wire);
        feed(&mut t, &wire, 1000).unwrap_err()
    };
    assert_eq!(
        bad(true, &|_, w| encode_structured_none(w, 999)),
        ProtocolError::UnknownCookie(999)
    );
    assert_eq!(
        bad(false, &|c, w| encode_structured_none(w, c)),
        ProtocolError::UnexpectedStructured
    );
    assert!(matches!(
        bad(true, &|_, w| w.put_slice(&[0xde; 20])),
        ProtocolError::BadMagic(_)
    ));
    assert!(matches!(
        bad(true, &|c, w| {
            encode_offset_data_header(w, c, 104, 8, true);
            w.put_slice(&[0; 8]);
        }),
        ProtocolError::ChunkOutOfRange { .. }
    ));
    assert!(matches!(
        bad(true, &|c, w| {
            encode_offset_hole(w, c, 100, 4, false);
            encode_offset_hole(w, c, 102, 4, true);
        }),
        ProtocolError::Overlap(102)
    ));
    assert!(matches!(
        bad(true, &|c, w| {
            encode_offset_hole(w, c, 100, 4, false);
            encode_structured_none(w, c);
        }),
        ProtocolError::Incomplete { missing: 4, .. }
    ));
    // Data longer than the request is refused before it is buffered.
    assert!(matches!(
        bad(true, &|c, w| encode_offset_data_header(
            w,
            c,
            100,
            1 << 30,
            true
        )),
        ProtocolError::BadChunk { .. }
    ));
    assert!(matches!(
        bad(true, &|c, w| encode_block_status(w, c, 1, &[(8, 0)], true)),
        ProtocolError::BadChunk { .. }
    ));
}

#[test]
fn block_status_for_another_context_is_refused() {
    let mut t = ClientTransmission::new(true, Some(1));
    let c = t.start(
        Request {
            command: Command::BlockStatus,
            ..read(0, 10)
        },
        &mut BytesMut::new(),
    );
    let mut wire = BytesMut::new();
    encode_block_status(&mut wire, c, 2, &[(10, 0)], true);
    assert!(matches!(
        feed(&mut t, &wire, 100),
        Err(ProtocolError::WrongContext { got: 2, .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Garbage from the server, in any split, is an error or more input,
    /// never a panic or a runaway buffer.
    #[test]
    fn hostile_replies_never_panic(
        structured in any::<bool>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        magic in prop_oneof![Just(0x668e_33ef_u32), Just(0x6744_6698_u32), any::<u32>()],
        chunk in 1usize..64,
    ) {
        let mut t = ClientTransmission::new(structured, Some(1));
        let mut out = BytesMut::new();
        for (cmd, len) in [(Command::Read, 64), (Command::BlockStatus, 4096), (Command::Write, 8)] {
            t.start(Request { command: cmd, flags: CommandFlags::default(), offset: 0, length: len }, &mut out);
        }
        let mut wire = BytesMut::new();
        wire.put_u32(magic);
        // Aim some headers at cookie 1..=3 so the deeper paths run.
        if bytes.len() > 4 {
            wire.put_slice(&bytes[..4]);
            wire.put_u64(u64::from(bytes[0] % 4));
            wire.put_slice(&bytes[4..]);
        }
        let mut input = BytesMut::new();
        'outer: for piece in wire.chunks(chunk) {
            input.extend_from_slice(piece);
            loop {
                match t.decode(&mut input) {
                    Ok(Progress::NeedInput(n)) => {
                        prop_assert!(n <= 64 + 28 + 16 * 1024 * 1024);
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn hostile_handshakes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..64,
        valid_greeting in any::<bool>(),
    ) {
        let mut hs = ClientHandshake::new(ClientOptions::new("x")).unwrap();
        let mut wire = if valid_greeting { greeting(FLAG_FIXED_NEWSTYLE | 2) } else { BytesMut::new() };
        if valid_greeting && bytes.len() > 12 {
            // An option reply header for the option in progress.
            wire.put_u64(OPTION_REPLY_MAGIC);
            wire.put_u32(OPT_STRUCTURED_REPLY);
        }
        wire.put_slice(&bytes);
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        for piece in wire.chunks(chunk) {
            input.extend_from_slice(piece);
            match hs.advance(&mut input, &mut out) {
                Ok(ClientStep::NeedInput) => {}
                Ok(ClientStep::Done(_)) | Err(_) => break,
            }
        }
    }
}
