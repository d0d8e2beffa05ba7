//! Local-only overlay: byte ranges of a device (swap, scratch space, or the
//! whole disk in isolation mode) whose writes stay on this machine and are
//! never passed to the inner device.
//!
//! ```text
//!   write/trim/zero ──> split at range boundaries ──┬─ outside ─> inner device
//!                                                   └─ inside ──> overlay file
//!   read ──> inside a range: overlay where it holds data, inner device elsewhere
//!            outside:        inner device
//! ```
//!
//! The overlay is a sparse file as large as the device, and its own
//! allocation (SEEK_DATA / SEEK_HOLE) is the map of what was written
//! locally: a hole means "never written here, read the inner device". Three
//! rules keep that map truthful:
//!
//! - **Whole blocks.** The filesystem allocates whole blocks, and a freshly
//!   allocated block reads as zeroes where it was not written. So a write
//!   that covers part of an overlay block that is (partly) a hole first
//!   composes the whole block: the rest of it from the overlay where it has
//!   data, from the inner device where it does not (inside the ranges), zero
//!   elsewhere; then writes it in one go. The block size is measured when
//!   the overlay is created (see `probe_block`) and kept in the metadata.
//!   Writes take a lock on the blocks they touch, so two partial writes to
//!   one block (or a partial and a whole one) cannot interleave their
//!   read-modify-write.
//! - **Zeroes are data.** Trim and write-zeroes inside a range write real
//!   zero bytes. Punching a hole would resurrect the inner device's data,
//!   and `FALLOC_FL_ZERO_RANGE` is no better: ext4 keeps such blocks as
//!   unwritten extents, which SEEK_DATA reports as holes.
//! - **Durability.** Flush `fdatasync`s the overlay (which covers the
//!   allocation metadata needed to read the data back) and flushes the inner
//!   device; FUA writes use `RWF_DSYNC`. A block a crash leaves half
//!   written is still correct: each filesystem block of it is either
//!   allocated with its composed content or a hole that reads through.
//!
//! On-disk format, next to the image `NAME.img`:
//!
//! - `NAME.img`: the sparse overlay, exactly the device's size; byte `i`
//!   is the device's byte `i` wherever the file has data and `i` lies in a
//!   range (bytes of allocated blocks outside the ranges are never read).
//! - `NAME.meta`: UTF-8 text, written before the image exists and replaced
//!   atomically:
//!
//!   ```text
//!   ferry local-only overlay v1
//!   size 68719476736
//!   block 4096
//!   range 0 1073741824
//!   range 4294967296 4831838208
//!   tag vm@9f3c...
//!   ```
//!
//!   `size` is the device size, `block` the composition block size, each
//!   `range START END` a half-open byte range (sorted, disjoint, not
//!   touching), and the optional `tag` names what the overlay belongs to
//!   (the edge uses the volume and its epoch, so a re-created volume never
//!   meets an old overlay). Reopening with another size, other ranges or
//!   another tag is refused:
//!   shrinking a range would hide local data and let stale origin data
//!   show through; growing one would hide the origin's data behind holes
//!   that are not really "unwritten".

use std::fmt::{self, Write as _};
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::sync::Notify;

use crate::file::seek_whence;
use crate::{
    check_range, BlockDevice, BlockError, Capabilities, DeviceInfo, Extent, ExtentKind, FileDevice,
    Op, OpenOptions, Result, WriteFlags, ZeroFlags,
};

/// First line of the metadata file.
const META_MAGIC: &str = "ferry local-only overlay v1";

/// Zeroes are written in pieces of this size (a multiple of any block size
/// we accept), so a huge trim does not need a huge buffer.
const ZERO_CHUNK: u64 = 1024 * 1024;

/// Largest block size accepted from the probe (a filesystem that allocates
/// in bigger units would make every small write a large read-modify-write).
const MAX_BLOCK: u64 = ZERO_CHUNK;

/// Length of the probe file: larger than any block size we accept, so the
/// probe can tell an allocated block from a filesystem without holes.
const PROBE_LEN: u64 = 4 * MAX_BLOCK;

/// Extents returned by one query at most.
const MAX_EXTENTS: usize = 1024;

/// Which bytes of the device are local-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalRanges {
    /// The whole device (isolation mode).
    Everything,
    /// These byte ranges (any order; overlapping or touching ranges merge).
    Ranges(Vec<Range<u64>>),
}

impl LocalRanges {
    /// Sorted, disjoint, non-touching, non-empty ranges within `size`.
    pub fn normalize(&self, size: u64) -> io::Result<Vec<Range<u64>>> {
        let mut v = match self {
            LocalRanges::Everything => {
                let all = Range {
                    start: 0,
                    end: size,
                };
                return Ok(if size == 0 { vec![] } else { vec![all] });
            }
            LocalRanges::Ranges(v) => v.clone(),
        };
        for r in &v {
            if r.start > r.end || r.end > size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "local-only range {}..{} does not fit in the {size}-byte device",
                        r.start, r.end
                    ),
                ));
            }
        }
        v.retain(|r| !r.is_empty());
        v.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        Ok(out)
    }
}

/// The metadata kept next to the overlay image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    size: u64,
    block: u64,
    ranges: Vec<Range<u64>>,
    tag: String,
}

impl Meta {
    fn encode(&self) -> String {
        let mut s = format!("{META_MAGIC}\nsize {}\nblock {}\n", self.size, self.block);
        for r in &self.ranges {
            let _ = writeln!(s, "range {} {}", r.start, r.end);
        }
        if !self.tag.is_empty() {
            let _ = writeln!(s, "tag {}", self.tag);
        }
        s
    }

