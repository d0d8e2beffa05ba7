use std::time::Duration;

use super::*;

const CHUNK: u32 = 4096;

fn opts() -> IndexOptions {
    IndexOptions {
        chunk_size: CHUNK,
        block_cache_bytes: 8 << 20,
        write_buffer_bytes: 4 << 20,
        ..IndexOptions::default()
    }
}

fn sig(n: u8) -> Sig {
    [n; 32]
}

fn open(dir: &Path) -> Index {
    Index::open(dir, &opts()).unwrap()
}

/// Writes raw bytes into a column family behind the index's back.
fn raw_put(dir: &Path, cf: &str, key: &[u8], value: &[u8]) {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    let db = DB::open_cf(&o, dir, [CF_META, CF_SIG, CF_MAP, CF_VOL, CF_SLOT]).unwrap();
    db.put_cf(db.cf_handle(cf).unwrap(), key, value).unwrap();
}

#[test]
fn fresh_index_is_empty_and_stamped() {
    let dir = tempfile::tempdir().unwrap();
    let ix = open(dir.path());
    assert_eq!(ix.chunk_size(), CHUNK);
    assert_eq!(ix.lookup_signature(&sig(1)).unwrap(), None);
    assert_eq!(ix.get_mapping(1, 0).unwrap(), None);
    assert!(ix.used_slots().unwrap().is_empty());
    assert!(ix.volumes().unwrap().is_empty());
    assert_eq!(ix.check().unwrap(), IndexStats::default());
}

#[test]
fn volumes_round_trip_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ix = open(dir.path());
        let a = ix.create_volume("alpha", CHUNK, 1 << 30).unwrap();
        let b = ix.create_volume("béta", 8192, 12345).unwrap();
        assert_eq!(a.id, FIRST_VOLUME_ID);
        assert_eq!(b.id, FIRST_VOLUME_ID + 1);
        assert_eq!(ix.volume("alpha").unwrap(), Some(a));
        assert_eq!(ix.volume("gamma").unwrap(), None);
        assert!(matches!(
            ix.create_volume("alpha", CHUNK, 1),
            Err(IndexError::VolumeExists { .. })
        ));
    }
    let ix = open(dir.path());
    let vols = ix.volumes().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0].0, "alpha");
    assert_eq!(
        vols[1],
        (
            "béta".to_owned(),
            VolumeMeta {
                id: 2,
                chunk_size: 8192,
                size: 12345
            }
        )
    );
    // The counter persisted too.
    assert_eq!(ix.create_volume("gamma", CHUNK, 0).unwrap().id, 3);
}

#[test]
fn chunk_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ix = open(dir.path());
    let mut b = ix.batch();
    b.insert_chunk(sig(1), 7, 3, 4100).unwrap();
    b.insert_chunk(sig(2), 2, 1, 99).unwrap();
    // Visible to the batch, not yet to readers.
    assert_eq!(b.lookup_signature(&sig(1)).unwrap().unwrap().slot, 7);
    b.commit(Durability::Sync).unwrap();
    assert_eq!(
        ix.lookup_signature(&sig(1)).unwrap(),
        Some(SlotRef {
            slot: 7,
            generation: 3,
            len: 4100,
            refs: 0
        })
    );
    assert_eq!(ix.used_slots().unwrap(), vec![(2, sig(2)), (7, sig(1))]);
    assert_eq!(ix.check().unwrap().resident, 2);
}

#[test]
fn dropped_batch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ix = open(dir.path());
    {
        let mut b = ix.batch();
        b.insert_chunk(sig(1), 0, 0, 1).unwrap();
        b.map(1, 0, sig(1)).unwrap();
    }
    assert_eq!(ix.lookup_signature(&sig(1)).unwrap(), None);
    assert_eq!(ix.get_mapping(1, 0).unwrap(), None);
    // The lock was released.
    ix.batch().commit(Durability::Async).unwrap();
}

