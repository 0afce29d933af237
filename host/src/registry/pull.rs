//! The HTTP side of a pull: the manifest, the layer, and the token
//! exchange of the distribution spec, with every body read under a bound.
//!
//! Pulls do not go through oci-client, for two reasons found by attacking
//! it: it reads manifests, token answers and error bodies whole before any
//! limit can be applied (a hostile registry, or a man in the middle of an
//! `insecure_registries` host, could take a pod's memory with one answer),
//! and it keeps the first credentials it sees for each registry for the
//! life of the client, so a rotated Secret took effect only at a restart.
//! Here each pull starts from the credentials as they are now, and reads
//! at most [`MAX_MANIFEST`] of a manifest, [`MAX_TOKEN`] of a token answer
//! and [`MAX_ERROR`] of an error body. The protocol is the small part of the
//! distribution spec a pull needs: a GET, and on a 401 either Basic
//! credentials or a bearer token from the challenge's realm (what Docker,
//! containerd and oci-client do). Pushes, which run in the CLI under the
//! operator's eye, still use oci-client.

use std::time::Duration;

use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};

use super::RegistryError;

/// Largest manifest accepted (the distribution registry's own limit is 4 MiB).
pub(super) const MAX_MANIFEST: usize = 4 << 20;
/// Largest token answer read.
const MAX_TOKEN: usize = 64 << 10;
/// Most of an error body kept: enough for the registry's error envelope;
/// this text reaches logs and the admin port.
pub(super) const MAX_ERROR: usize = 1 << 10;

/// The registries' HTTP client, shared by every pull.
pub(super) struct Http {
    client: reqwest::Client,
    insecure: Vec<String>,
}

impl Http {
    pub(super) fn new(
        extra_roots: &[u8],
        insecure: Vec<String>,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(connect_timeout)
            .read_timeout(connect_timeout.max(Duration::from_secs(30)));
        if !extra_roots.is_empty() {
            let certs = reqwest::Certificate::from_pem_bundle(extra_roots)
                .map_err(|e| format!("registry.ca_file: {e}"))?;
            builder = builder.tls_certs_merge(certs);
        }
        Ok(Http {
            client: builder.build().map_err(|e| e.to_string())?,
            insecure,
        })
    }

    fn scheme(&self, registry: &str) -> &'static str {
        if self.insecure.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        }
    }

    /// A pull's session with the registry of `reference`, with `auth` as
    /// read for this pull.
    pub(super) fn session<'a>(
        &'a self,
        reference: &'a Reference,
        auth: RegistryAuth,
    ) -> Session<'a> {
        Session {
            http: self,
            reference,
            auth,
            authorization: None,
        }
    }
}

/// Requests of one pull, sharing the authorization the first 401 asked for.
pub(super) struct Session<'a> {
    http: &'a Http,
    reference: &'a Reference,
    auth: RegistryAuth,
    /// The `Authorization` value to send, once a challenge asked for one.
    authorization: Option<String>,
}

