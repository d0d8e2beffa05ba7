//! FAT12/16/32 (EFI system and boot partitions): the boot sector, the
//! first FAT, cluster chains and directories with long names.

use std::collections::HashSet;

use super::{damaged, le16, le32, read_vec, File, FileKind, Image, LayoutError, Limits, Mapped};

/// FATs read, at most (a FAT32 of 2 TiB has one of 256 MiB; EFI and boot
/// partitions have FATs of a few hundred KiB).
const MAX_FAT_BYTES: u64 = 64 << 20;

pub(super) fn probe(img: &dyn Image, start: u64) -> bool {
    let Ok(b) = read_vec(img, start, 512) else {
        return false;
    };
    let bps = le16(&b, 11);
    matches!(b[0], 0xeb | 0xe9)
        && b[510..512] == [0x55, 0xaa]
        && (512..=4096).contains(&bps)
        && bps.is_power_of_two()
        && b[13].is_power_of_two()
        && le16(&b, 14) > 0
        && matches!(b[16], 1 | 2)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Width {
    Fat12,
    Fat16,
    Fat32,
}

struct Fs<'a> {
    img: &'a dyn Image,
    start: u64,
    width: Width,
    fat: Vec<u8>,
    /// Byte offset of cluster 2 from the filesystem's start.
    data: u64,
    cluster: u64,
    clusters: u32,
    limits: Limits,
}

enum Dir {
    /// FAT12/16's fixed root directory: (byte offset, bytes).
    Fixed(u64, u64),
    Chain(u32),
}

pub(super) fn scan(
    img: &dyn Image,
    start: u64,
    len: u64,
    fs_index: usize,
    limits: Limits,
) -> Result<Mapped, LayoutError> {
    if !probe(img, start) {
        return damaged("no FAT boot sector");
    }
    let b = read_vec(img, start, 512)?;
    let bps = u64::from(le16(&b, 11));
    let spc = u64::from(b[13]);
    let reserved = u64::from(le16(&b, 14));
    let fats = u64::from(b[16]);
    let root_entries = u64::from(le16(&b, 17));
    let total = match le16(&b, 19) {
        0 => u64::from(le32(&b, 32)),
        n => u64::from(n),
    };
    let fat_sectors = match le16(&b, 22) {
        0 => u64::from(le32(&b, 36)),
        n => u64::from(n),
    };
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let first_data = reserved + fats * fat_sectors + root_sectors;
    if fat_sectors == 0 || total <= first_data || total * bps > len {
        return damaged(format!(
            "FAT boot sector: {total} sectors of {bps} bytes in a partition of {len}, FATs of {fat_sectors} sectors"
        ));
    }
    let clusters = (total - first_data) / spc;
    let width = if clusters < 4085 {
        Width::Fat12
    } else if clusters < 65525 {
        Width::Fat16
    } else {
        Width::Fat32
    };
    let fat_len = fat_sectors * bps;
    if fat_len > MAX_FAT_BYTES {
        return Err(LayoutError::Limit(format!("a FAT of {fat_len} bytes")));
    }
    let fat = read_vec(img, start + reserved * bps, fat_len as usize)?;
    let fs = Fs {
        img,
        start,
        width,
        fat,
        data: first_data * bps,
        cluster: spc * bps,
        clusters: u32::try_from(clusters).unwrap_or(u32::MAX),
        limits,
    };
    let root = match width {
        Width::Fat32 => Dir::Chain(le32(&b, 44)),
        _ => Dir::Fixed((reserved + fats * fat_sectors) * bps, root_sectors * bps),
    };
    let meta = vec![(start, reserved * bps + fats * fat_len + root_sectors * bps)];
    Ok((meta, fs.walk(fs_index, &root)?))
}

