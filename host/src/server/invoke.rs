//! One request through a guest, as named steps. A fresh instance: admission,
//! store, WASI request, guest task, outcome, response. A reused instance:
//! admission, hand-over to the module's workers, outcome, response.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{Request, Response, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanBuilder;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use wasmtime::Store;
use wasmtime::component::Resource;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler::{
    ExpirationError, InstantiationError, ProxyHandler, TrapOrPanicError,
};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};

use super::body::{Bounded, Cut, CutOff, Delivered, Fate, Hangup, InFlight, Limited, Slot};
use super::error::{Dialect, GuestError, RequestError};
use crate::runtime::{
    Host, Module, RequestContext, Retired, Retirement, Serving, Ticket, Workers, World,
};
use crate::trace::Span;

/// What the guest answers through: its response head, or its error code.
type Answer = oneshot::Receiver<Result<Response<HyperOutgoingBody>, ErrorCode>>;

/// What a request is allowed: its time (the module's `limits.timeout`, or
/// less when the client asked for less), how a body cut short ends, and
/// its connection's [`Hangup`] for a cut response never taken up.
pub(super) struct Terms {
    pub(super) timeout: std::time::Duration,
    pub(super) dialect: Dialect,
    pub(super) hangup: Hangup,
}

/// Runs `req` through an instance of `module`, within its terms.
pub(super) async fn invoke(
    module: &Arc<Module>,
    tracker: &TaskTracker,
    req: Request<Incoming>,
    cx: &RequestContext,
    terms: Terms,
) -> Result<Response<HyperOutgoingBody>, RequestError> {
    // A WASI 0.2 guest is handed the request's authority, so a request
    // without one cannot be handed over: on a reused instance the failed
    // hand-over would take the instance down, for any client to repeat.
    if module.world == World::P2 && !has_authority(&req) {
        return Err(RequestError::Malformed(
            "the request has no Host header (a WASI 0.2 module needs the request's authority)"
                .into(),
        ));
    }
    match &module.serving {
        Serving::Fresh(pre) => fresh(module, pre, tracker, req, cx, terms).await,
        Serving::Pooled(workers) => pooled(module, workers, req, cx, terms).await,
    }
}

/// Whether `req` names its authority, in its URI (HTTP/2, absolute form) or
/// in a `Host` header wasmtime-wasi-http can read.
fn has_authority<B>(req: &Request<B>) -> bool {
    req.uri().authority().is_some()
        || req
            .headers()
            .get(header::HOST)
            .is_some_and(|host| host.to_str().is_ok())
}

/// Runs `req` through a fresh instance of `module`, in a task of its own.
async fn fresh(
    module: &Arc<Module>,
    pre: &ProxyPre<Host>,
    tracker: &TaskTracker,
    req: Request<Incoming>,
    cx: &RequestContext,
    terms: Terms,
) -> Result<Response<HyperOutgoingBody>, RequestError> {
    let permit = admit(module, &req)?;
    // No later than the guest's own deadline, which starts with its task.
    let deadline = tokio::time::Instant::now() + terms.timeout;
    // The store's context carries the guest call's span, where the
    // instance's log lines go; it ends with the task that holds the store.
    let mut cx = cx.clone();
    cx.trace.guest = guest_span(module, &cx);
    let mut store = module.new_store(pre, cx.clone());
    let request = WasiRequest::new(&mut store, req, module.limits.max_body.0)?;
    let fate = Fate::task();
    let guest = Guest {
        handles: request.handles,
        permit,
        timeout: terms.timeout,
        fate: fate.clone(),
        hangup: terms.hangup,
        waiting: request.waiting.clone(),
    };
    let task = spawn_guest(module, pre, tracker, store, guest, &cx);
    // Armed until the guest's answer is out: if this future is dropped
    // first (the client hung up), the guest is cancelled with it.
    let cut_off = CutOff::new(task.abort_handle());
    let outcome = outcome(request.answer, task, |err| {
        failed(module, &cx, &cx.trace.guest, err, &request.waiting)
    })
    .await;
    // Past this point a host answer replaces the guest's (413, 5xx): the
    // guest has nothing left to deliver, so dropping `cut_off` ends it.
    if request.too_big.load(Ordering::Relaxed) {
        return Err(RequestError::BodyTooLarge);
    }
    let outcome = client_held_up(outcome, &request.waiting)?;
    let (parts, body) = outcome.into_parts();
    let body = gather(body, &fate, terms.timeout, deadline).await?;
    let capped = Limited::response(body, module.limits.max_response_body.0);
    let body = Delivered::new(capped, cut_off, fate, terms.dialect);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// Load shedding (a full module answers at once instead of queueing) and
/// the declared body size.
fn admit(module: &Module, req: &Request<Incoming>) -> Result<OwnedSemaphorePermit, RequestError> {
    let permit = module
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| RequestError::Shed)?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > module.limits.max_body.0) {
        return Err(RequestError::BodyTooLarge);
    }
    Ok(permit)
}

