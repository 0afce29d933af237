//! `[defaults.outbound]`, a module's `outbound` and `[upstreams]`: the
//! policy of a guest's outbound calls, and its overrides.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{ByteSize, MAX_REQUEST_DURATION, check_duration};
use super::{ConfigError, rejected};

/// How the host makes a guest's outbound calls.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// DNS, TCP connect and TLS handshake.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// From sending a request to the response head, per attempt.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest gap between two chunks of a response body.
    #[serde(with = "humantime_serde")]
    pub between_bytes_timeout: Duration,
    /// The whole call to the response head, retries and back-off included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries after the first attempt (connect errors always; 502, 503 and
    /// 504 for idempotent methods).
    pub retries: u32,
    /// First back-off; doubles each retry, with full jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest back-off.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Retries allowed as a share of calls per upstream (0.2 = 20%), on top
    /// of a reserve of one retry per second.
    pub retry_budget: f32,
    /// Also retry non-idempotent methods (POST, PATCH) on 502/503/504.
    pub retry_non_idempotent: bool,
    /// Largest request body the host buffers so it can replay it; larger
    /// bodies are streamed and never retried.
    pub max_retry_body: ByteSize,
    /// Circuit breaker per upstream.
    pub circuit_breaker: BreakerConfig,
    /// Speak HTTP/2 with prior knowledge (h2c) on cleartext `http://`
    /// calls, for upstreams known to serve it (a gRPC server in the
    /// cluster). Calls over TLS choose HTTP/2 or 1.1 by ALPN whatever this
    /// says.
    pub h2c: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(10),
            between_bytes_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            retries: 2,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(2),
            retry_budget: 0.2,
            retry_non_idempotent: false,
            max_retry_body: ByteSize(64 << 10),
            circuit_breaker: BreakerConfig::default(),
            h2c: false,
        }
    }
}

