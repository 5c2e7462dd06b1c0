//! Records the node reads back from its store: the home record, revocations, static
//! peers, alerts, document meta, quarantine list, lock table and role, shared entities,
//! audit entries, the certificate and keyring keys.
//! Any input must give a value or an error, never a panic (see `hearth::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hearth::fuzzing::store_record(data));
