use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::proto::consts::{
    FLAG_SEND_DF, GREETING_LEN, OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD, REQUEST_MAGIC,
};
use crate::proto::testutil::{
    client_flags, info_data, meta_data, opt, parse_replies, Reply, TestCatalog,
};

const FIXED: u32 = FLAG_C_FIXED_NEWSTYLE;
const FIXED_NZ: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// A handshake driven by a scripted client.
struct Client {
    hs: Handshake,
    catalog: TestCatalog,
    input: BytesMut,
    out: BytesMut,
}

impl Client {
    fn new(tls: TlsMode) -> Self {
        let mut out = BytesMut::new();
        let hs = Handshake::new(tls, &mut out);
        assert_eq!(out.len(), GREETING_LEN);
        out.clear();
        Client {
            hs,
            catalog: TestCatalog::standard(),
            input: BytesMut::new(),
            out,
        }
    }

    /// A client that already sent fixed-newstyle + no-zeroes flags.
    fn started(tls: TlsMode) -> Self {
        let mut c = Client::new(tls);
        assert!(matches!(
            c.send(&client_flags(FIXED_NZ)),
            Ok(Step::NeedInput)
        ));
        c
    }

    fn send(&mut self, bytes: &[u8]) -> Result<Step, HandshakeError> {
        self.input.extend_from_slice(bytes);
        self.hs
            .advance(&mut self.input, &self.catalog, &mut self.out)
    }

    /// Sends one option, expects haggling to continue, returns the replies.
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<Reply> {
        let step = self.send(&opt(option, data)).expect("option failed");
        assert!(matches!(step, Step::NeedInput), "unexpected step {step:?}");
        self.take_replies()
    }

    fn take_replies(&mut self) -> Vec<Reply> {
        let (replies, rest) = parse_replies(&self.out);
        assert!(rest.is_empty(), "stray bytes after replies: {rest:?}");
        self.out.clear();
        for r in &replies {
            assert!(r.ty == REP_ACK || r.ty & REP_FLAG_ERROR_BIT != 0 || r.ty < 5);
        }
        replies
    }
}

const REP_FLAG_ERROR_BIT: u32 = 1 << 31;

fn single(replies: &[Reply], option: u32, ty: u32) {
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].option, option);
    assert_eq!(replies[0].ty, ty, "{replies:?}");
}

fn info_types(replies: &[Reply]) -> Vec<u16> {
    replies
        .iter()
        .filter(|r| r.ty == REP_INFO)
        .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
        .collect()
}

// ---------------------------------------------------------------------------
// Greeting and client flags
// ---------------------------------------------------------------------------

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_flags() {
    let mut out = BytesMut::new();
    let _ = Handshake::new(TlsMode::Off, &mut out);
    assert_eq!(&out[..8], b"NBDMAGIC");
    assert_eq!(&out[8..16], b"IHAVEOPT");
    assert_eq!(&out[16..], &[0, 3]);
}

#[test]
fn client_flags_need_four_bytes() {
    let mut c = Client::new(TlsMode::Off);
    for b in client_flags(FIXED) {
        assert!(matches!(c.send(&[b]), Ok(Step::NeedInput)));
    }
    assert!(c.input.is_empty());
}

#[test]
fn unknown_client_flags_are_fatal() {
    let mut c = Client::new(TlsMode::Off);
    assert!(matches!(
        c.send(&client_flags(FIXED | 4)),
        Err(HandshakeError::UnknownClientFlags(5))
    ));
}

#[test]
fn plain_newstyle_is_refused() {
    let mut c = Client::new(TlsMode::Off);
    assert!(matches!(
        c.send(&client_flags(FLAG_C_NO_ZEROES)),
        Err(HandshakeError::NotFixedNewstyle(2))
    ));
    let mut c = Client::new(TlsMode::Off);
    assert!(matches!(
        c.send(&client_flags(0)),
        Err(HandshakeError::NotFixedNewstyle(0))
    ));
}

#[test]
fn bad_option_magic_is_fatal() {
    let mut c = Client::started(TlsMode::Off);
    let mut frame = opt(OPT_LIST, &[]);
    frame[0] ^= 0xff;
    assert!(matches!(
        c.send(&frame),
        Err(HandshakeError::BadOptionMagic(_))
    ));
}

// ---------------------------------------------------------------------------
// EXPORT_NAME
// ---------------------------------------------------------------------------

