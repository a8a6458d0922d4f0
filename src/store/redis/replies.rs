//! What each script answers, parsed into domain types. Anything else is a
//! bug, reported as INTERNAL.

use std::time::Instant;

use fred::prelude::*;

use super::errors::script_error;
use crate::lock::{
    AcquireOutcome, Grant, HolderInfo, LockError, LockInfo, Metadata, Mode, Token, remaining_ms,
};

/// Parses the acquire script's reply; `sent` is when the call was sent.
pub(super) fn parse_acquire(reply: Value, sent: Instant) -> Result<AcquireOutcome, LockError> {
    let items = array(reply)?;
    match items.first().and_then(int) {
        Some(1) if items.len() == 5 => {
            let token = text(&items[1]).ok_or_else(|| unexpected(&items[1]))?;
            let fence = int(&items[2]).ok_or_else(|| unexpected(&items[2]))?;
            let ttl = int(&items[3]).ok_or_else(|| unexpected(&items[3]))?;
            let pttl = int(&items[4]).ok_or_else(|| unexpected(&items[4]))?;
            Ok(AcquireOutcome::Acquired(Grant {
                token: Token::parse(token).map_err(|_| unexpected(&items[1]))?,
                fencing_token: u64::try_from(fence).map_err(|_| unexpected(&items[2]))?,
                ttl_ms: ttl_u32(ttl),
                at: sent,
                valid_ms: ttl_u32(pttl),
            }))
        }
        Some(-9) => Err(script_error(&items)),
        Some(0) if items.len() == 2 => {
            let pttl = int(&items[1]).ok_or_else(|| unexpected(&items[1]))?;
            Ok(AcquireOutcome::Held {
                retry_after_ms: remaining_ms(pttl),
            })
        }
        // Retryable: a replica may come back or be attached.
        Some(2) if items.len() == 2 => Err(LockError::Unavailable(format!(
            "not granted: {} replica(s) online, fewer than --min-replica-acks requires",
            int(&items[1]).unwrap_or(0)
        ))),
        _ => Err(LockError::Internal("malformed acquire reply".into())),
    }
}

/// Parses the shared acquire script's reply: the acquire script's, or
/// `{3, limit}` when the holders' limit is not `asked`.
pub(super) fn parse_acquire_shared(
    reply: Value,
    sent: Instant,
    asked: u32,
) -> Result<AcquireOutcome, LockError> {
    if let Value::Array(items) = &reply {
        if items.len() == 2 && items.first().and_then(int) == Some(3) {
            let holders = int(&items[1]).ok_or_else(|| unexpected(&items[1]))?;
            let holders = u32::try_from(holders).map_err(|_| unexpected(&items[1]))?;
            return Err(LockError::limit_mismatch(holders, asked));
        }
    }
    parse_acquire(reply, sent)
}

/// The describe script's reply for a lock held shared: `{2, limit, then
/// owner, fence, pttl, metadata per holder}`, holders oldest grant first.
pub(super) fn parse_describe_shared(items: &[Value]) -> Result<Option<LockInfo>, LockError> {
    let limit = items
        .get(1)
        .and_then(int)
        .ok_or_else(|| LockError::Internal("malformed describe reply: no shared limit".into()))?;
    let rest = items.get(2..).unwrap_or_default();
    if rest.len() % 4 != 0 {
        return Err(LockError::Internal("malformed describe reply".into()));
    }
    let mut holders = rest
        .chunks_exact(4)
        .map(|h| {
            let owner = text(&h[0]).ok_or_else(|| unexpected(&h[0]))?;
            let fence = int(&h[1]).ok_or_else(|| unexpected(&h[1]))?;
            let pttl = int(&h[2]).ok_or_else(|| unexpected(&h[2]))?;
            let meta = text(&h[3]).ok_or_else(|| unexpected(&h[3]))?;
            Ok(HolderInfo {
                owner,
                fencing_token: u64::try_from(fence).map_err(|_| unexpected(&h[1]))?,
                ttl_ms: remaining_ms(pttl),
                metadata: Metadata::decode(&meta)
                    .ok_or_else(|| LockError::Internal("corrupt metadata in Redis".into()))?,
            })
        })
        .collect::<Result<Vec<_>, LockError>>()?;
    holders.sort_by_key(|h| h.fencing_token);
    if holders.is_empty() {
        // Every holder's lease ran out just now.
        return Ok(None);
    }
    Ok(Some(LockInfo {
        mode: Mode::Shared {
            limit: u32::try_from(limit).map_err(|_| unexpected(&items[1]))?,
        },
        holders,
    }))
}

