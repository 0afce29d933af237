//! One request through one fresh guest instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use http_body_util::BodyExt;

use super::body::{CutOff, Delivered, Limited};
use super::json_error;
use tracing::Instrument;

use crate::runtime::{Host, MemoryLimitExceeded, Module, RequestContext};

/// How a guest call failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Over the module's wall-clock budget.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Over the module's memory limit.
    #[error("{0}")]
    Memory(String),
    /// The guest trapped (panic, unreachable, stack overflow, ...).
    #[error("guest trapped: {0}")]
    Trap(String),
    /// The host could not create an instance (e.g. the pool is exhausted).
    #[error("could not instantiate the module: {0}")]
    Instantiate(String),
    /// The guest answered with a `wasi:http` error code instead of a response.
    #[error("guest returned an error: {0:?}")]
    ErrorCode(ErrorCode),
    /// The guest returned without setting a response.
    #[error("guest returned without a response")]
    NoResponse,
}

impl GuestError {
    fn status(&self) -> StatusCode {
        match self {
            GuestError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GuestError::Instantiate(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn public_message(&self) -> &'static str {
        match self {
            GuestError::Timeout(_) => "the module did not answer in time",
            GuestError::Memory(_) => "the module ran out of memory",
            GuestError::Instantiate(_) => "the host is at capacity",
            _ => "the module failed",
        }
    }

    fn classify(err: wasmtime::Error, timeout: std::time::Duration) -> GuestError {
        if let Some(m) = err.downcast_ref::<MemoryLimitExceeded>() {
            return GuestError::Memory(m.to_string());
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => GuestError::Timeout(timeout),
            Some(_) => GuestError::Trap(format!("{err:#}")),
            None => GuestError::Trap(format!("{err:#}")),
        }
    }
}

/// Runs `req` through a fresh instance of `module`.
pub(super) async fn invoke(
    module: &Arc<Module>,
    tracker: &TaskTracker,
    req: Request<Incoming>,
    cx: &RequestContext,
) -> Response<HyperOutgoingBody> {
    let request_id = &cx.request_id;
    let limits = module.limits;
    // Load shedding: a full module answers at once instead of queueing.
    let Ok(permit) = module.slots.clone().try_acquire_owned() else {
        module.metrics.shed.inc();
        let mut resp = json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the module is at its concurrency limit",
            request_id,
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body.0) {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body exceeds the module's max_body",
            request_id,
        );
    }

    let host = Host::new(
        cx.clone(),
        module.config.clone(),
        module.outbound.clone(),
        module.guest_metrics.clone(),
        limits.memory.0,
    );
    let mut store = Store::new(module.pre.engine(), host);
    store.limiter(|h| &mut h.limits);
    let deadline = Instant::now() + limits.timeout;
    store.epoch_deadline_callback(move |_| {
        Ok(if Instant::now() >= deadline {
            UpdateDeadline::Interrupt
        } else {
            // A custom yield: tokio's plain yield can be rescheduled at once
            // through the LIFO slot and starve other tasks (wasmtime#10667).
            UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
        })
    });

    let too_big = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = Limited::request(body, limits.max_body.0, too_big.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let prepared = (|| {
        let mut http = store.data_mut().http();
        let wreq = http.new_incoming_request(Scheme::Http, Request::from_parts(parts, body))?;
        let out = http.new_response_outparam(tx)?;
        Ok::<_, wasmtime::Error>((wreq, out))
    })();
    let (wreq, out) = match prepared {
        Ok(p) => p,
        Err(err) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("malformed request: {err}"),
                request_id,
            );
        }
    };

    let pre = module.pre.clone();
    let module2 = module.clone();
    let task_cx = cx.clone();
    let guest_span = if cx.trace.span.is_none() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            target: "berth::request",
            parent: &cx.trace.span,
            "guest",
            otel.name = %format_args!("guest {}", module.name),
            module = &*module.name,
        )
    };
    // The guest keeps running after it sets the response head, to stream
    // the body, so it lives in its own task.
    let task = tracker.spawn(
        async move {
            let _permit = permit;
            let metrics = &module2.metrics;
            // A guard, not a call at the end: the task may be aborted.
            metrics.in_flight.inc();
            let _in_flight = scopeguard_dec(&metrics.in_flight);
            let work = async {
                // Counted from here, not from when the store was made: a
                // tick that passed while this task waited for its turn
                // would make the guest yield at once and queue again.
                store.set_epoch_deadline(1);
                let started = Instant::now();
                let proxy = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| GuestError::Instantiate(format!("{e:#}")))?;
                metrics.instantiate.observe(started.elapsed().as_secs_f64());
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, wreq, out)
                    .await
                    .map_err(|e| GuestError::classify(e, limits.timeout))
            };
            // Epochs cannot interrupt a guest blocked in a host call, so the
            // budget is also enforced from outside; dropping the future drops
            // the store and tears the instance down.
            let result = match tokio::time::timeout(limits.timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(GuestError::Timeout(limits.timeout)),
            };
            if let Err(err) = &result {
                match err {
                    GuestError::Timeout(_) => metrics.timeouts.inc(),
                    GuestError::Memory(_) => metrics.memory.inc(),
                    GuestError::Trap(_) => metrics.traps.inc(),
                    _ => {}
                }
                tracing::warn!(
                    module = &*task_cx.module,
                    request_id = &*task_cx.request_id,
                    trace_id = %task_cx.trace,
                    error = %err,
                    "request failed"
                );
            }
            result
        }
        .instrument(guest_span),
    );

    // Armed until the guest's answer is out: if this future is dropped
    // first (the client hung up), the guest is cancelled with it.
    let cut_off = CutOff::new(task.abort_handle());
    let outcome = match rx.await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(code)) => Err(GuestError::ErrorCode(code)),
        Err(_) => match task.await {
            Ok(Ok(())) => Err(GuestError::NoResponse),
            Ok(Err(e)) => Err(e),
            Err(join) => Err(GuestError::Trap(join.to_string())),
        },
    };
    // Past this point a host answer replaces the guest's (413, 5xx): the
    // guest has nothing left to deliver, so dropping `cut_off` ends it.
    if too_big.load(Ordering::Relaxed) {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body exceeds the module's max_body",
            request_id,
        );
    }
    match outcome {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = super::body::coalesce(body).await;
            let capped = Limited::response(body, limits.max_response_body.0);
            Response::from_parts(parts, Delivered::new(capped, cut_off).boxed_unsync())
        }
        Err(err) => json_error(err.status(), err.public_message(), request_id),
    }
}

/// Decrements `gauge` when dropped, however the task ends.
fn scopeguard_dec(gauge: &prometheus::IntGauge) -> impl Drop + '_ {
    struct Dec<'a>(&'a prometheus::IntGauge);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Dec(gauge)
}
