//! Layered configuration: built-in defaults, then a TOML file, then
//! `BERTH_`-prefixed environment variables (`__` nests), then command-line
//! flags. Everything is validated once, before any port is bound, and every
//! error names the key (and, through figment, where the value came from).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::magic::RelativePathBuf;
use serde::{Deserialize, Serialize};

mod allow;
mod env;
mod spec;
pub use allow::{AllowList, AllowRule, Specificity, default_port};
pub use env::ignored_env_vars;
pub use spec::{CanarySpec, ConfigSource, ModuleSource, ModuleSpec, OutboundSpec, Track};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/berth/berth.toml";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value has the wrong type, a key is unknown, or a required key is
    /// missing. Shown without the file's text: a syntax error quotes its
    /// line, which may hold a secret, and this text reaches the admin port.
    #[error("invalid config: {}", without_values(&without_source(&.0.to_string())))]
    Invalid(Box<figment::Error>),
    /// Values that parse but do not make sense together.
    #[error("invalid config: key `{key}`: {reason}")]
    Rejected {
        /// The dotted key concerned.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        ConfigError::Invalid(Box::new(err))
    }
}

/// A parser's error without the lines that quote the source (`3 | key =
/// value`, and the caret line under it); the position stays in its first
/// line.
fn without_source(text: &str) -> String {
    let quoted = |line: &str| {
        let line = line.trim_start();
        let line = line.trim_start_matches(|c: char| c.is_ascii_digit());
        line.trim_start().starts_with('|')
    };
    text.lines()
        .filter(|line| !quoted(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A figment error without the string values it quotes (`found string
/// "..."`): a value in the wrong place may be a secret (a mistyped secrets
/// file, a token under the wrong key), and this text reaches the admin
/// port. The key, the expected type and the source stay.
fn without_values(text: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(QUOTED) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let after = &rest[at + QUOTED.len()..];
        // The value is Debug-quoted: find its closing quote, past escapes.
        let mut end = after.len();
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &after[end.min(after.len())..];
    }
    out.push_str(rest);
    out
}

fn rejected(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Rejected {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole host configuration.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The traffic listener.
    pub server: ServerConfig,
    /// The admin listener (probes, `/info`, `/metrics`).
    pub admin: AdminConfig,
    /// Engine and module-loading settings.
    pub runtime: RuntimeConfig,
    /// Settings every module inherits unless it overrides them.
    pub defaults: Defaults,
    /// Logging settings that are not covered by `LOG_LEVEL`/`LOG_FORMAT`.
    pub log: LogConfig,
    /// Graceful shutdown timings.
    pub shutdown: ShutdownConfig,
    /// The modules to serve, by name.
    pub modules: BTreeMap<String, ModuleConfig>,
    /// Outbound policy overrides per upstream, keyed `host:port`; they
    /// apply over the calling module's policy.
    pub upstreams: BTreeMap<String, OutboundOverride>,
    /// How modules are pulled from OCI registries.
    pub registry: RegistryConfig,
}

/// Pulling modules from OCI registries (modules with `oci = "..."`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Docker `config.json` files to take credentials from (a mounted
    /// `dockerconfigjson` Secret); first match wins. Empty:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. Read on
    /// every pull, so a rotated Secret takes effect at once.
    pub auth_files: Vec<PathBuf>,
    /// Credentials per registry host (`host[:port]`); they win over the
    /// files. Never printed.
    pub credentials: BTreeMap<String, RegistryCredentials>,
    /// A PEM file of extra CA certificates trusted besides the platform's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Registries (`host[:port]`) spoken to over plain HTTP. Everything
    /// else is HTTPS only.
    pub insecure_registries: Vec<String>,
    /// Most one pull attempt may take, manifest and layer together.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most a connection to a registry may take to open.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Attempts after the first when a pull fails for a reason that may
    /// pass (connection refused, timeout, 5xx); never after a refusal
    /// (401, 403, 404) or a wrong digest.
    pub retries: u32,
    /// Largest component accepted from a registry.
    pub max_module_size: ByteSize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            auth_files: Vec::new(),
            credentials: BTreeMap::new(),
            ca_file: None,
            insecure_registries: Vec::new(),
            timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            retries: 2,
            max_module_size: ByteSize(512 << 20),
        }
    }
}

/// Credentials for one registry: `username` and `password`, or a bearer
/// `token`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryCredentials {
    /// Basic-auth user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Basic-auth password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// A registry bearer token (wins over the user and password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

/// The traffic listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to accept traffic on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Time a client has to send a request head; also how long an idle
    /// keep-alive connection is kept (slowloris protection).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers); more gets 431.
    pub max_header_bytes: ByteSize,
    /// Most headers in a request; more gets 431.
    pub max_headers: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: ByteSize(64 << 10),
            max_headers: 100,
        }
    }
}

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

