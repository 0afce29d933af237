//! gRPC where the host answers for itself: the client's `grpc-timeout`
//! becomes the request's deadline (the host's answers as gRPC statuses are
//! in `error.rs`).

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::error::RequestError;

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The request's time budget: the module's `timeout`, or the client's
/// `grpc-timeout` when shorter. The header is rewritten to that budget, so
/// the guest sees the time it really has. A malformed `grpc-timeout` is
/// refused rather than ignored: the client meant a deadline.
pub(super) fn deadline(
    headers: &mut HeaderMap,
    module: Duration,
) -> Result<Duration, RequestError> {
    let Some(value) = headers.get(GRPC_TIMEOUT) else {
        return Ok(module);
    };
    let asked = value
        .to_str()
        .ok()
        .and_then(parse)
        .ok_or_else(|| RequestError::Malformed(format!("bad grpc-timeout {value:?}")))?;
    let budget = asked.min(module);
    // Milliseconds, rounded up (a budget of 0 would read as "expired").
    let ms = budget.as_micros().div_ceil(1000).max(1);
    if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
        headers.insert(GRPC_TIMEOUT, v);
    }
    Ok(budget)
}

/// `TimeoutValue TimeoutUnit` of the gRPC over HTTP/2 spec: at most eight
/// digits, then H, M, S, m, u or n.
fn parse(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
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
    fn grpc_timeouts_parse_in_every_unit_and_bad_ones_are_refused() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10 S", "1x"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_budget_is_the_shorter_and_the_guest_sees_it() {
        let module = Duration::from_secs(10);
        let mut headers = HeaderMap::new();
        assert_eq!(deadline(&mut headers, module).unwrap(), module);
        assert!(headers.get(GRPC_TIMEOUT).is_none(), "none is made up");
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("300m"));
        assert_eq!(
            deadline(&mut headers, module).unwrap(),
            Duration::from_millis(300)
        );
        assert_eq!(headers[GRPC_TIMEOUT], "300m");
        // A client that allows more than the module gets the module's.
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("1H"));
        assert_eq!(deadline(&mut headers, module).unwrap(), module);
        assert_eq!(headers[GRPC_TIMEOUT], "10000m");
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("5n"));
        assert_eq!(
            deadline(&mut headers, module).unwrap(),
            Duration::from_nanos(5)
        );
        assert_eq!(headers[GRPC_TIMEOUT], "1m");
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("soon"));
        let err = deadline(&mut headers, module).unwrap_err();
        assert!(err.to_string().contains("grpc-timeout"), "{err}");
    }
}
