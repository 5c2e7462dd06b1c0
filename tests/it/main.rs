//! Integration tests: real `hearth` processes and in-process nodes on loopback.

mod entities;
mod pairing;
mod up;
mod util;
