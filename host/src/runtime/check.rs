//! `berth check`: what a component imports and exports, and whether the
//! host would serve it.

use std::path::Path;

use serde::Serialize;

use super::link::Unsatisfied;
use super::module::{Fetched, compile, flavor_of, link};
use super::reuse::Reuse;
use super::{Runtime, World};

/// What `berth check` reports about a component.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// Names the component imports.
    pub imports: Vec<String>,
    /// Names the component exports.
    pub exports: Vec<String>,
    /// Imports the host cannot satisfy.
    pub unsatisfied: Vec<Unsatisfied>,
    /// Whether it exports a `wasi:http` handler.
    pub http_handler: bool,
    /// The `wasi:http` world it serves, if any.
    pub world: Option<World>,
    /// The first problem that stops the component from loading, if any.
    pub error: Option<String>,
}

impl CheckReport {
    /// Whether the host would serve this component.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Compiles `file` and checks it against the host's linker.
pub fn check_file(runtime: &Runtime, file: &Path) -> anyhow::Result<CheckReport> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let name = file
        .file_stem()
        .map_or_else(|| "module".into(), |s| s.to_string_lossy().into_owned());
    Ok(check_bytes(
        runtime,
        &name,
        &file.display().to_string(),
        bytes,
    ))
}

/// Compiles a component (read from `origin`) and checks it against the
/// host's linker.
pub fn check_bytes(runtime: &Runtime, name: &str, origin: &str, bytes: Vec<u8>) -> CheckReport {
    let fetched = Fetched {
        sha256: String::new(),
        bytes,
        stamp: None,
        resolved: None,
    };
    let found = World::of(&fetched.bytes);
    let world = found.unwrap_or(World::P2);
    // Checked as it would be served: on the engine of its world's defaults.
    let flavor = flavor_of(found, &Reuse::resolve(&Default::default(), world));
    let component = match compile(runtime, flavor, name, origin, &fetched) {
        Ok((c, _)) => c,
        Err(e) => {
            return CheckReport {
                imports: vec![],
                exports: vec![],
                unsatisfied: vec![],
                http_handler: false,
                world: found,
                error: Some(e.to_string()),
            };
        }
    };
    let ty = component.component_type();
    let engine = component.engine();
    let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let http_handler = found.is_some();
    let (unsatisfied, error) = match link(runtime, flavor, world, name, origin, &component) {
        Ok(_) => (vec![], None),
        Err(e) => {
            let missing = match &e {
                super::LoadError::MissingImports { missing, .. } => missing.clone(),
                _ => vec![],
            };
            (missing, Some(e.to_string()))
        }
    };
    CheckReport {
        imports,
        exports,
        unsatisfied,
        http_handler,
        world: found,
        error,
    }
}
