//! Fuzzes the iSCSI login state machine (`login::Login::step`), then the
//! full-feature phase Text answers (`text::answer_text_update`) of a
//! session it let in.
//!
//! Three targets: `open` (no CHAP, no ACL), `chap` (mutual CHAP and an
//! ACL) and `acl` (no CHAP, an ACL); discovery sessions need CHAP unless
//! byte 16 bit 0 says otherwise. CHAP challenges come from a fixed-seed
//! generator, so runs are reproducible; random bytes cannot forge an MD5
//! CHAP response.
//!
//! Input layout:
//! - bytes 0-15: our configured limits, four big-endian u32s
//!   (MaxRecvDataSegmentLength, MaxBurstLength, FirstBurstLength,
//!   MaxOutstandingR2T), arbitrary: the login must sanitise them;
//! - byte 16: bit 0 open discovery, bit 1 ImmediateData, bit 2
//!   InitialR2T, bit 3 HeaderDigest, bit 4 DataDigest, bits 5-7
//!   DefaultTime2Wait / Time2Retain scale;
//! - then records of login requests: flags (bit 7 T, bit 6
//!   C, bits 2-3 CSG, bits 0-1 NSG), version_max, version_min, tsih_lo,
//!   cid_lo, len, then `len` bytes of login text. After a completed login,
//!   each further record's text is a full-feature phase Text Request.
//!
//! Invariants checked:
//! - no login completes for the CHAP target (or for discovery while it
//!   needs CHAP), nor for an initiator outside a target's ACL;
//! - every response's data segment parses back as key=value text;
//! - Continue answers carry status 0, Fail a non-zero class, Complete
//!   transits to full-feature phase; after the end every step fails;
//! - negotiated values are within RFC 7143 ranges (512..=2^24-1 for data
//!   lengths, FirstBurstLength <= MaxBurstLength, MaxOutstandingR2T and
//!   MaxConnections 1..=65535, ErrorRecoveryLevel 0, times <= 3600) and
//!   within our sanitised limits; digests and ImmediateData only when we
//!   allow them, InitialR2T whenever we insist;
//! - Text answers parse back, list only targets the initiator may see,
//!   and keep the initiator's MaxRecvDataSegmentLength in range.
#![no_main]

use std::sync::Arc;

use iscsi_target::login::{
    ChapConfig, Limits, Login, LoginConfig, LoginRequest, LoginResponse, LoginStep, SessionKind,
    SessionParams, TargetConfig,
};
use iscsi_target::text::{
    answer_text_update, initiator_allowed, parse_pairs, MAX_DATA_LENGTH, MIN_DATA_LENGTH,
};
use libfuzzer_sys::fuzz_target;

const OPEN: &str = "iqn.2024-01.io.ferry:open";
const CHAP: &str = "iqn.2024-01.io.ferry:chap";
const ACL: &str = "iqn.2024-01.io.ferry:acl";

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn config(head: &[u8]) -> LoginConfig {
    let flags = head[16];
    let scale = u32::from(flags >> 5);
    LoginConfig {
        targets: vec![
            TargetConfig {
                name: OPEN.into(),
                alias: Some("open".into()),
                allowed_initiators: Vec::new(),
                chap: None,
            },
            TargetConfig {
                name: CHAP.into(),
                alias: None,
                allowed_initiators: vec!["iqn.2024-01.io.client:a".into()],
                chap: Some(ChapConfig {
                    user: "user".into(),
                    secret: b"secretsecret".to_vec(),
                    mutual: Some(("tgt".into(), b"mutualsecret".to_vec())),
                }),
            },
            TargetConfig {
                name: ACL.into(),
                alias: None,
                allowed_initiators: vec!["iqn.2024-01.io.client:b".into()],
                chap: None,
            },
        ],
        portal_group_tag: 1,
        portals: vec!["127.0.0.1:3260,1".into(), "[::1]:3260,1".into()],
        limits: Limits {
            max_recv_data_segment_length: be32(head, 0),
            max_burst_length: be32(head, 4),
            first_burst_length: be32(head, 8),
            max_outstanding_r2t: be32(head, 12),
            immediate_data: flags & 2 != 0,
            initial_r2t: flags & 4 != 0,
            header_digest: flags & 8 != 0,
            data_digest: flags & 16 != 0,
            default_time2wait: scale * 700,
            default_time2retain: scale * 600,
            ..Limits::default()
        },
        discovery_chap: (flags & 1 == 0).then(|| ChapConfig {
            user: "d".into(),
            secret: b"discoverysecret".to_vec(),
            mutual: None,
        }),
    }
}

/// Checks the response text parses, and collects its pairs.
fn check_response(r: &LoginResponse, answers: &mut Vec<(String, String)>) {
    match parse_pairs(&r.data) {
        Ok(pairs) => answers.extend(pairs),
        Err(e) => panic!(
            "response text does not parse ({e}): {:?}",
            String::from_utf8_lossy(&r.data)
        ),
    }
}