impl OutboundConfig {
    /// An outbound policy (the defaults, or a module's or an upstream's
    /// taken over them), its keys named under `key`.
    pub(super) fn check(&self, key: &str) -> Result<(), ConfigError> {
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("first_byte_timeout", self.first_byte_timeout),
            ("between_bytes_timeout", self.between_bytes_timeout),
            ("timeout", self.timeout),
        ] {
            if d.is_zero() {
                return Err(rejected(format!("{key}.{name}"), "must be longer than 0s"));
            }
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("first_byte_timeout", self.first_byte_timeout),
            ("between_bytes_timeout", self.between_bytes_timeout),
            ("timeout", self.timeout),
            ("retry_backoff", self.retry_backoff),
            ("retry_backoff_max", self.retry_backoff_max),
            ("circuit_breaker.open_for", self.circuit_breaker.open_for),
        ] {
            check_duration(&format!("{key}.{name}"), d, MAX_REQUEST_DURATION)?;
        }
        if !(0.0..=10.0).contains(&self.retry_budget) {
            return Err(rejected(
                format!("{key}.retry_budget"),
                "must be a share between 0 and 10 (0.2 = 20% of calls)",
            ));
        }
        if self.circuit_breaker.failures > 0 && self.circuit_breaker.half_open_probes == 0 {
            return Err(rejected(
                format!("{key}.circuit_breaker.half_open_probes"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit; 0 disables the breaker.
    pub failures: u32,
    /// How long the circuit stays open before probes are let through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Calls let through at once while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }
}

/// Partial [`OutboundConfig`], for per-module and per-upstream overrides.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundOverride {
    /// See [`OutboundConfig::connect_timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// See [`OutboundConfig::first_byte_timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub first_byte_timeout: Option<Duration>,
    /// See [`OutboundConfig::between_bytes_timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub between_bytes_timeout: Option<Duration>,
    /// See [`OutboundConfig::timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// See [`OutboundConfig::retries`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// See [`OutboundConfig::retry_backoff`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub retry_backoff: Option<Duration>,
    /// See [`OutboundConfig::retry_backoff_max`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub retry_backoff_max: Option<Duration>,
    /// See [`OutboundConfig::retry_budget`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<f32>,
    /// See [`OutboundConfig::retry_non_idempotent`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_non_idempotent: Option<bool>,
    /// See [`OutboundConfig::max_retry_body`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retry_body: Option<ByteSize>,
    /// See [`OutboundConfig::circuit_breaker`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerConfig>,
    /// See [`OutboundConfig::h2c`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2c: Option<bool>,
}

impl OutboundOverride {
    /// These overrides applied on top of `base`.
    pub fn over(&self, base: OutboundConfig) -> OutboundConfig {
        OutboundConfig {
            connect_timeout: self.connect_timeout.unwrap_or(base.connect_timeout),
            first_byte_timeout: self.first_byte_timeout.unwrap_or(base.first_byte_timeout),
            between_bytes_timeout: self
                .between_bytes_timeout
                .unwrap_or(base.between_bytes_timeout),
            timeout: self.timeout.unwrap_or(base.timeout),
            retries: self.retries.unwrap_or(base.retries),
            retry_backoff: self.retry_backoff.unwrap_or(base.retry_backoff),
            retry_backoff_max: self.retry_backoff_max.unwrap_or(base.retry_backoff_max),
            retry_budget: self.retry_budget.unwrap_or(base.retry_budget),
            retry_non_idempotent: self
                .retry_non_idempotent
                .unwrap_or(base.retry_non_idempotent),
            max_retry_body: self.max_retry_body.unwrap_or(base.max_retry_body),
            circuit_breaker: self.circuit_breaker.unwrap_or(base.circuit_breaker),
            h2c: self.h2c.unwrap_or(base.h2c),
        }
    }
}

/// The `[upstreams]` overrides, each applied over `base` (the defaults).
pub(super) fn check_upstreams(
    upstreams: &BTreeMap<String, OutboundOverride>,
    base: OutboundConfig,
) -> Result<(), ConfigError> {
    for (upstream, o) in upstreams {
        let key = format!("upstreams.\"{upstream}\"");
        if let Some(why) = upstream_key_problem(upstream) {
            return Err(rejected(key, why));
        }
        o.over(base).check(&key)?;
    }
    Ok(())
}

/// Why `key` can never name an upstream, if it cannot. Calls are matched
/// by host and port as the host spells them after normalising (lower
/// case, ASCII, no trailing dot, IPv6 in brackets), so a key spelled
/// otherwise would be silently ignored.
fn upstream_key_problem(key: &str) -> Option<&'static str> {
    let Ok(authority) = key.parse::<http::uri::Authority>() else {
        return Some("an upstream key is `host:port`, without scheme or path");
    };
    let port = authority.port_u16();
    if authority.as_str() != key
        || key.contains('@')
        || port.is_none()
        // Calls are matched by the port number: `080` would never match.
        || port.map(|p| p.to_string()) != authority.port().map(|p| p.as_str().to_owned())
    {
        return Some("an upstream key is `host:port`, with the port (`orders.default.svc:8080`)");
    }
    let host = authority.host();
    let canonical = match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        Ok(ip) => ip.to_string(),
        Err(_) => idna::domain_to_ascii(host).unwrap_or_default(),
    };
    if canonical != host || host.ends_with('.') {
        return Some(
            "an upstream's host is written as calls are matched: a name in lower case, \
             punycode for other scripts, no trailing dot; an address in its shortest form",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::upstream_key_problem;

    #[test]
    fn upstream_keys_are_written_as_calls_are_matched() {
        for good in [
            "orders.default.svc:8080",
            "127.0.0.1:50051",
            "[::1]:443",
            "xn--bcher-kva.example:443",
        ] {
            assert_eq!(upstream_key_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "http://orders:80",
            "orders:80/path",
            "orders",
            "[::1]",
            "user@orders:80",
            "Orders.svc:80",
            "orders.svc.:80",
            "orders:080",
            "[0:0::1]:443",
            "xn--bcher-kva.EXAMPLE:443",
            "bücher.example:443",
        ] {
            assert!(upstream_key_problem(bad).is_some(), "{bad:?} accepted");
        }
    }
}
