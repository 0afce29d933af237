//! What the runtime needs to know about each module, resolved from the
//! config: where its component comes from, its `wasi:config` values, its
//! limits and its outbound policy. Also where the config itself comes from,
//! so a reload can read it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    AllowList, CanaryConfig, Config, ConfigError, Instances, Limits, OutboundConfig,
    OutboundOverride, Overrides, SourceFields,
};

/// Where the configuration comes from, to read it again on reload.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `--config`, if given.
    pub file: Option<PathBuf>,
    /// Command-line flags.
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads and validates the configuration.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.file.as_deref(), &self.overrides)
    }

    /// The config file actually read, if any.
    pub fn path(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| {
            let default = Path::new(super::DEFAULT_CONFIG_FILE);
            default.is_file().then(|| default.to_path_buf())
        })
    }
}

/// Where a module's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A file (typically in the module ConfigMap's volume), optionally
    /// pinned to a digest.
    File {
        /// The path.
        path: PathBuf,
        /// Lower-case hex sha256 the file must have, if pinned.
        sha256: Option<String>,
    },
    /// A download, pinned to a digest.
    Url {
        /// `http://` or `https://`.
        url: String,
        /// Lower-case hex sha256.
        sha256: String,
    },
    /// An OCI artifact, pinned by the manifest digest in the reference
    /// (or a tag, when the module allows tags).
    Oci {
        /// `registry/repository[:tag][@sha256:...]`.
        reference: String,
    },
}

impl std::fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSource::File { path, .. } => write!(f, "{}", path.display()),
            ModuleSource::Url { url, .. } => f.write_str(&crate::redact::url(url)),
            ModuleSource::Oci { reference } => write!(f, "oci://{reference}"),
        }
    }
}

/// What a module's outbound calls are subject to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboundSpec {
    /// The allow-list.
    pub allow: AllowList,
    /// The module's policy (defaults with its overrides).
    pub config: OutboundConfig,
    /// Per-upstream overrides (`[upstreams."host:port"]`).
    pub upstreams: Arc<BTreeMap<String, OutboundOverride>>,
}

/// What the config says about a module, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    /// Module name.
    pub name: String,
    /// Route prefix.
    pub route: String,
    /// Where the component comes from.
    pub source: ModuleSource,
    /// `wasi:config` values (config and secrets merged).
    pub config: Vec<(String, String)>,
    /// Effective limits.
    pub limits: Limits,
    /// Outbound policy.
    pub outbound: OutboundSpec,
    /// Instance reuse as configured; the world fills in what is unset.
    pub instances: Instances,
    /// Which version of the module this is.
    pub track: Track,
}

/// Which of a module's versions a loaded module is: the one serving, or a
/// canary being judged against it. Labels its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Track {
    /// The version serving (all of the module's traffic when no canary runs).
    #[default]
    Stable,
    /// A canary's version.
    Canary,
}

impl Track {
    /// `stable` or `canary`.
    pub fn as_str(self) -> &'static str {
        match self {
            Track::Stable => "stable",
            Track::Canary => "canary",
        }
    }
}

/// A module's canary: its version's spec (the module's settings with the
/// canary's source) and how it is judged.
#[derive(Debug, Clone, PartialEq)]
pub struct CanarySpec {
    /// The canary version, on the canary track.
    pub module: ModuleSpec,
    /// Steps, interval, thresholds and stickiness.
    pub policy: Arc<CanaryConfig>,
    /// A hash of the module's table as written (secrets redacted, so the
    /// hash, which fleet analysis exports as a label, says nothing of
    /// them) and of the defaults it inherits: what names this canary's
    /// settings across a fleet.
    pub settings: String,
}

impl SourceFields<'_> {
    /// The source these keys name; a module without any reads
    /// `<modules_dir>/<name>.wasm`.
    fn resolve(&self, dir: &Path, name: &str) -> ModuleSource {
        let pin = self.sha256.map(str::to_ascii_lowercase);
        match (self.file, self.url, self.oci) {
            (_, _, Some(reference)) => ModuleSource::Oci {
                reference: reference.to_owned(),
            },
            (_, Some(url), None) => ModuleSource::Url {
                url: url.to_owned(),
                sha256: pin.unwrap_or_default(),
            },
            (file, None, None) => ModuleSource::File {
                path: match file {
                    Some(file) => dir.join(file),
                    None => dir.join(format!("{name}.wasm")),
                },
                sha256: pin,
            },
        }
    }
}

impl Config {
    /// The module specs this config describes, with paths resolved.
    pub fn module_specs(&self) -> Vec<ModuleSpec> {
        let dir = self.modules_dir();
        let upstreams = Arc::new(self.upstreams.clone());
        self.modules
            .iter()
            .map(|(name, m)| {
                let mut values: Vec<(String, String)> = m
                    .config
                    .iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect();
                values.extend(m.secrets.iter().map(|(k, v)| (k.clone(), v.0.0.clone())));
                let source = m.source().resolve(&dir, name);
                ModuleSpec {
                    name: name.clone(),
                    route: m.route.clone(),
                    source,
                    config: values,
                    limits: self.limits_of(m),
                    outbound: OutboundSpec {
                        allow: m.allow.clone(),
                        config: m.outbound.over(self.defaults.outbound),
                        upstreams: upstreams.clone(),
                    },
                    instances: m.instances,
                    track: Track::Stable,
                }
            })
            .collect()
    }

    /// The canary of each module that has one.
    pub fn canary_specs(&self) -> Vec<CanarySpec> {
        let dir = self.modules_dir();
        self.module_specs()
            .into_iter()
            .filter_map(|stable| {
                let table = self.modules.get(&stable.name)?;
                let canary = table.canary.as_ref()?;
                let settings = {
                    use sha2::{Digest, Sha256};
                    let written = serde_json::to_vec(&(table, &self.defaults)).unwrap_or_default();
                    hex::encode(&Sha256::digest(written)[..4])
                };
                Some(CanarySpec {
                    module: ModuleSpec {
                        source: canary.source().resolve(&dir, &stable.name),
                        track: Track::Canary,
                        ..stable
                    },
                    policy: Arc::new(canary.clone()),
                    settings,
                })
            })
            .collect()
    }
}
