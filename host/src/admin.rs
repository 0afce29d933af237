//! The admin listener, apart from traffic so probes and scrapes answer while
//! guests keep the traffic workers busy. It runs on its own thread with its
//! own single-threaded runtime.
//!
//! | endpoint       | answer                                                     |
//! |----------------|------------------------------------------------------------|
//! | `GET /healthz` | 200 while the process can serve                            |
//! | `GET /ready`   | 200 once every module is loaded, 503 before and when draining |
//! | `GET /info`    | JSON: version, uptime, modules (route, file, size, sha256) |
//! | `GET /metrics` | Prometheus text format                                     |
//! | `POST /admin/reload` | re-read config and modules now; JSON report (422 if something failed) |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// Starts serving the admin endpoints on `listener` in a thread of its own.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>) -> anyhow::Result<AdminThread> {
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
                serve(listener, shared, token).await;
            });
        })?;
    Ok(AdminThread {
        stop,
        thread: Some(thread),
    })
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
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
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, &req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/admin/reload") => reload(shared).await,
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
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

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
