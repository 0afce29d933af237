//! W3C trace context for each request: extracted from `traceparent` /
//! `tracestate`, carried in every request-scoped log line as `trace_id`,
//! and injected into every outbound call so a downstream service continues
//! the trace.
//!
//! When an OTLP endpoint is configured the ids come from OpenTelemetry
//! spans (server, guest call, client) exported in batches; without one, no
//! span is created at all and the ids are made here, so logs still carry a
//! trace id and propagation still works at no measurable cost.
//!
//! Spans are made with the OpenTelemetry SDK directly, not through
//! `tracing`: a request's three spans through `tracing-opentelemetry` and
//! the subscriber's registry cost about 9 % of the CPU of a traced request
//! (bench/NOTES.md, 2026-12-06), for span bookkeeping nothing here needs.
//! Log lines are still `tracing` events; a guest's also go on its span as
//! span events.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};

use crate::telemetry;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// A span being recorded, shared by the clones of the context it belongs
/// to and exported when the last of them goes. `Span::none()` when the
/// request is not traced: every method is then a no-op.
#[derive(Clone, Default)]
pub struct Span(Option<Arc<Mutex<opentelemetry_sdk::trace::Span>>>);

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Span::none"),
            Some(_) => f.write_str("Span"),
        }
    }
}

impl Span {
    /// No span: the request is not traced.
    pub fn none() -> Self {
        Span(None)
    }

    /// Whether this is no span.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    fn with(&self, f: impl FnOnce(&mut opentelemetry_sdk::trace::Span)) {
        if let Some(span) = &self.0 {
            f(&mut span.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// Records the HTTP status answered; a 5xx marks the span failed, as
    /// OpenTelemetry's HTTP conventions ask of server and client spans.
    pub fn record_status(&self, status: u16) {
        self.with(|span| {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 500 {
                span.set_status(Status::error(""));
            }
        });
    }

    /// Marks the span failed, saying why.
    pub fn fail(&self, why: impl Into<Cow<'static, str>>) {
        self.with(|span| span.set_status(Status::error(why)));
    }

    /// Adds a span event (a log line, a failure) with its attributes.
    pub fn event(&self, name: impl Into<Cow<'static, str>>, attributes: Vec<KeyValue>) {
        self.with(|span| span.add_event(name, attributes));
    }
}

/// The trace a request belongs to, and the span that represents it.
#[derive(Clone, Debug)]
pub struct TraceContext {
    /// The trace id.
    pub trace_id: u128,
    /// The id of this host's span for the request.
    pub span_id: u64,
    /// W3C trace flags (bit 0: sampled).
    pub flags: u8,
    /// `tracestate`, passed on untouched.
    pub tracestate: Option<HeaderValue>,
    /// The span of `span_id` (none when the request is not traced).
    pub span: Span,
    /// Where a fresh instance's log lines go as span events: its guest
    /// call's span. None elsewhere (a reused instance serves many requests
    /// outside any one guest call), and its lines go on `span`.
    pub guest: Span,
}

impl TraceContext {
    /// No trace: what a reused instance carries between requests.
    pub fn untraced() -> Self {
        TraceContext {
            trace_id: 0,
            span_id: 0,
            flags: 0,
            tracestate: None,
            span: Span::none(),
            guest: Span::none(),
        }
    }

    /// The span a guest's log lines go on.
    pub fn log_span(&self) -> &Span {
        if self.guest.is_none() {
            &self.span
        } else {
            &self.guest
        }
    }
}

/// Formats as the 32-hex-digit trace id, for log fields.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.trace_id)
    }
}

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace id.
    pub trace_id: u128,
    /// The caller's span id.
    pub span_id: u64,
    /// Trace flags, the reserved bits dropped.
    pub flags: u8,
}

/// W3C Trace Context's `sampled` flag.
const SAMPLED: u8 = 0x01;
/// The flags Trace Context defines: `sampled`, and Level 2's
/// `random-trace-id`, which belongs to the trace id and goes on with it.
const KNOWN_FLAGS: u8 = SAMPLED | 0x02;

