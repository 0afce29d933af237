//! Outbound HTTP of guests. Every `wasi:http/outgoing-handler` call goes
//! through [`OutboundHooks::send_request`], which applies, in order:
//!
//! 1. the module's allow-list, deny by default; loopback, link-local and
//!    metadata destinations only through an exact rule: IP literals are
//!    checked here, names in the resolver the connector uses (see
//!    [`resolve`]), on the addresses it actually connects to;
//! 2. the circuit breaker of the upstream (fail fast while open);
//! 3. timeouts: connect (per client), first byte (per attempt), between
//!    bytes (response body) and total (the whole call), the guest's own
//!    `request-options` honoured but capped by the host's;
//! 4. retries with exponential back-off and full jitter, for connect errors
//!    and for 502/503/504 on idempotent methods, honouring `Retry-After`,
//!    within a retry budget per upstream (tower's `TpsBudget`);
//! 5. pooled connections (hyper-util's client, one pool per module,
//!    connect timeout, guard setting and protocol, so a connection made
//!    under one policy is never reused under another, and one module's
//!    calls never queue behind another's on a shared HTTP/2 connection,
//!    for its streams or its flow-control window).
//!
//! Each (module, upstream) pair keeps its own breaker, budget and metric
//! handles, created on the first call.

mod body;
mod breaker;
mod policy;
mod resolve;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Scheme;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanBuilder, SpanKind};
use prometheus::{Histogram, IntCounter};
use tower::retry::budget::{Budget, TpsBudget};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{Error, RequestOptions, WasiHttpHooks};

use self::body::{BetweenBytes, ReplayBody};
use self::breaker::Breaker;
pub use self::policy::is_restricted;
use self::resolve::{GuardedResolver, Lookup};
use crate::config::{OutboundConfig, OutboundSpec, Specificity, default_port};
use crate::metrics::Metrics;
use crate::trace::TraceContext;

type HttpsClient =
    Client<hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>, HyperOutgoingBody>;
type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// Pooled HTTP clients: one per connect timeout (it belongs to the
/// connector), per guard setting (whether restricted addresses are
/// filtered out of name lookups) and per protocol. The host holds one set
/// for its own downloads and each module one of its own
/// ([`Clients::for_module`]).
pub struct Clients {
    lookup: Lookup,
    pools: Mutex<HashMap<(Duration, Guard, Protocol), HttpsClient>>,
}

/// How a client picks the HTTP version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Protocol {
    /// HTTP/1.1 in the clear; over TLS, HTTP/2 when the server offers it
    /// by ALPN. Each pooled HTTP/2 connection carries many calls at once.
    Negotiated,
    /// HTTP/2 with prior knowledge (h2c) in the clear, as configured for
    /// the upstream; over TLS still by ALPN.
    H2c,
}

/// Whether a client may connect to restricted addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Guard {
    /// Restricted addresses are filtered out (wildcard rules).
    On,
    /// An exact rule names the host: whatever it resolves to is allowed.
    Off,
}

impl Default for Clients {
    fn default() -> Self {
        Clients::with_lookup(resolve::system_lookup())
    }
}

impl Clients {
    fn with_lookup(lookup: Lookup) -> Self {
        Clients {
            lookup,
            pools: Mutex::default(),
        }
    }

    /// An empty set of pools resolving names as these do, for one module.
    pub fn for_module(&self) -> Arc<Clients> {
        Arc::new(Clients::with_lookup(self.lookup.clone()))
    }

    fn get(&self, connect_timeout: Duration, guard: Guard, protocol: Protocol) -> HttpsClient {
        let mut clients = self.pools.lock().unwrap();
        clients
            .entry((connect_timeout, guard, protocol))
            .or_insert_with(|| {
                let resolver = GuardedResolver::new(self.lookup.clone(), guard == Guard::On);
                let mut http = HttpConnector::new_with_resolver(resolver);
                http.enforce_http(false);
                http.set_nodelay(true);
                http.set_connect_timeout(Some(connect_timeout));
                // The platform's roots: the image's CA bundle, or
                // SSL_CERT_FILE / SSL_CERT_DIR for a private CA.
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_platform_verifier(rustls::crypto::ring::default_provider())
                    .expect("ring offers the default protocol versions")
                    .https_or_http()
                    .enable_all_versions()
                    .wrap_connector(http);
                let mut client = Client::builder(TokioExecutor::new());
                client
                    .pool_idle_timeout(Duration::from_secs(60))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    // A multiplexed connection that went silent without a
                    // FIN (a NAT or a node gone) would fail every call on
                    // it, since a call's timeout only resets its stream:
                    // pings, busy or idle, find it out within 10 s.
                    .http2_keep_alive_interval(H2_PING_EVERY)
                    .http2_keep_alive_timeout(H2_PING_EVERY)
                    .http2_keep_alive_while_idle(true);
                if protocol == Protocol::H2c {
                    client.http2_only(true);
                }
                client.build(https)
            })
            .clone()
    }
}

