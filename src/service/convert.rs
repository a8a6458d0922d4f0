//! Conversions between protobuf messages and domain types, with validation.
//! The one place where `pb` meets `lock`: everything a handler receives
//! passes through here before it reaches a store.

use crate::lock::{
    AcquireOutcome, AcquireSpec, HolderInfo, Limits, LockError, LockInfo, LockKey, Mode, Token,
};
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
    let mode = match pb::LockMode::try_from(req.mode) {
        Ok(pb::LockMode::Unspecified | pb::LockMode::Exclusive) => {
            if req.shared_limit != 0 {
                return Err(LockError::invalid(
                    "shared_limit",
                    "is only for LOCK_MODE_SHARED; leave it 0 for an exclusive lock",
                ));
            }
            Mode::Exclusive
        }
        Ok(pb::LockMode::Shared) => Mode::Shared {
            limit: req.shared_limit,
        },
        Err(_) => {
            return Err(LockError::invalid(
                "mode",
                format!("unknown lock mode {}", req.mode),
            ));
        }
    };
    let wait_ms = limits.wait(req.wait_ms)?;
    Ok(AcquireCall {
        spec: AcquireSpec {
            key: limits.key(req.key)?,
            token: Token::generate(),
            ttl_ms: limits.ttl(req.ttl_ms)?,
            owner: limits.owner(req.owner)?,
            metadata: limits.metadata(req.metadata)?,
            request_id: limits.request_id(req.request_id)?,
            mode,
            waiting: wait_ms > 0,
        },
        wait_ms,
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

/// The wire form of a mode.
fn lock_mode(mode: Mode) -> pb::LockMode {
    match mode {
        Mode::Exclusive => pb::LockMode::Exclusive,
        Mode::Shared { .. } => pb::LockMode::Shared,
    }
}

/// Page size of a List that asks for none.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a List may ask for: a page is described in one go.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest ForceRelease reason, in bytes: it is logged whole.
pub const MAX_REASON_BYTES: usize = 512;
/// Longest page token this server hands out is far shorter.
const MAX_PAGE_TOKEN_BYTES: usize = 128;

/// A validated List.
#[derive(Debug)]
pub struct ListCall {
    /// Keys start with this ("" for every key).
    pub prefix: String,
    /// Locks per page.
    pub page_size: usize,
    /// Where the page starts (`None`: the first page).
    pub page_token: Option<String>,
}

/// Validates a List request: the prefix is bounded like a key (it may be
/// empty), the page size like [`MAX_PAGE_SIZE`].
pub fn list_request(req: pb::ListRequest, limits: &Limits) -> Result<ListCall, LockError> {
    if req.prefix.len() > limits.max_key_bytes {
        return Err(LockError::invalid(
            "prefix",
            format!(
                "is {} bytes, longer than any key (the limit is {})",
                req.prefix.len(),
                limits.max_key_bytes
            ),
        ));
    }
    crate::lock::no_control_characters("prefix", &req.prefix)?;
    let page_size = match req.page_size as usize {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(LockError::invalid(
                "page_size",
                format!("is {n}, the limit is {MAX_PAGE_SIZE}"),
            ));
        }
        n => n,
    };
    if req.page_token.len() > MAX_PAGE_TOKEN_BYTES {
        return Err(LockError::invalid(
            "page_token",
            "not a page token of this server",
        ));
    }
    Ok(ListCall {
        prefix: req.prefix,
        page_size,
        page_token: (!req.page_token.is_empty()).then_some(req.page_token),
    })
}

/// Validates a ForceRelease request: a key, and a reason that an operator
/// reading the log later will need (required, one line, bounded).
pub fn force_release_request(
    req: pb::ForceReleaseRequest,
    limits: &Limits,
) -> Result<(LockKey, String), LockError> {
    let key = limits.key(req.key)?;
    let reason = req.reason.trim();
    if reason.is_empty() {
        return Err(LockError::invalid(
            "reason",
            "must not be empty: say why the lock is taken (it is logged)",
        ));
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(LockError::invalid(
            "reason",
            format!("is {} bytes, the limit is {MAX_REASON_BYTES}", reason.len()),
        ));
    }
    crate::lock::no_control_characters("reason", reason)?;
    Ok((key, reason.to_owned()))
}

/// The reply to a List: each lock with its state (never its token).
pub fn list_response(page: crate::store::ListPage) -> pb::ListResponse {
    pb::ListResponse {
        locks: page
            .locks
            .into_iter()
            .map(|(key, info)| pb::LockInfo {
                key: key.into_string(),
                state: Some(describe_response(Some(info))),
            })
            .collect(),
        next_page_token: page.next.unwrap_or_default(),
    }
}

/// The reply to a Release: whether this token's lease was released (now,
/// or by an earlier attempt of the same release).
pub fn release_response(released: bool) -> pb::ReleaseResponse {
    pb::ReleaseResponse { released }
}

/// The reply to a Renew: the TTL now in force, or `None` if the lease is
/// lost.
pub fn renew_response(ttl_ms: Option<u32>) -> pb::RenewResponse {
    pb::RenewResponse {
        renewed: ttl_ms.is_some(),
        ttl_ms: ttl_ms.unwrap_or(0),
    }
}

/// A KeepAlive answer for `key`: alive with the TTL now in force, or not.
pub fn keepalive_response(key: String, ttl_ms: Option<u32>) -> pb::KeepAliveResponse {
    pb::KeepAliveResponse {
        key,
        alive: ttl_ms.is_some(),
        ttl_ms: ttl_ms.unwrap_or(0),
    }
}

/// The reply to a ForceRelease: how many holders it removed.
pub fn force_release_response(forced: Option<crate::store::Forced>) -> pb::ForceReleaseResponse {
    pb::ForceReleaseResponse {
        released: forced.map_or(0, |f| f.holders),
    }
}

/// A Watch event: `kind`, about the grant fenced `fencing_token` (0 for a
/// state), with the lock's state after it.
pub fn watch_event(
    kind: pb::watch_event::Kind,
    fencing_token: u64,
    info: Option<LockInfo>,
) -> pb::WatchEvent {
    pb::WatchEvent {
        kind: kind.into(),
        state: Some(describe_response(info)),
        fencing_token,
    }
}

/// Builds the reply to a Describe; never carries a token. Fields 2..5
/// (owner, fencing token, TTL, metadata) describe an exclusive holder, as
/// they always did, and stay empty for shared holders, whom `holders`
/// lists.
pub fn describe_response(info: Option<LockInfo>) -> pb::DescribeResponse {
    let Some(info) = info else {
        return pb::DescribeResponse::default();
    };
    let mode = lock_mode(info.mode);
    let holders: Vec<pb::Holder> = info
        .holders
        .into_iter()
        .map(|h: HolderInfo| pb::Holder {
            owner: h.owner,
            fencing_token: h.fencing_token,
            ttl_ms: h.ttl_ms,
            metadata: h.metadata.entries().iter().cloned().collect(),
            mode: mode.into(),
        })
        .collect();
    let mut reply = pb::DescribeResponse {
        held: !holders.is_empty(),
        mode: mode.into(),
        ..Default::default()
    };
    match (info.mode, holders.first()) {
        (Mode::Exclusive, Some(h)) => {
            reply.owner = h.owner.clone();
            reply.fencing_token = h.fencing_token;
            reply.ttl_ms = h.ttl_ms;
            reply.metadata = h.metadata.clone();
        }
        (Mode::Shared { limit }, _) => reply.shared_limit = limit,
        (Mode::Exclusive, None) => {}
    }
    reply.holders = holders;
    reply
}
