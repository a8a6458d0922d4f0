//! Reply bodies that carry a granted lease's delivery guard
//! ([`DeliveryGuard`]) where the delivery layer cannot follow the reply:
//! the Connect translation, and gRPC-Web over HTTP/1.1.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;

use crate::service::delivery::DeliveryGuard;

/// A granted lease's delivery guard while the reply is being translated:
/// if the translation is dropped (the client went away), the lease is given
/// back, as the delivery layer would do for a gRPC reply.
pub(super) struct Undelivered(pub(super) Option<DeliveryGuard>);

impl Undelivered {
    pub(super) fn disarm(&mut self) {
        if let Some(guard) = self.0.take() {
            guard.disarm();
        }
    }
}

impl Drop for Undelivered {
    fn drop(&mut self) {
        if let Some(guard) = self.0.take() {
            guard.fire();
        }
    }
}

/// A reply body carrying a lease's delivery guard, for replies the
/// delivery layer cannot follow: gRPC-Web over HTTP/1.1 ends with a body
/// that says it has ended after its last chunk, and hyper then drops it
/// without polling it to its end. Disarmed when the last chunk or the end
/// is handed to the connection; fired if dropped before.
pub(in crate::server) struct Delivered {
    inner: Body,
    guard: Undelivered,
}

impl Delivered {
    /// Moves the delivery guard of `response`, if any, into its body.
    pub(in crate::server) fn wrap(response: Response<Body>) -> Response<Body> {
        let (mut parts, inner) = response.into_parts();
        match parts.extensions.remove::<DeliveryGuard>() {
            None => Response::from_parts(parts, inner),
            Some(guard) => {
                let body = Self {
                    inner,
                    guard: Undelivered(Some(guard)),
                };
                Response::from_parts(parts, Body::new(body))
            }
        }
    }
}

impl http_body::Body for Delivered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let last = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || self.inner.is_end_stream(),
            _ => false,
        };
        if last {
            self.guard.disarm();
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

/// A body of one chunk. A lease's delivery guard rides with it: disarmed
/// when the chunk is handed to the connection (as the delivery layer does
/// for a gRPC reply's trailers), fired if the body is dropped before.
pub(super) struct Once {
    pub(super) data: Option<Bytes>,
    pub(super) guard: Undelivered,
}

impl Once {
    pub(super) fn new(data: Bytes) -> Self {
        Self {
            data: Some(data),
            guard: Undelivered(None),
        }
    }
}

impl http_body::Body for Once {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let data = self.data.take();
        if data.is_some() {
            self.guard.disarm();
        }
        Poll::Ready(data.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let len = self.data.as_ref().map_or(0, |b| b.len() as u64);
        http_body::SizeHint::with_exact(len)
    }
}
