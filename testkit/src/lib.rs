//! Test support shared across the workspace (a dev-dependency only).
//!
//! - [`crash`]: the one harness for crash tests that SIGKILL a child
//!   process (the test re-executes itself) and check what survived.
//! - [`rng`] and [`pattern`]: seeded random numbers and reproducible test
//!   data, instead of a hand-written generator per test file.

pub mod crash;

pub use fastrand::Rng;

/// A seeded generator: the same seed gives the same sequence.
pub fn rng(seed: u64) -> Rng {
    Rng::with_seed(seed)
}

/// `len` bytes derived from `seed`: reproducible, and incompressible
/// enough that compression does not make a test's data vanish.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    rng(seed).fill(&mut out);
    out
}

/// A seed for a test that wants a different run each time: from the
/// clock, printed so a failure can be replayed with `FERRY_TEST_SEED`.
pub fn fresh_seed(test: &str) -> u64 {
    let seed = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_secs() ^ (u64::from(now.subsec_nanos()) << 20)
        });
    eprintln!("{test}: seed {seed} (FERRY_TEST_SEED={seed} replays it)");
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_reproducible_and_differ_by_seed() {
        assert_eq!(pattern(7, 100), pattern(7, 100));
        assert_ne!(pattern(7, 100), pattern(8, 100));
        assert_eq!(rng(3).u64(..), rng(3).u64(..));
    }
}
