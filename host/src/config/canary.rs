//! `[modules.NAME.canary]`: a module's canary release.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::source::SourceFields;
use super::values::{SourceUrl, check_duration};
use super::{ConfigError, rejected};

/// A canary release of a module (`[modules.NAME.canary]`): a second
/// version that serves a growing share of the module's requests, step by
/// step, while each step's window of its figures is judged against the
/// thresholds and the stable version's. It runs with the module's route,
/// config, secrets, limits and outbound policy; only the code differs.
///
/// The thresholds follow Flagger's built-in checks: success rate (share of
/// answers that are not 5xx: guest traps, timeouts, memory-limit hits and
/// shed requests all count as failures) and p99 latency.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The new version's file, relative to `runtime.modules_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Or: where to download it; requires `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<SourceUrl>,
    /// Or: its OCI reference, pinned by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    /// Let `oci` be a tag without a digest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_tags: bool,
    /// The hex sha256 the component must have (required with `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The canary's share of requests at each step, in percent, rising.
    /// After the last step passes, the canary is promoted.
    #[serde(default = "CanaryConfig::default_steps")]
    pub steps: Vec<u8>,
    /// How long each step runs before its window is judged.
    #[serde(default = "CanaryConfig::default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Least share of non-5xx answers, in percent, the canary must keep.
    #[serde(default = "CanaryConfig::default_success_rate")]
    pub min_success_rate: f64,
    /// Most the canary's p99 latency may be.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_p99: Option<Duration>,
    /// Most the canary's p99 may be as a multiple of the stable version's
    /// in the same window (judged when the stable version served at least
    /// `min_requests` in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// Failed judgements in a row before the canary is rolled back.
    #[serde(default = "CanaryConfig::default_max_failures")]
    pub max_failures: u32,
    /// Requests the canary must serve in a window for it to be judged;
    /// with fewer, the step waits for the next window.
    #[serde(default = "CanaryConfig::default_min_requests")]
    pub min_requests: u64,
    /// Send every request with the same key to the same version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// Judge on the whole fleet's figures from Prometheus, so that every
    /// replica reaches the same verdict; without it each replica judges
    /// its own traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
}

/// `[modules.NAME.canary.analysis]`: fleet-wide analysis. Every replica
/// asks Prometheus the same questions about the same closed window of wall
/// clock time, and reads the fleet's verdicts from the series the replicas
/// export (`berth_canary_fleet_state`, `berth_canary_fleet_step`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// The Prometheus server's base URL (`http://prometheus.monitoring:9090`).
    pub prometheus: SourceUrl,
    /// Label matchers (exact values) that select this fleet's series and no
    /// other's: e.g. `{namespace = "shop", job = "shop/shop-berth"}`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// How often Prometheus scrapes the pods. A window is judged two scrape
    /// intervals after it closes, when every replica's last samples of it
    /// are in.
    #[serde(
        default = "Analysis::default_scrape_interval",
        with = "humantime_serde"
    )]
    pub scrape_interval: Duration,
    /// A file holding a bearer token for Prometheus (read on every query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    /// How long the canary holds while Prometheus cannot answer before it
    /// rolls back.
    #[serde(
        default = "Analysis::default_unavailable_for",
        with = "humantime_serde"
    )]
    pub rollback_after_unavailable: Duration,
}

impl Analysis {
    fn default_scrape_interval() -> Duration {
        Duration::from_secs(15)
    }
    fn default_unavailable_for() -> Duration {
        Duration::from_secs(600)
    }

    /// Labels Berth sets itself, which a matcher must not override.
    const OWN_LABELS: [&str; 9] = [
        "module", "version", "status", "le", "track", "route", "stable", "canary", "spec",
    ];

    fn check(&self, key: &dyn Fn(&str) -> String, interval: Duration) -> Result<(), ConfigError> {
        let url = &self.prometheus;
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url.parse::<http::Uri>().is_err()
            || url.contains(['?', '#', '@'])
        {
            return Err(rejected(
                key("analysis.prometheus"),
                "an http:// or https:// base URL without credentials, query or fragment",
            ));
        }
        if self.labels.is_empty() {
            return Err(rejected(
                key("analysis.labels"),
                "name the labels that select this fleet's series and no other's \
                 (e.g. { namespace = \"shop\", app_kubernetes_io_instance = \"shop\" })",
            ));
        }
        if self.labels.len() > 16 {
            return Err(rejected(key("analysis.labels"), "at most 16 labels"));
        }
        for (name, value) in &self.labels {
            let valid = name.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            });
            if name.is_empty() || !valid || name.starts_with("__") {
                return Err(rejected(
                    key("analysis.labels"),
                    format!("`{name}` is not a Prometheus label name"),
                ));
            }
            if Self::OWN_LABELS.contains(&name.as_str()) {
                return Err(rejected(
                    key("analysis.labels"),
                    format!("`{name}` is set by Berth's own queries"),
                ));
            }
            if value.is_empty() || value.len() > 256 {
                return Err(rejected(
                    key("analysis.labels"),
                    format!("the value of `{name}` must have 1 to 256 bytes"),
                ));
            }
        }
        if self.scrape_interval < Duration::from_millis(100) {
            return Err(rejected(
                key("analysis.scrape_interval"),
                "must be at least 100ms",
            ));
        }
        // Bounded first: the product below must not overflow.
        check_duration(
            &key("analysis.scrape_interval"),
            self.scrape_interval,
            Duration::from_secs(3600),
        )?;
        if interval < self.scrape_interval * 2 {
            return Err(rejected(
                key("interval"),
                "must be at least two of analysis.scrape_interval: a window needs two scrapes",
            ));
        }
        if self.rollback_after_unavailable < interval {
            return Err(rejected(
                key("analysis.rollback_after_unavailable"),
                "must be at least the canary's interval",
            ));
        }
        check_duration(
            &key("analysis.rollback_after_unavailable"),
            self.rollback_after_unavailable,
            Duration::from_secs(7 * 24 * 3600),
        )?;
        Ok(())
    }
}

