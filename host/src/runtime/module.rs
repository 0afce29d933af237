//! Loading a module: read the file, make sure it is a component, compile
//! it, check its imports against what the host links, and pre-instantiate
//! it. Every failure names the module and the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::Component;
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::check::{self, Unsatisfied};
use super::{Host, Runtime};
use crate::config::Limits;
use crate::metrics::{Metrics, ModuleMetrics};
use crate::outbound::{ModuleOutbound, OutboundSpec};

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("module `{module}`: cannot read {}: {source}", file.display())]
    Read {
        /// Module name.
        module: String,
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not WebAssembly at all.
    #[error("module `{module}`: {} is not a WebAssembly file", file.display())]
    NotWasm {
        /// Module name.
        module: String,
        /// The file.
        file: PathBuf,
    },
    /// The file is a core module, not a component.
    #[error(
        "module `{module}`: {} is a core WebAssembly module, not a component \
         (build it for wasm32-wasip2, or wrap it with `wasm-tools component new`)",
        file.display()
    )]
    CoreModule {
        /// Module name.
        module: String,
        /// The file.
        file: PathBuf,
    },
    /// Cranelift or the validator rejected it.
    #[error("module `{module}`: {} failed to compile: {reason}", file.display())]
    Compile {
        /// Module name.
        module: String,
        /// The file.
        file: PathBuf,
        /// The compiler's message.
        reason: String,
    },
    /// It imports things the host does not provide.
    #[error(
        "module `{module}`: {} imports what the host does not provide: {}",
        file.display(),
        missing.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    )]
    MissingImports {
        /// Module name.
        module: String,
        /// The file.
        file: PathBuf,
        /// The unsatisfied imports.
        missing: Vec<Unsatisfied>,
    },
    /// It does not export `wasi:http/incoming-handler`.
    #[error(
        "module `{module}`: {} does not export wasi:http/incoming-handler@0.2.x: {reason}",
        file.display()
    )]
    NoHandler {
        /// Module name.
        module: String,
        /// The file.
        file: PathBuf,
        /// The linker's message.
        reason: String,
    },
}

/// What the config says about a module, resolved.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    /// Module name.
    pub name: String,
    /// Route prefix.
    pub route: String,
    /// Absolute or working-directory-relative path of the component.
    pub file: PathBuf,
    /// `wasi:config` values (config and secrets merged).
    pub config: Vec<(String, String)>,
    /// Effective limits.
    pub limits: Limits,
    /// Outbound policy.
    pub outbound: OutboundSpec,
}

/// A loaded, pre-instantiated module, ready to serve.
pub struct Module {
    /// Module name.
    pub name: Arc<str>,
    /// Route prefix.
    pub route: String,
    /// The component file.
    pub file: PathBuf,
    /// Size of the file in bytes.
    pub size: u64,
    /// Hex sha256 of the file.
    pub sha256: String,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Effective limits.
    pub limits: Limits,
    /// Pre-instantiated handle: a fresh instance per request costs microseconds.
    pub(crate) pre: ProxyPre<Host>,
    /// What `wasi:config/store` returns.
    pub(crate) config: Arc<WasiConfigVariables>,
    /// Outbound calls: policy and per-upstream state.
    pub(crate) outbound: Arc<ModuleOutbound>,
    /// Concurrency limit: requests beyond it are shed, not queued.
    pub(crate) slots: Arc<Semaphore>,
    /// Metric handles, resolved once.
    pub(crate) metrics: ModuleMetrics,
}

impl Module {
    /// Reads, compiles, checks and pre-instantiates. Blocking: run it off
    /// the request path (`spawn_blocking`).
    pub fn load(
        runtime: &Runtime,
        spec: ModuleSpec,
        metrics: &Arc<Metrics>,
    ) -> Result<Module, LoadError> {
        let started = std::time::Instant::now();
        let name = spec.name.clone();
        let file = spec.file.clone();
        let bytes = std::fs::read(&file).map_err(|source| LoadError::Read {
            module: name.clone(),
            file: file.clone(),
            source,
        })?;
        let component = compile(runtime, &name, &file, &bytes)?;
        let pre = instantiate_pre(runtime, &name, &file, &component)?;
        metrics
            .compile
            .with_label_values(&[&name])
            .observe(started.elapsed().as_secs_f64());
        let name: Arc<str> = name.into();
        Ok(Module {
            metrics: metrics.for_module(&name, &spec.route),
            name: name.clone(),
            route: spec.route,
            file,
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            loaded_at: SystemTime::now(),
            limits: spec.limits,
            pre,
            config: Arc::new(spec.config.into_iter().collect()),
            outbound: Arc::new(ModuleOutbound::new(
                name,
                spec.outbound,
                runtime.clients().clone(),
                metrics.clone(),
            )),
            slots: Arc::new(Semaphore::new(spec.limits.max_concurrency as usize)),
        })
    }
}

/// Checks the header, then compiles.
pub(super) fn compile(
    runtime: &Runtime,
    name: &str,
    file: &Path,
    bytes: &[u8],
) -> Result<Component, LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    // The version field: components are layer 1, core modules layer 0.
    const COMPONENT: &[u8] = &[0x0d, 0x00, 0x01, 0x00];
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotWasm {
            module: name.into(),
            file: file.into(),
        });
    }
    if &bytes[4..8] != COMPONENT {
        return Err(LoadError::CoreModule {
            module: name.into(),
            file: file.into(),
        });
    }
    Component::new(runtime.engine(), bytes).map_err(|e| LoadError::Compile {
        module: name.into(),
        file: file.into(),
        reason: format!("{e:#}"),
    })
}

/// Resolves every import against the linker; lists all that are missing.
pub(super) fn instantiate_pre(
    runtime: &Runtime,
    name: &str,
    file: &Path,
    component: &Component,
) -> Result<ProxyPre<Host>, LoadError> {
    let pre = match runtime.linker().instantiate_pre(component) {
        Ok(pre) => pre,
        Err(_) => {
            return Err(LoadError::MissingImports {
                module: name.into(),
                file: file.into(),
                missing: check::unsatisfied_imports(runtime.linker(), component),
            });
        }
    };
    ProxyPre::new(pre).map_err(|e| LoadError::NoHandler {
        module: name.into(),
        file: file.into(),
        reason: format!("{e:#}"),
    })
}
