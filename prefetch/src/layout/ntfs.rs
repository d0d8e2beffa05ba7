//! NTFS (Windows system and data volumes): the boot sector checked here,
//! then the `ntfs` crate reads the MFT's file records, walks directories
//! through their `$I30` indexes and gives each file's unnamed `$DATA`
//! stream as data runs, which become the file's extents.
//!
//! The crate reads only through [`Volume`], a `Read + Seek` over the
//! partition, and it trusts the image more than this module may: a
//! damaged record can make it index out of bounds, allocate what a
//! size field says or follow an index node that points at itself. So:
//! sizes it would allocate by (file and index records) are checked here
//! first; every step of the walk gets a read allowance, so a loop inside
//! the crate ends in an error once it has read that much; and the scan
//! runs under `catch_unwind` (see [`scan`]).
//!
//! Reparse points (symlinks, junctions, deduplicated files) are mapped as
//! the plain file or directory their record is: their targets are not
//! read, so [`super::VolumeLayout::resolve`] does not follow them. System
//! files (records 0 to 15: `$MFT`, `$LogFile`, `$Bitmap`, `$Extend`...)
//! are not listed as files; the head of the MFT is metadata.

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};

use ntfs::attribute_value::{NtfsAttributeValue, NtfsDataRuns};
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsAttributeList, NtfsFileNamespace, NtfsIndexRoot};
use ntfs::{
    Ntfs, NtfsAttribute, NtfsAttributeItem, NtfsAttributeType, NtfsError, NtfsFile, NtfsFileFlags,
    NtfsIndex,
};

use super::{damaged, le16, le64, read_vec, File, FileKind, Image, LayoutError, Limits, Mapped};

const OEM_ID: &[u8; 8] = b"NTFS    ";
const ROOT_RECORD: u64 = 5;
/// Records below this are the system files and reserved ones.
const FIRST_USER_RECORD: u64 = 16;
/// The MFT's head kept as metadata: a mount reads the system files'
/// records first, and the records of a freshly installed volume's files
/// follow them.
const MFT_HEAD_BYTES: u64 = 4 << 20;
/// Reads served from cached windows of this size: file records of one
/// directory are mostly neighbours, and record 0 (the MFT's own) is read
/// again for every record the crate opens.
const WINDOW: u64 = 64 << 10;
const WINDOWS: usize = 4;

pub(super) fn probe(img: &dyn Image, start: u64) -> bool {
    read_vec(img, start, 512).is_ok_and(|b| &b[3..11] == OEM_ID && b[510..512] == [0x55, 0xaa])
}

/// What the boot sector says, checked before the crate sees it.
struct Geometry {
    sector: u64,
    /// The filesystem's bytes (at most the partition's).
    size: u64,
}

impl Geometry {
    fn read(img: &dyn Image, start: u64, len: u64) -> Result<Geometry, LayoutError> {
        let b = read_vec(img, start, 512)?;
        if &b[3..11] != OEM_ID || b[510..512] != [0x55, 0xaa] {
            return damaged("no NTFS boot sector");
        }
        let sector = u64::from(le16(&b, 11));
        if !(512..=4096).contains(&sector) || !sector.is_power_of_two() {
            return damaged(format!("NTFS boot sector: sectors of {sector} bytes"));
        }
        // 1 to 128 sectors, or above 128 a negated power of two (clusters
        // over 64 KiB).
        let sectors_per_cluster = match b[13] {
            n @ 1..=128 if n.is_power_of_two() => u64::from(n),
            n @ 244..=255 => 1 << (256 - u64::from(n)),
            n => return damaged(format!("NTFS boot sector: {n} as sectors per cluster")),
        };
        let cluster = sectors_per_cluster * sector;
        let size = le64(&b, 0x28).saturating_mul(sector);
        if cluster > 2 << 20 || size == 0 || size > len {
            return damaged(format!(
                "NTFS boot sector: {size} bytes in clusters of {cluster} in a partition of {len}"
            ));
        }
        // The crate allocates a record of this size for every file it
        // opens: only the sizes NTFS uses.
        let record = match b[0x40].cast_signed() {
            n @ 1..=127 => cluster * u64::from(n.unsigned_abs()),
            n @ -12..=-10 => 1 << n.unsigned_abs(),
            _ => 0,
        };
        if !(1024..=4096).contains(&record) {
            return damaged(format!(
                "NTFS boot sector: file records of {record} bytes (0x{:02x})",
                b[0x40]
            ));
        }
        let mft = le64(&b, 0x30).saturating_mul(cluster);
        if mft == 0 || mft >= size {
            return damaged(format!(
                "NTFS boot sector: the MFT at {mft}, outside its {size} bytes"
            ));
        }
        Ok(Geometry { sector, size })
    }
}