/// Engine and module-loading settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Folder that relative module `file`s are resolved against. A relative
    /// folder given in the config file is relative to that file.
    pub modules_dir: RelativePathBuf,
    /// Instances that may exist at once across all modules (sizes the
    /// pooling allocator).
    pub max_instances: u32,
    /// Threads that serve requests; unset, one per CPU this process may use
    /// (its affinity mask and cgroup CPU quota). With one thread a
    /// single-threaded scheduler runs everything on it, with no cross-thread
    /// wake-ups: 10% less CPU per hello request, 30% less with tracing and
    /// access logs on (bench/NOTES.md).
    pub worker_threads: Option<u32>,
    /// Period of the shared epoch ticker that enforces guest deadlines.
    #[serde(with = "humantime_serde")]
    pub epoch_tick: Duration,
    /// Folder for precompiled modules and downloaded ones, keyed by
    /// content hash and engine; empty disables the cache.
    pub cache_dir: PathBuf,
    /// Most the compile cache may hold; older entries are pruned (the
    /// live modules' always stay). Keep it under the volume's size limit.
    pub cache_max_size: ByteSize,
    /// Watch `modules_dir` and the config file, and swap in what changes.
    pub watch: bool,
    /// Backstop for the watcher: look for changes this often anyway.
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Dirty memory of a finished instance reset in place (memset) instead
    /// of returned to the kernel, saving the `madvise` and the page faults of
    /// the next request. Unset: 64 KiB where the kernel offers `PAGEMAP_SCAN`
    /// (Linux 6.7+, which finds the dirty pages), otherwise 0, since without
    /// it the first `keep_resident` bytes are reset whether touched or not.
    pub keep_resident: Option<ByteSize>,
    /// Finished instances whose memory is returned to the kernel together.
    pub decommit_batch: u32,
    /// Map module memory images copy-on-write (best for large guests) rather
    /// than copying their data into each instance, which only helps small
    /// guests on kernels without `PAGEMAP_SCAN` (see bench/NOTES.md).
    pub memory_cow: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            modules_dir: RelativePathBuf::from("/modules"),
            max_instances: 1000,
            worker_threads: None,
            epoch_tick: Duration::from_millis(10),
            cache_dir: std::env::temp_dir().join("berth-cache"),
            cache_max_size: ByteSize(200 << 20),
            watch: true,
            rescan_interval: Duration::from_secs(30),
            keep_resident: None,
            decommit_batch: 1,
            memory_cow: true,
        }
    }
}

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

/// Settings every module inherits.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    /// Resource limits for each request.
    pub limits: Limits,
    /// Policy of outbound calls.
    pub outbound: OutboundConfig,
}

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
        }
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
        }
    }
}