impl Clients {
    /// Downloads `url` whole (for URL-sourced modules), at most `limit`
    /// bytes, within a minute. Errors are ready to show to an operator.
    pub async fn download(&self, url: &str, limit: usize) -> Result<Vec<u8>, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
        // The operator wrote the URL: no guard.
        let client = self.get(Duration::from_secs(10), Guard::Off, Protocol::Negotiated);
        let req = Request::get(uri)
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let resp = client.request(req).await.map_err(|e| format!("{e:#}"))?;
            if !resp.status().is_success() {
                return Err(format!("the server answered {}", resp.status()));
            }
            let body = http_body_util::Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(Duration::from_secs(60), fetch)
            .await
            .map_err(|_| "download timed out after 60s".to_owned())?
    }
}

/// The outbound side of one module, shared by all its instances.
pub struct ModuleOutbound {
    module: Arc<str>,
    spec: OutboundSpec,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    denied: IntCounter,
    upstreams: Mutex<Upstreams>,
}

impl ModuleOutbound {
    /// The outbound state of module `module`, with connection pools of its
    /// own made like `clients`.
    pub fn new(
        module: Arc<str>,
        spec: OutboundSpec,
        clients: &Clients,
        metrics: Arc<Metrics>,
    ) -> Self {
        ModuleOutbound {
            denied: metrics.outbound_denied.with_label_values(&[&module]),
            module,
            spec,
            clients: clients.for_module(),
            metrics,
            upstreams: Mutex::default(),
        }
    }

    fn deny(&self, uri: &http::Uri, why: &str) -> Error {
        self.denied.inc();
        tracing::warn!(
            module = &*self.module,
            uri = %crate::redact::url(&uri.to_string()),
            reason = why,
            "outbound request denied"
        );
        Error::HttpRequestDenied
    }

    async fn send(
        self: Arc<Self>,
        request: Request<HyperOutgoingBody>,
        guest: Option<RequestOptions>,
        trace: TraceContext,
    ) -> Result<(Response<HyperOutgoingBody>, IoFuture), Error> {
        let mut request = request;
        let Some(host) = normalize(&mut request) else {
            return Err(Error::HttpRequestUriInvalid);
        };
        let host = host.as_str();
        let uri = request.uri().clone();
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or_else(|| default_port(&scheme));
        let Some(specificity) = self.spec.allow.matches(&scheme, host, port) else {
            return Err(self.deny(&uri, "destination not in allowed_outbound_hosts"));
        };
        let guard = if specificity == Specificity::Exact {
            Guard::Off
        } else {
            Guard::On
        };
        // Names are judged by the resolver; literals never reach it.
        if guard == Guard::On
            && let Ok(ip) = host.parse::<IpAddr>()
            && is_restricted(ip)
        {
            return Err(self.deny(&uri, RESTRICTED));
        }
        let upstream = self.upstream(&scheme, host, port, guard);
        let trace = trace.child(|| {
            SpanBuilder::from_name(format!("{} {}", request.method(), upstream.label))
                .with_kind(SpanKind::Client)
                .with_attributes([
                    KeyValue::new("http.request.method", request.method().to_string()),
                    KeyValue::new("server.address", host.to_owned()),
                    KeyValue::new("server.port", i64::from(port)),
                    KeyValue::new("url.full", crate::redact::url(&uri.to_string())),
                    KeyValue::new("module", self.module.clone()),
                ])
        });
        upstream.call(request, guest, trace).await
    }

