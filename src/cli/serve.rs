//! `leasehold serve`: flags, store selection, signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::auth::Authenticator;
use crate::lock::Limits;
use crate::server::connections::{DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_PROBE_STREAMS};
use crate::server::{self, ConnectionLimits, ServerConfig, ServerTls};
use crate::service::ServiceLimits;
use crate::service::queues::WaitQueues;
use crate::store::{self, LockStore, RedisConfig, RedisTls, redact_url};
use crate::task::{self, TaskGuard};

/// Flags of `leasehold serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on: gRPC, and over HTTP/1.1 or HTTP/2 the Connect
    /// protocol, gRPC-Web, `/healthz` and `/readyz`.
    #[arg(
        long,
        env = "LEASEHOLD_LISTEN",
        help_heading = "Listening and connections",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,
    /// Redis to store locks in: redis://, rediss:// (TLS), redis-cluster://,
    /// redis-sentinel:// (and rediss-cluster://, rediss-sentinel://).
    /// Without it, the embedded in-memory store (single process, not
    /// durable).
    #[arg(long, env = "LEASEHOLD_REDIS_URL", help_heading = "Store")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel (no braces).
    #[arg(
        long,
        env = "LEASEHOLD_KEY_PREFIX",
        help_heading = "Store",
        default_value = "leasehold:"
    )]
    pub key_prefix: String,
    /// TTL granted when a request asks for 0.
    #[arg(long, env = "LEASEHOLD_DEFAULT_TTL", help_heading = "Limits", default_value = "30s", value_parser = humantime::parse_duration)]
    pub default_ttl: Duration,
    /// Smallest TTL a request may ask for.
    #[arg(long, env = "LEASEHOLD_MIN_TTL", help_heading = "Limits", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub min_ttl: Duration,
    /// Largest TTL a request may ask for.
    #[arg(long, env = "LEASEHOLD_MAX_TTL", help_heading = "Limits", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_ttl: Duration,
    /// Longest server-side wait an Acquire may ask for.
    #[arg(long, env = "LEASEHOLD_MAX_WAIT", help_heading = "Limits", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Longest lock key, in bytes.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_KEY_BYTES",
        help_heading = "Limits",
        default_value_t = crate::lock::DEFAULT_MAX_KEY_BYTES
    )]
    pub max_key_bytes: usize,
    /// Longest owner string, in bytes.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_OWNER_BYTES",
        help_heading = "Limits",
        default_value_t = crate::lock::DEFAULT_MAX_OWNER_BYTES
    )]
    pub max_owner_bytes: usize,
    /// Most metadata entries per lock.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_METADATA_ENTRIES",
        help_heading = "Limits",
        default_value_t = crate::lock::DEFAULT_MAX_METADATA_ENTRIES
    )]
    pub max_metadata_entries: usize,
    /// Most metadata bytes per lock, keys and values together.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_METADATA_BYTES",
        help_heading = "Limits",
        default_value_t = crate::lock::DEFAULT_MAX_METADATA_BYTES
    )]
    pub max_metadata_bytes: usize,
    /// Bound on every store call; past it the call fails with UNAVAILABLE.
    #[arg(long, env = "LEASEHOLD_STORE_TIMEOUT", help_heading = "Store", default_value = "2s", value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,
    /// Redis connections in the command pool.
    #[arg(
        long,
        env = "LEASEHOLD_POOL_SIZE",
        help_heading = "Store",
        default_value_t = crate::store::redis::DEFAULT_POOL_SIZE
    )]
    pub pool_size: usize,
    /// Replicas that must acknowledge each grant (Redis WAIT) before it is
    /// answered; if fewer do within half the store timeout, the grant is
    /// undone and the call fails with UNAVAILABLE. 0: answer at once.
    /// See documentation/safety.md.
    #[arg(
        long,
        env = "LEASEHOLD_MIN_REPLICA_ACKS",
        help_heading = "Store",
        default_value_t = 0
    )]
    pub min_replica_acks: u32,
    /// Most Acquire/Release/renewal calls sent to a single Redis node in one
    /// script call when they queue behind each other; 1 sends each alone.
    /// Not used on a Redis Cluster. See documentation/redis.md.
    #[arg(long, env = "LEASEHOLD_REDIS_BATCH", help_heading = "Store", default_value_t = crate::store::redis::DEFAULT_BATCH_MAX as u64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub redis_batch: u64,
    /// How often the health check pings the store.
    #[arg(long, env = "LEASEHOLD_HEALTH_INTERVAL", help_heading = "Store", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// HTTP/2 PING interval, to detect clients that went silent.
    #[arg(long, env = "LEASEHOLD_KEEPALIVE_INTERVAL", help_heading = "Listening and connections", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection (and its
    /// KeepAlive streams, releasing their locks) is closed.
    #[arg(long, env = "LEASEHOLD_KEEPALIVE_TIMEOUT", help_heading = "Listening and connections", default_value = "5s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
    /// Concurrent KeepAlive streams one client connection may open.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_STREAMS_PER_CONNECTION",
        help_heading = "Limits",
        default_value_t = crate::service::DEFAULT_MAX_STREAMS_PER_CONNECTION
    )]
    pub max_streams_per_connection: usize,
    /// HTTP/2 streams one connection may have open at once: calls of every
    /// kind, Health Watch and reflection included. The client is told in
    /// SETTINGS; a stream over it is refused (REFUSED_STREAM).
    #[arg(
        long,
        env = "LEASEHOLD_MAX_CONCURRENT_STREAMS", help_heading = "Listening and connections",
        default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_concurrent_streams: u32,
    /// Client connections open at once; one more is closed as soon as it is
    /// accepted. Default: 10000, or the open-file limit (ulimit -n) minus
    /// 32 when that is lower.
    #[arg(long, env = "LEASEHOLD_MAX_CONNECTIONS", help_heading = "Listening and connections", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// How soon after it is accepted a connection must begin its first call
    /// (its TLS handshake and HTTP/2 preface come before); else it is closed.
    #[arg(long, env = "LEASEHOLD_HANDSHAKE_TIMEOUT", help_heading = "Listening and connections", default_value = HANDSHAKE_TIMEOUT, value_parser = positive_duration)]
    pub handshake_timeout: Duration,
    /// A connection with no call open for this long is closed; clients
    /// reconnect on their next call. A KeepAlive or Watch stream is a call
    /// in progress, however long it lasts.
    #[arg(long, env = "LEASEHOLD_IDLE_TIMEOUT", help_heading = "Listening and connections", default_value = IDLE_TIMEOUT, value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// Health Watch and reflection streams open at once on this server, all
    /// connections together: they need no credentials (unless
    /// --auth-protect-health) and last as long as the client likes. One
    /// more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "LEASEHOLD_MAX_PROBE_STREAMS", help_heading = "Limits", default_value_t = DEFAULT_MAX_PROBE_STREAMS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_probe_streams: usize,
    /// Locks one KeepAlive stream may keep alive.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_LOCKS_PER_STREAM",
        help_heading = "Limits",
        default_value_t = crate::service::DEFAULT_MAX_LOCKS_PER_STREAM
    )]
    pub max_locks_per_stream: usize,
    /// Acquire calls that may wait at once on this server.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_WAITERS",
        help_heading = "Limits",
        default_value_t = crate::server::DEFAULT_MAX_WAITERS
    )]
    pub max_waiters: usize,
    /// Acquire calls one tenant (without --auth-file: one connection) may
    /// have waiting at once on this server, so that no caller can fill
    /// --max-waiters alone. Past it, a waiting Acquire still tries once.
    #[arg(long, env = "LEASEHOLD_MAX_WAITERS_PER_CALLER", help_heading = "Limits", default_value_t = crate::service::quota::DEFAULT_MAX_WAITERS_PER_CALLER)]
    pub max_waiters_per_caller: usize,
    /// Watch streams open at once on this server (all callers); one more
    /// is RESOURCE_EXHAUSTED.
    #[arg(long, env = "LEASEHOLD_MAX_WATCHES", help_heading = "Limits", default_value_t = crate::service::DEFAULT_MAX_WATCHES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_watches: usize,
    /// KeepAlive and Watch streams one tenant (without --auth-file: one
    /// connection) may have open at once on this server.
    #[arg(long, env = "LEASEHOLD_MAX_STREAMS_PER_CALLER", help_heading = "Limits", default_value_t = crate::service::quota::DEFAULT_MAX_STREAMS_PER_CALLER)]
    pub max_streams_per_caller: usize,
    /// Locks one tenant (without --auth-file: one connection) may keep
    /// alive over KeepAlive streams at once on this server.
    #[arg(long, env = "LEASEHOLD_MAX_LOCKS_PER_CALLER", help_heading = "Limits", default_value_t = crate::service::quota::DEFAULT_MAX_LOCKS_PER_CALLER)]
    pub max_locks_per_caller: usize,
    /// Acquire calls one tenant (without --auth-file: one connection) may
    /// make a second on this server (a burst of a second's worth is
    /// allowed). It bounds how fast a caller can create lock names, each of
    /// which costs Redis a fencing counter for a while.
    #[arg(long, env = "LEASEHOLD_MAX_ACQUIRES_PER_SECOND_PER_CALLER", help_heading = "Limits", default_value_t = crate::service::quota::DEFAULT_MAX_ACQUIRES_PER_SECOND_PER_CALLER, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_acquires_per_second_per_caller: u32,
    /// Longest a graceful shutdown may take before the process exits anyway.
    #[arg(long, env = "LEASEHOLD_SHUTDOWN_GRACE", help_heading = "Listening and connections", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// PEM certificate chain for TLS on the listening port (with
    /// --tls-key), every protocol on it. Without it the port speaks
    /// plaintext HTTP/2 and HTTP/1.1, and bearer tokens and lock tokens
    /// cross the network readable by anyone on the path.
    #[arg(
        long,
        env = "LEASEHOLD_TLS_CERT",
        help_heading = "Authentication and TLS",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "LEASEHOLD_TLS_KEY",
        help_heading = "Authentication and TLS",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle for mutual TLS: every client must present a
    /// certificate signed by it, so a stolen token alone is not enough.
    #[arg(
        long,
        env = "LEASEHOLD_TLS_CLIENT_CA",
        help_heading = "Authentication and TLS",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// TOML file of tenants: their bearer tokens (or their SHA-256), client
    /// certificate names, and the key prefixes each may use. Without it,
    /// every caller may use every key. Reloaded on SIGHUP; a bad file is
    /// refused and the previous one stays in force.
    #[arg(
        long,
        env = "LEASEHOLD_AUTH_FILE",
        help_heading = "Authentication and TLS",
        value_name = "TOML"
    )]
    pub auth_file: Option<PathBuf>,
    /// Require credentials for health and reflection too. Off by default,
    /// so that probes (which cannot send a token) and tools keep working.
    #[arg(
        long,
        env = "LEASEHOLD_AUTH_PROTECT_HEALTH",
        help_heading = "Authentication and TLS",
        requires = "auth_file"
    )]
    pub auth_protect_health: bool,
    /// Serve the AdminService (List, ForceRelease) without an auth file.
    /// Without one, anyone who reaches the port could take any lock from
    /// its holder, so it is off unless asked for; with an auth file it is
    /// always served, to tenants with `admin = true` only.
    #[arg(long, env = "LEASEHOLD_ADMIN", help_heading = "Authentication and TLS")]
    pub admin: bool,
    /// Serve the web dashboard at /ui/ on the listening port: a page that
    /// lists locks, follows one live and force-releases it, calling the
    /// server with the bearer token typed into it (List needs the admin
    /// grant, so also give --admin or an auth file). Off by default; use it
    /// with TLS or on loopback, as the token crosses the network.
    #[arg(long, env = "LEASEHOLD_UI", help_heading = "Listening and connections")]
    pub ui: bool,
    /// PEM CA bundle that Redis's certificate must chain to, for rediss://
    /// (default: the system's CAs).
    #[arg(
        long,
        env = "LEASEHOLD_REDIS_TLS_CA",
        help_heading = "Store",
        value_name = "PEM"
    )]
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate for Redis's `tls-auth-clients` (with
    /// --redis-tls-key).
    #[arg(
        long,
        env = "LEASEHOLD_REDIS_TLS_CERT",
        help_heading = "Store",
        value_name = "PEM",
        requires = "redis_tls_key"
    )]
    pub redis_tls_cert: Option<PathBuf>,
    /// PEM private key of --redis-tls-cert.
    #[arg(
        long,
        env = "LEASEHOLD_REDIS_TLS_KEY",
        help_heading = "Store",
        value_name = "PEM",
        requires = "redis_tls_cert"
    )]
    pub redis_tls_key: Option<PathBuf>,
    /// Origin whose browser pages may call the server over gRPC-Web and
    /// Connect (CORS), e.g. `https://app.example.com`; repeat the flag or
    /// separate with commas; `*` allows any origin. Off by default: no
    /// cross-origin request is answered. Bearer tokens still apply.
    #[arg(
        long,
        env = "LEASEHOLD_CORS_ALLOW_ORIGIN",
        help_heading = "Listening and connections",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub cors_allow_origin: Vec<String>,
    /// Serve Prometheus metrics over HTTP at this address (path /metrics).
    #[arg(long, env = "LEASEHOLD_METRICS_LISTEN", help_heading = "Observability")]
    pub metrics_listen: Option<SocketAddr>,
}