    fn decode(text: &str) -> std::result::Result<Meta, String> {
        let mut lines = text.lines();
        if lines.next() != Some(META_MAGIC) {
            return Err(format!("does not start with {META_MAGIC:?}"));
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| format!("bad number {s:?}"));
        let (mut size, mut block, mut ranges) = (None, None, Vec::new());
        let mut tag = String::new();
        for line in lines {
            if let Some(t) = line.strip_prefix("tag ") {
                t.clone_into(&mut tag);
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                ["size", n] => size = Some(num(n)?),
                ["block", n] => block = Some(num(n)?),
                ["range", a, b] => ranges.push(num(a)?..num(b)?),
                _ => return Err(format!("unexpected line {line:?}")),
            }
        }
        let size = size.ok_or("no size line")?;
        let block = block.ok_or("no block line")?;
        if !block.is_power_of_two() || block > MAX_BLOCK {
            return Err(format!("bad block size {block}"));
        }
        Ok(Meta {
            size,
            block,
            ranges,
            tag,
        })
    }
}

fn describe(ranges: &[Range<u64>]) -> String {
    if ranges.is_empty() {
        return "none".to_owned();
    }
    ranges
        .iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A lock over byte ranges: holders never overlap.
#[derive(Debug, Default)]
struct RangeLock {
    held: Mutex<Vec<Range<u64>>>,
    released: Notify,
}

struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: Range<u64>,
}

impl RangeLock {
    async fn lock(&self, range: Range<u64>) -> RangeGuard<'_> {
        loop {
            let released = {
                let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                if !held
                    .iter()
                    .any(|h| h.start < range.end && range.start < h.end)
                {
                    held.push(range.clone());
                    return RangeGuard { lock: self, range };
                }
                // Created under the mutex, so a release after it is seen
                // even before the future is first polled.
                self.released.notified()
            };
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        {
            let mut held = self
                .lock
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Held ranges are disjoint, so the range names its entry.
            if let Some(i) = held.iter().position(|h| *h == self.range) {
                held.swap_remove(i);
            }
        }
        self.lock.released.notify_waiters();
    }
}

/// Where a piece of a read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Overlay,
    Inner,
    /// Outside the ranges, when composing an overlay block: never read back.
    Zero,
}

/// Wraps a device so that writes to the local-only ranges stay in a local
/// sparse file; see the module docs.
pub struct LocalOverlay<D> {
    inner: D,
    overlay: FileDevice,
    image: PathBuf,
    ranges: Vec<Range<u64>>,
    block: u64,
    info: DeviceInfo,
    locks: RangeLock,
    zeros: Bytes,
}

impl<D> fmt::Debug for LocalOverlay<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalOverlay")
            .field("image", &self.image)
            .field("ranges", &self.ranges)
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

/// The metadata path of an overlay image: `NAME.meta` next to `NAME.img`.
pub fn meta_path(image: &Path) -> PathBuf {
    image.with_extension("meta")
}

impl<D: BlockDevice> LocalOverlay<D> {
    /// Opens (or creates) the overlay `image` for `inner` with the given
    /// local-only ranges. Refuses an existing overlay made for another
    /// device size or other ranges. Blocking: call it off the async
    /// runtime's workers (or accept a short stall).
    pub fn open(inner: D, image: impl AsRef<Path>, ranges: &LocalRanges) -> io::Result<Self> {
        Self::open_tagged(inner, image, ranges, "")
    }