    /// The state of one upstream, made on its first allowed call. At most
    /// [`MAX_UPSTREAMS`] upstreams of a module get their own entry and
    /// metric label; calls to any further one share the `other` entry,
    /// whose breaker is off (it would mix unrelated hosts). Entries idle
    /// for [`UPSTREAM_IDLE`] are dropped; their labels stay reserved, so
    /// the module's series stay bounded.
    fn upstream(&self, scheme: &Scheme, host: &str, port: u16, guard: Guard) -> Arc<Upstream> {
        let mut label = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut upstreams = self.upstreams.lock().unwrap();
        let now = Instant::now();
        upstreams.evict_idle(now);
        let known = upstreams.labels.contains(&label);
        // An upstream the config names keeps its own entry and settings
        // (`h2c` above all) whatever else the module called first; the
        // config bounds how many there are.
        let configured = self.spec.upstreams.contains_key(&label);
        if !known && !configured && upstreams.labels.len() >= MAX_UPSTREAMS {
            label = OTHER.to_owned();
        } else if !known {
            upstreams.labels.insert(label.clone());
        }
        let key = format!("{scheme}://{label}/{guard:?}");
        let upstream = upstreams
            .entries
            .entry(key)
            .or_insert_with(|| {
                let mut config = self
                    .spec
                    .upstreams
                    .get(&label)
                    .map_or(self.spec.config, |o| o.over(self.spec.config));
                if label == OTHER {
                    config.circuit_breaker.failures = 0;
                }
                let m = &self.metrics;
                let labels = [&*self.module, label.as_str()];
                let protocol = if config.h2c && *scheme == Scheme::HTTP {
                    Protocol::H2c
                } else {
                    Protocol::Negotiated
                };
                Arc::new(Upstream {
                    client: self.clients.get(config.connect_timeout, guard, protocol),
                    guard,
                    protocol,
                    clients: self.clients.clone(),
                    breaker: Breaker::new(
                        config.circuit_breaker,
                        m.breaker_state.with_label_values(&labels),
                    ),
                    // 10 s window; a reserve of 1 retry per second so a
                    // quiet upstream can still be retried.
                    budget: TpsBudget::new(Duration::from_secs(10), 1, config.retry_budget),
                    duration: m.outbound_duration.with_label_values(&labels),
                    retries: m.outbound_retries.with_label_values(&labels),
                    metrics: m.clone(),
                    module: self.module.clone(),
                    label,
                    config,
                    denied: self.denied.clone(),
                    last_used: Mutex::new(now),
                })
            })
            .clone();
        *upstream.last_used.lock().unwrap() = now;
        upstream
    }
}

/// How often a pooled HTTP/2 connection is pinged, and how long an answer
/// may take.
const H2_PING_EVERY: Duration = Duration::from_secs(5);

/// The most upstreams one module keeps apart; see [`ModuleOutbound::upstream`].
const MAX_UPSTREAMS: usize = 64;

/// How long an upstream entry (breaker, budget, pooled client) is kept
/// after its last call.
const UPSTREAM_IDLE: Duration = Duration::from_secs(600);

/// The label of the upstreams past [`MAX_UPSTREAMS`].
const OTHER: &str = "other";

/// A module's upstream entries, and every label it has used.
#[derive(Default)]
struct Upstreams {
    entries: HashMap<String, Arc<Upstream>>,
    labels: std::collections::HashSet<String>,
}

impl Upstreams {
    /// Drops the entries unused for [`UPSTREAM_IDLE`] as of `now`.
    fn evict_idle(&mut self, now: Instant) {
        self.entries.retain(|_, u| {
            now.saturating_duration_since(*u.last_used.lock().unwrap()) < UPSTREAM_IDLE
        });
    }
}

/// Brings the request's host to one spelling (lower case, no trailing dot,
/// IDNA's ASCII form, no userinfo), so the allow-list, the upstream entries,
/// the metric labels and hyper's pool all see the same name however the
/// guest wrote it. Returns the host (without brackets), or `None` when it is
/// not a valid host.
fn normalize(request: &mut Request<HyperOutgoingBody>) -> Option<String> {
    let uri = request.uri();
    let raw = uri.host()?;
    let host = match raw
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => ip.to_string(),
        Err(_) => {
            let ascii = idna::domain_to_ascii(raw.trim_end_matches('.')).ok()?;
            if ascii.is_empty() {
                return None;
            }
            ascii
        }
    };
    let shown = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let authority = match uri.port_u16() {
        Some(port) => format!("{shown}:{port}"),
        None => shown,
    };
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(authority.parse().ok()?);
    *request.uri_mut() = http::Uri::from_parts(parts).ok()?;
    Some(host)
}

/// One upstream as seen by one module.
struct Upstream {
    module: Arc<str>,
    label: String,
    config: OutboundConfig,
    client: HttpsClient,
    /// For guests that ask for a shorter connect timeout than the host's.
    clients: Arc<Clients>,
    breaker: Breaker,
    budget: TpsBudget,
    metrics: Arc<Metrics>,
    duration: Histogram,
    retries: IntCounter,
    /// Whether this upstream's connections filter restricted addresses.
    guard: Guard,
    /// How its connections choose the HTTP version.
    protocol: Protocol,
    /// The module's count of denied calls.
    denied: IntCounter,
    /// When a call last used this entry.
    last_used: Mutex<Instant>,
}

/// Why a call to a restricted address is refused.
const RESTRICTED: &str =
    "destination is a loopback, link-local or metadata address, allowed only by an exact rule";

/// Why one attempt got no response; decides the retry, the metric label
/// and what the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No connection: refused, unreachable, or over the connect timeout.
    /// The request never reached the upstream.
    Connect {
        /// Whether it was the connect timeout.
        timed_out: bool,
    },
    /// The name resolved only to addresses the guard refuses.
    Denied,
    /// No response head within the first-byte timeout.
    Timeout,
    /// The connection broke or the upstream spoke garbage.
    Protocol,
}

