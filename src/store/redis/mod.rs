//! The Redis store (fred): single node, Sentinel or Redis Cluster, chosen by
//! the URL scheme. Each operation is one Lua script run with `EVALSHA`
//! (reloaded on `NOSCRIPT`) on the node owning the lock's hash slot, so
//! every check-and-set is atomic there and costs one round trip. On a
//! single node, calls that queue behind each other share one script call
//! (`batch.rs`), each operation still run and answered on its own.
//!
//! The files: `config` (URL, TLS, pool settings), `names` (Redis names of a
//! lock, hash tags), `call` (the scripts and how one is called: routing,
//! `EVALSHA` with `NOSCRIPT` reload, the store timeout), `args` (what each
//! script takes), `replies` (what each script answers), `errors` (Redis
//! errors mapped to what a client can act on), `subscriptions` (release
//! notifications for waiters), `acks` (`--min-replica-acks`), `route`
//! (where a script runs on a cluster) and `batch` (batching on one node).
//! The data model is in documentation/redis.md.

mod acks;
mod admin;
mod args;
mod batch;
mod call;
mod config;
mod errors;
mod names;
mod replies;
mod route;
mod subscriptions;

use crate::store::Forced;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::Pool;
use fred::prelude::*;
use fred::types::scripts::Script;
use futures_util::future::join_all;

use super::{LateGrant, ListPage, LockStore, ReleaseListener, Releasing};
use crate::lock::{
    AcquireOutcome, AcquireSpec, Attachment, Grant, HolderInfo, LockError, LockInfo, LockKey,
    Metadata, Mode, Token, remaining_ms,
};
use acks::ReplicaAcks;
use args::{acquire_args, attachment_arg, grant_args, mark_arg, release_call};
use batch::{Batcher, Op};
use call::{LATE_REPLY_LIMIT, Scripts, argv, bounded, evalsha, routed};
use config::redis_tls_connector;
pub use config::{DEFAULT_BATCH_MAX, DEFAULT_POOL_SIZE, RedisConfig, RedisTls, redact_url};
use errors::{is_redirect, map_error};
pub use names::Names;
use names::slot_of;
use replies::{
    array, handoff_shared_release, int, parse_acquire, parse_acquire_shared, parse_describe_shared,
    parse_handoff, text, ttl_u32, unexpected,
};
use route::Route;
use subscriptions::Subscriptions;

