//! Copy-on-write: a read-only base device plus a delta that takes every
//! write, with its own map of what it holds.
//!
//! ```text
//!   write/trim/zero ──> delta (sparse file, whole blocks composed)
//!   read ──> the delta where it holds data, the base elsewhere
//!   flush ──> fdatasync the delta (the base is never written)
//! ```
//!
//! This is the local-only overlay ([`LocalOverlay`]) with one range, the
//! whole device, over a base that refuses writes: the same sparse file,
//! the same three rules (whole-block composition, zeroes written as real
//! data so they mask the base, the file's own allocation as the map) and
//! so the same crash safety, the same on-disk format (`NAME.img`, the delta,
//! exactly the device's size; `NAME.meta`, with `range 0 SIZE`), reopened
//! the same way. A SIGKILL at any point leaves every block of the delta
//! either a hole (reads the base) or allocated with its composed content.
//!
//! Layers stack: the base may itself be a [`CowDevice`], which is how the
//! origin keeps a volume's snapshots (each frozen layer is one snapshot,
//! the top one takes the writes). Two operations exist for that:
//!
//! - [`CowDevice::materialize`] copies what the base shows into the
//!   delta's holes over a range, without changing any byte read (so a
//!   crash part way changes nothing either);
//! - [`CowDevice::rebase`] swaps the base for another device that reads
//!   the same wherever the delta has no data: after materializing the old
//!   base's own delta into this one, the old base can be bypassed.
//!
//! The base must not change under the delta (except by `rebase` as above):
//! the layer lays writes over a frozen image. Flush the base before
//! laying a delta over it if it has unflushed writes.

use std::fmt;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use super::overlay::{meta_path, LocalOverlay, LocalRanges};
use crate::{
    check_range, BlockDevice, Capabilities, DeviceInfo, Extent, Op, Result, WriteFlags, ZeroFlags,
};

/// The base as the delta sees it: read-only, and replaceable by
/// [`CowDevice::rebase`].
struct Base {
    dev: RwLock<Arc<dyn BlockDevice>>,
    info: DeviceInfo,
}

impl fmt::Debug for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Base")
            .field("dev", &self.current())
            .finish_non_exhaustive()
    }
}

impl Base {
    fn new(dev: Arc<dyn BlockDevice>) -> Base {
        let i = dev.info();
        Base {
            info: DeviceInfo {
                size: i.size,
                block_sizes: i.block_sizes,
                caps: Capabilities {
                    read_only: true,
                    flush: true,
                    fua: false,
                    trim: false,
                    write_zeroes: false,
                    fast_zero: false,
                    extents: i.caps.extents,
                    prefetch: i.caps.prefetch,
                    multi_conn: i.caps.multi_conn,
                },
            },
            dev: RwLock::new(dev),
        }
    }

    fn current(&self) -> Arc<dyn BlockDevice> {
        self.dev
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[async_trait]
impl BlockDevice for Base {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.current().read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_range(&self.info, Op::Write, offset, data.len() as u64)
    }

    /// Nothing is ever written through the base.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _flags: WriteFlags) -> Result<()> {
        check_range(&self.info, Op::Trim, offset, len)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_range(&self.info, Op::WriteZeroes, offset, len)
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.current().extents(offset, len).await
    }

    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.current().prefetch(offset, len).await
    }
}

/// A read-only base plus a writable delta; see the module docs.
pub struct CowDevice {
    overlay: LocalOverlay<Base>,
}

impl fmt::Debug for CowDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CowDevice")
            .field("delta", &self.overlay.image())
            .field("base", &self.overlay.inner().current())
            .finish_non_exhaustive()
    }
}

impl CowDevice {
    /// Opens (or creates, empty) the delta `delta` (`NAME.img`, with
    /// `NAME.meta` next to it) over `base`, bound to `tag` (one line naming
    /// what the delta belongs to): a delta made for another size or tag is
    /// refused. Blocking (a few small synced writes when it creates the
    /// delta): call it off the async workers, or accept a short stall.
    pub fn open(
        base: Arc<dyn BlockDevice>,
        delta: impl AsRef<Path>,
        tag: &str,
    ) -> io::Result<Self> {
        let overlay =
            LocalOverlay::open_tagged(Base::new(base), delta, &LocalRanges::Everything, tag)?;
        Ok(CowDevice { overlay })
    }

