//! Read-ahead layer: detects sequential streams and fetches ahead of them
//! in the background, with a window that doubles on each sequential read
//! and resets on a random one (like the kernel's readahead and nbdkit's
//! `readahead` filter). `prefetch` (NBD_CMD_CACHE, SCSI PRE-FETCH) fills the
//! same buffers on demand.
//!
//! ```text
//!   read(off,len) ──> covered by buffers / fetches in flight? ──yes──> slice (await if in flight)
//!         │                                                    no
//!         └──> sequential stream? grow window, start fetch ahead ──> inner.read(off,len)
//!
//!   write/trim/zero ──> inner ──> drop overlapping buffers, poison overlapping fetches
//! ```
//!
//! Staleness: a mutation invalidates *after* the inner device completes it,
//! under the same lock that inserts finished fetches. A fetch that overlapped
//! the mutation is poisoned and never inserted; a buffer inserted before is
//! removed. So once a write returns, no later read can see older data. (A
//! read that overlaps a write in time may see either, as on any disk.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};

use crate::{
    check_range, BlockDevice, BlockError, DeviceInfo, Extent, Op, Result, WriteFlags, ZeroFlags,
};

/// Tuning of the read-ahead layer.
#[derive(Clone, Copy, Debug)]
pub struct ReadAheadConfig {
    /// Window after the second sequential read.
    pub min_window: u64,
    /// Largest window (and largest single background fetch).
    pub max_window: u64,
    /// Bound on the memory held by fetched-but-unread data.
    pub max_buffered: u64,
    /// Sequential streams tracked at once (several readers, or one reader
    /// with several files).
    pub streams: usize,
}

impl Default for ReadAheadConfig {
    fn default() -> Self {
        Self {
            min_window: 128 * 1024,
            max_window: 4 * 1024 * 1024,
            max_buffered: 64 * 1024 * 1024,
            streams: 8,
        }
    }
}

/// Counters of the read-ahead layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadAheadStats {
    /// Reads served wholly from fetched data.
    pub hits: u64,
    /// Reads that went to the inner device.
    pub misses: u64,
    /// Bytes fetched in the background or by `prefetch`.
    pub fetched_bytes: u64,
    /// Buffers dropped or fetches poisoned by writes.
    pub invalidations: u64,
}

type Fetch = Shared<BoxFuture<'static, std::result::Result<Bytes, Arc<str>>>>;

#[derive(Debug)]
struct Buffer {
    offset: u64,
    data: Bytes,
}

struct InFlight {
    id: u64,
    offset: u64,
    len: u64,
    fetch: Fetch,
    poisoned: Arc<AtomicBool>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug)]
struct Stream {
    /// Where the next sequential read starts.
    next: u64,
    window: u64,
    /// Everything below this is fetched or being fetched.
    ahead: u64,
    last_used: u64,
}

#[derive(Debug, Default)]
struct State {
    streams: Vec<Stream>,
    tick: u64,
    buffers: VecDeque<Buffer>,
    buffered: u64,
    in_flight: Vec<InFlight>,
    /// Bytes being fetched; counted with `buffered` against the bound.
    fetching: u64,
    next_id: u64,
}

/// One piece of a read that the fetched data covers.
enum Piece {
    Ready(Bytes),
    Pending {
        fetch: Fetch,
        poisoned: Arc<AtomicBool>,
        /// Range within the fetch's data.
        from: usize,
        to: usize,
    },
}

#[derive(Debug)]
struct Inner<D> {
    device: D,
    config: ReadAheadConfig,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    fetched: AtomicU64,
    invalidations: AtomicU64,
}

/// Wraps a device with adaptive read-ahead.
#[derive(Debug)]
pub struct ReadAhead<D> {
    inner: Arc<Inner<D>>,
}

fn overlaps(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    a_off < b_off.saturating_add(b_len) && b_off < a_off.saturating_add(a_len)
}

