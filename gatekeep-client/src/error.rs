//! Errors of the clients.

/// What an [`AgentLink`](crate::AgentLink) call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The configuration cannot work (bad endpoint, unreadable certificate).
    #[error("invalid agent link config: {message}")]
    Config { message: String },
    /// The service refused the request (invalid, id reused...); it will not be decided.
    #[error("the decision service refused request `{request_id}`: {message} ({code:?})")]
    Rejected {
        request_id: String,
        code: tonic::Code,
        message: String,
    },
    /// The request was withdrawn before a decision arrived.
    #[error("request `{request_id}` was withdrawn")]
    Withdrawn { request_id: String },
    /// The link was shut down.
    #[error("the agent link is shut down")]
    Closed,
}

/// What a [`ReviewClient`](crate::ReviewClient) call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work.
    #[error("invalid client config: {message}")]
    Config { message: String },
    /// The service could not be reached.
    #[error("cannot reach the decision service at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The service answered with an error status.
    #[error("{}", .status.message())]
    Status {
        #[source]
        status: tonic::Status,
    },
    /// The service answered something that is not a valid message.
    #[error("invalid answer from the decision service")]
    InvalidAnswer {
        #[source]
        source: gatekeep_proto::WireError,
    },
}

impl ClientError {
    /// The gRPC code of a [`ClientError::Status`] (`Unavailable` for a connect failure).
    #[must_use]
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status { status } => Some(status.code()),
            ClientError::Connect { .. } => Some(tonic::Code::Unavailable),
            ClientError::Config { .. } | ClientError::InvalidAnswer { .. } => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status { status }
    }
}

impl From<gatekeep_proto::WireError> for ClientError {
    fn from(source: gatekeep_proto::WireError) -> Self {
        ClientError::InvalidAnswer { source }
    }
}