/// Parses `00-<32 hex>-<16 hex>-<2 hex>`; `None` for anything invalid
/// (all-zero ids, version `ff`, wrong lengths), as the spec asks.
pub fn parse_traceparent(value: &str) -> Option<Parent> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || u8::from_str_radix(version, 16).is_err() {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if !(hex(trace) && hex(span) && hex(flags)) {
        return None;
    }
    let parent = Parent {
        trace_id: u128::from_str_radix(trace, 16).ok()?,
        span_id: u64::from_str_radix(span, 16).ok()?,
        // The rest are reserved, and the spec has vendors send them as
        // zero, so they are dropped here.
        flags: u8::from_str_radix(flags, 16).ok()? & KNOWN_FLAGS,
    };
    (parent.trace_id != 0 && parent.span_id != 0).then_some(parent)
}

/// `traceparent` for a span.
pub fn format_traceparent(trace_id: u128, span_id: u64, flags: u8) -> String {
    format!("00-{trace_id:032x}-{span_id:016x}-{flags:02x}")
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

fn nonzero_u128() -> u128 {
    fastrand::u128(1..)
}

/// The context a span made under `parent` starts from. `remote` for a
/// caller's span, so the SDK records the parent as remote.
fn parent_context(
    trace_id: u128,
    span_id: u64,
    flags: u8,
    tracestate: Option<&HeaderValue>,
    remote: bool,
) -> Context {
    let state = tracestate
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        TraceId::from_bytes(trace_id.to_be_bytes()),
        SpanId::from_bytes(span_id.to_be_bytes()),
        TraceFlags::new(flags),
        remote,
        state,
    );
    Context::new().with_remote_span_context(sc)
}

/// Starts `span` under `parent` (a new trace without one) and returns it
/// with its ids; `None` when spans are not exported.
fn start(span: SpanBuilder, parent: &Context) -> Option<(Span, u128, u64, u8)> {
    let span = telemetry::tracer()?.build_with_context(span, parent);
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let (trace_id, span_id, flags) = (
        u128::from_be_bytes(sc.trace_id().to_bytes()),
        u64::from_be_bytes(sc.span_id().to_bytes()),
        sc.trace_flags().to_u8(),
    );
    Some((
        Span(Some(Arc::new(Mutex::new(span)))),
        trace_id,
        span_id,
        flags,
    ))
}

impl TraceContext {
    /// The context of an incoming request: continues the caller's trace
    /// when `traceparent` is valid, starts a new one otherwise. `span`
    /// describes the server span, asked for only when the request is
    /// traced.
    pub fn server(headers: &HeaderMap, span: impl FnOnce() -> SpanBuilder) -> Self {
        let parent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let tracestate = parent.and(headers.get(TRACESTATE).cloned());
        if telemetry::sampled(parent.map(|p| (p.trace_id, p.flags & SAMPLED != 0))) {
            let cx = match &parent {
                Some(p) => {
                    parent_context(p.trace_id, p.span_id, p.flags, tracestate.as_ref(), true)
                }
                None => Context::new(),
            };
            if let Some((span, trace_id, span_id, flags)) = start(span(), &cx) {
                return TraceContext {
                    trace_id,
                    span_id,
                    flags,
                    tracestate,
                    span,
                    guest: Span::none(),
                };
            }
        }
        // Not traced here: no span at all. The caller's flags travel on;
        // while spans are exported, a trace left out says so downstream.
        let flags = if telemetry::tracing_enabled() {
            parent.map_or(0, |p| p.flags) & !SAMPLED
        } else {
            parent.map_or(1, |p| p.flags)
        };
        TraceContext {
            trace_id: parent.map_or_else(nonzero_u128, |p| p.trace_id),
            span_id: nonzero_u64(),
            flags,
            tracestate,
            span: Span::none(),
            guest: Span::none(),
        }
    }

