//! Tests of the journal: formats, coalescing, a model test against an
//! in-memory oracle (with clean reopens and simulated power losses), a crash
//! at every file operation of a workload, back-pressure, trimming, group
//! commit, and a SIGKILL crash loop of a child process on real files.

// Test images are tens of KiB and seeds bytes: every such cast is exact.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::batch::{coalesce, Item, Source};
use super::record::{
    Body, DecodeError, Record, SegmentHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use super::recovery::segment_name;
use super::storage::mem::MemStorage;
use super::storage::Storage;
use super::*;

// ---------------------------------------------------------------- helpers

const DEV: u64 = 32 << 10;
const NOW: u64 = 1_700_000_000_000_000_000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn fixed_clock() -> Clock {
    Clock::from_fn(|| NOW)
}

/// Small segments and memory so rolls, trims and read-backs happen often;
/// capacity large enough that the model test never waits for space.
fn small_opts() -> JournalOptions {
    JournalOptions {
        capacity: 4 << 20,
        segment_size: 16 << 10,
        max_write: 8 << 10,
        memory_limit: 16 << 10,
        recovery: RecoveryMode::TolerateTailCorruption,
        clock: fixed_clock(),
        sync_mode: SyncMode::Thread,
    }
}

fn mem_dir() -> &'static Path {
    Path::new("/journal")
}

fn open_mem(storage: &MemStorage, opts: &JournalOptions) -> Result<Journal, JournalError> {
    Journal::open_with(Arc::new(storage.clone()), mem_dir(), opts.clone())
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) ^ (i >> 8) as u8)
        .collect()
}

/// Polls a future once with a no-op waker.
fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    Absent,
    Zero,
    Byte(u8),
}

/// The journal's view of `offset..offset + len`, byte by byte, checking the
/// pieces cover it exactly and in order.
fn cells(j: &Journal, offset: u64, len: u64) -> Vec<Cell> {
    let pieces = j.read(offset, len).unwrap();
    let mut out = Vec::new();
    let mut at = offset;
    for p in pieces {
        assert_eq!(p.offset, at, "pieces are contiguous");
        assert!(p.len > 0);
        match p.data {
            PieceData::Absent => out.extend(std::iter::repeat_n(Cell::Absent, p.len as usize)),
            PieceData::Zero => out.extend(std::iter::repeat_n(Cell::Zero, p.len as usize)),
            PieceData::Data(d) => {
                assert_eq!(d.len() as u64, p.len);
                out.extend(d.iter().map(|&b| Cell::Byte(b)));
            }
        }
        at += p.len;
    }
    assert_eq!(at, offset + len, "pieces cover the request");
    out
}

fn apply_entries(image: &mut [u8], entries: &[WriteEntry]) {
    for e in entries {
        let o = e.offset() as usize;
        match e {
            WriteEntry::Data { data, .. } => image[o..o + data.len()].copy_from_slice(data),
            WriteEntry::Zero { len, .. } => image[o..o + *len as usize].fill(0),
        }
    }
}

fn check_entries_shape(entries: &[WriteEntry]) {
    for w in entries.windows(2) {
        assert!(
            w[0].offset() + w[0].len() <= w[1].offset(),
            "entries sorted, not overlapping: {w:?}"
        );
    }
    assert!(entries.iter().all(|e| !e.is_empty()));
}

// ---------------------------------------------------------------- formats

fn body_strategy() -> impl Strategy<Value = (u8, u64, u64, u64, Vec<u8>)> {
    (
        1u8..=5,
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 1..300),
    )
}

fn make_body(kind: u8, a: u64, b: u64, c: u64, data: &[u8]) -> Body<'_> {
    match kind {
        1 => Body::Write {
            offset: a % (u64::MAX - data.len() as u64),
            data,
        },
        2 => Body::Zero {
            offset: a / 2,
            len: b / 2 + 1,
        },
        3 => Body::Flush,
        4 => Body::Cut {
            seq: a,
            first_lsn: b,
            last_lsn: c,
        },
        _ => Body::Acked {
            seq: a,
            last_lsn: b,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn record_round_trip((kind, a, b, c, data) in body_strategy(), lsn in any::<u64>(), ts in any::<u64>()) {
        let rec = Record { lsn, timestamp: ts, body: make_body(kind, a, b, c, &data) };
        let mut buf = rec.encode();
        prop_assert_eq!(buf.len(), rec.encoded_len());
        buf.extend_from_slice(b"trailing");
        let (back, n) = Record::decode(&buf, 1 << 20).unwrap();
        prop_assert_eq!(back, rec);
        prop_assert_eq!(n, rec.encoded_len());
        // Every truncation is incomplete, never a different record.
        for cut in 0..n {
            prop_assert_eq!(Record::decode(&buf[..cut], 1 << 20), Err(DecodeError::Incomplete));
        }
    }

    #[test]
    fn record_bit_flips_detected((kind, a, b, c, data) in body_strategy(), bit in any::<usize>()) {
        let rec = Record { lsn: 7, timestamp: 9, body: make_body(kind, a, b, c, &data) };
        let mut buf = rec.encode();
        let bit = bit % (buf.len() * 8);
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Record::decode(&buf, 1 << 20).is_err());
    }

    #[test]
    fn segment_header_round_trip(first in 1u64.., a in any::<u64>(), b in any::<u64>(), c in any::<u64>(), d in any::<u64>(), bit in 0usize..512) {
        let h = SegmentHeader { first_lsn: first, checkpoint: record::Checkpoint {
            cut_seq: a, cut_last_lsn: b, acked_seq: c, acked_last_lsn: d } };
        let mut buf = h.encode();
        prop_assert_eq!(SegmentHeader::decode(&buf), Ok(h));
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(SegmentHeader::decode(&buf).is_err());
    }
}

// ------------------------------------------------------------- coalescing

