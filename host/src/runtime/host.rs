//! The state of one store, i.e. of one request: WASI contexts, the outbound
//! hooks, memory limits, and what the guest's config and log calls need.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::KeyValue;
use prometheus::IntCounter;

use tokio::io::AsyncWrite;
use wasmtime::ResourceLimiter;
use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::metrics::GuestMetrics;
use crate::outbound::{CurrentRequest, ModuleOutbound, OutboundHooks};
use crate::trace::TraceContext;

mod logging {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit/deps/logging",
        world: "wasi:logging/imports",
    });
}
use logging::wasi::logging::logging as wasi_log;

mod guest_metrics {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit/deps/berth-metrics",
        world: "berth:metrics/imports",
    });
}
use guest_metrics::berth::metrics::metrics as berth_metrics;

/// Who a request's log lines belong to.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// The module serving the request.
    pub module: Arc<str>,
    /// The request id, echoed in `x-request-id`.
    pub request_id: Arc<str>,
    /// The trace; displays as the trace id.
    pub trace: TraceContext,
    /// The module's allowance of log lines.
    pub logs: Arc<LogBudget>,
    /// When the request's time is up, if it has a deadline: outbound gRPC
    /// calls carry what is left onward as `grpc-timeout`.
    pub deadline: Option<tokio::time::Instant>,
}

/// A module's allowance of guest log lines, shared by all its instances:
/// a token bucket refilled at `rate` lines a second that holds five
/// seconds' worth. Lines past it are dropped and counted, with one warning
/// per module, so a guest that logs in a loop cannot flood the node's log
/// pipeline or crowd out the host's own lines.
pub struct LogBudget {
    rate: f64,
    bucket: std::sync::Mutex<(f64, Instant)>,
    dropped: IntCounter,
    warned: AtomicBool,
}

impl std::fmt::Debug for LogBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogBudget")
            .field("rate", &self.rate)
            .finish()
    }
}

impl LogBudget {
    /// `rate` lines a second; drops count on `dropped`.
    pub fn new(rate: u32, dropped: IntCounter) -> Self {
        let rate = f64::from(rate.max(1));
        LogBudget {
            rate,
            bucket: std::sync::Mutex::new((rate * 5.0, Instant::now())),
            dropped,
            warned: AtomicBool::new(false),
        }
    }

    /// Whether one more line may be written now.
    fn admit(&self, module: &str) -> bool {
        let mut bucket = self.bucket.lock().unwrap();
        let (tokens, at) = *bucket;
        let now = Instant::now();
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.rate * 5.0);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            return true;
        }
        *bucket = (tokens, now);
        drop(bucket);
        self.dropped.inc();
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                module,
                log_rate = self.rate,
                "guest log lines over the module's log_rate are dropped (counted in berth_guest_log_lines_dropped_total)"
            );
        }
        false
    }
}

/// Cuts `text` to at most `max` bytes (on a character boundary), saying how
/// much was cut.
fn capped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let end = text.floor_char_boundary(max);
    format!("{}… [{} bytes cut]", &text[..end], text.len() - end).into()
}

/// The data of one `Store`: one per request, or one per reused instance.
pub struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundHooks,
    config: Arc<WasiConfigVariables>,
    guest_metrics: Arc<GuestMetrics>,
    pub(crate) limits: MemoryLimiter,
    /// The request this store serves; on a reused instance, the
    /// instance's own context (its requests are told apart by [`Tasks`]).
    pub(crate) cx: RequestContext,
    /// On a reused instance: each request's context by its task group.
    tasks: Option<Tasks>,
}

/// The requests of a reused WASI 0.3 instance, by the task group of each.
///
/// One store serves several requests at once, so a context set on the
/// store would belong to whichever request started last: request A's
/// outbound call would carry request B's `traceparent`, and A's log lines
/// B's ids. wasmtime's task-group hook says which group's thread runs each
/// time it switches; a guest's call into the host runs on its task's
/// thread, so the context is looked up there. Where no request's task is
/// running (between requests, or a host task of the instance's own), the
/// instance's own context is used: never another request's.
#[derive(Clone)]
pub(crate) struct Tasks(Arc<TasksInner>);