#[test]
fn export_name_enters_transmission_without_zeroes() {
    let mut c = Client::started(TlsMode::Off);
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_EXPORT_NAME, b"disk")) else {
        panic!("no transmission");
    };
    assert_eq!(c.out.len(), 10);
    assert_eq!(&c.out[..8], &(1u64 << 20).to_be_bytes());
    assert_eq!(&c.out[8..10], &n.transmission_flags.to_be_bytes());
    assert_eq!(n.export.name, "disk");
    assert!(!n.structured_replies);
    assert_eq!(n.base_allocation, None);
    assert_eq!(n.transmission_flags & FLAG_SEND_DF, 0);
}

#[test]
fn export_name_sends_zeroes_unless_no_zeroes() {
    let mut c = Client::new(TlsMode::Off);
    c.send(&client_flags(FIXED)).unwrap();
    assert!(matches!(
        c.send(&opt(OPT_EXPORT_NAME, b"")),
        Ok(Step::Transmission(_))
    ));
    assert_eq!(c.out.len(), 10 + 124);
    assert!(c.out[10..].iter().all(|&b| b == 0));
}

#[test]
fn export_name_default_is_first_export() {
    let mut c = Client::started(TlsMode::Off);
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_EXPORT_NAME, b"")) else {
        panic!()
    };
    assert_eq!(n.export.name, "disk");
}

#[test]
fn export_name_unknown_closes_silently() {
    let mut c = Client::started(TlsMode::Off);
    assert!(matches!(
        c.send(&opt(OPT_EXPORT_NAME, b"nope")),
        Ok(Step::Closed)
    ));
    assert!(c.out.is_empty());
    assert!(matches!(c.send(&[]), Err(HandshakeError::Finished)));
}

#[test]
fn export_name_with_bad_utf8_or_nul_closes() {
    for name in [&b"\xff\xfe"[..], b"di\0sk"] {
        let mut c = Client::started(TlsMode::Off);
        assert!(matches!(
            c.send(&opt(OPT_EXPORT_NAME, name)),
            Ok(Step::Closed)
        ));
    }
}

#[test]
fn export_name_too_long_is_fatal() {
    let mut c = Client::started(TlsMode::Off);
    let name = vec![b'a'; MAX_STRING_LEN + 1];
    // Fatal as soon as the header is seen: the name is never buffered.
    assert!(matches!(
        c.send(&opt(OPT_EXPORT_NAME, &name)[..16]),
        Err(HandshakeError::ExportNameTooLong(4097))
    ));
}

#[test]
fn bytes_after_the_final_option_stay_in_the_input() {
    let mut c = Client::started(TlsMode::Off);
    let mut bytes = opt(OPT_EXPORT_NAME, b"disk");
    bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    assert!(matches!(c.send(&bytes), Ok(Step::Transmission(_))));
    assert_eq!(&c.input[..], &REQUEST_MAGIC.to_be_bytes());
}

// ---------------------------------------------------------------------------
// INFO and GO
// ---------------------------------------------------------------------------

#[test]
fn go_sends_export_and_block_size_then_acks() {
    let mut c = Client::started(TlsMode::Off);
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_GO, &info_data("disk", &[]))) else {
        panic!()
    };
    let replies = c.take_replies();
    assert_eq!(info_types(&replies), vec![INFO_EXPORT, INFO_BLOCK_SIZE]);
    assert_eq!(replies.last().unwrap().ty, REP_ACK);
    assert!(replies.iter().all(|r| r.option == OPT_GO));
    let export = &replies[0].data;
    assert_eq!(export.len(), 12);
    assert_eq!(&export[2..10], &(1u64 << 20).to_be_bytes());
    assert_eq!(&export[10..12], &n.transmission_flags.to_be_bytes());
    let bs = &replies[1].data;
    assert_eq!(bs.len(), 14);
    assert_eq!(&bs[2..6], &1u32.to_be_bytes());
    assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
    assert_eq!(&bs[10..14], &(32u32 << 20).to_be_bytes());
}

#[test]
fn go_sends_name_and_description_when_asked() {
    let mut c = Client::started(TlsMode::Off);
    let data = info_data("", &[INFO_NAME, INFO_DESCRIPTION, 999]);
    assert!(matches!(
        c.send(&opt(OPT_GO, &data)),
        Ok(Step::Transmission(_))
    ));
    let replies = c.take_replies();
    assert_eq!(
        info_types(&replies),
        vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    );
    assert_eq!(&replies[1].data[2..], b"disk");
    assert_eq!(&replies[2].data[2..], b"the disk export");
}

