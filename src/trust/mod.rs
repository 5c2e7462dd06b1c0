//! Trust and key primitives: device certificates, invite codes, the pairing exchange and
//! document keys.
