//! Checking a component against the host's world, for `berth check` and for
//! load-time errors that list every missing import rather than the first.

use std::path::Path;

use serde::Serialize;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceType};

use super::module::{Fetched, compile, instantiate_pre};
use super::{Host, Runtime};

/// An import the host cannot satisfy.
#[derive(Debug, Clone, Serialize)]
pub struct Unsatisfied {
    /// The import name, e.g. `wasi:keyvalue/store@0.2.0-draft`.
    pub name: String,
    /// The linker's explanation.
    pub reason: String,
}

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

/// Every import of `component` that `linker` cannot satisfy.
///
/// The linker stops at the first failure, so this probes a copy of it:
/// each failing import is recorded, replaced by a trapping stub, and the
/// check runs again until the component links or the failure is not one
/// a stub can mend.
pub(super) fn unsatisfied_imports(
    linker: &Linker<Host>,
    component: &Component,
) -> Vec<Unsatisfied> {
    let engine = linker.engine();
    let imports: Vec<(String, ComponentItem)> = component
        .component_type()
        .imports(engine)
        .map(|(n, item)| (n.to_string(), item.ty))
        .collect();
    let mut probe = linker.clone();
    probe.allow_shadowing(true);
    let mut missing = Vec::new();
    for _ in 0..=imports.len() {
        let err = match probe.instantiate_pre(component) {
            Ok(_) => break,
            Err(e) => e,
        };
        let headline = err.to_string();
        let reason = format!("{err:#}");
        let failed = imports
            .iter()
            .find(|(name, _)| headline.contains(&format!("`{name}`")));
        let Some((name, item)) = failed else {
            missing.push(Unsatisfied {
                name: "(link)".into(),
                reason,
            });
            break;
        };
        missing.push(Unsatisfied {
            name: name.clone(),
            reason,
        });
        if stub(&mut probe, engine, name, item).is_err() {
            break;
        }
    }
    missing
}

fn stub(
    linker: &mut Linker<Host>,
    engine: &wasmtime::Engine,
    name: &str,
    item: &ComponentItem,
) -> wasmtime::Result<()> {
    match item {
        ComponentItem::ComponentFunc(_) => {
            linker
                .root()
                .func_new(name, |_, _, _, _| wasmtime::bail!("stub"))?;
        }
        ComponentItem::ComponentInstance(instance) => {
            let mut root = linker.root();
            let mut inst = root.instance(name)?;
            for (export, item) in instance.exports(engine) {
                match item.ty {
                    ComponentItem::ComponentFunc(_) => {
                        inst.func_new(export, |_, _, _, _| wasmtime::bail!("stub"))?
                    }
                    ComponentItem::Resource(_) => {
                        inst.resource(export, ResourceType::host::<()>(), |_, _| Ok(()))?
                    }
                    _ => {}
                }
            }
        }
        _ => wasmtime::bail!("cannot stub {name}"),
    }
    Ok(())
}
