//! Fuzzes the ext4 walker (superblock, group descriptors, inodes, extent
//! trees, indirect blocks, directories) over arbitrary images: files or
//! an error, never a panic, a loop or an allocation without bound.
//!
//! Invariant checked: every extent found lies inside the image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefetch::layout::{scan_ext4, Limits};

fuzz_target!(|data: &[u8]| {
    check(data);
    // With the magic number in place, so the fuzzer reaches the walker.
    if data.len() >= 2048 {
        let mut fixed = data.to_vec();
        fixed[1024 + 0x38] = 0x53;
        fixed[1024 + 0x39] = 0xef;
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
    if let Ok((_, files)) = scan_ext4(&data, limits) {
        for f in &files {
            for &(s, l) in &f.extents {
                assert!(s + l <= data.len() as u64, "{}: an extent beyond the image", f.path);
            }
        }
    }
}
