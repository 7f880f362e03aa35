//! Errors of the decision service, and their one mapping to gRPC status codes.

use std::path::PathBuf;

use gatekeep_proto::{WireError, model::RequestState};
use uuid::Uuid;

use crate::store::StoreError;

/// Everything a call to the service can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message did not pass validation; nothing changed.
    #[error("invalid request: {source}")]
    Invalid {
        #[from]
        source: WireError,
    },
    /// A message is well formed but makes no sense (e.g. a grant duration for a denial).
    #[error("invalid request: {message}")]
    BadArgument { message: String },
    /// No request with this id (or not one this caller may see).
    #[error("no request `{id}`")]
    UnknownRequest { id: Uuid },
    /// No HTTP API route with this method and path.
    #[error("no api route `{route}`; see /api/v1/openapi.json")]
    UnknownRoute { route: String },
    /// No grant with this id.
    #[error("no grant `{id}`")]
    UnknownGrant { id: Uuid },
    /// No dead letter with this id (already retried, or never kept).
    #[error("no dead letter {id}; list them with `gatekeep notify dead-letters`")]
    UnknownDeadLetter { id: i64 },
    /// A dead letter that cannot be delivered again now.
    #[error("dead letter {id} cannot be retried: {message}")]
    NotReplayable { id: i64, message: String },
    /// The request already left `pending`.
    #[error("request `{id}` is already {state}")]
    NotPending { id: Uuid, state: RequestState },
    /// The grant was already revoked or expired.
    #[error("grant `{id}` is no longer active")]
    GrantInactive { id: Uuid },
    /// A request id was re-sent with different content (or by another host).
    #[error("request id `{id}` is already used by a different request")]
    IdReused { id: Uuid },
    /// A request id prefix names no single request.
    #[error("{source}")]
    Prefix {
        #[from]
        source: gatekeep_proto::id::PrefixError,
    },
    /// The reviewer already approved this request: the same reviewer twice does not count
    /// twice towards the quorum.
    #[error("`{reviewer}` already approved request `{id}`; another reviewer must approve")]
    AlreadyVoted { id: Uuid, reviewer: String },
    /// The policy wants approvals to say why, and this one says nothing.
    #[error(
        "policy `{policy}` requires a reason for approvals; give one (`gatekeep review approve ID --reason \"...\"`, or the console's reason field)"
    )]
    ReasonRequired { policy: String },
    /// The policy is not one the service has loaded.
    #[error("policy `{policy}` is not loaded by the decision service")]
    UnknownPolicy { policy: String },
    /// A batch of host audit records the service cannot take as it is (out of order, a gap).
    #[error("{message}")]
    ShipRefused { message: String },
    /// The caller presented no credentials, or unknown ones.
    #[error("{message}")]
    Unauthenticated { message: String },
    /// The caller is known but may not do this.
    #[error("{message}")]
    PermissionDenied { message: String },
    /// Storage failed.
    #[error("storage failed")]
    Store {
        #[from]
        source: StoreError,
    },
    /// The audit log refused a record.
    #[error("audit log failed")]
    Audit {
        #[source]
        source: gatekeep_audit::AuditError,
    },
    /// The audit log's hash chain or its guards do not verify.
    #[error("{source}")]
    AuditTampered {
        #[source]
        source: gatekeep_audit::AuditError,
    },
    /// Approving for this policy needs a recent sign-in at the identity provider.
    #[error(
        "policy `{policy}` needs a sign-in at the identity provider at most {max_age} s old to approve; sign in again (the console offers it), then approve"
    )]
    ReauthRequired { policy: String, max_age: u64 },
    /// The OpenID provider could not be used (unreachable, misconfigured, unreadable answer).
    #[error("openid connect: {message}")]
    Oidc { message: String },
    /// The `[notify]` section cannot be used (a secret, a route, a URL).
    #[error("invalid [notify] config: {message}")]
    Notify { message: String },
    /// The service is shutting down.
    #[error("the decision service is shutting down")]
    ShuttingDown,
    /// Configuration could not be read.
    #[error("failed to read config `{}`", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Configuration is not valid TOML for the service.
    #[error("invalid config `{}`: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A TLS file could not be read.
    #[error("failed to read `{}`", path.display())]
    ReadTls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The policies could not be loaded.
    #[error("failed to load policies")]
    Policy {
        #[source]
        source: gatekeep_policy::PolicyError,
    },
    /// Certificates could not be made or parsed.
    #[error("certificate error: {message}")]
    Certs { message: String },
    /// The listen address could not be bound.
    #[error("failed to listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("grpc transport failed")]
    Transport {
        #[source]
        source: tonic::transport::Error,
    },
}

