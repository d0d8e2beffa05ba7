//! The origin's apply journal: write batches from an edge are applied to the
//! volume atomically and exactly once, even across crashes.
//!
//! ```text
//!   batch seq N arrives
//!        |
//!        v
//!   apply.log <- record(N, entries); fdatasync      (1) the batch is safe
//!        |
//!        v
//!   device: write / zero every entry; flush         (2) the image changes
//!        |
//!        v
//!   applied <- N  (write tmp, fsync, rename, fsync dir)   (3) N is done
//!        |
//!        v
//!   ack N to the edge; apply.log emptied
//! ```
//!
//! A crash before (1) completes loses a batch the edge has not been told
//! about: it resends it. A crash between (1) and (3) leaves a complete
//! record for a batch above `applied`: [`ApplyJournal::open`] applies it
//! again (every entry is an absolute overwrite, so applying twice equals
//! applying once) and marks it applied. So the image always moves from the
//! state after batch N-1 to the state after batch N, and a batch at or
//! below `applied` is acknowledged without being applied again.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockcore::{BlockDevice, BlockError, WriteEntry};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::storage::{read_file, replace_file, DiskStorage, Storage, StorageFile};

const LOG_FILE: &str = "apply.log";
const APPLIED_FILE: &str = "applied";
const MAGIC: [u8; 4] = *b"FRYA";

/// Errors of the apply journal.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("apply journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("apply journal {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("applying batch {seq} to the volume: {source}")]
    Device {
        seq: u64,
        #[source]
        source: BlockError,
    },
    #[error("batch {seq} arrived after batch {applied}; expected {expected}")]
    OutOfOrder {
        seq: u64,
        applied: u64,
        expected: u64,
    },
    #[error("batch {seq} is not the one begun ({begun:?})")]
    NotBegun { seq: u64, begun: Option<u64> },
}

/// What [`ApplyJournal::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The batch was applied now.
    Now,
    /// The batch had been applied before (a resend): nothing changed.
    Already,
}

/// What [`ApplyJournal::begin`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// The batch is logged: write its entries to the device, flush, then
    /// [`ApplyJournal::commit`].
    Logged,
    /// Applied before: nothing to do.
    Already,
}

// Format: apply.log holds at most one record (the batch being applied).
// Integers big-endian.
//
//   offset  size  field
//        0     4  magic      b"FRYA"
//        4     4  crc32      crc32fast of every byte after this field
//        8     8  body_len   bytes after this field
//       16     8  seq        batch sequence number
//       24     4  count      number of entries
//       28     .  entries    each: kind u8 (1 data, 2 zero) | offset u64
//                            | len u64 | data (len bytes, kind 1 only)
//
// `applied` holds the last applied sequence number as 8 bytes big-endian
// (absent: 0, nothing applied), replaced atomically.

fn encode(seq: u64, entries: &[WriteEntry]) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u64(seq);
    body.put_u32(u32::try_from(entries.len()).expect("entries fit u32"));
    for e in entries {
        match e {
            WriteEntry::Data { offset, data } => {
                body.put_u8(1);
                body.put_u64(*offset);
                body.put_u64(data.len() as u64);
                body.put_slice(data);
            }
            WriteEntry::Zero { offset, len } => {
                body.put_u8(2);
                body.put_u64(*offset);
                body.put_u64(*len);
            }
        }
    }
    let mut rec = BytesMut::with_capacity(16 + body.len());
    rec.put_slice(&MAGIC);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&(body.len() as u64).to_be_bytes());
    crc.update(&body);
    rec.put_u32(crc.finalize());
    rec.put_u64(body.len() as u64);
    rec.put_slice(&body);
    rec
}

/// Decodes a record; `None` if absent, torn or corrupt (never applied by
/// anyone, so safe to drop: the edge resends unacknowledged batches).
fn decode(buf: &[u8]) -> Option<(u64, Vec<WriteEntry>)> {
    if buf.len() < 16 || buf[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_be_bytes(buf[4..8].try_into().ok()?);
    let body_len = usize::try_from(u64::from_be_bytes(buf[8..16].try_into().ok()?)).ok()?;
    let body = buf.get(16..16usize.checked_add(body_len)?)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[8..16]);
    h.update(body);
    if h.finalize() != crc {
        return None;
    }
    let mut b = body;
    if b.remaining() < 12 {
        return None;
    }
    let seq = b.get_u64();
    let count = b.get_u32();
    let mut entries = Vec::new();
    for _ in 0..count {
        if b.remaining() < 17 {
            return None;
        }
        let kind = b.get_u8();
        let offset = b.get_u64();
        let len = b.get_u64();
        match kind {
            1 => {
                let len = usize::try_from(len).ok()?;
                if b.remaining() < len {
                    return None;
                }
                entries.push(WriteEntry::Data {
                    offset,
                    data: Bytes::copy_from_slice(&b[..len]),
                });
                b.advance(len);
            }
            2 => entries.push(WriteEntry::Zero { offset, len }),
            _ => return None,
        }
    }
    b.is_empty().then_some((seq, entries))
}

