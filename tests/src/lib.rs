//! Test support: start `ferry` and the peers, find tools.
