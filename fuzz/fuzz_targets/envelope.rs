//! Fuzzes the wire envelope decoder: any input must decode to a frame or an
//! error value, and every frame that decodes must survive a round trip.
#![no_main]

use hearth_crdt::wire::{decode, encode};
use libfuzzer_sys::fuzz_target;

/// Cap used here: small enough that the size check is exercised by inputs
/// libFuzzer actually generates (it defaults to 4 KiB inputs).
const CAP: usize = 2048;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode(data, CAP) {
        let again = encode(&frame);
        let back = decode(&again, usize::MAX).expect("a re-encoded frame decodes");
        assert_eq!(back, frame);
    }
});
