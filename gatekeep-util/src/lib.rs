//! Helpers that the agent, the decision service and the agent's link to it
//! all need, written once.
//!
//! A crate of its own because none of the crates they share fits:
//! `gatekeep-common` is the `no_std` kernel ABI, `gatekeep-proto` the wire
//! and domain model, `gatekeep-audit` the audit log.
//!
//! - [`fs::write_atomic`]: write a file in one step (a temporary file in the
//!   same folder, synced, then renamed), with the mode it needs from its
//!   creation on, replacing or refusing an existing file.
//! - [`retry`]: [`Backoff`](retry::Backoff) delays, retrying a fallible
//!   operation until a deadline, polling a condition until a deadline.

pub mod fs;
pub mod retry;
