//! Modules as OCI artifacts: pulling a component from a registry, pinned by
//! the manifest digest (or by a tag where the config allows it), and
//! pushing one in the CNCF Wasm artifact format that `wkg` and `wash`
//! write (config `application/vnd.wasm.config.v0+json`, one
//! `application/wasm` layer).
//!
//! A pull verifies the manifest against the pinned digest and the layer
//! against the manifest's digest before anything is compiled, and bounds
//! the size before and while it streams. Pulled content is cached by
//! digest in the compile cache's folder, so a restart or a rescan does not
//! pull again: the cached manifest and layer are verified against their
//! digests on every use.

pub mod auth;
mod pull;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::{self, OciImageManifest};
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

pub use auth::{AuthError, Credentials};

use crate::config::RegistryConfig;

/// Layer media types taken as the component: the CNCF Wasm artifact's,
/// Spin's and wasmCloud's, and the older `wasm-to-oci` one.
pub const WASM_LAYER_TYPES: &[&str] = &[
    oci_wasm::WASM_LAYER_MEDIA_TYPE,
    manifest::WASM_LAYER_MEDIA_TYPE,
    "application/vnd.module.wasm.content.layer.v1+wasm",
];

/// Manifest media types asked for: OCI and Docker v2 image manifests.
const MANIFEST_TYPES: &[&str] = &[
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
];

