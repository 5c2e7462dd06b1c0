//! hearth-storage.
