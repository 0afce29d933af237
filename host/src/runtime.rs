//! The Wasm side of the host: engines with the pooling allocator and epoch
//! interruption, one per [`Flavor`] (a WASI 0.2 fresh-instance engine
//! without async support, and a concurrent one for WASI 0.3 and reused
//! instances), a [`Linker`] each holding the whole guest world, module
//! loading and checking ([`module`]), the per-store state ([`host`]) and
//! instance reuse ([`reuse`]).

mod cache;
mod check;
mod host;
mod link;
mod module;
mod reuse;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::Linker;

use crate::outbound::Clients;
use crate::registry::Registry;
use wasmtime::{
    Config as EngineConfig, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

pub use cache::{CompileCache, Prebuilt, output_dir};
pub use check::{CheckReport, check_bytes, check_file};
pub(crate) use host::Tasks;
pub use host::{Host, LogBudget, MemoryLimitExceeded, RequestContext};
pub use link::Unsatisfied;
pub(crate) use module::Serving;
pub use module::{Fetched, FileStamp, LoadError, Module, prebuild, version_label};
pub(crate) use reuse::Workers;
pub use reuse::{Retired, Retirement, Reuse, Streaming, Ticket};

/// Measured for Rust `wasm32-wasip2` components: each component instance
/// holds three core instances and two tables (see WASMTIME.md). Other
/// toolchains use a few more; leave headroom.
const CORE_INSTANCES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 3;

/// Dirty pages of a freed instance's memory reset with `memcpy`/`memset`
/// when `PAGEMAP_SCAN` finds them, the rest returned with `madvise`. On
/// wasmtime 50.0.2 (which again skips pages never touched) 256 KiB measured
/// best for a hello guest: 89 µs a request against 96 µs at 64 KiB and
/// 121 µs at 0, with no more RSS under load (bench/NOTES.md). At most this
/// much stays resident per warm slot (100 slots: 25 MiB at worst).
pub const DEFAULT_KEEP_RESIDENT: usize = 256 << 10;

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Component instances that may be live at once, across modules.
    pub max_instances: u32,
    /// Largest linear memory any guest may grow to; per-module limits are
    /// enforced below it through `StoreLimits`.
    pub max_memory: u64,
    /// Period of the epoch ticker.
    pub epoch_tick: Duration,
    /// Folder of the compile cache, if caching is on.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Most bytes the compile cache may hold.
    pub cache_max_bytes: u64,
    /// Bytes of each freed instance's memory reset in place rather than
    /// returned to the kernel; `None` picks [`DEFAULT_KEEP_RESIDENT`] where
    /// the kernel can find the dirty pages, else 0.
    pub keep_resident: Option<usize>,
    /// Freed slots whose memory is returned to the kernel in one batch.
    pub decommit_batch: usize,
    /// Map memory images copy-on-write instead of copying data segments.
    pub memory_cow: bool,
    /// Quiet time after which warm slots' memory goes back to the kernel;
    /// zero never.
    pub release_idle_after: Duration,
    /// How modules are pulled from OCI registries.
    pub registry: crate::config::RegistryConfig,
    /// The CPU compiled code is for.
    pub compile_target: crate::config::CompileTarget,
    /// A read-only folder of entries `berth compile` wrote.
    pub prebuilt_dir: Option<std::path::PathBuf>,
}