#[test]
fn info_does_not_end_the_handshake() {
    let mut c = Client::started(TlsMode::Off);
    let replies = c.option(OPT_INFO, &info_data("ro", &[INFO_NAME]));
    assert_eq!(
        info_types(&replies),
        vec![INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]
    );
    let flags = u16::from_be_bytes([replies[0].data[10], replies[0].data[11]]);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(replies.last().unwrap().ty, REP_ACK);
    assert!(matches!(
        c.send(&opt(OPT_GO, &info_data("ro", &[]))),
        Ok(Step::Transmission(_))
    ));
}

#[test]
fn info_and_go_on_unknown_export_fail_and_continue() {
    let mut c = Client::started(TlsMode::Off);
    for option in [OPT_INFO, OPT_GO] {
        let replies = c.option(option, &info_data("missing", &[]));
        single(&replies, option, REP_ERR_UNKNOWN);
    }
}

#[test]
fn go_requires_block_size_request_when_min_above_one() {
    let mut c = Client::started(TlsMode::Off);
    let replies = c.option(OPT_GO, &info_data("aligned", &[]));
    assert_eq!(replies.len(), 2);
    assert_eq!(info_types(&replies), vec![INFO_BLOCK_SIZE]);
    assert_eq!(replies[1].ty, REP_ERR_BLOCK_SIZE_REQD);
    // INFO without the request is fine: it commits to nothing.
    let replies = c.option(OPT_INFO, &info_data("aligned", &[]));
    assert_eq!(replies.last().unwrap().ty, REP_ACK);
    // GO with the request succeeds.
    assert!(matches!(
        c.send(&opt(OPT_GO, &info_data("aligned", &[INFO_BLOCK_SIZE]))),
        Ok(Step::Transmission(_))
    ));
}

#[test]
fn malformed_info_requests_are_invalid() {
    let mut c = Client::started(TlsMode::Off);
    let good = info_data("disk", &[INFO_NAME]);
    let mut trailing = good.clone();
    trailing.push(0);
    let mut name_too_long = good.clone();
    name_too_long[3] = 200; // name length beyond the data
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0],
        good[..good.len() - 1].to_vec(), // truncated request list
        trailing,
        name_too_long,
        info_data("\u{0}", &[]),
    ];
    for data in cases {
        for option in [OPT_INFO, OPT_GO] {
            let replies = c.option(option, &data);
            single(&replies, option, REP_ERR_INVALID);
        }
    }
    // Invalid UTF-8 in the name.
    let mut bad = info_data("ab", &[]);
    bad[4] = 0xff;
    single(&c.option(OPT_GO, &bad), OPT_GO, REP_ERR_INVALID);
}

#[test]
fn overlong_strings_are_invalid() {
    let mut c = Client::started(TlsMode::Off);
    let name = "a".repeat(MAX_STRING_LEN + 1);
    single(
        &c.option(OPT_INFO, &info_data(&name, &[])),
        OPT_INFO,
        REP_ERR_INVALID,
    );
    c.option(OPT_STRUCTURED_REPLY, &[]);
    let query = format!("base:{}", "x".repeat(MAX_STRING_LEN));
    single(
        &c.option(OPT_SET_META_CONTEXT, &meta_data("disk", &[&query])),
        OPT_SET_META_CONTEXT,
        REP_ERR_INVALID,
    );
}

// ---------------------------------------------------------------------------
// LIST, ABORT, STRUCTURED_REPLY, unknown options
// ---------------------------------------------------------------------------

