//! The SDK's one error type, and why a held lock stops being held.
//!
//! Every variant prints as one line a person can act on: the CLI prints
//! them as they are, so nothing here may contain a debug dump or a newline.

use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};

/// Everything a Leasehold call can fail with. Contention is an error only
/// once the caller's wait is over ([`Error::NotAcquired`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An endpoint is not a usable `http://host:port` URL. Fix the
    /// configuration; retrying cannot help.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No endpoint answered (or every one answered `UNAVAILABLE`) for as
    /// long as the client retries. The operation may or may not have
    /// happened on a server that went away mid-call.
    #[error("Leasehold unavailable at {endpoints} (retried for {}): {cause}", humantime::format_duration(*retried_for))]
    Unavailable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// How long the client kept retrying.
        retried_for: Duration,
        /// The last failure, in one line.
        cause: String,
    },
    /// The server rejected a field (a malformed key, a TTL outside its
    /// bounds, too much metadata). The message names the field.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No or unknown credentials.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials that do not allow this call on this key.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A server limit was hit (waiters, streams, locks per stream).
    #[error("server limit reached: {0}")]
    ResourceExhausted(String),
    /// A call did not finish within its deadline.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// Another client held the lock for the whole wait.
    #[error("lock {key:?} is held by another client: not acquired within {} (the holder's lease has {} left)", humantime::format_duration(*waited), humantime::format_duration(*retry_after))]
    NotAcquired {
        /// The lock.
        key: String,
        /// How long this call waited.
        waited: Duration,
        /// The holder's remaining TTL when the server last looked.
        retry_after: Duration,
    },
    /// The wait ended while another [`LockGuard`](super::LockGuard) of this
    /// same [`Client`](super::Client) (or of a clone of it) held the lock.
    /// Locks are not re-entrant: a client that holds a key gets it again
    /// only once that guard is released or dropped.
    #[error("lock {key:?} is held by this same client (locks are not re-entrant: release the other guard first): not acquired within {}", humantime::format_duration(*waited))]
    HeldByThisClient {
        /// The lock.
        key: String,
        /// How long this call waited.
        waited: Duration,
    },
    /// The lock was lost while the caller's work ran (see [`LostReason`]).
    #[error("lock {key:?} was lost: {reason}")]
    Lost {
        /// The lock.
        key: String,
        /// Why it is no longer held.
        reason: LostReason,
    },
    /// The server answered something that breaks the protocol (a grant
    /// without a lease, say): a bug on one side.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// Any other gRPC status.
    #[error("the server answered {code:?}: {message}")]
    Rpc {
        /// The gRPC code, re-exported as [`leasehold::client::Code`](super::Code)
        /// so that matching on it needs no tonic of your own.
        code: Code,
        /// The server's message, on one line.
        message: String,
    },
}

impl Error {
    /// Maps a status that is final (not retried any more) to an error.
    pub(crate) fn from_status(status: &Status) -> Self {
        let message = one_line(status.message());
        match status.code() {
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::Unauthenticated => Self::Unauthenticated(message),
            Code::PermissionDenied => Self::PermissionDenied(message),
            Code::ResourceExhausted => Self::ResourceExhausted(message),
            Code::DeadlineExceeded => Self::DeadlineExceeded(message),
            code => Self::Rpc { code, message },
        }
    }
}

/// Why a [`LockGuard`](super::LockGuard) no longer holds its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// Its deadline passed without a successful renewal: the TTL counted
    /// from the send time of the last renewal answered alive (or the
    /// grant's `valid_for_ms` from the Acquire's send time), on the boot
    /// clock. The server may be
    /// unreachable and the lease may in fact still exist, but another
    /// client may already hold the lock, so the client assumes the worst.
    Expired,
    /// The server answered that this lease no longer holds the lock: it
    /// expired, or another client took it.
    NotHeld,
    /// The client gave up on a KeepAlive stream that stopped answering
    /// before the lock could be moved to a new one; the server releases
    /// what is attached to a stream when it ends, so the lock may be free.
    Abandoned,
    /// This client released it.
    Released,
    /// The client's keepalive task stopped (its runtime is shutting down).
    ClientClosed,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Expired => "no renewal succeeded within its TTL",
            Self::NotHeld => "the server says this lease no longer holds it (it expired or another client took it)",
            Self::Abandoned => "its KeepAlive stream stopped answering and was given up before the lock moved to a new one",
            Self::Released => "it was released",
            Self::ClientClosed => "the client stopped keeping it alive",
        })
    }
}

/// Whether a failed call should be retried, on the next endpoint: the
/// server said UNAVAILABLE, or the connection failed under the call.
pub(crate) fn retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        // Made by tonic from a transport error (a server-sent status has no
        // source): the connection broke mid-call.
        Code::Unknown | Code::Internal | Code::Cancelled => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// The most useful one-line description of a failed call: the innermost
/// cause (e.g. "Connection refused (os error 111)") rather than tonic's
/// wrappers, or the server's own message.
pub(crate) fn cause(status: &Status) -> String {
    let mut deepest: Option<&(dyn std::error::Error + 'static)> = None;
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        deepest = Some(e);
        next = e.source();
    }
    let text = match deepest {
        Some(e) => e.to_string(),
        None if status.message().is_empty() => format!("{:?}", status.code()),
        None => status.message().to_string(),
    };
    one_line(&text)
}

/// Collapses whitespace runs (newlines included) into single spaces.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_one_line_errors() {
        let e = Error::from_status(&Status::invalid_argument("key: must\nnot be empty"));
        assert_eq!(e, Error::InvalidArgument("key: must not be empty".into()));
        assert_eq!(e.to_string(), "invalid argument: key: must not be empty");
        assert!(matches!(
            Error::from_status(&Status::permission_denied("no")),
            Error::PermissionDenied(_)
        ));
        assert!(matches!(
            Error::from_status(&Status::unauthenticated("who")),
            Error::Unauthenticated(_)
        ));
        let e = Error::NotAcquired {
            key: "k".into(),
            waited: Duration::from_millis(300),
            retry_after: Duration::from_millis(1200),
        };
        assert_eq!(
            e.to_string(),
            "lock \"k\" is held by another client: not acquired within 300ms (the holder's lease has 1s 200ms left)"
        );
    }

    #[test]
    fn only_unavailable_and_transport_failures_are_retried() {
        assert!(retryable(&Status::unavailable("x")));
        assert!(!retryable(&Status::unknown("server-sent")));
        assert!(!retryable(&Status::invalid_argument("x")));
        assert!(!retryable(&Status::permission_denied("x")));
        let transport = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert_eq!(cause(&transport), "reset");
    }
}
