//! gatekeep's gRPC API: the wire types generated from `proto/gatekeep/v1/*.proto`
//! ([`v1`]), their validated domain forms ([`model`]), and the one place that converts
//! between them ([`convert`]), checking every field against [`limits`].
//!
//! The service and its clients both use the domain types, so a message that passes
//! [`convert`] on one side means the same thing on the other.

pub mod audit;
pub mod convert;
pub mod host_audit;
pub mod id;
pub mod limits;
pub mod model;

/// Generated prost messages and tonic clients/servers of `package gatekeep.v1`.
#[expect(
    clippy::pedantic,
    clippy::all,
    reason = "generated code, not ours to restyle"
)]
pub mod v1 {
    tonic::include_proto!("gatekeep.v1");
}

pub use convert::WireError;
pub use gatekeep_policy::GrantDuration;
