//! Redis errors mapped to what a client can act on, classified by kind
//! (and by Redis's error prefix), never by a client matching our text.

use fred::prelude::*;

use super::replies::{int, text};
use crate::lock::LockError;

/// What a client is told when Redis moved a slot (the routing table is
/// stale): how [`is_redirect`] knows such an error.
pub(super) const REDIRECTED: &str = "the Redis Cluster slot moved; retry";

/// Whether `result` failed because a Redis Cluster slot moved.
pub(super) fn is_redirect<T>(result: &Result<T, LockError>) -> bool {
    matches!(result, Err(LockError::Unavailable(e)) if e == REDIRECTED)
}

/// Maps a fred error to what a client can act on. Clients get a fixed,
/// generic message per kind; Redis's own text (which names scripts, lines
/// and memory settings) goes only to the log.
pub(super) fn map_error(e: &Error) -> LockError {
    classify(e.kind(), e.details())
}

pub(super) fn classify(kind: &ErrorKind, details: &str) -> LockError {
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| details.starts_with(p));
    match kind {
        // Connection loss, failover, timeouts, back-pressure: retryable.
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Cluster
        | ErrorKind::Routing
        | ErrorKind::Backpressure
        | ErrorKind::Sentinel
        | ErrorKind::Tls => {
            tracing::debug!(kind = ?kind, details, "Redis call failed");
            LockError::Unavailable(format!("no answer from Redis ({kind:?}); retry"))
        }
        // Credentials refused: retryable once an operator fixes them.
        ErrorKind::Auth => {
            tracing::warn!(details, "Redis refused our credentials");
            LockError::Unavailable("Redis refused the server's credentials".into())
        }
        // The slot moved: retryable once the routing table is refreshed.
        _ if starts(&["MOVED", "ASK "]) => LockError::Unavailable(REDIRECTED.into()),
        // Transient server states during failover or load: retryable.
        _ if starts(&[
            "LOADING",
            "MASTERDOWN",
            "TRYAGAIN",
            "CLUSTERDOWN",
            "READONLY",
            "BUSY",
            "NOREPLICAS",
        ]) =>
        {
            tracing::debug!(details, "Redis is not serving writes right now");
            LockError::Unavailable("Redis is loading, failing over or busy; retry".into())
        }
        // maxmemory with noeviction: retryable once memory is freed (a
        // release still works: it only deletes).
        _ if starts(&["OOM"]) || details.contains("OOM command not allowed") => {
            tracing::warn!(details, "Redis is out of memory");
            LockError::ResourceExhausted("the lock store is out of memory; retry later".into())
        }
        // Anything else is a reply we did not expect: a bug.
        _ => {
            tracing::warn!(details, "unexpected Redis error");
            LockError::Internal("unexpected reply from the lock store".into())
        }
    }
}

/// One operation's reply from a batch: an error if the operation failed
/// there (`{-9, message}`), the reply otherwise.
pub(super) fn op_result(reply: Value) -> Result<Value, LockError> {
    match &reply {
        Value::Array(items) if items.first().and_then(int) == Some(-9) => Err(script_error(items)),
        _ => Ok(reply),
    }
}

/// The error of one operation that failed inside a batch or script
/// (`{-9, message}`, see batch.lua).
pub(super) fn script_error(items: &[Value]) -> LockError {
    let message = items.get(1).and_then(text).unwrap_or_default();
    classify(&ErrorKind::Unknown, &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_errors_map_to_codes_with_our_own_words() {
        use tonic::Code;
        let cases = [
            (ErrorKind::IO, "Connection reset by peer", Code::Unavailable),
            (ErrorKind::Timeout, "timed out", Code::Unavailable),
            (
                ErrorKind::Auth,
                "WRONGPASS invalid username-password pair",
                Code::Unavailable,
            ),
            (
                ErrorKind::Unknown,
                "LOADING Redis is loading the dataset in memory",
                Code::Unavailable,
            ),
            (
                ErrorKind::Unknown,
                "READONLY You can't write against a read only replica.",
                Code::Unavailable,
            ),
            (
                ErrorKind::Unknown,
                "MOVED 3999 127.0.0.1:6381",
                Code::Unavailable,
            ),
            (
                ErrorKind::Unknown,
                "OOM command not allowed when used memory > 'maxmemory'. script: 76249b, on @user_script:11.",
                Code::ResourceExhausted,
            ),
            (
                ErrorKind::Unknown,
                "ERR something we never expected",
                Code::Internal,
            ),
        ];
        for (kind, details, code) in cases {
            let err = classify(&kind, details);
            assert_eq!(err.code(), code, "{details}");
            for redis_text in [
                "WRONGPASS",
                "maxmemory",
                "user_script",
                "127.0.0.1",
                "never expected",
            ] {
                assert!(!err.to_string().contains(redis_text), "{err}");
            }
        }
        let moved: Result<(), LockError> = Err(classify(&ErrorKind::Unknown, "ASK 1 127.0.0.1:1"));
        assert!(is_redirect(&moved));
        let other: Result<(), LockError> = Err(classify(&ErrorKind::IO, "gone"));
        assert!(!is_redirect(&other));
    }

    #[test]
    fn one_failed_operation_in_a_batch_is_its_own_error() {
        let ok = Value::Integer(7);
        assert_eq!(op_result(ok.clone()).unwrap(), ok);
        let failed = Value::Array(vec![
            Value::Integer(-9),
            Value::from("OOM command not allowed"),
        ]);
        assert_eq!(
            op_result(failed).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        let granted = Value::Array(vec![Value::Integer(1), Value::from("t")]);
        assert!(op_result(granted).is_ok());
    }
}
