//! The traffic listener: HTTP/1.1 connections, routing, and one fresh guest
//! instance per request.
//!
//! | case                              | answer                          |
//! |-----------------------------------|---------------------------------|
//! | no route                          | 404 JSON                        |
//! | body over `max_body`              | 413 JSON                        |
//! | module at its concurrency limit   | 503 JSON with `Retry-After`     |
//! | guest trapped or panicked         | 500 JSON with the request id    |
//! | guest over its memory limit       | 500 JSON                        |
//! | guest over its time limit         | 504 JSON                        |
//!
//! Every response carries `x-request-id`, taken from the request when it
//! has a sane one.

pub(crate) mod body;
mod invoke;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::app::Shared;
use crate::runtime::RequestContext;
use crate::trace::TraceContext;
pub use invoke::GuestError;

const REQUEST_ID: &str = "x-request-id";

/// Connection-level protections against slow or abusive clients.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time allowed to send a request head; hyper starts it whenever it
    /// waits for one, so it also closes idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// Largest request head (bytes).
    pub max_header_bytes: usize,
    /// Most headers in a request.
    pub max_headers: usize,
}

impl ConnLimits {
    /// The limits of `[server]`.
    pub fn from_config(server: &crate::config::ServerConfig) -> Self {
        ConnLimits {
            header_read_timeout: server.header_read_timeout,
            max_header_bytes: usize::try_from(server.max_header_bytes.0).unwrap_or(usize::MAX),
            max_headers: server.max_headers as usize,
        }
    }
}

/// Accepts connections until `stop` fires, then asks every open connection
/// to finish its current request and close.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: ConnLimits,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    // hyper's default is 100 on the stack; any explicit value moves the
    // header array to the heap for every request, so set it only if asked.
    if limits.max_headers != 100 {
        builder.max_headers(limits.max_headers);
    }
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of fds and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let stop = stop.clone();
        let conn_tracker = tracker.clone();
        let builder = builder.clone();
        tracker.spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let tracker = conn_tracker.clone();
                async move { Ok::<_, Infallible>(handle(&shared, &tracker, req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let res = tokio::select! {
                res = conn.as_mut() => res,
                _ = stop.cancelled() => {
                    // Idle connections close now; a busy one finishes its
                    // response with `connection: close`, then closes.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = res {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
}

async fn handle(
    shared: &Shared,
    tracker: &TaskTracker,
    req: Request<Incoming>,
) -> Response<HyperOutgoingBody> {
    let started = Instant::now();
    let request_id = request_id(&req);
    let router = shared.router.load();
    let Some(module) = router.route(req.uri().path()).cloned() else {
        let mut resp = json_error(StatusCode::NOT_FOUND, "no route for this path", &request_id);
        set_request_id(&mut resp, &request_id);
        return resp;
    };
    drop(router);
    let method = req.method().clone();
    let trace = TraceContext::server(req.headers(), || {
        tracing::info_span!(
            target: "berth::request",
            "request",
            otel.name = %format_args!("{} {}", req.method(), module.route),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %req.method(),
            url.path = req.uri().path(),
            http.route = module.route.as_str(),
            http.response.status_code = tracing::field::Empty,
            module = &*module.name,
            request_id = &*request_id,
        )
    });
    let cx = RequestContext {
        logs: module.logs.clone(),
        module: module.name.clone(),
        request_id: request_id.clone(),
        trace,
    };
    let mut resp = invoke::invoke(&module, tracker, req, &cx).await;
    set_request_id(&mut resp, &request_id);
    let status = resp.status().as_u16();
    cx.trace.span.record("http.response.status_code", status);
    if status >= 500 {
        cx.trace.span.record("otel.status_code", "ERROR");
    }
    let metrics = &module.metrics;
    metrics.duration.observe(started.elapsed().as_secs_f64());
    metrics.count(&method, status);
    if shared.access_log {
        tracing::info!(
            target: "access",
            module = &*module.name,
            request_id = &*request_id,
            trace_id = %cx.trace,
            method = method.as_str(),
            route = module.route.as_str(),
            status,
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            "request"
        );
    }
    resp
}

/// The client's id when it is short and printable, else a fresh one.
fn request_id(req: &Request<Incoming>) -> Arc<str> {
    if let Some(id) = req.headers().get(REQUEST_ID)
        && let Ok(id) = id.to_str()
        && !id.is_empty()
        && id.len() <= 128
    {
        return id.into();
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:016x}",
        seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    )
    .into()
}

fn set_request_id<B>(resp: &mut Response<B>, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
}

/// A small JSON error body: `{"error": ..., "request_id": ...}`.
pub(crate) fn json_error(
    status: StatusCode,
    message: &str,
    request_id: &str,
) -> Response<HyperOutgoingBody> {
    let body = serde_json::json!({ "error": message, "status": status.as_u16(), "request_id": request_id });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A complete body in the type guest responses use.
pub(crate) fn full(data: impl Into<Bytes>) -> HyperOutgoingBody {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}
