//! Reservations: SPC-4 §5.13 persistent reservations (PERSISTENT RESERVE
//! IN/OUT) and the SPC-2 RESERVE(6)/RELEASE(6) reservation, for one
//! logical unit.
//!
//! Pure state: the caller (the logical unit) owns one [`Reservations`],
//! asks [`Reservations::check_access`] before running any command, routes
//! the reservation commands here, and queues the returned [`Effects`]
//! (unit attentions for other I_T nexuses, task sets to abort).
//!
//! What the device server declares in REPORT CAPABILITIES, and therefore
//! implements: logical unit scope only, all six reservation types, no
//! SPEC_I_PT, no ALL_TG_PT, no persistence through power loss (APTPL), no
//! REGISTER AND MOVE or REPLACE LOST RESERVATION, and compatible
//! reservation handling (CRH: SPC-4 §5.13.3 exceptions for RESERVE(6)/
//! RELEASE(6) while persistent reservations exist).

use super::{Nexus, Sense, SenseKey};

/// PERSISTENT RESERVE IN operation code.
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// PERSISTENT RESERVE OUT operation code.
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// RESERVE(6) operation code.
pub const RESERVE_6: u8 = 0x16;
/// RELEASE(6) operation code.
pub const RELEASE_6: u8 = 0x17;

/// 26h/04h, not among the shared constants.
pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Sense =
    Sense::new(SenseKey::IllegalRequest, 0x26, 0x04);

/// PERSISTENT RESERVE IN service actions (SPC-4 table 169).
mod prin_sa {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 table 180).
mod prout_sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
}

/// The basic PERSISTENT RESERVE OUT parameter list is exactly 24 bytes.
const BASIC_PARAMETER_LIST_LEN: u32 = 24;

/// Persistent reservation types (SPC-4 table 171).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    /// Decodes the TYPE field; `None` for reserved or obsolete codes.
    pub fn from_code(code: u8) -> Option<PrType> {
        Some(match code {
            0x1 => PrType::WriteExclusive,
            0x3 => PrType::ExclusiveAccess,
            0x5 => PrType::WriteExclusiveRegistrantsOnly,
            0x6 => PrType::ExclusiveAccessRegistrantsOnly,
            0x7 => PrType::WriteExclusiveAllRegistrants,
            0x8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// The TYPE field value.
    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 0x1,
            PrType::ExclusiveAccess => 0x3,
            PrType::WriteExclusiveRegistrantsOnly => 0x5,
            PrType::ExclusiveAccessRegistrantsOnly => 0x6,
            PrType::WriteExclusiveAllRegistrants => 0x7,
            PrType::ExclusiveAccessAllRegistrants => 0x8,
        }
    }

    /// Every registrant is a reservation holder.
    pub fn is_all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants (not only the holder) get full access.
    pub fn is_registrants_only(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
        )
    }

    /// Reads stay shared with everyone (the Write Exclusive family).
    fn reads_shared(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusive
                | PrType::WriteExclusiveRegistrantsOnly
                | PrType::WriteExclusiveAllRegistrants
        )
    }
}

/// Why a reservation command (or a command checked against the
/// reservations) cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrError {
    /// CHECK CONDITION with this sense.
    Sense(Sense),
    /// The caller answers status RESERVATION CONFLICT (18h), no sense.
    Conflict,
}

/// Side effects on other I_T nexuses, for the caller to carry out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Unit attentions to queue, each for the named I_T nexus (never the
    /// nexus that sent the command).
    pub unit_attentions: Vec<(Nexus, Sense)>,
    /// PREEMPT AND ABORT: the preempted I_T nexuses whose tasks on this
    /// logical unit the transport must abort (SAM-5 task aborted, no
    /// status). Empty for every other command.
    pub abort_tasks_of: Vec<Nexus>,
}

impl Effects {
    fn ua(&mut self, nexus: &Nexus, sense: Sense) {
        self.unit_attentions.push((nexus.clone(), sense));
    }
}

#[derive(Clone, Debug)]
struct Registration {
    nexus: Nexus,
    key: u64,
}

#[derive(Clone, Debug)]
struct Persistent {
    ty: PrType,
    /// The holding I_T nexus; `None` for the all-registrants types, where
    /// every registered I_T nexus holds the reservation.
    holder: Option<Nexus>,
}

/// Reservation state of one logical unit.
#[derive(Debug, Default)]
pub struct Reservations {
    /// In registration order, which READ KEYS reports.
    registrations: Vec<Registration>,
    reservation: Option<Persistent>,
    /// PRGENERATION: wraps.
    generation: u32,
    /// The SPC-2 RESERVE(6) holder.
    reserve6_holder: Option<Nexus>,
}

/// How a command fares under a persistent reservation it does not hold
/// (SPC-4 table 56, SBC-3 table 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Allowed whatever the reservation.
    Always,
    /// Reads the medium or reports state: allowed where reads are shared.
    Read,
    /// Changes the medium or the logical unit's state.
    Write,
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Lengths here are bounded by the number of registrations, far below
/// 4 GiB; saturate rather than panic.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn invalid_cdb(byte: u16, bit: Option<u8>) -> PrError {
    PrError::Sense(Sense::INVALID_FIELD_IN_CDB.at_cdb(byte, bit))
}

fn invalid_param(byte: u16, bit: Option<u8>) -> PrError {
    PrError::Sense(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(byte, bit))
}

/// The classification of a command by opcode and, where it matters, its
/// service action or control bits.
fn classify(cdb: &[u8]) -> Access {
    let op = byte(cdb, 0);
    match op {
        // TEST UNIT READY (as REPORT CAPABILITIES' ALLOW COMMANDS 001b
        // declares), REQUEST SENSE, INQUIRY, LOG SENSE, READ CAPACITY(10),
        // ACCESS CONTROL IN/OUT, REPORT LUNS, and the reservation commands,
        // which apply their own rules.
        0x00 | 0x03 | 0x12 | 0x4d | 0x25 | 0x86 | 0x87 | 0xa0 | 0x5e | 0x5f | 0x16 | 0x17
        | 0x56 | 0x57 => Access::Always,
        // READ(6/10/12/16), VERIFY(10/12/16), PRE-FETCH(10/16), READ DEFECT
        // DATA(10/12), READ LONG(10), READ BUFFER, MODE SENSE(6/10),
        // RECEIVE DIAGNOSTIC RESULTS, READ ATTRIBUTE, SECURITY PROTOCOL IN.
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x37 | 0xb7 | 0x3e
        | 0x3c | 0x1a | 0x5a | 0x1c | 0x8c | 0xa2 => Access::Read,
        // PREVENT ALLOW MEDIUM REMOVAL: only PREVENT != 0 restricts others.
        0x1e => {
            if byte(cdb, 4) & 0x03 != 0 {
                Access::Write
            } else {
                Access::Always
            }
        }
        // START STOP UNIT: starting (START=1, POWER CONDITION=0) is harmless.
        0x1b => {
            let b4 = byte(cdb, 4);
            if b4 & 0xf0 == 0 && b4 & 0x01 == 1 {
                Access::Always
            } else {
                Access::Write
            }
        }
        // SERVICE ACTION IN(16).
        0x9e => match byte(cdb, 1) & 0x1f {
            0x10 => Access::Always,      // READ CAPACITY(16)
            0x11..=0x13 => Access::Read, // READ LONG(16), GET LBA STATUS, REPORT REFERRALS
            _ => Access::Write,
        },
        // SERVICE ACTION IN(12): READ MEDIA SERIAL NUMBER.
        0xab if byte(cdb, 1) & 0x1f == 0x01 => Access::Always,
        // MAINTENANCE IN: the REPORT ... service actions (identifying
        // information, target port groups, aliases, supported operation
        // codes and task management functions, priority, timestamp) are
        // always allowed; the rest (management protocol in) only read.
        0xa3 => match byte(cdb, 1) & 0x1f {
            0x05 | 0x0a..=0x0f => Access::Always,
            _ => Access::Read,
        },
        // Variable length: READ(32), VERIFY(32).
        0x7f => match be_u16(cdb, 8) {
            0x0009 | 0x000a => Access::Read,
            _ => Access::Write,
        },
        // Everything else writes or changes state (WRITE*, WRITE AND
        // VERIFY, WRITE SAME, UNMAP, COMPARE AND WRITE, ORWRITE, SYNCHRONIZE
        // CACHE, FORMAT UNIT, MODE SELECT, LOG SELECT, WRITE BUFFER,
        // SEND DIAGNOSTIC, EXTENDED COPY, RECEIVE COPY RESULTS, ...) or is
        // unknown: conservatively restricted.
        _ => Access::Write,
    }
}

