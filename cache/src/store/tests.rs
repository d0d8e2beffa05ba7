use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use super::*;
use crate::index::IndexOptions;
use crate::slots::HEADER_BLOCK;

const CHUNK: u32 = 4096;
const MASTER: [u8; 32] = [0x5a; 32];

fn config(chunks: u64) -> CacheConfig {
    CacheConfig {
        chunk_size: CHUNK,
        capacity: chunks * u64::from(CHUNK),
        index: IndexOptions {
            block_cache_bytes: 4 << 20,
            write_buffer_bytes: 2 << 20,
            ..IndexOptions::default()
        },
        fill_durability: Durability::Async,
        // The disk path is what these tests check; the memory tier has its
        // own test.
        memory: 0,
    }
}

fn open(dir: &Path, chunks: u64) -> Cache {
    Cache::open(dir, &MASTER, &config(chunks)).unwrap()
}

/// Chunk content that names itself: `tag`, then a pattern seeded by it.
fn content(tag: u64, len: usize) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend(testkit::pattern(tag, len.saturating_sub(8)));
    v.truncate(len);
    v
}

fn always() -> bool {
    true
}

fn data_file(dir: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(DATA_FILE))
        .unwrap()
}

#[test]
fn put_get_round_trip_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * u64::from(CHUNK) + 100; // a short last chunk
    {
        let cache = open(dir.path(), 64);
        let vol = cache.volume("vm", size).unwrap();
        assert_eq!(cache.get(vol, 0).unwrap(), None);
        for c in 0..=10 {
            let len = if c == 10 { 100 } else { CHUNK as usize };
            assert_eq!(
                cache.put(vol, c, &content(c, len), &always).unwrap(),
                PutOutcome::Stored
            );
        }
        for c in 0..=10 {
            let len = if c == 10 { 100 } else { CHUNK as usize };
            assert_eq!(cache.get(vol, c).unwrap().unwrap(), content(c, len));
        }
        let s = cache.stats();
        assert_eq!((s.stores, s.hits, s.misses, s.used_slots), (11, 11, 1, 11));
        // The wrong length for a chunk is refused.
        assert!(matches!(
            cache.put(vol, 10, &content(1, CHUNK as usize), &always),
            Err(CacheError::ChunkLength { .. })
        ));
        assert!(matches!(
            cache.put(vol, 11, &content(1, 1), &always),
            Err(CacheError::ChunkLength { .. })
        ));
    }
    let cache = open(dir.path(), 64);
    let vol = cache.volume("vm", size).unwrap();
    for c in 0..10 {
        assert_eq!(
            cache.get(vol, c).unwrap().unwrap(),
            content(c, CHUNK as usize)
        );
    }
    assert_eq!(cache.stats().used_slots, 11);
    // Another size for the same volume is refused.
    assert!(matches!(
        cache.volume("vm", size + 1),
        Err(CacheError::VolumeSize { .. })
    ));
    let report = cache.verify().unwrap();
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(report.verified, 11);
}

#[test]
fn ten_identical_volumes_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1024);
    let chunks = 32u64;
    let size = chunks * u64::from(CHUNK);
    for v in 0..10 {
        let vol = cache.volume(&format!("clone-{v}"), size).unwrap();
        for c in 0..chunks {
            let outcome = cache
                .put(vol, c, &content(c, CHUNK as usize), &always)
                .unwrap();
            let want = if v == 0 {
                PutOutcome::Stored
            } else {
                PutOutcome::Deduplicated
            };
            assert_eq!(outcome, want);
        }
    }
    let s = cache.stats();
    assert_eq!(s.used_slots, chunks, "stored once");
    assert_eq!(s.dedup_hits, 9 * chunks);
    assert_eq!(s.dedup_bytes, 9 * size);
    for v in 0..10 {
        let vol = cache.volume(&format!("clone-{v}"), size).unwrap();
        for c in 0..chunks {
            assert_eq!(
                cache.get(vol, c).unwrap().unwrap(),
                content(c, CHUNK as usize)
            );
            assert!(cache
                .contains(&cache.signature(&content(c, CHUNK as usize)))
                .unwrap());
        }
    }
    assert!(!cache
        .contains(&cache.signature(&content(999, CHUNK as usize)))
        .unwrap());
    // The data file holds one volume's worth of slots.
    let stored = std::fs::metadata(dir.path().join(DATA_FILE)).unwrap().len();
    assert!(stored >= HEADER_BLOCK + chunks * crate::slots::stride_for(CHUNK));
    let report = cache.verify().unwrap();
    assert_eq!((report.resident, report.mappings), (chunks, 10 * chunks));
    assert_eq!(report.stored_bytes, size);
    assert!(report.damaged.is_empty());
}

