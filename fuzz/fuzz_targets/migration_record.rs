//! Fuzzes the edge's migration record decoder: the file is read back after
//! crashes, so any bytes must give a record or an error, never a panic or
//! a huge allocation.
//!
//! Invariants checked: a decoded record re-encodes to the same bytes (the
//! format is canonical), its two maps agree on the geometry, and the
//! counts of set chunks match the bits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifecycle::MigrationRecord;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = MigrationRecord::decode(data) else {
        return;
    };
    assert_eq!(r.encode(), data, "canonical encoding");
    assert_eq!(r.progress.size(), r.dirty.size());
    assert_eq!(r.progress.chunks(), r.dirty.chunks());
    assert_eq!(r.progress.iter_set().count() as u64, r.progress.count());
    assert!(r.progress.bytes_set() <= r.progress.size());
    if let Some(c) = r.progress.next_clear(0) {
        assert!(!r.progress.get(c));
    } else {
        assert!(r.progress.is_full());
    }
});