impl Failure {
    /// Classifies a client error.
    fn of(err: &hyper_util::client::legacy::Error) -> Failure {
        if resolve::is_restricted_error(err) {
            return Failure::Denied;
        }
        if !err.is_connect() {
            return Failure::Protocol;
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return Failure::Connect { timed_out: true };
            }
            source = e.source();
        }
        Failure::Connect { timed_out: false }
    }

    /// Safe to try again whatever the method: the upstream saw nothing.
    /// A timeout or a broken connection may have left the request
    /// half-done upstream, so those are not retried.
    fn retryable(self) -> bool {
        matches!(self, Failure::Connect { .. })
    }

    /// The `outcome` label of `berth_outbound_requests_total`.
    fn label(self) -> &'static str {
        match self {
            Failure::Connect { .. } => "connect",
            Failure::Denied => "denied",
            Failure::Timeout => "timeout",
            Failure::Protocol => "protocol",
        }
    }

    /// The `wasi:http` error the guest gets.
    fn error(self) -> Error {
        match self {
            Failure::Connect { timed_out: true } => Error::ConnectionTimeout,
            Failure::Connect { timed_out: false } => Error::ConnectionRefused,
            Failure::Denied => Error::HttpRequestDenied,
            Failure::Timeout => Error::ConnectionReadTimeout,
            Failure::Protocol => Error::HttpProtocolError,
        }
    }
}

/// How one attempt went.
enum Attempt {
    Response(Response<hyper::body::Incoming>),
    Failed(Failure),
}

impl Attempt {
    /// The status, or why there is none.
    fn outcome(&self) -> Result<StatusCode, Failure> {
        match self {
            Attempt::Response(r) => Ok(r.status()),
            Attempt::Failed(failure) => Err(*failure),
        }
    }

    /// `Retry-After` in seconds (the HTTP-date form is ignored).
    fn retry_after(&self) -> Option<Duration> {
        let Attempt::Response(resp) = self else {
            return None;
        };
        let secs: u64 = resp
            .headers()
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Duration::from_secs(secs))
    }
}

/// An answer that says the upstream is overloaded or down.
fn unavailable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Whether the breaker counts an attempt against the upstream.
fn counts_against(outcome: Result<StatusCode, Failure>) -> bool {
    outcome.map_or(true, unavailable)
}

/// Whether another attempt may fix this one: a connection that was never
/// made, or an unavailable answer to a request that may be repeated. The
/// retry count, the budget, the deadline and whether the body can be
/// replayed are decided by the caller.
fn worth_retrying(outcome: Result<StatusCode, Failure>, idempotent: bool) -> bool {
    match outcome {
        Err(failure) => failure.retryable(),
        Ok(status) => idempotent && unavailable(status),
    }
}

/// The timeouts of one call: the host's, shortened where the guest asks.
struct CallLimits {
    client: HttpsClient,
    first_byte: Duration,
    between_bytes: Duration,
    deadline: Instant,
}

impl Upstream {
    fn count(&self, outcome: &str) {
        self.metrics
            .outbound_requests
            .with_label_values(&[&*self.module, &self.label, outcome])
            .inc();
    }

    fn limits(&self, guest: Option<RequestOptions>) -> CallLimits {
        let cfg = &self.config;
        let guest = guest.unwrap_or_default();
        let cap = |asked: Option<Duration>, host: Duration| asked.map_or(host, |a| a.min(host));
        // The connect timeout lives in the connector, so a shorter one from
        // the guest picks another pooled client, rounded up to 100 ms so
        // guests cannot make one pool per nanosecond.
        let client = match guest.connect_timeout {
            Some(asked) if asked < cfg.connect_timeout => self.clients.get(
                round_up_100ms(asked).min(cfg.connect_timeout),
                self.guard,
                self.protocol,
            ),
            _ => self.client.clone(),
        };
        CallLimits {
            client,
            first_byte: cap(guest.first_byte_timeout, cfg.first_byte_timeout),
            between_bytes: cap(guest.between_bytes_timeout, cfg.between_bytes_timeout),
            deadline: Instant::now() + cfg.timeout,
        }
    }

    /// Sends the request once and waits for the response head.
    async fn attempt(&self, limits: &CallLimits, req: Request<HyperOutgoingBody>) -> Attempt {
        let left = limits.deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(limits.first_byte.min(left), limits.client.request(req)).await {
            Ok(Ok(resp)) => Attempt::Response(resp),
            Ok(Err(e)) => Attempt::Failed(Failure::of(&e)),
            Err(_) => Attempt::Failed(Failure::Timeout),
        }
    }

    /// How long to wait before attempt number `attempt + 1`, if it may
    /// happen at all: within the retry count, the deadline and the budget.
    fn retry_wait(&self, result: &Attempt, attempt: u32, deadline: Instant) -> Option<Duration> {
        let cfg = &self.config;
        if attempt >= cfg.retries {
            return None;
        }
        let wait = backoff(cfg, attempt).max(result.retry_after().unwrap_or_default());
        // `Retry-After` is the upstream's to choose: compared with what is
        // left, never added to an instant (where a huge one overflows).
        let left = deadline.saturating_duration_since(Instant::now());
        (wait < left && self.budget.withdraw()).then_some(wait)
    }

