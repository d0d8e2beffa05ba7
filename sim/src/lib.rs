//! `sim`: ferry's edge and origin in one thread, in virtual time, under a
//! seeded scheduler, with every fault the network and the disks can
//! produce, checking the write path's invariants after every step.
//!
//! It runs the real code: the link sessions (`link`), the edge's data path
//! (`edge::EdgeVolume`) and journal (`journal::Journal`, with its syncs
//! inline), the origin (`origin::Origin`: ownership, apply journal, reads),
//! over in-memory storage that loses unsynced bytes at a crash and a disk
//! that tears unflushed writes at sector boundaries. Only the shells (the
//! tokio tasks that move bytes) and the cache's RocksDB index are replaced:
//! the network by a model with delay, bandwidth and a bounded queue, the
//! cache by a model with its real fill rule.
//!
//! Checked, always:
//! - a read returns the newest completed write of every block, or after
//!   an edge crash one the guest could have lost (never an older one than
//!   the last write completed with FUA or before a completed FLUSH);
//! - a block holds only bytes some write produced (nothing torn, nothing
//!   misplaced);
//! - after every apply and every origin restart, the origin's image is the
//!   base image plus a whole number of batches; no batch is applied twice;
//! - a batch shipped before a restart is shipped again identical;
//! - liveness: with the link healthy, the oldest unshipped write is never
//!   older than the RPO plus three times the time to ship a full journal
//!   (what may have been written before it), plus 30 s;
//! - at the end (faults off, workload stopped), the edge drains, and every
//!   block reads the same on the edge and at the origin.
//!
//! A failure names its seed and prints the one command that replays it.

// The simulation's short-lived bindings (e: the edge, o: the origin, c: a
// connection, v: a volume) read better short.
#![allow(clippy::many_single_char_names)]

pub mod cache;
pub mod disk;
pub mod exec;
pub mod model;
pub mod world;

pub use link::session::Mistakes;
pub use world::{Failure, Report, Scenario, Sim, SimConfig};

/// Runs one seed.
pub fn run(cfg: SimConfig) -> Result<Report, Failure> {
    Sim::new(cfg).run()
}
