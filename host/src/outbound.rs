//! Outbound HTTP of guests: every `wasi:http/outgoing-handler` call passes
//! through [`OutboundHooks::send_request`], which applies the module's
//! allow-list (deny by default) and the host's timeouts before anything
//! leaves the process.

use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{RequestOptions, WasiHttpHooks};

/// Host caps on a guest's outbound timeouts. A guest may ask for shorter
/// ones through `request-options`, never for longer.
#[derive(Debug, Clone, Copy)]
pub struct OutboundTimeouts {
    /// DNS, TCP connect and HTTP handshake.
    pub connect: Duration,
    /// From sending the request to the first byte of the response.
    pub first_byte: Duration,
    /// Gap allowed between two chunks of the response body.
    pub between_bytes: Duration,
}

impl Default for OutboundTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            first_byte: Duration::from_secs(10),
            between_bytes: Duration::from_secs(10),
        }
    }
}

impl OutboundTimeouts {
    /// The guest's wishes, capped by the host.
    fn cap(&self, guest: Option<RequestOptions>) -> RequestOptions {
        let g = guest.unwrap_or_default();
        let min = |asked: Option<Duration>, cap: Duration| Some(asked.map_or(cap, |a| a.min(cap)));
        RequestOptions {
            connect_timeout: min(g.connect_timeout, self.connect),
            first_byte_timeout: min(g.first_byte_timeout, self.first_byte),
            between_bytes_timeout: min(g.between_bytes_timeout, self.between_bytes),
        }
    }
}

/// One entry of `allowed_outbound_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    scheme: Option<Scheme>,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
    Exact(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Any,
    /// No port given: the scheme's default port.
    Default,
    Exact(u16),
}

impl AllowRule {
    /// Parses `scheme://host[:port]`, where scheme is `http`, `https` or `*`,
    /// host may be `*` or start with `*.`, and port may be `*`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("`{text}` is not of the form scheme://host[:port]"))?;
        let scheme = match scheme {
            "*" => None,
            "http" => Some(Scheme::HTTP),
            "https" => Some(Scheme::HTTPS),
            other => return Err(format!("unsupported scheme `{other}` in `{text}`")),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(format!("`{text}` must not have a path"));
        }
        let (host, port) = split_host_port(rest);
        let port = match port {
            None => PortPattern::Default,
            Some("*") => PortPattern::Any,
            Some(p) => PortPattern::Exact(
                p.parse()
                    .map_err(|_| format!("invalid port `{p}` in `{text}`"))?,
            ),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            HostPattern::Suffix(format!(".{suffix}"))
        } else if host.is_empty() || host.contains('*') {
            return Err(format!("invalid host `{host}` in `{text}`"));
        } else {
            HostPattern::Exact(host)
        };
        Ok(AllowRule { scheme, host, port })
    }

    fn allows(&self, scheme: &Scheme, host: &str, port: u16) -> bool {
        if self.scheme.as_ref().is_some_and(|s| s != scheme) {
            return false;
        }
        let port_ok = match self.port {
            PortPattern::Any => true,
            PortPattern::Exact(p) => p == port,
            PortPattern::Default => port == default_port(scheme),
        };
        port_ok
            && match &self.host {
                HostPattern::Any => true,
                HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
                HostPattern::Suffix(s) => {
                    host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
                }
            }
    }
}

fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: `[::1]:8080`
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':'));
        }
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (authority, None),
    }
}

fn default_port(scheme: &Scheme) -> u16 {
    if *scheme == Scheme::HTTPS { 443 } else { 80 }
}

/// A module's outbound policy, shared by all its instances.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    /// The allow-list; empty denies everything.
    pub allow: Vec<AllowRule>,
    /// Timeout caps.
    pub timeouts: OutboundTimeouts,
}

impl OutboundPolicy {
    /// Builds a policy from config entries already checked by validation.
    pub fn from_config(entries: &[String]) -> Result<Self, String> {
        Ok(Self {
            allow: entries
                .iter()
                .map(|e| AllowRule::parse(e))
                .collect::<Result<_, _>>()?,
            timeouts: OutboundTimeouts::default(),
        })
    }