/// The Redis [`LockStore`].
pub struct RedisStore {
    pool: Pool,
    /// The clients scripts run on (on a cluster, a pool per primary).
    route: Arc<Route>,
    /// Release notifications for this server's waiters.
    subscriptions: Subscriptions,
    scripts: Scripts,
    prefix: String,
    timeout: Duration,
    /// `--min-replica-acks`: set when grants must be confirmed by WAIT.
    acks: Option<ReplicaAcks>,
    /// On one node (not a cluster): Acquire, Release and renewals that
    /// queue behind each other go to Redis together (`batch.rs`).
    batch: Option<Batcher>,
    /// Set by [`RedisStore::close`]: the clients are closed already.
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the clients and starts connecting. If Redis is not reachable
    /// yet, this still succeeds: calls fail with UNAVAILABLE (and health says
    /// NOT_SERVING) until fred's reconnect loop gets through.
    pub async fn connect(
        config: &RedisConfig,
        waiters: Arc<dyn ReleaseListener>,
    ) -> Result<Self, String> {
        if config.prefix.contains(['{', '}']) {
            return Err(format!(
                "key prefix {:?} must not contain '{{' or '}}': they would change the hash slot",
                config.prefix
            ));
        }
        let mut fred_config = Config::from_url(&config.url).map_err(|e| {
            format!(
                "--redis-url {}: {}",
                redact_url(&config.url),
                e.details().replace(&config.url, "<url>")
            )
        })?;
        if let Some(tls) = &config.tls {
            if !fred_config.uses_tls() {
                return Err(
                    "Redis TLS settings need a TLS URL (rediss://, rediss-cluster://, ...)".into(),
                );
            }
            fred_config.tls = Some(redis_tls_connector(tls)?.into());
        }
        let timeout = config.timeout;
        let mut builder = Builder::from_config(fred_config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                // A command is resent at most once after a dropped connection;
                // acquire is idempotent per token, so a resend is safe.
                c.max_command_attempts = 2;
            })
            .with_performance_config(|p| {
                // No per-command timer inside fred: every call is already
                // bounded by `bounded()`, and a second timer per command
                // (plus fred's "unresponsive" timer per router loop) showed
                // up in the profile.
                p.default_command_timeout = Duration::ZERO;
                p.broadcast_channel_capacity = 4096;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 1000, 2));
        let pool = builder
            .build_pool(config.pool_size.max(1))
            .map_err(|e| format!("redis pool: {}", e.details()))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| format!("redis subscriber: {}", e.details()))?;
        let route = Arc::new(Route::build(
            &builder,
            config.pool_size.max(1),
            timeout,
            &pool,
            false,
        )?);
        let acks = ReplicaAcks::start(&builder, config, &pool)?;
        let scripts = Scripts::new();
        let batch = (matches!(*route, Route::Pool(_)) && config.batch_max > 1).then(|| {
            Batcher::start(
                route.clone(),
                scripts.batch.clone(),
                timeout,
                config.pool_size.max(1),
                config.batch_max,
            )
        });

        // The connection tasks run for the life of the clients; fred ends
        // them on quit. Waiting for the first connection is bounded.
        let _pool_task = pool.connect();
        let _sub_task = subscriber.connect();
        let connected = tokio::time::timeout(timeout, async {
            pool.wait_for_connect().await?;
            subscriber.wait_for_connect().await
        })
        .await;
        // The address it tried, in every line: the "connecting" line may be
        // far above in a busy log.
        let redis = config::redact_url(&config.url);
        match connected {
            Ok(Ok(())) => tracing::info!(%redis, "connected to Redis"),
            Ok(Err(e)) => tracing::warn!(
                %redis,
                error = %e,
                "Redis not reachable yet; retrying in the background"
            ),
            Err(_) => tracing::warn!(
                %redis,
                "Redis not reachable within the store timeout; retrying in the background"
            ),
        }

        let prefix = config.prefix.clone();
        let subscriptions = Subscriptions::start(subscriber, &prefix, waiters, timeout);

        Ok(Self {
            pool,
            route,
            subscriptions,
            scripts,
            prefix,
            timeout,
            acks,
            batch,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Every client this store made: the pool, the subscriber and, on a
    /// cluster, a pool per primary.
    fn clients(&self) -> (Pool, fred::clients::SubscriberClient, Vec<Pool>) {
        let mut pools = self.route.own_pools();
        if let Some(acks) = &self.acks {
            pools.extend(acks.route.own_pools());
        }
        (
            self.pool.clone(),
            self.subscriptions.client().clone(),
            pools,
        )
    }

    /// Closes every connection and waits (at most the store timeout) until
    /// they are closed. A server calls it before its runtime stops: QUITs
    /// sent while the runtime winds down found their clients' tasks gone,
    /// and fred warned once per client ("Fatal error sending QUIT").
    pub async fn close(&self) {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let (pool, subscriber, pools) = self.clients();
        let all = async {
            let _ = pool.quit().await;
            let _ = subscriber.quit().await;
            for pool in pools {
                let _ = pool.quit().await;
            }
        };
        let _ = tokio::time::timeout(self.timeout, all).await;
    }

    fn names(&self, key: &LockKey) -> Names {
        Names::of(&self.prefix, key)
    }

    /// A client with a live connection to the node that owns `name`'s
    /// hash slot, and what is left of the store timeout. While fred is
    /// reconnecting to that node, every call fails at once with
    /// UNAVAILABLE instead of queueing until the store timeout: a client
    /// can retry elsewhere immediately.
    async fn client_for(&self, name: &str) -> Result<(Client, Duration), LockError> {
        routed(&self.route, slot_of(name), self.timeout).await
    }

    /// Runs one script with the store timeout.
    async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, LockError> {
        let (client, left) = self
            .client_for(keys.first().map(String::as_str).unwrap_or_default())
            .await?;
        let result = bounded(left, evalsha(&client, script, argv(script, keys, args))).await;
        self.check_route(&result);
        result
    }

    /// A Release or renewal: into the next batch when calls are queued on
    /// a single node, otherwise alone with its own `script`, holding a
    /// connection slot so that calls meanwhile gather into a batch.
    async fn eval_or_batch(
        &self,
        op: Op,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, LockError> {
        match self.batch.as_ref().map(|b| (b, b.idle())) {
            Some((batch, None)) => batch.call(op, keys, args, None, self.timeout).await,
            _slot => self.eval(script, keys, args).await,
        }
    }

    /// A `MOVED` or `ASK` reply means the routing table is stale.
    fn check_route<T>(&self, result: &Result<T, LockError>) {
        if is_redirect(result) {
            self.route.refresh();
        }
    }

    /// Like [`Self::eval`], but if the reply comes after the store timeout
    /// (the call already failed with UNAVAILABLE), the callback `late()`
    /// makes (only then, off the fast path) still gets it,
    /// in the background and within [`LATE_REPLY_LIMIT`], so a write that
    /// landed after we gave up can be undone in order.
    async fn eval_or_late<L: FnOnce(Option<Value>) + Send + 'static>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
        late: impl FnOnce() -> L,
    ) -> Result<Value, LockError> {
        let (client, left) = self
            .client_for(keys.first().map(String::as_str).unwrap_or_default())
            .await?;
        let script = script.clone();
        let argv = argv(&script, keys, args);
        let mut call = Box::pin(async move { evalsha(&client, &script, argv).await });
        match tokio::time::timeout(left, &mut call).await {
            Ok(result) => {
                let result = result.map_err(|e| map_error(&e));
                self.check_route(&result);
                result
            }
            Err(_) => {
                let late = late();
                tokio::spawn(async move {
                    if let Ok(Ok(value)) = tokio::time::timeout(LATE_REPLY_LIMIT, call).await {
                        late(Some(value));
                    }
                });
                Err(LockError::Unavailable(format!(
                    "no reply from Redis within {:?}",
                    self.timeout
                )))
            }
        }
    }
}

/// The callback for an Acquire reply that came after the call failed: it
/// tells `late` of the grant, if the reply is one. (Without a reply there
/// is nothing to tell: the caller gives the token back itself on any
/// ambiguous failure.)
fn late_acquire(
    late: impl LateGrant,
    sent: Instant,
) -> impl FnOnce(Option<Value>) + Send + 'static {
    move |reply| {
        if let Some(Ok(AcquireOutcome::Acquired(grant))) = reply.map(|r| parse_acquire(r, sent)) {
            late(grant);
        }
    }
}

