//! The simulator in CI: a bounded campaign of seeds must run clean, a
//! seed must replay exactly, and every known mistake, reintroduced, must
//! be reported within a bounded number of seeds. Long campaigns:
//! `cargo run --release -p sim -- --seeds 10000` (README, "Simulation").

use std::time::Duration;

use sim::{Mistakes, SimConfig};

/// Seeds 0..CLEAN_SEEDS run in CI (about a minute on two cores).
const CLEAN_SEEDS: u64 = 150;

#[test]
fn a_campaign_of_seeds_runs_clean() {
    let mut hours = 0.0;
    let mut maps = 0;
    for seed in 0..CLEAN_SEEDS {
        match sim::run(SimConfig::new(seed)) {
            Ok(r) => {
                assert!(r.reads_checked > 0, "seed {seed} checked no reads: {r:?}");
                hours += r.virtual_time.as_secs_f64() / 3600.0;
                maps += r.extent_maps_checked;
            }
            Err(f) => panic!("seed {seed}: {f}"),
        }
    }
    eprintln!(
        "{CLEAN_SEEDS} seeds clean, {hours:.2} simulated hours, {maps} allocation maps checked"
    );
    // Most attaches see their allocation query answered.
    assert!(maps >= CLEAN_SEEDS, "{maps} allocation maps checked");
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77] {
        let a = sim::run(SimConfig::new(seed)).unwrap();
        let b = sim::run(SimConfig::new(seed)).unwrap();
        assert_eq!(a.trace, b.trace, "seed {seed} did not replay");
        assert_eq!(
            (a.ops, a.reads_checked, a.batches_applied),
            (b.ops, b.reads_checked, b.batches_applied)
        );
    }
    let other = sim::run(SimConfig::new(4)).unwrap();
    let again = sim::run(SimConfig::new(3)).unwrap();
    assert_ne!(other.trace, again.trace, "different seeds, same run");
}

/// Runs seeds from 0 with `mistakes` until one fails; returns the failure.
fn first_failure(mistakes: Mistakes, secs: u64, within: u64) -> (u64, sim::Failure) {
    first_failure_with(mistakes, secs, within, true)
}

fn first_failure_with(
    mistakes: Mistakes,
    secs: u64,
    within: u64,
    allocation_queries: bool,
) -> (u64, sim::Failure) {
    for seed in 0..within {
        let cfg = SimConfig {
            mistakes,
            duration: Duration::from_secs(secs),
            allocation_queries,
            ..SimConfig::new(seed)
        };
        if let Err(f) = sim::run(cfg) {
            eprintln!("found in seed {seed}: {f}");
            return (seed, f);
        }
    }
    panic!("{mistakes:?} not found in {within} seeds");
}

#[test]
fn acknowledging_a_flush_before_the_sync_is_found() {
    let (_, f) = first_failure(
        Mistakes {
            flush_before_sync: true,
            ..Mistakes::default()
        },
        300,
        20,
    );
    assert!(f.what.contains("may only be one of"), "{f}");
    assert!(
        f.replay.contains("--mistake flush-before-sync"),
        "{}",
        f.replay
    );
}

#[test]
fn trimming_the_journal_before_the_origin_acknowledged_is_found() {
    let (_, f) = first_failure(
        Mistakes {
            ack_before_apply: true,
            ..Mistakes::default()
        },
        300,
        5,
    );
    assert!(
        f.what.contains("may only be one of") || f.what.contains("disagree"),
        "{f}"
    );
}

#[test]
fn applying_a_batch_twice_after_a_reconnect_is_found() {
    let (_, f) = first_failure(
        Mistakes {
            apply_twice: true,
            ..Mistakes::default()
        },
        300,
        60,
    );
    assert!(
        f.what.contains("applied twice") || f.what.contains("not the state after batch"),
        "{f}"
    );
}

#[test]
fn the_heartbeat_behind_batch_livelock_is_found() {
    // The livelock needs a heartbeat stuck behind a batch part for the
    // whole liveness timeout; the allocation replies after each attach
    // make that rarer (first found in seed 52 instead of 5), so this runs
    // the link's traffic without them.
    let (_, f) = first_failure_with(
        Mistakes {
            heartbeat_liveness: true,
            ..Mistakes::default()
        },
        300,
        30,
        false,
    );
    assert!(
        f.what.contains("liveness") || f.what.contains("did not drain"),
        "{f}"
    );
}
