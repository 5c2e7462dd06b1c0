//! Frames of the ephemeral and grant streams (heartbeats, alerts, clock probes, grants,
//! home keys, revocations, locks, events, sessions, activities), each payload through the
//! decoder of its lane.
//! Any input must give a value or an error, never a panic (see `hearth::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hearth::fuzzing::peer_frame(data));
