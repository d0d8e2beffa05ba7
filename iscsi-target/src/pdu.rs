//! iSCSI PDUs (RFC 7143 §11): framing, digests, decoding of what an
//! initiator sends and encoding of what the target answers.
//!
//! Every PDU is a 48-byte Basic Header Segment, optional Additional Header
//! Segments, an optional header digest, a data segment padded to 4 bytes
//! and an optional data digest:
//!
//! ```text
//!  0      1      2      3      4       5..8      8..16   16..20  20..48
//! +------+------+------+------+-------+---------+-------+-------+-----------+
//! |I|opc | flags| opcode-spec | AHSlen| DataLen | LUN / | ITT   | opcode-   |
//! |      |      |             | (x4)  | (24 bit)| spec. |       | specific  |
//! +------+------+------+------+-------+---------+-------+-------+-----------+
//! | AHS (AHSlen*4) | HeaderDigest? | Data (pad to 4) | DataDigest? |
//! ```
//!
//! Digests are CRC32C, stored little-endian (RFC 7143 §13.1 and Appendix B:
//! the CRC is sent least significant byte first).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The "reserved" tag value: no initiator task / no target transfer tag.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes (RFC 7143 §11.1.1).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MANAGEMENT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const TEXT: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MANAGEMENT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Why a byte stream is not a valid PDU. Every variant ends the connection
/// (error recovery level 0), except [`PduError::DataDigest`], which is
/// answered with a Reject first.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PduError {
    #[error("header digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data digest mismatch on a {opcode:#04x} PDU")]
    DataDigest { opcode: u8, bhs: Box<[u8; BHS_LEN]> },
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    #[error("opcode {0:#04x} is not an initiator opcode")]
    UnknownOpcode(u8),
    #[error("malformed additional header segment")]
    BadAhs,
}

/// How PDUs are framed on one connection: negotiated at login, and fixed
/// (no digests, 8 KiB segments) while logging in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest data segment we accept (our MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
}

impl Framing {
    /// Login PDUs: no digests; RFC 7143 §6.1 lets a login data segment be
    /// up to 8192 bytes before MaxRecvDataSegmentLength is negotiated.
    pub const LOGIN: Framing = Framing {
        header_digest: false,
        data_digest: false,
        max_recv_data_segment: 8192,
    };
}

/// One received PDU, split into its parts; digests already checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// CRC32C as iSCSI sends it.
pub fn digest(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// Takes one PDU off the front of `buf`, or `Ok(None)` if it is not all
/// there yet (then nothing is consumed). On error the connection must be
/// dropped (or, for a data digest error, the PDU rejected first): the
/// buffer is then in an unspecified state.
pub fn decode(buf: &mut BytesMut, framing: &Framing) -> Result<Option<RawPdu>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let ahs_len = usize::from(buf[4]) * 4;
    let data_len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]);
    // Login and the first PDU on a connection are framed without digests;
    // the caller switches framing after login completes.
    if data_len > framing.max_recv_data_segment {
        return Err(PduError::DataSegmentTooLong {
            len: data_len,
            max: framing.max_recv_data_segment,
        });
    }
    let data_len = data_len as usize;
    let hd = if framing.header_digest { 4 } else { 0 };
    let dd = if framing.data_digest && data_len > 0 {
        4
    } else {
        0
    };
    let total = BHS_LEN + ahs_len + hd + data_len + pad4(data_len) + dd;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut pdu = buf.split_to(total);
    if framing.header_digest {
        let computed = digest(&[&pdu[..BHS_LEN + ahs_len]]);
        let at = BHS_LEN + ahs_len;
        let received = u32::from_le_bytes([pdu[at], pdu[at + 1], pdu[at + 2], pdu[at + 3]]);
        if computed != received {
            return Err(PduError::HeaderDigest { received, computed });
        }
    }
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&pdu[..BHS_LEN]);
    if dd == 4 {
        let start = BHS_LEN + ahs_len + hd;
        let end = start + data_len + pad4(data_len);
        let computed = digest(&[&pdu[start..end]]);
        let received = u32::from_le_bytes([pdu[end], pdu[end + 1], pdu[end + 2], pdu[end + 3]]);
        if computed != received {
            return Err(PduError::DataDigest {
                opcode: bhs[0] & 0x3f,
                bhs: Box::new(bhs),
            });
        }
    }
    pdu.advance(BHS_LEN);
    let ahs = pdu.split_to(ahs_len).freeze();
    pdu.advance(hd);
    let data = pdu.split_to(data_len).freeze();
    Ok(Some(RawPdu { bhs, ahs, data }))
}

