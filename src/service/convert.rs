//! Conversions between protobuf messages and domain types, with validation.
//! The one place where `pb` meets `lock`: everything a handler receives
//! passes through here before it reaches a store.

use crate::lock::{AcquireOutcome, AcquireSpec, Limits, LockError, LockInfo, LockKey, Token};
use crate::pb;

/// A validated Acquire: what to grant and how long to wait for it.
pub struct AcquireCall {
    /// What to grant.
    pub spec: AcquireSpec,
    /// How long to wait for it, 0 for one try.
    pub wait_ms: u32,
}

/// Validates every field of an Acquire request, and picks a fresh token.
pub fn acquire_request(req: pb::AcquireRequest, limits: &Limits) -> Result<AcquireCall, LockError> {
    match pb::LockMode::try_from(req.mode) {
        Ok(pb::LockMode::Unspecified | pb::LockMode::Exclusive) => {}
        // Shared holders are not served yet: refused rather than taken for
        // an exclusive lock, which a semaphore user would not expect.
        Ok(pb::LockMode::Shared) => {
            return Err(LockError::invalid(
                "mode",
                "LOCK_MODE_SHARED is not served by this server yet",
            ));
        }
        Err(_) => {
            return Err(LockError::invalid(
                "mode",
                format!("unknown lock mode {}", req.mode),
            ));
        }
    }
    Ok(AcquireCall {
        spec: AcquireSpec {
            key: limits.key(req.key)?,
            token: Token::generate(),
            ttl_ms: limits.ttl(req.ttl_ms)?,
            owner: limits.owner(req.owner)?,
            metadata: limits.metadata(req.metadata)?,
            request_id: limits.request_id(req.request_id)?,
        },
        wait_ms: limits.wait(req.wait_ms)?,
    })
}

/// Builds the reply to an Acquire that arrived at `arrival`.
/// `valid_for_ms` counts the lease's validity from the request's arrival
/// (so from the client's send time, which is earlier): the store set the
/// lease's expiry no earlier than `grant.at`, `valid_ms` ahead of it.
pub fn acquire_response(
    key: &LockKey,
    outcome: AcquireOutcome,
    arrival: std::time::Instant,
) -> pb::AcquireResponse {
    match outcome {
        AcquireOutcome::Acquired(grant) => {
            let waited = grant.at.saturating_duration_since(arrival).as_millis();
            let valid_for_ms = u32::try_from(waited)
                .unwrap_or(u32::MAX)
                .saturating_add(grant.valid_ms);
            pb::AcquireResponse {
                acquired: true,
                lease: Some(pb::Lease {
                    key: key.as_str().to_owned(),
                    token: grant.token.into_secret(),
                    fencing_token: grant.fencing_token,
                    ttl_ms: grant.ttl_ms,
                    valid_for_ms,
                }),
                retry_after_ms: 0,
            }
        }
        AcquireOutcome::Held { retry_after_ms } => pb::AcquireResponse {
            acquired: false,
            lease: None,
            retry_after_ms: retry_after_ms.max(1),
        },
    }
}

/// Validates a key and token pair (Release, Renew, KeepAlive).
pub fn key_and_token(
    key: String,
    token: String,
    limits: &Limits,
) -> Result<(LockKey, Token), LockError> {
    Ok((limits.key(key)?, Token::parse(token)?))
}

/// Builds the reply to a Describe; never carries a token.
pub fn describe_response(info: Option<LockInfo>) -> pb::DescribeResponse {
    match info {
        None => pb::DescribeResponse::default(),
        Some(info) => {
            let metadata: std::collections::HashMap<String, String> =
                info.metadata.entries().iter().cloned().collect();
            pb::DescribeResponse {
                held: true,
                holders: vec![pb::Holder {
                    owner: info.owner.clone(),
                    fencing_token: info.fencing_token,
                    ttl_ms: info.ttl_ms,
                    metadata: metadata.clone(),
                    mode: pb::LockMode::Exclusive.into(),
                }],
                owner: info.owner,
                fencing_token: info.fencing_token,
                ttl_ms: info.ttl_ms,
                metadata,
                mode: pb::LockMode::Exclusive.into(),
                shared_limit: 0,
            }
        }
    }
}
