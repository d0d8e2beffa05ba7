//! The journal's in-memory state: live segments, an index of live records,
//! the read-your-writes extent map and the batch bookkeeping. Appends and
//! recovery feed records through the same [`State::note_record`], so a
//! reopened journal is rebuilt by exactly the rules that built it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::extents::{ExtentMap, Shift};
use super::record::{Body, Checkpoint, Record};
use super::storage::StorageFile;
use super::Lsn;

/// One live segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    pub first_lsn: Lsn,
    pub path: PathBuf,
    pub file: Arc<dyn StorageFile>,
    /// Bytes written (header and records).
    pub len: u64,
    /// Bytes known durable.
    pub synced_len: u64,
    pub records: u64,
    pub last_lsn: Option<Lsn>,
    /// The newest data record (Write, Zero) in it.
    pub max_data_lsn: Option<Lsn>,
    /// The newest batch cut in it.
    pub max_cut_seq: Option<u64>,
}

/// What a live record is, without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecKind {
    Write {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Flush,
    Cut {
        seq: u64,
        first_lsn: Lsn,
        last_lsn: Lsn,
    },
    Acked {
        seq: u64,
        last_lsn: Lsn,
    },
}

impl RecKind {
    /// The guest range of a data record.
    pub(crate) fn range(&self) -> Option<(u64, u64)> {
        match *self {
            RecKind::Write { offset, len } | RecKind::Zero { offset, len } => {
                Some((offset, offset + len))
            }
            _ => None,
        }
    }
}

/// The index entry of one live record.
#[derive(Debug)]
pub(crate) struct RecMeta {
    pub lsn: Lsn,
    pub timestamp: u64,
    pub kind: RecKind,
    pub file: Arc<dyn StorageFile>,
    /// Where a Write's data starts in its segment file.
    pub data_pos: u64,
    /// Encoded bytes of data records (Write, Zero) up to and including
    /// this one, and their count: prefix sums, so sizes and ages of any
    /// lsn range are two lookups.
    pub cum_bytes: u64,
    pub cum_records: u64,
    /// Bytes of this record's range that are still the newest journaled
    /// content for them (in the extent map).
    pub live: u64,
    /// The data, while it is held in memory.
    pub mem: Option<Bytes>,
}

/// Where the newest journaled bytes of a range are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ext {
    pub lsn: Lsn,
    /// For data: the offset within the record's data.
    pub data_off: Option<u64>,
}

impl Shift for Ext {
    fn shifted(&self, by: u64) -> Self {
        Ext {
            lsn: self.lsn,
            data_off: self.data_off.map(|o| o + by),
        }
    }
}

/// A cut batch the origin has not acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InFlight {
    pub seq: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
}

/// Where the next batch should end, as decided by [`State::plan_cut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CutPlan {
    pub seq: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
}

#[derive(Debug)]
pub(crate) struct State {
    pub next_lsn: Lsn,
    /// Newest timestamp appended; timestamps never go backwards.
    pub last_ts: u64,
    /// Oldest first; the back one is appended to.
    pub segments: VecDeque<Segment>,
    /// Bytes of all live segments.
    pub used: u64,
    /// Every live record, by lsn (contiguous).
    pub records: VecDeque<RecMeta>,
    /// `cum_bytes`, `cum_records` before the first live record.
    base_cum: (u64, u64),
    /// ... and after the newest.
    cum: (u64, u64),
    pub extents: ExtentMap<Ext>,
    /// Bytes of record data held in memory, the bound, and the order to
    /// drop them in (oldest first; may name records already dropped).
    pub mem_bytes: u64,
    mem_limit: u64,
    mem_fifo: VecDeque<Lsn>,
    /// The batch state as the log records it (Cut and Acked records
    /// appended, durable or not): what a new segment's header carries.
    pub log: Checkpoint,
    /// Acknowledgements whose `Acked` record is durable and whose effects
    /// (extent map, trimming) are applied.
    pub acked_seq: u64,
    pub acked_last_lsn: Lsn,
    pub in_flight: VecDeque<InFlight>,
    /// Flush records after the newest cut, with `cum_bytes` at each.
    uncut_flushes: VecDeque<(Lsn, u64)>,
}

impl State {
    pub(crate) fn new(next_lsn: Lsn, checkpoint: Checkpoint, mem_limit: u64) -> Self {
        Self {
            next_lsn,
            last_ts: 0,
            segments: VecDeque::new(),
            used: 0,
            records: VecDeque::new(),
            base_cum: (0, 0),
            cum: (0, 0),
            extents: ExtentMap::default(),
            mem_bytes: 0,
            mem_limit,
            mem_fifo: VecDeque::new(),
            log: checkpoint,
            acked_seq: checkpoint.acked_seq,
            acked_last_lsn: checkpoint.acked_last_lsn,
            in_flight: VecDeque::new(),
            uncut_flushes: VecDeque::new(),
        }
    }

