//! Loading modules at start-up and swapping them while serving.
//!
//! One path serves every trigger — the file watcher, the periodic rescan,
//! `SIGHUP` and `POST /admin/reload`: re-read the config file, fetch every
//! module's bytes, and for each module whose digest or settings changed
//! build the new version off the request path, then swap the routing table
//! in one atomic store. Requests already running keep the `Arc` of the
//! version they started on. A module that fails to load keeps its previous
//! version serving; the failure is logged, counted and shown in `/info`.
//!
//! The watcher follows how Kubernetes updates a ConfigMap volume: files are
//! symlinks through `..data`, which is swapped by an atomic rename, so the
//! directory is watched rather than the files (a watch on a file goes dead
//! when its target is replaced). Events are debounced; the rescan is the
//! backstop for anything a watch misses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::config::{Config, ConfigError, Overrides};
use crate::outbound::{AllowList, OutboundSpec};
use crate::router::Router;
use crate::runtime::{LoadError, Module, ModuleSource, ModuleSpec, Runtime};

/// How long the watcher waits for a burst of file events to settle.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The most a reload waits after the first event of a burst, however many
/// follow: a file that never stops changing cannot postpone it for good.
const DEBOUNCE_MAX: Duration = Duration::from_millis(250);

/// The kubelet's link to the current version of a ConfigMap volume; every
/// update of the volume renames a new link over it.
const KUBELET_DATA_LINK: &str = "..data";

/// Where the configuration comes from, to read it again on reload.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `--config`, if given.
    pub file: Option<PathBuf>,
    /// Command-line flags.
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads and validates the configuration.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.file.as_deref(), &self.overrides)
    }

    /// The config file actually read, if any.
    fn path(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| {
            let default = Path::new(crate::config::DEFAULT_CONFIG_FILE);
            default.is_file().then(|| default.to_path_buf())
        })
    }
}

/// A request for a reload from the admin port, answered with the report.
pub type ReloadRequest = oneshot::Sender<ReloadReport>;

/// What one reload did.
#[derive(Debug, Default, Serialize)]
pub struct ReloadReport {
    /// What started it.
    pub trigger: &'static str,
    /// The new config file was rejected; the running one stays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Changed sections that only apply at the next start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<&'static str>,
    /// Modules now serving a new version or new settings.
    pub changed: Vec<String>,
    /// Modules no longer served.
    pub removed: Vec<String>,
    /// Modules that failed to load, with why.
    pub errors: BTreeMap<String, String>,
}

/// The module specs the config describes, with paths resolved.
pub fn module_specs(config: &Config) -> Vec<ModuleSpec> {
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
            let pin = m.sha256.as_ref().map(|d| d.to_ascii_lowercase());
            let source = match (&m.file, &m.url) {
                (_, Some(url)) => ModuleSource::Url {
                    url: url.clone(),
                    sha256: pin.unwrap_or_default(),
                },
                (file, None) => ModuleSource::File {
                    path: match file {
                        Some(file) => dir.join(file),
                        None => dir.join(format!("{name}.wasm")),
                    },
                    sha256: pin,
                },
            };
            ModuleSpec {
                name: name.clone(),
                route: m.route.clone(),
                source,
                config: values,
                limits: config.limits_of(m),
                outbound: OutboundSpec {
                    // Validated with the rest of the config.
                    allow: AllowList::parse(&m.allowed_outbound_hosts).unwrap_or_default(),
                    config: m.outbound.over(config.defaults.outbound),
                    upstreams: upstreams.clone(),
                },
            }
        })
        .collect()
}

/// The set of modules being served, and the one way to change it.
pub struct Modules {
    runtime: Runtime,
    shared: Arc<Shared>,
    source: ConfigSource,
    /// The running config; the lock also serializes reloads.
    config: Mutex<Config>,
}

