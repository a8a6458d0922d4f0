//! The one error type of the domain, and its mapping to gRPC status codes
//! with rich details (`google.rpc.BadRequest`, `ErrorInfo`, `RetryInfo` in
//! `grpc-status-details-bin`; the Connect protocol carries the same details).

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every error Leasehold reports.
pub const ERROR_DOMAIN: &str = "leasehold";

/// How long a client should wait before retrying a call that failed because
/// the store could not be reached (`RetryInfo`); a hint, the client's own
/// backoff decides.
pub const STORE_RETRY_DELAY: Duration = Duration::from_millis(200);

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
    /// The request contradicts the lock's current state: a SHARED Acquire
    /// whose `shared_limit` differs from the one its holders set.
    #[error("{0}")]
    FailedPrecondition(String),
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

    /// A SHARED Acquire whose `shared_limit` (`asked`) is not the one the
    /// current holders set (`holders`).
    pub fn limit_mismatch(holders: u32, asked: u32) -> Self {
        Self::FailedPrecondition(format!(
            "shared_limit {asked} differs from the current holders' shared_limit {holders}"
        ))
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
            // Not retryable as is: retry once the holders are gone, or
            // with their limit.
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
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
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::Internal(_) => "internal",
        }
    }

    /// The stable `ErrorInfo.reason` of this error: what a program matches
    /// on, where the message is for people and may be reworded.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "INVALID_FIELD",
            Self::Unavailable(_) => "STORE_UNAVAILABLE",
            Self::ResourceExhausted(_) => "QUOTA_EXCEEDED",
            Self::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Self::ShuttingDown => "SERVER_SHUTTING_DOWN",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::PermissionDenied(_) => "KEY_OUT_OF_SCOPE",
            Self::FailedPrecondition(_) => "SHARED_LIMIT_MISMATCH",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// The details a client can act on: which field is wrong, a stable
    /// reason, and when retrying helps, how soon.
    pub fn details(&self) -> ErrorDetails {
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        match self {
            Self::InvalidArgument { field, reason } => {
                details.add_bad_request_violation(*field, reason.clone());
                metadata.insert("field".to_string(), (*field).to_string());
            }
            // Retrying helps: the store may be back, or another server up.
            Self::Unavailable(_) => {
                details.set_retry_info(Some(STORE_RETRY_DELAY));
            }
            Self::ShuttingDown => {
                details.set_retry_info(Some(Duration::ZERO));
            }
            _ => {}
        }
        details.set_error_info(self.reason(), ERROR_DOMAIN, metadata);
        details
    }
}

impl From<LockError> for Status {
    fn from(err: LockError) -> Self {
        Status::with_error_details(err.code(), err.to_string(), err.details())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_details_and_keep_their_message() {
        let status = Status::from(LockError::invalid("ttl_ms", "must be at most 3600000"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "ttl_ms: must be at most 3600000");
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "ttl_ms");
        assert_eq!(violations[0].description, "must be at most 3600000");
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_FIELD", ERROR_DOMAIN)
        );

        let status = Status::from(LockError::Unavailable("connection refused".into()));
        assert_eq!(status.message(), "store unavailable: connection refused");
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(STORE_RETRY_DELAY)
        );
        assert_eq!(
            details.error_info().map(|i| i.reason.as_str()),
            Some("STORE_UNAVAILABLE")
        );

        let status = Status::from(LockError::PermissionDenied("key \"a\" is not yours".into()));
        let details = status.get_error_details();
        assert!(details.retry_info().is_none() && details.bad_request().is_none());
        assert_eq!(
            details.error_info().map(|i| i.reason.as_str()),
            Some("KEY_OUT_OF_SCOPE")
        );
    }
}
