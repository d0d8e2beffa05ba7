//! Micro-benchmarks of the edge cache's chunk sealing: what serving a cached
//! 64 KiB chunk costs in CPU, next to the plain copy and `pread` it replaces.
//!
//! - `pread_64k` reads 64 KiB from a page-cache-resident file;
//!   `pread_64k_cold` reads it after dropping the file from the page cache
//!   (`posix_fadvise(POSIX_FADV_DONTNEED)` before each read, not timed; read
//!   ahead off), i.e. from the device (on a VM the host may still cache it).
//! - `seal_64k`, `open_in_place_64k` (authenticate and decrypt, trusting the
//!   authenticated signature as the read path does), `open_verify_64k` (also
//!   recompute the signature, [`Expected::verify_content`]), `open_64k` (the
//!   copying `open`) and `blake3_signature_64k` (the keyed signature alone)
//!   are pure CPU.
//! - `read_open_64k` is the cache-hit path: pread of the slot record from
//!   the page-cache-resident file into a fresh, uninitialized `BytesMut`,
//!   then `open_in_place` without content verification.
//!   `read_open_reused_64k` does the same into one reused allocation, and
//!   `read_open_64k_cold` with the record dropped from the page cache first.
//!
//! Compare `read_open_64k` with `pread_64k` (and `pread_64k_cold`) for "a
//! cached 64 KiB read costs N x a plain pread".

use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::BytesMut;
use cache::seal::{open, open_in_place, record_len, seal, Expected, Keys};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const CHUNK: usize = 64 * 1024;
/// Records in the slot file; reads rotate over them.
const SLOTS: u64 = 64;
/// The generation of every record in the slot file. A real store gives
/// every seal its own generation; the benchmark only opens them.
const GENERATION: u64 = 1;

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
/// synced (so its pages are clean and can be dropped from the page cache)
/// and read once so it is resident. Removed on drop.
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
            seal(keys, slot, GENERATION, &sig, pt, &mut rec);
            rec.resize(stride, 0);
            file.write_all(&rec).expect("write bench file");
        }
        file.sync_all().expect("sync bench file");
        let this = Self {
            path,
            file,
            stride: stride as u64,
        };
        this.warm();
        this
    }

    /// Reads the whole file so it is resident in the page cache.
    fn warm(&self) {
        #[allow(clippy::cast_possible_truncation)]
        let mut buf = vec![0; self.stride as usize];
        for slot in 0..SLOTS {
            self.file
                .read_exact_at(&mut buf, slot * self.stride)
                .expect("read bench file");
        }
    }

    /// Gives the kernel a hint about the whole file.
    fn advise(&self, advice: libc::c_int) {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is
        // open for the lifetime of `self.file`.
        let rc = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, advice) };
        assert_eq!(
            rc,
            0,
            "posix_fadvise: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }

    /// Drops the (clean) file from the page cache.
    fn evict(&self) {
        self.advise(libc::POSIX_FADV_DONTNEED);
    }

    /// Reads `len` bytes at `offset` into a fresh `BytesMut` without
    /// zeroing it first, as a slot store does.
    fn pread_fresh(&self, len: usize, offset: u64) -> BytesMut {
        let mut buf = BytesMut::with_capacity(len);
        self.pread_into(&mut buf, len, offset);
        buf
    }

    /// Appends `len` bytes read at `offset` to `buf`, reading straight into
    /// its spare capacity (reserved here), without zeroing it first.
    fn pread_into(&self, buf: &mut BytesMut, len: usize, offset: u64) {
        buf.reserve(len);
        let spare = &mut buf.spare_capacity_mut()[..len];
        let offset = libc::off_t::try_from(offset).expect("offset fits off_t");
        // SAFETY: `spare` is valid for writes of `len` bytes (reserved
        // above) and pread writes at most `len` bytes into it; the fd is
        // open for the lifetime of `self.file`.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                len,
                offset,
            )
        };
        assert_eq!(
            usize::try_from(n).ok(),
            Some(len),
            "short or failed pread: {}",
            std::io::Error::last_os_error()
        );
        let new_len = buf.len() + len;
        // SAFETY: pread initialized the `len` bytes after the old length.
        unsafe { buf.set_len(new_len) };
    }
}

