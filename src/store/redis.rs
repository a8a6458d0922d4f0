//! The Redis store (fred): single node, Sentinel or Redis Cluster, chosen by
//! the URL scheme. Each operation is one Lua script run with `EVALSHA`
//! (reloaded on `NOSCRIPT`) on the node owning the lock's hash slot, so
//! every check-and-set is atomic there and costs one round trip. On a
//! single node, calls that queue behind each other share one script call
//! (`batch.rs`), each operation still run and answered on its own.
//!
//! Key layout, all in one hash slot per lock (DESIGN §3):
//! `<prefix>{<tag>}:lock` (hash: token, fence, ttl, owner, meta, rid),
//! `<prefix>{<tag>}:fence` (counter, outlives the lock, expires after days),
//! and the sharded pub/sub channel `<prefix>{<tag>}:released`.
//! `<tag>` is the lock key with `%`, `{` and `}` percent-escaped, so a key
//! holding braces can never move its Redis keys to different slots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::clients::{Pool, SubscriberClient};
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use futures_util::future::join_all;

use super::{LateGrant, LockStore, Releasing};
use crate::lock::{
    AcquireOutcome, AcquireSpec, Attachment, Grant, LockError, LockInfo, LockKey, Metadata, Token,
    remaining_ms,
};
use crate::task::TaskGuard;
use crate::wait::WaitQueues;
use batch::{Batcher, Op};
use route::Route;

mod batch;
mod route;

/// How long a fencing counter outlives the TTL of the grant that set it.
/// The TIME floor keeps fencing tokens increasing without the counter
/// (Redis runs one script at a time, each longer than a microsecond, so the
/// counter never gets ahead of TIME by more than one), so it needs to live
/// only as long as it helps: across a failover to a replica whose clock is
/// behind. Short, so that lock names used once do not hold Redis memory
/// (20 000 names once held 16 MB for 7 days).
const COUNTER_GRACE: Duration = Duration::from_secs(600);
/// A release channel nobody on this server has waited on for this long is
/// unsubscribed.
const SUBSCRIPTION_IDLE: Duration = Duration::from_secs(30);

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://`, `redis-cluster://` or `redis-sentinel://`,
    /// with `user:password@` for an ACL user. Never logged: it may hold the
    /// password (`Debug` redacts it).
    pub url: String,
    /// Prefix of every Redis key and channel; must not contain braces.
    pub prefix: String,
    /// Connections in the command pool.
    pub pool_size: usize,
    /// Upper bound on every Redis call; past it the call is UNAVAILABLE.
    pub timeout: Duration,
    /// Trust and identity for `rediss://`; `None` trusts the system's CAs.
    pub tls: Option<RedisTls>,
    /// Replicas that must acknowledge a grant (`WAIT`) before it is
    /// answered; 0 answers as soon as the primary granted.
    pub min_replica_acks: u32,
    /// The most operations sent to a single node in one script call; 1
    /// sends each alone. Ignored on a Redis Cluster.
    pub batch_max: usize,
}

/// TLS settings for a `rediss://` URL, PEM as read from the files.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CAs that Redis's certificate must chain to (instead of the system's).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key, for Redis's `tls-auth-clients yes`.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_pem.is_some())
            .finish()
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .field("min_replica_acks", &self.min_replica_acks)
            .field("batch_max", &self.batch_max)
            .finish()
    }
}

/// `scheme://user:password@host...` with the password (or a lone
/// password) replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{user}{}", &rest[at..])
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "leasehold:".into(),
            pool_size: 4,
            timeout: Duration::from_secs(2),
            tls: None,
            min_replica_acks: 0,
            batch_max: 64,
        }
    }
}

