//! ferry's orchestration crate: configuration and the commands of the
//! `ferry` binary. The data path lives in `blockcore` and the front ends;
//! this crate only wires them together.

pub mod api;
pub mod clone;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod edge;
pub mod metrics;
pub mod origin;
pub mod serve;
pub mod snapshot;
pub mod staging;
