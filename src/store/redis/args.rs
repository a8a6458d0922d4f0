//! What each script takes, as strings in the order its `ARGV` reads them.

use std::time::Duration;

use super::names::Names;
use crate::lock::{AcquireSpec, Mode, Token};
use crate::store::Releasing;

/// How long a fencing counter outlives the TTL of the grant that set it.
/// The TIME floor keeps fencing tokens increasing without the counter
/// (Redis runs one script at a time, each longer than a microsecond, so the
/// counter never gets ahead of TIME by more than one), so it needs to live
/// only as long as it helps: across a failover to a replica whose clock is
/// behind. Short, so that lock names used once do not hold Redis memory
/// (20 000 names once held 16 MB for 7 days).
pub(super) const COUNTER_GRACE: Duration = Duration::from_secs(600);

/// What `grant()` (grant.lua) takes for `spec`: token, TTL, owner,
/// metadata, request id, counter TTL; after `before`, if given (the
/// handoff script's old token).
pub(super) fn grant_args(before: Option<&Token>, spec: &AcquireSpec) -> Vec<String> {
    let mut args = Vec::with_capacity(8);
    args.extend(before.map(|t| t.expose().to_owned()));
    args.extend([
        spec.token.expose().to_owned(),
        spec.ttl_ms.to_string(),
        spec.owner.clone(),
        spec.metadata.encode(),
        spec.request_id.clone().unwrap_or_default(),
        (u64::from(spec.ttl_ms) + COUNTER_GRACE.as_millis() as u64).to_string(),
    ]);
    args
}

/// The attachment argument of the release and handoff scripts: the
/// stream's id for a stream's end, '' otherwise.
pub(super) fn attachment_arg(kind: Releasing<'_>) -> String {
    match kind {
        Releasing::StreamEnd(att) => att.as_str().to_owned(),
        Releasing::Holder | Releasing::GiveBack => String::new(),
    }
}

/// The keys and arguments of release.lua, or of giveback.lua for
/// [`Releasing::GiveBack`] (which takes no attachment): the lock record and
/// the token's tombstone; the token, the release channel and the
/// attachment. Built in one place for every caller: the undo of an
/// unacknowledged grant once passed no tombstone, and its script failed on
/// a grant that had expired meanwhile.
pub(super) fn release_call(
    n: Names,
    token: &Token,
    kind: Releasing<'_>,
) -> (Vec<String>, Vec<String>) {
    let gone = n.gone(token);
    let mut args = vec![token.expose().to_owned(), n.channel];
    if kind != Releasing::GiveBack {
        args.push(attachment_arg(kind));
    }
    (vec![n.lock, gone], args)
}

/// How long a waiting EXCLUSIVE Acquire that found the lock held keeps new
/// shared holders out (shared.lua, `mark_exclusive`). Each of its attempts
/// renews the mark, and a waiter attempts at least every 2 s (the wait
/// loop's backoff cap), so the mark lasts while it waits; a waiter that
/// leaves without the lock withdraws it (giveback.lua), so this bounds only
/// how long a writer whose server died holds readers back.
pub(super) const EXCLUSIVE_WAIT_MARK: Duration = Duration::from_millis(3000);

/// The acquire script's arguments: the grant's, then `min_replicas` (0: no
/// replica check), then the exclusive-waiting mark (`mark_arg`); for a
/// shared Acquire (its own script), the grant's and the shared limit.
pub(super) fn acquire_args(spec: &AcquireSpec, min_replicas: u32) -> Vec<String> {
    let mut args = grant_args(None, spec);
    match spec.mode {
        Mode::Exclusive => {
            args.push(min_replicas.to_string());
            args.push(mark_arg(spec));
        }
        Mode::Shared { limit } => args.push(limit.to_string()),
    }
    args
}

/// How long (ms) `spec`, if it is a waiting EXCLUSIVE Acquire, marks a key
/// it finds held; '0' for any other.
pub(super) fn mark_arg(spec: &AcquireSpec) -> String {
    if spec.waiting && spec.mode == Mode::Exclusive {
        EXCLUSIVE_WAIT_MARK.as_millis().to_string()
    } else {
        "0".to_owned()
    }
}
