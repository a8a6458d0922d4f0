//! Endpoints, channels and failover: one lazily connected HTTP/2 channel per
//! endpoint (TLS for `https://`), a shared "current endpoint" that every
//! failure moves on, the bearer token every call carries, and the retry
//! loop for unary calls. Owns no lock state.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::backoff::{Backoff, RetryPolicy};
use super::error::{self, Error};
use crate::pb::lock_service_client::LockServiceClient;

/// Connection settings of a [`Client`](super::Client).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) http2_keepalive_interval: Duration,
    pub(crate) http2_keepalive_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) tls: TlsSettings,
    pub(crate) token: Option<Secret>,
}

/// A secret string that never prints.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// TLS settings for `https://` endpoints, PEM.
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    pub(crate) domain: Option<String>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsSettings {
    fn is_set(&self) -> bool {
        self.ca_pem.is_some() || self.identity_pem.is_some() || self.domain.is_some()
    }

    /// The CA given, or else the system's roots; the client certificate
    /// and the name to verify, when given.
    fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// Adds `authorization: Bearer <token>` to every call, marked sensitive so
/// HTTP/2 never puts it in its header compression table.
#[derive(Clone)]
pub(crate) struct Credentials(Option<AsciiMetadataValue>);

impl Credentials {
    fn new(token: Option<&Secret>) -> Result<Self, Error> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        let mut value =
            MetadataValue::try_from(format!("Bearer {}", token.0.trim())).map_err(|_| {
                Error::InvalidArgument("the bearer token must be printable ASCII".into())
            })?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that carries the client's credentials.
pub(crate) type Conn = InterceptedService<Channel, Credentials>;

impl Default for Settings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            tls: TlsSettings::default(),
            token: None,
        }
    }
}

struct Target {
    uri: String,
    channel: Channel,
}

/// The endpoints of one client and the one it currently talks to.
pub(crate) struct Transport {
    targets: Vec<Target>,
    credentials: Credentials,
    current: AtomicUsize,
    pub(crate) settings: Settings,
}

/// `host:port` becomes `http://host:port`; anything else must be an
/// `http://` or `https://` URL.
pub(crate) fn normalize(endpoint: &str) -> Result<String, Error> {
    let e = endpoint.trim();
    let invalid = |reason: &str| Error::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    if e.is_empty() {
        return Err(invalid("it is empty"));
    }
    let url = if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(invalid("the scheme must be http:// or https://"));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(&format!("not a URL ({e})")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("it has no host"));
    }
    Ok(url)
}

impl Transport {
    /// Channels for `endpoints` (already normalized). Nothing connects
    /// until the first call.
    /// TLS settings with an `http://` endpoint are refused rather than
    /// ignored: a client configured for TLS must never fall back to
    /// plaintext because of a typo in a URL.
    pub(crate) fn new(endpoints: Vec<String>, settings: Settings) -> Result<Self, Error> {
        let mut targets = Vec::with_capacity(endpoints.len());
        let credentials = Credentials::new(settings.token.as_ref())?;
        for uri in endpoints {
            let invalid = |reason: String| Error::InvalidEndpoint {
                endpoint: uri.clone(),
                reason,
            };
            let mut endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|e| invalid(error::one_line(&e.to_string())))?;
            if uri.starts_with("https://") {
                endpoint = endpoint
                    .tls_config(settings.tls.config())
                    .map_err(|e| invalid(error::one_line(&format!("TLS: {e}"))))?;
            } else if settings.tls.is_set() {
                return Err(invalid(
                    "TLS settings (CA, client certificate, domain) are given but the endpoint is http://; use https://".into(),
                ));
            }
            let endpoint = endpoint
                .connect_timeout(settings.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(settings.http2_keepalive_interval)
                .keep_alive_timeout(settings.http2_keepalive_timeout)
                .keep_alive_while_idle(true);
            targets.push(Target {
                uri,
                channel: endpoint.connect_lazy(),
            });
        }
        if targets.is_empty() {
            return Err(Error::InvalidEndpoint {
                endpoint: String::new(),
                reason: "no endpoint given".into(),
            });
        }
        Ok(Self {
            targets,
            credentials,
            current: AtomicUsize::new(0),
            settings,
        })
    }

    /// How many endpoints there are.
    pub(crate) fn len(&self) -> usize {
        self.targets.len()
    }

