//! What the runtime needs to know about each module, resolved from the
//! config: where its component comes from, its `wasi:config` values, its
//! limits and its outbound policy. Also where the config itself comes from,
//! so a reload can read it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    AllowList, Config, ConfigError, Instances, Limits, OutboundConfig, OutboundOverride, Overrides,
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
                let pin = m.sha256.as_ref().map(|d| d.to_ascii_lowercase());
                let source = match (&m.file, &m.url, &m.oci) {
                    (_, _, Some(reference)) => ModuleSource::Oci {
                        reference: reference.clone(),
                    },
                    (_, Some(url), None) => ModuleSource::Url {
                        url: url.clone(),
                        sha256: pin.unwrap_or_default(),
                    },
                    (file, None, None) => ModuleSource::File {
                        path: match file {
                            Some(file) => dir.join(file),
                            None => dir.join(format!("{name}.wasm")),
                        },
                        sha256: pin,
                    },
                };
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
                }
            })
            .collect()
    }
}
