//! Fuzzes the iSCSI PDU codec and the full-feature phase connection state
//! machine (`pdu::decode`, `InitiatorPdu::parse`, `session::Connection`).
//!
//! Input layout:
//! - byte 0: framing: bit 0 header digest, bit 1 data digest, bits 2-7 our
//!   MaxRecvDataSegmentLength (512 + 128 * n, small so oversized segments
//!   are common);
//! - byte 1: limits: bit 0 ImmediateData, bit 1 InitialR2T, bits 2-3
//!   MaxOutstandingR2T - 1, bits 4-5 MaxBurstLength, bit 6 FirstBurstLength
//!   below MaxBurstLength, bit 7 discovery session (rarely useful: commands
//!   are rejected there, so only when byte 2 bit 7 is set too);
//! - byte 2: bits 0-4 the initiator's MaxRecvDataSegmentLength (512 + 256 *
//!   n, our largest Data-In), bits 5-6 the starting CmdSN / StatSN (near 0
//!   or near a wrap), bit 7 see above;
//! - byte 3: seed of the chunk sizes and of every harness decision (when
//!   to complete commands, with what outcome, how much time passes);
//! - the rest: the initiator's byte stream, fed in chunks of 1..=128 bytes.
//!
//! Commands are planned by a stub: READ/WRITE (10)/(16) move 512-byte
//! blocks, INQUIRY returns its allocation length, TEST UNIT READY nothing,
//! anything else is an invalid opcode. Executed commands complete (at once
//! or later, in any order) with GOOD and up to the planned Data-In, CHECK
//! CONDITION or RESERVATION CONFLICT.
//!
//! Invariants checked:
//! - `decode` never consumes more than one PDU's frame, nothing when it
//!   waits, and never waits while a whole PDU is buffered;
//! - every emitted PDU encodes to a multiple of 4 bytes whose header
//!   DataSegmentLength matches its data, and decodes back (digests too);
//! - StatSN advances by exactly 1 on each status-carrying PDU, other PDUs
//!   carry the next StatSN; ExpCmdSN and MaxCmdSN never move backwards and
//!   ExpCmdSN <= MaxCmdSN + 1;
//! - Data-In segments are at most the initiator's MaxRecvDataSegmentLength
//!   (as last declared), DataSN counts 0, 1, 2.. and buffer offsets are
//!   contiguous within a task, stay within the Expected Data Transfer
//!   Length, and status comes last with F set; the SCSI Response's
//!   ExpDataSN is the number of Data-In PDUs sent; sense accompanies CHECK
//!   CONDITION and nothing else;
//! - R2Ts ask for 1..=MaxBurstLength bytes within the EDTL;
//! - an Execute is for a command that was sent, plans successfully and
//!   carries no more Data-Out than that command's EDTL;
//! - no data segment exceeds the initiator's MaxRecvDataSegmentLength.
#![no_main]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_target::login::{LoginConfig, Negotiated, SessionKind, SessionParams, TargetConfig};
use iscsi_target::pdu::{
    self, reject_reason, Framing, InitiatorPdu, PduError, SeqNums, TargetPdu, BHS_LEN,
};
use iscsi_target::scsi::{status, CommandShape, Outcome, Sense};
use iscsi_target::session::{Action, Connection, Limits, Planner, TextAnswer};
use libfuzzer_sys::fuzz_target;

/// Largest Data-In a completion produces (the planned length is cut to it).
const MAX_DATA_IN: u32 = 256 * 1024;

struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

/// Serial number arithmetic (RFC 1982).
fn sn_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < 0x8000_0000
}

struct StubPlanner;

