//! Assembles the server: the lock service, health, reflection, TLS,
//! authentication, HTTP/2 keepalive, limits and graceful shutdown, and on
//! the same listener, over HTTP/1.1 and HTTP/2, gRPC-Web, the Connect
//! protocol, HTTP health endpoints and the web dashboard ([`protocols`]). `run` takes its listener and its
//! shutdown signal as arguments, so tests bind 127.0.0.1:0 and stop it at
//! will (mini-redis `server::run`). Connections are accepted by
//! [`connections`], which bounds them before tonic sees them.

pub mod calls;
mod connect;
pub mod connections;
pub mod protocols;
mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use connections::ConnectionLimits;

use crate::auth::{AuthLayer, Authenticator};
use crate::pb;
use crate::service::queues::WaitQueues;
use crate::service::{AdminServiceImpl, LockServiceImpl, ServiceLimits};
use crate::store::{Instrumented, LockStore};
use crate::task;

/// Largest request message accepted. Requests are small (a key, an owner,
/// 4 KiB of metadata); anything far bigger is hostile.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Everything the server needs besides its store and listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Per-request and per-stream limits.
    pub limits: ServiceLimits,
    /// How often health pings the store.
    pub health_interval: Duration,
    /// Bound on each health ping.
    pub store_timeout: Duration,
    /// HTTP/2 PING interval, to detect silent clients.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dead.
    pub keepalive_timeout: Duration,
    /// How long a graceful shutdown may take before the server exits anyway.
    pub shutdown_grace: Duration,
    /// Streams per connection, open connections, handshake and idle
    /// deadlines.
    pub connections: ConnectionLimits,
    /// Waiting Acquire calls allowed at once; whoever builds the
    /// [`WaitQueues`] shared with the store sizes them with this.
    pub max_waiters: usize,
    /// TLS on the gRPC port; `None` serves plaintext HTTP/2.
    pub tls: Option<ServerTls>,
    /// Bearer-token / client-certificate authentication and key scopes;
    /// `None` lets every caller use every key.
    pub auth: Option<Arc<Authenticator>>,
    /// Origins whose browser pages may call the server (gRPC-Web, Connect):
    /// `*` for any; empty, the default, answers no cross-origin request.
    pub cors_allow_origins: Vec<String>,
    /// Serve the AdminService without an auth file (`--admin`). With one,
    /// it is always served and admits only tenants with `admin = true`;
    /// without one, anyone who can reach the port could take any lock, so
    /// it is off unless asked for.
    pub admin: bool,
    /// Serve the web dashboard's page at `/ui/` (`--ui`). The page holds no
    /// rights of its own: it calls the services with the token typed into
    /// it.
    pub ui: bool,
}

/// The server's TLS identity and, for mutual TLS, the CA its clients'
/// certificates must chain to. PEM, as read from the files.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// The certificate's private key.
    pub key_pem: Vec<u8>,
    /// When set, every client must present a certificate signed by this CA.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("key_pem", &"<redacted>")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Checks that the PEM parses and the key matches, for start-up.
    pub fn check(&self) -> Result<(), String> {
        self.rustls_config().map(|_| ())
    }

    /// The TLS configuration of the listener: this identity, client
    /// certificates required when a client CA is set, and both HTTP/2 and
    /// HTTP/1.1 offered (ALPN), for gRPC and for the HTTP protocols.
    fn rustls_config(&self) -> Result<rustls::ServerConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        if certs.is_empty() {
            return Err("certificate: no certificate in the PEM".into());
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("key: {e}"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| format!("client CA: {e}"))?;
                    roots.add(cert).map_err(|e| format!("client CA: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// `--max-waiters`'s default: Acquires waiting on this server at once.
pub const DEFAULT_MAX_WAITERS: usize = 10_000;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: ServiceLimits::default(),
            health_interval: Duration::from_secs(1),
            store_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            connections: ConnectionLimits::default(),
            max_waiters: DEFAULT_MAX_WAITERS,
            tls: None,
            auth: None,
            cors_allow_origins: Vec::new(),
            admin: false,
            ui: false,
        }
    }
}

