//! Fuzzes the partition table reader and the whole volume scan over
//! arbitrary images (volumes come from users, and a guest can write any
//! bytes into its disk's head): a table or an error, never a panic.
//!
//! Invariants checked: every partition lies inside the image; every file
//! extent found lies inside the image; the boot order names each chunk
//! once, all inside the image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefetch::layout::{boot_order, partitions, scan, Image, Limits};

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same head with a boot signature, so the fuzzer reaches the
    // tables and not only the signature test.
    if data.len() >= 512 {
        let mut signed = data.to_vec();
        signed[510] = 0x55;
        signed[511] = 0xaa;
        check(&signed);
    }
});

fn check(data: &[u8]) {
    let size = data.len() as u64;
    if let Ok(parts) = partitions(&data) {
        for p in &parts {
            assert!(p.start + p.len <= size, "partition beyond the image");
        }
    }
    let limits = Limits {
        max_files: 4096,
        max_extents: 4096,
        max_dir_bytes: 1 << 20,
        max_depth: 16,
    };
    let layout = scan(&data, limits);
    for f in &layout.files {
        for &(s, l) in &f.extents {
            assert!(s + l <= size, "{}: an extent beyond the image", f.path);
        }
    }
    let order = boot_order(&data, &layout, 4096);
    let mut seen = std::collections::HashSet::new();
    for &c in &order.chunks {
        assert!(c * 4096 < data.size(), "a chunk beyond the image");
        assert!(seen.insert(c), "chunk {c} twice");
    }
}
