//! The tower layer that authenticates every call before it reaches a
//! service, and hands its decision on as an [`Access`] extension.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::{Access, Authenticator, Caller};

/// Paths that stay open unless `--auth-protect-health`: probes (Kubernetes'
/// gRPC probes cannot send a token) and reflection (it describes the API,
/// never a lock).
const PROBE_PATHS: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Authenticates calls with an [`Authenticator`], or lets every call
/// through as [`Access::Open`] when there is none.
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    auth: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    /// A layer enforcing `auth`, or open when `None`.
    pub fn new(auth: Option<Arc<Authenticator>>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let decision = match &self.auth {
            None => Ok(Access::Open),
            Some(auth) => {
                let path = req.uri().path();
                if !auth.protects_health() && PROBE_PATHS.iter().any(|p| path.starts_with(p)) {
                    Ok(Access::Open)
                } else {
                    let tls = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
                    let certs = tls.and_then(|i| i.peer_certs());
                    auth.identify(req.headers(), certs.as_deref().map(Vec::as_slice))
                        .map(|(credential, tenant)| {
                            Access::Caller(Arc::new(Caller {
                                auth: auth.clone(),
                                credential,
                                tenant,
                            }))
                        })
                }
            }
        };
        // Nothing after this layer needs the token; nothing can leak it.
        req.headers_mut().remove(http::header::AUTHORIZATION);
        match decision {
            Ok(access) => {
                req.extensions_mut().insert(access);
                Box::pin(self.inner.call(req))
            }
            Err(e) => {
                let peer = req
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(TcpConnectInfo::remote_addr)
                    .or_else(|| {
                        req.extensions()
                            .get::<TlsConnectInfo<TcpConnectInfo>>()
                            .and_then(|i| i.get_ref().remote_addr())
                    });
                tracing::debug!(path = req.uri().path(), ?peer, reason = %e, "call refused: unauthenticated");
                let response = tonic::Status::from(e).into_http::<Body>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