/// A rustls client configuration for fred: the given CAs (or the system's)
/// and, optionally, a client certificate. ring, the one crypto provider
/// compiled in, is named explicitly so no process-wide default is needed.
fn redis_tls_connector(tls: &RedisTls) -> Result<fred::types::config::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("--redis-tls-ca: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("--redis-tls-ca: {e}"))?;
            }
            if roots.is_empty() {
                return Err("--redis-tls-ca: no certificate in the file".into());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs().certs;
            let (added, _) = roots.add_parsable_certificates(native);
            if added == 0 {
                return Err(
                    "rediss:// without --redis-tls-ca, and no system CA certificates found".into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("redis TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match &tls.client_pem {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--redis-tls-cert: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| format!("--redis-tls-key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--redis-tls-cert/--redis-tls-key: {e}"))?
        }
    };
    Ok(config.into())
}

/// The Redis [`LockStore`].
pub struct RedisStore {
    pool: Pool,
    /// The clients scripts run on (on a cluster, a pool per primary).
    route: Arc<Route>,
    subscriber: SubscriberClient,
    scripts: Scripts,
    waiters: Arc<WaitQueues>,
    local_releases: Arc<LocalReleases>,
    prefix: String,
    timeout: Duration,
    /// `--min-replica-acks`: set when grants must be confirmed by WAIT.
    acks: Option<ReplicaAcks>,
    /// On one node (not a cluster): Acquire, Release and renewals that
    /// queue behind each other go to Redis together (`batch.rs`).
    batch: Option<Batcher>,
    /// Release channels subscribed, with when a waiter last needed each.
    watched: Arc<Mutex<HashMap<String, Instant>>>,
    /// Serialises SSUBSCRIBE/SUNSUBSCRIBE so an unsubscribe of an idle
    /// channel cannot overtake a new waiter's subscribe.
    subscribing: Arc<tokio::sync::Mutex<()>>,
    _tasks: Vec<TaskGuard>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    acquire: Script,
    release: Script,
    giveback: Script,
    renew: Script,
    describe: Script,
    handoff: Script,
    batch: Script,
}

/// `grant.lua` and `ops.lua`, the functions every writing script starts
/// with, so a grant, a release or a renewal is the same code alone, in a
/// handoff or in a batch.
macro_rules! with_ops {
    ($file:literal) => {
        concat!(
            include_str!("scripts/grant.lua"),
            include_str!("scripts/ops.lua"),
            include_str!($file)
        )
    };
}

impl Scripts {
    fn new() -> Self {
        Self {
            acquire: Script::from_lua(with_ops!("scripts/acquire.lua")),
            release: Script::from_lua(with_ops!("scripts/release.lua")),
            giveback: Script::from_lua(with_ops!("scripts/giveback.lua")),
            renew: Script::from_lua(with_ops!("scripts/renew.lua")),
            describe: Script::from_lua(include_str!("scripts/describe.lua")),
            handoff: Script::from_lua(with_ops!("scripts/handoff.lua")),
            batch: Script::from_lua(with_ops!("scripts/batch.lua")),
        }
    }
}

/// The Redis names of one lock: its record, its fencing counter and its
/// release channel, all with the same hash tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The lock record (a hash).
    pub lock: String,
    /// The fencing counter.
    pub fence: String,
    /// The sharded pub/sub channel releases are published on.
    pub channel: String,
}

impl Names {
    /// The names of `key` under `prefix`.
    pub fn of(prefix: &str, key: &LockKey) -> Self {
        let base = format!("{prefix}{{{}}}", escape_tag(key.as_str()));
        Self {
            lock: format!("{base}:lock"),
            fence: format!("{base}:fence"),
            channel: format!("{base}:released"),
        }
    }
}

