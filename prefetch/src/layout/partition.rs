//! MBR (with extended partitions) and GPT partition tables.
//!
//! Written here rather than taken from `mbrman`/`gpt`: those crates read
//! a seekable (for `gpt`, writable) device through `std::io`, while this
//! crate reads through [`Image`] and needs every field bounds-checked
//! against an untrusted image before it is used. Either table is small.

use super::{damaged, le32, le64, read_vec, Image, LayoutError};

const SECTOR: u64 = 512;
/// Logical partitions followed through an extended partition's chain.
const MAX_LOGICAL: usize = 128;
/// GPT entries read, at most (the usual table has 128).
const MAX_GPT_ENTRIES: u32 = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionKind {
    /// No partition table: one filesystem on the whole device.
    Whole,
    /// An MBR entry's type byte.
    Mbr(u8),
    /// A GPT entry's type GUID, as on disk.
    Gpt([u8; 16]),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux numbers them (logical MBR partitions from 5).
    pub number: u32,
    /// Byte range on the volume.
    pub start: u64,
    pub len: u64,
    pub kind: PartitionKind,
}

impl Partition {
    pub fn describe(&self) -> String {
        match self.kind {
            PartitionKind::Whole => "the whole volume".into(),
            _ => format!("partition {}", self.number),
        }
    }
}

/// The volume's partitions, in table order. A volume with no MBR
/// signature is one filesystem on the whole device (`Whole`).
pub fn partitions(img: &dyn Image) -> Result<Vec<Partition>, LayoutError> {
    let size = img.size();
    if size < SECTOR {
        return damaged(format!("a volume of {size} bytes holds no partition table"));
    }
    let mbr = read_vec(img, 0, SECTOR as usize)?;
    let whole = || {
        vec![Partition {
            number: 0,
            start: 0,
            len: size,
            kind: PartitionKind::Whole,
        }]
    };
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(whole());
    }
    let entries: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..462 + 16 * i];
            (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
        })
        .collect();
    if entries.iter().any(|e| e.0 == 0xee) {
        return gpt(img, size);
    }
    // A FAT or ext4 boot sector also ends in 55 AA; its "entries" are
    // code. A real table's entries have a boot flag of 0 or 0x80.
    let flags_valid = (0..4).all(|i| matches!(mbr[446 + 16 * i], 0 | 0x80));
    if !flags_valid || entries.iter().all(|e| e.0 == 0) {
        return Ok(whole());
    }
    let mut out = Vec::new();
    for (i, &(kind, lba, count)) in entries.iter().enumerate() {
        if kind == 0 || count == 0 {
            continue;
        }
        if matches!(kind, 0x05 | 0x0f | 0x85) {
            logical(img, size, lba, &mut out)?;
            continue;
        }
        out.push(checked(
            size,
            i as u32 + 1,
            lba,
            count,
            PartitionKind::Mbr(kind),
        )?);
    }
    Ok(out)
}

fn checked(
    size: u64,
    number: u32,
    lba: u64,
    count: u64,
    kind: PartitionKind,
) -> Result<Partition, LayoutError> {
    let (start, len) = (lba * SECTOR, count * SECTOR);
    if start.checked_add(len).is_none_or(|end| end > size) {
        return damaged(format!(
            "partition {number} ({len} bytes at {start}) runs past the volume's {size} bytes"
        ));
    }
    Ok(Partition {
        number,
        start,
        len,
        kind,
    })
}

/// The chain of extended boot records from the extended partition at
/// `base` (LBA): each holds one logical partition (relative to itself)
/// and the next record (relative to `base`).
fn logical(
    img: &dyn Image,
    size: u64,
    base: u64,
    out: &mut Vec<Partition>,
) -> Result<(), LayoutError> {
    let mut next = 0;
    for n in 0..MAX_LOGICAL {
        let at = base + next;
        if at.checked_mul(SECTOR).is_none_or(|o| o + SECTOR > size) {
            return damaged(format!(
                "extended boot record at LBA {at} is past the volume"
            ));
        }
        let ebr = read_vec(img, at * SECTOR, SECTOR as usize)?;
        if ebr[510..512] != [0x55, 0xaa] {
            return damaged(format!("extended boot record at LBA {at} has no signature"));
        }
        let (kind, rel, count) = (
            ebr[446 + 4],
            u64::from(le32(&ebr, 446 + 8)),
            u64::from(le32(&ebr, 446 + 12)),
        );
        if kind != 0 && count > 0 {
            out.push(checked(
                size,
                5 + n as u32,
                at + rel,
                count,
                PartitionKind::Mbr(kind),
            )?);
        }
        let link = u64::from(le32(&ebr, 462 + 8));
        if ebr[462 + 4] == 0 || link == 0 {
            return Ok(());
        }
        if link <= next {
            return damaged("extended boot records link backwards (a loop)");
        }
        next = link;
    }
    Err(LayoutError::Limit(format!(
        "more than {MAX_LOGICAL} logical partitions"
    )))
}