impl Planner for StubPlanner {
    fn shape(&self, _lun: u64, cdb: &[u8]) -> Result<CommandShape, Sense> {
        if cdb.len() < 16 {
            return Err(Sense::INVALID_COMMAND_OPERATION_CODE);
        }
        let be16 = |at: usize| u32::from(u16::from_be_bytes([cdb[at], cdb[at + 1]]));
        let be32 = |at: usize| u32::from_be_bytes([cdb[at], cdb[at + 1], cdb[at + 2], cdb[at + 3]]);
        let bytes = |blocks: u32| blocks.saturating_mul(512);
        let (data_out_len, data_in_len) = match cdb[0] {
            0x00 => (0, 0),
            0x12 => (0, be16(3)),
            0x28 => (0, bytes(be16(7))),
            0x2a => (bytes(be16(7)), 0),
            0x88 => (0, bytes(be32(10))),
            0x8a => (bytes(be32(10)), 0),
            _ => return Err(Sense::INVALID_COMMAND_OPERATION_CODE),
        };
        Ok(CommandShape {
            data_out_len,
            data_in_len,
        })
    }
}

fn seq_of(p: &TargetPdu) -> SeqNums {
    match p {
        TargetPdu::NopIn { seq, .. }
        | TargetPdu::ScsiResponse { seq, .. }
        | TargetPdu::TaskManagementResponse { seq, .. }
        | TargetPdu::LoginResponse { seq, .. }
        | TargetPdu::TextResponse { seq, .. }
        | TargetPdu::DataIn { seq, .. }
        | TargetPdu::LogoutResponse { seq, .. }
        | TargetPdu::R2T { seq, .. }
        | TargetPdu::AsyncMessage { seq, .. }
        | TargetPdu::Reject { seq, .. } => *seq,
    }
}

/// The data segment length the PDU must declare.
fn data_len(p: &TargetPdu) -> usize {
    match p {
        TargetPdu::NopIn { data, .. }
        | TargetPdu::LoginResponse { data, .. }
        | TargetPdu::TextResponse { data, .. }
        | TargetPdu::DataIn { data, .. }
        | TargetPdu::AsyncMessage { data, .. } => data.len(),
        TargetPdu::ScsiResponse { sense, .. } => {
            if sense.is_empty() {
                0
            } else {
                2 + sense.len()
            }
        }
        TargetPdu::Reject { .. } => BHS_LEN,
        TargetPdu::TaskManagementResponse { .. }
        | TargetPdu::LogoutResponse { .. }
        | TargetPdu::R2T { .. } => 0,
    }
}

/// The frame length `decode` must cut for the header at the front of
/// `buf`, or None without a whole BHS; Err when the segment is too long.
fn frame_len(buf: &[u8], framing: &Framing) -> Option<Result<usize, ()>> {
    if buf.len() < BHS_LEN {
        return None;
    }
    let ahs = usize::from(buf[4]) * 4;
    let dl = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]);
    if dl > framing.max_recv_data_segment {
        return Some(Err(()));
    }
    let dl = dl as usize;
    let hd = if framing.header_digest { 4 } else { 0 };
    let dd = if framing.data_digest && dl > 0 { 4 } else { 0 };
    Some(Ok(BHS_LEN + ahs + hd + dl.div_ceil(4) * 4 + dd))
}

struct Checker {
    framing: Framing,
    max_burst: u32,
    /// The initiator's MaxRecvDataSegmentLength, as last declared.
    max_send: Arc<AtomicU32>,
    next_stat_sn: u32,
    last_window: Option<(u32, u32)>,
    /// Per ITT: next DataSN and buffer offset of the Data-In in progress.
    data_in: HashMap<u32, (u32, u32)>,
    /// Every SCSI command fed: ITT -> (CDB, EDTL) of each.
    commands: HashMap<u32, Vec<(Bytes, u32)>>,
}

impl Checker {
    fn max_edtl(&self, itt: u32) -> u32 {
        let cmds = self.commands.get(&itt);
        let cmds = cmds.unwrap_or_else(|| panic!("PDU for ITT {itt:#x}, never a command"));
        cmds.iter().map(|(_, e)| *e).max().unwrap_or(0)
    }