fn check_outbound(key: &str, o: &OutboundConfig) -> Result<(), ConfigError> {
    for (name, d) in [
        ("connect_timeout", o.connect_timeout),
        ("first_byte_timeout", o.first_byte_timeout),
        ("between_bytes_timeout", o.between_bytes_timeout),
        ("timeout", o.timeout),
    ] {
        if d.is_zero() {
            return Err(rejected(format!("{key}.{name}"), "must be longer than 0s"));
        }
    }
    for (name, d) in [
        ("connect_timeout", o.connect_timeout),
        ("first_byte_timeout", o.first_byte_timeout),
        ("between_bytes_timeout", o.between_bytes_timeout),
        ("timeout", o.timeout),
        ("retry_backoff", o.retry_backoff),
        ("retry_backoff_max", o.retry_backoff_max),
        ("circuit_breaker.open_for", o.circuit_breaker.open_for),
    ] {
        check_duration(&format!("{key}.{name}"), d, MAX_REQUEST_DURATION)?;
    }
    if !(0.0..=10.0).contains(&o.retry_budget) {
        return Err(rejected(
            format!("{key}.retry_budget"),
            "must be a share between 0 and 10 (0.2 = 20% of calls)",
        ));
    }
    if o.circuit_breaker.failures > 0 && o.circuit_breaker.half_open_probes == 0 {
        return Err(rejected(
            format!("{key}.circuit_breaker.half_open_probes"),
            "must be at least 1",
        ));
    }
    Ok(())
}

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

/// One module to serve.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    /// The component file, relative to `runtime.modules_dir` unless absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Or: where to download the component (`https://` or `http://`), for
    /// modules too large for a ConfigMap. Requires `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<SourceUrl>,
    /// Or: an OCI reference, `registry/repository[:tag]@sha256:...`, for
    /// modules shipped through a registry. The digest pins the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    /// Let `oci` be a tag without a digest. The tag is resolved when the
    /// module loads (start-up, or a change of the reference); the digest
    /// it resolved to is logged and shown in `/info`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_tags: bool,
    /// The hex sha256 the component must have: required with `url`,
    /// optional with `file` (pins the ConfigMap's content to a digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Path prefix routed to this module; the longest matching prefix wins.
    pub route: String,
    /// Values the guest reads through `wasi:config/store`.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
    /// Like `config`, but never printed: not in logs, not in `/info`.
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
    /// Overrides of `defaults.limits`.
    #[serde(default)]
    pub limits: LimitsOverride,
    /// Overrides of `defaults.outbound`.
    #[serde(default)]
    pub outbound: OutboundOverride,
    /// Outbound destinations this module may call, as `scheme://host[:port]`
    /// (`*.example.com` matches subdomains, `*` as port any port). Empty
    /// means no outbound calls at all.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// `allowed_outbound_hosts`, parsed by [`Config::validate`].
    #[serde(skip)]
    pub allow: AllowList,
    /// Instance reuse; unset fields take the default of the module's world.
    #[serde(default)]
    pub instances: Instances,
    /// A second version given part of this module's traffic, judged
    /// against this one, and promoted or rolled back on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryConfig>,
}

impl ModuleConfig {
    /// Where this module's component comes from, as written.
    pub fn source(&self) -> SourceFields<'_> {
        SourceFields {
            file: self.file.as_deref(),
            url: self.url.as_deref(),
            oci: self.oci.as_deref(),
            allow_tags: self.allow_tags,
            sha256: self.sha256.as_deref(),
        }
    }
}

/// The keys that say where a component comes from, shared by a module and
/// its canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFields<'a> {
    /// `file`
    pub file: Option<&'a Path>,
    /// `url`
    pub url: Option<&'a str>,
    /// `oci`
    pub oci: Option<&'a str>,
    /// `allow_tags`
    pub allow_tags: bool,
    /// `sha256`
    pub sha256: Option<&'a str>,
}

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

/// How many requests one guest instance may serve.
///
/// **Isolation.** With `max_requests = 1` every request gets a fresh
/// instance: nothing a request leaves in the guest's memory (globals,
/// caches, a half-written buffer, another tenant's data) can be seen by the
/// next one. With reuse, state *can* outlive a request and be seen by later
/// or concurrent requests to the same module; only turn it on for modules
/// written for it. A reused instance that traps, runs out of memory or runs
/// over its deadline is retired and never serves again.
///
/// Defaults: WASI 0.2 modules 1 and 1 (a fresh instance per request, the
/// fastest path there); WASI 0.3 modules 128 and 16, as `wasmtime serve`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Instances {
    /// Requests one instance serves in its life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests one instance serves at once (WASI 0.3 modules; a WASI 0.2
    /// handler runs one request at a time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// How long an idle instance is kept for the next request.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