    pub(crate) fn record(&self, lsn: Lsn) -> Option<&RecMeta> {
        let front = self.records.front()?.lsn;
        self.records
            .get(usize::try_from(lsn.checked_sub(front)?).ok()?)
    }

    fn record_mut(records: &mut VecDeque<RecMeta>, lsn: Lsn) -> Option<&mut RecMeta> {
        let front = records.front()?.lsn;
        records.get_mut(usize::try_from(lsn.checked_sub(front)?).ok()?)
    }

    /// The index of the first live record at or after `lsn`.
    fn index_from(&self, lsn: Lsn) -> usize {
        self.records.front().map_or(0, |f| {
            usize::try_from(lsn.saturating_sub(f.lsn))
                .unwrap_or(usize::MAX)
                .min(self.records.len())
        })
    }

    /// Prefix sums up to and including `lsn`.
    pub(crate) fn cum_at(&self, lsn: Lsn) -> (u64, u64) {
        match self.records.front() {
            Some(f) if lsn >= f.lsn => {
                let i = usize::try_from(lsn - f.lsn)
                    .unwrap_or(usize::MAX)
                    .min(self.records.len() - 1);
                (self.records[i].cum_bytes, self.records[i].cum_records)
            }
            _ => self.base_cum,
        }
    }

    /// Encoded bytes and count of data records after `lsn`.
    pub(crate) fn data_after(&self, lsn: Lsn) -> (u64, u64) {
        let c = self.cum_at(lsn);
        (self.cum.0 - c.0, self.cum.1 - c.1)
    }

    /// Timestamp of the oldest data record after `lsn`.
    pub(crate) fn oldest_data_after(&self, lsn: Lsn) -> Option<u64> {
        let base = self.cum_at(lsn).0;
        let i = self.records.partition_point(|r| r.cum_bytes <= base);
        self.records.get(i).map(|r| r.timestamp)
    }

    fn drop_mem(rec: &mut RecMeta, mem_bytes: &mut u64) {
        if let Some(m) = rec.mem.take() {
            *mem_bytes -= m.len() as u64;
        }
    }