    /// Whether a request to this URI may leave the host.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let Some(host) = uri.host() else { return false };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or_else(|| default_port(&scheme));
        self.allow.iter().any(|r| r.allows(&scheme, host, port))
    }
}

/// The per-store hook object wasmtime-wasi-http calls for outbound requests.
pub struct OutboundHooks {
    /// The module's policy.
    pub policy: Arc<OutboundPolicy>,
    /// The module name, for logs.
    pub module: Arc<str>,
}

type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<HyperOutgoingBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(http::Response<HyperOutgoingBody>, IoFuture)>,
            > + Send,
    > {
        let policy = self.policy.clone();
        let module = self.module.clone();
        Box::new(async move {
            if !policy.allows(request.uri()) {
                tracing::warn!(
                    module = &*module,
                    uri = %request.uri(),
                    "outbound request denied: destination not in allowed_outbound_hosts"
                );
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            }
            let options = policy.timeouts.cap(options);
            let (resp, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                resp.map(http_body_util::BodyExt::boxed_unsync),
                Box::new(io) as IoFuture,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str]) -> OutboundPolicy {
        OutboundPolicy::from_config(&rules.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    fn allows(p: &OutboundPolicy, uri: &str) -> bool {
        p.allows(&uri.parse().unwrap())
    }

    #[test]
    fn empty_list_denies_everything() {
        let p = policy(&[]);
        assert!(!allows(&p, "http://example.com/"));
        assert!(!allows(&p, "http://127.0.0.1/"));
    }

    #[test]
    fn exact_host_default_port() {
        let p = policy(&["https://api.example.com"]);
        assert!(allows(&p, "https://api.example.com/x"));
        assert!(allows(&p, "https://API.example.com:443/x"));
        assert!(!allows(&p, "http://api.example.com/x"));
        assert!(!allows(&p, "https://api.example.com:8443/x"));
        assert!(!allows(&p, "https://evil.com/x"));
    }

    #[test]
    fn wildcards() {
        let p = policy(&["http://*.svc.local:*", "*://127.0.0.1:8080"]);
        assert!(allows(&p, "http://orders.svc.local:9000/"));
        assert!(!allows(&p, "http://svc.local/"));
        assert!(!allows(&p, "http://orders.svc.local.evil.com/"));
        assert!(allows(&p, "http://127.0.0.1:8080/"));
        assert!(allows(&p, "https://127.0.0.1:8080/"));
        assert!(!allows(&p, "http://127.0.0.1:8081/"));
    }

    #[test]
    fn ipv6_literal() {
        let p = policy(&["http://[::1]:8080"]);
        assert!(allows(&p, "http://[::1]:8080/"));
        assert!(!allows(&p, "http://[::1]:80/"));
    }

    #[test]
    fn bad_rules_are_rejected_with_the_reason() {
        assert!(
            AllowRule::parse("example.com")
                .unwrap_err()
                .contains("scheme://")
        );
        assert!(AllowRule::parse("ftp://x").unwrap_err().contains("ftp"));
        assert!(
            AllowRule::parse("http://x:port")
                .unwrap_err()
                .contains("port")
        );
        assert!(AllowRule::parse("http://a*b").is_err());
        assert!(AllowRule::parse("http://x/path").is_err());
    }

    #[test]
    fn guest_timeouts_are_capped() {
        let t = OutboundTimeouts::default();
        let asked = RequestOptions {
            connect_timeout: Some(Duration::from_secs(600)),
            first_byte_timeout: Some(Duration::from_millis(5)),
            between_bytes_timeout: None,
        };
        let got = t.cap(Some(asked));
        assert_eq!(got.connect_timeout, Some(t.connect));
        assert_eq!(got.first_byte_timeout, Some(Duration::from_millis(5)));
        assert_eq!(got.between_bytes_timeout, Some(t.between_bytes));
    }
}