#[test]
fn tiny_capacity_evicts_and_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 4);
    let vol = cache.volume("v", 64 * u64::from(CHUNK)).unwrap();
    for c in 0..64 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
        assert!(cache.stats().used_slots <= 4);
    }
    let s = cache.stats();
    assert_eq!(s.slots, 4);
    assert_eq!(s.evictions, 60);
    let mut hits = 0;
    for c in 0..64 {
        if let Some(d) = cache.get(vol, c).unwrap() {
            assert_eq!(d, content(c, CHUNK as usize));
            hits += 1;
        }
    }
    assert_eq!(hits, 4);
    assert!(cache.verify().unwrap().damaged.is_empty());
    // The data file never grew past the capacity.
    assert_eq!(
        std::fs::metadata(dir.path().join(DATA_FILE)).unwrap().len(),
        HEADER_BLOCK + 4 * crate::slots::stride_for(CHUNK)
    );
}

#[test]
fn resize_online_keeps_survivors() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 16);
    let vol = cache.volume("v", 16 * u64::from(CHUNK)).unwrap();
    for c in 0..16 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
    }
    // Make a few chunks hot so the policy keeps them.
    for _ in 0..3 {
        for c in [1, 14, 15] {
            cache.get(vol, c).unwrap().unwrap();
        }
    }
    cache.resize(5 * u64::from(CHUNK)).unwrap();
    let s = cache.stats();
    assert_eq!((s.slots, s.used_slots), (5, 5));
    let mut survivors = 0;
    for c in 0..16 {
        if let Some(d) = cache.get(vol, c).unwrap() {
            assert_eq!(d, content(c, CHUNK as usize));
            survivors += 1;
        }
    }
    assert_eq!(survivors, 5);
    for c in [1, 14, 15] {
        assert!(
            cache.get(vol, c).unwrap().is_some(),
            "hot chunk {c} evicted"
        );
    }
    assert!(cache.verify().unwrap().damaged.is_empty());
    assert_eq!(
        std::fs::metadata(dir.path().join(DATA_FILE)).unwrap().len(),
        HEADER_BLOCK + 5 * crate::slots::stride_for(CHUNK)
    );
    // Grow again and fill.
    cache.resize(32 * u64::from(CHUNK)).unwrap();
    for c in 0..16 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
    }
    assert_eq!(cache.stats().used_slots, 16);
    drop(cache);
    // Reopening with another capacity resizes too.
    let cache = open(dir.path(), 3);
    assert_eq!(cache.stats().used_slots, 3);
    let report = cache.verify().unwrap();
    assert_eq!(report.verified, 3);
    assert!(report.damaged.is_empty());
}