/// A SCSI Command PDU (RFC 7143 §11.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_length: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    /// The CDB: 16 bytes from the BHS, plus an Extended CDB AHS if present.
    pub cdb: Bytes,
    /// Immediate data.
    pub data: Bytes,
}

/// A SCSI Data-Out PDU (§11.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_statsn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub data: Bytes,
}

/// A NOP-Out PDU (§11.18).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub data: Bytes,
}

/// A Task Management Function Request (§11.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskManagement {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub ref_cmdsn: u32,
    pub exp_data_sn: u32,
}

/// Task management functions (§11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    // Responses (§11.6.1).
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const FUNCTION_NOT_SUPPORTED: u8 = 5;
    pub const FUNCTION_REJECTED: u8 = 255;
}

/// A Login Request (§11.12), as the login state machine takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginPdu {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub data: Bytes,
}

/// A Text Request (§11.10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub data: Bytes,
}

/// A Logout Request (§11.14).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

/// What an initiator can send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitiatorPdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskManagement(TaskManagement),
    Login(LoginPdu),
    Text(TextRequest),
    DataOut(DataOut),
    Logout(LogoutRequest),
    /// SNACK needs error recovery level 1, which we never negotiate.
    Snack {
        itt: u32,
    },
}

impl InitiatorPdu {
    /// Interprets a framed PDU. Never panics: the framing guarantees a full
    /// BHS, and AHS parsing checks its lengths.
    pub fn parse(raw: RawPdu) -> Result<InitiatorPdu, PduError> {
        let b = &raw.bhs;
        let immediate = b[0] & 0x40 != 0;
        let op = b[0] & 0x3f;
        let flags = b[1];
        let final_ = flags & 0x80 != 0;
        let lun = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
        let itt = be32(b, 16);
        Ok(match op {
            opcode::NOP_OUT => InitiatorPdu::NopOut(NopOut {
                immediate,
                lun,
                itt,
                ttt: be32(b, 20),
                cmdsn: be32(b, 24),
                exp_statsn: be32(b, 28),
                data: raw.data,
            }),
            opcode::SCSI_COMMAND => {
                let mut cdb = BytesMut::from(&b[32..48]);
                let mut ahs = raw.ahs.clone();
                // AHS: length (2, excluding the 4-byte header), type (1),
                // type-specific byte, then the value padded to 4 bytes.
                while ahs.len() >= 4 {
                    let len = usize::from(be16(&ahs, 0));
                    let kind = ahs[2];
                    let value_len = len.checked_sub(1).ok_or(PduError::BadAhs)?;
                    let total = 3 + len + pad4(3 + len);
                    if ahs.len() < total {
                        return Err(PduError::BadAhs);
                    }
                    if kind == 1 {
                        // Extended CDB: the bytes beyond the first 16.
                        cdb.extend_from_slice(&ahs[4..4 + value_len]);
                    }
                    ahs.advance(total);
                }
                InitiatorPdu::ScsiCommand(ScsiCommand {
                    immediate,
                    final_,
                    read: flags & 0x40 != 0,
                    write: flags & 0x20 != 0,
                    lun,
                    itt,
                    expected_data_length: be32(b, 20),
                    cmdsn: be32(b, 24),
                    exp_statsn: be32(b, 28),
                    cdb: cdb.freeze(),
                    data: raw.data,
                })
            }
            opcode::TASK_MANAGEMENT => InitiatorPdu::TaskManagement(TaskManagement {
                immediate,
                function: flags & 0x7f,
                lun,
                itt,
                referenced_task_tag: be32(b, 20),
                cmdsn: be32(b, 24),
                exp_statsn: be32(b, 28),
                ref_cmdsn: be32(b, 32),
                exp_data_sn: be32(b, 36),
            }),
            opcode::LOGIN => InitiatorPdu::Login(LoginPdu {
                transit: flags & 0x80 != 0,
                cont: flags & 0x40 != 0,
                csg: (flags >> 2) & 0x03,
                nsg: flags & 0x03,
                version_max: b[2],
                version_min: b[3],
                isid: b[8..14].try_into().expect("6 bytes"),
                tsih: be16(b, 14),
                itt,
                cid: be16(b, 20),
                cmdsn: be32(b, 24),
                exp_statsn: be32(b, 28),
                data: raw.data,
            }),
            opcode::TEXT => InitiatorPdu::Text(TextRequest {
                immediate,
                final_,
                cont: flags & 0x40 != 0,
                lun,
                itt,
                ttt: be32(b, 20),
                cmdsn: be32(b, 24),
                exp_statsn: be32(b, 28),
                data: raw.data,
            }),
            opcode::DATA_OUT => InitiatorPdu::DataOut(DataOut {
                final_,
                lun,
                itt,
                ttt: be32(b, 20),
                exp_statsn: be32(b, 28),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                data: raw.data,
            }),
            opcode::LOGOUT => InitiatorPdu::Logout(LogoutRequest {
                immediate,
                reason: flags & 0x7f,
                itt,
                cid: be16(b, 20),
                cmdsn: be32(b, 24),
                exp_statsn: be32(b, 28),
            }),
            opcode::SNACK => InitiatorPdu::Snack { itt },
            other => return Err(PduError::UnknownOpcode(other)),
        })
    }
}

