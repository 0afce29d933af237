//! Registry credentials: per-registry entries of the Berth config, then
//! Docker `config.json` files (a Kubernetes `dockerconfigjson` Secret
//! mounted as a file, `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`),
//! then anonymous access.
//!
//! The Docker file is read here rather than with `docker_credential`: that
//! crate only reads the default location and runs credential helpers, and a
//! pod has neither; a mounted Secret sits at a path of the chart's choosing.
//! The format is a JSON object, read with serde; nothing is hand-parsed
//! beyond the base64 `auth` field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::config::RegistryCredentials;

/// Where credentials come from, consulted on every pull so a rotated
/// Secret takes effect without a restart.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// `registry.credentials`, by registry host.
    pub configured: BTreeMap<String, RegistryCredentials>,
    /// Docker config files, first match wins.
    pub files: Vec<PathBuf>,
}

/// A credential problem, named for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A credentials file exists but cannot be used.
    #[error("registry credentials file {file}: {reason}")]
    File {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    /// A credential helper for every registry (`docker login` on a
    /// workstation writes `desktop`, `osxkeychain`, ...).
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    /// Credential helpers per registry.
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

impl Credentials {
    /// The Docker config files to read when the config names none:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub fn default_files() -> Vec<PathBuf> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")));
        dir.map(|d| d.join("config.json")).into_iter().collect()
    }

    /// The credentials for `registry` (a host, `host:port`).
    pub fn for_registry(&self, registry: &str) -> Result<RegistryAuth, AuthError> {
        let wanted = normalize(registry);
        if let Some(c) = self
            .configured
            .iter()
            .find(|(k, _)| normalize(k) == wanted)
            .map(|(_, c)| c)
        {
            return Ok(match (&c.token, &c.username, &c.password) {
                (Some(token), _, _) => RegistryAuth::Bearer(token.0.0.clone()),
                (None, Some(user), Some(pass)) => {
                    RegistryAuth::Basic(user.clone(), pass.0.0.clone())
                }
                _ => RegistryAuth::Anonymous,
            });
        }
        for file in &self.files {
            if let Some(auth) = from_docker_file(file, &wanted)? {
                return Ok(auth);
            }
        }
        Ok(RegistryAuth::Anonymous)
    }
}

impl Credentials {
    /// Why there may be no credentials for `registry` although the
    /// operator logged in: a Docker config that keeps them in a credential
    /// helper, which Berth does not run (a pod has none).
    pub fn helper_note(&self, registry: &str) -> Option<String> {
        let wanted = normalize(registry);
        self.files.iter().find_map(|file| {
            let config: DockerConfig = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
            let usable = config.auths.iter().any(|(k, e)| {
                normalize(k) == wanted
                    && (e.auth.is_some() || e.username.is_some() || e.registrytoken.is_some())
            });
            if usable {
                return None;
            }
            let helper = config
                .cred_helpers
                .iter()
                .find(|(k, _)| normalize(k) == wanted)
                .map(|(_, h)| h.clone())
                .or(config.creds_store)?;
            Some(format!(
                "{} keeps the credentials for {registry} in the `{helper}` credential helper \
                 (docker-credential-{helper}), which berth does not run: pass --auth-file with a \
                 config.json that holds them under `auths` (or set registry.credentials)",
                file.display()
            ))
        })
    }
}

/// The entry for `wanted` in one Docker config file; a missing file has
/// none.
fn from_docker_file(file: &Path, wanted: &str) -> Result<Option<RegistryAuth>, AuthError> {
    let err = |reason: String| AuthError::File {
        file: file.to_path_buf(),
        reason,
    };
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let config: DockerConfig =
        serde_json::from_slice(&text).map_err(|e| err(format!("not a Docker config.json: {e}")))?;
    let Some((key, entry)) = config.auths.iter().find(|(k, _)| normalize(k) == wanted) else {
        return Ok(None);
    };
    if let Some(token) = &entry.registrytoken {
        return Ok(Some(RegistryAuth::Bearer(token.clone())));
    }
    if let (Some(user), Some(pass)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(user.clone(), pass.clone())));
    }
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .ok_or_else(|| {
                err(format!(
                    "`auths.\"{key}\".auth` is not base64 of user:password"
                ))
            })?;
        let (user, pass) = decoded.split_once(':').ok_or_else(|| {
            err(format!(
                "`auths.\"{key}\".auth` is not base64 of user:password"
            ))
        })?;
        return Ok(Some(RegistryAuth::Basic(user.to_owned(), pass.to_owned())));
    }
    Ok(None)
}

