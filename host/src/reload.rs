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
//! A reload is three steps: read the config (or keep the running one if the
//! file is invalid), reconcile the modules with it, publish the new table.
//! This module owns what the last reload left wrong ([`ReloadStatus`]) and
//! the channel other parts ask for a reload through ([`ReloadHandle`]).
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

use crate::canary::{Board, Canary};
use crate::config::{Config, ConfigSource, ModuleSource, ModuleSpec, Track};
use crate::metrics::Metrics;
use crate::router::{Release, Router, Routes};
use crate::runtime::{Fetched, LoadError, Module, Runtime};

mod canaries;

/// How long the watcher waits for a burst of file events to settle.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The most a reload waits after the first event of a burst, however many
/// follow: a file that never stops changing cannot postpone it for good.
const DEBOUNCE_MAX: Duration = Duration::from_millis(250);

/// The kubelet's link to the current version of a ConfigMap volume; every
/// update of the volume renames a new link over it.
const KUBELET_DATA_LINK: &str = "..data";

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
    /// Modules that failed to load, with why (a canary's under
    /// `NAME.canary`).
    pub errors: BTreeMap<String, String>,
    /// Modules whose canary started (or started again) at its first step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub canaries_started: Vec<String>,
}

/// What the last reload left wrong, for `/info`.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    /// The last load error of each module that has one.
    errors: std::sync::Mutex<BTreeMap<String, String>>,
    /// Modules being loaded now (read, pulled, compiled), and since when.
    loading: std::sync::Mutex<BTreeMap<String, std::time::SystemTime>>,
    /// Why the config file on disk is not the one running, if it is not.
    config_error: std::sync::Mutex<Option<String>>,
}

impl ReloadStatus {
    /// The last load error of each module that has one.
    pub fn errors(&self) -> BTreeMap<String, String> {
        self.errors.lock().unwrap().clone()
    }

    /// Modules being loaded now, and since when.
    pub fn loading(&self) -> BTreeMap<String, std::time::SystemTime> {
        self.loading.lock().unwrap().clone()
    }

    fn set_loading(&self, module: &str, loading: bool) {
        let mut map = self.loading.lock().unwrap();
        if loading {
            map.insert(module.to_owned(), std::time::SystemTime::now());
        } else {
            map.remove(module);
        }
    }

    /// Why the config file on disk is not the one running, if it is not.
    pub fn config_error(&self) -> Option<String> {
        self.config_error.lock().unwrap().clone()
    }

    /// Records the load errors of the last reload.
    pub(crate) fn set_errors(&self, errors: BTreeMap<String, String>) {
        *self.errors.lock().unwrap() = errors;
    }

    /// Records the outcome of reading the config; says whether it is news.
    pub(crate) fn set_config_error(&self, error: Option<String>) -> bool {
        let mut current = self.config_error.lock().unwrap();
        let news = *current != error;
        *current = error;
        news
    }
}

/// What other parts of the host hold of the reloader: its status, and a
/// way to ask for a reload.
#[derive(Clone)]
pub struct ReloadHandle {
    requests: mpsc::Sender<ReloadRequest>,
    /// What the last reload left wrong.
    pub status: Arc<ReloadStatus>,
    /// Every module's canary.
    pub canaries: Arc<Board>,
}

