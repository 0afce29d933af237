//! Loading a module: read the file, make sure it is a component, compile
//! it, check its imports against what the host links, and pre-instantiate
//! it. Every failure names the module and the file or URL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::Component;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::handler::{self, ProxyHandler};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use super::cache::{Origin, announced};
use super::link::{self, Unsatisfied};
use super::reuse::{Reuse, Workers};
use super::{Flavor, Host, LogBudget, RequestContext, Runtime, World};
use crate::config::{Limits, ModuleSource, ModuleSpec};
use crate::metrics::{GuestMetrics, Metrics, ModuleMetrics};
use crate::outbound::ModuleOutbound;
use crate::registry;

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("module `{module}`: cannot read {origin}: {reason}")]
    Read {
        /// Module name.
        module: String,
        /// The file or URL.
        origin: String,
        /// What went wrong.
        reason: String,
    },
    /// The module does not have the configured digest.
    #[error(
        "module `{module}`: {origin} has sha256 {actual}, but the config expects {expected}; \
         refusing it"
    )]
    Digest {
        /// Module name.
        module: String,
        /// The URL.
        origin: String,
        /// `sha256` from the config.
        expected: String,
        /// What was downloaded.
        actual: String,
    },
    /// The file is not WebAssembly at all.
    #[error("module `{module}`: {origin} is not a WebAssembly file")]
    NotWasm {
        /// Module name.
        module: String,
        /// The file or URL.
        origin: String,
    },
    /// The file is a core module, not a component.
    #[error(
        "module `{module}`: {origin} is a core WebAssembly module, not a component \
         (build it for wasm32-wasip2, or wrap it with `wasm-tools component new`)"
    )]
    CoreModule {
        /// Module name.
        module: String,
        /// The file or URL.
        origin: String,
    },
    /// Cranelift or the validator rejected it.
    #[error("module `{module}`: {origin} failed to compile: {reason}")]
    Compile {
        /// Module name.
        module: String,
        /// The file or URL.
        origin: String,
        /// The compiler's message.
        reason: String,
    },
    /// It imports things the host does not provide.
    #[error(
        "module `{module}`: {origin} imports what the host does not provide: {}",
        missing.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    )]
    MissingImports {
        /// Module name.
        module: String,
        /// The file or URL.
        origin: String,
        /// The unsatisfied imports.
        missing: Vec<Unsatisfied>,
    },
    /// The registry could not deliver it.
    #[error("module `{module}`: {source}")]
    Registry {
        /// Module name.
        module: String,
        /// What went wrong; names the reference.
        source: crate::registry::RegistryError,
    },
    /// It exports neither `wasi:http` handler.
    #[error(
        "module `{module}`: {origin} exports neither wasi:http/incoming-handler@0.2.x nor \
         wasi:http/handler@0.3.x: {reason}"
    )]
    NoHandler {
        /// Module name.
        module: String,
        /// The file or URL.
        origin: String,
        /// The linker's message.
        reason: String,
    },
}

/// A loaded, pre-instantiated module, ready to serve.
pub struct Module {
    /// Module name.
    pub name: Arc<str>,
    /// Route prefix.
    pub route: String,
    /// The file or URL it was loaded from.
    pub origin: String,
    /// Size of the component in bytes.
    pub size: u64,
    /// Hex sha256 of the component.
    pub sha256: String,
    /// For an OCI module, `registry/repository@sha256:...`: the manifest
    /// its reference resolved to.
    pub resolved: Option<String>,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Effective limits.
    pub limits: Limits,
    /// The `wasi:http` world it serves.
    pub world: World,
    /// How long its instances live.
    pub reuse: Reuse,
    /// Stable, or a canary being judged.
    pub track: crate::config::Track,
    /// The spec it was built from, to tell what a reload changes.
    pub(crate) spec: ModuleSpec,
    /// The compiled, linked component, for a respec.
    linked: Linked,
    /// How requests reach its instances.
    pub(crate) serving: Serving,
    /// What `wasi:config/store` returns.
    pub(crate) config: Arc<WasiConfigVariables>,
    /// Outbound calls: policy and per-upstream state.
    pub(crate) outbound: Arc<ModuleOutbound>,
    /// Concurrency limit: requests beyond it are shed, not queued.
    pub(crate) slots: Arc<Semaphore>,
    /// Metric handles, resolved once.
    pub(crate) metrics: ModuleMetrics,
    /// The metrics the module defines itself.
    pub(crate) guest_metrics: Arc<GuestMetrics>,
    /// What the file looked like when it was last read (file modules);
    /// updated when a read finds the same content under a new stamp.
    stamp: std::sync::Mutex<Option<FileStamp>>,
    /// The module's allowance of log lines.
    pub logs: Arc<LogBudget>,
}

