//! What API clients send: every request body through the API's extractor, queries,
//! WebSocket client frames and seed 001 frames.
//! Any input must give a value or an error, never a panic (see `hearth::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hearth::fuzzing::api_request(data));
