//! Clients of gatekeep's decision service.
//!
//! - [`AgentLink`]: the agent's side of the agent API. One long-lived mutual-TLS stream,
//!   reconnected with exponential backoff; a queue of pending requests that survives
//!   disconnects (re-sent, by id, on every reconnect; the service treats ids idempotently);
//!   [`AgentLink::decide`] awaits one request's decision, and [`LinkEvent`]s carry
//!   connection changes, grants and revocations.
//! - [`AuditShipper`]: ships the agent's local audit log to the service, which anchors each
//!   host's chain; resumable from the service's head, the local log its only backlog.
//! - [`ReviewClient`]: the reviewers' side (the `gatekeep` CLI), with a bearer token.
//!
//! Both speak the domain types of [`gatekeep_proto::model`]; wire messages stay inside.
//!
//! ```no_run
//! # async fn demo(request: gatekeep_proto::model::ApprovalRequest) -> Result<(), gatekeep_client::LinkError> {
//! use gatekeep_client::{AgentLink, AgentLinkConfig, ClientIdentity, ClientTls};
//!
//! let config = AgentLinkConfig::new(
//!     "https://gatekeep.example.org:7443",
//!     ClientTls {
//!         ca_pem: std::fs::read_to_string("/etc/gatekeep/tls/ca.pem").expect("ca"),
//!         identity: Some(ClientIdentity {
//!             cert_pem: std::fs::read_to_string("/etc/gatekeep/tls/agent.pem").expect("cert"),
//!             key_pem: std::fs::read_to_string("/etc/gatekeep/tls/agent.key").expect("key"),
//!         }),
//!         domain: None,
//!     },
//! );
//! let (link, mut events) = AgentLink::start(config)?;
//! tokio::spawn(async move {
//!     while let Some(event) = events.recv().await {
//!         // Install grants on `Connected`, remove them on `GrantRevoked`...
//!         println!("{event:?}");
//!     }
//! });
//! let decision = link.decide(request).await?;
//! println!("{} by {}", decision.verdict, decision.decided_by);
//! # Ok(()) }
//! ```

mod agent;
mod error;
mod review;
mod shipper;
mod tls;

pub use agent::{AgentLink, AgentLinkConfig, Backoff, LinkEvent};
pub use error::{ClientError, LinkError};
pub use review::{
    AuditReport, GrantFilter, HostRecords, RequestFilter, ReviewClient, ReviewConfig, Status,
};
pub use shipper::{
    AuditShipper, BATCH_BYTES, BATCH_RECORDS, LocalLog, MemoryLog, ShipStatus, ShipperConfig,
};
pub use tls::{ClientIdentity, ClientTls};