    /// [`open`](Self::open), also binding the overlay to `tag` (one line
    /// of text naming the data it overlays): an overlay created with
    /// another tag is refused.
    pub fn open_tagged(
        inner: D,
        image: impl AsRef<Path>,
        ranges: &LocalRanges,
        tag: &str,
    ) -> io::Result<Self> {
        let image = image.as_ref().to_path_buf();
        if tag.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an overlay tag is one line",
            ));
        }
        let size = inner.info().size;
        let ranges = ranges.normalize(size)?;
        let meta_file = meta_path(&image);
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
        let meta = match fs::read_to_string(&meta_file) {
            Ok(text) => {
                let meta = Meta::decode(&text)
                    .map_err(|e| invalid(format!("{}: {e}", meta_file.display())))?;
                if meta.size != size || meta.ranges != ranges {
                    return Err(invalid(format!(
                        "the local-only overlay {} was made for a {}-byte device with local-only \
                         ranges [{}], but this one has {size} bytes and ranges [{}]; refusing \
                         to use it, because its local data would be lost or stale data would \
                         show through (remove {} and {} to start afresh, discarding the local \
                         data)",
                        image.display(),
                        meta.size,
                        describe(&meta.ranges),
                        describe(&ranges),
                        image.display(),
                        meta_file.display(),
                    )));
                }
                if meta.tag != tag {
                    return Err(invalid(format!(
                        "the local-only overlay {} belongs to {:?}, not {tag:?} (a re-created \
                         volume?); refusing to lay its local data over other data (remove {} \
                         and {} to start afresh, discarding the local data)",
                        image.display(),
                        meta.tag,
                        image.display(),
                        meta_file.display(),
                    )));
                }
                meta
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if image.exists() {
                    return Err(invalid(format!(
                        "{} exists without its metadata {}; refusing to guess what it holds",
                        image.display(),
                        meta_file.display()
                    )));
                }
                let meta = Meta {
                    size,
                    block: probe_block(&image)?,
                    ranges: ranges.clone(),
                    tag: tag.to_owned(),
                };
                // The metadata comes first: an image never exists without it.
                crate::storage::replace_file(
                    &crate::storage::DiskStorage,
                    &meta_file,
                    meta.encode().as_bytes(),
                )?;
                meta
            }
            Err(e) => return Err(e),
        };
        match fs::metadata(&image) {
            Ok(m) if m.len() == size => {}
            Ok(m) => {
                return Err(invalid(format!(
                    "{} is {} bytes, not the device's {size}",
                    image.display(),
                    m.len()
                )))
            }
            // A crash between the metadata and the image: nothing was
            // written locally yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = File::create_new(&image)?;
                f.set_len(size)?;
                f.sync_all()?;
                sync_parent(&image)?;
            }
            Err(e) => return Err(e),
        }
        let overlay = FileDevice::open(&image, &OpenOptions::default())?;
        let inner_info = inner.info();
        let all_local = ranges.len() == 1 && ranges[0] == (0..size);
        let info = DeviceInfo {
            size,
            block_sizes: inner_info.block_sizes,
            caps: Capabilities {
                // Covering everything, the overlay never writes to the
                // inner device: it is writable over a read-only one (the
                // copy-on-write layer, `cow.rs`, is exactly that).
                read_only: inner_info.caps.read_only && !all_local,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                // Zeroes inside the ranges are written out: never fast.
                fast_zero: inner_info.caps.fast_zero && !all_local,
                extents: true,
                prefetch: inner_info.caps.prefetch,
                multi_conn: inner_info.caps.multi_conn,
            },
        };
        tracing::info!(
            image = %image.display(),
            ranges = %describe(&ranges),
            block = meta.block,
            "opened the local-only overlay"
        );
        Ok(LocalOverlay {
            inner,
            overlay,
            image,
            ranges,
            block: meta.block,
            info,
            locks: RangeLock::default(),
            zeros: vec![0u8; usize::try_from(ZERO_CHUNK).expect("1 MiB fits")].into(),
        })
    }
}

impl<D> LocalOverlay<D> {
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The local-only ranges (sorted, disjoint).
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// The overlay image's path.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The block size writes are composed in.
    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// Bytes the overlay file has allocated on disk (roughly what was
    /// written locally).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(fs::metadata(&self.image)?.blocks() * 512)
    }

    /// Splits `[start, end)` into `(start, end, local)` pieces at range
    /// boundaries.
    fn split(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = start;
        let first = self.ranges.partition_point(|r| r.end <= start);
        for r in &self.ranges[first..] {
            if r.start >= end {
                break;
            }
            if r.start > pos {
                out.push((pos, r.start, false));
                pos = r.start;
            }
            let to = r.end.min(end);
            out.push((pos, to, true));
            pos = to;
        }
        if pos < end {
            out.push((pos, end, false));
        }
        out
    }

    fn is_local(&self, start: u64, end: u64) -> bool {
        self.split(start, end).iter().any(|p| p.2)
    }
}

