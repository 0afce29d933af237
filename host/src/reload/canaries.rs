//! The reloader's side of canaries: which to start, keep or stop on a
//! reload, what a finished one changes in the routing table, and how the
//! ones that ended are remembered across reloads and restarts.
//!
//! A canary is identified by its module's stable source and its own
//! source. While both stay as they are in the config:
//! - a canary in progress keeps running, unless its spec changed (steps,
//!   thresholds, the module's settings): then it starts again at step 0;
//! - a promoted canary keeps serving as the module's stable version, even
//!   though the config still names the old one as `file`/`url`/`oci`;
//! - a rolled-back canary stays out of traffic.
//!
//! How canaries ended is written to `canaries/<config>.json` in the cache folder,
//! so a restart keeps those outcomes. A canary in progress is not written:
//! after a restart it starts again at step 0, at the first step's weight,
//! which never gives an unjudged version more traffic than it had.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Modules, ReloadReport};
use crate::canary::{Canary, Settled, State};
use crate::config::{CanarySpec, Config, ModuleSource, ModuleSpec, Track};
use crate::router::{Release, Router};
use crate::runtime::{LoadError, Module};

/// The folder, in the cache folder, that keeps how canaries ended.
const STATE_DIR: &str = "canaries";

/// Where how canaries ended is kept for this config: one file per config
/// file, so two hosts sharing a cache folder (the default one, on a
/// workstation) do not take each other's outcomes. Keyed on the path as
/// given, never resolved: a ConfigMap's file resolves through the
/// kubelet's `..data` link into a folder that every update replaces.
/// `cache` is the compile cache's folder, once it passed its checks: one
/// check guards everything Berth keeps on disk.
pub(super) fn state_file(
    cache: Option<&std::path::Path>,
    source: &crate::config::ConfigSource,
) -> Option<std::path::PathBuf> {
    use sha2::{Digest, Sha256};
    let key = source
        .path()
        .map(|p| {
            lexical(&std::path::absolute(&p).unwrap_or(p))
                .display()
                .to_string()
        })
        .unwrap_or_default();
    let name = format!(
        "{}.json",
        &hex::encode(Sha256::digest(key.as_bytes()))[..16]
    );
    Some(cache?.join(STATE_DIR).join(name))
}