/// A batch found in the log: its sequence number and entries.
type LoggedBatch = (u64, Vec<WriteEntry>);

/// The apply journal of one volume, in its own directory on the origin.
///
/// Its file operations (`begin`, `commit`, opening) block on `fdatasync`:
/// the origin runs them off its async threads; the device writes between
/// them are the caller's ([`ApplyJournal::write`]).
#[derive(Debug)]
pub struct ApplyJournal {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    log: Arc<dyn StorageFile>,
    applied: u64,
    begun: Option<u64>,
    apply_twice: bool,
}

impl ApplyJournal {
    /// Opens the journal in `dir` (created if missing) and finishes a batch
    /// that a crash interrupted, applying it to `device`. Blocks on file
    /// I/O.
    pub async fn open(dir: &Path, device: &dyn BlockDevice) -> Result<ApplyJournal, ApplyError> {
        Self::open_with(Arc::new(DiskStorage), dir, device).await
    }

    /// [`ApplyJournal::open`] over another [`Storage`].
    pub async fn open_with(
        storage: Arc<dyn Storage>,
        dir: &Path,
        device: &dyn BlockDevice,
    ) -> Result<ApplyJournal, ApplyError> {
        let (mut journal, pending) = Self::open_files(storage, dir)?;
        if let Some((seq, entries)) = pending {
            tracing::info!(seq, "origin: finishing a batch interrupted by a crash");
            journal.begun = Some(seq);
            Self::write(seq, &entries, device).await?;
            journal.commit(seq)?;
        }
        journal.clear_log()?;
        Ok(journal)
    }

