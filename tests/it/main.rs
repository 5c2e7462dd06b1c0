//! Integration tests: real `hearth` processes and in-process nodes on loopback.

mod alerts;
mod api;
mod api_guard;
mod batching;
mod bus;
mod cli;
mod crash;
mod entities;
mod events;
mod frames;
mod layout;
mod locks;
mod pairing;
mod retention;
mod robust;
mod rooms;
mod security;
mod security_bomb;
mod seed001;
mod sessions;
mod sharing;
mod store;
mod up;
mod util;
mod watch;
mod ws;
