//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): the table of commands
//! this target executes, with the CDB usage data (which bits of each CDB
//! byte the device server looks at) and the command timeouts.

use super::cdb::{opcode as op, ReportOptions};
use super::sense::Sense;

/// One supported command (or one service action of a command).
#[derive(Clone, Copy, Debug)]
pub struct SupportedCommand {
    pub opcode: u8,
    /// `Some` for commands whose CDB carries a service action.
    pub service_action: Option<u16>,
    /// CDB usage data: byte 0 is the opcode, then a mask of the bits used.
    pub usage: &'static [u8],
}

const fn cmd(opcode: u8, usage: &'static [u8]) -> SupportedCommand {
    SupportedCommand {
        opcode,
        service_action: None,
        usage,
    }
}

const fn sa(opcode: u8, service_action: u16, usage: &'static [u8]) -> SupportedCommand {
    SupportedCommand {
        opcode,
        service_action: Some(service_action),
        usage,
    }
}

// Masks shared by the 10-, 12- and 16-byte READ/WRITE shapes: byte 1 holds
// DPO and FUA (0x18), or BYTCHK and DPO for the verify family (0x16).
const RW10: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x00];
const RW12: [u8; 10] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x00];
const RW16: [u8; 14] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x00,
];

macro_rules! usage10 {
    ($op:expr, $b1:expr) => {
        &[
            $op, $b1, RW10[0], RW10[1], RW10[2], RW10[3], RW10[4], RW10[5], RW10[6], RW10[7],
        ]
    };
}
macro_rules! usage12 {
    ($op:expr, $b1:expr) => {
        &[
            $op, $b1, RW12[0], RW12[1], RW12[2], RW12[3], RW12[4], RW12[5], RW12[6], RW12[7],
            RW12[8], RW12[9],
        ]
    };
}
macro_rules! usage16 {
    ($op:expr, $b1:expr) => {
        &[
            $op, $b1, RW16[0], RW16[1], RW16[2], RW16[3], RW16[4], RW16[5], RW16[6], RW16[7],
            RW16[8], RW16[9], RW16[10], RW16[11], RW16[12], RW16[13],
        ]
    };
}