#[test]
fn pinned_chunks_survive_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 4);
    let vol = cache.volume("v", 64 * u64::from(CHUNK)).unwrap();
    for c in 0..2 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
        assert!(cache.pin(vol, c).unwrap());
    }
    for c in 2..64 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
    }
    for c in 0..2 {
        assert_eq!(
            cache.get(vol, c).unwrap().unwrap(),
            content(c, CHUNK as usize)
        );
    }
    assert!(matches!(
        cache.resize(u64::from(CHUNK)),
        Err(CacheError::Pinned { .. })
    ));
    cache.resize(2 * u64::from(CHUNK)).unwrap();
    // Full of pinned chunks: new content is refused, not stored.
    assert_eq!(
        cache
            .put(vol, 9, &content(900, CHUNK as usize), &always)
            .unwrap(),
        PutOutcome::Refused
    );
    cache.unpin(vol, 0).unwrap();
    assert_eq!(
        cache
            .put(vol, 9, &content(900, CHUNK as usize), &always)
            .unwrap(),
        PutOutcome::Stored
    );
    assert!(cache.get(vol, 0).unwrap().is_none());
    assert!(cache.get(vol, 1).unwrap().is_some());
    assert!(cache.verify().unwrap().damaged.is_empty());
}

#[test]
fn a_fill_that_lost_a_race_unmaps() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 16);
    let vol = cache.volume("v", 4 * u64::from(CHUNK)).unwrap();
    cache
        .put(vol, 0, &content(1, CHUNK as usize), &always)
        .unwrap();
    let stale = || false;
    assert_eq!(
        cache
            .put(vol, 0, &content(2, CHUNK as usize), &stale)
            .unwrap(),
        PutOutcome::Invalidated
    );
    assert_eq!(cache.get(vol, 0).unwrap(), None);
    // Also on the dedup path.
    cache
        .put(vol, 1, &content(3, CHUNK as usize), &always)
        .unwrap();
    assert_eq!(
        cache
            .put(vol, 2, &content(3, CHUNK as usize), &stale)
            .unwrap(),
        PutOutcome::Invalidated
    );
    assert_eq!(cache.get(vol, 2).unwrap(), None);
    assert!(cache.verify().unwrap().damaged.is_empty());
    assert_eq!(cache.invalidate(vol, 0..4).unwrap(), 1);
    assert_eq!(cache.get(vol, 1).unwrap(), None);
}

#[test]
fn map_existing_serves_a_signature_reply() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 16);
    let a = cache.volume("a", 4 * u64::from(CHUNK)).unwrap();
    let b = cache.volume("b", 4 * u64::from(CHUNK)).unwrap();
    let data = content(7, CHUNK as usize);
    let sig = cache.signature(&data);
    assert!(!cache.map_existing(b, 3, &sig, &always).unwrap());
    cache.put(a, 0, &data, &always).unwrap();
    assert!(cache.map_existing(b, 3, &sig, &always).unwrap());
    assert_eq!(cache.get(b, 3).unwrap().unwrap(), data);
    assert_eq!(cache.get_by_signature(&sig).unwrap().unwrap(), data);
}

#[test]
fn a_flipped_byte_is_an_integrity_error_for_that_chunk_only() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 16);
    let vol = cache.volume("v", 8 * u64::from(CHUNK)).unwrap();
    for c in 0..8 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
    }
    let victim = Signature::from_bytes(cache.index().get_mapping(vol.id, 3).unwrap().unwrap());
    let loc = cache
        .index()
        .lookup_signature(victim.as_bytes())
        .unwrap()
        .unwrap();
    // One byte in the middle of the ciphertext.
    let off = cache.data.slot_offset(loc.slot) + 2000;
    let f = data_file(dir.path());
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], off).unwrap();

    let report = cache.verify().unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].0, loc.slot);
    assert_eq!(report.verified, 7);

    for c in 0..8 {
        let r = cache.get(vol, c);
        if c == 3 {
            assert!(
                matches!(
                    r,
                    Err(CacheError::Integrity {
                        source: IntegrityError::Decrypt,
                        ..
                    })
                ),
                "{r:?}"
            );
        } else {
            assert_eq!(r.unwrap().unwrap(), content(c, CHUNK as usize));
        }
    }
    assert_eq!(cache.stats().integrity_errors, 1);
    // The damaged chunk was evicted: now a miss, and a refill repairs it.
    assert_eq!(cache.get(vol, 3).unwrap(), None);
    cache
        .put(vol, 3, &content(3, CHUNK as usize), &always)
        .unwrap();
    assert_eq!(
        cache.get(vol, 3).unwrap().unwrap(),
        content(3, CHUNK as usize)
    );
    assert!(cache.verify().unwrap().damaged.is_empty());
}