#[derive(Clone, Debug)]
enum RawOp {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

fn raw_op() -> impl Strategy<Value = RawOp> {
    prop_oneof![
        3 => (0u64..4000, proptest::collection::vec(any::<u8>(), 1..400))
            .prop_map(|(o, d)| RawOp::Write(o, d)),
        1 => (0u64..4000, 1u64..400).prop_map(|(o, l)| RawOp::Zero(o, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Applying a batch's coalesced entries equals applying its records.
    #[test]
    fn coalescing_matches_raw_records(ops in proptest::collection::vec(raw_op(), 0..40)) {
        let mut raw = vec![0xA5u8; 4400];
        let items: Vec<Item> = ops.iter().map(|op| match op {
            RawOp::Write(o, d) => {
                raw[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                Item { offset: *o, end: o + d.len() as u64, source: Some(Source::Mem(Bytes::from(d.clone()))) }
            }
            RawOp::Zero(o, l) => {
                raw[*o as usize..(o + l) as usize].fill(0);
                Item { offset: *o, end: o + l, source: None }
            }
        }).collect();
        let entries = coalesce(&items).unwrap();
        check_entries_shape(&entries);
        let mut image = vec![0xA5u8; 4400];
        apply_entries(&mut image, &entries);
        prop_assert_eq!(image, raw);
        // Each byte ships at most once, and adjacent zeroes are one entry.
        for w in entries.windows(2) {
            let touching = w[0].offset() + w[0].len() == w[1].offset();
            let both_zero = matches!((&w[0], &w[1]), (WriteEntry::Zero { .. }, WriteEntry::Zero { .. }));
            prop_assert!(!(touching && both_zero));
        }
    }
}

// ------------------------------------------------------------ model test

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zero { offset: u64, len: u64 },
    Flush,
    SyncAll,
    SyncSome(usize),
    Cut { max_bytes: u64, now: bool },
    Ack { all: bool },
    Read { offset: u64, len: u64 },
    Reopen,
    Crash { keep: u16, zero: bool },
}

fn range_strategy(max: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..DEV, 1..=max).prop_map(|(o, l)| (o, l.min(DEV - o)))
}

fn op_strategy(crashes: bool) -> impl Strategy<Value = Op> {
    let crash_weight = if crashes { 2 } else { 0 };
    prop_oneof![
        12 => (range_strategy(8 << 10), any::<u8>())
            .prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        3 => range_strategy(12 << 10).prop_map(|(offset, len)| Op::Zero { offset, len }),
        3 => Just(Op::Flush),
        2 => Just(Op::SyncAll),
        2 => any::<usize>().prop_map(Op::SyncSome),
        4 => (prop_oneof![Just(u64::MAX), 1u64..20_000], any::<bool>())
            .prop_map(|(max_bytes, now)| Op::Cut { max_bytes, now }),
        3 => any::<bool>().prop_map(|all| Op::Ack { all }),
        2 => range_strategy(DEV).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Reopen),
        crash_weight => (any::<u16>(), any::<bool>()).prop_map(|(keep, zero)| Op::Crash { keep, zero }),
    ]
}

#[derive(Clone, Debug)]
enum MKind {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Flush,
}

#[derive(Clone, Debug)]
struct MRec {
    lsn: Lsn,
    kind: MKind,
}

impl MRec {
    /// Journal bytes of a data record (flushes carry none).
    fn size(&self) -> u64 {
        match &self.kind {
            MKind::Write { data, .. } => 40 + data.len() as u64,
            MKind::Zero { .. } => 48,
            MKind::Flush => 0,
        }
    }

    fn is_data(&self) -> bool {
        !matches!(self.kind, MKind::Flush)
    }
}

/// The oracle: every record the journal acknowledged appending (and that
/// survived), the origin image built from acknowledged batches, and the
/// batch state.
#[derive(Clone, Debug, Default)]
struct Model {
    recs: Vec<MRec>,
    origin: Vec<u8>,
    acked_seq: u64,
    acked_last: Lsn,
    cut_seq: u64,
    cut_last: Lsn,
    in_flight: VecDeque<Batch>,
    synced: Lsn,
}

impl Model {
    fn new() -> Self {
        Self {
            origin: vec![0; DEV as usize],
            ..Self::default()
        }
    }

    fn paint(cells: &mut [Cell], r: &MRec) {
        match &r.kind {
            MKind::Write { offset, data } => {
                for (i, &b) in data.iter().enumerate() {
                    cells[*offset as usize + i] = Cell::Byte(b);
                }
            }
            MKind::Zero { offset, len } => {
                cells[*offset as usize..(offset + len) as usize].fill(Cell::Zero);
            }
            MKind::Flush => {}
        }
    }

    /// What `read` must return: the newest record not acknowledged.
    fn view(&self) -> Vec<Cell> {
        let mut cells = vec![Cell::Absent; DEV as usize];
        for r in self.recs.iter().filter(|r| r.lsn > self.acked_last) {
            Self::paint(&mut cells, r);
        }
        cells
    }

    /// The guest's disk: every record applied.
    fn truth(&self) -> Vec<u8> {
        let mut cells = vec![Cell::Zero; DEV as usize];
        for r in &self.recs {
            Self::paint(&mut cells, r);
        }
        cells
            .into_iter()
            .map(|c| match c {
                Cell::Byte(b) => b,
                _ => 0,
            })
            .collect()
    }

    /// Where the journal must end the next batch (see `State::plan_cut`).
    fn plan(&self, max_bytes: u64, now: bool) -> Option<(Lsn, Lsn)> {
        let uncut: Vec<&MRec> = self.recs.iter().filter(|r| r.lsn > self.cut_last).collect();
        let total: u64 = uncut.iter().map(|r| r.size()).sum();
        if total == 0 {
            return None;
        }
        let flush_after_data = |below: Lsn| {
            let mut seen_data = false;
            let mut found = None;
            for r in &uncut {
                if r.lsn >= below {
                    break;
                }
                match r.kind {
                    MKind::Flush if seen_data => found = Some(r.lsn),
                    MKind::Flush => {}
                    _ => seen_data = true,
                }
            }
            found
        };
        let last = if total > max_bytes {
            let mut acc = 0;
            let mut last_data = None;
            let mut boundary = Lsn::MAX;
            for r in uncut.iter().filter(|r| r.is_data()) {
                if last_data.is_some() && acc + r.size() > max_bytes {
                    boundary = r.lsn;
                    break;
                }
                acc += r.size();
                last_data = Some(r.lsn);
            }
            flush_after_data(boundary).unwrap_or(last_data.unwrap())
        } else if let Some(f) = flush_after_data(Lsn::MAX) {
            f
        } else if now {
            uncut.iter().rev().find(|r| r.is_data()).unwrap().lsn
        } else {
            return None;
        };
        Some((self.cut_last + 1, last))
    }

    /// The coalesced entries of records `first..=last`: maximal runs.
    fn entries(&self, first: Lsn, last: Lsn) -> Vec<WriteEntry> {
        let mut cells = vec![Cell::Absent; DEV as usize];
        for r in self.recs.iter().filter(|r| (first..=last).contains(&r.lsn)) {
            Self::paint(&mut cells, r);
        }
        let mut out: Vec<WriteEntry> = Vec::new();
        for (i, c) in cells.into_iter().enumerate() {
            let i = i as u64;
            match (c, out.last_mut()) {
                (Cell::Absent, _) => {}
                (Cell::Zero, Some(WriteEntry::Zero { offset, len })) if *offset + *len == i => {
                    *len += 1;
                }
                (Cell::Zero, _) => out.push(WriteEntry::Zero { offset: i, len: 1 }),
                (Cell::Byte(b), Some(WriteEntry::Data { offset, data }))
                    if *offset + data.len() as u64 == i =>
                {
                    let mut v = data.to_vec();
                    v.push(b);
                    *data = v.into();
                }
                (Cell::Byte(b), _) => out.push(WriteEntry::Data {
                    offset: i,
                    data: vec![b].into(),
                }),
            }
        }
        out
    }

    fn ack(&mut self, seq: u64) {
        while self.in_flight.front().is_some_and(|b| b.seq <= seq) {
            let b = self.in_flight.pop_front().unwrap();
            self.acked_last = b.last_lsn;
        }
        self.acked_seq = seq;
    }

    fn unshipped(&self, after: Lsn) -> (u64, u64) {
        self.recs
            .iter()
            .filter(|r| r.lsn > after && r.is_data())
            .fold((0, 0), |(b, n), r| (b + r.size(), n + 1))
    }
}

/// Runs operations against a journal on a [`MemStorage`] and the model.
struct Harness {
    storage: MemStorage,
    opts: JournalOptions,
    j: Option<Journal>,
    m: Model,
    /// A cut or ack that failed midway: its record may have reached the
    /// disk.
    maybe_cut: Option<Batch>,
    maybe_ack: Option<u64>,
}

impl Harness {
    fn new(storage: MemStorage, opts: JournalOptions) -> Self {
        let j = open_mem(&storage, &opts).unwrap();
        Self {
            storage,
            opts,
            j: Some(j),
            m: Model::new(),
            maybe_cut: None,
            maybe_ack: None,
        }
    }

    fn j(&self) -> &Journal {
        self.j.as_ref().unwrap()
    }

    /// Checks the journal against the model: reads, the origin plus the
    /// journal equal the guest's disk, counters.
    fn check(&self) {
        let got = cells(self.j(), 0, DEV);
        let want = self.m.view();
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "read differs from the model at byte {first}: journal {:?}, model {:?}",
                got[first], want[first]
            );
        }
        let truth = self.m.truth();
        for (i, c) in got.iter().enumerate() {
            let b = match c {
                Cell::Absent => self.m.origin[i],
                Cell::Zero => 0,
                Cell::Byte(b) => *b,
            };
            assert_eq!(b, truth[i], "origin + journal differ from the disk at {i}");
        }
        let s = self.j().stats();
        assert_eq!(
            (s.unshipped_bytes, s.unshipped_records),
            self.m.unshipped(self.m.acked_last)
        );
        assert_eq!(
            (s.uncut_bytes, s.uncut_records),
            self.m.unshipped(self.m.cut_last)
        );
        assert_eq!(s.batches_in_flight, self.m.in_flight.len() as u64);
        assert_eq!(
            (s.last_cut_seq, s.acked_seq),
            (self.m.cut_seq, self.m.acked_seq)
        );
        assert!(s.memory_bytes <= self.opts.memory_limit);
    }

