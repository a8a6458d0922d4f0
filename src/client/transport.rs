//! Endpoints, channels and failover: one lazily connected HTTP/2 channel per
//! endpoint, a shared "current endpoint" that every failure moves on, and
//! the retry loop for unary calls. Owns no lock state.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::transport::{Channel, Endpoint};

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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
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
    current: AtomicUsize,
    pub(crate) settings: Settings,
}

/// `host:port` becomes `http://host:port`; anything else must be an
/// `http://` URL. TLS is not supported yet.
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
    if url.starts_with("https://") {
        return Err(invalid("TLS (https://) is not supported yet; use http://"));
    }
    if !url.starts_with("http://") {
        return Err(invalid("the scheme must be http://"));
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
    pub(crate) fn new(endpoints: Vec<String>, settings: Settings) -> Result<Self, Error> {
        let mut targets = Vec::with_capacity(endpoints.len());
        for uri in endpoints {
            let endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|e| Error::InvalidEndpoint {
                    endpoint: uri.clone(),
                    reason: error::one_line(&e.to_string()),
                })?
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
            current: AtomicUsize::new(0),
            settings,
        })
    }

    /// How many endpoints there are.
    pub(crate) fn len(&self) -> usize {
        self.targets.len()
    }

    /// The endpoint to use now, and its channel.
    pub(crate) fn pick(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Relaxed) % self.targets.len();
        (i, self.targets[i].channel.clone())
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
            backoff: Backoff::new(&self.settings.retry),
            started: None,
            failures: 0,
        }
    }

    /// Runs a unary call with the request timeout, retrying UNAVAILABLE
    /// and broken connections across endpoints.
    pub(crate) async fn unary<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut(LockServiceClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut retries = self.retries();
        let timeout = self.settings.request_timeout;
        loop {
            let (i, channel) = self.pick();
            let client = LockServiceClient::new(channel);
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
        for bad in ["", "https://h:1", "ftp://h", "http://"] {
            let err = normalize(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidEndpoint { .. }), "{bad}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }
}