    /// Takes a newly appended record (in the active segment) into the
    /// state. `data_pos` locates a Write's data in the segment file; `size`
    /// is the encoded length; `mem` the data to hold in memory (subject to
    /// the bound).
    /// Errors say why the record cannot follow the ones before (recovery
    /// reports them as corruption).
    pub(crate) fn note_record(
        &mut self,
        rec: &Record<'_>,
        data_pos: u64,
        size: u64,
        mem: Option<Bytes>,
    ) -> Result<(), String> {
        if rec.lsn != self.next_lsn {
            return Err(format!(
                "lsn {} where {} was expected",
                rec.lsn, self.next_lsn
            ));
        }
        let kind = match rec.body {
            Body::Write { offset, data } => RecKind::Write {
                offset,
                len: data.len() as u64,
            },
            Body::Zero { offset, len } => RecKind::Zero { offset, len },
            Body::Flush => RecKind::Flush,
            Body::Cut {
                seq,
                first_lsn,
                last_lsn,
            } => {
                if seq != self.log.cut_seq + 1
                    || first_lsn != self.log.cut_last_lsn + 1
                    || first_lsn > last_lsn
                    || last_lsn >= rec.lsn
                {
                    return Err(format!(
                        "cut of batch {seq} ({first_lsn}..={last_lsn}) at lsn {} does not follow \
                         batch {} ending at {}",
                        rec.lsn, self.log.cut_seq, self.log.cut_last_lsn
                    ));
                }
                RecKind::Cut {
                    seq,
                    first_lsn,
                    last_lsn,
                }
            }
            Body::Acked { seq, last_lsn } => {
                let known = self
                    .in_flight
                    .iter()
                    .find(|b| b.seq == seq)
                    .map(|b| b.last_lsn);
                let ok = seq <= self.log.cut_seq
                    && (seq <= self.log.acked_seq
                        || known.map_or(
                            last_lsn <= self.log.cut_last_lsn
                                && last_lsn >= self.log.acked_last_lsn,
                            |l| l == last_lsn,
                        ));
                if !ok {
                    return Err(format!(
                        "ack of batch {seq} ending at {last_lsn} does not match the batches cut \
                         (newest {} ending at {})",
                        self.log.cut_seq, self.log.cut_last_lsn
                    ));
                }
                RecKind::Acked { seq, last_lsn }
            }
        };
        let lsn = rec.lsn;
        let seg = self.segments.back_mut().expect("a live segment");
        seg.len += size;
        seg.records += 1;
        seg.last_lsn = Some(lsn);
        self.used += size;
        self.next_lsn = lsn + 1;
        self.last_ts = self.last_ts.max(rec.timestamp);
        if rec.body.is_data() {
            self.cum.0 += size;
            self.cum.1 += 1;
        }
        match kind {
            RecKind::Write { .. } | RecKind::Zero { .. } => seg.max_data_lsn = Some(lsn),
            RecKind::Cut { seq, .. } => seg.max_cut_seq = Some(seq),
            RecKind::Flush | RecKind::Acked { .. } => {}
        }
        let file = seg.file.clone();
        self.records.push_back(RecMeta {
            lsn,
            timestamp: rec.timestamp,
            kind,
            file,
            data_pos,
            cum_bytes: self.cum.0,
            cum_records: self.cum.1,
            live: 0,
            mem: None,
        });
        match kind {
            // Already applied at the origin (only possible in a replay):
            // not the journal's to serve.
            RecKind::Write { .. } | RecKind::Zero { .. } if lsn <= self.acked_last_lsn => {}
            RecKind::Write { offset, len } | RecKind::Zero { offset, len } => {
                let data_off = matches!(kind, RecKind::Write { .. }).then_some(0);
                let records = &mut self.records;
                let mem_bytes = &mut self.mem_bytes;
                self.extents
                    .insert(offset, offset + len, Ext { lsn, data_off }, |s, e, old| {
                        if let Some(r) = Self::record_mut(records, old.lsn) {
                            r.live -= e - s;
                            if r.live == 0 {
                                Self::drop_mem(r, mem_bytes);
                            }
                        }
                    });
                let me = self.records.back_mut().expect("just pushed");
                me.live = len;
                if let Some(data) = mem.filter(|d| d.len() as u64 <= self.mem_limit) {
                    self.mem_bytes += data.len() as u64;
                    me.mem = Some(data);
                    self.mem_fifo.push_back(lsn);
                    self.evict_mem();
                }
            }
            RecKind::Flush => self.uncut_flushes.push_back((lsn, self.cum.0)),
            RecKind::Cut {
                seq,
                first_lsn,
                last_lsn,
            } => {
                self.log.cut_seq = seq;
                self.log.cut_last_lsn = last_lsn;
                self.in_flight.push_back(InFlight {
                    seq,
                    first_lsn,
                    last_lsn,
                });
                while self.uncut_flushes.front().is_some_and(|f| f.0 <= last_lsn) {
                    self.uncut_flushes.pop_front();
                }
            }
            RecKind::Acked { seq, last_lsn } => {
                if seq > self.log.acked_seq {
                    self.log.acked_seq = seq;
                    self.log.acked_last_lsn = last_lsn;
                }
            }
        }
        Ok(())
    }