    async fn apply(&mut self, op: &Op) -> Result<(), JournalError> {
        match op {
            Op::Write { offset, len, seed } => {
                let data = pattern(*seed, *len);
                let lsn = self
                    .j()
                    .append_write(*offset, Bytes::from(data.clone()))
                    .await?;
                self.m.recs.push(MRec {
                    lsn,
                    kind: MKind::Write {
                        offset: *offset,
                        data,
                    },
                });
            }
            Op::Zero { offset, len } => {
                let lsn = self.j().append_zero(*offset, *len).await?;
                self.m.recs.push(MRec {
                    lsn,
                    kind: MKind::Zero {
                        offset: *offset,
                        len: *len,
                    },
                });
            }
            Op::Flush => {
                let lsn = self.j().append_flush().await?;
                self.m.recs.push(MRec {
                    lsn,
                    kind: MKind::Flush,
                });
            }
            Op::SyncAll => {
                let lsn = self.j().sync_all().await?;
                self.m.synced = self.m.synced.max(lsn);
            }
            Op::SyncSome(i) => {
                if !self.m.recs.is_empty() {
                    let lsn = self.m.recs[i % self.m.recs.len()].lsn;
                    self.j().sync(lsn).await?;
                    self.m.synced = self.m.synced.max(lsn);
                }
            }
            Op::Cut { max_bytes, now } => {
                let expect = self.m.plan(*max_bytes, *now).map(|(first, last)| Batch {
                    seq: self.m.cut_seq + 1,
                    first_lsn: first,
                    last_lsn: last,
                    entries: self.m.entries(first, last),
                });
                self.maybe_cut.clone_from(&expect);
                let age = if *now {
                    Duration::ZERO
                } else {
                    Duration::from_secs(3600)
                };
                let got = self.j().cut_batch(*max_bytes, age).await?;
                self.maybe_cut = None;
                assert_eq!(got, expect, "cut_batch");
                if let Some(b) = got {
                    check_entries_shape(&b.entries);
                    self.m.cut_seq = b.seq;
                    self.m.cut_last = b.last_lsn;
                    self.m.in_flight.push_back(b);
                }
            }
            Op::Ack { all } => {
                let target = if *all {
                    self.m.in_flight.back()
                } else {
                    self.m.in_flight.front()
                };
                let Some(seq) = target.map(|b| b.seq) else {
                    return Ok(());
                };
                // The origin applies the batches before acknowledging them.
                for b in self.m.in_flight.iter().filter(|b| b.seq <= seq) {
                    apply_entries(&mut self.m.origin, &b.entries);
                }
                let before = self.m.view();
                self.maybe_ack = Some(seq);
                let ended = self.j().ack(seq).await?;
                self.maybe_ack = None;
                self.m.ack(seq);
                let after = self.m.view();
                let mut want: Vec<Range<u64>> = Vec::new();
                for i in 0..DEV as usize {
                    if before[i] != Cell::Absent && after[i] == Cell::Absent {
                        let i = i as u64;
                        match want.last_mut() {
                            Some(r) if r.end == i => r.end += 1,
                            _ => want.push(i..i + 1),
                        }
                    }
                }
                assert_eq!(ended, want, "ranges whose journal coverage ended");
                // Acknowledging again is harmless.
                assert!(self.j().ack(seq).await?.is_empty());
            }
            Op::Read { offset, len } => {
                let got = cells(self.j(), *offset, *len);
                let view = self.m.view();
                assert_eq!(got[..], view[*offset as usize..(offset + len) as usize]);
            }
            Op::Reopen => {
                let last = self.j().stats().last_lsn;
                drop(self.j.take());
                let j = open_mem(&self.storage, &self.opts)?;
                assert_eq!(j.stats().last_lsn, last, "a clean close keeps everything");
                self.j = Some(j);
                self.m.synced = last;
                self.check_batches();
            }
            Op::Crash { keep, zero } => {
                let (keep, zero) = (*keep, *zero);
                self.crash(move |extra| (extra * keep as usize / 65535, zero));
            }
        }
        Ok(())
    }

    fn check_batches(&self) {
        let got = self.j().unshipped_batches().unwrap();
        assert_eq!(
            got,
            Vec::from(self.m.in_flight.clone()),
            "re-shipped batches"
        );
    }

    /// Power loss: the journal stops mid-flight, the files keep what was
    /// synced plus some of the rest; reopen and reconcile.
    fn crash(&mut self, keep: impl FnMut(usize) -> (usize, bool)) {
        self.storage.fail_after(0);
        drop(self.j.take());
        self.storage.power_loss(keep);
        let j = open_mem(&self.storage, &self.opts).expect("recovery after a power loss");
        let s = j.stats();
        assert!(
            s.last_lsn >= self.m.synced,
            "lost synced records: recovered up to {}, synced up to {}",
            s.last_lsn,
            self.m.synced
        );
        self.m.recs.retain(|r| r.lsn <= s.last_lsn);
        if s.last_cut_seq > self.m.cut_seq {
            let b = self.maybe_cut.take().expect("a cut nobody asked for");
            assert_eq!(s.last_cut_seq, b.seq);
            self.m.cut_seq = b.seq;
            self.m.cut_last = b.last_lsn;
            self.m.in_flight.push_back(b);
        }
        if s.acked_seq > self.m.acked_seq {
            let seq = self.maybe_ack.take().expect("an ack nobody sent");
            assert_eq!(s.acked_seq, seq);
            self.m.ack(seq);
        }
        self.maybe_cut = None;
        self.maybe_ack = None;
        self.m.synced = s.last_lsn;
        self.j = Some(j);
        self.check_batches();
        self.check();
    }
}

