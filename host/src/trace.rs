//! W3C trace context for each request: extracted from `traceparent` /
//! `tracestate`, carried in every request-scoped log line as `trace_id`,
//! and injected into every outbound call so a downstream service continues
//! the trace.
//!
//! When an OTLP endpoint is configured the ids come from OpenTelemetry
//! spans (server, guest call, client) exported in batches; without one, no
//! span is created at all and the ids are made here, so logs still carry a
//! trace id and propagation still works at no measurable cost.

use std::fmt;

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

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
    /// The OpenTelemetry span (`Span::none()` when tracing is off).
    pub span: tracing::Span,
}

impl TraceContext {
    /// No trace: what a reused instance carries between requests.
    pub fn untraced() -> Self {
        TraceContext {
            trace_id: 0,
            span_id: 0,
            flags: 0,
            tracestate: None,
            span: tracing::Span::none(),
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
    /// Trace flags.
    pub flags: u8,
}

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
        flags: u8::from_str_radix(flags, 16).ok()?,
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

fn ids_of(span: &tracing::Span) -> Option<(u128, u64, u8)> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        (
            u128::from_be_bytes(sc.trace_id().to_bytes()),
            u64::from_be_bytes(sc.span_id().to_bytes()),
            sc.trace_flags().to_u8(),
        )
    })
}

fn remote_context(parent: &Parent, tracestate: Option<&HeaderValue>) -> opentelemetry::Context {
    let state = tracestate
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        TraceId::from_bytes(parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(parent.span_id.to_be_bytes()),
        TraceFlags::new(parent.flags),
        true,
        state,
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

impl TraceContext {
    /// The context of an incoming request: continues the caller's trace
    /// when `traceparent` is valid, starts a new one otherwise. `span` is
    /// the server span, made by the caller only when tracing is on.
    pub fn server(headers: &HeaderMap, span: impl FnOnce() -> tracing::Span) -> Self {
        let parent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let tracestate = parent.and(headers.get(TRACESTATE).cloned());
        if telemetry::sampled(parent.map(|p| (p.trace_id, p.flags & 1 == 1))) {
            let span = span();
            if let Some(p) = &parent {
                let _ = span.set_parent(remote_context(p, tracestate.as_ref()));
            }
            if let Some((trace_id, span_id, flags)) = ids_of(&span) {
                return TraceContext {
                    trace_id,
                    span_id,
                    flags,
                    tracestate,
                    span,
                };
            }
        }
        // Not traced here: no span at all. The caller's flags travel on;
        // while spans are exported, a trace left out says so downstream.
        let flags = if telemetry::tracing_enabled() {
            parent.map_or(0, |p| p.flags) & !1
        } else {
            parent.map_or(1, |p| p.flags)
        };
        TraceContext {
            trace_id: parent.map_or_else(nonzero_u128, |p| p.trace_id),
            span_id: nonzero_u64(),
            flags,
            tracestate,
            span: tracing::Span::none(),
        }
    }

    /// A child (a client span for an outbound call), made by `span` only
    /// when tracing is on.
    pub fn child(&self, span: impl FnOnce(&tracing::Span) -> tracing::Span) -> Self {
        if telemetry::tracing_enabled() && !self.span.is_none() {
            let span = span(&self.span);
            if let Some((trace_id, span_id, flags)) = ids_of(&span) {
                return TraceContext {
                    trace_id,
                    span_id,
                    flags,
                    tracestate: self.tracestate.clone(),
                    span,
                };
            }
        }
        TraceContext {
            span_id: nonzero_u64(),
            tracestate: self.tracestate.clone(),
            span: tracing::Span::none(),
            ..*self
        }
    }

    /// Writes `traceparent` (and `tracestate`) for a call made in this
    /// context, replacing whatever the guest set.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Ok(v) =
            HeaderValue::from_str(&format_traceparent(self.trace_id, self.span_id, self.flags))
        {
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
        let cx = TraceContext::server(&headers, tracing::Span::none);
        assert_eq!(cx.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(cx.span_id, 0x00f067aa0ba902b7, "our span is a new one");
        let child = cx.child(|_| tracing::Span::none());
        let mut out = HeaderMap::new();
        child.inject(&mut out);
        let sent = parse_traceparent(out[TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(sent.trace_id, cx.trace_id);
        assert_eq!(sent.span_id, child.span_id);
        assert_eq!(out[TRACESTATE], "vendor=x");

        let fresh = TraceContext::server(&HeaderMap::new(), tracing::Span::none);
        assert_ne!(fresh.trace_id, 0);
        assert_eq!(fresh.flags, 1);
    }
}
