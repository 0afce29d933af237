//! The admin listener, apart from traffic so probes and scrapes answer while
//! guests keep the traffic workers busy. It runs on its own thread with its
//! own single-threaded runtime.
//!
//! | endpoint       | answer                                                     |
//! |----------------|------------------------------------------------------------|
//! | `GET /healthz` | 200 while the traffic side makes progress (heartbeat, log writer) |
//! | `GET /ready`   | 200 once every module is loaded, 503 before and when draining |
//! | `GET /info`    | JSON: version, uptime, modules (route, file, size, sha256) |
//! | `GET /metrics` | Prometheus text format                                     |
//! | `POST /admin/reload` | re-read config and modules now; JSON report (422 if something failed) |
//!
//! Probes, `/info` and `/metrics` are read-only and open, for the kubelet
//! and Prometheus. Endpoints that change state (`POST /admin/...`) need
//! `Authorization: Bearer <admin.token>`; with no token configured they
//! are off (403), so a neighbour pod that reaches the port changes nothing.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::config::AdminConfig;

/// A running admin thread.
pub struct AdminThread {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminThread {
    /// Stops the admin server and waits for its thread.
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Proof of life from the traffic runtime: a task there stamps it five
/// times per stall timeout (at most once a second), and `/healthz` fails
/// once the stamp is older than the stall timeout. A runtime whose threads are all blocked (a wedged guest call,
/// a lock held forever) stops stamping; the admin thread, on a runtime of
/// its own, still answers and tells the kubelet.
#[derive(Clone)]
pub struct Heartbeat(Arc<(Instant, AtomicU64)>);

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat(Arc::new((Instant::now(), AtomicU64::new(0))))
    }
}

impl Heartbeat {
    /// Stamps the heartbeat every `every`, for as long as the runtime runs
    /// it.
    pub async fn run(self, every: Duration) {
        loop {
            self.beat();
            tokio::time::sleep(every).await;
        }
    }

    fn beat(&self) {
        let (epoch, last) = &*self.0;
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last stamp.
    fn age(&self) -> Duration {
        let (epoch, last) = &*self.0;
        epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)))
    }
}

/// What liveness checks.
#[derive(Clone)]
pub struct Liveness {
    /// The traffic runtime's heartbeat.
    pub heartbeat: Heartbeat,
    /// How stale the heartbeat, or how long a blocked log write, may get.
    pub stall_timeout: Duration,
}

impl Liveness {
    fn check(&self) -> Result<(), String> {
        let age = self.heartbeat.age();
        if age > self.stall_timeout {
            return Err(format!(
                "the traffic runtime has made no progress for {age:?}"
            ));
        }
        if let Some(blocked) = crate::telemetry::log_writer_stalled(self.stall_timeout) {
            return Err(format!("the log writer has been blocked for {blocked:?}"));
        }
        Ok(())
    }
}

/// Who may call the state-changing endpoints.
#[derive(Debug, Clone)]
pub enum AdminAuth {
    /// No token configured: those endpoints are off.
    Off,
    /// This token.
    Token(String),
    /// The token in this file, read on every use (a rotated Secret).
    File(PathBuf),
}

impl AdminAuth {
    /// What `[admin]` asks for.
    pub fn from_config(admin: &AdminConfig) -> Self {
        match (&admin.token_file, &admin.token) {
            (Some(file), _) => AdminAuth::File(file.clone()),
            (None, Some(token)) => AdminAuth::Token(token.0.0.clone()),
            (None, None) => AdminAuth::Off,
        }
    }

    /// `None` when the request carries the token, else the answer to give.
    fn refusal(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let expected = match self {
            AdminAuth::Off => {
                return Some(text(
                    StatusCode::FORBIDDEN,
                    "admin endpoints are off: set admin.token_file or BERTH_ADMIN__TOKEN\n",
                ));
            }
            AdminAuth::Token(token) => token.clone(),
            AdminAuth::File(path) => match std::fs::read_to_string(path) {
                Ok(token) if !token.trim().is_empty() => token.trim().to_owned(),
                _ => {
                    tracing::error!(file = %path.display(), "admin.token_file is missing or empty: admin endpoints refused");
                    return Some(text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the admin token file cannot be read\n",
                    ));
                }
            },
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Compared as digests, so the time taken says nothing about how
        // much of the token a guess got right.
        use sha2::{Digest, Sha256};
        if Sha256::digest(given.trim()) == Sha256::digest(&expected) {
            return None;
        }
        tracing::warn!(
            path = req.uri().path(),
            "admin request refused: bad or missing bearer token"
        );
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required\n",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(resp)
    }
}

