//! An in-memory sparse device: the reference backend for tests, demos and
//! scratch space.
//!
//! Storage is a map from chunk index to a heap chunk; chunks that were never
//! written (or were trimmed whole) take no memory and report as holes.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::{
    check_range, BlockDevice, BlockSizes, Capabilities, DeviceInfo, Extent, ExtentKind, Op, Result,
    WriteFlags, ZeroFlags,
};

/// Allocation unit: small enough that sparse test images stay small, large
/// enough that the map stays short for a multi-GiB device.
const CHUNK: u64 = 64 * 1024;
#[allow(clippy::cast_possible_truncation)]
const CHUNK_BYTES: usize = CHUNK as usize;

/// At most this many extents per query; the trait allows a prefix.
const MAX_EXTENTS: usize = 1024;

#[derive(Debug)]
pub struct MemDevice {
    info: DeviceInfo,
    chunks: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes that takes no memory until
    /// written.
    pub fn new(size: u64) -> Self {
        Self {
            info: DeviceInfo {
                size,
                block_sizes: BlockSizes::DEFAULT,
                // Nothing to fetch ahead: every read is a memory copy.
                caps: Capabilities {
                    prefetch: false,
                    ..Capabilities::ALL
                },
            },
            chunks: RwLock::new(BTreeMap::new()),
        }
    }

    /// A device holding `data` (size = its length).
    pub fn from_bytes(data: &[u8]) -> Self {
        let dev = Self::new(data.len() as u64);
        {
            let mut chunks = dev.chunks.write().unwrap_or_else(PoisonError::into_inner);
            Self::copy_in(&mut chunks, 0, data);
        }
        dev
    }

