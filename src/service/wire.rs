//! Status codes for requests that never decode.
//!
//! tonic answers a request it cannot decode with INTERNAL (the gRPC status
//! table's choice for "error parsing request proto") and one above the
//! decoding limit with OUT_OF_RANGE. Leasehold's contract keeps INTERNAL for
//! its own bugs, so a client can tell "fix your request" from "page
//! someone": undecodable input is INVALID_ARGUMENT, an oversized message is
//! RESOURCE_EXHAUSTED (what the gRPC table, and grpc-go, use for it). The
//! layer rewrites unary replies; KeepAlive uses [`contract_code`] for what
//! its inbound stream reports.

use tonic::body::Body;
use tonic::{Code, Status};
use tower::util::MapResponseLayer;

/// The code the contract gives a decoding failure tonic reported as
/// `status`, or `None` when `status` is not one.
pub fn contract_code(status: &Status) -> Option<Code> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("message length too large") => {
            Some(Code::ResourceExhausted)
        }
        Code::Internal
            if message.starts_with("failed to decode Protobuf message")
                || message.starts_with("Unexpected EOF decoding stream")
                || message.starts_with("protocol error:")
                || message.starts_with("Missing request message") =>
        {
            Some(Code::InvalidArgument)
        }
        _ => None,
    }
}

/// A response from the inner services.
type Reply = http::Response<Body>;

/// Rewrites the status of unary replies with [`contract_code`]: a map over
/// the response (tower's `MapResponseLayer`), nothing kept per call.
pub fn layer() -> MapResponseLayer<fn(Reply) -> Reply> {
    MapResponseLayer::new(rewrite)
}

fn rewrite(mut response: Reply) -> Reply {
    let code = Status::from_header_map(response.headers())
        .as_ref()
        .and_then(contract_code);
    if let Some(code) = code {
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from(code as i32));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_failures_get_contract_codes() {
        let too_big = Status::out_of_range(
            "Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes",
        );
        assert_eq!(contract_code(&too_big), Some(Code::ResourceExhausted));
        let garbage = Status::internal("failed to decode Protobuf message: invalid wire type");
        assert_eq!(contract_code(&garbage), Some(Code::InvalidArgument));
        assert_eq!(contract_code(&Status::internal("a real bug")), None);
        assert_eq!(contract_code(&Status::out_of_range("other")), None);
    }
}
