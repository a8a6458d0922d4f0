//! Making sure a granted lease reaches its client.
//!
//! A unary Acquire can be granted in the store and then never delivered:
//! the client cancelled, or its deadline passed, while the reply was being
//! written. Handler-level drop guards (`Core::attempt`) cover a cancel
//! while the store call is in flight; this layer covers the rest. The
//! handler attaches a [`DeliveryGuard`] to the reply; the layer wraps the
//! reply body and disarms the guard once the body has been read to its
//! trailers. If hyper drops the body before that (stream reset, connection
//! gone), the guard fires and the lease is released, so no orphan lock is
//! left to block others until its TTL.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::Frame;
use tonic::body::Body;
use tower::{Layer, Service};

type Undo = Box<dyn FnOnce() + Send>;

/// Runs its undo action unless disarmed: attach it to a reply whose loss
/// must be undone.
#[derive(Clone)]
pub struct DeliveryGuard(Arc<Mutex<Option<Undo>>>);

impl DeliveryGuard {
    /// A guard that runs `undo` if the reply is not delivered.
    pub fn new(undo: impl FnOnce() + Send + 'static) -> Self {
        Self(Arc::new(Mutex::new(Some(Box::new(undo)))))
    }

    fn take(&self) -> Option<Undo> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The reply went out: forget the undo.
    pub fn disarm(&self) {
        self.take();
    }

    /// The reply was lost: run the undo (at most once).
    pub fn fire(&self) {
        if let Some(undo) = self.take() {
            undo();
        }
    }
}

/// Tower layer that honours [`DeliveryGuard`]s found in reply extensions.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryLayer;

impl<S> Layer<S> for DeliveryLayer {
    type Service = Delivery<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Delivery(inner)
    }
}

/// The service made by [`DeliveryLayer`].
#[derive(Debug, Clone)]
pub struct Delivery<S>(S);

impl<S, B> Service<http::Request<B>> for Delivery<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut response = fut.await?;
            Ok(match response.extensions_mut().remove::<DeliveryGuard>() {
                None => response,
                Some(guard) => {
                    let (parts, body) = response.into_parts();
                    http::Response::from_parts(
                        parts,
                        Body::new(GuardedBody {
                            inner: body,
                            guard: Some(guard),
                        }),
                    )
                }
            })
        })
    }
}

struct GuardedBody {
    inner: Body,
    guard: Option<DeliveryGuard>,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let finished = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            _ => false,
        };
        if finished {
            if let Some(guard) = self.guard.take() {
                guard.disarm();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.fire();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fires_once_unless_disarmed() {
        let n = Arc::new(AtomicUsize::new(0));
        let g = DeliveryGuard::new({
            let n = n.clone();
            move || {
                n.fetch_add(1, Ordering::SeqCst);
            }
        });
        g.clone().fire();
        g.fire();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let g = DeliveryGuard::new({
            let n = n.clone();
            move || {
                n.fetch_add(1, Ordering::SeqCst);
            }
        });
        g.disarm();
        g.fire();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