    /// Refuses writes, trims and zeroes.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.info.caps.read_only = true;
        self
    }

    /// Advertises other block-size limits (tests of alignment handling).
    #[must_use]
    pub fn with_block_sizes(mut self, block_sizes: BlockSizes) -> Self {
        self.info.block_sizes = block_sizes;
        self
    }

    /// Bytes of memory held by allocated chunks.
    pub fn allocated_bytes(&self) -> u64 {
        let chunks = self.chunks.read().unwrap_or_else(PoisonError::into_inner);
        chunks.len() as u64 * CHUNK
    }

    /// Splits `[offset, offset + len)` into `(chunk index, offset in chunk,
    /// length)` pieces.
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let index = pos / CHUNK;
            let within = pos % CHUNK;
            let take = (CHUNK - within).min(end - pos);
            pos += take;
            // Both are below CHUNK, so they fit in usize.
            #[allow(clippy::cast_possible_truncation)]
            Some((index, within as usize, take as usize))
        })
    }

    fn copy_in(chunks: &mut BTreeMap<u64, Box<[u8]>>, offset: u64, data: &[u8]) {
        let mut consumed = 0;
        for (index, within, take) in Self::pieces(offset, data.len() as u64) {
            let chunk = chunks
                .entry(index)
                .or_insert_with(|| vec![0; CHUNK_BYTES].into_boxed_slice());
            chunk[within..within + take].copy_from_slice(&data[consumed..consumed + take]);
            consumed += take;
        }
    }

    /// Zeroes a range. With `deallocate`, whole chunks are freed; without
    /// (NBD's NO_HOLE), the range stays allocated.
    fn zero_range(&self, offset: u64, len: u64, deallocate: bool) {
        let mut chunks = self.chunks.write().unwrap_or_else(PoisonError::into_inner);
        for (index, within, take) in Self::pieces(offset, len) {
            if !deallocate {
                chunks
                    .entry(index)
                    .or_insert_with(|| vec![0; CHUNK_BYTES].into_boxed_slice())
                    [within..within + take]
                    .fill(0);
            } else if take as u64 == CHUNK {
                chunks.remove(&index);
            } else if let Some(chunk) = chunks.get_mut(&index) {
                chunk[within..within + take].fill(0);
            }
        }
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(&self.info, Op::Read, offset, len as u64)?;
        let mut out = BytesMut::zeroed(len);
        let chunks = self.chunks.read().unwrap_or_else(PoisonError::into_inner);
        let mut produced = 0;
        for (index, within, take) in Self::pieces(offset, len as u64) {
            if let Some(chunk) = chunks.get(&index) {
                out[produced..produced + take].copy_from_slice(&chunk[within..within + take]);
            }
            produced += take;
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_range(&self.info, Op::Write, offset, data.len() as u64)?;
        let mut chunks = self.chunks.write().unwrap_or_else(PoisonError::into_inner);
        Self::copy_in(&mut chunks, offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _flags: WriteFlags) -> Result<()> {
        check_range(&self.info, Op::Trim, offset, len)?;
        self.zero_range(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_range(&self.info, Op::WriteZeroes, offset, len)?;
        self.zero_range(offset, len, flags.may_trim);
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info, Op::Extents, offset, len)?;
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        // Appends a clipped run, merging it with the previous one of the same kind.
        let push = |extents: &mut Vec<Extent>, start: u64, stop: u64, kind: ExtentKind| {
            let (start, stop) = (start.max(offset), stop.min(end));
            if start >= stop {
                return;
            }
            match extents.last_mut() {
                Some(last) if last.kind == kind && last.offset + last.len == start => {
                    last.len += stop - start;
                }
                _ => extents.push(Extent {
                    offset: start,
                    len: stop - start,
                    kind,
                }),
            }
        };
        let chunks = self.chunks.read().unwrap_or_else(PoisonError::into_inner);
        let mut pos = offset;
        for &index in chunks
            .range(offset / CHUNK..end.div_ceil(CHUNK))
            .map(|(k, _)| k)
        {
            let start = index * CHUNK;
            push(&mut extents, pos, start, ExtentKind::Hole);
            push(&mut extents, start, start + CHUNK, ExtentKind::Data);
            pos = (start + CHUNK).max(pos);
            if extents.len() >= MAX_EXTENTS {
                extents.truncate(MAX_EXTENTS);
                return Ok(extents);
            }
        }
        push(&mut extents, pos, end, ExtentKind::Hole);
        if extents.is_empty() {
            // A zero-length query still gets one (empty) extent at `offset`.
            extents.push(Extent {
                offset,
                len: 0,
                kind: ExtentKind::Hole,
            });
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sparse_until_written_and_freed_by_trim() {
        let dev = MemDevice::new(10 * CHUNK);
        assert_eq!(dev.allocated_bytes(), 0);
        dev.write(
            CHUNK + 5,
            Bytes::from_static(b"hello"),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        assert_eq!(dev.allocated_bytes(), CHUNK);
        let extents = dev.extents(0, 10 * CHUNK).await.unwrap();
        assert_eq!(
            extents,
            vec![
                Extent {
                    offset: 0,
                    len: CHUNK,
                    kind: ExtentKind::Hole
                },
                Extent {
                    offset: CHUNK,
                    len: CHUNK,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 2 * CHUNK,
                    len: 8 * CHUNK,
                    kind: ExtentKind::Hole
                },
            ]
        );
        dev.trim(CHUNK, CHUNK, WriteFlags::default()).await.unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
    }

    #[tokio::test]
    async fn partial_zero_keeps_neighbours() {
        let dev = MemDevice::from_bytes(&[7u8; 100]);
        dev.write_zeroes(10, 20, ZeroFlags::default())
            .await
            .unwrap();
        let data = dev.read(0, 100).await.unwrap();
        assert!(data[..10].iter().all(|&b| b == 7));
        assert!(data[10..30].iter().all(|&b| b == 0));
        assert!(data[30..].iter().all(|&b| b == 7));
    }

    #[test]
    fn conformance() {
        crate::conformance::run(|| MemDevice::new(3 * CHUNK + 4096 + 17));
    }
}