fn run_model(ops: &[Op]) {
    rt().block_on(async {
        let mut h = Harness::new(MemStorage::default(), small_opts());
        for op in ops {
            h.apply(op).await.unwrap();
            h.check();
        }
        // Everything cut can be acknowledged, and then nothing is left.
        while let Some(b) = h.j().cut_batch(u64::MAX, Duration::ZERO).await.unwrap() {
            h.m.cut_seq = b.seq;
            h.m.cut_last = b.last_lsn;
            h.m.in_flight.push_back(b);
        }
        h.apply(&Op::Ack { all: true }).await.unwrap();
        h.check();
        let s = h.j().stats();
        assert_eq!((s.unshipped_records, s.extents, s.memory_bytes), (0, 0, 0));
        assert_eq!(s.segments, 1, "everything trimmed but the active segment");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random writes, zeroes, flushes, syncs, cuts, acks and clean reopens:
    /// reads always equal the model, batches the model's coalesced records.
    #[test]
    fn model_reopen(ops in proptest::collection::vec(op_strategy(false), 1..150)) {
        run_model(&ops);
    }

    /// The same with power losses: after each, every synced record is
    /// there and the journal is a prefix of what was appended.
    #[test]
    fn model_power_loss(ops in proptest::collection::vec(op_strategy(true), 1..150)) {
        run_model(&ops);
    }
}

// ----------------------------------------------------- faults at every op

/// A fixed workload of every kind of operation.
fn workload(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = testkit::rng(seed);
    let mut next = || rng.u64(..);
    (0..n)
        .map(|_| {
            let r = next();
            let offset = (r >> 8) % DEV;
            let len = ((r >> 24) % (8 << 10) + 1).min(DEV - offset);
            match r % 20 {
                0..=8 => Op::Write {
                    offset,
                    len,
                    seed: (r >> 40) as u8,
                },
                9 | 10 => Op::Zero { offset, len },
                11 | 12 => Op::Flush,
                13 | 14 => Op::SyncAll,
                15 | 16 => Op::Cut {
                    max_bytes: if r & (1 << 50) == 0 { u64::MAX } else { 12_000 },
                    now: r & (1 << 51) != 0,
                },
                _ => Op::Ack {
                    all: r & (1 << 52) != 0,
                },
            }
        })
        .collect()
}

/// Crashes the workload at every file operation (write, sync, create,
/// truncate, remove, directory sync) in turn, loses power with a torn
/// tail, and checks recovery against what was acknowledged; then the
/// recovered journal must go on working.
#[test]
fn crash_at_every_file_operation() {
    let ops = workload(0x5eed, 160);
    let opts = small_opts();
    let rt = rt();
    let total = rt.block_on(async {
        let storage = MemStorage::default();
        let mut h = Harness::new(storage.clone(), opts.clone());
        let base = storage.ops();
        for op in &ops {
            h.apply(op).await.unwrap();
        }
        drop(h);
        storage.ops() - base
    });
    assert!(
        total > 100,
        "the workload exercises the files ({total} operations)"
    );
    let mut torn = 0;
    for n in 0..total {
        rt.block_on(async {
            let storage = MemStorage::default();
            let mut h = Harness::new(storage.clone(), opts.clone());
            storage.fail_after(n);
            for op in &ops {
                if h.apply(op).await.is_err() {
                    break;
                }
            }
            // Keep none, all, or part of the unsynced bytes, sometimes as
            // zeroes (a file grown but its blocks never written).
            let mode = n % 4;
            h.crash(|extra| {
                if extra > 0 {
                    torn += 1;
                }
                match mode {
                    0 => (0, false),
                    1 => (extra, false),
                    2 => (extra / 2 + 1, false),
                    _ => (extra / 3 + 1, true),
                }
            });
            for op in workload(n + 1, 12) {
                h.apply(&op).await.unwrap();
                h.check();
            }
        });
    }
    eprintln!("crash_at_every_file_operation: {total} operations, {torn} torn tails");
    assert!(
        torn > 10,
        "some crashes left unsynced bytes to tear ({torn})"
    );
}

// --------------------------------------------------------- tail damage

/// Builds a journal with records of known sizes in one segment; returns
/// the storage, the segment's path and each record's (offset, lsn).
fn one_segment_journal() -> (MemStorage, PathBuf, Vec<(usize, Lsn)>) {
    let storage = MemStorage::default();
    let opts = small_opts();
    let mut offsets = Vec::new();
    rt().block_on(async {
        let j = open_mem(&storage, &opts).unwrap();
        let mut pos = SEGMENT_HEADER_LEN;
        for i in 0..12u64 {
            let lsn = match i % 4 {
                0 | 1 => {
                    let data = pattern(i as u8, 100 + i * 7);
                    let n = data.len();
                    let lsn = j.append_write(i * 300, data.into()).await.unwrap();
                    offsets.push((pos, lsn));
                    pos += RECORD_HEADER_LEN + 8 + n;
                    continue;
                }
                2 => j.append_zero(i * 100, 50).await.unwrap(),
                _ => j.append_flush().await.unwrap(),
            };
            offsets.push((pos, lsn));
            pos += RECORD_HEADER_LEN + if i % 4 == 2 { 16 } else { 0 };
        }
        j.sync_all().await.unwrap();
    });
    let path = mem_dir().join(segment_name(1));
    assert_eq!(storage.file_bytes(&path).unwrap().len(), {
        let last = offsets.last().unwrap().0;
        last + RECORD_HEADER_LEN
    });
    (storage, path, offsets)
}

fn storage_with(path: &Path, bytes: &[u8]) -> MemStorage {
    let s = MemStorage::default();
    let f = s.create(path).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    f.sync_data().unwrap();
    s.sync_dir(mem_dir()).unwrap();
    s
}

/// Every truncation of the last segment recovers exactly the records wholly
/// before the cut, and the truncated journal is usable.
#[test]
fn every_tail_truncation_recovers_a_prefix() {
    let (storage, path, recs) = one_segment_journal();
    let full = storage.file_bytes(&path).unwrap();
    let rt = rt();
    for cut in SEGMENT_HEADER_LEN..=full.len() {
        let s = storage_with(&path, &full[..cut]);
        let j = open_mem(&s, &small_opts()).unwrap();
        let complete = recs
            .iter()
            .zip(recs.iter().skip(1).map(|r| r.0).chain([full.len()]))
            .filter(|(_, end)| *end <= cut)
            .count() as u64;
        assert_eq!(j.stats().last_lsn, complete, "cut at {cut}");
        let expected_len = recs.get(complete as usize).map_or(full.len(), |r| r.0);
        assert_eq!(
            s.file_bytes(&path).unwrap().len(),
            expected_len,
            "truncated"
        );
        // Appending continues right after the last intact record.
        rt.block_on(async {
            let lsn = j.append_flush().await.unwrap();
            assert_eq!(lsn, complete + 1);
            j.sync(lsn).await.unwrap();
        });
    }
    // A torn header of the only (fresh) segment: start over.
    for cut in 0..SEGMENT_HEADER_LEN {
        let s = storage_with(&path, &full[..cut]);
        let j = open_mem(&s, &small_opts()).unwrap();
        assert_eq!(j.stats().last_lsn, 0);
    }
}

/// A flipped bit in the last segment cuts the log before the damaged
/// record; in an earlier segment it is an error naming file and offset.
#[test]
fn bit_flips_truncate_the_tail_or_fail_in_the_middle() {
    let (storage, path, recs) = one_segment_journal();
    let full = storage.file_bytes(&path).unwrap();
    for at in SEGMENT_HEADER_LEN..full.len() {
        let mut bytes = full.clone();
        bytes[at] ^= 1 << (at % 8);
        let s = storage_with(&path, &bytes);
        let j = open_mem(&s, &small_opts()).unwrap();
        let damaged = recs.iter().rposition(|r| r.0 <= at).unwrap();
        assert_eq!(j.stats().last_lsn, recs[damaged].1 - 1, "flip at {at}");
        drop(j);
        // Strict recovery refuses it, naming the place.
        let strict = JournalOptions {
            recovery: RecoveryMode::AbsoluteConsistency,
            ..small_opts()
        };
        let s = storage_with(&path, &bytes);
        match open_mem(&s, &strict) {
            Err(JournalError::Corrupt {
                path: p, offset, ..
            }) => {
                assert_eq!((p, offset), (path.clone(), recs[damaged].0 as u64));
            }
            other => panic!("strict recovery of a flip at {at}: {other:?}"),
        }
    }

    // Two segments: damage in the first is never silently skipped.
    let storage = MemStorage::default();
    rt().block_on(async {
        let j = open_mem(&storage, &small_opts()).unwrap();
        for i in 0..40u64 {
            j.append_write(i * 512, pattern(1, 1000).into())
                .await
                .unwrap();
        }
        j.sync_all().await.unwrap();
        assert!(j.stats().segments >= 2);
    });
    let first = mem_dir().join(segment_name(1));
    let bytes = storage.file_bytes(&first).unwrap();
    for at in [SEGMENT_HEADER_LEN + 5, bytes.len() - 3] {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x10;
        storage.set_file_bytes(&first, damaged);
        match open_mem(&storage, &small_opts()) {
            Err(e @ JournalError::Corrupt { .. }) => {
                let JournalError::Corrupt { path, offset, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(path, &first);
                assert!(*offset <= at as u64 && at as u64 - offset < 1100, "{e}");
                assert!(e.to_string().contains("seg-00000000000000000001.log"));
            }
            other => panic!("damage in the first segment at {at}: {other:?}"),
        }
        storage.set_file_bytes(&first, bytes.clone());
    }
    // The first segment's header carries the batch state: never dropped.
    let mut damaged = bytes.clone();
    damaged[20] ^= 1;
    storage.set_file_bytes(&first, damaged);
    assert!(matches!(
        open_mem(&storage, &small_opts()),
        Err(JournalError::Corrupt { offset: 0, .. })
    ));
}

/// A segment whose creation was interrupted (header torn, nothing after
/// it) is removed on open, and appends go on in the one before.
#[test]
fn interrupted_segment_creation_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let last = rt.block_on(async {
        let j = Journal::open(dir.path(), small_opts()).unwrap();
        for i in 0..20u64 {
            j.append_write(i * 512, pattern(2, 3000).into())
                .await
                .unwrap();
        }
        j.sync_all().await.unwrap();
        assert!(j.stats().segments >= 3);
        j.stats().last_lsn
    });
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    // Pretend the newest segment was being created: no records, torn header.
    let newest = names.pop().unwrap();
    let name = newest.file_name().unwrap().to_str().unwrap();
    let first_lsn: Lsn = name[4..24].parse().unwrap();
    assert_eq!(name, segment_name(first_lsn));
    let torn = std::fs::read(&newest).unwrap()[..40].to_vec();
    std::fs::write(&newest, torn).unwrap();
    let report = inspect(dir.path()).unwrap();
    assert_eq!(report.tail_damage.as_ref().unwrap().path, newest);
    assert_eq!(report.lsns.unwrap().1, first_lsn - 1);
    rt.block_on(async {
        let j = Journal::open(dir.path(), small_opts()).unwrap();
        assert!(!newest.exists());
        assert_eq!(j.stats().last_lsn, first_lsn - 1);
        assert!(first_lsn <= last);
        let lsn = j.append_flush().await.unwrap();
        j.sync(lsn).await.unwrap();
        assert_eq!(lsn, first_lsn);
    });
    let j = Journal::open(dir.path(), small_opts()).unwrap();
    assert_eq!(j.stats().last_lsn, first_lsn);
}

// ----------------------------------------------- batches, acks, trimming

#[test]
fn batches_end_at_flushes_size_or_age() {
    let now = Arc::new(AtomicU64::new(NOW));
    let clock = {
        let now = now.clone();
        Clock::from_fn(move || now.load(Ordering::Relaxed))
    };
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        clock,
        ..small_opts()
    };
    rt().block_on(async {
        let j = Journal::open(dir.path(), opts).unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(j.cut_batch(u64::MAX, Duration::ZERO).await.unwrap(), None);
        let a = j.append_write(0, pattern(1, 4096).into()).await.unwrap();
        j.append_write(2048, pattern(2, 4096).into()).await.unwrap();
        let f = j.append_flush().await.unwrap();
        let c = j.append_zero(1024, 1024).await.unwrap();
        // Young, small, flushed: cut at the flush.
        let b1 = j.cut_batch(u64::MAX, hour).await.unwrap().unwrap();
        assert_eq!((b1.seq, b1.first_lsn, b1.last_lsn), (1, a, f));
        assert_eq!(b1.entries.len(), 1, "two touching writes ship as one entry");
        assert_eq!(b1.data_bytes(), 6144);
        // The rest is young, small, unflushed: nothing yet...
        assert_eq!(j.cut_batch(u64::MAX, hour).await.unwrap(), None);
        assert_eq!(j.stats().oldest_unshipped_age, Some(Duration::ZERO));
        // ... until it is older than the RPO.
        now.fetch_add(nanos(hour), Ordering::Relaxed);
        assert_eq!(j.stats().oldest_unshipped_age, Some(hour));
        tokio::time::timeout(Duration::from_secs(10), j.wait_batch_ready(u64::MAX, hour))
            .await
            .expect("ready: old enough")
            .unwrap();
        let b2 = j.cut_batch(u64::MAX, hour).await.unwrap().unwrap();
        // The Cut record of batch 1 sits between the flush and the zero.
        assert_eq!((b2.seq, b2.first_lsn, b2.last_lsn), (2, f + 1, c));
        assert_eq!(
            b2.entries,
            vec![WriteEntry::Zero {
                offset: 1024,
                len: 1024
            }]
        );
        // Too many bytes: cut at the last record that fits.
        let mut lsns = Vec::new();
        for i in 0..4 {
            lsns.push(
                j.append_write(i * 8192, pattern(3, 4000).into())
                    .await
                    .unwrap(),
            );
        }
        let b3 = j.cut_batch(2 * 4040, hour).await.unwrap().unwrap();
        assert_eq!(b3.last_lsn, lsns[1]);
        // A waiting shipper wakes on a flush.
        let wait = j.wait_batch_ready(u64::MAX, hour);
        let mut wait = pin!(wait);
        assert!(poll_once(wait.as_mut()).is_pending());
        let f2 = j.append_flush().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("ready: flushed")
            .unwrap();
        let b4 = j.cut_batch(u64::MAX, hour).await.unwrap().unwrap();
        assert_eq!(b4.last_lsn, f2);
        // Acks: unknown, then cumulative.
        assert!(matches!(
            j.ack(9).await,
            Err(JournalError::UnknownBatch { seq: 9, newest: 4 })
        ));
        j.ack(2).await.unwrap();
        assert_eq!(j.stats().acked_seq, 2);
        assert_eq!(j.unshipped_batches().unwrap(), vec![b3, b4]);
    });
}

/// Batches cut before a restart come back identical, with data that was
/// dropped from memory read back from the segments.
#[test]
fn unshipped_batches_survive_restart_identically() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_opts();
    let rt = rt();
    let cut = rt.block_on(async {
        let j = Journal::open(dir.path(), opts.clone()).unwrap();
        let mut cut = Vec::new();
        for round in 0..6u64 {
            for i in 0..10u64 {
                let off = (i * 1777 + round * 300) % (DEV - 4096);
                j.append_write(off, pattern((round * 10 + i) as u8, 4000).into())
                    .await
                    .unwrap();
                if i % 4 == 3 {
                    j.append_zero(off / 2, 3000).await.unwrap();
                }
            }
            j.append_flush().await.unwrap();
            cut.push(
                j.cut_batch(u64::MAX, Duration::from_secs(60))
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        j.ack(2).await.unwrap();
        // Uncut records also survive.
        j.append_write(5, pattern(99, 10).into()).await.unwrap();
        cut.split_off(2)
    });
    let report = inspect(dir.path()).unwrap();
    assert_eq!(report.in_flight.len(), 4);
    assert_eq!((report.last_cut_seq, report.acked_seq), (6, 2));
    assert_eq!(report.uncut_records, 1);
    assert!(report.tail_damage.is_none());
    let text = report.to_string();
    assert!(text.contains("in flight: batch 3"), "{text}");
    let j = Journal::open(dir.path(), opts).unwrap();
    assert_eq!(j.unshipped_batches().unwrap(), cut);
    assert_eq!(j.stats().uncut_records, 1);
}

#[test]
fn ack_trims_segments_and_reports_ended_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let count = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("seg-")
            })
            .count()
    };
    rt().block_on(async {
        let j = Journal::open(dir.path(), small_opts()).unwrap();
        for i in 0..40u64 {
            j.append_write(i * 4096, pattern(i as u8, 4096).into())
                .await
                .unwrap();
        }
        let b1 = j
            .cut_batch(u64::MAX, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        // Overwrite part of the first batch's range after the cut.
        j.append_write(4096, pattern(7, 4096).into()).await.unwrap();
        let segments = count();
        assert!(segments >= 10, "{segments} segments");
        assert_eq!(j.stats().segments, segments as u64);
        let ended = j.ack(b1.seq).await.unwrap();
        assert_eq!(ended, vec![0..4096, 8192..40 * 4096]);
        assert!(count() <= 2, "trimmed to {} segments", count());
        assert_eq!(j.stats().segments, count() as u64);
        let pieces = j.read(0, 3 * 4096).unwrap();
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0].data, PieceData::Absent);
        assert_eq!(pieces[1].data, PieceData::Data(pattern(7, 4096).into()));
        assert_eq!(pieces[2].data, PieceData::Absent);
        let s = j.stats();
        assert!(s.used_bytes < 3 * (16 << 10), "{s:?}");
    });
    // And the trimmed journal reopens to the same state.
    let j = Journal::open(dir.path(), small_opts()).unwrap();
    assert_eq!(j.stats().unshipped_records, 1);
    assert_eq!(j.stats().acked_seq, 1);
}

