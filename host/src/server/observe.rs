//! What a request leaves behind for operators: its span, its RED metrics
//! and its access-log line. Started when a module is routed to, finished
//! with the status of whatever response went out.

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, StatusCode};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanBuilder, SpanKind};

use crate::runtime::{Module, RequestContext};
use crate::trace::TraceContext;

/// One routed request being observed.
pub(super) struct Observed {
    started: Instant,
    method: Method,
    protocol: &'static str,
    module: Arc<Module>,
    cx: RequestContext,
}

impl Observed {
    /// Opens the request's span (continuing the caller's trace) and starts
    /// the clock.
    pub(super) fn start<B>(req: &Request<B>, module: Arc<Module>, request_id: Arc<str>) -> Self {
        let started = Instant::now();
        let protocol = protocol_version(req.version());
        let trace = TraceContext::server(req.headers(), || {
            SpanBuilder::from_name(format!("{} {}", req.method(), module.route))
                .with_kind(SpanKind::Server)
                .with_attributes([
                    KeyValue::new("http.request.method", req.method().to_string()),
                    KeyValue::new("network.protocol.version", protocol),
                    KeyValue::new("url.path", req.uri().path().to_owned()),
                    KeyValue::new("http.route", module.route.clone()),
                    KeyValue::new("module", module.name.clone()),
                    KeyValue::new("request_id", request_id.clone()),
                ])
        });
        Observed {
            started,
            method: req.method().clone(),
            protocol,
            cx: RequestContext {
                logs: module.logs.clone(),
                module: module.name.clone(),
                request_id,
                trace,
                deadline: None,
            },
            module,
        }
    }

    /// Sets when the request's time is up, once its budget is known.
    pub(super) fn set_deadline(&mut self, budget: std::time::Duration) {
        self.cx.deadline = Some(tokio::time::Instant::now() + budget);
    }

    /// When the request arrived.
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    /// The module the request was routed to.
    pub(super) fn module(&self) -> &Arc<Module> {
        &self.module
    }

    /// The ids and span the guest's logs and outbound calls carry.
    pub(super) fn context(&self) -> &RequestContext {
        &self.cx
    }

    /// Records the status on the span, counts the request and its
    /// duration, and writes the access line; returns the duration. A
    /// request the host `shed` is counted, not timed: the latency
    /// histogram is the versions' own, which a flood of quick refusals
    /// must not lower (a canary's p99 is judged on it).
    pub(super) fn finish(
        self,
        status: StatusCode,
        access_log: bool,
        shed: bool,
    ) -> std::time::Duration {
        let status = status.as_u16();
        self.cx.trace.span.record_status(status);
        let elapsed = self.started.elapsed();
        let metrics = &self.module.metrics;
        if !shed {
            metrics.duration.observe(elapsed.as_secs_f64());
        }
        metrics.count(&self.method, status);
        if access_log {
            tracing::info!(
                target: "access",
                module = &*self.module.name,
                request_id = &*self.cx.request_id,
                trace_id = %self.cx.trace,
                method = self.method.as_str(),
                protocol = self.protocol,
                route = self.module.route.as_str(),
                status,
                duration_ms = elapsed.as_secs_f64() * 1e3,
                track = self.module.track.as_str(),
                "request"
            );
        }
        elapsed
    }
}

/// The HTTP version as OpenTelemetry's `network.protocol.version` names it.
fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}
