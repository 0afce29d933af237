//! gRPC where the host answers for itself: the client's `grpc-timeout`
//! becomes the request's deadline, and the standard health service's
//! `Check` and `Watch` answer from the host's readiness (the host's errors
//! as gRPC statuses are in `error.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use prost::Message as _;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::error::{GrpcCode, RequestError, grpc_trailers};
use crate::router::Routes;

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The request's time budget: the module's `timeout`, or the client's
/// `grpc-timeout` when shorter. The header is rewritten to that budget, so
/// the guest sees the time it really has. A malformed `grpc-timeout` is
/// refused rather than ignored: the client meant a deadline.
pub(super) fn deadline(
    headers: &mut HeaderMap,
    module: Duration,
) -> Result<Duration, RequestError> {
    let Some(value) = headers.get(GRPC_TIMEOUT) else {
        return Ok(module);
    };
    let asked = value
        .to_str()
        .ok()
        .and_then(crate::outbound::parse_grpc_timeout)
        .ok_or_else(|| RequestError::Malformed(format!("bad grpc-timeout {value:?}")))?;
    let budget = asked.min(module);
    headers.insert(GRPC_TIMEOUT, crate::outbound::grpc_timeout(budget));
    Ok(budget)
}

/// The path of `grpc.health.v1.Health/Check`.
pub(super) const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// The path of `grpc.health.v1.Health/Watch`.
pub(super) const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// How often a watch looks at readiness and the routes: there is no
/// change signal for either, and a check is a few loads.
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// Open watches, host-wide: each is a task and a timer, and a client may
/// open them on every stream of every connection.
pub(super) const MAX_WATCHES: usize = 1024;

/// `ServingStatus` of the health protocol.
const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;
const SERVICE_UNKNOWN: i32 = 3;

/// Largest health request read (its one field is a service name).
const MAX_HEALTH_REQUEST: usize = 4096;

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    /// SERVING 1, NOT_SERVING 2.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `Check`: for the service `""` the host as a whole, for a module's name
/// that module; SERVING while the host is ready and not draining (what
/// `/ready` says), NOT_SERVING otherwise, and NOT_FOUND for a name no
/// module has (as the health protocol asks). Kubernetes' gRPC probes call
/// this.
pub(super) async fn health_check(
    req: Request<Incoming>,
    routes: &Routes,
    serving: bool,
    within: Duration,
) -> Result<Response<HyperOutgoingBody>, RequestError> {
    let service = health_request(req, within).await?;
    match status_of(&service, routes, serving) {
        SERVICE_UNKNOWN => Err(RequestError::UnknownService(service)),
        status => Ok(respond(&HealthCheckResponse { status })),
    }
}

/// What `Watch` needs of the server: its readiness, its drain signal, the
/// task tracker the watch runs in, and the host-wide bound on watches.
pub(super) struct Watching {
    pub(super) ready: super::Readiness,
    pub(super) stop: tokio_util::sync::CancellationToken,
    pub(super) tracker: tokio_util::task::TaskTracker,
    pub(super) slots: Arc<tokio::sync::Semaphore>,
    /// Watches open now (`berth_grpc_health_watches`).
    pub(super) open: prometheus::IntGauge,
}

/// One of the [`MAX_WATCHES`] slots, counted while held.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Slot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, open: &prometheus::IntGauge) -> Self {
        open.inc();
        Slot {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// `Watch`: the service's status now, then each change, as the health
/// protocol asks (SERVICE_UNKNOWN, not an error, for a name no module has,
/// since a module may come with the next reload). When the host drains,
/// the watch says NOT_SERVING and ends with UNAVAILABLE, so that it never
/// holds the shutdown up. A client that does not read misses nothing: the
/// newest status is sent once there is room.
pub(super) async fn health_watch(
    req: Request<Incoming>,
    routes: Arc<Routes>,
    watching: &Watching,
    within: Duration,
) -> Result<Response<HyperOutgoingBody>, RequestError> {
    let permit = watching
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| RequestError::Shed)?;
    let slot = Slot::new(permit, &watching.open);
    let service = health_request(req, within).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame<bytes::Bytes>>(1);
    let (ready, stop) = (watching.ready.clone(), watching.stop.clone());
    watching.tracker.spawn(async move {
        let _slot = slot;
        let mut sent = None;
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let status = status_of(&service, &routes, ready());
            if sent != Some(status) {
                match tx.try_send(Frame::data(frame(&HealthCheckResponse { status }))) {
                    Ok(()) => sent = Some(status),
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => break,
                _ = tx.closed() => return,
            }
        }
        // Draining. Bounded waits: a client that does not read gets its
        // stream ended by the connection's shutdown instead.
        let last = async {
            if sent != Some(NOT_SERVING) {
                let data = frame(&HealthCheckResponse {
                    status: NOT_SERVING,
                });
                tx.send(Frame::data(data)).await.ok()?;
            }
            let trailers = grpc_trailers(GrpcCode::Unavailable, "the server is draining");
            tx.send(Frame::trailers(trailers)).await.ok()
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), last).await;
    });
    let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|f| f.map(Ok)));
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

/// The service a health request names: one small message, read within
/// the header timeout.
async fn health_request(req: Request<Incoming>, within: Duration) -> Result<String, RequestError> {
    let read = Limited::new(req.into_body(), MAX_HEALTH_REQUEST).collect();
    let body = tokio::time::timeout(within, read)
        .await
        .map_err(|_| RequestError::BodyTimeout)?
        .map_err(|e| RequestError::Malformed(format!("health check request: {e}")))?
        .to_bytes();
    Ok(decode(&body)
        .ok_or_else(|| RequestError::Malformed("health check request: not one message".into()))?
        .service)
}