/// Why a pull or push failed; each names the reference.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse, or lacks a digest where one is needed.
    #[error("{0}")]
    Reference(String),
    /// The registry refused the credentials (or their absence).
    #[error(
        "{reference}: the registry {registry} refused access ({detail}); check the credentials \
         for `{registry}` (registry.credentials, registry.auth_files, or the Docker config)"
    )]
    Auth {
        /// The reference.
        reference: String,
        /// Registry host.
        registry: String,
        /// What the registry said.
        detail: String,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Credentials(#[from] AuthError),
    /// No such manifest (tag or digest) or repository.
    #[error("{reference}: not found in the registry ({detail})")]
    NotFound {
        /// The reference.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// Content that does not have the digest it should.
    #[error("{reference}: {what} has digest {actual}, but {expected} was expected; refusing it")]
    Digest {
        /// The reference.
        reference: String,
        /// `the manifest` or `layer ...`.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// The artifact is not a single Wasm component.
    #[error("{reference}: {reason}")]
    NotWasm {
        /// The reference.
        reference: String,
        /// What it holds instead.
        reason: String,
    },
    /// Bigger than `registry.max_module_size`.
    #[error(
        "{reference}: the component is {size} bytes or more, over registry.max_module_size \
         ({max} bytes)"
    )]
    TooLarge {
        /// The reference.
        reference: String,
        /// The size declared or seen so far.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The registry did not answer in time, or could not be reached.
    #[error("{reference}: {detail}")]
    Unavailable {
        /// The reference.
        reference: String,
        /// What happened.
        detail: String,
    },
    /// Anything else the registry or the client reported.
    #[error("{reference}: {detail}")]
    Other {
        /// The reference.
        reference: String,
        /// What happened.
        detail: String,
    },
}

impl RegistryError {
    /// Whether another attempt could succeed.
    fn retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

/// A component pulled from a registry.
#[derive(Debug)]
pub struct Pulled {
    /// The component.
    pub bytes: Vec<u8>,
    /// Hex sha256 of the component (its layer digest).
    pub sha256: String,
    /// The manifest digest (`sha256:...`) the reference resolved to.
    pub manifest_digest: String,
    /// `registry/repository@sha256:...`: what to pin.
    pub pinned: String,
    /// Whether it came from the local cache, without the network.
    pub cached: bool,
}

/// A client for pulling and pushing modules, with the settings of
/// `[registry]`.
pub struct Registry {
    /// For pushes (the CLI).
    client: Client,
    /// For pulls: bounded reads, credentials read anew on each.
    http: pull::Http,
    credentials: Credentials,
    timeout: Duration,
    retries: u32,
    max_size: u64,
}

impl Registry {
    /// `err`, with why the credentials may be missing when access was
    /// refused.
    fn noted(&self, err: RegistryError, reference: &Reference) -> RegistryError {
        match err {
            RegistryError::Auth {
                reference: name,
                registry,
                detail,
            } => {
                let detail = match self.credentials.helper_note(reference.resolve_registry()) {
                    Some(note) => format!("{detail}; {note}"),
                    None => detail,
                };
                RegistryError::Auth {
                    reference: name,
                    registry,
                    detail,
                }
            }
            other => other,
        }
    }

    /// A client for `config`. Fails if the CA file cannot be read.
    pub fn new(config: &RegistryConfig) -> Result<Self, RegistryError> {
        // reqwest is built without a provider of its own: ring, as
        // everywhere in the host (a no-op when already installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra_root_certificates = Vec::new();
        let mut extra_roots = Vec::new();
        if let Some(ca) = &config.ca_file {
            let data = std::fs::read(ca).map_err(|e| RegistryError::Other {
                reference: "registry.ca_file".into(),
                detail: format!("cannot read {}: {e}", ca.display()),
            })?;
            extra_roots = data.clone();
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let http = pull::Http::new(
            &extra_roots,
            config.insecure_registries.clone(),
            config.connect_timeout,
        )
        .map_err(|detail| RegistryError::Other {
            reference: "registry".into(),
            detail,
        })?;
        let client_config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(config.insecure_registries.clone()),
            extra_root_certificates,
            connect_timeout: Some(config.connect_timeout),
            read_timeout: Some(config.connect_timeout.max(Duration::from_secs(30))),
            user_agent: concat!("berth/", env!("CARGO_PKG_VERSION")),
            max_concurrent_download: 1,
            ..ClientConfig::default()
        };
        let client = Client::try_from(client_config).map_err(|e| RegistryError::Other {
            reference: "registry".into(),
            detail: e.to_string(),
        })?;
        let files = if config.auth_files.is_empty() {
            Credentials::default_files()
        } else {
            config.auth_files.clone()
        };
        Ok(Registry {
            client,
            http,
            credentials: Credentials {
                configured: config.credentials.clone(),
                files,
            },
            timeout: config.timeout,
            retries: config.retries,
            max_size: config.max_module_size.0,
        })
    }

    /// Pulls the component of `reference`, from `cache` (a private folder)
    /// when it holds it, retrying what may pass. `module` names the pull
    /// in progress logs.
    pub async fn pull(
        &self,
        reference: &str,
        cache: Option<&Path>,
        module: &str,
    ) -> Result<Pulled, RegistryError> {
        let parsed = parse(reference)?;
        if let Some(cache) = cache
            && let Some(digest) = parsed.digest()
            && let Some(pulled) = from_cache(cache, &parsed, digest)
        {
            return Ok(pulled);
        }
        let mut attempt = 0;
        loop {
            let result = tokio::time::timeout(self.timeout, self.pull_once(&parsed, cache, module))
                .await
                .unwrap_or_else(|_| {
                    Err(RegistryError::Unavailable {
                        reference: reference.to_owned(),
                        detail: format!(
                            "the pull took longer than registry.timeout ({:?})",
                            self.timeout
                        ),
                    })
                });
            let result = result.map_err(|e| self.noted(e, &parsed));
            match result {
                Err(e) if e.retryable() && attempt < self.retries => {
                    attempt += 1;
                    let backoff = Duration::from_millis(500 << attempt.min(5));
                    tracing::warn!(module, reference, attempt, error = %e, ?backoff, "pull failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
                other => return other,
            }
        }
    }

    async fn pull_once(
        &self,
        reference: &Reference,
        cache: Option<&Path>,
        module: &str,
    ) -> Result<Pulled, RegistryError> {
        let name = reference.whole();
        // Read now, for this pull: a rotated Secret counts at once.
        let auth = self
            .credentials
            .for_registry(reference.resolve_registry())?;
        let mut session = self.http.session(reference, auth);
        let raw = session.manifest(MANIFEST_TYPES).await?;
        // The digest is computed here, over the bytes received, rather than
        // taken from the registry's `Docker-Content-Digest` header.
        let manifest_digest = format!("sha256:{}", hex::encode(Sha256::digest(&raw)));
        if let Some(expected) = reference.digest()
            && expected != manifest_digest
        {
            return Err(RegistryError::Digest {
                reference: name,
                what: "the manifest".into(),
                expected: expected.to_owned(),
                actual: manifest_digest,
            });
        }
        let layer = wasm_layer(&name, &raw)?;
        let pinned = pinned(reference, &manifest_digest);
        let hex = layer_hex(&name, &layer.digest)?;
        if let Some(cache) = cache
            && let Some(bytes) = cached_blob(cache, &hex)
        {
            store_manifest(cache, &manifest_digest, &raw);
            return Ok(Pulled {
                bytes,
                sha256: hex,
                manifest_digest,
                pinned,
                cached: true,
            });
        }
        let declared = u64::try_from(layer.size).unwrap_or(0);
        if declared > self.max_size {
            return Err(RegistryError::TooLarge {
                reference: name,
                size: declared,
                max: self.max_size,
            });
        }
        let bytes = self
            .pull_layer(&mut session, &layer, declared, module)
            .await?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != hex {
            return Err(RegistryError::Digest {
                reference: name,
                what: format!("layer {}", layer.digest),
                expected: layer.digest.clone(),
                actual: format!("sha256:{actual}"),
            });
        }
        if let Some(cache) = cache {
            store_blob(cache, &hex, &bytes);
            store_manifest(cache, &manifest_digest, &raw);
        }
        Ok(Pulled {
            bytes,
            sha256: hex,
            manifest_digest,
            pinned,
            cached: false,
        })
    }

    /// Streams the layer, bounded by its declared size and the limit, and
    /// logs progress at most once a second.
    async fn pull_layer(
        &self,
        session: &mut pull::Session<'_>,
        layer: &manifest::OciDescriptor,
        declared: u64,
        module: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let name = session.name();
        let limit = if declared > 0 {
            declared
        } else {
            self.max_size
        };
        let started = Instant::now();
        let mut response = session.blob(&layer.digest).await?;
        let mut bytes = Vec::with_capacity(usize::try_from(limit.min(64 << 20)).unwrap_or(0));
        let mut logged = Instant::now();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| RegistryError::Unavailable {
                reference: name.clone(),
                detail: format!("the layer download broke off: {}", error_chain(&e)),
            })?
        {
            let seen = (bytes.len() + chunk.len()) as u64;
            if seen > limit {
                return Err(if declared > 0 {
                    RegistryError::NotWasm {
                        reference: name,
                        reason: format!(
                            "layer {} runs past the {declared} bytes its manifest declares; \
                             refusing it",
                            layer.digest
                        ),
                    }
                } else {
                    RegistryError::TooLarge {
                        reference: name,
                        size: seen,
                        max: self.max_size,
                    }
                });
            }
            bytes.extend_from_slice(&chunk);
            if logged.elapsed() >= Duration::from_secs(1) {
                logged = Instant::now();
                let percent = (declared > 0).then(|| bytes.len() as u64 * 100 / declared);
                tracing::info!(module, reference = %name, bytes = bytes.len(), total = declared, percent, "pulling");
            }
        }
        tracing::info!(
            module,
            reference = %name,
            bytes = bytes.len(),
            ms = started.elapsed().as_millis() as u64,
            "pulled"
        );
        Ok(bytes)
    }

    /// Pushes `component` to `reference` as a CNCF Wasm artifact, with its
    /// imports and exports in the config and `annotations` on the
    /// manifest. Returns the manifest digest.
    pub async fn push(
        &self,
        component: Vec<u8>,
        reference: &str,
        annotations: BTreeMap<String, String>,
    ) -> Result<String, RegistryError> {
        let parsed = parse(reference)?;
        let name = parsed.whole();
        let (mut config, layer) = oci_wasm::WasmConfig::from_raw_component(component, None)
            .map_err(|e| RegistryError::NotWasm {
                reference: name.clone(),
                reason: format!("not a WebAssembly component: {e:#}"),
            })?;
        // The config blob carries a time too: the annotation's (from
        // SOURCE_DATE_EPOCH), else the Unix epoch, never "now", so the same
        // bytes make the same digest.
        let created = annotations
            .get("org.opencontainers.image.created")
            .cloned()
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned());
        config.created = serde_json::from_value(serde_json::Value::String(created.clone()))
            .map_err(|e| RegistryError::Other {
                reference: name.clone(),
                detail: format!("created time `{created}`: {e}"),
            })?;
        let auth = self.credentials.for_registry(parsed.resolve_registry())?;
        let client = oci_wasm::WasmClient::new(self.client.clone());
        client
            .push(&parsed, &auth, layer, config, Some(annotations))
            .await
            .map_err(|e| match e.downcast::<OciDistributionError>() {
                Ok(e) => classify(&name, &parsed, "the artifact", e),
                Err(e) => RegistryError::Other {
                    reference: name.clone(),
                    detail: crate::telemetry::truncate(&format!("{e:#}"), pull::MAX_ERROR),
                },
            })
            .map_err(|e| self.noted(e, &parsed))?;
        self.client
            .fetch_manifest_digest(&parsed, &auth)
            .await
            .map_err(|e| classify(&name, &parsed, "the manifest", e))
    }
}

/// Parses a reference, with or without an `oci://` prefix.
pub fn parse(reference: &str) -> Result<Reference, RegistryError> {
    let bare = reference.strip_prefix("oci://").unwrap_or(reference);
    bare.parse().map_err(|e| {
        RegistryError::Reference(format!("`{reference}` is not an OCI reference: {e}"))
    })
}

/// `registry/repository@digest`.
fn pinned(reference: &Reference, digest: &str) -> String {
    format!(
        "{}/{}@{digest}",
        reference.registry(),
        reference.repository()
    )
}

/// The one Wasm layer of a manifest.
fn wasm_layer(name: &str, raw: &[u8]) -> Result<manifest::OciDescriptor, RegistryError> {
    let manifest: OciImageManifest =
        serde_json::from_slice(raw).map_err(|e| RegistryError::NotWasm {
            reference: name.to_owned(),
            reason: format!("not an image manifest (an index needs a platform's digest): {e}"),
        })?;
    let mut wasm = manifest
        .layers
        .iter()
        .filter(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()));
    match (wasm.next(), wasm.next()) {
        (Some(layer), None) => Ok(layer.clone()),
        (None, _) => Err(RegistryError::NotWasm {
            reference: name.to_owned(),
            reason: format!(
                "no Wasm layer (layers: [{}]; accepted: {})",
                manifest
                    .layers
                    .iter()
                    .map(|l| l.media_type.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                WASM_LAYER_TYPES.join(", ")
            ),
        }),
        (Some(_), Some(_)) => Err(RegistryError::NotWasm {
            reference: name.to_owned(),
            reason: "more than one Wasm layer; Berth serves one component per module".into(),
        }),
    }
}

/// The hex of a `sha256:` layer digest. Validated strictly: it names a
/// file in the cache, and a hostile manifest could carry `../`.
fn layer_hex(name: &str, digest: &str) -> Result<String, RegistryError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()) => {
            Ok(hex.to_ascii_lowercase())
        }
        _ => Err(RegistryError::NotWasm {
            reference: name.to_owned(),
            reason: format!("layer digest `{digest}` is not sha256 with 64 hex digits"),
        }),
    }
}

