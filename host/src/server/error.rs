//! Every way a request can end without the guest's answer, and the one
//! place that turns it into a response.

use http::{HeaderValue, Response, StatusCode, header};
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
    /// More headers than `server.max_headers` (on HTTP/2; hyper refuses
    /// them on HTTP/1.1).
    #[error("too many request headers")]
    TooManyHeaders,
    /// A gRPC health check named a service no module has.
    #[error("no module named {0:?}")]
    UnknownService(String),
    /// The client did not send the whole body within the module's
    /// `limits.timeout`.
    #[error("the request body did not arrive within the module's timeout")]
    BodyTimeout,
    /// The guest failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// How the host's own answers are written: JSON bodies with HTTP
/// statuses, or, to a gRPC client, gRPC statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Http,
    Grpc,
}

impl Dialect {
    /// gRPC for a POST over HTTP/2 with `content-type: application/grpc` or
    /// its `+proto`/`+json` forms (not gRPC-Web, which carries its trailers
    /// in the body). Nothing else: an empty 200 for a host error would
    /// mislead an HTTP/1.1 client or a cache in front of it.
    pub(super) fn of<B>(req: &http::Request<B>) -> Dialect {
        if req.version() != http::Version::HTTP_2 || req.method() != http::Method::POST {
            return Dialect::Http;
        }
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.trim().to_ascii_lowercase();
                ct == "application/grpc"
                    || ct.starts_with("application/grpc+")
                    || ct.starts_with("application/grpc;")
            });
        if grpc { Dialect::Grpc } else { Dialect::Http }
    }
}

