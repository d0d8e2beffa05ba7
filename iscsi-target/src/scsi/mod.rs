//! SCSI block commands (SPC-4, SBC-3) over a [`blockcore::BlockDevice`].
//!
//! ```text
//!   LunMap::shape(lun, cdb)   pure: Data-Out / Data-In sizes for R2T planning
//!   LunMap::execute(...)      unit attentions ─► cdb::decode_cdb ─► pr check
//!                              ─► Lun (inquiry, mode, opcodes, block I/O)
//! ```

pub mod cdb;
pub mod inquiry;
pub mod lun;
pub mod mode;
pub mod opcodes;
pub mod pr;
pub mod sense;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

pub use cdb::{decode_cdb, Command};
pub use lun::{block_error_sense, Lun, LunIdentity};
pub use sense::{Sense, SenseKey};

/// SAM status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// The I_T nexus a command arrives on: who is asking, as SPC-4's
/// reservations and unit attentions need to tell initiators apart.
///
/// For iSCSI the initiator port is the initiator name plus the ISID
/// (RFC 7143 §4.4.4.1 "iSCSI Initiator Port Name": `name,i,0xISID`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// iSCSI initiator name (`InitiatorName` at login).
    pub initiator_name: String,
    /// The session's ISID (6 bytes).
    pub isid: [u8; 6],
    /// Target portal group tag the session logged in through.
    pub tpgt: u16,
}

impl Nexus {
    /// The SCSI transport ID of the initiator port (SPC-4 §7.6.4.6,
    /// iSCSI format code 01b), as PERSISTENT RESERVE IN reports it.
    pub fn initiator_port_name(&self) -> String {
        let i = &self.isid;
        format!(
            "{},i,0x{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.initiator_name, i[0], i[1], i[2], i[3], i[4], i[5]
        )
    }
}

/// The shape of a command before its data moves (see [`LunMap::shape`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandShape {
    /// Bytes of Data-Out the command needs (0 for none).
    pub data_out_len: u32,
    /// Most bytes of Data-In it may return (transfer or allocation length).
    pub data_in_len: u32,
}

/// Task management resets (RFC 7143 §11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    LogicalUnit,
    TargetWarm,
    TargetCold,
}

/// A command's result: SAM status, sense data for CHECK CONDITION, and the
/// Data-In bytes (already cut to the allocation or transfer length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data_in: Bytes,
}

/// The 8-byte LUN field of a PDU or REPORT LUNS entry for a LUN number
/// (SAM-5 §4.7): peripheral device addressing below 256, flat space
/// addressing up to 16383.
pub fn lun_to_wire(lun: u64) -> [u8; 8] {
    let mut w = [0u8; 8];
    let lun = lun.min(0x3fff);
    let [.., hi, lo] = lun.to_be_bytes();
    if lun < 256 {
        w[1] = lo;
    } else {
        w[0] = 0x40 | hi;
        w[1] = lo;
    }
    w
}

/// The LUN number of an 8-byte LUN field: the inverse of [`lun_to_wire`]
/// for peripheral and flat space addressing; other methods map to a number
/// no LUN has.
pub fn lun_from_wire(w: [u8; 8]) -> u64 {
    match w[0] >> 6 {
        0 if w[0] == 0 => u64::from(w[1]),
        1 => (u64::from(w[0] & 0x3f) << 8) | u64::from(w[1]),
        _ => u64::MAX,
    }
}

/// The LUNs one iSCSI target exposes (LUN number -> [`Lun`]).
#[derive(Debug, Default)]
pub struct LunMap {
    luns: BTreeMap<u64, Arc<Lun>>,
}

/// Block length assumed for a CDB addressed to a LUN that does not exist.
const ABSENT_BLOCK_SIZE: u32 = 512;

impl LunMap {
    pub fn new(luns: Vec<(u64, Arc<Lun>)>) -> LunMap {
        LunMap {
            luns: luns.into_iter().collect(),
        }
    }

    pub fn get(&self, lun: u64) -> Option<&Arc<Lun>> {
        self.luns.get(&lun)
    }

    /// (LUN, initiator) pairs whose commands a PREEMPT AND ABORT aborted
    /// since the last call; the transport aborts them in every session.
    pub fn take_preempted(&self) -> Vec<(u64, Nexus)> {
        self.luns
            .iter()
            .flat_map(|(n, l)| l.take_preempted().into_iter().map(move |x| (*n, x)))
            .collect()
    }

    /// The shape of a command before its data moves: how many bytes of
    /// Data-Out it needs and how many Data-In bytes it may return at most,
    /// or the sense for an undecodable CDB. Pure, cheap and panic-free on
    /// any bytes.
    pub fn shape(&self, lun: u64, cdb: &[u8]) -> Result<CommandShape, Sense> {
        let command = decode_cdb(cdb)?;
        let bs = self
            .luns
            .get(&lun)
            .map_or(ABSENT_BLOCK_SIZE, |l| l.block_size());
        Ok(shape_of(&command, bs))
    }