/// The `--redis-url` schemes the Redis store understands.
const REDIS_SCHEMES: [&str; 6] = [
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
];

/// `--handshake-timeout`'s default, [`crate::server::connections::DEFAULT_HANDSHAKE_TIMEOUT`].
const HANDSHAKE_TIMEOUT: &str = "10s";
/// `--idle-timeout`'s default, [`crate::server::connections::DEFAULT_IDLE_TIMEOUT`].
const IDLE_TIMEOUT: &str = "5m";

/// A duration above zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be more than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("--{flag} {}: {e}", path.display()))
}

fn ms(field: &str, d: Duration) -> Result<u32, String> {
    u32::try_from(d.as_millis()).map_err(|_| format!("--{field} is too large"))
}

impl ServeArgs {
    /// The server configuration these flags describe, checked.
    pub fn server_config(&self) -> Result<ServerConfig, String> {
        let fields = Limits {
            default_ttl_ms: ms("default-ttl", self.default_ttl)?,
            min_ttl_ms: ms("min-ttl", self.min_ttl)?,
            max_ttl_ms: ms("max-ttl", self.max_ttl)?,
            max_wait_ms: ms("max-wait", self.max_wait)?,
            max_key_bytes: self.max_key_bytes,
            max_owner_bytes: self.max_owner_bytes,
            max_metadata_entries: self.max_metadata_entries,
            max_metadata_bytes: self.max_metadata_bytes,
            ..Limits::default()
        };
        self.check_ttl_flags()?;
        fields.check()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let tls = ServerTls {
                    cert_pem: read_pem("tls-cert", cert)?,
                    key_pem: read_pem("tls-key", key)?,
                    client_ca_pem: match &self.tls_client_ca {
                        Some(ca) => Some(read_pem("tls-client-ca", ca)?),
                        None => None,
                    },
                };
                tls.check()
                    .map_err(|e| format!("--tls-cert/--tls-key/--tls-client-ca: {e}"))?;
                Some(tls)
            }
            _ => None,
        };
        let auth = match &self.auth_file {
            Some(path) => Some(Arc::new(Authenticator::from_file(
                path,
                self.auth_protect_health,
            )?)),
            None => None,
        };
        crate::server::protocols::cors(&self.cors_allow_origin)
            .map_err(|e| format!("--cors-allow-origin: {e}"))?;
        Ok(ServerConfig {
            admin: self.admin,
            ui: self.ui,
            cors_allow_origins: self.cors_allow_origin.clone(),
            limits: ServiceLimits {
                fields,
                max_streams_per_connection: self.max_streams_per_connection,
                max_locks_per_stream: self.max_locks_per_stream,
                per_caller: crate::service::quota::QuotaLimits {
                    waiters: self.max_waiters_per_caller,
                    streams: self.max_streams_per_caller,
                    locks: self.max_locks_per_caller,
                    acquires_per_second: self.max_acquires_per_second_per_caller,
                },
                // Set from the keepalive flags by `server::run`.
                silence_release: None,
                max_watches: self.max_watches,
            },
            health_interval: self.health_interval,
            store_timeout: self.store_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            shutdown_grace: self.shutdown_grace,
            connections: ConnectionLimits {
                max_concurrent_streams: self.max_concurrent_streams,
                max_connections: self
                    .max_connections
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                handshake_timeout: self.handshake_timeout,
                idle_timeout: self.idle_timeout,
                max_probe_streams: self.max_probe_streams,
            },
            max_waiters: self.max_waiters,
            tls,
            auth,
        })
    }

    /// The TTL flags against each other, named as the user typed them
    /// (the limits' own check speaks of milliseconds).
    fn check_ttl_flags(&self) -> Result<(), String> {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if self.min_ttl > self.max_ttl {
            return Err(format!(
                "--min-ttl {} is above --max-ttl {}",
                show(self.min_ttl),
                show(self.max_ttl)
            ));
        }
        if !(self.min_ttl..=self.max_ttl).contains(&self.default_ttl) {
            return Err(format!(
                "--default-ttl {} is outside --min-ttl {} .. --max-ttl {}",
                show(self.default_ttl),
                show(self.min_ttl),
                show(self.max_ttl)
            ));
        }
        Ok(())
    }

    /// Refuses a `--redis-url` whose scheme the Redis store does not know,
    /// at start-up, instead of a server that sits NOT_SERVING. Never echoes
    /// the URL's password.
    pub fn check_redis_url(&self) -> Result<(), String> {
        let Some(url) = &self.redis_url else {
            return Ok(());
        };
        let valid = REDIS_SCHEMES
            .iter()
            .map(|s| format!("{s}://"))
            .collect::<Vec<_>>()
            .join(", ");
        match url.split_once("://") {
            Some((scheme, _)) if REDIS_SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)) => {
                Ok(())
            }
            Some(_) => Err(format!(
                "--redis-url {}: unknown scheme; use one of {valid}",
                redact_url(url)
            )),
            None => Err(format!(
                "--redis-url has no scheme; use one of {valid} (redis://HOST:6379)"
            )),
        }
    }

    /// Trust and identity for a rediss:// URL, when a flag sets them.
    pub fn redis_tls(&self) -> Result<Option<RedisTls>, String> {
        if self.redis_tls_ca.is_none() && self.redis_tls_cert.is_none() {
            return Ok(None);
        }
        let ca_pem = match &self.redis_tls_ca {
            Some(path) => Some(read_pem("redis-tls-ca", path)?),
            None => None,
        };
        let client_pem = match (&self.redis_tls_cert, &self.redis_tls_key) {
            (Some(cert), Some(key)) => Some((
                read_pem("redis-tls-cert", cert)?,
                read_pem("redis-tls-key", key)?,
            )),
            _ => None,
        };
        Ok(Some(RedisTls { ca_pem, client_pem }))
    }
}

