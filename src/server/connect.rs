//! The Connect protocol (connectrpc.com/docs/protocol) for
//! `leasehold.v1.LockService`, and `GET /readyz`, over any HTTP version.
//!
//! A Connect unary call is translated into the gRPC call it stands for and
//! handed to the same inner stack as gRPC (authentication, wire-error
//! codes, the service), so both protocols share every check, limit and
//! error; the answer is translated back. `application/json` uses the
//! canonical proto3 JSON mapping generated from the proto (`pb`, by
//! pbjson): camelCase written, camelCase and snake_case read, 64-bit
//! integers as strings, an unknown field refused. `application/proto`
//! bytes pass through untouched.
//!
//! `leasehold.v1.AdminService` (List, ForceRelease) is served the same
//! way. KeepAlive, the bidirectional RPC, is served over Connect streaming
//! to clients that speak HTTP/2, and Watch, server-streaming, over either
//! HTTP version ([`streaming`]).
//!
//! A granted lease whose Connect reply is lost is given back, as over gRPC:
//! the reply's [`DeliveryGuard`] moves to the Connect reply body, which
//! disarms it when it hands its bytes to the connection, and fires it if
//! dropped before (the translation or the reply was abandoned).

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use prost::Message;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::Service;

mod bodies;
mod errors;
mod streaming;

pub(super) use bodies::Delivered;

use super::MAX_MESSAGE_BYTES;
use super::protocols::text;
use crate::pb;
use crate::service::delivery::DeliveryGuard;
use bodies::{Once, Undelivered};
use errors::{error_response, not_found};
use streaming::{StreamCodec, Streaming};

/// The path prefixes of the services Connect serves.
const SERVICE_PREFIX: &str = "/leasehold.v1.LockService/";
const ADMIN_PREFIX: &str = "/leasehold.v1.AdminService/";

/// The unary methods Connect serves, by their gRPC path.
fn unary_method(path: &str) -> Option<&'static str> {
    Some(match path {
        "/leasehold.v1.LockService/Acquire" => "Acquire",
        "/leasehold.v1.LockService/Release" => "Release",
        "/leasehold.v1.LockService/Renew" => "Renew",
        "/leasehold.v1.LockService/Describe" => "Describe",
        "/leasehold.v1.AdminService/List" => "List",
        "/leasehold.v1.AdminService/ForceRelease" => "ForceRelease",
        _ => return None,
    })
}

/// How a Connect unary message is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Json,
    Proto,
}

impl Codec {
    fn of(headers: &HeaderMap) -> Option<Self> {
        let media = media_type(headers)?;
        if media.eq_ignore_ascii_case("application/json") {
            Some(Self::Json)
        } else if media.eq_ignore_ascii_case("application/proto") {
            Some(Self::Proto)
        } else {
            None
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Json => "application/json",
            Self::Proto => "application/proto",
        })
    }
}

/// A Connect-protocol request to anything but the health endpoints.
pub(super) async fn serve<S>(inner: S, req: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    let path = req.uri().path();
    let (service, method) = if let Some(method) = path.strip_prefix(SERVICE_PREFIX) {
        ("leasehold.v1.LockService", method)
    } else if let Some(method) = path.strip_prefix(ADMIN_PREFIX) {
        ("leasehold.v1.AdminService", method)
    } else {
        return Ok(not_found(&Status::unimplemented(format!(
            "no such endpoint {path:?}: over HTTP this server answers the Connect protocol for \
             leasehold.v1.LockService (POST /leasehold.v1.LockService/Acquire, ...) and \
             leasehold.v1.AdminService, GET /healthz and GET /readyz; other services speak \
             gRPC only"
        ))));
    };
    let stream = Streaming::of(method).filter(|_| service == "leasehold.v1.LockService");
    if let Some(stream) = stream
        && req.method() == Method::POST
    {
        let codec = media_type(req.headers()).and_then(StreamCodec::of);
        let encoding = req.headers().get("connect-content-encoding");
        let compressed = encoding.is_some_and(|e| e.as_bytes() != b"identity");
        if let Some(codec) = codec
            && !compressed
        {
            let (mut parts, body) = req.into_parts();
            if let Err(status) = to_grpc_headers(&mut parts.headers) {
                return Ok(error_response(&status));
            }
            return streaming::serve(inner, parts, body, codec, stream).await;
        }
    }
    let Some(method) = unary_method(path) else {
        let message = match stream {
            Some(Streaming::KeepAlive) => {
                "KeepAlive is a bidirectional stream: call it over gRPC, or Connect streaming \
                 (POST, application/connect+json or application/connect+proto, uncompressed) \
                 over HTTP/2; a client limited to HTTP/1.1 takes the lock with Acquire and a \
                 TTL and keeps it with Renew"
            }
            Some(Streaming::Watch) => {
                "Watch is a server stream: call it over gRPC, or Connect streaming (POST, \
                 application/connect+json or application/connect+proto, uncompressed)"
            }
            None => {
                return Ok(not_found(&Status::unimplemented(format!(
                    "{service} has no method {method:?}"
                ))));
            }
        };
        return Ok(error_response(&Status::unimplemented(message)));
    };
    if req.method() != Method::POST {
        let mut response = error_response(&Status::unimplemented(format!(
            "{} is not allowed: Connect unary calls are POST",
            req.method()
        )));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Ok(response);
    }
    let Some(codec) = Codec::of(req.headers()) else {
        let given = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let mut response = error_response(&Status::unimplemented(format!(
            "unsupported content-type {given:?}: Connect unary calls take application/json or \
             application/proto; gRPC takes application/grpc"
        )));
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        response.headers_mut().insert(
            "accept-post",
            HeaderValue::from_static("application/json, application/proto"),
        );
        return Ok(response);
    };
    let encoding = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes().to_ascii_lowercase());
    if encoding.is_some_and(|e| e != b"identity") {
        return Ok(error_response(&Status::unimplemented(
            "compressed requests are not supported: send the body uncompressed",
        )));
    }
    let (mut parts, body) = req.into_parts();
    if let Err(status) = to_grpc_headers(&mut parts.headers) {
        return Ok(error_response(&status));
    }
    let bytes = match read_body(body).await {
        Ok(bytes) => bytes,
        Err(status) => return Ok(error_response(&status)),
    };
    let proto = match codec {
        Codec::Proto => bytes,
        Codec::Json => match json_to_proto(method, &bytes) {
            Ok(proto) => proto,
            Err(status) => return Ok(error_response(&status)),
        },
    };
    let reply = grpc_unary(inner, parts, proto).await?;
    let (message, guard) = match reply {
        Ok(reply) => reply,
        Err(status) => return Ok(error_response(&status)),
    };
    let body = match codec {
        Codec::Proto => message,
        Codec::Json => match proto_to_json(method, &message) {
            Ok(json) => json,
            Err(status) => return Ok(error_response(&status)),
        },
    };
    let mut response = Response::new(Body::new(Once {
        data: Some(body),
        guard,
    }));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, codec.content_type());
    Ok(response)
}