/// The sequence numbers every target PDU carries (§4.2.2): StatSN, and
/// the command window ExpCmdSN..=MaxCmdSN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqNums {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Residual count of a SCSI Response or final Data-In (§11.4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    None,
    /// The command wanted more data than the Expected Data Transfer Length.
    Overflow(u32),
    /// Less data moved than the Expected Data Transfer Length.
    Underflow(u32),
}

impl Residual {
    /// The residual between what the command moves and what the initiator
    /// expected.
    pub fn between(wanted: u32, expected: u32) -> Residual {
        match wanted.cmp(&expected) {
            std::cmp::Ordering::Equal => Residual::None,
            std::cmp::Ordering::Greater => Residual::Overflow(wanted - expected),
            std::cmp::Ordering::Less => Residual::Underflow(expected - wanted),
        }
    }

    /// The O/U flag bits (same positions in SCSI Response and Data-In) and
    /// the count.
    fn flags_and_count(self) -> (u8, u32) {
        match self {
            Residual::None => (0, 0),
            Residual::Overflow(n) => (0x04, n),
            Residual::Underflow(n) => (0x02, n),
        }
    }
}

/// What the target sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPdu {
    NopIn {
        lun: u64,
        itt: u32,
        ttt: u32,
        seq: SeqNums,
        data: Bytes,
    },
    ScsiResponse {
        itt: u32,
        /// iSCSI response: 0 = command completed at target.
        response: u8,
        status: u8,
        residual: Residual,
        exp_data_sn: u32,
        seq: SeqNums,
        /// Sense data (without the 2-byte length prefix, added here).
        sense: Bytes,
    },
    TaskManagementResponse {
        itt: u32,
        response: u8,
        seq: SeqNums,
    },
    LoginResponse {
        transit: bool,
        cont: bool,
        csg: u8,
        nsg: u8,
        version_max: u8,
        version_active: u8,
        isid: [u8; 6],
        tsih: u16,
        itt: u32,
        status_class: u8,
        status_detail: u8,
        seq: SeqNums,
        data: Bytes,
    },
    TextResponse {
        final_: bool,
        cont: bool,
        lun: u64,
        itt: u32,
        ttt: u32,
        seq: SeqNums,
        data: Bytes,
    },
    DataIn {
        final_: bool,
        /// Status is carried here (phase collapse): `Some(status)` sets S.
        status: Option<u8>,
        residual: Residual,
        lun: u64,
        itt: u32,
        data_sn: u32,
        buffer_offset: u32,
        /// StatSN is meaningful only with S set; the window always.
        seq: SeqNums,
        data: Bytes,
    },
    LogoutResponse {
        itt: u32,
        response: u8,
        seq: SeqNums,
        time2wait: u16,
        time2retain: u16,
    },
    R2T {
        lun: u64,
        itt: u32,
        ttt: u32,
        seq: SeqNums,
        r2t_sn: u32,
        buffer_offset: u32,
        desired_length: u32,
    },
    AsyncMessage {
        lun: u64,
        event: u8,
        vcode: u8,
        parameters: [u16; 3],
        seq: SeqNums,
        data: Bytes,
    },
    Reject {
        reason: u8,
        seq: SeqNums,
        data_sn: u32,
        /// The rejected PDU's header.
        bhs: Box<[u8; BHS_LEN]>,
    },
}