impl<D: BlockDevice + 'static> ReadAhead<D> {
    pub fn new(device: D) -> Self {
        Self::with_config(device, ReadAheadConfig::default())
    }

    pub fn with_config(device: D, config: ReadAheadConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                device,
                config,
                state: Mutex::new(State::default()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                fetched: AtomicU64::new(0),
                invalidations: AtomicU64::new(0),
            }),
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner.device
    }

    pub fn stats(&self) -> ReadAheadStats {
        ReadAheadStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            fetched_bytes: self.inner.fetched.load(Ordering::Relaxed),
            invalidations: self.inner.invalidations.load(Ordering::Relaxed),
        }
    }
}

impl<D: BlockDevice + 'static> Inner<D> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers and starts a background fetch of `[offset, offset + len)`.
    /// Called with the state locked.
    fn start_fetch(self: &Arc<Self>, state: &mut State, offset: u64, len: u64) -> Fetch {
        let id = state.next_id;
        state.next_id += 1;
        let poisoned = Arc::new(AtomicBool::new(false));
        let this = Arc::clone(self);
        let flag = Arc::clone(&poisoned);
        // The bookkeeping runs inside the shared future, so whoever drives
        // it first (a waiting reader or the task below) publishes the data
        // exactly once, without waiting for a task to be scheduled.
        let fetch = async move {
            let result = match usize::try_from(len) {
                Ok(n) => this
                    .device
                    .read(offset, n)
                    .await
                    .map_err(|e| Arc::<str>::from(e.to_string())),
                Err(_) => Err(Arc::<str>::from("fetch too large")),
            };
            this.finish_fetch(id, offset, &flag, result.clone());
            result
        }
        .boxed()
        .shared();
        state.fetching += len;
        state.in_flight.push(InFlight {
            id,
            offset,
            len,
            fetch: fetch.clone(),
            poisoned,
        });
        // Drive the fetch even if nobody waits for it.
        tokio::spawn(fetch.clone());
        fetch
    }

    fn finish_fetch(
        &self,
        id: u64,
        offset: u64,
        poisoned: &AtomicBool,
        result: std::result::Result<Bytes, Arc<str>>,
    ) {
        let mut state = self.lock();
        if let Some(i) = state.in_flight.iter().position(|f| f.id == id) {
            let done = state.in_flight.swap_remove(i);
            state.fetching -= done.len;
        }
        let data = match result {
            Ok(data) => data,
            Err(e) => {
                tracing::debug!(offset, error = %e, "read-ahead fetch failed");
                return;
            }
        };
        // Checked under the lock that invalidation takes: see the module docs.
        if poisoned.load(Ordering::Acquire) || data.is_empty() {
            return;
        }
        self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
        state.buffered += data.len() as u64;
        state.buffers.push_back(Buffer { offset, data });
        while state.buffered > self.config.max_buffered {
            match state.buffers.pop_front() {
                Some(old) => state.buffered -= old.data.len() as u64,
                None => break,
            }
        }
    }

    /// Updates stream detection for a read and starts fetching ahead of a
    /// sequential stream when its look-ahead runs low.
    fn track(self: &Arc<Self>, state: &mut State, offset: u64, len: u64, size: u64) {
        state.tick += 1;
        let tick = state.tick;
        let end = offset + len;
        let cfg = self.config;
        let found = state.streams.iter().position(|s| s.next == offset);
        let Some(i) = found else {
            let fresh = Stream {
                next: end,
                window: 0,
                ahead: end,
                last_used: tick,
            };
            if state.streams.len() < cfg.streams.max(1) {
                state.streams.push(fresh);
            } else if let Some(lru) = state.streams.iter_mut().min_by_key(|s| s.last_used) {
                *lru = fresh;
            }
            return;
        };
        let s = &mut state.streams[i];
        let cap = cfg.max_window.max(len);
        s.window = (s.window * 2).max(cfg.min_window).max(len).min(cap);
        s.next = end;
        s.last_used = tick;
        s.ahead = s.ahead.max(end);
        let target = (end + s.window).min(size);
        // Refill when less than half a window is left ahead of the reader.
        if target <= s.ahead || s.ahead - end > s.window / 2 {
            return;
        }
        let (from, to) = (s.ahead, target);
        // Fetches in flight stay within the memory bound (finished ones are
        // evicted oldest first); past it, this stream reads without
        // look-ahead for now.
        if state.fetching + (to - from) > cfg.max_buffered {
            return;
        }
        let s = &mut state.streams[i];
        s.ahead = target;
        let mut pos = from;
        while pos < to {
            let piece = (to - pos).min(cfg.max_window);
            // Driven by its own task; nobody waits for it here.
            drop(self.start_fetch(state, pos, piece));
            pos += piece;
        }
    }

    /// The pieces of fetched data covering `[offset, offset + len)`, or
    /// `None` when some part is not covered.
    fn cover(state: &State, offset: u64, len: u64) -> Option<Vec<Piece>> {
        let end = offset + len;
        let mut pos = offset;
        let mut pieces = Vec::new();
        while pos < end {
            if let Some(b) = state
                .buffers
                .iter()
                .rev()
                .find(|b| b.offset <= pos && pos < b.offset + b.data.len() as u64)
            {
                let stop = end.min(b.offset + b.data.len() as u64);
                let (from, to) = (
                    usize::try_from(pos - b.offset).ok()?,
                    usize::try_from(stop - b.offset).ok()?,
                );
                pieces.push(Piece::Ready(b.data.slice(from..to)));
                pos = stop;
            } else if let Some(f) = state
                .in_flight
                .iter()
                .find(|f| f.offset <= pos && pos < f.offset + f.len)
            {
                let stop = end.min(f.offset + f.len);
                pieces.push(Piece::Pending {
                    fetch: f.fetch.clone(),
                    poisoned: Arc::clone(&f.poisoned),
                    from: usize::try_from(pos - f.offset).ok()?,
                    to: usize::try_from(stop - f.offset).ok()?,
                });
                pos = stop;
            } else {
                return None;
            }
        }
        Some(pieces)
    }

    /// Resolves pieces into one buffer; `None` if a fetch failed or was
    /// poisoned by a write in the meantime.
    async fn assemble(pieces: Vec<Piece>, len: usize) -> Option<Bytes> {
        let mut parts = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match piece {
                Piece::Ready(b) => parts.push(b),
                Piece::Pending {
                    fetch,
                    poisoned,
                    from,
                    to,
                } => {
                    let data = fetch.await.ok()?;
                    if poisoned.load(Ordering::Acquire) || data.len() < to {
                        return None;
                    }
                    parts.push(data.slice(from..to));
                }
            }
        }
        if parts.len() == 1 {
            return parts.pop();
        }
        let mut out = BytesMut::with_capacity(len);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Some(out.freeze())
    }

    /// Drops every buffer and poisons every fetch overlapping a mutated
    /// range. Runs after the inner device completed (or failed) the change.
    fn invalidate(&self, offset: u64, len: u64) {
        let mut state = self.lock();
        let before = state.buffers.len();
        let mut freed = 0;
        state.buffers.retain(|b| {
            let keep = !overlaps(b.offset, b.data.len() as u64, offset, len);
            if !keep {
                freed += b.data.len() as u64;
            }
            keep
        });
        state.buffered -= freed;
        let mut dropped = (before - state.buffers.len()) as u64;
        for f in &state.in_flight {
            if overlaps(f.offset, f.len, offset, len) {
                f.poisoned.store(true, Ordering::Release);
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.invalidations.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

/// Invalidates a mutated range when dropped: after the inner device
/// completed the change, and also when the caller abandoned it half-way
/// (the change may still have reached the device).
struct Invalidate<'a, D: BlockDevice + 'static> {
    inner: &'a Inner<D>,
    offset: u64,
    len: u64,
}

impl<'a, D: BlockDevice + 'static> Invalidate<'a, D> {
    fn new(inner: &'a Inner<D>, offset: u64, len: u64) -> Self {
        // Poison fetches already running too: one that reads after the
        // change lands but finishes after this guard is gone is caught by
        // the drop; one that finishes while the change is in flight would
        // otherwise publish data of unknown age.
        inner.invalidate(offset, len);
        Self { inner, offset, len }
    }
}

impl<D: BlockDevice + 'static> Drop for Invalidate<'_, D> {
    fn drop(&mut self) {
        self.inner.invalidate(self.offset, self.len);
    }
}

#[async_trait]
impl<D: BlockDevice + 'static> BlockDevice for ReadAhead<D> {
    fn info(&self) -> DeviceInfo {
        let mut info = self.inner.device.info();
        info.caps.prefetch = true;
        info
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let info = self.info();
        check_range(&info, Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let pieces = {
            let mut state = self.inner.lock();
            self.inner.track(&mut state, offset, len as u64, info.size);
            Inner::<D>::cover(&state, offset, len as u64)
        };
        if let Some(pieces) = pieces {
            if let Some(data) = Inner::<D>::assemble(pieces, len).await {
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(data);
            }
        }
        self.inner.misses.fetch_add(1, Ordering::Relaxed);
        self.inner.device.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let _invalidate = Invalidate::new(&self.inner, offset, data.len() as u64);
        self.inner.device.write(offset, data, flags).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.device.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let _invalidate = Invalidate::new(&self.inner, offset, len);
        self.inner.device.trim(offset, len, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _invalidate = Invalidate::new(&self.inner, offset, len);
        self.inner.device.write_zeroes(offset, len, flags).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.device.extents(offset, len).await
    }

    /// Fetches the range into the read-ahead buffers (up to the buffer
    /// bound) and returns once it is there.
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let info = self.info();
        check_range(&info, Op::Prefetch, offset, len)?;
        let len = len.min(self.inner.config.max_buffered);
        let fetches: Vec<Fetch> = {
            let mut state = self.inner.lock();
            let mut fetches = Vec::new();
            let mut pos = offset;
            while pos < offset + len {
                let piece = (offset + len - pos).min(self.inner.config.max_window);
                if Inner::<D>::cover(&state, pos, piece).is_none() {
                    fetches.push(self.inner.start_fetch(&mut state, pos, piece));
                }
                pos += piece;
            }
            fetches
        };
        for fetch in fetches {
            if let Err(e) = fetch.await {
                return Err(BlockError::Io {
                    op: Op::Prefetch,
                    offset,
                    source: std::io::Error::other(e.to_string()),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;
    use async_trait::async_trait;

    fn small() -> ReadAheadConfig {
        ReadAheadConfig {
            min_window: 4096,
            max_window: 64 * 1024,
            max_buffered: 256 * 1024,
            streams: 2,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_reads_hit_after_warm_up() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let dev = ReadAhead::with_config(MemDevice::from_bytes(&data), small());
        let mut pos = 0;
        while pos + 4096 <= data.len() {
            let got = dev.read(pos as u64, 4096).await.unwrap();
            assert_eq!(&got[..], &data[pos..pos + 4096]);
            pos += 4096;
        }
        let s = dev.stats();
        assert!(s.hits > s.misses * 4, "hits {} misses {}", s.hits, s.misses);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_reads_do_not_fetch() {
        let dev = ReadAhead::with_config(MemDevice::new(1 << 20), small());
        for i in 0..50u64 {
            dev.read((i * 7919 * 4096) % (1 << 20) / 4096 * 4096, 4096)
                .await
                .unwrap();
        }
        assert_eq!(dev.stats().fetched_bytes, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_invalidate_prefetched_data() {
        let dev = ReadAhead::with_config(MemDevice::new(1 << 20), small());
        dev.prefetch(0, 64 * 1024).await.unwrap();
        dev.write(8192, Bytes::from_static(&[9; 100]), WriteFlags::default())
            .await
            .unwrap();
        let got = dev.read(8192, 100).await.unwrap();
        assert!(got.iter().all(|&b| b == 9));
        dev.prefetch(0, 64 * 1024).await.unwrap();
        dev.write_zeroes(8192, 50, ZeroFlags::default())
            .await
            .unwrap();
        let got = dev.read(8192, 100).await.unwrap();
        assert!(got[..50].iter().all(|&b| b == 0));
        assert!(got[50..].iter().all(|&b| b == 9));
        assert!(dev.stats().invalidations >= 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_never_leave_stale_buffers() {
        // Readers stream sequentially (keeping fetches in flight) while a
        // writer keeps overwriting; after each write returns, a read of the
        // written range must see it.
        let dev = Arc::new(ReadAhead::with_config(MemDevice::new(1 << 20), small()));
        let reader = {
            let dev = Arc::clone(&dev);
            tokio::spawn(async move {
                for round in 0..20u64 {
                    let mut pos = (round * 4096) % 65536;
                    while pos + 8192 <= 1 << 20 {
                        dev.read(pos, 8192).await.unwrap();
                        pos += 8192;
                    }
                }
            })
        };
        for i in 0..400u64 {
            let offset = (i * 12_288) % ((1 << 20) - 4096);
            #[allow(clippy::cast_possible_truncation)]
            let fill = (i % 200) as u8 + 1;
            dev.write(offset, Bytes::from(vec![fill; 4096]), WriteFlags::default())
                .await
                .unwrap();
            let got = dev.read(offset, 4096).await.unwrap();
            assert!(got.iter().all(|&b| b == fill), "stale data after write {i}");
            tokio::task::yield_now().await;
        }
        reader.await.unwrap();
    }

    /// Applies writes at once, then stays pending: the caller gives up on
    /// a write that did reach the device.
    #[derive(Debug)]
    struct LandsThenHangs(MemDevice);

    #[async_trait]
    impl BlockDevice for LandsThenHangs {
        fn info(&self) -> DeviceInfo {
            self.0.info()
        }
        async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
            self.0.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
            self.0.write(offset, data, flags).await?;
            std::future::pending().await
        }
        async fn flush(&self) -> Result<()> {
            self.0.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
            self.0.trim(offset, len, flags).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
            self.0.write_zeroes(offset, len, flags).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoned_write_still_invalidates() {
        let dev = ReadAhead::with_config(LandsThenHangs(MemDevice::new(1 << 20)), small());
        dev.prefetch(0, 64 * 1024).await.unwrap();
        let write = dev.write(4096, Bytes::from_static(&[5; 512]), WriteFlags::default());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), write)
                .await
                .is_err(),
            "the test device's write should hang"
        );
        let got = dev.read(4096, 512).await.unwrap();
        assert!(got.iter().all(|&b| b == 5), "stale read-ahead data served");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_fetches_stay_within_the_memory_bound() {
        let cfg = ReadAheadConfig {
            min_window: 64 * 1024,
            max_window: 1 << 20,
            max_buffered: 2 << 20,
            streams: 8,
        };
        let dev = ReadAhead::with_config(MemDevice::new(64 << 20), cfg);
        // Many short sequential streams at scattered offsets: each would
        // start its own look-ahead.
        for stream in 0..32u64 {
            let base = stream * (2 << 20);
            for i in 0..4 {
                dev.read(base + i * 65536, 65536).await.unwrap();
            }
            let fetching = dev.inner.lock().fetching;
            assert!(
                fetching <= cfg.max_buffered,
                "{fetching} bytes being fetched"
            );
        }
    }

    #[test]
    fn conformance_over_memory() {
        crate::conformance::run(|| ReadAhead::with_config(MemDevice::new(300_000), small()));
    }
}
