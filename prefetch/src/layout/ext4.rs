//! ext2/3/4: the superblock, group descriptors, inodes, extent trees and
//! indirect block maps, and directories read linearly (an htree
//! directory's index blocks read as empty entries, so a linear walk sees
//! every name). No crate reads ext4 extents without a mount, hence this.

use std::collections::HashSet;

use super::{damaged, le16, le32, read_vec, File, FileKind, Image, LayoutError, Limits, Mapped};

const MAGIC: u16 = 0xef53;
const ROOT_INODE: u32 = 2;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_ENCRYPT: u32 = 0x10000;

const FLAG_EXTENTS: u32 = 0x8_0000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;

const EXTENT_MAGIC: u16 = 0xf30a;
const MAX_EXTENT_DEPTH: u16 = 5;
/// Inodes are read through a window of this many bytes of the inode
/// table (neighbouring files' inodes are usually neighbours).
const INODE_WINDOW: u64 = 64 << 10;
/// Group descriptor tables read, at most.
const MAX_GDT_BYTES: u64 = 16 << 20;

pub(super) fn probe(img: &dyn Image, start: u64) -> bool {
    read_vec(img, start + 1024 + 0x38, 2).is_ok_and(|b| le16(&b, 0) == MAGIC)
}

struct Fs<'a> {
    img: &'a dyn Image,
    start: u64,
    block: u64,
    blocks: u64,
    inodes: u32,
    inodes_per_group: u32,
    inode_size: u64,
    filetype: bool,
    gdt: Vec<u8>,
    desc_size: usize,
    wide: bool,
    limits: Limits,
    window: std::cell::RefCell<Option<(u64, Vec<u8>)>>,
}

#[derive(Clone)]
struct Inode {
    at: u64,
    mode: u16,
    size: u64,
    flags: u32,
    iblock: [u8; 60],
}

impl Inode {
    fn kind(&self) -> Option<FileKind> {
        match self.mode & 0xf000 {
            0x4000 => Some(FileKind::Directory),
            0x8000 => Some(FileKind::Regular),
            0xa000 => Some(FileKind::Symlink),
            _ => None,
        }
    }
}

/// The filesystem's metadata ranges and its files.
pub(super) fn scan(
    img: &dyn Image,
    start: u64,
    len: u64,
    fs_index: usize,
    limits: Limits,
) -> Result<Mapped, LayoutError> {
    let sb = read_vec(img, start + 1024, 1024)?;
    let log = le32(&sb, 0x18);
    if log > 6 {
        return damaged(format!("block size 1024 << {log}"));
    }
    let block = 1024u64 << log;
    let incompat = le32(&sb, 0x60);
    for (bit, what) in [
        (INCOMPAT_COMPRESSION, "compression"),
        (INCOMPAT_JOURNAL_DEV, "an external journal device"),
        (INCOMPAT_META_BG, "meta_bg group descriptors"),
        (INCOMPAT_ENCRYPT, "encrypted names"),
    ] {
        if incompat & bit != 0 {
            return Err(LayoutError::Unsupported(format!("ext4 with {what}")));
        }
    }
    let wide = incompat & INCOMPAT_64BIT != 0;
    let blocks = u64::from(le32(&sb, 4))
        | if wide {
            u64::from(le32(&sb, 0x150)) << 32
        } else {
            0
        };
    let first_data = u64::from(le32(&sb, 0x14));
    let (blocks_per_group, inodes_per_group) = (u64::from(le32(&sb, 0x20)), le32(&sb, 0x28));
    let inodes = le32(&sb, 0);
    let inode_size = if le32(&sb, 0x4c) == 0 {
        128
    } else {
        u64::from(le16(&sb, 0x58))
    };
    let desc_size = if wide {
        usize::from(le16(&sb, 0xfe))
    } else {
        32
    };
    if blocks == 0
        || blocks.checked_mul(block).is_none_or(|b| b > len)
        || blocks_per_group == 0
        || inodes_per_group == 0
        || first_data >= blocks
        || !(128..=block).contains(&inode_size)
        || !inode_size.is_power_of_two()
        || !(32..=1024).contains(&desc_size)
        || (wide && desc_size < 64)
    {
        return damaged(format!(
            "ext4 superblock: {blocks} blocks of {block} bytes in a partition of {len}, \
             {blocks_per_group} blocks and {inodes_per_group} inodes per group, \
             inodes of {inode_size} bytes, descriptors of {desc_size}"
        ));
    }
    let groups = (blocks - first_data).div_ceil(blocks_per_group);
    let gdt_len = groups * desc_size as u64;
    if gdt_len > MAX_GDT_BYTES || u64::from(inodes) > groups * u64::from(inodes_per_group) {
        return damaged(format!("ext4 of {groups} groups and {inodes} inodes"));
    }
    let gdt_at = start + (first_data + 1) * block;
    let gdt = read_vec(img, gdt_at, gdt_len as usize)?;
    let fs = Fs {
        img,
        start,
        block,
        blocks,
        inodes,
        inodes_per_group,
        inode_size,
        filetype: incompat & INCOMPAT_FILETYPE != 0,
        gdt,
        desc_size,
        wide,
        limits,
        window: std::cell::RefCell::new(None),
    };
    let meta = vec![(start + 1024, 1024), (gdt_at, gdt_len)];
    Ok((meta, fs.walk(fs_index)?))
}