/// How a module's requests reach an instance.
pub(crate) enum Serving {
    /// A fresh instance per request from the pre-instantiated handle, on
    /// the engine without async support: microseconds per request.
    Fresh(ProxyPre<Host>),
    /// Instances shared by requests, on the concurrent engine.
    Pooled(ProxyHandler<Workers>),
}

/// A compiled, linked component: what a changed spec can reuse without
/// compiling again.
#[derive(Clone)]
pub(crate) struct Linked {
    world: World,
    flavor: Flavor,
    pre: wasmtime::component::InstancePre<Host>,
}

/// What a loaded module's code was, kept when only its settings change.
struct Content {
    size: u64,
    sha256: String,
    stamp: Option<FileStamp>,
    resolved: Option<String>,
}

/// A component's bytes and digest.
pub struct Fetched {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Their hex sha256.
    pub sha256: String,
    /// For a file: what it looked like when it was read.
    pub stamp: Option<FileStamp>,
    /// For an OCI module: the pinned reference it resolved to.
    pub resolved: Option<String>,
}

/// What tells a file's content changed without reading it: a kubelet
/// ConfigMap swap (new folder, so a new inode and link target), an
/// editor's save by rename (new inode) and a copy over the file (new
/// mtime, usually a new size) all change it. Rescans compare stamps
/// instead of hashing every module every time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    /// Where the symlinks lead (`..data/x.wasm` -> `..2026_.../x.wasm`).
    target: Option<PathBuf>,
}

impl FileStamp {
    /// The stamp of `path` now.
    pub fn of(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            target: std::fs::canonicalize(path).ok(),
        })
    }
}

/// Reads and hashes a file; blocking, so it runs off the async threads.
fn read_hashed(path: &std::path::Path) -> std::io::Result<(Vec<u8>, String, FileStamp)> {
    let stamp = FileStamp::of(path)?;
    let bytes = std::fs::read(path)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok((bytes, sha256, stamp))
}

