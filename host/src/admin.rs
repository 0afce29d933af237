//! The admin listener, apart from traffic so probes and scrapes answer while
//! guests keep the traffic workers busy. It runs on its own thread with its
//! own single-threaded runtime.
//!
//! | endpoint       | answer                                                     |
//! |----------------|------------------------------------------------------------|
//! | `GET /`        | the status page (HTML; see [`status`])                     |
//! | `GET /healthz` | 200 while the traffic side makes progress (heartbeat, log writer) |
//! | `GET /ready`   | 200 once every module is loaded, 503 before and when draining |
//! | `GET /info`    | JSON: version, uptime, modules (route, file, size, sha256) |
//! | `GET /metrics` | Prometheus text format                                     |
//! | `POST /admin/reload` | re-read config and modules now; JSON report (422 if something failed) |
//! | `POST /admin/canary/NAME/ACTION` | `promote`, `abort`, `pause` or `resume` a module's canary; JSON state (404 no canary, 409 already ended) |
//! | `POST /admin/...?pods=all` | the same action on every pod `admin.peers` names; each pod's answer (see [`fanout`]) |
//!
//! Probes, `/info` and `/metrics` are read-only and open, for the kubelet
//! and Prometheus. Endpoints that change state (`POST /admin/...`) need
//! `Authorization: Bearer <admin.token>`; with no token configured they
//! are off (403), so a neighbour pod that reaches the port changes nothing.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

mod fanout;
mod status;

use crate::canary::Action;
use crate::config::AdminConfig;
use crate::metrics::Metrics;
use crate::reload::ReloadHandle;
use crate::router::Routes;

/// A running admin thread.
pub struct AdminThread {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminThread {
    /// Stops the admin server and waits for its thread (as dropping it
    /// does; this names the moment).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for AdminThread {
    /// However `run` ends, early error included, the admin port closes.
    fn drop(&mut self) {
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

/// Where the process is in its life, as `/ready` and `/info` report it.
#[derive(Debug)]
pub struct Health {
    /// Every configured module has loaded.
    ready: AtomicBool,
    /// Shutdown has begun: `/ready` fails from now on.
    draining: AtomicBool,
    /// When the process started.
    started_at: SystemTime,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            started_at: SystemTime::now(),
        }
    }
}

impl Health {
    /// Every module has loaded: traffic may come.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Shutdown has begun: take the pod out of the Service's endpoints.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the pod should receive traffic.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Everything the admin endpoints read or act on.
pub struct AdminState {
    /// Readiness and uptime.
    pub health: Arc<Health>,
    /// The modules serving, for `/info`.
    pub routes: Arc<Routes>,
    /// Load errors for `/info`, and `POST /admin/reload`.
    pub reload: ReloadHandle,
    /// What `/metrics` renders.
    pub metrics: Arc<Metrics>,
    /// Who may call `POST /admin/...`.
    pub auth: AdminAuth,
    /// What `/healthz` checks.
    pub liveness: Liveness,
    /// `admin.peers`: every pod's admin port, for `?pods=all`.
    pub peers: Option<String>,
}

/// Starts serving the admin endpoints on `listener` in a thread of its own.
pub fn spawn(listener: TcpListener, state: AdminState) -> anyhow::Result<AdminThread> {
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
                serve(listener, Arc::new(state), token).await;
            });
            // A name lookup of `?pods=all` still running in the blocking
            // pool (cluster DNS down) must not hold up the process's exit.
            rt.shutdown_background();
        })?;
    Ok(AdminThread {
        stop,
        thread: Some(thread),
    })
}