#[test]
fn the_memory_tier_serves_hot_chunks_without_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig {
        memory: 4 * u64::from(CHUNK),
        ..config(16)
    };
    let cache = Cache::open(dir.path(), &MASTER, &cfg).unwrap();
    let vol = cache.volume("v", 8 * u64::from(CHUNK)).unwrap();
    for c in 0..8 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
    }
    // Damage every slot on disk: what the memory tier holds still reads
    // right (by signature, it cannot be stale), the rest fails on disk.
    let f = data_file(dir.path());
    for slot in 0..8 {
        f.write_all_at(&[0xff; 64], cache.data.slot_offset(slot) + 100)
            .unwrap();
    }
    let mut from_memory = 0;
    for c in 0..8 {
        match cache.get(vol, c) {
            Ok(Some(d)) => {
                assert_eq!(d, content(c, CHUNK as usize));
                from_memory += 1;
            }
            Err(CacheError::Integrity { .. }) => {}
            other => panic!("chunk {c}: {other:?}"),
        }
    }
    assert!((1..=4).contains(&from_memory), "{from_memory} from memory");
    assert_eq!(cache.stats().memory_hits, from_memory);
}

#[test]
fn a_flipped_header_byte_is_caught_too() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 16);
    let vol = cache.volume("v", 2 * u64::from(CHUNK)).unwrap();
    for c in 0..2 {
        cache
            .put(vol, c, &content(c, CHUNK as usize), &always)
            .unwrap();
    }
    let sig = Signature::from_bytes(cache.index().get_mapping(vol.id, 0).unwrap().unwrap());
    let loc = cache
        .index()
        .lookup_signature(sig.as_bytes())
        .unwrap()
        .unwrap();
    let f = data_file(dir.path());
    for byte in [0u64, 9, 20, 40] {
        let off = cache.data.slot_offset(loc.slot) + byte;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[b[0] ^ 0x80], off).unwrap();
        assert_eq!(
            cache.verify().unwrap().damaged.len(),
            1,
            "header byte {byte}"
        );
        f.write_all_at(&b, off).unwrap();
        assert!(cache.verify().unwrap().damaged.is_empty());
    }
}

#[test]
fn the_wrong_key_never_yields_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 16);
        let vol = cache.volume("v", 4 * u64::from(CHUNK)).unwrap();
        for c in 0..4 {
            cache
                .put(vol, c, &content(c, CHUNK as usize), &always)
                .unwrap();
        }
    }
    let cache = Cache::open(dir.path(), &[0x77; 32], &config(16)).unwrap();
    let vol = cache.volume("v", 4 * u64::from(CHUNK)).unwrap();
    let report = cache.verify().unwrap();
    assert_eq!(report.damaged.len(), 4);
    assert!(report
        .damaged
        .iter()
        .all(|(_, e)| *e == IntegrityError::Decrypt));
    for c in 0..4 {
        assert!(matches!(
            cache.get(vol, c),
            Err(CacheError::Integrity {
                source: IntegrityError::Decrypt,
                ..
            })
        ));
    }
    assert_eq!(cache.stats().integrity_errors, 4);
}

#[test]
fn data_file_of_another_cache_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    drop(open(a.path(), 4));
    drop(open(b.path(), 4));
    std::fs::copy(a.path().join(DATA_FILE), b.path().join(DATA_FILE)).unwrap();
    assert!(matches!(
        Cache::open(b.path(), &MASTER, &config(4)),
        Err(CacheError::IdMismatch)
    ));
}

