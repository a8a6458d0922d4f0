//! The one error type of the domain, and its mapping to gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong with a lock operation. Contention is not an
/// error (it is [`super::AcquireOutcome::Held`]).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LockError {
    /// A request field is malformed or outside a configured bound.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The proto field name, so a client can tell which one.
        field: &'static str,
        /// What is wrong, with the bound when there is one.
        reason: String,
    },
    /// The store could not be reached or did not answer within the store
    /// timeout. The operation may or may not have happened.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A configured limit (streams, locks per stream, waiters) was hit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's deadline passed before the operation completed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The server is shutting down; retry on another server.
    #[error("server is shutting down")]
    ShuttingDown,
    /// No or unknown credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Credentials valid, but not for this key.
    #[error("{0}")]
    PermissionDenied(String),
    /// The store answered something this code does not understand: a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl LockError {
    /// Shorthand for [`LockError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            // Not retryable as is: the request must change.
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            // Retryable with backoff, on this or another server.
            Self::Unavailable(_) | Self::ShuttingDown => Code::Unavailable,
            // Retryable once the caller holds fewer resources.
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            // The caller's own deadline: retry only with a new one.
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            // Not retryable without new credentials.
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            // A bug; retrying may or may not help.
            Self::Internal(_) => Code::Internal,
        }
    }

    /// A short, fixed label for metrics and logs (low cardinality).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::Unavailable(_) => "unavailable",
            Self::ResourceExhausted(_) => "resource_exhausted",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::ShuttingDown => "shutting_down",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<LockError> for Status {
    fn from(err: LockError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}
