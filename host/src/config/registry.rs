//! `[registry]`: pulling modules from OCI registries, and the check of an
//! OCI reference.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{ByteSize, Secret};
use super::{ConfigError, rejected};

/// Pulling modules from OCI registries (modules with `oci = "..."`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Docker `config.json` files to take credentials from (a mounted
    /// `dockerconfigjson` Secret); first match wins. Empty:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. Read on
    /// every pull, so a rotated Secret takes effect at once.
    pub auth_files: Vec<PathBuf>,
    /// Credentials per registry host (`host[:port]`); they win over the
    /// files. Never printed.
    pub credentials: BTreeMap<String, RegistryCredentials>,
    /// A PEM file of extra CA certificates trusted besides the platform's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Registries (`host[:port]`) spoken to over plain HTTP. Everything
    /// else is HTTPS only.
    pub insecure_registries: Vec<String>,
    /// Most one pull attempt may take, manifest and layer together.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most a connection to a registry may take to open.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Attempts after the first when a pull fails for a reason that may
    /// pass (connection refused, timeout, 5xx); never after a refusal
    /// (401, 403, 404) or a wrong digest.
    pub retries: u32,
    /// Largest component accepted from a registry.
    pub max_module_size: ByteSize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            auth_files: Vec::new(),
            credentials: BTreeMap::new(),
            ca_file: None,
            insecure_registries: Vec::new(),
            timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            retries: 2,
            max_module_size: ByteSize(512 << 20),
        }
    }
}

impl RegistryConfig {
    /// What types alone cannot check in `[registry]`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(rejected("registry.timeout", "must be longer than 0s"));
        }
        if self.retries > 10 {
            return Err(rejected("registry.retries", "at most 10"));
        }
        if let Some(ca) = &self.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            return Err(rejected(
                "registry.ca_file",
                format!("cannot read {}: {e}", ca.display()),
            ));
        }
        if self.max_module_size.0 == 0 {
            return Err(rejected("registry.max_module_size", "must be more than 0"));
        }
        for (i, host) in self.insecure_registries.iter().enumerate() {
            if host.is_empty() || host.contains(['/', ' ']) {
                return Err(rejected(
                    format!("registry.insecure_registries[{i}]"),
                    format!("`{host}` is not a registry host[:port]"),
                ));
            }
        }
        for (host, c) in &self.credentials {
            if c.token.is_none() && (c.username.is_none() || c.password.is_none()) {
                return Err(rejected(
                    format!("registry.credentials.\"{host}\""),
                    "give `username` and `password`, or `token`",
                ));
            }
        }
        Ok(())
    }
}

/// Credentials for one registry: `username` and `password`, or a bearer
/// `token`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryCredentials {
    /// Basic-auth user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Basic-auth password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// A registry bearer token (wins over the user and password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

/// An OCI reference Berth can pull: it parses, and it carries a sha256
/// digest unless tags are allowed.
pub fn check_oci_reference(reference: &str, allow_tags: bool) -> Result<(), String> {
    let parsed: oci_client::Reference = reference
        .parse()
        .map_err(|e| format!("`{reference}` is not an OCI reference: {e}"))?;
    match parsed.digest() {
        Some(d) => {
            let hex = d.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!(
                    "`{reference}`: the digest must be sha256 with 64 hex digits"
                ));
            }
        }
        None if allow_tags => {}
        None => {
            return Err(format!(
                "`{reference}` has no digest: pin it (`...@sha256:<digest>`, printed by \
                 `berth push`), or set `allow_tags = true` to follow a tag"
            ));
        }
    }
    Ok(())
}