/// Starts serving the admin endpoints on `listener` in a thread of its own.
pub fn spawn(
    listener: TcpListener,
    shared: Arc<Shared>,
    auth: AdminAuth,
    liveness: Liveness,
) -> anyhow::Result<AdminThread> {
    let listener = listener.into_std()?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    let thread = std::thread::Builder::new()
        .name("berth-admin".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building the admin runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("admin listener");
                serve(listener, shared, Arc::new((auth, liveness)), token).await;
            });
        })?;
    Ok(AdminThread {
        stop,
        thread: Some(thread),
    })
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    auth: Arc<(AdminAuth, Liveness)>,
    stop: CancellationToken,
) {
    // Reloads answer after the new modules compiled; probes must not wait.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (shared, auth) = (shared.clone(), auth.clone());
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (shared, auth) = (shared.clone(), auth.clone());
                async move { Ok::<_, Infallible>(route(&shared, &auth.0, &auth.1, &req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn route(
    shared: &Shared,
    auth: &AdminAuth,
    liveness: &Liveness,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() == Method::POST
        && req.uri().path().starts_with("/admin/")
        && let Some(refused) = auth.refusal(req)
    {
        return refused;
    }
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/admin/reload") => reload(shared).await,
        (&Method::GET | &Method::HEAD, "/healthz") => match liveness.check() {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            Err(why) => {
                tracing::error!(reason = why.as_str(), "liveness failing");
                text(StatusCode::SERVICE_UNAVAILABLE, format!("stalled: {why}\n"))
            }
        },
        (&Method::GET | &Method::HEAD, "/ready") => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if shared.draining.load(std::sync::atomic::Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "loading\n")
            }
        }
        (&Method::GET | &Method::HEAD, "/info") => info(shared),
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(shared),
        (_, "/healthz" | "/ready" | "/info" | "/metrics" | "/admin/reload") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn reload(shared: &Shared) -> Response<Full<Bytes>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if shared.reload.send(tx).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match rx.await {
        Ok(report) => {
            let status = if report.errors.is_empty() && report.config_error.is_none() {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            let mut resp = json_response(&serde_json::to_value(&report).unwrap_or_default());
            *resp.status_mut() = status;
            resp
        }
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

fn json_response(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn info(shared: &Shared) -> Response<Full<Bytes>> {
    let router = shared.router.load();
    let errors = shared.errors.lock().unwrap().clone();
    let mut modules: Vec<_> = router
        .modules()
        .map(|m| {
            json!({
                "name": &*m.name,
                "serving": true,
                "last_error": errors.get(&*m.name),
                "route": m.route,
                "file": m.origin,
                "size": m.size,
                "sha256": m.sha256,
                "loaded_at": humantime::format_rfc3339_seconds(m.loaded_at).to_string(),
                "limits": {
                    "timeout": humantime::format_duration(m.limits.timeout).to_string(),
                    "memory": m.limits.memory.to_string(),
                    "max_concurrency": m.limits.max_concurrency,
                    "max_body": m.limits.max_body.to_string(),
                    "max_response_body": m.limits.max_response_body.to_string(),
                },
            })
        })
        .collect();
    // Modules added by a reload that failed to load: nothing serves them.
    for (name, error) in &errors {
        if !router.modules().any(|m| &*m.name == name) {
            modules.push(json!({ "name": name, "serving": false, "last_error": error }));
        }
    }
    let uptime = SystemTime::now()
        .duration_since(shared.started_at)
        .unwrap_or_default();
    let body = json!({
        "name": "berth",
        "version": env!("CARGO_PKG_VERSION"),
        "ready": shared.is_ready(),
        "uptime_seconds": uptime.as_secs(),
        "modules": modules,
        "config_error": *shared.config_error.lock().unwrap(),
    });
    json_response(&body)
}

fn metrics(shared: &Shared) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(shared.metrics.render())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_once_the_heartbeat_is_stale() {
        let heartbeat = Heartbeat::default();
        heartbeat.beat();
        let liveness = Liveness {
            heartbeat: heartbeat.clone(),
            stall_timeout: Duration::from_millis(50),
        };
        assert!(liveness.check().is_ok());
        // The traffic runtime is wedged: nothing stamps the heartbeat.
        std::thread::sleep(Duration::from_millis(80));
        let why = liveness.check().unwrap_err();
        assert!(why.contains("traffic runtime"), "{why}");
        heartbeat.beat();
        assert!(liveness.check().is_ok());
    }
}