// ---------------------------------------------------------- back-pressure

/// An append that does not fit waits, without failing, until an ack frees
/// space; meanwhile a cut takes everything regardless of age.
#[test]
fn appends_wait_for_space_until_acked() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        capacity: 40 << 10,
        segment_size: 16 << 10,
        max_write: 8 << 10,
        ..small_opts()
    };
    let config = JournalOptions {
        capacity: 8 << 10,
        ..opts.clone()
    };
    assert!(matches!(
        Journal::open(dir.path(), config),
        Err(JournalError::Config(_))
    ));
    let config = JournalOptions {
        segment_size: 8 << 10,
        ..opts.clone()
    };
    assert!(matches!(
        Journal::open(dir.path(), config),
        Err(JournalError::Config(_))
    ));
    rt().block_on(async {
        let j = Journal::open(dir.path(), opts).unwrap();
        let mut appended = 0u64;
        let blocked = loop {
            let mut fut = Box::pin(j.append_write(appended * 4096 % DEV, pattern(1, 4096).into()));
            match poll_once(fut.as_mut()) {
                Poll::Ready(lsn) => lsn.unwrap(),
                // Waiting for space, not for a segment roll.
                Poll::Pending if j.stats().appends_waiting > 0 => break fut,
                Poll::Pending => tokio::time::timeout(Duration::from_secs(10), fut)
                    .await
                    .expect("a roll completes")
                    .unwrap(),
            };
            appended += 1;
            assert!(appended < 100, "capacity never reached");
        };
        assert!(appended >= 8, "{appended} appends fit");
        let s = j.stats();
        assert_eq!(s.appends_waiting, 1);
        assert!(s.used_bytes <= s.capacity);
        // A hour-long RPO, yet the waiting append forces the cut.
        let b = j
            .cut_batch(u64::MAX, Duration::from_secs(3600))
            .await
            .unwrap()
            .expect("pressure cuts");
        assert_eq!(b.last_lsn, appended);
        j.ack(b.seq).await.unwrap();
        let lsn = tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("the append proceeds after the ack")
            .unwrap();
        assert_eq!(lsn, appended + 3, "after the Cut and Acked records");
        assert_eq!(j.stats().appends_waiting, 0);
    });
}