    fn check_encoding(&self, p: &TargetPdu) {
        let mut out = BytesMut::new();
        p.encode(&self.framing, &mut out);
        assert_eq!(out.len() % 4, 0, "unpadded PDU {p:?}");
        let dl = u32::from_be_bytes([0, out[5], out[6], out[7]]) as usize;
        assert_eq!(dl, data_len(p), "DataSegmentLength of {p:?}");
        // It decodes back as one whole frame, digests included.
        let wide = Framing {
            max_recv_data_segment: (1 << 24) - 1,
            ..self.framing
        };
        let raw = pdu::decode(&mut out, &wide)
            .expect("an encoded PDU decodes")
            .expect("an encoded PDU is whole");
        assert!(out.is_empty(), "trailing bytes after an encoded PDU");
        assert_eq!(raw.data.len(), dl);
    }

    fn check_pdu(&mut self, p: &TargetPdu) {
        self.check_encoding(p);
        let seq = seq_of(p);
        assert_eq!(seq.stat_sn, self.next_stat_sn, "StatSN of {p:?}");
        if p.advances_stat_sn() {
            self.next_stat_sn = self.next_stat_sn.wrapping_add(1);
        }
        assert!(
            sn_le(seq.exp_cmd_sn, seq.max_cmd_sn.wrapping_add(1)),
            "ExpCmdSN beyond MaxCmdSN + 1: {seq:?}"
        );
        if let Some((exp, max)) = self.last_window {
            assert!(sn_le(exp, seq.exp_cmd_sn), "ExpCmdSN went back: {seq:?}");
            assert!(sn_le(max, seq.max_cmd_sn), "MaxCmdSN went back: {seq:?}");
        }
        self.last_window = Some((seq.exp_cmd_sn, seq.max_cmd_sn));
        let max_send = self.max_send.load(Ordering::Relaxed);
        // Nothing exceeds the initiator's MaxRecvDataSegmentLength (a
        // NOP-In's echo is cut to it).
        assert!(data_len(p) <= max_send as usize, "{p:?} over {max_send}");
        match p {
            TargetPdu::DataIn {
                final_,
                status,
                itt,
                data_sn,
                buffer_offset,
                data,
                ..
            } => {
                let len = u32::try_from(data.len()).unwrap();
                assert!(len <= max_send, "Data-In of {len} > {max_send}");
                let (sn, offset) = self.data_in.remove(itt).unwrap_or((0, 0));
                assert_eq!(*data_sn, sn, "DataSN");
                assert_eq!(*buffer_offset, offset, "Data-In buffer offset");
                let end = offset + len;
                assert!(end <= self.max_edtl(*itt), "Data-In beyond the EDTL");
                if status.is_some() {
                    assert!(final_, "status in a Data-In without F");
                    assert_eq!(*status, Some(status::GOOD));
                } else {
                    self.data_in.insert(*itt, (sn + 1, end));
                }
            }
            TargetPdu::ScsiResponse {
                itt,
                status,
                exp_data_sn,
                sense,
                ..
            } => {
                let (sn, _) = self.data_in.remove(itt).unwrap_or((0, 0));
                assert_eq!(*exp_data_sn, sn, "ExpDataSN");
                assert_eq!(
                    *status == status::CHECK_CONDITION,
                    !sense.is_empty(),
                    "sense with status {status:#x}"
                );
            }
            TargetPdu::R2T {
                itt,
                buffer_offset,
                desired_length,
                ..
            } => {
                assert!(*desired_length > 0 && *desired_length <= self.max_burst);
                let end = buffer_offset.checked_add(*desired_length).unwrap();
                assert!(end <= self.max_edtl(*itt), "R2T beyond the EDTL");
            }
            _ => {}
        }
    }
}

fn outcome(shape: CommandShape, rng: &mut Rng) -> Outcome {
    let planned = shape.data_in_len.min(MAX_DATA_IN);
    let len = match rng.next() % 8 {
        0 => return Outcome::check(Sense::LBA_OUT_OF_RANGE),
        1 => return Outcome::conflict(),
        2 => rng.next() % (planned + 1),
        _ => planned,
    };
    Outcome::good(vec![0xa5u8; len as usize])
}

struct Harness {
    conn: Connection,
    checker: Checker,
    /// Executing commands: ITT and outcome.
    pending: Vec<(u32, Outcome)>,
    closed: bool,
}

