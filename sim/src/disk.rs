//! [`SimDisk`]: the origin's volume as a disk with a volatile write cache.
//!
//! Writes land in the cache; `flush` makes them durable. A power loss
//! keeps or drops each written-but-unflushed 512-byte sector on its own, so
//! a write the power cut is torn at sector boundaries, as on a real disk.
//! Faults: the next `n` writes fail, the next flush fails.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::exec::Clock;

use async_trait::async_trait;
use blockcore::{
    check_range, BlockDevice, BlockError, BlockSizes, Capabilities, DeviceInfo, Op, WriteFlags,
    ZeroFlags,
};
use bytes::Bytes;

/// The unit a power loss tears writes at.
pub const SECTOR: usize = 512;

#[derive(Debug, Default)]
struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Sectors written since the last flush.
    dirty: BTreeSet<usize>,
    fail_writes: u32,
    fail_flush: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct SimDisk {
    state: Mutex<State>,
    size: u64,
    /// While set, a flush takes this long (virtual time): applies then
    /// overlap reads, reconnections and other applies, as on a real disk.
    slow_flush: Mutex<Option<(Clock, Duration, fastrand::Rng)>>,
}

impl SimDisk {
    pub fn new(content: Vec<u8>) -> Self {
        SimDisk {
            slow_flush: Mutex::new(None),
            size: content.len() as u64,
            state: Mutex::new(State {
                durable: content.clone(),
                current: content,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a reader sees now.
    pub fn content(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// The power fails: each unflushed sector survives or not as
    /// `keep(sector)` says. Faults are cleared.
    pub fn power_loss(&self, mut keep: impl FnMut(usize) -> bool) {
        let mut s = self.lock();
        let dirty = std::mem::take(&mut s.dirty);
        for sector in dirty {
            let r = sector * SECTOR..(sector + 1) * SECTOR;
            if keep(sector) {
                let (cur, dur) = (&s.current[r.clone()].to_vec(), r.clone());
                s.durable[dur].copy_from_slice(cur);
            } else {
                let old = s.durable[r.clone()].to_vec();
                s.current[r].copy_from_slice(&old);
            }
        }
        s.fail_writes = 0;
        s.fail_flush = false;
    }

    /// Flushes take about `mean` of `clock`'s time from now on
    /// (exponentially distributed, drawn from `seed`; `None`: no time, as
    /// while the origin opens, which must complete at once).
    pub fn set_flush_latency(&self, latency: Option<(Clock, Duration, u64)>) {
        *self
            .slow_flush
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            latency.map(|(c, mean, seed)| (c, mean, fastrand::Rng::with_seed(seed)));
    }

    /// The next `n` writes (or zeroes) fail with EIO.
    pub fn fail_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    /// The next flush fails with EIO.
    pub fn fail_flush(&self) {
        self.lock().fail_flush = true;
    }

    fn store(&self, op: Op, offset: u64, data: &[u8]) -> blockcore::Result<()> {
        let mut s = self.lock();
        if s.fail_writes > 0 {
            s.fail_writes -= 1;
            return Err(BlockError::io(
                op,
                offset,
                std::io::Error::other("injected disk write fault"),
            ));
        }
        let o = usize::try_from(offset).expect("in range");
        s.current[o..o + data.len()].copy_from_slice(data);
        for sector in o / SECTOR..(o + data.len()).div_ceil(SECTOR) {
            s.dirty.insert(sector);
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for SimDisk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size,
            block_sizes: BlockSizes::DEFAULT,
            caps: Capabilities {
                read_only: false,
                flush: true,
                fua: false,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                extents: false,
                prefetch: false,
                multi_conn: true,
            },
        }
    }

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        check_range(&self.info(), Op::Read, offset, len as u64)?;
        let o = usize::try_from(offset).expect("in range");
        Ok(Bytes::copy_from_slice(&self.lock().current[o..o + len]))
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> blockcore::Result<()> {
        check_range(&self.info(), Op::Write, offset, data.len() as u64)?;
        self.store(Op::Write, offset, &data)
    }

    async fn flush(&self) -> blockcore::Result<()> {
        let slow = self
            .slow_flush
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .map(|(clock, mean, rng)| {
                let u = rng.f64().max(1e-9);
                (clock.clone(), mean.mul_f64((-u.ln()).min(20.0)))
            });
        if let Some((clock, d)) = slow {
            clock.sleep(d).await;
        }
        let mut s = self.lock();
        if std::mem::take(&mut s.fail_flush) {
            return Err(BlockError::io(
                Op::Flush,
                0,
                std::io::Error::other("injected flush fault"),
            ));
        }
        let dirty = std::mem::take(&mut s.dirty);
        for sector in dirty {
            let r = sector * SECTOR..(sector + 1) * SECTOR;
            let cur = s.current[r.clone()].to_vec();
            s.durable[r].copy_from_slice(&cur);
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _flags: WriteFlags) -> blockcore::Result<()> {
        self.write_zeroes(offset, len, ZeroFlags::default()).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _flags: ZeroFlags,
    ) -> blockcore::Result<()> {
        check_range(&self.info(), Op::WriteZeroes, offset, len)?;
        let zeroes = vec![0; usize::try_from(len).expect("in range")];
        self.store(Op::WriteZeroes, offset, &zeroes)
    }
}
