//! The shared conformance suite: every backend and every layer must behave
//! exactly like a trivial in-memory model under random sequences of
//! operations.
//!
//! ```text
//!   proptest ops ──┬──> device under test ──> results ─┐
//!                  └──> Model (Vec<u8>)   ──> results ─┴─> must be identical
//! ```
//!
//! The sequences mix random and sequential reads (sequential runs wake up
//! read-ahead), writes with and without FUA, trims, write-zeroes, flushes,
//! prefetch hints, allocation queries and requests that reach past the end.
//! After each case the device is read back whole and compared.
//!
//! Use it from any crate with the `conformance` feature:
//!
//! ```text
//! blockcore::conformance::run(|| MyDevice::new(...));
//! ```

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::{BlockDevice, BlockError, WriteFlags, ZeroFlags};

/// One step of a conformance case. Offsets may be past the end on purpose.
#[derive(Clone, Debug)]
pub enum Step {
    Read {
        offset: u64,
        len: usize,
    },
    /// Read continuing where the previous read ended.
    ReadNext {
        len: usize,
    },
    Write {
        offset: u64,
        len: usize,
        seed: u8,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        may_trim: bool,
    },
    Flush,
    Extents {
        offset: u64,
        len: u64,
    },
    Prefetch {
        offset: u64,
        len: u64,
    },
}

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub cases: u32,
    pub max_steps: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            cases: 48,
            max_steps: 40,
        }
    }
}

/// The model: a plain byte vector.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn range(&self, offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let end = offset.checked_add(len)?;
        if end > self.bytes.len() as u64 {
            return None;
        }
        Some(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
    }
}

fn pattern(seed: u8, offset: u64, len: usize) -> Bytes {
    // Position-dependent so misplaced writes are caught, seed-dependent so
    // overwrites are distinguishable.
    #[allow(clippy::cast_possible_truncation)]
    (0..len)
        .map(|i| (offset.wrapping_add(i as u64) as u8).wrapping_mul(31) ^ seed)
        .collect::<Vec<u8>>()
        .into()
}

fn steps(size: u64, max_steps: usize) -> impl Strategy<Value = Vec<Step>> {
    // Offsets mostly inside the device, sometimes just past the end or huge.
    let offset = prop_oneof![
        8 => 0..size.max(1),
        1 => size.saturating_sub(64)..size + 64,
        1 => Just(u64::MAX - 8),
    ];
    let len = prop_oneof![4 => 0usize..8192, 2 => 0usize..200_000, 1 => Just(0usize)];
    let step = prop_oneof![
        4 => (offset.clone(), len.clone()).prop_map(|(offset, len)| Step::Read { offset, len }),
        3 => (1usize..70_000).prop_map(|len| Step::ReadNext { len }),
        5 => (offset.clone(), len.clone(), any::<u8>(), any::<bool>())
            .prop_map(|(offset, len, seed, fua)| Step::Write { offset, len, seed, fua }),
        1 => (offset.clone(), len.clone())
            .prop_map(|(offset, len)| Step::Trim { offset, len: len as u64 }),
        1 => (offset.clone(), len.clone(), any::<bool>())
            .prop_map(|(offset, len, may_trim)| Step::Zero { offset, len: len as u64, may_trim }),
        1 => Just(Step::Flush),
        1 => (offset.clone(), len.clone())
            .prop_map(|(offset, len)| Step::Extents { offset, len: len as u64 }),
        1 => (offset, len).prop_map(|(offset, len)| Step::Prefetch { offset, len: len as u64 }),
    ];
    proptest::collection::vec(step, 1..max_steps)
}

fn expect_out_of_range<T: std::fmt::Debug>(
    what: &Step,
    got: Result<T, BlockError>,
) -> Result<(), TestCaseError> {
    match got {
        Err(BlockError::OutOfRange { .. }) => Ok(()),
        other => Err(TestCaseError::fail(format!(
            "{what:?}: expected OutOfRange, got {other:?}"
        ))),
    }
}

