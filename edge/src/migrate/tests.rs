//! The copy against guest writes and applied batches, concurrently, over
//! an in-memory origin: whatever interleaving the runtime picks, the local
//! copy ends equal to what the guest wrote over the origin's data, reads
//! see the same on both sides of the local/remote split, and a reopened
//! copy replays the journal's writes it may have missed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockcore::storage::DiskStorage;
use blockcore::{BlockDevice, MemDevice, WriteFlags, ZeroFlags};
use bytes::Bytes;
use journal::{Journal, JournalOptions};
use link::session::Mistakes;

use super::*;
use crate::volume::{AllocationWindow, EdgeVolume, Fetched, MirrorSource, ReadThrough};

const SIZE: u64 = 16 << 20;

/// The origin as the read-through layer: no cache.
struct Origin(Arc<MemDevice>);

#[async_trait]
impl ReadThrough for Origin {
    type Snapshot = ();
    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        self.0.read(offset, len).await
    }
    async fn prefetch(&self, _: u64, _: u64) -> blockcore::Result<()> {
        Ok(())
    }
    async fn invalidate(&self, _: u64, _: u64) -> blockcore::Result<()> {
        Ok(())
    }
    fn snapshot(&self, _: u64, _: u64) {}
    async fn offer(&self, _: u64, _: Bytes, (): &()) {}
}