/// The partition as the crate reads it: bounded to the filesystem, with
/// an allowance of bytes per step of the walk.
struct Volume<'a> {
    img: &'a dyn Image,
    start: u64,
    len: u64,
    at: u64,
    allowance: u64,
    /// Why the last read failed, when it was ours (the crate only sees an
    /// `io::Error`).
    failure: Option<LayoutError>,
    /// Most recently used first: (offset in the filesystem, bytes).
    windows: Vec<(u64, Vec<u8>)>,
}

impl<'a> Volume<'a> {
    fn new(img: &'a dyn Image, start: u64, len: u64) -> Self {
        Volume {
            img,
            start,
            len,
            at: 0,
            allowance: 0,
            failure: None,
            windows: Vec::new(),
        }
    }

    /// Starts a step that may read `bytes`.
    fn allow(&mut self, bytes: u64) {
        self.allowance = bytes;
        self.failure = None;
    }

    /// The crate's error as ours: the read failure behind it if there
    /// was one.
    fn error(&mut self, e: &NtfsError) -> LayoutError {
        self.failure
            .take()
            .unwrap_or_else(|| LayoutError::Damaged(e.to_string()))
    }

    fn fail(&mut self, e: LayoutError) -> io::Error {
        let err = io::Error::other(e.to_string());
        self.failure = Some(e);
        err
    }

    fn window(&mut self, base: u64) -> Result<&[u8], LayoutError> {
        if let Some(i) = self.windows.iter().position(|w| w.0 == base) {
            let w = self.windows.remove(i);
            self.windows.insert(0, w);
        } else {
            let n = WINDOW.min(self.len - base) as usize;
            let data = read_vec(self.img, self.start + base, n)?;
            self.windows.truncate(WINDOWS - 1);
            self.windows.insert(0, (base, data));
        }
        Ok(&self.windows[0].1)
    }
}

impl Read for Volume<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min((self.len - self.at).min(WINDOW) as usize);
        if n as u64 > self.allowance {
            return Err(self.fail(LayoutError::Limit(
                "an NTFS structure read past its allowance (a loop in a damaged index or record?)"
                    .into(),
            )));
        }
        self.allowance -= n as u64;
        let base = self.at - self.at % WINDOW;
        let from = (self.at - base) as usize;
        // Within one window (a read crossing into the next gets the rest
        // on its next call, as `Read` allows).
        let n = n.min(WINDOW as usize - from);
        match self.window(base) {
            Ok(w) => {
                let Some(src) = w.get(from..from + n) else {
                    return Ok(0);
                };
                buf[..n].copy_from_slice(src);
            }
            Err(e) => return Err(self.fail(e)),
        }
        self.at += n as u64;
        Ok(n)
    }
}

impl Seek for Volume<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.at.checked_add_signed(d),
        };
        self.at =
            to.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.at)
    }
}

