//! Wiring: config → engine → bound ports → loaded modules → serving →
//! graceful shutdown. [`run`] is what `berth serve` does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::{AllowList, OutboundSpec};
use crate::router::Router;
use crate::runtime::{LoadError, Module, ModuleSpec, Runtime, RuntimeOptions};
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

/// The module specs the config describes, with paths resolved.
pub fn module_specs(config: &Config) -> Result<Vec<ModuleSpec>, ServeError> {
    let dir = config.modules_dir();
    let upstreams = Arc::new(config.upstreams.clone());
    config
        .modules
        .iter()
        .map(|(name, m)| {
            let mut values: Vec<(String, String)> = m
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            values.extend(m.secrets.iter().map(|(k, v)| (k.clone(), v.0.0.clone())));
            let allow = AllowList::parse(&m.allowed_outbound_hosts)
                .map_err(|e| anyhow::anyhow!("module `{name}`: {e}"))?;
            let outbound = OutboundSpec {
                allow,
                config: m.outbound.over(config.defaults.outbound),
                upstreams: upstreams.clone(),
            };
            Ok(ModuleSpec {
                name: name.clone(),
                route: m.route.clone(),
                file: dir.join(&m.file),
                config: values,
                limits: config.limits_of(m),
                outbound,
            })
        })
        .collect()
}

/// Compiles every module in parallel, off the async workers.
async fn load_all(
    runtime: &Runtime,
    specs: Vec<ModuleSpec>,
    metrics: &Arc<Metrics>,
) -> Result<Vec<Arc<Module>>, ServeError> {
    let tasks: Vec<_> = specs
        .into_iter()
        .map(|spec| {
            let (runtime, metrics) = (runtime.clone(), metrics.clone());
            let name = spec.name.clone();
            let task = tokio::task::spawn_blocking(move || Module::load(&runtime, spec, &metrics));
            (name, task)
        })
        .collect();
    let mut modules = Vec::with_capacity(tasks.len());
    for (name, task) in tasks {
        let result = task.await.context("module loading task panicked")?;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics.loads.with_label_values(&[&name, outcome]).inc();
        let module = result?;
        metrics
            .module_info
            .with_label_values(&[&name, &module.sha256])
            .set(1);
        modules.push(Arc::new(module));
    }
    Ok(modules)
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Serves until SIGTERM/SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let started = Instant::now();
    tracing::info!(config = %effective_config(&config), "effective configuration");
    let mut signals = signal::Signals::install().context("installing signal handlers")?;
    let runtime = Runtime::new(&RuntimeOptions {
        max_instances: config.runtime.max_instances,
        max_memory: config
            .modules
            .values()
            .map(|m| config.limits_of(m).memory.0)
            .max()
            .unwrap_or(config.defaults.limits.memory.0)
            .max(config.defaults.limits.memory.0),
        epoch_tick: config.runtime.epoch_tick,
    })?;

    let listener = bind(config.server.listen, "server.listen").await?;
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let traffic_addr = listener.local_addr().context("reading the bound address")?;
    let admin_addr = admin_listener
        .local_addr()
        .context("reading the bound address")?;
    tracing::info!(listener = "traffic", addr = %traffic_addr, "listening");
    tracing::info!(listener = "admin", addr = %admin_addr, "listening");

    let shared = Arc::new(Shared {
        router: ArcSwap::from_pointee(Router::default()),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        started_at: SystemTime::now(),
        access_log: config.log.access_log,
        metrics: Arc::new(Metrics::new()),
    });
    let admin_thread = admin::spawn(admin_listener, shared.clone())?;

    let modules = load_all(&runtime, module_specs(&config)?, &shared.metrics).await?;
    for m in &modules {
        tracing::info!(
            module = &*m.name,
            route = m.route.as_str(),
            file = %m.file.display(),
            size = m.size,
            sha256 = m.sha256.as_str(),
            "module loaded"
        );
    }
    shared.router.store(Arc::new(Router::new(modules)));
    shared.ready.store(true, Ordering::Release);
    tracing::info!(
        modules = config.modules.len(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let server = tokio::spawn(server::serve(
        listener,
        shared.clone(),
        ConnLimits::default(),
        stop_accepting.clone(),
        tracker.clone(),
    ));

    let first = signals.next().await;
    tracing::info!(signal = first, "shutting down: readiness now fails");
    shared.draining.store(true, Ordering::Release);
    signals.exit_on_next();

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
    admin_thread.stop();
    tracing::info!("shutdown complete");
    Ok(())
}

/// The configuration as JSON for the start-up log: secrets are redacted by
/// their `Serialize` impl, paths shown resolved.
fn effective_config(config: &Config) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    value["runtime"]["modules_dir"] = config.modules_dir().display().to_string().into();
    value
}