impl RuntimeOptions {
    /// The engine settings `config` asks for; the memory reservation fits
    /// the largest memory limit of any module.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let runtime = &config.runtime;
        RuntimeOptions {
            max_instances: runtime.max_instances,
            max_memory: config
                .modules
                .values()
                .map(|m| config.limits_of(m).memory.0)
                .chain([config.defaults.limits.memory.0])
                .max()
                .unwrap_or_default(),
            epoch_tick: runtime.epoch_tick,
            cache_dir: config.cache_dir().map(Into::into),
            cache_max_bytes: runtime.cache_max_size.0,
            keep_resident: runtime
                .keep_resident
                .map(|b| usize::try_from(b.0).unwrap_or(usize::MAX)),
            decommit_batch: runtime.decommit_batch.max(1) as usize,
            memory_cow: runtime.memory_cow,
            release_idle_after: runtime.release_idle_after,
            registry: config.registry.clone(),
            compile_target: runtime.compile_target,
            prebuilt_dir: runtime.prebuilt_dir.clone(),
        }
    }

    /// For `berth check`: one instance at a time, no cache, memory up to
    /// the most any config may grant.
    pub fn for_check() -> Self {
        RuntimeOptions {
            max_instances: 1,
            max_memory: 4 << 30,
            epoch_tick: Duration::from_secs(1),
            cache_dir: None,
            cache_max_bytes: 0,
            keep_resident: Some(0),
            decommit_batch: 1,
            memory_cow: true,
            release_idle_after: Duration::ZERO,
            registry: crate::config::RegistryConfig::default(),
            compile_target: crate::config::CompileTarget::Native,
            prebuilt_dir: None,
        }
    }
}

/// Which `wasi:http` world a component serves, found from its exports
/// before it is compiled (the world picks the engine it compiles for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum World {
    /// Exports `wasi:http/incoming-handler@0.2.x`.
    #[serde(rename = "wasi:http@0.2")]
    P2,
    /// Exports `wasi:http/handler@0.3.x` (native async).
    #[serde(rename = "wasi:http@0.3")]
    P3,
}

impl World {
    /// The world of a component, from the names of its top-level exports;
    /// `None` when it exports neither handler (the linker then says what
    /// is wrong). Read with wasmparser, the parser wasmtime itself uses,
    /// skipping nested modules and components.
    pub fn of(bytes: &[u8]) -> Option<World> {
        use wasmtime::wasmparser::{Parser, Payload};
        let mut world = None;
        let mut depth = 0usize;
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.ok()? {
                Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
                Payload::End(_) => {
                    if depth == 0 {
                        break;
                    }
                    depth -= 1;
                }
                Payload::ComponentExportSection(exports) if depth == 0 => {
                    for export in exports {
                        let name = export.ok()?.name.full_name();
                        if name.starts_with("wasi:http/handler@0.3.") {
                            return Some(World::P3);
                        }
                        if name.starts_with("wasi:http/incoming-handler@0.2.") {
                            world = Some(World::P2);
                        }
                    }
                }
                _ => {}
            }
        }
        world
    }

    /// Display name, as in `/info` and `berth check`.
    pub fn as_str(self) -> &'static str {
        match self {
            World::P2 => "wasi:http@0.2",
            World::P3 => "wasi:http@0.3",
        }
    }
}

/// The two engine settings a module can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// No component-model-async support: a WASI 0.2 handler called once
    /// per fresh instance skips the async bookkeeping (a task, scopes and
    /// a waitable set per call), ~40% of the CPU of a hello request.
    Fresh,
    /// Component-model-async on: WASI 0.3 components, and any component
    /// whose instances serve more than one request.
    Concurrent,
}

/// One engine with its linker.
pub(crate) struct Engines {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<Host>,
}

/// The shared engines and linkers. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    opts: RuntimeOptions,
    fresh: Engines,
    /// Built on first use: a host serving only WASI 0.2 modules never
    /// reserves the second instance pool.
    concurrent: Arc<OnceLock<Result<Engines, String>>>,
    clients: Arc<Clients>,
    registry: Arc<Registry>,
    cache: Option<CompileCache>,
    prebuilt: Option<Prebuilt>,
    /// Components compiled by this process, by flavour and sha256: modules
    /// with the same bytes (many routes of one component, a canary of the
    /// version serving elsewhere, a hot-swap to bytes already loaded)
    /// share one compile and one copy of the code. A cell per key, so two
    /// loads of the same bytes at once compile them once.
    compiled: std::sync::Mutex<std::collections::HashMap<(Flavor, String), Arc<Compiled>>>,
    ticker_stop: Arc<AtomicBool>,
}

