//! `berth check`: what a component imports and exports, and whether the
//! host would serve it.

use std::path::Path;

use serde::Serialize;

use super::Runtime;
use super::link::Unsatisfied;
use super::module::{Fetched, compile, instantiate_pre};

/// What `berth check` reports about a component.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// Names the component imports.
    pub imports: Vec<String>,
    /// Names the component exports.
    pub exports: Vec<String>,
    /// Imports the host cannot satisfy.
    pub unsatisfied: Vec<Unsatisfied>,
    /// Whether it exports `wasi:http/incoming-handler`.
    pub http_handler: bool,
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
    let origin = file.display().to_string();
    let fetched = Fetched {
        sha256: String::new(),
        bytes,
        stamp: None,
    };
    let component = match compile(runtime, &name, &origin, &fetched) {
        Ok(c) => c,
        Err(e) => {
            return Ok(CheckReport {
                imports: vec![],
                exports: vec![],
                unsatisfied: vec![],
                http_handler: false,
                error: Some(e.to_string()),
            });
        }
    };
    let ty = component.component_type();
    let engine = runtime.engine();
    let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let http_handler = exports
        .iter()
        .any(|e| e.starts_with("wasi:http/incoming-handler@0.2."));
    let (unsatisfied, error) = match instantiate_pre(runtime, &name, &origin, &component) {
        Ok(_) => (vec![], None),
        Err(e) => {
            let missing = match &e {
                super::LoadError::MissingImports { missing, .. } => missing.clone(),
                _ => vec![],
            };
            (missing, Some(e.to_string()))
        }
    };
    Ok(CheckReport {
        imports,
        exports,
        unsatisfied,
        http_handler,
        error,
    })
}
