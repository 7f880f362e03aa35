//! The tonic services: [`AgentApi`] (agents, mutual TLS) and [`ReviewApi`] (reviewers, bearer
//! tokens). Handlers convert wire messages with [`gatekeep_proto::convert`] and leave every
//! decision to the [`Engine`](crate::lifecycle::Engine); errors become statuses through the
//! one `From<Error> for tonic::Status`.

mod agent;
pub mod http;
pub mod http_probe;
pub mod ops;
mod queue_row;
mod review;
mod sse;

pub use agent::AgentApi;
pub use review::ReviewApi;