/// SERVING, NOT_SERVING or SERVICE_UNKNOWN: `""` is the host, any other
/// name a module.
fn status_of(service: &str, routes: &Routes, serving: bool) -> i32 {
    if !service.is_empty() && !routes.current().modules().any(|m| *m.name == *service) {
        SERVICE_UNKNOWN
    } else if serving {
        SERVING
    } else {
        NOT_SERVING
    }
}

/// One length-prefixed, uncompressed message of the gRPC wire format.
fn decode(body: &[u8]) -> Option<HealthCheckRequest> {
    let (&[compressed, a, b, c, d], message) = body.split_first_chunk::<5>()?;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if compressed != 0 || message.len() != len {
        return None;
    }
    HealthCheckRequest::decode(message).ok()
}

/// A gRPC response body that counts its call once it ends: by the status
/// in its trailers (or in its head, for a trailers-only answer); INTERNAL
/// when the stream fails, CANCELLED when the client goes first.
pub(super) struct Counted {
    inner: HyperOutgoingBody,
    module: Arc<crate::runtime::Module>,
    path: String,
    started: std::time::Instant,
    head_code: Option<u32>,
    counted: bool,
}

/// The `grpc-status` of a head or trailers.
fn code_in(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl Counted {
    pub(super) fn wrap(
        resp: Response<HyperOutgoingBody>,
        module: Arc<crate::runtime::Module>,
        path: &str,
        started: std::time::Instant,
    ) -> Response<HyperOutgoingBody> {
        let head_code = code_in(resp.headers());
        resp.map(|inner| {
            BodyExt::boxed_unsync(Counted {
                inner,
                module,
                path: path.to_owned(),
                started,
                head_code,
                counted: false,
            })
        })
    }

    fn count(&mut self, code: u32) {
        if !std::mem::replace(&mut self.counted, true) {
            let elapsed = self.started.elapsed();
            self.module.metrics.grpc.observe(&self.path, code, elapsed);
        }
    }
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(code_in) {
                    self.count(code);
                }
            }
            Some(Err(_)) => self.count(GrpcCode::Internal as u32),
            // No trailers: the head's status, or none at all, which a
            // client reads as UNKNOWN.
            None => {
                let code = self.head_code.unwrap_or(2);
                self.count(code);
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // hyper drops a body it stops polling: the client reset the stream
        // or went away, or the body said it had ended with its last frame.
        let code = if http_body::Body::is_end_stream(&self.inner) {
            self.head_code.unwrap_or(2)
        } else {
            1
        };
        self.count(code);
    }
}

/// One length-prefixed message.
fn frame(message: &HealthCheckResponse) -> bytes::Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.encoded_len());
    framed.put_u8(0);
    framed.put_u32(message.encoded_len() as u32);
    message.encode(&mut framed).expect("room was reserved");
    framed.freeze()
}

/// A unary gRPC answer: the message, then `grpc-status: 0` as trailers.
fn respond(message: &HealthCheckResponse) -> Response<HyperOutgoingBody> {
    let frames = [
        Ok(Frame::data(frame(message))),
        Ok(Frame::trailers(grpc_trailers(GrpcCode::Ok, ""))),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut resp = Response::new(BodyExt::boxed_unsync(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(service: &str) -> Vec<u8> {
        let message = HealthCheckRequest {
            service: service.into(),
        }
        .encode_to_vec();
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    #[test]
    fn a_health_request_is_one_uncompressed_message_of_its_stated_length() {
        assert_eq!(decode(&framed("shop")).unwrap().service, "shop");
        assert_eq!(decode(&framed("")).unwrap().service, "");
        let mut compressed = framed("shop");
        compressed[0] = 1;
        assert!(decode(&compressed).is_none());
        let whole = framed("shop");
        assert!(decode(&whole[..whole.len() - 1]).is_none(), "cut short");
        assert!(decode(&[whole.clone(), whole].concat()).is_none(), "two");
        assert!(decode(&[0, 0, 0]).is_none());
        assert!(
            decode(&[0, 0, 0, 0, 2, 0xff, 0xff]).is_none(),
            "not protobuf"
        );
    }

    #[test]
    fn the_budget_is_the_shorter_and_the_guest_sees_it() {
        let module = Duration::from_secs(10);
        let mut headers = HeaderMap::new();
        assert_eq!(deadline(&mut headers, module).unwrap(), module);
        assert!(headers.get(GRPC_TIMEOUT).is_none(), "none is made up");
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("300m"));
        assert_eq!(
            deadline(&mut headers, module).unwrap(),
            Duration::from_millis(300)
        );
        assert_eq!(headers[GRPC_TIMEOUT], "300m");
        // A client that allows more than the module gets the module's.
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("1H"));
        assert_eq!(deadline(&mut headers, module).unwrap(), module);
        assert_eq!(headers[GRPC_TIMEOUT], "10000m");
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("5n"));
        assert_eq!(
            deadline(&mut headers, module).unwrap(),
            Duration::from_nanos(5)
        );
        assert_eq!(headers[GRPC_TIMEOUT], "1m");
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("soon"));
        let err = deadline(&mut headers, module).unwrap_err();
        assert!(err.to_string().contains("grpc-timeout"), "{err}");
    }
}