/// Commands another I_T nexus may still send while an SPC-2 RESERVE(6)
/// reservation is held (SPC-2 §7.21): INQUIRY, REPORT LUNS, REQUEST SENSE
/// and RELEASE (a no-op for a non-holder).
fn allowed_under_reserve6(cdb: &[u8]) -> bool {
    matches!(byte(cdb, 0), 0x12 | 0xa0 | 0x03 | RELEASE_6 | 0x57)
}

/// The parsed basic PERSISTENT RESERVE OUT parameter list.
struct ProutParams {
    key: u64,
    sa_key: u64,
}

impl Reservations {
    pub fn new() -> Reservations {
        Reservations::default()
    }

    /// PRGENERATION as PERSISTENT RESERVE IN reports it.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The reservation key registered for `nexus`, if any.
    pub fn registered_key(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| r.nexus == *nexus)
            .map(|r| r.key)
    }

    /// The persistent reservation type, if one is held.
    pub fn reservation_type(&self) -> Option<PrType> {
        self.reservation.as_ref().map(|r| r.ty)
    }

    /// The I_T nexus holding a RESERVE(6) reservation, if any.
    pub fn reserve6_holder(&self) -> Option<&Nexus> {
        self.reserve6_holder.as_ref()
    }

    fn position(&self, nexus: &Nexus) -> Option<usize> {
        self.registrations.iter().position(|r| r.nexus == *nexus)
    }

    fn is_registered(&self, nexus: &Nexus) -> bool {
        self.position(nexus).is_some()
    }

    fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            None => false,
            Some(r) => match &r.holder {
                Some(h) => h == nexus,
                None => self.is_registered(nexus),
            },
        }
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// Another I_T nexus holds RESERVE(6): SPC-2 rejects persistent
    /// reservation commands from everyone else.
    fn reserve6_blocks(&self, nexus: &Nexus) -> bool {
        self.reserve6_holder.as_ref().is_some_and(|h| h != nexus)
    }

    /// PERSISTENT RESERVE IN (opcode 5Eh): READ KEYS, READ RESERVATION,
    /// REPORT CAPABILITIES, READ FULL STATUS. Returns the full parameter
    /// data; the caller truncates to the CDB's allocation length (bytes
    /// 7..9), which leaves the length fields describing the full data.
    pub fn persistent_reserve_in(&self, nexus: &Nexus, cdb: &[u8]) -> Result<Vec<u8>, PrError> {
        if cdb.len() < 10 {
            return Err(PrError::Sense(Sense::INVALID_FIELD_IN_CDB));
        }
        let sa = cdb[1] & 0x1f;
        if sa > prin_sa::READ_FULL_STATUS {
            return Err(invalid_cdb(1, Some(4)));
        }
        if self.reserve6_blocks(nexus) {
            return Err(PrError::Conflict);
        }
        Ok(match sa {
            prin_sa::READ_KEYS => self.read_keys(),
            prin_sa::READ_RESERVATION => self.read_reservation(),
            prin_sa::REPORT_CAPABILITIES => Self::report_capabilities(),
            _ => self.read_full_status(),
        })
    }

    /// READ KEYS (SPC-4 §6.15.2):
    /// bytes 0..4 PRGENERATION, 4..8 ADDITIONAL LENGTH (8 per key), then one
    /// 8-byte reservation key per registered I_T nexus.
    fn read_keys(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.registrations.len());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&len_u32(8 * self.registrations.len()).to_be_bytes());
        for r in &self.registrations {
            out.extend_from_slice(&r.key.to_be_bytes());
        }
        out
    }

    /// READ RESERVATION (SPC-4 §6.15.3):
    /// bytes 0..4 PRGENERATION, 4..8 ADDITIONAL LENGTH (0 or 16); with a
    /// reservation: 8..16 RESERVATION KEY (zero for the all-registrants
    /// types), 16..20 obsolete, 20 reserved, 21 SCOPE (7..4) | TYPE (3..0),
    /// 22..24 obsolete.
    fn read_reservation(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.extend_from_slice(&self.generation.to_be_bytes());
        let Some(res) = &self.reservation else {
            out.extend_from_slice(&0u32.to_be_bytes());
            return out;
        };
        let key = res
            .holder
            .as_ref()
            .and_then(|h| self.registered_key(h))
            .unwrap_or(0);
        out.extend_from_slice(&16u32.to_be_bytes());
        out.extend_from_slice(&key.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.push(0);
        out.push(res.ty.code()); // scope 0h: logical unit
        out.extend_from_slice(&[0; 2]);
        out
    }

    /// REPORT CAPABILITIES (SPC-4 §6.15.4), 8 bytes:
    /// 0..2 LENGTH (8); 2: RLR_C(7) CRH(4) SIP_C(3) ATP_C(2) PTPL_C(0);
    /// 3: TMV(7) ALLOW COMMANDS(6..4) PTPL_A(0); 4..6 PERSISTENT
    /// RESERVATION TYPE MASK: byte 4 WR_EX_AR(7) EX_AC_RO(6) WR_EX_RO(5)
    /// EX_AC(3) WR_EX(1), byte 5 EX_AC_AR(0); 6..8 reserved.
    fn report_capabilities() -> Vec<u8> {
        vec![
            0x00,
            0x08,
            // CRH only: no replace lost reservation, SPEC_I_PT, ALL_TG_PT,
            // or persistence through power loss.
            0x10,
            // TMV, ALLOW COMMANDS 001b: TEST UNIT READY passes Write
            // Exclusive and Exclusive Access reservations.
            0x80 | 0x10,
            0xea,
            0x01,
            0x00,
            0x00,
        ]
    }

    /// READ FULL STATUS (SPC-4 §6.15.5):
    /// bytes 0..4 PRGENERATION, 4..8 ADDITIONAL LENGTH, then per
    /// registration a descriptor: 0..8 RESERVATION KEY, 8..12 reserved,
    /// 12 ALL_TG_PT(1) R_HOLDER(0), 13 SCOPE | TYPE (when R_HOLDER),
    /// 14..18 reserved, 18..20 RELATIVE TARGET PORT IDENTIFIER,
    /// 20..24 ADDITIONAL DESCRIPTOR LENGTH, 24.. TransportID.
    fn read_full_status(&self) -> Vec<u8> {
        let mut descriptors = Vec::new();
        for r in &self.registrations {
            let transport_id = iscsi_transport_id(&r.nexus);
            descriptors.extend_from_slice(&r.key.to_be_bytes());
            descriptors.extend_from_slice(&[0; 4]);
            let holder = self.is_holder(&r.nexus);
            descriptors.push(u8::from(holder));
            descriptors.push(match (&self.reservation, holder) {
                (Some(res), true) => res.ty.code(),
                _ => 0,
            });
            descriptors.extend_from_slice(&[0; 4]);
            // The target port is identified by the portal group the nexus
            // came through: the LU has one target port per portal group.
            descriptors.extend_from_slice(&r.nexus.tpgt.to_be_bytes());
            descriptors.extend_from_slice(&len_u32(transport_id.len()).to_be_bytes());
            descriptors.extend_from_slice(&transport_id);
        }
        let mut out = Vec::with_capacity(8 + descriptors.len());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&len_u32(descriptors.len()).to_be_bytes());
        out.extend_from_slice(&descriptors);
        out
    }

    /// PERSISTENT RESERVE OUT (opcode 5Fh). CDB: byte 1 SERVICE ACTION
    /// (4..0), byte 2 SCOPE (7..4) | TYPE (3..0), bytes 5..9 PARAMETER LIST
    /// LENGTH. `params` is the Data-Out buffer, the basic parameter list
    /// (SPC-4 §6.16.3): 0..8 RESERVATION KEY, 8..16 SERVICE ACTION
    /// RESERVATION KEY, 16..20 obsolete, 20 SPEC_I_PT(3) ALL_TG_PT(2)
    /// APTPL(0), 21 reserved, 22..24 obsolete.
    pub fn persistent_reserve_out(
        &mut self,
        nexus: &Nexus,
        cdb: &[u8],
        params: &[u8],
    ) -> Result<Effects, PrError> {
        if cdb.len() < 10 {
            return Err(PrError::Sense(Sense::INVALID_FIELD_IN_CDB));
        }
        let sa = cdb[1] & 0x1f;
        let scope = cdb[2] >> 4;
        let ty = cdb[2] & 0x0f;
        // REGISTER AND MOVE and REPLACE LOST RESERVATION are not supported.
        if sa > prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY {
            return Err(invalid_cdb(1, Some(4)));
        }
        let registering = matches!(
            sa,
            prout_sa::REGISTER | prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY
        );
        // SPEC_I_PT would allow a longer list; it is not supported, so say
        // that rather than complain about the length.
        let flags = byte(params, 20);
        if params.len() > 20 && flags & 0x08 != 0 {
            return Err(invalid_param(20, Some(3)));
        }
        if be_u32(cdb, 5) != BASIC_PARAMETER_LIST_LEN
            || params.len() < BASIC_PARAMETER_LIST_LEN as usize
        {
            return Err(PrError::Sense(Sense::PARAMETER_LIST_LENGTH_ERROR));
        }
        if registering {
            // ATP_C = 0 and PTPL_C = 0 in REPORT CAPABILITIES.
            if flags & 0x04 != 0 {
                return Err(invalid_param(20, Some(2)));
            }
            if flags & 0x01 != 0 {
                return Err(invalid_param(20, Some(0)));
            }
        }
        if self.reserve6_blocks(nexus) {
            return Err(PrError::Conflict);
        }
        let p = ProutParams {
            key: be_u64(params, 0),
            sa_key: be_u64(params, 8),
        };
        match sa {
            prout_sa::REGISTER => self.register(nexus, &p, false),
            prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY => self.register(nexus, &p, true),
            _ => {
                // Every other service action needs a registered nexus sending
                // its own key.
                if self.registered_key(nexus) != Some(p.key) {
                    return Err(PrError::Conflict);
                }
                match sa {
                    prout_sa::RESERVE => self.reserve(nexus, scope, ty),
                    prout_sa::RELEASE => self.release(nexus, scope, ty),
                    prout_sa::CLEAR => Ok(self.clear(nexus)),
                    prout_sa::PREEMPT | prout_sa::PREEMPT_AND_ABORT => {
                        self.preempt(nexus, &p, scope, ty, sa == prout_sa::PREEMPT_AND_ABORT)
                    }
                    // Not reached: the range was checked above.
                    _ => Err(invalid_cdb(1, Some(4))),
                }
            }
        }
    }

    /// REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.13.7).
    fn register(
        &mut self,
        nexus: &Nexus,
        p: &ProutParams,
        ignore: bool,
    ) -> Result<Effects, PrError> {
        let mut fx = Effects::default();
        match self.position(nexus) {
            None => {
                // An unregistered nexus has no key to present but zero.
                if !ignore && p.key != 0 {
                    return Err(PrError::Conflict);
                }
                if p.sa_key != 0 {
                    self.registrations.push(Registration {
                        nexus: nexus.clone(),
                        key: p.sa_key,
                    });
                    self.bump_generation();
                }
                // Zero from an unregistered nexus: GOOD, nothing changes.
            }
            Some(i) => {
                if !ignore && self.registrations[i].key != p.key {
                    return Err(PrError::Conflict);
                }
                if p.sa_key == 0 {
                    self.unregister(i, &mut fx);
                } else {
                    self.registrations[i].key = p.sa_key;
                }
                self.bump_generation();
            }
        }
        Ok(fx)
    }

    /// Removes registration `i` by its own request (SPC-4 §5.13.11.3): a
    /// holder's reservation goes with it (registrants-only: RESERVATIONS
    /// RELEASED to the remaining registrants); an all-registrants
    /// reservation goes with its last registrant.
    fn unregister(&mut self, i: usize, fx: &mut Effects) {
        let gone = self.registrations.remove(i).nexus;
        let Some(res) = &self.reservation else { return };
        match &res.holder {
            Some(h) if *h == gone => {
                let ty = res.ty;
                self.reservation = None;
                if ty.is_registrants_only() {
                    for r in &self.registrations {
                        fx.ua(&r.nexus, Sense::RESERVATIONS_RELEASED);
                    }
                }
            }
            None if self.registrations.is_empty() => self.reservation = None,
            _ => {}
        }
    }

    /// RESERVE (SPC-4 §5.13.9). Key already verified. Does not change
    /// PRGENERATION.
    fn reserve(&mut self, nexus: &Nexus, scope: u8, ty: u8) -> Result<Effects, PrError> {
        if scope != 0 {
            return Err(invalid_cdb(2, Some(7)));
        }
        let ty = PrType::from_code(ty).ok_or_else(|| invalid_cdb(2, Some(3)))?;
        match &self.reservation {
            None => {
                self.reservation = Some(Persistent {
                    ty,
                    holder: (!ty.is_all_registrants()).then(|| nexus.clone()),
                });
                Ok(Effects::default())
            }
            // Re-reserving what one holds is a no-op; anything else conflicts.
            Some(res) if self.is_holder(nexus) && res.ty == ty => Ok(Effects::default()),
            Some(_) => Err(PrError::Conflict),
        }
    }

    /// RELEASE (SPC-4 §5.13.11.2). Key already verified. Does not change
    /// PRGENERATION.
    fn release(&mut self, nexus: &Nexus, scope: u8, ty: u8) -> Result<Effects, PrError> {
        let mut fx = Effects::default();
        let Some(res) = &self.reservation else {
            return Ok(fx);
        };
        // A registered non-holder releasing: GOOD, nothing changes.
        if !self.is_holder(nexus) {
            return Ok(fx);
        }
        if scope != 0 || PrType::from_code(ty) != Some(res.ty) {
            return Err(PrError::Sense(INVALID_RELEASE_OF_PERSISTENT_RESERVATION));
        }
        let shared = res.ty.is_registrants_only() || res.ty.is_all_registrants();
        self.reservation = None;
        if shared {
            for r in self.registrations.iter().filter(|r| r.nexus != *nexus) {
                fx.ua(&r.nexus, Sense::RESERVATIONS_RELEASED);
            }
        }
        Ok(fx)
    }

    /// CLEAR (SPC-4 §5.13.11.2.6): drops the reservation and every
    /// registration; RESERVATIONS PREEMPTED to the other registrants.
    fn clear(&mut self, nexus: &Nexus) -> Effects {
        let mut fx = Effects::default();
        for r in self.registrations.iter().filter(|r| r.nexus != *nexus) {
            fx.ua(&r.nexus, Sense::RESERVATIONS_PREEMPTED);
        }
        self.registrations.clear();
        self.reservation = None;
        self.bump_generation();
        fx
    }

    /// PREEMPT / PREEMPT AND ABORT (SPC-4 §5.13.12). Key already verified.
    fn preempt(
        &mut self,
        nexus: &Nexus,
        p: &ProutParams,
        scope: u8,
        ty: u8,
        abort: bool,
    ) -> Result<Effects, PrError> {
        let mut fx = Effects::default();
        let current = self.reservation.clone();
        // Whose reservation is taken over: with an all-registrants
        // reservation a zero key names every other registrant; otherwise the
        // holder's key names the holder.
        let takes_reservation = match &current {
            None => false,
            Some(res) => match &res.holder {
                None => p.sa_key == 0,
                Some(h) => self.registered_key(h) == Some(p.sa_key),
            },
        };
        if !takes_reservation {
            // Only registrations go: a zero key names none.
            if p.sa_key == 0 {
                return Err(invalid_param(8, None));
            }
            let removed = self.remove_keyed(nexus, |k| k == p.sa_key, true, &mut fx);
            if removed.is_empty() {
                return Err(PrError::Conflict);
            }
            self.after_preempt(nexus, removed, abort, &mut fx);
            return Ok(fx);
        }
        if scope != 0 {
            return Err(invalid_cdb(2, Some(7)));
        }
        let new_ty = PrType::from_code(ty).ok_or_else(|| invalid_cdb(2, Some(3)))?;
        let old_ty = current.map(|r| r.ty);
        let removed = if p.sa_key == 0 {
            self.remove_keyed(nexus, |_| true, false, &mut fx)
        } else {
            self.remove_keyed(nexus, |k| k == p.sa_key, false, &mut fx)
        };
        self.reservation = Some(Persistent {
            ty: new_ty,
            holder: (!new_ty.is_all_registrants()).then(|| nexus.clone()),
        });
        // The remaining registrants learn the reservation changed under them.
        if old_ty != Some(new_ty) {
            for r in self.registrations.iter().filter(|r| r.nexus != *nexus) {
                fx.ua(&r.nexus, Sense::RESERVATIONS_RELEASED);
            }
        }
        self.after_preempt(nexus, removed, abort, &mut fx);
        Ok(fx)
    }

    /// Removes the registrations whose key matches (the sender's own only if
    /// `include_self`), with REGISTRATIONS PREEMPTED for each other nexus.
    fn remove_keyed(
        &mut self,
        nexus: &Nexus,
        pick: impl Fn(u64) -> bool,
        include_self: bool,
        fx: &mut Effects,
    ) -> Vec<Nexus> {
        let mut removed = Vec::new();
        self.registrations.retain(|r| {
            let own = r.nexus == *nexus;
            if pick(r.key) && (include_self || !own) {
                if !own {
                    fx.ua(&r.nexus, Sense::REGISTRATIONS_PREEMPTED);
                }
                removed.push(r.nexus.clone());
                false
            } else {
                true
            }
        });
        removed
    }

    /// Common tail of a successful preempt: a holder that lost its
    /// registration loses its reservation (the sender keeps any reservation
    /// it took over), an all-registrants reservation needs a registrant,
    /// and the generation moves.
    fn after_preempt(&mut self, nexus: &Nexus, removed: Vec<Nexus>, abort: bool, fx: &mut Effects) {
        let orphaned = match &self.reservation {
            Some(Persistent {
                holder: Some(h), ..
            }) => removed.contains(h),
            Some(Persistent { holder: None, .. }) => self.registrations.is_empty(),
            None => false,
        };
        if orphaned {
            self.reservation = None;
        }
        if abort {
            fx.abort_tasks_of = removed.into_iter().filter(|n| n != nexus).collect();
        }
        self.bump_generation();
    }

    /// RESERVE(6) (opcode 16h), SPC-2 semantics with the SPC-4 §5.13.3
    /// exceptions.
    pub fn reserve6(&mut self, nexus: &Nexus) -> Result<(), PrError> {
        if let Some(res) = &self.reservation {
            // GOOD without effect for the holder, and for a registrant of a
            // registrants-only or all-registrants reservation.
            let shared = res.ty.is_registrants_only() || res.ty.is_all_registrants();
            if self.is_holder(nexus) || (shared && self.is_registered(nexus)) {
                return Ok(());
            }
        }
        // SPC-2: while any registration exists, RESERVE conflicts.
        if !self.registrations.is_empty() || self.reserve6_blocks(nexus) {
            return Err(PrError::Conflict);
        }
        self.reserve6_holder = Some(nexus.clone());
        Ok(())
    }

    /// RELEASE(6) (opcode 17h): releases the nexus's own reservation; GOOD
    /// without effect if there is none or another nexus holds it.
    pub fn release6(&mut self, nexus: &Nexus) -> Result<(), PrError> {
        // The holder can always let go, so RESERVE(6) can never get stuck.
        if self.reserve6_holder.as_ref() == Some(nexus) {
            self.reserve6_holder = None;
            return Ok(());
        }
        if let Some(res) = &self.reservation {
            let shared = res.ty.is_registrants_only() || res.ty.is_all_registrants();
            if self.is_holder(nexus) || (shared && self.is_registered(nexus)) {
                return Ok(());
            }
        }
        // SPC-2: while any registration exists, RELEASE conflicts.
        if self.registrations.is_empty() {
            Ok(())
        } else {
            Err(PrError::Conflict)
        }
    }

    /// Whether a command (by its CDB) from `nexus` may run now: SPC-2
    /// RESERVE(6) rules, then SPC-4 table 56 / SBC-3 table 13 for the
    /// persistent reservation's type. Reservation commands pass here and
    /// apply their own rules when run.
    pub fn check_access(&self, nexus: &Nexus, cdb: &[u8]) -> Result<(), PrError> {
        if self.reserve6_blocks(nexus) && !allowed_under_reserve6(cdb) {
            return Err(PrError::Conflict);
        }
        let Some(res) = &self.reservation else {
            return Ok(());
        };
        if self.is_holder(nexus) {
            return Ok(());
        }
        // Registrants of registrants-only reservations have full access.
        if res.ty.is_registrants_only() && self.is_registered(nexus) {
            return Ok(());
        }
        match classify(cdb) {
            Access::Always => Ok(()),
            Access::Read if res.ty.reads_shared() => Ok(()),
            Access::Read | Access::Write => Err(PrError::Conflict),
        }
    }

    /// The nexus is gone (logout, connection loss): drops its RESERVE(6)
    /// reservation. Persistent registrations and reservations survive.
    pub fn nexus_lost(&mut self, nexus: &Nexus) -> Effects {
        if self.reserve6_holder.as_ref() == Some(nexus) {
            self.reserve6_holder = None;
        }
        Effects::default()
    }

    /// LOGICAL UNIT RESET / target reset: drops the RESERVE(6) reservation;
    /// persistent ones remain. (The reset's own unit attention is the
    /// caller's.)
    pub fn reset(&mut self) -> Effects {
        self.reserve6_holder = None;
        Effects::default()
    }
}