/// A component compiled once, or why it would not compile.
pub(crate) type Compiled = OnceLock<Result<wasmtime::component::Component, String>>;

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// The cell holding the component of `sha256` for `flavor`.
    pub(crate) fn compiled(&self, flavor: Flavor, sha256: &str) -> Arc<Compiled> {
        self.inner
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((flavor, sha256.to_owned()))
            .or_default()
            .clone()
    }

    /// Forgets the compiled components no module in `live` (sha256s) uses.
    pub(crate) fn forget_compiled(&self, live: &std::collections::HashSet<String>) {
        self.inner
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, sha), _| live.contains(sha));
    }

    /// Builds the engine and linker of the fresh-instance flavour and
    /// starts the epoch ticker; the concurrent flavour is built when a
    /// module first needs it.
    pub fn new(opts: &RuntimeOptions) -> anyhow::Result<Self> {
        let fresh = build_engines(opts, Flavor::Fresh)?;
        let cache = match &opts.cache_dir {
            Some(dir) => match CompileCache::open(dir, opts.cache_max_bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "compile cache disabled: cannot use its folder");
                    None
                }
            },
            None => None,
        };
        let prebuilt = match &opts.prebuilt_dir {
            Some(dir) => Some(
                Prebuilt::open(dir)
                    .map_err(|e| anyhow::anyhow!("runtime.prebuilt_dir {}: {e}", dir.display()))?,
            ),
            None => None,
        };
        let registry = Arc::new(Registry::new(&opts.registry)?);
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let concurrent = Arc::new(OnceLock::new());
        spawn_epoch_ticker(
            fresh.engine.clone(),
            concurrent.clone(),
            opts.epoch_tick,
            IdleRelease::new(opts.release_idle_after),
            ticker_stop.clone(),
        );
        Ok(Runtime {
            inner: Arc::new(Inner {
                opts: opts.clone(),
                fresh,
                concurrent,
                clients: Arc::default(),
                registry,
                cache,
                prebuilt,
                compiled: Default::default(),
                ticker_stop,
            }),
        })
    }

    /// The engine and linker of `flavor`; the concurrent one is built on
    /// first use, which blocks for a moment (run it off the async threads).
    pub(crate) fn engines(&self, flavor: Flavor) -> Result<&Engines, String> {
        match flavor {
            Flavor::Fresh => Ok(&self.inner.fresh),
            Flavor::Concurrent => self
                .inner
                .concurrent
                .get_or_init(|| {
                    build_engines(&self.inner.opts, Flavor::Concurrent)
                        .map_err(|e| format!("{e:#}"))
                })
                .as_ref()
                .map_err(Clone::clone),
        }
    }

    /// Pooled HTTP clients for guests' outbound calls.
    pub fn clients(&self) -> &Arc<Clients> {
        &self.inner.clients
    }

    /// The client for OCI registries.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// The folder of prebuilt entries, when one is configured.
    pub fn prebuilt(&self) -> Option<&Prebuilt> {
        self.inner.prebuilt.as_ref()
    }

    /// The compile cache, when on.
    pub fn cache(&self) -> Option<&CompileCache> {
        self.inner.cache.as_ref()
    }

    /// How often the epoch advances: the granularity of guest deadlines.
    pub fn epoch_tick(&self) -> Duration {
        self.inner.opts.epoch_tick
    }
}

fn build_engines(opts: &RuntimeOptions, flavor: Flavor) -> anyhow::Result<Engines> {
    let engine = build_engine(opts, flavor)?;
    let linker = build_linker(&engine, flavor)?;
    Ok(Engines { engine, linker })
}