    async fn call(
        &self,
        request: Request<HyperOutgoingBody>,
        guest: Option<RequestOptions>,
        trace: TraceContext,
    ) -> Result<(Response<HyperOutgoingBody>, IoFuture), Error> {
        let started = Instant::now();
        let limits = self.limits(guest);
        let (mut parts, body) = request.into_parts();
        trace.inject(&mut parts.headers);
        // Streamed from the first byte, never read ahead: the guest may be
        // waiting for the response head before it writes its body.
        let body = ReplayBody::new(body, self.config.max_retry_body.0);
        let idempotent = parts.method.is_idempotent() || self.config.retry_non_idempotent;
        self.budget.deposit();

        let mut attempt = 0u32;
        let outcome = loop {
            let Some(admission) = self.breaker.admit() else {
                return Err(self.circuit_open(&trace));
            };
            let req = Request::from_parts(parts.clone(), body.replay().boxed_unsync());
            let result = self.attempt(&limits, req).await;
            admission.record(!counts_against(result.outcome()));
            if body.replayable()
                && worth_retrying(result.outcome(), idempotent)
                && let Some(wait) = self.retry_wait(&result, attempt, limits.deadline)
            {
                attempt += 1;
                self.retries.inc();
                drop(result);
                tokio::time::sleep(wait).await;
                continue;
            }
            break result;
        };
        self.duration.observe(started.elapsed().as_secs_f64());
        match outcome {
            Attempt::Response(resp) => Ok(self.answered(resp, &trace, limits.between_bytes)),
            Attempt::Failed(failure) => Err(self.failed(failure, &trace, attempt + 1)),
        }
    }

    fn circuit_open(&self, trace: &TraceContext) -> Error {
        self.count("circuit_open");
        trace.span.fail("circuit open");
        tracing::warn!(
            module = &*self.module,
            upstream = self.label.as_str(),
            trace_id = %trace,
            "outbound call failed fast: circuit open"
        );
        Error::DestinationUnavailable
    }

    fn answered(
        &self,
        resp: Response<hyper::body::Incoming>,
        trace: &TraceContext,
        between_bytes: Duration,
    ) -> (Response<HyperOutgoingBody>, IoFuture) {
        self.count(resp.status().as_str());
        trace.span.record_status(resp.status().as_u16());
        let resp = resp.map(|b| BetweenBytes::new(b, between_bytes).boxed_unsync());
        (resp, Box::new(async { Ok(()) }) as IoFuture)
    }

    fn failed(&self, failure: Failure, trace: &TraceContext, attempts: u32) -> Error {
        self.count(failure.label());
        if failure == Failure::Denied {
            self.denied.inc();
            tracing::warn!(
                module = &*self.module,
                upstream = self.label.as_str(),
                trace_id = %trace,
                reason = RESTRICTED,
                "outbound request denied"
            );
        } else {
            trace.span.fail(failure.error().to_string());
            tracing::warn!(
                module = &*self.module,
                upstream = self.label.as_str(),
                error = %failure.error(),
                trace_id = %trace,
                attempts,
                "outbound call failed"
            );
        }
        failure.error()
    }
}

fn round_up_100ms(d: Duration) -> Duration {
    let steps = d.as_millis().div_ceil(100).max(1);
    Duration::from_millis(u64::try_from(steps * 100).unwrap_or(u64::MAX))
}

/// Exponential back-off with full jitter: uniform in
/// `[0, min(max, base * 2^attempt)]`, so retrying clients spread out.
fn backoff(cfg: &OutboundConfig, attempt: u32) -> Duration {
    let cap = cfg
        .retry_backoff
        .saturating_mul(1u32 << attempt.min(16))
        .min(cfg.retry_backoff_max);
    Duration::from_micros(fastrand::u64(0..=cap.as_micros() as u64))
}

/// The per-store hook object wasmtime-wasi-http calls for outbound requests.
pub struct OutboundHooks {
    /// The module's outbound state.
    pub outbound: Arc<ModuleOutbound>,
    /// The request's trace, continued by each call.
    pub trace: TraceContext,
    /// The request's deadline, carried onward by gRPC calls.
    pub deadline: Option<tokio::time::Instant>,
    /// On a reused instance, which serves several requests: the trace and
    /// deadline of the request whose task makes the call, looked up when
    /// it does (in place of the two above). Looked up here, not on every
    /// host call that touches `wasi:http`, which would be a lock and two
    /// context clones each time.
    pub current: Option<CurrentRequest>,
}

/// The trace and deadline of the request a reused instance is serving now.
pub type CurrentRequest =
    Arc<dyn Fn() -> (TraceContext, Option<tokio::time::Instant>) + Send + Sync>;

