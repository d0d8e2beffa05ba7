//! ferry orchestration.
