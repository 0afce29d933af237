//! The traffic listener: HTTP/1.1 and cleartext HTTP/2 (h2c, by prior
//! knowledge) on one port, routing, and the guest call of each request (of
//! each stream, on HTTP/2).
//!
//! | case                              | answer                          | to gRPC clients      |
//! |-----------------------------------|---------------------------------|----------------------|
//! | no route                          | 404 JSON                        | UNIMPLEMENTED        |
//! | body over `max_body`              | 413 JSON                        | RESOURCE_EXHAUSTED   |
//! | module at its concurrency limit   | 503 JSON with `Retry-After`     | UNAVAILABLE, pushback|
//! | guest trapped or panicked         | 500 JSON with the request id    | INTERNAL             |
//! | guest over its memory limit       | 500 JSON                        | INTERNAL             |
//! | guest over its time limit         | 504 JSON                        | DEADLINE_EXCEEDED    |
//!
//! A request with `content-type: application/grpc*` gets the host's answer
//! as a trailers-only gRPC response (HTTP 200, `grpc-status`); metrics and
//! canary verdicts count the HTTP status all the same. Every response
//! carries `x-request-id`, taken from the request when it has a sane one.
//!
//! A request goes route → `invoke` → respond: `observe` opens its span
//! and, at the end, counts it and writes its access line; `invoke` runs
//! its steps (admission, store, WASI request, guest task, outcome,
//! response); every error on the way is a [`RequestError`], rendered in
//! one place.

pub(crate) mod body;
mod error;
mod grpc;
mod invoke;
mod observe;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::router::Routes;
use error::Dialect;
pub use error::{GuestError, RequestError};

const REQUEST_ID: &str = "x-request-id";

/// How the traffic listener treats connections and requests.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Time allowed to send a request head; hyper starts it whenever it
    /// waits for one, so it also closes idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// Largest request head (bytes).
    pub max_header_bytes: usize,
    /// Most headers in a request.
    pub max_headers: usize,
    /// Whether to write one log line per request.
    pub access_log: bool,
    /// Whether HTTP/2 by prior knowledge is served.
    pub http2: bool,
    /// Most concurrent streams per HTTP/2 connection.
    pub http2_max_streams: u32,
}

/// The first bytes of every HTTP/2 connection by prior knowledge
/// (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How often an HTTP/2 connection is pinged; one that does not answer
/// within `header_read_timeout` is closed (a peer that vanished).
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Runs HTTP/2 stream tasks in the server's tracker, so that a drain
/// waits for every stream as it does for every HTTP/1.1 connection.
#[derive(Clone)]
struct Tracked(TaskTracker);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

impl ServerOptions {
    /// The options `[server]` and `[log]` ask for.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let server = &config.server;
        ServerOptions {
            header_read_timeout: server.header_read_timeout,
            max_header_bytes: usize::try_from(server.max_header_bytes.0).unwrap_or(usize::MAX),
            max_headers: server.max_headers as usize,
            access_log: config.log.access_log,
            http2: server.http2,
            http2_max_streams: server.http2_max_streams,
        }
    }

    fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_header_size(self.max_header_bytes)
            .max_buf_size(self.max_header_bytes.max(8192))
            .keep_alive(true);
        // hyper's default is 100 on the stack; any explicit value moves the
        // header array to the heap for every request, so set it only if asked.
        if self.max_headers != 100 {
            builder.max_headers(self.max_headers);
        }
        builder
    }

    /// HTTP/2 with the limits that keep one client from taking the host:
    /// concurrent streams, the header list (HPACK-decoded, so a
    /// CONTINUATION flood ends at the same bound as a large head), and
    /// h2's counts of streams reset before they were served (the rapid
    /// reset attack, CVE-2023-44487) and of streams this side had to
    /// reset; past either count the connection gets GOAWAY. Flow-control
    /// windows stay hyper's 1 MiB per stream and connection, and a stream
    /// whose client stops reading is cut at its module's deadline like any
    /// response.
    fn http2(&self, tracker: &TaskTracker) -> hyper::server::conn::http2::Builder<Tracked> {
        let mut builder = hyper::server::conn::http2::Builder::new(Tracked(tracker.clone()));
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_streams)
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .keep_alive_interval(H2_KEEP_ALIVE)
            .keep_alive_timeout(self.header_read_timeout);
        builder
    }
}