    /// Executes one command from `nexus` on `lun`. `data_out` holds the
    /// Data-Out bytes the initiator actually sent: WRITE-type commands
    /// write the whole blocks received (the transport reports the
    /// residual), COMPARE AND WRITE and WRITE SAME need exactly their
    /// length, parameter lists are cut to their CDB length.
    pub async fn execute(&self, nexus: &Nexus, lun: u64, cdb: &[u8], data_out: Bytes) -> Outcome {
        let decoded = decode_cdb(cdb);
        if let Ok(Command::ReportLuns { select, alloc }) = decoded {
            // Answered here, where all LUNs are known; a pending unit
            // attention is not reported to REPORT LUNS (SPC-4 §5.14).
            return self.report_luns(select, alloc);
        }
        match self.luns.get(&lun) {
            Some(l) => l.execute(nexus, cdb, data_out).await,
            None => match decoded {
                Ok(Command::Inquiry { evpd, alloc, .. }) => {
                    let mut d = inquiry::not_present(evpd);
                    d.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
                    Outcome::good(d)
                }
                Ok(Command::RequestSense { descriptor, alloc }) => {
                    // SPC-4 §6.39: the sense data itself says why.
                    let s = Sense::LOGICAL_UNIT_NOT_SUPPORTED;
                    let mut d = if descriptor {
                        s.to_descriptor()
                    } else {
                        s.to_fixed().to_vec()
                    };
                    d.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
                    Outcome::good(d)
                }
                _ => Outcome::check(Sense::LOGICAL_UNIT_NOT_SUPPORTED),
            },
        }
    }

    /// REPORT LUNS parameter data (SPC-4 table 284): 0..4 LUN LIST LENGTH,
    /// 4..8 reserved, then one 8-byte LUN per logical unit.
    fn report_luns(&self, select: u8, alloc: u32) -> Outcome {
        let luns: Vec<u64> = match select {
            // All logical units / all but well-known ones (we have none).
            0x00 | 0x02 => self.luns.keys().copied().collect(),
            // Only well-known logical units, or SPC-5's administrative
            // selections: none.
            0x01 | 0x10..=0x12 => Vec::new(),
            _ => return Outcome::check(Sense::INVALID_FIELD_IN_CDB.at_cdb(2, None)),
        };
        let mut d = Vec::with_capacity(8 + 8 * luns.len());
        let len = u32::try_from(8 * luns.len()).unwrap_or(u32::MAX);
        d.extend_from_slice(&len.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for lun in luns {
            d.extend_from_slice(&lun_to_wire(lun));
        }
        d.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
        Outcome::good(d)
    }

    /// An I_T nexus ended (logout, connection loss without reinstatement):
    /// releases its RESERVE(6) reservation and forgets its unit attentions.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        for l in self.luns.values() {
            l.nexus_lost(nexus);
        }
    }

    /// Task management: LOGICAL UNIT RESET on one LUN (`Some`), TARGET
    /// WARM/COLD RESET on all (`None`).
    pub fn reset(&self, lun: Option<u64>, kind: ResetKind) {
        match lun {
            Some(n) => {
                if let Some(l) = self.luns.get(&n) {
                    l.reset(kind);
                }
            }
            None => {
                for l in self.luns.values() {
                    l.reset(kind);
                }
            }
        }
    }
}

/// Data-Out and Data-In sizes of a decoded command on a LUN with blocks of
/// `bs` bytes.
fn shape_of(command: &Command, bs: u32) -> CommandShape {
    use cdb::ByteCheck;
    let blocks = |n: u32| u32::try_from(u64::from(n) * u64::from(bs)).unwrap_or(u32::MAX);
    let (data_out_len, data_in_len) = match *command {
        Command::Read { blocks: n, .. } => (0, blocks(n)),
        Command::Write { blocks: n, .. } => (blocks(n), 0),
        Command::Verify {
            blocks: n, bytchk, ..
        } => match bytchk {
            ByteCheck::None => (0, 0),
            ByteCheck::Full => (blocks(n), 0),
            ByteCheck::OneBlock => (bs, 0),
        },
        Command::WriteSame { ndob, .. } => (if ndob { 0 } else { bs }, 0),
        Command::CompareAndWrite { blocks: n, .. } => (blocks(n).saturating_mul(2), 0),
        Command::Unmap { param_len }
        | Command::ModeSelect { param_len, .. }
        | Command::PersistentReserveOut { param_len } => (param_len, 0),
        Command::RequestSense { alloc, .. }
        | Command::Inquiry { alloc, .. }
        | Command::ReadCapacity16 { alloc }
        | Command::ModeSense { alloc, .. }
        | Command::ReportLuns { alloc, .. }
        | Command::ReportSupportedOpcodes { alloc, .. }
        | Command::GetLbaStatus { alloc, .. }
        | Command::PersistentReserveIn { alloc }
        | Command::ReadDefectData { alloc, .. } => (0, alloc),
        Command::ReadCapacity10 => (0, 8),
        Command::TestUnitReady
        | Command::SynchronizeCache { .. }
        | Command::PreFetch { .. }
        | Command::StartStopUnit { .. }
        | Command::PreventAllowMediumRemoval { .. }
        | Command::Reserve6
        | Command::Release6 => (0, 0),
    };
    CommandShape {
        data_out_len,
        data_in_len,
    }
}
