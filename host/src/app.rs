//! Wiring: config → engine → bound ports → loaded modules → serving →
//! graceful shutdown. [`run`] is what `berth serve` does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::reload::{ConfigSource, Modules, ReloadRequest};
use crate::router::Router;
use crate::runtime::{LoadError, Runtime, RuntimeOptions};
use crate::server::ConnLimits;
use crate::{admin, server, signal};

/// State shared by the traffic and admin servers.
pub struct Shared {
    /// The routing table; swapped whole, read without a lock.
    pub router: ArcSwap<Router>,
    /// Every configured module has loaded.
    pub ready: AtomicBool,
    /// Shutdown has begun: `/ready` fails from now on.
    pub draining: AtomicBool,
    /// When the process started.
    pub started_at: SystemTime,
    /// Whether to write one log line per request.
    pub access_log: bool,
    /// Every metric of the host.
    pub metrics: Arc<Metrics>,
    /// The last load error of each module that has one.
    pub errors: Mutex<BTreeMap<String, String>>,
    /// Why the config file on disk is not the one running, if it is not.
    pub config_error: Mutex<Option<String>>,
    /// Asks for a reload (`POST /admin/reload`).
    pub reload: mpsc::Sender<ReloadRequest>,
}

impl Shared {
    /// Whether the pod should receive traffic.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

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

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Serves until SIGTERM/SIGINT, then shuts down gracefully.
pub async fn run(config: Config, source: ConfigSource) -> Result<(), ServeError> {
    let started = Instant::now();
    crate::redact::keep_query_values(!config.log.redact_query);
    tracing::info!(config = %effective_config(&config), "effective configuration");
    let mut signals = signal::Signals::install().context("installing signal handlers")?;
    let runtime = Runtime::new(&RuntimeOptions {
        max_instances: config.runtime.max_instances,
        max_memory: config
            .modules
            .values()
            .map(|m| config.limits_of(m).memory.0)
            .chain([config.defaults.limits.memory.0])
            .max()
            .unwrap_or_default(),
        epoch_tick: config.runtime.epoch_tick,
        cache_dir: config.cache_dir().map(Into::into),
        cache_max_bytes: config.runtime.cache_max_size.0,
        keep_resident: config
            .runtime
            .keep_resident
            .map(|b| usize::try_from(b.0).unwrap_or(usize::MAX)),
        decommit_batch: config.runtime.decommit_batch.max(1) as usize,
        memory_cow: config.runtime.memory_cow,
    })?;

    let listener = bind(config.server.listen, "server.listen").await?;
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let traffic_addr = listener.local_addr().context("reading the bound address")?;
    let admin_addr = admin_listener
        .local_addr()
        .context("reading the bound address")?;
    tracing::info!(listener = "traffic", addr = %traffic_addr, "listening");
    tracing::info!(listener = "admin", addr = %admin_addr, "listening");

    let (reload_tx, reload_rx) = mpsc::channel(8);
    let shared = Arc::new(Shared {
        router: ArcSwap::from_pointee(Router::default()),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        started_at: SystemTime::now(),
        access_log: config.log.access_log,
        metrics: Arc::new(Metrics::new()),
        errors: Mutex::default(),
        config_error: Mutex::default(),
        reload: reload_tx,
    });
    let heartbeat = admin::Heartbeat::default();
    tokio::spawn(
        heartbeat
            .clone()
            .run((config.admin.stall_timeout / 5).min(std::time::Duration::from_secs(1))),
    );
    let admin_thread = admin::spawn(
        admin_listener,
        shared.clone(),
        admin::AdminAuth::from_config(&config.admin),
        admin::Liveness {
            heartbeat,
            stall_timeout: config.admin.stall_timeout,
        },
    )?;

    // A pod deleted while it starts must not wait for every module to load.
    let modules = tokio::select! {
        loaded = Modules::start(runtime, shared.clone(), source, config.clone()) => loaded?,
        signal = signals.next() => {
            tracing::info!(signal, "shutting down during start-up");
            admin_thread.stop();
            return Ok(());
        }
    };
    for m in shared.router.load().modules() {
        tracing::info!(
            module = &*m.name,
            route = m.route.as_str(),
            file = m.origin.as_str(),
            size = m.size,
            sha256 = m.sha256.as_str(),
            "module loaded"
        );
    }
    shared.ready.store(true, Ordering::Release);
    tracing::info!(
        modules = config.modules.len(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    let stop_accepting = CancellationToken::new();
    let stop_watching = CancellationToken::new();
    let tracker = TaskTracker::new();
    let watcher = tokio::spawn(modules.watch(reload_rx, stop_watching.clone()));
    let server = tokio::spawn(server::serve(
        listener,
        shared.clone(),
        ConnLimits::from_config(&config.server),
        stop_accepting.clone(),
        tracker.clone(),
    ));

    let first = signals.next().await;
    tracing::info!(signal = first, "shutting down: readiness now fails");
    shared.draining.store(true, Ordering::Release);
    signals.exit_on_next();
    stop_watching.cancel();
    // A reload in progress (a download, a compile) must not hold up the
    // exit, and its result would never serve anyway.
    watcher.abort();

    let shutdown = &config.shutdown;
    tokio::time::sleep(shutdown.drain_delay).await;
    tracing::info!("drain delay over: closing the listener");
    stop_accepting.cancel();
    let _ = server.await;
    let _ = watcher.await;
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
    admin_thread.stop();
    tracing::info!("shutdown complete");
    Ok(())
}

/// The configuration as JSON for the start-up log: secrets are redacted by
/// their `Serialize` impl, paths shown resolved.
fn effective_config(config: &Config) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    value["runtime"]["modules_dir"] = config.modules_dir().display().to_string().into();
    for (name, m) in &config.modules {
        if let Some(url) = &m.url {
            value["modules"][name]["url"] = crate::redact::url(url).into();
        }
    }
    value
}