    /// Opens an existing delta only: refuses (`NotFound`) rather than
    /// create an empty one when its files are gone (a layer that held
    /// data must never silently come back empty).
    pub fn open_existing(
        base: Arc<dyn BlockDevice>,
        delta: impl AsRef<Path>,
        tag: &str,
    ) -> io::Result<Self> {
        let delta = delta.as_ref();
        for p in [meta_path(delta), delta.to_path_buf()] {
            if !p.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the copy-on-write delta file {} is missing", p.display()),
                ));
            }
        }
        Self::open(base, delta, tag)
    }

    /// Removes a delta's files (the image first: an image never exists
    /// without its metadata), durably. Missing files are not an error.
    pub fn remove_files(delta: &Path) -> io::Result<()> {
        use crate::storage::Storage;
        for p in [delta.to_path_buf(), meta_path(delta)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let dir = delta
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        crate::storage::DiskStorage.sync_dir(dir)
    }

    /// The delta's image file.
    pub fn delta(&self) -> &Path {
        self.overlay.image()
    }

    /// The delta's metadata file.
    pub fn delta_meta(&self) -> PathBuf {
        meta_path(self.overlay.image())
    }

    /// The device under the delta.
    pub fn base(&self) -> Arc<dyn BlockDevice> {
        self.overlay.inner().current()
    }

    /// Replaces the base with `base`, which must read the same as the
    /// current one wherever the delta has no data (see the module docs:
    /// the caller's promise, not checked). Reads in flight finish on
    /// either. Refuses another size.
    pub fn rebase(&self, base: Arc<dyn BlockDevice>) -> io::Result<()> {
        let (want, got) = (self.overlay.inner().info.size, base.info().size);
        if want != got {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot rebase a {want}-byte delta onto a {got}-byte device"),
            ));
        }
        *self
            .overlay
            .inner()
            .dev
            .write()
            .unwrap_or_else(PoisonError::into_inner) = base;
        Ok(())
    }

    /// The byte ranges of `[offset, offset + len)` the delta holds (whole
    /// blocks; sorted, disjoint).
    pub async fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<Range<u64>>> {
        self.overlay.local_data(offset, len).await
    }

    /// Copies what the base shows into the delta's holes over
    /// `[offset, offset + len)` (widened to whole blocks); reads return
    /// the same before, during and after. See
    /// [`LocalOverlay::materialize`].
    pub async fn materialize(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay.materialize(offset, len).await
    }

    /// Bytes the delta file has allocated on disk.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        self.overlay.allocated_bytes()
    }

    /// The block size writes are composed in.
    pub fn block_size(&self) -> u64 {
        self.overlay.block_size()
    }
}

#[async_trait]
impl BlockDevice for CowDevice {
    fn info(&self) -> DeviceInfo {
        self.overlay.info()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.overlay.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.overlay.write(offset, data, flags).await
    }

