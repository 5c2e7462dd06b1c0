//! Device certificates, revocations and lock arbiter namings, as hellos, home documents
//! and grants carry them, verified against a fixed root key.
//! Any input must give a value or an error, never a panic (see `hearth::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hearth::fuzzing::certificate(data));
