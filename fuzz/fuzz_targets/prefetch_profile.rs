//! Fuzzes the boot-profile decoder and what the origin does with a profile
//! an edge sent: any bytes give a profile or an error, never a panic or an
//! allocation beyond the input's size.
//!
//! Invariants checked: a decoded profile re-encodes to the same bytes (the
//! format is canonical); merging it and planning from it stay inside the
//! volume and within the budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefetch::{consensus, Plan, PlanConfig, Profile};

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes with a checksum that matches, so the fuzzer reaches
    // the body's parser and checks, not only the CRC.
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
    check(&sealed);
});

fn check(data: &[u8]) {
    let Ok(p) = Profile::decode(data) else {
        return;
    };
    assert_eq!(p.encode(), data, "canonical encoding");
    let merged = consensus(p.chunk_size, p.volume_size, &[p.clone(), p.clone()]);
    assert_eq!(merged.chunks.len(), p.touches.len());
    let cfg = PlanConfig {
        budget: 8 << 20,
        max_range: 1 << 20,
    };
    let plan = Plan::new(p.chunk_size, p.volume_size, &merged.chunks, cfg);
    assert!(plan.bytes <= cfg.budget);
    let mut total = 0u64;
    for &(offset, len) in &plan.ranges {
        assert!(len > 0);
        assert!(offset + u64::from(len) <= p.volume_size, "a range beyond the volume");
        total += u64::from(len);
    }
    assert_eq!(total, plan.bytes);
}