/// The fencing token of a shared holder's release that a handoff call
/// made instead of a handoff (`{3, fence}`), if it released.
pub(super) fn handoff_shared_release(reply: &Value) -> Option<i64> {
    let Value::Array(items) = reply else {
        return None;
    };
    if items.len() != 2 || items.first().and_then(int) != Some(3) {
        return None;
    }
    int(&items[1]).filter(|f| *f > 0)
}

pub(super) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::Double(d) => Some(*d as i64),
        Value::String(s) => s.parse().ok(),
        Value::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => String::from_utf8(b.to_vec()).ok(),
        Value::Integer(i) => Some(i.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

pub(super) fn array(v: Value) -> Result<Vec<Value>, LockError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(&other)),
    }
}

pub(super) fn unexpected(v: &Value) -> LockError {
    LockError::Internal(format!("unexpected script reply of kind {}", v.kind()))
}

pub(super) fn ttl_u32(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}

/// Parses the handoff script's reply: `(released, grant to next)`.
pub(super) fn parse_handoff(
    reply: Value,
    next: &Token,
    sent: Instant,
) -> Result<(bool, Option<Grant>), LockError> {
    let items = array(reply)?;
    match items.first().and_then(int) {
        Some(0) => Ok((false, None)),
        // Released before: a retried Release, nothing handed over.
        Some(2) => Ok((true, None)),
        // A shared holder's release (its fence, -1 released before, 0 not
        // held): nothing handed over.
        Some(3) if items.len() == 2 => Ok((int(&items[1]).is_some_and(|r| r != 0), None)),
        Some(1) if items.len() == 5 => {
            // The grant handed over was held until now (0: a resent handoff).
            if let Some(released) = int(&items[1]).filter(|f| *f > 0) {
                crate::metrics::released_after(released.unsigned_abs());
            }
            let fence = int(&items[2]).ok_or_else(|| unexpected(&items[2]))?;
            let ttl = int(&items[3]).ok_or_else(|| unexpected(&items[3]))?;
            let pttl = int(&items[4]).ok_or_else(|| unexpected(&items[4]))?;
            Ok((
                true,
                Some(Grant {
                    token: next.clone(),
                    fencing_token: u64::try_from(fence).map_err(|_| unexpected(&items[2]))?,
                    ttl_ms: ttl_u32(ttl),
                    at: sent,
                    valid_ms: ttl_u32(pttl),
                }),
            ))
        }
        _ => Err(LockError::Internal("malformed handoff reply".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(v: &[i64]) -> Vec<Value> {
        v.iter().map(|i| Value::Integer(*i)).collect()
    }

    #[test]
    fn acquire_replies() {
        let sent = Instant::now();
        let token = "0123456789abcdef0123456789abcdef";
        let granted = Value::Array(vec![
            Value::Integer(1),
            Value::from(token),
            Value::Integer(1_700_000_000_000_001),
            Value::Integer(30_000),
            Value::Integer(12_345),
        ]);
        let AcquireOutcome::Acquired(grant) = parse_acquire(granted, sent).unwrap() else {
            panic!("granted")
        };
        assert_eq!(grant.token.expose(), token);
        assert_eq!(
            (grant.fencing_token, grant.ttl_ms, grant.valid_ms),
            (1_700_000_000_000_001, 30_000, 12_345)
        );
        assert_eq!(grant.at, sent);
        assert_eq!(
            parse_acquire(Value::Array(ints(&[0, 0])), sent).unwrap(),
            AcquireOutcome::Held { retry_after_ms: 1 },
            "a held lock always says to retry after at least 1 ms"
        );
        let short = parse_acquire(Value::Array(ints(&[2, 0])), sent).unwrap_err();
        assert_eq!(short.code(), tonic::Code::Unavailable);
        let oom = Value::Array(vec![
            Value::Integer(-9),
            Value::from("OOM command not allowed when used memory > 'maxmemory'."),
        ]);
        let err = parse_acquire(oom, sent).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(!err.to_string().contains("maxmemory"), "{err}");
        for bad in [
            Value::Integer(1),
            Value::Array(ints(&[1, 2, 3, 4])),
            Value::Array(ints(&[7])),
            Value::Array(vec![
                Value::Integer(1),
                Value::from(""),
                Value::Integer(-1),
                Value::Integer(1),
                Value::Integer(1),
            ]),
        ] {
            let err = parse_acquire(bad, sent).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Internal, "{err}");
        }
    }

    #[test]
    fn handoff_replies() {
        let sent = Instant::now();
        let next = Token::generate();
        assert_eq!(
            parse_handoff(Value::Array(ints(&[0])), &next, sent).unwrap(),
            (false, None)
        );
        let (released, grant) =
            parse_handoff(Value::Array(ints(&[1, 5, 6, 1000, 1000])), &next, sent).unwrap();
        let grant = grant.expect("handed over");
        assert!(released);
        assert_eq!((grant.fencing_token, grant.token), (6, next.clone()));
        let err = parse_handoff(Value::Array(ints(&[1, 5, 6])), &next, sent).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        // A shared holder's release instead of a handoff.
        let shared = Value::Array(ints(&[3, 77]));
        assert_eq!(handoff_shared_release(&shared), Some(77));
        assert_eq!(parse_handoff(shared, &next, sent).unwrap(), (true, None));
        let before = Value::Array(ints(&[3, -1]));
        assert_eq!(handoff_shared_release(&before), None);
        assert_eq!(parse_handoff(before, &next, sent).unwrap(), (true, None));
        assert_eq!(
            parse_handoff(Value::Array(ints(&[3, 0])), &next, sent).unwrap(),
            (false, None)
        );
    }

    #[test]
    fn shared_replies() {
        let sent = Instant::now();
        let err = parse_acquire_shared(Value::Array(ints(&[3, 2])), sent, 5).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("shared_limit 5") && err.to_string().contains('2'));
        assert_eq!(
            parse_acquire_shared(Value::Array(ints(&[0, 40])), sent, 5).unwrap(),
            AcquireOutcome::Held { retry_after_ms: 40 }
        );
        let described = parse_describe_shared(&[
            Value::Integer(2),
            Value::Integer(4),
            Value::from("b"),
            Value::Integer(9),
            Value::Integer(100),
            Value::from(""),
            Value::from("a"),
            Value::Integer(8),
            Value::Integer(200),
            Value::from(""),
        ])
        .unwrap()
        .expect("held");
        assert_eq!(described.mode, Mode::Shared { limit: 4 });
        let owners: Vec<&str> = described.holders.iter().map(|h| h.owner.as_str()).collect();
        assert_eq!(owners, ["a", "b"], "oldest grant first");
        assert_eq!(parse_describe_shared(&ints(&[2, 0])).unwrap(), None);
    }

    #[test]
    fn values() {
        assert_eq!(int(&Value::from("42")), Some(42));
        assert_eq!(int(&Value::Double(3.0)), Some(3));
        assert_eq!(int(&Value::Null), None);
        assert_eq!(text(&Value::Null), Some(String::new()));
        assert_eq!(ttl_u32(-5), 0);
        assert_eq!(ttl_u32(i64::MAX), u32::MAX);
    }
}
