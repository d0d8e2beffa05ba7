//! The edge's cache in the simulation: [`SimCache`], a model of
//! `cache::CachedDevice` with its real rule (a fill is kept only if no
//! mutation touched its chunk since the fill's snapshot), over
//! [`RemoteQueue`], the reads the simulation carries to the edge's
//! session. RocksDB and the encrypted slots are not simulated: their own
//! crash tests cover them; what matters here is when data may enter the
//! cache and when it must leave.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use blockcore::{BlockError, Op};
use bytes::{Bytes, BytesMut};
use edge::ReadThrough;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Slot {
    result: Option<Result<Bytes, String>>,
    waker: Option<Waker>,
}

#[derive(Debug, Default)]
struct RemoteState {
    next: u64,
    /// Reads not yet handed to the session: (slot, offset, len).
    waiting: VecDeque<(u64, u64, u32)>,
    slots: BTreeMap<u64, Slot>,
}

/// Reads the edge's cache asks of the origin, waiting for the simulation
/// to carry them through the session.
#[derive(Debug, Default)]
pub struct RemoteQueue {
    state: Mutex<RemoteState>,
}

impl RemoteQueue {
    /// Reads `len` bytes at `offset` from the origin.
    pub fn read(self: &Arc<Self>, offset: u64, len: u32) -> RemoteRead {
        let mut s = lock(&self.state);
        s.next += 1;
        let slot = s.next;
        s.waiting.push_back((slot, offset, len));
        s.slots.insert(slot, Slot::default());
        RemoteRead {
            queue: self.clone(),
            slot,
        }
    }

    /// The reads to send now.
    pub fn take_requests(&self) -> Vec<(u64, u64, u32)> {
        lock(&self.state).waiting.drain(..).collect()
    }

