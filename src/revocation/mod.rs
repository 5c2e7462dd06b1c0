//! Device revocation: signing, refusal and key rotation (`service`), and the signed,
//! add-only set of revoked devices of this home and of paired homes (`set`).

pub(crate) mod service;
pub(crate) mod set;
