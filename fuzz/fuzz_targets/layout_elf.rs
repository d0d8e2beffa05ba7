//! Fuzzes the ELF reader behind application groups (header, program
//! headers, dynamic section, string table) over arbitrary bytes taken as
//! one file: what it loads or nothing, never a panic or an unbounded
//! read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefetch::layout::{read_needs, File, FileKind};

fuzz_target!(|data: &[u8]| {
    check(data);
    // With a valid identification, so the fuzzer reaches the headers.
    if data.len() >= 64 {
        let mut fixed = data.to_vec();
        fixed[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    let file = File {
        fs: 0,
        path: "/usr/bin/x".into(),
        kind: FileKind::Regular,
        size: data.len() as u64,
        extents: vec![(0, data.len() as u64)],
        offsets: vec![],
        meta: None,
        target: None,
    };
    if let Some(needs) = read_needs(&data, &file) {
        assert!(needs.needed.len() <= 256);
    }
}