#[test]
fn list_sends_every_export_then_ack() {
    let mut c = Client::started(TlsMode::Off);
    let replies = c.option(OPT_LIST, &[]);
    assert_eq!(replies.len(), 4);
    let names: Vec<String> = replies[..3]
        .iter()
        .map(|r| {
            assert_eq!(r.ty, REP_SERVER);
            let len = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
            assert!(len <= r.data.len() - 4);
            String::from_utf8(r.data[4..4 + len].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["disk", "ro", "aligned"]);
    assert_eq!(&replies[0].data[8..], b"the disk export");
    assert_eq!(replies[3].ty, REP_ACK);
}

#[test]
fn list_with_data_is_invalid() {
    let mut c = Client::started(TlsMode::Off);
    single(&c.option(OPT_LIST, b"x"), OPT_LIST, REP_ERR_INVALID);
}

#[test]
fn abort_is_acked_then_closed() {
    let mut c = Client::started(TlsMode::Off);
    assert!(matches!(c.send(&opt(OPT_ABORT, &[])), Ok(Step::Closed)));
    single(&c.take_replies(), OPT_ABORT, REP_ACK);
    // Data with ABORT is ignored, and not even waited for.
    let mut c = Client::started(TlsMode::Off);
    assert!(matches!(
        c.send(&opt(OPT_ABORT, b"bye")[..17]),
        Ok(Step::Closed)
    ));
    single(&c.take_replies(), OPT_ABORT, REP_ACK);
}

#[test]
fn structured_reply_is_acked_and_negotiated() {
    let mut c = Client::started(TlsMode::Off);
    single(
        &c.option(OPT_STRUCTURED_REPLY, b"x"),
        OPT_STRUCTURED_REPLY,
        REP_ERR_INVALID,
    );
    single(
        &c.option(OPT_STRUCTURED_REPLY, &[]),
        OPT_STRUCTURED_REPLY,
        REP_ACK,
    );
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_GO, &info_data("disk", &[]))) else {
        panic!()
    };
    assert!(n.structured_replies);
    assert_ne!(n.transmission_flags & FLAG_SEND_DF, 0);
}

#[test]
fn unknown_options_are_unsupported_and_haggling_continues() {
    let mut c = Client::started(TlsMode::Off);
    for option in [
        0,
        OPT_PEEK_EXPORT_FOR_TEST,
        OPT_EXTENDED_HEADERS,
        12,
        u32::MAX,
    ] {
        single(&c.option(option, b"some data"), option, REP_ERR_UNSUP);
    }
    assert!(matches!(
        c.send(&opt(OPT_EXPORT_NAME, b"disk")),
        Ok(Step::Transmission(_))
    ));
}

const OPT_PEEK_EXPORT_FOR_TEST: u32 = crate::proto::consts::OPT_PEEK_EXPORT;

#[test]
fn too_many_options_disconnect() {
    let mut c = Client::started(TlsMode::Off);
    for _ in 0..MAX_OPTIONS {
        c.option(OPT_STRUCTURED_REPLY, &[]);
    }
    assert!(matches!(
        c.send(&opt(OPT_STRUCTURED_REPLY, &[])),
        Err(HandshakeError::TooManyOptions(_))
    ));
}

// ---------------------------------------------------------------------------
// Option length limits
// ---------------------------------------------------------------------------

#[test]
fn oversized_option_is_discarded_incrementally_then_too_big() {
    let mut c = Client::started(TlsMode::Off);
    let len = MAX_OPTION_LEN + 1;
    let mut header = opt(OPT_LIST, &[]);
    header[12..16].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(c.send(&header), Ok(Step::NeedInput)));
    let chunk = vec![0xAA; 4096];
    let mut sent = 0;
    while sent + chunk.len() < len as usize {
        assert!(matches!(c.send(&chunk), Ok(Step::NeedInput)));
        // Nothing is held on to and nothing answered yet.
        assert!(c.input.is_empty());
        assert!(c.out.is_empty());
        sent += chunk.len();
    }
    let rest = len as usize - sent;
    let mut tail = vec![0xAA; rest];
    tail.extend_from_slice(&opt(OPT_LIST, &[]));
    assert!(matches!(c.send(&tail), Ok(Step::NeedInput)));
    let replies = c.take_replies();
    assert_eq!(replies[0].ty, REP_ERR_TOO_BIG);
    assert_eq!(replies[0].option, OPT_LIST);
    assert_eq!(replies.last().unwrap().ty, REP_ACK);
}

#[test]
fn option_at_the_limit_is_buffered_and_parsed() {
    let mut c = Client::started(TlsMode::Off);
    let data = vec![0u8; MAX_OPTION_LEN as usize];
    single(&c.option(OPT_LIST, &data), OPT_LIST, REP_ERR_INVALID);
}

#[test]
fn absurd_option_length_is_fatal() {
    let mut c = Client::started(TlsMode::Off);
    let mut header = opt(OPT_INFO, &[]);
    header[12..16].copy_from_slice(&(MAX_SKIPPABLE_OPTION_LEN + 1).to_be_bytes());
    assert!(matches!(
        c.send(&header),
        Err(HandshakeError::OptionTooLarge { .. })
    ));
}

