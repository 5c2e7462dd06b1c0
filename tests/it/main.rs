//! Integration tests: real `hearth` processes and in-process nodes on loopback.

mod bus;
mod crash;
mod entities;
mod pairing;
mod robust;
mod up;
mod util;
mod watch;
mod ws;