impl LockStore for RedisStore {
    async fn acquire(
        &self,
        spec: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<AcquireOutcome, LockError> {
        if let Some(acks) = &self.acks {
            return self.acquire_acked(acks, spec, late).await;
        }
        let n = self.names(&spec.key);
        let sent = Instant::now();
        if let Mode::Shared { limit } = spec.mode {
            // Never batched: a batch runs the exclusive operations only.
            let reply = self
                .eval_or_late(
                    &self.scripts.acquire_shared,
                    vec![n.lock, n.fence],
                    acquire_args(spec, 0),
                    || late_acquire(late, sent),
                )
                .await?;
            return parse_acquire_shared(reply, sent, limit);
        }
        // A busy server batches; otherwise the call goes alone, holding a
        // connection slot so that calls meanwhile gather into a batch.
        let _slot = match self.batch.as_ref().map(|b| (b, b.idle())) {
            Some((batch, None)) => {
                let mut args = grant_args(None, spec);
                args.push(mark_arg(spec));
                let undo = Box::new(late_acquire(late, sent));
                let reply = batch
                    .call(
                        Op::Acquire,
                        vec![n.lock, n.fence],
                        args,
                        Some(undo),
                        self.timeout,
                    )
                    .await?;
                return parse_acquire(reply, sent);
            }
            Some((_, slot)) => slot,
            None => None,
        };
        let reply = self
            .eval_or_late(
                &self.scripts.acquire,
                vec![n.lock, n.fence],
                acquire_args(spec, 0),
                || late_acquire(late, sent),
            )
            .await?;
        parse_acquire(reply, sent)
    }

    async fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
        next: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<(bool, Option<Grant>), LockError> {
        // Grants under --min-replica-acks go through the acknowledged path;
        // a give-back never hands over.
        if self.acks.is_some() || next.key != *key || kind == Releasing::GiveBack {
            return Ok((self.release(key, token, kind).await?, None));
        }
        let n = self.names(key);
        let mut args = grant_args(Some(token), next);
        args.insert(1, attachment_arg(kind));
        args.push(n.channel.clone());
        let sent = Instant::now();
        let next_token = next.token.clone();
        let reply = self
            .eval_or_late(
                &self.scripts.handoff,
                vec![n.lock.clone(), n.fence.clone(), n.gone(token)],
                args,
                || {
                    move |reply: Option<Value>| {
                        if let Some(Ok((true, Some(grant)))) =
                            reply.map(|r| parse_handoff(r, &next_token, sent))
                        {
                            late(grant);
                        }
                    }
                },
            )
            .await?;
        if let Some(fence) = handoff_shared_release(&reply) {
            // A shared holder's release: waiters here wake now, as after a
            // plain release.
            self.subscriptions.released_here(key.as_str(), fence);
        }
        parse_handoff(reply, &next.token, sent)
    }

    async fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> Result<bool, LockError> {
        let (keys, args) = release_call(self.names(key), token, kind);
        let reply = if kind == Releasing::GiveBack {
            self.eval(&self.scripts.giveback, keys, args).await?
        } else {
            self.eval_or_batch(Op::Release, &self.scripts.release, keys, args)
                .await?
        };
        let fence = int(&reply).ok_or_else(|| unexpected(&reply))?;
        match fence {
            // Released before (a resent or retried release): true, and
            // nobody to wake. (For a give-back: nothing was given back.)
            -1 => return Ok(kind != Releasing::GiveBack),
            f if f <= 0 => return Ok(false),
            _ => {}
        }
        crate::metrics::released_after(fence.unsigned_abs());
        // Wake a waiter here now, instead of after the notification's trip
        // through Redis and back; that notification is then skipped.
        self.subscriptions.released_here(key.as_str(), fence);
        Ok(true)
    }

    async fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
        attachment: Option<&Attachment>,
    ) -> Result<Option<u32>, LockError> {
        let n = self.names(key);
        let (keys, args) = (
            vec![n.lock],
            vec![
                token.expose().to_owned(),
                ttl_ms.unwrap_or(0).to_string(),
                attachment
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_default(),
            ],
        );
        let reply = self
            .eval_or_batch(Op::Renew, &self.scripts.renew, keys, args)
            .await?;
        let ttl = int(&reply).ok_or_else(|| unexpected(&reply))?;
        Ok((ttl >= 0).then(|| ttl_u32(ttl)))
    }