/// A shipper and a writer on one runtime: the writer appends far more
/// than the capacity and never fails.
#[test]
fn writer_and_shipper_make_progress_through_a_small_journal() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        capacity: 48 << 10,
        segment_size: 16 << 10,
        max_write: 8 << 10,
        ..small_opts()
    };
    rt().block_on(async {
        let j = Journal::open(dir.path(), opts).unwrap();
        let done = AtomicU64::new(0);
        let writer = async {
            for i in 0..400u64 {
                let lsn = j
                    .append_write(i * 512 % DEV, pattern(i as u8, 1 + i * 37 % 8000).into())
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    j.sync(lsn).await.unwrap();
                }
            }
            done.store(1, Ordering::Relaxed);
        };
        let shipper = async {
            let mut shipped = 0;
            while done.load(Ordering::Relaxed) == 0 {
                tokio::select! {
                    r = j.wait_batch_ready(20_000, Duration::from_millis(50)) => r.unwrap(),
                    () = tokio::time::sleep(Duration::from_millis(20)) => continue,
                }
                if let Some(b) = j
                    .cut_batch(20_000, Duration::from_millis(50))
                    .await
                    .unwrap()
                {
                    j.ack(b.seq).await.unwrap();
                    shipped += 1;
                }
            }
            shipped
        };
        let ((), shipped) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(writer, shipper)
        })
        .await
        .expect("no deadlock");
        assert!(shipped > 5, "{shipped} batches");
        assert!(j.stats().used_bytes <= 48 << 10);
    });
}

// ------------------------------------------------------------ group commit

/// Callers that sync while an fdatasync is running share the next one.
#[test]
fn concurrent_syncs_share_one_fdatasync() {
    let storage = MemStorage::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let j = Arc::new(open_mem(&storage, &small_opts()).unwrap());
        let before = storage.file_syncs();
        storage.hold_syncs();
        let first = j.append_write(0, pattern(0, 100).into()).await.unwrap();
        let j1 = j.clone();
        let t0 = tokio::spawn(async move { j1.sync(first).await });
        assert!(storage.wait_sync_blocked(), "the first sync started");
        let mut tasks = Vec::new();
        for i in 1..=32u64 {
            let lsn = j
                .append_write(i * 100, pattern(i as u8, 100).into())
                .await
                .unwrap();
            let j = j.clone();
            tasks.push(tokio::spawn(async move { j.sync(lsn).await }));
        }
        storage.release_syncs();
        t0.await.unwrap().unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            storage.file_syncs() - before,
            2,
            "33 callers, two fdatasyncs"
        );
        assert_eq!(j.stats().syncs, 2);
    });
}

/// The edge spawns these on a multi-threaded runtime.
#[test]
fn futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let storage = MemStorage::default();
    let j = open_mem(&storage, &small_opts()).unwrap();
    send(&j.append_write(0, Bytes::from_static(b"x")));
    send(&j.append_zero(0, 1));
    send(&j.append_flush());
    send(&j.sync(0));
    send(&j.cut_batch(1, Duration::ZERO));
    send(&j.wait_batch_ready(1, Duration::ZERO));
    send(&j.ack(1));
}

// ---------------------------------------------------------------- failures