/// Maps a client error to what an operator can act on; `what` names the
/// content a digest error is about.
fn classify(
    name: &str,
    reference: &Reference,
    what: &str,
    err: OciDistributionError,
) -> RegistryError {
    let reference_s = name.to_owned();
    let registry = reference.resolve_registry().to_owned();
    // oci-client puts whole error bodies in its errors.
    let detail = crate::telemetry::truncate(&err.to_string(), pull::MAX_ERROR);
    match &err {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => RegistryError::Auth {
            reference: reference_s,
            registry,
            detail,
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                RegistryError::Auth {
                    reference: reference_s,
                    registry,
                    detail,
                }
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                RegistryError::NotFound {
                    reference: reference_s,
                    detail,
                }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                RegistryError::Unavailable {
                    reference: reference_s,
                    detail,
                }
            } else {
                RegistryError::Other {
                    reference: reference_s,
                    detail,
                }
            }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound {
            reference: reference_s,
            detail,
        },
        OciDistributionError::ServerError { code, .. } if *code >= 500 || *code == 429 => {
            RegistryError::Unavailable {
                reference: reference_s,
                detail,
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => RegistryError::NotFound {
            reference: reference_s,
            detail,
        },
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => RegistryError::Auth {
            reference: reference_s,
            registry,
            detail,
        },
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            RegistryError::Digest {
                reference: reference_s,
                what: what.to_owned(),
                expected: expected.clone(),
                actual: actual.clone(),
            }
        }
        OciDistributionError::RequestError(e) => {
            let chain = error_chain(e);
            // rustls's words for an answer that is not TLS at all.
            let hint = if chain.contains("InvalidContentType") {
                "; it does not speak TLS: list it in registry.insecure_registries (or pass \
                 --insecure-registry to the CLI) if it is plain HTTP"
            } else {
                ""
            };
            RegistryError::Unavailable {
                reference: reference_s,
                detail: format!("cannot reach {registry}: {chain}{hint}"),
            }
        }
        OciDistributionError::IoError(_) => RegistryError::Unavailable {
            reference: reference_s,
            detail,
        },
        _ => RegistryError::Other {
            reference: reference_s,
            detail,
        },
    }
}

/// reqwest puts the cause (refused, TLS, timeout) in the source chain.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn manifest_path(cache: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()))
        .then(|| cache.join("oci").join(format!("{hex}.json")))
}

