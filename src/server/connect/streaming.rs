//! Connect streaming (`application/connect+json`, `application/connect+proto`)
//! for the streaming RPCs: KeepAlive, bidirectional, needs a client that
//! speaks HTTP/2 (an HTTP/1.1 client cannot send and receive at once);
//! Watch, server-streaming, works over HTTP/1.1 too (one request message,
//! then the replies as they come).
//!
//! A Connect envelope is a gRPC frame (one flags byte, a 4-byte length, the
//! message), so `+proto` request bodies pass through untouched and replies
//! only change at their end: gRPC's trailers become Connect's end-of-stream
//! envelope (flags `0x02`, a JSON `{"error": ...}` or `{}`). `+json` is
//! translated message by message with the generated JSON mapping.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, header};
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tower::Service;

use super::errors::error_json;
use crate::pb;
use crate::server::MAX_MESSAGE_BYTES;

/// How the messages of a Connect stream are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamCodec {
    Json,
    Proto,
}

impl StreamCodec {
    /// The codec of a Connect streaming `content-type`, if it is one.
    pub(super) fn of(content_type: &str) -> Option<Self> {
        match content_type {
            "application/connect+json" => Some(Self::Json),
            "application/connect+proto" => Some(Self::Proto),
            _ => None,
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Json => "application/connect+json",
            Self::Proto => "application/connect+proto",
        })
    }
}

/// Flags of the envelope that ends a Connect stream.
const END_STREAM: u8 = 0x02;

/// The streaming RPCs Connect serves, and how their messages read as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Streaming {
    KeepAlive,
    Watch,
}

impl Streaming {
    /// The streaming method of `name`, if it is one.
    pub(super) fn of(name: &str) -> Option<Self> {
        match name {
            "KeepAlive" => Some(Self::KeepAlive),
            "Watch" => Some(Self::Watch),
            _ => None,
        }
    }

    fn json_request(self) -> Convert {
        match self {
            Self::KeepAlive => keepalive_request,
            Self::Watch => watch_request,
        }
    }

    fn json_reply(self) -> Convert {
        match self {
            Self::KeepAlive => keepalive_reply,
            Self::Watch => watch_reply,
        }
    }
}

/// Serves one stream of `method` over Connect: `parts` already carry the
/// gRPC headers (`grpc-timeout` included) and the method's path.
pub(super) async fn serve<S>(
    mut inner: S,
    mut parts: http::request::Parts,
    body: Body,
    codec: StreamCodec,
    method: Streaming,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    parts.version = http::Version::HTTP_2;
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert(header::TE, HeaderValue::from_static("trailers"));
    let body = match codec {
        StreamCodec::Proto => body,
        StreamCodec::Json => Body::new(Reframe {
            inner: body,
            buf: BytesMut::new(),
            convert: method.json_request(),
            end: None,
            done: false,
        }),
    };
    let response = inner.call(Request::from_parts(parts, body)).await?;
    let (parts, body) = response.into_parts();
    let mut reply = Response::new(Body::default());
    reply
        .headers_mut()
        .insert(header::CONTENT_TYPE, codec.content_type());
    // Trailers-only: the call was refused before it began (auth, limits).
    if let Some(status) = Status::from_header_map(&parts.headers) {
        *reply.body_mut() = Body::new(Ended(Some(end_envelope(Some(&status)))));
        return Ok(reply);
    }
    let convert = match codec {
        StreamCodec::Proto => None,
        StreamCodec::Json => Some(method.json_reply()),
    };
    *reply.body_mut() = Body::new(Reply {
        inner: body,
        buf: BytesMut::new(),
        convert,
        done: false,
    });
    Ok(reply)
}

type Convert = fn(Bytes) -> Result<Bytes, Status>;

fn keepalive_request(message: Bytes) -> Result<Bytes, Status> {
    super::from_json::<pb::KeepAliveRequest>("KeepAliveRequest", &message)
}

fn keepalive_reply(message: Bytes) -> Result<Bytes, Status> {
    super::to_json::<pb::KeepAliveResponse>(&message)
}

fn watch_request(message: Bytes) -> Result<Bytes, Status> {
    super::from_json::<pb::WatchRequest>("WatchRequest", &message)
}