struct TasksInner {
    state: std::sync::Mutex<TaskState>,
    /// The instance's own context, for what no request's task does.
    idle: RequestContext,
}

#[derive(Default)]
struct TaskState {
    current: Option<wasmtime::component::TaskGroupId>,
    requests: std::collections::HashMap<wasmtime::component::TaskGroupId, RequestContext>,
}

impl Tasks {
    /// No request yet; `idle` is the instance's own context.
    pub(crate) fn new(idle: RequestContext) -> Self {
        Tasks(Arc::new(TasksInner {
            state: Default::default(),
            idle,
        }))
    }

    /// The context of the request whose task runs now, else the
    /// instance's own.
    fn context(&self) -> RequestContext {
        self.current().unwrap_or_else(|| self.0.idle.clone())
    }

    /// The hook to set on the store, sharing this map.
    pub(crate) fn hook(&self) -> impl wasmtime::component::TaskGroupHook + use<> {
        TaskHook(self.clone())
    }

    /// `cx` is the request whose task runs in `group`.
    pub(crate) fn start(&self, group: wasmtime::component::TaskGroupId, cx: RequestContext) {
        self.lock().requests.insert(group, cx);
    }

    /// The context of the request whose task is running now, if any.
    fn current(&self) -> Option<RequestContext> {
        let state = self.lock();
        state.current.and_then(|g| state.requests.get(&g).cloned())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TaskState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct TaskHook(Tasks);

impl wasmtime::component::TaskGroupHook for TaskHook {
    fn handle_start(&mut self, _: wasmtime::component::TaskGroupId) -> wasmtime::Result<()> {
        Ok(())
    }

    fn handle_enter(&mut self, id: wasmtime::component::TaskGroupId) -> wasmtime::Result<()> {
        self.0.lock().current = Some(id);
        Ok(())
    }

    fn handle_exit(&mut self, id: wasmtime::component::TaskGroupId) -> wasmtime::Result<()> {
        let mut state = self.0.lock();
        if state.current == Some(id) {
            state.current = None;
        }
        Ok(())
    }

    fn handle_finish(&mut self, id: wasmtime::component::TaskGroupId) -> wasmtime::Result<()> {
        // Ids are reused once finished: forget its request.
        self.0.lock().requests.remove(&id);
        Ok(())
    }
}

impl Host {
    /// State for a fresh instance serving one request.
    pub fn new(
        cx: RequestContext,
        config: Arc<WasiConfigVariables>,
        outbound: Arc<ModuleOutbound>,
        guest_metrics: Arc<GuestMetrics>,
        memory_limit: u64,
    ) -> Self {
        Host::build(cx, None, config, outbound, guest_metrics, memory_limit)
    }

    fn build(
        cx: RequestContext,
        tasks: Option<Tasks>,
        config: Arc<WasiConfigVariables>,
        outbound: Arc<ModuleOutbound>,
        guest_metrics: Arc<GuestMetrics>,
        memory_limit: u64,
    ) -> Self {
        let output = |stream| GuestOutput {
            cx: cx.clone(),
            tasks: tasks.clone(),
            stream,
        };
        let wasi = WasiCtx::builder()
            .stdout(output("stdout"))
            .stderr(output("stderr"))
            .build();
        let limits = MemoryLimiter {
            limit: usize::try_from(memory_limit).unwrap_or(usize::MAX),
            on_exceeded: None,
        };
        Host {
            table: ResourceTable::new(),
            wasi,
            http: WasiHttpCtx::new(),
            hooks: OutboundHooks {
                outbound,
                trace: cx.trace.clone(),
                deadline: cx.deadline,
                current: tasks.clone().map(|tasks| -> CurrentRequest {
                    Arc::new(move || {
                        let cx = tasks.context();
                        (cx.trace, cx.deadline)
                    })
                }),
            },
            config,
            guest_metrics,
            limits,
            cx,
            tasks,
        }
    }

    /// State for a reused instance, whose requests are told apart by
    /// `tasks`.
    pub(crate) fn reused(
        tasks: Tasks,
        config: Arc<WasiConfigVariables>,
        outbound: Arc<ModuleOutbound>,
        guest_metrics: Arc<GuestMetrics>,
        memory_limit: u64,
    ) -> Self {
        let idle = tasks.0.idle.clone();
        Host::build(
            idle,
            Some(tasks),
            config,
            outbound,
            guest_metrics,
            memory_limit,
        )
    }

    /// Runs `hit` when the guest goes over its memory limit, before the
    /// trap unwinds: a reused instance is retired at once.
    pub(crate) fn on_memory_exceeded(&mut self, hit: Arc<dyn Fn() + Send + Sync>) {
        self.limits.on_exceeded = Some(hit);
    }
}

/// The guest went over its memory limit; the trap carries this error so the
/// server can tell it from a guest bug.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (the guest asked for {desired})")]
pub struct MemoryLimitExceeded {
    /// The module's limit.
    pub limit: usize,
    /// What the guest tried to grow to.
    pub desired: usize,
}

/// Enforces the module's memory limit per instance by trapping on growth
/// past it (rather than letting `memory.grow` return -1, which a Rust guest
/// turns into an indistinguishable abort).
pub(crate) struct MemoryLimiter {
    limit: usize,
    on_exceeded: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            if let Some(hit) = &self.on_exceeded {
                hit();
            }
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit: self.limit,
                desired,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Links `wasi:config/store` and `wasi:logging/logging`.
pub(super) fn add_capabilities_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    wasmtime_wasi_config::add_to_linker(linker, |h: &mut Host| WasiConfig::from(&*h.config))?;
    wasi_log::add_to_linker::<Host, GuestLogger>(linker, |h: &mut Host| Logger {
        cx: &h.cx,
        tasks: h.tasks.as_ref(),
    })?;
    berth_metrics::add_to_linker::<Host, GuestMetricsData>(linker, |h: &mut Host| {
        &*h.guest_metrics
    })?;
    Ok(())
}

struct GuestMetricsData;

impl HasData for GuestMetricsData {
    type Data<'a> = &'a GuestMetrics;
}

impl berth_metrics::Host for &GuestMetrics {
    fn counter_add(&mut self, name: String, value: u64, labels: Vec<(String, String)>) {
        GuestMetrics::counter_add(self, &name, value, &labels);
    }

    fn gauge_set(&mut self, name: String, value: f64, labels: Vec<(String, String)>) {
        GuestMetrics::gauge_set(self, &name, value, &labels);
    }

    fn histogram_observe(&mut self, name: String, value: f64, labels: Vec<(String, String)>) {
        GuestMetrics::histogram_observe(self, &name, value, &labels);
    }

    fn histogram_buckets(&mut self, name: String, buckets: Vec<f64>) {
        GuestMetrics::histogram_buckets(self, &name, &buckets);
    }
}

struct GuestLogger;

impl HasData for GuestLogger {
    type Data<'a> = Logger<'a>;
}

/// Where a guest's `wasi:logging` lines go: the store's request, or on a
/// reused instance the request whose task logs now. That one is looked up
/// per line and not kept: a finished request's context held by the store
/// would hold its server span open (exported late, its duration stretched)
/// until the instance retired.
struct Logger<'a> {
    cx: &'a RequestContext,
    tasks: Option<&'a Tasks>,
}

impl wasi_log::Host for Logger<'_> {
    fn log(&mut self, level: wasi_log::Level, context: String, message: String) {
        let current = self.tasks.map(Tasks::context);
        log_line(current.as_ref().unwrap_or(self.cx), level, context, message);
    }
}

