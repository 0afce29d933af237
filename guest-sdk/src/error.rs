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

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Denied { url } => write!(
                f,
                "outbound request to {url} denied by the host: \
                 its destination is not in this module's allowed_outbound_hosts"
            ),
            Error::Timeout { url } => write!(f, "outbound request to {url} timed out"),
            Error::Unavailable { url } => write!(
                f,
                "outbound request to {url} failed fast: the upstream is failing and its circuit is open"
            ),
            Error::Upstream { url, reason } => {
                write!(f, "outbound request to {url} failed: {reason}")
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