impl CanaryConfig {
    fn default_steps() -> Vec<u8> {
        vec![5, 25, 50, 100]
    }
    fn default_interval() -> Duration {
        Duration::from_secs(60)
    }
    fn default_success_rate() -> f64 {
        99.0
    }
    fn default_max_failures() -> u32 {
        1
    }
    fn default_min_requests() -> u64 {
        20
    }

    /// Where the canary's component comes from, as written.
    pub fn source(&self) -> SourceFields<'_> {
        SourceFields {
            file: self.file.as_deref(),
            url: self.url.as_deref(),
            oci: self.oci.as_deref(),
            allow_tags: self.allow_tags,
            sha256: self.sha256.as_deref(),
        }
    }

    /// A canary's source (which must differ from the module's), steps,
    /// thresholds and stickiness.
    pub(super) fn check(
        &self,
        key: &dyn Fn(&str) -> String,
        stable: SourceFields<'_>,
    ) -> Result<(), ConfigError> {
        self.source().check(key)?;
        let (ours, theirs) = (self.source(), stable);
        if (ours.file, ours.url, ours.oci) == (theirs.file, theirs.url, theirs.oci)
            && ours.sha256.map(str::to_ascii_lowercase)
                == theirs.sha256.map(str::to_ascii_lowercase)
        {
            return Err(rejected(
                key("file"),
                "the canary has the same source as the module: name the new version",
            ));
        }
        let steps = &self.steps;
        if steps.is_empty() || steps.len() > 100 {
            return Err(rejected(
                key("steps"),
                "give 1 to 100 steps, e.g. [5, 25, 50, 100]",
            ));
        }
        if let Some(bad) = steps.iter().find(|w| !(1..=100).contains(*w)) {
            return Err(rejected(
                key("steps"),
                format!("{bad} is not a weight: each step is a percentage from 1 to 100"),
            ));
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(rejected(
                key("steps"),
                "the weights must rise from step to step",
            ));
        }
        if self.interval < Duration::from_millis(100) {
            return Err(rejected(key("interval"), "must be at least 100ms"));
        }
        check_duration(
            &key("interval"),
            self.interval,
            Duration::from_secs(24 * 3600),
        )?;
        if !(0.0..=100.0).contains(&self.min_success_rate) {
            return Err(rejected(
                key("min_success_rate"),
                "a percentage from 0 to 100 (e.g. 99)",
            ));
        }
        if let Some(p99) = self.max_p99
            && p99.is_zero()
        {
            return Err(rejected(key("max_p99"), "must be longer than 0s"));
        }
        if let Some(ratio) = self.max_p99_ratio
            && !(ratio.is_finite() && ratio > 0.0)
        {
            return Err(rejected(
                key("max_p99_ratio"),
                "a positive multiple of the stable version's p99 (e.g. 1.5)",
            ));
        }
        if self.max_failures == 0 {
            return Err(rejected(key("max_failures"), "must be at least 1"));
        }
        if self.min_requests == 0 {
            return Err(rejected(
                key("min_requests"),
                "must be at least 1: a canary is never promoted on no data",
            ));
        }
        if let Some(analysis) = &self.analysis {
            analysis.check(key, self.interval)?;
        }
        if let Some(sticky) = &self.sticky {
            match (&sticky.header, &sticky.cookie) {
                (Some(h), None) => {
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        return Err(rejected(
                            key("sticky.header"),
                            format!("`{h}` is not a header name"),
                        ));
                    }
                }
                (None, Some(c)) => {
                    let token =
                        |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
                    if c.is_empty() || !c.bytes().all(token) {
                        return Err(rejected(
                            key("sticky.cookie"),
                            format!("`{c}` is not a cookie name"),
                        ));
                    }
                }
                _ => {
                    return Err(rejected(
                        key("sticky"),
                        "give exactly one of `header` and `cookie`",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What keeps a client on one version during a canary: a request header
/// or a cookie, exactly one. Requests without it are split at random.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    /// The header whose value is the key (e.g. `x-user-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The cookie whose value is the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}