    /// A span under this context's span, described by `span` only when the
    /// request is traced (the guest call's span).
    pub fn child_span(&self, span: impl FnOnce() -> SpanBuilder) -> Span {
        self.traced_child(span)
            .map_or_else(Span::none, |(span, ..)| span)
    }

    fn traced_child(&self, span: impl FnOnce() -> SpanBuilder) -> Option<(Span, u128, u64, u8)> {
        if self.span.is_none() {
            return None;
        }
        let parent = parent_context(
            self.trace_id,
            self.span_id,
            self.flags,
            self.tracestate.as_ref(),
            false,
        );
        start(span(), &parent)
    }

    /// A child context (a client span for an outbound call), its span
    /// described by `span` only when the request is traced.
    pub fn child(&self, span: impl FnOnce() -> SpanBuilder) -> Self {
        if let Some((span, trace_id, span_id, flags)) = self.traced_child(span) {
            return TraceContext {
                trace_id,
                span_id,
                flags,
                tracestate: self.tracestate.clone(),
                span,
                guest: Span::none(),
            };
        }
        TraceContext {
            span_id: nonzero_u64(),
            tracestate: self.tracestate.clone(),
            span: Span::none(),
            guest: Span::none(),
            ..*self
        }
    }

    /// Writes `traceparent` (and `tracestate`) for a call made in this
    /// context, replacing whatever the guest set.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Ok(mut v) =
            HeaderValue::from_str(&format_traceparent(self.trace_id, self.span_id, self.flags))
        {
            // New in every call: on a pooled HTTP/2 connection, storing it
            // in the header table would only make h2's encoder compare the
            // next one with every one stored.
            v.set_sensitive(true);
            headers.insert(TRACEPARENT, v);
        }
        match &self.tracestate {
            Some(state) => {
                headers.insert(TRACESTATE, state.clone());
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_traceparents_parse() {
        let p =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert_eq!(p.flags, 1);
        assert_eq!(
            format_traceparent(p.trace_id, p.span_id, p.flags),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        // A future version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn without_tracing_ids_are_continued_or_made() {
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let cx = TraceContext::server(&headers, || unreachable!("not traced"));
        assert_eq!(cx.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(cx.span_id, 0x00f067aa0ba902b7, "our span is a new one");
        let child = cx.child(|| unreachable!("not traced"));
        let mut out = HeaderMap::new();
        child.inject(&mut out);
        let sent = parse_traceparent(out[TRACEPARENT].to_str().unwrap()).unwrap();
        assert!(
            out[TRACEPARENT].is_sensitive(),
            "sent as a value HPACK may store"
        );
        assert_eq!(sent.trace_id, cx.trace_id);
        assert_eq!(sent.span_id, child.span_id);
        assert_eq!(out[TRACESTATE], "vendor=x");

        let fresh = TraceContext::server(&HeaderMap::new(), || unreachable!("not traced"));
        assert_ne!(fresh.trace_id, 0);
        assert_eq!(fresh.flags, 1);
    }

    #[test]
    fn flags_this_version_does_not_define_are_not_passed_on() {
        // W3C Trace Context: bits other than `sampled` (and Level 2's
        // `random-trace-id`) are reserved, and "vendors MUST set those to
        // zero"; a caller's must not travel on.
        for (sent, kept) in [("ff", "03"), ("fc", "00"), ("05", "01"), ("02", "02")] {
            let mut headers = HeaderMap::new();
            let value = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{sent}");
            headers.insert(TRACEPARENT, HeaderValue::from_str(&value).unwrap());
            let cx = TraceContext::server(&headers, || unreachable!("not traced"));
            let mut out = HeaderMap::new();
            cx.child(|| unreachable!("not traced")).inject(&mut out);
            let out = out[TRACEPARENT].to_str().unwrap();
            assert!(
                out.ends_with(&format!("-{kept}")),
                "{sent}: sent on as {out}"
            );
        }
    }
}