/// Streams a client may reset before the host has served them (h2's
/// default, named here because it is the rapid-reset bound).
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams the host may have to reset for a client's errors before the
/// connection is closed (hyper's default since RUSTSEC-2024-0003).
const H2_MAX_LOCAL_RESETS: usize = 1024;

/// Reads the client's first bytes to tell HTTP/2 by prior knowledge (the
/// preface) from HTTP/1.1, within `within` (what an HTTP/1.1 head is
/// given): whether it is HTTP/2, and the bytes read, which [`Replayed`]
/// hands to hyper first. `None` when the client closed or stalled. Read,
/// not peeked: a peek cannot see a client that left, nor wait for more.
async fn read_preface(stream: &mut TcpStream, within: Duration) -> Option<(bool, Bytes)> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; H2_PREFACE.len()];
    while seen.len() < H2_PREFACE.len() {
        let want = H2_PREFACE.len() - seen.len();
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf[..want]))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen[..] != H2_PREFACE[..seen.len()] {
            return Some((false, seen.into()));
        }
    }
    Some((true, seen.into()))
}

/// A connection whose first bytes were read to tell its protocol: they are
/// read again first, then the rest.
struct Replayed {
    head: Bytes,
    stream: TcpStream,
}

impl tokio::io::AsyncRead for Replayed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let head = self.head.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Replayed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// When a connection last started a request, for closing HTTP/2
/// connections that sit idle (hyper closes idle HTTP/1.1 ones itself).
#[derive(Clone)]
struct LastRequest(Arc<std::sync::Mutex<tokio::time::Instant>>);