impl RedisStore {
    /// Builds the clients and starts connecting. If Redis is not reachable
    /// yet, this still succeeds: calls fail with UNAVAILABLE (and health says
    /// NOT_SERVING) until fred's reconnect loop gets through.
    pub async fn connect(config: &RedisConfig, waiters: Arc<WaitQueues>) -> Result<Self, String> {
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
        match connected {
            Ok(Ok(())) => tracing::info!("connected to Redis"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Redis not reachable yet; retrying in the background")
            }
            Err(_) => tracing::warn!(
                "Redis not reachable within the store timeout; retrying in the background"
            ),
        }

        let watched = Arc::new(Mutex::new(HashMap::new()));
        let local_releases = Arc::new(LocalReleases::default());
        let subscribing = Arc::new(tokio::sync::Mutex::new(()));
        let prefix = config.prefix.clone();
        let tasks = vec![
            TaskGuard::spawn("redis-resubscribe", {
                let handle = subscriber.manage_subscriptions();
                async move {
                    let _ = handle.await;
                }
            }),
            TaskGuard::spawn(
                "redis-release-listener",
                listen(
                    subscriber.clone(),
                    prefix.clone(),
                    waiters.clone(),
                    local_releases.clone(),
                ),
            ),
            TaskGuard::spawn(
                "redis-subscription-reaper",
                reap(
                    subscriber.clone(),
                    prefix.clone(),
                    watched.clone(),
                    subscribing.clone(),
                    waiters.clone(),
                ),
            ),
        ];

        Ok(Self {
            waiters: waiters.clone(),
            local_releases,
            pool,
            route,
            subscriber,
            scripts,
            prefix,
            timeout,
            acks,
            batch,
            watched,
            subscribing,
            _tasks: tasks,
        })
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

/// How long a reply that missed the store timeout is still awaited.
const LATE_REPLY_LIMIT: Duration = Duration::from_secs(60);

/// A client for `slot` from `route`, and what is left of `timeout` once
/// it has one (a new primary's pool may take a moment to connect).
async fn routed(
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

/// The cluster hash slot of a Redis key.
fn slot_of(name: &str) -> u16 {
    fred::util::redis_keyslot(name.as_bytes())
}

/// `EVALSHA` arguments: `sha, numkeys, keys..., args...`.
fn argv(script: &Script, keys: Vec<String>, args: Vec<String>) -> Vec<Value> {
    let mut argv = Vec::with_capacity(2 + keys.len() + args.len());
    argv.push(Value::String(script.sha1().clone()));
    argv.push(Value::Integer(keys.len() as i64));
    argv.extend(keys.into_iter().map(Value::from));
    argv.extend(args.into_iter().map(Value::from));
    argv
}

/// Parses the acquire script's reply; `sent` is when the call was sent.
fn parse_acquire(reply: Value, sent: Instant) -> Result<AcquireOutcome, LockError> {
    let items = array(reply)?;
    match items.first().and_then(int) {
        Some(1) if items.len() == 5 => {
            let token = text(&items[1]).ok_or_else(|| unexpected(&items[1]))?;
            let fence = int(&items[2]).ok_or_else(|| unexpected(&items[2]))?;
            let ttl = int(&items[3]).ok_or_else(|| unexpected(&items[3]))?;
            let pttl = int(&items[4]).ok_or_else(|| unexpected(&items[4]))?;
            Ok(AcquireOutcome::Acquired(Grant {
                token: Token::parse(token)?,
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

/// `EVALSHA` with prebuilt arguments (`sha, numkeys, keys..., args...`),
/// loading the script where Redis lacks it (`NOSCRIPT`: a restarted or
/// newly promoted node). Argument 2, the first key, routes it on a cluster.
async fn evalsha(client: &Client, script: &Script, argv: Vec<Value>) -> Result<Value, Error> {
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
async fn bounded<T>(
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

/// What a client is told when Redis moved a slot (the routing table is
/// stale): how [`is_redirect`] knows such an error.
const REDIRECTED: &str = "the Redis Cluster slot moved; retry";

/// Whether `result` failed because a Redis Cluster slot moved.
fn is_redirect<T>(result: &Result<T, LockError>) -> bool {
    matches!(result, Err(LockError::Unavailable(e)) if e == REDIRECTED)
}

/// Maps a fred error to what a client can act on. Clients get a fixed,
/// generic message per kind; Redis's own text (which names scripts, lines
/// and memory settings) goes only to the log.
fn map_error(e: &Error) -> LockError {
    classify(e.kind(), e.details())
}

fn classify(kind: &ErrorKind, details: &str) -> LockError {
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
fn op_result(reply: Value) -> Result<Value, LockError> {
    match &reply {
        Value::Array(items) if items.first().and_then(int) == Some(-9) => Err(script_error(items)),
        _ => Ok(reply),
    }
}

/// The error of one operation that failed inside a batch or script
/// (`{-9, message}`, see batch.lua).
fn script_error(items: &[Value]) -> LockError {
    let message = items.get(1).and_then(text).unwrap_or_default();
    classify(&ErrorKind::Unknown, &message)
}

/// Escapes `%`, `{` and `}` so the tag has no braces and stays injective.
fn escape_tag(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

fn unescape_tag(tag: &str) -> String {
    tag.replace("%7B", "{")
        .replace("%7D", "}")
        .replace("%25", "%")
}

/// The lock key of a release channel name, if it is one of ours.
fn key_of_channel<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:released")
}

/// Delivers release notifications to this server's waiters.
async fn listen(
    subscriber: SubscriberClient,
    prefix: String,
    waiters: Arc<WaitQueues>,
    local: Arc<LocalReleases>,
) {
    let mut rx = subscriber.message_rx();
    loop {
        match rx.recv().await {
            Ok(message) => {
                if let Some(tag) = key_of_channel(&prefix, &message.channel) {
                    let key = unescape_tag(tag);
                    let fence = int(&message.value).unwrap_or(0);
                    if !local.take(&key, fence) {
                        waiters.released(&key);
                    }
                }
            }
            // Missed messages are covered by the waiters' backoff retries.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "release notifications dropped; waiters fall back to retries"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Releases this server made and already announced to its own waiters,
/// keyed by lock and fencing token, so the same release arriving again over
/// pub/sub does not wake a second waiter. Entries are consumed by that
/// message, or dropped after [`LOCAL_RELEASE_MEMORY`] if it never comes.
#[derive(Debug, Default)]
struct LocalReleases(Mutex<HashMap<(String, i64), Instant>>);

/// How long a local release waits for its own notification.
const LOCAL_RELEASE_MEMORY: Duration = Duration::from_secs(10);

impl LocalReleases {
    fn record(&self, key: &str, fence: i64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            let now = Instant::now();
            map.retain(|_, at| now.duration_since(*at) < LOCAL_RELEASE_MEMORY);
        }
        map.insert((key.to_owned(), fence), Instant::now());
    }

    /// Whether this notification is one we already delivered locally.
    fn take(&self, key: &str, fence: i64) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return false;
        }
        map.remove(&(key.to_owned(), fence)).is_some()
    }
}

/// Unsubscribes release channels nobody here waits on any more.
async fn reap(
    subscriber: SubscriberClient,
    prefix: String,
    watched: Arc<Mutex<HashMap<String, Instant>>>,
    subscribing: Arc<tokio::sync::Mutex<()>>,
    waiters: Arc<WaitQueues>,
) {
    let mut tick = tokio::time::interval(SUBSCRIPTION_IDLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _serial = subscribing.lock().await;
        let idle: Vec<String> = {
            let mut map = watched.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let idle: Vec<String> = map
                .iter()
                .filter(|(channel, last)| {
                    now.duration_since(**last) > SUBSCRIPTION_IDLE
                        && key_of_channel(&prefix, channel)
                            .is_none_or(|tag| !waiters.has_waiters(&unescape_tag(tag)))
                })
                .map(|(c, _)| c.clone())
                .collect();
            for c in &idle {
                map.remove(c);
            }
            idle
        };
        for channel in idle {
            if let Err(e) = subscriber.sunsubscribe(channel).await {
                tracing::debug!(error = %e, "SUNSUBSCRIBE failed; the channel stays subscribed");
            }
        }
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::Double(d) => Some(*d as i64),
        Value::String(s) => s.parse().ok(),
        Value::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => String::from_utf8(b.to_vec()).ok(),
        Value::Integer(i) => Some(i.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

fn array(v: Value) -> Result<Vec<Value>, LockError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(v: &Value) -> LockError {
    LockError::Internal(format!("unexpected script reply of kind {}", v.kind()))
}

fn ttl_u32(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}

/// What `grant()` (grant.lua) takes for `spec`: token, TTL, owner,
/// metadata, request id, counter TTL; after `before`, if given (the
/// handoff script's old token).
fn grant_args(before: Option<&Token>, spec: &AcquireSpec) -> Vec<String> {
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
fn attachment_arg(kind: Releasing<'_>) -> String {
    match kind {
        Releasing::StreamEnd(att) => att.as_str().to_owned(),
        Releasing::Holder | Releasing::GiveBack => String::new(),
    }
}

/// Parses the handoff script's reply: `(released, grant to next)`.
fn parse_handoff(
    reply: Value,
    next: &Token,
    sent: Instant,
) -> Result<(bool, Option<Grant>), LockError> {
    let items = array(reply)?;
    match items.first().and_then(int) {
        Some(0) => Ok((false, None)),
        Some(1) if items.len() == 5 => {
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

/// The acquire script's arguments: the grant's, then `min_replicas` (0: no
/// replica check).
fn acquire_args(spec: &AcquireSpec, min_replicas: u32) -> Vec<String> {
    let mut args = grant_args(None, spec);
    args.push(min_replicas.to_string());
    args
}

/// `--min-replica-acks N`: every grant is followed by `WAIT N` on the
/// connection that ran the grant script, and answered only once N replicas
/// acknowledged it; otherwise it is undone and the caller gets UNAVAILABLE.
/// These Acquires have a pool of their own, because a WAIT holds its
/// connection until the replicas answer: renewals and releases on the main
/// pool never queue behind one.
struct ReplicaAcks {
    /// Replicas that must acknowledge a grant.
    min: u32,
    /// WAIT's own timeout: half the store timeout, so that an undo still
    /// fits in the call's budget.
    wait: Duration,
    route: Route,
}

impl ReplicaAcks {
    /// The acks pool, connecting in the background; `None` when
    /// `min_replica_acks` is 0.
    fn start(
        builder: &Builder,
        config: &RedisConfig,
        discovery: &Pool,
    ) -> Result<Option<Self>, String> {
        if config.min_replica_acks == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            min: config.min_replica_acks,
            wait: (config.timeout / 2).max(Duration::from_millis(1)),
            route: Route::build(
                builder,
                config.pool_size.max(1),
                config.timeout,
                discovery,
                true,
            )?,
        }))
    }
}

impl RedisStore {
    /// Acquire with `--min-replica-acks`: the grant script, then `WAIT` on
    /// the same client (so the same connection to the slot's primary),
    /// then, if too few replicas acknowledged, the release script, all
    /// within the store timeout. A result that comes after the timeout
    /// (the caller already got UNAVAILABLE) undoes a grant it made.
    async fn acquire_acked(
        &self,
        acks: &ReplicaAcks,
        spec: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<AcquireOutcome, LockError> {
        let n = self.names(&spec.key);
        let slot = slot_of(&n.lock);
        let (client, left) = routed(&acks.route, slot, self.timeout).await?;
        let grant = argv(
            &self.scripts.acquire,
            vec![n.lock.clone(), n.fence],
            acquire_args(spec, acks.min),
        );
        let (acquire, release) = (self.scripts.acquire.clone(), self.scripts.giveback.clone());
        let sent = Instant::now();
        let (min, wait, token) = (acks.min, acks.wait, spec.token.clone());
        let mut call = Box::pin(async move {
            let outcome = parse_acquire(
                evalsha(&client, &acquire, grant)
                    .await
                    .map_err(|e| map_error(&e))?,
                sent,
            )?;
            let AcquireOutcome::Acquired(lease) = &outcome else {
                return Ok(outcome);
            };
            let acked = wait_for_replicas(&client, slot, min, wait).await;
            if matches!(acked, Ok(k) if k >= i64::from(min)) {
                return Ok(outcome);
            }
            // Only a grant this call made is given back (and, by the
            // script, never one a request_id replay handed out).
            if lease.token == token {
                let undo = argv(
                    &release,
                    vec![n.lock],
                    vec![token.expose().to_owned(), n.channel],
                );
                if let Err(e) = evalsha(&client, &release, undo).await {
                    tracing::warn!(error = %e, "could not undo an unacknowledged grant; it expires with its TTL");
                }
            }
            Err(LockError::Unavailable(match acked {
                Ok(k) => format!(
                    "the grant was acknowledged by {k} of {min} replica(s) within {wait:?}; not granted"
                ),
                Err(e) => format!("could not confirm the grant with WAIT ({e}); not granted"),
            }))
        });
        match tokio::time::timeout(left, &mut call).await {
            Ok(result) => {
                if is_redirect(&result) {
                    acks.route.refresh();
                }
                result
            }
            Err(_) => {
                // A late, acknowledged grant is the caller's to give back.
                tokio::spawn(async move {
                    if let Ok(Ok(AcquireOutcome::Acquired(grant))) =
                        tokio::time::timeout(LATE_REPLY_LIMIT, call).await
                    {
                        late(grant);
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

/// `WAIT min timeout` on `client`'s connection to the primary of `slot`:
/// how many replicas acknowledged every write that connection made. Sent
/// once: a resend after a reconnect would be a new connection, whose WAIT
/// knows nothing of the grant.
async fn wait_for_replicas(
    client: &Client,
    slot: u16,
    min: u32,
    timeout: Duration,
) -> Result<i64, Error> {
    let options = Options {
        max_attempts: Some(1),
        ..Default::default()
    };
    let cmd = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), false);
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let reply: Value = client
        .with_options(&options)
        .custom(
            cmd,
            vec![Value::from(i64::from(min)), Value::from(timeout_ms)],
        )
        .await?;
    int(&reply).ok_or_else(|| Error::new(ErrorKind::Protocol, "WAIT: not an integer"))
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
        // A busy server batches; otherwise the call goes alone, holding a
        // connection slot so that calls meanwhile gather into a batch.
        let _slot = match self.batch.as_ref().map(|b| (b, b.idle())) {
            Some((batch, None)) => {
                let args = grant_args(None, spec);
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
        let sent = Instant::now();
        let next_token = next.token.clone();
        let reply = self
            .eval_or_late(&self.scripts.handoff, vec![n.lock, n.fence], args, || {
                move |reply: Option<Value>| {
                    if let Some(Ok((true, Some(grant)))) =
                        reply.map(|r| parse_handoff(r, &next_token, sent))
                    {
                        late(grant);
                    }
                }
            })
            .await?;
        parse_handoff(reply, &next.token, sent)
    }

    async fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> Result<bool, LockError> {
        let n = self.names(key);
        let reply = if kind == Releasing::GiveBack {
            let args = vec![token.expose().to_owned(), n.channel];
            self.eval(&self.scripts.giveback, vec![n.lock], args)
                .await?
        } else {
            let args = vec![token.expose().to_owned(), n.channel, attachment_arg(kind)];
            self.eval_or_batch(Op::Release, &self.scripts.release, vec![n.lock], args)
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
        // Wake a waiter here now, instead of after the notification's trip
        // through Redis and back; that notification is then skipped.
        if self.waiters.has_waiters(key.as_str()) {
            self.local_releases.record(key.as_str(), fence);
            self.waiters.released(key.as_str());
        }
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
                    owner,
                    fencing_token: u64::try_from(fence).map_err(|_| unexpected(&items[2]))?,
                    ttl_ms: remaining_ms(pttl),
                    metadata: Metadata::decode(&meta)
                        .ok_or_else(|| LockError::Internal("corrupt metadata in Redis".into()))?,
                }))
            }
            _ => Err(LockError::Internal("malformed describe reply".into())),
        }
    }

    async fn watch(&self, key: &LockKey) -> Result<(), LockError> {
        let channel = self.names(key).channel;
        let touch = |map: &mut HashMap<String, Instant>| {
            map.get_mut(&channel).map(|t| *t = Instant::now()).is_some()
        };
        if touch(&mut self.watched.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(());
        }
        if !self.subscriber.is_connected() {
            return Err(LockError::Unavailable(
                "release subscriptions not connected to Redis (reconnecting)".into(),
            ));
        }
        let _serial = self.subscribing.lock().await;
        if touch(&mut self.watched.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(());
        }
        bounded(
            self.timeout,
            Box::pin(self.subscriber.ssubscribe(channel.clone())),
        )
        .await?;
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(channel, Instant::now());
        Ok(())
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
        let pings = primaries.into_iter().map(|(server, client)| async move {
            let client = client.ok_or_else(|| {
                LockError::Unavailable(format!("not connected to the primary {server}"))
            })?;
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
        let pool = self.pool.clone();
        let subscriber = self.subscriber.clone();
        // Close connections in the background; nothing waits for it.
        let mut pools = self.route.own_pools();
        if let Some(acks) = &self.acks {
            pools.extend(acks.route.own_pools());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_have_no_braces_and_round_trip() {
        for key in ["plain", "{a}", "}{", "a%7Bb", "%", "ü{x}/y"] {
            let tag = escape_tag(key);
            assert!(!tag.contains(['{', '}']), "{tag}");
            assert_eq!(unescape_tag(&tag), key);
        }
        assert_ne!(escape_tag("{"), escape_tag("%7B"));
        let ch = format!("p:{{{}}}:released", escape_tag("a}b"));
        assert_eq!(
            key_of_channel("p:", &ch).map(unescape_tag),
            Some("a}b".into())
        );
    }
}