/// A `grpc-timeout` value: milliseconds, rounded up (a budget of 0 would
/// read as "expired"), at most the spec's eight digits.
pub fn grpc_timeout(budget: Duration) -> http::HeaderValue {
    let ms = budget.as_micros().div_ceil(1000).clamp(1, 99_999_999);
    http::HeaderValue::from_str(&format!("{ms}m")).expect("digits and a unit")
}

/// `TimeoutValue TimeoutUnit` of the gRPC over HTTP/2 spec: at most eight
/// digits, then H, M, S, m, u or n.
pub fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Shortens an outbound gRPC call's `grpc-timeout` to what is left of the
/// inbound request's time (gRPC's deadline propagation); an upstream then
/// stops working on an answer nobody will wait for. Other calls, and
/// calls whose own `grpc-timeout` is shorter, are left alone.
fn propagate_deadline(headers: &mut http::HeaderMap, deadline: Option<tokio::time::Instant>) {
    let Some(deadline) = deadline else { return };
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.trim_start().get(.."application/grpc".len()))
        .is_some_and(|ct| ct.eq_ignore_ascii_case("application/grpc"));
    if !grpc {
        return;
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let own = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    if own.is_none_or(|own| left < own) {
        headers.insert("grpc-timeout", grpc_timeout(left));
    }
}

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: Request<HyperOutgoingBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = Result<(Response<HyperOutgoingBody>, IoFuture), Error>> + Send>
    {
        let (trace, deadline) = match &self.current {
            Some(current) => current(),
            None => (self.trace.clone(), self.deadline),
        };
        let mut request = request;
        propagate_deadline(request.headers_mut(), deadline);
        Box::new(self.outbound.clone().send(request, options, trace))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_bad_ones_are_refused() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10 S", "1x"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_grpc_call_carries_what_is_left_of_the_request_deadline_onward() {
        let grpc = |timeout: Option<&str>| {
            let mut h = http::HeaderMap::new();
            h.insert("content-type", "application/grpc+proto".parse().unwrap());
            if let Some(t) = timeout {
                h.insert("grpc-timeout", t.parse().unwrap());
            }
            h
        };
        let deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
        let left = |h: &http::HeaderMap| {
            parse_grpc_timeout(h.get("grpc-timeout").unwrap().to_str().unwrap()).unwrap()
        };
        let mut h = grpc(None);
        propagate_deadline(&mut h, deadline);
        let set = left(&h);
        assert!(
            set <= Duration::from_secs(2) && set > Duration::from_secs(1),
            "{set:?}"
        );
        // A longer one of the guest's is shortened, in any unit.
        let mut h = grpc(Some("1M"));
        propagate_deadline(&mut h, deadline);
        assert!(left(&h) <= Duration::from_secs(2));
        // A shorter one is the guest's to keep.
        let mut h = grpc(Some("1S"));
        propagate_deadline(&mut h, deadline);
        assert_eq!(h["grpc-timeout"], "1S");
        // Not gRPC, or no deadline: nothing added.
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        propagate_deadline(&mut h, deadline);
        assert!(h.get("grpc-timeout").is_none());
        let mut h = grpc(None);
        propagate_deadline(&mut h, None);
        assert!(h.get("grpc-timeout").is_none());
        // Past the deadline: the smallest budget, never "expired" as 0.
        let mut h = grpc(None);
        propagate_deadline(&mut h, Some(tokio::time::Instant::now()));
        assert_eq!(h["grpc-timeout"], "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(10_000_000)), "99999999m");
    }

    use crate::config::AllowList;

    /// A real HTTP server on 127.0.0.1 that counts the requests it gets.
    async fn local_server() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper::service::service_fn(move |_req| {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"hi")),
                            ))
                        }
                    }),
                ));
            }
        });
        (port, hits)
    }

    /// Each lookup gets the next answer; the script ends in failures.
    fn scripted(answers: Vec<Option<&'static str>>) -> Lookup {
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        Arc::new(move |_| {
            let next = answers.lock().unwrap().next().flatten();
            Box::pin(async move {
                next.map(|ip| vec![ip.parse().unwrap()])
                    .ok_or_else(|| std::io::Error::other("SERVFAIL"))
            })
        })
    }

    fn outbound(rules: &[&str], lookup: Lookup) -> Arc<ModuleOutbound> {
        let spec = OutboundSpec {
            allow: AllowList::parse(&rules.iter().map(|r| r.to_string()).collect::<Vec<_>>())
                .unwrap(),
            config: OutboundConfig {
                retries: 0,
                ..OutboundConfig::default()
            },
            upstreams: Arc::default(),
        };
        Arc::new(ModuleOutbound::new(
            "m".into(),
            spec,
            &Clients::with_lookup(lookup),
            Arc::new(Metrics::new()),
        ))
    }

    #[tokio::test]
    async fn a_configured_upstream_keeps_its_entry_and_h2c_past_the_cap() {
        let mut m = Arc::into_inner(outbound(&["http://*:*"], scripted(vec![]))).unwrap();
        let h2c = crate::config::OutboundOverride {
            h2c: Some(true),
            ..Default::default()
        };
        m.spec.upstreams = Arc::new([("grpc.internal:50051".to_owned(), h2c)].into());
        for i in 0..MAX_UPSTREAMS + 5 {
            let other = m.upstream(&Scheme::HTTP, &format!("h{i}.internal"), 80, Guard::On);
            let past = i >= MAX_UPSTREAMS;
            assert_eq!(other.label == OTHER, past, "upstream {i}: {}", other.label);
            assert_eq!(other.protocol, Protocol::Negotiated);
        }
        let configured = m.upstream(&Scheme::HTTP, "grpc.internal", 50051, Guard::On);
        assert_eq!(configured.label, "grpc.internal:50051");
        assert_eq!(configured.protocol, Protocol::H2c);
        // Over TLS, ALPN decides whatever `h2c` says.
        let tls = m.upstream(&Scheme::HTTPS, "grpc.internal", 50051, Guard::On);
        assert_eq!(tls.protocol, Protocol::Negotiated);
    }

    async fn call(m: &Arc<ModuleOutbound>, url: &str) -> Result<StatusCode, Error> {
        let req = Request::get(url)
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .unwrap();
        let trace = TraceContext::server(&http::HeaderMap::new(), || unreachable!("not traced"));
        m.clone()
            .send(req, None, trace)
            .await
            .map(|(resp, _)| resp.status())
    }

    #[tokio::test]
    async fn a_wildcard_never_reaches_loopback_whatever_the_name_answers() {
        let (port, hits) = local_server().await;
        // Fails once, then rebinds to loopback, then to metadata, then
        // fails for good: no answer may reach the local server.
        let m = outbound(
            &["http://*:*"],
            scripted(vec![
                None,
                Some("127.0.0.1"),
                Some("::ffff:127.0.0.1"),
                None,
            ]),
        );
        let url = format!("http://rebind.example:{port}/");
        for _ in 0..4 {
            assert!(call(&m, &url).await.is_err());
        }
        for literal in ["127.0.0.1", "[::ffff:127.0.0.1]", "[::127.0.0.1]"] {
            let url = format!("http://{literal}:{port}/");
            assert!(
                matches!(call(&m, &url).await, Err(Error::HttpRequestDenied)),
                "{literal}"
            );
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        let denied = m.denied.get();
        assert!(denied >= 5, "denials counted: {denied}");
    }

    #[tokio::test]
    async fn an_exact_rule_reaches_what_its_name_resolves_to_in_its_own_pool() {
        let (port, hits) = local_server().await;
        let lookup = scripted(vec![Some("127.0.0.1"), Some("127.0.0.1")]);
        let exact = outbound(&["http://svc.internal:*"], lookup.clone());
        let url = format!("http://svc.internal:{port}/");
        assert_eq!(call(&exact, &url).await.unwrap(), StatusCode::OK);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // A wildcard module made from the same client set gets no pooled
        // connection made under the exact rule.
        let wildcard = ModuleOutbound::new(
            "w".into(),
            OutboundSpec {
                allow: AllowList::parse(&["http://*:*".to_owned()]).unwrap(),
                ..exact.spec.clone()
            },
            &exact.clients,
            exact.metrics.clone(),
        );
        assert!(call(&Arc::new(wildcard), &url).await.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn one_modules_exact_and_wildcard_rules_never_share_a_client() {
        // Both names resolve to loopback. The exact rule may reach it; the
        // wildcard's calls go through the guarded resolver, whose client
        // must not be the exact rule's unguarded one.
        let (port, hits) = local_server().await;
        let lookup = scripted(vec![Some("127.0.0.1"), Some("127.0.0.1")]);
        let both = outbound(&["http://svc.internal:*", "http://*:*"], lookup);
        let exact = format!("http://svc.internal:{port}/");
        assert_eq!(call(&both, &exact).await.unwrap(), StatusCode::OK);
        let wildcard = format!("http://other.internal:{port}/");
        assert!(call(&both, &wildcard).await.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn hosts_are_brought_to_one_spelling() {
        let norm = |uri: &str| {
            let mut req = Request::get(uri)
                .body(
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .unwrap();
            normalize(&mut req).map(|h| (h, req.uri().to_string()))
        };
        assert_eq!(
            norm("http://API.Example.COM./x?q=1").unwrap(),
            (
                "api.example.com".into(),
                "http://api.example.com/x?q=1".into()
            )
        );
        assert_eq!(
            norm("http://user:pw@Shop.Example:8080/").unwrap(),
            ("shop.example".into(), "http://shop.example:8080/".into())
        );
        assert_eq!(
            norm("http://[::FFFF:7F00:1]:81/").unwrap().0,
            "::ffff:127.0.0.1"
        );
        assert_eq!(
            norm("http://XN--BCHER-KVA.example/").unwrap().0,
            "xn--bcher-kva.example"
        );
    }

    #[tokio::test]
    async fn upstream_entries_and_labels_are_capped_per_module() {
        let m = outbound(&["http://*:*"], resolve::system_lookup());
        let mut labels = std::collections::HashSet::new();
        for i in 0..(MAX_UPSTREAMS + 36) {
            let u = m.upstream(&Scheme::HTTP, &format!("h{i}.example"), 80, Guard::On);
            labels.insert(u.label.clone());
        }
        assert_eq!(labels.len(), MAX_UPSTREAMS + 1, "the cap, plus `other`");
        assert!(labels.contains(OTHER));
        let state = m.upstreams.lock().unwrap();
        assert_eq!(state.entries.len(), MAX_UPSTREAMS + 1);
        // An upstream seen before the cap keeps its own entry.
        drop(state);
        assert_eq!(
            m.upstream(&Scheme::HTTP, "h0.example", 80, Guard::On).label,
            "h0.example:80"
        );
    }

    #[test]
    fn guest_connect_timeouts_round_up() {
        assert_eq!(
            round_up_100ms(Duration::from_nanos(1)),
            Duration::from_millis(100)
        );
        assert_eq!(
            round_up_100ms(Duration::from_millis(250)),
            Duration::from_millis(300)
        );
        assert_eq!(
            round_up_100ms(Duration::from_millis(300)),
            Duration::from_millis(300)
        );
    }

    #[test]
    fn only_what_never_reached_the_upstream_or_an_idempotent_unavailable_answer_is_retried() {
        let connect = Err(Failure::Connect { timed_out: false });
        let connect_timeout = Err(Failure::Connect { timed_out: true });
        for (outcome, idempotent, retry, against) in [
            (connect, false, true, true),
            (connect_timeout, false, true, true),
            (Err(Failure::Timeout), true, false, true),
            (Err(Failure::Protocol), true, false, true),
            (Err(Failure::Denied), true, false, true),
            (Ok(StatusCode::SERVICE_UNAVAILABLE), true, true, true),
            (Ok(StatusCode::BAD_GATEWAY), true, true, true),
            (Ok(StatusCode::GATEWAY_TIMEOUT), true, true, true),
            (Ok(StatusCode::SERVICE_UNAVAILABLE), false, false, true),
            (Ok(StatusCode::INTERNAL_SERVER_ERROR), true, false, false),
            (Ok(StatusCode::OK), true, false, false),
            (Ok(StatusCode::TOO_MANY_REQUESTS), true, false, false),
        ] {
            assert_eq!(
                worth_retrying(outcome, idempotent),
                retry,
                "{outcome:?} {idempotent}"
            );
            assert_eq!(counts_against(outcome), against, "{outcome:?}");
        }
    }

    #[test]
    fn failures_have_one_label_and_one_guest_error_each() {
        let all = [
            Failure::Connect { timed_out: false },
            Failure::Connect { timed_out: true },
            Failure::Denied,
            Failure::Timeout,
            Failure::Protocol,
        ];
        let labels: Vec<_> = all.iter().map(|f| f.label()).collect();
        assert_eq!(
            labels,
            ["connect", "connect", "denied", "timeout", "protocol"]
        );
        assert!(matches!(all[0].error(), Error::ConnectionRefused));
        assert!(matches!(all[1].error(), Error::ConnectionTimeout));
        assert!(matches!(all[2].error(), Error::HttpRequestDenied));
        assert!(matches!(all[3].error(), Error::ConnectionReadTimeout));
        assert!(matches!(all[4].error(), Error::HttpProtocolError));
    }

    #[tokio::test]
    async fn a_refused_connection_is_classified_as_connect() {
        // A port that was just free: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client =
            Clients::default().get(Duration::from_secs(2), Guard::Off, Protocol::Negotiated);
        let req = Request::get(format!("http://127.0.0.1:{port}/"))
            .body(
                http_body_util::Empty::new()
                    .map_err(|never: std::convert::Infallible| match never {})
                    .boxed_unsync(),
            )
            .unwrap();
        let err = client.request(req).await.unwrap_err();
        assert_eq!(Failure::of(&err), Failure::Connect { timed_out: false });
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let cfg = OutboundConfig {
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_millis(250),
            ..OutboundConfig::default()
        };
        for attempt in 0..20 {
            let d = backoff(&cfg, attempt);
            let cap =
                Duration::from_millis(100 * (1 << attempt.min(16))).min(cfg.retry_backoff_max);
            assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(&cfg, 3)).collect();
        assert!(spread.len() > 10, "full jitter spreads the delays");
    }
}
