//! Integration tests: real `hearth` processes and in-process nodes on loopback.

mod up;
mod util;