/// The origin as the copy's source, slow enough that writes overtake it.
struct Source {
    origin: Arc<MemDevice>,
    /// The newest batch applied to `origin`.
    applied: Arc<AtomicU64>,
    /// The chunks fetched (their first bytes' MiB).
    fetched: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

#[async_trait]
impl MirrorSource for Source {
    async fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> blockcore::Result<(Vec<blockcore::Extent>, u64)> {
        let as_of = self.applied.load(Ordering::SeqCst);
        Ok((self.origin.extents(offset, len).await?, as_of))
    }
    async fn fetch(&self, offset: u64, len: u64) -> blockcore::Result<Vec<Fetched>> {
        let as_of = self.applied.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let half = len / 2;
        // Two pieces, the second first, one of them twice (a resent
        // request).
        let a = self
            .origin
            .read(offset, usize::try_from(half).unwrap())
            .await?;
        tokio::task::yield_now().await;
        let b = self
            .origin
            .read(offset + half, usize::try_from(len - half).unwrap())
            .await?;
        self.fetched.lock().unwrap().insert(offset >> 20);
        let mut v = vec![
            Fetched {
                offset: offset + half,
                as_of,
                data: b,
            },
            Fetched {
                offset,
                as_of,
                data: a.clone(),
            },
            Fetched {
                offset,
                as_of,
                data: a,
            },
        ];
        v.sort_by_key(|f| f.offset);
        Ok(v)
    }
}

struct World {
    dir: tempfile::TempDir,
    origin: Arc<MemDevice>,
    applied: Arc<AtomicU64>,
    model: Vec<u8>,
    /// The MiBs holding data at the origin at the start.
    data_chunks: std::collections::BTreeSet<u64>,
}

async fn world(seed: u64) -> World {
    let dir = tempfile::tempdir().unwrap();
    let origin = Arc::new(MemDevice::new(SIZE));
    let mut model = vec![0u8; usize::try_from(SIZE).unwrap()];
    let mut rng = testkit::rng(seed);
    let mut data_chunks = std::collections::BTreeSet::new();
    // Data in about half the MiBs, holes elsewhere (every fourth always).
    for m in 0..SIZE >> 20 {
        if m % 4 != 3 && rng.bool() {
            data_chunks.insert(m);
            let data = testkit::pattern(seed ^ m, 1 << 20);
            let at = usize::try_from(m << 20).unwrap();
            model[at..at + data.len()].copy_from_slice(&data);
            origin
                .write(m << 20, Bytes::from(data), WriteFlags::default())
                .await
                .unwrap();
        }
    }
    World {
        dir,
        origin,
        applied: Arc::new(AtomicU64::new(0)),
        model,
        data_chunks,
    }
}

fn open_journal(dir: &std::path::Path) -> Journal {
    Journal::open(
        dir.join("journal"),
        JournalOptions {
            capacity: 256 << 20,
            ..JournalOptions::default()
        },
    )
    .unwrap()
}

fn record(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("migrations").join("v").join("record")
}

/// Ships every journaled write to the origin: cut, apply, acknowledge.
async fn ship_all(v: &EdgeVolume<Origin>, origin: &MemDevice, applied: &AtomicU64) {
    v.flush().await.unwrap();
    while let Some(b) = v.cut(u64::MAX, Duration::ZERO).await.unwrap() {
        for e in &b.entries {
            e.apply_to(origin).await.unwrap();
        }
        applied.store(b.seq, Ordering::SeqCst);
        v.applied(b.seq).await.unwrap();
    }
}

async fn copy_until_complete(v: &EdgeVolume<Origin>, local: &LocalCopy, src: &Source) {
    let window = tokio::sync::Mutex::new(AllocationWindow::default());
    let mut cursor = 0;
    for _ in 0..100_000 {
        let Some(c) = local.next_to_copy(&mut cursor) else {
            return;
        };
        let _ = v.copy_chunk(local, c, src, &window).await.unwrap();
    }
    panic!("the copy never completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_converges_on_what_the_guest_wrote_under_concurrent_writes() {
    for seed in 0..4u64 {
        let mut w = world(seed).await;
        let storage: Arc<dyn blockcore::storage::Storage> = Arc::new(DiskStorage);
        let target = w.dir.path().join("copy.raw");
        let local = Arc::new(
            LocalCopy::create(
                storage.clone(),
                &record(w.dir.path()),
                &NewCopy {
                    target: target.clone(),
                    size: SIZE,
                    volume_epoch: 1,
                    rate_bytes_per_sec: 0,
                },
            )
            .unwrap(),
        );
        let volume = Arc::new(EdgeVolume::new(
            open_journal(w.dir.path()),
            Origin(w.origin.clone()),
            SIZE,
            Mistakes::default(),
        ));
        volume.attach_local(local.clone()).await.unwrap();
        let source = Arc::new(Source {
            origin: w.origin.clone(),
            applied: w.applied.clone(),
            fetched: std::sync::Mutex::default(),
        });

        // Two copiers against one writer that also ships batches.
        let copiers: Vec<_> = (0..2)
            .map(|_| {
                let (v, l, s) = (volume.clone(), local.clone(), source.clone());
                tokio::spawn(async move { copy_until_complete(&v, &l, &s).await })
            })
            .collect();
        let mut rng = testkit::rng(seed + 100);
        // Chunks that hold data at some point: at the origin from the
        // start, or written by the guest.
        let mut ever_data = w.data_chunks.clone();
        for i in 0..400u64 {
            // Writes in the first half, so the second keeps its holes.
            let len = rng.u64(1..=32) * 4096;
            let offset = rng.u64(0..(SIZE / 2 - len) / 4096) * 4096;
            ever_data.extend((offset >> 20)..=((offset + len - 1) >> 20));
            let (o, n) = (
                usize::try_from(offset).unwrap(),
                usize::try_from(len).unwrap(),
            );
            if rng.u8(0..8) == 0 {
                volume.write_zeroes(offset, len, false).await.unwrap();
                w.model[o..o + n].fill(0);
            } else {
                let data = testkit::pattern(seed * 1000 + i, n);
                volume
                    .write(offset, Bytes::from(data.clone()), rng.bool())
                    .await
                    .unwrap();
                w.model[o..o + n].copy_from_slice(&data);
            }
            if i % 50 == 49 {
                ship_all(&volume, &w.origin, &w.applied).await;
            }
            // A read across the local/remote split sees the same.
            let r_len = rng.u64(1..=64) * 4096;
            let r_off = rng.u64(0..(SIZE - r_len) / 4096) * 4096;
            let got = volume
                .read(r_off, usize::try_from(r_len).unwrap())
                .await
                .unwrap();
            let (ro, rn) = (
                usize::try_from(r_off).unwrap(),
                usize::try_from(r_len).unwrap(),
            );
            assert!(
                got[..] == w.model[ro..ro + rn],
                "seed {seed}: read at {r_off} differs"
            );
        }
        for c in copiers {
            c.await.unwrap();
        }
        // Chunks overtaken at the very end are copied again.
        copy_until_complete(&volume, &local, &source).await;
        assert!(local.is_complete(), "seed {seed}");
        let st = local.status();
        assert!(st.bytes_zero > 0, "seed {seed}: holes were fetched: {st:?}");
        assert!(
            ever_data.len() < usize::try_from(SIZE >> 20).unwrap(),
            "seed {seed}: no hole left to check"
        );
        let fetched = source.fetched.lock().unwrap().clone();
        let holes: Vec<_> = fetched.difference(&ever_data).collect();
        assert!(
            holes.is_empty(),
            "seed {seed}: chunks {holes:?} were holes throughout and were fetched"
        );
        let copy = local
            .device()
            .read(0, usize::try_from(SIZE).unwrap())
            .await
            .unwrap();
        assert!(
            copy[..] == w.model[..],
            "seed {seed}: the copy differs from the guest's view"
        );
        ship_all(&volume, &w.origin, &w.applied).await;
        let origin = w
            .origin
            .read(0, usize::try_from(SIZE).unwrap())
            .await
            .unwrap();
        assert!(origin[..] == w.model[..], "seed {seed}: the origin differs");
        local.save().await.unwrap();

        // Reopened with writes the journal holds and the copy does not
        // (as a crash between the two leaves it): they are replayed.
        let extra = testkit::pattern(seed + 7, 8192);
        volume
            .write(4096, Bytes::from(extra.clone()), false)
            .await
            .unwrap();
        w.model[4096..4096 + 8192].copy_from_slice(&extra);
        local
            .device()
            .write_zeroes(0, 1 << 20, ZeroFlags::default())
            .await
            .unwrap();
        drop(volume);
        drop(local);
        let reopened = Arc::new(
            LocalCopy::open(storage, &record(w.dir.path()), SIZE, 1)
                .unwrap()
                .unwrap(),
        );
        assert!(reopened.is_complete());
        let volume = EdgeVolume::new(
            open_journal(w.dir.path()),
            Origin(w.origin.clone()),
            SIZE,
            Mistakes::default(),
        );
        volume.attach_local(reopened.clone()).await.unwrap();
        let first = reopened.device().read(4096, 8192).await.unwrap();
        assert!(
            first[..] == extra[..],
            "seed {seed}: the journal's write was not replayed"
        );
        let stale = LocalCopy::open(Arc::new(DiskStorage), &record(w.dir.path()), SIZE, 2);
        assert!(
            matches!(stale, Err(LocalError::Stale { .. })),
            "seed {seed}"
        );
    }
}

#[tokio::test]
async fn a_new_copy_refuses_to_overwrite_data() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("busy.raw");
    std::fs::write(&target, b"precious").unwrap();
    let r = LocalCopy::create(
        Arc::new(DiskStorage),
        &record(dir.path()),
        &NewCopy {
            target: target.clone(),
            size: SIZE,
            volume_epoch: 1,
            rate_bytes_per_sec: 0,
        },
    );
    let e = r.unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    let rel = LocalCopy::create(
        Arc::new(DiskStorage),
        &record(dir.path()),
        &NewCopy {
            target: "relative.raw".into(),
            size: SIZE,
            volume_epoch: 1,
            rate_bytes_per_sec: 0,
        },
    );
    assert!(rel.unwrap_err().to_string().contains("absolute"));
    // A size no map can hold (an origin's word): refused, nothing created.
    let huge = dir.path().join("huge.raw");
    let r = LocalCopy::create(
        Arc::new(DiskStorage),
        &record(dir.path()),
        &NewCopy {
            target: huge.clone(),
            size: u64::MAX,
            volume_epoch: 1,
            rate_bytes_per_sec: 0,
        },
    );
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("more than a migration takes"));
    assert!(!huge.exists());
}