impl Drop for SlotFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn cache_seal(c: &mut Criterion) {
    let keys = Keys::derive(&[0x42; 32], &[0x17; 16]);
    let pt = plaintext();
    let sig = keys.signature(&pt);
    let mut record = BytesMut::new();
    seal(&keys, 7, GENERATION, &sig, &pt, &mut record);
    let record = record.freeze();
    let expect = Expected::slot(7)
        .with_generation(GENERATION)
        .with_signature(sig);

    let mut g = c.benchmark_group("cache_seal");
    g.throughput(Throughput::Bytes(CHUNK as u64));

    g.bench_function("memcpy_64k", |b| {
        let mut dst = vec![0u8; CHUNK];
        b.iter(|| {
            dst.copy_from_slice(black_box(&pt));
            black_box(&dst);
        });
    });

    g.bench_function("blake3_signature_64k", |b| {
        b.iter(|| keys.signature(black_box(&pt)));
    });

    g.bench_function("seal_64k", |b| {
        let mut out = BytesMut::with_capacity(record_len(CHUNK));
        b.iter(|| {
            out.clear();
            seal(&keys, 7, GENERATION, &sig, black_box(&pt), &mut out);
            black_box(&out);
        });
    });

    g.bench_function("open_64k", |b| {
        b.iter(|| open(&keys, &expect, black_box(&record)).expect("open"));
    });

    // In place needs a fresh copy of the ciphertext per iteration: made in
    // the (untimed) setup, right before each open so it is in cache as a
    // just-read record would be.
    g.bench_function("open_in_place_64k", |b| {
        b.iter_batched(
            || BytesMut::from(&record[..]),
            |rec| open_in_place(&keys, &expect, rec).expect("open"),
            BatchSize::PerIteration,
        );
    });

    g.bench_function("open_verify_64k", |b| {
        let expect = expect.verify_content();
        b.iter_batched(
            || BytesMut::from(&record[..]),
            |rec| open_in_place(&keys, &expect, rec).expect("open"),
            BatchSize::PerIteration,
        );
    });

    let file = SlotFile::new(&keys, &pt);
    let stride = file.stride;
    #[allow(clippy::cast_possible_truncation)]
    let stride_len = stride as usize;
    let expect_slot = |slot: u64| {
        Expected::slot(slot)
            .with_generation(GENERATION)
            .with_signature(sig)
    };

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

    // The cache-hit path: a fresh buffer per read, decrypted in place and
    // returned without a further copy.
    g.bench_function("read_open_64k", |b| {
        let mut slot = 0;
        b.iter(|| {
            slot = (slot + 1) % SLOTS;
            let buf = file.pread_fresh(stride_len, slot * stride);
            open_in_place(&keys, &expect_slot(slot), buf).expect("open")
        });
    });

    // The same, reading into one reused allocation: once the previous chunk
    // is dropped, `reserve` reclaims the whole buffer.
    g.bench_function("read_open_reused_64k", |b| {
        let mut pool = BytesMut::with_capacity(stride_len);
        let mut slot = 0;
        b.iter(|| {
            slot = (slot + 1) % SLOTS;
            file.pread_into(&mut pool, stride_len, slot * stride);
            open_in_place(&keys, &expect_slot(slot), pool.split()).expect("open")
        });
    });

    // Cold reads: the file is dropped from the page cache before each read
    // (untimed), and read-ahead is off so a read fetches only its own pages.
    file.advise(libc::POSIX_FADV_RANDOM);

    g.bench_function("pread_64k_cold", |b| {
        let mut buf = vec![0u8; CHUNK];
        let mut slot = 0;
        b.iter_batched(
            || {
                slot = (slot + 1) % SLOTS;
                file.evict();
                slot
            },
            |slot| {
                file.file
                    .read_exact_at(&mut buf, slot * stride)
                    .expect("pread");
                black_box(&buf);
            },
            BatchSize::PerIteration,
        );
    });

    g.bench_function("read_open_64k_cold", |b| {
        let mut slot = 0;
        b.iter_batched(
            || {
                slot = (slot + 1) % SLOTS;
                file.evict();
                slot
            },
            |slot| {
                let buf = file.pread_fresh(stride_len, slot * stride);
                open_in_place(&keys, &expect_slot(slot), buf).expect("open")
            },
            BatchSize::PerIteration,
        );
    });

    g.finish();
}

criterion_group!(benches, cache_seal);
criterion_main!(benches);