impl LastRequest {
    fn new() -> Self {
        LastRequest(Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())))
    }

    fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
    }

    fn at(&self) -> tokio::time::Instant {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drives `conn` until it ends; when `stop` fires first, or (with `idle`)
/// no request has started for that long, it finishes what is in flight
/// and closes: an idle HTTP/1.1 connection at once, a busy one after its
/// response (with `connection: close`), an HTTP/2 one after GOAWAY and its
/// open streams.
async fn until_drained<C, E>(
    conn: C,
    stop: &CancellationToken,
    idle: Option<(Duration, LastRequest)>,
    hangup: &body::Hangup,
) where
    C: GracefulConnection<Error = E>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let idle_out = async {
        let Some((limit, last)) = idle else {
            return std::future::pending().await;
        };
        loop {
            let due = last.at() + limit;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    // A stuck response closes the connection at once, in a drain too: a
    // graceful shutdown would wait for the stream the client never takes.
    let ended = tokio::select! {
        res = conn.as_mut() => Some(res),
        _ = stop.cancelled() => None,
        _ = idle_out => None,
        _ = hangup.requested() => return,
    };
    let res = match ended {
        Some(res) => res,
        None => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                res = conn => res,
                _ = hangup.requested() => return,
            }
        }
    };
    if let Err(err) = res {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// Accepts connections until `stop` fires, then asks every open connection
/// to finish its current request and close. Connections and guests run in
/// `tracker`, so the caller can wait for them to drain.
pub async fn serve(
    listener: TcpListener,
    routes: Arc<Routes>,
    options: ServerOptions,
    ready: Readiness,
    stop: CancellationToken,
    tracker: TaskTracker,
    watches: prometheus::IntGauge,
) {
    let http1 = options.http1();
    let http2 = options.http2(&tracker);
    let watching = Arc::new(grpc::Watching {
        ready: ready.clone(),
        stop: stop.clone(),
        tracker: tracker.clone(),
        slots: Arc::new(tokio::sync::Semaphore::new(grpc::MAX_WATCHES)),
        open: watches,
    });
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
        let routes = routes.clone();
        let ready = ready.clone();
        let stop = stop.clone();
        let conn_tracker = tracker.clone();
        let watching = watching.clone();
        let (http1, http2) = (http1.clone(), http2.clone());
        tracker.spawn(async move {
            let mut stream = stream;
            let (h2, head) = if options.http2 {
                let within = options.header_read_timeout;
                let opened = tokio::select! {
                    opened = read_preface(&mut stream, within) => opened,
                    _ = stop.cancelled() => None,
                };
                match opened {
                    Some(opened) => opened,
                    None => return,
                }
            } else {
                (false, Bytes::new())
            };
            let hangup = body::Hangup::default();
            let on_conn = hangup.clone();
            // Only HTTP/2 connections are closed for idling here.
            let last = LastRequest::new();
            let seen = h2.then(|| last.clone());
            let svc = service_fn(move |req: Request<Incoming>| {
                if let Some(seen) = &seen {
                    seen.touch();
                }
                let hangup = on_conn.clone();
                let (routes, ready) = (routes.clone(), ready.clone());
                let tracker = conn_tracker.clone();
                let watching = watching.clone();
                async move {
                    let within = options.header_read_timeout;
                    let resp = if is_health(&req, grpc::HEALTH_CHECK) {
                        let request_id = request_id(&req);
                        let result = grpc::health_check(req, &routes, ready(), within).await;
                        respond(result, &request_id, Dialect::Grpc)
                    } else if is_health(&req, grpc::HEALTH_WATCH) {
                        let request_id = request_id(&req);
                        let result = grpc::health_watch(req, routes, &watching, within).await;
                        respond(result, &request_id, Dialect::Grpc)
                    } else if req.headers().len() > options.max_headers {
                        // hyper counts HTTP/1.1 headers itself; on HTTP/2
                        // only their bytes are bounded.
                        let request_id = request_id(&req);
                        respond(
                            Err(RequestError::TooManyHeaders),
                            &request_id,
                            Dialect::of(&req),
                        )
                    } else {
                        handle(&routes, options.access_log, &tracker, hangup, req).await
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let io = TokioIo::new(Replayed { head, stream });
            if h2 {
                // An HTTP/2 connection with no new stream for as long as an
                // HTTP/1.1 one may idle gets GOAWAY (gRPC clients reconnect).
                let idle = Some((options.header_read_timeout, last));
                until_drained(http2.serve_connection(io, svc), &stop, idle, &hangup).await;
            } else {
                until_drained(http1.serve_connection(io, svc), &stop, None, &hangup).await;
            }
        });
    }
    drop(listener);
}

/// Whether the pod should receive traffic (what `/ready` says).
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Whether `req` calls `method` of the standard gRPC health service, which
/// the host answers itself, whatever the routes say.
fn is_health<B>(req: &Request<B>, method: &str) -> bool {
    req.uri().path() == method && Dialect::of(req) == Dialect::Grpc
}

/// Route, invoke, finish.
async fn handle(
    routes: &Routes,
    access_log: bool,
    tracker: &TaskTracker,
    hangup: body::Hangup,
    mut req: Request<Incoming>,
) -> Response<HyperOutgoingBody> {
    let request_id = request_id(&req);
    let dialect = Dialect::of(&req);
    if !host_is_valid(&req) {
        let err = RequestError::Malformed("the Host header is not a host[:port]".into());
        return respond(Err(err), &request_id, dialect);
    }
    let grpc_path = (dialect == Dialect::Grpc).then(|| req.uri().path().to_owned());
    let (module, canary) = {
        let table = routes.current();
        let Some(release) = table.route(req.uri().path()) else {
            return respond(Err(RequestError::NoRoute), &request_id, dialect);
        };
        let (module, canary) = release.pick(req.headers());
        (module.clone(), canary.map(|(c, track)| (c.clone(), track)))
    };
    let mut observed = observe::Observed::start(&req, module, request_id.clone());
    let limit = observed.module().limits.timeout;
    let timeout = match dialect {
        Dialect::Grpc => grpc::deadline(req.headers_mut(), limit),
        Dialect::Http => Ok(limit),
    };
    if let Ok(budget) = timeout {
        observed.set_deadline(budget);
    }
    let module = observed.module();
    let result = match timeout {
        Ok(timeout) => {
            let terms = invoke::Terms {
                timeout,
                dialect,
                hangup,
            };
            invoke::invoke(module, tracker, req, observed.context(), terms).await
        }
        Err(err) => Err(err),
    };
    // Shedding is the host's answer, not the version's: never judged.
    let refused = matches!(result, Err(RequestError::Shed));
    // Counted and judged by what happened, whatever the dialect says it
    // with (a gRPC client's 504 goes out as 200 with DEADLINE_EXCEEDED).
    let status = match &result {
        Ok(resp) => resp.status(),
        Err(err) => {
            err.count(&module.metrics);
            err.status()
        }
    };
    let mut resp = respond(result, &request_id, dialect);
    if let Some(path) = &grpc_path {
        resp = grpc::Counted::wrap(resp, module.clone(), path, observed.started());
    }
    let elapsed = observed.finish(status, access_log, refused);
    match canary {
        Some((canary, track)) if refused => canary.refused(track),
        Some((canary, track)) => canary.record(track, status.as_u16(), elapsed),
        None => {}
    }
    resp
}

/// Whether the `Host` header, if any, is a host with an optional port. The
/// guest gets it as the request's authority (JavaScript builds `request.url`
/// from it), so one with a path, a fragment, userinfo or a bad port could
/// steer its routing or crash its URL parser.
fn host_is_valid<B>(req: &Request<B>) -> bool {
    let Some(host) = req.headers().get(http::header::HOST) else {
        return true;
    };
    match http::uri::Authority::try_from(host.as_bytes()) {
        // `http` keeps a port it cannot read as u16 (`a:99999`) as none.
        Ok(a) => match a.as_str().strip_prefix(a.host()) {
            Some("") => true,
            Some(port) => port
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok()),
            None => false,
        },
        Err(_) => false,
    }
}

/// The only place an error becomes a response; every response carries the
/// request id.
fn respond(
    result: Result<Response<HyperOutgoingBody>, RequestError>,
    request_id: &str,
    dialect: Dialect,
) -> Response<HyperOutgoingBody> {
    let mut resp = result.unwrap_or_else(|err| err.render(request_id, dialect));
    if let Ok(mut v) = HeaderValue::from_str(request_id) {
        // A value new in every response is never worth a slot in HTTP/2's
        // header table, and h2's encoder compares each new one with every
        // one it stored before (5 us a response, profiled): "never
        // indexed" keeps it out. HTTP/1.1 ignores the flag.
        v.set_sensitive(true);
        resp.headers_mut().insert(REQUEST_ID, v);
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

/// A complete body in the type guest responses use.
pub(crate) fn full(data: impl Into<Bytes>) -> HyperOutgoingBody {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ConfigFile, get, module, routes, send};
    use http::Method;

    #[test]
    fn a_host_header_is_a_host_and_an_optional_port() {
        let with = |host: &[u8]| {
            let mut req = Request::new(());
            req.headers_mut()
                .insert(http::header::HOST, HeaderValue::from_bytes(host).unwrap());
            host_is_valid(&req)
        };
        for ok in [&b"example.com"[..], b"a:8080", b"[::1]:80", b"127.0.0.1"] {
            assert!(with(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"x/jsapp/upstream#"[..],
            b"a b",
            b"[::1",
            b"a:99999",
            b"x:y:z",
            b"user@host",
            b"a?b",
        ] {
            assert!(!with(bad), "{}", String::from_utf8_lossy(bad));
        }
        assert!(host_is_valid(&Request::new(())));
    }

    /// The traffic server on a free port, serving `file`'s modules.
    async fn server(file: &ConfigFile) -> (String, Arc<crate::metrics::Metrics>) {
        let (routes, metrics) = routes(file).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let options = ServerOptions::from_config(&file.load());
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        tokio::spawn(serve(
            listener,
            routes,
            options,
            Arc::new(|| true),
            stop,
            tracker,
            metrics.grpc_watches.clone(),
        ));
        (url, metrics)
    }

    /// `berth_instances_retired_total` of `reason`.
    fn retirements(metrics: &crate::metrics::Metrics, reason: &str) -> u64 {
        let label = format!("reason=\"{reason}\"");
        String::from_utf8(metrics.render())
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("berth_instances_retired_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until `reason` counts `n` retirements (an instance retires
    /// after its answer has gone out), and not more.
    async fn retired(metrics: &crate::metrics::Metrics, reason: &str, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while retirements(metrics, reason) < n {
            let seen = retirements(metrics, reason);
            assert!(
                std::time::Instant::now() < deadline,
                "{reason}: {seen} of {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(retirements(metrics, reason), n, "{reason}");
    }

    #[test]
    fn a_reused_instance_is_retired_and_counted_for_why_it_ended() {
        // A runtime of the test's own, so that the host's shutdown (the
        // runtime dropped with an instance alive) can be acted out.
        let host = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let file = ConfigFile::new("");
        let m = module(&file, "p3", "/p3", "p3_service");
        file.write(&format!(
            "{m}instances = {{ idle_timeout = \"1s\" }}\nlimits = {{ memory = \"16MiB\" }}\n"
        ));
        let metrics = host.block_on(async {
            let (url, metrics) = server(&file).await;
            assert_eq!(get(&format!("{url}/p3/trap")).await.status, 500);
            retired(&metrics, "trap", 1).await;
            assert_eq!(get(&format!("{url}/p3/grow")).await.status, 500);
            retired(&metrics, "memory_limit", 1).await;
            assert_eq!(get(&format!("{url}/p3/count")).await.status, 200);
            retired(&metrics, "idle", 1).await;
            assert_eq!(get(&format!("{url}/p3/count")).await.status, 200);
            metrics
        });
        assert_eq!(retirements(&metrics, "stopped"), 0);
        drop(host);
        let counts = ["trap", "memory_limit", "idle", "stopped"].map(|r| retirements(&metrics, r));
        assert_eq!(counts, [1, 1, 1, 1], "trap, memory_limit, idle, stopped");
    }

    fn misbehave(file: &ConfigFile, limits: &str) {
        let m = module(file, "m", "/m", "misbehave");
        file.write(&format!("{m}limits = {{ {limits} }}\n"));
    }

    #[tokio::test]
    async fn a_routed_request_is_answered_counted_and_given_an_id() {
        let file = ConfigFile::new("");
        let hello = module(&file, "hello", "/hello", "hello");
        file.write(&format!("{hello}config = {{ greeting = \"Ahoy\" }}\n"));
        let (url, metrics) = server(&file).await;
        let reply = get(&format!("{url}/hello")).await;
        assert_eq!(reply.status, 200);
        assert!(reply.body.contains("Ahoy"), "{}", reply.body);
        let id = reply.headers[REQUEST_ID].to_str().unwrap();
        assert!(
            id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("berth_http_server_requests_total{")
                    && l.contains(r#"module="hello""#)
                    && l.contains(r#"status="200""#)
                    && l.ends_with(" 1")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn no_route_is_a_404_in_json_that_keeps_the_clients_request_id() {
        let file = ConfigFile::new("");
        file.write(&module(&file, "hello", "/hello", "hello"));
        let (url, _) = server(&file).await;
        let reply = send(
            Method::GET,
            &format!("{url}/elsewhere"),
            &[(REQUEST_ID, "req-7")],
        )
        .await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.headers[REQUEST_ID], "req-7");
        let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["error"], "no route for this path");
        assert_eq!(body["request_id"], "req-7");
    }

    #[tokio::test]
    async fn a_trapping_guest_gets_a_500_from_the_host_and_is_counted() {
        let file = ConfigFile::new("");
        misbehave(&file, "");
        let (url, metrics) = server(&file).await;
        let reply = get(&format!("{url}/m/panic")).await;
        assert_eq!(reply.status, 500);
        let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["error"], "the module failed");
        assert!(
            !reply.body.contains("asked to panic"),
            "guest internals leaked"
        );
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains(r#"berth_guest_failures_total{kind="trap",module="m"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_full_module_sheds_with_503_and_retry_after() {
        let file = ConfigFile::new("");
        misbehave(&file, "max_concurrency = 1");
        let (url, metrics) = server(&file).await;
        let slow_url = format!("{url}/m/sleep?ms=3000");
        let slow = tokio::spawn(async move { get(&slow_url).await });
        // Until the slow request holds the one slot, probes may get in.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut served = 0;
        let shed = loop {
            let reply = get(&format!("{url}/m/ok")).await;
            if reply.status == 503 || std::time::Instant::now() > deadline {
                break reply;
            }
            served += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(shed.status, 503);
        assert_eq!(shed.headers[http::header::RETRY_AFTER], "1");
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.lines().any(|l| l
                .starts_with(r#"berth_http_server_shed_requests_total{module="m",version="#)
                && l.ends_with("} 1")),
            "{text}"
        );
        // Counted, not timed: the latency histogram is the version's own
        // (a canary's p99 is judged on it).
        let timed: f64 = text
            .lines()
            .filter(|l| l.starts_with("berth_http_server_request_duration_seconds_count{"))
            .filter(|l| l.contains(r#"module="m""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(timed, f64::from(served), "{text}");
        assert_eq!(slow.await.unwrap().status, 200);
    }
}