/// The guest's handles to the request and its response slot.
type Handles = (
    Resource<HostIncomingRequest>,
    Resource<HostResponseOutparam>,
);

/// The request as the guest's `wasi:http` resources.
struct WasiRequest {
    handles: Handles,
    answer: Answer,
    /// Set when the body turns out larger than `max_body` as it streams.
    too_big: Arc<AtomicBool>,
    /// Set while the guest waits for body bytes the client has not sent.
    waiting: Arc<AtomicBool>,
}

impl WasiRequest {
    fn new(
        store: &mut Store<Host>,
        req: Request<Incoming>,
        max_body: u64,
    ) -> Result<Self, RequestError> {
        let too_big = Arc::new(AtomicBool::new(false));
        let waiting = Arc::new(AtomicBool::new(false));
        let (parts, body) = req.into_parts();
        let body = Limited::request(body, max_body, too_big.clone(), waiting.clone());
        let (tx, answer) = oneshot::channel();
        let mut http = store.data_mut().http();
        let malformed = |e: wasmtime::Error| RequestError::Malformed(e.to_string());
        let request = http
            .new_incoming_request(Scheme::Http, Request::from_parts(parts, body))
            .map_err(malformed)?;
        let out = http.new_response_outparam(tx).map_err(malformed)?;
        Ok(WasiRequest {
            handles: (request, out),
            answer,
            too_big,
            waiting,
        })
    }
}

/// What a fresh instance's task is given: the request's handles, its
/// concurrency slot and its time budget.
struct Guest {
    handles: Handles,
    permit: OwnedSemaphorePermit,
    timeout: std::time::Duration,
    /// Told how the guest ended, before its store goes.
    fate: Fate,
    /// Closes the connection if a cut response is never taken up.
    hangup: Hangup,
    /// Set while the guest waits for body bytes the client has not sent.
    waiting: Arc<AtomicBool>,
}

/// The response body, whole if the guest finished it at once (see
/// `coalesce`). A guest that failed meanwhile may have ended the stream by
/// going, not by finishing it; the head is not out yet, so the client gets
/// the failure itself, not a short body that looks whole.
async fn gather(
    body: HyperOutgoingBody,
    fate: &Fate,
    timeout: std::time::Duration,
    deadline: tokio::time::Instant,
) -> Result<HyperOutgoingBody, RequestError> {
    let body = super::body::coalesce(body, super::body::COALESCE_WAIT, deadline).await;
    match fate.get() {
        None => Ok(body),
        Some(Cut::Timeout) => Err(GuestError::Timeout(timeout).into()),
        Some(Cut::Failed) => {
            Err(GuestError::Trap("the module failed before finishing its response".into()).into())
        }
    }
}