    /// The session answered read `slot`.
    pub fn complete(&self, slot: u64, result: Result<Bytes, String>) {
        let waker = {
            let mut s = lock(&self.state);
            let Some(sl) = s.slots.get_mut(&slot) else {
                return;
            };
            sl.result = Some(result);
            sl.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// See [`RemoteQueue::read`].
#[derive(Debug)]
pub struct RemoteRead {
    queue: Arc<RemoteQueue>,
    slot: u64,
}

impl Future for RemoteRead {
    type Output = Result<Bytes, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = lock(&self.queue.state);
        let sl = s.slots.get_mut(&self.slot).expect("a live slot");
        if let Some(r) = sl.result.take() {
            s.slots.remove(&self.slot);
            return Poll::Ready(r);
        }
        sl.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for RemoteRead {
    fn drop(&mut self) {
        lock(&self.queue.state).slots.remove(&self.slot);
    }
}

#[derive(Debug, Default)]
struct CacheState {
    chunks: BTreeMap<u64, Bytes>,
    epochs: BTreeMap<u64, u64>,
}

/// The cache model. See the module docs.
#[derive(Debug)]
pub struct SimCache {
    chunk: u64,
    size: u64,
    capacity: usize,
    remote: Arc<RemoteQueue>,
    state: Mutex<CacheState>,
}

/// Mutation counters of a run of chunks at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot(Vec<(u64, u64)>);

impl SimCache {
    pub fn new(chunk: u64, size: u64, capacity: usize, remote: Arc<RemoteQueue>) -> Self {
        SimCache {
            chunk,
            size,
            capacity,
            remote,
            state: Mutex::default(),
        }
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / self.chunk..=(offset + len.max(1) - 1) / self.chunk
    }

    fn epoch(st: &CacheState, c: u64) -> u64 {
        st.epochs.get(&c).copied().unwrap_or(0)
    }

    /// Keeps `data` (chunk `c`, whole) unless chunk `c` changed since `at`.
    fn fill(&self, st: &mut CacheState, c: u64, data: Bytes, at: u64) {
        if Self::epoch(st, c) != at {
            return;
        }
        st.chunks.insert(c, data);
        while st.chunks.len() > self.capacity {
            // The oldest chunk number goes: deterministic, and enough to
            // make chunks come and go.
            let victim = *st.chunks.keys().next().expect("not empty");
            st.chunks.remove(&victim);
        }
    }

    /// Drops `n` chunks chosen by `pick` (eviction under pressure).
    pub fn evict(&self, mut pick: impl FnMut(usize) -> usize, n: usize) {
        let mut st = lock(&self.state);
        for _ in 0..n {
            if st.chunks.is_empty() {
                return;
            }
            let i = pick(st.chunks.len()) % st.chunks.len();
            let c = *st.chunks.keys().nth(i).expect("in range");
            st.chunks.remove(&c);
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.state).chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl ReadThrough for SimCache {
    type Snapshot = Snapshot;

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        let range = self.chunks(offset, len as u64);
        let (first, last) = (*range.start(), *range.end());
        let mut have: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut snaps = BTreeMap::new();
        {
            let st = lock(&self.state);
            for c in first..=last {
                match st.chunks.get(&c) {
                    Some(d) => {
                        have.insert(c, d.clone());
                    }
                    None => {
                        snaps.insert(c, Self::epoch(&st, c));
                    }
                }
            }
        }
        // Runs of misses, one origin read each.
        let misses: Vec<u64> = snaps.keys().copied().collect();
        let mut i = 0;
        while i < misses.len() {
            let mut j = i;
            while j + 1 < misses.len() && misses[j + 1] == misses[j] + 1 {
                j += 1;
            }
            let start = misses[i] * self.chunk;
            let end = ((misses[j] + 1) * self.chunk).min(self.size);
            let n = u32::try_from(end - start).expect("small");
            let data = self
                .remote
                .read(start, n)
                .await
                .map_err(|e| BlockError::Io {
                    op: Op::Read,
                    offset: start,
                    source: std::io::Error::other(e),
                })?;
            let mut st = lock(&self.state);
            for c in misses[i]..=misses[j] {
                let s = usize::try_from(c * self.chunk - start).expect("small");
                let e = (s + usize::try_from(self.chunk).expect("small")).min(data.len());
                let piece = data.slice(s..e);
                self.fill(&mut st, c, piece.clone(), snaps[&c]);
                have.insert(c, piece);
            }
            i = j + 1;
        }
        let mut out = BytesMut::with_capacity(len);
        for (c, d) in have {
            let c0 = c * self.chunk;
            let s = offset.saturating_sub(c0);
            let e = (offset + len as u64 - c0).min(d.len() as u64);
            out.extend_from_slice(
                &d[usize::try_from(s).expect("small")..usize::try_from(e).expect("small")],
            );
        }
        Ok(out.freeze())
    }

    async fn prefetch(&self, _offset: u64, _len: u64) -> blockcore::Result<()> {
        Ok(())
    }

    async fn invalidate(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        let mut st = lock(&self.state);
        for c in self.chunks(offset, len) {
            *st.epochs.entry(c).or_default() += 1;
            st.chunks.remove(&c);
        }
        Ok(())
    }

    fn snapshot(&self, offset: u64, len: u64) -> Snapshot {
        let st = lock(&self.state);
        Snapshot(
            self.chunks(offset, len)
                .map(|c| (c, Self::epoch(&st, c)))
                .collect(),
        )
    }

    async fn offer(&self, offset: u64, data: Bytes, since: &Snapshot) {
        let mut st = lock(&self.state);
        for &(c, at) in &since.0 {
            let c0 = c * self.chunk;
            let c1 = (c0 + self.chunk).min(self.size);
            // Whole chunks only.
            if c0 < offset || c1 > offset + data.len() as u64 {
                continue;
            }
            let s = usize::try_from(c0 - offset).expect("small");
            let e = usize::try_from(c1 - offset).expect("small");
            self.fill(&mut st, c, data.slice(s..e), at);
        }
    }
}