impl ReloadHandle {
    /// Reloads now and waits for the report; `None` once the reloader has
    /// stopped (the host is shutting down).
    pub async fn reload(&self) -> Option<ReloadReport> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// The receiving end of [`ReloadHandle::reload`], for [`Modules::watch`].
pub struct ReloadRequests(mpsc::Receiver<ReloadRequest>);

impl ReloadRequests {
    /// The next request; `None` once every handle is gone.
    pub async fn recv(&mut self) -> Option<ReloadRequest> {
        self.0.recv().await
    }
}

/// A handle and the requests it sends.
pub fn channel() -> (ReloadHandle, ReloadRequests) {
    let (tx, rx) = mpsc::channel(8);
    let handle = ReloadHandle {
        requests: tx,
        status: Arc::default(),
        canaries: Arc::default(),
    };
    (handle, ReloadRequests(rx))
}

/// The set of modules being served, and the one way to change it.
pub struct Modules {
    runtime: Runtime,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    status: Arc<ReloadStatus>,
    source: ConfigSource,
    /// The running config; the lock also serializes reloads.
    config: Mutex<Config>,
    /// Every module's canary, as the admin port sees it.
    canaries: Arc<Board>,
    /// The run task of each canary this process started, aborted when the
    /// canary is replaced or removed, or the reloader stops.
    runs: std::sync::Mutex<HashMap<String, tokio_util::task::AbortOnDropHandle<()>>>,
    /// Canaries that were just promoted or rolled back, for the table swap.
    finished: mpsc::UnboundedSender<Arc<Canary>>,
    finished_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Arc<Canary>>>>,
    /// Where how canaries ended is kept across restarts (in the cache
    /// folder), if anywhere.
    state_file: Option<PathBuf>,
}

/// One module's load result, and whether it compiled something.
type Loaded = (Result<Arc<Module>, LoadError>, bool);

/// A module version to load, with the version it may replace.
type Job = (ModuleSpec, Option<Arc<Module>>);

impl Modules {
    /// Loads every module of `config` and publishes the routing table; any
    /// failure stops start-up. Canaries start too; one that fails to load
    /// is a failed canary and does not stop start-up.
    pub async fn start(
        runtime: Runtime,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
        handle: &ReloadHandle,
        source: ConfigSource,
        config: Config,
    ) -> Result<Arc<Modules>, LoadError> {
        let (finished, finished_rx) = mpsc::unbounded_channel();
        let state_file = canaries::state_file(runtime.cache().map(|c| c.dir()), &source);
        let modules = Arc::new(Modules {
            runtime,
            routes,
            metrics,
            status: handle.status.clone(),
            canaries: handle.canaries.clone(),
            runs: Default::default(),
            finished,
            finished_rx: std::sync::Mutex::new(Some(finished_rx)),
            state_file,
            source,
            config: Mutex::new(config.clone()),
        });
        modules.restore_settled(&config);
        let specs = modules.stable_specs(&config);
        let pending = modules.pending_canaries(&config);
        let jobs = specs
            .iter()
            .cloned()
            .map(|s| (s, None))
            .chain(pending.iter().map(|c| (c.module.clone(), None)))
            .collect();
        let mut results = modules.load_all(jobs).await.into_iter();
        let mut loaded = Vec::new();
        for (spec, result) in results.by_ref().take(specs.len()) {
            let outcome = if result.is_ok() { "ok" } else { "error" };
            let metrics = &modules.metrics;
            metrics
                .loads
                .with_label_values(&[&spec.name, outcome])
                .inc();
            let module = result?;
            metrics.module_serving(&spec.name, &module.sha256, None, module.loaded_at);
            metrics.load_error.with_label_values(&[&spec.name]).set(0);
            loaded.push(module);
        }
        let mut report = ReloadReport::default();
        let mut started = HashMap::new();
        for (canary, (_, result)) in pending.into_iter().zip(results) {
            let stable = loaded.iter().find(|m| *m.name == *canary.module.name);
            if let Some(c) = modules.canary_loaded(canary, stable, result, "start", &mut report) {
                started.insert(c.module.name.to_string(), c);
            }
        }
        let releases = loaded.into_iter().map(|stable| Release {
            canary: started.remove(&*stable.name),
            stable,
        });
        modules.routes.publish(Router::with_releases(releases));
        Ok(modules)
    }