/// iSCSI TransportID, initiator port format (SPC-4 §7.6.4.6, format code
/// 01b, protocol identifier 5h): byte 0 = 0x45, byte 1 reserved, 2..4
/// ADDITIONAL LENGTH, then "name,i,0xISID" NUL-terminated and zero-padded
/// to a multiple of four, at least 20 bytes.
fn iscsi_transport_id(nexus: &Nexus) -> Vec<u8> {
    let name = nexus.initiator_port_name();
    let mut body = name.into_bytes();
    body.push(0);
    while !body.len().is_multiple_of(4) || body.len() < 20 {
        body.push(0);
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.push(0x40 | 0x05);
    out.push(0);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const WE: u8 = 1;
    const EA: u8 = 3;
    const WERO: u8 = 5;
    const EARO: u8 = 6;
    const WEAR: u8 = 7;
    const EAAR: u8 = 8;
    const ALL_TYPES: [u8; 6] = [WE, EA, WERO, EARO, WEAR, EAAR];

    fn nx(name: &str, isid_last: u8) -> Nexus {
        Nexus {
            initiator_name: format!("iqn.2024-01.test:{name}"),
            isid: [0x80, 0, 0, 0, 0, isid_last],
            tpgt: 1,
        }
    }

    fn prin_cdb(sa: u8) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = PERSISTENT_RESERVE_IN;
        c[1] = sa;
        c[7..9].copy_from_slice(&16384u16.to_be_bytes());
        c
    }

    fn prout_cdb(sa: u8, ty: u8) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = PERSISTENT_RESERVE_OUT;
        c[1] = sa;
        c[2] = ty;
        c[5..9].copy_from_slice(&24u32.to_be_bytes());
        c
    }

    fn params(key: u64, sa_key: u64) -> [u8; 24] {
        let mut p = [0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    fn out(
        r: &mut Reservations,
        n: &Nexus,
        sa: u8,
        ty: u8,
        key: u64,
        sa_key: u64,
    ) -> Result<Effects, PrError> {
        r.persistent_reserve_out(n, &prout_cdb(sa, ty), &params(key, sa_key))
    }

    fn register(r: &mut Reservations, n: &Nexus, key: u64) {
        out(r, n, prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, key).unwrap();
    }

    fn keys(r: &Reservations, n: &Nexus) -> (u32, Vec<u64>) {
        let d = r
            .persistent_reserve_in(n, &prin_cdb(prin_sa::READ_KEYS))
            .unwrap();
        let len = be_u32(&d, 4) as usize;
        assert_eq!(len, d.len() - 8);
        let ks = d[8..].chunks(8).map(|c| be_u64(c, 0)).collect();
        (be_u32(&d, 0), ks)
    }

    /// (key, type) of the reservation, or None.
    fn reservation(r: &Reservations, n: &Nexus) -> Option<(u64, u8)> {
        let d = r
            .persistent_reserve_in(n, &prin_cdb(prin_sa::READ_RESERVATION))
            .unwrap();
        match be_u32(&d, 4) {
            0 => {
                assert_eq!(d.len(), 8);
                None
            }
            16 => {
                assert_eq!(d.len(), 24);
                assert_eq!(d[21] >> 4, 0, "scope is LU");
                Some((be_u64(&d, 8), d[21] & 0x0f))
            }
            l => panic!("bad additional length {l}"),
        }
    }

    const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0];
    const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0];

    fn can(r: &Reservations, n: &Nexus, cdb: &[u8]) -> bool {
        match r.check_access(n, cdb) {
            Ok(()) => true,
            Err(PrError::Conflict) => false,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn report_capabilities_layout() {
        let r = Reservations::new();
        let d = r
            .persistent_reserve_in(&nx("a", 1), &prin_cdb(prin_sa::REPORT_CAPABILITIES))
            .unwrap();
        assert_eq!(d.len(), 8);
        assert_eq!(be_u16(&d, 0), 8);
        assert_eq!(d[2], 0x10, "CRH only; no SIP_C/ATP_C/PTPL_C");
        assert_eq!(d[3] & 0x80, 0x80, "TMV");
        assert!((d[3] >> 4) & 0x07 <= 5);
        assert_eq!(d[3] & 0x01, 0, "PTPL_A");
        assert_eq!(be_u16(&d, 4), 0xea01, "all six types");
    }

    #[test]
    fn prin_service_action_range() {
        let r = Reservations::new();
        let n = nx("a", 1);
        for sa in 0..4 {
            assert!(
                r.persistent_reserve_in(&n, &prin_cdb(sa)).is_ok(),
                "sa {sa}"
            );
        }
        for sa in 4..0x20 {
            assert_eq!(
                r.persistent_reserve_in(&n, &prin_cdb(sa)),
                Err(PrError::Sense(
                    Sense::INVALID_FIELD_IN_CDB.at_cdb(1, Some(4))
                ))
            );
        }
        assert!(r.persistent_reserve_in(&n, &[0x5e, 0]).is_err());
    }

    #[test]
    fn read_keys_layout_and_generation() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 2));
        assert_eq!(keys(&r, &a), (0, vec![]));
        register(&mut r, &a, 0x1111);
        register(&mut r, &b, 0x2222);
        let d = r.persistent_reserve_in(&a, &prin_cdb(0)).unwrap();
        assert_eq!(
            d,
            [
                &[0, 0, 0, 2][..],
                &[0, 0, 0, 16],
                &0x1111u64.to_be_bytes(),
                &0x2222u64.to_be_bytes()
            ]
            .concat()
        );
        // Truncated to 8 bytes by the caller, ADDITIONAL LENGTH still 16.
        assert_eq!(be_u32(&d[..8], 4), 16);
    }

    #[test]
    fn read_reservation_layout() {
        let mut r = Reservations::new();
        let a = nx("a", 1);
        register(&mut r, &a, 0xabcd);
        assert_eq!(reservation(&r, &a), None);
        out(&mut r, &a, prout_sa::RESERVE, EA, 0xabcd, 0).unwrap();
        let d = r.persistent_reserve_in(&a, &prin_cdb(1)).unwrap();
        let mut want = vec![0, 0, 0, 1, 0, 0, 0, 16];
        want.extend_from_slice(&0xabcdu64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0, EA, 0, 0]);
        assert_eq!(d, want);
        // All-registrants types report key zero.
        out(&mut r, &a, prout_sa::RELEASE, EA, 0xabcd, 0).unwrap();
        out(&mut r, &a, prout_sa::RESERVE, WEAR, 0xabcd, 0).unwrap();
        assert_eq!(reservation(&r, &a), Some((0, WEAR)));
    }

    #[test]
    fn register_simple() {
        let mut r = Reservations::new();
        let a = nx("a", 1);
        register(&mut r, &a, 7);
        assert_eq!(keys(&r, &a), (1, vec![7]));
        // Re-registering with REGISTER and the wrong (zero) key conflicts.
        assert_eq!(
            out(&mut r, &a, prout_sa::REGISTER, 0, 0, 8),
            Err(PrError::Conflict)
        );
        assert_eq!(keys(&r, &a), (1, vec![7]));
        // Key change with the right key.
        out(&mut r, &a, prout_sa::REGISTER, 0, 7, 9).unwrap();
        assert_eq!(keys(&r, &a), (2, vec![9]));
        // Unregister: service action key zero.
        out(&mut r, &a, prout_sa::REGISTER, 0, 9, 0).unwrap();
        assert_eq!(keys(&r, &a), (3, vec![]));
        // Unregistered nexus registering zero: GOOD, nothing changes.
        out(&mut r, &a, prout_sa::REGISTER, 0, 0, 0).unwrap();
        assert_eq!(keys(&r, &a), (3, vec![]));
        // Unregistered nexus with a non-zero reservation key: conflict.
        assert_eq!(
            out(&mut r, &a, prout_sa::REGISTER, 0, 5, 6),
            Err(PrError::Conflict)
        );
        // REGISTER AND IGNORE EXISTING KEY ignores the key both ways.
        out(
            &mut r,
            &a,
            prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            5,
            6,
        )
        .unwrap();
        out(
            &mut r,
            &a,
            prout_sa::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            99,
            10,
        )
        .unwrap();
        assert_eq!(keys(&r, &a), (5, vec![10]));
    }

    #[test]
    fn same_key_from_two_nexuses_is_two_registrations() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("a", 2));
        register(&mut r, &a, 5);
        register(&mut r, &b, 5);
        assert_eq!(keys(&r, &a).1, vec![5, 5]);
        assert_eq!(r.registered_key(&b), Some(5));
    }

    #[test]
    fn parameter_validation() {
        let mut r = Reservations::new();
        let a = nx("a", 1);
        let cdb = prout_cdb(prout_sa::REGISTER, 0);
        // Parameter list length other than 24.
        let mut short = cdb;
        short[5..9].copy_from_slice(&16u32.to_be_bytes());
        assert_eq!(
            r.persistent_reserve_out(&a, &short, &params(0, 1)),
            Err(PrError::Sense(Sense::PARAMETER_LIST_LENGTH_ERROR))
        );
        // Data shorter than declared.
        assert_eq!(
            r.persistent_reserve_out(&a, &cdb, &[0; 10]),
            Err(PrError::Sense(Sense::PARAMETER_LIST_LENGTH_ERROR))
        );
        // APTPL, ALL_TG_PT, SPEC_I_PT.
        for (bit, flag) in [(0u8, 0x01u8), (2, 0x04), (3, 0x08)] {
            let mut p = params(0, 1);
            p[20] = flag;
            assert_eq!(
                r.persistent_reserve_out(&a, &cdb, &p),
                Err(PrError::Sense(
                    Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(20, Some(bit))
                ))
            );
        }
        // SPEC_I_PT with a longer list is still "unsupported", not a length error.
        let mut long = cdb;
        long[5..9].copy_from_slice(&48u32.to_be_bytes());
        let mut p = [0u8; 48];
        p[20] = 0x08;
        assert_eq!(
            r.persistent_reserve_out(&a, &long, &p),
            Err(PrError::Sense(
                Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(20, Some(3))
            ))
        );
        // REGISTER AND MOVE, REPLACE LOST RESERVATION, reserved actions.
        for sa in 7..0x20 {
            assert_eq!(
                out(&mut r, &a, sa, 0, 0, 1),
                Err(PrError::Sense(
                    Sense::INVALID_FIELD_IN_CDB.at_cdb(1, Some(4))
                ))
            );
        }
        assert_eq!(r.generation(), 0);
        assert!(r.registered_key(&a).is_none());
        // APTPL is ignored outside registration.
        register(&mut r, &a, 1);
        let mut p = params(1, 0);
        p[20] = 0x01;
        r.persistent_reserve_out(&a, &prout_cdb(prout_sa::RESERVE, WE), &p)
            .unwrap();
    }

    #[test]
    fn garbage_never_panics() {
        let mut r = Reservations::new();
        let a = nx("a", 1);
        register(&mut r, &a, 1);
        for len in 0..12 {
            let cdb = vec![0xffu8; len];
            let _ = r.persistent_reserve_in(&a, &cdb);
            let _ = r.persistent_reserve_out(&a, &cdb, &[0xff; 30]);
            let _ = r.check_access(&a, &cdb);
            let _ = r.persistent_reserve_out(&a, &prout_cdb(4, 0xff), &vec![0xff; len]);
        }
        for op in 0..=255u8 {
            let _ = r.check_access(&a, &[op]);
        }
    }

    #[test]
    fn reserve_requires_registration_and_key() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 1));
        assert_eq!(
            out(&mut r, &a, prout_sa::RESERVE, WE, 0, 0),
            Err(PrError::Conflict)
        );
        register(&mut r, &a, 1);
        assert_eq!(
            out(&mut r, &a, prout_sa::RESERVE, WE, 2, 0),
            Err(PrError::Conflict)
        );
        // Bad scope and type.
        assert_eq!(
            out(&mut r, &a, prout_sa::RESERVE, 0x10 | WE, 1, 0),
            Err(PrError::Sense(
                Sense::INVALID_FIELD_IN_CDB.at_cdb(2, Some(7))
            ))
        );
        for bad in [0u8, 2, 4, 9, 15] {
            assert_eq!(
                out(&mut r, &a, prout_sa::RESERVE, bad, 1, 0),
                Err(PrError::Sense(
                    Sense::INVALID_FIELD_IN_CDB.at_cdb(2, Some(3))
                ))
            );
        }
        let gen = r.generation();
        out(&mut r, &a, prout_sa::RESERVE, WE, 1, 0).unwrap();
        // Same type again: GOOD; another type: conflict.
        out(&mut r, &a, prout_sa::RESERVE, WE, 1, 0).unwrap();
        assert_eq!(
            out(&mut r, &a, prout_sa::RESERVE, EA, 1, 0),
            Err(PrError::Conflict)
        );
        // Another registrant cannot reserve.
        register(&mut r, &b, 2);
        assert_eq!(
            out(&mut r, &b, prout_sa::RESERVE, WE, 2, 0),
            Err(PrError::Conflict)
        );
        assert_eq!(reservation(&r, &b), Some((1, WE)));
        // RESERVE never moves PRGENERATION (only b's registration did).
        assert_eq!(r.generation(), gen + 1);
    }

    #[test]
    fn reserve_release_each_type_like_libiscsi() {
        let mut r = Reservations::new();
        let a = nx("a", 1);
        register(&mut r, &a, 0x77);
        let gen = r.generation();
        for ty in ALL_TYPES {
            out(&mut r, &a, prout_sa::RESERVE, ty, 0x77, 0).unwrap();
            let want_key = if matches!(ty, WEAR | EAAR) { 0 } else { 0x77 };
            assert_eq!(reservation(&r, &a), Some((want_key, ty)));
            out(&mut r, &a, prout_sa::RELEASE, ty, 0x77, 0).unwrap();
            assert_eq!(reservation(&r, &a), None);
        }
        assert_eq!(r.generation(), gen);
    }

    #[test]
    fn release_rules() {
        let mut r = Reservations::new();
        let (a, b, c) = (nx("a", 1), nx("b", 1), nx("c", 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        // Nothing reserved: GOOD.
        assert_eq!(
            out(&mut r, &a, prout_sa::RELEASE, WE, 1, 0),
            Ok(Effects::default())
        );
        out(&mut r, &a, prout_sa::RESERVE, WE, 1, 0).unwrap();
        // Non-holder registrant: GOOD, reservation untouched.
        assert_eq!(
            out(&mut r, &b, prout_sa::RELEASE, WE, 2, 0),
            Ok(Effects::default())
        );
        assert_eq!(reservation(&r, &a), Some((1, WE)));
        // Unregistered: conflict. Wrong key: conflict.
        assert_eq!(
            out(&mut r, &c, prout_sa::RELEASE, WE, 0, 0),
            Err(PrError::Conflict)
        );
        assert_eq!(
            out(&mut r, &a, prout_sa::RELEASE, WE, 2, 0),
            Err(PrError::Conflict)
        );
        // Holder with the wrong type or scope.
        for bad in [EA, 0x10 | WE] {
            assert_eq!(
                out(&mut r, &a, prout_sa::RELEASE, bad, 1, 0),
                Err(PrError::Sense(INVALID_RELEASE_OF_PERSISTENT_RESERVATION))
            );
        }
        // Plain Write Exclusive release: no unit attentions.
        assert_eq!(
            out(&mut r, &a, prout_sa::RELEASE, WE, 1, 0),
            Ok(Effects::default())
        );
        assert_eq!(reservation(&r, &a), None);
    }

    #[test]
    fn releasing_shared_types_notifies_other_registrants() {
        for ty in [WERO, EARO, WEAR, EAAR] {
            let mut r = Reservations::new();
            let (a, b, c) = (nx("a", 1), nx("b", 1), nx("c", 1));
            register(&mut r, &a, 1);
            register(&mut r, &b, 2);
            out(&mut r, &a, prout_sa::RESERVE, ty, 1, 0).unwrap();
            // The releasing nexus is b for all-registrants (any holder may).
            let releaser = if matches!(ty, WEAR | EAAR) { &b } else { &a };
            let other = if matches!(ty, WEAR | EAAR) { &a } else { &b };
            let key = r.registered_key(releaser).unwrap();
            let fx = out(&mut r, releaser, prout_sa::RELEASE, ty, key, 0).unwrap();
            assert_eq!(
                fx.unit_attentions,
                vec![(other.clone(), Sense::RESERVATIONS_RELEASED)],
                "type {ty}"
            );
            assert_eq!(reservation(&r, &c), None);
        }
    }

    /// libiscsi ProutReserve.Access*: init1 reserves, init2 registered, then
    /// unregistered: (reg read, reg write, unreg read, unreg write).
    #[test]
    fn access_tables_two_initiators() {
        let table = [
            (EA, [false, false, false, false]),
            (WE, [true, false, true, false]),
            (EARO, [true, true, false, false]),
            (WERO, [true, true, true, false]),
            (EAAR, [true, true, false, false]),
            (WEAR, [true, true, true, false]),
        ];
        for (ty, want) in table {
            let mut r = Reservations::new();
            let (a, b) = (nx("a", 1), nx("b", 1));
            register(&mut r, &a, 1);
            register(&mut r, &b, 2);
            out(&mut r, &a, prout_sa::RESERVE, ty, 1, 0).unwrap();
            assert!(
                can(&r, &a, &READ10) && can(&r, &a, &WRITE10),
                "holder, type {ty}"
            );
            let got_reg = [can(&r, &b, &READ10), can(&r, &b, &WRITE10)];
            out(&mut r, &b, prout_sa::REGISTER, 0, 2, 0).unwrap();
            let got_unreg = [can(&r, &b, &READ10), can(&r, &b, &WRITE10)];
            assert_eq!(
                [got_reg[0], got_reg[1], got_unreg[0], got_unreg[1]],
                want,
                "type {ty}"
            );
            out(&mut r, &a, prout_sa::RELEASE, ty, 1, 0).unwrap();
            out(&mut r, &a, prout_sa::REGISTER, 0, 1, 0).unwrap();
            assert!(can(&r, &b, &WRITE10));
        }
    }

    #[test]
    fn access_always_allowed_and_read_like_commands() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 1));
        register(&mut r, &a, 1);
        out(&mut r, &a, prout_sa::RESERVE, EA, 1, 0).unwrap();
        // Exclusive Access: the SPC-4 table 56 "allowed" commands pass.
        let always: [&[u8]; 9] = [
            &[0x12, 0, 0, 0, 36, 0],                                  // INQUIRY
            &[0x00, 0, 0, 0, 0, 0],                                   // TEST UNIT READY
            &[0x03, 0, 0, 0, 18, 0],                                  // REQUEST SENSE
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0],                // REPORT LUNS
            &prin_cdb(0),                                             // PERSISTENT RESERVE IN
            &prout_cdb(0, 0),                                         // PERSISTENT RESERVE OUT
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],                       // READ CAPACITY(10)
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], // READ CAPACITY(16)
            &[0x1e, 0, 0, 0, 0, 0],                                   // ALLOW MEDIUM REMOVAL
        ];
        for cdb in always {
            assert!(can(&r, &b, cdb), "{cdb:02x?}");
        }
        // Read-like and write-like both conflict under Exclusive Access.
        let mode_sense = [0x1a, 0, 0x3f, 0, 192, 0];
        let prevent = [0x1e, 0, 0, 0, 1, 0];
        let sync = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for cdb in [&mode_sense[..], &prevent, &sync, &[0x9e, 0x12]] {
            assert!(!can(&r, &b, cdb), "{cdb:02x?}");
        }
        // Write Exclusive: read-like commands pass, state changes do not.
        out(&mut r, &a, prout_sa::RELEASE, EA, 1, 0).unwrap();
        out(&mut r, &a, prout_sa::RESERVE, WE, 1, 0).unwrap();
        assert!(can(&r, &b, &mode_sense));
        assert!(can(&r, &b, &[0x9e, 0x12])); // GET LBA STATUS
        assert!(can(&r, &b, &[0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09])); // READ(32)
        assert!(!can(&r, &b, &[0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x0b])); // WRITE(32)
        assert!(!can(&r, &b, &prevent));
        assert!(!can(&r, &b, &sync));
        assert!(!can(&r, &b, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0])); // UNMAP
        assert!(!can(&r, &b, &[0x1b, 0, 0, 0, 0, 0])); // STOP UNIT
        assert!(can(&r, &b, &[0x1b, 0, 0, 0, 1, 0])); // START UNIT
    }

    /// libiscsi ProutReserve.Ownership*: the holder unregisters.
    #[test]
    fn ownership_when_holder_unregisters() {
        for ty in ALL_TYPES {
            let mut r = Reservations::new();
            let (a, b) = (nx("a", 1), nx("b", 1));
            register(&mut r, &a, 1);
            register(&mut r, &b, 2);
            out(&mut r, &a, prout_sa::RESERVE, ty, 1, 0).unwrap();
            let fx = out(&mut r, &a, prout_sa::REGISTER, 0, 1, 0).unwrap();
            if matches!(ty, WEAR | EAAR) {
                // Still reserved, held by b now; b may release it.
                assert_eq!(reservation(&r, &a), Some((0, ty)));
                assert!(fx.unit_attentions.is_empty());
                assert!(can(&r, &b, &WRITE10));
                out(&mut r, &b, prout_sa::RELEASE, ty, 2, 0).unwrap();
            } else {
                assert_eq!(reservation(&r, &a), None);
                let want = if matches!(ty, WERO | EARO) {
                    vec![(b.clone(), Sense::RESERVATIONS_RELEASED)]
                } else {
                    vec![]
                };
                assert_eq!(fx.unit_attentions, want, "type {ty}");
            }
            out(&mut r, &b, prout_sa::REGISTER, 0, 2, 0).unwrap();
            assert_eq!(keys(&r, &a).1, Vec::<u64>::new());
            assert_eq!(r.reservation_type(), None);
        }
    }

    #[test]
    fn all_registrants_reservation_ends_with_last_registrant() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        out(&mut r, &a, prout_sa::RESERVE, EAAR, 1, 0).unwrap();
        // b is a holder too: same type is a no-op, another type conflicts.
        out(&mut r, &b, prout_sa::RESERVE, EAAR, 2, 0).unwrap();
        assert_eq!(
            out(&mut r, &b, prout_sa::RESERVE, WEAR, 2, 0),
            Err(PrError::Conflict)
        );
        out(&mut r, &b, prout_sa::REGISTER, 0, 2, 0).unwrap();
        assert_eq!(
            r.reservation_type(),
            Some(PrType::ExclusiveAccessAllRegistrants)
        );
        out(&mut r, &a, prout_sa::REGISTER, 0, 1, 0).unwrap();
        assert_eq!(r.reservation_type(), None);
    }

    /// libiscsi ProutClear.Simple plus the unit attentions.
    #[test]
    fn clear_drops_everything_and_counts_once() {
        let mut r = Reservations::new();
        let (a, b, c) = (nx("a", 1), nx("b", 1), nx("c", 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        register(&mut r, &c, 3);
        let gen = r.generation();
        out(&mut r, &a, prout_sa::RESERVE, EA, 1, 0).unwrap();
        assert_eq!(r.generation(), gen, "RESERVE does not count");
        // Unregistered or wrong key: conflict.
        assert_eq!(
            out(&mut r, &nx("d", 1), prout_sa::CLEAR, 0, 0, 0),
            Err(PrError::Conflict)
        );
        assert_eq!(
            out(&mut r, &b, prout_sa::CLEAR, 0, 1, 0),
            Err(PrError::Conflict)
        );
        let fx = out(&mut r, &b, prout_sa::CLEAR, 0, 2, 0).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![
                (a.clone(), Sense::RESERVATIONS_PREEMPTED),
                (c.clone(), Sense::RESERVATIONS_PREEMPTED)
            ]
        );
        assert_eq!(reservation(&r, &a), None);
        assert_eq!(keys(&r, &a), (gen + 1, vec![]));
    }

    /// libiscsi ProutPreempt.RemoveRegistration: no reservation, b preempts
    /// a's registration.
    #[test]
    fn preempt_registration_without_reservation() {
        let mut r = Reservations::new();
        let (a, b, c) = (nx("a", 1), nx("b", 1), nx("c", 1));
        register(&mut r, &a, 0xa);
        register(&mut r, &b, 0xb);
        register(&mut r, &c, 0xa);
        let gen = r.generation();
        let fx = out(&mut r, &b, prout_sa::PREEMPT, EA, 0xb, 0xa).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![
                (a.clone(), Sense::REGISTRATIONS_PREEMPTED),
                (c.clone(), Sense::REGISTRATIONS_PREEMPTED)
            ]
        );
        assert!(fx.abort_tasks_of.is_empty());
        assert_eq!(keys(&r, &b), (gen + 1, vec![0xb]));
        assert_eq!(r.reservation_type(), None);
        // No such key: conflict; zero key: invalid field; nothing counted.
        assert_eq!(
            out(&mut r, &b, prout_sa::PREEMPT, EA, 0xb, 0xa),
            Err(PrError::Conflict)
        );
        assert_eq!(
            out(&mut r, &b, prout_sa::PREEMPT, EA, 0xb, 0),
            Err(PrError::Sense(
                Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(8, None)
            ))
        );
        // Unregistered sender: conflict.
        assert_eq!(
            out(&mut r, &a, prout_sa::PREEMPT, EA, 0xa, 0xb),
            Err(PrError::Conflict)
        );
        assert_eq!(r.generation(), gen + 1);
    }

    #[test]
    fn preempt_takes_over_reservation() {
        let mut r = Reservations::new();
        let (a, b, c) = (nx("a", 1), nx("b", 1), nx("c", 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        register(&mut r, &c, 3);
        out(&mut r, &a, prout_sa::RESERVE, WE, 1, 0).unwrap();
        let gen = r.generation();
        // b preempts the holder's key with a new type.
        let fx = out(&mut r, &b, prout_sa::PREEMPT_AND_ABORT, EA, 2, 1).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![
                (a.clone(), Sense::REGISTRATIONS_PREEMPTED),
                (c.clone(), Sense::RESERVATIONS_RELEASED)
            ]
        );
        assert_eq!(fx.abort_tasks_of, vec![a.clone()]);
        assert_eq!(reservation(&r, &c), Some((2, EA)));
        assert_eq!(keys(&r, &c), (gen + 1, vec![2, 3]));
        assert!(!can(&r, &a, &READ10));
        assert!(!can(&r, &c, &READ10));
        assert!(can(&r, &b, &WRITE10));
        // Same type: no RESERVATIONS RELEASED for the bystander.
        let fx = out(&mut r, &c, prout_sa::PREEMPT, EA, 3, 2).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![(b.clone(), Sense::REGISTRATIONS_PREEMPTED)]
        );
        assert_eq!(reservation(&r, &c), Some((3, EA)));
        // Preempting a non-holder key under a reservation leaves it alone.
        register(&mut r, &a, 9);
        let fx = out(&mut r, &c, prout_sa::PREEMPT, WE, 3, 9).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![(a.clone(), Sense::REGISTRATIONS_PREEMPTED)]
        );
        assert_eq!(reservation(&r, &c), Some((3, EA)));
        // A holder may preempt itself to change type.
        out(&mut r, &c, prout_sa::PREEMPT, WERO, 3, 3).unwrap();
        assert_eq!(reservation(&r, &c), Some((3, WERO)));
        assert_eq!(keys(&r, &c).1, vec![3]);
    }

    #[test]
    fn preempt_all_registrants_with_zero_key() {
        let mut r = Reservations::new();
        let (a, b, c) = (nx("a", 1), nx("b", 1), nx("c", 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        register(&mut r, &c, 3);
        out(&mut r, &a, prout_sa::RESERVE, WEAR, 1, 0).unwrap();
        let fx = out(&mut r, &b, prout_sa::PREEMPT, EA, 2, 0).unwrap();
        assert_eq!(
            fx.unit_attentions,
            vec![
                (a.clone(), Sense::REGISTRATIONS_PREEMPTED),
                (c.clone(), Sense::REGISTRATIONS_PREEMPTED)
            ]
        );
        assert_eq!(reservation(&r, &b), Some((2, EA)));
        assert_eq!(keys(&r, &b).1, vec![2]);
    }

    #[test]
    fn read_full_status_layout() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 2));
        register(&mut r, &a, 0x10);
        register(&mut r, &b, 0x20);
        out(&mut r, &a, prout_sa::RESERVE, WERO, 0x10, 0).unwrap();
        let d = r
            .persistent_reserve_in(&a, &prin_cdb(prin_sa::READ_FULL_STATUS))
            .unwrap();
        assert_eq!(be_u32(&d, 0), 2);
        assert_eq!(be_u32(&d, 4) as usize, d.len() - 8);
        let first = &d[8..];
        assert_eq!(be_u64(first, 0), 0x10);
        assert_eq!(first[12], 1, "R_HOLDER");
        assert_eq!(first[13], WERO);
        assert_eq!(be_u16(first, 18), 1, "relative target port = TPGT");
        let tid_len = be_u32(first, 20) as usize;
        let tid = &first[24..24 + tid_len];
        assert_eq!(tid[0], 0x45);
        let name_len = be_u16(tid, 2) as usize;
        assert_eq!(name_len % 4, 0);
        assert_eq!(name_len + 4, tid_len);
        let name = b"iqn.2024-01.test:a,i,0x800000000001\0";
        assert_eq!(&tid[4..4 + name.len()], name);
        let second = &first[24 + tid_len..];
        assert_eq!(be_u64(second, 0), 0x20);
        assert_eq!(second[12], 0);
        assert_eq!(second[13], 0);
    }

    /// libiscsi Reserve6.Simple / 2Initiators.
    #[test]
    fn reserve6_two_initiators() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 1));
        r.reserve6(&a).unwrap();
        r.reserve6(&a).unwrap();
        assert_eq!(r.reserve6(&b), Err(PrError::Conflict));
        // Release by a non-holder: GOOD, nothing changes.
        r.release6(&b).unwrap();
        assert_eq!(r.reserve6_holder(), Some(&a));
        let mode_sense = [0x1a, 0, 0x3f, 0, 192, 0];
        assert!(can(&r, &a, &mode_sense));
        assert!(!can(&r, &b, &mode_sense));
        assert!(!can(&r, &b, &[0x00, 0, 0, 0, 0, 0]));
        assert!(!can(&r, &b, &READ10));
        assert!(!can(&r, &b, &prin_cdb(0)));
        assert_eq!(
            r.persistent_reserve_in(&b, &prin_cdb(0)),
            Err(PrError::Conflict)
        );
        assert_eq!(
            out(&mut r, &b, prout_sa::REGISTER, 0, 0, 1),
            Err(PrError::Conflict)
        );
        for ok in [
            &[0x12u8, 0, 0, 0, 36, 0][..],
            &[0x03, 0, 0, 0, 18, 0],
            &[0xa0],
            &[0x17],
        ] {
            assert!(can(&r, &b, ok), "{ok:02x?}");
        }
        assert_eq!(r.reserve6(&b), Err(PrError::Conflict));
        r.release6(&a).unwrap();
        r.reserve6(&b).unwrap();
        r.release6(&b).unwrap();
        assert_eq!(r.reserve6_holder(), None);
        r.release6(&b).unwrap();
    }

    /// libiscsi Reserve6.Logout / ITNexusLoss / *Reset.
    #[test]
    fn reserve6_dropped_by_nexus_loss_and_reset() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 1));
        r.reserve6(&a).unwrap();
        assert_eq!(r.nexus_lost(&b), Effects::default());
        assert_eq!(r.reserve6(&b), Err(PrError::Conflict));
        r.nexus_lost(&a);
        r.reserve6(&b).unwrap();
        r.reset();
        r.reserve6(&a).unwrap();
        // Same initiator name, other ISID: another I_T nexus.
        assert_eq!(r.reserve6(&nx("a", 2)), Err(PrError::Conflict));
    }

    #[test]
    fn persistent_state_survives_nexus_loss_and_reset() {
        let mut r = Reservations::new();
        let (a, b) = (nx("a", 1), nx("b", 1));
        register(&mut r, &a, 1);
        out(&mut r, &a, prout_sa::RESERVE, EA, 1, 0).unwrap();
        assert!(r.nexus_lost(&a).unit_attentions.is_empty());
        assert!(r.reset().unit_attentions.is_empty());
        assert_eq!(reservation(&r, &b), Some((1, EA)));
        assert!(!can(&r, &b, &READ10));
    }

    #[test]
    fn reserve6_against_persistent_reservations() {
        let mut r = Reservations::new();
        let (a, b, c) = (nx("a", 1), nx("b", 1), nx("c", 1));
        register(&mut r, &a, 1);
        // Registrations but no reservation: RESERVE/RELEASE(6) conflict.
        assert_eq!(r.reserve6(&a), Err(PrError::Conflict));
        assert_eq!(r.release6(&b), Err(PrError::Conflict));
        out(&mut r, &a, prout_sa::RESERVE, WERO, 1, 0).unwrap();
        register(&mut r, &b, 2);
        // Holder and registrants of a registrants-only reservation: GOOD,
        // nothing changes.
        r.reserve6(&a).unwrap();
        r.reserve6(&b).unwrap();
        r.release6(&b).unwrap();
        assert_eq!(r.reserve6_holder(), None);
        assert_eq!(reservation(&r, &a), Some((1, WERO)));
        // Unregistered: conflict.
        assert_eq!(r.reserve6(&c), Err(PrError::Conflict));
        // Plain type: a registered non-holder conflicts.
        out(&mut r, &a, prout_sa::RELEASE, WERO, 1, 0).unwrap();
        out(&mut r, &a, prout_sa::RESERVE, WE, 1, 0).unwrap();
        assert_eq!(r.reserve6(&b), Err(PrError::Conflict));
        r.reserve6(&a).unwrap();
        assert_eq!(r.reserve6_holder(), None);
    }
}
