//! The scripts, and how one is called: prebuilt `EVALSHA` arguments, the
//! `NOSCRIPT` reload, the client for a hash slot, the store timeout.

use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

use super::errors::map_error;
use super::route::Route;
use crate::lock::LockError;

pub(super) struct Scripts {
    pub(super) acquire: Script,
    pub(super) acquire_shared: Script,
    pub(super) release: Script,
    pub(super) giveback: Script,
    pub(super) renew: Script,
    pub(super) describe: Script,
    pub(super) handoff: Script,
    pub(super) batch: Script,
    pub(super) force: Script,
}

/// `grant.lua`, `shared.lua` and `ops.lua`, the functions every writing
/// script starts with, so a grant, a release or a renewal is the same code
/// alone, in a handoff or in a batch, for an exclusive or a shared holder.
macro_rules! with_ops {
    ($file:literal) => {
        concat!(
            include_str!("scripts/grant.lua"),
            include_str!("scripts/shared.lua"),
            include_str!("scripts/ops.lua"),
            include_str!($file)
        )
    };
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            acquire: Script::from_lua(with_ops!("scripts/acquire.lua")),
            acquire_shared: Script::from_lua(with_ops!("scripts/acquire_shared.lua")),
            release: Script::from_lua(with_ops!("scripts/release.lua")),
            giveback: Script::from_lua(with_ops!("scripts/giveback.lua")),
            renew: Script::from_lua(with_ops!("scripts/renew.lua")),
            describe: Script::from_lua(include_str!("scripts/describe.lua")),
            handoff: Script::from_lua(with_ops!("scripts/handoff.lua")),
            batch: Script::from_lua(with_ops!("scripts/batch.lua")),
            force: Script::from_lua(include_str!("scripts/force.lua")),
        }
    }
}

/// How long a reply that missed the store timeout is still awaited.
pub(super) const LATE_REPLY_LIMIT: Duration = Duration::from_secs(60);

/// A client for `slot` from `route`, and what is left of `timeout` once
/// it has one (a new primary's pool may take a moment to connect).
pub(super) async fn routed(
    route: &Route,
    slot: u16,
    timeout: Duration,
) -> Result<(Client, Duration), LockError> {
    let start = Instant::now();
    match tokio::time::timeout(timeout, route.client(slot)).await {
        Ok(client) => Ok((client?, timeout.saturating_sub(start.elapsed()))),
        Err(_) => Err(LockError::Unavailable(format!(
            "no connection to Redis within {timeout:?}"
        ))),
    }
}

/// `EVALSHA` arguments: `sha, numkeys, keys..., args...`.
pub(super) fn argv(script: &Script, keys: Vec<String>, args: Vec<String>) -> Vec<Value> {
    let mut argv = Vec::with_capacity(2 + keys.len() + args.len());
    argv.push(Value::String(script.sha1().clone()));
    argv.push(Value::Integer(keys.len() as i64));
    argv.extend(keys.into_iter().map(Value::from));
    argv.extend(args.into_iter().map(Value::from));
    argv
}

/// `EVALSHA` with prebuilt arguments (`sha, numkeys, keys..., args...`),
/// loading the script where Redis lacks it (`NOSCRIPT`: a restarted or
/// newly promoted node). Argument 2, the first key, routes it on a cluster.
pub(super) async fn evalsha(
    client: &Client,
    script: &Script,
    argv: Vec<Value>,
) -> Result<Value, Error> {
    let cmd = || CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false);
    // fred's command futures are several KiB each; boxed, they do not make
    // every future that awaits a script (up to the gRPC handler's) that
    // much larger, and that much more to copy on every call.
    match Box::pin(client.custom(cmd(), argv.clone())).await {
        Err(e) if e.details().starts_with("NOSCRIPT") => {
            Box::pin(script.load(client)).await?;
            Box::pin(client.custom(cmd(), argv)).await
        }
        result => result,
    }
}

/// Awaits a fred call for at most `timeout`, mapping every failure to a
/// domain error.
pub(super) async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, LockError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map_error(&e)),
        Err(_) => Err(LockError::Unavailable(format!(
            "no reply from Redis within {timeout:?}"
        ))),
    }
}