fn build_engine(opts: &RuntimeOptions, flavor: Flavor) -> anyhow::Result<Engine> {
    let n = opts.max_instances;
    let pagemap = PoolingAllocationConfig::is_pagemap_scan_available();
    let keep_resident =
        opts.keep_resident
            .unwrap_or(if pagemap { DEFAULT_KEEP_RESIDENT } else { 0 });
    tracing::info!(
        pagemap_scan = pagemap,
        keep_resident,
        ?flavor,
        "instance pool"
    );
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_tables(n.saturating_mul(TABLES_PER_COMPONENT))
        .total_memories(n)
        // One fiber stack per guest call in flight.
        .total_stacks(n)
        .max_memory_size(usize::try_from(opts.max_memory).unwrap_or(usize::MAX))
        // Warm slots keep a module's memory image mapped for the next
        // instance of the same module; enough for a busy set of modules
        // without pinning memory for every slot.
        .max_unused_warm_slots(n.min(100))
        // Resetting a freed instance by `madvise` costs the next request a
        // page fault for every page it touches, plus TLB shootdowns: with
        // PAGEMAP_SCAN only the pages the guest dirtied are reset in place
        // (see bench/NOTES.md for the figures and the budget).
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(keep_resident)
        .table_keep_resident(keep_resident.min(64 << 10))
        .async_stack_keep_resident(keep_resident.min(64 << 10))
        .decommit_batch_size(opts.decommit_batch);
    let mut cfg = EngineConfig::new();
    cfg.wasm_component_model(true)
        .concurrency_support(flavor == Flavor::Concurrent)
        .epoch_interruption(true)
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .memory_init_cow(opts.memory_cow)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    if flavor == Flavor::Concurrent {
        cfg.wasm_component_model_async(true);
    }
    if opts.compile_target == crate::config::CompileTarget::Portable {
        portable(&mut cfg)?;
    }
    Engine::new(&cfg).map_err(|e| anyhow::anyhow!("failed to create the wasm engine: {e:#}"))
}

/// Compiles for any machine of the host's architecture rather than for
/// this one: an explicit target turns off wasmtime's detection of the
/// host's CPU features. On x86-64 the x86-64-v2 level is enabled on top
/// (without SSE4.1, float rounding becomes calls into the host).
#[allow(unsafe_code)]
fn portable(cfg: &mut EngineConfig) -> anyhow::Result<()> {
    let triple = format!(
        "{}-unknown-linux-{}",
        std::env::consts::ARCH,
        if cfg!(target_env = "musl") {
            "musl"
        } else {
            "gnu"
        }
    );
    cfg.target(&triple)
        .map_err(|e| anyhow::anyhow!("runtime.compile_target: {triple}: {e:#}"))?;
    if cfg!(target_arch = "x86_64") {
        for flag in [
            "has_sse3",
            "has_ssse3",
            "has_sse41",
            "has_sse42",
            "has_popcnt",
        ] {
            // SAFETY: wasmtime checks that the CPU has every enabled
            // feature before it runs code compiled with it (at engine
            // creation for the host's target), so a node without one
            // fails to start rather than running an unsupported
            // instruction.
            unsafe {
                cfg.cranelift_flag_enable(flag);
            }
        }
    }
    Ok(())
}

fn build_linker(engine: &Engine, flavor: Flavor) -> anyhow::Result<Linker<Host>> {
    let mut linker = Linker::<Host>::new(engine);
    let wrap = |e: wasmtime::Error| anyhow::anyhow!("failed to link host interfaces: {e:#}");
    // All of WASI 0.2, so components built with a standard library load; the
    // per-store context denies sockets and has no preopens, so the network
    // is reachable only through wasi:http and its outbound policy.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wrap)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(wrap)?;
    if flavor == Flavor::Concurrent {
        // WASI 0.3 next to 0.2: a 0.3 component built for wasm32-wasip2
        // also imports 0.2 through its standard library. The same locked
        // down context applies; 0.3.x imports of a newer patch release
        // resolve to these by semver.
        wasmtime_wasi::p3::add_to_linker(&mut linker).map_err(wrap)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker).map_err(wrap)?;
    }
    host::add_capabilities_to_linker(&mut linker).map_err(wrap)?;
    Ok(linker)
}

/// Instances started by this process, for [`IdleRelease`]. Process-wide
/// like the engines it watches: a counter in every store's path would
/// otherwise have to be threaded through each module.
static INSTANCES_STARTED: AtomicU64 = AtomicU64::new(0);

