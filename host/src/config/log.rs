//! `[log]`: logging switches.

use serde::{Deserialize, Serialize};

/// Logging switches.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// One log line per request with method, route, status and duration.
    pub access_log: bool,
    /// Replace query values of URLs in logs, spans and `/info` with
    /// `REDACTED` (they often carry tokens); userinfo is always dropped.
    pub redact_query: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            access_log: true,
            redact_query: true,
        }
    }
}
