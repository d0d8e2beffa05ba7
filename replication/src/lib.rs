//! ferry's edge-origin link and write-behind journal (see the streaming
//! issue). Being built up:
//!
//! - [`proto`]: the sans-IO framed protocol between edge and origin.
//! - [`apply`]: the origin's apply journal (atomic, exactly-once batches).
//! - [`journal`]: the edge's write-behind journal.
//! - [`linkemu`]: a TCP relay that emulates a WAN link (delay, bandwidth,
//!   cuts) for tests, benchmarks and the demo.

pub mod apply;
pub mod edge;
pub mod journal;
pub mod link;
pub mod linkemu;
pub mod origin;
pub mod proto;
pub mod signature;
pub mod tls;
