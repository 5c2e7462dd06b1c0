//! hearth-net.
