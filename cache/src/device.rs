//! [`CachedDevice`]: a `blockcore` layer that puts a [`Cache`] in front of
//! any block device.
//!
//! ```text
//!   read ──> cache hit? ──yes──> plaintext from the cache
//!               │ no
//!               v
//!            inner device (misses coalesced into one read per run of
//!            chunks) ──> reply, and fill the cache in the background
//!
//!   write / trim / zero ──> inner device ──> then the cache:
//!            write-through: whole chunks written are stored, partly
//!                           written chunks are dropped
//!            write-around:  every touched chunk is dropped
//! ```
//!
//! # Why fills cannot go stale
//!
//! A fill reads the inner device and stores the result later; a write to
//! the same chunk in between must win. Every mutation bumps a per-stripe
//! counter (chunks hash to 1024 stripes) before and after it reaches the
//! inner device. A fill notes its chunk's counter before reading the inner
//! device, and the cache commits it only if the counter is unchanged at
//! commit time ([`Cache::put`]'s `still_valid`, checked under the index's
//! writer lock); otherwise it drops the chunk's mapping. A mutation drops
//! (or, write-through, replaces) its chunks' mappings only after its inner
//! call returned, through the same lock. So either the fill committed
//! before the mutation's own cache update (which then removes or replaces
//! it), or it sees the changed counter.
//!
//! The cache is an accelerator: if it fails (an I/O error of its own, a
//! damaged chunk), the layer logs it, counts it and serves from the inner
//! device; a read never fails because of the cache.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use blockcore::{
    check_range, BlockDevice, BlockError, DeviceInfo, Extent, Op, Result, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use tokio::sync::Semaphore;

use crate::store::{Cache, CacheError, CacheStats, Volume};

#[cfg(test)]
mod tests;

/// What writes do to the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Whole chunks written are stored in the cache (a later read hits);
    /// partly written chunks are dropped from it.
    #[default]
    Through,
    /// Every chunk a write touches is dropped from the cache; only reads
    /// fill it (for write-once data that is rarely read back).
    Around,
}

const STRIPES: usize = 1024;
/// Background fills in flight at most; a read that would start another waits
/// for one to finish (back-pressure instead of unbounded memory).
const MAX_FILLS: u32 = 64;

/// Per-stripe mutation counters (see the module docs).
#[derive(Debug)]
struct Epochs(Box<[AtomicU64]>);

impl Epochs {
    fn new() -> Self {
        Self((0..STRIPES).map(|_| AtomicU64::new(0)).collect())
    }

    fn stripe(&self, chunk: u64) -> &AtomicU64 {
        // STRIPES fits in u64 and the remainder in usize.
        &self.0[usize::try_from(chunk % STRIPES as u64).expect("stripe index")]
    }

    fn get(&self, chunk: u64) -> u64 {
        self.stripe(chunk).load(Ordering::Acquire)
    }

    /// The distinct stripes of a chunk range, in order.
    fn stripes(chunks: std::ops::RangeInclusive<u64>) -> Vec<u64> {
        let n = chunks.end().saturating_sub(*chunks.start()) + 1;
        if n >= STRIPES as u64 {
            return (0..STRIPES as u64).collect();
        }
        let mut v: Vec<u64> = chunks.map(|c| c % STRIPES as u64).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Bumps every stripe of `chunks`; returns their values after the bump.
    fn bump(&self, chunks: std::ops::RangeInclusive<u64>) -> Vec<(u64, u64)> {
        Self::stripes(chunks)
            .into_iter()
            .map(|s| (s, self.stripe(s).fetch_add(1, Ordering::AcqRel) + 1))
            .collect()
    }
}

/// The mutation counters of a run of chunks at one moment (see
/// [`CachedDevice::snapshot`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochSnapshot {
    first: u64,
    epochs: Vec<u64>,
}