/// The filesystem's metadata ranges and its files.
///
/// The `ntfs` crate indexes its records' bytes by offsets read from them
/// and panics on some damaged ones: an index entry shorter than its
/// header, an attribute cut off by its record's end (`tests/layout.rs`
/// makes both). Checking every structure before the crate reads it would
/// be writing the parser again, so a panic inside the scan is caught here
/// and becomes this filesystem's warning: the origin must not crash, nor
/// lose the other filesystems' files, on one damaged image. Nothing the
/// closure built survives a panic and the image is only read, so no
/// broken state is observed. (This needs unwinding: a `panic = "abort"`
/// build would lose it; the panic hook still prints the panic.)
pub(super) fn scan(
    img: &dyn Image,
    start: u64,
    len: u64,
    fs_index: usize,
    limits: Limits,
) -> Result<Mapped, LayoutError> {
    let geometry = Geometry::read(img, start, len)?;
    catch_unwind(AssertUnwindSafe(|| {
        let mut vol = Volume::new(img, start, geometry.size);
        walk(&mut vol, &geometry, fs_index, limits)
    }))
    .unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        damaged(format!(
            "NTFS structures the reader could not parse ({why})"
        ))
    })
}

fn walk(
    vol: &mut Volume<'_>,
    geometry: &Geometry,
    fs_index: usize,
    limits: Limits,
) -> Result<Mapped, LayoutError> {
    vol.allow(limits.max_dir_bytes);
    let ntfs = Ntfs::new(vol).map_err(|e| vol.error(&e))?;
    let mut w = Walker {
        ntfs: &ntfs,
        vol,
        fs_index,
        limits,
        files: Vec::new(),
    };

    let mft = w.open(0)?;
    let mft_extents = w.stream(&mft, NtfsAttributeType::Data, "")?.extents;
    let mut meta = vec![(w.vol.start, geometry.sector)];
    let mut head = 0;
    for (at, n) in mft_extents {
        if head >= MFT_HEAD_BYTES {
            break;
        }
        let n = n.min(MFT_HEAD_BYTES - head);
        meta.push((at, n));
        head += n;
    }

    let root = w.open(ROOT_RECORD)?;
    if !root.is_directory() {
        return damaged("NTFS: the root record is not a directory");
    }
    w.push_file(&root, String::from("/"))?;
    let mut seen = HashSet::from([ROOT_RECORD]);
    let mut dirs = vec![(ROOT_RECORD, String::new(), 0usize)];
    while let Some((record, path, depth)) = dirs.pop() {
        let dir = w.open(record)?;
        for entry in w.list(&dir)? {
            if entry.record < FIRST_USER_RECORD || entry.record == record {
                continue;
            }
            let file = w.open(entry.record)?;
            // A stale entry (its record freed or reused since) names no file.
            if !file.flags().contains(NtfsFileFlags::IN_USE)
                || (entry.sequence != 0 && entry.sequence != file.sequence_number())
            {
                continue;
            }
            let full = format!("{path}/{}", entry.name);
            w.push_file(&file, full.clone())?;
            if file.is_directory() && seen.insert(entry.record) {
                if depth + 1 > limits.max_depth {
                    return Err(LayoutError::Limit(format!(
                        "directories nested deeper than {}",
                        limits.max_depth
                    )));
                }
                dirs.push((entry.record, full, depth + 1));
            }
        }
    }
    Ok((meta, w.files))
}

struct Entry {
    name: String,
    record: u64,
    sequence: u16,
}

struct Walker<'n, 'v, 'a> {
    ntfs: &'n Ntfs,
    vol: &'v mut Volume<'a>,
    fs_index: usize,
    limits: Limits,
    files: Vec<File>,
}

