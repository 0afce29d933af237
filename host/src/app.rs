//! Assembly: config → engine → modules → serving → graceful shutdown.
//! Each piece owns its state (the router its table, admin its health,
//! reload its status); [`run`] only creates them, hands each the others'
//! handles it needs, and sequences start-up and shutdown. The caller binds
//! the ports and says when to stop, so the whole host runs in-process in
//! tests as it does under `berth serve`.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::admin::{self, AdminState, Health};
use crate::config::{Config, ConfigSource};
use crate::metrics::Metrics;
use crate::reload::{self, Modules};
use crate::router::Routes;
use crate::runtime::{LoadError, Runtime, RuntimeOptions};
use crate::server::{self, ServerOptions};

/// Why `berth serve` stopped; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A module could not be loaded (exit code 2).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Anything else, e.g. a port that cannot be bound (exit code 1).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The two bound ports.
pub struct Listeners {
    /// Traffic (`server.listen`).
    pub traffic: TcpListener,
    /// Probes, metrics and admin calls (`admin.listen`).
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the ports `config` names.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        Ok(Listeners {
            traffic: bind(config.server.listen, "server.listen").await?,
            admin: bind(config.admin.listen, "admin.listen").await?,
        })
    }
}

impl Listeners {
    fn log(&self) -> anyhow::Result<()> {
        for (name, listener) in [("traffic", &self.traffic), ("admin", &self.admin)] {
            let addr = listener.local_addr().context("reading the bound address")?;
            tracing::info!(listener = name, addr = %addr, "listening");
        }
        Ok(())
    }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Serves until `shutdown` resolves (with the reason, for the log), then
/// drains: readiness fails, and after `shutdown.drain_delay` the listener
/// closes and running requests get `shutdown.grace_period` to finish.
pub async fn run(
    config: Config,
    source: ConfigSource,
    listeners: Listeners,
    shutdown: impl Future<Output = &'static str>,
) -> Result<(), ServeError> {
    let started = Instant::now();
    tokio::pin!(shutdown);
    crate::redact::keep_query_values(!config.log.redact_query);
    tracing::info!(config = %effective_config(&config), "effective configuration");
    let runtime = Runtime::new(&RuntimeOptions::from_config(&config))?;
    listeners.log()?;

    let routes = Arc::new(Routes::default());
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (reload, reload_requests) = reload::channel();
    let (admin_state, _beating) = admin_state(&config, &health, &routes, &reload, &metrics);
    let watches = metrics.grpc_watches.clone();
    let admin_thread = admin::spawn(listeners.admin, admin_state)?;

    // A pod deleted while it starts must not wait for every module to load.
    let start = Modules::start(
        runtime,
        routes.clone(),
        metrics,
        &reload,
        source,
        config.clone(),
    );
    let modules = tokio::select! {
        loaded = start => loaded?,
        signal = &mut shutdown => {
            tracing::info!(signal, "shutting down during start-up");
            admin_thread.stop();
            return Ok(());
        }
    };
    ready(&routes, &health, started);

    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let watcher = tokio::spawn(modules.watch(reload_requests));
    let ready: server::Readiness = {
        let health = health.clone();
        Arc::new(move || health.is_ready())
    };
    let server = tokio::spawn(server::serve(
        listeners.traffic,
        routes,
        ServerOptions::from_config(&config),
        ready,
        stop_accepting.clone(),
        tracker.clone(),
        watches,
    ));

    let signal = shutdown.await;
    tracing::info!(signal, "shutting down: readiness now fails");
    health.start_draining();
    // A reload in progress (a download, a compile) must not hold up the
    // exit, and its result would never serve anyway.
    watcher.abort();
    drain(&config, stop_accepting, server, &tracker).await;
    admin_thread.stop();
    tracing::info!("shutdown complete");
    Ok(())
}

/// What the admin port serves, and the heartbeat its liveness check
/// watches, beating on this (the traffic) runtime until dropped.
fn admin_state(
    config: &Config,
    health: &Arc<Health>,
    routes: &Arc<Routes>,
    reload: &reload::ReloadHandle,
    metrics: &Arc<Metrics>,
) -> (AdminState, AbortOnDropHandle<()>) {
    let heartbeat = admin::Heartbeat::default();
    let every = (config.admin.stall_timeout / 5).min(std::time::Duration::from_secs(1));
    let beating = AbortOnDropHandle::new(tokio::spawn(heartbeat.clone().run(every)));
    let state = AdminState {
        health: health.clone(),
        routes: routes.clone(),
        reload: reload.clone(),
        metrics: metrics.clone(),
        auth: admin::AdminAuth::from_config(&config.admin),
        liveness: admin::Liveness {
            heartbeat,
            stall_timeout: config.admin.stall_timeout,
        },
        peers: config.admin.peers.clone(),
    };
    (state, beating)
}

/// Names each module with its digest, then opens readiness.
fn ready(routes: &Routes, health: &Health, started: Instant) {
    let table = routes.current();
    for m in table.modules() {
        tracing::info!(
            module = &*m.name,
            route = m.route.as_str(),
            file = m.origin.as_str(),
            size = m.size,
            sha256 = m.sha256.as_str(),
            resolved = m.resolved.as_deref(),
            world = m.world.as_str(),
            max_requests = m.reuse.max_requests,
            "module loaded"
        );
    }
    health.set_ready();
    tracing::info!(
        modules = table.modules().count(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );
}

/// Waits out the drain delay (endpoints controllers and load balancers
/// stop sending), closes the listener, and gives running requests the
/// grace period.
async fn drain(
    config: &Config,
    stop_accepting: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    tracker: &TaskTracker,
) {
    let shutdown = &config.shutdown;
    tokio::time::sleep(shutdown.drain_delay).await;
    tracing::info!("drain delay over: closing the listener");
    stop_accepting.cancel();
    let _ = server.await;
    tracker.close();
    if tokio::time::timeout(shutdown.grace_period, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tracker.len(),
            "grace period over: cancelling the requests still running"
        );
    }
}

/// The configuration as JSON for the start-up log: secrets and URLs are
/// redacted by their types' `Serialize` impls, paths shown resolved.
fn effective_config(config: &Config) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    value["runtime"]["modules_dir"] = config.modules_dir().display().to_string().into();
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ConfigFile, get, module};

    #[tokio::test]
    async fn the_host_runs_in_process_until_told_to_stop() {
        let file = ConfigFile::new("");
        let hello = module(&file, "hello", "/", "hello");
        file.write(&format!(
            "[shutdown]\ndrain_delay = \"0s\"\ngrace_period = \"5s\"\n\n{hello}"
        ));
        let listeners = Listeners {
            traffic: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let traffic = format!("http://{}", listeners.traffic.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
            "test"
        };
        let host = tokio::spawn(run(file.load(), file.source.clone(), listeners, shutdown));
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while get(&format!("{admin}/ready")).await.status != 200 {
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(get(&format!("{traffic}/")).await.status, 200);
        stop.send(()).unwrap();
        host.await.unwrap().unwrap();
        // Both ports are closed once run returns.
        for url in [traffic, admin] {
            let port = url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "{url} still open"
            );
        }
    }

    #[tokio::test]
    async fn a_module_that_cannot_load_stops_start_up_with_a_load_error() {
        let file = ConfigFile::new("[modules.gone]\nroute = \"/\"\nfile = \"gone.wasm\"\n");
        let listeners = Listeners {
            traffic: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let err = run(
            file.load(),
            file.source.clone(),
            listeners,
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ServeError::Load(_)), "{err}");
        assert!(err.to_string().contains("module `gone`"), "{err}");
    }
}
