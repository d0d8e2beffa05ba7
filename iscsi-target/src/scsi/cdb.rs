//! Sans-IO CDB decoding (SPC-4, SBC-3): bytes in, a [`Command`] or the sense
//! data an invalid CDB earns out. Never panics, whatever the input (fuzzed).
//!
//! Decoding checks what can be checked without knowing the device: the
//! opcode and service action, reserved or unsupported flag bits (protection
//! information, which no ferry device has), and field combinations SPC/SBC
//! forbid. Range checks against the capacity happen at execution.

use super::sense::Sense;

/// Operation codes this target recognises (SPC-4 / SBC-3 names).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;

    /// SERVICE ACTION IN (16) service actions.
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service action.
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
}

/// Which MODE SENSE page values are asked for (SPC-4 table 99, PC field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

/// Where a WRITE-type command takes its data from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteSource {
    /// A plain WRITE.
    Write,
    /// WRITE AND VERIFY: the write, then (BYTCHK) a verify that cannot fail
    /// on a device that just stored the bytes.
    WriteAndVerify,
    /// ORWRITE (16): each block becomes its stored bytes OR the Data-Out
    /// (SBC-3 §5.8), read and written back atomically.
    Or,
}

/// BYTCHK of VERIFY (SBC-3 table 65).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteCheck {
    /// 00b: verify the medium only, no Data-Out.
    None,
    /// 01b: compare the range with `blocks` blocks of Data-Out.
    Full,
    /// 11b: compare every block of the range with one block of Data-Out.
    OneBlock,
}

/// Reporting options of REPORT SUPPORTED OPERATION CODES (SPC-4 table 255).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportOptions {
    /// 000b: every supported command.
    All,
    /// 001b: one opcode without service actions.
    OpCode,
    /// 010b: one opcode + service action.
    OpCodeServiceAction,
    /// 011b: one opcode, with or without service action.
    Either,
}

/// One decoded command, with the fields execution needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        descriptor: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: PageControl,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u32,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: ReportOptions,
        opcode: u8,
        service_action: u16,
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
        source: WriteSource,
    },
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: ByteCheck,
    },
    SynchronizeCache {
        lba: u64,
        blocks: u32,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    Unmap {
        param_len: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        /// No Data-Out: the pattern is zeroes (WRITE SAME 16 only).
        ndob: bool,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    StartStopUnit {
        power_condition: u8,
        loej: bool,
        start: bool,
    },
    PreventAllowMediumRemoval {
        prevent: u8,
    },
    Reserve6,
    Release6,
    PersistentReserveIn {
        alloc: u32,
    },
    PersistentReserveOut {
        param_len: u32,
    },
    ReadDefectData {
        twelve: bool,
        /// Byte 1 (10) or byte 1 (12): REQ_PLIST, REQ_GLIST, format, echoed.
        flags: u8,
        alloc: u32,
    },
}

impl Command {
    /// Whether the command needs the medium (and so a UA, a missing LUN or
    /// a reservation matters beyond the informational commands).
    pub fn is_informational(&self) -> bool {
        matches!(
            self,
            Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. }
        )
    }
}

/// The CDB length of each opcode group (SAM-5 §5.2): 6, 10, 12 or 16 bytes;
/// `None` for the vendor-specific and reserved groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

