//! Counts the calls in progress, per connection (for the idle deadline
//! of [`super::connections`]) and, for Health Watch and reflection
//! streams, on the whole server (`--max-probe-streams`). A call is in
//! progress until its response body ends, so a stream counts for as long
//! as it lasts. This layer knows paths and peers, never what a call does.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::connections::{CallGuard, ProbeGuard, Registry};

/// The long-lived calls [`super::connections::DEFAULT_MAX_PROBE_STREAMS`] counts.
const PROBE_STREAM_PATHS: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Counts the calls open on each connection, for its idle deadline, and
/// refuses a probe stream over the server-wide limit.
#[derive(Debug, Clone)]
pub struct ActivityLayer {
    registry: Arc<Registry>,
}

impl ActivityLayer {
    /// A layer reporting to `registry`, shared with [`super::connections::incoming`].
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl<S> Layer<S> for ActivityLayer {
    type Service = CountCalls<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountCalls {
            inner,
            registry: self.registry.clone(),
        }
    }
}

/// The service made by [`ActivityLayer`].
#[derive(Debug, Clone)]
pub struct CountCalls<S> {
    inner: S,
    registry: Arc<Registry>,
}

fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

impl<S, B> Service<http::Request<B>> for CountCalls<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let probe = if PROBE_STREAM_PATHS.contains(&req.uri().path()) {
            match self.registry.open_probe_stream() {
                Some(guard) => Some(guard),
                None => {
                    tracing::debug!(
                        path = req.uri().path(),
                        "probe stream refused: --max-probe-streams reached"
                    );
                    let status = tonic::Status::resource_exhausted(format!(
                        "too many Health Watch and reflection streams on this server \
                         (--max-probe-streams {})",
                        self.registry.max_probe_streams
                    ));
                    let response = status.into_http::<Body>();
                    return Box::pin(async move { Ok(response) });
                }
            }
        } else {
            None
        };
        let call_guard = peer_of(&req)
            .and_then(|peer| self.registry.get(&peer))
            .map(CallGuard::new);
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            Ok(if call_guard.is_some() || probe.is_some() {
                // The call stays open, and counted, until its response
                // body ends.
                response.map(|body| {
                    Body::new(Guarded {
                        body,
                        _call: call_guard,
                        _probe: probe,
                    })
                })
            } else {
                response
            })
        })
    }
}

/// A response body that keeps its call counted until it is dropped.
struct Guarded {
    body: Body,
    _call: Option<CallGuard>,
    _probe: Option<ProbeGuard>,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
