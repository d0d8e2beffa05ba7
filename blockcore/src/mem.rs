//! In-memory sparse device (being written).
/// Placeholder replaced in the same session.
#[derive(Debug)]
pub struct MemDevice;
