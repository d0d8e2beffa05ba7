//! NBD protocol codec (being written).
