//! Mode parameters (SPC-4 §7.5, SBC-3 §6.5): MODE SENSE data and MODE
//! SELECT parsing for the Caching (08h), Control (0Ah) and Informational
//! Exceptions Control (1Ch) pages.

use super::cdb::PageControl;
use super::sense::Sense;

/// The mode parameters that can change (all else is fixed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeState {
    /// Caching page WCE: completed writes may sit in a volatile cache.
    pub wce: bool,
}

/// What MODE SENSE reports besides the pages.
#[derive(Clone, Copy, Debug)]
pub struct ModeParams {
    pub read_only: bool,
    /// The device has a volatile write cache (`flush` does something), so
    /// WCE is reported set by default and may be changed.
    pub has_cache: bool,
    pub block_size: u32,
    pub blocks: u64,
}

impl ModeState {
    pub fn default_for(p: &ModeParams) -> ModeState {
        ModeState { wce: p.has_cache }
    }
}

pub const CACHING: u8 = 0x08;
pub const CONTROL: u8 = 0x0a;
pub const INFORMATIONAL_EXCEPTIONS: u8 = 0x1c;
pub const ALL_PAGES: u8 = 0x3f;

const PAGES: [u8; 3] = [CACHING, CONTROL, INFORMATIONAL_EXCEPTIONS];

/// One page (2-byte header: page code, page length; then the parameters)
/// as the page control asks: current, changeable (a mask), default or
/// saved (none saved: callers refuse it first).
fn page(code: u8, pc: PageControl, state: ModeState, p: &ModeParams) -> Vec<u8> {
    let changeable = pc == PageControl::Changeable;
    let state = match pc {
        PageControl::Default | PageControl::Saved => ModeState::default_for(p),
        _ => state,
    };
    match code {
        // Caching (SBC-3 table 183), 20 bytes: byte 2 bit 2 WCE.
        CACHING => {
            let mut d = vec![0u8; 20];
            d[0] = CACHING;
            d[1] = 0x12;
            if changeable {
                if p.has_cache {
                    d[2] = 0x04;
                }
            } else if state.wce {
                d[2] = 0x04;
            }
            d
        }
        // Control (SPC-4 table 458), 12 bytes: nothing changeable.
        // GLTSD (no log pages saved), QUEUE ALGORITHM MODIFIER 1
        // (unrestricted reordering), TAS, BUSY TIMEOUT PERIOD unlimited.
        CONTROL => {
            let mut d = vec![0u8; 12];
            d[0] = CONTROL;
            d[1] = 0x0a;
            if !changeable {
                d[2] = 0x02;
                d[3] = 0x10;
                d[5] = 0x40;
                d[8..10].copy_from_slice(&[0xff, 0xff]);
            }
            d
        }
        // Informational Exceptions Control (SPC-4 table 465), 12 bytes:
        // all reporting disabled (DEXCPT), nothing changeable.
        _ => {
            let mut d = vec![0u8; 12];
            d[0] = INFORMATIONAL_EXCEPTIONS;
            d[1] = 0x0a;
            if !changeable {
                d[2] = 0x08;
            }
            d
        }
    }
}

/// The fields of a MODE SENSE CDB that shape its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeRequest {
    /// MODE SENSE (10) rather than (6).
    pub ten: bool,
    /// Disable block descriptors.
    pub dbd: bool,
    /// Long LBA block descriptor accepted (10 only).
    pub llbaa: bool,
    pub pc: PageControl,
    pub page: u8,
    pub subpage: u8,
}