/// Instantiates the module and calls its handler in a task of its own:
/// the guest keeps running after it sets the response head, to stream the
/// body. The task holds the concurrency slot and enforces the time budget.
fn spawn_guest(
    module: &Arc<Module>,
    pre: &ProxyPre<Host>,
    tracker: &TaskTracker,
    mut store: Store<Host>,
    guest: Guest,
    cx: &RequestContext,
) -> JoinHandle<Result<(), GuestError>> {
    let Guest {
        handles: (request, out),
        permit,
        timeout,
        fate,
        hangup,
        waiting,
    } = guest;
    let module = module.clone();
    let pre = pre.clone();
    let cx = cx.clone();
    tracker.spawn(async move {
        let metrics = &module.metrics;
        // A guard, not a call at the end: the task may be aborted.
        let _slot = Slot::new(permit, InFlight::new(&metrics.in_flight));
        let work = async {
            // Counted from here, not from when the store was made: a
            // tick that passed while this task waited for its turn
            // would make the guest yield at once and queue again.
            store.set_epoch_deadline(1);
            let started = Instant::now();
            let slot = crate::runtime::instance_starting().await;
            let proxy = pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| GuestError::Instantiate(format!("{e:#}")))?;
            drop(slot);
            metrics.instantiate.observe(started.elapsed().as_secs_f64());
            metrics.instances.created.inc();
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, request, out)
                .await
                .map_err(|e| GuestError::classify(e, timeout))
        };
        // Epochs cannot interrupt a guest blocked in a host call, so the
        // budget is also enforced from outside. The store (and with it
        // the instance and its response stream) goes when the task
        // ends, after the fate is told.
        let mut work = std::pin::pin!(work);
        let result = tokio::time::timeout(timeout, work.as_mut())
            .await
            .unwrap_or(Err(GuestError::Timeout(timeout)));
        if let Err(err) = &result {
            let cut = match err {
                GuestError::Timeout(_) => Cut::Timeout,
                _ => Cut::Failed,
            };
            fate.cut(cut, &hangup);
            failed(&module, &cx, &cx.trace.guest, err, &waiting);
        }
        result
    })
}

/// Counts and logs a failed guest call, and marks its span failed unless
/// the client held it up (a timeout while the guest waited for body bytes
/// the client never sent is the client's 408, not the guest's failure).
fn failed(
    module: &Module,
    cx: &RequestContext,
    span: &Span,
    err: &GuestError,
    waiting: &AtomicBool,
) {
    err.count(&module.metrics);
    let error = err.to_string();
    tracing::warn!(
        module = &*cx.module,
        request_id = &*cx.request_id,
        trace_id = %cx.trace,
        error = %error,
        "request failed"
    );
    span.event(
        "request failed",
        vec![KeyValue::new("error", error.clone())],
    );
    if !(matches!(err, GuestError::Timeout(_)) && waiting.load(Ordering::Relaxed)) {
        span.fail(error);
    }
}

/// Runs `req` through one of the module's reused instances. The deadline
/// is kept here, outside the instance: a request that runs over gets its
/// 504 on time even while a neighbour holds the store, and its instance is
/// retired (see `runtime::reuse`). The concurrency slot is held until the
/// response body is delivered, and no longer than the same deadline (to
/// the last byte, as on a fresh instance).
async fn pooled(
    module: &Arc<Module>,
    workers: &ProxyHandler<Workers>,
    req: Request<Incoming>,
    cx: &RequestContext,
    terms: Terms,
) -> Result<Response<HyperOutgoingBody>, RequestError> {
    let Terms {
        timeout,
        dialect,
        hangup,
    } = terms;
    let permit = admit(module, &req)?;
    let too_big = Arc::new(AtomicBool::new(false));
    let waiting = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = Limited::request(
        body,
        module.limits.max_body.0,
        too_big.clone(),
        waiting.clone(),
    )
    .boxed_unsync();
    let instance = Arc::new(OnceLock::new());
    let ticket = Ticket {
        cx: cx.clone(),
        instance: instance.clone(),
    };
    // Held until the response body is delivered, or its deadline.
    let slot = Slot::new(permit, InFlight::new(&module.metrics.in_flight));
    let deadline = tokio::time::Instant::now() + timeout;
    // Ends when the guest's answer is in (or not): the instance's work
    // after that is its worker's.
    let span = guest_span(module, cx);
    let answer = workers.handle(ticket, Request::from_parts(parts, body));
    let result = match tokio::time::timeout(timeout, answer).await {
        Err(_) => Err(GuestError::Timeout(timeout)),
        Ok(Ok(resp)) => Ok(resp),
        // The worker's own expiry of the request fires on the same timer
        // tick as this deadline and may be seen first; the store's teardown
        // then reads as "no response" or a trap. Past the deadline, the
        // deadline is the cause.
        Ok(Err(_)) if tokio::time::Instant::now() >= deadline => Err(GuestError::Timeout(timeout)),
        Ok(Err(e)) => Err(pooled_error(e, &instance, timeout)),
    };
    if let Err(err) = &result {
        failed(module, cx, &span, err, &waiting);
    }
    drop(span);
    if too_big.load(Ordering::Relaxed) {
        return Err(RequestError::BodyTooLarge);
    }
    let (parts, body) = client_held_up(result, &waiting)?.into_parts();
    let slot = slot.streaming(instance.get().map(|i| i.streaming()));
    let fate = Fate::Instance(instance);
    let body = gather(body, &fate, timeout, deadline).await?;
    let capped = Limited::response(body, module.limits.max_response_body.0);
    // A whole body is taken by hyper at once, and frees the slot as it
    // goes; a stream is bounded by the request's deadline.
    let body = if capped.size_hint().exact().is_some() {
        Delivered::new(capped, CutOff::holding(slot), Fate::Whole, dialect).boxed_unsync()
    } else {
        let name = module.name.clone();
        Bounded::new(capped, slot, deadline, name, dialect, fate, hangup).boxed_unsync()
    };
    Ok(Response::from_parts(parts, body))
}

