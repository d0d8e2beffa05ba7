//! What is where on a volume: partitions, filesystems, files and their
//! extents (the static analysis of the design's FIG. 21).
//!
//! The origin hands [`scan`] a way to read its image ([`Image`]); the
//! result maps every regular file it found to the byte ranges of the
//! volume that hold it, so a demand read inside a file can push the rest
//! of that file ([`FileIndex::group`]) and a first boot, with no profile
//! yet, can be planned from the files a boot reads ([`boot_order`]).
//!
//! Images are untrusted: every parser here bounds what it reads and
//! returns an error, never panics, on a damaged or unknown filesystem
//! (NTFS's, which reads through the `ntfs` crate, catches that crate's
//! panics: see `ntfs.rs`).
//! An error disables file awareness for that filesystem, with a warning
//! in [`VolumeLayout::warnings`]; the rest of the volume is still mapped.

// Offsets and lengths inside an image become indexes of buffers read
// from it: on the 64-bit hosts ferry runs on a u64 always fits a usize,
// and every length is bounded (by Limits or the format) before it is read.
#![allow(clippy::cast_possible_truncation)]

mod boot;
mod elf;
mod ext4;
mod fat;
mod index;
mod ntfs;
mod partition;

pub use boot::{boot_order, BootOrder};
pub use elf::{read_needs, Needs};
pub use index::FileIndex;
pub use partition::{partitions, Partition, PartitionKind};

/// A filesystem's metadata ranges (byte offset, length) and its files.
pub type Mapped = (Vec<(u64, u64)>, Vec<File>);

/// Reads of the volume being scanned.
pub trait Image {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error (out of range, I/O) ends the
    /// scan of the filesystem being read.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// An image held in memory (tests, fuzzing).
impl Image for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let start = usize::try_from(offset).map_err(|_| "offset out of range".to_owned())?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| format!("{} bytes at {offset}: past the end", buf.len()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl Image for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.as_slice().read_at(offset, buf)
    }
}

/// Why a filesystem (or the partition table) was not mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("reading {len} bytes at {offset}: {reason}")]
    Read {
        offset: u64,
        len: usize,
        reason: String,
    },
    #[error("damaged: {0}")]
    Damaged(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("over the scan's limits: {0}")]
    Limit(String),
}

pub(crate) fn read_vec(img: &dyn Image, offset: u64, len: usize) -> Result<Vec<u8>, LayoutError> {
    let mut buf = vec![0; len];
    img.read_at(offset, &mut buf)
        .map_err(|reason| LayoutError::Read {
            offset,
            len,
            reason,
        })?;
    Ok(buf)
}

pub(crate) fn damaged<T>(what: impl Into<String>) -> Result<T, LayoutError> {
    Err(LayoutError::Damaged(what.into()))
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// How much a scan may take in (a filesystem is untrusted: a damaged one
/// must not make the origin read or hold without end).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Files (of every kind) per volume.
    pub max_files: usize,
    /// Extents per file.
    pub max_extents: usize,
    /// Directory bytes read per directory.
    pub max_dir_bytes: u64,
    /// Directory nesting.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_files: 1 << 20,
            max_extents: 1 << 16,
            max_dir_bytes: 64 << 20,
            max_depth: 64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
}

/// One file of a filesystem on the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    /// The filesystem's index in [`VolumeLayout::filesystems`].
    pub fs: usize,
    /// From the filesystem's root, `/`-separated, starting with `/`.
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Where its data lies on the volume, in file order: (byte offset,
    /// length). Holes and data kept inside metadata (inline data, fast
    /// symlinks) have none.
    pub extents: Vec<(u64, u64)>,
    /// Each extent's offset in the file, where the file has holes (the
    /// bytes between two extents read as zeroes); empty when the extents
    /// follow one another with none.
    pub offsets: Vec<u64>,
    /// Metadata read to open it: its inode (ext4), directory entry (FAT)
    /// or file record (NTFS), as a byte offset on the volume.
    pub meta: Option<u64>,
    /// A symlink's target.
    pub target: Option<String>,
}

/// One filesystem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filesystem {
    pub kind: &'static str,
    /// Byte range on the volume.
    pub start: u64,
    pub len: u64,
    /// Where its metadata a mount reads first lies (superblock, group
    /// descriptors, FAT; NTFS's boot sector and the head of its MFT), as
    /// byte ranges.
    pub meta: Vec<(u64, u64)>,
}