impl Fs<'_> {
    fn next(&self, c: u32) -> Option<u32> {
        let v = match self.width {
            Width::Fat12 => {
                let at = c as usize * 3 / 2;
                let pair = u32::from(le16(&self.fat, at));
                if c.is_multiple_of(2) {
                    pair & 0xfff
                } else {
                    pair >> 4
                }
            }
            Width::Fat16 => u32::from(le16(&self.fat, c as usize * 2)),
            Width::Fat32 => le32(&self.fat, c as usize * 4) & 0x0fff_ffff,
        };
        let end = match self.width {
            Width::Fat12 => 0xff8,
            Width::Fat16 => 0xfff8,
            Width::Fat32 => 0x0fff_fff8,
        };
        (v < end).then_some(v)
    }

    /// The chain from `first` as byte ranges on the volume, at most
    /// `want` clusters (all of them for `None`).
    fn chain(&self, first: u32, want: Option<u64>) -> Result<Vec<(u64, u64)>, LayoutError> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut c = first;
        let mut n = 0u64;
        loop {
            if want.is_some_and(|w| n >= w) {
                return Ok(out);
            }
            if c < 2 || c - 2 >= self.clusters {
                return damaged(format!(
                    "cluster {c} of {} in a chain from {first}",
                    self.clusters
                ));
            }
            n += 1;
            if n > u64::from(self.clusters) {
                return damaged(format!("the chain from cluster {first} loops"));
            }
            let at = self.start + self.data + u64::from(c - 2) * self.cluster;
            match out.last_mut() {
                Some(l) if l.0 + l.1 == at => l.1 += self.cluster,
                _ => {
                    if out.len() >= self.limits.max_extents {
                        return Err(LayoutError::Limit("a file of too many extents".into()));
                    }
                    out.push((at, self.cluster));
                }
            }
            match self.next(c) {
                Some(next) => c = next,
                None => return Ok(out),
            }
        }
    }

    fn walk(&self, fs_index: usize, root: &Dir) -> Result<Vec<File>, LayoutError> {
        let mut files = Vec::new();
        let root_extents = match *root {
            Dir::Fixed(at, len) => vec![(self.start + at, len)],
            Dir::Chain(c) => self.chain(c, None)?,
        };
        files.push(File {
            fs: fs_index,
            path: "/".into(),
            kind: FileKind::Directory,
            size: root_extents.iter().map(|e| e.1).sum(),
            extents: root_extents.clone(),
            offsets: Vec::new(),
            meta: None,
            target: None,
        });
        let mut seen = HashSet::new();
        let mut dirs = vec![(root_extents, String::new(), 0usize)];
        while let Some((extents, path, depth)) = dirs.pop() {
            for e in self.entries(&extents)? {
                let full = format!("{path}/{}", e.name);
                let kind = if e.dir {
                    FileKind::Directory
                } else {
                    FileKind::Regular
                };
                let extents = match (e.first, kind) {
                    (0, _) => Vec::new(),
                    (c, FileKind::Directory) => self.chain(c, None)?,
                    (c, _) => self.chain(c, Some(u64::from(e.size).div_ceil(self.cluster)))?,
                };
                if files.len() >= self.limits.max_files {
                    return Err(LayoutError::Limit(format!(
                        "more than {} files",
                        self.limits.max_files
                    )));
                }
                let size = if e.dir {
                    extents.iter().map(|x| x.1).sum()
                } else {
                    u64::from(e.size)
                };
                files.push(File {
                    fs: fs_index,
                    path: full.clone(),
                    kind,
                    size,
                    extents: extents.clone(),
                    offsets: Vec::new(),
                    meta: Some(e.at),
                    target: None,
                });
                if e.dir && e.first != 0 && seen.insert(e.first) {
                    if depth + 1 > self.limits.max_depth {
                        return Err(LayoutError::Limit(format!(
                            "directories nested deeper than {}",
                            self.limits.max_depth
                        )));
                    }
                    dirs.push((extents, full, depth + 1));
                }
            }
        }
        Ok(files)
    }

    fn entries(&self, extents: &[(u64, u64)]) -> Result<Vec<Entry>, LayoutError> {
        let total: u64 = extents.iter().map(|e| e.1).sum();
        if total > self.limits.max_dir_bytes {
            return Err(LayoutError::Limit(format!(
                "a directory over {} bytes",
                self.limits.max_dir_bytes
            )));
        }
        let mut out = Vec::new();
        let mut long: Vec<(u8, [u16; 13])> = Vec::new();
        let mut long_sum = None;
        for &(at, len) in extents {
            let data = read_vec(self.img, at, len as usize)?;
            for (i, d) in data.chunks_exact(32).enumerate() {
                match d[0] {
                    0 => return Ok(out),
                    0xe5 => {
                        long.clear();
                        continue;
                    }
                    _ => {}
                }
                let attr = d[11];
                if attr & 0x3f == 0x0f {
                    let mut units = [0u16; 13];
                    for (k, off) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                        .into_iter()
                        .enumerate()
                    {
                        units[k] = le16(d, off);
                    }
                    if d[0] & 0x40 != 0 {
                        long.clear();
                        long_sum = Some(d[13]);
                    }
                    long.push((d[0] & 0x1f, units));
                    continue;
                }
                if attr & 0x08 != 0 {
                    long.clear();
                    continue;
                }
                let short: [u8; 11] = d[..11].try_into().expect("11 bytes");
                let name = match long_name(&long, long_sum, &short) {
                    Some(n) => n,
                    None => short_name(&short, d[12]),
                };
                long.clear();
                if name == "." || name == ".." || name.is_empty() || name.contains('/') {
                    continue;
                }
                out.push(Entry {
                    name,
                    dir: attr & 0x10 != 0,
                    first: (u32::from(le16(d, 20)) << 16) | u32::from(le16(d, 26)),
                    size: le32(d, 28),
                    at: at + 32 * i as u64,
                });
            }
        }
        Ok(out)
    }
}

struct Entry {
    name: String,
    dir: bool,
    first: u32,
    size: u32,
    at: u64,
}

fn short_name(raw: &[u8; 11], case: u8) -> String {
    let mut base: Vec<u8> = raw[..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xe5;
    }
    let lower = |s: &[u8], on: bool| {
        let s = String::from_utf8_lossy(s).trim_end().to_owned();
        if on {
            s.to_lowercase()
        } else {
            s
        }
    };
    let base = lower(&base, case & 0x08 != 0);
    let ext = lower(&raw[8..], case & 0x10 != 0);
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// The long name its entries (last first on disk) spell, if they belong
/// to this short entry (their checksum is the short name's).
fn long_name(parts: &[(u8, [u16; 13])], sum: Option<u8>, short: &[u8; 11]) -> Option<String> {
    if parts.is_empty() {
        return None;
    }
    let check = short
        .iter()
        .fold(0u8, |s, &c| s.rotate_right(1).wrapping_add(c));
    if sum != Some(check) {
        return None;
    }
    let mut ordered: Vec<&(u8, [u16; 13])> = parts.iter().collect();
    ordered.sort_by_key(|p| p.0);
    if ordered
        .iter()
        .enumerate()
        .any(|(i, p)| usize::from(p.0) != i + 1)
    {
        return None;
    }
    let units: Vec<u16> = ordered
        .iter()
        .flat_map(|p| p.1)
        .take_while(|&u| u != 0 && u != 0xffff)
        .collect();
    Some(String::from_utf16_lossy(&units))
}
