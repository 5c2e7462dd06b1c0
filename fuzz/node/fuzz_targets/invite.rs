//! Invite codes as a person pastes them: decoded, parsed at a fixed time, re-encoded.
//! Any input must give a value or an error, never a panic (see `hearth::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hearth::fuzzing::invite(data));
