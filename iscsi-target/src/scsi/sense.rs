//! Sense data (SPC-4 §4.5): what a CHECK CONDITION carries.

/// Sense keys (SPC-4 table 48).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    AbortedCommand = 0xb,
    Miscompare = 0xe,
}

/// One sense condition: key, additional sense code and qualifier, and for
/// ILLEGAL REQUEST the field pointer (SPC-4 §4.5.2.4.2) when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// Sense-key-specific information: for ILLEGAL REQUEST, the byte (and
    /// optionally bit) of the CDB or parameter list at fault.
    pub field: Option<FieldPointer>,
    /// The INFORMATION field (e.g. the offset of the first miscompare for
    /// COMPARE AND WRITE), with VALID set.
    pub information: Option<u32>,
}

/// Where in the CDB or parameter data an invalid field is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// True when the field is in the CDB, false for parameter data.
    pub in_cdb: bool,
    pub byte: u16,
    /// Bit within the byte, if one bit is at fault.
    pub bit: Option<u8>,
}

impl Sense {
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            field: None,
            information: None,
        }
    }

    // The conditions the target reports, named after SPC-4's ASC/ASCQ table.
    pub const NO_SENSE: Sense = Sense::new(SenseKey::NoSense, 0x00, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Sense =
        Sense::new(SenseKey::IllegalRequest, 0x20, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(SenseKey::IllegalRequest, 0x24, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense =
        Sense::new(SenseKey::IllegalRequest, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(SenseKey::IllegalRequest, 0x1a, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(SenseKey::IllegalRequest, 0x21, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Sense = Sense::new(SenseKey::IllegalRequest, 0x25, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense =
        Sense::new(SenseKey::IllegalRequest, 0x39, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(SenseKey::DataProtect, 0x27, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(SenseKey::Miscompare, 0x1d, 0x00);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x0c, 0x00);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Sense =
        Sense::new(SenseKey::DataProtect, 0x27, 0x07);
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(SenseKey::HardwareError, 0x44, 0x00);
    pub const NOT_READY_CAUSE_NOT_REPORTABLE: Sense = Sense::new(SenseKey::NotReady, 0x04, 0x00);
    pub const MEDIUM_NOT_PRESENT: Sense = Sense::new(SenseKey::NotReady, 0x3a, 0x00);
    pub const MEDIUM_REMOVAL_PREVENTED: Sense = Sense::new(SenseKey::IllegalRequest, 0x53, 0x02);
    pub const POWER_ON_OR_RESET: Sense = Sense::new(SenseKey::UnitAttention, 0x29, 0x00);
    pub const BUS_DEVICE_RESET: Sense = Sense::new(SenseKey::UnitAttention, 0x29, 0x03);
    pub const I_T_NEXUS_LOSS: Sense = Sense::new(SenseKey::UnitAttention, 0x29, 0x07);
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x01);
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x05);
    pub const CAPACITY_DATA_CHANGED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x09);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense =
        Sense::new(SenseKey::IllegalRequest, 0x55, 0x04);
    // iSCSI transport conditions (SAM-5 / RFC 7143 §13.5 via SPC-4 table).
    pub const DATA_PHASE_ERROR: Sense = Sense::new(SenseKey::AbortedCommand, 0x4b, 0x00);
    pub const PROTOCOL_SERVICE_CRC_ERROR: Sense = Sense::new(SenseKey::AbortedCommand, 0x47, 0x05);
    pub const UNEXPECTED_UNSOLICITED_DATA: Sense = Sense::new(SenseKey::AbortedCommand, 0x0c, 0x0c);
    pub const NOT_ENOUGH_UNSOLICITED_DATA: Sense = Sense::new(SenseKey::AbortedCommand, 0x0c, 0x0d);
    pub const INVALID_TARGET_PORT_TRANSFER_TAG: Sense =
        Sense::new(SenseKey::AbortedCommand, 0x4b, 0x01);
    pub const TOO_MUCH_WRITE_DATA: Sense = Sense::new(SenseKey::AbortedCommand, 0x4b, 0x02);

    /// The same condition with a field pointer into the CDB.
    #[must_use]
    pub const fn at_cdb(mut self, byte: u16, bit: Option<u8>) -> Sense {
        self.field = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        self
    }

    /// The same condition with a field pointer into the parameter data.
    #[must_use]
    pub const fn at_parameter(mut self, byte: u16, bit: Option<u8>) -> Sense {
        self.field = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        });
        self
    }

    /// The same condition with the INFORMATION field set.
    #[must_use]
    pub const fn with_information(mut self, information: u32) -> Sense {
        self.information = Some(information);
        self
    }

    /// Descriptor-format sense data (response code 72h, SPC-4 §4.5.2), as
    /// REQUEST SENSE with DESC set returns it: an 8-byte header (key,
    /// ASC, ASCQ, additional length), then an information descriptor
    /// (type 00h, 12 bytes) when INFORMATION is set and a sense-key
    /// specific descriptor (type 02h, 8 bytes) when a field pointer is.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key as u8, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.information {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00, 0, 0, 0, 0]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if self.field.is_some() {
            let fixed = self.to_fixed();
            b.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            b.extend_from_slice(&fixed[15..18]);
            b.push(0);
        }
        // At most 20 bytes of descriptors, well within a byte.
        #[allow(clippy::cast_possible_truncation)]
        {
            b[7] = (b.len() - 8) as u8;
        }
        b
    }

    /// Fixed-format sense data (response code 70h, SPC-4 §4.5.3), 18 bytes.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key as u8;
        if let Some(info) = self.information {
            b[0] |= 0x80; // VALID
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(f) = self.field {
            // SKSV, C/D, BPV, bit pointer; then the field pointer.
            let mut sks = 0x80;
            if f.in_cdb {
                sks |= 0x40;
            }
            if let Some(bit) = f.bit {
                sks |= 0x08 | (bit & 0x07);
            }
            b[15] = sks;
            b[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        b
    }
}