impl Harness {
    fn drain(&mut self, rng: &mut Rng) {
        while let Some(action) = self.conn.poll_action() {
            match action {
                Action::Send(p) => self.checker.check_pdu(&p),
                Action::Execute {
                    itt,
                    lun,
                    cdb,
                    data_out,
                } => {
                    let edtl = self
                        .checker
                        .commands
                        .get(&itt)
                        .and_then(|cmds| {
                            cmds.iter()
                                .filter(|(c, _)| *c == cdb)
                                .map(|(_, e)| *e)
                                .max()
                        })
                        .unwrap_or_else(|| panic!("Execute of a command never sent: {itt:#x}"));
                    assert!(
                        data_out.len() <= edtl as usize,
                        "{} bytes of Data-Out for an EDTL of {edtl}",
                        data_out.len()
                    );
                    let shape = StubPlanner
                        .shape(lun, &cdb)
                        .expect("only planned commands execute");
                    self.pending.push((itt, outcome(shape, rng)));
                }
                Action::Reset { .. } => {}
                Action::Close(_) => self.closed = true,
            }
        }
    }

    /// Completes some executing commands, in any order.
    fn complete_some(&mut self, rng: &mut Rng, all: bool) {
        let n = if all {
            self.pending.len()
        } else {
            (rng.next() % 3) as usize
        };
        for _ in 0..n {
            if self.pending.is_empty() {
                break;
            }
            let i = rng.next() as usize % self.pending.len();
            let (itt, outcome) = self.pending.swap_remove(i);
            self.conn.complete(itt, outcome);
            self.drain(rng);
        }
    }
}