/// gRPC status codes the host answers with (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum GrpcCode {
    Ok = 0,
    DeadlineExceeded = 4,
    NotFound = 5,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl RequestError {
    /// The HTTP status of this answer; a gRPC client gets 200 and
    /// [`RequestError::grpc_code`] instead, but metrics and canary
    /// verdicts count this status either way.
    pub(super) fn status(&self) -> StatusCode {
        match self {
            RequestError::NoRoute | RequestError::UnknownService(_) => StatusCode::NOT_FOUND,
            RequestError::Shed => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
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

    /// The gRPC status of this answer, as the gRPC spec maps the HTTP one
    /// where it says, and by meaning where the host knows more (a
    /// deadline, a size limit, a missing method).
    pub(super) fn grpc_code(&self) -> GrpcCode {
        match self {
            RequestError::NoRoute => GrpcCode::Unimplemented,
            RequestError::UnknownService(_) => GrpcCode::NotFound,
            RequestError::Shed => GrpcCode::Unavailable,
            RequestError::BodyTooLarge | RequestError::TooManyHeaders => {
                GrpcCode::ResourceExhausted
            }
            RequestError::Malformed(_) => GrpcCode::Internal,
            RequestError::BodyTimeout => GrpcCode::DeadlineExceeded,
            RequestError::Guest(GuestError::Timeout(_)) => GrpcCode::DeadlineExceeded,
            RequestError::Guest(GuestError::Instantiate(_)) => GrpcCode::Unavailable,
            RequestError::Guest(_) => GrpcCode::Internal,
        }
    }

    /// Adds the error to its counter, if it has one. Guest failures are
    /// counted by the guest's task, where they happen, since they can also
    /// happen after the response head is out and never reach here.
    pub(super) fn count(&self, metrics: &ModuleMetrics) {
        if let RequestError::Shed = self {
            metrics.shed.inc();
        }
    }

    /// The response: `{"error": ..., "status": ..., "request_id": ...}`,
    /// or for gRPC a trailers-only response (HTTP 200, no body, the status
    /// in `grpc-status` and `grpc-message`).
    pub(super) fn render(&self, request_id: &str, dialect: Dialect) -> Response<HyperOutgoingBody> {
        if dialect == Dialect::Grpc {
            return self.render_grpc();
        }
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

    fn render_grpc(&self) -> Response<HyperOutgoingBody> {
        let mut resp = Response::new(super::full(bytes::Bytes::new()));
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.extend(grpc_trailers(self.grpc_code(), &self.public_message()));
        if self.retry_after().is_some() {
            // gRPC's form of Retry-After, in milliseconds (gRFC A6).
            headers.insert("grpc-retry-pushback-ms", HeaderValue::from_static("1000"));
        }
        resp
    }
}

/// `grpc-status` and `grpc-message`: the trailers that end a gRPC call
/// (or the headers of a trailers-only answer).
pub(super) fn grpc_trailers(code: GrpcCode, message: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(u16::from(code as u8)));
    if !message.is_empty()
        && let Ok(message) = HeaderValue::from_str(&grpc_message(message))
    {
        trailers.insert("grpc-message", message);
    }
    trailers
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII,
/// and `%` itself (the gRPC HTTP/2 protocol spec).
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

    /// Adds the failure to its counter, if it has one of its own.
    pub(super) fn count(&self, metrics: &ModuleMetrics) {
        let counter = match self {
            GuestError::Timeout(_) => &metrics.timeouts,
            GuestError::Memory(_) => &metrics.memory,
            GuestError::Trap(_) => &metrics.traps,
            _ => return,
        };
        counter.inc();
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
    use http_body::Body as _;
    use http_body_util::BodyExt;

    async fn rendered(err: RequestError) -> (StatusCode, Option<String>, serde_json::Value) {
        let resp = err.render("req-1", Dialect::Http);
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

    #[tokio::test]
    async fn a_grpc_client_gets_each_host_answer_as_a_trailers_only_grpc_status() {
        let secs = std::time::Duration::from_secs(1);
        let cases = [
            (RequestError::NoRoute, "12", "no route for this path"),
            (
                RequestError::Shed,
                "14",
                "the module is at its concurrency limit",
            ),
            (
                RequestError::BodyTooLarge,
                "8",
                "request body exceeds the module's max_body",
            ),
            (
                RequestError::Malformed("x".into()),
                "13",
                "malformed request: x",
            ),
            (
                RequestError::BodyTimeout,
                "4",
                "the request body did not arrive within the module's timeout",
            ),
            (
                GuestError::Timeout(secs).into(),
                "4",
                "the module did not answer in time",
            ),
            (
                GuestError::Instantiate("pool".into()).into(),
                "14",
                "the host is at capacity",
            ),
            (
                GuestError::Memory("over".into()).into(),
                "13",
                "the module ran out of memory",
            ),
            (
                GuestError::Trap("secret detail".into()).into(),
                "13",
                "the module failed",
            ),
            (GuestError::NoResponse.into(), "13", "the module failed"),
        ];
        for (err, code, message) in cases {
            let resp = err.render("req-1", Dialect::Grpc);
            assert_eq!(resp.status(), StatusCode::OK, "{err}");
            let headers = resp.headers().clone();
            assert_eq!(headers["content-type"], "application/grpc");
            assert_eq!(headers["grpc-status"], code, "{err}");
            assert_eq!(headers["grpc-message"], message, "{err}");
            // Only shedding tells the client when to come back.
            assert_eq!(
                headers
                    .get("grpc-retry-pushback-ms")
                    .map(|v| v.to_str().unwrap()),
                matches!(err, RequestError::Shed).then_some("1000"),
                "{err}"
            );
            // Trailers-only: no message, and the stream ends with the head.
            let body = resp.into_body();
            assert!(body.is_end_stream(), "{err}");
            assert!(body.collect().await.unwrap().to_bytes().is_empty());
        }
    }

    #[test]
    fn grpc_messages_are_percent_encoded_and_dialects_told_by_content_type() {
        assert_eq!(grpc_message("100% ok"), "100%25 ok");
        assert_eq!(grpc_message("caf\u{e9}\n"), "caf%C3%A9%0A");
        let request = |version, method, ct: Option<&str>| {
            let mut req = http::Request::builder().version(version).method(method);
            if let Some(ct) = ct {
                req = req.header(header::CONTENT_TYPE, ct);
            }
            req.body(()).unwrap()
        };
        let dialect = |ct: &str| {
            Dialect::of(&request(
                http::Version::HTTP_2,
                http::Method::POST,
                Some(ct),
            ))
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
        ] {
            assert_eq!(dialect(ct), Dialect::Grpc, "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpcx",
            "application/json",
        ] {
            assert_eq!(dialect(ct), Dialect::Http, "{ct}");
        }
        let no_type = request(http::Version::HTTP_2, http::Method::POST, None);
        assert_eq!(Dialect::of(&no_type), Dialect::Http);
        // gRPC is a POST over HTTP/2: anything else gets HTTP answers.
        for (version, method) in [
            (http::Version::HTTP_11, http::Method::POST),
            (http::Version::HTTP_2, http::Method::GET),
        ] {
            let req = request(version, method, Some("application/grpc"));
            assert_eq!(Dialect::of(&req), Dialect::Http, "{req:?}");
        }
    }

    #[test]
    fn shed_requests_and_guest_failures_land_in_their_counters() {
        let metrics = crate::metrics::Metrics::new().for_module("m", "/m", "v", "stable");
        let counts = |m: &ModuleMetrics| {
            [
                m.shed.get(),
                m.timeouts.get(),
                m.memory.get(),
                m.traps.get(),
            ]
        };
        RequestError::Shed.count(&metrics);
        assert_eq!(counts(&metrics), [1, 0, 0, 0]);
        // Counted by the guest's task instead (see `RequestError::count`).
        RequestError::Guest(GuestError::Trap("x".into())).count(&metrics);
        RequestError::NoRoute.count(&metrics);
        RequestError::BodyTooLarge.count(&metrics);
        assert_eq!(counts(&metrics), [1, 0, 0, 0]);
        GuestError::Timeout(std::time::Duration::from_secs(1)).count(&metrics);
        assert_eq!(counts(&metrics), [1, 1, 0, 0]);
        GuestError::Memory("x".into()).count(&metrics);
        assert_eq!(counts(&metrics), [1, 1, 1, 0]);
        GuestError::Trap("x".into()).count(&metrics);
        assert_eq!(counts(&metrics), [1, 1, 1, 1]);
        GuestError::NoResponse.count(&metrics);
        GuestError::Instantiate("x".into()).count(&metrics);
        assert_eq!(counts(&metrics), [1, 1, 1, 1]);
    }
}