fn log_line(cx: &RequestContext, level: wasi_log::Level, context: String, message: String) {
    use wasi_log::Level;
    let (module, request_id, trace_id) = (&*cx.module, &*cx.request_id, &cx.trace);
    if !cx.logs.admit(module) {
        return;
    }
    let message = capped(&message, MAX_LINE);
    let context = capped(&context, MAX_CONTEXT);
    // `tracing` levels are static per call site, hence one arm per level.
    macro_rules! emit {
        ($lvl:ident) => {
            tracing::event!(
                target: "guest",
                tracing::Level::$lvl,
                module,
                request_id,
                trace_id = %trace_id,
                context = &*context,
                "{message}"
            )
        };
    }
    let level = match level {
        Level::Trace => {
            emit!(TRACE);
            return;
        }
        Level::Debug => {
            emit!(DEBUG);
            return;
        }
        Level::Info => {
            emit!(INFO);
            tracing::Level::INFO
        }
        Level::Warn => {
            emit!(WARN);
            tracing::Level::WARN
        }
        Level::Error | Level::Critical => {
            emit!(ERROR);
            tracing::Level::ERROR
        }
    };
    span_event(cx, level, &message, || {
        KeyValue::new("context", context.into_owned())
    });
}

/// A guest's log line at `info` or above as an event on its span, whatever
/// `LOG_LEVEL` lets through to stdout: traces are not filtered by it. An
/// `error` line marks the span failed.
/// Nothing is copied for an untraced request.
fn span_event(
    cx: &RequestContext,
    level: tracing::Level,
    message: &str,
    source: impl FnOnce() -> KeyValue,
) {
    let span = cx.trace.log_span();
    if span.is_none() {
        return;
    }
    let attributes = vec![
        source(),
        KeyValue::new("level", level.as_str()),
        KeyValue::new("target", "guest"),
        KeyValue::new("module", cx.module.clone()),
        KeyValue::new("request_id", cx.request_id.clone()),
    ];
    if level == tracing::Level::ERROR {
        span.fail("");
    }
    span.event(message.to_owned(), attributes);
}

