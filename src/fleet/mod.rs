//! Running ringlb as a fleet behind ECMP: per-pool fingerprints, agreement checks, and health-gated route announcement.
//!
//! Every instance given the same backend set builds the same Maglev tables,
//! so the router may send a client to any of them. That holds only while
//! the instances agree; the fingerprint ([`fingerprint`]) makes agreement
//! visible, `ringlb fleet check` ([`check`]) compares instances and names
//! the first difference, and `ringlb announce` ([`announce`]) keeps an
//! instance's route announced only while it can serve.

pub mod announce;
pub mod check;
pub mod fingerprint;