fn text_responder(
    discovery: bool,
    max_send: Arc<AtomicU32>,
) -> Box<dyn FnMut(&[u8]) -> TextAnswer + Send> {
    let config = LoginConfig {
        targets: vec![
            TargetConfig {
                name: "iqn.2024-01.io.ferry:a".into(),
                alias: None,
                allowed_initiators: Vec::new(),
                chap: None,
            },
            TargetConfig {
                name: "iqn.2024-01.io.ferry:b".into(),
                alias: None,
                allowed_initiators: vec!["iqn.2024-01.io.client:other".into()],
                chap: None,
            },
        ],
        portals: vec!["127.0.0.1:3260,1".into()],
        ..LoginConfig::default()
    };
    let mut session = SessionParams {
        kind: if discovery {
            SessionKind::Discovery
        } else {
            SessionKind::Normal {
                target: "iqn.2024-01.io.ferry:a".into(),
            }
        },
        initiator_name: "iqn.2024-01.io.client:fuzz".into(),
        initiator_alias: None,
        isid: [0x80, 0, 0, 0, 0, 1],
        requested_tsih: 0,
        cid: 0,
        negotiated: Negotiated {
            max_send_data_segment: max_send.load(Ordering::Relaxed),
            ..Negotiated::default()
        },
        cmdsn: 0,
    };
    Box::new(move |req: &[u8]| {
        let before = session.negotiated.max_send_data_segment;
        match iscsi_target::text::answer_text_update(&config, &mut session, req) {
            Ok(data) => {
                let after = session.negotiated.max_send_data_segment;
                assert!(
                    (512..(1 << 24)).contains(&after),
                    "MaxRecvDataSegmentLength {after}"
                );
                max_send.store(after, Ordering::Relaxed);
                TextAnswer::Reply {
                    data,
                    max_send_data_segment: (after != before).then_some(after),
                }
            }
            Err(_) => TextAnswer::Malformed,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let framing = Framing {
        header_digest: data[0] & 1 != 0,
        data_digest: data[0] & 2 != 0,
        max_recv_data_segment: 512 + 128 * u32::from(data[0] >> 2),
    };
    let max_burst = [512, 4096, 16384, 65536][usize::from((data[1] >> 4) & 3)];
    let limits = Limits {
        max_send_data_segment: 512 + 256 * u32::from(data[2] & 0x1f),
        max_recv_data_segment: framing.max_recv_data_segment,
        first_burst_length: if data[1] & 0x40 != 0 {
            max_burst / 2
        } else {
            max_burst
        }
        .max(512),
        max_burst_length: max_burst,
        immediate_data: data[1] & 1 != 0,
        initial_r2t: data[1] & 2 != 0,
        max_outstanding_r2t: 1 + u32::from((data[1] >> 2) & 3),
    };
    let discovery = data[1] & data[2] & 0x80 != 0;
    let start_sn = [0u32, 1, 0x7fff_fff0, 0xffff_fff0][usize::from((data[2] >> 5) & 3)];
    let mut rng = Rng(u32::from(data[3]) | 0x100);
    let mut stream = &data[4..];

    let max_send = Arc::new(AtomicU32::new(limits.max_send_data_segment));
    let start = Instant::now();
    let mut now = start;
    let conn = Connection::new(
        limits,
        discovery,
        start_sn.wrapping_add(7),
        start_sn,
        text_responder(discovery, Arc::clone(&max_send)),
        start,
    );
    let mut h = Harness {
        conn,
        checker: Checker {
            framing,
            max_burst: limits.max_burst_length,
            max_send,
            next_stat_sn: start_sn.wrapping_add(7),
            last_window: None,
            data_in: HashMap::new(),
            commands: HashMap::new(),
        },
        pending: Vec::new(),
        closed: false,
    };

    let mut buf = BytesMut::new();
    'stream: while !stream.is_empty() && !h.closed {
        let k = (rng.next() as usize % 128 + 1).min(stream.len());
        let (chunk, tail) = stream.split_at(k);
        stream = tail;
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            let expected = frame_len(&buf, &framing);
            match pdu::decode(&mut buf, &framing) {
                Ok(Some(raw)) => {
                    let Some(Ok(total)) = expected else {
                        panic!("decoded a PDU from {before} bytes, expected {expected:?}")
                    };
                    assert_eq!(before - buf.len(), total, "frame length");
                    assert_eq!(raw.ahs.len(), usize::from(raw.bhs[4]) * 4);
                    let dl = u32::from_be_bytes([0, raw.bhs[5], raw.bhs[6], raw.bhs[7]]);
                    assert_eq!(raw.data.len(), dl as usize);
                    let bhs = raw.bhs;
                    match InitiatorPdu::parse(raw) {
                        Ok(p) => {
                            if let InitiatorPdu::ScsiCommand(c) = &p {
                                h.checker
                                    .commands
                                    .entry(c.itt)
                                    .or_default()
                                    .push((c.cdb.clone(), c.expected_data_length));
                            }
                            h.conn.receive(p, &bhs, &StubPlanner, now);
                            h.drain(&mut rng);
                        }
                        Err(_) => {
                            // As the shell does: reject, then drop.
                            h.conn.reject(reject_reason::PROTOCOL_ERROR, bhs);
                            h.drain(&mut rng);
                            break 'stream;
                        }
                    }
                    if h.closed {
                        break 'stream;
                    }
                    h.complete_some(&mut rng, false);
                    if rng.next() % 16 == 0 {
                        now += Duration::from_secs(u64::from(rng.next() % 40));
                        h.conn.tick(now);
                        h.drain(&mut rng);
                    }
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "decode consumed bytes while waiting");
                    if let Some(total) = expected {
                        let total = total.expect("an oversized segment must be refused");
                        assert!(buf.len() < total, "a whole PDU left undecoded");
                    }
                    break;
                }
                Err(e) => {
                    if let PduError::DataSegmentTooLong { len, max } = e {
                        assert!(len > max && max == framing.max_recv_data_segment);
                    }
                    if matches!(e, PduError::HeaderDigest { .. }) {
                        assert!(framing.header_digest);
                    }
                    if let PduError::DataDigest { bhs, .. } = e {
                        assert!(framing.data_digest);
                        h.conn.reject(reject_reason::DATA_DIGEST_ERROR, *bhs);
                        h.drain(&mut rng);
                    }
                    break 'stream;
                }
            }
        }
    }
    // Everything executing finishes.
    h.complete_some(&mut rng, true);
    h.drain(&mut rng);
});