/// Guest stdout/stderr: split into lines, each a log event.
struct GuestOutput {
    cx: RequestContext,
    /// On a reused instance: whose task writes, looked up per line.
    tasks: Option<Tasks>,
    stream: &'static str,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            cx: self.cx.clone(),
            tasks: self.tasks.clone(),
            stream: self.stream,
            buf: Vec::new(),
        })
    }
}

/// Longest guest log line: a longer `wasi:logging` message is cut, and
/// stdout/stderr without a newline is logged in pieces, so a guest cannot
/// grow host memory or write megabyte lines.
const MAX_LINE: usize = 16 << 10;

/// Longest `wasi:logging` context.
const MAX_CONTEXT: usize = 256;

struct LineWriter {
    cx: RequestContext,
    tasks: Option<Tasks>,
    stream: &'static str,
    buf: Vec<u8>,
}

impl LineWriter {
    fn emit(&self, line: &[u8]) {
        let current = self.tasks.as_ref().and_then(Tasks::current);
        let cx = current.as_ref().unwrap_or(&self.cx);
        if !cx.logs.admit(&cx.module) {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        tracing::info!(
            target: "guest",
            module = &*cx.module,
            request_id = &*cx.request_id,
            trace_id = %cx.trace,
            stream = self.stream,
            "{line}"
        );
        span_event(cx, tracing::Level::INFO, line, || {
            KeyValue::new("stream", self.stream)
        });
    }

    fn flush_lines(&mut self) {
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            self.emit(&self.buf[start..start + nl]);
            start += nl + 1;
        }
        self.buf.drain(..start);
        if self.buf.len() >= MAX_LINE {
            self.emit(&self.buf);
            self.buf.clear();
        }
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(data);
        self.flush_lines();
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.emit(&self.buf);
        }
    }
}
