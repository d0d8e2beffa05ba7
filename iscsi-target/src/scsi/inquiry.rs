//! INQUIRY data (SPC-4 §6.6): the standard page and the vital product data
//! pages a block device reports (SPC-4 §7.8, SBC-3 §6.6).

use super::sense::Sense;

/// What the INQUIRY pages describe; built by the LUN from its device.
#[derive(Clone, Debug)]
pub struct InquiryParams<'a> {
    pub vendor: &'a str,
    pub product: &'a str,
    pub revision: &'a str,
    /// Unit serial number (VPD 80h), printable ASCII.
    pub serial: &'a str,
    /// The 8-byte NAA designator (VPD 83h).
    pub naa: [u8; 8],
    pub volume_name: &'a str,
    /// Logical blocks per physical block, as an exponent of two.
    pub lbppb_exponent: u8,
    pub max_transfer_blocks: u32,
    pub can_trim: bool,
}

/// VPD pages supported, in ascending order (VPD 00h lists them).
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// MAXIMUM UNMAP LBA COUNT: libiscsi holds anything above 1M "insane".
pub const MAX_UNMAP_BLOCKS: u32 = 256 * 1024;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 1024;
/// MAXIMUM WRITE SAME LENGTH, in blocks.
pub const MAX_WRITE_SAME_BLOCKS: u32 = 1024 * 1024;
/// MAXIMUM COMPARE AND WRITE LENGTH: the CDB field is one byte.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;

/// Version descriptors claimed (SPC-4 table 146): SAM-5, iSCSI, SPC-4,
/// SBC-3. libiscsi turns on its SBC-3 checks when it sees 04C0h.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00a0, 0x0960, 0x0460, 0x04c0];

/// Copies `s` into a fixed-width, space-padded ASCII field, replacing
/// anything outside 20h..7Eh (SPC-4 §4.4.1).
fn ascii_field(out: &mut [u8], s: &str) {
    out.fill(b' ');
    for (o, c) in out.iter_mut().zip(s.bytes()) {
        *o = if (0x20..=0x7e).contains(&c) { c } else { b'?' };
    }
}

/// Standard INQUIRY data (SPC-4 table 142), 96 bytes:
/// byte 0 qualifier/type, 2 VERSION, 3 HISUP + format 2, 4 additional
/// length, 7 CMDQUE, 8..16 vendor, 16..32 product, 32..36 revision,
/// 58..74 version descriptors.
pub fn standard(p: &InquiryParams<'_>) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // connected direct-access block device
    d[1] = 0x00; // not removable
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, RESPONSE DATA FORMAT 2
    d[4] = 96 - 5;
    d[7] = 0x02; // CMDQUE
    ascii_field(&mut d[8..16], p.vendor);
    ascii_field(&mut d[16..32], p.product);
    ascii_field(&mut d[32..36], p.revision);
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Standard INQUIRY data for a LUN that does not exist: peripheral
/// qualifier 011b, device type 1Fh (SPC-4 §6.6.2).
pub fn not_present(evpd: bool) -> Vec<u8> {
    if evpd {
        // An empty SUPPORTED VPD PAGES page.
        return vec![0x7f, 0x00, 0x00, 0x00];
    }
    let mut d = vec![0u8; 36];
    d[0] = 0x7f;
    d[2] = 0x06;
    d[3] = 0x12;
    d[4] = 36 - 5;
    d
}

/// A VPD page, or INVALID FIELD IN CDB for one not supported.
pub fn vpd(p: &InquiryParams<'_>, page: u8) -> Result<Vec<u8>, Sense> {
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => p.serial.as_bytes().to_vec(),
        0x83 => device_identification(p),
        0xb0 => block_limits(p),
        0xb1 => block_device_characteristics(),
        0xb2 => logical_block_provisioning(p),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(2, None)),
    };
    // VPD header: qualifier/type, page code, 2-byte page length.
    let mut d = vec![0x00, page];
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&body);
    Ok(d)
}

/// Device Identification (VPD 83h) designators, each a 4-byte header
/// (code set, association/type, reserved, length) and the identifier:
/// an NAA 3h (locally assigned) designator from the volume name's hash,
/// and a T10 vendor ID designator ("FERRY   " + volume name).
fn device_identification(p: &InquiryParams<'_>) -> Vec<u8> {
    let mut d = vec![0x01, 0x03, 0x00, 0x08];
    d.extend_from_slice(&p.naa);
    let mut t10 = [b' '; 8].to_vec();
    ascii_field(&mut t10, p.vendor);
    t10.extend(
        p.volume_name
            .bytes()
            .map(|c| if (0x20..=0x7e).contains(&c) { c } else { b'_' })
            .take(200),
    );
    d.extend_from_slice(&[0x02, 0x01, 0x00]);
    d.push(u8::try_from(t10.len()).unwrap_or(u8::MAX));
    d.extend_from_slice(&t10);
    d
}