/// MODE SENSE (6) or (10) parameter data, untruncated: the mode parameter
/// header (SPC-4 tables 452/453), an optional block descriptor (short,
/// 8 bytes, or long LBA, 16 bytes) and the pages asked for.
pub fn sense(req: &ModeRequest, state: &ModeState, p: &ModeParams) -> Result<Vec<u8>, Sense> {
    let ModeRequest {
        ten,
        dbd,
        llbaa,
        pc,
        page: page_code,
        subpage,
    } = *req;
    if pc == PageControl::Saved {
        return Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    let mut pages = Vec::new();
    match (page_code, subpage) {
        (ALL_PAGES, 0x00 | 0xff) => {
            for code in PAGES {
                pages.extend(page(code, pc, *state, p));
            }
        }
        (code, 0x00) if PAGES.contains(&code) => pages.extend(page(code, pc, *state, p)),
        (code, _) if PAGES.contains(&code) || code == ALL_PAGES => {
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(3, None))
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(2, Some(5))),
    }

    let mut descriptor = Vec::new();
    if !dbd {
        if llbaa {
            descriptor.extend_from_slice(&p.blocks.to_be_bytes());
            descriptor.extend_from_slice(&[0; 4]);
            descriptor.extend_from_slice(&p.block_size.to_be_bytes());
        } else {
            let blocks = u32::try_from(p.blocks).unwrap_or(u32::MAX);
            descriptor.extend_from_slice(&blocks.to_be_bytes());
            descriptor.push(0);
            descriptor.extend_from_slice(&p.block_size.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter (SBC-3 table 181): WP, DPOFUA.
    let dsp = if p.read_only { 0x80 } else { 0x00 } | 0x10;
    let mut d = Vec::new();
    if ten {
        let len = u16::try_from(6 + descriptor.len() + pages.len()).unwrap_or(u16::MAX);
        d.extend_from_slice(&len.to_be_bytes());
        d.push(0); // medium type
        d.push(dsp);
        d.push(u8::from(llbaa && !dbd)); // LONGLBA
        d.push(0);
        #[allow(clippy::cast_possible_truncation)]
        d.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    } else {
        let len = u8::try_from(3 + descriptor.len() + pages.len()).unwrap_or(u8::MAX);
        d.push(len);
        d.push(0);
        d.push(dsp);
        #[allow(clippy::cast_possible_truncation)]
        d.push(descriptor.len() as u8);
    }
    d.extend(descriptor);
    d.extend(pages);
    Ok(d)
}

/// Applies a MODE SELECT parameter list to `state`. Returns whether a
/// parameter changed (other I_T nexuses then get MODE PARAMETERS CHANGED).
///
/// Parameter list: the mode parameter header, block descriptors, then pages
/// in page_0 format. A page must be one we report, with its exact length,
/// and may differ from the current values only in changeable bits.
pub fn select(
    ten: bool,
    data: &[u8],
    state: &mut ModeState,
    p: &ModeParams,
) -> Result<bool, Sense> {
    let header = if ten { 8 } else { 4 };
    if data.len() < header {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let bd_len = if ten {
        usize::from(u16::from_be_bytes([data[6], data[7]]))
    } else {
        usize::from(data[3])
    };
    let pages_at = header + bd_len;
    if pages_at > data.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    // A block descriptor may restate the block length but not change it.
    if bd_len >= 8 {
        let bd = &data[header..pages_at];
        let len = if bd_len >= 16 {
            u32::from_be_bytes([bd[12], bd[13], bd[14], bd[15]])
        } else {
            u32::from_be_bytes([0, bd[5], bd[6], bd[7]])
        };
        if len != 0 && len != p.block_size {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(
                u16::try_from(header + if bd_len >= 16 { 12 } else { 5 }).unwrap_or(u16::MAX),
                None,
            ));
        }
    }
    let mut next = *state;
    let mut at = pages_at;
    while at < data.len() {
        let field = |off: usize| u16::try_from(at + off).unwrap_or(u16::MAX);
        if data.len() - at < 2 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        // SPF (sub-page format) pages: we have none.
        if data[at] & 0x40 != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(field(0), Some(6)));
        }
        let code = data[at] & 0x3f;
        if !PAGES.contains(&code) {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(field(0), Some(5)));
        }
        let current = page(code, PageControl::Current, next, p);
        let mask = page(code, PageControl::Changeable, next, p);
        let len = usize::from(data[at + 1]) + 2;
        if len != current.len() {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(field(1), None));
        }
        if data.len() - at < len {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let given = &data[at..at + len];
        for i in 2..len {
            if (given[i] ^ current[i]) & !mask[i] != 0 {
                return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(field(i), None));
            }
        }
        if code == CACHING {
            next.wce = given[2] & 0x04 != 0;
        }
        at += len;
    }
    let changed = next != *state;
    *state = next;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ten: bool, dbd: bool, pc: PageControl, page: u8, subpage: u8) -> ModeRequest {
        ModeRequest {
            ten,
            dbd,
            llbaa: false,
            pc,
            page,
            subpage,
        }
    }

    fn params() -> ModeParams {
        ModeParams {
            read_only: false,
            has_cache: true,
            block_size: 512,
            blocks: 2048,
        }
    }

    #[test]
    fn mode_sense6_all_pages_exact_bytes() {
        let p = params();
        let s = ModeState::default_for(&p);
        let d = sense(
            &req(false, false, PageControl::Current, ALL_PAGES, 0),
            &s,
            &p,
        )
        .unwrap();
        let mut want = vec![3 + 8 + 20 + 12 + 12, 0, 0x10, 8];
        want.extend_from_slice(&[0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00]);
        let mut caching = vec![0u8; 20];
        caching[..3].copy_from_slice(&[0x08, 0x12, 0x04]);
        want.extend(caching);
        want.extend_from_slice(&[0x0a, 0x0a, 0x02, 0x10, 0, 0x40, 0, 0, 0xff, 0xff, 0, 0]);
        want.extend_from_slice(&[0x1c, 0x0a, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d, want);
    }

    #[test]
    fn mode_sense10_dbd_read_only_and_changeable() {
        let p = ModeParams {
            read_only: true,
            ..params()
        };
        let s = ModeState::default_for(&p);
        let d = sense(
            &req(true, true, PageControl::Changeable, CACHING, 0),
            &s,
            &p,
        )
        .unwrap();
        assert_eq!(&d[..8], &[0, 26, 0, 0x90, 0, 0, 0, 0]);
        assert_eq!(&d[8..11], &[0x08, 0x12, 0x04]);
        let c = sense(
            &req(false, true, PageControl::Changeable, CONTROL, 0),
            &s,
            &p,
        )
        .unwrap();
        assert_eq!(&c[4..], &[0x0a, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn mode_sense_errors() {
        let p = params();
        let s = ModeState::default_for(&p);
        assert_eq!(
            sense(&req(false, false, PageControl::Saved, CACHING, 0), &s, &p),
            Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED)
        );
        assert_eq!(
            sense(&req(false, false, PageControl::Current, 0x19, 0), &s, &p),
            Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(2, Some(5)))
        );
        assert_eq!(
            sense(&req(false, false, PageControl::Current, CACHING, 1), &s, &p),
            Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(3, None))
        );
    }

    #[test]
    fn mode_select_toggles_wce_and_refuses_fixed_bits() {
        let p = params();
        let mut s = ModeState::default_for(&p);
        let mut caching = vec![0u8; 20];
        caching[..2].copy_from_slice(&[0x08, 0x12]);
        let mut list = vec![0u8, 0, 0, 0];
        list.extend(&caching);
        assert_eq!(select(false, &list, &mut s, &p), Ok(true));
        assert!(!s.wce);
        assert_eq!(select(false, &list, &mut s, &p), Ok(false));
        // SWP in the control page is not changeable.
        let mut list = vec![0u8, 0, 0, 0];
        list.extend_from_slice(&[0x0a, 0x0a, 0x02, 0x10, 0x08, 0x40, 0, 0, 0xff, 0xff, 0, 0]);
        assert_eq!(
            select(false, &list, &mut s, &p),
            Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(8, None))
        );
        assert_eq!(
            select(true, &[0, 0, 0], &mut s, &p),
            Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
        );
    }
}
