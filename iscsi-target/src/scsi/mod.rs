//! SCSI block commands (SPC-4, SBC-3) over a [`blockcore::BlockDevice`].

pub mod pr;
pub mod sense;

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
