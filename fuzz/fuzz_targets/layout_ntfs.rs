//! Fuzzes the NTFS walker (boot sector checks, then the `ntfs` crate
//! reading file records, attribute lists, `$I30` indexes and data runs)
//! over arbitrary images: files or an error, never a panic out of the
//! scan, a loop or an allocation without bound.
//!
//! An input shorter than the size its boot sector gives is padded with
//! zeros up to it (at most 4 MiB), so a seed can be just the head of a
//! small volume (boot sector, MFT, root index), where the bytes worth
//! mutating are.
//!
//! Invariant checked: every extent found lies inside the image.
//!
//! The `ntfs` crate panics on some damaged structures (an index entry
//! shorter than its header, for one); the scan catches those and reports
//! the filesystem damaged, as the origin must. libFuzzer's panic hook
//! aborts on every panic, caught or not, so this target's hook lets the
//! reader crates' panics through to that `catch_unwind` and aborts on
//! any other, ours included.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefetch::layout::{scan_ntfs, Limits};

const MAX_IMAGE: u64 = 4 << 20;

/// Where the crates that parse NTFS for the scan keep their sources.
const READER_CRATES: &[&str] = &[
    "ntfs-0.4.",
    "byteorder-1.",
    "binrw-0.",
    "nt-string-0.",
    "arrayvec-0.",
];

fuzz_target!(init: let_reader_panics_through(), |data: &[u8]| fuzz(data));

fn let_reader_panics_through() {
    let abort = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_reader = info
            .location()
            .is_some_and(|l| READER_CRATES.iter().any(|c| l.file().contains(c)));
        if !in_reader {
            abort(info);
        }
    }));
}

fn fuzz(data: &[u8]) {
    check(data.to_vec());
    // With the boot sector's fixed fields plausible (512-byte sectors,
    // clusters of 512 B to 4 KiB, 1 KiB records, the MFT inside the
    // volume), so the fuzzer reaches the crate's record parsing; fields
    // already plausible are kept, so a seed's volume stays whole.
    if data.len() >= 512 {
        let mut fixed = data.to_vec();
        fixed[3..11].copy_from_slice(b"NTFS    ");
        fixed[11..13].copy_from_slice(&512u16.to_le_bytes());
        if !matches!(fixed[13], 1 | 2 | 4 | 8) {
            fixed[13] = 1 << (fixed[13] % 4);
        }
        let len = data.len() as u64 / 512;
        let own = le64(&fixed, 0x28);
        let sectors = if (len..=MAX_IMAGE / 512).contains(&own) {
            own
        } else {
            len.min(MAX_IMAGE / 512)
        };
        fixed[0x28..0x30].copy_from_slice(&sectors.to_le_bytes());
        let clusters = sectors / u64::from(fixed[13]);
        let own = le64(&fixed, 0x30);
        let mft = if (1..clusters).contains(&own) {
            own
        } else {
            1 + own % clusters.saturating_sub(1).max(1)
        };
        fixed[0x30..0x38].copy_from_slice(&mft.to_le_bytes());
        fixed[0x40] = 0xf6;
        fixed[510] = 0x55;
        fixed[511] = 0xaa;
        check(fixed);
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn check(mut img: Vec<u8>) {
    if img.len() >= 512 {
        let sector = u64::from(u16::from_le_bytes([img[11], img[12]]));
        let sectors = le64(&img, 0x28);
        let want = sectors.saturating_mul(sector).min(MAX_IMAGE) as usize;
        if want > img.len() {
            img.resize(want, 0);
        }
    }
    let limits = Limits {
        max_files: 4096,
        max_extents: 4096,
        max_dir_bytes: 1 << 20,
        max_depth: 16,
    };
    if let Ok((meta, files)) = scan_ntfs(&img.as_slice(), limits) {
        for &(s, l) in &meta {
            assert!(s + l <= img.len() as u64, "metadata beyond the image");
        }
        for f in &files {
            for &(s, l) in &f.extents {
                assert!(
                    s + l <= img.len() as u64,
                    "{}: an extent beyond the image",
                    f.path
                );
            }
        }
    }
}