impl Error {
    pub(crate) fn permission(message: impl Into<String>) -> Self {
        Error::PermissionDenied {
            message: message.into(),
        }
    }

    pub(crate) fn unauthenticated(message: impl Into<String>) -> Self {
        Error::Unauthenticated {
            message: message.into(),
        }
    }

    /// The gRPC code this error maps to.
    #[must_use]
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Invalid { .. } | Error::BadArgument { .. } | Error::ReasonRequired { .. } => {
                Code::InvalidArgument
            }
            Error::UnknownRequest { .. }
            | Error::UnknownGrant { .. }
            | Error::UnknownDeadLetter { .. }
            | Error::UnknownRoute { .. } => Code::NotFound,
            Error::NotPending { .. }
            | Error::NotReplayable { .. }
            | Error::GrantInactive { .. }
            | Error::UnknownPolicy { .. }
            | Error::ShipRefused { .. } => Code::FailedPrecondition,
            Error::IdReused { .. } | Error::AlreadyVoted { .. } => Code::AlreadyExists,
            Error::Prefix { source } => match source {
                gatekeep_proto::id::PrefixError::Invalid { .. } => Code::InvalidArgument,
                gatekeep_proto::id::PrefixError::Unknown { .. } => Code::NotFound,
                gatekeep_proto::id::PrefixError::Ambiguous { .. } => Code::FailedPrecondition,
            },
            Error::Unauthenticated { .. } | Error::ReauthRequired { .. } => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::ShuttingDown | Error::Oidc { .. } => Code::Unavailable,
            Error::AuditTampered { .. } => Code::DataLoss,
            Error::Store { .. }
            | Error::Audit { .. }
            | Error::ReadConfig { .. }
            | Error::Config { .. }
            | Error::Notify { .. }
            | Error::ReadTls { .. }
            | Error::Policy { .. }
            | Error::Certs { .. }
            | Error::Bind { .. }
            | Error::Transport { .. } => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        if code == tonic::Code::Internal {
            // Internal details stay in the service's log.
            tracing::error!(error = %error, source = ?std::error::Error::source(&error), "internal error");
            return tonic::Status::internal("internal error in the decision service; see its log");
        }
        tonic::Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_precise_codes() {
        let id = Uuid::nil();
        let cases = [
            (
                Error::from(WireError::Missing {
                    field: "request_id".into(),
                }),
                tonic::Code::InvalidArgument,
                "invalid request: `request_id` is missing",
            ),
            (
                Error::UnknownRequest { id },
                tonic::Code::NotFound,
                "no request `00000000-0000-0000-0000-000000000000`",
            ),
            (
                Error::NotPending {
                    id,
                    state: RequestState::Approved,
                },
                tonic::Code::FailedPrecondition,
                "request `00000000-0000-0000-0000-000000000000` is already approved",
            ),
            (
                Error::AlreadyVoted {
                    id,
                    reviewer: "bob".into(),
                },
                tonic::Code::AlreadyExists,
                "`bob` already approved request `00000000-0000-0000-0000-000000000000`; another reviewer must approve",
            ),
            (
                Error::permission("nope"),
                tonic::Code::PermissionDenied,
                "nope",
            ),
        ];
        for (error, code, message) in cases {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
        let status = tonic::Status::from(Error::Store {
            source: StoreError::Closed,
        });
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("closed"), "no internals leak");
    }
}
