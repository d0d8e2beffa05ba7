//! Fuzzes the FAT12/16/32 walker (boot sector, FAT, cluster chains, long
//! names) over arbitrary images: files or an error, never a panic or a
//! loop.
//!
//! Invariant checked: every extent found lies inside the image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefetch::layout::{scan_fat, Limits};

fuzz_target!(|data: &[u8]| {
    check(data);
    // With a plausible boot sector's fixed fields, so the fuzzer reaches
    // the FAT and the directories.
    if data.len() >= 512 {
        let mut fixed = data.to_vec();
        fixed[0] = 0xeb;
        fixed[11..13].copy_from_slice(&512u16.to_le_bytes());
        fixed[13] = 1 << (fixed[13] % 8);
        fixed[510] = 0x55;
        fixed[511] = 0xaa;
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    let limits = Limits {
        max_files: 4096,
        max_extents: 4096,
        max_dir_bytes: 1 << 20,
        max_depth: 16,
    };
    if let Ok((_, files)) = scan_fat(&data, limits) {
        for f in &files {
            for &(s, l) in &f.extents {
                assert!(s + l <= data.len() as u64, "{}: an extent beyond the image", f.path);
            }
        }
    }
}