#[test]
fn refs_follow_map_remap_unmap() {
    let dir = tempfile::tempdir().unwrap();
    let ix = open(dir.path());
    let refs = |s: u8| ix.signature_refs(&sig(s)).unwrap();

    let mut b = ix.batch();
    b.insert_chunk(sig(1), 0, 0, 10).unwrap();
    b.insert_chunk(sig(2), 1, 0, 10).unwrap();
    b.map(1, 0, sig(1)).unwrap();
    b.map(1, 1, sig(1)).unwrap();
    b.map(2, 0, sig(1)).unwrap(); // a clone shares the chunk
    b.commit(Durability::Sync).unwrap();
    assert_eq!((refs(1), refs(2)), (3, 0));
    assert_eq!(ix.lookup_signature(&sig(1)).unwrap().unwrap().refs, 3);

    // Same signature again: no-op.
    let mut b = ix.batch();
    b.map(1, 0, sig(1)).unwrap();
    assert!(b.is_empty());
    b.commit(Durability::Sync).unwrap();
    assert_eq!(refs(1), 3);

    // Remap moves one reference; remapping twice within a batch counts once.
    let mut b = ix.batch();
    b.map(1, 1, sig(2)).unwrap();
    b.map(1, 1, sig(2)).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!((refs(1), refs(2)), (2, 1));
    assert_eq!(ix.get_mapping(1, 1).unwrap(), Some(sig(2)));

    // Remap and back within one batch: net zero.
    let mut b = ix.batch();
    b.map(2, 0, sig(2)).unwrap();
    b.map(2, 0, sig(1)).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!((refs(1), refs(2)), (2, 1));

    // Unmap, and unmap of an unmapped chunk.
    let mut b = ix.batch();
    assert_eq!(b.unmap(1, 0).unwrap(), Some(sig(1)));
    assert_eq!(b.unmap(1, 0).unwrap(), None);
    assert_eq!(b.unmap(9, 9).unwrap(), None);
    b.commit(Durability::Sync).unwrap();
    assert_eq!((refs(1), refs(2)), (1, 1));
    assert_eq!(ix.get_mapping(1, 0).unwrap(), None);

    // Down to zero: still cached, unreferenced.
    let mut b = ix.batch();
    b.unmap(2, 0).unwrap();
    b.unmap(1, 1).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!(ix.lookup_signature(&sig(1)).unwrap().unwrap().refs, 0);
    assert_eq!(ix.lookup_signature(&sig(2)).unwrap().unwrap().refs, 0);
    let stats = ix.check().unwrap();
    assert_eq!((stats.mappings, stats.resident), (0, 2));
}

#[test]
fn mapping_a_non_resident_signature_then_inserting_it() {
    let dir = tempfile::tempdir().unwrap();
    let ix = open(dir.path());
    let mut b = ix.batch();
    b.map(1, 5, sig(9)).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!(ix.get_mapping(1, 5).unwrap(), Some(sig(9)));
    assert_eq!(ix.lookup_signature(&sig(9)).unwrap(), None);
    assert_eq!(ix.signature_refs(&sig(9)).unwrap(), 1);
    ix.check().unwrap();

    let mut b = ix.batch();
    b.insert_chunk(sig(9), 4, 1, 50).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!(ix.lookup_signature(&sig(9)).unwrap().unwrap().refs, 1);

    // Unmapping the last reference of a non-resident entry deletes it.
    let mut b = ix.batch();
    b.map(1, 6, sig(8)).unwrap();
    b.commit(Durability::Sync).unwrap();
    let mut b = ix.batch();
    b.unmap(1, 6).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!(ix.check().unwrap().signatures, 1);
}

#[test]
fn eviction_makes_mappings_miss_and_keeps_refs() {
    let dir = tempfile::tempdir().unwrap();
    let ix = open(dir.path());
    let mut b = ix.batch();
    b.insert_chunk(sig(1), 3, 1, 10).unwrap();
    b.insert_chunk(sig(2), 4, 1, 10).unwrap();
    b.map(1, 0, sig(1)).unwrap();
    b.map(2, 0, sig(1)).unwrap();
    b.commit(Durability::Sync).unwrap();

    let mut b = ix.batch();
    let was = b.remove_chunk(&sig(1)).unwrap().unwrap();
    assert_eq!((was.slot, was.refs), (3, 2));
    assert_eq!(b.remove_chunk(&sig(1)).unwrap(), None);
    assert_eq!(b.remove_chunk(&sig(2)).unwrap().unwrap().refs, 0);
    assert_eq!(b.remove_chunk(&sig(7)).unwrap(), None);
    b.commit(Durability::Sync).unwrap();

    assert_eq!(ix.get_mapping(1, 0).unwrap(), Some(sig(1)));
    assert_eq!(ix.lookup_signature(&sig(1)).unwrap(), None); // a miss
    assert_eq!(ix.signature_refs(&sig(1)).unwrap(), 2);
    assert!(ix.used_slots().unwrap().is_empty());
    let stats = ix.check().unwrap();
    // sig(2) had no references: gone entirely.
    assert_eq!(
        (stats.signatures, stats.resident, stats.mappings),
        (1, 0, 2)
    );

    // Refetched into another slot: resident again, references intact.
    let mut b = ix.batch();
    b.insert_chunk(sig(1), 9, 2, 10).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!(
        ix.lookup_signature(&sig(1)).unwrap(),
        Some(SlotRef {
            slot: 9,
            generation: 2,
            len: 10,
            refs: 2
        })
    );
    ix.check().unwrap();
}

