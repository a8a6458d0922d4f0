//! The caller's gRPC deadline, from the `grpc-timeout` header. tonic does
//! not enforce it on the server, and a waiting Acquire must end by it.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// When the caller gives up, if it said.
pub fn of(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse(value).map(|d| Instant::now() + d)
}

/// Parses `TimeoutValue TimeoutUnit` as the gRPC HTTP/2 spec defines it:
/// at most 8 digits, then one of H M S m u n.
fn parse(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("5"), None);
        assert_eq!(parse("123456789S"), None);
        assert_eq!(parse("xS"), None);
        assert_eq!(parse("1x"), None);
    }
}