// ---------------------------------------------------------------------------
// Meta contexts
// ---------------------------------------------------------------------------

fn meta_names(replies: &[Reply]) -> Vec<(u32, String)> {
    replies
        .iter()
        .filter(|r| r.ty == REP_META_CONTEXT)
        .map(|r| {
            (
                u32::from_be_bytes(r.data[..4].try_into().unwrap()),
                String::from_utf8(r.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn list_meta_context_matches_base_allocation() {
    let mut c = Client::started(TlsMode::Off);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    let want = vec![(0, BASE_ALLOCATION.to_owned())];
    for queries in [
        &[][..],
        &["base:"],
        &["base:allocation"],
        &["x-foo:bar", "base:"],
    ] {
        let replies = c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        assert_eq!(meta_names(&replies), want, "{queries:?}");
        assert_eq!(replies.last().unwrap().ty, REP_ACK);
    }
    for queries in [&["x-foo:"][..], &["base:other"], &["nocolon"]] {
        let replies = c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        single(&replies, OPT_LIST_META_CONTEXT, REP_ACK);
    }
    single(
        &c.option(OPT_LIST_META_CONTEXT, &meta_data("missing", &[])),
        OPT_LIST_META_CONTEXT,
        REP_ERR_UNKNOWN,
    );
}

#[test]
fn malformed_meta_requests_are_invalid() {
    let mut c = Client::started(TlsMode::Off);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    let good = meta_data("disk", &["base:allocation"]);
    let mut lying_count = meta_data("disk", &[]);
    lying_count[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut trailing = good.clone();
    trailing.push(1);
    for data in [
        vec![],
        good[..good.len() - 1].to_vec(),
        lying_count,
        trailing,
    ] {
        for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            single(&c.option(option, &data), option, REP_ERR_INVALID);
        }
    }
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let mut c = Client::started(TlsMode::Off);
    single(
        &c.option(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ),
        OPT_SET_META_CONTEXT,
        REP_ERR_INVALID,
    );
}

#[test]
fn set_meta_context_selects_for_the_same_export() {
    let mut c = Client::started(TlsMode::Off);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    let replies = c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["x-other:thing", "base:allocation"]),
    );
    assert_eq!(
        meta_names(&replies),
        vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION.to_owned())]
    );
    assert_eq!(replies.last().unwrap().ty, REP_ACK);
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_GO, &info_data("disk", &[]))) else {
        panic!()
    };
    assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
}

#[test]
fn set_meta_context_for_another_export_is_dropped() {
    let mut c = Client::started(TlsMode::Off);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    c.option(OPT_SET_META_CONTEXT, &meta_data("ro", &["base:allocation"]));
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_GO, &info_data("disk", &[]))) else {
        panic!()
    };
    assert_eq!(n.base_allocation, None);
}

#[test]
fn set_meta_context_applies_to_export_name_too() {
    let mut c = Client::started(TlsMode::Off);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_EXPORT_NAME, b"disk")) else {
        panic!()
    };
    assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
}

#[test]
fn set_meta_context_wildcard_and_failures_select_nothing() {
    let mut c = Client::started(TlsMode::Off);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    // "base:" must be ignored by SET.
    single(
        &c.option(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:"])),
        OPT_SET_META_CONTEXT,
        REP_ACK,
    );
    // A select, then a failing SET: the failure replaces the selection.
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    single(
        &c.option(
            OPT_SET_META_CONTEXT,
            &meta_data("missing", &["base:allocation"]),
        ),
        OPT_SET_META_CONTEXT,
        REP_ERR_UNKNOWN,
    );
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_GO, &info_data("disk", &[]))) else {
        panic!()
    };
    assert_eq!(n.base_allocation, None);
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

#[test]
fn starttls_unsupported_when_off() {
    let mut c = Client::started(TlsMode::Off);
    single(&c.option(OPT_STARTTLS, &[]), OPT_STARTTLS, REP_ERR_UNSUP);
}

