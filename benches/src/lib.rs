//! Benchmarks live in `benches/` (criterion) and `system/` (scripts against peers).