impl Fs<'_> {
    fn read(&self, block: u64, len: usize) -> Result<Vec<u8>, LayoutError> {
        if block >= self.blocks {
            return damaged(format!(
                "block {block} is past the filesystem's {}",
                self.blocks
            ));
        }
        read_vec(self.img, self.start + block * self.block, len)
    }

    fn inode(&self, n: u32) -> Result<Inode, LayoutError> {
        if n == 0 || n > self.inodes {
            return damaged(format!("inode {n} of {}", self.inodes));
        }
        let (group, index) = (
            (n - 1) / self.inodes_per_group,
            (n - 1) % self.inodes_per_group,
        );
        let d = group as usize * self.desc_size;
        let desc = &self.gdt[d..d + self.desc_size];
        let mut table = u64::from(le32(desc, 8));
        if self.wide {
            table |= u64::from(le32(desc, 0x28)) << 32;
        }
        let table_len = u64::from(self.inodes_per_group) * self.inode_size;
        if table == 0
            || table
                .checked_mul(self.block)
                .is_none_or(|b| b + table_len > self.blocks * self.block)
        {
            return damaged(format!("group {group}'s inode table at block {table}"));
        }
        let at = self.start + table * self.block + u64::from(index) * self.inode_size;
        let raw = self.windowed(at, 128)?;
        let mut iblock = [0; 60];
        iblock.copy_from_slice(&raw[0x28..0x64]);
        Ok(Inode {
            at,
            mode: le16(&raw, 0),
            size: u64::from(le32(&raw, 4)) | (u64::from(le32(&raw, 0x6c)) << 32),
            flags: le32(&raw, 0x20),
            iblock,
        })
    }

    fn windowed(&self, at: u64, len: usize) -> Result<Vec<u8>, LayoutError> {
        let base = at - at % INODE_WINDOW;
        let off = (at - base) as usize;
        let mut w = self.window.borrow_mut();
        if w.as_ref().is_none_or(|(b, _)| *b != base) {
            let want = INODE_WINDOW.min(self.img.size().saturating_sub(base)) as usize;
            *w = Some((base, read_vec(self.img, base, want)?));
        }
        let buf = &w.as_ref().expect("filled").1;
        match buf.get(off..off + len) {
            Some(b) => Ok(b.to_vec()),
            None => damaged(format!("inode at {at} is past the volume")),
        }
    }

    /// The file's data as (logical block, physical block, blocks), in
    /// logical order.
    fn map(&self, ino: &Inode) -> Result<Vec<(u64, u64, u64)>, LayoutError> {
        let mut out = Vec::new();
        if ino.flags & FLAG_INLINE_DATA != 0 {
            return Ok(out);
        }
        let nblocks = ino.size.div_ceil(self.block).min(self.blocks);
        if ino.flags & FLAG_EXTENTS != 0 {
            let mut budget = self.limits.max_extents;
            self.extents(&ino.iblock, None, &mut out, &mut budget)?;
            out.retain(|e| e.0 < nblocks);
        } else {
            self.indirect(&ino.iblock, nblocks, &mut out)?;
        }
        Ok(out)
    }

    fn extents(
        &self,
        node: &[u8],
        want_depth: Option<u16>,
        out: &mut Vec<(u64, u64, u64)>,
        budget: &mut usize,
    ) -> Result<(), LayoutError> {
        let (magic, entries, max, depth) =
            (le16(node, 0), le16(node, 2), le16(node, 4), le16(node, 6));
        let capacity = (node.len() - 12) / 12;
        if magic != EXTENT_MAGIC
            || entries > max
            || usize::from(max) > capacity
            || depth > MAX_EXTENT_DEPTH
            || want_depth.is_some_and(|d| d != depth)
        {
            return damaged(format!(
                "extent node: magic {magic:#x}, {entries}/{max} entries, depth {depth}"
            ));
        }
        for i in 0..usize::from(entries) {
            let e = &node[12 + 12 * i..24 + 12 * i];
            *budget = budget
                .checked_sub(1)
                .ok_or_else(|| LayoutError::Limit("a file of too many extents".into()))?;
            if depth == 0 {
                let logical = u64::from(le32(e, 0));
                let raw_len = le16(e, 4);
                let phys = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                // Longer than 32768: unwritten (reads as zeroes, nothing
                // on disk worth pushing).
                if raw_len == 0 || raw_len > 32768 {
                    continue;
                }
                let n = u64::from(raw_len);
                if phys.checked_add(n).is_none_or(|end| end > self.blocks) {
                    return damaged(format!(
                        "extent of {n} blocks at {phys} is past the filesystem"
                    ));
                }
                if out
                    .last()
                    .is_some_and(|l: &(u64, u64, u64)| logical < l.0 + l.2)
                {
                    return damaged("extents out of order");
                }
                out.push((logical, phys, n));
            } else {
                let child = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
                let block = self.read(child, self.block as usize)?;
                self.extents(&block, Some(depth - 1), out, budget)?;
            }
        }
        Ok(())
    }

    /// ext2/3 block maps: 12 direct pointers, then single, double and
    /// triple indirect blocks. A zero pointer is a hole.
    fn indirect(
        &self,
        iblock: &[u8],
        nblocks: u64,
        out: &mut Vec<(u64, u64, u64)>,
    ) -> Result<(), LayoutError> {
        let per = self.block / 4;
        let mut logical = 0u64;
        for i in 0..12 {
            if logical >= nblocks {
                return Ok(());
            }
            self.push_block(out, logical, u64::from(le32(iblock, 4 * i)))?;
            logical += 1;
        }
        for level in 1..=3u32 {
            if logical >= nblocks {
                return Ok(());
            }
            let ptr = u64::from(le32(iblock, 4 * (11 + level as usize)));
            self.indirect_level(ptr, level, per, nblocks, &mut logical, out)?;
        }
        Ok(())
    }

    fn indirect_level(
        &self,
        ptr: u64,
        level: u32,
        per: u64,
        nblocks: u64,
        logical: &mut u64,
        out: &mut Vec<(u64, u64, u64)>,
    ) -> Result<(), LayoutError> {
        let span = per.pow(level);
        if ptr == 0 {
            *logical += span;
            return Ok(());
        }
        let table = self.read(ptr, self.block as usize)?;
        for i in 0..per as usize {
            if *logical >= nblocks {
                return Ok(());
            }
            let p = u64::from(le32(&table, 4 * i));
            if level == 1 {
                self.push_block(out, *logical, p)?;
                *logical += 1;
            } else {
                self.indirect_level(p, level - 1, per, nblocks, logical, out)?;
            }
        }
        Ok(())
    }

    fn push_block(
        &self,
        out: &mut Vec<(u64, u64, u64)>,
        logical: u64,
        phys: u64,
    ) -> Result<(), LayoutError> {
        if phys == 0 {
            return Ok(());
        }
        if phys >= self.blocks {
            return damaged(format!("block pointer {phys} is past the filesystem"));
        }
        if let Some(l) = out.last_mut() {
            if l.0 + l.2 == logical && l.1 + l.2 == phys {
                l.2 += 1;
                return Ok(());
            }
        }
        if out.len() >= self.limits.max_extents {
            return Err(LayoutError::Limit("a file of too many extents".into()));
        }
        out.push((logical, phys, 1));
        Ok(())
    }

    /// Byte ranges on the volume and where each starts in the file;
    /// ranges adjacent both on the volume and in the file joined.
    fn byte_extents(&self, map: &[(u64, u64, u64)]) -> (Vec<(u64, u64)>, Vec<u64>) {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut offsets: Vec<u64> = Vec::new();
        for &(logical, phys, n) in map {
            let (at, len, off) = (
                self.start + phys * self.block,
                n * self.block,
                logical * self.block,
            );
            match (out.last_mut(), offsets.last()) {
                (Some(l), Some(&o)) if l.0 + l.1 == at && o + l.1 == off => l.1 += len,
                _ => {
                    out.push((at, len));
                    offsets.push(off);
                }
            }
        }
        (out, offsets)
    }

    fn walk(&self, fs_index: usize) -> Result<Vec<File>, LayoutError> {
        let root = self.inode(ROOT_INODE)?;
        if root.kind() != Some(FileKind::Directory) {
            return damaged("the root inode is not a directory");
        }
        let mut files = Vec::new();
        let mut seen = HashSet::from([ROOT_INODE]);
        let mut dirs = vec![(root.clone(), String::new(), 0usize)];
        while let Some((dir, path, depth)) = dirs.pop() {
            let map = self.map(&dir)?;
            for (name, n) in self.entries(&map)? {
                let ino = self.inode(n)?;
                let Some(kind) = ino.kind() else { continue };
                let full = format!("{path}/{name}");
                let map = match kind {
                    FileKind::Regular | FileKind::Directory => self.map(&ino)?,
                    FileKind::Symlink => Vec::new(),
                };
                let target = (kind == FileKind::Symlink)
                    .then(|| self.link_target(&ino))
                    .transpose()?;
                if files.len() >= self.limits.max_files {
                    return Err(LayoutError::Limit(format!(
                        "more than {} files",
                        self.limits.max_files
                    )));
                }
                let (extents, offsets) = self.byte_extents(&map);
                files.push(File {
                    fs: fs_index,
                    path: full.clone(),
                    kind,
                    size: ino.size,
                    extents,
                    offsets,
                    meta: Some(ino.at),
                    target,
                });
                if kind == FileKind::Directory && seen.insert(n) {
                    if depth + 1 > self.limits.max_depth {
                        return Err(LayoutError::Limit(format!(
                            "directories nested deeper than {}",
                            self.limits.max_depth
                        )));
                    }
                    dirs.push((ino, full, depth + 1));
                }
            }
        }
        let (extents, offsets) = self.byte_extents(&self.map(&root)?);
        files.push(File {
            fs: fs_index,
            path: "/".into(),
            kind: FileKind::Directory,
            size: root.size,
            extents,
            offsets,
            meta: Some(root.at),
            target: None,
        });
        Ok(files)
    }

    fn entries(&self, map: &[(u64, u64, u64)]) -> Result<Vec<(String, u32)>, LayoutError> {
        let mut out = Vec::new();
        let mut read = 0u64;
        for &(_, phys, n) in map {
            for b in phys..phys + n {
                read += self.block;
                if read > self.limits.max_dir_bytes {
                    return Err(LayoutError::Limit(format!(
                        "a directory over {} bytes",
                        self.limits.max_dir_bytes
                    )));
                }
                let data = self.read(b, self.block as usize)?;
                let mut at = 0usize;
                while at + 8 <= data.len() {
                    let ino = le32(&data, at);
                    let rec = usize::from(le16(&data, at + 4));
                    let name_len = if self.filetype {
                        usize::from(data[at + 6])
                    } else {
                        usize::from(le16(&data, at + 6))
                    };
                    if rec < 8 || rec % 4 != 0 || at + rec > data.len() || 8 + name_len > rec {
                        return damaged(format!("directory entry at block {b} offset {at}: length {rec}, name {name_len}"));
                    }
                    let name = &data[at + 8..at + 8 + name_len];
                    if ino != 0 && name != b"." && name != b".." && !name.is_empty() {
                        if name.contains(&b'/') {
                            return damaged(format!("a name with a slash in block {b}"));
                        }
                        out.push((String::from_utf8_lossy(name).into_owned(), ino));
                    }
                    at += rec;
                }
            }
        }
        Ok(out)
    }

    fn link_target(&self, ino: &Inode) -> Result<String, LayoutError> {
        let len = usize::try_from(ino.size).unwrap_or(usize::MAX);
        // A fast symlink (shorter than 60 bytes, no extent tree) keeps its
        // target where the block map would be.
        if ino.flags & FLAG_INLINE_DATA != 0 || (ino.flags & FLAG_EXTENTS == 0 && len < 60) {
            return Ok(String::from_utf8_lossy(&ino.iblock[..len.min(60)]).into_owned());
        }
        if len > self.block as usize {
            return damaged(format!("a symlink of {len} bytes"));
        }
        let map = self.map(ino)?;
        let Some(&(_, phys, _)) = map.first() else {
            return Ok(String::new());
        };
        let data = self.read(phys, self.block as usize)?;
        Ok(String::from_utf8_lossy(&data[..len]).into_owned())
    }
}
