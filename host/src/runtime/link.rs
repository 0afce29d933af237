//! Linking a component against the host's world, and when it does not
//! link, finding every import that is missing rather than the first.

use serde::Serialize;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceType};

use super::Host;

/// An import the host cannot satisfy.
#[derive(Debug, Clone, Serialize)]
pub struct Unsatisfied {
    /// The import name, e.g. `wasi:keyvalue/store@0.2.0-draft`.
    pub name: String,
    /// The linker's explanation.
    pub reason: String,
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