/// `GET /readyz`: the gRPC health check of the whole server (service
/// `""`), so it says what `grpc.health.v1` says, and needs credentials
/// exactly when health does (`--auth-protect-health`).
pub(super) async fn readyz<S>(inner: S, req: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut parts, _) = req.into_parts();
    parts.method = Method::POST;
    parts.uri = http::Uri::from_static("/grpc.health.v1.Health/Check");
    let check = tonic_health::pb::HealthCheckRequest::default().encode_to_vec();
    let reply = match grpc_unary(inner, parts, check.into()).await? {
        Ok((message, _)) => tonic_health::pb::HealthCheckResponse::decode(message)
            .map_err(|e| Status::internal(format!("health reply did not decode: {e}"))),
        Err(status) => Err(status),
    };
    Ok(match reply {
        Ok(r) if r.status() == tonic_health::pb::health_check_response::ServingStatus::Serving => {
            text(StatusCode::OK, "SERVING\n")
        }
        Ok(_) => text(StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n"),
        Err(status) => error_response(&status),
    })
}

/// Runs one unary gRPC call, `parts` (path, headers, extensions) with
/// `message` as its body, through `inner`. The outer `Err` is the inner
/// service's own failure; the inner one is the call's status.
async fn grpc_unary<S>(
    mut inner: S,
    mut parts: http::request::Parts,
    message: Bytes,
) -> Result<Result<(Bytes, Undelivered), Status>, S::Error>
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
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(&message);
    let body = Body::new(http_body_util::Full::new(framed.freeze()));
    let response = inner.call(Request::from_parts(parts, body)).await?;
    let (mut parts, body) = response.into_parts();
    let guard = Undelivered(parts.extensions.remove::<DeliveryGuard>());
    // Trailers-only: an error before any message (auth, decoding, status).
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != Code::Ok
    {
        return Ok(Err(status));
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(status) => return Ok(Err(status)),
    };
    let status = collected
        .trailers()
        .and_then(Status::from_header_map)
        .unwrap_or_else(|| Status::internal("the gRPC reply ended without a status"));
    if status.code() != Code::Ok {
        return Ok(Err(status));
    }
    let bytes = collected.to_bytes();
    Ok(unframe(bytes).map(|message| (message, guard)))
}

/// The one message of a unary gRPC reply body.
fn unframe(mut bytes: Bytes) -> Result<Bytes, Status> {
    if bytes.len() < 5 || bytes[0] != 0 {
        return Err(Status::internal("the gRPC reply holds no plain message"));
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if bytes.len() != 5 + len {
        return Err(Status::internal("the gRPC reply is not one message"));
    }
    Ok(bytes.split_off(5))
}

/// The headers of a Connect request made those of the gRPC call it stands
/// for: Connect's own ones dropped, its timeout as `grpc-timeout`, the
/// rest (`authorization`, custom metadata) kept.
fn to_grpc_headers(headers: &mut HeaderMap) -> Result<(), Status> {
    let timeout = grpc_timeout(headers)?;
    for name in [
        "connect-protocol-version",
        "connect-timeout-ms",
        "connect-content-encoding",
        "connect-accept-encoding",
        "accept-encoding",
        "content-encoding",
        "content-length",
    ] {
        headers.remove(name);
    }
    if let Some(timeout) = timeout {
        headers.insert("grpc-timeout", timeout);
    }
    Ok(())
}

/// The media type of a request's `content-type`, without parameters.
fn media_type(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or("").trim())
}

