//! Device pairing: the issuer's invite book and exchange (`service`), and the joiner's
//! side (`join`), which runs without a node and is also the joining side of home pairing.

pub(crate) mod join;
pub(crate) mod service;
