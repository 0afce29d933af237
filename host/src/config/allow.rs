//! The allow-list syntax of `allowed_outbound_hosts`: which destinations a
//! module may call. Parsed once, when the config is validated; the
//! outbound layer only asks the parsed list.

use http::uri::Scheme;

/// How precisely a rule names a host. Loopback and link-local addresses
/// are only reachable through an exact rule: a wildcard must not open the
/// node's own services (or a cloud metadata endpoint) to a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Specificity {
    /// `*` or `*.example.com`.
    Wildcard,
    /// The host is named exactly.
    Exact,
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

    fn matches(&self, scheme: &Scheme, host: &str, port: u16) -> Option<Specificity> {
        if self.scheme.as_ref().is_some_and(|s| s != scheme) {
            return None;
        }
        let port_ok = match self.port {
            PortPattern::Any => true,
            PortPattern::Exact(p) => p == port,
            PortPattern::Default => port == default_port(scheme),
        };
        if !port_ok {
            return None;
        }
        match &self.host {
            HostPattern::Any => Some(Specificity::Wildcard),
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host).then_some(Specificity::Exact),
            HostPattern::Suffix(s) => (host.len() > s.len()
                && host[host.len() - s.len()..].eq_ignore_ascii_case(s))
            .then_some(Specificity::Wildcard),
        }
    }
}

/// A module's allow-list; empty denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<AllowRule>);

impl AllowList {
    /// Parses config entries; an error names the index of the bad one.
    pub fn parse(entries: &[String]) -> Result<Self, (usize, String)> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| AllowRule::parse(e).map_err(|reason| (i, reason)))
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    /// The most specific rule matching this destination, if any.
    pub fn matches(&self, scheme: &Scheme, host: &str, port: u16) -> Option<Specificity> {
        self.0
            .iter()
            .filter_map(|r| r.matches(scheme, host, port))
            .max()
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

/// 443 for https, 80 otherwise.
pub fn default_port(scheme: &Scheme) -> u16 {
    if *scheme == Scheme::HTTPS { 443 } else { 80 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[&str]) -> AllowList {
        AllowList::parse(&rules.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn check(l: &AllowList, uri: &str) -> Option<Specificity> {
        let uri: http::Uri = uri.parse().unwrap();
        let scheme = uri.scheme().cloned().unwrap();
        let host = uri
            .host()
            .unwrap()
            .trim_start_matches('[')
            .trim_end_matches(']');
        l.matches(
            &scheme,
            host,
            uri.port_u16().unwrap_or(default_port(&scheme)),
        )
    }

    #[test]
    fn empty_list_denies_everything() {
        let l = list(&[]);
        assert_eq!(check(&l, "http://example.com/"), None);
    }

    #[test]
    fn exact_host_default_port() {
        let l = list(&["https://api.example.com"]);
        assert_eq!(
            check(&l, "https://api.example.com/x"),
            Some(Specificity::Exact)
        );
        assert_eq!(
            check(&l, "https://API.example.com:443/x"),
            Some(Specificity::Exact)
        );
        assert_eq!(check(&l, "http://api.example.com/x"), None);
        assert_eq!(check(&l, "https://api.example.com:8443/x"), None);
        assert_eq!(check(&l, "https://evil.com/x"), None);
    }

    #[test]
    fn wildcards() {
        let l = list(&["http://*.svc.local:*", "*://127.0.0.1:8080"]);
        assert_eq!(
            check(&l, "http://orders.svc.local:9000/"),
            Some(Specificity::Wildcard)
        );
        assert_eq!(check(&l, "http://svc.local/"), None);
        assert_eq!(check(&l, "http://orders.svc.local.evil.com/"), None);
        assert_eq!(
            check(&l, "http://127.0.0.1:8080/"),
            Some(Specificity::Exact)
        );
        assert_eq!(
            check(&l, "https://127.0.0.1:8080/"),
            Some(Specificity::Exact)
        );
        assert_eq!(check(&l, "http://127.0.0.1:8081/"), None);
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let l = list(&["http://*:*", "http://localhost:8080"]);
        assert_eq!(
            check(&l, "http://localhost:8080/"),
            Some(Specificity::Exact)
        );
        assert_eq!(
            check(&l, "http://localhost:9/"),
            Some(Specificity::Wildcard)
        );
    }

    #[test]
    fn ipv6_literal() {
        let l = list(&["http://[::1]:8080"]);
        assert_eq!(check(&l, "http://[::1]:8080/"), Some(Specificity::Exact));
        assert_eq!(check(&l, "http://[::1]:80/"), None);
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
}
