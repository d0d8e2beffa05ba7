//! Reading a journal directory back: [`open_state`] for [`super::Journal::open`]
//! (repairs a torn tail) and [`inspect`] for tools (changes nothing). Both
//! replay every record through [`State::note_record`], the function appends
//! use, so the rebuilt state is the one the journal had.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::record::{
    Body, Checkpoint, DecodeError, Record, SegmentHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
    WRITE_PREFIX_LEN,
};
use super::state::{Segment, State};
use super::storage::{DiskStorage, Storage};
use super::{JournalError, JournalOptions, Lsn, RecoveryMode};

/// An I/O failure: what was being done, to which path.
pub(crate) type IoFailure = (&'static str, PathBuf, io::Error);

/// The file name of the segment starting at `first_lsn`.
pub(crate) fn segment_name(first_lsn: Lsn) -> String {
    format!("seg-{first_lsn:020}.log")
}

fn parse_segment_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Creates a segment durably: file, header, `fdatasync`, directory sync.
/// Records go into it only after this returns, so a segment whose header
/// is missing or torn never held a record.
pub(crate) fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    first_lsn: Lsn,
    checkpoint: Checkpoint,
) -> Result<Segment, IoFailure> {
    let path = dir.join(segment_name(first_lsn));
    let file = storage
        .create(&path)
        .map_err(|e| ("create", path.clone(), e))?;
    let header = SegmentHeader {
        first_lsn,
        checkpoint,
    }
    .encode();
    file.write_all_at(&header, 0)
        .map_err(|e| ("write the header of", path.clone(), e))?;
    file.sync_data().map_err(|e| ("sync", path.clone(), e))?;
    storage
        .sync_dir(dir)
        .map_err(|e| ("sync directory", dir.to_owned(), e))?;
    let len = SEGMENT_HEADER_LEN as u64;
    Ok(Segment {
        first_lsn,
        path,
        file,
        len,
        synced_len: len,
        records: 0,
        last_lsn: None,
        max_data_lsn: None,
        max_cut_seq: None,
    })
}

/// Damage found at the end of the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailDamage {
    pub path: PathBuf,
    pub offset: u64,
    /// Bytes from `offset` to the end of the file (truncated on open).
    pub bytes: u64,
    pub why: String,
}

/// One segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentReport {
    pub name: String,
    pub first_lsn: Lsn,
    pub last_lsn: Option<Lsn>,
    pub records: u64,
    pub bytes: u64,
}

/// One batch cut and not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchReport {
    pub seq: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
}

/// What [`inspect`] found in a journal directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    pub dir: PathBuf,
    pub segments: Vec<SegmentReport>,
    /// Bytes of all segments.
    pub bytes: u64,
    /// The oldest live record and the newest; `None` if there is none.
    pub lsns: Option<(Lsn, Lsn)>,
    pub last_cut_seq: u64,
    pub acked_seq: u64,
    pub acked_last_lsn: Lsn,
    pub in_flight: Vec<BatchReport>,
    /// Data records not acknowledged by the origin, and not yet cut.
    pub unshipped_records: u64,
    pub unshipped_bytes: u64,
    pub uncut_records: u64,
    pub uncut_bytes: u64,
    /// Timestamp (unix nanoseconds) of the oldest unacknowledged write.
    pub oldest_unshipped: Option<u64>,
    /// A torn or damaged tail that opening the journal would truncate.
    pub tail_damage: Option<TailDamage>,
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "journal {}", self.dir.display())?;
        writeln!(
            f,
            "  segments: {} ({} bytes)",
            self.segments.len(),
            self.bytes
        )?;
        for s in &self.segments {
            let lsns = s.last_lsn.map_or_else(
                || "empty".to_owned(),
                |l| format!("lsn {}..={l}", s.first_lsn),
            );
            writeln!(
                f,
                "    {}  {lsns}  {} records  {} bytes",
                s.name, s.records, s.bytes
            )?;
        }
        match self.lsns {
            Some((a, b)) => writeln!(f, "  records: lsn {a}..={b}")?,
            None => writeln!(f, "  records: none")?,
        }
        writeln!(
            f,
            "  batches: last cut {}, acknowledged {} (up to lsn {})",
            self.last_cut_seq, self.acked_seq, self.acked_last_lsn
        )?;
        for b in &self.in_flight {
            writeln!(
                f,
                "    in flight: batch {} (lsn {}..={})",
                b.seq, b.first_lsn, b.last_lsn
            )?;
        }
        write!(
            f,
            "  unshipped: {} writes, {} bytes ({} writes, {} bytes not yet in a batch)",
            self.unshipped_records, self.unshipped_bytes, self.uncut_records, self.uncut_bytes
        )?;
        if let Some(ts) = self.oldest_unshipped {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let age = now.saturating_sub(Duration::from_nanos(ts));
            write!(f, "; oldest written {:.1} s ago", age.as_secs_f64())?;
        }
        writeln!(f)?;
        match &self.tail_damage {
            Some(d) => writeln!(
                f,
                "  tail damage: {} at offset {}: {} ({} bytes would be truncated on open)",
                d.path.display(),
                d.offset,
                d.why,
                d.bytes
            ),
            None => writeln!(f, "  tail: clean"),
        }
    }
}