    /// Loads every job concurrently, each as [`Modules::load_one`] decides.
    async fn load_all(&self, jobs: Vec<Job>) -> Vec<(ModuleSpec, Result<Arc<Module>, LoadError>)> {
        let mut tasks = tokio::task::JoinSet::new();
        let specs: Vec<ModuleSpec> = jobs.iter().map(|(s, _)| s.clone()).collect();
        for (i, (spec, prev)) in jobs.into_iter().enumerate() {
            let (runtime, metrics) = (self.runtime.clone(), self.metrics.clone());
            let status = self.status.clone();
            tasks.spawn(async move {
                let name = match spec.track {
                    Track::Canary => format!("{}.canary", spec.name),
                    Track::Stable => spec.name.clone(),
                };
                status.set_loading(&name, true);
                let loaded = Self::load_one(runtime, metrics, spec, prev).await;
                status.set_loading(&name, false);
                (i, loaded)
            });
        }
        let mut results: Vec<Option<Loaded>> = specs.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            // Only a panic outside the compile (caught in load_one) gets here.
            if let Ok((i, loaded)) = joined {
                results[i] = Some(loaded);
            }
        }
        // Only a load can add a cache entry: rescans that found nothing new
        // leave the folder alone.
        if results.iter().flatten().any(|(_, compiled)| *compiled) {
            self.runtime.forget_compiled(&self.live(&results));
            crate::runtime::return_freed_memory();
            self.prune_cache(&results);
        }
        specs
            .into_iter()
            .zip(results)
            .map(|(spec, r)| {
                let r = r.map_or_else(
                    || {
                        Err(LoadError::Compile {
                            module: spec.name.clone(),
                            origin: spec.source.to_string(),
                            reason: "the loading task failed".into(),
                        })
                    },
                    |(r, _)| r,
                );
                (spec, r)
            })
            .collect()
    }

    /// One module: kept as it is when its bytes and settings are unchanged,
    /// rebuilt without compiling when only its settings changed, else
    /// fetched, compiled and checked off the async threads.
    async fn load_one(
        runtime: Runtime,
        metrics: Arc<Metrics>,
        spec: ModuleSpec,
        prev: Option<Arc<Module>>,
    ) -> Loaded {
        // The same code under the new spec; `None` when the new instance
        // settings need the other engine, so the bytes are compiled again.
        let respec = |prev: &Arc<Module>, spec: &ModuleSpec| {
            if prev.spec == *spec {
                Some(Ok(prev.clone()))
            } else {
                prev.respec(&runtime, spec.clone(), &metrics)
                    .map(|r| r.map(Arc::new))
            }
        };
        // Unchanged on disk (by stat) or pinned by digest: no read, no
        // hash, no download.
        if let Some(prev) = &prev
            && prev.unchanged(&spec)
            && let Some(result) = respec(prev, &spec)
        {
            return (result, false);
        }
        let fetched = match Fetched::fetch(&spec, &runtime).await {
            Ok(f) => f,
            Err(e) => return (Err(e), false),
        };
        if let Some(prev) = &prev
            && prev.sha256 == fetched.sha256
        {
            prev.restamp(&fetched);
            if let Some(result) = respec(prev, &spec) {
                return (result, false);
            }
        }
        let (name, origin) = (spec.name.clone(), spec.source.to_string());
        let (runtime, metrics) = (runtime.clone(), metrics.clone());
        let result = tokio::task::spawn_blocking(move || {
            Module::load(&runtime, spec, fetched, &metrics).map(Arc::new)
        })
        .await
        .unwrap_or_else(|joined| Err(panicked(name, origin, joined)));
        (result, true)
    }

    /// Prunes the compile cache around the modules now loaded (and those
    /// still serving), off the async threads.
    /// The sha256 of every version just loaded or serving now.
    fn live(&self, results: &[Option<Loaded>]) -> HashSet<String> {
        let mut live: HashSet<String> = results
            .iter()
            .filter_map(|r| r.as_ref()?.0.as_ref().ok())
            .map(|m| m.sha256.clone())
            .collect();
        for release in self.routes.current().releases() {
            live.insert(release.stable.sha256.clone());
            live.extend(release.canary.as_ref().map(|c| c.module.sha256.clone()));
        }
        live
    }