impl<'n> Walker<'n, '_, '_> {
    fn open(&mut self, record: u64) -> Result<NtfsFile<'n>, LayoutError> {
        self.vol.allow(self.limits.max_dir_bytes);
        self.ntfs
            .file(self.vol, record)
            .map_err(|e| self.vol.error(&e))
    }

    /// Adds `file` at `path`: a directory with its index's nodes, a file
    /// with its data.
    fn push_file(&mut self, file: &NtfsFile<'n>, path: String) -> Result<(), LayoutError> {
        if self.files.len() >= self.limits.max_files {
            return Err(LayoutError::Limit(format!(
                "more than {} files",
                self.limits.max_files
            )));
        }
        let (kind, stream) = if file.is_directory() {
            (
                FileKind::Directory,
                self.stream(file, NtfsAttributeType::IndexAllocation, "$I30")?,
            )
        } else {
            (
                FileKind::Regular,
                self.stream(file, NtfsAttributeType::Data, "")?,
            )
        };
        let meta = file.position().value().map(|p| self.vol.start + p.get());
        self.files.push(File {
            fs: self.fs_index,
            path,
            kind,
            size: stream.size,
            extents: stream.extents,
            offsets: stream.offsets,
            meta,
            target: None,
        });
        Ok(())
    }

    /// The entries of a directory's `$I30` index: one per name, DOS 8.3
    /// aliases left out (a Win32 name of the same file comes with each).
    fn list(&mut self, dir: &NtfsFile<'n>) -> Result<Vec<Entry>, LayoutError> {
        let index = self.index(dir)?;
        self.vol.allow(self.limits.max_dir_bytes);
        let mut entries = index.entries();
        let mut out = Vec::new();
        while let Some(entry) = entries.next(self.vol) {
            let entry = entry.map_err(|e| self.vol.error(&e))?;
            // Only the last entry of a node has no key, and the iterator
            // does not return that one: one without is damaged.
            let Some(key) = entry.key() else {
                return damaged("NTFS: a directory entry without a name");
            };
            let key = key.map_err(|e| self.vol.error(&e))?;
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let name = key.name().to_string_lossy();
            if name.is_empty() || name == "." || name == ".." || name.contains('/') {
                continue;
            }
            if out.len() >= self.limits.max_files {
                return Err(LayoutError::Limit(format!(
                    "a directory of more than {} names",
                    self.limits.max_files
                )));
            }
            let reference = entry.file_reference();
            out.push(Entry {
                name,
                record: reference.file_record_number(),
                sequence: reference.sequence_number(),
            });
        }
        Ok(out)
    }

    /// `dir`'s `$I30` index, as `NtfsFile::directory_index` finds it, with
    /// its node size checked first (the crate allocates a node of the size
    /// the index root gives for every node it reads). A directory whose
    /// index allocation an attribute list splits is read as the crate
    /// reads it (see [`Walker::stream`]): a wrong piece first makes its
    /// nodes' numbers mismatch, an error.
    fn index<'f>(
        &mut self,
        dir: &'f NtfsFile<'n>,
    ) -> Result<NtfsIndex<'n, 'f, NtfsFileNameIndex>, LayoutError> {
        self.vol.allow(self.limits.max_dir_bytes);
        let root = self.find(dir, NtfsAttributeType::IndexRoot, "$I30")?;
        let Some(root) = root else {
            return damaged("NTFS: a directory without an index root");
        };
        let node = {
            let attribute = root.to_attribute().map_err(|e| self.vol.error(&e))?;
            let value = attribute
                .resident_structured_value::<NtfsIndexRoot<'_>>()
                .map_err(|e| self.vol.error(&e))?;
            value.index_record_size()
        };
        if !(512..=65536).contains(&node) || !node.is_power_of_two() {
            return damaged(format!("NTFS: index nodes of {node} bytes"));
        }
        let allocation = self.find(dir, NtfsAttributeType::IndexAllocation, "$I30")?;
        NtfsIndex::new(root, allocation).map_err(|e| self.vol.error(&e))
    }

    /// The first attribute of `file` of type `ty` named `name` (through
    /// its attribute list, if it has one).
    fn find<'f>(
        &mut self,
        file: &'f NtfsFile<'n>,
        ty: NtfsAttributeType,
        name: &str,
    ) -> Result<Option<NtfsAttributeItem<'n, 'f>>, LayoutError> {
        let mut attributes = file.attributes();
        while let Some(item) = attributes.next(self.vol) {
            let item = item.map_err(|e| self.vol.error(&e))?;
            let matches = {
                let attribute = item.to_attribute().map_err(|e| self.vol.error(&e))?;
                // Types this crate does not know are nothing looked for.
                attribute.ty().is_ok_and(|t| t == ty)
                    && attribute.name().map_err(|e| self.vol.error(&e))?.eq(&name)
            };
            if matches {
                return Ok(Some(item));
            }
        }
        Ok(None)
    }

    /// A stream of `file`: no extents for a missing one (size 0) or a
    /// resident one (its bytes are in the file record).
    ///
    /// Found here rather than through `NtfsFile::attributes`, which,
    /// for a stream split over records by an attribute list, returns a
    /// later piece first (the first one, in the base record, comes after
    /// the list, as an attribute of its own).
    fn stream(
        &mut self,
        file: &NtfsFile<'n>,
        ty: NtfsAttributeType,
        name: &str,
    ) -> Result<Stream, LayoutError> {
        self.vol.allow(self.limits.max_dir_bytes);
        let mut direct = None;
        // Up to the first error: the raw iterator returns that one again
        // and again.
        for attribute in file.attributes_raw() {
            let attribute = attribute.map_err(|e| self.vol.error(&e))?;
            let t = attribute.ty().ok();
            if t == Some(NtfsAttributeType::AttributeList) {
                return self.listed_stream(&attribute, ty, name);
            }
            if direct.is_none()
                && t == Some(ty)
                && attribute.name().map_err(|e| self.vol.error(&e))?.eq(&name)
            {
                direct = Some(attribute);
            }
        }
        let Some(attribute) = direct else {
            return Ok(Stream::default());
        };
        let mut runs = self.runs(attribute.value_length());
        if !attribute.is_resident() {
            self.add_piece(&attribute, 0, &mut runs)?;
        }
        Ok(runs.finish())
    }

    /// A stream of a file with an attribute list, which names each of the
    /// stream's pieces (one attribute each, in this record or another)
    /// with the cluster it starts at.
    fn listed_stream(
        &mut self,
        list: &NtfsAttribute<'n, '_>,
        ty: NtfsAttributeType,
        name: &str,
    ) -> Result<Stream, LayoutError> {
        let list = list
            .structured_value::<_, NtfsAttributeList<'_, '_>>(self.vol)
            .map_err(|e| self.vol.error(&e))?;
        let mut entries = list.entries();
        let mut pieces = Vec::new();
        while let Some(entry) = entries.next(self.vol) {
            let entry = entry.map_err(|e| self.vol.error(&e))?;
            // A file has one stream of each type and name: every entry of
            // this one's is a piece of it.
            if entry.ty().ok() == Some(ty) && entry.name().eq(&name) {
                if pieces.len() >= self.limits.max_extents {
                    return Err(LayoutError::Limit("a stream of too many pieces".into()));
                }
                pieces.push(entry);
            }
        }
        let mut runs: Option<Runs> = None;
        for entry in &pieces {
            let record = entry
                .to_file(self.ntfs, self.vol)
                .map_err(|e| self.vol.error(&e))?;
            let piece = entry
                .to_attribute(&record)
                .map_err(|e| self.vol.error(&e))?;
            let from = entry
                .lowest_vcn()
                .offset(self.ntfs)
                .ok()
                .and_then(|o| u64::try_from(o).ok());
            let Some(from) = from else {
                return damaged("NTFS: a stream's piece at a negative cluster");
            };
            let runs = match runs.as_mut() {
                Some(runs) if !piece.is_resident() => runs,
                // The first piece (listed first, from cluster 0) gives the
                // stream's size; a resident stream is that one piece.
                None if from == 0 => {
                    if piece.is_resident() {
                        if pieces.len() > 1 {
                            return damaged("NTFS: a resident stream in pieces");
                        }
                        return Ok(self.runs(piece.value_length()).finish());
                    }
                    runs.insert(self.runs(piece.value_length()))
                }
                _ => return damaged("NTFS: a stream's pieces out of order or resident"),
            };
            self.add_piece(&piece, from, runs)?;
        }
        Ok(runs.map(Runs::finish).unwrap_or_default())
    }

    fn runs(&self, size: u64) -> Runs {
        Runs {
            start: self.vol.start,
            len: self.vol.len,
            size,
            at: 0,
            extents: Vec::new(),
            offsets: Vec::new(),
            max_extents: self.limits.max_extents,
        }
    }

    /// Adds the runs of `piece`, a non-resident attribute, starting `from`
    /// bytes into the stream.
    ///
    /// Compressed and encrypted streams are mapped too: their runs are
    /// the clusters a read of the file touches, though not its bytes as
    /// read back through them.
    fn add_piece(
        &mut self,
        piece: &NtfsAttribute<'n, '_>,
        from: u64,
        runs: &mut Runs,
    ) -> Result<(), LayoutError> {
        match piece.value(self.vol).map_err(|e| self.vol.error(&e))? {
            NtfsAttributeValue::NonResident(value) => runs.add(from, value.data_runs(), self.vol),
            _ => damaged("NTFS: a resident piece of a stream split over records"),
        }
    }
}

