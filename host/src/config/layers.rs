//! Where the values come from: the layers of defaults, the config file, the
//! secrets file, the environment and the command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};

use super::env::EnvLayer;
use super::{Config, ConfigError, DEFAULT_CONFIG_FILE, rejected};

/// Values given on the command line, the top layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--admin-listen`
    pub admin_listen: Option<SocketAddr>,
    /// `--secrets-file`: a TOML file of secrets (a mounted Secret), merged
    /// over the config file. Its keys keep their case, which environment
    /// variable names cannot carry.
    pub secrets_file: Option<PathBuf>,
}

/// The `--secrets-file` layer: a TOML file that may set secrets and
/// nothing else (module `secrets`, registry credentials, the admin token),
/// so a Secret cannot change a route or a limit behind a review of the
/// ConfigMap.
fn secrets_layer(path: &Path) -> Result<SecretsFile, ConfigError> {
    use figment::Provider as _;
    if !path.is_file() {
        return Err(ConfigError::MissingFile(path.to_path_buf()));
    }
    // Read once: what is checked is what is merged (a file swapped between
    // two reads could otherwise set any key).
    let text = std::fs::read_to_string(path).map_err(|e| {
        rejected(
            "--secrets-file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let data = Toml::string(&text).data()?;
    let file = path.display();
    for dict in data.values() {
        for (section, value) in dict {
            let allowed = match section.as_str() {
                "modules" => value.as_dict().is_some_and(|modules| {
                    modules.values().all(|m| {
                        m.as_dict()
                            .is_some_and(|m| m.keys().all(|k| k == "secrets"))
                    })
                }),
                "admin" => value
                    .as_dict()
                    .is_some_and(|d| d.keys().all(|k| k == "token")),
                "registry" => value
                    .as_dict()
                    .is_some_and(|d| d.keys().all(|k| k == "credentials")),
                _ => false,
            };
            if !allowed {
                return Err(rejected(
                    section.clone(),
                    format!(
                        "the secrets file {file} may set only `modules.NAME.secrets`, \
                         `admin.token` and `registry.credentials`"
                    ),
                ));
            }
        }
    }
    Ok(SecretsFile {
        data,
        path: path.to_path_buf(),
    })
}

/// The checked contents of the secrets file, as a figment layer that names
/// the file in errors.
struct SecretsFile {
    data: figment::value::Map<figment::Profile, figment::value::Dict>,
    path: PathBuf,
}

impl figment::Provider for SecretsFile {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::from("secrets file", figment::Source::File(self.path.clone()))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

impl Config {
    /// Builds the layered figment. `file` is `--config`; without it the
    /// default file is read when present.
    pub fn figment(file: Option<&Path>, overrides: &Overrides) -> Result<Figment, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            Some(path) => fig = fig.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                fig = fig.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
            }
            None => {}
        }
        if let Some(path) = &overrides.secrets_file {
            fig = fig.merge(secrets_layer(path)?);
        }
        fig = fig.merge(EnvLayer::default());
        if let Some(addr) = overrides.listen {
            fig = fig.merge(("server.listen", addr.to_string()));
        }
        if let Some(addr) = overrides.admin_listen {
            fig = fig.merge(("admin.listen", addr.to_string()));
        }
        Ok(fig)
    }

    /// What the file at `path` says by itself (no environment, secrets file
    /// or flags), validated: for checking what the file names before it is
    /// rewritten.
    pub fn load_file_alone(path: &Path) -> Result<Config, ConfigError> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file_exact(path))
            .extract_lossy::<Config>()?
            .validate()
    }

    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::figment(file, overrides)?
            // Lossy: environment values arrive as strings, and become
            // numbers or booleans only where a key wants one.
            .extract_lossy::<Config>()?
            .validate()
    }
}