/// What [`scan`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeLayout {
    pub partitions: Vec<Partition>,
    pub filesystems: Vec<Filesystem>,
    pub files: Vec<File>,
    /// What could not be mapped, and why: each one a filesystem (or the
    /// partition table) left without file awareness.
    pub warnings: Vec<String>,
    /// Application groups: an executable or library (index into
    /// `files`) -> the files it loads directly (its ELF interpreter and
    /// `DT_NEEDED` libraries, resolved as the loader would).
    pub needs: std::collections::BTreeMap<usize, Vec<usize>>,
}

impl VolumeLayout {
    /// The file at `path` on filesystem `fs`, symlinks followed (at most
    /// 16), relative targets resolved against the link's directory.
    /// The files `file` loads, directly or through the files it loads
    /// (breadth first, each once, at most `max`), itself not included.
    pub fn group_of(&self, file: usize, max: usize) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        let mut next = 0;
        let mut todo = vec![file];
        while let Some(f) = todo.get(next).copied() {
            next += 1;
            for &d in self.needs.get(&f).into_iter().flatten() {
                if d != file && !out.contains(&d) && out.len() < max {
                    out.push(d);
                    todo.push(d);
                }
            }
        }
        out
    }

    /// The index in `files` of a file this layout returned.
    pub fn index_of(&self, file: &File) -> Option<usize> {
        self.files.iter().position(|f| std::ptr::eq(f, file))
    }

    pub fn resolve(&self, fs: usize, path: &str) -> Option<&File> {
        let mut path = path.to_owned();
        for _ in 0..16 {
            let mut walked = String::new();
            let mut redirected = None;
            let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
            for (i, part) in parts.iter().enumerate() {
                walked.push('/');
                walked.push_str(part);
                let f = self.find(fs, &walked)?;
                if f.kind == FileKind::Symlink {
                    let target = f.target.as_deref()?;
                    let parent = walked.rsplit_once('/').map_or("", |(p, _)| p);
                    let mut next = if target.starts_with('/') {
                        target.to_owned()
                    } else {
                        format!("{parent}/{target}")
                    };
                    for rest in &parts[i + 1..] {
                        next.push('/');
                        next.push_str(rest);
                    }
                    redirected = Some(normalize(&next));
                    break;
                }
            }
            match redirected {
                Some(next) => path = next,
                None if walked.is_empty() => return self.find(fs, "/"),
                None => return self.find(fs, &walked),
            }
        }
        None
    }

    fn find(&self, fs: usize, path: &str) -> Option<&File> {
        self.files.iter().find(|f| f.fs == fs && f.path == path)
    }

    /// `path` on filesystem `fs` compared without case (FAT's names).
    pub fn resolve_nocase(&self, fs: usize, path: &str) -> Option<&File> {
        self.files
            .iter()
            .find(|f| f.fs == fs && f.path.eq_ignore_ascii_case(path))
    }
}

/// `/a/./b/../c` as `/a/c`.
fn normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    format!("/{}", out.join("/"))
}

/// Maps the volume: its partitions (MBR or GPT; none means one
/// filesystem on the whole device), then each partition's filesystem
/// (ext4, FAT, NTFS). Never fails: what it cannot read becomes a warning.
pub fn scan(img: &dyn Image, limits: Limits) -> VolumeLayout {
    let mut layout = VolumeLayout::default();
    let parts = match partitions(img) {
        Ok(p) => p,
        Err(e) => {
            layout
                .warnings
                .push(format!("partition table: {e}; not file-aware"));
            return layout;
        }
    };
    layout.partitions.clone_from(&parts);
    for p in &parts {
        let fs = layout.filesystems.len();
        let found = if ext4::probe(img, p.start) {
            Some(("ext4", ext4::scan(img, p.start, p.len, fs, limits)))
        } else if fat::probe(img, p.start) {
            Some(("fat", fat::scan(img, p.start, p.len, fs, limits)))
        } else if ntfs::probe(img, p.start) {
            Some(("ntfs", ntfs::scan(img, p.start, p.len, fs, limits)))
        } else {
            None
        };
        match found {
            Some((kind, Ok((meta, files)))) => {
                if layout.files.len() + files.len() > limits.max_files {
                    layout.warnings.push(format!(
                        "{}: more than {} files on the volume; the rest is not file-aware",
                        p.describe(),
                        limits.max_files
                    ));
                    break;
                }
                layout.filesystems.push(Filesystem {
                    kind,
                    start: p.start,
                    len: p.len,
                    meta,
                });
                layout.files.extend(files);
            }
            Some((kind, Err(e))) => layout
                .warnings
                .push(format!("{} ({kind}): {e}; not file-aware", p.describe())),
            None => layout.warnings.push(format!(
                "{}: no filesystem this origin reads (ext4, FAT, NTFS); not file-aware",
                p.describe()
            )),
        }
    }
    layout.needs = elf::dependencies(img, &layout);
    layout
}