fn be16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be24(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn invalid(byte: u16, bit: Option<u8>) -> Sense {
    Sense::INVALID_FIELD_IN_CDB.at_cdb(byte, bit)
}

/// RDPROTECT / WRPROTECT / VRPROTECT (byte 1, bits 7..5) must be zero:
/// no ferry device is formatted with protection information.
fn no_protection(cdb: &[u8]) -> Result<(), Sense> {
    if cdb[1] & 0xe0 != 0 {
        return Err(invalid(1, Some(7)));
    }
    Ok(())
}

fn bytchk(cdb: &[u8]) -> Result<ByteCheck, Sense> {
    match (cdb[1] >> 1) & 0x03 {
        0 => Ok(ByteCheck::None),
        1 => Ok(ByteCheck::Full),
        3 => Ok(ByteCheck::OneBlock),
        _ => Err(invalid(1, Some(2))),
    }
}

/// Decodes one CDB. `cdb` may be longer than the opcode's CDB (iSCSI pads
/// it to 16 bytes); a shorter one is an invalid command.
pub fn decode_cdb(cdb: &[u8]) -> Result<Command, Sense> {
    use opcode as op;
    let Some(&code) = cdb.first() else {
        return Err(Sense::INVALID_COMMAND_OPERATION_CODE);
    };
    let Some(len) = cdb_len(code) else {
        return Err(Sense::INVALID_COMMAND_OPERATION_CODE);
    };
    if cdb.len() < len {
        return Err(Sense::INVALID_COMMAND_OPERATION_CODE);
    }
    let cdb = &cdb[..len];
    let cmd = match code {
        op::TEST_UNIT_READY => Command::TestUnitReady,
        op::REQUEST_SENSE => Command::RequestSense {
            descriptor: cdb[1] & 0x01 != 0,
            alloc: u32::from(cdb[4]),
        },
        op::INQUIRY => {
            let evpd = cdb[1] & 0x01 != 0;
            // CMDDT (obsolete) and reserved bits.
            if cdb[1] & 0xfe != 0 {
                return Err(invalid(1, Some(1)));
            }
            // SPC-4 §6.6: a page code with EVPD clear is invalid.
            if !evpd && cdb[2] != 0 {
                return Err(invalid(2, None));
            }
            Command::Inquiry {
                evpd,
                page: cdb[2],
                alloc: be16(cdb, 3),
            }
        }
        op::READ_CAPACITY_10 => {
            // PMI clear requires a zero LBA (SBC-3 §5.16).
            if cdb[8] & 0x01 == 0 && be32(cdb, 2) != 0 {
                return Err(invalid(2, None));
            }
            Command::ReadCapacity10
        }
        op::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
            op::SAI_READ_CAPACITY_16 => Command::ReadCapacity16 {
                alloc: be32(cdb, 10),
            },
            op::SAI_GET_LBA_STATUS => Command::GetLbaStatus {
                lba: be64(cdb, 2),
                alloc: be32(cdb, 10),
            },
            _ => return Err(invalid(1, Some(4))),
        },
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = code == op::MODE_SENSE_10;
            let pc = match cdb[2] >> 6 {
                0 => PageControl::Current,
                1 => PageControl::Changeable,
                2 => PageControl::Default,
                _ => PageControl::Saved,
            };
            Command::ModeSense {
                ten,
                dbd: cdb[1] & 0x08 != 0,
                llbaa: ten && cdb[1] & 0x10 != 0,
                pc,
                page: cdb[2] & 0x3f,
                subpage: cdb[3],
                alloc: if ten { be16(cdb, 7) } else { u32::from(cdb[4]) },
            }
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            let ten = code == op::MODE_SELECT_10;
            Command::ModeSelect {
                ten,
                pf: cdb[1] & 0x10 != 0,
                sp: cdb[1] & 0x01 != 0,
                param_len: if ten { be16(cdb, 7) } else { u32::from(cdb[4]) },
            }
        }
        op::REPORT_LUNS => Command::ReportLuns {
            select: cdb[2],
            alloc: be32(cdb, 6),
        },
        op::MAINTENANCE_IN => match cdb[1] & 0x1f {
            op::MI_REPORT_SUPPORTED_OPCODES => {
                let options = match cdb[2] & 0x07 {
                    0 => ReportOptions::All,
                    1 => ReportOptions::OpCode,
                    2 => ReportOptions::OpCodeServiceAction,
                    3 => ReportOptions::Either,
                    _ => return Err(invalid(2, Some(2))),
                };
                Command::ReportSupportedOpcodes {
                    rctd: cdb[2] & 0x80 != 0,
                    options,
                    opcode: cdb[3],
                    service_action: u16::from_be_bytes([cdb[4], cdb[5]]),
                    alloc: be32(cdb, 6),
                }
            }
            // libiscsi and SPC-4 both read "invalid field at byte 1" on a
            // MAINTENANCE IN as "service action not supported".
            _ => return Err(invalid(1, Some(4))),
        },
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be24(cdb, 1) & 0x1f_ffff);
            // A transfer length of 0 means 256 blocks for the 6-byte forms.
            let blocks = match cdb[4] {
                0 => 256,
                n => u32::from(n),
            };
            if code == op::READ_6 {
                Command::Read {
                    lba,
                    blocks,
                    fua: false,
                }
            } else {
                Command::Write {
                    lba,
                    blocks,
                    fua: false,
                    source: WriteSource::Write,
                }
            }
        }
        op::READ_10 | op::READ_12 | op::READ_16 => {
            no_protection(cdb)?;
            let (lba, blocks) = lba_and_len(code, cdb);
            Command::Read {
                lba,
                blocks,
                fua: cdb[1] & 0x08 != 0,
            }
        }
        op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
            no_protection(cdb)?;
            let (lba, blocks) = lba_and_len(code, cdb);
            Command::Write {
                lba,
                blocks,
                fua: cdb[1] & 0x08 != 0,
                source: WriteSource::Write,
            }
        }
        op::ORWRITE_16 => {
            // ORPROTECT: no protection information here.
            no_protection(cdb)?;
            Command::Write {
                lba: be64(cdb, 2),
                blocks: be32(cdb, 10),
                fua: cdb[1] & 0x08 != 0,
                source: WriteSource::Or,
            }
        }
        op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
            no_protection(cdb)?;
            // BYTCHK 10b is reserved (SBC-4); 00b, 01b and 11b all write
            // the Data-Out and verify against what was just written.
            if (cdb[1] >> 1) & 0x03 == 2 {
                return Err(invalid(1, Some(2)));
            }
            let (lba, blocks) = lba_and_len(code, cdb);
            Command::Write {
                lba,
                blocks,
                // Writing and verifying implies the data reached the medium.
                fua: true,
                source: WriteSource::WriteAndVerify,
            }
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            no_protection(cdb)?;
            let bytchk = bytchk(cdb)?;
            let (lba, blocks) = lba_and_len(code, cdb);
            Command::Verify {
                lba,
                blocks,
                bytchk,
            }
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = lba_and_len(code, cdb);
            Command::SynchronizeCache { lba, blocks }
        }
        op::PRE_FETCH_10 | op::PRE_FETCH_16 => {
            let (lba, blocks) = lba_and_len(code, cdb);
            Command::PreFetch { lba, blocks }
        }
        op::UNMAP => {
            // ANCHOR: anchored LBAs are not supported (ANC_SUP = 0).
            if cdb[1] & 0x01 != 0 {
                return Err(invalid(1, Some(0)));
            }
            Command::Unmap {
                param_len: be16(cdb, 7),
            }
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            no_protection(cdb)?;
            let unmap = cdb[1] & 0x08 != 0;
            let anchor = cdb[1] & 0x10 != 0;
            let ndob = code == op::WRITE_SAME_16 && cdb[1] & 0x01 != 0;
            // ANCHOR without UNMAP is invalid, and with it unsupported
            // (ANC_SUP = 0): SBC-3 §5.44 both ways.
            if anchor {
                return Err(invalid(1, Some(4)));
            }
            // LBDATA/PBDATA (obsolete, byte 1 bits 2 and 1 on WRITE SAME 10).
            if code == op::WRITE_SAME_10 && cdb[1] & 0x06 != 0 {
                return Err(invalid(1, Some(2)));
            }
            let (lba, blocks) = if code == op::WRITE_SAME_10 {
                (u64::from(be32(cdb, 2)), be16(cdb, 7))
            } else {
                (be64(cdb, 2), be32(cdb, 10))
            };
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            }
        }
        op::COMPARE_AND_WRITE => {
            no_protection(cdb)?;
            Command::CompareAndWrite {
                lba: be64(cdb, 2),
                blocks: u32::from(cdb[13]),
                fua: cdb[1] & 0x08 != 0,
            }
        }
        op::START_STOP_UNIT => Command::StartStopUnit {
            power_condition: cdb[4] >> 4,
            loej: cdb[4] & 0x02 != 0,
            start: cdb[4] & 0x01 != 0,
        },
        op::PREVENT_ALLOW_MEDIUM_REMOVAL => Command::PreventAllowMediumRemoval {
            prevent: cdb[4] & 0x03,
        },
        op::RESERVE_6 => {
            // Third-party and extent reservations (obsolete) are refused.
            if cdb[1] & 0x1f != 0 {
                return Err(invalid(1, Some(0)));
            }
            Command::Reserve6
        }
        op::RELEASE_6 => {
            if cdb[1] & 0x1f != 0 {
                return Err(invalid(1, Some(0)));
            }
            Command::Release6
        }
        op::PERSISTENT_RESERVE_IN => Command::PersistentReserveIn {
            alloc: be16(cdb, 7),
        },
        op::PERSISTENT_RESERVE_OUT => Command::PersistentReserveOut {
            param_len: be32(cdb, 5),
        },
        op::READ_DEFECT_DATA_10 => Command::ReadDefectData {
            twelve: false,
            flags: cdb[2] & 0x1f,
            alloc: be16(cdb, 7),
        },
        op::READ_DEFECT_DATA_12 => Command::ReadDefectData {
            twelve: true,
            flags: cdb[1] & 0x1f,
            alloc: be32(cdb, 6),
        },
        _ => return Err(Sense::INVALID_COMMAND_OPERATION_CODE),
    };
    Ok(cmd)
}

