//! What to send an edge before it asks for it.
//!
//! A VM's boot is thousands of small, strictly serial reads; over a WAN
//! each one the edge's cache does not hold costs a round trip. The edge
//! records which chunks a boot touches and when ([`Recorder`]), sends the
//! [`Profile`] to the origin, and the origin, at the next attach, merges the
//! volume's profiles into one order ([`consensus`]) and streams a [`Plan`]
//! of pushes in that order, behind demand reads.
//!
//! Pure: no I/O, no clocks (callers pass times), no async. Everything here
//! takes untrusted bytes or sizes without panicking.

pub mod layout;
mod plan;
mod profile;
mod recorder;

pub use plan::{consensus, Consensus, Plan, PlanConfig};
pub use profile::{Profile, ProfileError, Touch, MAX_TOUCHES, PROFILE_VERSION};
pub use recorder::{RecordWindow, Recorder};