fn blob_path(cache: &Path, hex: &str) -> PathBuf {
    cache.join("downloads").join(format!("{hex}.wasm"))
}

/// A pinned reference served from the cache: its manifest has the pinned
/// digest, and the layer it names is there with its digest.
fn from_cache(cache: &Path, reference: &Reference, digest: &str) -> Option<Pulled> {
    let raw = std::fs::read(manifest_path(cache, digest)?).ok()?;
    if format!("sha256:{}", hex::encode(Sha256::digest(&raw))) != digest {
        return None;
    }
    let name = reference.whole();
    let layer = wasm_layer(&name, &raw).ok()?;
    let hex = layer_hex(&name, &layer.digest).ok()?;
    let bytes = cached_blob(cache, &hex)?;
    Some(Pulled {
        bytes,
        sha256: hex,
        manifest_digest: digest.to_owned(),
        pinned: pinned(reference, digest),
        cached: true,
    })
}

/// A cached component (a registry layer or a URL download) by its hex
/// sha256, if present and intact.
pub fn cached_blob(cache: &Path, hex: &str) -> Option<Vec<u8>> {
    let bytes = std::fs::read(blob_path(cache, hex)).ok()?;
    (hex::encode(Sha256::digest(&bytes)) == hex).then_some(bytes)
}

/// Keeps a component whose sha256 is `hex` (already verified) in the cache.
pub fn store_blob(cache: &Path, hex: &str, bytes: &[u8]) {
    write_atomic(&blob_path(cache, hex), bytes);
}

fn store_manifest(cache: &Path, digest: &str, raw: &[u8]) {
    if let Some(path) = manifest_path(cache, digest) {
        write_atomic(&path, raw);
    }
}