/// Every command the target supports, in opcode order. UNMAP is listed
/// only for devices that can trim (see [`supported`]).
pub const COMMANDS: &[SupportedCommand] = &[
    cmd(op::TEST_UNIT_READY, &[0x00, 0, 0, 0, 0, 0]),
    cmd(op::REQUEST_SENSE, &[0x03, 0x01, 0, 0, 0xff, 0]),
    cmd(op::READ_6, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0]),
    cmd(op::WRITE_6, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0]),
    cmd(op::INQUIRY, &[0x12, 0x01, 0xff, 0xff, 0xff, 0]),
    cmd(op::MODE_SELECT_6, &[0x15, 0x11, 0, 0, 0xff, 0]),
    cmd(op::RESERVE_6, &[0x16, 0, 0, 0, 0, 0]),
    cmd(op::RELEASE_6, &[0x17, 0, 0, 0, 0, 0]),
    cmd(op::MODE_SENSE_6, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0]),
    cmd(op::START_STOP_UNIT, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0]),
    cmd(op::PREVENT_ALLOW_MEDIUM_REMOVAL, &[0x1e, 0, 0, 0, 0x03, 0]),
    cmd(
        op::READ_CAPACITY_10,
        &[0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0],
    ),
    cmd(op::READ_10, usage10!(0x28, 0x18)),
    cmd(op::WRITE_10, usage10!(0x2a, 0x18)),
    cmd(op::WRITE_AND_VERIFY_10, usage10!(0x2e, 0x16)),
    cmd(op::VERIFY_10, usage10!(0x2f, 0x16)),
    cmd(op::PRE_FETCH_10, usage10!(0x34, 0x02)),
    cmd(op::SYNCHRONIZE_CACHE_10, usage10!(0x35, 0x06)),
    cmd(
        op::READ_DEFECT_DATA_10,
        &[0x37, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0],
    ),
    cmd(op::WRITE_SAME_10, usage10!(0x41, 0x08)),
    cmd(op::UNMAP, &[0x42, 0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0]),
    cmd(
        op::MODE_SELECT_10,
        &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
    ),
    cmd(
        op::MODE_SENSE_10,
        &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0],
    ),
    // PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT
    // CAPABILITIES, READ FULL STATUS.
    sa(op::PERSISTENT_RESERVE_IN, 0x00, PRIN_USAGE),
    sa(op::PERSISTENT_RESERVE_IN, 0x01, PRIN_USAGE),
    sa(op::PERSISTENT_RESERVE_IN, 0x02, PRIN_USAGE),
    sa(op::PERSISTENT_RESERVE_IN, 0x03, PRIN_USAGE),
    // PERSISTENT RESERVE OUT: REGISTER through REGISTER AND IGNORE
    // EXISTING KEY.
    sa(op::PERSISTENT_RESERVE_OUT, 0x00, PROUT_USAGE),
    sa(op::PERSISTENT_RESERVE_OUT, 0x01, PROUT_USAGE),
    sa(op::PERSISTENT_RESERVE_OUT, 0x02, PROUT_USAGE),
    sa(op::PERSISTENT_RESERVE_OUT, 0x03, PROUT_USAGE),
    sa(op::PERSISTENT_RESERVE_OUT, 0x04, PROUT_USAGE),
    sa(op::PERSISTENT_RESERVE_OUT, 0x05, PROUT_USAGE),
    sa(op::PERSISTENT_RESERVE_OUT, 0x06, PROUT_USAGE),
    cmd(op::READ_16, usage16!(0x88, 0x18)),
    cmd(
        op::COMPARE_AND_WRITE,
        &[
            0x89, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0,
        ],
    ),
    cmd(op::WRITE_16, usage16!(0x8a, 0x18)),
    cmd(op::ORWRITE_16, usage16!(0x8b, 0x18)),
    cmd(op::WRITE_AND_VERIFY_16, usage16!(0x8e, 0x16)),
    cmd(op::VERIFY_16, usage16!(0x8f, 0x16)),
    cmd(op::PRE_FETCH_16, usage16!(0x90, 0x02)),
    cmd(op::SYNCHRONIZE_CACHE_16, usage16!(0x91, 0x06)),
    cmd(op::WRITE_SAME_16, usage16!(0x93, 0x09)),
    sa(
        op::SERVICE_ACTION_IN_16,
        0x10,
        &[
            0x9e, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0,
        ],
    ),
    sa(
        op::SERVICE_ACTION_IN_16,
        0x12,
        &[
            0x9e, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0,
        ],
    ),
    cmd(
        op::REPORT_LUNS,
        &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
    ),
    sa(
        op::MAINTENANCE_IN,
        0x0c,
        &[
            0xa3, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
        ],
    ),
    cmd(op::READ_12, usage12!(0xa8, 0x18)),
    cmd(op::WRITE_12, usage12!(0xaa, 0x18)),
    cmd(op::WRITE_AND_VERIFY_12, usage12!(0xae, 0x16)),
    cmd(op::VERIFY_12, usage12!(0xaf, 0x16)),
    cmd(
        op::READ_DEFECT_DATA_12,
        &[0xb7, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
    ),
];

const PRIN_USAGE: &[u8] = &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0];
const PROUT_USAGE: &[u8] = &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0];

/// The commands a LUN supports: all of [`COMMANDS`], minus UNMAP when the
/// device cannot deallocate.
pub fn supported(can_trim: bool) -> impl Iterator<Item = &'static SupportedCommand> {
    COMMANDS
        .iter()
        .filter(move |c| can_trim || c.opcode != op::UNMAP)
}

/// Whether an opcode has service actions (in this target's table).
fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// The command timeouts descriptor (SPC-4 table 258): length 0Ah, no
/// command-specific field, nominal and recommended timeouts in seconds.
fn timeouts(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x00, 0x0a, 0x00, 0x00]);
    out.extend_from_slice(&30u32.to_be_bytes());
    out.extend_from_slice(&60u32.to_be_bytes());
}