/// A registry key as Docker writes it (`https://index.docker.io/v1/`,
/// `ghcr.io`, `http://localhost:5000`) reduced to the host and port, with
/// Docker Hub's aliases made one.
fn normalize(key: &str) -> String {
    let key = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "index.docker.io".to_owned(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigValue, Secret};

    fn write(dir: &Path, json: &str) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        path
    }

    fn basic(user: &str, pass: &str) -> RegistryAuth {
        RegistryAuth::Basic(user.into(), pass.into())
    }

    #[test]
    fn a_credential_helper_is_named_with_what_to_do_instead() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        std::fs::write(
            &file,
            r#"{"auths": {"ghcr.io": {}}, "credsStore": "desktop"}"#,
        )
        .unwrap();
        let creds = Credentials {
            files: vec![file.clone()],
            ..Credentials::default()
        };
        let note = creds.helper_note("ghcr.io").unwrap();
        assert!(
            note.contains("`desktop`") && note.contains("--auth-file"),
            "{note}"
        );
        std::fs::write(
            &file,
            r#"{"credHelpers": {"registry.example": "ecr-login"}}"#,
        )
        .unwrap();
        assert!(
            creds
                .helper_note("registry.example")
                .unwrap()
                .contains("ecr-login")
        );
        assert_eq!(creds.helper_note("ghcr.io"), None);
        std::fs::write(
            &file,
            r#"{"auths": {"ghcr.io": {"auth": "dTpw"}}, "credsStore": "desktop"}"#,
        )
        .unwrap();
        assert_eq!(creds.helper_note("ghcr.io"), None);
    }

    #[test]
    fn docker_files_give_basic_and_bearer_auth_by_registry() {
        let dir = tempfile::tempdir().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let file = write(
            dir.path(),
            &format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{b64}"}},
                    "http://127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                    "ghcr.io": {{"registrytoken": "tok"}}
                }}}}"#
            ),
        );
        let creds = Credentials {
            configured: BTreeMap::new(),
            files: vec![dir.path().join("missing.json"), file],
        };
        assert_eq!(
            creds.for_registry("docker.io").unwrap(),
            basic("alice", "s3cret")
        );
        assert_eq!(
            creds.for_registry("127.0.0.1:5000").unwrap(),
            basic("bob", "pw")
        );
        assert_eq!(
            creds.for_registry("ghcr.io").unwrap(),
            RegistryAuth::Bearer("tok".into())
        );
        assert_eq!(
            creds.for_registry("quay.io").unwrap(),
            RegistryAuth::Anonymous
        );
    }

    #[test]
    fn configured_credentials_win_over_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            r#"{"auths": {"reg.example": {"username": "file", "password": "x"}}}"#,
        );
        let secret = |s: &str| Secret(ConfigValue(s.into()));
        let creds = Credentials {
            configured: BTreeMap::from([(
                "reg.example".to_owned(),
                RegistryCredentials {
                    username: Some("cfg".into()),
                    password: Some(secret("y")),
                    token: None,
                },
            )]),
            files: vec![file],
        };
        assert_eq!(
            creds.for_registry("reg.example").unwrap(),
            basic("cfg", "y")
        );
    }

    #[test]
    fn a_broken_file_is_named_and_a_bad_auth_field_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "not json");
        let creds = Credentials {
            configured: BTreeMap::new(),
            files: vec![file.clone()],
        };
        let err = creds.for_registry("x.io").unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        write(
            dir.path(),
            r#"{"auths": {"x.io": {"auth": "bm9jb2xvbg=="}}}"#,
        );
        let err = creds.for_registry("x.io").unwrap_err().to_string();
        assert!(err.contains("user:password"), "{err}");
        // The secret's bytes never appear in the message.
        assert!(!err.contains("nocolon"), "{err}");
    }
}
