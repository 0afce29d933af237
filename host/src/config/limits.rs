//! `[defaults.limits]` and a module's `limits`: resource limits of each
//! request.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{ByteSize, MAX_REQUEST_DURATION, check_duration};
use super::{ConfigError, rejected};

/// Resource limits applied to each request of a module.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock budget of one request; over it the answer is 504.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Linear-memory cap of one instance; over it the answer is 500.
    pub memory: ByteSize,
    /// Requests served at once; more are shed with 503.
    pub max_concurrency: u32,
    /// Largest request body accepted; over it the answer is 413.
    pub max_body: ByteSize,
    /// Largest response body a module may send; past it the response is
    /// cut off (the head is already on its way, so the client sees an
    /// aborted body).
    pub max_response_body: ByteSize,
    /// Series the module's own metrics may create; more are dropped.
    pub metric_series: u32,
    /// Log lines per second the module may write (wasi:logging, stdout
    /// and stderr together), with bursts of up to five seconds' worth;
    /// more are dropped and counted.
    pub log_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            memory: ByteSize(128 << 20),
            max_concurrency: 1000,
            max_body: ByteSize(16 << 20),
            max_response_body: ByteSize(256 << 20),
            metric_series: 1000,
            log_rate: 200,
        }
    }
}

impl Limits {
    /// Limits (the defaults, or a module's taken over them), their keys
    /// named under `key`.
    pub(super) fn check(&self, key: &str) -> Result<(), ConfigError> {
        if self.timeout.is_zero() {
            return Err(rejected(format!("{key}.timeout"), "must be longer than 0s"));
        }
        if self.max_concurrency == 0 {
            return Err(rejected(
                format!("{key}.max_concurrency"),
                "must be at least 1",
            ));
        }
        if self.log_rate == 0 {
            return Err(rejected(format!("{key}.log_rate"), "must be at least 1"));
        }
        check_duration(
            &format!("{key}.timeout"),
            self.timeout,
            MAX_REQUEST_DURATION,
        )?;
        if self.memory.0 < 64 << 10 || self.memory.0 > 4 << 30 {
            return Err(rejected(
                format!("{key}.memory"),
                "must be between 64KiB (one wasm page) and 4GiB (a 32-bit memory)",
            ));
        }
        Ok(())
    }
}

/// Per-module overrides of [`Limits`]; unset fields inherit the defaults.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsOverride {
    /// See [`Limits::timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// See [`Limits::memory`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// See [`Limits::max_concurrency`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// See [`Limits::max_body`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body: Option<ByteSize>,
    /// See [`Limits::max_response_body`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_response_body: Option<ByteSize>,
    /// See [`Limits::metric_series`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric_series: Option<u32>,
    /// See [`Limits::log_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_rate: Option<u32>,
}

impl LimitsOverride {
    /// These overrides applied on top of `base`.
    pub fn over(&self, base: Limits) -> Limits {
        Limits {
            timeout: self.timeout.unwrap_or(base.timeout),
            memory: self.memory.unwrap_or(base.memory),
            max_concurrency: self.max_concurrency.unwrap_or(base.max_concurrency),
            max_body: self.max_body.unwrap_or(base.max_body),
            max_response_body: self.max_response_body.unwrap_or(base.max_response_body),
            metric_series: self.metric_series.unwrap_or(base.metric_series),
            log_rate: self.log_rate.unwrap_or(base.log_rate),
        }
    }
}