#[test]
fn starttls_upgrade_resets_state() {
    let mut c = Client::started(TlsMode::On);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    single(&c.option(OPT_STARTTLS, b"x"), OPT_STARTTLS, REP_ERR_INVALID);
    assert!(matches!(
        c.send(&opt(OPT_STARTTLS, &[])),
        Ok(Step::StartTls)
    ));
    single(&c.take_replies(), OPT_STARTTLS, REP_ACK);
    assert!(matches!(c.send(&[]), Err(HandshakeError::TlsPending)));
    c.hs.tls_started();
    assert!(c.hs.tls_active());
    single(&c.option(OPT_STARTTLS, &[]), OPT_STARTTLS, REP_ERR_INVALID);
    let Ok(Step::Transmission(n)) = c.send(&opt(OPT_GO, &info_data("disk", &[]))) else {
        panic!()
    };
    // Structured replies were negotiated before TLS: forgotten.
    assert!(!n.structured_replies);
}

#[test]
fn plaintext_after_starttls_is_fatal() {
    let mut c = Client::started(TlsMode::On);
    let mut bytes = opt(OPT_STARTTLS, &[]);
    bytes.extend_from_slice(&opt(OPT_LIST, &[]));
    assert!(matches!(
        c.send(&bytes),
        Err(HandshakeError::PlaintextAfterStartTls(16))
    ));
}

#[test]
fn tls_on_allows_plaintext() {
    let mut c = Client::started(TlsMode::On);
    assert_eq!(c.option(OPT_LIST, &[]).last().unwrap().ty, REP_ACK);
    assert!(matches!(
        c.send(&opt(OPT_EXPORT_NAME, b"disk")),
        Ok(Step::Transmission(_))
    ));
}

#[test]
fn tls_require_refuses_everything_before_tls() {
    let mut c = Client::started(TlsMode::Require);
    for (option, data) in [
        (OPT_LIST, vec![]),
        (OPT_INFO, info_data("disk", &[])),
        (OPT_GO, info_data("disk", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_LIST_META_CONTEXT, meta_data("disk", &[])),
        (OPT_SET_META_CONTEXT, meta_data("disk", &[])),
        (77, vec![1, 2, 3]),
    ] {
        single(&c.option(option, &data), option, REP_ERR_TLS_REQD);
    }
    // Oversized options are refused the same way once discarded.
    let mut header = opt(OPT_INFO, &[]);
    header[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    c.send(&header).unwrap();
    assert!(matches!(
        c.send(&vec![0; MAX_OPTION_LEN as usize + 1]),
        Ok(Step::NeedInput)
    ));
    single(&c.take_replies(), OPT_INFO, REP_ERR_TLS_REQD);

    assert!(matches!(
        c.send(&opt(OPT_STARTTLS, &[])),
        Ok(Step::StartTls)
    ));
    c.out.clear();
    c.hs.tls_started();
    assert_eq!(c.option(OPT_LIST, &[]).last().unwrap().ty, REP_ACK);
    assert!(matches!(
        c.send(&opt(OPT_GO, &info_data("disk", &[]))),
        Ok(Step::Transmission(_))
    ));
}

#[test]
fn tls_require_export_name_before_tls_closes() {
    let mut c = Client::started(TlsMode::Require);
    assert!(matches!(
        c.send(&opt(OPT_EXPORT_NAME, b"disk")),
        Ok(Step::Closed)
    ));
    assert!(c.out.is_empty());
}

#[test]
fn tls_require_allows_abort() {
    let mut c = Client::started(TlsMode::Require);
    assert!(matches!(c.send(&opt(OPT_ABORT, &[])), Ok(Step::Closed)));
    single(&c.take_replies(), OPT_ABORT, REP_ACK);
}

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

#[test]
fn transmission_flags_follow_capabilities() {
    let cat = TestCatalog::standard();
    let disk = cat.lookup("disk").unwrap();
    let f = transmission_flags(&disk, false);
    for bit in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_FAST_ZERO,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_CACHE,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    assert_eq!(f & (FLAG_READ_ONLY | FLAG_SEND_DF), 0);
    assert_ne!(transmission_flags(&disk, true) & FLAG_SEND_DF, 0);

    let ro = cat.lookup("ro").unwrap();
    let f = transmission_flags(&ro, false);
    assert_ne!(f & FLAG_READ_ONLY, 0);
    assert_eq!(
        f & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO),
        0
    );

    let mut bare = disk.clone();
    bare.device.caps = blockcore::Capabilities {
        read_only: false,
        flush: false,
        fua: false,
        trim: false,
        write_zeroes: false,
        fast_zero: false,
        extents: false,
        prefetch: false,
        multi_conn: false,
    };
    let f = transmission_flags(&bare, false);
    assert_eq!(
        f,
        FLAG_HAS_FLAGS | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO | FLAG_SEND_CACHE
    );
    bare.device.caps.fua = true;
    assert_ne!(transmission_flags(&bare, false) & FLAG_SEND_FUA, 0);
}

// ---------------------------------------------------------------------------
// Chunking and robustness
// ---------------------------------------------------------------------------

/// A full realistic session as one byte string.
fn session() -> Vec<u8> {
    let mut s = client_flags(FIXED_NZ);
    s.extend(opt(OPT_LIST, &[]));
    s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    s.extend(opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])));
    s.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    ));
    s.extend(opt(OPT_INFO, &info_data("disk", &[INFO_NAME])));
    s.extend(opt(99, b"junk"));
    s.extend(opt(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE])));
    s
}