    async fn describe(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        let n = self.names(key);
        let items = array(
            self.eval(&self.scripts.describe, vec![n.lock], vec![])
                .await?,
        )?;
        match items.first().and_then(int) {
            Some(0) => Ok(None),
            Some(1) if items.len() == 5 => {
                let owner = text(&items[1]).ok_or_else(|| unexpected(&items[1]))?;
                let fence = int(&items[2]).ok_or_else(|| unexpected(&items[2]))?;
                let pttl = int(&items[3]).ok_or_else(|| unexpected(&items[3]))?;
                let meta = text(&items[4]).ok_or_else(|| unexpected(&items[4]))?;
                Ok(Some(LockInfo {
                    mode: Mode::Exclusive,
                    holders: vec![HolderInfo {
                        owner,
                        fencing_token: u64::try_from(fence).map_err(|_| unexpected(&items[2]))?,
                        ttl_ms: remaining_ms(pttl),
                        metadata: Metadata::decode(&meta).ok_or_else(|| {
                            LockError::Internal("corrupt metadata in Redis".into())
                        })?,
                    }],
                }))
            }
            Some(2) => parse_describe_shared(&items),
            _ => Err(LockError::Internal("malformed describe reply".into())),
        }
    }

    async fn changes(
        &self,
        key: &LockKey,
    ) -> Result<tokio::sync::broadcast::Receiver<super::changes::Change>, LockError> {
        let channel = self.names(key).channel;
        self.subscriptions.changes(key.as_str(), channel).await
    }

    async fn list(
        &self,
        prefix: &str,
        size: usize,
        page: Option<&str>,
    ) -> Result<ListPage, LockError> {
        self.list_page(prefix, size, page).await
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<Forced>, LockError> {
        self.force(key).await
    }

    async fn watch(&self, key: &LockKey) -> Result<(), LockError> {
        self.subscriptions.watch(self.names(key).channel).await
    }

    async fn ping(&self) -> Result<(), LockError> {
        // On a cluster, every primary must answer: a lock on a slot whose
        // primary is down cannot be served.
        let Some(primaries) = self.route.primaries() else {
            let client = self.route.client(0).await?;
            return bounded(self.timeout, client.ping::<()>(None)).await;
        };
        if primaries.is_empty() {
            return Err(LockError::Unavailable(
                "no Redis Cluster primary known yet".into(),
            ));
        }
        let pings = primaries.into_iter().map(|(server, pool)| async move {
            let not_connected =
                || LockError::Unavailable(format!("not connected to the primary {server}"));
            let pool = pool.ok_or_else(not_connected)?;
            // A pool made a moment ago (the first check after start, or a
            // replica just promoted) is still connecting: it gets the store
            // timeout, not a NOT_SERVING at once.
            let _ = tokio::time::timeout(self.timeout, pool.wait_for_connect()).await;
            let client = pool.next_connected().clone();
            if !client.is_connected() {
                return Err(not_connected());
            }
            bounded(self.timeout, client.ping::<()>(None)).await
        });
        join_all(pings)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        // Close connections in the background; nothing waits for it.
        let (pool, subscriber, pools) = self.clients();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = pool.quit().await;
                let _ = subscriber.quit().await;
                for pool in pools {
                    let _ = pool.quit().await;
                }
            });
        }
    }
}