/// LBA and transfer length of the 10/12/16-byte READ/WRITE-shaped CDBs.
fn lba_and_len(code: u8, cdb: &[u8]) -> (u64, u32) {
    match cdb.len() {
        10 => (u64::from(be32(cdb, 2)), be16(cdb, 7)),
        12 => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
        // Only 16-byte opcodes reach here with 16 bytes.
        _ => {
            debug_assert_eq!(cdb_len(code), Some(16));
            (be64(cdb, 2), be32(cdb, 10))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::SenseKey;
    use proptest::prelude::*;

    #[test]
    fn read10_fields_and_fua() {
        let cdb = [0x28, 0x08, 0, 0, 0x12, 0x34, 0, 0, 8, 0];
        assert_eq!(
            decode_cdb(&cdb),
            Ok(Command::Read {
                lba: 0x1234,
                blocks: 8,
                fua: true
            })
        );
    }

    #[test]
    fn read6_zero_length_means_256_blocks() {
        let cdb = [0x08, 0x01, 0x02, 0x03, 0, 0];
        assert_eq!(
            decode_cdb(&cdb),
            Ok(Command::Read {
                lba: 0x01_0203,
                blocks: 256,
                fua: false
            })
        );
    }

    #[test]
    fn rdprotect_is_invalid_field_with_pointer() {
        let cdb = [0x88, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        let s = decode_cdb(&cdb).unwrap_err();
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::IllegalRequest, 0x24, 0));
        let f = s.field.unwrap();
        assert!(f.in_cdb);
        assert_eq!((f.byte, f.bit), (1, Some(7)));
    }

    #[test]
    fn unknown_and_short_cdbs() {
        assert_eq!(decode_cdb(&[]), Err(Sense::INVALID_COMMAND_OPERATION_CODE));
        // WRITE ATOMIC 16, SANITIZE, EXTENDED COPY: not supported.
        for code in [0x9c, 0x48, 0x83] {
            let mut cdb = [0u8; 16];
            cdb[0] = code;
            assert_eq!(decode_cdb(&cdb), Err(Sense::INVALID_COMMAND_OPERATION_CODE));
        }
        assert_eq!(
            decode_cdb(&[0x28, 0, 0]),
            Err(Sense::INVALID_COMMAND_OPERATION_CODE)
        );
    }

    #[test]
    fn inquiry_page_without_evpd_is_invalid() {
        let s = decode_cdb(&[0x12, 0, 1, 1, 0, 0]).unwrap_err();
        assert_eq!(s, Sense::INVALID_FIELD_IN_CDB.at_cdb(2, None));
    }

    #[test]
    fn write_same_anchor_is_invalid() {
        let s = decode_cdb(&[0x41, 0x10, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap_err();
        assert_eq!(s.asc, 0x24);
        let ok = decode_cdb(&[0x93, 0x09, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0]);
        assert_eq!(
            ok,
            Ok(Command::WriteSame {
                lba: 5,
                blocks: 2,
                unmap: true,
                ndob: true
            })
        );
    }

    #[test]
    fn maintenance_in_unknown_service_action_points_at_byte_1() {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xa3;
        cdb[1] = 0x0a; // REPORT TARGET PORT GROUPS
        let s = decode_cdb(&cdb).unwrap_err();
        assert_eq!(s.field.unwrap().byte, 1);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = decode_cdb(&bytes);
        }

        #[test]
        fn decode_never_panics_on_known_opcodes(
            code in prop::sample::select(vec![
                0x00u8, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x16, 0x17, 0x1a, 0x1b, 0x1e, 0x25, 0x28,
                0x2a, 0x2e, 0x2f, 0x34, 0x35, 0x37, 0x41, 0x42, 0x55, 0x5a, 0x5e, 0x5f, 0x88,
                0x89, 0x8a, 0x8b, 0x8e, 0x8f, 0x90, 0x91, 0x93, 0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0xae,
                0xaf, 0xb7,
            ]),
            rest in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let mut cdb = vec![code];
            cdb.extend(rest);
            let _ = decode_cdb(&cdb);
        }
    }
}