async fn read_hashed_async(path: PathBuf) -> std::io::Result<(Vec<u8>, String, FileStamp)> {
    tokio::task::spawn_blocking(move || read_hashed(&path))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

impl Fetched {
    /// Reads the file of `spec`, or downloads it (through the cache), and
    /// verifies its digest.
    pub async fn fetch(spec: &ModuleSpec, runtime: &Runtime) -> Result<Fetched, LoadError> {
        let origin = spec.source.to_string();
        let read_err = |reason: String| LoadError::Read {
            module: spec.name.clone(),
            origin: origin.clone(),
            reason,
        };
        let (fetched, pin) = match &spec.source {
            ModuleSource::File { path, sha256: pin } => {
                let (bytes, sha256, stamp) =
                    read_hashed_async(path.clone()).await.map_err(|e| {
                        // The usual surprise of a first local run.
                        let hint = if e.kind() == std::io::ErrorKind::NotFound {
                            " (a relative `file` is resolved against runtime.modules_dir, \
                             /modules unless set; a relative modules_dir is relative to the \
                             config file)"
                        } else {
                            ""
                        };
                        read_err(format!("{e}{hint}"))
                    })?;
                let fetched = Fetched {
                    bytes,
                    sha256,
                    stamp: Some(stamp),
                    resolved: None,
                };
                (fetched, pin.as_ref())
            }
            // The registry verifies the digests itself.
            ModuleSource::Oci { reference } => {
                return Self::pull(runtime, &spec.name, reference).await;
            }
            ModuleSource::Url { url, sha256 } => {
                let fetched = Self::download(runtime, url, sha256)
                    .await
                    .map_err(read_err)?;
                (fetched, Some(sha256))
            }
        };
        match pin {
            Some(expected) if *expected != fetched.sha256 => Err(LoadError::Digest {
                module: spec.name.clone(),
                origin,
                expected: expected.clone(),
                actual: fetched.sha256,
            }),
            _ => Ok(fetched),
        }
    }

    /// A download, from the cache's copy when it has one of that digest.
    /// Only content of the pinned digest is kept in the cache, in the same
    /// verified store as registry layers.
    async fn download(runtime: &Runtime, url: &str, sha256: &str) -> Result<Fetched, String> {
        let cache = runtime.cache().map(|c| c.dir().to_path_buf());
        let fetched = |bytes, sha256| Fetched {
            bytes,
            sha256,
            stamp: None,
            resolved: None,
        };
        let (dir, pin) = (cache.clone(), sha256.to_owned());
        let hit = tokio::task::spawn_blocking(move || registry::cached_blob(dir.as_deref()?, &pin))
            .await
            .ok()
            .flatten();
        if let Some(bytes) = hit {
            return Ok(fetched(bytes, sha256.to_owned()));
        }
        let bytes = runtime.clients().download(url, MAX_DOWNLOAD).await?;
        let pin = sha256.to_owned();
        let (bytes, actual) = tokio::task::spawn_blocking(move || {
            let actual = hex::encode(Sha256::digest(&bytes));
            if let Some(dir) = cache
                && actual == pin
            {
                registry::store_blob(&dir, &actual, &bytes);
            }
            (bytes, actual)
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(fetched(bytes, actual))
    }

    /// A pull from a registry (or its cached copy). It runs on a blocking
    /// thread: reading and hashing a cached 20 MB component must not hold
    /// up the threads serving requests.
    async fn pull(runtime: &Runtime, module: &str, reference: &str) -> Result<Fetched, LoadError> {
        let registry = runtime.registry().clone();
        let cache = runtime.cache().map(|c| c.dir().to_path_buf());
        let handle = tokio::runtime::Handle::current();
        let (name, reference) = (module.to_owned(), reference.to_owned());
        let pulled = tokio::task::spawn_blocking(move || {
            handle.block_on(registry.pull(&reference, cache.as_deref(), &name))
        })
        .await
        .map_err(|e| LoadError::Read {
            module: module.to_owned(),
            origin: "the registry client".into(),
            reason: e.to_string(),
        })?
        .map_err(|source| LoadError::Registry {
            module: module.to_owned(),
            source,
        })?;
        tracing::info!(
            module,
            resolved = pulled.pinned.as_str(),
            sha256 = pulled.sha256.as_str(),
            cached = pulled.cached,
            "module pulled"
        );
        Ok(Fetched {
            bytes: pulled.bytes,
            sha256: pulled.sha256,
            stamp: None,
            resolved: Some(pulled.pinned),
        })
    }
}

/// Largest component accepted from a URL.
const MAX_DOWNLOAD: usize = 512 << 20;

impl Module {
    /// Compiles (or takes from the cache), checks and pre-instantiates.
    /// Blocking: run it off the request path (`spawn_blocking`).
    pub fn load(
        runtime: &Runtime,
        spec: ModuleSpec,
        fetched: Fetched,
        metrics: &Arc<Metrics>,
    ) -> Result<Module, LoadError> {
        let started = std::time::Instant::now();
        let origin = spec.source.to_string();
        let found = World::of(&fetched.bytes);
        let world = found.unwrap_or(World::P2);
        let flavor = flavor_of(found, &Reuse::resolve(&spec.instances, world));
        let (component, compiled_now) = compile(runtime, flavor, &spec.name, &origin, &fetched)?;
        let linked = link(runtime, flavor, world, &spec.name, &origin, &component)?;
        metrics
            .compile
            .with_label_values(&[&spec.name])
            .observe(started.elapsed().as_secs_f64());
        // Made at zero either way, so "never compiled" reads as 0.
        let compilations = metrics.compilations.with_label_values(&[&spec.name]);
        if compiled_now {
            compilations.inc();
        }
        let content = Content {
            size: fetched.bytes.len() as u64,
            sha256: fetched.sha256,
            stamp: fetched.stamp,
            resolved: fetched.resolved,
        };
        Self::build(runtime, spec, linked, content, metrics)
    }

    /// Whether this module, if `spec` has the same source, still has the
    /// content the source would give now, judged without reading it: a file
    /// whose stamp is unchanged, or a URL (pinned to its digest, so its
    /// content cannot change).
    pub fn unchanged(&self, spec: &ModuleSpec) -> bool {
        if self.spec.source != spec.source {
            return false;
        }
        match &spec.source {
            ModuleSource::File { path, .. } => {
                let stamp = self.stamp.lock().unwrap();
                stamp.is_some() && FileStamp::of(path).ok() == *stamp
            }
            // Pinned by digest, or a tag resolved when the reference was
            // set: either way only a new reference pulls again.
            ModuleSource::Url { .. } | ModuleSource::Oci { .. } => true,
        }
    }

    /// A store for one request: the module's capabilities and `wasi:config`
    /// values, its memory limit, and its wall-clock budget checked at every
    /// epoch tick. The budget runs from now.
    pub fn new_store(&self, pre: &ProxyPre<Host>, cx: RequestContext) -> Store<Host> {
        let host = Host::new(
            cx,
            self.config.clone(),
            self.outbound.clone(),
            self.guest_metrics.clone(),
            self.limits.memory.0,
        );
        let mut store = Store::new(pre.engine(), host);
        store.limiter(|h| &mut h.limits);
        let deadline = Instant::now() + self.limits.timeout;
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline {
                UpdateDeadline::Interrupt
            } else {
                // A custom yield: tokio's plain yield can be rescheduled at
                // once through the LIFO slot and starve other tasks
                // (wasmtime#10667).
                UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
            })
        });
        store
    }

    /// Notes that the source was read again and held the same content.
    pub fn restamp(&self, fetched: &Fetched) {
        *self.stamp.lock().unwrap() = fetched.stamp.clone();
    }

    /// The same code under a changed spec (config, route, limits, policy):
    /// no compilation, unless the new instance settings need the other
    /// engine (`None`: load it again).
    pub fn respec(
        &self,
        runtime: &Runtime,
        spec: ModuleSpec,
        metrics: &Arc<Metrics>,
    ) -> Option<Result<Module, LoadError>> {
        let linked = self.linked.clone();
        if flavor_of(
            Some(linked.world),
            &Reuse::resolve(&spec.instances, linked.world),
        ) != linked.flavor
        {
            return None;
        }
        let content = Content {
            size: self.size,
            sha256: self.sha256.clone(),
            stamp: self.stamp.lock().unwrap().clone(),
            resolved: self.resolved.clone(),
        };
        Some(Self::build(runtime, spec, linked, content, metrics))
    }

    fn build(
        runtime: &Runtime,
        spec: ModuleSpec,
        linked: Linked,
        content: Content,
        metrics: &Arc<Metrics>,
    ) -> Result<Module, LoadError> {
        let name: Arc<str> = spec.name.as_str().into();
        let origin = spec.source.to_string();
        let module_metrics = metrics.for_module(
            &name,
            &spec.route,
            version_label(&content.sha256),
            spec.track.as_str(),
        );
        let guest_metrics = metrics.guest(&name, spec.limits.metric_series as usize);
        let logs = Arc::new(LogBudget::new(
            spec.limits.log_rate,
            metrics
                .guest_logs_dropped
                .with_label_values(&[&*name, "rate_limit"]),
        ));
        let outbound = Arc::new(ModuleOutbound::new(
            name.clone(),
            spec.outbound.clone(),
            runtime.clients(),
            metrics.clone(),
        ));
        let config: Arc<WasiConfigVariables> = Arc::new(spec.config.iter().cloned().collect());
        let reuse = Reuse::resolve(&spec.instances, linked.world);
        let no_handler = |e: wasmtime::Error| LoadError::NoHandler {
            module: spec.name.clone(),
            origin: origin.clone(),
            reason: format!("{e:#}"),
        };
        let serving = match linked.flavor {
            Flavor::Fresh => Serving::Fresh(ProxyPre::new(linked.pre.clone()).map_err(no_handler)?),
            Flavor::Concurrent => {
                let pre = match linked.world {
                    World::P2 => handler::ProxyPre::P2(
                        ProxyPre::new(linked.pre.clone()).map_err(no_handler)?,
                    ),
                    World::P3 => handler::ProxyPre::P3(
                        ServicePre::new(linked.pre.clone()).map_err(no_handler)?,
                    ),
                };
                Serving::Pooled(ProxyHandler::new(Workers {
                    pre,
                    reuse,
                    timeout: spec.limits.timeout,
                    memory_limit: spec.limits.memory.0,
                    config: config.clone(),
                    outbound: outbound.clone(),
                    guest_metrics: guest_metrics.clone(),
                    metrics: module_metrics.instances.clone(),
                    idle_cx: RequestContext {
                        module: name.clone(),
                        request_id: "-".into(),
                        trace: crate::trace::TraceContext::untraced(),
                        logs: logs.clone(),
                        deadline: None,
                    },
                }))
            }
        };
        Ok(Module {
            metrics: module_metrics,
            guest_metrics,
            logs,
            outbound,
            name,
            route: spec.route.clone(),
            origin,
            size: content.size,
            sha256: content.sha256,
            resolved: content.resolved,
            loaded_at: SystemTime::now(),
            limits: spec.limits,
            world: linked.world,
            reuse,
            track: spec.track,
            serving,
            linked,
            config,
            slots: Arc::new(Semaphore::new(spec.limits.max_concurrency as usize)),
            stamp: std::sync::Mutex::new(content.stamp),
            spec,
        })
    }
}