/// `path` with `.` and `..` taken out by their text: `a/../a/b.toml` and
/// `a/b.toml` are one config, whatever links the folders are.
fn lexical(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl Modules {
    /// Reads how canaries ended before this start, keeping what still
    /// applies to `config`.
    pub(super) fn restore_settled(&self, config: &Config) {
        let Some(path) = &self.state_file else { return };
        let settled = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, Settled>>(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e,
                        "canary state unreadable: canaries start from their first step");
                    return;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e,
                    "canary state unreadable: canaries start from their first step");
                return;
            }
        };
        self.canaries.set_settled(settled);
        self.prune_settled(config);
        for (module, s) in self.canaries.settled() {
            tracing::info!(
                module = module.as_str(),
                state = ?s.state,
                canary = s.canary.as_str(),
                sha256 = s.sha256.as_str(),
                reason = s.reason.as_str(),
                "canary ended before this start: not run again"
            );
        }
    }

    /// Drops the outcomes `config` no longer matches (its stable or canary
    /// source changed, or the canary is gone), and writes the rest.
    pub(super) fn prune_settled(&self, config: &Config) {
        let settled = self.canaries.settled();
        let canaries = canary_specs(config);
        let stables: HashMap<String, ModuleSpec> = config
            .module_specs()
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let kept: BTreeMap<String, Settled> = settled
            .iter()
            .filter(|(name, s)| {
                matches!((stables.get(*name), canaries.get(*name)),
                    (Some(stable), Some(canary)) if applies(s, stable, canary))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if kept != settled {
            self.canaries.set_settled(kept);
            self.persist();
        }
    }

    /// The specs of the stable versions: the config's, except that a
    /// promoted canary serves in place of the version it replaced.
    pub(super) fn stable_specs(&self, config: &Config) -> Vec<ModuleSpec> {
        let settled = self.canaries.settled();
        let canaries = canary_specs(config);
        config
            .module_specs()
            .into_iter()
            .map(
                |stable| match (settled.get(&stable.name), canaries.get(&stable.name)) {
                    (Some(s), Some(canary))
                        if s.state == State::Promoted && applies(s, &stable, canary) =>
                    {
                        promoted(canary)
                    }
                    _ => stable,
                },
            )
            .collect()
    }

    /// The canaries of `config` that have not ended.
    pub(super) fn pending_canaries(&self, config: &Config) -> Vec<CanarySpec> {
        let settled = self.canaries.settled();
        let stables: HashMap<String, ModuleSpec> = config
            .module_specs()
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        canary_specs(config)
            .into_values()
            .filter(|c| {
                let name = &c.module.name;
                !matches!((settled.get(name), stables.get(name)),
                    (Some(s), Some(stable)) if applies(s, stable, c))
            })
            .collect()
    }

    /// The canaries in progress that go on as they are, and the ones to
    /// load (new, or changed).
    pub(super) fn canaries_to_load(
        &self,
        config: &Config,
    ) -> (HashMap<String, Arc<Canary>>, Vec<CanarySpec>) {
        let mut kept = HashMap::new();
        let mut load = Vec::new();
        for spec in self.pending_canaries(config) {
            // One that just ended stays until its settling swaps the
            // table, so the weight it ended at keeps holding until then.
            // The same spec and the same bytes: a file rebuilt in place is
            // another version, to be judged from its first step.
            match self.canaries.get(&spec.module.name) {
                Some(live)
                    if live.spec == spec
                        && judged_identity(&live) == identity(&spec.module.source) =>
                {
                    kept.insert(spec.module.name.clone(), live);
                }
                _ => load.push(spec),
            }
        }
        (kept, load)
    }

    /// Starts a canary whose version loaded, or records why it did not:
    /// a canary that cannot load is rolled back before it serves, and the
    /// stable version goes on alone.
    pub(super) fn canary_loaded(
        &self,
        spec: CanarySpec,
        stable: Option<&Arc<Module>>,
        result: Result<Arc<Module>, LoadError>,
        trigger: &'static str,
        report: &mut ReloadReport,
    ) -> Option<Arc<Canary>> {
        let name = spec.module.name.clone();
        self.stop_run(&name);
        match result {
            Ok(module) => {
                self.canaries.set_error(&name, None);
                let stable = stable.map_or("", |m| m.sha256.as_str());
                let canary = Canary::new(
                    module,
                    spec,
                    stable,
                    self.metrics.clone(),
                    self.finished.clone(),
                );
                let task = tokio::spawn(canary.clone().run());
                self.runs
                    .lock()
                    .unwrap()
                    .insert(name.clone(), tokio_util::task::AbortOnDropHandle::new(task));
                self.canaries.set_live(&name, Some(canary.clone()));
                report.canaries_started.push(name);
                Some(canary)
            }
            Err(err) => {
                let message = err.to_string();
                self.canaries.set_live(&name, None);
                if self.canaries.set_error(&name, Some(message.clone())) {
                    tracing::warn!(trigger, module = name.as_str(), "canary failed to load");
                    Canary::failed_to_load(&name, &self.metrics, &message);
                }
                report.errors.insert(format!("{name}.canary"), message);
                None
            }
        }
    }

    /// Stops the canaries of modules that no longer have one in `config`
    /// (or no longer exist), keeping those in `keep`. A canary that ended
    /// stays on the board of a module still configured, so `/info` keeps
    /// its outcome and history after the config drops it (as a promotion's
    /// write-back does).
    pub(super) fn stop_canaries_not_in(
        &self,
        keep: &HashMap<String, Arc<Canary>>,
        config: &Config,
    ) {
        let wanted = canary_specs(config);
        for name in self.canaries.modules() {
            if wanted.contains_key(&name) || keep.contains_key(&name) {
                continue;
            }
            if config.modules.contains_key(&name)
                && self
                    .canaries
                    .get(&name)
                    .is_some_and(|c| c.state().is_final())
            {
                continue;
            }
            self.stop_run(&name);
            if self.canaries.get(&name).is_some() || self.canaries.set_error(&name, None) {
                tracing::info!(module = name.as_str(), "canary removed from the config");
            }
            self.canaries.set_live(&name, None);
            let _ = self.metrics.canary_weight.remove_label_values(&[&name]);
            let _ = self.metrics.canary_state.remove_label_values(&[&name]);
        }
    }

    fn stop_run(&self, module: &str) {
        self.runs.lock().unwrap().remove(module);
    }

    /// A canary was promoted or rolled back: swap the table so the
    /// promoted version is the module's stable one, or the rolled-back one
    /// is gone from it, and remember the outcome.
    pub(super) async fn settle(&self, canary: Arc<Canary>) {
        let running = self.config.lock().await;
        let name = canary.module.name.to_string();
        // A reload replaced or removed it meanwhile: nothing to settle.
        if !self
            .canaries
            .get(&name)
            .is_some_and(|live| Arc::ptr_eq(&live, &canary))
        {
            return;
        }
        self.stop_run(&name);
        let table = self.routes.current();
        let Some(release) = table.releases().find(|r| *r.stable.name == *name) else {
            return;
        };
        let stable_source = running
            .module_specs()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.source);
        let mut state = canary.state();
        let mut new = Release {
            stable: release.stable.clone(),
            canary: None,
        };
        if state == State::Promoted {
            match canary
                .module
                .respec(&self.runtime, promoted(&canary.spec), &self.metrics)
            {
                Some(Ok(module)) => {
                    let module = Arc::new(module);
                    self.metrics.reloads.with_label_values(&[&name, "ok"]).inc();
                    self.metrics.module_serving(
                        &name,
                        &module.sha256,
                        Some(&release.stable.sha256),
                        module.loaded_at,
                    );
                    tracing::info!(
                        trigger = "canary",
                        module = name.as_str(),
                        sha256 = module.sha256.as_str(),
                        previous = release.stable.sha256.as_str(),
                        "module swapped in: the canary is the stable version now"
                    );
                    new.stable = module;
                }
                // Cannot happen for the same code under the same
                // settings; if it does, the stable version serves on.
                other => {
                    let why = other
                        .and_then(Result::err)
                        .map_or_else(|| "it needs another engine".into(), |e| e.to_string());
                    tracing::error!(
                        module = name.as_str(),
                        error = why.as_str(),
                        "the promoted canary could not become the stable version: rolled back"
                    );
                    state = State::RolledBack;
                }
            }
        }
        let mut settled = self.canaries.settled();
        settled.insert(
            name.clone(),
            Settled {
                stable: stable_source
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                canary: canary.spec.module.source.to_string(),
                stable_id: stable_source.as_ref().map(identity).unwrap_or_default(),
                canary_id: judged_identity(&canary),
                sha256: canary.module.sha256.clone(),
                state,
                reason: canary.snapshot().reason.unwrap_or_default(),
                at_ms: crate::canary::now_ms(),
            },
        );
        self.canaries.set_settled(settled);
        self.persist();
        if state == State::Promoted {
            self.write_back(&name, &canary);
        }
        let releases = table.releases().map(|r| {
            if *r.stable.name == *name {
                new.clone()
            } else {
                r.clone()
            }
        });
        self.routes.publish(Router::with_releases(releases));
    }

    /// After a promotion, makes the config file name what serves: the
    /// module's source becomes the canary's, and its `canary` table goes.
    /// The next reload then finds nothing to change. Only when the table
    /// is in the file (not set through the environment) and the file can
    /// be written; a ConfigMap is read-only, and there the kept outcome
    /// holds until the values are updated.
    ///
    /// Only when the file still names the version that was judged: it
    /// loads by itself, its own canary table has the same source (not one
    /// an environment variable put over it), and that source's digest is
    /// the judged bytes'. An operator may have started another canary
    /// since (a reload that a typo elsewhere refused, or an edit inside the
    /// watcher's debounce): promoting that one would put a version that was
    /// never judged into all of the traffic, and lose the edit.
    fn write_back(&self, module: &str, canary: &Canary) {
        let Some(path) = self.source.path() else {
            return;
        };
        // Read as given (its relative paths resolve there); written where
        // it really is.
        let given = path.clone();
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let leave = |why: &str| {
            tracing::info!(
                module,
                file = %path.display(),
                why,
                "config file left as it is: set the module's source to the promoted canary's"
            );
        };
        let Ok(before) = std::fs::read_to_string(&path) else {
            return leave("it cannot be read");
        };
        // The file's own word: an environment variable may override the
        // canary's source, and the file's table is what gets copied.
        let now = match Config::load_file_alone(&given) {
            Ok(config) => config
                .canary_specs()
                .into_iter()
                .find(|c| c.module.name == module),
            Err(_) => {
                return leave("it does not load as it is now (being edited?)");
            }
        };
        let judged = judged_identity(canary);
        match now {
            Some(c)
                if c.module.source == canary.spec.module.source
                    && identity(&c.module.source) == judged => {}
            Some(_) => {
                return leave("its canary is no longer the version that was judged");
            }
            None => return,
        }
        match promote_in_file(&path, module, &before) {
            Ok(true) => tracing::info!(
                module,
                file = %path.display(),
                source = %canary.spec.module.source,
                "config file updated: the promoted canary is the module's source"
            ),
            Ok(false) => {}
            Err(e) => leave(&e),
        }
    }

    /// Writes how canaries ended, atomically; a failed write costs only
    /// the memory of it across a restart.
    fn persist(&self) {
        let Some(path) = &self.state_file else { return };
        let settled = self.canaries.settled();
        let result = (|| {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(dir)?;
            let tmp = temp_name(dir);
            std::fs::write(&tmp, serde_json::to_vec_pretty(&settled)?)?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            tracing::warn!(file = %path.display(), error = %e,
                "cannot write the canary state: a restart will run finished canaries again");
        }
    }
}

/// Rewrites `modules.NAME` in the TOML file at `path`: the source keys of
/// its `canary` table replace the module's, and the table goes; comments
/// and layout stay. `Ok(false)` when the file has no such table. `checked`
/// is the text the caller checked: a file that changed since is left
/// alone.
fn promote_in_file(path: &std::path::Path, module: &str, checked: &str) -> Result<bool, String> {
    const SOURCE_KEYS: [&str; 5] = ["file", "url", "oci", "sha256", "allow_tags"];
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    if text != checked {
        return Err("it changed while the promotion was written".into());
    }
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    let Some(table) = doc
        .get_mut("modules")
        .and_then(|m| m.get_mut(module))
        .and_then(|m| m.as_table_like_mut())
    else {
        return Ok(false);
    };
    let Some(canary) = table.remove("canary") else {
        return Ok(false);
    };
    let Some(canary) = canary.as_table_like() else {
        return Err("`canary` is not a table".into());
    };
    for key in SOURCE_KEYS {
        table.remove(key);
    }
    for key in SOURCE_KEYS {
        if let Some(value) = canary.get(key) {
            table.insert(key, value.clone());
        }
    }
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp = temp_name(dir);
    let written = std::fs::write(&tmp, doc.to_string()).and_then(|()| {
        // Keep the file's mode (it may hold secrets).
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, path)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.to_string());
    }
    Ok(true)
}