/// Applies `steps` to the device and the model; fails on the first
/// difference.
async fn check<D: BlockDevice + ?Sized>(dev: &D, steps: &[Step]) -> Result<(), TestCaseError> {
    let size = dev.info().size;
    let initial = dev
        .read(
            0,
            usize::try_from(size).expect("test devices fit in memory"),
        )
        .await
        .map_err(|e| TestCaseError::fail(format!("initial read: {e}")))?;
    let mut model = Model {
        bytes: initial.to_vec(),
    };
    let mut next_read = 0u64;
    for step in steps {
        match *step {
            Step::Read { offset, len } => {
                read_and_compare(dev, &model, step, offset, len).await?;
                next_read = offset.saturating_add(len as u64);
            }
            Step::ReadNext { len } => {
                let offset = if next_read >= size { 0 } else { next_read };
                let len = len.min(usize::try_from(size - offset).unwrap_or(usize::MAX));
                read_and_compare(dev, &model, step, offset, len).await?;
                next_read = offset + len as u64;
            }
            Step::Write {
                offset,
                len,
                seed,
                fua,
            } => {
                let data = pattern(seed, offset, len);
                let got = dev.write(offset, data.clone(), WriteFlags { fua }).await;
                match model.range(offset, len as u64) {
                    Some(r) => {
                        got.map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?;
                        model.bytes[r].copy_from_slice(&data);
                    }
                    None => expect_out_of_range(step, got)?,
                }
            }
            Step::Trim { offset, len } => {
                let got = dev.trim(offset, len, WriteFlags::default()).await;
                apply_zero(&mut model, step, offset, len, got)?;
            }
            Step::Zero {
                offset,
                len,
                may_trim,
            } => {
                let flags = ZeroFlags {
                    may_trim,
                    ..ZeroFlags::default()
                };
                let got = dev.write_zeroes(offset, len, flags).await;
                apply_zero(&mut model, step, offset, len, got)?;
            }
            Step::Flush => dev
                .flush()
                .await
                .map_err(|e| TestCaseError::fail(format!("flush: {e}")))?,
            Step::Extents { offset, len } => {
                let got = dev.extents(offset, len).await;
                match model.range(offset, len) {
                    Some(r) => check_extents(&model, step, r, got)?,
                    None => expect_out_of_range(step, got)?,
                }
            }
            Step::Prefetch { offset, len } => {
                let got = dev.prefetch(offset, len).await;
                match model.range(offset, len) {
                    Some(_) => got.map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?,
                    None => expect_out_of_range(step, got)?,
                }
            }
        }
    }
    let whole = dev
        .read(0, model.bytes.len())
        .await
        .map_err(|e| TestCaseError::fail(format!("final read: {e}")))?;
    if whole[..] != model.bytes[..] {
        let at = whole
            .iter()
            .zip(&model.bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(TestCaseError::fail(format!(
            "final contents differ from the model, first at byte {at}"
        )));
    }
    Ok(())
}

async fn read_and_compare<D: BlockDevice + ?Sized>(
    dev: &D,
    model: &Model,
    step: &Step,
    offset: u64,
    len: usize,
) -> Result<(), TestCaseError> {
    let got = dev.read(offset, len).await;
    match model.range(offset, len as u64) {
        Some(r) => {
            let data = got.map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?;
            if data.len() != len {
                return Err(TestCaseError::fail(format!(
                    "{step:?}: returned {} bytes",
                    data.len()
                )));
            }
            if data[..] != model.bytes[r] {
                return Err(TestCaseError::fail(format!(
                    "{step:?}: data differs from the model"
                )));
            }
            Ok(())
        }
        None => expect_out_of_range(step, got),
    }
}

fn apply_zero(
    model: &mut Model,
    step: &Step,
    offset: u64,
    len: u64,
    got: Result<(), BlockError>,
) -> Result<(), TestCaseError> {
    match model.range(offset, len) {
        Some(r) => {
            got.map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?;
            model.bytes[r].fill(0);
            Ok(())
        }
        None => expect_out_of_range(step, got),
    }
}

fn check_extents(
    model: &Model,
    step: &Step,
    range: std::ops::Range<usize>,
    got: Result<Vec<crate::Extent>, BlockError>,
) -> Result<(), TestCaseError> {
    let extents = got.map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?;
    let fail = |why: &str| Err(TestCaseError::fail(format!("{step:?}: {why}: {extents:?}")));
    if extents.is_empty() {
        return fail("no extents");
    }
    let mut pos = range.start as u64;
    for e in &extents {
        if e.offset != pos {
            return fail("extents are not contiguous from the requested offset");
        }
        pos += e.len;
        if pos > range.end as u64 {
            return fail("extents reach past the requested range");
        }
        if e.kind.reads_zero() {
            let r = usize::try_from(e.offset).unwrap_or(usize::MAX)
                ..usize::try_from(pos).unwrap_or(usize::MAX);
            if model.bytes[r].iter().any(|&b| b != 0) {
                return fail("an extent reported as zero holds data");
            }
        }
        if e.len == 0 && !range.is_empty() {
            return fail("empty extent in a non-empty query");
        }
    }
    Ok(())
}

/// Runs the suite against fresh devices from `make`, with default settings.
///
/// Panics (failing the calling test) with the minimal failing sequence.
pub fn run<D, F>(make: F)
where
    D: BlockDevice + 'static,
    F: Fn() -> D,
{
    run_with(Settings::default(), make);
}

/// Runs the suite with explicit settings.
pub fn run_with<D, F>(settings: Settings, make: F)
where
    D: BlockDevice + 'static,
    F: Fn() -> D,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let size = make().info().size;
    let mut runner = TestRunner::new(Config {
        cases: settings.cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&steps(size, settings.max_steps), |steps| {
        let dev = make();
        rt.block_on(check(&dev, &steps))
    });
    if let Err(e) = result {
        panic!("conformance failure: {e}");
    }
}
