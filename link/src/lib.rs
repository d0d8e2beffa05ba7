//! `link`: everything that crosses the wire between an edge and an origin,
//! with no I/O of its own.
//!
//! ```text
//!   edge shell (tokio) ─┐                         ┌─ origin shell (tokio)
//!   simulator ──────────┤                         ├─ simulator
//!                       v                         v
//!                 session::EdgeSession     session::OriginSession
//!                       └──────── transport ───────┘   (per connection)
//!                          proto: frames, messages, scheduler, credit
//!                          cc:    delay-based congestion window
//! ```
//!
//! - [`proto`]: the framed protocol (messages, zstd, the scheduler that
//!   puts control before demand data before background data).
//! - [`cc`]: the congestion controller that keeps background bytes in
//!   flight near the path's bandwidth-delay product.
//! - [`session`]: both ends as state machines fed bytes, time and storage
//!   completions.
//! - [`error`]: [`LinkError`] and its one mapping to wire codes.
//! - `io` (feature `io`): the tokio pieces both shells share, and `tls`.

pub mod bounded;
pub mod cc;
pub mod error;
pub mod proto;
pub mod session;

#[cfg(feature = "io")]
pub mod io;
#[cfg(feature = "io")]
pub mod tls;

pub use bounded::BoundedSet;
pub use error::LinkError;