/// `answers`: every key=value the target sent during the login.
fn check_session(config: &LoginConfig, s: &SessionParams, answers: &[(String, String)]) {
    match &s.kind {
        SessionKind::Discovery => {
            assert!(config.discovery_chap.is_none(), "discovery without CHAP");
        }
        SessionKind::Normal { target } => {
            assert_ne!(target, CHAP, "CHAP target entered without CHAP");
            let t = config
                .targets
                .iter()
                .find(|t| t.name == *target)
                .expect("a configured target");
            assert!(t.chap.is_none());
            assert!(initiator_allowed(t, &s.initiator_name), "ACL bypassed");
        }
    }
    let n = &s.negotiated;
    let ours = config.limits.sanitized();
    let range = MIN_DATA_LENGTH..=MAX_DATA_LENGTH;
    for (what, v) in [
        ("MaxRecvDataSegmentLength (theirs)", n.max_send_data_segment),
        ("MaxRecvDataSegmentLength (ours)", n.max_recv_data_segment),
        ("FirstBurstLength", n.first_burst_length),
        ("MaxBurstLength", n.max_burst_length),
    ] {
        assert!(range.contains(&v), "{what} = {v} out of range: {n:?}");
    }
    assert!(n.first_burst_length <= n.max_burst_length, "{n:?}");
    // Within our own limits (a proposal we answer "Reject" does not stop
    // our offer of a lower limit).
    if matches!(s.kind, SessionKind::Normal { .. }) {
        assert!(
            n.max_burst_length <= ours.max_burst_length,
            "{n:?} vs {ours:?}"
        );
        assert!(
            n.first_burst_length <= ours.first_burst_length,
            "{n:?} vs {ours:?}"
        );
        assert!(!n.immediate_data || ours.immediate_data, "{n:?}");
        assert!(n.max_outstanding_r2t <= ours.max_outstanding_r2t, "{n:?}");
        assert!(n.initial_r2t || !ours.initial_r2t, "{n:?}");
    }
    assert!((1..=65535).contains(&n.max_outstanding_r2t), "{n:?}");
    assert!((1..=65535).contains(&n.max_connections), "{n:?}");
    assert_eq!(n.error_recovery_level, 0, "{n:?}");
    assert!(
        n.default_time2wait <= 3600 && n.default_time2retain <= 3600,
        "{n:?}"
    );
    assert!(!n.header_digest || ours.header_digest, "{n:?}");
    assert!(!n.data_digest || ours.data_digest, "{n:?}");
    assert!(n.data_pdu_in_order && n.data_sequence_in_order, "{n:?}");
}

fn check_text(config: &LoginConfig, session: &mut SessionParams, request: &[u8]) {
    let Ok(answer) = answer_text_update(config, session, request) else {
        return;
    };
    let pairs = parse_pairs(&answer).expect("a Text answer parses back");
    for (k, v) in &pairs {
        // (A TargetName key in the request is answered "Reject".)
        if k == "TargetName" && v != "Reject" {
            let t = config
                .targets
                .iter()
                .find(|t| t.name == *v)
                .expect("a configured target");
            assert!(
                initiator_allowed(t, &session.initiator_name),
                "SendTargets shows {v}"
            );
        }
    }
    let m = session.negotiated.max_send_data_segment;
    assert!(
        (MIN_DATA_LENGTH..=MAX_DATA_LENGTH).contains(&m),
        "declared {m}"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (head, mut rest) = data.split_at(17);
    let config = Arc::new(config(head));
    // Deterministic, fixed-seed challenge bytes (xorshift).
    let mut state = 0x9e37_79b9u32;
    let mut login = Login::with_rng(
        Arc::clone(&config),
        Box::new(move |buf: &mut [u8]| {
            for b in buf {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *b = state as u8;
            }
            true
        }),
    );
    let mut session: Option<SessionParams> = None;
    let mut answers: Vec<(String, String)> = Vec::new();
    let mut cmdsn = 1u32;
    while rest.len() >= 6 {
        let (h, tail) = rest.split_at(6);
        let len = usize::from(h[5]).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        if let Some(s) = session.as_mut() {
            check_text(&config, s, body);
            continue;
        }
        cmdsn = cmdsn.wrapping_add(u32::from(h[3] & 1));
        let req = LoginRequest {
            transit: h[0] & 0x80 != 0,
            cont: h[0] & 0x40 != 0,
            csg: (h[0] >> 2) & 3,
            nsg: h[0] & 3,
            version_max: h[1],
            version_min: h[2],
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: u16::from(h[3] >> 1),
            itt: 1,
            cid: u16::from(h[4]),
            cmdsn,
            exp_statsn: 0,
            data: bytes::Bytes::copy_from_slice(body),
        };
        let finished_before = login.is_finished();
        match login.step(&req) {
            LoginStep::Continue(r) => {
                assert!(!finished_before, "step after the end must fail");
                assert_eq!(r.status(), 0);
                check_response(&r, &mut answers);
                assert!(!login.is_finished());
            }
            LoginStep::Fail(r) => {
                assert_ne!(r.status_class, 0, "a failure with status 0");
                check_response(&r, &mut answers);
                assert!(login.is_finished());
            }
            LoginStep::Complete {
                response,
                session: s,
            } => {
                assert!(!finished_before, "step after the end must fail");
                assert_eq!(response.status(), 0);
                assert!(response.transit && response.nsg == 3, "{response:?}");
                check_response(&response, &mut answers);
                assert!(login.is_finished());
                assert_eq!(s.cmdsn, cmdsn);
                check_session(&config, &s, &answers);
                session = Some(s);
            }
        }
    }
});