/// Serves the admin endpoints on `listener` until `stop`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    // The status page's rates: counts sampled on this thread's runtime.
    let sampler = Arc::new(status::Sampler::default());
    let sampling = {
        let (state, sampler) = (state.clone(), sampler.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(status::EVERY);
            loop {
                tick.tick().await;
                sampler.sample(&state);
            }
        }))
    };
    // Reloads answer after the new modules compiled; probes must not wait.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => {
                drop(sampling);
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (state, sampler) = (state.clone(), sampler.clone());
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (state, sampler) = (state.clone(), sampler.clone());
                async move { Ok::<_, Infallible>(route(&state, &sampler, &req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn route(
    state: &AdminState,
    sampler: &status::Sampler,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() == Method::POST
        && req.uri().path().starts_with("/admin/")
        && let Some(refused) = state.auth.refusal(req)
    {
        return refused;
    }
    if req.method() == Method::POST
        && req.uri().path().starts_with("/admin/")
        && let Some(query) = req.uri().query()
    {
        return every_pod(state, req, query).await;
    }
    if let Some(rest) = req.uri().path().strip_prefix("/admin/canary/") {
        return match *req.method() {
            Method::POST => canary(state, rest),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        };
    }
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/admin/reload") => reload(&state.reload).await,
        (&Method::GET | &Method::HEAD, "/healthz") => match state.liveness.check() {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            Err(why) => {
                tracing::error!(reason = why.as_str(), "liveness failing");
                text(StatusCode::SERVICE_UNAVAILABLE, format!("stalled: {why}\n"))
            }
        },
        (&Method::GET | &Method::HEAD, "/ready") => {
            if state.health.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if state.health.draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "loading\n")
            }
        }
        (&Method::GET | &Method::HEAD, "/info") => info(state),
        (&Method::GET | &Method::HEAD, "/metrics") => {
            state.metrics.set_ready(state.health.is_ready());
            metrics(&state.metrics)
        }
        (&Method::GET | &Method::HEAD, "/") => {
            page(status::page(state, sampler), "text/html; charset=utf-8")
        }
        (&Method::GET | &Method::HEAD, "/status.css") => page(status::CSS.into(), "text/css"),
        (
            _,
            "/" | "/status.css" | "/healthz" | "/ready" | "/info" | "/metrics" | "/admin/reload",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn reload(handle: &ReloadHandle) -> Response<Full<Bytes>> {
    match handle.reload().await {
        Some(report) => {
            let status = if report.errors.is_empty() && report.config_error.is_none() {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            let mut resp = json_response(&serde_json::to_value(&report).unwrap_or_default());
            *resp.status_mut() = status;
            resp
        }
        None => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

/// `POST /admin/...?pods=all`: the action on every pod (see [`fanout`]).
async fn every_pod(
    state: &AdminState,
    req: &Request<Incoming>,
    query: &str,
) -> Response<Full<Bytes>> {
    if query != "pods=all" {
        return text(
            StatusCode::BAD_REQUEST,
            "the one query an admin action takes is ?pods=all\n",
        );
    }
    let Some(peers) = &state.peers else {
        return text(
            StatusCode::BAD_REQUEST,
            "?pods=all needs admin.peers (HOST:PORT of every pod's admin port; the chart sets it)\n",
        );
    };
    let authorization = req.headers().get(header::AUTHORIZATION);
    let (status, body) =
        fanout::fan_out(peers, req.method(), req.uri().path(), authorization).await;
    let mut resp = json_response(&body);
    *resp.status_mut() = status;
    resp
}

/// `POST /admin/canary/NAME/{promote,abort,pause,resume}`.
fn canary(state: &AdminState, path: &str) -> Response<Full<Bytes>> {
    let Some((module, action)) = path.split_once('/') else {
        return text(
            StatusCode::NOT_FOUND,
            "use /admin/canary/NAME/promote, abort, pause or resume\n",
        );
    };
    let Ok(action) = action.parse::<Action>() else {
        return text(
            StatusCode::NOT_FOUND,
            "unknown canary action: use promote, abort, pause or resume\n",
        );
    };
    let Some(canary) = state.reload.canaries.get(module) else {
        // The name is the client's: it goes into the answer as JSON only.
        let mut resp = json_response(&json!({
            "error": "no canary runs for this module",
            "module": module,
        }));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    };
    tracing::info!(
        module,
        action = action.as_str(),
        "canary action requested on the admin port"
    );
    match canary.act(action) {
        Ok(snapshot) => json_response(&serde_json::to_value(snapshot).unwrap_or_default()),
        Err(refused) => {
            let mut resp = json_response(&json!({
                "error": refused.to_string(),
                "state": refused.state,
            }));
            *resp.status_mut() = StatusCode::CONFLICT;
            resp
        }
    }
}

/// The status page or its style sheet, under a policy that allows
/// nothing but that style sheet.
fn page(body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(status::CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json_response(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn info(state: &AdminState) -> Response<Full<Bytes>> {
    let router = state.routes.current();
    let errors = state.reload.status.errors();
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
                "resolved": m.resolved,
                "world": m.world,
                "instances": m.reuse,
                "loaded_at": humantime::format_rfc3339_seconds(m.loaded_at).to_string(),
                "canary": state.reload.canaries.info(&m.name),
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
    // Modules being read, pulled or compiled (at start-up: all of them).
    for (name, since) in state.reload.status.loading() {
        if !router.modules().any(|m| *m.name == *name) {
            modules.push(json!({
                "name": name,
                "serving": false,
                "state": "loading",
                "since": humantime::format_rfc3339_seconds(since).to_string(),
            }));
        }
    }
    // Modules added by a reload that failed to load: nothing serves them.
    for (name, error) in &errors {
        if !router.modules().any(|m| &*m.name == name) {
            modules.push(json!({ "name": name, "serving": false, "last_error": error }));
        }
    }
    let uptime = SystemTime::now()
        .duration_since(state.health.started_at)
        .unwrap_or_default();
    let body = json!({
        "name": "berth",
        "version": env!("CARGO_PKG_VERSION"),
        "ready": state.health.is_ready(),
        "uptime_seconds": uptime.as_secs(),
        "modules": modules,
        "config_error": state.reload.status.config_error(),
    });
    json_response(&body)
}

fn metrics(metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(metrics.render())));
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
    use crate::reload::{ReloadReport, ReloadRequests};
    use crate::testing::{get, send};

    const TOKEN: &str = "s3cret-admin-token";

    /// The admin endpoints on a free port, with no modules.
    async fn admin(auth: AdminAuth) -> (String, Arc<AdminState>, ReloadRequests) {
        let (reload, requests) = crate::reload::channel();
        let state = Arc::new(AdminState {
            health: Arc::default(),
            routes: Arc::default(),
            reload,
            metrics: Arc::new(Metrics::new()),
            auth,
            liveness: Liveness {
                heartbeat: Heartbeat::default(),
                stall_timeout: Duration::from_secs(10),
            },
            peers: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, state.clone(), CancellationToken::new()));
        (url, state, requests)
    }

    #[tokio::test]
    async fn ready_follows_loading_serving_and_draining() {
        let (url, state, _requests) = admin(AdminAuth::Off).await;
        let ready = get(&format!("{url}/ready")).await;
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "loading\n")
        );
        state.health.set_ready();
        assert_eq!(get(&format!("{url}/ready")).await.status, StatusCode::OK);
        assert!(
            get(&format!("{url}/info"))
                .await
                .body
                .contains(r#""ready":true"#)
        );
        state.health.start_draining();
        let ready = get(&format!("{url}/ready")).await;
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        );
        // Liveness is about progress, not readiness.
        assert_eq!(get(&format!("{url}/healthz")).await.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn info_shows_what_the_last_reload_left_wrong() {
        let (url, state, _requests) = admin(AdminAuth::Off).await;
        let status = &state.reload.status;
        status.set_errors([("late".to_owned(), "module `late`: cannot read x".to_owned())].into());
        status.set_config_error(Some("unknown field `rout`".into()));
        let info: serde_json::Value =
            serde_json::from_str(&get(&format!("{url}/info")).await.body).unwrap();
        assert_eq!(info["config_error"], "unknown field `rout`");
        assert_eq!(info["modules"][0]["name"], "late");
        assert_eq!(info["modules"][0]["serving"], false);
        assert_eq!(
            info["modules"][0]["last_error"],
            "module `late`: cannot read x"
        );
    }

    #[tokio::test]
    async fn reload_needs_the_token_and_answers_with_the_report() {
        let (url, _state, mut requests) = admin(AdminAuth::Token(TOKEN.into())).await;
        let reload = format!("{url}/admin/reload");
        let refused = send(Method::POST, &reload, &[]).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.headers[header::WWW_AUTHENTICATE], "Bearer");
        let wrong = send(Method::POST, &reload, &[("authorization", "Bearer nope")]).await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

        tokio::spawn(async move {
            let reply = requests.recv().await.unwrap();
            let mut report = ReloadReport {
                trigger: "admin",
                ..Default::default()
            };
            report.errors.insert("a".into(), "broken".into());
            let _ = reply.send(report);
            // Then the reloader stops, as at shutdown.
        });
        let bearer = format!("Bearer {TOKEN}");
        let done = send(Method::POST, &reload, &[("authorization", &bearer)]).await;
        assert_eq!(
            done.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            done.body
        );
        let report: serde_json::Value = serde_json::from_str(&done.body).unwrap();
        assert_eq!(report["errors"]["a"], "broken");
        let gone = send(Method::POST, &reload, &[("authorization", &bearer)]).await;
        assert_eq!(
            (gone.status, gone.body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        );
    }

    #[tokio::test]
    async fn without_a_token_reload_is_off_and_other_paths_are_refused_plainly() {
        let (url, _state, _requests) = admin(AdminAuth::Off).await;
        let off = send(
            Method::POST,
            &format!("{url}/admin/reload"),
            &[("authorization", "Bearer x")],
        )
        .await;
        assert_eq!(off.status, StatusCode::FORBIDDEN);
        assert_eq!(
            send(Method::DELETE, &format!("{url}/ready"), &[])
                .await
                .status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            get(&format!("{url}/nope")).await.status,
            StatusCode::NOT_FOUND
        );
        let metrics = get(&format!("{url}/metrics")).await;
        assert!(
            metrics.headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
    }

    #[tokio::test]
    async fn pods_all_needs_the_token_admin_peers_and_no_other_query() {
        let (url, _state, _requests) = admin(AdminAuth::Token(TOKEN.into())).await;
        let bearer = format!("Bearer {TOKEN}");
        let abort = format!("{url}/admin/canary/a/abort");
        // The token first: nothing is sent on for a caller without it.
        let refused = send(Method::POST, &format!("{abort}?pods=all"), &[]).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        let unset = send(
            Method::POST,
            &format!("{abort}?pods=all"),
            &[("authorization", &bearer)],
        )
        .await;
        assert_eq!(unset.status, StatusCode::BAD_REQUEST);
        assert!(unset.body.contains("admin.peers"), "{}", unset.body);
        let other = send(
            Method::POST,
            &format!("{abort}?pods=some"),
            &[("authorization", &bearer)],
        )
        .await;
        assert_eq!(other.status, StatusCode::BAD_REQUEST);
        assert!(other.body.contains("?pods=all"), "{}", other.body);
    }

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