fn watch_reply(message: Bytes) -> Result<Bytes, Status> {
    super::to_json::<pb::WatchEvent>(&message)
}

/// One envelope (flags, length, message).
fn envelope(flags: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// The envelope that ends a Connect stream, with its error if any.
fn end_envelope(status: Option<&Status>) -> Bytes {
    let end = match status {
        Some(status) if status.code() != tonic::Code::Ok => {
            serde_json::json!({ "error": error_json(status) })
        }
        _ => serde_json::json!({}),
    };
    envelope(END_STREAM, end.to_string().as_bytes())
}

/// The next whole envelope in `buf`: its flags and message.
fn next_envelope(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, Status> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(Status::resource_exhausted(format!(
            "message larger than {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let flags = buf[0];
    buf.advance(5);
    Ok(Some((flags, buf.split_to(len).freeze())))
}

/// A request body whose envelopes are translated one by one.
struct Reframe {
    inner: Body,
    buf: BytesMut,
    convert: Convert,
    end: Option<Status>,
    done: bool,
}

impl http_body::Body for Reframe {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(status) = self.end.take() {
                self.done = true;
                return Poll::Ready(Some(Err(status)));
            }
            match next_envelope(&mut self.buf) {
                Err(status) => self.end = Some(status),
                Ok(Some((flags, message))) => {
                    if flags != 0 {
                        self.end = Some(Status::invalid_argument(
                            "compressed or flagged request messages are not supported",
                        ));
                        continue;
                    }
                    match (self.convert)(message) {
                        Ok(proto) => {
                            return Poll::Ready(Some(Ok(Frame::data(envelope(0, &proto)))));
                        }
                        Err(status) => self.end = Some(status),
                    }
                }
                Ok(None) => match Pin::new(&mut self.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => {
                        self.done = true;
                        if !self.buf.is_empty() {
                            return Poll::Ready(Some(Err(Status::invalid_argument(
                                "the request stream ended inside a message",
                            ))));
                        }
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Some(Err(status))) => self.end = Some(status),
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                },
            }
        }
    }
}

/// A gRPC reply body as a Connect stream: messages (translated when
/// `convert` is set), then the end-of-stream envelope from the trailers.
struct Reply {
    inner: Body,
    buf: BytesMut,
    convert: Option<Convert>,
    done: bool,
}

impl Reply {
    fn end(&mut self, status: Option<&Status>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        Poll::Ready(Some(Ok(Frame::data(end_envelope(status)))))
    }
}

impl http_body::Body for Reply {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(convert) = self.convert {
                match next_envelope(&mut self.buf) {
                    Err(status) => return self.end(Some(&status)),
                    Ok(Some((_, message))) => match convert(message) {
                        Ok(json) => return Poll::Ready(Some(Ok(Frame::data(envelope(0, &json))))),
                        Err(status) => return self.end(Some(&status)),
                    },
                    Ok(None) => {}
                }
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let missing = Status::internal("the stream ended without a status");
                    return self.end(Some(&missing));
                }
                Poll::Ready(Some(Err(status))) => return self.end(Some(&status)),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if self.convert.is_some() => self.buf.extend_from_slice(&data),
                    // gRPC frames are Connect envelopes: as they are.
                    Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(frame) => {
                        let status = frame
                            .into_trailers()
                            .ok()
                            .and_then(|t| Status::from_header_map(&t));
                        return self.end(status.as_ref());
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A stream that is only its end.
struct Ended(Option<Bytes>);

impl http_body::Body for Ended {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.0.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_and_end() {
        let mut buf = BytesMut::new();
        let whole = envelope(0, b"abc");
        buf.extend_from_slice(&whole[..4]);
        assert_eq!(next_envelope(&mut buf).ok(), Some(None));
        buf.extend_from_slice(&whole[4..]);
        let (flags, message) = next_envelope(&mut buf).ok().flatten().expect("whole");
        assert_eq!((flags, &message[..]), (0, &b"abc"[..]));
        let end = end_envelope(Some(&Status::unauthenticated("no token")));
        assert_eq!(end[0], END_STREAM);
        let json: serde_json::Value = serde_json::from_slice(&end[5..]).expect("JSON");
        assert_eq!(json["error"]["code"], "unauthenticated");
        assert_eq!(&end_envelope(None)[5..], b"{}");
    }
}