impl Session<'_> {
    /// The reference, for errors and logs.
    pub(super) fn name(&self) -> String {
        self.reference.whole()
    }

    fn url(&self, kind: &str, id: &str) -> String {
        let registry = self.reference.resolve_registry();
        format!(
            "{}://{registry}/v2/{}/{kind}/{id}",
            self.http.scheme(registry),
            self.reference.repository()
        )
    }

    /// The manifest the reference names, read whole up to [`MAX_MANIFEST`].
    pub(super) async fn manifest(&mut self, accept: &[&str]) -> Result<Vec<u8>, RegistryError> {
        let id = self
            .reference
            .digest()
            .or(self.reference.tag())
            .unwrap_or("latest")
            .to_owned();
        let url = self.url("manifests", &id);
        let response = self.get(&url, &accept.join(", "), "the manifest").await?;
        match read_upto(response, MAX_MANIFEST).await {
            Ok((body, true)) => Ok(body),
            Ok((_, false)) => Err(RegistryError::NotWasm {
                reference: self.reference.whole(),
                reason: format!(
                    "the manifest is more than {MAX_MANIFEST} bytes, more than any Wasm artifact's"
                ),
            }),
            Err(e) => Err(self.broke_off("the manifest", &e)),
        }
    }

    /// The layer `digest`, as a response whose body the caller streams.
    pub(super) async fn blob(&mut self, digest: &str) -> Result<Response, RegistryError> {
        let url = self.url("blobs", digest);
        self.get(&url, "*/*", &format!("layer {digest}")).await
    }

    /// GET `url`, answering one 401 challenge; a failure status is an error
    /// naming `what`.
    async fn get(
        &mut self,
        url: &str,
        accept: &str,
        what: &str,
    ) -> Result<Response, RegistryError> {
        let mut response = self.send(url, accept).await?;
        if response.status() == StatusCode::UNAUTHORIZED && self.authorization.is_none() {
            let challenge = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(authorization) = self.answer(challenge.as_deref()).await? {
                self.authorization = Some(authorization);
                response = self.send(url, accept).await?;
            }
        }
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.refused(what, response).await)
    }

    async fn send(&self, url: &str, accept: &str) -> Result<Response, RegistryError> {
        let mut request = self.http.client.get(url).header(ACCEPT, accept);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization);
        } else if let RegistryAuth::Bearer(token) = &self.auth {
            // An identity token from the config: sent as it is.
            request = request.bearer_auth(token);
        }
        request.send().await.map_err(|e| self.unreachable(&e))
    }

    /// The `Authorization` a 401's challenge asks for, when the
    /// credentials can give it.
    async fn answer(&self, challenge: Option<&str>) -> Result<Option<String>, RegistryError> {
        let Some(challenge) = challenge else {
            return Ok(None);
        };
        let challenges = http_auth::parse_challenges(challenge).unwrap_or_default();
        let param = |c: &http_auth::ChallengeRef, name: &str| {
            c.params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        if let Some(bearer) = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
            && let Some(realm) = param(bearer, "realm")
        {
            let service = param(bearer, "service");
            return self.token(&realm, service.as_deref()).await.map(Some);
        }
        if challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
            && let RegistryAuth::Basic(user, password) = &self.auth
        {
            use base64::Engine as _;
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            return Ok(Some(format!("Basic {pair}")));
        }
        Ok(None)
    }

    /// A pull token from `realm` (the distribution spec's token exchange).
    async fn token(&self, realm: &str, service: Option<&str>) -> Result<String, RegistryError> {
        // Credentials go to the realm the registry names: only over TLS,
        // unless the registry itself is plain HTTP by the operator's word.
        let registry = self.reference.resolve_registry();
        let plain_ok = self.http.scheme(registry) == "http";
        if !(realm.starts_with("https://") || (plain_ok && realm.starts_with("http://"))) {
            return Err(
                self.auth_error(format!("its token realm `{realm}` is not an https:// URL"))
            );
        }
        let scope = format!("repository:{}:pull", self.reference.repository());
        let mut query = vec![("scope", scope.as_str())];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let mut request = self.http.client.get(realm).query(&query);
        if let RegistryAuth::Basic(user, password) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        if !response.status().is_success() {
            return Err(self.refused("a token", response).await);
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = match read_upto(response, MAX_TOKEN).await {
            Ok((body, true)) => body,
            Ok((_, false)) => {
                return Err(self.auth_error(format!("its token answer is over {MAX_TOKEN} bytes")));
            }
            Err(e) => return Err(self.broke_off("a token", &e)),
        };
        let token: Token = serde_json::from_slice(&body)
            .map_err(|_| self.auth_error("its token answer is not the token JSON".into()))?;
        token
            .token
            .or(token.access_token)
            .map(|t| format!("Bearer {t}"))
            .ok_or_else(|| self.auth_error("its token answer holds no token".into()))
    }

    fn auth_error(&self, detail: String) -> RegistryError {
        RegistryError::Auth {
            reference: self.reference.whole(),
            registry: self.reference.resolve_registry().to_owned(),
            detail,
        }
    }

    /// A failure status, with at most [`MAX_ERROR`] of what the registry
    /// said (its error envelope's messages when it sent one).
    async fn refused(&self, what: &str, response: Response) -> RegistryError {
        let status = response.status();
        // Its start, however long it is; the rest is never read.
        let start = read_upto(response, MAX_ERROR).await.unwrap_or_default().0;
        let said = said(&start);
        let detail = format!(
            "{what}: {status}{}",
            if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            }
        );
        let reference = self.reference.whole();
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => self.auth_error(detail),
            StatusCode::NOT_FOUND => RegistryError::NotFound { reference, detail },
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                RegistryError::Unavailable { reference, detail }
            }
            _ => RegistryError::Other { reference, detail },
        }
    }

    fn unreachable(&self, err: &reqwest::Error) -> RegistryError {
        let registry = self.reference.resolve_registry();
        let chain = super::error_chain(err);
        // rustls's words for an answer that is not TLS at all.
        let hint = if chain.contains("InvalidContentType") {
            "; it does not speak TLS: list it in registry.insecure_registries \
             (or pass --insecure-registry to the CLI) if it is plain HTTP"
        } else {
            ""
        };
        RegistryError::Unavailable {
            reference: self.reference.whole(),
            detail: format!("cannot reach {registry}: {chain}{hint}"),
        }
    }

    fn broke_off(&self, what: &str, err: &reqwest::Error) -> RegistryError {
        RegistryError::Unavailable {
            reference: self.reference.whole(),
            detail: format!("{what} broke off: {}", super::error_chain(err)),
        }
    }
}