#[test]
fn slot_reuse_needs_a_committed_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let ix = open(dir.path());
    let mut b = ix.batch();
    b.insert_chunk(sig(1), 0, 1, 10).unwrap();
    // Same slot for another signature in the same batch.
    assert!(matches!(
        b.insert_chunk(sig(2), 0, 1, 10),
        Err(IndexError::SlotInUse { slot: 0 })
    ));
    b.commit(Durability::Sync).unwrap();

    let mut b = ix.batch();
    b.remove_chunk(&sig(1)).unwrap();
    // Evicted in this batch, but not committed: still refused.
    assert!(matches!(
        b.insert_chunk(sig(2), 0, 2, 10),
        Err(IndexError::SlotInUse { slot: 0 })
    ));
    b.commit(Durability::Sync).unwrap();

    let mut b = ix.batch();
    b.insert_chunk(sig(2), 0, 2, 10).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!(ix.used_slots().unwrap(), vec![(0, sig(2))]);

    // Moving a resident signature releases its old slot.
    let mut b = ix.batch();
    b.insert_chunk(sig(2), 5, 3, 10).unwrap();
    b.commit(Durability::Sync).unwrap();
    assert_eq!(ix.used_slots().unwrap(), vec![(5, sig(2))]);
    ix.check().unwrap();
}

#[test]
fn reopen_persists_sync_and_async_commits() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ix = open(dir.path());
        let v = ix.create_volume("v", CHUNK, 1 << 20).unwrap();
        let mut b = ix.batch();
        b.insert_chunk(sig(1), 0, 1, 10).unwrap();
        b.map(v.id, 0, sig(1)).unwrap();
        b.commit(Durability::Sync).unwrap();
        let mut b = ix.batch();
        b.map(v.id, 1, sig(1)).unwrap();
        b.commit(Durability::Async).unwrap();
    }
    let ix = open(dir.path());
    let v = ix.volume("v").unwrap().unwrap();
    assert_eq!(ix.get_mapping(v.id, 1).unwrap(), Some(sig(1)));
    assert_eq!(ix.lookup_signature(&sig(1)).unwrap().unwrap().refs, 2);
    ix.flush().unwrap();
    drop(ix);
    let ix = open(dir.path());
    assert_eq!(ix.check().unwrap().mappings, 2);
}

#[test]
fn chunk_size_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let err = Index::open(
        dir.path(),
        &IndexOptions {
            chunk_size: 2 * CHUNK,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::ChunkSizeMismatch {
                stored: CHUNK,
                configured
            } if configured == 2 * CHUNK
        ),
        "{err}"
    );
    assert!(err.to_string().contains("chunk size 4096"), "{err}");
}

#[test]
fn version_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    raw_put(
        dir.path(),
        CF_META,
        META_FORMAT_VERSION,
        &99u32.to_be_bytes(),
    );
    let err = Index::open(dir.path(), &opts()).unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::VersionMismatch {
                found: 99,
                expected: FORMAT_VERSION
            }
        ),
        "{err}"
    );
}

#[test]
fn unstamped_index_with_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    raw_put(dir.path(), CF_MAP, &map_key(1, 1), &sig(1));
    let err = Index::open(dir.path(), &opts()).unwrap_err();
    assert!(
        matches!(err, IndexError::Corrupt { cf: CF_MAP, .. }),
        "{err}"
    );
}

#[test]
fn open_fails_cleanly_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let err = Index::open(&file, &opts()).unwrap_err();
    assert!(matches!(err, IndexError::Open { .. }), "{err}");
}

#[test]
fn garbage_values_are_corrupt_errors() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    raw_put(dir.path(), CF_SIG, &sig(1), b"garbage");
    raw_put(dir.path(), CF_SIG, &sig(2), &0u32.to_be_bytes());
    raw_put(dir.path(), CF_MAP, &map_key(1, 2), b"short");
    raw_put(dir.path(), CF_SLOT, &slot_key(3), b"not a sig");
    raw_put(dir.path(), CF_VOL, &vol_key("v"), b"\x01\x02");
    raw_put(dir.path(), CF_META, META_CHUNK_SIZE, b"\x00\x10");

    let err = Index::open(dir.path(), &opts()).unwrap_err();
    assert!(
        matches!(err, IndexError::Corrupt { cf: CF_META, .. }),
        "{err}"
    );
    raw_put(dir.path(), CF_META, META_CHUNK_SIZE, &CHUNK.to_be_bytes());
    let ix = open(dir.path());

    let is_corrupt = |r: Result<(), IndexError>, want: &str| match r {
        Err(IndexError::Corrupt { cf, ref key, .. }) => {
            assert_eq!(cf, want);
            assert!(!key.is_empty() || want == CF_MAP);
        }
        other => panic!("expected Corrupt in {want}, got {other:?}"),
    };
    is_corrupt(ix.lookup_signature(&sig(1)).map(|_| ()), CF_SIG);
    is_corrupt(ix.lookup_signature(&sig(2)).map(|_| ()), CF_SIG);
    is_corrupt(ix.get_mapping(1, 2).map(|_| ()), CF_MAP);
    is_corrupt(ix.used_slots().map(|_| ()), CF_SLOT);
    is_corrupt(ix.volume("v").map(|_| ()), CF_VOL);
    is_corrupt(ix.volumes().map(|_| ()), CF_VOL);
    is_corrupt(ix.check().map(|_| ()), CF_MAP);
    // Batches that read a corrupt entry fail the same way.
    let mut b = ix.batch();
    is_corrupt(b.map(1, 2, sig(5)), CF_MAP);
    is_corrupt(b.map(1, 3, sig(1)), CF_SIG);
    // The message names the problem.
    let msg = ix.lookup_signature(&sig(1)).unwrap_err().to_string();
    assert!(
        msg.contains("column family sig") && msg.contains("7 bytes"),
        "{msg}"
    );
}

