use std::fmt;

/// What can go wrong in a module's calls to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The host's outbound policy refused the call: the destination is not
    /// in the module's `allowed_outbound_hosts`.
    Denied {
        /// The URL that was refused.
        url: String,
    },
    /// The call did not finish within the host's (or the request's) timeout.
    Timeout {
        /// The URL that timed out.
        url: String,
    },
    /// The host is failing calls to this upstream fast: its circuit breaker
    /// is open after repeated failures.
    Unavailable {
        /// The URL called.
        url: String,
    },
    /// The upstream could not be reached or answered badly.
    Upstream {
        /// The URL called.
        url: String,
        /// The `wasi:http` error code, as text.
        reason: String,
    },
    /// The URL or a header is not valid.
    InvalidRequest(String),
    /// Reading or writing a body failed.
    Io(String),
    /// A body is not the JSON that was expected.
    Json(String),
    /// The host failed to read configuration.
    Config(String),
}

/// A URL as errors show it: no userinfo, no query, no fragment. Error text
/// reaches clients (a handler's `Err` becomes the 500 body) and logs, and
/// a secret is often in the query (`?api_key=`) or the userinfo.
pub(crate) fn shown(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..cut];
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Denied { url } => write!(
                f,
                "outbound request to {} denied by the host: \
                 its destination is not in this module's allowed_outbound_hosts",
                shown(url)
            ),
            Error::Timeout { url } => write!(f, "outbound request to {} timed out", shown(url)),
            Error::Unavailable { url } => write!(
                f,
                "outbound request to {} failed fast: the upstream is failing and its circuit is open",
                shown(url)
            ),
            Error::Upstream { url, reason } => {
                write!(f, "outbound request to {} failed: {reason}", shown(url))
            }
            Error::InvalidRequest(m) => write!(f, "invalid request: {m}"),
            Error::Io(m) => write!(f, "body I/O failed: {m}"),
            Error::Json(m) => write!(f, "invalid JSON: {m}"),
            Error::Config(m) => write!(f, "config store failed: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Json(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_show_a_urls_userinfo_or_query() {
        let err = Error::Upstream {
            url: "https://svc:hunter2@example.com:8443/v1/x?api_key=SECRET#frag".into(),
            reason: "refused".into(),
        };
        let text = err.to_string();
        assert_eq!(
            text,
            "outbound request to https://example.com:8443/v1/x failed: refused"
        );
        for url in [
            "https://a@b/x?k=SECRET",
            "http://u:p@h",
            "h/p?SECRET",
            "x://@/?SECRET",
        ] {
            let text = Error::Denied { url: url.into() }.to_string();
            assert!(!text.contains("SECRET") && !text.contains("p@"), "{text}");
        }
    }
}
