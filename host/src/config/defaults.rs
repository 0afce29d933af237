//! `[defaults]`: the limits and outbound policy every module inherits.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::limits::Limits;
use super::outbound::OutboundConfig;

/// Settings every module inherits.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    /// Resource limits for each request.
    pub limits: Limits,
    /// Policy of outbound calls.
    pub outbound: OutboundConfig,
}

impl Defaults {
    /// The default limits and outbound policy, each checked as a module's
    /// would be.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        self.limits.check("defaults.limits")?;
        self.outbound.check("defaults.outbound")
    }
}