impl Modules {
    /// Loads every module of `config`; any failure stops start-up.
    pub async fn start(
        runtime: Runtime,
        shared: Arc<Shared>,
        source: ConfigSource,
        config: Config,
    ) -> Result<Arc<Modules>, LoadError> {
        let modules = Arc::new(Modules {
            runtime,
            shared,
            source,
            config: Mutex::new(config.clone()),
        });
        let mut loaded = Vec::new();
        for (spec, result) in modules
            .load_all(module_specs(&config), &HashMap::new())
            .await
        {
            let outcome = if result.is_ok() { "ok" } else { "error" };
            let metrics = &modules.shared.metrics;
            metrics
                .loads
                .with_label_values(&[&spec.name, outcome])
                .inc();
            let module = result?;
            metrics.module_serving(&spec.name, &module.sha256, None, module.loaded_at);
            loaded.push(module);
        }
        modules.shared.router.store(Arc::new(Router::new(loaded)));
        Ok(modules)
    }

    /// Loads `specs` concurrently; a module whose bytes and settings are
    /// unchanged is kept as it is, one with only new settings is rebuilt
    /// without compiling.
    async fn load_all(
        &self,
        specs: Vec<ModuleSpec>,
        current: &HashMap<String, Arc<Module>>,
    ) -> Vec<(ModuleSpec, Result<Arc<Module>, LoadError>)> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, spec) in specs.iter().cloned().enumerate() {
            let prev = current.get(&spec.name).cloned();
            let (runtime, metrics) = (self.runtime.clone(), self.shared.metrics.clone());
            tasks.spawn(async move {
                // Unchanged on disk (by stat) or pinned by digest: no read,
                // no hash, no download.
                if let Some(prev) = &prev
                    && spec.unchanged_since(prev)
                {
                    if prev.spec == spec {
                        return (i, Ok(prev.clone()), false);
                    }
                    return (
                        i,
                        Ok(Arc::new(prev.respec(&runtime, spec, &metrics))),
                        false,
                    );
                }
                let fetched = match spec.fetch(&runtime).await {
                    Ok(f) => f,
                    Err(e) => return (i, Err(e), false),
                };
                if let Some(prev) = prev
                    && prev.sha256 == fetched.sha256
                {
                    prev.restamp(&fetched);
                    if prev.spec == spec {
                        return (i, Ok(prev), false);
                    }
                    return (
                        i,
                        Ok(Arc::new(prev.respec(&runtime, spec, &metrics))),
                        false,
                    );
                }
                let (name, origin) = (spec.name.clone(), spec.source.to_string());
                let result = tokio::task::spawn_blocking(move || {
                    Module::load(&runtime, spec, fetched, &metrics).map(Arc::new)
                })
                .await
                .unwrap_or_else(|joined| Err(panicked(name, origin, joined)));
                (i, result, true)
            });
        }
        let mut results: Vec<Option<Result<Arc<Module>, LoadError>>> =
            specs.iter().map(|_| None).collect();
        let mut compiled = false;
        while let Some(joined) = tasks.join_next().await {
            // Only a panic outside the compile (caught above) gets here.
            let Ok((i, result, loaded)) = joined else {
                continue;
            };
            results[i] = Some(result);
            compiled |= loaded;
        }
        // Only a load can add a cache entry: rescans that found nothing new
        // leave the folder alone.
        if compiled {
            return_freed_memory();
            self.prune_cache(&results);
        }
        specs
            .into_iter()
            .zip(results)
            .map(|(spec, r)| {
                let r = r.unwrap_or_else(|| {
                    Err(LoadError::Compile {
                        module: spec.name.clone(),
                        origin: spec.source.to_string(),
                        reason: "the loading task failed".into(),
                    })
                });
                (spec, r)
            })
            .collect()
    }

    /// Prunes the compile cache around the modules now loaded (and those
    /// still serving), off the async threads.
    fn prune_cache(&self, results: &[Option<Result<Arc<Module>, LoadError>>]) {
        if self.runtime.cache().is_none() {
            return;
        }
        let mut live: std::collections::HashSet<String> = results
            .iter()
            .filter_map(|r| r.as_ref()?.as_ref().ok())
            .map(|m| m.sha256.clone())
            .collect();
        live.extend(
            self.shared
                .router
                .load()
                .modules()
                .map(|m| m.sha256.clone()),
        );
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(cache) = runtime.cache() {
                cache.prune(&live);
            }
        });
    }

    /// Re-reads the config and every module, and swaps in what changed.
    /// `since` is when the change that set it off was first seen.
    pub async fn reload(&self, trigger: &'static str, since: Option<Instant>) -> ReloadReport {
        let mut running = self.config.lock().await;
        let mut report = ReloadReport {
            trigger,
            ..Default::default()
        };
        let metrics = &self.shared.metrics;
        let config = match self.source.load() {
            Ok(new) => {
                report.restart_needed = running.restart_only_changes(&new);
                if !report.restart_needed.is_empty() {
                    tracing::warn!(
                        sections = ?report.restart_needed,
                        "config changes that need a restart are left for the next start"
                    );
                }
                *self.shared.config_error.lock().unwrap() = None;
                new
            }
            Err(e) => {
                let message = e.to_string();
                if self.shared.config_error.lock().unwrap().as_deref() != Some(&message) {
                    tracing::error!(trigger, error = %message, "config change rejected: the running config stays");
                    metrics.config_reloads.with_label_values(&["error"]).inc();
                }
                *self.shared.config_error.lock().unwrap() = Some(message.clone());
                report.config_error = Some(message);
                running.clone()
            }
        };
        let router = self.shared.router.load_full();
        let current: HashMap<String, Arc<Module>> = router
            .modules()
            .map(|m| (m.name.to_string(), m.clone()))
            .collect();
        let mut serving = Vec::new();
        let mut errors = BTreeMap::new();
        for (spec, result) in self.load_all(module_specs(&config), &current).await {
            let prev = current.get(&spec.name);
            match result {
                Ok(module) => {
                    let unchanged = prev.is_some_and(|p| Arc::ptr_eq(p, &module));
                    if !unchanged {
                        metrics.reloads.with_label_values(&[&spec.name, "ok"]).inc();
                        metrics.module_serving(
                            &spec.name,
                            &module.sha256,
                            prev.map(|p| p.sha256.as_str()),
                            module.loaded_at,
                        );
                        tracing::info!(
                            trigger,
                            module = spec.name.as_str(),
                            sha256 = module.sha256.as_str(),
                            previous = prev.map(|p| p.sha256.as_str()),
                            since_change_ms = since.map(|t| t.elapsed().as_millis() as u64),
                            "module swapped in"
                        );
                        report.changed.push(spec.name.clone());
                    }
                    serving.push(module);
                }
                Err(err) => {
                    let message = err.to_string();
                    let known =
                        self.shared.errors.lock().unwrap().get(&spec.name) == Some(&message);
                    if !known {
                        // Logged and counted once per distinct failure, not
                        // on every rescan that finds it again.
                        metrics
                            .reloads
                            .with_label_values(&[&spec.name, "error"])
                            .inc();
                        tracing::error!(
                            trigger,
                            module = spec.name.as_str(),
                            error = %message,
                            "module reload failed: the previous version keeps serving"
                        );
                    }
                    errors.insert(spec.name.clone(), message);
                    if let Some(p) = prev {
                        serving.push(p.clone());
                    }
                }
            }
        }
        for name in current.keys() {
            if !serving.iter().any(|m| &*m.name == name) {
                if let Some(p) = current.get(name) {
                    metrics.module_removed(name, &p.sha256);
                }
                tracing::info!(trigger, module = name.as_str(), "module removed");
                report.removed.push(name.clone());
            }
        }
        if !report.changed.is_empty() || !report.removed.is_empty() {
            self.shared.router.store(Arc::new(Router::new(serving)));
        }
        report.errors = errors.clone();
        *self.shared.errors.lock().unwrap() = errors;
        if report.config_error.is_none() {
            if *running != config {
                metrics.config_reloads.with_label_values(&["ok"]).inc();
            }
            *running = config;
        }
        report
    }

    /// Reloads on file changes, on the rescan timer, on `SIGHUP` and on
    /// admin requests, until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        mut admin: mpsc::Receiver<ReloadRequest>,
        stop: CancellationToken,
    ) {
        let config = self.config.lock().await.clone();
        let config_path = self.source.path();
        let names = Arc::new(RwLock::new(watched_names(&config, config_path.as_deref())));
        let (tx, mut events) = mpsc::channel::<Instant>(64);
        let _watcher = if config.runtime.watch {
            let mut dirs = vec![config.modules_dir()];
            if let Some(parent) = config_path.as_deref().and_then(Path::parent) {
                dirs.push(if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                });
            }
            watcher(&dirs, names.clone(), tx)
        } else {
            None
        };
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut rescan = tokio::time::interval(config.runtime.rescan_interval);
        rescan.tick().await;
        loop {
            let (trigger, since) = tokio::select! {
                _ = stop.cancelled() => return,
                Some(first) = events.recv() => {
                    settle(&mut events, first).await;
                    ("watch", Some(first))
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => ("SIGHUP", None),
                Some(reply) = admin.recv() => {
                    let report = self.reload("admin", None).await;
                    let _ = reply.send(report);
                    continue;
                }
                _ = rescan.tick() => ("rescan", None),
            };
            self.reload(trigger, since).await;
            let config = self.config.lock().await;
            *names.write().unwrap() = watched_names(&config, config_path.as_deref());
        }
    }
}