#[test]
fn an_io_error_fails_the_journal_until_reopened() {
    let storage = MemStorage::default();
    rt().block_on(async {
        let j = open_mem(&storage, &small_opts()).unwrap();
        let a = j.append_write(0, pattern(1, 10).into()).await.unwrap();
        j.sync(a).await.unwrap();
        storage.fail_after(0);
        assert!(matches!(
            j.append_write(0, pattern(2, 10).into()).await,
            Err(JournalError::Io { .. })
        ));
        assert!(matches!(
            j.append_flush().await,
            Err(JournalError::Failed(_))
        ));
        assert!(matches!(j.sync(a).await, Err(JournalError::Failed(_))));
        assert!(matches!(
            j.append_write(0, Bytes::new()).await,
            Err(JournalError::InvalidRequest { .. })
        ));
        drop(j);
        storage.power_loss(|_| (0, false));
        let j = open_mem(&storage, &small_opts()).unwrap();
        assert_eq!(j.stats().last_lsn, a);
        assert_eq!(
            cells(&j, 0, 10),
            pattern(1, 10)
                .into_iter()
                .map(Cell::Byte)
                .collect::<Vec<_>>()
        );
    });
}

// ---------------------------------------------- SIGKILL crash loop (child)

const CRASH_DEV_BLOCKS: u64 = 512;
const ROUNDS: u32 = 40;
const BLOCK: u64 = 512;

/// Small enough that appends wait for space and segments roll and trim
/// all the time; writes large enough to take two `pwrite`s (a kill between
/// them, or inside one, tears the tail).
fn crash_opts() -> JournalOptions {
    JournalOptions {
        capacity: 1 << 20,
        segment_size: 256 << 10,
        max_write: 128 << 10,
        memory_limit: 64 << 10,
        ..JournalOptions::default()
    }
}

/// A block of a crash-test write: who wrote it and where, self-checking.
fn stamp_block(round: u32, op: u32, block: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK as usize);
    b.extend_from_slice(&round.to_be_bytes());
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&block.to_be_bytes());
    let h = blake3::hash(&b[..16]);
    while b.len() < BLOCK as usize {
        b.extend_from_slice(h.as_bytes());
    }
    b.truncate(BLOCK as usize);
    b
}

fn parse_stamp(b: &[u8]) -> Option<(u32, u32, u64)> {
    let round = u32::from_be_bytes(b[0..4].try_into().ok()?);
    let op = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let block = u64::from_be_bytes(b[8..16].try_into().ok()?);
    (stamp_block(round, op, block) == b).then_some((round, op, block))
}

fn batch_hash(b: &Batch) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&b.seq.to_be_bytes());
    h.update(&b.first_lsn.to_be_bytes());
    h.update(&b.last_lsn.to_be_bytes());
    for e in &b.entries {
        match e {
            WriteEntry::Data { offset, data } => {
                h.update(b"d");
                h.update(&offset.to_be_bytes());
                h.update(data);
            }
            WriteEntry::Zero { offset, len } => {
                h.update(b"z");
                h.update(&offset.to_be_bytes());
                h.update(&len.to_be_bytes());
            }
        }
    }
    h.finalize().to_hex()[..16].to_owned()
}