    /// Opens the files; returns the interrupted batch to finish, if any.
    fn open_files(
        storage: Arc<dyn Storage>,
        dir: &Path,
    ) -> Result<(ApplyJournal, Option<LoggedBatch>), ApplyError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ApplyError::Io { path, source }
        };
        storage.create_dir_all(dir).map_err(io_err(dir))?;
        let applied_path = dir.join(APPLIED_FILE);
        let applied =
            match read_file(storage.as_ref(), &applied_path).map_err(io_err(&applied_path))? {
                Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                    ApplyError::Corrupt {
                        path: applied_path.clone(),
                        why: format!("{} bytes, expected 8", v.len()),
                    }
                })?),
                None => 0,
            };
        let log_path = dir.join(LOG_FILE);
        let log = match storage.open(&log_path, true) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = storage.create(&log_path).map_err(io_err(&log_path))?;
                storage.sync_dir(dir).map_err(io_err(dir))?;
                f
            }
            Err(e) => return Err(io_err(&log_path)(e)),
        };
        let len = usize::try_from(log.size().map_err(io_err(&log_path))?).unwrap_or(usize::MAX);
        let mut pending = vec![0; len];
        log.read_exact_at(&mut pending, 0)
            .map_err(io_err(&log_path))?;
        let journal = ApplyJournal {
            storage,
            dir: dir.to_path_buf(),
            log,
            applied,
            begun: None,
            apply_twice: false,
        };
        let pending = decode(&pending).filter(|(seq, _)| *seq > applied);
        Ok((journal, pending))
    }

    /// The last batch applied (0: none).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// A batch begun and not committed: its apply failed part way (the
    /// device may hold some of it) and it waits to be resent. `None`
    /// between batches.
    pub fn pending(&self) -> Option<u64> {
        self.begun
    }

    /// Reintroduces a known mistake for the simulator's tests: a batch
    /// at or below [`ApplyJournal::applied`] is applied again.
    pub fn set_apply_twice(&mut self, on: bool) {
        self.apply_twice = on;
    }

    /// Step (1) for batch `seq`: logs it durably, unless it was applied
    /// before. A batch that skips ahead is refused. Blocks on `fdatasync`.
    pub fn begin(&mut self, seq: u64, entries: &[WriteEntry]) -> Result<Begin, ApplyError> {
        if seq <= self.applied && !self.apply_twice {
            return Ok(Begin::Already);
        }
        if seq > self.applied + 1 {
            return Err(ApplyError::OutOfOrder {
                seq,
                applied: self.applied,
                expected: self.applied + 1,
            });
        }
        let rec = encode(seq, entries);
        let log_path = self.dir.join(LOG_FILE);
        self.log
            .truncate(0)
            .and_then(|()| self.log.write_all_at(&rec, 0))
            .and_then(|()| self.log.sync_data())
            .map_err(|source| ApplyError::Io {
                path: log_path,
                source,
            })?;
        self.begun = Some(seq);
        Ok(Begin::Logged)
    }

    /// Step (2): writes a begun batch's entries to the device and flushes
    /// it.
    pub async fn write(
        seq: u64,
        entries: &[WriteEntry],
        device: &dyn BlockDevice,
    ) -> Result<(), ApplyError> {
        let dev_err = |source| ApplyError::Device { seq, source };
        for e in entries {
            e.apply_to(device).await.map_err(dev_err)?;
        }
        device.flush().await.map_err(dev_err)
    }

    /// Step (3): records batch `seq` as applied (atomically, durably) and
    /// empties the log. Blocks on `fsync`.
    pub fn commit(&mut self, seq: u64) -> Result<(), ApplyError> {
        if self.begun != Some(seq) {
            return Err(ApplyError::NotBegun {
                seq,
                begun: self.begun,
            });
        }
        let path = self.dir.join(APPLIED_FILE);
        let new = self.applied.max(seq);
        replace_file(self.storage.as_ref(), &path, &new.to_be_bytes())
            .map_err(|source| ApplyError::Io { path, source })?;
        self.applied = new;
        self.begun = None;
        self.clear_log()
    }

    /// All three steps, on the caller's thread (tests, the simulator, the
    /// crash test's child). The origin itself runs the file steps on
    /// blocking threads.
    pub async fn apply(
        &mut self,
        seq: u64,
        entries: &[WriteEntry],
        device: &dyn BlockDevice,
    ) -> Result<Applied, ApplyError> {
        match self.begin(seq, entries)? {
            Begin::Already => Ok(Applied::Already),
            Begin::Logged => {
                Self::write(seq, entries, device).await?;
                self.commit(seq)?;
                Ok(Applied::Now)
            }
        }
    }

    fn clear_log(&self) -> Result<(), ApplyError> {
        self.log
            .truncate(0)
            .and_then(|()| self.log.sync_data())
            .map_err(|source| ApplyError::Io {
                path: self.dir.join(LOG_FILE),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};

    use super::*;
    use blockcore::{MemDevice, WriteFlags};

    fn data(seed: u8, len: usize) -> Bytes {
        Bytes::from(
            (0..len)
                .map(|i| seed.wrapping_add(u8::try_from(i % 256).unwrap()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn records_round_trip_and_torn_ones_are_dropped() {
        let entries = vec![
            WriteEntry::Data {
                offset: 4096,
                data: data(1, 5000),
            },
            WriteEntry::Zero {
                offset: 1 << 20,
                len: 65536,
            },
        ];
        let rec = encode(7, &entries);
        assert_eq!(decode(&rec), Some((7, entries)));
        for cut in 0..rec.len() {
            assert_eq!(decode(&rec[..cut]), None, "torn at {cut}");
        }
        for i in 0..rec.len() {
            let mut bad = rec.to_vec();
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "flip at {i}");
        }
    }

    #[tokio::test]
    async fn applies_in_order_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let dev = MemDevice::new(1 << 20);
        let mut j = ApplyJournal::open(dir.path(), &dev).await.unwrap();
        assert_eq!(j.applied(), 0);
        let b1 = [WriteEntry::Data {
            offset: 0,
            data: data(1, 100),
        }];
        assert_eq!(j.apply(1, &b1, &dev).await.unwrap(), Applied::Now);
        // A resend is acknowledged without applying.
        dev.write(0, data(9, 100), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(j.apply(1, &b1, &dev).await.unwrap(), Applied::Already);
        assert_eq!(dev.read(0, 100).await.unwrap(), data(9, 100));
        assert!(matches!(
            j.apply(3, &b1, &dev).await,
            Err(ApplyError::OutOfOrder { expected: 2, .. })
        ));
        drop(j);
        let j = ApplyJournal::open(dir.path(), &dev).await.unwrap();
        assert_eq!(j.applied(), 1);
    }

    #[tokio::test]
    async fn an_interrupted_batch_is_finished_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let dev = MemDevice::new(1 << 20);
        drop(ApplyJournal::open(dir.path(), &dev).await.unwrap());
        // As if the origin crashed after (1): the record is durable, the
        // image has only part of it, `applied` is still 0.
        let entries = vec![
            WriteEntry::Data {
                offset: 0,
                data: data(3, 4096),
            },
            WriteEntry::Data {
                offset: 8192,
                data: data(4, 4096),
            },
            WriteEntry::Zero {
                offset: 65536,
                len: 4096,
            },
        ];
        fs::write(dir.path().join(LOG_FILE), encode(1, &entries)).unwrap();
        dev.write(0, data(3, 4096), WriteFlags::default())
            .await
            .unwrap();
        dev.write(65536, data(5, 4096), WriteFlags::default())
            .await
            .unwrap();
        let j = ApplyJournal::open(dir.path(), &dev).await.unwrap();
        assert_eq!(j.applied(), 1);
        assert_eq!(dev.read(8192, 4096).await.unwrap(), data(4, 4096));
        assert!(dev.read(65536, 4096).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(), 0);
        // A torn record (crash during (1)) is dropped: nothing applied.
        let mut torn = encode(2, &entries).to_vec();
        torn.truncate(torn.len() - 10);
        fs::write(dir.path().join(LOG_FILE), torn).unwrap();
        let j = ApplyJournal::open(dir.path(), &dev).await.unwrap();
        assert_eq!(j.applied(), 1);
    }

    // ---- crash test -----------------------------------------------------

    const IMAGE: u64 = 1 << 20;

    /// Batch `seq`'s entries: a few writes and a zero, all derived from seq.
    fn batch(seq: u64) -> Vec<WriteEntry> {
        let mut rng = testkit::rng(seq);
        let mut v = Vec::new();
        for _ in 0..=rng.u64(..6) {
            let len = 1 + rng.u64(..40_000);
            let offset = rng.u64(..IMAGE - len);
            #[allow(clippy::cast_possible_truncation)]
            v.push(WriteEntry::Data {
                offset,
                data: data(seq as u8, len as usize),
            });
        }
        let len = 1 + rng.u64(..20_000);
        v.push(WriteEntry::Zero {
            offset: rng.u64(..IMAGE - len),
            len,
        });
        v
    }

    fn model(upto: u64) -> Vec<u8> {
        let mut img = vec![0u8; usize::try_from(IMAGE).unwrap()];
        for seq in 1..=upto {
            for e in batch(seq) {
                match e {
                    WriteEntry::Data { offset, data } => {
                        let o = usize::try_from(offset).unwrap();
                        img[o..o + data.len()].copy_from_slice(&data);
                    }
                    WriteEntry::Zero { offset, len } => {
                        let o = usize::try_from(offset).unwrap();
                        img[o..o + usize::try_from(len).unwrap()].fill(0);
                    }
                }
            }
        }
        img
    }

    /// The child of `crash_leaves_whole_batches`: applies batches to a
    /// file image until killed, reporting each one after it returned.
    fn crash_child(child: &testkit::crash::Child) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dev = blockcore::FileDevice::open(
                child.dir().join("image"),
                &blockcore::OpenOptions::default(),
            )
            .unwrap();
            let mut j = ApplyJournal::open(&child.dir().join("state"), &dev)
                .await
                .unwrap();
            for seq in j.applied() + 1.. {
                j.apply(seq, &batch(seq), &dev).await.unwrap();
                child.report(seq);
            }
        });
    }

    #[test]
    fn crash_leaves_whole_batches() {
        use testkit::crash::{self, CrashTest, Verdict};
        if let Some(child) = crash::child() {
            crash_child(&child);
            return;
        }
        let t = CrashTest::new(crash::name(module_path!(), "crash_leaves_whole_batches"));
        File::create(t.dir().join("image"))
            .unwrap()
            .set_len(IMAGE)
            .unwrap();
        let mut last_reported = 0;
        for round in 0..12u64 {
            // Let it apply a round-dependent number of batches, then kill
            // it wherever it is.
            let target = last_reported + 1 + round % 5;
            let lines = t.run(round, |l| {
                if l.parse::<u64>().is_ok_and(|n| n >= target) {
                    Verdict::Kill
                } else {
                    Verdict::Continue
                }
            });
            let seen: u64 = lines.last().and_then(|l| l.parse().ok()).unwrap_or(0);
            assert!(seen >= target, "round {round}: the child stopped at {seen}");
            last_reported = seen;
            let dir = t.dir();

            let rt = tokio::runtime::Runtime::new().unwrap();
            let applied = rt.block_on(async {
                let dev = blockcore::FileDevice::open(
                    dir.join("image"),
                    &blockcore::OpenOptions::default(),
                )
                .unwrap();
                ApplyJournal::open(&dir.join("state"), &dev)
                    .await
                    .unwrap()
                    .applied()
            });
            // Every reported batch is applied, at most one more.
            assert!(
                applied == last_reported || applied == last_reported + 1,
                "round {round}: reported {last_reported}, applied {applied}"
            );
            let image = fs::read(dir.join("image")).unwrap();
            assert!(
                image == model(applied),
                "round {round}: image is not the state after batch {applied}"
            );
            last_reported = applied;
        }
    }
}
