//! `sim`: runs seeds of the simulator.
//!
//! ```text
//! cargo run --release -p sim -- --seeds 1000            # a campaign: seeds 0..1000
//! cargo run --release -p sim -- --seed 42 --secs 600    # one seed, as printed by a failure
//! cargo run --release -p sim -- --seeds 50 --mistake ack-before-apply
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use sim::{Mistakes, SimConfig};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a ferry edge and origin")]
struct Args {
    /// Run exactly this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run seeds FIRST..FIRST+N.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Virtual seconds of workload and faults per seed.
    #[arg(long, default_value_t = 120)]
    secs: u64,
    /// Reintroduce a known mistake: flush-before-sync, ack-before-apply,
    /// apply-twice, heartbeat-liveness.
    #[arg(long)]
    mistake: Vec<String>,
    /// No crashes, cuts or disk faults.
    #[arg(long)]
    no_faults: bool,
    /// The edge asks for no allocation maps at attach.
    #[arg(long)]
    no_allocation_queries: bool,
    /// Keep going after a failure.
    #[arg(long)]
    keep_going: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut mistakes = Mistakes::default();
    for m in &a.mistake {
        match m.as_str() {
            "flush-before-sync" => mistakes.flush_before_sync = true,
            "ack-before-apply" => mistakes.ack_before_apply = true,
            "apply-twice" => mistakes.apply_twice = true,
            "heartbeat-liveness" => mistakes.heartbeat_liveness = true,
            other => {
                eprintln!("unknown mistake {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let seeds: Vec<u64> = match a.seed {
        Some(s) => vec![s],
        None => (a.first..a.first + a.seeds).collect(),
    };
    let started = Instant::now();
    let mut virtual_time = Duration::ZERO;
    let mut failures = 0;
    for seed in seeds.iter().copied() {
        let cfg = SimConfig {
            seed,
            duration: Duration::from_secs(a.secs),
            mistakes,
            faults: !a.no_faults,
            allocation_queries: !a.no_allocation_queries,
        };
        match sim::run(cfg) {
            Ok(r) => {
                virtual_time += r.virtual_time;
                println!(
                    "seed {seed}: ok  {:.0}s virtual, {} ops, {} reads checked, {} batches, \
                     crashes {}/{} (edge/origin), {} link faults, {} disk faults, trace {:016x}",
                    r.virtual_time.as_secs_f64(),
                    r.ops,
                    r.reads_checked,
                    r.batches_applied,
                    r.edge_crashes,
                    r.origin_crashes,
                    r.link_faults,
                    r.disk_faults,
                    r.trace
                );
            }
            Err(f) => {
                failures += 1;
                println!("seed {seed}: FAILED {f}");
                if !a.keep_going {
                    break;
                }
            }
        }
    }
    println!(
        "{} seeds, {failures} failed, {:.2} simulated hours in {:.0}s",
        seeds.len(),
        virtual_time.as_secs_f64() / 3600.0,
        started.elapsed().as_secs_f64()
    );
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