/// Serves Leasehold on `listener` until `shutdown` resolves, then shuts down
/// gracefully: health goes NOT_SERVING, KeepAlive streams and waiting
/// Acquires end with UNAVAILABLE (locks stay held until their TTL), other
/// in-flight calls finish.
pub async fn run<S: LockStore>(
    store: Arc<S>,
    waiters: Arc<WaitQueues>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let stopping = CancellationToken::new();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    let _health_task = task::spawn(
        "health",
        watch_store(
            store.clone(),
            reporter.clone(),
            config.clone(),
            stopping.clone(),
        ),
    );

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor set is valid");

    let store = Arc::new(Instrumented(store));
    let mut limits = config.limits.clone();
    // hyper declares a connection dead no sooner than this after the last
    // frame it read from the client (a PING goes out after an interval of
    // silence, and the connection ends if its ack is not back in time);
    // KeepAlive streams tell their clients, who must stop believing by then.
    limits.silence_release = Some(config.keepalive_interval + config.keepalive_timeout);
    let admin_service = (config.auth.is_some() || config.admin).then(|| {
        pb::admin_service_server::AdminServiceServer::new(AdminServiceImpl::new(
            store.clone(),
            limits.fields.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
    });
    let service = LockServiceImpl::new(store, waiters, limits, stopping.clone());
    let lock_service = pb::lock_service_server::LockServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let registry = Arc::new(connections::Registry::new(&config.connections));
    let signal = {
        let stopping = stopping.clone();
        let mut reporter = reporter.clone();
        async move {
            shutdown.await;
            tracing::info!(
                "shutting down: NOT_SERVING, ending streams without releasing their locks"
            );
            set_health(&reporter, ServingStatus::NotServing).await;
            stopping.cancel();
            // Health Watch streams never end by themselves and would hold up
            // the graceful shutdown: dropping the statuses ends them, right
            // after they delivered NOT_SERVING.
            reporter.clear_service_status("").await;
            reporter.clear_service_status(pb::SERVICE_NAME).await;
        }
    };
    // `serve` checks the origins at start-up; one that slipped through
    // allows nothing rather than everything.
    let cors = protocols::cors(&config.cors_allow_origins).unwrap_or_else(|e| {
        tracing::error!(error = %e, "CORS disabled");
        None
    });
    // HTTP/1.1 too, for Connect, gRPC-Web and the health endpoints; gRPC
    // itself still needs HTTP/2.
    // TLS is ours, not tonic's (its TLS offers only HTTP/2 in ALPN); a
    // configuration `check` accepted cannot fail here.
    let tls = match &config.tls {
        Some(tls) => Some(Arc::new(tls.rustls_config()?)),
        None => None,
    };
    let router = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(Some(config.connections.max_concurrent_streams))
        .http2_max_local_error_reset_streams(Some(connections::MAX_LOCAL_RESET_STREAMS))
        .layer(calls::ActivityLayer::new(registry.clone()))
        .layer(crate::service::delivery::DeliveryLayer)
        .layer(protocols::ProtocolLayer::new(cors, config.ui))
        .layer(crate::service::wire::layer())
        .layer(AuthLayer::new(config.auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(lock_service)
        .add_optional_service(admin_service);
    let serve: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match tls {
        None => {
            let incoming = connections::incoming(listener, &config.connections, registry);
            Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
        }
        Some(tls) => {
            let incoming = connections::incoming_tls(listener, &config.connections, registry, tls);
            Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
        }
    };
    tokio::pin!(serve);
    let grace = async {
        stopping.cancelled().await;
        tokio::time::sleep(config.shutdown_grace).await;
    };
    tokio::select! {
        result = &mut serve => Ok(result?),
        _ = grace => {
            tracing::warn!(grace = ?config.shutdown_grace, "graceful shutdown took too long; exiting anyway");
            Ok(())
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(pb::SERVICE_NAME, status).await;
}

/// Pings the store every `health_interval`: SERVING while it answers,
/// NOT_SERVING while it does not, until shutdown begins.
async fn watch_store<S: LockStore>(
    store: Arc<S>,
    reporter: HealthReporter,
    config: ServerConfig,
    stopping: CancellationToken,
) {
    let mut current = None;
    let mut tick = tokio::time::interval(config.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = match tokio::time::timeout(config.store_timeout, store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                if current != Some(false) {
                    tracing::warn!(store = store.name(), error = %e, "store health check failed: NOT_SERVING");
                }
                false
            }
            Err(_) => {
                if current != Some(false) {
                    tracing::warn!(
                        store = store.name(),
                        "store health check timed out: NOT_SERVING"
                    );
                }
                false
            }
        };
        if current != Some(ok) && !stopping.is_cancelled() {
            if ok {
                tracing::info!(store = store.name(), "store reachable: SERVING");
            }
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&reporter, status).await;
            current = Some(ok);
        }
    }
}