/// The replayed directory.
struct Replay {
    st: Option<State>,
    segments: Vec<SegmentReport>,
    tail: Option<TailDamage>,
}

fn corrupt(path: &Path, offset: u64, why: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.to_owned(),
        offset,
        why: why.into(),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Looks past damage for a valid record that should have come later: if
/// there is one, the damage is not simply the end of an interrupted write.
fn later_record(buf: &[u8], expected: Lsn, max_body: usize) -> Option<Lsn> {
    (1..buf.len().saturating_sub(RECORD_HEADER_LEN - 1)).find_map(|off| {
        let b = &buf[off..];
        let lsn = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
        // Cheap filters before the crc.
        if lsn < expected || lsn - expected > 1 << 32 || !(1..=5).contains(&b[24]) {
            return None;
        }
        if b[25..RECORD_HEADER_LEN].iter().any(|&x| x != 0) {
            return None;
        }
        Record::decode(b, max_body).ok().map(|(r, _)| r.lsn)
    })
}

/// Reads every segment of `dir` in order, replaying its records. With
/// `repair`, a torn tail is truncated (and an interrupted segment creation
/// removed) on disk; without, they are only reported.
fn replay(
    storage: &dyn Storage,
    dir: &Path,
    max_body: usize,
    mem_limit: u64,
    mode: RecoveryMode,
    repair: bool,
) -> Result<Replay, JournalError> {
    let mut names: Vec<(Lsn, String)> = storage
        .list(dir)
        .map_err(io_err("list", dir))?
        .into_iter()
        .filter_map(|n| Some((parse_segment_name(&n)?, n)))
        .collect();
    names.sort();
    let count = names.len();
    let mut out = Replay {
        st: None,
        segments: Vec::new(),
        tail: None,
    };
    for (i, (first, name)) in names.into_iter().enumerate() {
        let last = i + 1 == count;
        let path = dir.join(&name);
        // Writable when repairing: the last segment takes appends, and so
        // does the one before it if the last turns out to be an
        // interrupted creation.
        let file = storage.open(&path, repair).map_err(io_err("open", &path))?;
        let size = file.size().map_err(io_err("stat", &path))?;
        let mut buf = vec![0; usize::try_from(size).map_err(|e| corrupt(&path, 0, e.to_string()))?];
        file.read_exact_at(&mut buf, 0)
            .map_err(io_err("read", &path))?;

        let header = match SegmentHeader::decode(&buf) {
            Ok(h) if h.first_lsn == first => h,
            Ok(h) => {
                return Err(corrupt(
                    &path,
                    16,
                    format!("header says first lsn {}, the name {first}", h.first_lsn),
                ))
            }
            Err(e) => {
                let why = match e {
                    DecodeError::Incomplete => "segment header incomplete".to_owned(),
                    DecodeError::Corrupt(why) => why,
                };
                // Only a segment still being created lacks a valid header,
                // and then nothing follows it (see `create_segment`). The
                // first segment must survive, unless it is the journal's
                // very first: its header carries the batch state.
                let interrupted = last
                    && size <= SEGMENT_HEADER_LEN as u64
                    && (out.st.is_some() || first == 1)
                    && mode == RecoveryMode::TolerateTailCorruption;
                if !interrupted {
                    return Err(corrupt(&path, 0, why));
                }
                tracing::warn!(
                    path = %path.display(),
                    why,
                    "journal: removing a segment whose creation was interrupted"
                );
                if repair {
                    storage.remove(&path).map_err(io_err("remove", &path))?;
                    storage
                        .sync_dir(dir)
                        .map_err(io_err("sync directory", dir))?;
                }
                out.tail = Some(TailDamage {
                    path,
                    offset: 0,
                    bytes: size,
                    why,
                });
                continue;
            }
        };
        if let Some(st) = &out.st {
            if first != st.next_lsn {
                return Err(corrupt(
                    &path,
                    16,
                    format!(
                        "segment starts at lsn {first}, but the one before ends at lsn {}",
                        st.next_lsn - 1
                    ),
                ));
            }
            if header.checkpoint != st.log {
                return Err(corrupt(
                    &path,
                    24,
                    format!(
                        "header checkpoint {:?} disagrees with the records before it ({:?})",
                        header.checkpoint, st.log
                    ),
                ));
            }
        }
        let st = out
            .st
            .get_or_insert_with(|| State::new(first, header.checkpoint, mem_limit));
        st.used += SEGMENT_HEADER_LEN as u64;
        st.segments.push_back(Segment {
            first_lsn: first,
            path: path.clone(),
            file: file.clone(),
            len: SEGMENT_HEADER_LEN as u64,
            synced_len: SEGMENT_HEADER_LEN as u64,
            records: 0,
            last_lsn: None,
            max_data_lsn: None,
            max_cut_seq: None,
        });

        let mut pos = SEGMENT_HEADER_LEN;
        let damage = loop {
            if pos == buf.len() {
                break None;
            }
            match Record::decode(&buf[pos..], max_body) {
                Ok((rec, n)) if rec.lsn == st.next_lsn => {
                    let data_pos = (pos + RECORD_HEADER_LEN + WRITE_PREFIX_LEN) as u64;
                    // A record that passed its crc yet does not follow the
                    // ones before is not a torn write: always an error.
                    st.note_record(&rec, data_pos, n as u64, None)
                        .map_err(|why| corrupt(&path, pos as u64, why))?;
                    if let Body::Acked { seq, last_lsn } = rec.body {
                        st.apply_ack(seq, last_lsn);
                    }
                    pos += n;
                }
                Ok((rec, _)) => {
                    break Some(format!(
                        "record lsn {} where {} was expected",
                        rec.lsn, st.next_lsn
                    ))
                }
                Err(DecodeError::Incomplete) => {
                    break Some("incomplete record (an interrupted write)".to_owned())
                }
                Err(DecodeError::Corrupt(why)) => break Some(why),
            }
        };
        if let Some(mut why) = damage {
            if let Some(lsn) = later_record(&buf[pos..], st.next_lsn, max_body) {
                // Pages may reach the disk out of order, so even this can be
                // a crash before a sync; it could also be media damage.
                why = format!("{why}; a valid record with lsn {lsn} follows");
            }
            if !last || mode == RecoveryMode::AbsoluteConsistency {
                return Err(corrupt(&path, pos as u64, why));
            }
            let bytes = size - pos as u64;
            tracing::warn!(
                path = %path.display(),
                offset = pos,
                bytes,
                why,
                last_lsn = st.next_lsn - 1,
                "journal: truncating a damaged tail (records after the last intact one are \
                 dropped; they were never synced unless the medium is damaged)"
            );
            if repair {
                file.truncate(pos as u64)
                    .map_err(io_err("truncate", &path))?;
                file.sync_data().map_err(io_err("sync", &path))?;
            }
            out.tail = Some(TailDamage {
                path: path.clone(),
                offset: pos as u64,
                bytes,
                why,
            });
        }
        let seg = st.segments.back().expect("just pushed");
        out.segments.push(SegmentReport {
            name,
            first_lsn: first,
            last_lsn: seg.last_lsn,
            records: seg.records,
            bytes: seg.len,
        });
    }
    if let Some(st) = &out.st {
        // Every batch cut and not acknowledged must be rebuildable: its
        // Cut record lives until the batch is acknowledged.
        let missing = st.log.cut_seq - st.acked_seq != st.in_flight.len() as u64
            || st
                .in_flight
                .iter()
                .zip(st.acked_seq + 1..)
                .any(|(b, seq)| b.seq != seq);
        if missing {
            let path = &st.segments.front().expect("a segment").path;
            return Err(corrupt(
                path,
                0,
                format!(
                    "batches {}..={} were cut but only {:?} have their Cut record",
                    st.acked_seq + 1,
                    st.log.cut_seq,
                    st.in_flight.iter().map(|b| b.seq).collect::<Vec<_>>()
                ),
            ));
        }
    }
    Ok(out)
}

/// Recovers the state of the journal in `dir` for writing, creating the
/// journal if there is none.
pub(crate) fn open_state(
    storage: &dyn Storage,
    dir: &Path,
    opts: &JournalOptions,
) -> Result<State, JournalError> {
    storage
        .create_dir_all(dir)
        .map_err(io_err("create directory", dir))?;
    let replay = replay(
        storage,
        dir,
        opts.max_body(),
        opts.memory_limit,
        opts.recovery,
        true,
    )?;
    let failed = |(op, path, source): IoFailure| JournalError::Io { op, path, source };
    match replay.st {
        None => {
            let seg = create_segment(storage, dir, 1, Checkpoint::default()).map_err(failed)?;
            let mut st = State::new(1, Checkpoint::default(), opts.memory_limit);
            st.used = seg.len;
            st.segments.push_back(seg);
            Ok(st)
        }
        Some(mut st) => {
            // After a process crash the records read back may exist only in
            // the page cache: make them durable before anyone relies on them.
            let last = st.segments.back().expect("a segment");
            last.file.sync_data().map_err(io_err("sync", &last.path))?;
            storage
                .sync_dir(dir)
                .map_err(io_err("sync directory", dir))?;
            for s in &mut st.segments {
                s.synced_len = s.len;
            }
            tracing::info!(
                dir = %dir.display(),
                segments = st.segments.len(),
                last_lsn = st.next_lsn - 1,
                batches_in_flight = st.in_flight.len(),
                "journal recovered"
            );
            Ok(st)
        }
    }
}

/// Inspects the journal in `dir` without changing anything: segments, lsn
/// range, batches, unshipped data, and any tail damage opening it would
/// truncate. Damage elsewhere is an error naming the file and offset. Run
/// it on a journal not in use.
pub fn inspect(dir: impl AsRef<Path>) -> Result<Inspection, JournalError> {
    let dir = dir.as_ref();
    let max_body = u32::MAX as usize;
    let replay = replay(
        &DiskStorage,
        dir,
        max_body,
        0,
        RecoveryMode::TolerateTailCorruption,
        false,
    )?;
    let mut report = Inspection {
        dir: dir.to_owned(),
        bytes: replay.segments.iter().map(|s| s.bytes).sum(),
        segments: replay.segments,
        lsns: None,
        last_cut_seq: 0,
        acked_seq: 0,
        acked_last_lsn: 0,
        in_flight: Vec::new(),
        unshipped_records: 0,
        unshipped_bytes: 0,
        uncut_records: 0,
        uncut_bytes: 0,
        oldest_unshipped: None,
        tail_damage: replay.tail,
    };
    if let Some(st) = replay.st {
        report.lsns = st.records.front().map(|r| (r.lsn, st.next_lsn - 1));
        report.last_cut_seq = st.log.cut_seq;
        report.acked_seq = st.acked_seq;
        report.acked_last_lsn = st.acked_last_lsn;
        report.in_flight = st
            .in_flight
            .iter()
            .map(|b| BatchReport {
                seq: b.seq,
                first_lsn: b.first_lsn,
                last_lsn: b.last_lsn,
            })
            .collect();
        (report.unshipped_bytes, report.unshipped_records) = st.data_after(st.acked_last_lsn);
        (report.uncut_bytes, report.uncut_records) = st.uncut();
        report.oldest_unshipped = st.oldest_data_after(st.acked_last_lsn);
    }
    Ok(report)
}
