//! Errors the agent returns to its caller: each carries a gRPC status code so
//! the caller can tell a bad request from a missing container from a failure
//! of the agent itself, and a message that names the problem.

use ttrpc::{get_status, Code};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::NotFound(_) => Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::Internal(_) => Code::INTERNAL,
        }
    }

    /// Wraps a lower-level failure with what the agent was doing.
    pub fn internal(what: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        AgentError::Internal(format!("{what}: {err}"))
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(get_status(e.code(), e.to_string()))
    }
}

impl From<hearth_oci::SpecError> for AgentError {
    fn from(e: hearth_oci::SpecError) -> Self {
        AgentError::InvalidArgument(e.to_string())
    }
}
