//! The paused request, from the ask event to the verdict applied.
//!
//! - [`controller`]: the request state machine (kernel events in,
//!   decisions out, every step recorded);
//! - [`resume`]: writing a verdict and resuming the task, and reconciling
//!   the kernel's pending requests with the ones the agent tracks;
//! - [`enrich`]: what `/proc` says about the asking task, for reviewers and
//!   the audit;
//! - [`exe_path`]: the host's path of the file a paused exec runs (not the name the
//!   workload passed), and whether the task is in another mount namespace;
//! - [`request`]: the one request model (the domain `ApprovalRequest` under the one
//!   request id) that the controller builds from the event and its enrichment.

pub mod controller;
pub mod enrich;
pub mod exe_path;
pub mod request;
pub mod resume;