    /// Drops the oldest in-memory data until within the bound.
    fn evict_mem(&mut self) {
        while self.mem_bytes > self.mem_limit {
            let Some(lsn) = self.mem_fifo.pop_front() else {
                break;
            };
            if let Some(r) = Self::record_mut(&mut self.records, lsn) {
                Self::drop_mem(r, &mut self.mem_bytes);
            }
        }
        // Entries for records that dropped their data otherwise: keep the
        // queue proportional to what it describes.
        if self.mem_fifo.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.mem_fifo.retain(|&l| {
                let front = records.front().map_or(0, |f| f.lsn);
                l >= front
                    && records
                        .get(usize::try_from(l - front).unwrap_or(usize::MAX))
                        .is_some_and(|r| r.mem.is_some())
            });
        }
    }

    /// Applies a durable acknowledgement of every batch up to `seq`
    /// (ending at `last_lsn`): the records it covers stop being the
    /// journal's view of their ranges. Returns the guest ranges that are no
    /// longer in the journal at all.
    pub(crate) fn apply_ack(&mut self, seq: u64, last_lsn: Lsn) -> Vec<(u64, u64)> {
        if seq <= self.acked_seq {
            return Vec::new();
        }
        let mut ended = Vec::new();
        let from = self.index_from(self.acked_last_lsn + 1);
        let to = self.index_from(last_lsn + 1);
        for i in from..to {
            let r = &mut self.records[i];
            if r.live > 0 {
                let (s, e) = r.kind.range().expect("only data records are live");
                let lsn = r.lsn;
                ended.extend(self.extents.remove_starting_in(s, e, |x| x.lsn == lsn));
                r.live = 0;
            }
            Self::drop_mem(r, &mut self.mem_bytes);
        }
        self.acked_seq = seq;
        self.acked_last_lsn = last_lsn;
        while self.in_flight.front().is_some_and(|b| b.seq <= seq) {
            self.in_flight.pop_front();
        }
        ended
    }

    /// Decides where the next batch ends, if one should be cut now:
    ///
    /// - when the uncut data exceed `max_bytes`: at the newest flush that
    ///   follows data within the first `max_bytes` (at least one record),
    ///   else at the last data record that fits;
    /// - else at the newest flush that follows data;
    /// - else, when the oldest uncut data is `max_age_ns` old or appends
    ///   wait for space (`pressure`), at the newest data record.
    ///
    /// Any record boundary is crash-consistent (records are appended in
    /// completion order); flush boundaries are the ones the guest asked for.
    /// A batch always ends at a data or flush record, never at bookkeeping.
    pub(crate) fn plan_cut(
        &self,
        max_bytes: u64,
        max_age_ns: u64,
        now: u64,
        pressure: bool,
    ) -> Option<CutPlan> {
        let base = self.cum_at(self.log.cut_last_lsn).0;
        let total = self.cum.0 - base;
        if total == 0 {
            return None;
        }
        // Prefix sums step up exactly at data records.
        let first_data = self.records.partition_point(|r| r.cum_bytes <= base);
        let newest_flush = |below: Lsn| {
            let i = self.uncut_flushes.partition_point(|f| f.0 < below);
            match i.checked_sub(1).map(|i| self.uncut_flushes[i]) {
                Some((l, c)) if c > base => Some(l),
                _ => None,
            }
        };
        let last_lsn = if total > max_bytes {
            let fit = self
                .records
                .partition_point(|r| r.cum_bytes <= base.saturating_add(max_bytes));
            let last_data = if fit > first_data {
                let c = self.records[fit - 1].cum_bytes;
                self.records.partition_point(|r| r.cum_bytes < c)
            } else {
                first_data
            };
            let c = self.records[last_data].cum_bytes;
            let next_data = self.records.partition_point(|r| r.cum_bytes <= c);
            let boundary = self.records.get(next_data).map_or(self.next_lsn, |r| r.lsn);
            newest_flush(boundary).unwrap_or(self.records[last_data].lsn)
        } else if let Some(l) = newest_flush(self.next_lsn) {
            l
        } else {
            let age = now.saturating_sub(self.records[first_data].timestamp);
            if !pressure && age < max_age_ns {
                return None;
            }
            let newest_data = self.records.partition_point(|r| r.cum_bytes < self.cum.0);
            self.records[newest_data].lsn
        };
        Some(CutPlan {
            seq: self.log.cut_seq + 1,
            first_lsn: self.log.cut_last_lsn + 1,
            last_lsn,
        })
    }

    /// Whether a segment holds nothing recovery or a batch still needs:
    /// its data and cuts all acknowledged. Its Acked records are summarised
    /// by the next segment's header; its flushes follow only acknowledged
    /// data, so they can no longer end a batch.
    pub(crate) fn segment_done(&self, seg: &Segment) -> bool {
        seg.max_data_lsn.is_none_or(|l| l <= self.acked_last_lsn)
            && seg.max_cut_seq.is_none_or(|s| s <= self.acked_seq)
    }

    /// Bytes that rolling to a new segment would free: the done segments
    /// at the front (segments are deleted oldest first), the active one
    /// included.
    pub(crate) fn reclaimable(&self) -> u64 {
        self.segments
            .iter()
            .take_while(|s| self.segment_done(s))
            .map(|s| s.len)
            .sum()
    }

    /// Forgets the oldest segment (its file is already removed).
    pub(crate) fn pop_front_segment(&mut self) {
        let seg = self.segments.pop_front().expect("a segment to drop");
        self.used -= seg.len;
        let next_first = self.segments.front().map_or(self.next_lsn, |s| s.first_lsn);
        while self.records.front().is_some_and(|r| r.lsn < next_first) {
            let mut r = self.records.pop_front().expect("checked");
            debug_assert_eq!(
                r.live, 0,
                "a trimmed record is still the newest for its range"
            );
            Self::drop_mem(&mut r, &mut self.mem_bytes);
            self.base_cum = (r.cum_bytes, r.cum_records);
        }
        while self.uncut_flushes.front().is_some_and(|f| f.0 < next_first) {
            self.uncut_flushes.pop_front();
        }
    }

    /// Bytes and records appended but not in any cut batch.
    pub(crate) fn uncut(&self) -> (u64, u64) {
        self.data_after(self.log.cut_last_lsn)
    }
}