fn run_session(chunks: &[&[u8]]) -> (Vec<u8>, Option<Negotiated>) {
    let mut c = Client::new(TlsMode::Off);
    let mut result = None;
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        match c.send(chunk).unwrap() {
            Step::NeedInput => {}
            Step::Transmission(n) => result = Some(n),
            other => panic!("unexpected {other:?}"),
        }
    }
    (c.out.to_vec(), result)
}

#[test]
fn byte_at_a_time_matches_all_at_once() {
    let s = session();
    let (whole, n1) = run_session(&[&s]);
    let bytes: Vec<&[u8]> = s.chunks(1).collect();
    let (split, n2) = run_session(&bytes);
    assert_eq!(whole, split);
    let (n1, n2) = (n1.unwrap(), n2.unwrap());
    assert_eq!(n1.base_allocation, Some(BASE_ALLOCATION_ID));
    assert_eq!(n2.base_allocation, Some(BASE_ALLOCATION_ID));
    assert!(n2.structured_replies);
    let (replies, rest) = parse_replies(&whole);
    assert!(rest.is_empty());
    assert_eq!(replies.last().unwrap().ty, REP_ACK);
    assert_eq!(replies.last().unwrap().option, OPT_GO);
}

#[test]
fn every_split_point_gives_the_same_output() {
    let s = session();
    let (whole, _) = run_session(&[&s]);
    for i in 0..=s.len() {
        let (split, n) = run_session(&[&s[..i], &s[i..]]);
        assert_eq!(whole, split, "split at {i}");
        assert!(n.is_some());
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_or_overconsume(
        tls in 0u8..3,
        prefix in any::<bool>(),
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
    ) {
        let tls = [TlsMode::Off, TlsMode::On, TlsMode::Require][usize::from(tls)];
        let catalog = TestCatalog::standard();
        let mut out = BytesMut::new();
        let mut hs = Handshake::new(tls, &mut out);
        out.clear();
        let mut input = BytesMut::new();
        if prefix {
            // Start with valid flags so the fuzzing reaches option parsing.
            input.extend_from_slice(&client_flags(FIXED_NZ));
        }
        for chunk in chunks {
            let before = input.len() + chunk.len();
            input.extend_from_slice(&chunk);
            let r = hs.advance(&mut input, &catalog, &mut out);
            prop_assert!(input.len() <= before);
            match r {
                Ok(Step::NeedInput) => {}
                Ok(Step::StartTls) => hs.tls_started(),
                Ok(_) | Err(_) => break,
            }
        }
        // Everything produced is a sequence of option replies, possibly
        // followed by a 10- or 134-byte EXPORT_NAME answer.
        let (_, rest) = parse_replies(&out);
        prop_assert!(rest.is_empty() || rest.len() == 10 || rest.len() == 134);
    }

    #[test]
    fn arbitrary_option_payloads_get_exactly_one_final_reply(
        option in 0u32..16,
        data in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        prop_assume!(option != OPT_EXPORT_NAME && option != OPT_STARTTLS);
        let mut c = Client::started(TlsMode::Off);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        let r = c.send(&opt(option, &data)).unwrap();
        let (replies, rest) = parse_replies(&c.out);
        prop_assert!(rest.is_empty());
        let last = replies.last().unwrap();
        prop_assert_eq!(last.option, option);
        prop_assert!(last.ty == REP_ACK || last.ty & REP_FLAG_ERROR_BIT != 0);
        // Intermediate replies are never ACKs or errors.
        for r in &replies[..replies.len() - 1] {
            prop_assert!(r.ty != REP_ACK && r.ty & REP_FLAG_ERROR_BIT == 0);
        }
        if matches!(r, Step::Transmission(_)) {
            prop_assert_eq!(option, OPT_GO);
        }
    }
}