    async fn flush(&self) -> Result<()> {
        self.overlay.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.overlay.trim(offset, len, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.overlay.write_zeroes(offset, len, flags).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.overlay.extents(offset, len).await
    }

    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay.prefetch(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExtentKind, MemDevice};
    use std::sync::Mutex;

    /// Not a multiple of any block size: the last block is partial.
    const SIZE: u64 = 300_000;

    /// A position-dependent, non-zero pattern: what the base holds.
    fn base_bytes(size: u64) -> Vec<u8> {
        #[allow(clippy::cast_possible_truncation)]
        (0..size).map(|i| (i % 251) as u8 + 1).collect()
    }

    fn base() -> Arc<MemDevice> {
        Arc::new(MemDevice::from_bytes(&base_bytes(SIZE)))
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn u(v: u64) -> usize {
        usize::try_from(v).unwrap()
    }

    fn open_in(dir: &Path, base: Arc<dyn BlockDevice>, name: &str) -> CowDevice {
        CowDevice::open(base, dir.join(format!("{name}.img")), "test").expect("open the delta")
    }

    async fn whole(dev: &dyn BlockDevice) -> Vec<u8> {
        dev.read(0, u(dev.info().size)).await.unwrap().to_vec()
    }

    #[test]
    fn conformance_over_a_read_only_base_which_is_never_written() {
        let bases: Mutex<Vec<Arc<MemDevice>>> = Mutex::new(Vec::new());
        crate::conformance::run_with(
            crate::conformance::Settings {
                cases: 32,
                max_steps: 40,
            },
            || {
                // The directory goes at once; the open file lives on.
                let dir = tmp();
                let b = base();
                bases.lock().unwrap().push(b.clone());
                open_in(dir.path(), b, "delta")
            },
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let want = base_bytes(SIZE);
        for b in bases.lock().unwrap().iter() {
            assert!(rt.block_on(whole(b.as_ref())) == want, "the base changed");
        }
    }

    #[test]
    fn conformance_over_a_stack_of_layers() {
        // A frozen middle layer with data of its own (partial blocks,
        // zeroes), shared by every case: only the top one is written.
        let dir = tmp();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let middle: Arc<CowDevice> = Arc::new(open_in(dir.path(), base(), "middle"));
        rt.block_on(async {
            middle
                .write(1000, Bytes::from(vec![0x5a; 70_000]), WriteFlags::default())
                .await
                .unwrap();
            middle
                .write_zeroes(150_000, 33_333, ZeroFlags::default())
                .await
                .unwrap();
            middle.flush().await.unwrap();
        });
        let frozen = rt.block_on(whole(middle.as_ref()));
        crate::conformance::run_with(
            crate::conformance::Settings {
                cases: 24,
                max_steps: 40,
            },
            || {
                let top_dir = tmp();
                open_in(top_dir.path(), middle.clone(), "top")
            },
        );
        assert!(
            rt.block_on(whole(middle.as_ref())) == frozen,
            "the middle layer changed"
        );
    }

    #[tokio::test]
    async fn a_read_only_base_gives_a_writable_layer_and_zeroes_mask_it() {
        let dir = tmp();
        let ro: Arc<dyn BlockDevice> = Arc::new(Base::new(base()));
        assert!(ro.info().caps.read_only);
        let dev = open_in(dir.path(), ro, "d");
        assert!(!dev.info().caps.read_only);
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
        let got = whole(&dev).await;
        let b = base_bytes(SIZE);
        for (i, &x) in got.iter().enumerate() {
            let zero = (10_000..60_000).contains(&i) || (100_001..130_001).contains(&i);
            assert_eq!(x, if zero { 0 } else { b[i] }, "byte {i}");
        }
        // The zeroes are data in the delta (whole blocks), never holes.
        let bs = dev.block_size();
        let map = dev.data_ranges(0, SIZE).await.unwrap();
        let lo = |v: u64| v / bs * bs;
        let hi = |v: u64| v.div_ceil(bs) * bs;
        let want = if hi(60_000) < lo(100_001) {
            vec![lo(10_000)..hi(60_000), lo(100_001)..hi(130_001)]
        } else {
            // Both ranges share a block: one range.
            std::iter::once(lo(10_000)..hi(130_001)).collect()
        };
        assert_eq!(map, want);
        let e = dev.extents(lo(10_000), hi(60_000) - lo(10_000)).await;
        assert!(
            e.unwrap().iter().all(|e| e.kind == ExtentKind::Data),
            "zeroes over the base must read as data"
        );
    }

    #[tokio::test]
    async fn materialize_and_rebase_keep_every_byte() {
        let dir = tmp();
        let b = base();
        let lower = Arc::new(open_in(dir.path(), b.clone(), "lower"));
        lower
            .write(5000, Bytes::from(vec![0x11; 40_000]), WriteFlags::default())
            .await
            .unwrap();
        lower
            .write_zeroes(200_000, 7000, ZeroFlags::default())
            .await
            .unwrap();
        lower
            .write(
                SIZE - 100,
                Bytes::from(vec![0x12; 100]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        let upper = open_in(dir.path(), lower.clone(), "upper");
        upper
            .write(
                30_000,
                Bytes::from(vec![0x22; 20_000]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        let before = whole(&upper).await;
        // Materializing the lower layer's data changes no byte...
        let ranges = lower.data_ranges(0, SIZE).await.unwrap();
        assert!(!ranges.is_empty());
        for r in &ranges {
            upper.materialize(r.start, r.end - r.start).await.unwrap();
            assert!(whole(&upper).await == before, "materialize changed a byte");
        }
        // ...and leaves the upper holding all of it, so the lower layer
        // can be bypassed.
        let held = upper.data_ranges(0, SIZE).await.unwrap();
        for r in &ranges {
            assert!(
                held.iter().any(|h| h.start <= r.start && r.end <= h.end),
                "{r:?} not held: {held:?}"
            );
        }
        upper.rebase(b.clone()).unwrap();
        assert!(whole(&upper).await == before, "rebase changed a byte");
        let small: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(SIZE - 1));
        assert_eq!(
            upper.rebase(small).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn materialize_never_undoes_a_racing_write() {
        let dir = tmp();
        let lower = Arc::new(open_in(dir.path(), base(), "lower"));
        lower
            .write(0, Bytes::from(vec![0x33; u(SIZE)]), WriteFlags::default())
            .await
            .unwrap();
        let upper = Arc::new(open_in(dir.path(), lower.clone(), "upper"));
        let writer = {
            let upper = upper.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0..200u64 {
                    let at = (i * 7919 * 13) % (SIZE - 64);
                    let byte = u8::try_from(i % 200).unwrap() + 40;
                    upper
                        .write(at, Bytes::from(vec![byte; 64]), WriteFlags::default())
                        .await
                        .unwrap();
                    done.push((at, byte));
                    tokio::task::yield_now().await;
                }
                done
            })
        };
        upper.materialize(0, SIZE).await.unwrap();
        let done = writer.await.unwrap();
        let mut want = vec![0x33; u(SIZE)];
        for (at, byte) in done {
            want[u(at)..u(at) + 64].fill(byte);
        }
        assert!(whole(upper.as_ref()).await == want, "a write was lost");
        assert_eq!(upper.data_ranges(0, SIZE).await.unwrap(), vec![0..SIZE]);
    }

    #[tokio::test]
    async fn reopening_keeps_the_delta_and_refuses_what_does_not_match() {
        let dir = tmp();
        let path = dir.path().join("d.img");
        let b = base();
        {
            let dev = CowDevice::open(b.clone(), &path, "vol/1").unwrap();
            dev.write(777, Bytes::from(vec![9; 5000]), WriteFlags::default())
                .await
                .unwrap();
            dev.flush().await.unwrap();
        }
        let dev = CowDevice::open_existing(b.clone(), &path, "vol/1").unwrap();
        let mut want = base_bytes(SIZE);
        want[777..5777].fill(9);
        assert!(whole(&dev).await == want);
        assert!(dev.allocated_bytes().unwrap() >= 5000);
        assert_eq!(dev.delta(), path);
        drop(dev);
        let err = CowDevice::open(b.clone(), &path, "vol/2").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let other: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(SIZE + 4096));
        let err = CowDevice::open(other, &path, "vol/1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // Gone files are an error, not a fresh empty layer.
        CowDevice::remove_files(&path).unwrap();
        assert!(!path.exists() && !meta_path(&path).exists());
        let err = CowDevice::open_existing(b.clone(), &path, "vol/1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        CowDevice::remove_files(&path).unwrap();
    }

    /// One change of the crash test.
    #[derive(Clone, Copy, Debug)]
    enum Change {
        Write { at: u64, len: u64, byte: u8 },
        Zero { at: u64, len: u64 },
    }

    /// The changes of step `step` of crash round `round`: deterministic.
    fn changes(round: u64, step: u64) -> Vec<Change> {
        let mut rng = testkit::rng(round * 1_000_003 + step);
        let byte = u8::try_from(step % 200).unwrap() + 20;
        (0..12)
            .map(|_| {
                let at = rng.u64(0..SIZE - 1);
                let len = rng.u64(1..=30_000).min(SIZE - at);
                if rng.u8(0..5) == 0 {
                    Change::Zero { at, len }
                } else {
                    Change::Write { at, len, byte }
                }
            })
            .collect()
    }

    fn apply(model: &mut [u8], c: Change) {
        match c {
            Change::Write { at, len, byte } => model[u(at)..u(at + len)].fill(byte),
            Change::Zero { at, len } => model[u(at)..u(at + len)].fill(0),
        }
    }

    /// The child: step after step of changes, each flushed and reported,
    /// until it is killed.
    async fn crash_child(child: &testkit::crash::Child) {
        let dir = child.dir().join(format!("round-{}", child.round()));
        fs::create_dir_all(&dir).unwrap();
        let dev = open_in(&dir, base(), "delta");
        for step in 0.. {
            for c in changes(child.round(), step) {
                match c {
                    Change::Write { at, len, byte } => {
                        let data = Bytes::from(vec![byte; u(len)]);
                        dev.write(at, data, WriteFlags::default()).await.unwrap();
                    }
                    Change::Zero { at, len } if at % 2 == 0 => {
                        dev.write_zeroes(at, len, ZeroFlags::default())
                            .await
                            .unwrap();
                    }
                    Change::Zero { at, len } => {
                        dev.trim(at, len, WriteFlags::default()).await.unwrap();
                    }
                }
            }
            dev.flush().await.unwrap();
            child.report(format!("flushed {step}"));
        }
    }

    #[test]
    fn flushed_changes_survive_a_killed_process_and_nothing_else_shows() {
        use testkit::crash::{self, CrashTest, Verdict};
        let rt = tokio::runtime::Runtime::new().unwrap();
        if let Some(child) = crash::child() {
            rt.block_on(crash_child(&child));
            return;
        }
        let t = CrashTest::new(crash::name(
            module_path!(),
            "flushed_changes_survive_a_killed_process_and_nothing_else_shows",
        ));
        for round in 0..8u64 {
            let kill_at = 2 + round % 3;
            let lines = t.run(round, |l| {
                if l == format!("flushed {kill_at}") {
                    Verdict::KillAfter(std::time::Duration::from_micros(round * 1500))
                } else {
                    Verdict::Continue
                }
            });
            let flushed = lines
                .iter()
                .filter_map(|l| l.strip_prefix("flushed ")?.parse::<u64>().ok())
                .max()
                .expect("the child never flushed");
            assert!(flushed >= kill_at, "round {round}: {lines:?}");
            let mut model = base_bytes(SIZE);
            for step in 0..=flushed {
                for c in changes(round, step) {
                    apply(&mut model, c);
                }
            }
            // The step after the last one reported may be in, in part.
            let mut maybe: Vec<Vec<u8>> = vec![Vec::new(); u(SIZE)];
            for c in changes(round, flushed + 1) {
                let (at, len, v) = match c {
                    Change::Write { at, len, byte } => (at, len, byte),
                    Change::Zero { at, len } => (at, len, 0),
                };
                for m in &mut maybe[u(at)..u(at + len)] {
                    m.push(v);
                }
            }
            let dir = t.dir().join(format!("round-{round}"));
            let got = rt.block_on(async {
                let dev = CowDevice::open_existing(base(), dir.join("delta.img"), "test")
                    .expect("reopen the delta");
                whole(&dev).await
            });
            for (i, (&g, &w)) in got.iter().zip(&model).enumerate() {
                assert!(
                    g == w || maybe[i].contains(&g),
                    "round {round}, byte {i}: {g:#x}, flushed {w:#x}, in flight {:?}",
                    maybe[i]
                );
            }
        }
    }
}