impl<D: BlockDevice> LocalOverlay<D> {
    /// The overlay's allocation in `[start, end)` as `(start, end, has_data)`.
    async fn overlay_map(&self, start: u64, end: u64) -> Result<Vec<(u64, u64, bool)>> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let extents = self.overlay.extents(pos, end - pos).await?;
            let before = pos;
            for e in extents {
                let data = e.kind == ExtentKind::Data;
                let to = e.offset + e.len;
                match out.last_mut() {
                    Some(last) if last.2 == data && last.1 == e.offset => last.1 = to,
                    _ => out.push((e.offset, to, data)),
                }
                pos = to;
            }
            if pos <= before {
                return Err(BlockError::io(
                    Op::Extents,
                    pos,
                    io::Error::other("the overlay's allocation map made no progress"),
                ));
            }
        }
        Ok(out)
    }

    /// Where each byte of `[start, end)` is read from; `outside` is the
    /// source for bytes outside the ranges. Adjacent pieces of one source
    /// are merged.
    async fn sources(
        &self,
        start: u64,
        end: u64,
        outside: Source,
    ) -> Result<Vec<(u64, u64, Source)>> {
        let mut out: Vec<(u64, u64, Source)> = Vec::new();
        let mut push = |a: u64, b: u64, s: Source| match out.last_mut() {
            Some(last) if last.2 == s && last.1 == a => last.1 = b,
            _ => out.push((a, b, s)),
        };
        for (a, b, local) in self.split(start, end) {
            if !local {
                push(a, b, outside);
                continue;
            }
            for (x, y, data) in self.overlay_map(a, b).await? {
                push(x, y, if data { Source::Overlay } else { Source::Inner });
            }
        }
        Ok(out)
    }

    /// Reads `[start, end)` as `sources` describes it.
    async fn read_sources(&self, start: u64, end: u64, outside: Source) -> Result<Bytes> {
        let pieces = self.sources(start, end, outside).await?;
        let read = |(a, b, s): (u64, u64, Source)| async move {
            let len = usize::try_from(b - a).expect("pieces of one request fit in memory");
            match s {
                Source::Overlay => self.overlay.read(a, len).await,
                Source::Inner => self.inner.read(a, len).await,
                Source::Zero => Ok(Bytes::from(vec![0u8; len])),
            }
        };
        if let [one] = pieces[..] {
            return read(one).await;
        }
        let parts = try_join_all(pieces.into_iter().map(read)).await?;
        let mut buf = BytesMut::with_capacity(usize::try_from(end - start).unwrap_or(0));
        for p in parts {
            buf.extend_from_slice(&p);
        }
        Ok(buf.freeze())
    }

    /// Whether the overlay holds data in all of `[start, end)`.
    async fn all_data(&self, start: u64, end: u64) -> Result<bool> {
        let map = self.overlay_map(start, end).await?;
        Ok(map.len() == 1 && map[0].2)
    }

    /// Writes `data` at `start` into the overlay; `[start, end)` lies in
    /// one range.
    async fn overlay_write(&self, start: u64, data: Bytes, fua: bool) -> Result<()> {
        let end = start + data.len() as u64;
        let size = self.info.size;
        let lo = start / self.block * self.block;
        let hi = end
            .div_ceil(self.block)
            .saturating_mul(self.block)
            .min(size);
        let _guard = self.locks.lock(lo..hi).await;
        let flags = WriteFlags { fua };
        // Partial head or tail blocks that are (partly) holes get their
        // other bytes composed in, so no block becomes data with stray
        // zeroes in it.
        let head = if start > lo && !self.all_data(lo, (lo + self.block).min(size)).await? {
            Some(self.read_sources(lo, start, Source::Zero).await?)
        } else {
            None
        };
        let tail_lo = (end - 1) / self.block * self.block;
        let tail = if end < hi && !self.all_data(tail_lo, hi).await? {
            Some(self.read_sources(end, hi, Source::Zero).await?)
        } else {
            None
        };
        if head.is_none() && tail.is_none() {
            return self.overlay.write(start, data, flags).await;
        }
        let from = if head.is_some() { lo } else { start };
        let to = if tail.is_some() { hi } else { end };
        let mut buf = BytesMut::with_capacity(usize::try_from(to - from).unwrap_or(0));
        if let Some(h) = head {
            buf.extend_from_slice(&h);
        }
        buf.extend_from_slice(&data);
        if let Some(t) = tail {
            buf.extend_from_slice(&t);
        }
        self.overlay.write(from, buf.freeze(), flags).await
    }

    /// Writes real zeroes over `[start, end)` of the overlay (one range).
    async fn overlay_zero(&self, start: u64, end: u64, fua: bool) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let next = ((pos / ZERO_CHUNK + 1) * ZERO_CHUNK).min(end);
            let len = usize::try_from(next - pos).expect("at most one chunk");
            self.overlay_write(pos, self.zeros.slice(..len), fua)
                .await?;
            pos = next;
        }
        Ok(())
    }

    /// The byte ranges of `[offset, offset + len)` the overlay holds data
    /// for (inside the local-only ranges): what was written locally there,
    /// whole blocks. Sorted, disjoint, not touching.
    pub async fn local_data(&self, offset: u64, len: u64) -> Result<Vec<Range<u64>>> {
        check_range(&self.info, Op::Extents, offset, len)?;
        let mut out: Vec<Range<u64>> = Vec::new();
        for (a, b, local) in self.split(offset, offset + len) {
            if !local {
                continue;
            }
            for (x, y, data) in self.overlay_map(a, b).await? {
                if !data {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.end == x => last.end = y,
                    _ => out.push(x..y),
                }
            }
        }
        Ok(out)
    }

    /// Makes the overlay hold data over `[offset, offset + len)` (inside
    /// the local-only ranges, widened to whole blocks) without changing
    /// what reads return: every hole there is written with what it shows
    /// of the inner device now. Holes are whole filesystem blocks, so this
    /// never composes; it takes the same block locks as writes, so a write
    /// racing with it is neither lost nor overwritten. A crash part way
    /// leaves some holes filled, each with the bytes it showed: reads are
    /// the same either way.
    ///
    /// What it is for: before the inner device is replaced by another that
    /// reads the same only where this overlay already has data (a
    /// copy-on-write layer whose base is merged away, see `cow.rs`).
    pub async fn materialize(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.info, Op::Write, offset, len)?;
        let size = self.info.size;
        let lo = offset / self.block * self.block;
        let hi = (offset + len)
            .div_ceil(self.block)
            .saturating_mul(self.block)
            .min(size);
        let mut pos = lo;
        while pos < hi {
            let next = ((pos / ZERO_CHUNK + 1) * ZERO_CHUNK).min(hi);
            let _guard = self.locks.lock(pos..next).await;
            for (a, b, local) in self.split(pos, next) {
                if !local {
                    continue;
                }
                for (x, y, data) in self.overlay_map(a, b).await? {
                    if data {
                        continue;
                    }
                    let n = usize::try_from(y - x).expect("at most one chunk");
                    let bytes = self.inner.read(x, n).await?;
                    self.overlay.write(x, bytes, WriteFlags::default()).await?;
                }
            }
            pos = next;
        }
        Ok(())
    }

    /// Trim and write-zeroes: zeroes inside the ranges, `outside` for the
    /// rest.
    async fn zero<F, Fut>(&self, op: Op, offset: u64, len: u64, fua: bool, outside: F) -> Result<()>
    where
        F: Fn(u64, u64) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        check_range(&self.info, op, offset, len)?;
        try_join_all(
            self.split(offset, offset + len)
                .into_iter()
                .map(|(a, b, local)| {
                    let outside = &outside;
                    async move {
                        if local {
                            self.overlay_zero(a, b, fua).await
                        } else {
                            outside(a, b - a).await
                        }
                    }
                }),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl<D: BlockDevice> BlockDevice for LocalOverlay<D> {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(&self.info, Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.read_sources(offset, offset + len as u64, Source::Inner)
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        check_range(&self.info, Op::Write, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        try_join_all(self.split(offset, end).into_iter().map(|(a, b, local)| {
            let piece = data.slice(
                usize::try_from(a - offset).expect("in the buffer")
                    ..usize::try_from(b - offset).expect("in the buffer"),
            );
            async move {
                if local {
                    self.overlay_write(a, piece, flags.fua).await
                } else {
                    self.inner.write(a, piece, flags).await
                }
            }
        }))
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        futures::try_join!(self.overlay.flush(), self.inner.flush())?;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.zero(Op::Trim, offset, len, flags.fua, |a, n| {
            self.inner.trim(a, n, flags)
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_range(&self.info, Op::WriteZeroes, offset, len)?;
        // Refused before anything is applied: zeroes in the overlay are
        // written out, never fast.
        if flags.fast_only && self.is_local(offset, offset + len) {
            return Err(BlockError::Unsupported {
                op: Op::WriteZeroes,
            });
        }
        self.zero(Op::WriteZeroes, offset, len, flags.fua, |a, n| {
            self.inner.write_zeroes(a, n, flags)
        })
        .await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info, Op::Extents, offset, len)?;
        if len == 0 {
            return Ok(vec![Extent {
                offset,
                len: 0,
                kind: ExtentKind::Data,
            }]);
        }
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, e: Extent| match out.last_mut() {
            Some(last) if last.kind == e.kind && last.offset + last.len == e.offset => {
                last.len += e.len;
            }
            _ => out.push(e),
        };
        for (a, b, source) in self.sources(offset, offset + len, Source::Inner).await? {
            if source == Source::Overlay {
                push(
                    &mut out,
                    Extent {
                        offset: a,
                        len: b - a,
                        kind: ExtentKind::Data,
                    },
                );
            } else {
                let extents = self.inner.extents(a, b - a).await?;
                let mut covered = a;
                for e in extents {
                    covered = e.offset + e.len;
                    push(&mut out, e);
                }
                // The inner device answered a prefix only: so do we.
                if covered < b {
                    break;
                }
            }
            if out.len() >= MAX_EXTENTS {
                break;
            }
        }
        Ok(out)
    }

    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.info, Op::Prefetch, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Only what reads would fetch from the inner device.
        let pieces = self.sources(offset, offset + len, Source::Inner).await?;
        try_join_all(
            pieces
                .into_iter()
                .filter(|p| p.2 == Source::Inner)
                .map(|(a, b, _)| self.inner.prefetch(a, b - a)),
        )
        .await?;
        Ok(())
    }
}

/// Measures the allocation unit of the filesystem that will hold `image`:
/// a one-byte synced write into a sparse probe file, then SEEK_HOLE. Fails
/// if the filesystem cannot report holes (the overlay would then mistake
/// every unwritten byte for local data).
fn probe_block(image: &Path) -> io::Result<u64> {
    let probe = image.with_extension("probe");
    let _ = fs::remove_file(&probe);
    let result = (|| {
        let f = File::create_new(&probe)?;
        f.set_len(PROBE_LEN)?;
        std::os::unix::fs::FileExt::write_all_at(&f, &[1], 0)?;
        f.sync_data()?;
        let data = seek_whence(&f, 0, libc::SEEK_DATA)?;
        let hole = seek_whence(&f, 0, libc::SEEK_HOLE)?;
        let far = seek_whence(&f, PROBE_LEN - 1, libc::SEEK_DATA)?;
        if data != Some(0) || far.is_some() || hole.is_none_or(|h| h == 0 || h >= PROBE_LEN) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the filesystem holding {} does not report sparse-file holes \
                     (SEEK_DATA/SEEK_HOLE), which the local-only overlay needs",
                    image.display()
                ),
            ));
        }
        let measured = hole.unwrap_or(0).next_power_of_two();
        let block = measured.max(f.metadata()?.blksize()).max(512);
        if block > MAX_BLOCK || !block.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the filesystem holding {} allocates in {block}-byte blocks; the \
                     local-only overlay needs at most {MAX_BLOCK}",
                    image.display()
                ),
            ));
        }
        Ok(block)
    })();
    let _ = fs::remove_file(&probe);
    result
}

