//! Every way a request can end without the guest's answer, and the one
//! place that turns it into a response.

use http::{HeaderValue, Response, StatusCode, header};
use prometheus::IntCounter;
use wasmtime::Trap;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::metrics::ModuleMetrics;
use crate::runtime::MemoryLimitExceeded;

/// Why the host answers a request itself.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No module's route matches the path.
    #[error("no route for this path")]
    NoRoute,
    /// The module is at its concurrency limit.
    #[error("the module is at its concurrency limit")]
    Shed,
    /// The body is larger than the module's `max_body`, declared or sent.
    #[error("request body exceeds the module's max_body")]
    BodyTooLarge,
    /// The request cannot be handed to a guest.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The client did not send the whole body within the module's
    /// `limits.timeout`.
    #[error("the request body did not arrive within the module's timeout")]
    BodyTimeout,
    /// The guest failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl RequestError {
    fn status(&self) -> StatusCode {
        match self {
            RequestError::NoRoute => StatusCode::NOT_FOUND,
            RequestError::Shed => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::Malformed(_) => StatusCode::BAD_REQUEST,
            RequestError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            RequestError::Guest(e) => e.status(),
        }
    }

    /// What the client is told: never a guest's internals.
    fn public_message(&self) -> String {
        match self {
            RequestError::Guest(e) => e.public_message().to_owned(),
            other => other.to_string(),
        }
    }

    /// Seconds after which a retry may succeed.
    fn retry_after(&self) -> Option<&'static str> {
        matches!(self, RequestError::Shed).then_some("1")
    }

    /// The counter this error adds to. Guest failures are counted by the
    /// guest's task, where they happen, since they can also happen after
    /// the response head is out and never reach here.
    pub(super) fn counter<'m>(&self, metrics: &'m ModuleMetrics) -> Option<&'m IntCounter> {
        match self {
            RequestError::Shed => Some(&metrics.shed),
            _ => None,
        }
    }

    /// The response: `{"error": ..., "status": ..., "request_id": ...}`.
    pub(super) fn render(&self, request_id: &str) -> Response<HyperOutgoingBody> {
        let status = self.status();
        let body = serde_json::json!({
            "error": self.public_message(),
            "status": status.as_u16(),
            "request_id": request_id,
        });
        let mut resp = Response::new(super::full(body.to_string()));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        resp
    }
}

/// How a guest call failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Over the module's wall-clock budget.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Over the module's memory limit.
    #[error("{0}")]
    Memory(String),
    /// The guest trapped (panic, unreachable, stack overflow, ...).
    #[error("guest trapped: {0}")]
    Trap(String),
    /// The host could not create an instance (e.g. the pool is exhausted).
    #[error("could not instantiate the module: {0}")]
    Instantiate(String),
    /// The guest answered with a `wasi:http` error code instead of a
    /// response (the code, as wasmtime prints it).
    #[error("guest returned an error: {0}")]
    ErrorCode(String),
    /// The guest returned without setting a response.
    #[error("guest returned without a response")]
    NoResponse,
}

impl GuestError {
    fn status(&self) -> StatusCode {
        match self {
            GuestError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GuestError::Instantiate(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn public_message(&self) -> &'static str {
        match self {
            GuestError::Timeout(_) => "the module did not answer in time",
            GuestError::Memory(_) => "the module ran out of memory",
            GuestError::Instantiate(_) => "the host is at capacity",
            _ => "the module failed",
        }
    }

    /// The counter this failure adds to, if it has one of its own.
    pub(super) fn counter<'m>(&self, metrics: &'m ModuleMetrics) -> Option<&'m IntCounter> {
        match self {
            GuestError::Timeout(_) => Some(&metrics.timeouts),
            GuestError::Memory(_) => Some(&metrics.memory),
            GuestError::Trap(_) => Some(&metrics.traps),
            _ => None,
        }
    }

    /// Classifies what wasmtime returned from the guest call.
    pub(super) fn classify(err: wasmtime::Error, timeout: std::time::Duration) -> GuestError {
        if let Some(m) = err.downcast_ref::<MemoryLimitExceeded>() {
            return GuestError::Memory(m.to_string());
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => GuestError::Timeout(timeout),
            _ => GuestError::Trap(format!("{err:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn rendered(err: RequestError) -> (StatusCode, Option<String>, serde_json::Value) {
        let resp = err.render("req-1");
        let status = resp.status();
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn each_error_renders_its_status_message_and_retry_after() {
        let cases = [
            (RequestError::NoRoute, 404, None, "no route for this path"),
            (
                RequestError::Shed,
                503,
                Some("1"),
                "the module is at its concurrency limit",
            ),
            (
                RequestError::BodyTooLarge,
                413,
                None,
                "request body exceeds the module's max_body",
            ),
            (
                RequestError::Malformed("bad uri".into()),
                400,
                None,
                "malformed request: bad uri",
            ),
            (
                GuestError::Timeout(std::time::Duration::from_secs(1)).into(),
                504,
                None,
                "the module did not answer in time",
            ),
            (
                GuestError::Memory("over 1 MiB".into()).into(),
                500,
                None,
                "the module ran out of memory",
            ),
            (
                GuestError::Instantiate("pool".into()).into(),
                503,
                None,
                "the host is at capacity",
            ),
            (
                GuestError::Trap("secret detail".into()).into(),
                500,
                None,
                "the module failed",
            ),
            (
                GuestError::NoResponse.into(),
                500,
                None,
                "the module failed",
            ),
        ];
        for (err, status, retry, message) in cases {
            let (got, got_retry, body) = rendered(err).await;
            assert_eq!(got.as_u16(), status);
            assert_eq!(got_retry.as_deref(), retry);
            assert_eq!(body["error"], message);
            assert_eq!(body["status"], status);
            assert_eq!(body["request_id"], "req-1");
        }
    }

    #[test]
    fn shed_requests_and_guest_failures_land_in_their_counters() {
        let metrics = crate::metrics::Metrics::new().for_module("m", "/m", "v", "stable");
        RequestError::Shed.counter(&metrics).unwrap().inc();
        assert_eq!(metrics.shed.get(), 1);
        assert!(RequestError::NoRoute.counter(&metrics).is_none());
        let timeout = GuestError::Timeout(std::time::Duration::from_secs(1));
        timeout.counter(&metrics).unwrap().inc();
        assert_eq!(metrics.timeouts.get(), 1);
        GuestError::Trap("x".into())
            .counter(&metrics)
            .unwrap()
            .inc();
        assert_eq!(metrics.traps.get(), 1);
    }
}