/// Best effort: a cache that cannot be written (a full disk) only costs
/// the next pull.
fn write_atomic(path: &Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    // Unique: two modules may pull the same layer at once.
    let tmp = path.with_extension(format!("part{}", fastrand::u64(..)));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %path.display(), error = %e, "cannot cache a pulled module");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layers: &[(&str, &str, i64)]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_IMAGE_MEDIA_TYPE,
            "config": {"mediaType": oci_wasm::WASM_MANIFEST_CONFIG_MEDIA_TYPE,
                       "digest": format!("sha256:{}", "0".repeat(64)), "size": 2},
            "layers": layers.iter().map(|(t, d, s)| serde_json::json!({
                "mediaType": t, "digest": d, "size": s})).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    use std::sync::Arc;

    use crate::testing::{Answer, Peer, ok, status};

    /// A registry on loopback that fails, lies and overruns on demand, as
    /// the real registry of the end-to-end tests cannot.
    struct Fake(Peer);

    impl Fake {
        async fn start(answer: Arc<Answer>) -> Fake {
            Fake(Peer::start(answer).await)
        }

        fn host(&self) -> &str {
            &self.0.host
        }

        fn asked(&self, kind: &str) -> usize {
            let part = format!("/{kind}/");
            self.0.asked().iter().filter(|p| p.contains(&part)).count()
        }

        /// A pull of `reference` as module `m`, within 1 MiB.
        async fn pull(&self, reference: &str, retries: u32) -> Result<Pulled, RegistryError> {
            self.registry(retries, 1 << 20)
                .pull(reference, None, "m")
                .await
        }

        fn registry(&self, retries: u32, max_module_size: u64) -> Registry {
            Registry::new(&RegistryConfig {
                insecure_registries: vec![self.0.host.clone()],
                auth_files: vec!["/nonexistent/berth-test-auth.json".into()],
                retries,
                timeout: Duration::from_secs(20),
                max_module_size: crate::config::ByteSize(max_module_size),
                ..RegistryConfig::default()
            })
            .unwrap()
        }
    }

    /// A component's layer, a manifest declaring `declared` bytes of it,
    /// and the manifest's digest.
    fn artifact(layer: &[u8], declared: i64) -> (Vec<u8>, String) {
        let hex = hex::encode(Sha256::digest(layer));
        let raw = manifest(&[("application/wasm", &format!("sha256:{hex}"), declared)]);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&raw)));
        (raw, digest)
    }

    /// Serves `raw` for every manifest and `served` for every blob, after
    /// `failures` 503s on the manifest.
    fn serving(raw: Vec<u8>, served: Vec<u8>, failures: usize) -> Arc<Answer> {
        Arc::new(move |path, n| {
            if path.contains("/manifests/") {
                if n < failures { status(503) } else { ok(&raw) }
            } else {
                ok(&served)
            }
        })
    }

    /// A pull of `digest`, limited to `max` bytes, from a fake registry
    /// serving `raw` and `layer`.
    async fn pull_from(
        raw: Vec<u8>,
        layer: Vec<u8>,
        digest: &str,
        max: u64,
    ) -> Result<Pulled, RegistryError> {
        let fake = Fake::start(serving(raw, layer, 0)).await;
        let reference = format!("{}/team/m@{digest}", fake.host());
        fake.registry(0, max).pull(&reference, None, "m").await
    }

    const LAYER: &[u8] = b"\0asm\x0d\0\x01\0 a component's bytes";

    #[tokio::test]
    async fn a_pull_verifies_both_digests_and_the_cache_then_answers_alone() {
        let (raw, digest) = artifact(LAYER, LAYER.len() as i64);
        let fake = Fake::start(serving(raw.clone(), LAYER.to_vec(), 0)).await;
        let reference = format!("{}/team/m@{digest}", fake.host());
        let cache = tempfile::tempdir().unwrap();
        // The size limit is the layer's exact size: at the limit is allowed.
        let registry = fake.registry(0, LAYER.len() as u64);
        let pulled = registry
            .pull(&reference, Some(cache.path()), "m")
            .await
            .unwrap();
        assert_eq!(pulled.bytes, LAYER);
        assert_eq!(pulled.sha256, hex::encode(Sha256::digest(LAYER)));
        assert_eq!(pulled.manifest_digest, digest);
        assert!(!pulled.cached);
        assert_eq!((fake.asked("manifests"), fake.asked("blobs")), (1, 1));
        let again = registry
            .pull(&reference, Some(cache.path()), "m")
            .await
            .unwrap();
        assert!(again.cached && again.bytes == LAYER);
        assert_eq!(fake.asked("manifests"), 1, "the cache answered alone");

        // A manifest other than the pinned one, and a layer other than the
        // manifest's, are refused and named.
        let (other, _) = artifact(b"\0asm other", 10);
        let err = pull_from(other, LAYER.to_vec(), &digest, 1 << 20)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the manifest has digest") && err.contains(&digest),
            "{err}"
        );
        let tampered = b"\0asm\x0d\0\x01\0 A component's bytes".to_vec();
        let err = pull_from(raw, tampered, &digest, 1 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::Digest { what, .. } if what.starts_with("layer")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn sizes_are_bounded_by_the_limit_and_by_what_the_manifest_declares() {
        // Declared over the limit: refused before the layer is asked for.
        let (raw, digest) = artifact(LAYER, LAYER.len() as i64);
        let fake = Fake::start(serving(raw, LAYER.to_vec(), 0)).await;
        let reference = format!("{}/team/m@{digest}", fake.host());
        let err = fake
            .registry(0, LAYER.len() as u64 - 1)
            .pull(&reference, None, "m")
            .await;
        assert!(
            matches!(err, Err(RegistryError::TooLarge { .. })),
            "{err:?}"
        );
        assert_eq!(fake.asked("blobs"), 0);

        // A layer that runs past its declared size, by one byte.
        let (raw, digest) = artifact(LAYER, LAYER.len() as i64 - 1);
        let err = pull_from(raw, LAYER.to_vec(), &digest, 1 << 20)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("runs past the")
                && err.contains("declares")
                && err.contains("/team/m@sha256:"),
            "{err}"
        );

        // No declared size: the limit bounds the stream, and a layer of
        // exactly the limit passes.
        let (raw, digest) = artifact(LAYER, 0);
        let limit = LAYER.len() as u64;
        let err = pull_from(raw.clone(), LAYER.to_vec(), &digest, limit - 1).await;
        let Err(RegistryError::TooLarge { size, .. }) = err else {
            panic!("{err:?}")
        };
        assert_eq!(size, limit, "the size seen so far");
        let pulled = pull_from(raw, LAYER.to_vec(), &digest, limit).await;
        assert_eq!(pulled.unwrap().bytes, LAYER);
    }

    #[tokio::test]
    async fn push_errors_are_classified_by_what_can_be_done_about_them() {
        use oci_client::errors::{OciEnvelope, OciError};
        let reference: Reference = "registry.example/team/m:1".parse().unwrap();
        let kind = |err| match classify("m", &reference, "layer", err) {
            RegistryError::Auth { registry, .. } => {
                assert_eq!(registry, "registry.example", "named for its credentials");
                "auth"
            }
            RegistryError::NotFound { .. } => "not found",
            RegistryError::Unavailable { .. } => "unavailable",
            RegistryError::Digest {
                what,
                expected,
                actual,
                ..
            } => {
                assert_eq!([what, expected, actual], ["layer", "sha256:a", "sha256:b"]);
                "digest"
            }
            RegistryError::Other { .. } => "other",
            other => panic!("{other:?}"),
        };
        let envelope = |code| OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: String::new(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "u".into(),
        };
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "u".into(),
            message: "said so".into(),
        };
        // Port 1 on loopback: nothing listens.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let refused = reqwest::Client::new()
            .get("http://127.0.0.1:1/")
            .send()
            .await
            .unwrap_err();
        let digest = DigestError::VerificationError {
            expected: "sha256:a".into(),
            actual: "sha256:b".into(),
        };
        for (err, want) in [
            (
                OciDistributionError::AuthenticationFailure("x".into()),
                "auth",
            ),
            (
                OciDistributionError::UnauthorizedError { url: "u".into() },
                "auth",
            ),
            (envelope(OciErrorCode::Denied), "auth"),
            (envelope(OciErrorCode::Unauthorized), "auth"),
            (envelope(OciErrorCode::ManifestUnknown), "not found"),
            (envelope(OciErrorCode::BlobUnknown), "not found"),
            (envelope(OciErrorCode::Toomanyrequests), "unavailable"),
            (envelope(OciErrorCode::Unsupported), "other"),
            (
                OciDistributionError::ImageManifestNotFoundError("x".into()),
                "not found",
            ),
            (server(500), "unavailable"),
            (server(503), "unavailable"),
            (server(429), "unavailable"),
            (server(499), "other"),
            (server(404), "not found"),
            (server(401), "auth"),
            (server(403), "auth"),
            (OciDistributionError::DigestError(digest), "digest"),
            (OciDistributionError::RequestError(refused), "unavailable"),
            (
                OciDistributionError::IoError(std::io::Error::other("disk")),
                "unavailable",
            ),
            (OciDistributionError::PushNoDataError, "other"),
        ] {
            let text = err.to_string();
            assert_eq!(kind(err), want, "{text}");
        }
    }

    /// A registry that asks for a bearer token from `/token` on itself
    /// (`realm`: its scheme and path) on the first ask of the manifest,
    /// and then serves it. Layers are served, whatever the token, unless
    /// `refuse_layer`: then their every ask gets the challenge again.
    async fn token_guarded(realm: &'static str, refuse_layer: bool) -> (Fake, String) {
        let (raw, digest) = artifact(LAYER, LAYER.len() as i64);
        let host: Arc<std::sync::OnceLock<String>> = Arc::default();
        let fake = Fake::start(Arc::new({
            let host = host.clone();
            move |path: &str, n| {
                if path.starts_with("/token") {
                    ok(br#"{"token": "t0k"}"#)
                } else if (path.contains("/manifests/") && n == 0)
                    || (refuse_layer && path.contains("/blobs/"))
                {
                    let realm = realm.replace("HOST", host.get().unwrap());
                    let mut challenge = status(401);
                    let value = format!("Bearer realm=\"{realm}\",service=\"reg\"");
                    challenge.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_str(&value).unwrap(),
                    );
                    challenge
                } else if path.contains("/manifests/") {
                    ok(&raw)
                } else {
                    ok(LAYER)
                }
            }
        }))
        .await;
        host.set(fake.host().to_owned()).unwrap();
        let reference = format!("{}/team/m@{digest}", fake.host());
        (fake, reference)
    }

    #[tokio::test]
    async fn a_bearer_challenge_is_answered_with_a_token_from_its_realm() {
        let (fake, reference) = token_guarded("http://HOST/token", false).await;
        let pulled = fake.pull(&reference, 0).await;
        assert_eq!(pulled.unwrap().bytes, LAYER);
        let asked = fake.0.asked();
        let sent = fake.0.authorizations();
        let token = asked.iter().position(|p| p.starts_with("/token")).unwrap();
        assert_eq!(
            asked[token], "/token?scope=repository%3Ateam%2Fm%3Apull&service=reg",
            "the pull scope of this repository, for the challenge's service"
        );
        assert_eq!(asked.iter().filter(|p| p.starts_with("/token")).count(), 1);
        // The manifest again, then the layer, both with the token.
        assert_eq!(asked.len(), 4, "{asked:?}");
        assert!(asked[token + 1].contains("/manifests/") && asked[token + 2].contains("/blobs/"));
        for after in &sent[token + 1..] {
            assert_eq!(after.as_deref(), Some("Bearer t0k"), "{asked:?} {sent:?}");
        }
        assert_eq!(sent[0], None, "nothing sent before the challenge");
    }

    #[tokio::test]
    async fn a_refused_token_or_a_realm_that_is_not_http_fails_as_auth_naming_the_reference() {
        // A realm of another scheme gets no credentials, nor any request.
        let (fake, reference) = token_guarded("ftp://HOST/token", false).await;
        let err = fake.pull(&reference, 0).await.unwrap_err();
        let RegistryError::Auth {
            reference: named, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert!(named.contains("team/m"), "{err}");
        assert!(err.to_string().contains("ftp://"), "{err}");
        assert!(fake.0.asked().iter().all(|p| !p.starts_with("/token")));

        // A token that the registry still refuses: one exchange, then the
        // refusal, naming the layer.
        let (fake, reference) = token_guarded("http://HOST/token", true).await;
        let err = fake.pull(&reference, 0).await.unwrap_err();
        assert!(matches!(err, RegistryError::Auth { .. }), "{err:?}");
        assert!(err.to_string().contains("layer"), "{err}");
        let tokens = fake
            .0
            .asked()
            .iter()
            .filter(|p| p.starts_with("/token"))
            .count();
        assert_eq!(tokens, 1, "a token is asked for once per pull");
    }

    #[tokio::test]
    async fn a_refusal_is_told_by_its_status() {
        let (_, digest) = artifact(LAYER, LAYER.len() as i64);
        for (code, want) in [
            (404, "not found"),
            (403, "auth"),
            (503, "unavailable"),
            (418, "other"),
        ] {
            let fake = Fake::start(Arc::new(move |_: &str, _| status(code))).await;
            let reference = format!("{}/team/m@{digest}", fake.host());
            let err = fake.pull(&reference, 0).await.unwrap_err();
            let got = match &err {
                RegistryError::NotFound { .. } => "not found",
                RegistryError::Auth { .. } => "auth",
                RegistryError::Unavailable { .. } => "unavailable",
                RegistryError::Other { .. } => "other",
                _ => "?",
            };
            assert_eq!(got, want, "{code}: {err}");
            assert!(
                err.to_string().contains("said so"),
                "the registry's words: {err}"
            );
        }
    }

    /// A writer into a buffer the test reads: the log lines of a pull.
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The progress lines of a pull of a layer declared as `declared`
    /// bytes (0: none), whose first 8 bytes come at once and the rest over
    /// a second later.
    async fn progress_of_a_slow_pull(declared: i64) -> Vec<String> {
        let (raw, digest) = artifact(LAYER, declared);
        let (first, rest) = LAYER.split_at(8);
        let (first, rest) = (first.to_vec(), rest.to_vec());
        let fake = Fake::start(Arc::new(move |path: &str, _| {
            if path.contains("/manifests/") {
                ok(&raw)
            } else {
                crate::testing::dripped(&first, Duration::from_millis(1100), &rest)
            }
        }))
        .await;
        let reference = format!("{}/team/m@{digest}", fake.host());
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let lines = lines.clone();
                move || lines.clone()
            })
            .with_ansi(false)
            .finish();
        // The pull runs on this thread (a current-thread runtime).
        let pulled = {
            let _logs = tracing::subscriber::set_default(subscriber);
            fake.pull(&reference, 0).await
        };
        assert_eq!(pulled.unwrap().bytes, LAYER);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter(|l| l.contains(" pulling "))
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test]
    async fn a_slow_layer_reports_its_progress_once_a_second() {
        // Over a second between its parts: one progress line, when the
        // rest arrives, with every byte so far.
        let len = LAYER.len();
        let progress = progress_of_a_slow_pull(len as i64).await;
        assert_eq!(progress.len(), 1, "{progress:?}");
        assert!(
            progress[0].contains(&format!("bytes={len} total={len} percent=100")),
            "{progress:?}"
        );
        // No declared size: no total to take a percentage of.
        let progress = progress_of_a_slow_pull(0).await;
        assert_eq!(progress.len(), 1, "{progress:?}");
        assert!(
            progress[0].contains(&format!("bytes={len} total=0"))
                && !progress[0].contains("percent"),
            "{progress:?}"
        );
    }

    #[tokio::test]
    async fn only_what_may_pass_is_retried_and_only_as_often_as_configured() {
        let (raw, digest) = artifact(LAYER, LAYER.len() as i64);
        // Two 503s, two retries: the third attempt is served, after the
        // backoff of 1 s and 2 s.
        let fake = Fake::start(serving(raw.clone(), LAYER.to_vec(), 2)).await;
        let reference = format!("{}/team/m@{digest}", fake.host());
        let started = std::time::Instant::now();
        let pulled = fake.pull(&reference, 2).await;
        assert_eq!(pulled.unwrap().bytes, LAYER);
        assert_eq!(fake.asked("manifests"), 3);
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "the backoff doubles from 1 s"
        );

        // One retry is not enough for two failures.
        let fake = Fake::start(serving(raw.clone(), LAYER.to_vec(), 2)).await;
        let reference = format!("{}/team/m@{digest}", fake.host());
        let err = fake.pull(&reference, 1).await.unwrap_err();
        assert!(matches!(err, RegistryError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(fake.asked("manifests"), 2);

        // Not found, or refused, is final at once.
        for (code, retried) in [(404, false), (403, false), (400, false), (429, true)] {
            let fake = Fake::start(Arc::new(move |_: &str, _| status(code))).await;
            let reference = format!("{}/team/m@{digest}", fake.host());
            let err = fake.pull(&reference, 1).await.unwrap_err();
            assert_eq!(
                fake.asked("manifests"),
                1 + usize::from(retried),
                "{code}: {err}"
            );
            assert!(err.to_string().contains("said so"), "{err}");
        }
    }

    #[test]
    fn the_one_wasm_layer_is_picked_among_others() {
        let d = format!("sha256:{}", "a".repeat(64));
        for media in WASM_LAYER_TYPES {
            let raw = manifest(&[
                ("application/vnd.fermyon.spin.application.v1+config", &d, 3),
                (media, &d, 9),
            ]);
            assert_eq!(wasm_layer("r", &raw).unwrap().size, 9);
        }
        let err = wasm_layer("r", &manifest(&[("text/plain", &d, 1)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no Wasm layer") && err.contains("text/plain"),
            "{err}"
        );
        let two = manifest(&[("application/wasm", &d, 1), ("application/wasm", &d, 1)]);
        assert!(
            wasm_layer("r", &two)
                .unwrap_err()
                .to_string()
                .contains("more than one")
        );
    }

    #[test]
    fn a_cache_that_cannot_be_written_costs_only_the_next_pull() {
        let dir = tempfile::tempdir().unwrap();
        // `downloads` is a file, so nothing can be stored below it (as on
        // a full or read-only volume).
        std::fs::write(dir.path().join("downloads"), b"").unwrap();
        let hex = "b".repeat(64);
        store_blob(dir.path(), &hex, b"bytes");
        assert!(cached_blob(dir.path(), &hex).is_none());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a temporary file was left"
        );
    }

    #[test]
    fn layer_and_manifest_digests_that_could_escape_the_cache_are_refused() {
        let cache = Path::new("/cache");
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:aa",
            "sha256:",
            "sha256:abc",
            &format!("sha256:{}/", "a".repeat(63)),
            &format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert!(layer_hex("r", bad).is_err(), "{bad}");
            assert_eq!(manifest_path(cache, bad), None, "{bad}");
        }
        let hex = "a".repeat(64);
        assert_eq!(
            manifest_path(cache, &format!("sha256:{hex}")),
            Some(cache.join("oci").join(format!("{hex}.json")))
        );
        assert_eq!(
            layer_hex("r", &format!("sha256:{}", "A".repeat(64))).unwrap(),
            "a".repeat(64)
        );
    }

    #[test]
    fn the_cache_serves_only_verified_content() {
        let dir = tempfile::tempdir().unwrap();
        let blob = b"\0asm component bytes".to_vec();
        let hex = hex::encode(Sha256::digest(&blob));
        let raw = manifest(&[(
            "application/wasm",
            &format!("sha256:{hex}"),
            blob.len() as i64,
        )]);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&raw)));
        let reference = parse(&format!("127.0.0.1:5000/team/m@{digest}")).unwrap();
        assert!(from_cache(dir.path(), &reference, &digest).is_none());
        store_blob(dir.path(), &hex, &blob);
        store_manifest(dir.path(), &digest, &raw);
        let hit = from_cache(dir.path(), &reference, &digest).unwrap();
        assert_eq!((hit.bytes, hit.cached), (blob.clone(), true));
        assert_eq!(hit.pinned, format!("127.0.0.1:5000/team/m@{digest}"));
        // A tampered blob, or a manifest that is not the pinned one, is a miss.
        std::fs::write(blob_path(dir.path(), &hex), b"tampered").unwrap();
        assert!(from_cache(dir.path(), &reference, &digest).is_none());
        store_blob(dir.path(), &hex, &blob);
        std::fs::write(manifest_path(dir.path(), &digest).unwrap(), b"{}").unwrap();
        assert!(from_cache(dir.path(), &reference, &digest).is_none());
    }
}
