//! Connect error replies: the code names, the HTTP status the protocol
//! gives each code, and the JSON body with the status's details.

use base64::Engine as _;
use http::{HeaderValue, Response, StatusCode, header};
use prost::Message;
use tonic::body::Body;
use tonic::{Code, Status};

use super::bodies::Once;

/// The Connect name of a status code.
pub(super) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status the Connect protocol gives a code.
pub(super) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The Connect error body of `status`: its code, message and details
/// (the `grpc-status-details-bin` ones, each as type and base64 value).
pub(super) fn error_json(status: &Status) -> serde_json::Value {
    let mut error = serde_json::json!({
        "code": code_name(status.code()),
        "message": status.message(),
    });
    let details = tonic_types::pb::Status::decode(status.details())
        .map(|s| s.details)
        .unwrap_or_default();
    if !details.is_empty() {
        let details: Vec<_> = details
            .into_iter()
            .map(|any| {
                let name = any.type_url.rsplit('/').next().unwrap_or_default();
                let mut detail = serde_json::json!({
                    "type": name,
                    "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
                });
                if let Some(debug) = debug(name, &any.value) {
                    detail["debug"] = debug;
                }
                detail
            })
            .collect();
        error["details"] = serde_json::Value::Array(details);
    }
    error
}

/// The detail as JSON, for people reading a reply with curl (Connect's
/// optional `debug`; clients decode `value`).
fn debug(name: &str, value: &[u8]) -> Option<serde_json::Value> {
    use tonic_types::pb;
    Some(match name {
        "google.rpc.BadRequest" => {
            let bad = pb::BadRequest::decode(value).ok()?;
            let violations: Vec<_> = bad
                .field_violations
                .iter()
                .map(|v| serde_json::json!({"field": v.field, "description": v.description}))
                .collect();
            serde_json::json!({ "fieldViolations": violations })
        }
        "google.rpc.ErrorInfo" => {
            let info = pb::ErrorInfo::decode(value).ok()?;
            serde_json::json!({"reason": info.reason, "domain": info.domain, "metadata": info.metadata})
        }
        "google.rpc.RetryInfo" => {
            let delay = pb::RetryInfo::decode(value).ok()?.retry_delay?;
            let seconds = delay.seconds as f64 + f64::from(delay.nanos) / 1e9;
            serde_json::json!({ "retryDelay": format!("{seconds:.3}s") })
        }
        _ => return None,
    })
}

/// A Connect error for a path nothing serves: HTTP 404, which Connect
/// clients read as `unimplemented`.
pub(super) fn not_found(status: &Status) -> Response<Body> {
    let mut response = error_response(status);
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

/// A Connect unary error response.
pub(super) fn error_response(status: &Status) -> Response<Body> {
    let body = serde_json::to_vec(&error_json(status)).unwrap_or_default();
    let mut response = Response::new(Body::new(Once::new(body.into())));
    *response.status_mut() = http_status(status.code());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