fn put_seq(b: &mut [u8; BHS_LEN], seq: &SeqNums) {
    b[24..28].copy_from_slice(&seq.stat_sn.to_be_bytes());
    b[28..32].copy_from_slice(&seq.exp_cmd_sn.to_be_bytes());
    b[32..36].copy_from_slice(&seq.max_cmd_sn.to_be_bytes());
}

impl TargetPdu {
    /// Whether sending this PDU consumes a StatSN (§4.2.2.2: every status
    /// carrying PDU does; R2T, Data-In without status and unsolicited
    /// NOP-In carry the current StatSN without advancing it).
    pub fn advances_stat_sn(&self) -> bool {
        match self {
            TargetPdu::DataIn { status, .. } => status.is_some(),
            TargetPdu::R2T { .. } => false,
            TargetPdu::NopIn { itt, .. } => *itt != RESERVED_TAG,
            TargetPdu::ScsiResponse { .. }
            | TargetPdu::TaskManagementResponse { .. }
            | TargetPdu::LoginResponse { .. }
            | TargetPdu::TextResponse { .. }
            | TargetPdu::LogoutResponse { .. }
            | TargetPdu::AsyncMessage { .. }
            | TargetPdu::Reject { .. } => true,
        }
    }

    /// The header and the data segment (unpadded).
    fn header_and_data(&self) -> ([u8; BHS_LEN], Bytes) {
        let mut b = [0u8; BHS_LEN];
        let data = match self {
            TargetPdu::NopIn {
                lun,
                itt,
                ttt,
                seq,
                data,
            } => {
                b[0] = opcode::NOP_IN;
                b[1] = 0x80;
                b[8..16].copy_from_slice(&lun.to_be_bytes());
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                b[20..24].copy_from_slice(&ttt.to_be_bytes());
                put_seq(&mut b, seq);
                data.clone()
            }
            TargetPdu::ScsiResponse {
                itt,
                response,
                status,
                residual,
                exp_data_sn,
                seq,
                sense,
            } => {
                let (flags, count) = residual.flags_and_count();
                b[0] = opcode::SCSI_RESPONSE;
                b[1] = 0x80 | flags;
                b[2] = *response;
                b[3] = *status;
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                put_seq(&mut b, seq);
                b[36..40].copy_from_slice(&exp_data_sn.to_be_bytes());
                b[44..48].copy_from_slice(&count.to_be_bytes());
                if sense.is_empty() {
                    Bytes::new()
                } else {
                    // Sense data is prefixed with its 2-byte length (§11.4.7).
                    let mut d = BytesMut::with_capacity(2 + sense.len());
                    d.put_u16(u16::try_from(sense.len()).unwrap_or(u16::MAX));
                    d.extend_from_slice(sense);
                    d.freeze()
                }
            }
            TargetPdu::TaskManagementResponse { itt, response, seq } => {
                b[0] = opcode::TASK_MANAGEMENT_RESPONSE;
                b[1] = 0x80;
                b[2] = *response;
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                put_seq(&mut b, seq);
                Bytes::new()
            }
            TargetPdu::LoginResponse {
                transit,
                cont,
                csg,
                nsg,
                version_max,
                version_active,
                isid,
                tsih,
                itt,
                status_class,
                status_detail,
                seq,
                data,
            } => {
                b[0] = opcode::LOGIN_RESPONSE;
                b[1] = (u8::from(*transit) << 7)
                    | (u8::from(*cont) << 6)
                    | ((csg & 3) << 2)
                    | (nsg & 3);
                b[2] = *version_max;
                b[3] = *version_active;
                b[8..14].copy_from_slice(isid);
                b[14..16].copy_from_slice(&tsih.to_be_bytes());
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                put_seq(&mut b, seq);
                b[36] = *status_class;
                b[37] = *status_detail;
                data.clone()
            }
            TargetPdu::TextResponse {
                final_,
                cont,
                lun,
                itt,
                ttt,
                seq,
                data,
            } => {
                b[0] = opcode::TEXT_RESPONSE;
                b[1] = (u8::from(*final_) << 7) | (u8::from(*cont) << 6);
                b[8..16].copy_from_slice(&lun.to_be_bytes());
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                b[20..24].copy_from_slice(&ttt.to_be_bytes());
                put_seq(&mut b, seq);
                data.clone()
            }
            TargetPdu::DataIn {
                final_,
                status,
                residual,
                lun,
                itt,
                data_sn,
                buffer_offset,
                seq,
                data,
            } => {
                b[0] = opcode::DATA_IN;
                b[1] = u8::from(*final_) << 7;
                let mut seq = *seq;
                if let Some(s) = status {
                    // Residuals are valid only with status (§11.7.5).
                    let (flags, count) = residual.flags_and_count();
                    b[1] |= 0x01 | flags;
                    b[3] = *s;
                    b[44..48].copy_from_slice(&count.to_be_bytes());
                } else {
                    seq.stat_sn = 0;
                }
                b[8..16].copy_from_slice(&lun.to_be_bytes());
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                b[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
                put_seq(&mut b, &seq);
                b[36..40].copy_from_slice(&data_sn.to_be_bytes());
                b[40..44].copy_from_slice(&buffer_offset.to_be_bytes());
                data.clone()
            }
            TargetPdu::LogoutResponse {
                itt,
                response,
                seq,
                time2wait,
                time2retain,
            } => {
                b[0] = opcode::LOGOUT_RESPONSE;
                b[1] = 0x80;
                b[2] = *response;
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                put_seq(&mut b, seq);
                b[40..42].copy_from_slice(&time2wait.to_be_bytes());
                b[42..44].copy_from_slice(&time2retain.to_be_bytes());
                Bytes::new()
            }
            TargetPdu::R2T {
                lun,
                itt,
                ttt,
                seq,
                r2t_sn,
                buffer_offset,
                desired_length,
            } => {
                b[0] = opcode::R2T;
                b[1] = 0x80;
                b[8..16].copy_from_slice(&lun.to_be_bytes());
                b[16..20].copy_from_slice(&itt.to_be_bytes());
                b[20..24].copy_from_slice(&ttt.to_be_bytes());
                put_seq(&mut b, seq);
                b[36..40].copy_from_slice(&r2t_sn.to_be_bytes());
                b[40..44].copy_from_slice(&buffer_offset.to_be_bytes());
                b[44..48].copy_from_slice(&desired_length.to_be_bytes());
                Bytes::new()
            }
            TargetPdu::AsyncMessage {
                lun,
                event,
                vcode,
                parameters,
                seq,
                data,
            } => {
                b[0] = opcode::ASYNC_MESSAGE;
                b[1] = 0x80;
                b[8..16].copy_from_slice(&lun.to_be_bytes());
                b[16..20].copy_from_slice(&RESERVED_TAG.to_be_bytes());
                put_seq(&mut b, seq);
                b[36] = *event;
                b[37] = *vcode;
                for (i, p) in parameters.iter().enumerate() {
                    b[38 + 2 * i..40 + 2 * i].copy_from_slice(&p.to_be_bytes());
                }
                data.clone()
            }
            TargetPdu::Reject {
                reason,
                seq,
                data_sn,
                bhs,
            } => {
                b[0] = opcode::REJECT;
                b[1] = 0x80;
                b[2] = *reason;
                b[16..20].copy_from_slice(&RESERVED_TAG.to_be_bytes());
                put_seq(&mut b, seq);
                b[36..40].copy_from_slice(&data_sn.to_be_bytes());
                Bytes::copy_from_slice(&bhs[..])
            }
        };
        let len = u32::try_from(data.len()).expect("data segments are far below 16 MiB");
        b[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        (b, data)
    }

    /// Appends the framed PDU to `out`.
    pub fn encode(&self, framing: &Framing, out: &mut BytesMut) {
        self.encode_to(framing, out);
    }

    /// Hands the framed PDU to `out`: the header, digests and padding as
    /// bytes to copy, the data segment as a buffer the sink may keep by
    /// reference (a 1 MiB read then reaches the socket without a copy).
    pub fn encode_to(&self, framing: &Framing, out: &mut impl PduSink) {
        let (bhs, data) = self.header_and_data();
        let pad = pad4(data.len());
        out.push_bytes(&bhs);
        if framing.header_digest {
            out.push_bytes(&digest(&[&bhs]).to_le_bytes());
        }
        if !data.is_empty() {
            out.push_data(&data);
            out.push_bytes(&[0u8; 3][..pad]);
            if framing.data_digest {
                out.push_bytes(&digest(&[&data, &[0u8; 3][..pad]]).to_le_bytes());
            }
        }
    }
}

/// Where encoded target PDUs go.
pub trait PduSink {
    /// Small parts: headers, digests, padding.
    fn push_bytes(&mut self, bytes: &[u8]);
    /// A data segment, which the sink may keep instead of copying.
    fn push_data(&mut self, data: &Bytes) {
        self.push_bytes(data);
    }
}

impl PduSink for BytesMut {
    fn push_bytes(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Encodes an initiator PDU header (tests and benches play initiator).
#[doc(hidden)]
pub fn encode_initiator(bhs: &[u8; BHS_LEN], data: &[u8], framing: &Framing) -> BytesMut {
    let mut b = *bhs;
    let len = u32::try_from(data.len()).expect("small");
    b[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    let mut out = BytesMut::new();
    out.extend_from_slice(&b);
    if framing.header_digest {
        out.put_u32_le(digest(&[&b]));
    }
    if !data.is_empty() {
        let pad = pad4(data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(&[0u8; 3][..pad]);
        if framing.data_digest {
            out.put_u32_le(digest(&[data, &[0u8; 3][..pad]]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(hd: bool, dd: bool) -> Framing {
        Framing {
            header_digest: hd,
            data_digest: dd,
            max_recv_data_segment: 65536,
        }
    }

    fn write10_bhs() -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode::SCSI_COMMAND;
        b[1] = 0x80 | 0x20 | 1;
        b[8..16].copy_from_slice(&(1u64 << 48).to_be_bytes());
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        b[20..24].copy_from_slice(&4096u32.to_be_bytes());
        b[24..28].copy_from_slice(&10u32.to_be_bytes());
        b[28..32].copy_from_slice(&3u32.to_be_bytes());
        b[32] = 0x2a;
        b[39] = 8;
        b
    }

    #[test]
    fn crc32c_matches_rfc_3720_example() {
        // RFC 3720 B.4: 32 bytes of zeroes -> 0xaa36918a.
        assert_eq!(digest(&[&[0u8; 32]]), 0x8a91_36aa);
        assert_eq!(digest(&[&[0xffu8; 32]]), 0x62a8_ab43);
    }

    #[test]
    fn scsi_command_round_trips_with_and_without_digests() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let f = framing(hd, dd);
            let wire = encode_initiator(&write10_bhs(), b"abcde", &f);
            let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
            assert_eq!(decode(&mut buf, &f), Ok(None), "partial PDU waits");
            buf.extend_from_slice(&wire[wire.len() - 1..]);
            let raw = decode(&mut buf, &f).unwrap().unwrap();
            assert!(buf.is_empty());
            let InitiatorPdu::ScsiCommand(c) = InitiatorPdu::parse(raw).unwrap() else {
                panic!("not a command")
            };
            assert!(c.write && !c.read && c.final_ && !c.immediate);
            assert_eq!(c.lun, 1 << 48);
            assert_eq!((c.itt, c.expected_data_length, c.cmdsn), (7, 4096, 10));
            assert_eq!(c.cdb.len(), 16);
            assert_eq!(c.cdb[0], 0x2a);
            assert_eq!(&c.data[..], b"abcde");
        }
    }

    #[test]
    fn digest_errors_are_detected() {
        let f = framing(true, true);
        let wire = encode_initiator(&write10_bhs(), b"abcd", &f);
        let mut bad_header = BytesMut::from(&wire[..]);
        bad_header[20] ^= 1;
        assert!(matches!(
            decode(&mut bad_header, &f),
            Err(PduError::HeaderDigest { .. })
        ));
        let mut bad_data = BytesMut::from(&wire[..]);
        bad_data[BHS_LEN + 4] ^= 1;
        assert!(matches!(
            decode(&mut bad_data, &f),
            Err(PduError::DataDigest { opcode: 1, .. })
        ));
    }

    #[test]
    fn oversized_segments_are_refused_before_buffering() {
        let mut b = write10_bhs();
        b[5..8].copy_from_slice(&[0x10, 0, 0]);
        let mut buf = BytesMut::from(&b[..]);
        assert_eq!(
            decode(&mut buf, &framing(false, false)),
            Err(PduError::DataSegmentTooLong {
                len: 0x10_0000,
                max: 65536
            })
        );
    }

    #[test]
    fn extended_cdb_ahs_is_appended() {
        let mut b = write10_bhs();
        b[4] = 2; // 8 bytes of AHS
        let mut wire = BytesMut::from(&b[..]);
        // AHSLength 5 (type byte + 4 CDB bytes... here 1 reserved + 4), type 1.
        wire.extend_from_slice(&[0, 5, 1, 0, 0xaa, 0xbb, 0xcc, 0xdd]);
        let raw = decode(&mut wire, &framing(false, false)).unwrap().unwrap();
        let InitiatorPdu::ScsiCommand(c) = InitiatorPdu::parse(raw).unwrap() else {
            panic!()
        };
        assert_eq!(&c.cdb[16..], &[0xaa, 0xbb, 0xcc, 0xdd]);
    }

    #[test]
    fn data_in_with_status_carries_residual_and_stat_sn() {
        let pdu = TargetPdu::DataIn {
            final_: true,
            status: Some(0),
            residual: Residual::Underflow(100),
            lun: 0,
            itt: 9,
            data_sn: 2,
            buffer_offset: 8192,
            seq: SeqNums {
                stat_sn: 5,
                exp_cmd_sn: 6,
                max_cmd_sn: 70,
            },
            data: Bytes::from_static(b"xyz"),
        };
        let mut out = BytesMut::new();
        pdu.encode(&framing(false, true), &mut out);
        assert_eq!(out.len(), BHS_LEN + 4 + 4);
        assert_eq!(out[0], 0x25);
        assert_eq!(out[1], 0x80 | 0x01 | 0x02);
        assert_eq!(&out[5..8], &[0, 0, 3]);
        assert_eq!(be32(&out, 24), 5);
        assert_eq!(be32(&out, 36), 2);
        assert_eq!(be32(&out, 40), 8192);
        assert_eq!(be32(&out, 44), 100);
        assert_eq!(&out[48..52], b"xyz\0");
        assert!(pdu.advances_stat_sn());
    }

    #[test]
    fn scsi_response_prefixes_sense_length() {
        let pdu = TargetPdu::ScsiResponse {
            itt: 1,
            response: 0,
            status: 2,
            residual: Residual::Overflow(512),
            exp_data_sn: 0,
            seq: SeqNums::default(),
            sense: Bytes::from(vec![0x70; 18]),
        };
        let mut out = BytesMut::new();
        pdu.encode(&framing(false, false), &mut out);
        assert_eq!(out[1], 0x84);
        assert_eq!(&out[5..8], &[0, 0, 20]);
        assert_eq!(&out[48..50], &[0, 18]);
        assert_eq!(out.len(), BHS_LEN + 20);
    }

    proptest::proptest! {
        #[test]
        fn decode_and_parse_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300), hd: bool, dd: bool) {
            let mut buf = BytesMut::from(&bytes[..]);
            let f = Framing { header_digest: hd, data_digest: dd, max_recv_data_segment: 256 };
            while let Ok(Some(raw)) = decode(&mut buf, &f) {
                let _ = InitiatorPdu::parse(raw);
            }
        }
    }
}
