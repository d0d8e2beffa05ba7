//! iSCSI target over `blockcore` devices (RFC 7143).
//!
//! Sans-IO layers, each fed bytes or parsed values and returning what to
//! send, with the tokio shell in [`server`] kept thin:
//!
//! ```text
//!   TCP ──► pdu (BHS/AHS/data, CRC32C digests)
//!            ├─► login (security + operational negotiation, CHAP) ─► text
//!            └─► session (CmdSN window, R2T, Data-In/Out, TMF, NOP)
//!                   └─► scsi (CDB decode, SBC/SPC commands, sense,
//!                             reservations) ─► blockcore::BlockDevice
//! ```

pub mod chap;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod server;
pub mod session;
pub mod text;