impl File {
    /// Where each extent starts in the file.
    pub fn extent_offsets(&self) -> Vec<u64> {
        if self.offsets.len() == self.extents.len() {
            return self.offsets.clone();
        }
        let mut at = 0;
        self.extents
            .iter()
            .map(|e| {
                let o = at;
                at += e.1;
                o
            })
            .collect()
    }

    /// `len` bytes at `offset` in the file, holes as zeroes; `None` past
    /// its end or when a read fails.
    pub fn read(&self, img: &dyn Image, offset: u64, len: u64) -> Option<Vec<u8>> {
        let end = offset.checked_add(len)?;
        if end > self.size {
            return None;
        }
        let mut out = vec![0u8; usize::try_from(len).ok()?];
        for (&(disk, n), at) in self.extents.iter().zip(self.extent_offsets()) {
            let (from, to) = (offset.max(at), end.min(at + n));
            if from < to {
                let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
                img.read_at(disk + (from - at), dst).ok()?;
            }
        }
        Some(out)
    }
}

/// An ext4 occupying the whole image (a partition read on its own;
/// fuzzing): its metadata ranges and files.
pub fn scan_ext4(img: &dyn Image, limits: Limits) -> Result<Mapped, LayoutError> {
    ext4::scan(img, 0, img.size(), 0, limits)
}

/// A FAT occupying the whole image; see [`scan_ext4`].
pub fn scan_fat(img: &dyn Image, limits: Limits) -> Result<Mapped, LayoutError> {
    fat::scan(img, 0, img.size(), 0, limits)
}

/// An NTFS occupying the whole image; see [`scan_ext4`].
pub fn scan_ntfs(img: &dyn Image, limits: Limits) -> Result<Mapped, LayoutError> {
    ntfs::scan(img, 0, img.size(), 0, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize() {
        assert_eq!(normalize("/a/./b/../c"), "/a/c");
        assert_eq!(normalize("/../x"), "/x");
        assert_eq!(normalize("usr/lib"), "/usr/lib");
    }

    #[test]
    fn symlinks_resolve_through_directories_and_give_up_on_loops() {
        let file = |path: &str, kind, target: Option<&str>| File {
            fs: 0,
            path: path.into(),
            kind,
            size: 1,
            extents: vec![],
            offsets: vec![],
            meta: None,
            target: target.map(Into::into),
        };
        let layout = VolumeLayout {
            files: vec![
                file("/usr", FileKind::Directory, None),
                file("/usr/lib", FileKind::Directory, None),
                file("/usr/lib/systemd", FileKind::Directory, None),
                file("/usr/lib/systemd/systemd", FileKind::Regular, None),
                file("/lib", FileKind::Symlink, Some("usr/lib")),
                file("/sbin", FileKind::Directory, None),
                file(
                    "/sbin/init",
                    FileKind::Symlink,
                    Some("/lib/systemd/systemd"),
                ),
                file("/loop", FileKind::Symlink, Some("/loop")),
            ],
            ..VolumeLayout::default()
        };
        assert_eq!(
            layout.resolve(0, "/sbin/init").map(|f| f.path.as_str()),
            Some("/usr/lib/systemd/systemd")
        );
        assert!(layout.resolve(0, "/loop").is_none());
        assert!(layout.resolve(0, "/nothing").is_none());
        assert!(layout.resolve(1, "/usr").is_none(), "another filesystem");
    }
}