/// A timeout while the guest was waiting for body bytes the client had not
/// sent is the client's doing: a 408, not the guest's 504.
fn client_held_up<T>(
    outcome: Result<T, GuestError>,
    waiting: &AtomicBool,
) -> Result<T, RequestError> {
    match outcome {
        Err(GuestError::Timeout(_)) if waiting.load(Ordering::Relaxed) => {
            Err(RequestError::BodyTimeout)
        }
        other => Ok(other?),
    }
}

/// What a failed hand-over to a reused instance means for its request.
fn pooled_error(
    e: wasmtime::Error,
    instance: &OnceLock<Arc<Retirement>>,
    timeout: std::time::Duration,
) -> GuestError {
    if e.is::<ExpirationError>() {
        return GuestError::Timeout(timeout);
    }
    if let Some(failed) = e.downcast_ref::<InstantiationError<Ticket>>() {
        return GuestError::Instantiate(format!("{:#}", failed.error));
    }
    if e.is::<TrapOrPanicError>() {
        // The store was lost under this request: say what took it down.
        return match instance.get().and_then(|r| r.reason()) {
            Some(Retired::MemoryLimit) => {
                GuestError::Memory("its instance went over the memory limit".into())
            }
            Some(Retired::Timeout) => GuestError::Trap(
                "its instance was torn down: a request on it ran over its deadline".into(),
            ),
            _ => GuestError::Trap("its instance trapped".into()),
        };
    }
    if let Some(code) = e.downcast_ref::<wasmtime_wasi_http::p3::bindings::http::types::ErrorCode>()
    {
        return GuestError::ErrorCode(format!("{code:?}"));
    }
    if format!("{e}").contains("response-outparam::set") {
        return GuestError::NoResponse;
    }
    GuestError::classify(e, timeout)
}

/// A child of the request's span, when the request is traced.
fn guest_span(module: &Module, cx: &RequestContext) -> Span {
    cx.trace.child_span(|| {
        SpanBuilder::from_name(format!("guest {}", module.name))
            .with_attributes([KeyValue::new("module", module.name.clone())])
    })
}

/// The guest's response head, or why there is none; a failure the task
/// did not report itself goes to `report`.
async fn outcome(
    answer: Answer,
    task: JoinHandle<Result<(), GuestError>>,
    report: impl FnOnce(&GuestError),
) -> Result<Response<HyperOutgoingBody>, GuestError> {
    let err = match answer.await {
        Ok(Ok(resp)) => return Ok(resp),
        Ok(Err(code)) => GuestError::ErrorCode(format!("{code:?}")),
        // The guest dropped its response slot: its task says why.
        Err(_) => match task.await {
            Ok(Ok(())) => GuestError::NoResponse,
            // Reported by the task.
            Ok(Err(e)) => return Err(e),
            Err(join) => GuestError::Trap(join.to_string()),
        },
    };
    report(&err);
    Err(err)
}
