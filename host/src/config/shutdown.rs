//! `[shutdown]`: graceful shutdown timings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::values::check_duration;

/// Graceful shutdown on SIGTERM/SIGINT.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long traffic is still served after `/ready` turns 503, while
    /// Kubernetes removes the pod from its endpoints.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish once the listener is
    /// closed; what is left then is cancelled.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            grace_period: Duration::from_secs(25),
        }
    }
}

/// The longest drain delay or grace period: Kubernetes kills the pod long
/// before.
pub(super) const MAX_SHUTDOWN_STEP: Duration = Duration::from_secs(3600);

impl ShutdownConfig {
    /// What types alone cannot check in `[shutdown]`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        check_duration("shutdown.drain_delay", self.drain_delay, MAX_SHUTDOWN_STEP)?;
        check_duration(
            "shutdown.grace_period",
            self.grace_period,
            MAX_SHUTDOWN_STEP,
        )
    }
}
