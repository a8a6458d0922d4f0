//! One listener, several protocols: routes each request by its
//! `content-type` before any service sees it.
//!
//! - `application/grpc…`: gRPC, passed straight through (the one check
//!   this layer adds to a gRPC call);
//! - `application/grpc-web…`: gRPC-Web, translated to gRPC by `tonic-web`;
//! - anything else is plain HTTP: `GET /healthz`, `GET /readyz`, the web
//!   dashboard's files under `/ui/` when `--ui` is on (`server/ui.rs`), and
//!   the Connect protocol for `leasehold.v1.LockService` and `AdminService`
//!   (`server/connect.rs`).
//!
//! Every protocol reaches the same inner stack (authentication, wire-error
//! codes, the services), which sits inside this layer, and the same
//! connection limits and delivery guard, which sit outside it. CORS, when
//! configured, applies to everything but gRPC (browsers cannot speak it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Method, Request, Response, StatusCode, header};
use tonic::body::Body;
use tower::{Layer, Service};
use tower_http::cors::CorsLayer;

use super::{connect, ui};

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Routes requests to gRPC, gRPC-Web, Connect and the HTTP health
/// endpoints; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct ProtocolLayer {
    cors: Option<Arc<CorsLayer>>,
    ui: bool,
}

impl ProtocolLayer {
    /// A router whose browser-facing protocols answer CORS requests from the
    /// origins `cors` allows, or no cross-origin request when `None`, and
    /// that serves the web dashboard at `/ui/` when `ui` is set.
    pub fn new(cors: Option<CorsLayer>, ui: bool) -> Self {
        Self {
            cors: cors.map(Arc::new),
            ui,
        }
    }
}

impl<S> Layer<S> for ProtocolLayer {
    type Service = Protocols<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Protocols {
            inner,
            cors: self.cors.clone(),
            ui: self.ui,
        }
    }
}

/// The service made by [`ProtocolLayer`].
#[derive(Debug, Clone)]
pub struct Protocols<S> {
    inner: S,
    /// Shared: hyper clones the whole service stack for every request, and
    /// a CORS policy is a few hundred bytes of vectors and header values.
    cors: Option<Arc<CorsLayer>>,
    ui: bool,
}

impl<S> Service<Request<Body>> for Protocols<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The one check a gRPC call pays: `application/grpc`, `+proto`, ...
        // but not `-web`.
        let content_type = req.headers().get(header::CONTENT_TYPE);
        let grpc = content_type
            .and_then(|ct| ct.as_bytes().strip_prefix(b"application/grpc"))
            .is_some_and(|rest| !rest.starts_with(b"-web"));
        if grpc {
            return Either::Left(self.inner.call(req));
        }
        // The ready service goes with the call; a clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let mut http = Http { inner, ui: self.ui };
        match &self.cors {
            Some(cors) => Either::Right(Box::pin(cors.layer(http).call(req))),
            None => Either::Right(Box::pin(http.call(req))),
        }
    }
}

/// Everything but plain gRPC, over a service that is ready.
#[derive(Debug, Clone)]
struct Http<S> {
    inner: S,
    /// Serve the dashboard's files (`--ui`).
    ui: bool,
}

impl<S> Service<Request<Body>> for Http<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Made ready by `Protocols::poll_ready` before it was handed over.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let grpc_web = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc-web"));
        if grpc_web {
            count("grpc_web");
            let mut web = tonic_web::GrpcWebLayer::new().layer(self.inner.clone());
            let call = web.call(req);
            return Box::pin(async move { call.await.map(connect::Delivered::wrap) });
        }
        let inner = self.inner.clone();
        let path = req.uri().path();
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        if get && path == "/healthz" {
            count("healthz");
            // The process is up and serving requests: nothing else is asked.
            return Box::pin(async { Ok(text(StatusCode::OK, "ok\n")) });
        }
        if get && path == "/readyz" {
            count("readyz");
            return Box::pin(connect::readyz(inner, req));
        }
        if self.ui && ui::owns(path) {
            count("ui");
            let response = ui::serve(&req);
            return Box::pin(async { Ok(response) });
        }
        count("connect");
        Box::pin(connect::serve(inner, req))
    }
}

/// Counts one request that is not plain gRPC, by protocol (gRPC calls are
/// counted per RPC by the service, whatever protocol carried them; this
/// layer adds nothing to them).
fn count(protocol: &'static str) {
    metrics::counter!("leasehold_http_requests_total", "protocol" => protocol).increment(1);
}

/// A short `text/plain` response.
pub(super) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::new(http_body_util::Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The CORS policy of `--cors-allow-origin`: `*` allows every origin,
/// anything else is a list of exact origins. Browsers may send the
/// headers a Connect or gRPC-Web client sets, and read the gRPC status
/// headers.
pub fn cors(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    use tower_http::cors::{AllowOrigin, ExposeHeaders};
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let parsed = origins
            .iter()
            .map(|o| {
                http::HeaderValue::from_str(o).map_err(|_| format!("invalid CORS origin {o:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(parsed)
    };
    let request_headers = [
        "authorization",
        "content-type",
        "connect-protocol-version",
        "connect-timeout-ms",
        "grpc-timeout",
        "x-grpc-web",
        "x-user-agent",
        crate::service::recent_lists::MAX_AGE_HEADER,
    ];
    let exposed = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "connect-content-encoding",
    ];
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(request_headers.map(http::HeaderName::from_static))
            .expose_headers(ExposeHeaders::list(
                exposed.map(http::HeaderName::from_static),
            ))
            .max_age(std::time::Duration::from_secs(3600)),
    ))
}