#[test]
fn a_lost_data_file_drops_the_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 8);
        let vol = cache.volume("v", 4 * u64::from(CHUNK)).unwrap();
        for c in 0..4 {
            cache
                .put(vol, c, &content(c, CHUNK as usize), &always)
                .unwrap();
        }
    }
    std::fs::remove_file(dir.path().join(DATA_FILE)).unwrap();
    let cache = open(dir.path(), 8);
    let vol = cache.volume("v", 4 * u64::from(CHUNK)).unwrap();
    for c in 0..4 {
        assert_eq!(cache.get(vol, c).unwrap(), None);
    }
    assert_eq!(cache.stats().used_slots, 0);
    assert!(cache.verify().unwrap().damaged.is_empty());
}

#[test]
fn bad_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [0, 1000, 2048, 1 << 25] {
        let cfg = CacheConfig {
            chunk_size: cs,
            ..config(4)
        };
        assert!(matches!(
            Cache::open(dir.path(), &MASTER, &cfg),
            Err(CacheError::Config(_))
        ));
    }
    drop(open(dir.path(), 4));
    let cfg = CacheConfig {
        chunk_size: 8192,
        ..config(4)
    };
    assert!(Cache::open(dir.path(), &MASTER, &cfg).is_err());
}

#[test]
fn concurrent_fills_and_reads_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 8);
    let vol = cache.volume("v", 32 * u64::from(CHUNK)).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let cache = &cache;
            s.spawn(move || {
                let mut rng = testkit::rng(t + 1);
                for _ in 0..300 {
                    let x = rng.u64(..);
                    let c = x % 32;
                    // Every chunk's content is fixed, so any hit can be
                    // checked; chunks 0..4 share one content (dedup races).
                    let tag = if c < 4 { 1000 } else { c };
                    match x % 3 {
                        0 => {
                            cache
                                .put(vol, c, &content(tag, CHUNK as usize), &always)
                                .unwrap();
                        }
                        _ => {
                            if let Some(d) = cache.get(vol, c).unwrap() {
                                assert_eq!(d, content(tag, CHUNK as usize));
                            }
                        }
                    }
                }
            });
        }
        let cache = &cache;
        s.spawn(move || {
            for n in [4u64, 12, 6, 8] {
                cache.resize(n * u64::from(CHUNK)).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    });
    let s = cache.stats();
    assert!(s.used_slots <= 8, "{s:?}");
    assert_eq!(s.integrity_errors, 0);
    let report = cache.verify().unwrap();
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(report.resident, s.used_slots);
}

// ---- crash test --------------------------------------------------------------

const CRASH_VOLUMES: u32 = 3;
const CRASH_CHUNKS: u64 = 24;

/// Content of a crash-test put: names its volume (or "shared"), chunk and
/// version, so any hit can be checked against what was put.
fn crash_content(vol: u32, chunk: u64, version: u64) -> Vec<u8> {
    let mut v = content(
        version ^ (chunk << 48) ^ (u64::from(vol) << 40),
        CHUNK as usize,
    );
    v[8..12].copy_from_slice(&vol.to_le_bytes());
    v[12..20].copy_from_slice(&chunk.to_le_bytes());
    v[20..28].copy_from_slice(&version.to_le_bytes());
    v
}

/// Checks a hit; returns its version.
fn check_crash_hit(vol: u32, chunk: u64, data: &[u8]) -> u64 {
    let found_vol = u32::from_le_bytes(data[8..12].try_into().unwrap());
    let found_chunk = u64::from_le_bytes(data[12..20].try_into().unwrap());
    let version = u64::from_le_bytes(data[20..28].try_into().unwrap());
    assert!(
        found_vol == vol || found_vol == u32::MAX,
        "volume {found_vol} in {vol}/{chunk}"
    );
    assert_eq!(found_chunk, chunk);
    assert_eq!(
        data,
        crash_content(found_vol, chunk, version),
        "content of {vol}/{chunk}"
    );
    version
}

