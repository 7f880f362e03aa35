//! gatekeep's decision service.
//!
//! Agents stream paused requests in over mutual-TLS gRPC; server rules and standing grants
//! may decide them at once; reviewers list, watch and decide the rest (quorum, no
//! self-approval, per-policy reviewer groups); deadlines expire with the policy's timeout
//! action; every transition is stored ([`store`]) and audited (hash-chained, with
//! [`gatekeep_audit`]).
//!
//! Run it as `gatekeep-server serve`, or embed it:
//!
//! ```no_run
//! # async fn demo() -> Result<(), gatekeep_server::Error> {
//! use gatekeep_server::{Server, ServerConfig, certs::Pki};
//!
//! let pki = Pki::ephemeral(&[])?;
//! let config = ServerConfig {
//!     listen: "127.0.0.1:0".parse().expect("address"),
//!     data_dir: "/var/lib/gatekeep/service".into(),
//!     ..ServerConfig::default()
//! };
//! let server = Server::builder(config).tls(pki.tls()).build().await?;
//! let endpoint = server.endpoint(); // https://127.0.0.1:PORT, for gatekeep-client
//! let agent_identity = pki.agent("this-host")?;
//! let token = server.add_reviewer("alice", &["sre".to_owned()]).await?;
//! server.serve(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod api;
mod audit_log;
mod audit_records;
pub mod auth;
pub mod certs;
pub mod config;
mod error;
pub mod failpoint;
mod fanout;
pub mod grants;
pub mod host_audit;
pub mod https;
mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod notify;
pub mod paths;
mod recovery;
mod reviewer;
pub mod rules;
mod server;
pub mod store;
pub mod web;

pub use config::ServerConfig;
pub use error::Error;
pub use server::{Server, ServerBuilder, add_reviewer};