/// A stream's size, extents on the volume and, when it has holes, where
/// each extent starts in it.
#[derive(Default)]
struct Stream {
    size: u64,
    extents: Vec<(u64, u64)>,
    offsets: Vec<u64>,
}

/// A stream's data runs made extents, clipped to its size.
struct Runs {
    start: u64,
    len: u64,
    size: u64,
    /// Where the next run starts in the stream.
    at: u64,
    extents: Vec<(u64, u64)>,
    offsets: Vec<u64>,
    max_extents: usize,
}

impl Runs {
    /// The runs of a piece of the stream starting `from` bytes into it.
    fn add(
        &mut self,
        from: u64,
        runs: NtfsDataRuns<'_, '_>,
        vol: &mut Volume<'_>,
    ) -> Result<(), LayoutError> {
        if from < self.at {
            return damaged(format!(
                "NTFS: a stream's piece at {from} overlaps the one before (to {})",
                self.at
            ));
        }
        self.at = from;
        for run in runs {
            if self.at >= self.size {
                break;
            }
            let run = run.map_err(|e| vol.error(&e))?;
            let n = run.allocated_size().min(self.size - self.at);
            // None: a sparse run, a hole.
            if let Some(p) = run.data_position().value() {
                let p = p.get();
                if p.checked_add(n).is_none_or(|end| end > self.len) {
                    return damaged(format!(
                        "NTFS: a run of {n} bytes at {p}, past the filesystem's {} bytes",
                        self.len
                    ));
                }
                let disk = self.start + p;
                match (self.extents.last_mut(), self.offsets.last()) {
                    (Some(l), Some(&o)) if l.0 + l.1 == disk && o + l.1 == self.at => l.1 += n,
                    _ => {
                        if self.extents.len() >= self.max_extents {
                            return Err(LayoutError::Limit("a file of too many extents".into()));
                        }
                        self.extents.push((disk, n));
                        self.offsets.push(self.at);
                    }
                }
            }
            self.at += n;
        }
        Ok(())
    }

