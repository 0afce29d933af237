//! Outbound HTTP of guests. Every `wasi:http/outgoing-handler` call goes
//! through [`OutboundHooks::send_request`], which applies, in order:
//!
//! 1. the module's allow-list, deny by default; loopback and link-local
//!    destinations (as IP literals or as what a name resolves to) only
//!    through an exact rule;
//! 2. the circuit breaker of the upstream (fail fast while open);
//! 3. timeouts: connect (per client), first byte (per attempt), between
//!    bytes (response body) and total (the whole call), the guest's own
//!    `request-options` honoured but capped by the host's;
//! 4. retries with exponential back-off and full jitter, for connect errors
//!    and for 502/503/504 on idempotent methods, honouring `Retry-After`,
//!    within a retry budget per upstream (tower's `TpsBudget`);
//! 5. pooled connections (hyper-util's client, one pool per connect
//!    timeout).
//!
//! Each (module, upstream) pair keeps its own breaker, budget and metric
//! handles, created on the first call.

mod body;
mod breaker;
mod policy;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Scheme;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{Histogram, IntCounter};
use tower::retry::budget::{Budget, TpsBudget};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{Error, RequestOptions, WasiHttpHooks};

use self::body::{BetweenBytes, RequestBody};
use self::breaker::Breaker;
pub use self::policy::{AllowList, AllowRule, Specificity};
use crate::config::{OutboundConfig, OutboundOverride};
use crate::metrics::Metrics;
use crate::trace::TraceContext;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, HyperOutgoingBody>;
type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// How long a name's resolution is trusted for the loopback check.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// Pooled HTTP clients, shared by every module: one per connect timeout,
/// since the connect timeout belongs to the connector.
#[derive(Default)]
pub struct Clients {
    by_connect_timeout: Mutex<HashMap<Duration, HttpsClient>>,
}

impl Clients {
    fn get(&self, connect_timeout: Duration) -> HttpsClient {
        let mut clients = self.by_connect_timeout.lock().unwrap();
        clients
            .entry(connect_timeout)
            .or_insert_with(|| {
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_nodelay(true);
                http.set_connect_timeout(Some(connect_timeout));
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
                    .expect("ring offers the default protocol versions")
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http);
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(https)
            })
            .clone()
    }
}

impl Clients {
    /// Downloads `url` whole (for URL-sourced modules), at most `limit`
    /// bytes, within a minute. Errors are ready to show to an operator.
    pub async fn download(&self, url: &str, limit: usize) -> Result<Vec<u8>, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
        let client = self.get(Duration::from_secs(10));
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

/// What a module's outbound calls are subject to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboundSpec {
    /// The allow-list.
    pub allow: AllowList,
    /// The module's policy (defaults with its overrides).
    pub config: OutboundConfig,
    /// Per-upstream overrides (`[upstreams."host:port"]`).
    pub upstreams: Arc<BTreeMap<String, OutboundOverride>>,
}

/// The outbound side of one module, shared by all its instances.
pub struct ModuleOutbound {
    module: Arc<str>,
    spec: OutboundSpec,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    denied: IntCounter,
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
}

impl ModuleOutbound {
    /// The outbound state of module `module`.
    pub fn new(
        module: Arc<str>,
        spec: OutboundSpec,
        clients: Arc<Clients>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ModuleOutbound {
            denied: metrics.outbound_denied.with_label_values(&[&module]),
            module,
            spec,
            clients,
            metrics,
            upstreams: Mutex::new(HashMap::new()),
        }
    }

    fn deny(&self, uri: &http::Uri, why: &str) -> Error {
        self.denied.inc();
        tracing::warn!(module = &*self.module, uri = %uri, reason = why, "outbound request denied");
        Error::HttpRequestDenied
    }