/// The parameter data of REPORT SUPPORTED OPERATION CODES, untruncated.
pub fn report(
    can_trim: bool,
    rctd: bool,
    options: ReportOptions,
    opcode: u8,
    service_action: u16,
) -> Result<Vec<u8>, Sense> {
    if options == ReportOptions::All {
        // All-commands format (SPC-4 table 256): 4-byte length header, then
        // 8-byte descriptors (20 with a timeouts descriptor).
        let mut out = vec![0u8; 4];
        for c in supported(can_trim) {
            out.push(c.opcode);
            out.push(0);
            out.extend_from_slice(&c.service_action.unwrap_or(0).to_be_bytes());
            out.push(0);
            let mut flags = 0u8;
            if rctd {
                flags |= 0x02; // CTDP
            }
            if c.service_action.is_some() {
                flags |= 0x01; // SERVACTV
            }
            out.push(flags);
            // Usage tables are at most 16 bytes.
            #[allow(clippy::cast_possible_truncation)]
            out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
            if rctd {
                timeouts(&mut out);
            }
        }
        let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
        out[..4].copy_from_slice(&len.to_be_bytes());
        return Ok(out);
    }

    let with_sa = has_service_actions(opcode);
    let wanted_sa = match options {
        ReportOptions::OpCode if with_sa => {
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(2, Some(2)))
        }
        ReportOptions::OpCodeServiceAction if !with_sa && is_known(opcode) => {
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(2, Some(2)))
        }
        ReportOptions::OpCode => None,
        ReportOptions::OpCodeServiceAction => Some(service_action),
        _ if with_sa => Some(service_action),
        _ => None,
    };
    let found = supported(can_trim).find(|c| {
        c.opcode == opcode && (c.service_action.is_none() || c.service_action == wanted_sa)
    });
    // One-command format (SPC-4 table 259): SUPPORT 011b (supported as the
    // standard says) or 001b (not supported, no usage data).
    let mut out = vec![0u8; 4];
    if rctd {
        out[1] |= 0x80; // CTDP
    }
    match found {
        Some(c) => {
            out[1] |= 0x03;
            #[allow(clippy::cast_possible_truncation)]
            out[2..4].copy_from_slice(&(c.usage.len() as u16).to_be_bytes());
            out.extend_from_slice(c.usage);
            if rctd {
                timeouts(&mut out);
            }
        }
        None => out[1] |= 0x01,
    }
    Ok(out)
}

fn is_known(opcode: u8) -> bool {
    COMMANDS.iter().any(|c| c.opcode == opcode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::cdb_len;

    #[test]
    fn usage_tables_match_cdb_lengths_and_opcodes() {
        for c in COMMANDS {
            assert_eq!(Some(c.usage.len()), cdb_len(c.opcode), "{:#x}", c.opcode);
            assert_eq!(c.usage[0], c.opcode);
        }
    }

    #[test]
    fn all_commands_descriptors() {
        let data = report(true, false, ReportOptions::All, 0, 0).unwrap();
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        assert_eq!(len, data.len() - 4);
        assert_eq!(len, COMMANDS.len() * 8);
        // First descriptor: TEST UNIT READY, no service action, CDB length 6.
        assert_eq!(&data[4..12], &[0x00, 0, 0, 0, 0, 0, 0, 6]);
        // Without trim, UNMAP is gone.
        let data = report(false, false, ReportOptions::All, 0, 0).unwrap();
        assert_eq!(data.len() - 4, (COMMANDS.len() - 1) * 8);
        assert!(!data[4..].chunks(8).any(|d| d[0] == 0x42));
    }

    #[test]
    fn all_commands_with_timeouts() {
        let data = report(true, true, ReportOptions::All, 0, 0).unwrap();
        assert_eq!(data.len() - 4, COMMANDS.len() * 20);
        for d in data[4..].chunks(20) {
            assert_eq!(d[5] & 0x02, 0x02);
            assert_eq!(&d[8..10], &[0x00, 0x0a]);
        }
    }

    #[test]
    fn one_command_formats() {
        // READ(10) exists without service actions.
        let one = report(true, false, ReportOptions::OpCode, 0x28, 0).unwrap();
        assert_eq!(&one[..4], &[0, 0x03, 0, 10]);
        assert_eq!(&one[4..6], &[0x28, 0x18]);
        // Asking for it with a service action is invalid.
        assert!(report(true, false, ReportOptions::OpCodeServiceAction, 0x28, 0).is_err());
        // READ CAPACITY(16) needs its service action.
        assert!(report(true, false, ReportOptions::OpCode, 0x9e, 0x10).is_err());
        let rc16 = report(true, true, ReportOptions::OpCodeServiceAction, 0x9e, 0x10).unwrap();
        assert_eq!(&rc16[..4], &[0, 0x83, 0, 16]);
        assert_eq!(rc16.len(), 4 + 16 + 12);
        // Unsupported opcode: SUPPORT 001b.
        let none = report(true, false, ReportOptions::OpCode, 0x9c, 0).unwrap();
        assert_eq!(none, vec![0, 0x01, 0, 0]);
    }
}