fn sync_parent(path: &Path) -> io::Result<()> {
    use crate::storage::Storage;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    crate::storage::DiskStorage.sync_dir(dir)
}

#[cfg(test)]
// One-range lists are what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::MemDevice;
    use std::sync::Arc;

    const SIZE: u64 = 300_000;

    /// A position-dependent, non-zero pattern: what "the origin" holds.
    fn origin_bytes(size: u64) -> Vec<u8> {
        #[allow(clippy::cast_possible_truncation)]
        (0..size).map(|i| (i % 251) as u8 + 1).collect()
    }

    /// An inner device that logs every call, to prove what reaches it.
    #[derive(Debug)]
    struct Recording {
        dev: MemDevice,
        log: Mutex<Vec<(Op, u64, u64)>>,
    }

    impl Recording {
        fn new(size: u64) -> Arc<Recording> {
            Arc::new(Recording {
                dev: MemDevice::from_bytes(&origin_bytes(size)),
                log: Mutex::new(Vec::new()),
            })
        }

        fn note(&self, op: Op, offset: u64, len: u64) {
            self.log.lock().unwrap().push((op, offset, len));
        }

        /// Mutations that touched any of `ranges`.
        fn mutations_in(&self, ranges: &[Range<u64>]) -> Vec<(Op, u64, u64)> {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter(|(op, off, len)| {
                    matches!(op, Op::Write | Op::Trim | Op::WriteZeroes)
                        && *len > 0
                        && ranges.iter().any(|r| *off < r.end && r.start < off + len)
                })
                .copied()
                .collect()
        }

        fn count(&self, op: Op) -> usize {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.0 == op)
                .count()
        }
    }

    #[async_trait]
    impl BlockDevice for Recording {
        fn info(&self) -> DeviceInfo {
            self.dev.info()
        }
        async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
            self.note(Op::Read, offset, len as u64);
            self.dev.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
            self.note(Op::Write, offset, data.len() as u64);
            self.dev.write(offset, data, flags).await
        }
        async fn flush(&self) -> Result<()> {
            self.note(Op::Flush, 0, 0);
            self.dev.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
            self.note(Op::Trim, offset, len);
            self.dev.trim(offset, len, flags).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
            self.note(Op::WriteZeroes, offset, len);
            self.dev.write_zeroes(offset, len, flags).await
        }
        async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.dev.extents(offset, len).await
        }
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn open_in(
        dir: &Path,
        inner: Arc<Recording>,
        ranges: &LocalRanges,
    ) -> LocalOverlay<Arc<Recording>> {
        LocalOverlay::open(inner, dir.join("overlay-vol.img"), ranges).expect("open overlay")
    }

    /// Random range sets, deterministic per seed: empty, whole, aligned,
    /// unaligned, several sharing one block.
    fn range_sets() -> Vec<LocalRanges> {
        let mut sets = vec![
            LocalRanges::Ranges(vec![]),
            LocalRanges::Everything,
            LocalRanges::Ranges(vec![8192..65536, 131_072..SIZE]),
            LocalRanges::Ranges(vec![100..5000, 5100..5200, 70_001..140_003]),
        ];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..4 {
            let count = 1 + next(5);
            let v = (0..count)
                .map(|_| {
                    let start = next(SIZE);
                    start..(start + next(80_000)).min(SIZE)
                })
                .collect();
            sets.push(LocalRanges::Ranges(v));
        }
        sets
    }

    #[test]
    fn conformance_over_memory_with_random_range_sets() {
        for ranges in range_sets() {
            let inners: Mutex<Vec<Arc<Recording>>> = Mutex::new(Vec::new());
            crate::conformance::run_with(
                crate::conformance::Settings {
                    cases: 24,
                    max_steps: 40,
                },
                || {
                    // The directory goes at once; the open file lives on.
                    let dir = tmp();
                    let inner = Recording::new(SIZE);
                    inners.lock().unwrap().push(inner.clone());
                    open_in(dir.path(), inner, &ranges)
                },
            );
            let local = ranges.normalize(SIZE).unwrap();
            for inner in inners.lock().unwrap().iter() {
                let leaked = inner.mutations_in(&local);
                assert!(
                    leaked.is_empty(),
                    "{ranges:?}: reached the inner device: {leaked:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_partial_write_over_a_hole_keeps_the_rest_of_the_block() {
        let dir = tmp();
        let inner = Recording::new(SIZE);
        let dev = open_in(dir.path(), inner.clone(), &LocalRanges::Everything);
        let bs = dev.block_size();
        let origin = origin_bytes(SIZE);
        // 100 bytes in the middle of block 3, and a write straddling the
        // end of block 5 into block 6.
        let at = 3 * bs + 50;
        dev.write(at, Bytes::from(vec![0xaa; 100]), WriteFlags::default())
            .await
            .unwrap();
        let at2 = 6 * bs - 10;
        dev.write(at2, Bytes::from(vec![0xbb; 20]), WriteFlags::default())
            .await
            .unwrap();
        let mut want = origin.clone();
        let u = |v: u64| usize::try_from(v).unwrap();
        want[u(at)..u(at) + 100].fill(0xaa);
        want[u(at2)..u(at2) + 20].fill(0xbb);
        let got = dev.read(0, u(SIZE)).await.unwrap();
        assert!(got[..] == want[..], "read-back differs");
        // The overlay file holds whole blocks with the origin's bytes
        // around the write, never stray zeroes.
        let file = fs::read(dev.image()).unwrap();
        for b in [3, 5, 6] {
            let r = u(b * bs)..u((b + 1) * bs);
            assert!(file[r.clone()] == want[r], "block {b} of the overlay file");
        }
        let extents = dev.overlay.extents(3 * bs, bs).await.unwrap();
        assert_eq!(extents[0].kind, ExtentKind::Data);
        assert_eq!(extents[0].len, bs);
        // A second partial write into the now-allocated block reads nothing
        // more from the inner device.
        let reads = inner.count(Op::Read);
        dev.write(
            3 * bs + 400,
            Bytes::from(vec![0xcc; 8]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        assert_eq!(inner.count(Op::Read), reads);
        assert!(inner.mutations_in(&[0..SIZE]).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_partial_writes_to_one_hole_block_all_land() {
        let dir = tmp();
        let inner = Recording::new(SIZE);
        let dev = Arc::new(open_in(dir.path(), inner, &LocalRanges::Everything));
        let bs = dev.block_size();
        let base = 10 * bs;
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let dev = dev.clone();
                tokio::spawn(async move {
                    // Interleaved 16-byte pieces of blocks 10 and 11, one
                    // of them straddling the boundary.
                    let at = base + i * (bs * 2 / 64) + 3;
                    dev.write(
                        at,
                        Bytes::from(vec![u8::try_from(i).unwrap() + 1; 16]),
                        WriteFlags::default(),
                    )
                    .await
                    .unwrap();
                    at
                })
            })
            .collect();
        let mut want = origin_bytes(SIZE);
        for (i, t) in tasks.into_iter().enumerate() {
            let at = usize::try_from(t.await.unwrap()).unwrap();
            want[at..at + 16].fill(u8::try_from(i).unwrap() + 1);
        }
        let got = dev.read(0, usize::try_from(SIZE).unwrap()).await.unwrap();
        assert!(got[..] == want[..], "a concurrent partial write was lost");
    }

    #[tokio::test]
    async fn zeroes_and_trims_in_a_range_hide_the_origin_data() {
        let dir = tmp();
        let inner = Recording::new(SIZE);
        let local = vec![4096..200_000];
        let dev = open_in(
            dir.path(),
            inner.clone(),
            &LocalRanges::Ranges(local.clone()),
        );
        dev.write_zeroes(
            10_000,
            50_000,
            ZeroFlags {
                may_trim: true,
                ..ZeroFlags::default()
            },
        )
        .await
        .unwrap();
        dev.trim(100_001, 30_000, WriteFlags::default())
            .await
            .unwrap();
        // Straddling the range's start: the outside part is the inner's.
        dev.write_zeroes(0, 8192, ZeroFlags::default())
            .await
            .unwrap();
        let got = dev.read(0, 200_000).await.unwrap();
        let origin = origin_bytes(SIZE);
        for (i, &b) in got.iter().enumerate() {
            let zero = i < 8192 || (10_000..60_000).contains(&i) || (100_001..130_001).contains(&i);
            assert_eq!(b, if zero { 0 } else { origin[i] }, "byte {i}");
        }
        assert!(inner.mutations_in(&local).is_empty());
        assert_eq!(inner.count(Op::WriteZeroes), 1);
        // The zeroes are data in the overlay, not holes.
        let map = dev.overlay_map(12_288, 57_344).await.unwrap();
        assert_eq!(map, vec![(12_288, 57_344, true)]);
        let extents = dev.extents(12_288, 45_056).await.unwrap();
        assert!(
            extents.iter().all(|e| e.kind == ExtentKind::Data),
            "{extents:?}"
        );
        // A fast-only zero that touches the range is refused untouched.
        let r = dev
            .write_zeroes(
                0,
                8192,
                ZeroFlags {
                    fast_only: true,
                    ..ZeroFlags::default()
                },
            )
            .await;
        assert!(matches!(r, Err(BlockError::Unsupported { .. })), "{r:?}");
        assert_eq!(inner.count(Op::WriteZeroes), 1);
    }

    #[tokio::test]
    async fn straddling_writes_split_at_the_range_edges() {
        let dir = tmp();
        let inner = Recording::new(SIZE);
        let local = vec![5000..9000, 20_000..30_001];
        let dev = open_in(
            dir.path(),
            inner.clone(),
            &LocalRanges::Ranges(local.clone()),
        );
        dev.write(
            1000,
            Bytes::from(vec![7u8; 40_000]),
            WriteFlags { fua: true },
        )
        .await
        .unwrap();
        let log: Vec<_> = inner
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.0 == Op::Write)
            .copied()
            .collect();
        let mut writes: Vec<(u64, u64)> = log.iter().map(|e| (e.1, e.2)).collect();
        writes.sort_unstable();
        assert_eq!(writes, vec![(1000, 4000), (9000, 11_000), (30_001, 10_999)]);
        let got = dev.read(0, 50_000).await.unwrap();
        let origin = origin_bytes(SIZE);
        for (i, &b) in got.iter().enumerate() {
            let want = if (1000..41_000).contains(&i) {
                7
            } else {
                origin[i]
            };
            assert_eq!(b, want, "byte {i}");
        }
        // What was read through to the inner device for local bytes never
        // included bytes written locally.
        let e = dev.extents(0, 50_000).await.unwrap();
        assert_eq!(e.first().map(|e| e.offset), Some(0));
    }

    #[tokio::test]
    async fn reopening_keeps_local_data_and_refuses_other_settings() {
        let dir = tmp();
        let ranges = LocalRanges::Ranges(vec![0..65_536, 100_000..150_000]);
        let mut want = origin_bytes(SIZE);
        {
            let dev = open_in(dir.path(), Recording::new(SIZE), &ranges);
            dev.write(
                30_000,
                Bytes::from(vec![9u8; 50_000]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            dev.write_zeroes(120_000, 1000, ZeroFlags::default())
                .await
                .unwrap();
            dev.flush().await.unwrap();
        }
        // The inner device is the origin: only its own data survives there.
        want[30_000..65_536].fill(9);
        want[120_000..121_000].fill(0);
        let dev = open_in(dir.path(), Recording::new(SIZE), &ranges);
        let got = dev.read(0, usize::try_from(SIZE).unwrap()).await.unwrap();
        assert!(got[..] == want[..], "local data lost across a reopen");
        drop(dev);

        let image = dir.path().join("overlay-vol.img");
        let other = LocalRanges::Ranges(vec![0..65_536]);
        let err = LocalOverlay::open(Recording::new(SIZE), &image, &other).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("0..65536, 100000..150000"),
            "{err}"
        );
        let err = LocalOverlay::open(Recording::new(SIZE + 4096), &image, &ranges).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // The same ranges written differently are the same ranges.
        let same = LocalRanges::Ranges(vec![100_000..150_000, 0..30_000, 30_000..65_536]);
        LocalOverlay::open(Recording::new(SIZE), &image, &same).unwrap();
        // Nor is an overlay tagged for something else.
        let err =
            LocalOverlay::open_tagged(Recording::new(SIZE), &image, &ranges, "vol@2").unwrap_err();
        assert!(err.to_string().contains("re-created"), "{err}");
        // An image without its metadata is not guessed at.
        fs::remove_file(meta_path(&image)).unwrap();
        let err = LocalOverlay::open(Recording::new(SIZE), &image, &ranges).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // Ranges past the end are a configuration error.
        let bad = LocalRanges::Ranges(vec![0..SIZE + 1]);
        let err =
            LocalOverlay::open(Recording::new(SIZE), dir.path().join("b.img"), &bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    #[tokio::test]
    async fn materialize_fills_the_ranges_holes_and_changes_no_byte() {
        let dir = tmp();
        let inner = Recording::new(SIZE);
        let local = vec![5000..9000, 20_000..30_001];
        let dev = open_in(
            dir.path(),
            inner.clone(),
            &LocalRanges::Ranges(local.clone()),
        );
        dev.write(6000, Bytes::from(vec![1; 100]), WriteFlags::default())
            .await
            .unwrap();
        let all = usize::try_from(SIZE).unwrap();
        let before = dev.read(0, all).await.unwrap();
        assert_eq!(dev.local_data(0, SIZE).await.unwrap().len(), 1);
        dev.materialize(0, SIZE).await.unwrap();
        assert!(dev.read(0, all).await.unwrap() == before, "a byte changed");
        assert_eq!(dev.local_data(0, SIZE).await.unwrap(), local);
        assert!(inner.mutations_in(&[0..SIZE]).is_empty());
        // Nothing left to fill: nothing more is read from the inner device.
        let reads = inner.count(Op::Read);
        dev.materialize(4000, 30_000).await.unwrap();
        assert_eq!(inner.count(Op::Read), reads);
    }

    #[test]
    fn meta_round_trips_and_rejects_garbage() {
        let m = Meta {
            size: 1 << 30,
            block: 4096,
            ranges: vec![0..4096, 1 << 20..1 << 21],
            tag: "vm@1234".into(),
        };
        assert_eq!(Meta::decode(&m.encode()), Ok(m));
        assert!(Meta::decode("something else\n").is_err());
        assert!(Meta::decode(&format!("{META_MAGIC}\nsize 1\nblock 3000\n")).is_err());
        assert!(Meta::decode(&format!("{META_MAGIC}\nblock 4096\n")).is_err());
    }

    /// Blocks the crash test writes and flushes, with their fill byte.
    fn crash_blocks(bs: u64) -> Vec<(u64, u8)> {
        (0..20u64)
            .map(|i| (bs + i * 3 * bs + i * 7, u8::try_from(i).unwrap() + 0x40))
            .collect()
    }

    /// The child of the crash test: writes, flushes, says so, then keeps
    /// writing elsewhere until it is killed.
    async fn crash_child(child: &testkit::crash::Child) {
        let dev = open_in(child.dir(), Recording::new(SIZE), &LocalRanges::Everything);
        let bs = dev.block_size();
        for (at, b) in crash_blocks(bs) {
            dev.write(at, Bytes::from(vec![b; 1000]), WriteFlags::default())
                .await
                .unwrap();
        }
        dev.flush().await.unwrap();
        child.report("flushed");
        let mut i = 0u64;
        loop {
            let at = (i * 4096) % (SIZE - 8192) + 1;
            // Past the flushed writes: those must stay as flushed.
            if crash_blocks(bs)
                .iter()
                .all(|&(w, _)| at + 100 <= w - 7 || w + 1007 <= at)
            {
                dev.write(at, Bytes::from(vec![0xee; 100]), WriteFlags::default())
                    .await
                    .unwrap();
            }
            i += 1;
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn flushed_local_writes_survive_a_killed_process() {
        use testkit::crash::{self, CrashTest, Verdict};
        let rt = tokio::runtime::Runtime::new().unwrap();
        if let Some(child) = crash::child() {
            rt.block_on(crash_child(&child));
            return;
        }
        let t = CrashTest::new(crash::name(
            module_path!(),
            "flushed_local_writes_survive_a_killed_process",
        ));
        let lines = t.run(0, |l| {
            if l == "flushed" {
                Verdict::KillAfter(std::time::Duration::from_millis(50))
            } else {
                Verdict::Continue
            }
        });
        assert!(
            lines.iter().any(|l| l == "flushed"),
            "the child never flushed"
        );
        rt.block_on(async {
            let dev = open_in(t.dir(), Recording::new(SIZE), &LocalRanges::Everything);
            let origin = origin_bytes(SIZE);
            for (at, b) in crash_blocks(dev.block_size()) {
                let got = dev.read(at - 7, 1014).await.unwrap();
                let u = usize::try_from(at).unwrap();
                assert_eq!(got[..7], origin[u - 7..u], "before {at}");
                assert!(
                    got[7..1007].iter().all(|&x| x == b),
                    "flushed write at {at} lost"
                );
                assert_eq!(got[1007..], origin[u + 1000..u + 1007], "after {at}");
            }
        });
    }
}