    async fn send(
        self: Arc<Self>,
        request: Request<HyperOutgoingBody>,
        guest: Option<RequestOptions>,
        trace: TraceContext,
    ) -> Result<(Response<HyperOutgoingBody>, IoFuture), Error> {
        let uri = request.uri().clone();
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let Some(host) = uri.host() else {
            return Err(Error::HttpRequestUriInvalid);
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri
            .port_u16()
            .unwrap_or_else(|| policy::default_port(&scheme));
        let Some(specificity) = self.spec.allow.matches(&scheme, host, port) else {
            return Err(self.deny(&uri, "destination not in allowed_outbound_hosts"));
        };
        let upstream = self.upstream(&scheme, host, port);
        if specificity != Specificity::Exact && upstream.reaches_restricted(host, port).await {
            return Err(self.deny(
                &uri,
                "destination is a loopback or link-local address, allowed only by an exact rule",
            ));
        }
        let trace = trace.child(|parent| {
            tracing::info_span!(
                target: "berth::outbound",
                parent: parent,
                "outbound",
                otel.name = %format_args!("{} {}", request.method(), upstream.label),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                http.request.method = %request.method(),
                server.address = host,
                server.port = port,
                url.full = %uri,
                http.response.status_code = tracing::field::Empty,
                module = &*self.module,
            )
        });
        upstream.call(request, guest, trace).await
    }

    fn upstream(&self, scheme: &Scheme, host: &str, port: u16) -> Arc<Upstream> {
        let label = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let key = format!("{scheme}://{label}");
        let mut upstreams = self.upstreams.lock().unwrap();
        upstreams
            .entry(key)
            .or_insert_with(|| {
                let config = self
                    .spec
                    .upstreams
                    .get(&label)
                    .map_or(self.spec.config, |o| o.over(self.spec.config));
                let m = &self.metrics;
                let labels = [&*self.module, label.as_str()];
                Arc::new(Upstream {
                    client: self.clients.get(config.connect_timeout),
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
                    resolved: Mutex::new(None),
                })
            })
            .clone()
    }
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
    /// When the host name was last resolved, and whether it reached a
    /// restricted address.
    resolved: Mutex<Option<(Instant, bool)>>,
}

/// How one attempt went, for the retry decision and the metrics.
enum Attempt {
    Response(Response<hyper::body::Incoming>),
    Failed(Error, &'static str),
}

impl Upstream {
    /// Whether this destination is (or resolves to) loopback/link-local.
    async fn reaches_restricted(&self, host: &str, port: u16) -> bool {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return policy::is_restricted(ip);
        }
        if let Some((at, restricted)) = *self.resolved.lock().unwrap()
            && at.elapsed() < RESOLVE_TTL
        {
            return restricted;
        }
        let restricted = match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => addrs.into_iter().any(|a| policy::is_restricted(a.ip())),
            // Unresolvable: let the call fail on its own with a DNS error.
            Err(_) => false,
        };
        *self.resolved.lock().unwrap() = Some((Instant::now(), restricted));
        restricted
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .outbound_requests
            .with_label_values(&[&*self.module, &self.label, outcome])
            .inc();
    }

