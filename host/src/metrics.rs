//! Prometheus metrics, served as text on the admin port's `/metrics`.
//!
//! One [`Metrics`] owns the registry and every family. The request path
//! never formats labels or looks families up: each module resolves its
//! handles once, at load, into [`ModuleMetrics`], and per-status counters are
//! created on first use and kept in fixed slots.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for request and call durations, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets for instantiation, which takes microseconds.
const INSTANTIATE_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025,
];
/// Buckets for compilation, which takes up to seconds.
const COMPILE_BUCKETS: &[f64] = &[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Every metric family of the host.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    instantiate: HistogramVec,
    guest_failures: IntCounterVec,
    shed: IntCounterVec,
    instances_created: IntCounterVec,
    instances_retired: IntCounterVec,
    requests_per_instance: HistogramVec,
    /// Module compile time, by module.
    pub compile: HistogramVec,
    /// Components compiled to native code, by module: not loads from the
    /// compile cache, nor bytes another module already compiled.
    pub compilations: IntCounterVec,
    /// Module loads by module and result (`ok`/`error`), start-up included.
    pub loads: IntCounterVec,
    /// Module reloads by module and result (`ok`/`error`).
    pub reloads: IntCounterVec,
    /// Config file reloads by result.
    pub config_reloads: IntCounterVec,
    /// `berth_module_info{module,sha256}`.
    module_info: IntGaugeVec,
    /// When the serving version of each module was loaded.
    module_loaded: IntGaugeVec,
    /// Outbound calls by module, upstream and outcome.
    pub outbound_requests: IntCounterVec,
    /// Outbound call duration by module and upstream.
    pub outbound_duration: HistogramVec,
    /// Retries by module and upstream.
    pub outbound_retries: IntCounterVec,
    /// Calls refused by the allow-list, by module.
    pub outbound_denied: IntCounterVec,
    /// Breaker state by module and upstream: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    grpc_handled: IntCounterVec,
    grpc_handling: HistogramVec,
    /// Health `Watch` streams open now.
    pub grpc_watches: IntGauge,
    guest_dropped: IntCounterVec,
    /// 1 while the host is ready for traffic, 0 while loading or draining.
    ready: IntGauge,
    /// 1 while a module's last load failed (the previous version, if any,
    /// serving), by module.
    pub load_error: IntGaugeVec,
    /// 1 while the config file on disk is rejected.
    pub config_error: IntGauge,
    /// A module's canary: its share of requests in percent.
    pub canary_weight: IntGaugeVec,
    /// A module's canary: 0 progressing, 1 paused, 2 promoted, 3 rolled back.
    pub canary_state: IntGaugeVec,
    /// The same, labelled with both versions and the settings' hash: the
    /// fleet's record that every replica of a fleet-analysed canary reads.
    pub canary_fleet_state: IntGaugeVec,
    /// The step a fleet-analysed canary is at, labelled as the state.
    pub canary_fleet_step: IntGaugeVec,
    /// Canary judgements by module and result (pass, fail, wait).
    pub canary_judgements: IntCounterVec,
    /// Guest log lines dropped, by module and reason (`rate_limit`).
    pub guest_logs_dropped: IntCounterVec,
    /// Log lines the writer dropped because stdout fell behind.
    log_dropped: IntCounter,
    /// How many of those `log_dropped` already counts; scrapes may run at
    /// once, so each adds only what no other scrape has added.
    log_dropped_seen: std::sync::atomic::AtomicU64,
    guest: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<GuestMetrics>>>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    /// Registers every family, the build info and the process collector.
    pub fn new() -> Self {
        let r = Registry::new();
        let build_info = gauge(
            &r,
            "berth_build_info",
            "Build information; always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector");
        Metrics {
            requests: counter(
                &r,
                "berth_http_server_requests_total",
                "Inbound requests by module, route, method, status code, and the version \
                 (sha256 prefix) and track (stable, canary) that served them.",
                &["module", "route", "method", "status", "version", "track"],
            ),
            duration: histogram(
                &r,
                "berth_http_server_request_duration_seconds",
                "Inbound request duration until the response head, by module, route, version \
                 and track.",
                &["module", "route", "version", "track"],
                LATENCY_BUCKETS,
            ),
            in_flight: gauge(
                &r,
                "berth_http_server_active_requests",
                "Inbound requests in progress, by module and route.",
                &["module", "route"],
            ),
            instantiate: histogram(
                &r,
                "berth_module_instantiation_duration_seconds",
                "Time to create a fresh instance for a request, by module.",
                &["module"],
                INSTANTIATE_BUCKETS,
            ),
            guest_failures: counter(
                &r,
                "berth_guest_failures_total",
                "Guest calls that failed, by module and kind (trap, timeout, memory_limit, no_response).",
                &["module", "kind"],
            ),
            shed: counter(
                &r,
                "berth_http_server_shed_requests_total",
                "Requests refused with 503 because the module was at its concurrency limit, by \
                 module and version.",
                &["module", "version"],
            ),
            instances_created: counter(
                &r,
                "berth_instances_created_total",
                "Guest instances created, by module (reused instances: see berth_instance_requests).",
                &["module"],
            ),
            instances_retired: counter(
                &r,
                "berth_instances_retired_total",
                "Reused guest instances retired, by module and reason (max_requests, idle, \
                 timeout, trap, memory_limit).",
                &["module", "reason"],
            ),
            requests_per_instance: histogram(
                &r,
                "berth_instance_requests",
                "Requests a reused guest instance served before it was retired, by module.",
                &["module"],
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
                ],
            ),
            compile: histogram(
                &r,
                "berth_module_compile_duration_seconds",
                "Time to compile and pre-instantiate a module, by module.",
                &["module"],
                COMPILE_BUCKETS,
            ),
            compilations: counter(
                &r,
                "berth_module_compilations_total",
                "Components compiled to native code, by module (loads from the compile cache \
                 and bytes already compiled for another module are not counted).",
                &["module"],
            ),
            loads: counter(
                &r,
                "berth_module_loads_total",
                "Module loads at start-up, by module and result.",
                &["module", "result"],
            ),
            reloads: counter(
                &r,
                "berth_module_reloads_total",
                "Module reloads while serving (hot-swaps), by module and result.",
                &["module", "result"],
            ),
            config_reloads: counter(
                &r,
                "berth_config_reloads_total",
                "Config file changes applied or rejected, by result.",
                &["result"],
            ),
            module_info: gauge(
                &r,
                "berth_module_info",
                "The module version being served; always 1.",
                &["module", "sha256"],
            ),
            module_loaded: gauge(
                &r,
                "berth_module_loaded_timestamp_seconds",
                "Unix time the serving version of the module was loaded.",
                &["module"],
            ),
            outbound_requests: counter(
                &r,
                "berth_http_client_requests_total",
                "Outbound calls of guests by module, upstream and outcome (status code or error kind).",
                &["module", "upstream", "outcome"],
            ),
            outbound_duration: histogram(
                &r,
                "berth_http_client_request_duration_seconds",
                "Outbound call duration, retries included, by module and upstream.",
                &["module", "upstream"],
                LATENCY_BUCKETS,
            ),
            outbound_retries: counter(
                &r,
                "berth_http_client_retries_total",
                "Outbound retries by module and upstream.",
                &["module", "upstream"],
            ),
            outbound_denied: counter(
                &r,
                "berth_http_client_denied_total",
                "Outbound calls refused by the allow-list, by module.",
                &["module"],
            ),
            breaker_state: gauge(
                &r,
                "berth_http_client_circuit_state",
                "Circuit breaker state by module and upstream: 0 closed, 1 half-open, 2 open.",
                &["module", "upstream"],
            ),
            grpc_handled: counter(
                &r,
                "berth_grpc_server_handled_total",
                "gRPC calls finished, by module, service, method and status code (OK, \
                 UNIMPLEMENTED, ...), as go-grpc-prometheus names them. Methods a module \
                 does not implement, and methods past 64 per module, are `other`.",
                &["module", "grpc_service", "grpc_method", "grpc_code"],
            ),
            grpc_handling: histogram(
                &r,
                "berth_grpc_server_handling_seconds",
                "gRPC call duration to the last message and status, by module, service and \
                 method (`other` as in berth_grpc_server_handled_total).",
                &["module", "grpc_service", "grpc_method"],
                LATENCY_BUCKETS,
            ),
            grpc_watches: gauge(
                &r,
                "berth_grpc_health_watches",
                "grpc.health.v1.Health/Watch streams open now (at most 1,024).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            guest_dropped: counter(
                &r,
                "berth_guest_metrics_dropped_total",
                "Guest metric updates dropped, by module and reason (invalid, mismatch, series_limit).",
                &["module", "reason"],
            ),
            ready: gauge(
                &r,
                "berth_ready",
                "1 while the host is ready for traffic (/ready answers 200), 0 while it loads or drains.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            load_error: gauge(
                &r,
                "berth_module_load_error",
                "1 while the module's last load or reload failed (the previous version keeps serving).",
                &["module"],
            ),
            config_error: gauge(
                &r,
                "berth_config_error",
                "1 while the config file on disk is rejected (the running config stays).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            canary_weight: gauge(
                &r,
                "berth_canary_weight",
                "Share of a module's requests its canary serves, in percent.",
                &["module"],
            ),
            canary_state: gauge(
                &r,
                "berth_canary_state",
                "State of a module's canary: 0 progressing, 1 paused, 2 promoted, 3 rolled back.",
                &["module"],
            ),
            canary_fleet_state: gauge(
                &r,
                "berth_canary_fleet_state",
                "State of a canary with fleet analysis, by module, stable and canary version and \
                 settings hash: 0 progressing, 1 paused, 2 promoted, 3 rolled back.",
                &["module", "stable", "canary", "spec"],
            ),
            canary_fleet_step: gauge(
                &r,
                "berth_canary_fleet_step",
                "Step (0-based) of a canary with fleet analysis, labelled as berth_canary_fleet_state.",
                &["module", "stable", "canary", "spec"],
            ),
            canary_judgements: counter(
                &r,
                "berth_canary_judgements_total",
                "Canary step judgements by module and result (pass, fail, wait).",
                &["module", "result"],
            ),
            guest_logs_dropped: counter(
                &r,
                "berth_guest_log_lines_dropped_total",
                "Guest log lines (wasi:logging, stdout, stderr) dropped, by module and reason.",
                &["module", "reason"],
            ),
            log_dropped: counter(
                &r,
                "berth_log_lines_dropped_total",
                "Log lines dropped because stdout could not keep up.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            log_dropped_seen: Default::default(),
            guest: Default::default(),
            registry: r,
        }
    }

    /// Records that `module` now serves the version `sha256` (replacing
    /// `previous`, if any), loaded at `loaded_at`.
    pub fn module_serving(
        &self,
        module: &str,
        sha256: &str,
        previous: Option<&str>,
        loaded_at: std::time::SystemTime,
    ) {
        if let Some(prev) = previous {
            let _ = self.module_info.remove_label_values(&[module, prev]);
        }
        self.module_info.with_label_values(&[module, sha256]).set(1);
        let secs = loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.module_loaded
            .with_label_values(&[module])
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// Records that `module` (serving `sha256`) is no longer served.
    pub fn module_removed(&self, module: &str, sha256: &str) {
        let _ = self.module_info.remove_label_values(&[module, sha256]);
        let _ = self.module_loaded.remove_label_values(&[module]);
    }

    /// Records whether the host is ready for traffic.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Every outbound upstream's breaker: module, upstream and state
    /// (0 closed, 1 half-open, 2 open), as the gauges hold them.
    pub fn breakers(&self) -> Vec<(String, String, i64)> {
        use prometheus::core::Collector;
        let mut out = Vec::new();
        for family in self.breaker_state.collect() {
            for m in &family.metric {
                let label = |name: &str| {
                    m.label
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                out.push((label("module"), label("upstream"), m.gauge.value() as i64));
            }
        }
        out.sort();
        out
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let dropped = crate::telemetry::dropped_log_lines();
        let seen = self
            .log_dropped_seen
            .fetch_max(dropped, std::sync::atomic::Ordering::Relaxed);
        self.log_dropped.inc_by(dropped.saturating_sub(seen));
        let mut out = Vec::with_capacity(16 << 10);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// The handles one version of a module uses: `version` is a prefix of
    /// its sha256, `track` says whether it is the stable version or a
    /// canary.
    pub fn for_module(
        &self,
        module: &str,
        route: &str,
        version: &str,
        track: &'static str,
    ) -> ModuleMetrics {
        ModuleMetrics {
            module: module.to_owned(),
            route: route.to_owned(),
            version: version.to_owned(),
            track,
            requests: self.requests.clone(),
            by_status: Default::default(),
            duration: self
                .duration
                .with_label_values(&[module, route, version, track]),
            in_flight: self.in_flight.with_label_values(&[module, route]),
            instantiate: self.instantiate.with_label_values(&[module]),
            traps: self.guest_failures.with_label_values(&[module, "trap"]),
            timeouts: self.guest_failures.with_label_values(&[module, "timeout"]),
            memory: self
                .guest_failures
                .with_label_values(&[module, "memory_limit"]),
            shed: self.shed.with_label_values(&[module, version]),
            grpc: GrpcMetrics {
                module: module.to_owned(),
                handled: self.grpc_handled.clone(),
                handling: self.grpc_handling.clone(),
                known: Default::default(),
            },
            instances: InstanceMetrics {
                module: module.to_owned(),
                created: self.instances_created.with_label_values(&[module]),
                retired: self.instances_retired.clone(),
                requests: self.requests_per_instance.with_label_values(&[module]),
            },
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];

fn method_slot(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::PATCH => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

type StatusSlots = [OnceLock<IntCounter>; 500];

/// One module's metric handles, resolved at load.
pub struct ModuleMetrics {
    module: String,
    route: String,
    version: String,
    track: &'static str,
    requests: IntCounterVec,
    /// Counters by method, then status code 100..=599, made on first use.
    by_status: [OnceLock<Box<StatusSlots>>; METHODS.len()],
    /// Request duration.
    pub duration: Histogram,
    /// Requests in progress.
    pub in_flight: IntGauge,
    /// Instantiation time.
    pub instantiate: Histogram,
    /// Guest traps.
    pub traps: IntCounter,
    /// Guest timeouts.
    pub timeouts: IntCounter,
    /// Memory-limit hits.
    pub memory: IntCounter,
    /// Requests shed at the concurrency limit.
    pub shed: IntCounter,
    /// Instance lifecycle.
    pub instances: InstanceMetrics,
    /// gRPC calls by method and status.
    pub grpc: GrpcMetrics,
}

/// Most gRPC methods labelled by name, per module version; the rest are
/// `other`, so that a client inventing method names cannot grow the
/// series without bound.
const MAX_GRPC_METHODS: usize = 64;

/// gRPC status names by code (grpc/doc/statuscodes.md).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A module's gRPC calls, by method and status code.
pub struct GrpcMetrics {
    module: String,
    handled: IntCounterVec,
    handling: HistogramVec,
    /// Methods labelled by name: each answered once with a status other
    /// than UNIMPLEMENTED, so a method the module does not have never
    /// gets a series of its own.
    known: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl GrpcMetrics {
    /// Counts a finished call to `path` (`/package.Service/Method`).
    pub fn observe(&self, path: &str, code: u32, elapsed: std::time::Duration) {
        const UNIMPLEMENTED: u32 = 12;
        let named = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(service, method)| {
                path.len() <= 200
                    && !service.is_empty()
                    && !method.is_empty()
                    && !method.contains('/')
            });
        let (service, method) = match named {
            Some(names) => {
                let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                if known.contains(path) {
                    names
                } else if code != UNIMPLEMENTED && known.len() < MAX_GRPC_METHODS {
                    known.insert(path.to_owned());
                    names
                } else {
                    ("other", "other")
                }
            }
            None => ("other", "other"),
        };
        let code = GRPC_CODES.get(code as usize).copied().unwrap_or("UNKNOWN");
        self.handled
            .with_label_values(&[&self.module, service, method, code])
            .inc();
        self.handling
            .with_label_values(&[&self.module, service, method])
            .observe(elapsed.as_secs_f64());
    }
}

/// A module's instance lifecycle: created, retired (with the reason), and
/// requests served per reused instance.
#[derive(Clone)]
pub struct InstanceMetrics {
    module: String,
    /// Instances created.
    pub created: IntCounter,
    retired: IntCounterVec,
    /// Requests per reused instance, observed when it is retired.
    pub requests: Histogram,
}

impl InstanceMetrics {
    /// Counts one retired instance.
    pub fn retired(&self, reason: &str) {
        self.retired
            .with_label_values(&[&self.module, reason])
            .inc();
    }
}

/// A version's request counts so far, for rates over a window.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Requests answered.
    pub requests: u64,
    /// Of those, answered 5xx.
    pub errors: u64,
    /// Cumulative counts at each latency bucket's upper bound (seconds).
    pub buckets: Vec<(f64, u64)>,
}

/// The `q` quantile of `total` observations from cumulative counts at
/// each bucket's upper bound, interpolated within its bucket as
/// Prometheus' `histogram_quantile` does: `None` without observations, the
/// last bound for a rank past it.
pub fn quantile(cumulative: &[(f64, u64)], total: u64, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, n) in cumulative {
        if n > lower.1 && n as f64 >= rank {
            let within = (rank - lower.1 as f64) / (n - lower.1) as f64;
            return Some(lower.0 + (le - lower.0) * within.clamp(0.0, 1.0));
        }
        lower = (le, n);
    }
    Some(lower.0)
}

impl ModuleMetrics {
    /// This version's counts so far.
    pub fn sample(&self) -> Sample {
        use prometheus::core::Metric;
        let errors = self
            .by_status
            .iter()
            .filter_map(|slots| slots.get())
            .flat_map(|slots| slots[400..].iter())
            .filter_map(|c| c.get())
            .map(|c| c.get())
            .sum();
        let metric = self.duration.metric();
        let histogram = &metric.histogram;
        Sample {
            requests: histogram.sample_count(),
            errors,
            buckets: histogram
                .bucket
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect(),
        }
    }

    /// Counts one finished request.
    pub fn count(&self, method: &http::Method, status: u16) {
        let m = method_slot(method);
        let code = usize::from(status.clamp(100, 599)) - 100;
        let slots =
            self.by_status[m].get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        slots[code]
            .get_or_init(|| {
                let status = (code + 100).to_string();
                self.requests.with_label_values(&[
                    &self.module,
                    &self.route,
                    METHODS[m],
                    &status,
                    &self.version,
                    self.track,
                ])
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_the_right_series() {
        let metrics = Metrics::new();
        let m = metrics.for_module("hello", "/hello", "0123456789ab", "stable");
        m.count(&http::Method::GET, 200);
        m.count(&http::Method::GET, 200);
        m.count(&http::Method::POST, 503);
        m.count(&http::Method::from_bytes(b"BREW").unwrap(), 418);
        let text = String::from_utf8(metrics.render()).unwrap();
        for line in [
            r#"berth_http_server_requests_total{method="GET",module="hello",route="/hello",status="200",track="stable",version="0123456789ab"} 2"#,
            r#"berth_http_server_requests_total{method="POST",module="hello",route="/hello",status="503",track="stable",version="0123456789ab"} 1"#,
            r#"berth_http_server_requests_total{method="OTHER",module="hello",route="/hello",status="418",track="stable",version="0123456789ab"} 1"#,
            r#"berth_build_info{version=""#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn guest_metrics_are_prefixed_validated_and_capped() {
        let metrics = Metrics::new();
        let g = metrics.guest("shop-api", 3);
        let l = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        g.counter_add("orders", 2, &l("kind", "book"));
        g.counter_add("orders", 1, &l("kind", "book"));
        g.gauge_set("queue_depth", 7.5, &[]);
        g.histogram_observe("lookup_seconds", 0.02, &[]);
        // Invalid names and labels, a kind mismatch, other label names.
        g.counter_add("bad name", 1, &[]);
        g.counter_add("orders", 1, &l("module", "x"));
        g.gauge_set("orders", 1.0, &l("kind", "book"));
        g.counter_add("orders", 1, &l("other", "x"));
        // Over the cap of 3 series.
        g.counter_add("orders", 1, &l("kind", "pen"));
        let text = String::from_utf8(metrics.render()).unwrap();
        for line in [
            r#"berth_guest_shop_api_orders_total{kind="book",module="shop-api"} 3"#,
            r#"berth_guest_shop_api_queue_depth{module="shop-api"} 7.5"#,
            r#"berth_guest_shop_api_lookup_seconds_count{module="shop-api"} 1"#,
            r#"berth_guest_metrics_dropped_total{module="shop-api",reason="invalid"} 2"#,
            r#"berth_guest_metrics_dropped_total{module="shop-api",reason="mismatch"} 2"#,
            r#"berth_guest_metrics_dropped_total{module="shop-api",reason="series_limit"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"kind="pen""#));
    }

    #[test]
    fn grpc_calls_are_counted_by_method_and_code_with_invented_methods_as_other() {
        let metrics = Metrics::new();
        let m = metrics.for_module("greeter", "/greeter.Greeter", "0123456789ab", "stable");
        let ms = std::time::Duration::from_millis(3);
        m.grpc.observe("/greeter.Greeter/SayHello", 0, ms);
        m.grpc.observe("/greeter.Greeter/SayHello", 3, ms);
        m.grpc.observe("/greeter.Greeter/Nope", 12, ms);
        m.grpc.observe("/greeter.Greeter/Count", 99, ms);
        m.grpc.observe("not-a-method", 0, ms);
        // Once known, a method keeps its name whatever its status.
        m.grpc.observe("/greeter.Greeter/SayHello", 12, ms);
        for i in 0..100 {
            m.grpc.observe(&format!("/x.Y/M{i}"), 0, ms);
        }
        let text = String::from_utf8(metrics.render()).unwrap();
        let labels = |service: &str, method: &str, code: &str| {
            format!(
                r#"berth_grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",grpc_service="{service}",module="greeter"}}"#
            )
        };
        for (line, value) in [
            (labels("greeter.Greeter", "SayHello", "OK"), 1),
            (labels("greeter.Greeter", "SayHello", "INVALID_ARGUMENT"), 1),
            (labels("greeter.Greeter", "SayHello", "UNIMPLEMENTED"), 1),
            (labels("other", "other", "UNIMPLEMENTED"), 1),
            (labels("greeter.Greeter", "Count", "UNKNOWN"), 1),
            // The bad path, then 100 - (64 - 2) invented methods past the cap.
            (labels("other", "other", "OK"), 1 + 100 - 62),
        ] {
            assert!(
                text.contains(&format!("{line} {value}\n")),
                "missing {line} {value} in\n{text}"
            );
        }
        assert!(!text.contains(r#"grpc_method="Nope""#));
        assert!(text.contains(
            r#"berth_grpc_server_handling_seconds_count{grpc_method="SayHello",grpc_service="greeter.Greeter",module="greeter"} 3"#
        ));
    }

    #[test]
    fn a_guest_chooses_its_histogram_buckets_before_the_first_observation() {
        let metrics = Metrics::new();
        let g = metrics.guest("m", 4);
        g.histogram_buckets("size_bytes", &[100.0, 1000.0, 10000.0]);
        g.histogram_buckets("size_bytes", &[100.0, 1000.0, 10000.0]);
        g.histogram_observe("size_bytes", 512.0, &[]);
        g.histogram_observe("size_bytes", 20000.0, &[]);
        // Too late: the histogram exists, with other bounds.
        g.histogram_buckets("size_bytes", &[1.0]);
        g.histogram_observe("default_seconds", 0.2, &[]);
        g.histogram_buckets("default_seconds", &[1.0, 2.0]);
        // Invalid: not increasing, not finite, none, too many.
        g.histogram_buckets("a", &[2.0, 1.0]);
        g.histogram_buckets("b", &[1.0, 1.0]);
        g.histogram_buckets("c", &[f64::NAN]);
        g.histogram_buckets("d", &[1.0, f64::INFINITY]);
        g.histogram_buckets("e", &[]);
        let many: Vec<f64> = (0..65).map(f64::from).collect();
        g.histogram_buckets("f", &many);
        g.histogram_buckets("bad name", &[1.0]);
        let text = String::from_utf8(metrics.render()).unwrap();
        for line in [
            r#"berth_guest_m_size_bytes_bucket{module="m",le="100"} 0"#,
            r#"berth_guest_m_size_bytes_bucket{module="m",le="1000"} 1"#,
            r#"berth_guest_m_size_bytes_bucket{module="m",le="10000"} 1"#,
            r#"berth_guest_m_size_bytes_bucket{module="m",le="+Inf"} 2"#,
            r#"berth_guest_m_default_seconds_bucket{module="m",le="0.25"} 1"#,
            r#"berth_guest_metrics_dropped_total{module="m",reason="invalid"} 7"#,
            r#"berth_guest_metrics_dropped_total{module="m",reason="mismatch"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"size_bytes_bucket{module="m",le="1"}"#));
        // Choices are capped like families.
        for i in 0..10 {
            g.histogram_buckets(&format!("h{i}"), &[1.0]);
        }
        assert_eq!(g.state.lock().unwrap().buckets.len(), 4);
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains(
                r#"berth_guest_metrics_dropped_total{module="m",reason="series_limit"} 7"#
            ),
            "{text}"
        );
    }

    #[test]
    fn new_guest_families_past_the_cap_are_never_registered() {
        let metrics = Metrics::new();
        let g = metrics.guest("m", 2);
        g.counter_add("a", 1, &[]);
        g.counter_add("b", 1, &[]);
        for i in 0..100 {
            g.counter_add(&format!("invented_{i}"), 1, &[]);
        }
        assert_eq!(g.state.lock().unwrap().families.len(), 2);
        let families = metrics.registry.gather();
        assert!(!families.iter().any(|f| f.name().contains("invented")));
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains(
                r#"berth_guest_metrics_dropped_total{module="m",reason="series_limit"} 100"#
            ),
            "{text}"
        );
    }
}

/// Why a guest metric update was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The name or a label is not valid.
    Invalid,
    /// Used before with another kind or other label names.
    Mismatch,
    /// The module is at its series cap.
    SeriesLimit,
}

impl Dropped {
    fn label(self) -> &'static str {
        match self {
            Dropped::Invalid => "invalid",
            Dropped::Mismatch => "mismatch",
            Dropped::SeriesLimit => "series_limit",
        }
    }
}

enum GuestFamily {
    Counter(prometheus::IntCounterVec),
    Gauge(prometheus::GaugeVec),
    Histogram(HistogramVec),
}

impl GuestFamily {
    fn kind(&self) -> &'static str {
        match self {
            GuestFamily::Counter(_) => "counter",
            GuestFamily::Gauge(_) => "gauge",
            GuestFamily::Histogram(_) => "histogram",
        }
    }
}

struct GuestFamilies {
    /// By guest name: the family and its label names (after `module`).
    families: std::collections::HashMap<String, (GuestFamily, Vec<String>)>,
    /// Bucket bounds a guest chose (`histogram-buckets`), by guest name.
    /// Kept once the histogram exists, to tell a repeat from a change.
    buckets: std::collections::HashMap<String, Vec<f64>>,
    /// Every series made, by family name and label values.
    series: std::collections::HashSet<(String, Vec<String>)>,
}

/// The metrics one module defines through `berth:metrics`, exported as
/// `berth_guest_<module>_<name>{module=..., ...}`. They outlive reloads of
/// the module.
pub struct GuestMetrics {
    module: String,
    prefix: String,
    registry: Registry,
    max_series: std::sync::atomic::AtomicUsize,
    state: std::sync::Mutex<GuestFamilies>,
    dropped: IntCounterVec,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 100
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

impl GuestMetrics {
    /// Adds to a counter.
    pub fn counter_add(&self, name: &str, value: u64, labels: &[(String, String)]) {
        self.update(name, labels, "counter", |family, values| match family {
            GuestFamily::Counter(c) => c.with_label_values(values).inc_by(value),
            _ => unreachable!("kind checked"),
        });
    }

    /// Sets a gauge.
    pub fn gauge_set(&self, name: &str, value: f64, labels: &[(String, String)]) {
        self.update(name, labels, "gauge", |family, values| match family {
            GuestFamily::Gauge(g) => g.with_label_values(values).set(value),
            _ => unreachable!("kind checked"),
        });
    }

    /// Chooses the buckets of a histogram before its first observation:
    /// 1 to 64 finite bounds, strictly increasing. The same bounds again
    /// are a no-op; other bounds for a histogram that exists, or bounds
    /// for a name used with another kind, are a mismatch.
    pub fn histogram_buckets(&self, name: &str, bounds: &[f64]) {
        const MAX_BUCKETS: usize = 64;
        let valid = valid_name(name)
            && (1..=MAX_BUCKETS).contains(&bounds.len())
            && bounds.iter().all(|b| b.is_finite())
            && bounds.windows(2).all(|w| w[0] < w[1]);
        if !valid {
            return self.drop_update(name, Dropped::Invalid);
        }
        let mut state = self.state.lock().unwrap();
        if let Some(chosen) = state.buckets.get(name) {
            if chosen.as_slice() != bounds {
                drop(state);
                self.drop_update(name, Dropped::Mismatch);
            }
            return;
        }
        if state.families.contains_key(name) {
            // Made already, with the default buckets or as another kind.
            drop(state);
            return self.drop_update(name, Dropped::Mismatch);
        }
        // Choices count against the cap like families: a guest inventing
        // names must not grow the host's memory either.
        let max = self.max_series.load(std::sync::atomic::Ordering::Relaxed);
        if state.buckets.len() >= max {
            drop(state);
            return self.drop_update(name, Dropped::SeriesLimit);
        }
        state.buckets.insert(name.to_owned(), bounds.to_vec());
    }

    /// Observes a histogram value.
    pub fn histogram_observe(&self, name: &str, value: f64, labels: &[(String, String)]) {
        self.update(name, labels, "histogram", |family, values| match family {
            GuestFamily::Histogram(h) => h.with_label_values(values).observe(value),
            _ => unreachable!("kind checked"),
        });
    }

    fn drop_update(&self, name: &str, why: Dropped) {
        let counter = self.dropped.with_label_values(&[&self.module, why.label()]);
        // Warn on the first drop of each kind only; the counter says the rest.
        if counter.get() == 0 {
            tracing::warn!(
                module = self.module.as_str(),
                metric = name,
                reason = why.label(),
                "guest metric update dropped"
            );
        }
        counter.inc();
    }

    fn update(
        &self,
        name: &str,
        labels: &[(String, String)],
        kind: &str,
        apply: impl FnOnce(&GuestFamily, &[&str]),
    ) {
        let labels_ok = labels.len() <= 10
            && labels
                .iter()
                .all(|(k, v)| valid_name(k) && k != "module" && v.len() <= 256);
        if !valid_name(name) || !labels_ok {
            return self.drop_update(name, Dropped::Invalid);
        }
        let mut sorted: Vec<&(String, String)> = labels.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<String> = sorted.iter().map(|(k, _)| k.clone()).collect();
        let mut values: Vec<&str> = vec![&self.module];
        values.extend(sorted.iter().map(|(_, v)| v.as_str()));

        let mut state = self.state.lock().unwrap();
        let max = self.max_series.load(std::sync::atomic::Ordering::Relaxed);
        if !state.families.contains_key(name) {
            // Every family needs a series, so the series cap bounds them
            // too, checked before registering: a guest inventing names
            // must not grow the registry with empty families.
            if state.series.len() >= max || state.families.len() >= max {
                return self.drop_update(name, Dropped::SeriesLimit);
            }
            match self.create(name, kind, &keys, state.buckets.get(name)) {
                Some(family) => {
                    state
                        .families
                        .insert(name.to_owned(), (family, keys.clone()));
                }
                None => return self.drop_update(name, Dropped::Mismatch),
            }
        }
        let (family, family_keys) = &state.families[name];
        if *family_keys != keys || family.kind() != kind {
            return self.drop_update(name, Dropped::Mismatch);
        }
        let series_key = (
            name.to_owned(),
            values.iter().map(|v| v.to_string()).collect(),
        );
        let is_new = !state.series.contains(&series_key);
        if is_new && state.series.len() >= max {
            return self.drop_update(name, Dropped::SeriesLimit);
        }
        apply(&state.families[name].0, &values);
        if is_new {
            state.series.insert(series_key);
        }
    }

    fn create(
        &self,
        name: &str,
        kind: &str,
        keys: &[String],
        buckets: Option<&Vec<f64>>,
    ) -> Option<GuestFamily> {
        let mut label_names: Vec<&str> = vec!["module"];
        label_names.extend(keys.iter().map(String::as_str));
        let full = format!("{}{name}", self.prefix);
        let help = format!("Defined by module {}.", self.module);
        let family = match kind {
            "counter" => {
                let full = if full.ends_with("_total") {
                    full
                } else {
                    full + "_total"
                };
                GuestFamily::Counter(
                    prometheus::IntCounterVec::new(Opts::new(full, help), &label_names).ok()?,
                )
            }
            "gauge" => GuestFamily::Gauge(
                prometheus::GaugeVec::new(Opts::new(full, help), &label_names).ok()?,
            ),
            _ => GuestFamily::Histogram(
                HistogramVec::new(
                    HistogramOpts::new(full, help)
                        .buckets(buckets.map_or_else(|| LATENCY_BUCKETS.to_vec(), Vec::clone)),
                    &label_names,
                )
                .ok()?,
            ),
        };
        let collector: Box<dyn prometheus::core::Collector> = match &family {
            GuestFamily::Counter(c) => Box::new(c.clone()),
            GuestFamily::Gauge(g) => Box::new(g.clone()),
            GuestFamily::Histogram(h) => Box::new(h.clone()),
        };
        // Fails when the name is taken (e.g. by another kind): a mismatch.
        self.registry.register(collector).ok()?;
        Some(family)
    }
}

impl Metrics {
    /// The guest-defined metrics of `module` (made on first use, kept
    /// across reloads), with its series cap.
    pub fn guest(&self, module: &str, max_series: usize) -> std::sync::Arc<GuestMetrics> {
        let mut all = self.guest.lock().unwrap();
        let gm = all
            .entry(module.to_owned())
            .or_insert_with(|| {
                let sanitized: String = module
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                std::sync::Arc::new(GuestMetrics {
                    module: module.to_owned(),
                    prefix: format!("berth_guest_{sanitized}_"),
                    registry: self.registry.clone(),
                    max_series: max_series.into(),
                    state: std::sync::Mutex::new(GuestFamilies {
                        families: Default::default(),
                        buckets: Default::default(),
                        series: Default::default(),
                    }),
                    dropped: self.guest_dropped.clone(),
                })
            })
            .clone();
        gm.max_series
            .store(max_series, std::sync::atomic::Ordering::Relaxed);
        gm
    }
}
