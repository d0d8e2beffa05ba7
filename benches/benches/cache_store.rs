//! The cache end to end, below the block layer: what a hit, a signature
//! lookup and an insert cost through `cache::Cache` (RocksDB index, slot
//! file, AES-256-GCM), next to a plain `pread` of the same 64 KiB.
//!
//! - `pread_64k`: the baseline, a page-cache-resident file.
//! - `hit_64k`: `Cache::get` of a resident chunk: mapping lookup, signature
//!   lookup, pread of the record, authenticate and decrypt.
//! - `hit_64k_memory`, `hit_64k_memory_inline`: the same from the memory
//!   tier of decrypted chunks (`Cache::get`, and the non-blocking
//!   `Cache::get_from_memory` that `CachedDevice` tries first).
//! - `lookup_signature_{hit,miss}`: `Cache::contains`, the dedup question,
//!   against an index of 200 000 signatures flushed to SST files.
//! - `put_new_64k`: a fill of new content: signature, seal, pwrite,
//!   fdatasync, index commit (evicting once the cache is full).
//! - `put_dedup_64k`: a fill of content already cached: signature and one
//!   mapping commit, no data written.

use std::hint::black_box;
use std::os::unix::fs::FileExt;

use cache::index::Durability;
use cache::{Cache, CacheConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CHUNK: usize = 64 * 1024;
const RESIDENT: u64 = 256;

fn content(tag: u64) -> Vec<u8> {
    testkit::pattern(tag, CHUNK)
}

fn always() -> bool {
    true
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = CacheConfig {
        chunk_size: u32::try_from(CHUNK).expect("fits"),
        capacity: 1024 * CHUNK as u64,
        fill_durability: Durability::Async,
        // The disk path: the memory tier would answer every hit.
        memory: 0,
        ..CacheConfig::default()
    };
    let cache = Cache::open(dir.path().join("cache"), &[9; 32], &config).expect("open cache");
    let vol = cache
        .volume("bench", RESIDENT * CHUNK as u64)
        .expect("volume");
    for chunk in 0..RESIDENT {
        cache
            .put(vol, chunk, &content(chunk), &always)
            .expect("fill");
    }
    // Lookups should not all hit a tiny memtable: add 200 000 more
    // signatures (index entries only, in slots the cache never uses) and
    // flush them to SST files, as in a cache that has been running a while.
    for base in (0..200_000u64).step_by(10_000) {
        let mut b = cache.index().batch();
        for i in base..base + 10_000 {
            let sig = *blake3::hash(&i.to_le_bytes()).as_bytes();
            b.insert_chunk(sig, 1 << 40 | i, 1, 64).expect("insert");
        }
        b.commit(Durability::Async).expect("commit");
    }
    cache.index().flush().expect("flush");
    // The baseline file, same size, read once into the page cache.
    let plain = dir.path().join("plain");
    let file = std::fs::File::create(&plain).expect("plain file");
    for chunk in 0..RESIDENT {
        file.write_all_at(&content(chunk), chunk * CHUNK as u64)
            .expect("write plain");
    }
    let file = std::fs::File::open(&plain).expect("open plain");
    let mut buf = vec![0u8; CHUNK];
    for chunk in 0..RESIDENT {
        file.read_exact_at(&mut buf, chunk * CHUNK as u64)
            .expect("warm");
        black_box(cache.get(vol, chunk).expect("get"));
    }

    let mut g = c.benchmark_group("cache_store");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut n = 0u64;
    g.bench_function("pread_64k", |b| {
        b.iter(|| {
            n = (n + 1) % RESIDENT;
            file.read_exact_at(&mut buf, n * CHUNK as u64)
                .expect("pread");
            black_box(&buf);
        });
    });
    g.bench_function("hit_64k", |b| {
        b.iter(|| {
            n = (n + 1) % RESIDENT;
            black_box(cache.get(vol, n).expect("get").expect("hit"))
        });
    });
    // The same hits with the memory tier on: decrypted chunks by
    // signature, what a hot working set gets.
    let mem_dir = tempfile::tempdir().expect("tempdir");
    let mem_cache = Cache::open(
        mem_dir.path(),
        &[9; 32],
        &CacheConfig {
            memory: 64 << 20,
            ..config.clone()
        },
    )
    .expect("open cache");
    let mem_vol = mem_cache
        .volume("bench", RESIDENT * CHUNK as u64)
        .expect("volume");
    for chunk in 0..RESIDENT {
        mem_cache
            .put(mem_vol, chunk, &content(chunk), &always)
            .expect("fill");
    }
    g.bench_function("hit_64k_memory", |b| {
        b.iter(|| {
            n = (n + 1) % RESIDENT;
            black_box(mem_cache.get(mem_vol, n).expect("get").expect("hit"))
        });
    });
    g.bench_function("hit_64k_memory_inline", |b| {
        b.iter(|| {
            n = (n + 1) % RESIDENT;
            black_box(mem_cache.get_from_memory(mem_vol, n).expect("hit"))
        });
    });
    g.throughput(Throughput::Elements(1));
    let sigs: Vec<_> = (0..RESIDENT)
        .map(|c| cache.signature(&content(c)))
        .collect();
    let absent: Vec<_> = (0..RESIDENT)
        .map(|c| cache.signature(&content(c + 1_000_000)))
        .collect();
    g.bench_function("lookup_signature_hit", |b| {
        b.iter(|| {
            n = (n + 1) % RESIDENT;
            assert!(cache
                .contains(&sigs[usize::try_from(n).expect("fits")])
                .expect("lookup"));
        });
    });
    g.bench_function("lookup_signature_miss", |b| {
        b.iter(|| {
            n = (n + 1) % RESIDENT;
            assert!(!cache
                .contains(&absent[usize::try_from(n).expect("fits")])
                .expect("lookup"));
        });
    });
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.sample_size(20);
    let fresh = cache.volume("fresh", 1 << 40).expect("volume");
    let mut data = content(u64::MAX);
    let mut tag = 0u64;
    g.bench_function("put_new_64k", |b| {
        b.iter(|| {
            tag += 1;
            data[..8].copy_from_slice(&tag.to_le_bytes());
            black_box(
                cache
                    .put(fresh, tag % (1 << 20), &data, &always)
                    .expect("put"),
            )
        });
    });
    let dup = content(3);
    g.bench_function("put_dedup_64k", |b| {
        b.iter(|| {
            tag += 1;
            black_box(
                cache
                    .put(fresh, tag % (1 << 20), &dup, &always)
                    .expect("put"),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
