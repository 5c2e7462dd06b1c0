//! The pairing exchange: both sides of SPAKE2 against a fixed invite, and the payloads
//! sealed inside it (joiner info, grant, join package, home record).
//! Any input must give a value or an error, never a panic (see `hearth::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hearth::fuzzing::pairing(data));