/// Lets a burst of file events (new folder, symlink swap, old folder
/// removed) settle into one reload: waits for `DEBOUNCE` of quiet, but never
/// past `DEBOUNCE_MAX` after the `first` event.
async fn settle(events: &mut mpsc::Receiver<Instant>, first: Instant) {
    let latest = tokio::time::Instant::from_std(first + DEBOUNCE_MAX);
    loop {
        let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(latest);
        match tokio::time::timeout_at(quiet, events.recv()).await {
            Ok(Some(_)) if tokio::time::Instant::now() < latest => continue,
            _ => return,
        }
    }
}

/// The file names in the watched folders whose changes matter: the config
/// file, each module file, and the kubelet's `..data` link. Anything else
/// there (a log file, an editor's swap file) is ignored, so it cannot keep
/// postponing a reload.
fn watched_names(config: &Config, config_path: Option<&Path>) -> HashSet<OsString> {
    let mut names: HashSet<OsString> = module_specs(config)
        .iter()
        .filter_map(|spec| match &spec.source {
            ModuleSource::File { path, .. } => path.file_name().map(OsString::from),
            ModuleSource::Url { .. } => None,
        })
        .collect();
    names.extend(config_path.and_then(Path::file_name).map(OsString::from));
    names.insert(OsString::from(KUBELET_DATA_LINK));
    names
}

