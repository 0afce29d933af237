//! `[modules.NAME]`: one module to serve, and how its instances are reused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::allow::AllowList;
use super::build::BuildFields;
use super::canary::CanaryConfig;
use super::defaults::Defaults;
use super::limits::LimitsOverride;
use super::outbound::OutboundOverride;
use super::source::SourceFields;
use super::values::{ConfigValue, MAX_REQUEST_DURATION, Secret, SourceUrl, check_duration};
use super::{ConfigError, rejected};

/// One module to serve.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    /// The component file, relative to `runtime.modules_dir` unless absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Or: where to download the component (`https://` or `http://`), for
    /// modules too large for a ConfigMap. Requires `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<SourceUrl>,
    /// Or: an OCI reference, `registry/repository[:tag]@sha256:...`, for
    /// modules shipped through a registry. The digest pins the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    /// Let `oci` be a tag without a digest. The tag is resolved when the
    /// module loads (start-up, or a change of the reference); the digest
    /// it resolved to is logged and shown in `/info`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_tags: bool,
    /// The hex sha256 the component must have: required with `url`,
    /// optional with `file` (pins the ConfigMap's content to a digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Path prefix routed to this module; the longest matching prefix wins.
    pub route: String,
    /// Values the guest reads through `wasi:config/store`.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
    /// Like `config`, but never printed: not in logs, not in `/info`.
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
    /// Overrides of `defaults.limits`.
    #[serde(default)]
    pub limits: LimitsOverride,
    /// Overrides of `defaults.outbound`.
    #[serde(default)]
    pub outbound: OutboundOverride,
    /// Outbound destinations this module may call, as `scheme://host[:port]`
    /// (`*.example.com` matches subdomains, `*` as port any port). Empty
    /// means no outbound calls at all.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// `allowed_outbound_hosts`, parsed by [`Config::validate`](super::Config::validate).
    #[serde(skip)]
    pub allow: AllowList,
    /// Instance reuse; unset fields take the default of the module's world.
    #[serde(default)]
    pub instances: Instances,
    /// A second version given part of this module's traffic, judged
    /// against this one, and promoted or rolled back on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryConfig>,
    /// For `berth dev`: a shell command, run in the config file's
    /// directory, that writes `file`. `berth serve` never runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// For `berth dev`: globs (relative to the config file's directory) of
    /// the sources whose change reruns `build`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<String>,
}

impl ModuleConfig {
    /// Where this module's component comes from, as written.
    pub fn source(&self) -> SourceFields<'_> {
        SourceFields {
            file: self.file.as_deref(),
            url: self.url.as_deref(),
            oci: self.oci.as_deref(),
            allow_tags: self.allow_tags,
            sha256: self.sha256.as_deref(),
        }
    }

    /// How `berth dev` rebuilds it.
    pub fn build_fields(&self) -> BuildFields<'_> {
        BuildFields {
            build: self.build.as_deref(),
            watch: &self.watch,
        }
    }

    /// Everything of the module that does not involve the other modules,
    /// under `key` (`modules.NAME.`), its limits and outbound policy taken
    /// over `defaults`. Returns `allowed_outbound_hosts` parsed.
    pub(super) fn check(
        &self,
        key: &dyn Fn(&str) -> String,
        defaults: &Defaults,
    ) -> Result<AllowList, ConfigError> {
        self.source().check(key)?;
        self.build_fields().check(key)?;
        if let Some(canary) = &self.canary {
            canary.check(&|k: &str| key(&format!("canary.{k}")), self.source())?;
        }
        self.limits.over(defaults.limits).check(&key("limits"))?;
        self.instances.check(&key("instances"))?;
        self.outbound
            .over(defaults.outbound)
            .check(&key("outbound"))?;
        // Parsed once, here, and kept: nothing downstream parses it.
        let allow = AllowList::parse(&self.allowed_outbound_hosts).map_err(|(i, reason)| {
            rejected(format!("{}[{i}]", key("allowed_outbound_hosts")), reason)
        })?;
        if let Some(dup) = self.secrets.keys().find(|k| self.config.contains_key(*k)) {
            return Err(rejected(
                key(&format!("secrets.{dup}")),
                "the same key is also set in `config`",
            ));
        }
        Ok(allow)
    }
}

/// How many requests one guest instance may serve.
///
/// **Isolation.** With `max_requests = 1` every request gets a fresh
/// instance: nothing a request leaves in the guest's memory (globals,
/// caches, a half-written buffer, another tenant's data) can be seen by the
/// next one. With reuse, state *can* outlive a request and be seen by later
/// or concurrent requests to the same module; only turn it on for modules
/// written for it. A reused instance that traps, runs out of memory or runs
/// over its deadline is retired and never serves again.
///
/// Defaults: WASI 0.2 modules 1 and 1 (a fresh instance per request, the
/// fastest path there); WASI 0.3 modules 128 and 16, as `wasmtime serve`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Instances {
    /// Requests one instance serves in its life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests one instance serves at once (WASI 0.3 modules; a WASI 0.2
    /// handler runs one request at a time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// How long an idle instance is kept for the next request.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

impl Instances {
    /// A module's instance reuse, its keys named under `key`.
    pub(super) fn check(&self, key: &str) -> Result<(), ConfigError> {
        for (field, value) in [
            ("max_requests", self.max_requests),
            ("max_concurrent", self.max_concurrent),
        ] {
            if value == Some(0) {
                return Err(rejected(format!("{key}.{field}"), "must be at least 1"));
            }
        }
        if let Some(idle) = self.idle_timeout {
            if idle.is_zero() {
                return Err(rejected(
                    format!("{key}.idle_timeout"),
                    "must be longer than 0s",
                ));
            }
            check_duration(&format!("{key}.idle_timeout"), idle, MAX_REQUEST_DURATION)?;
        }
        Ok(())
    }
}

/// `/api/` and `/api` route the same way; routing compares without the
/// trailing slash.
pub fn normalize_route(route: &str) -> &str {
    match route.trim_end_matches('/') {
        "" => "/",
        r => r,
    }
}