/// The `version` label of a module's metrics: enough of its sha256 to
/// tell versions apart, short enough to read on a dashboard.
pub fn version_label(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// The engine a module runs on: the fresh-instance one only for a WASI 0.2
/// module with an instance per request. A component with neither handler
/// goes to the concurrent engine, which parses every component, so the
/// linker can name what it lacks.
pub(crate) fn flavor_of(world: Option<World>, reuse: &Reuse) -> Flavor {
    if world == Some(World::P2) && reuse.is_fresh() {
        Flavor::Fresh
    } else {
        Flavor::Concurrent
    }
}

/// Checks the header, then compiles (through the cache when it is on);
/// says whether this call ran the compiler.
pub(super) fn compile(
    runtime: &Runtime,
    flavor: Flavor,
    name: &str,
    origin: &str,
    fetched: &Fetched,
) -> Result<(Component, bool), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    // The version field: components are layer 1, core modules layer 0.
    const COMPONENT: &[u8] = &[0x0d, 0x00, 0x01, 0x00];
    let bytes = &fetched.bytes;
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotWasm {
            module: name.into(),
            origin: origin.into(),
        });
    }
    if &bytes[4..8] != COMPONENT {
        return Err(LoadError::CoreModule {
            module: name.into(),
            origin: origin.into(),
        });
    }
    let engine = &runtime
        .engines(flavor)
        .map_err(|reason| LoadError::Compile {
            module: name.into(),
            origin: origin.into(),
            reason,
        })?
        .engine;
    let compiled = runtime.compiled(flavor, &fetched.sha256);
    let mut compiled_now = false;
    let compiled = compiled.get_or_init(|| {
        if let Some(component) = runtime
            .prebuilt()
            .and_then(|p| p.get(engine, name, &fetched.sha256, bytes.len()))
        {
            return Ok(component);
        }
        match runtime.cache() {
            Some(cache) => cache
                .get_or_compile(engine, name, &fetched.sha256, bytes)
                .map(|(c, from)| {
                    compiled_now = from == Origin::Compiled;
                    c
                }),
            None => {
                compiled_now = true;
                announced(name, bytes.len(), || Component::new(engine, bytes))
            }
        }
        .map_err(|e| format!("{e:#}"))
    });
    let component = compiled.clone().map_err(|reason| LoadError::Compile {
        module: name.into(),
        origin: origin.into(),
        reason,
    })?;
    Ok((component, compiled_now))
}