#[tokio::test]
async fn after_cut_over_writes_mark_the_dirty_map_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn blockcore::storage::Storage> = Arc::new(DiskStorage);
    let local = LocalCopy::create(
        storage.clone(),
        &record(dir.path()),
        &NewCopy {
            target: dir.path().join("c.raw"),
            size: SIZE,
            volume_epoch: 1,
            rate_bytes_per_sec: 0,
        },
    )
    .unwrap();
    local.set_stage(Stage::CutOver).await.unwrap();
    let data = Bytes::from(testkit::pattern(3, 8192));
    BlockDevice::write(
        &local,
        (3 << 20) - 4096,
        data.clone(),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        local.dirty_chunks(),
        vec![2, 3],
        "the write spans two chunks"
    );
    drop(local);
    // A cut-over volume is opened without the origin (any epoch).
    let again = LocalCopy::open(storage, &record(dir.path()), SIZE, 99)
        .unwrap()
        .unwrap();
    assert_eq!(again.stage(), Stage::CutOver);
    assert_eq!(
        again.dirty_chunks(),
        vec![2, 3],
        "the dirty bits are saved before the data is written, FUA or not"
    );
    assert_eq!(
        BlockDevice::read(&again, (3 << 20) - 4096, 8192)
            .await
            .unwrap(),
        data
    );
}

#[tokio::test]
async fn a_copy_waits_for_a_write_in_its_chunk_to_reach_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalCopy::create(
        Arc::new(DiskStorage),
        &record(dir.path()),
        &NewCopy {
            target: dir.path().join("c.raw"),
            size: SIZE,
            volume_epoch: 1,
            rate_bytes_per_sec: 0,
        },
    )
    .unwrap();
    // A write checked in chunk 1 and not yet in the journal (its append
    // may wait for space): a copy of the chunk begun now would read the
    // journal without it and then find nothing spoiled.
    let stripes = local.lock_range(1 << 20, 4096).await;
    let noted = local.note_write(1 << 20, 4096);
    assert!(noted.journal && noted.local.is_empty(), "{noted:?}");
    let begin = local.begin_copy(1);
    tokio::pin!(begin);
    assert!(
        futures::poll!(begin.as_mut()).is_pending(),
        "the copy began between the write's check and its append"
    );
    // Another chunk's copy is not held up.
    assert!(local.begin_copy(2).await);
    drop(stripes);
    assert!(begin.await, "the copy begins once the write is through");
}