    fn prune_cache(&self, results: &[Option<Loaded>]) {
        if self.runtime.cache().is_none() {
            return;
        }
        let live = self.live(results);
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(cache) = runtime.cache() {
                cache.prune(&live);
            }
        });
    }

    /// Re-reads the config and every module, and swaps in what changed:
    /// read the config, reconcile the modules with it, publish.
    /// `since` is when the change that set it off was first seen.
    pub async fn reload(&self, trigger: &'static str, since: Option<Instant>) -> ReloadReport {
        let mut running = self.config.lock().await;
        let mut report = ReloadReport {
            trigger,
            ..Default::default()
        };
        let config = self.read_config(&running, &mut report);
        let table = self.routes.current();
        let current: HashMap<String, Arc<Module>> = table
            .modules()
            .map(|m| (m.name.to_string(), m.clone()))
            .collect();
        self.prune_settled(&config);
        let specs = self.stable_specs(&config);
        let (kept, pending) = self.canaries_to_load(&config);
        let stables = specs.len();
        let jobs = specs
            .into_iter()
            .map(|s| {
                let prev = current.get(&s.name).cloned();
                (s, prev)
            })
            .chain(pending.iter().map(|c| {
                let prev = self.canaries.get(&c.module.name).map(|c| c.module.clone());
                (c.module.clone(), prev)
            }))
            .collect();
        let mut loaded = self.load_all(jobs).await;
        let canary_results = loaded.split_off(stables);
        let serving = self.reconcile(loaded, &current, &mut report, since);
        let mut canaries = kept;
        // A fleet-analysed canary kept while its stable version changed
        // (new bytes under the same name) would ask the fleet about the old
        // one: judged against the new one, it starts again.
        let moved: Vec<Arc<Canary>> = canaries
            .values()
            .filter(|c| {
                let stable = serving.iter().find(|m| *m.name == *c.module.name);
                c.judged_against().is_some_and(|v| {
                    stable.is_some_and(|s| crate::runtime::version_label(&s.sha256) != v)
                })
            })
            .cloned()
            .collect();
        for live in moved {
            let stable = serving.iter().find(|m| *m.name == *live.module.name);
            let (spec, module) = (live.spec.clone(), live.module.clone());
            if let Some(c) = self.canary_loaded(spec, stable, Ok(module), trigger, &mut report) {
                canaries.insert(c.module.name.to_string(), c);
            }
        }
        for (canary, (_, result)) in pending.into_iter().zip(canary_results) {
            let stable = serving.iter().find(|m| *m.name == *canary.module.name);
            if let Some(c) = self.canary_loaded(canary, stable, result, trigger, &mut report) {
                canaries.insert(c.module.name.to_string(), c);
            }
        }
        self.stop_canaries_not_in(&canaries, &config);
        let releases: Vec<Release> = serving
            .into_iter()
            .map(|stable| Release {
                canary: canaries.remove(&*stable.name),
                stable,
            })
            .collect();
        if !same_releases(&table, &releases) {
            self.routes.publish(Router::with_releases(releases));
        }
        self.status.set_errors(report.errors.clone());
        self.count_load_errors(&running, &config, &report);
        if report.config_error.is_none() {
            if *running != config {
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
            }
            *running = config;
        }
        report
    }

    /// Sets `berth_module_load_error` (1 for each module whose load just
    /// failed, 0 for the others, gone for modules no longer configured)
    /// and `berth_config_error`. A gauge, not only the reload counter: a
    /// module that fails the first time it is seen has no earlier sample,
    /// so `increase()` of its counter never sees the failure.
    fn count_load_errors(&self, running: &Config, config: &Config, report: &ReloadReport) {
        let gauge = &self.metrics.load_error;
        for name in config.modules.keys() {
            gauge
                .with_label_values(&[name])
                .set(i64::from(report.errors.contains_key(name)));
        }
        for name in running.modules.keys() {
            if !config.modules.contains_key(name) {
                let _ = gauge.remove_label_values(&[name]);
            }
        }
        self.metrics
            .config_error
            .set(i64::from(report.config_error.is_some()));
    }

    /// The config to reconcile with: the file's if it is valid, else the
    /// running one (and the report says why).
    fn read_config(&self, running: &Config, report: &mut ReloadReport) -> Config {
        match self.source.load() {
            Ok(new) => {
                report.restart_needed = running.restart_only_changes(&new);
                if !report.restart_needed.is_empty() {
                    tracing::warn!(
                        sections = ?report.restart_needed,
                        "config changes that need a restart are left for the next start"
                    );
                }
                self.status.set_config_error(None);
                new
            }
            Err(e) => {
                let message = e.to_string();
                // Logged and counted once per distinct error, not on every
                // rescan that finds it again.
                if self.status.set_config_error(Some(message.clone())) {
                    tracing::error!(trigger = report.trigger, error = %message,
                        "config change rejected: the running config stays");
                    self.metrics
                        .config_reloads
                        .with_label_values(&["error"])
                        .inc();
                }
                report.config_error = Some(message);
                running.clone()
            }
        }
    }

    /// The modules to serve after a reload: each new load, or the previous
    /// version of a module whose load failed. Fills in the report.
    fn reconcile(
        &self,
        loaded: Vec<(ModuleSpec, Result<Arc<Module>, LoadError>)>,
        current: &HashMap<String, Arc<Module>>,
        report: &mut ReloadReport,
        since: Option<Instant>,
    ) -> Vec<Arc<Module>> {
        let mut serving = Vec::new();
        for (spec, result) in loaded {
            let prev = current.get(&spec.name);
            match result {
                Ok(module) => {
                    if !prev.is_some_and(|p| Arc::ptr_eq(p, &module)) {
                        self.swapped_in(&module, prev, report.trigger, since);
                        report.changed.push(spec.name.clone());
                    }
                    serving.push(module);
                }
                Err(err) => {
                    self.failed(&spec.name, &err, report.trigger);
                    report.errors.insert(spec.name.clone(), err.to_string());
                    serving.extend(prev.cloned());
                }
            }
        }
        for (name, prev) in current {
            if !serving.iter().any(|m| &*m.name == name) {
                self.metrics.module_removed(name, &prev.sha256);
                tracing::info!(
                    trigger = report.trigger,
                    module = name.as_str(),
                    "module removed"
                );
                report.removed.push(name.clone());
            }
        }
        serving
    }

    fn swapped_in(
        &self,
        module: &Module,
        prev: Option<&Arc<Module>>,
        trigger: &'static str,
        since: Option<Instant>,
    ) {
        let name = &*module.name;
        self.metrics.reloads.with_label_values(&[name, "ok"]).inc();
        let previous = prev.map(|p| p.sha256.as_str());
        self.metrics
            .module_serving(name, &module.sha256, previous, module.loaded_at);
        tracing::info!(
            trigger,
            module = name,
            sha256 = module.sha256.as_str(),
            resolved = module.resolved.as_deref(),
            previous,
            since_change_ms = since.map(|t| t.elapsed().as_millis() as u64),
            "module swapped in"
        );
    }

    fn failed(&self, name: &str, err: &LoadError, trigger: &'static str) {
        let message = err.to_string();
        // Logged and counted once per distinct failure, not on every rescan
        // that finds it again.
        if self.status.errors.lock().unwrap().get(name) == Some(&message) {
            return;
        }
        self.metrics
            .reloads
            .with_label_values(&[name, "error"])
            .inc();
        tracing::error!(
            trigger,
            module = name,
            error = %message,
            "module reload failed: the previous version keeps serving"
        );
    }

    /// Reloads on file changes, on the rescan timer, on `SIGHUP` and on
    /// admin requests, until the task is aborted.
    pub async fn watch(self: Arc<Self>, mut requests: ReloadRequests) {
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
        let mut finished = self
            .finished_rx
            .lock()
            .unwrap()
            .take()
            .expect("Modules::watch runs once");
        loop {
            let (trigger, since) = tokio::select! {
                Some(canary) = finished.recv() => {
                    self.settle(canary).await;
                    continue;
                }
                Some(first) = events.recv() => {
                    settle(&mut events, first).await;
                    ("watch", Some(first))
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => ("SIGHUP", None),
                Some(reply) = requests.recv() => {
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

/// Whether `new` serves exactly what `table` does (same versions, same
/// canaries), so nothing needs publishing.
fn same_releases(table: &Router, new: &[Release]) -> bool {
    let old: Vec<&Release> = table.releases().collect();
    old.len() == new.len()
        && new.iter().all(|n| {
            old.iter().any(|o| {
                Arc::ptr_eq(&o.stable, &n.stable)
                    && match (&o.canary, &n.canary) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    }
            })
        })
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
    let canaries = config.canary_specs().into_iter().map(|c| c.module);
    let mut names: HashSet<OsString> = config
        .module_specs()
        .into_iter()
        .chain(canaries)
        .filter_map(|spec| match &spec.source {
            ModuleSource::File { path, .. } => path.file_name().map(OsString::from),
            ModuleSource::Url { .. } | ModuleSource::Oci { .. } => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ConfigFile, module};

    async fn start(file: &ConfigFile) -> (Arc<Modules>, Arc<Routes>, ReloadHandle, ReloadRequests) {
        let config = file.load();
        let runtime = Runtime::new(&crate::runtime::RuntimeOptions::from_config(&config)).unwrap();
        let routes = Arc::new(Routes::default());
        let (handle, requests) = channel();
        let modules = Modules::start(
            runtime,
            routes.clone(),
            Arc::new(Metrics::new()),
            &handle,
            file.source.clone(),
            config,
        )
        .await
        .unwrap();
        (modules, routes, handle, requests)
    }

    fn serving(routes: &Routes) -> Vec<(String, String)> {
        routes
            .current()
            .modules()
            .map(|m| (m.name.to_string(), m.sha256.clone()))
            .collect()
    }

    #[tokio::test]
    async fn a_reload_swaps_changed_modules_keeps_the_rest_and_removes_the_gone() {
        let file = ConfigFile::new("");
        let (a, b) = (
            module(&file, "a", "/a", "swap_v1"),
            module(&file, "b", "/b", "hello"),
        );
        file.write(&format!("{a}{b}"));
        let (modules, routes, ..) = start(&file).await;
        let before = serving(&routes);
        assert_eq!(before.len(), 2);

        // Nothing changed: nothing is swapped, the table is the same one.
        let table = Arc::as_ptr(&routes.current());
        let report = modules.reload("test", None).await;
        assert!(
            report.changed.is_empty() && report.removed.is_empty(),
            "{report:?}"
        );
        assert_eq!(Arc::as_ptr(&routes.current()), table);

        // New bytes for `a`, `b` dropped from the config.
        module(&file, "a", "/a", "swap_v2");
        file.write(&a);
        let report = modules.reload("test", None).await;
        assert_eq!(report.changed, ["a"]);
        assert_eq!(report.removed, ["b"]);
        let after = serving(&routes);
        assert_eq!(after.len(), 1);
        assert_ne!(after[0].1, before.iter().find(|m| m.0 == "a").unwrap().1);
    }

    #[tokio::test]
    async fn a_broken_module_or_config_keeps_the_previous_version_and_says_why() {
        let file = ConfigFile::new("");
        let a = module(&file, "a", "/a", "hello");
        file.write(&a);
        let (modules, routes, handle, _) = start(&file).await;
        let before = serving(&routes);

        std::fs::write(file.dir.path().join("a.wasm"), b"not wasm").unwrap();
        let report = modules.reload("test", None).await;
        assert!(
            report.errors["a"].contains("not a WebAssembly file"),
            "{report:?}"
        );
        assert_eq!(serving(&routes), before);
        assert!(handle.status.errors()["a"].contains("a.wasm"));

        file.write(&format!("{a}route_typo = 1\n"));
        let report = modules.reload("test", None).await;
        let why = report.config_error.expect("config error");
        assert!(why.contains("route_typo"), "{why}");
        assert_eq!(handle.status.config_error().as_deref(), Some(why.as_str()));
        assert_eq!(serving(&routes), before);

        // Fixed: both errors clear.
        module(&file, "a", "/a", "hello");
        file.write(&a);
        let report = modules.reload("test", None).await;
        assert!(
            report.errors.is_empty() && report.config_error.is_none(),
            "{report:?}"
        );
        assert!(handle.status.errors().is_empty());
        assert_eq!(handle.status.config_error(), None);
    }

    #[tokio::test]
    async fn admin_requests_reach_the_watcher_and_get_its_report() {
        let file = ConfigFile::new("");
        file.write(&module(&file, "a", "/a", "hello"));
        let (modules, _, handle, requests) = start(&file).await;
        let watcher = tokio::spawn(modules.watch(requests));
        let report = handle.reload().await.expect("a report");
        assert_eq!(report.trigger, "admin");
        watcher.abort();
        let _ = watcher.await;
        // Once the watcher is gone, a request says so instead of hanging.
        assert!(handle.reload().await.is_none());
    }

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