/// Instantiations hold it shared; releasing idle pool memory holds it
/// alone. While wasmtime releases the warm slots it takes them off the free
/// list, so an instance starting then could find no free slot (every free
/// slot is warm when `max_instances` is 100 or less) and fail with "at
/// capacity"; with the gate it waits the few milliseconds instead.
static POOL_GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The gate, held alone, for the release of idle pool memory: taken once
/// no instantiation holds it, by asking again every few milliseconds, never
/// by queueing. tokio's lock is fair, so a queued release would hold every
/// new instantiation behind one already running, and a guest whose start
/// function spins to its deadline would stall every module's instances.
fn gate_alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    loop {
        if let Ok(gate) = POOL_GATE.try_write() {
            return gate;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Counts an instance about to start (see [`IdleRelease`]) and holds off a
/// release of idle pool memory until the returned guard is dropped: keep
/// it across the instantiation.
pub(crate) async fn instance_starting() -> tokio::sync::RwLockReadGuard<'static, ()> {
    INSTANCES_STARTED.fetch_add(1, Ordering::Relaxed);
    POOL_GATE.read().await
}

/// Gives warm slots' memory back to the kernel after a quiet spell.
///
/// A burst leaves up to 100 warm slots per engine, each keeping its
/// memory image mapped and up to `keep_resident` bytes resident for the
/// next instance of the same module, and the allocator holding the burst's
/// freed heap; that is the point while traffic lasts, and dead weight in a
/// pod that has gone quiet. Once no instance has started or ended for
/// `after`, both are released, once per quiet spell; the next instance of
/// each module pays a cold slot (page faults on the pages it touches).
struct IdleRelease {
    after: Duration,
    /// Instances started so far, and live now.
    seen: (u64, u64),
    quiet_since: Instant,
    released: bool,
}

impl IdleRelease {
    fn new(after: Duration) -> Self {
        IdleRelease {
            after,
            seen: (INSTANCES_STARTED.load(Ordering::Relaxed), 0),
            quiet_since: Instant::now(),
            // Nothing is warm before the first request.
            released: true,
        }
    }

    /// Whether to release now, given the instances started so far and
    /// live now: an instance that ends (a long request, a reused instance
    /// idling out) frees a slot too, and starts a new quiet spell.
    fn due(&mut self, activity: (u64, u64), now: Instant) -> bool {
        if activity != self.seen {
            self.seen = activity;
            self.quiet_since = now;
            self.released = false;
            return false;
        }
        if self.released
            || self.after.is_zero()
            || now.saturating_duration_since(self.quiet_since) < self.after
        {
            return false;
        }
        self.released = true;
        true
    }
}

/// Gives memory freed but still held by the allocator's per-thread arenas
/// back to the kernel. Compiling leaves megabytes of it (idle RSS with the
/// four examples, compiled at start-up: 45 MiB before this, 32 after), and
/// so does a burst of traffic (connection buffers, request state).
pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `malloc_trim` only walks glibc's own arenas under their locks
    // and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Live component instances of an engine's pool.
fn live_instances(engine: &Engine) -> u64 {
    engine
        .pooling_allocator_metrics()
        .map_or(0, |m| m.component_instances())
}

/// One thread for the whole process advances the epoch; every store turns
/// each tick into a yield point and checks its deadline there. It also
/// notices a quiet spell ([`IdleRelease`]: a few atomic loads a tick) and
/// hands the release to a thread of its own, so that trimming a large heap
/// never delays a tick (and with it every guest's deadline).
fn spawn_epoch_ticker(
    engine: Engine,
    concurrent: Arc<OnceLock<Result<Engines, String>>>,
    tick: Duration,
    mut idle: IdleRelease,
    stop: Arc<AtomicBool>,
) {
    let (release, releases) = std::sync::mpsc::sync_channel::<()>(1);
    {
        let (engine, concurrent, after) = (engine.clone(), concurrent.clone(), idle.after);
        std::thread::Builder::new()
            .name("berth-release".into())
            .spawn(move || {
                // Ends when the ticker (the sender) does.
                while releases.recv().is_ok() {
                    let other = concurrent.get().and_then(|e| e.as_ref().ok());
                    let gate = gate_alone();
                    let bytes = engine.release_idle_pool_memory()
                        + other.map_or(0, |o| o.engine.release_idle_pool_memory());
                    drop(gate);
                    return_freed_memory();
                    tracing::info!(
                        bytes,
                        quiet_for = ?after,
                        "returned idle instance memory to the kernel"
                    );
                }
            })
            .expect("spawning the memory release thread");
    }
    std::thread::Builder::new()
        .name("berth-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
                let other = concurrent.get().and_then(|e| e.as_ref().ok());
                if let Some(other) = other {
                    other.engine.increment_epoch();
                }
                let activity = (
                    INSTANCES_STARTED.load(Ordering::Relaxed),
                    live_instances(&engine) + other.map_or(0, |o| live_instances(&o.engine)),
                );
                if idle.due(activity, Instant::now()) {
                    // Full only while a release is still running.
                    let _ = release.try_send(());
                }
            }
        })
        .expect("spawning the epoch ticker thread");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::wasm;

    /// A release waits for the instantiations in progress, but new ones
    /// never wait behind it: a guest whose start function runs to its
    /// deadline must not hold up every other module's instances.
    #[test]
    fn instantiations_never_queue_behind_a_waiting_release() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let slow = instance_starting().await;
            let (done, released) = std::sync::mpsc::channel();
            let release = std::thread::spawn(move || {
                let _gate = gate_alone();
                done.send(()).unwrap();
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let next = tokio::time::timeout(Duration::from_secs(5), instance_starting()).await;
            assert!(next.is_ok(), "an instance waited behind the release");
            assert!(
                released.try_recv().is_err(),
                "released during an instantiation"
            );
            drop((next, slow));
            released
                .recv_timeout(Duration::from_secs(5))
                .expect("the release ran once no instance was starting");
            release.join().unwrap();
        });
    }

    #[test]
    fn idle_memory_is_released_once_per_quiet_spell() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut idle = IdleRelease::new(s(30));
        let (n, _) = idle.seen;
        assert!(!idle.due((n, 0), t0 + s(60)), "nothing was warm yet");
        assert!(!idle.due((n + 5, 2), t0 + s(61)), "busy");
        assert!(!idle.due((n + 5, 0), t0 + s(62)), "instances ended");
        assert!(!idle.due((n + 5, 0), t0 + s(91)), "quiet for 29 s");
        assert!(idle.due((n + 5, 0), t0 + s(92)), "quiet for 30 s");
        assert!(!idle.due((n + 5, 0), t0 + s(200)), "once per spell");
        // A long request that ends after the release frees its slot too.
        assert!(!idle.due((n + 5, 1), t0 + s(201)));
        assert!(!idle.due((n + 5, 0), t0 + s(202)));
        assert!(
            idle.due((n + 5, 0), t0 + s(232)),
            "again once that is quiet"
        );
        let mut never = IdleRelease::new(Duration::ZERO);
        assert!(!never.due((n + 1, 0), t0));
        assert!(!never.due((n + 1, 0), t0 + s(3600)), "0s never releases");
    }

    #[test]
    fn the_world_comes_from_the_top_level_exports() {
        let read = |name: &str| std::fs::read(wasm(name)).unwrap();
        assert_eq!(World::of(&read("p3_plain")), Some(World::P3));
        assert_eq!(World::of(&read("p3_service")), Some(World::P3));
        assert_eq!(World::of(&read("plain_hello")), Some(World::P2));
        assert_eq!(World::of(&read("hello")), Some(World::P2));
        // Not a component, or cut short: no world, and no panic.
        assert_eq!(World::of(b"\0asm\x01\0\0\0"), None);
        let p3 = read("p3_plain");
        assert_eq!(World::of(&p3[..p3.len() / 2]), None);
        assert_eq!(World::of(b"garbage"), None);
    }
}