    /// The stream, with the extents' offsets in it only when it has
    /// holes.
    fn finish(self) -> Stream {
        let mut end = 0;
        let contiguous = self.extents.iter().zip(&self.offsets).all(|(e, &o)| {
            let next = o == end;
            end = o + e.1;
            next
        });
        Stream {
            size: self.size,
            extents: self.extents,
            offsets: if contiguous { Vec::new() } else { self.offsets },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{scan, scan_ntfs};
    use super::*;

    /// A plausible boot sector of a `mib` MiB NTFS: 512-byte sectors,
    /// 4 KiB clusters, the MFT at cluster 4, records of 1 KiB.
    fn boot_sector(mib: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..3].copy_from_slice(&[0xeb, 0x52, 0x90]);
        b[3..11].copy_from_slice(OEM_ID);
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = 8;
        b[0x28..0x30].copy_from_slice(&((mib << 11) - 1).to_le_bytes());
        b[0x30..0x38].copy_from_slice(&4u64.to_le_bytes());
        b[0x38..0x40].copy_from_slice(&2u64.to_le_bytes());
        b[0x40] = 0xf6; // 2^10
        b[0x44] = 1;
        b[510..512].copy_from_slice(&[0x55, 0xaa]);
        b
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect()
    }

    fn quiet_limits() -> Limits {
        Limits {
            max_files: 1000,
            max_extents: 1000,
            max_dir_bytes: 1 << 20,
            max_depth: 8,
        }
    }

    #[test]
    fn a_boot_sector_with_garbage_after_it_is_a_warning() {
        for seed in 0..32 {
            let mut img = noise(1 << 20, seed);
            img[..512].copy_from_slice(&boot_sector(1));
            // The MFT's first record signed, its fields garbage: further
            // into the crate than a bad signature gets.
            if seed % 2 == 1 {
                img[4 << 12..(4 << 12) + 4].copy_from_slice(b"FILE");
            }
            assert!(matches!(
                scan_ntfs(&img.as_slice(), quiet_limits()),
                Err(LayoutError::Damaged(_) | LayoutError::Limit(_))
            ));
            let layout = scan(&img.as_slice(), quiet_limits());
            assert!(layout.filesystems.is_empty());
            assert!(
                layout
                    .warnings
                    .iter()
                    .any(|w| w.contains("(ntfs)") && w.contains("not file-aware")),
                "{:?}",
                layout.warnings
            );
        }
    }

    #[test]
    fn boot_sectors_the_crate_would_misread_are_refused_first() {
        let img_with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut img = vec![0u8; 1 << 20];
            let mut b = boot_sector(1);
            edit(&mut b);
            img[..512].copy_from_slice(&b);
            scan_ntfs(&img.as_slice(), quiet_limits())
                .unwrap_err()
                .to_string()
        };
        // Records of 127 clusters (the crate would allocate 508 KiB per
        // record it opens).
        assert!(img_with(&|b| b[0x40] = 0x7f).contains("file records"));
        assert!(
            img_with(&|b| b[0x28..0x30].copy_from_slice(&(4u64 << 11).to_le_bytes()))
                .contains("in a partition of")
        );
        assert!(
            img_with(&|b| b[0x30..0x38].copy_from_slice(&300u64.to_le_bytes()))
                .contains("the MFT at")
        );
        assert!(img_with(&|b| b[13] = 3).contains("sectors per cluster"));
        assert!(
            img_with(&|b| b[11..13].copy_from_slice(&256u16.to_le_bytes()))
                .contains("sectors of 256")
        );
    }

    #[test]
    fn offsets_are_kept_only_for_a_stream_with_holes() {
        let finish = |extents: Vec<(u64, u64)>, offsets: Vec<u64>| {
            Runs {
                start: 0,
                len: 1 << 30,
                size: 1 << 20,
                at: 0,
                extents,
                offsets,
                max_extents: 16,
            }
            .finish()
        };
        // Two fragments, back to back in the file: no offsets needed.
        let stream = finish(vec![(65536, 4096), (8192, 4096)], vec![0, 4096]);
        assert!(stream.offsets.is_empty());
        // A hole of one cluster between them, or before the first.
        let stream = finish(vec![(65536, 4096), (8192, 4096)], vec![0, 8192]);
        assert_eq!(stream.offsets, [0, 8192]);
        let stream = finish(vec![(65536, 4096)], vec![4096]);
        assert_eq!(stream.offsets, [4096]);
    }
}
