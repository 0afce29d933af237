//! Layered configuration: built-in defaults, then a TOML file, then
//! `BERTH_`-prefixed environment variables (`__` nests), then command-line
//! flags. Everything is validated once, before any port is bound, and every
//! error names the key (and, through figment, where the value came from).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod admin;
mod allow;
mod build;
mod canary;
mod defaults;
mod env;
mod layers;
mod limits;
mod log;
mod module;
mod outbound;
mod registry;
mod runtime;
mod server;
mod shutdown;
mod source;
mod spec;
mod values;
pub use admin::AdminConfig;
pub use allow::{AllowList, AllowRule, Specificity, default_port};
pub use build::BuildFields;
pub use canary::{Analysis, CanaryConfig, Sticky};
pub use defaults::Defaults;
pub use env::ignored_env_vars;
pub use layers::Overrides;
pub use limits::{Limits, LimitsOverride};
pub use log::LogConfig;
pub use module::{Instances, ModuleConfig, normalize_route};
pub use outbound::{BreakerConfig, OutboundConfig, OutboundOverride};
pub use registry::{RegistryConfig, RegistryCredentials, check_oci_reference};
pub use runtime::{CompileTarget, RuntimeConfig};
pub use server::ServerConfig;
pub use shutdown::ShutdownConfig;
pub use source::SourceFields;
pub use spec::{CanarySpec, ConfigSource, ModuleSource, ModuleSpec, OutboundSpec, Track};
pub use values::{ByteSize, ConfigValue, Secret, SourceUrl};

use outbound::check_upstreams;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/berth/berth.toml";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value has the wrong type, a key is unknown, or a required key is
    /// missing. Shown without the file's text: a syntax error quotes its
    /// line, which may hold a secret, and this text reaches the admin port.
    #[error("invalid config: {}", without_values(&without_source(&.0.to_string())))]
    Invalid(Box<figment::Error>),
    /// Values that parse but do not make sense together.
    #[error("invalid config: key `{key}`: {reason}")]
    Rejected {
        /// The dotted key concerned.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        ConfigError::Invalid(Box::new(err))
    }
}

/// A parser's error without the lines that quote the source (`3 | key =
/// value`, and the caret line under it); the position stays in its first
/// line.
fn without_source(text: &str) -> String {
    let quoted = |line: &str| {
        let line = line.trim_start();
        let line = line.trim_start_matches(|c: char| c.is_ascii_digit());
        line.trim_start().starts_with('|')
    };
    text.lines()
        .filter(|line| !quoted(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A figment error without the string values it quotes (`found string
/// "..."`): a value in the wrong place may be a secret (a mistyped secrets
/// file, a token under the wrong key), and this text reaches the admin
/// port. The key, the expected type and the source stay.
fn without_values(text: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(QUOTED) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let after = &rest[at + QUOTED.len()..];
        // The value is Debug-quoted: find its closing quote, past escapes.
        let mut end = after.len();
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &after[end.min(after.len())..];
    }
    out.push_str(rest);
    out
}

fn rejected(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Rejected {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole host configuration.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The traffic listener.
    pub server: ServerConfig,
    /// The admin listener (probes, `/info`, `/metrics`).
    pub admin: AdminConfig,
    /// Engine and module-loading settings.
    pub runtime: RuntimeConfig,
    /// Settings every module inherits unless it overrides them.
    pub defaults: Defaults,
    /// Logging settings that are not covered by `LOG_LEVEL`/`LOG_FORMAT`.
    pub log: LogConfig,
    /// Graceful shutdown timings.
    pub shutdown: ShutdownConfig,
    /// The modules to serve, by name.
    pub modules: BTreeMap<String, ModuleConfig>,
    /// Outbound policy overrides per upstream, keyed `host:port`; they
    /// apply over the calling module's policy.
    pub upstreams: BTreeMap<String, OutboundOverride>,
    /// How modules are pulled from OCI registries.
    pub registry: RegistryConfig,
}

impl Config {
    /// Checks what types alone cannot.
    ///
    /// Each section checks itself (its `check`, beside it); what spans
    /// sections stays here: upstreams and modules over the defaults, and
    /// module names and routes, which must differ between modules.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        self.defaults.check()?;
        check_upstreams(&self.upstreams, self.defaults.outbound)?;
        self.admin.check()?;
        self.runtime.check()?;
        self.server.check()?;
        self.shutdown.check()?;
        self.registry.check()?;
        let mut routes: BTreeMap<&str, &str> = BTreeMap::new();
        let mut parsed = Vec::with_capacity(self.modules.len());
        for (name, module) in &self.modules {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(rejected(
                    format!("modules.{name}"),
                    "a module name may only hold letters, digits, `-` and `_`",
                ));
            }
            let key = |k: &str| format!("modules.{name}.{k}");
            if !module.route.starts_with('/') {
                return Err(rejected(key("route"), "a route must start with `/`"));
            }
            if let Some(other) = routes.insert(normalize_route(&module.route), name) {
                return Err(rejected(
                    key("route"),
                    format!(
                        "route `{}` is already used by module `{other}`",
                        module.route
                    ),
                ));
            }
            parsed.push((name.clone(), module.check(&key, &self.defaults)?));
        }
        for (name, allow) in parsed {
            if let Some(module) = self.modules.get_mut(&name) {
                module.allow = allow;
            }
        }
        Ok(self)
    }

    /// The folder relative module files are resolved against.
    pub fn modules_dir(&self) -> PathBuf {
        self.runtime.modules_dir.relative()
    }

    /// The compile cache folder, if caching is on.
    pub fn cache_dir(&self) -> Option<&Path> {
        let dir = &self.runtime.cache_dir;
        (!dir.as_os_str().is_empty()).then_some(dir.as_path())
    }

    /// The sections that changed between `self` and `new` and that only a
    /// restart applies (ports, runtime, logging, shutdown timings).
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        fn differs<T: Serialize>(a: &T, b: &T) -> bool {
            serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
        }
        [
            ("server", differs(&self.server, &new.server)),
            ("admin", differs(&self.admin, &new.admin)),
            ("runtime", differs(&self.runtime, &new.runtime)),
            ("log", differs(&self.log, &new.log)),
            ("shutdown", differs(&self.shutdown, &new.shutdown)),
            ("registry", differs(&self.registry, &new.registry)),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// Threads serving requests: `runtime.worker_threads`, else one per CPU
    /// this process may use.
    pub fn worker_threads(&self) -> usize {
        self.runtime.worker_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n as usize,
        )
    }

    /// The effective limits of a module.
    pub fn limits_of(&self, module: &ModuleConfig) -> Limits {
        module.limits.over(self.defaults.limits)
    }
}

#[cfg(test)]
mod tests;