fn crash_volumes(cache: &Cache) -> Vec<Volume> {
    (0..CRASH_VOLUMES)
        .map(|v| {
            cache
                .volume(&format!("v{v}"), CRASH_CHUNKS * u64::from(CHUNK))
                .unwrap()
        })
        .collect()
}

/// The child of `crash_consistency`: puts, invalidates and resizes at
/// random, reporting each operation after it returned, until killed.
fn crash_child(child: &testkit::crash::Child) {
    let round = child.round() + 1;
    let cache = open(child.dir(), 12);
    let vols = crash_volumes(&cache);
    let mut rng = testkit::rng(round);
    // Versions grow across runs: the round is their high half.
    for version in round << 32.. {
        let x = rng.u64(..);
        let v = usize::try_from(x % u64::from(CRASH_VOLUMES)).unwrap();
        let chunk = (x >> 8) % CRASH_CHUNKS;
        match (x >> 16) % 10 {
            0..=5 => {
                // A third of the puts share their content across volumes.
                let owner = if (x >> 24).is_multiple_of(3) {
                    u32::MAX
                } else {
                    vols[v].id
                };
                let data = crash_content(owner, chunk, version);
                let outcome = cache.put(vols[v], chunk, &data, &always).unwrap();
                if matches!(outcome, PutOutcome::Stored | PutOutcome::Deduplicated) {
                    child.report(format!("put {v} {chunk} {version}"));
                }
            }
            6 | 7 => {
                cache.invalidate(vols[v], chunk..chunk + 1).unwrap();
                child.report(format!("inval {v} {chunk} {version}"));
            }
            8 => {
                cache
                    .resize(((x >> 32) % 16 + 4) * u64::from(CHUNK))
                    .unwrap();
            }
            _ => {
                if let Some(d) = cache.get(vols[v], chunk).unwrap() {
                    check_crash_hit(vols[v].id, chunk, &d);
                }
            }
        }
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
    // For each (volume index, chunk): the lowest version a hit may have.
    let mut floor: HashMap<(usize, u64), u64> = HashMap::new();
    let mut total_ops = 0;
    for round in 1..=20u64 {
        let delay = Duration::from_millis(10 + rng.u64(..150));
        let lines = t.run(round - 1, |_| Verdict::KillAfter(delay));
        for line in &lines {
            let f: Vec<&str> = line.split(' ').collect();
            let parse = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
            let (Some(v), Some(chunk), Some(version)) = (parse(1), parse(2), parse(3)) else {
                continue;
            };
            let key = (usize::try_from(v).unwrap(), chunk);
            match f[0] {
                "put" => {
                    floor.insert(key, version);
                }
                "inval" => {
                    floor.insert(key, version + 1);
                }
                _ => {}
            }
            total_ops += 1;
        }
        let dir = t.dir();

        let cache = open(dir, 12);
        let report = cache
            .verify()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(report.damaged.is_empty(), "round {round}: {report:?}");
        assert_eq!(
            report.resident,
            cache.stats().used_slots,
            "round {round}: orphans reclaimed"
        );
        let vols = crash_volumes(&cache);
        let mut hits = 0;
        for (v, vol) in vols.iter().enumerate() {
            for chunk in 0..CRASH_CHUNKS {
                if let Some(d) = cache.get(*vol, chunk).unwrap() {
                    let version = check_crash_hit(vol.id, chunk, &d);
                    let min = floor.get(&(v, chunk)).copied().unwrap_or(0);
                    assert!(
                        version >= min,
                        "round {round}: {v}/{chunk} has version {version}, acknowledged {min}"
                    );
                    hits += 1;
                }
            }
        }
        eprintln!("round {round}: {total_ops} ops so far, {hits} hits, {report:?}");
    }
    assert!(total_ops > 50, "the children did too little: {total_ops}");
}
