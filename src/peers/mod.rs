//! Devices of this home on the network: admission by certificate, sealing and routing
//! frames (`admission`), liveness (`heartbeat`), paced session openings (`pacing`), and
//! saved sync states (`sync_states`).

pub(crate) mod admission;
pub(crate) mod heartbeat;
pub(crate) mod pacing;
pub(crate) mod sync_states;
