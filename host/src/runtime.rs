//! The Wasm side of the host: one [`Engine`] with the pooling allocator and
//! epoch interruption, one [`Linker`] holding the whole guest world, module
//! loading and checking ([`module`]), and the per-request store state
//! ([`host`]).

mod cache;
mod check;
mod host;
mod link;
mod module;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::Linker;

use crate::outbound::Clients;
use wasmtime::{
    Config as EngineConfig, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

pub use cache::CompileCache;
pub use check::{CheckReport, check_file};
pub use host::{Host, LogBudget, MemoryLimitExceeded, RequestContext};
pub use link::Unsatisfied;
pub use module::{Fetched, FileStamp, LoadError, Module};

/// Measured for Rust `wasm32-wasip2` components: each component instance
/// holds three core instances and two tables (see WASMTIME.md). Other
/// toolchains use a few more; leave headroom.
const CORE_INSTANCES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 3;

/// Dirty pages of a freed instance's memory reset with `memcpy`/`memset`
/// when `PAGEMAP_SCAN` finds them; more than a small Rust or TinyGo guest
/// touches per request, so such guests never fault or `madvise`.
pub const DEFAULT_KEEP_RESIDENT: usize = 1 << 20;

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
        }
    }
}

/// The shared engine and linker. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    clients: Arc<Clients>,
    cache: Option<CompileCache>,
    linker: Linker<Host>,
    epoch_tick: Duration,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine and linker and starts the epoch ticker.
    pub fn new(opts: &RuntimeOptions) -> anyhow::Result<Self> {
        let engine = build_engine(opts)?;
        let linker = build_linker(&engine)?;
        let cache = match &opts.cache_dir {
            Some(dir) => match CompileCache::open(dir, &engine, opts.cache_max_bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "compile cache disabled: cannot use its folder");
                    None
                }
            },
            None => None,
        };
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), opts.epoch_tick, ticker_stop.clone());
        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                clients: Arc::default(),
                cache,
                linker,
                epoch_tick: opts.epoch_tick,
                ticker_stop,
            }),
        })
    }

    /// The engine every module is compiled with.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The linker holding everything the host offers guests.
    pub fn linker(&self) -> &Linker<Host> {
        &self.inner.linker
    }

    /// Pooled HTTP clients for guests' outbound calls.
    pub fn clients(&self) -> &Arc<Clients> {
        &self.inner.clients
    }

    /// The compile cache, when on.
    pub fn cache(&self) -> Option<&CompileCache> {
        self.inner.cache.as_ref()
    }

    /// How often the epoch advances: the granularity of guest deadlines.
    pub fn epoch_tick(&self) -> Duration {
        self.inner.epoch_tick
    }
}

fn build_engine(opts: &RuntimeOptions) -> anyhow::Result<Engine> {
    let n = opts.max_instances;
    let pagemap = PoolingAllocationConfig::is_pagemap_scan_available();
    let keep_resident =
        opts.keep_resident
            .unwrap_or(if pagemap { DEFAULT_KEEP_RESIDENT } else { 0 });
    tracing::info!(pagemap_scan = pagemap, keep_resident, "instance pool");
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
        // (56 -> 26 µs per hello request, see bench/NOTES.md).
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(keep_resident)
        .table_keep_resident(keep_resident.min(64 << 10))
        .async_stack_keep_resident(keep_resident.min(64 << 10))
        .decommit_batch_size(opts.decommit_batch);
    let mut cfg = EngineConfig::new();
    cfg.wasm_component_model(true)
        // Guests speak wasi:http 0.2, whose calls are synchronous at the
        // component level; without the component-model-async bookkeeping
        // (a guest task, scopes and a waitable set per call) a hello request
        // costs ~40% less CPU.
        .concurrency_support(false)
        .epoch_interruption(true)
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .memory_init_cow(opts.memory_cow)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&cfg).map_err(|e| anyhow::anyhow!("failed to create the wasm engine: {e:#}"))
}

fn build_linker(engine: &Engine) -> anyhow::Result<Linker<Host>> {
    let mut linker = Linker::<Host>::new(engine);
    let wrap = |e: wasmtime::Error| anyhow::anyhow!("failed to link host interfaces: {e:#}");
    // All of WASI 0.2, so components built with a standard library load; the
    // per-store context denies sockets and has no preopens, so the network
    // is reachable only through wasi:http and its outbound policy.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wrap)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(wrap)?;
    host::add_capabilities_to_linker(&mut linker).map_err(wrap)?;
    Ok(linker)
}

/// One thread for the whole process advances the epoch; every store turns
/// each tick into a yield point and checks its deadline there.
fn spawn_epoch_ticker(engine: Engine, tick: Duration, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("berth-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })
        .expect("spawning the epoch ticker thread");
}