/// The child of `crash_sigkill_loop`: re-ships what is in flight, then a
/// writer appends, syncs and flushes while a shipper cuts and acknowledges
/// through a journal small enough to wait for space, each reporting what
/// returned, until killed.
fn crash_child(child: &testkit::crash::Child) {
    let round = u32::try_from(child.round()).unwrap();
    let say = |line: String| child.report(line);
    rt().block_on(async {
        let j = Journal::open(child.dir(), crash_opts()).unwrap();
        say(format!("open {}", j.stats().last_lsn));
        for b in j.unshipped_batches().unwrap() {
            say(format!(
                "c {} {} {} {}",
                b.seq,
                b.first_lsn,
                b.last_lsn,
                batch_hash(&b)
            ));
        }
        let mut shipper_rng = testkit::rng(u64::from(round));
        let mut rand = move || shipper_rng.u64(..);
        let mut writer_rng = testkit::rng(u64::from(round) << 32);
        let writer = async {
            let mut rand = move || writer_rng.u64(..);
            for op in 0u32.. {
                let r = rand();
                let block = r % CRASH_DEV_BLOCKS;
                let blocks = if (r >> 48) % 8 == 0 {
                    (r >> 16) % 120 + 130
                } else {
                    (r >> 16) % 32 + 1
                };
                let blocks = blocks.min(CRASH_DEV_BLOCKS - block);
                let (off, len) = (block * BLOCK, blocks * BLOCK);
                match (r >> 32) % 10 {
                    0..=6 => {
                        let data: Vec<u8> = (block..block + blocks)
                            .flat_map(|b| stamp_block(round, op, b))
                            .collect();
                        say(format!("i {op} w {off} {len}"));
                        let lsn = j.append_write(off, data.into()).await.unwrap();
                        say(format!("w {op} {lsn}"));
                        if (r >> 40) % 4 == 0 {
                            j.sync(lsn).await.unwrap();
                            say(format!("s {lsn}"));
                        }
                    }
                    7 => {
                        say(format!("i {op} z {off} {len}"));
                        let lsn = j.append_zero(off, len).await.unwrap();
                        say(format!("w {op} {lsn}"));
                    }
                    _ => {
                        let lsn = j.append_flush().await.unwrap();
                        j.sync(lsn).await.unwrap();
                        say(format!("s {lsn}"));
                    }
                }
                tokio::task::yield_now().await;
            }
        };
        let shipper = async {
            loop {
                let max_bytes = 4096 + rand() % (64 << 10);
                let age = Duration::from_millis(rand() % 4);
                if j.stats().batches_in_flight == 0 {
                    j.wait_batch_ready(max_bytes, age).await.unwrap();
                } else {
                    // The origin's acknowledgement may come before more data.
                    tokio::select! {
                        r = j.wait_batch_ready(max_bytes, age) => r.unwrap(),
                        () = tokio::time::sleep(Duration::from_millis(1)) => {}
                    }
                }
                if let Some(b) = j.cut_batch(max_bytes, age).await.unwrap() {
                    say(format!(
                        "c {} {} {} {}",
                        b.seq,
                        b.first_lsn,
                        b.last_lsn,
                        batch_hash(&b)
                    ));
                }
                let s = j.stats();
                if s.appends_waiting > 0 {
                    say("p".to_owned());
                }
                // Keep a few batches in flight, unless appends wait.
                if s.batches_in_flight > 0 && (s.appends_waiting > 0 || rand() % 3 != 0) {
                    let seq = if rand() % 2 == 0 {
                        s.last_cut_seq
                    } else {
                        s.acked_seq + 1
                    };
                    j.ack(seq).await.unwrap();
                    say(format!("k {seq}"));
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::join!(writer, shipper);
    });
}

#[derive(Clone, Copy, Debug)]
struct Reported {
    round: u32,
    op: u32,
    zero: bool,
    block: u64,
    blocks: u64,
}

/// SIGKILLs a child process appending, syncing, cutting and acknowledging
/// at random moments, many times over one directory; after each kill,
/// recovery must keep every record reported synced, every batch reported
/// cut (identically) and every ack reported, and reads must show the newest
/// surviving write of every block not yet acknowledged.
#[test]
fn crash_sigkill_loop() {
    use testkit::crash::{self, CrashTest, Verdict};
    if let Some(child) = crash::child() {
        crash_child(&child);
        return;
    }
    let crash_test = CrashTest::new(crash::name(module_path!(), "crash_sigkill_loop"));
    let dir = crash_test.dir();
    let mut rng = testkit::rng(testkit::fresh_seed("crash_sigkill_loop"));
    // Surviving reported data records by lsn.
    let mut ops: BTreeMap<Lsn, Reported> = BTreeMap::new();
    // Intent of each round's data op in flight when it was killed.
    let mut in_flight_ops: Vec<Reported> = Vec::new();
    let mut batches: BTreeMap<u64, (Lsn, Lsn, String)> = BTreeMap::new();
    let mut acked = 0;
    let (mut appends, mut syncs, mut cuts, mut acks, mut torn, mut reshipped, mut waits) =
        (0, 0, 0, 0, 0, 0, 0);
    for round in 1..=ROUNDS {
        // Once the child reports its open, it dies somewhere in its work.
        let delay = Duration::from_millis(10 + rng.u64(..200));
        let lines = crash_test.run(u64::from(round), |line| {
            if line.starts_with("open ") {
                Verdict::KillAfter(delay)
            } else {
                Verdict::Continue
            }
        });

        let mut intents: BTreeMap<u32, Reported> = BTreeMap::new();
        let mut reported_ops: Vec<(Lsn, u32)> = Vec::new();
        let mut max_synced = 0;
        for line in &lines {
            let f: Vec<&str> = line.split(' ').collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
            match (f.first().copied(), num(1), num(2), num(3)) {
                (Some("i"), Some(op), _, Some(off)) => {
                    let (Some(kind), Some(len)) = (f.get(2), num(4)) else {
                        continue;
                    };
                    let op = u32::try_from(op).unwrap();
                    intents.insert(
                        op,
                        Reported {
                            round,
                            op,
                            zero: *kind == "z",
                            block: off / BLOCK,
                            blocks: len / BLOCK,
                        },
                    );
                }
                (Some("w"), Some(op), Some(lsn), _) => {
                    reported_ops.push((lsn, u32::try_from(op).unwrap()));
                }
                (Some("s"), Some(lsn), _, _) => {
                    max_synced = max_synced.max(lsn);
                    syncs += 1;
                }
                (Some("c"), Some(seq), Some(first), Some(last)) => {
                    let Some(hash) = f.get(4).filter(|h| h.len() == 16) else {
                        continue;
                    };
                    let batch = (first, last, (*hash).to_owned());
                    if let Some(known) = batches.get(&seq) {
                        assert_eq!(
                            known, &batch,
                            "round {round}: batch {seq} re-shipped differently"
                        );
                        reshipped += 1;
                    } else {
                        batches.insert(seq, batch);
                        cuts += 1;
                    }
                }
                (Some("p"), ..) => waits += 1,
                (Some("k"), Some(seq), _, _) => {
                    acked = acked.max(seq);
                    acks += 1;
                }
                _ => {}
            }
        }
        appends += reported_ops.len();

        if inspect(dir)
            .unwrap_or_else(|e| panic!("round {round}: inspect: {e}"))
            .tail_damage
            .is_some()
        {
            torn += 1;
        }
        let j = Journal::open(dir, crash_opts())
            .unwrap_or_else(|e| panic!("round {round}: recovery failed: {e}"));
        let s = j.stats();
        assert!(
            s.last_lsn >= max_synced,
            "round {round}: synced up to {max_synced}, recovered up to {}",
            s.last_lsn
        );
        // Records past the recovered end were lost (never synced): their
        // lsns are assigned again next round.
        ops.retain(|&lsn, _| lsn <= s.last_lsn);
        for (lsn, op) in reported_ops {
            if lsn <= s.last_lsn {
                ops.insert(lsn, intents[&op]);
            }
        }
        let last_reported = intents.keys().next_back().copied();
        if let Some(op) = last_reported {
            if !ops.values().any(|r| r.round == round && r.op == op) {
                in_flight_ops.push(intents[&op]);
            }
        }
        assert!(
            s.acked_seq >= acked,
            "round {round}: acked {acked}, recovered {}",
            s.acked_seq
        );
        let unshipped = j.unshipped_batches().unwrap();
        for b in &unshipped {
            if let Some(known) = batches.get(&b.seq) {
                assert_eq!(
                    known,
                    &(b.first_lsn, b.last_lsn, batch_hash(b)),
                    "round {round}: batch {} changed across the crash",
                    b.seq
                );
            }
        }
        for (&seq, _) in batches.range(s.acked_seq + 1..) {
            assert!(
                unshipped.iter().any(|b| b.seq == seq),
                "round {round}: batch {seq} was cut and is lost"
            );
        }
        // Every block: the newest surviving reported write, unless
        // acknowledged, or a newer op whose report the kill cut off.
        let acked_last = j.shared.lock().st.acked_last_lsn;
        let view = j.read(0, CRASH_DEV_BLOCKS * BLOCK).unwrap();
        let mut cellv: Vec<Option<PieceData>> = vec![None; CRASH_DEV_BLOCKS as usize];
        for p in &view {
            for b in p.offset / BLOCK..(p.offset + p.len) / BLOCK {
                let data = match &p.data {
                    PieceData::Data(d) => {
                        let at = (
                            (b * BLOCK - p.offset) as usize,
                            ((b + 1) * BLOCK - p.offset) as usize,
                        );
                        PieceData::Data(d.slice(at.0..at.1))
                    }
                    other => other.clone(),
                };
                cellv[b as usize] = Some(data);
            }
        }
        for (b, got) in cellv.into_iter().enumerate() {
            let b = b as u64;
            let got = got.unwrap();
            let newest = ops
                .iter()
                .rev()
                .find(|(_, r)| (r.block..r.block + r.blocks).contains(&b));
            let matches = |r: &Reported| match &got {
                PieceData::Zero => r.zero,
                PieceData::Data(d) => !r.zero && parse_stamp(d) == Some((r.round, r.op, b)),
                PieceData::Absent => false,
            };
            let ok = match newest {
                Some((&lsn, r)) => matches(r) || (got == PieceData::Absent && lsn <= acked_last),
                None => got == PieceData::Absent,
            } || in_flight_ops.iter().any(|u| {
                (u.block..u.block + u.blocks).contains(&b)
                    && newest.is_none_or(|(_, r)| u.round >= r.round)
                    && matches(u)
            });
            assert!(
                ok,
                "round {round}: block {b} reads {:?}, newest reported write {newest:?}",
                match &got {
                    PieceData::Data(d) => format!("data {:?}", parse_stamp(d)),
                    other => format!("{other:?}"),
                }
            );
        }
        drop(j);
    }
    eprintln!(
        "crash_sigkill_loop: {ROUNDS} kills; {appends} appends, {syncs} syncs, {cuts} batches cut, \
         {reshipped} re-shipped after restart, {acks} acks reported; appends seen waiting for space \
         {waits} times; {torn} recoveries found a torn tail"
    );
    assert!(
        appends > 100 && cuts > 10 && acks > 10,
        "the children did work"
    );
}

/// `unshipped_through` is a barrier: it counts only data records at or
/// before the LSN it is given, so writes after it never hold it up.
#[test]
fn unshipped_through_counts_only_records_before_the_barrier() {
    let rt = rt();
    rt.block_on(async {
        let storage = MemStorage::default();
        let j = open_mem(&storage, &small_opts()).unwrap();
        j.append_write(0, Bytes::from(pattern(1, 512)))
            .await
            .unwrap();
        j.append_zero(4096, 512).await.unwrap();
        let barrier = j.sync_all().await.unwrap();
        assert_eq!(j.unshipped_through(barrier), 2);
        // A write after the barrier: unshipped, but not the barrier's.
        let batch = j
            .cut_batch(u64::MAX, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        j.append_write(8192, Bytes::from(pattern(2, 512)))
            .await
            .unwrap();
        assert_eq!(j.unshipped_through(barrier), 2);
        j.ack(batch.seq).await.unwrap();
        assert_eq!(j.unshipped_through(barrier), 0);
        assert_eq!(j.stats().unshipped_records, 1);
        let later = j.sync_all().await.unwrap();
        assert_eq!(j.unshipped_through(later), 1);
    });
}