/// Block Limits (VPD B0h, SBC-3 table 206), page length 3Ch.
fn block_limits(p: &InquiryParams<'_>) -> Vec<u8> {
    let mut d = vec![0u8; 0x3c];
    // Offsets below are into the page body (page byte N is d[N - 4]).
    d[0] = 0x01; // WSNZ: a WRITE SAME of zero blocks is refused
    d[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
    let granularity = 1u16 << p.lbppb_exponent.min(15);
    d[2..4].copy_from_slice(&granularity.to_be_bytes());
    d[4..8].copy_from_slice(&p.max_transfer_blocks.to_be_bytes());
    d[8..12].copy_from_slice(&p.max_transfer_blocks.to_be_bytes());
    d[12..16].copy_from_slice(&p.max_transfer_blocks.to_be_bytes()); // MAXIMUM PREFETCH LENGTH
    if p.can_trim {
        d[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
        d[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        d[24..28].copy_from_slice(&u32::from(granularity).to_be_bytes());
        d[28] = 0x80; // UGAVALID, alignment 0
    }
    d[32..40].copy_from_slice(&u64::from(MAX_WRITE_SAME_BLOCKS).to_be_bytes());
    d
}

/// Block Device Characteristics (VPD B1h, SBC-3 table 208): non-rotating
/// medium, form factor not reported.
fn block_device_characteristics() -> Vec<u8> {
    let mut d = vec![0u8; 0x3c];
    d[0..2].copy_from_slice(&1u16.to_be_bytes());
    d
}

/// Logical Block Provisioning (VPD B2h, SBC-3 table 211): threshold
/// exponent, LBPU/LBPWS/LBPWS10/LBPRZ, provisioning type (2 = thin).
fn logical_block_provisioning(p: &InquiryParams<'_>) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    if p.can_trim {
        // Trimmed ranges read back as zeroes (the BlockDevice contract),
        // hence LBPRZ.
        d[1] = 0x80 | 0x40 | 0x20 | 0x04;
        d[2] = 0x02;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> InquiryParams<'static> {
        InquiryParams {
            vendor: "FERRY",
            product: "ferry disk",
            revision: "0.1",
            serial: "abcdef",
            naa: [0x31, 2, 3, 4, 5, 6, 7, 8],
            volume_name: "vol",
            lbppb_exponent: 3,
            max_transfer_blocks: 65536,
            can_trim: true,
        }
    }

    #[test]
    fn standard_page_layout() {
        let d = standard(&params());
        assert_eq!(d.len(), 96);
        assert_eq!(&d[..8], &[0, 0, 6, 0x12, 91, 0, 0, 2]);
        assert_eq!(&d[8..16], b"FERRY   ");
        assert_eq!(&d[16..32], b"ferry disk      ");
        assert_eq!(&d[32..36], b"0.1 ");
        assert_eq!(
            &d[58..66],
            &[0x00, 0xa0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xc0]
        );
    }

    #[test]
    fn supported_pages_and_identification() {
        let p = params();
        assert_eq!(
            vpd(&p, 0).unwrap(),
            vec![0, 0, 0, 6, 0, 0x80, 0x83, 0xb0, 0xb1, 0xb2]
        );
        assert_eq!(vpd(&p, 0x80).unwrap(), b"\x00\x80\x00\x06abcdef".to_vec());
        let id = vpd(&p, 0x83).unwrap();
        assert_eq!(
            &id[..16],
            &[0, 0x83, 0, 27, 1, 3, 0, 8, 0x31, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(&id[16..20], &[2, 1, 0, 11]);
        assert_eq!(&id[20..], b"FERRY   vol");
        assert_eq!(
            vpd(&p, 0x99),
            Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(2, None))
        );
    }

    #[test]
    fn block_limits_and_provisioning() {
        let p = params();
        let bl = vpd(&p, 0xb0).unwrap();
        assert_eq!(bl.len(), 64);
        assert_eq!(&bl[..8], &[0, 0xb0, 0, 0x3c, 0x01, 255, 0, 8]);
        assert_eq!(&bl[8..12], &65536u32.to_be_bytes());
        assert_eq!(&bl[20..24], &MAX_UNMAP_BLOCKS.to_be_bytes());
        assert_eq!(&bl[24..28], &MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        assert_eq!(&bl[28..32], &8u32.to_be_bytes());
        assert_eq!(bl[32], 0x80);
        assert_eq!(vpd(&p, 0xb2).unwrap(), vec![0, 0xb2, 0, 4, 0, 0xe4, 2, 0]);
        let thick = InquiryParams {
            can_trim: false,
            ..params()
        };
        assert_eq!(vpd(&thick, 0xb2).unwrap(), vec![0, 0xb2, 0, 4, 0, 0, 0, 0]);
        let bl = vpd(&thick, 0xb0).unwrap();
        assert_eq!(&bl[20..28], &[0; 8]);
        assert_eq!(vpd(&p, 0xb1).unwrap()[..6], [0, 0xb1, 0, 0x3c, 0, 1]);
    }
}
