//! Where a component comes from (`file`, `url` or `oci`), the keys a
//! module and its canary share.

use std::path::Path;

use super::registry::check_oci_reference;
use super::{ConfigError, rejected};

/// The keys that say where a component comes from, shared by a module and
/// its canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFields<'a> {
    /// `file`
    pub file: Option<&'a Path>,
    /// `url`
    pub url: Option<&'a str>,
    /// `oci`
    pub oci: Option<&'a str>,
    /// `allow_tags`
    pub allow_tags: bool,
    /// `sha256`
    pub sha256: Option<&'a str>,
}

impl SourceFields<'_> {
    /// Exactly one of `file`, `url` and `oci`, each well formed.
    pub(super) fn check(self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let given: Vec<&str> = [
            ("file", self.file.is_some()),
            ("url", self.url.is_some()),
            ("oci", self.oci.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        match given.as_slice() {
            [] => {
                return Err(rejected(
                    key("file"),
                    "missing: give `file`, `url` (with `sha256`) or `oci`",
                ));
            }
            [_] => {}
            [first, second, ..] => {
                return Err(rejected(
                    key(second),
                    format!(
                        "give only one of `file`, `url` and `oci`, not `{first}` and `{second}`"
                    ),
                ));
            }
        }
        if self.allow_tags && self.oci.is_none() {
            return Err(rejected(
                key("allow_tags"),
                "only applies to an `oci` module",
            ));
        }
        if let Some(file) = self.file
            && file.as_os_str().is_empty()
        {
            return Err(rejected(key("file"), "must name a .wasm file"));
        }
        if let Some(url) = self.url {
            if !(url.starts_with("https://") || url.starts_with("http://"))
                || url.parse::<http::Uri>().is_err()
            {
                return Err(rejected(
                    key("url"),
                    format!("`{url}` is not an http(s) URL"),
                ));
            }
            let digest_ok = self
                .sha256
                .is_some_and(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit()));
            if !digest_ok {
                return Err(rejected(
                    key("sha256"),
                    "a module from a `url` needs the 64-hex-digit sha256 of its content",
                ));
            }
        }
        if let Some(reference) = self.oci {
            if self.sha256.is_some() {
                return Err(rejected(
                    key("sha256"),
                    "an `oci` module is pinned by the digest in its reference (`...@sha256:...`)",
                ));
            }
            check_oci_reference(reference, self.allow_tags).map_err(|r| rejected(key("oci"), r))?;
        }
        Ok(())
    }
}