    /// The endpoint to use now, and its channel with the credentials.
    pub(crate) fn pick(&self) -> (usize, Conn) {
        let i = self.current.load(Ordering::Relaxed) % self.targets.len();
        let channel = self.targets[i].channel.clone();
        (
            i,
            InterceptedService::new(channel, self.credentials.clone()),
        )
    }

    /// The URL of endpoint `i`.
    pub(crate) fn uri(&self, i: usize) -> &str {
        &self.targets[i % self.targets.len()].uri
    }

    /// Every endpoint, comma-separated, for error messages.
    pub(crate) fn uris(&self) -> String {
        self.targets
            .iter()
            .map(|t| t.uri.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Endpoint `i` failed: move on to the next one, unless another caller
    /// already did.
    pub(crate) fn failed(&self, i: usize) {
        let n = self.targets.len();
        let _ = self
            .current
            .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Makes a run of retries of one call: every endpoint is tried once
    /// before a (jittered) sleep, and the run gives up after `retry_for`.
    pub(crate) fn retries(&self) -> Retries<'_> {
        Retries {
            transport: self,
            backoff: self.settings.retry.backoff(),
            started: None,
            failures: 0,
        }
    }

    /// Runs a unary call with the request timeout, retrying UNAVAILABLE
    /// and broken connections across endpoints.
    pub(crate) async fn unary<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: FnMut(LockServiceClient<Conn>, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.unary_on(LockServiceClient::new, call).await
    }

    /// [`Transport::unary`] on another service's client (`make` builds it
    /// on a channel), such as the AdminService's.
    pub(crate) async fn unary_on<C, T, F, Fut>(
        &self,
        make: fn(Conn) -> C,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(C, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut retries = self.retries();
        let timeout = self.settings.request_timeout;
        loop {
            let (i, channel) = self.pick();
            let client = make(channel);
            let result = match tokio::time::timeout(timeout, call(client, timeout)).await {
                Ok(result) => result,
                Err(_) => Err(Status::unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                ))),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(status) if error::retryable(&status) => {
                    retries.failed(i, &status).await?;
                }
                Err(status) => return Err(Error::from_status(&status)),
            }
        }
    }
}

/// One run of retries (see [`Transport::retries`]).
pub(crate) struct Retries<'a> {
    transport: &'a Transport,
    backoff: Backoff,
    started: Option<Instant>,
    failures: usize,
}

impl Retries<'_> {
    /// Records a retryable failure on endpoint `i`: moves to the next
    /// endpoint, sleeps after each full round, and gives up (with the
    /// error to return) once the run has lasted `retry_for`.
    pub(crate) async fn failed(&mut self, i: usize, status: &Status) -> Result<(), Error> {
        self.failed_because(i, error::cause(status)).await
    }

    /// [`Retries::failed`] with the cause already in words.
    pub(crate) async fn failed_because(&mut self, i: usize, cause: String) -> Result<(), Error> {
        let t = self.transport;
        t.failed(i);
        let started = *self.started.get_or_insert_with(Instant::now);
        let elapsed = started.elapsed();
        let budget = t.settings.retry.retry_for;
        tracing::debug!(endpoint = t.uri(i), %cause, "call failed; retrying");
        if elapsed >= budget {
            return Err(Error::Unavailable {
                endpoints: t.uris(),
                retried_for: Duration::from_millis(elapsed.as_millis() as u64),
                cause,
            });
        }
        self.failures += 1;
        if self.failures % t.len() == 0 {
            let delay = self.backoff.next_delay().min(budget - elapsed);
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    /// A call succeeded: the next failure starts a new run.
    pub(crate) fn succeeded(&mut self) {
        self.started = None;
        self.failures = 0;
        self.backoff.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized_or_rejected() {
        assert_eq!(
            normalize("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(normalize(" http://h:1 ").unwrap(), "http://h:1");
        assert_eq!(normalize("https://h:1").unwrap(), "https://h:1");
        for bad in ["", "ftp://h", "http://", "https://"] {
            let err = normalize(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidEndpoint { .. }), "{bad}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn tls_settings_refuse_plaintext_endpoints_and_tokens_never_print() {
        let settings = Settings {
            tls: TlsSettings {
                domain: Some("leasehold.internal".into()),
                ..TlsSettings::default()
            },
            token: Some(Secret("s3cret-token-0123456789".into())),
            ..Settings::default()
        };
        let err = Transport::new(vec!["http://127.0.0.1:1".into()], settings.clone())
            .err()
            .expect("http:// with TLS settings is refused");
        assert!(err.to_string().contains("https://"), "{err}");
        assert!(!format!("{settings:?}").contains("s3cret"));
    }
}
