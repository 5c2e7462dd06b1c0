//! hearth-net integration tests: real swarms on 127.0.0.1 with mDNS off, several nodes per
//! process, every await bounded by a timeout.

mod admission;
mod dialing;
mod limits;
mod malformed;
mod pairing;
#[cfg(feature = "quic")]
mod quic;
mod slow;
mod util;