/// Counters of the layer (the cache's own are in [`CachedDevice::cache_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedDeviceStats {
    /// Bytes of read replies served from the cache.
    pub bytes_from_cache: u64,
    /// Bytes read from the inner device to serve misses (whole chunks).
    pub bytes_from_inner: u64,
    /// Cache operations that failed and were bypassed.
    pub cache_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_from_cache: AtomicU64,
    bytes_from_inner: AtomicU64,
    cache_errors: AtomicU64,
}

/// A block device read through a [`Cache`].
pub struct CachedDevice<D> {
    inner: Arc<D>,
    cache: Arc<Cache>,
    volume: Volume,
    chunk_size: u64,
    mode: WriteMode,
    epochs: Arc<Epochs>,
    fills: Arc<Semaphore>,
    counters: Arc<Counters>,
}

impl<D> fmt::Debug for CachedDevice<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedDevice")
            .field("volume", &self.volume)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A cache failure the caller must see (registration, invalidation).
fn cache_failure(op: Op, offset: u64, e: CacheError) -> BlockError {
    BlockError::Io {
        op,
        offset,
        source: std::io::Error::other(e),
    }
}

impl<D: BlockDevice + 'static> CachedDevice<D> {
    /// Puts `cache` in front of `inner`, whose content the cache knows as
    /// volume `name` (registered on first use with the inner device's size).
    pub fn new(inner: D, cache: Arc<Cache>, name: &str, mode: WriteMode) -> Result<Self> {
        let size = inner.info().size;
        let volume = cache
            .volume(name, size)
            .map_err(|e| cache_failure(Op::Read, 0, e))?;
        Ok(Self {
            inner: Arc::new(inner),
            chunk_size: u64::from(cache.chunk_size()),
            cache,
            volume,
            mode,
            epochs: Arc::new(Epochs::new()),
            fills: Arc::new(Semaphore::new(MAX_FILLS as usize)),
            counters: Arc::new(Counters::default()),
        })
    }

    /// The inner device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The volume this device's chunks are cached under.
    pub fn volume(&self) -> Volume {
        self.volume
    }

    /// The cache's counters and occupancy.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// This layer's counters.
    pub fn stats(&self) -> CachedDeviceStats {
        let c = &self.counters;
        CachedDeviceStats {
            bytes_from_cache: c.bytes_from_cache.load(Ordering::Relaxed),
            bytes_from_inner: c.bytes_from_inner.load(Ordering::Relaxed),
            cache_errors: c.cache_errors.load(Ordering::Relaxed),
        }
    }

    /// Waits until every background fill started so far has finished.
    pub async fn settle(&self) {
        // Holding every permit means no fill is running.
        if let Ok(all) = self.fills.acquire_many(MAX_FILLS).await {
            drop(all);
        }
    }

    /// Drops the chunks of `[offset, offset + len)` from the cache (and
    /// stops fills of them in flight), for data that changed behind this
    /// layer: e.g. a journal above it whose writes reach the inner device
    /// by another path.
    pub async fn invalidate(&self, offset: u64, len: u64) -> Result<()> {
        // A range check only: the inner device may well be read-only (the
        // edge's view of its origin), the data changed behind it.
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.volume.size)
        {
            return Err(BlockError::OutOfRange {
                op: Op::Write,
                offset,
                len,
                size: self.volume.size,
            });
        }
        self.mutate(Op::Write, offset, len, None, async { Ok(()) })
            .await
    }

    /// The mutation counters of the chunks covering `[offset, offset +
    /// len)`, to pass to [`CachedDevice::offer`] with data read from the
    /// inner device after this call.
    pub fn snapshot(&self, offset: u64, len: u64) -> EpochSnapshot {
        if len == 0 {
            return EpochSnapshot::default();
        }
        let chunks = self.chunks(offset, len);
        EpochSnapshot {
            first: *chunks.start(),
            epochs: chunks.map(|c| self.epochs.get(c)).collect(),
        }
    }

    /// Offers data of the inner device obtained outside this layer (a push
    /// from an origin) for caching. Only whole chunks are kept, and each only
    /// if no mutation touched it since `since` was taken (before the data
    /// was requested). Returns at once; storing happens in the background.
    pub async fn offer(&self, offset: u64, data: Bytes, since: &EpochSnapshot) {
        let end = offset
            .saturating_add(data.len() as u64)
            .min(self.volume.size);
        let mut fills = Vec::new();
        let mut c = offset.div_ceil(self.chunk_size);
        loop {
            let c_start = c * self.chunk_size;
            let c_end = (c_start + self.chunk_size).min(self.volume.size);
            if c_start >= end || c_end > end {
                break;
            }
            let epoch = c
                .checked_sub(since.first)
                .and_then(|i| since.epochs.get(usize::try_from(i).ok()?));
            if let Some(&epoch) = epoch {
                let s = usize::try_from(c_start - offset).expect("fits");
                let e = usize::try_from(c_end - offset).expect("fits");
                fills.push((c, data.slice(s..e), epoch));
            }
            c += 1;
        }
        self.spawn_fill(fills).await;
    }

    /// The range's bytes if the cache holds all of them, without reading
    /// through on a miss (a migration copies what the edge already has
    /// without crossing the link). Not counted as a read of the volume.
    pub async fn read_cached(&self, offset: u64, len: usize) -> Result<Option<Bytes>> {
        check_range(&self.info(), Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let chunks = self.chunks(offset, len as u64);
        let first = *chunks.start();
        let hits = self.lookup(chunks).await;
        if hits.iter().any(Option::is_none) {
            return Ok(None);
        }
        let cs = self.chunk_size;
        let end = offset + len as u64;
        let mut out = BytesMut::with_capacity(len);
        for (i, data) in hits.iter().flatten().enumerate() {
            let base = (first + i as u64) * cs;
            let s = offset.max(base) - base;
            let e = (end - base).min(data.len() as u64);
            if s >= e {
                // A short chunk at the end of the volume.
                return Ok(None);
            }
            out.extend_from_slice(
                &data[usize::try_from(s).expect("fits")..usize::try_from(e).expect("fits")],
            );
        }
        Ok((out.len() == len).then(|| out.freeze()))
    }

    /// The runs of the range's chunks the cache does not hold, as byte
    /// ranges (offset, length) clipped to the volume: what a prefetch has
    /// to fetch.
    pub async fn missing(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        check_range(&self.info(), Op::Prefetch, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let chunks = self.chunks(offset, len);
        let first = *chunks.start();
        let size = self.volume.size;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, hit) in self.lookup(chunks).await.iter().enumerate() {
            if hit.is_some() {
                continue;
            }
            let start = (first + i as u64) * self.chunk_size;
            let len = self.chunk_size.min(size - start);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => out.push((start, len)),
            }
        }
        Ok(out)
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / self.chunk_size..=(offset + len - 1) / self.chunk_size
    }

    /// Looks chunks up in the cache (one blocking task for all of them).
    async fn lookup(&self, chunks: std::ops::RangeInclusive<u64>) -> Vec<Option<Bytes>> {
        // Hot chunks are answered here, on the async thread, when neither
        // the index nor the data file has to be read (as the file backend
        // serves page-cache hits inline): a hop to the blocking pool costs
        // more than such a hit.
        let mut inline = Vec::new();
        for c in chunks.clone() {
            match self.cache.get_from_memory(self.volume, c) {
                Some(d) => inline.push(Some(d)),
                None => break,
            }
        }
        if inline.len() == chunks.clone().count() {
            return inline;
        }
        let chunks = *chunks.start() + inline.len() as u64..=*chunks.end();
        let cache = self.cache.clone();
        let volume = self.volume;
        let counters = self.counters.clone();
        let n = chunks.clone().count();
        let rest: Vec<Option<Bytes>> = tokio::task::spawn_blocking(move || {
            chunks
                .map(|c| match cache.get(volume, c) {
                    Ok(hit) => hit,
                    Err(e) => {
                        // Damaged chunks are already logged by the cache.
                        if !matches!(e, CacheError::Integrity { .. }) {
                            tracing::warn!(error = %e, chunk = c, "cache lookup failed; reading through");
                        }
                        counters.cache_errors.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_else(|_| vec![None; n]);
        inline.extend(rest);
        inline
    }

    /// Reads chunks `first..=last` (all misses) from the inner device in one
    /// request and starts filling the cache with them.
    async fn fetch(&self, first: u64, last: u64) -> Result<Bytes> {
        let size = self.volume.size;
        let start = first * self.chunk_size;
        let end = ((last + 1) * self.chunk_size).min(size);
        let before: Vec<u64> = (first..=last).map(|c| self.epochs.get(c)).collect();
        let len = usize::try_from(end - start).expect("request fits usize");
        let data = self.inner.read(start, len).await?;
        self.counters
            .bytes_from_inner
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let fills: Vec<(u64, Bytes, u64)> = (first..=last)
            .zip(before)
            .map(|(c, epoch)| {
                let s = usize::try_from((c - first) * self.chunk_size).expect("fits");
                let e = (s + usize::try_from(self.chunk_size).expect("fits")).min(data.len());
                (c, data.slice(s..e), epoch)
            })
            .collect();
        self.spawn_fill(fills).await;
        Ok(data)
    }

    /// Stores chunks in the cache in the background. Each `(chunk, data,
    /// epoch)` is committed only if the chunk's stripe counter still equals
    /// `epoch`.
    async fn spawn_fill(&self, fills: Vec<(u64, Bytes, u64)>) {
        if fills.is_empty() {
            return;
        }
        let Ok(permit) = self.fills.clone().acquire_owned().await else {
            return;
        };
        let cache = self.cache.clone();
        let epochs = self.epochs.clone();
        let counters = self.counters.clone();
        let volume = self.volume;
        tokio::task::spawn_blocking(move || {
            for (chunk, data, epoch) in fills {
                let still_valid = || epochs.get(chunk) == epoch;
                if let Err(e) = cache.put(volume, chunk, &data, &still_valid) {
                    tracing::warn!(error = %e, chunk, "cache fill failed");
                    counters.cache_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }

    /// Runs a mutation of `[offset, offset + len)` on the inner device with
    /// the stripe counters bumped around it, then updates the cache: stores
    /// `data`'s whole chunks if given (write-through), drops every other
    /// touched chunk.
    async fn mutate<F>(
        &self,
        kind: Op,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        op: F,
    ) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>>,
    {
        if len == 0 {
            return op.await;
        }
        let chunks = self.chunks(offset, len);
        let started = self.epochs.bump(chunks.clone());
        let result = op.await;
        let finished = self.epochs.bump(chunks.clone());
        // A chunk's new content may be stored only if no other mutation of
        // its stripe overlapped this one in time (its counter moved by
        // exactly our two bumps); otherwise the other one's order against
        // ours is unknown and the chunk is dropped.
        let quiet: Vec<(u64, u64)> = started
            .iter()
            .zip(&finished)
            .filter(|((_, a), (_, b))| *b == *a + 1)
            .map(|(&(s, _), &(_, b))| (s, b))
            .collect();

        // Every touched chunk is dropped, synchronously: a later read must
        // not hit the old content, even if storing the new one fails or is
        // refused. Whole chunks written through are then stored in the
        // background.
        let mut stores = Vec::new();
        for c in chunks.clone() {
            let c_start = c * self.chunk_size;
            let c_end = (c_start + self.chunk_size).min(self.volume.size);
            let whole = offset <= c_start && offset + len >= c_end;
            let epoch = quiet
                .iter()
                .find(|(s, _)| *s == c % STRIPES as u64)
                .map(|&(_, e)| e);
            if let (Some(d), Some(epoch), true, true) = (&data, epoch, whole, result.is_ok()) {
                let s = usize::try_from(c_start - offset).expect("fits");
                let e = usize::try_from(c_end - offset).expect("fits");
                stores.push((c, d.slice(s..e), epoch));
            }
        }
        let cache = self.cache.clone();
        let volume = self.volume;
        let range = *chunks.start()..*chunks.end() + 1;
        match tokio::task::spawn_blocking(move || cache.invalidate(volume, range)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // The old content may still be mapped: that is not a miss,
                // it is wrong data. Fail loudly.
                tracing::error!(error = %e, "cache invalidation failed");
                return Err(cache_failure(kind, offset, e));
            }
            Err(join) => {
                return Err(BlockError::Io {
                    op: kind,
                    offset,
                    source: std::io::Error::other(join.to_string()),
                })
            }
        }
        self.spawn_fill(stores).await;
        result
    }
}

#[async_trait]
impl<D: BlockDevice + 'static> BlockDevice for CachedDevice<D> {
    fn info(&self) -> DeviceInfo {
        let mut info = self.inner.info();
        info.caps.prefetch = true;
        info
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(&self.info(), Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let chunks = self.chunks(offset, len as u64);
        let first = *chunks.start();
        let hits = self.lookup(chunks.clone()).await;
        let cs = self.chunk_size;
        // Fast path: one chunk, a hit.
        if hits.len() == 1 {
            if let Some(data) = &hits[0] {
                let s = usize::try_from(offset - first * cs).expect("fits");
                self.counters
                    .bytes_from_cache
                    .fetch_add(len as u64, Ordering::Relaxed);
                return Ok(data.slice(s..s + len));
            }
        }
        let mut out = BytesMut::with_capacity(len);
        let end = offset + len as u64;
        let mut i = 0;
        while i < hits.len() {
            let c = first + i as u64;
            // Bytes of chunk `c` (or of the run starting at it) wanted.
            let want = |run_start: u64, data: &Bytes| {
                let s = offset.max(run_start * cs) - run_start * cs;
                let e = (end - run_start * cs).min(data.len() as u64);
                data.slice(usize::try_from(s).expect("fits")..usize::try_from(e).expect("fits"))
            };
            if let Some(data) = &hits[i] {
                let part = want(c, data);
                self.counters
                    .bytes_from_cache
                    .fetch_add(part.len() as u64, Ordering::Relaxed);
                out.extend_from_slice(&part);
                i += 1;
            } else {
                let mut j = i;
                while j + 1 < hits.len() && hits[j + 1].is_none() {
                    j += 1;
                }
                let data = self.fetch(c, first + j as u64).await?;
                out.extend_from_slice(&want(c, &data));
                i = j + 1;
            }
        }
        debug_assert_eq!(out.len(), len);
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        check_range(&self.info(), Op::Write, offset, data.len() as u64)?;
        let keep = (self.mode == WriteMode::Through).then(|| data.clone());
        let len = data.len() as u64;
        self.mutate(
            Op::Write,
            offset,
            len,
            keep,
            self.inner.write(offset, data, flags),
        )
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        check_range(&self.info(), Op::Trim, offset, len)?;
        self.mutate(
            Op::Trim,
            offset,
            len,
            None,
            self.inner.trim(offset, len, flags),
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_range(&self.info(), Op::WriteZeroes, offset, len)?;
        self.mutate(
            Op::WriteZeroes,
            offset,
            len,
            None,
            self.inner.write_zeroes(offset, len, flags),
        )
        .await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }

    /// Fetches the missing chunks of the range into the cache.
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.info(), Op::Prefetch, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let chunks = self.chunks(offset, len);
        let first = *chunks.start();
        let hits = self.lookup(chunks).await;
        // Fetch runs of misses, at most 32 chunks per inner read.
        let mut i = 0;
        while i < hits.len() {
            if hits[i].is_some() {
                i += 1;
                continue;
            }
            let mut j = i;
            while j + 1 < hits.len() && hits[j + 1].is_none() && j - i < 31 {
                j += 1;
            }
            self.fetch(first + i as u64, first + j as u64).await?;
            i = j + 1;
        }
        Ok(())
    }
}