/// Watches `dirs` (not recursively); a change to an entry named in `names`
/// sends the time it was seen on `tx`.
fn watcher(
    dirs: &[PathBuf],
    names: Arc<RwLock<HashSet<OsString>>>,
    tx: mpsc::Sender<Instant>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        let names = names.read().unwrap();
        if event
            .paths
            .iter()
            .filter_map(|p| p.file_name())
            .any(|n| names.contains(n))
        {
            // A full channel already holds a pending reload.
            let _ = tx.try_send(Instant::now());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "file watching unavailable; relying on the rescan"))
    .ok()?;
    for dir in dirs {
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => tracing::info!(dir = %dir.display(), "watching for changes"),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; relying on the rescan")
            }
        }
    }
    Some(watcher)
}

/// A load whose compiler panicked fails like any bad module: the old
/// version keeps serving and the reload task lives on to load the next
/// one.
fn panicked(module: String, origin: String, joined: tokio::task::JoinError) -> LoadError {
    let reason = match joined.try_into_panic() {
        Ok(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(e) => e.to_string(),
    };
    tracing::error!(
        module = module.as_str(),
        reason = reason.as_str(),
        "the compiler panicked"
    );
    LoadError::Compile {
        module,
        origin,
        reason: format!("the compiler panicked: {reason}"),
    }
}

/// Compiling leaves megabytes freed but still held by the allocator's
/// per-thread arenas (idle RSS with the four examples, compiled at start-up:
/// 45 MiB before this, 32 after); give them back to the kernel.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `malloc_trim` only walks glibc's own arenas under their locks
    // and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_compiler_panic_becomes_a_load_error() {
        let joined = tokio::task::spawn_blocking(|| -> () { panic!("cranelift: boom") })
            .await
            .unwrap_err();
        let err = panicked("m".into(), "m.wasm".into(), joined);
        let text = err.to_string();
        assert!(
            text.contains("module `m`") && text.contains("cranelift: boom"),
            "{text}"
        );
    }
}
