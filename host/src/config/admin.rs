//! `[admin]`: the admin listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::shutdown::MAX_SHUTDOWN_STEP;
use super::values::{Secret, check_duration};
use super::{ConfigError, rejected};

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin endpoints; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The bearer token that state-changing endpoints (`POST /admin/...`)
    /// require. Without it (or `token_file`) those endpoints are off.
    /// `BERTH_ADMIN__TOKEN` sets it from the environment.
    pub token: Option<Secret>,
    /// A file holding the token (a mounted Secret), read on every use so a
    /// rotated Secret takes effect at once. Wins over `token`.
    pub token_file: Option<PathBuf>,
    /// How long the traffic side may make no progress (its runtime's
    /// heartbeat, or a write of the log writer) before `/healthz` fails.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            token: None,
            token_file: None,
            stall_timeout: Duration::from_secs(10),
        }
    }
}

impl AdminConfig {
    /// What types alone cannot check in `[admin]`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.token.as_ref().is_some_and(|t| t.0.0.trim().is_empty()) {
            return Err(rejected("admin.token", "must not be empty"));
        }
        check_duration("admin.stall_timeout", self.stall_timeout, MAX_SHUTDOWN_STEP)?;
        if self.stall_timeout < Duration::from_secs(1) {
            return Err(rejected("admin.stall_timeout", "must be at least 1s"));
        }
        Ok(())
    }
}