/// Reloads the auth file on every SIGHUP, for as long as it lives. A file
/// that does not parse is refused whole and the policy in force stays.
/// Without an auth file, SIGHUP is logged and ignored (instead of its
/// default action, ending the process).
fn reload_on_sighup(auth: Option<Arc<Authenticator>>) -> Option<TaskGuard> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the auth file will not reload");
            return None;
        }
    };
    Some(task::spawn("auth-reload", async move {
        while hangups.recv().await.is_some() {
            let Some(auth) = &auth else {
                tracing::info!("SIGHUP: no --auth-file, nothing to reload");
                continue;
            };
            let file = auth
                .file()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            match auth.reload() {
                Ok(tenants) => tracing::info!(file, tenants, "auth file reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "auth file not reloaded; the previous one stays in force"
                ),
            }
        }
    }))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the server until SIGTERM/SIGINT.
pub async fn run(args: ServeArgs) -> Result<(), String> {
    args.check_redis_url()?;
    let config = args.server_config()?;
    if let Some(addr) = args.metrics_listen {
        crate::metrics::install(addr)?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    let redis_tls = args.redis_tls()?;
    if redis_tls.is_some() && args.redis_url.is_none() {
        return Err("--redis-tls-ca/--redis-tls-cert need --redis-url rediss://...".into());
    }
    if let Some(auth) = &config.auth {
        tracing::info!(
            file = %auth.file().map(|p| p.display().to_string()).unwrap_or_default(),
            protect_health = auth.protects_health(),
            "authentication on: bearer tokens / client certificates, per-tenant key prefixes"
        );
        if config.tls.is_none() {
            tracing::warn!(
                "--auth-file without --tls-cert: bearer tokens cross the network in plaintext"
            );
        }
    }
    if config.admin && config.auth.is_none() {
        tracing::warn!(
            "--admin without --auth-file: anyone who reaches this port can list every lock and take it from its holder"
        );
    }
    if config.ui {
        if !config.admin && config.auth.is_none() {
            tracing::warn!(
                "--ui without --admin or --auth-file: the dashboard cannot list locks (the AdminService is not served)"
            );
        }
        if config.tls.is_none() && !args.listen.ip().is_loopback() {
            tracing::warn!(
                "--ui without --tls-cert on a non-loopback address: the token typed into the dashboard crosses the network in plaintext"
            );
        }
    }
    let _reload = reload_on_sighup(config.auth.clone());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let waiters = WaitQueues::new(config.max_waiters);
    let max_connections = config.connections.max_connections();
    let redis = match &args.redis_url {
        None => {
            tracing::warn!(
                "no --redis-url: using the embedded in-memory store; it is single-process and not durable (locks are lost on restart, and servers do not share them)"
            );
            None
        }
        Some(url) => {
            tracing::info!(redis = %redact_url(url), "connecting to Redis");
            Some(RedisConfig {
                url: url.clone(),
                prefix: args.key_prefix.clone(),
                pool_size: args.pool_size,
                timeout: args.store_timeout,
                tls: redis_tls,
                min_replica_acks: args.min_replica_acks,
                batch_max: usize::try_from(args.redis_batch).unwrap_or(1),
            })
        }
    };
    let store = Arc::new(store::open(redis.as_ref(), waiters.clone()).await?);
    tracing::info!(%addr, store = store.name(), tls = config.tls.is_some(), max_connections, "listening");
    let result = server::run(store.clone(), waiters, config, listener, termination()).await;
    store.close().await;
    result.map_err(|e| format!("server error: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn connection_defaults_are_the_named_constants() {
        let cli = Cli::try_parse_from(["serve"]).unwrap();
        let config = cli.serve.server_config().unwrap();
        assert_eq!(config.connections, ConnectionLimits::default());
        let ttl = |args: &[&str]| {
            let mut argv = vec!["serve"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv)
                .unwrap()
                .serve
                .server_config()
                .unwrap_err()
        };
        assert_eq!(
            ttl(&["--min-ttl", "10s", "--max-ttl", "1s"]),
            "--min-ttl 10s is above --max-ttl 1s"
        );
        assert!(
            ttl(&["--default-ttl", "2h"])
                .starts_with("--default-ttl 2h is outside --min-ttl 100ms")
        );
        for zero in [
            "--handshake-timeout=0s",
            "--idle-timeout=0s",
            "--max-connections=0",
        ] {
            assert!(Cli::try_parse_from(["serve", zero]).is_err(), "{zero}");
        }
    }

    /// Every default is the library's own: a flag's clap default and the
    /// `Default` of the setting it fills never drift apart.
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["serve"]).unwrap();
        let config = cli.serve.server_config().unwrap();
        let library = ServerConfig::default();
        assert_eq!(
            format!("{:?}", config.limits),
            format!("{:?}", library.limits)
        );
        assert_eq!(
            (
                config.health_interval,
                config.store_timeout,
                config.keepalive_interval,
                config.keepalive_timeout,
                config.shutdown_grace,
                config.max_waiters,
            ),
            (
                library.health_interval,
                library.store_timeout,
                library.keepalive_interval,
                library.keepalive_timeout,
                library.shutdown_grace,
                library.max_waiters,
            )
        );
        let redis = RedisConfig::default();
        assert_eq!(
            (
                cli.serve.key_prefix.as_str(),
                cli.serve.pool_size,
                cli.serve.store_timeout,
                cli.serve.min_replica_acks,
                usize::try_from(cli.serve.redis_batch).unwrap(),
            ),
            (
                redis.prefix.as_str(),
                redis.pool_size,
                redis.timeout,
                redis.min_replica_acks,
                redis.batch_max,
            )
        );
    }

    #[test]
    fn unknown_redis_schemes_are_refused_without_the_password() {
        let check = |url: &str| {
            Cli::try_parse_from(["serve", "--redis-url", url])
                .unwrap()
                .serve
                .check_redis_url()
        };
        for ok in [
            "redis://h:6379",
            "REDISS://h",
            "rediss-cluster://h",
            "redis-sentinel://h/mymaster",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        let err = check("http://user:hunter2-password@localhost:6379").unwrap_err();
        assert!(
            err.contains("unknown scheme") && err.contains("redis-cluster://"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let err = check("user:hunter2-password@localhost:6379").unwrap_err();
        assert!(
            err.contains("no scheme") && !err.contains("hunter2"),
            "{err}"
        );
    }
}