/// At most `limit` bytes of the body of `response`, and whether that was
/// all of it: what is read is bounded, whatever the response declares.
async fn read_upto(
    mut response: Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// What a registry's error body says, on one line: the messages of its
/// error envelope, or its text, cut to [`MAX_ERROR`].
fn said(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    let text = match serde_json::from_slice::<Envelope>(body) {
        Ok(envelope) => envelope
            .errors
            .iter()
            .map(|e| {
                format!(
                    "{}{}",
                    e.code.as_deref().unwrap_or(""),
                    e.message
                        .as_deref()
                        .map(|m| format!(" {m}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::telemetry::truncate(line.trim(), MAX_ERROR)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::testing::{Peer, dripped, ok};

    #[tokio::test]
    async fn at_most_the_limit_is_read_and_a_longer_body_is_told_apart() {
        // "/6" comes in two parts, "hel" and then "lo!".
        let peer = Peer::start(Arc::new(|path: &str, _| match path {
            "/5" => ok(b"hello"),
            _ => dripped(b"hel", Duration::from_millis(50), b"lo!"),
        }))
        .await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let read = |path: &'static str, limit| {
            let url = format!("http://{}{path}", peer.host);
            async move {
                read_upto(reqwest::get(url).await.unwrap(), limit)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            read("/5", 5).await,
            (b"hello".to_vec(), true),
            "exactly the limit"
        );
        assert_eq!(read("/6", 5).await, (b"hello".to_vec(), false));
        assert_eq!(read("/6", 6).await, (b"hello!".to_vec(), true));
    }

    #[test]
    fn error_bodies_are_cut_and_kept_on_one_line() {
        let envelope = br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#;
        assert_eq!(
            said(envelope),
            "DENIED requested access to the resource is denied"
        );
        let long = "x\n".repeat(10_000);
        let cut = said(long.as_bytes());
        assert!(cut.len() <= MAX_ERROR + 4, "{}", cut.len());
        assert!(!cut.contains('\n'));
    }
}