/// `berth compile`: compiles `spec`'s component for the engine it would
/// load on and writes the entry into `out`, where a pod's
/// `runtime.prebuilt_dir` finds it. Returns the entry's path.
pub async fn prebuild(
    runtime: &Runtime,
    spec: &ModuleSpec,
    out: &std::path::Path,
) -> Result<std::path::PathBuf, LoadError> {
    let origin = spec.source.to_string();
    let fetched = Fetched::fetch(spec, runtime).await?;
    let failed = |reason: String| LoadError::Compile {
        module: spec.name.clone(),
        origin: origin.clone(),
        reason,
    };
    let write_failed = |path: &std::path::Path, e: std::io::Error| LoadError::Read {
        module: spec.name.clone(),
        origin: origin.clone(),
        reason: format!("cannot write {}: {e}", path.display()),
    };
    let found = World::of(&fetched.bytes);
    let world = found.unwrap_or(World::P2);
    let flavor = flavor_of(found, &Reuse::resolve(&spec.instances, world));
    let engine = &runtime.engines(flavor).map_err(failed)?.engine;
    let payload = super::cache::announced(&spec.name, fetched.bytes.len(), || {
        engine.precompile_component(&fetched.bytes)
    })
    .map_err(|e| failed(format!("{e:#}")))?;
    let path = out.join(super::cache::entry_name(engine, &fetched.sha256));
    super::cache::write_entry(&path, &fetched.sha256, &payload)
        .map_err(|e| write_failed(&path, e))?;
    Ok(path)
}

/// Resolves every import against the linker (listing all that are
/// missing) and finds the handler of `world`.
pub(super) fn link(
    runtime: &Runtime,
    flavor: Flavor,
    world: World,
    name: &str,
    origin: &str,
    component: &Component,
) -> Result<Linked, LoadError> {
    // The component compiled for this flavour, so its engine exists.
    let linker = &runtime
        .engines(flavor)
        .expect("the engine the component compiled for")
        .linker;
    let pre = linker
        .instantiate_pre(component)
        .map_err(|_| LoadError::MissingImports {
            module: name.into(),
            origin: origin.into(),
            missing: link::unsatisfied_imports(linker, component),
        })?;
    // Look the handler up now, so a component without one fails to load.
    let found = match world {
        World::P2 => ProxyPre::new(pre.clone()).map(drop),
        World::P3 => ServicePre::new(pre.clone()).map(drop),
    };
    found.map_err(|e| LoadError::NoHandler {
        module: name.into(),
        origin: origin.into(),
        reason: format!("{e:#}"),
    })?;
    Ok(Linked { world, flavor, pre })
}