fn gpt(img: &dyn Image, size: u64) -> Result<Vec<Partition>, LayoutError> {
    let h = read_vec(img, SECTOR, SECTOR as usize)?;
    if &h[..8] != b"EFI PART" {
        return damaged("protective MBR without a GPT header");
    }
    let header_size = le32(&h, 12) as usize;
    if !(92..=SECTOR as usize).contains(&header_size) {
        return damaged(format!("GPT header of {header_size} bytes"));
    }
    let mut sealed = h[..header_size].to_vec();
    sealed[16..20].fill(0);
    if crc32fast::hash(&sealed) != le32(&h, 16) {
        return damaged("GPT header checksum mismatch");
    }
    let (table_lba, count, entry_size) = (le64(&h, 72), le32(&h, 80), le32(&h, 84));
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&entry_size) || entry_size % 8 != 0 {
        return damaged(format!("GPT of {count} entries of {entry_size} bytes"));
    }
    let table_len = count as usize * entry_size as usize;
    if table_lba
        .checked_mul(SECTOR)
        .and_then(|o| o.checked_add(table_len as u64))
        .is_none_or(|end| end > size)
    {
        return damaged(format!(
            "GPT entries at LBA {table_lba} are past the volume"
        ));
    }
    let table = read_vec(img, table_lba * SECTOR, table_len)?;
    if crc32fast::hash(&table) != le32(&h, 88) {
        return damaged("GPT entries checksum mismatch");
    }
    let mut out = Vec::new();
    for (i, e) in table.chunks_exact(entry_size as usize).enumerate() {
        let guid: [u8; 16] = e[..16].try_into().expect("16 bytes");
        if guid == [0; 16] {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            return damaged(format!("GPT entry {} ends before it starts", i + 1));
        }
        out.push(checked(
            size,
            i as u32 + 1,
            first,
            last - first + 1,
            PartitionKind::Gpt(guid),
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; 8 << 20];
        for (i, &(kind, lba, count)) in entries.iter().enumerate() {
            let e = &mut d[446 + 16 * i..462 + 16 * i];
            e[4] = kind;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&count.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    #[test]
    fn an_mbr_lists_its_partitions_and_refuses_one_past_the_end() {
        let d = mbr(&[(0x83, 2048, 4096), (0, 0, 0), (0x0c, 6144, 2048)]);
        let p = partitions(&d).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].number, p[0].start, p[0].len),
            (1, 2048 * 512, 4096 * 512)
        );
        assert_eq!(p[1].kind, PartitionKind::Mbr(0x0c));
        let d = mbr(&[(0x83, 2048, 1 << 20)]);
        assert!(matches!(partitions(&d), Err(LayoutError::Damaged(_))));
    }

    #[test]
    fn logical_partitions_follow_the_chain_and_a_loop_is_refused() {
        let mut d = mbr(&[(0x83, 2048, 2048), (0x05, 4096, 8192)]);
        // EBR at 4096: logical at +63, 1000 sectors; next EBR at base+2048.
        let put = |d: &mut Vec<u8>, at: usize, rel: u32, count: u32, link: u32| {
            let s = at * 512;
            d[s + 446 + 4] = 0x83;
            d[s + 446 + 8..s + 446 + 12].copy_from_slice(&rel.to_le_bytes());
            d[s + 446 + 12..s + 446 + 16].copy_from_slice(&count.to_le_bytes());
            if link > 0 {
                d[s + 462 + 4] = 0x05;
                d[s + 462 + 8..s + 462 + 12].copy_from_slice(&link.to_le_bytes());
            }
            d[s + 510] = 0x55;
            d[s + 511] = 0xaa;
        };
        put(&mut d, 4096, 63, 1000, 2048);
        put(&mut d, 4096 + 2048, 63, 1000, 0);
        let p = partitions(&d).unwrap();
        let numbers: Vec<u32> = p.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [1, 5, 6]);
        assert_eq!(p[2].start, (4096 + 2048 + 63) * 512);
        put(&mut d, 4096 + 2048, 63, 1000, 2048);
        assert!(
            matches!(partitions(&d), Err(LayoutError::Damaged(_))),
            "a loop"
        );
    }

    #[test]
    fn a_gpt_is_read_and_its_checksums_checked() {
        let mut d = mbr(&[(0xee, 1, 16383)]);
        let mut entries = vec![0u8; 128 * 128];
        entries[..16].copy_from_slice(&[7; 16]);
        entries[32..40].copy_from_slice(&2048u64.to_le_bytes());
        entries[40..48].copy_from_slice(&4095u64.to_le_bytes());
        d[1024..1024 + entries.len()].copy_from_slice(&entries);
        let mut h = vec![0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let crc = crc32fast::hash(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        d[512..604].copy_from_slice(&h);
        let p = partitions(&d).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].start, p[0].len), (2048 * 512, 2048 * 512));
        d[1024 + 50] ^= 1;
        assert!(
            matches!(partitions(&d), Err(LayoutError::Damaged(m)) if m.contains("entries checksum"))
        );
    }

    #[test]
    fn no_signature_is_one_filesystem_on_the_whole_device() {
        let d = vec![0u8; 4096];
        let p = partitions(&d).unwrap();
        assert_eq!(p[0].kind, PartitionKind::Whole);
        assert_eq!(p[0].len, 4096);
    }
}