    async fn call(
        &self,
        request: Request<HyperOutgoingBody>,
        guest: Option<RequestOptions>,
        trace: TraceContext,
    ) -> Result<(Response<HyperOutgoingBody>, IoFuture), Error> {
        let cfg = &self.config;
        let guest = guest.unwrap_or_default();
        let cap = |asked: Option<Duration>, host: Duration| asked.map_or(host, |a| a.min(host));
        let first_byte = cap(guest.first_byte_timeout, cfg.first_byte_timeout);
        // The connect timeout lives in the connector, so a shorter one from
        // the guest picks another pooled client, rounded up to 100 ms so
        // guests cannot make one pool per nanosecond.
        let client = match guest.connect_timeout {
            Some(asked) if asked < cfg.connect_timeout => self
                .clients
                .get(round_up_100ms(asked).min(cfg.connect_timeout)),
            _ => self.client.clone(),
        };
        let between_bytes = cap(guest.between_bytes_timeout, cfg.between_bytes_timeout);
        let started = Instant::now();
        let deadline = started + cfg.timeout;

        let (mut parts, body) = request.into_parts();
        trace.inject(&mut parts.headers);
        let mut body = RequestBody::read(body, cfg.max_retry_body.0).await?;
        let idempotent = parts.method.is_idempotent() || cfg.retry_non_idempotent;
        self.budget.deposit();

        let mut attempt = 0u32;
        let outcome =
            loop {
                let Some(admission) = self.breaker.admit() else {
                    self.count("circuit_open");
                    trace.span.record("otel.status_code", "ERROR");
                    tracing::warn!(
                        module = &*self.module,
                        upstream = self.label.as_str(),
                        trace_id = %trace,
                        "outbound call failed fast: circuit open"
                    );
                    return Err(Error::DestinationUnavailable);
                };
                let req = Request::from_parts(parts.clone(), body.attempt());
                let budget_left = deadline.saturating_duration_since(Instant::now());
                let result =
                    match tokio::time::timeout(first_byte.min(budget_left), client.request(req))
                        .await
                    {
                        Ok(Ok(resp)) => Attempt::Response(resp),
                        Ok(Err(e)) => {
                            let (err, kind) = classify(&e);
                            Attempt::Failed(err, kind)
                        }
                        Err(_) => Attempt::Failed(Error::ConnectionReadTimeout, "timeout"),
                    };
                let retry_status = matches!(
                    &result,
                    Attempt::Response(r) if matches!(r.status(), StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
                );
                let failed = retry_status || matches!(result, Attempt::Failed(..));
                self.breaker.record(admission, !failed);
                let retryable = attempt < cfg.retries
                    && body.replayable()
                    && match &result {
                        Attempt::Failed(_, kind) => *kind == "connect",
                        Attempt::Response(_) => retry_status && idempotent,
                    };
                if retryable {
                    let wait = backoff(cfg, attempt).max(retry_after(&result).unwrap_or_default());
                    if Instant::now() + wait < deadline && self.budget.withdraw() {
                        attempt += 1;
                        self.retries.inc();
                        drop(result);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
                break result;
            };
        self.duration.observe(started.elapsed().as_secs_f64());
        match outcome {
            Attempt::Response(resp) => {
                self.count(resp.status().as_str());
                trace
                    .span
                    .record("http.response.status_code", resp.status().as_u16());
                if resp.status().is_server_error() {
                    trace.span.record("otel.status_code", "ERROR");
                }
                let resp = resp.map(|b| BetweenBytes::new(b, between_bytes).boxed_unsync());
                Ok((resp, Box::new(async { Ok(()) }) as IoFuture))
            }
            Attempt::Failed(err, kind) => {
                self.count(kind);
                trace.span.record("otel.status_code", "ERROR");
                tracing::warn!(
                    module = &*self.module,
                    upstream = self.label.as_str(),
                    error = %err,
                    trace_id = %trace,
                    attempts = attempt + 1,
                    "outbound call failed"
                );
                Err(err)
            }
        }
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

/// `Retry-After` in seconds (the HTTP-date form is ignored).
fn retry_after(attempt: &Attempt) -> Option<Duration> {
    let Attempt::Response(resp) = attempt else {
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

/// Maps a client error to what the guest sees, and a metric label.
fn classify(err: &hyper_util::client::legacy::Error) -> (Error, &'static str) {
    if err.is_connect() {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return (Error::ConnectionTimeout, "connect");
            }
            source = e.source();
        }
        return (Error::ConnectionRefused, "connect");
    }
    (Error::HttpProtocolError, "protocol")
}

/// The per-store hook object wasmtime-wasi-http calls for outbound requests.
pub struct OutboundHooks {
    /// The module's outbound state.
    pub outbound: Arc<ModuleOutbound>,
    /// The request's trace, continued by each call.
    pub trace: TraceContext,
}

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: Request<HyperOutgoingBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = Result<(Response<HyperOutgoingBody>, IoFuture), Error>> + Send>
    {
        Box::new(
            self.outbound
                .clone()
                .send(request, options, self.trace.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
