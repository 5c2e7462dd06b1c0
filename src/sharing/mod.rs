//! Sharing between homes: home pairing (both sides), admission of paired homes' devices,
//! grants, share/unshare and key rotation, and the checks on every frame from a paired
//! home's device (`service`); listings of shares and paired homes (`lists`).

mod admission;
mod grants;
mod homes;
pub(crate) mod lists;
pub(crate) mod service;
