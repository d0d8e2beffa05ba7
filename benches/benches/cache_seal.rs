//! Micro-benchmarks of the edge cache's chunk sealing: what serving a cached
//! 64 KiB chunk costs in CPU, next to the plain copy and `pread` it replaces.
//!
//! `read_open_*` is the cached read path (pread of the slot record from a
//! page-cache-resident file, then authenticate, decrypt and verify the
//! signature); compare it with `pread_64k` for "a cached 64 KiB read costs
//! N x a plain pread".

use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::BytesMut;
use cache::seal::{open, open_in_place, record_len, seal, Expected, Keys};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const CHUNK: usize = 64 * 1024;
/// Records in the page-cache file; reads rotate over them.
const SLOTS: u64 = 64;

fn plaintext() -> Vec<u8> {
    (0..CHUNK)
        .map(|i| {
            #[allow(clippy::cast_possible_truncation)]
            let b = (i as u8).wrapping_mul(131) ^ ((i >> 9) as u8);
            b
        })
        .collect()
}

/// A file in the temp dir holding `SLOTS` sealed records at a fixed stride,
/// read once so it is resident in the page cache. Removed on drop.
struct SlotFile {
    path: PathBuf,
    file: File,
    stride: u64,
}

impl SlotFile {
    fn new(keys: &Keys, pt: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("ferry-cache-seal-{}", std::process::id()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create bench file");
        let stride = record_len(CHUNK);
        let sig = keys.signature(pt);
        let mut rec = BytesMut::new();
        for slot in 0..SLOTS {
            rec.clear();
            seal(keys, slot, 1, &sig, pt, &mut rec);
            rec.resize(stride, 0);
            file.write_all(&rec).expect("write bench file");
        }
        file.sync_all().expect("sync bench file");
        let this = Self {
            path,
            file,
            stride: stride as u64,
        };
        // Warm the page cache.
        let mut buf = vec![0; stride];
        for slot in 0..SLOTS {
            this.file
                .read_exact_at(&mut buf, slot * this.stride)
                .expect("read bench file");
        }
        this
    }
}

impl Drop for SlotFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn cache_seal(c: &mut Criterion) {
    let keys = Keys::derive(&[0x42; 32]);
    let pt = plaintext();
    let sig = keys.signature(&pt);
    let mut record = BytesMut::new();
    seal(&keys, 7, 1, &sig, &pt, &mut record);
    let record = record.freeze();
    let expect = Expected::slot(7).with_generation(1).with_signature(sig);

    let mut g = c.benchmark_group("cache_seal");
    g.throughput(Throughput::Bytes(CHUNK as u64));

    g.bench_function("memcpy_64k", |b| {
        let mut dst = vec![0u8; CHUNK];
        b.iter(|| {
            dst.copy_from_slice(black_box(&pt));
            black_box(&dst);
        });
    });

    g.bench_function("signature_64k", |b| {
        b.iter(|| keys.signature(black_box(&pt)));
    });

    g.bench_function("seal_64k", |b| {
        let mut out = BytesMut::with_capacity(record_len(CHUNK));
        b.iter(|| {
            out.clear();
            seal(&keys, 7, 1, &sig, black_box(&pt), &mut out);
            black_box(&out);
        });
    });

    g.bench_function("open_64k", |b| {
        b.iter(|| open(&keys, &expect, black_box(&record)).expect("open"));
    });

    g.bench_function("open_in_place_64k", |b| {
        b.iter_batched(
            || BytesMut::from(&record[..]),
            |rec| open_in_place(&keys, &expect, rec).expect("open"),
            BatchSize::SmallInput,
        );
    });

    let file = SlotFile::new(&keys, &pt);
    let stride = file.stride;
    #[allow(clippy::cast_possible_truncation)]
    let stride_len = stride as usize;

    g.bench_function("pread_64k", |b| {
        let mut buf = vec![0u8; CHUNK];
        let mut slot = 0;
        b.iter(|| {
            slot = (slot + 1) % SLOTS;
            file.file
                .read_exact_at(&mut buf, slot * stride)
                .expect("pread");
            black_box(&buf);
        });
    });

    // The cached read path, reusing a read buffer: pread + open (one copy
    // out of the read buffer into the returned chunk).
    g.bench_function("read_open_64k", |b| {
        let mut buf = vec![0u8; stride_len];
        let mut slot = 0;
        b.iter(|| {
            slot = (slot + 1) % SLOTS;
            file.file
                .read_exact_at(&mut buf, slot * stride)
                .expect("pread");
            let exp = Expected::slot(slot).with_generation(1).with_signature(sig);
            open(&keys, &exp, &buf).expect("open")
        });
    });

    // The cached read path with a fresh buffer per read, decrypted in place
    // and returned without a further copy.
    g.bench_function("read_open_in_place_64k", |b| {
        let mut slot = 0;
        b.iter(|| {
            slot = (slot + 1) % SLOTS;
            let mut buf = BytesMut::zeroed(stride_len);
            file.file
                .read_exact_at(&mut buf, slot * stride)
                .expect("pread");
            let exp = Expected::slot(slot).with_generation(1).with_signature(sig);
            open_in_place(&keys, &exp, buf).expect("open")
        });
    });

    g.finish();
}

criterion_group!(benches, cache_seal);
criterion_main!(benches);