/// A unique temporary name in `dir`, for a write renamed into place.
fn temp_name(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join(format!(
        ".berth-tmp.{}.{}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

/// Whether an outcome is about this stable version and this canary: the
/// same digests, not the same names. A file rebuilt in place, or a URL
/// whose query changed (shown redacted), is another version.
fn applies(s: &Settled, stable: &ModuleSpec, canary: &CanarySpec) -> bool {
    !s.stable_id.is_empty()
        && !s.canary_id.is_empty()
        && s.stable_id == identity(&stable.source)
        && s.canary_id == identity(&canary.module.source)
}

/// What version a source names now: the sha256 of a file's bytes as they
/// are, a URL's pinned sha256, an OCI reference's manifest digest (or the
/// reference itself where a tag is allowed: a tag is all there is to go
/// on before a pull).
pub(super) fn identity(source: &ModuleSource) -> String {
    use sha2::{Digest, Sha256};
    match source {
        ModuleSource::File { path, .. } => match std::fs::read(path) {
            Ok(bytes) => format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            // Matches no outcome: a canary that cannot be read is not
            // known to have ended.
            Err(_) => String::new(),
        },
        ModuleSource::Url { sha256, .. } => format!("sha256:{sha256}"),
        ModuleSource::Oci { reference } => match reference.split_once('@') {
            Some((_, digest)) => format!("oci@{digest}"),
            None => format!("oci://{reference}"),
        },
    }
}

/// The identity of the canary that was judged: for a file, the bytes that
/// were loaded and ran, whatever the file holds now.
fn judged_identity(canary: &Canary) -> String {
    match &canary.spec.module.source {
        ModuleSource::File { .. } => format!("sha256:{}", canary.module.sha256),
        other => identity(other),
    }
}

/// A promoted canary's spec as the module's stable version.
fn promoted(canary: &CanarySpec) -> ModuleSpec {
    ModuleSpec {
        track: Track::Stable,
        ..canary.module.clone()
    }
}

fn canary_specs(config: &Config) -> HashMap<String, CanarySpec> {
    config
        .canary_specs()
        .into_iter()
        .map(|c| (c.module.name.clone(), c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{lexical, promote_in_file};

    #[test]
    fn one_config_file_has_one_key_however_its_path_is_spelled() {
        let p = std::path::Path::new;
        assert_eq!(
            lexical(p("/etc/c5/../c5/./berth.toml")),
            p("/etc/c5/berth.toml")
        );
        assert_eq!(
            lexical(p("/etc/berth/berth.toml")),
            p("/etc/berth/berth.toml")
        );
    }

    #[test]
    fn a_promotion_rewrites_only_the_modules_source_and_keeps_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        let text = "# the shop\n[modules.shop]\nfile = \"v1.wasm\"  # pinned\nsha256 = \"aa\"\n\
                    route = \"/shop\"\n\n[modules.shop.canary]\nfile = \"v2.wasm\"\nsteps = [5, 50]\n\n\
                    [modules.other]\nfile = \"o.wasm\"\nroute = \"/o\"\n";
        std::fs::write(&path, text).unwrap();
        // A file that changed since it was checked is left alone.
        assert!(promote_in_file(&path, "shop", "something else").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(promote_in_file(&path, "shop", text), Ok(true));
        let after = std::fs::read_to_string(&path).unwrap();
        let doc: toml_edit::DocumentMut = after.parse().unwrap();
        let shop = &doc["modules"]["shop"];
        assert_eq!(shop["file"].as_str(), Some("v2.wasm"), "{after}");
        assert!(
            shop.get("sha256").is_none() && shop.get("canary").is_none(),
            "{after}"
        );
        assert_eq!(shop["route"].as_str(), Some("/shop"));
        assert_eq!(doc["modules"]["other"]["file"].as_str(), Some("o.wasm"));
        assert!(after.starts_with("# the shop"), "{after}");
        // Nothing left to promote; a module without a canary is left alone.
        assert_eq!(promote_in_file(&path, "shop", &after), Ok(false));
        assert_eq!(promote_in_file(&path, "other", &after), Ok(false));
        assert!(promote_in_file(&dir.path().join("gone.toml"), "shop", "").is_err());
    }
}
