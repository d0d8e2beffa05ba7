//! Statistics layer: counts operations, bytes, errors and time spent per
//! operation, in the spirit of nbdkit's `stats` filter. Lock-free counters,
//! so it can sit on the hot path of every export.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{BlockDevice, DeviceInfo, Extent, Op, Result, WriteFlags, ZeroFlags};

const OPS: [Op; 7] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::Extents,
    Op::Prefetch,
];

fn slot(op: Op) -> usize {
    match op {
        Op::Read => 0,
        Op::Write => 1,
        Op::Flush => 2,
        Op::Trim => 3,
        Op::WriteZeroes => 4,
        Op::Extents => 5,
        Op::Prefetch => 6,
    }
}

#[derive(Debug, Default)]
struct Counters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
}

/// Counts of one operation at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    pub ops: u64,
    /// Bytes read, written, trimmed, zeroed, described or prefetched.
    pub bytes: u64,
    pub errors: u64,
    /// Total time spent in the inner device, in nanoseconds.
    pub nanos: u64,
}

/// A snapshot of every operation's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    per_op: [OpStats; 7],
}

impl StatsSnapshot {
    pub fn get(&self, op: Op) -> OpStats {
        self.per_op[slot(op)]
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for op in OPS {
            let s = self.get(op);
            if s.ops == 0 {
                continue;
            }
            #[allow(clippy::cast_precision_loss)]
            let mean_us = s.nanos as f64 / s.ops as f64 / 1000.0;
            writeln!(
                f,
                "{op:>14}: {ops} ops, {bytes} bytes, {errors} errors, mean {mean_us:.1} us",
                ops = s.ops,
                bytes = s.bytes,
                errors = s.errors,
            )?;
        }
        Ok(())
    }
}

/// Wraps a device and counts what passes through.
#[derive(Debug)]
pub struct Stats<D> {
    inner: D,
    counters: [Counters; 7],
}

impl<D: BlockDevice> Stats<D> {
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            counters: Default::default(),
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut snap = StatsSnapshot::default();
        for op in OPS {
            let c = &self.counters[slot(op)];
            snap.per_op[slot(op)] = OpStats {
                ops: c.ops.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                nanos: c.nanos.load(Ordering::Relaxed),
            };
        }
        snap
    }

    fn record<T>(&self, op: Op, bytes: u64, started: Instant, result: &Result<T>) {
        let c = &self.counters[slot(op)];
        c.ops.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        c.nanos.fetch_add(nanos, Ordering::Relaxed);
        if result.is_ok() {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl<D: BlockDevice> BlockDevice for Stats<D> {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let started = Instant::now();
        let r = self.inner.read(offset, len).await;
        self.record(Op::Read, len as u64, started, &r);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let started = Instant::now();
        let len = data.len() as u64;
        let r = self.inner.write(offset, data, flags).await;
        self.record(Op::Write, len, started, &r);
        r
    }

    async fn flush(&self) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.flush().await;
        self.record(Op::Flush, 0, started, &r);
        r
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.trim(offset, len, flags).await;
        self.record(Op::Trim, len, started, &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.write_zeroes(offset, len, flags).await;
        self.record(Op::WriteZeroes, len, started, &r);
        r
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let started = Instant::now();
        let r = self.inner.extents(offset, len).await;
        let described = r.as_ref().map_or(0, |e| e.iter().map(|e| e.len).sum());
        self.record(Op::Extents, described, started, &r);
        r
    }

    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.prefetch(offset, len).await;
        self.record(Op::Prefetch, len, started, &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[tokio::test]
    async fn counts_bytes_and_errors() {
        let dev = Stats::new(MemDevice::new(4096));
        dev.write(0, Bytes::from_static(&[1; 100]), WriteFlags::default())
            .await
            .unwrap();
        dev.read(0, 50).await.unwrap();
        dev.read(4000, 200).await.unwrap_err();
        let snap = dev.snapshot();
        assert_eq!(snap.get(Op::Write).bytes, 100);
        assert_eq!(snap.get(Op::Read).ops, 2);
        assert_eq!(snap.get(Op::Read).bytes, 50);
        assert_eq!(snap.get(Op::Read).errors, 1);
        assert!(snap.to_string().contains("read: 2 ops"));
    }

    #[test]
    fn conformance() {
        crate::conformance::run(|| Stats::new(MemDevice::new(300_000)));
    }
}