/// `Connect-Timeout-Ms` as a `grpc-timeout` value.
fn grpc_timeout(headers: &HeaderMap) -> Result<Option<HeaderValue>, Status> {
    let Some(value) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    let ms = value
        .to_str()
        .ok()
        .filter(|v| (1..=10).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            Status::invalid_argument(
                "connect-timeout-ms: must be a positive integer of at most 10 digits",
            )
        })?;
    // grpc-timeout takes at most 8 digits.
    let value = if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", (ms / 1000).min(99_999_999))
    };
    Ok(HeaderValue::from_str(&value).ok())
}

/// Reads a request body of at most [`MAX_MESSAGE_BYTES`].
async fn read_body(body: Body) -> Result<Bytes, Status> {
    match http_body_util::Limited::new(body, MAX_MESSAGE_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Status::resource_exhausted(
            format!("request body larger than {MAX_MESSAGE_BYTES} bytes"),
        )),
        Err(e) => Err(Status::cancelled(format!("reading the request body: {e}"))),
    }
}

fn from_json<T: serde::de::DeserializeOwned + Message>(
    name: &str,
    bytes: &[u8],
) -> Result<Bytes, Status> {
    let message: T = serde_json::from_slice(bytes).map_err(|e| {
        Status::invalid_argument(format!("invalid JSON for leasehold.v1.{name}: {e}"))
    })?;
    Ok(message.encode_to_vec().into())
}

fn to_json<T: serde::Serialize + Message + Default>(bytes: &[u8]) -> Result<Bytes, Status> {
    let message =
        T::decode(bytes).map_err(|e| Status::internal(format!("the reply did not decode: {e}")))?;
    serde_json::to_vec(&message)
        .map(Bytes::from)
        .map_err(|e| Status::internal(format!("the reply did not encode as JSON: {e}")))
}

/// A JSON request of `method` as protobuf bytes.
fn json_to_proto(method: &str, bytes: &[u8]) -> Result<Bytes, Status> {
    match method {
        "Acquire" => from_json::<pb::AcquireRequest>("AcquireRequest", bytes),
        "Release" => from_json::<pb::ReleaseRequest>("ReleaseRequest", bytes),
        "Renew" => from_json::<pb::RenewRequest>("RenewRequest", bytes),
        "List" => from_json::<pb::ListRequest>("ListRequest", bytes),
        "ForceRelease" => from_json::<pb::ForceReleaseRequest>("ForceReleaseRequest", bytes),
        _ => from_json::<pb::DescribeRequest>("DescribeRequest", bytes),
    }
}

/// A protobuf reply of `method` as JSON.
fn proto_to_json(method: &str, bytes: &[u8]) -> Result<Bytes, Status> {
    match method {
        "Acquire" => to_json::<pb::AcquireResponse>(bytes),
        "Release" => to_json::<pb::ReleaseResponse>(bytes),
        "Renew" => to_json::<pb::RenewResponse>(bytes),
        "List" => to_json::<pb::ListResponse>(bytes),
        "ForceRelease" => to_json::<pb::ForceReleaseResponse>(bytes),
        _ => to_json::<pb::DescribeResponse>(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_and_int64() {
        let proto = json_to_proto("Acquire", br#"{"key":"a","ttl_ms":1000,"waitMs":5}"#)
            .expect("camelCase and snake_case both read");
        let req = pb::AcquireRequest::decode(proto).expect("decodes");
        assert_eq!((req.key.as_str(), req.ttl_ms, req.wait_ms), ("a", 1000, 5));
        let err = json_to_proto("Acquire", br#"{"key":"a","ttl":1000}"#).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("unknown field `ttl`"),
            "{}",
            err.message()
        );
        let reply = pb::DescribeResponse {
            held: true,
            fencing_token: u64::MAX,
            ..Default::default()
        };
        let json = proto_to_json("Describe", &reply.encode_to_vec()).expect("encodes");
        let json: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(json["fencingToken"], "18446744073709551615");
        assert_eq!(json["held"], true);
    }

    #[test]
    fn timeouts_translate() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_timeout(&headers).ok(), Some(None));
        headers.insert("connect-timeout-ms", HeaderValue::from_static("1500"));
        assert_eq!(
            grpc_timeout(&headers).ok().flatten(),
            Some(HeaderValue::from_static("1500m"))
        );
        headers.insert("connect-timeout-ms", HeaderValue::from_static("-1"));
        assert!(grpc_timeout(&headers).is_err());
    }
}