// ---- crash consistency ------------------------------------------------------

const CRASH_SIGS: u8 = 16;
const CRASH_CHUNKS: u64 = 32;
const CRASH_SLOTS: u64 = 24;

fn journal_sig(n: u64) -> Sig {
    sig(u8::try_from(n % u64::from(CRASH_SIGS)).unwrap())
}

/// Number of batches committed so far: batch `n` maps the journal volume's
/// chunk `n`, and journal chunks are never unmapped.
fn committed_batches(ix: &Index, journal: u32) -> u64 {
    let mut n = 0;
    while ix.get_mapping(journal, n).unwrap().is_some() {
        n += 1;
    }
    n
}

fn crash_volumes(ix: &Index) -> [u32; 3] {
    ["a", "b", "journal"].map(|name| match ix.volume(name).unwrap() {
        Some(v) => v.id,
        None => ix.create_volume(name, CHUNK, 1 << 30).unwrap().id,
    })
}

/// The child of `crash_consistency`: commits random batches with
/// `Durability::Sync` and reports each one after its commit returned, until
/// it is killed.
fn crash_child(child: &testkit::crash::Child) {
    let ix = open(child.dir());
    let [va, vb, journal] = crash_volumes(&ix);
    let start = committed_batches(&ix, journal);
    for n in start..start + 1_000_000 {
        let mut rng = testkit::rng(n);
        let mut b = ix.batch();
        for _ in 0..=rng.u64(..6) {
            let r = rng.u64(..);
            let vol = if r & 1 == 0 { va } else { vb };
            let chunk = (r >> 8) % CRASH_CHUNKS;
            let s = sig(u8::try_from((r >> 20) % u64::from(CRASH_SIGS)).unwrap());
            match (r >> 40) % 5 {
                0 | 1 => b.map(vol, chunk, s).unwrap(),
                2 => {
                    let _ = b.unmap(vol, chunk).unwrap();
                }
                3 => match b.insert_chunk(s, (r >> 48) % CRASH_SLOTS, n, CHUNK) {
                    Ok(()) | Err(IndexError::SlotInUse { .. }) => {}
                    Err(e) => panic!("{e}"),
                },
                _ => {
                    let _ = b.remove_chunk(&s).unwrap();
                }
            }
        }
        b.map(journal, n, journal_sig(n)).unwrap();
        b.commit(Durability::Sync).unwrap();
        child.report(n);
    }
}

#[test]
fn crash_consistency() {
    use testkit::crash::{self, CrashTest, Verdict};
    if let Some(child) = crash::child() {
        crash_child(&child);
        return;
    }
    let t = CrashTest::new(crash::name(module_path!(), "crash_consistency"));
    let mut rng = testkit::rng(testkit::fresh_seed("crash_consistency"));
    let mut reported_total = None;
    for round in 0..4 {
        // Once the child got going, kill it at a random moment.
        let delay = Duration::from_millis(50 + rng.u64(..400));
        let lines = t.run(round, |_| Verdict::KillAfter(delay));
        let last: u64 = lines
            .last()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("round {round}: the child committed nothing"));

        let ix = open(t.dir());
        let [_, _, journal] = crash_volumes(&ix);
        let committed = committed_batches(&ix, journal);
        // Every reported batch is there; at most one more (committed, killed
        // before reporting).
        assert!(
            committed == last + 1 || committed == last + 2,
            "round {round}: last reported {last}, found {committed} batches"
        );
        for n in 0..committed {
            assert_eq!(ix.get_mapping(journal, n).unwrap(), Some(journal_sig(n)));
        }
        let stats = ix.check().unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(stats.mappings >= committed);
        eprintln!("round {round}: {committed} batches, {stats:?}");
        reported_total = Some(committed);
    }
    assert!(reported_total.unwrap() > 4);
}