/// A config value as the guest sees it: always a string. Numbers and
/// booleans are accepted (environment variables arrive typed through
/// figment) and kept in their textual form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ConfigValue(pub String);

impl<'de> Deserialize<'de> for ConfigValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            S(String),
            I(i64),
            U(u64),
            F(f64),
            B(bool),
        }
        Ok(ConfigValue(
            match Scalar::deserialize(d)
                .map_err(|_| serde::de::Error::custom("expected a string, number or boolean"))?
            {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::U(u) => u.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => b.to_string(),
            },
        ))
    }
}

/// A component's download URL: presigned URLs carry credentials in their
/// userinfo and query, so it is printed and serialized (the start-up log)
/// redacted, whichever field holds it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SourceUrl(pub String);

impl std::ops::Deref for SourceUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::url(&self.0))
    }
}

impl Serialize for SourceUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::redact::url(&self.0))
    }
}

/// A secret config value: handed to the guest like any other, printed as
/// `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub ConfigValue);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A size in bytes, written as a number or with a unit (`64KiB`, `128MiB`,
/// `1GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"128MiB"`, `"10 kb"`, `"4096"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (num, unit) = text.split_at(split);
        let num: u64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size such as 128MiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => return Err(format!("unknown size unit `{other}` in `{text}`")),
        };
        num.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n != 0 && n % (1 << 30) == 0 => write!(f, "{}GiB", n >> 30),
            n if n != 0 && n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            n if n != 0 && n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            n => write!(f, "{n}B"),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a size such as 128MiB"))?
        {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Values given on the command line, the top layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--admin-listen`
    pub admin_listen: Option<SocketAddr>,
    /// `--secrets-file`: a TOML file of secrets (a mounted Secret), merged
    /// over the config file. Its keys keep their case, which environment
    /// variable names cannot carry.
    pub secrets_file: Option<PathBuf>,
}

/// The `--secrets-file` layer: a TOML file that may set secrets and
/// nothing else (module `secrets`, registry credentials, the admin token),
/// so a Secret cannot change a route or a limit behind a review of the
/// ConfigMap.
fn secrets_layer(path: &Path) -> Result<SecretsFile, ConfigError> {
    use figment::Provider as _;
    if !path.is_file() {
        return Err(ConfigError::MissingFile(path.to_path_buf()));
    }
    // Read once: what is checked is what is merged (a file swapped between
    // two reads could otherwise set any key).
    let text = std::fs::read_to_string(path).map_err(|e| {
        rejected(
            "--secrets-file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let data = Toml::string(&text).data()?;
    let file = path.display();
    for dict in data.values() {
        for (section, value) in dict {
            let allowed = match section.as_str() {
                "modules" => value.as_dict().is_some_and(|modules| {
                    modules.values().all(|m| {
                        m.as_dict()
                            .is_some_and(|m| m.keys().all(|k| k == "secrets"))
                    })
                }),
                "admin" => value
                    .as_dict()
                    .is_some_and(|d| d.keys().all(|k| k == "token")),
                "registry" => value
                    .as_dict()
                    .is_some_and(|d| d.keys().all(|k| k == "credentials")),
                _ => false,
            };
            if !allowed {
                return Err(rejected(
                    section.clone(),
                    format!(
                        "the secrets file {file} may set only `modules.NAME.secrets`, \
                         `admin.token` and `registry.credentials`"
                    ),
                ));
            }
        }
    }
    Ok(SecretsFile {
        data,
        path: path.to_path_buf(),
    })
}

/// The checked contents of the secrets file, as a figment layer that names
/// the file in errors.
struct SecretsFile {
    data: figment::value::Map<figment::Profile, figment::value::Dict>,
    path: PathBuf,
}

impl figment::Provider for SecretsFile {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::from("secrets file", figment::Source::File(self.path.clone()))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

impl Config {
    /// Builds the layered figment. `file` is `--config`; without it the
    /// default file is read when present.
    pub fn figment(file: Option<&Path>, overrides: &Overrides) -> Result<Figment, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            Some(path) => fig = fig.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                fig = fig.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
            }
            None => {}
        }
        if let Some(path) = &overrides.secrets_file {
            fig = fig.merge(secrets_layer(path)?);
        }
        fig = fig.merge(env::EnvLayer::default());
        if let Some(addr) = overrides.listen {
            fig = fig.merge(("server.listen", addr.to_string()));
        }
        if let Some(addr) = overrides.admin_listen {
            fig = fig.merge(("admin.listen", addr.to_string()));
        }
        Ok(fig)
    }

    /// What the file at `path` says by itself (no environment, secrets file
    /// or flags), validated: for checking what the file names before it is
    /// rewritten.
    pub fn load_file_alone(path: &Path) -> Result<Config, ConfigError> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file_exact(path))
            .extract_lossy::<Config>()?
            .validate()
    }

    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::figment(file, overrides)?
            // Lossy: environment values arrive as strings, and become
            // numbers or booleans only where a key wants one.
            .extract_lossy::<Config>()?
            .validate()
    }

    /// Checks what types alone cannot.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        check_limits("defaults.limits", &self.defaults.limits)?;
        check_outbound("defaults.outbound", &self.defaults.outbound)?;
        for (upstream, o) in &self.upstreams {
            let key = format!("upstreams.\"{upstream}\"");
            if upstream.contains('/') || upstream.is_empty() {
                return Err(rejected(
                    key,
                    "an upstream key is `host:port`, without scheme or path",
                ));
            }
            check_outbound(&key, &o.over(self.defaults.outbound))?;
        }
        if self
            .admin
            .token
            .as_ref()
            .is_some_and(|t| t.0.0.trim().is_empty())
        {
            return Err(rejected("admin.token", "must not be empty"));
        }
        if self.runtime.max_instances == 0 {
            return Err(rejected("runtime.max_instances", "must be at least 1"));
        }
        if self.runtime.worker_threads == Some(0) {
            return Err(rejected("runtime.worker_threads", "must be at least 1"));
        }
        for (key, d, max) in [
            (
                "runtime.epoch_tick",
                self.runtime.epoch_tick,
                Duration::from_secs(1),
            ),
            (
                "runtime.rescan_interval",
                self.runtime.rescan_interval,
                MAX_REQUEST_DURATION,
            ),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
                MAX_REQUEST_DURATION,
            ),
            (
                "shutdown.drain_delay",
                self.shutdown.drain_delay,
                MAX_SHUTDOWN_STEP,
            ),
            (
                "admin.stall_timeout",
                self.admin.stall_timeout,
                MAX_SHUTDOWN_STEP,
            ),
            (
                "shutdown.grace_period",
                self.shutdown.grace_period,
                MAX_SHUTDOWN_STEP,
            ),
        ] {
            check_duration(key, d, max)?;
        }
        if self.admin.stall_timeout < Duration::from_secs(1) {
            return Err(rejected("admin.stall_timeout", "must be at least 1s"));
        }
        if self.runtime.epoch_tick.is_zero() {
            return Err(rejected("runtime.epoch_tick", "must be longer than 0s"));
        }
        if self.server.header_read_timeout.is_zero() {
            return Err(rejected(
                "server.header_read_timeout",
                "must be longer than 0s",
            ));
        }
        // hyper allocates room for `max_headers` on every request, and
        // buffers up to `max_header_bytes` per connection.
        if self.server.max_header_bytes.0 < 1024
            || self.server.max_header_bytes.0 > MAX_HEADER_BYTES
        {
            return Err(rejected(
                "server.max_header_bytes",
                "must be between 1KiB and 1MiB",
            ));
        }
        if !(1..=MAX_HEADERS).contains(&self.server.max_headers) {
            return Err(rejected(
                "server.max_headers",
                format!("must be between 1 and {MAX_HEADERS}"),
            ));
        }
        if self.runtime.max_instances > MAX_INSTANCES {
            return Err(rejected(
                "runtime.max_instances",
                format!("must be at most {MAX_INSTANCES}"),
            ));
        }
        if self.runtime.decommit_batch > self.runtime.max_instances {
            return Err(rejected(
                "runtime.decommit_batch",
                "must be at most runtime.max_instances",
            ));
        }
        check_registry(&self.registry)?;
        if self.runtime.rescan_interval.is_zero() {
            return Err(rejected(
                "runtime.rescan_interval",
                "must be longer than 0s",
            ));
        }
        let mut routes: BTreeMap<&str, &str> = BTreeMap::new();
        let mut parsed = Vec::with_capacity(self.modules.len());
        for (name, module) in &self.modules {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(rejected(
                    format!("modules.{name}"),
                    "a module name may only hold letters, digits, `-` and `_`",
                ));
            }
            let key = |k: &str| format!("modules.{name}.{k}");
            if !module.route.starts_with('/') {
                return Err(rejected(key("route"), "a route must start with `/`"));
            }
            if let Some(other) = routes.insert(normalize_route(&module.route), name) {
                return Err(rejected(
                    key("route"),
                    format!(
                        "route `{}` is already used by module `{other}`",
                        module.route
                    ),
                ));
            }
            check_source(&key, module.source())?;
            if let Some(canary) = &module.canary {
                check_canary(&|k: &str| key(&format!("canary.{k}")), module, canary)?;
            }
            check_limits(&key("limits"), &module.limits.over(self.defaults.limits))?;
            check_instances(&key("instances"), &module.instances)?;
            check_outbound(
                &key("outbound"),
                &module.outbound.over(self.defaults.outbound),
            )?;
            // Parsed once, here, and kept: nothing downstream parses it.
            let allow =
                AllowList::parse(&module.allowed_outbound_hosts).map_err(|(i, reason)| {
                    rejected(format!("{}[{i}]", key("allowed_outbound_hosts")), reason)
                })?;
            parsed.push((name.clone(), allow));
            if let Some(dup) = module
                .secrets
                .keys()
                .find(|k| module.config.contains_key(*k))
            {
                return Err(rejected(
                    key(&format!("secrets.{dup}")),
                    "the same key is also set in `config`",
                ));
            }
        }
        for (name, allow) in parsed {
            if let Some(module) = self.modules.get_mut(&name) {
                module.allow = allow;
            }
        }
        Ok(self)
    }

    /// The folder relative module files are resolved against.
    pub fn modules_dir(&self) -> PathBuf {
        self.runtime.modules_dir.relative()
    }

    /// The compile cache folder, if caching is on.
    pub fn cache_dir(&self) -> Option<&Path> {
        let dir = &self.runtime.cache_dir;
        (!dir.as_os_str().is_empty()).then_some(dir.as_path())
    }

    /// The sections that changed between `self` and `new` and that only a
    /// restart applies (ports, runtime, logging, shutdown timings).
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        fn differs<T: Serialize>(a: &T, b: &T) -> bool {
            serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
        }
        [
            ("server", differs(&self.server, &new.server)),
            ("admin", differs(&self.admin, &new.admin)),
            ("runtime", differs(&self.runtime, &new.runtime)),
            ("log", differs(&self.log, &new.log)),
            ("shutdown", differs(&self.shutdown, &new.shutdown)),
            ("registry", differs(&self.registry, &new.registry)),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// Threads serving requests: `runtime.worker_threads`, else one per CPU
    /// this process may use.
    pub fn worker_threads(&self) -> usize {
        self.runtime.worker_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n as usize,
        )
    }

    /// The effective limits of a module.
    pub fn limits_of(&self, module: &ModuleConfig) -> Limits {
        module.limits.over(self.defaults.limits)
    }
}

fn check_limits(key: &str, limits: &Limits) -> Result<(), ConfigError> {
    if limits.timeout.is_zero() {
        return Err(rejected(format!("{key}.timeout"), "must be longer than 0s"));
    }
    if limits.max_concurrency == 0 {
        return Err(rejected(
            format!("{key}.max_concurrency"),
            "must be at least 1",
        ));
    }
    if limits.log_rate == 0 {
        return Err(rejected(format!("{key}.log_rate"), "must be at least 1"));
    }
    check_duration(
        &format!("{key}.timeout"),
        limits.timeout,
        MAX_REQUEST_DURATION,
    )?;
    if limits.memory.0 < 64 << 10 || limits.memory.0 > 4 << 30 {
        return Err(rejected(
            format!("{key}.memory"),
            "must be between 64KiB (one wasm page) and 4GiB (a 32-bit memory)",
        ));
    }
    Ok(())
}

/// Exactly one of `file`, `url` and `oci`, each well formed.
fn check_source(key: &dyn Fn(&str) -> String, source: SourceFields) -> Result<(), ConfigError> {
    let given: Vec<&str> = [
        ("file", source.file.is_some()),
        ("url", source.url.is_some()),
        ("oci", source.oci.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    match given.as_slice() {
        [] => {
            return Err(rejected(
                key("file"),
                "missing: give `file`, `url` (with `sha256`) or `oci`",
            ));
        }
        [_] => {}
        [first, second, ..] => {
            return Err(rejected(
                key(second),
                format!("give only one of `file`, `url` and `oci`, not `{first}` and `{second}`"),
            ));
        }
    }
    if source.allow_tags && source.oci.is_none() {
        return Err(rejected(
            key("allow_tags"),
            "only applies to an `oci` module",
        ));
    }
    if let Some(file) = source.file
        && file.as_os_str().is_empty()
    {
        return Err(rejected(key("file"), "must name a .wasm file"));
    }
    if let Some(url) = source.url {
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url.parse::<http::Uri>().is_err()
        {
            return Err(rejected(
                key("url"),
                format!("`{url}` is not an http(s) URL"),
            ));
        }
        let digest_ok = source
            .sha256
            .is_some_and(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit()));
        if !digest_ok {
            return Err(rejected(
                key("sha256"),
                "a module from a `url` needs the 64-hex-digit sha256 of its content",
            ));
        }
    }
    if let Some(reference) = source.oci {
        if source.sha256.is_some() {
            return Err(rejected(
                key("sha256"),
                "an `oci` module is pinned by the digest in its reference (`...@sha256:...`)",
            ));
        }
        check_oci_reference(reference, source.allow_tags).map_err(|r| rejected(key("oci"), r))?;
    }
    Ok(())
}

/// A canary's source (which must differ from the module's), steps,
/// thresholds and stickiness.
fn check_canary(
    key: &dyn Fn(&str) -> String,
    module: &ModuleConfig,
    canary: &CanaryConfig,
) -> Result<(), ConfigError> {
    check_source(key, canary.source())?;
    let (ours, theirs) = (canary.source(), module.source());
    if (ours.file, ours.url, ours.oci) == (theirs.file, theirs.url, theirs.oci)
        && ours.sha256.map(str::to_ascii_lowercase) == theirs.sha256.map(str::to_ascii_lowercase)
    {
        return Err(rejected(
            key("file"),
            "the canary has the same source as the module: name the new version",
        ));
    }
    let steps = &canary.steps;
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
    if canary.interval < Duration::from_millis(100) {
        return Err(rejected(key("interval"), "must be at least 100ms"));
    }
    check_duration(
        &key("interval"),
        canary.interval,
        Duration::from_secs(24 * 3600),
    )?;
    if !(0.0..=100.0).contains(&canary.min_success_rate) {
        return Err(rejected(
            key("min_success_rate"),
            "a percentage from 0 to 100 (e.g. 99)",
        ));
    }
    if let Some(p99) = canary.max_p99
        && p99.is_zero()
    {
        return Err(rejected(key("max_p99"), "must be longer than 0s"));
    }
    if let Some(ratio) = canary.max_p99_ratio
        && !(ratio.is_finite() && ratio > 0.0)
    {
        return Err(rejected(
            key("max_p99_ratio"),
            "a positive multiple of the stable version's p99 (e.g. 1.5)",
        ));
    }
    if canary.max_failures == 0 {
        return Err(rejected(key("max_failures"), "must be at least 1"));
    }
    if canary.min_requests == 0 {
        return Err(rejected(
            key("min_requests"),
            "must be at least 1: a canary is never promoted on no data",
        ));
    }
    if let Some(sticky) = &canary.sticky {
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
                let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
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

/// An OCI reference Berth can pull: it parses, and it carries a sha256
/// digest unless tags are allowed.
pub fn check_oci_reference(reference: &str, allow_tags: bool) -> Result<(), String> {
    let parsed: oci_client::Reference = reference
        .parse()
        .map_err(|e| format!("`{reference}` is not an OCI reference: {e}"))?;
    match parsed.digest() {
        Some(d) => {
            let hex = d.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!(
                    "`{reference}`: the digest must be sha256 with 64 hex digits"
                ));
            }
        }
        None if allow_tags => {}
        None => {
            return Err(format!(
                "`{reference}` has no digest: pin it (`...@sha256:<digest>`, printed by \
                 `berth push`), or set `allow_tags = true` to follow a tag"
            ));
        }
    }
    Ok(())
}

fn check_registry(registry: &RegistryConfig) -> Result<(), ConfigError> {
    if registry.timeout.is_zero() || registry.connect_timeout.is_zero() {
        return Err(rejected("registry.timeout", "must be longer than 0s"));
    }
    if registry.retries > 10 {
        return Err(rejected("registry.retries", "at most 10"));
    }
    if let Some(ca) = &registry.ca_file
        && let Err(e) = std::fs::metadata(ca)
    {
        return Err(rejected(
            "registry.ca_file",
            format!("cannot read {}: {e}", ca.display()),
        ));
    }
    if registry.max_module_size.0 == 0 {
        return Err(rejected("registry.max_module_size", "must be more than 0"));
    }
    for (i, host) in registry.insecure_registries.iter().enumerate() {
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(rejected(
                format!("registry.insecure_registries[{i}]"),
                format!("`{host}` is not a registry host[:port]"),
            ));
        }
    }
    for (host, c) in &registry.credentials {
        if c.token.is_none() && (c.username.is_none() || c.password.is_none()) {
            return Err(rejected(
                format!("registry.credentials.\"{host}\""),
                "give `username` and `password`, or `token`",
            ));
        }
    }
    Ok(())
}

fn check_instances(key: &str, instances: &Instances) -> Result<(), ConfigError> {
    for (field, value) in [
        ("max_requests", instances.max_requests),
        ("max_concurrent", instances.max_concurrent),
    ] {
        if value == Some(0) {
            return Err(rejected(format!("{key}.{field}"), "must be at least 1"));
        }
    }
    if let Some(idle) = instances.idle_timeout {
        if idle.is_zero() {
            return Err(rejected(
                format!("{key}.idle_timeout"),
                "must be longer than 0s",
            ));
        }
        check_duration(&format!("{key}.idle_timeout"), idle, MAX_REQUEST_DURATION)?;
    }
    Ok(())
}

/// Most headers a request may be allowed (hyper's default is 100; it
/// allocates a slot for each on every request).
const MAX_HEADERS: u32 = 1000;
/// Largest request head that may be allowed.
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Most instances the pooling allocator may be sized for (it reserves
/// address space for every one).
const MAX_INSTANCES: u32 = 100_000;
/// The longest a request or an outbound call may be given: far beyond any
/// sane setting, and far from where `Instant + Duration` overflows.
const MAX_REQUEST_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The longest drain delay or grace period: Kubernetes kills the pod long
/// before.
const MAX_SHUTDOWN_STEP: Duration = Duration::from_secs(3600);

/// Rejects `value` past `max`, naming the key.
fn check_duration(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(rejected(
            key,
            format!(
                "{} is too long (at most {})",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

/// `/api/` and `/api` route the same way; routing compares without the
/// trailing slash.
pub fn normalize_route(route: &str) -> &str {
    match route.trim_end_matches('/') {
        "" => "/",
        r => r,
    }
}

#[cfg(test)]
mod tests;
