//! Bodies between clients and guests: size limits enforced as bytes pass
//! (never by buffering everything), and small responses gathered into one
//! write.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::error::{Dialect, GrpcCode, grpc_trailers};
use crate::runtime::{Retired, Retirement};

/// A body that fails once more than `limit` bytes have passed through it,
/// without buffering anything. Used both ways: on the request body (the
/// guest reads it streamed; `exceeded` lets the host answer 413 whatever the
/// guest does with the error) and on the guest's response body (cut off
/// past `max_response_body`).
pub(super) struct Limited<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    exceeded: Option<Arc<AtomicBool>>,
    error: fn(u64) -> wasmtime_wasi_http::Error,
}

impl Limited<Lingering> {
    /// The request body, over `limit` an `HttpRequestBodySize` error.
    /// `waiting` is set while the guest waits for bytes the client has not
    /// sent yet.
    pub(super) fn request(
        inner: Incoming,
        limit: u64,
        exceeded: Arc<AtomicBool>,
        waiting: Arc<AtomicBool>,
    ) -> Self {
        Limited {
            inner: Lingering::new(inner, waiting),
            remaining: limit,
            limit,
            exceeded: Some(exceeded),
            error: |limit| wasmtime_wasi_http::Error::HttpRequestBodySize(Some(limit)),
        }
    }
}

impl Limited<HyperOutgoingBody> {
    /// The guest's response body, over `limit` an `HttpResponseBodySize` error.
    pub(super) fn response(inner: HyperOutgoingBody, limit: u64) -> Self {
        Limited {
            inner,
            remaining: limit,
            limit,
            exceeded: None,
            error: |limit| {
                tracing::warn!(limit, "response body over max_response_body: cut off");
                wasmtime_wasi_http::Error::HttpResponseBodySize(Some(limit))
            },
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > this.remaining {
                this.remaining = 0;
                if let Some(flag) = &this.exceeded {
                    flag.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err((this.error)(this.limit))));
            }
            this.remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request's hold on its module while it is served: its concurrency slot
/// and its count in the in-flight gauge, both given back on drop.
pub(super) struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _in_flight: InFlight,
}

impl Slot {
    pub(super) fn new(permit: tokio::sync::OwnedSemaphorePermit, in_flight: InFlight) -> Self {
        Slot {
            _permit: permit,
            _in_flight: in_flight,
        }
    }
}

/// One request counted in an in-flight gauge until dropped, however its
/// task or body ends.
pub(super) struct InFlight(prometheus::IntGauge);

impl InFlight {
    pub(super) fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Cancels a guest task when dropped armed: the client went away before
/// the response head (hyper drops the request's future), or the response
/// body stopped being delivered before its end (hyper drops the body).
/// Dropping the task drops the store, which ends the instance and every
/// outbound call it had open, and frees the module's concurrency slot.
pub(super) struct CutOff(Option<tokio::task::AbortHandle>, Option<Slot>);

impl CutOff {
    pub(super) fn new(task: tokio::task::AbortHandle) -> Self {
        CutOff(Some(task), None)
    }

    /// For a reused instance, whose guest task cannot be aborted alone:
    /// holds the request's slot until the body is delivered.
    pub(super) fn holding(slot: Slot) -> Self {
        CutOff(None, Some(slot))
    }

    /// The guest may run on: its answer was delivered.
    pub(super) fn disarm(&mut self) {
        self.0 = None;
        self.1 = None;
    }
}

impl Drop for CutOff {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Closes the connection a request came on. hyper does not poll a
/// response body it cannot send (a client that stopped reading, or never
/// opens its flow-control window), so a body cut off at its deadline is
/// never told to end, and hyper keeps the stream, its buffered bytes and
/// the connection until the client goes. A cut response not taken up
/// within [`STUCK_GRACE`] closes the connection instead.
#[derive(Clone, Default)]
pub(super) struct Hangup(tokio_util::sync::CancellationToken);

/// How long a response cut at its deadline may wait for hyper to take its
/// last frame before its connection is closed.
const STUCK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

impl Hangup {
    /// Resolves once some response on the connection was stuck.
    pub(super) async fn requested(&self) {
        self.0.cancelled().await
    }

    /// Closes the connection after [`STUCK_GRACE`] unless `ended` says the
    /// response's last frame was taken by then.
    pub(super) fn unless_taken(&self, ended: impl Fn() -> bool + Send + 'static) {
        let token = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STUCK_GRACE).await;
            if !ended() && !token.is_cancelled() {
                tracing::info!(
                    "closing a connection whose client takes no more of a response cut off at its deadline"
                );
                token.cancel();
            }
        });
    }
}

/// How the guest behind a response ended, as its body needs to know.
/// wasmtime-wasi-http ends the body of a guest torn down mid-stream (over
/// its deadline, trapped, or on an instance a neighbour took down) the way
/// it ends a finished one, so without this a cut-off stream would look
/// complete to the client.
#[derive(Clone, Default)]
pub(super) enum Fate {
    /// Whole bodies, which were complete when the head went out.
    #[default]
    Whole,
    /// A fresh instance: its task records how it ended, and the body
    /// whether its last frame was taken.
    Task(Arc<TaskFate>),
    /// A reused instance: retired for a trap or the memory limit, or torn
    /// down by its worker past the deadline, it took every stream on it
    /// down. (A request's deadline only stops it taking new requests: its
    /// neighbours run on and finish their streams.)
    Instance(Arc<std::sync::OnceLock<Arc<Retirement>>>),
}

/// Why a guest stopped before finishing its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// Over its deadline.
    Timeout,
    /// Trapped, over its memory, or failed otherwise.
    Failed,
}

/// What a fresh instance's task and its response body share.
#[derive(Default)]
pub(super) struct TaskFate {
    cut: std::sync::OnceLock<Cut>,
    /// A response body was handed to hyper (a host answer replaces it
    /// otherwise: nothing to wait for).
    delivering: AtomicBool,
    /// The body's last frame was taken, or the body dropped.
    ended: AtomicBool,
}

impl Fate {
    /// For a fresh instance's task to record its end in.
    pub(super) fn task() -> Self {
        Fate::Task(Arc::default())
    }

    /// Records the guest's end. Set before the guest's store is dropped,
    /// so a body that sees its stream end already knows why. A body not
    /// taken up by then gets [`STUCK_GRACE`] before `hangup` closes its
    /// connection.
    pub(super) fn cut(&self, cut: Cut, hangup: &Hangup) {
        if let Fate::Task(fate) = self {
            let _ = fate.cut.set(cut);
            let fate = fate.clone();
            hangup.unless_taken(move || {
                !fate.delivering.load(Ordering::Relaxed) || fate.ended.load(Ordering::Relaxed)
            });
        }
    }

    /// The body is done with: its last frame taken, or dropped.
    fn ended(&self) {
        if let Fate::Task(fate) = self {
            fate.ended.store(true, Ordering::Relaxed);
        }
    }

    pub(super) fn get(&self) -> Option<Cut> {
        match self {
            Fate::Whole => None,
            Fate::Task(fate) => fate.cut.get().copied(),
            Fate::Instance(instance) => {
                let instance = instance.get()?;
                match instance.reason()? {
                    Retired::Trap | Retired::MemoryLimit => Some(Cut::Failed),
                    _ if instance.torn_down() => Some(Cut::Timeout),
                    Retired::Timeout | Retired::MaxRequests | Retired::Idle | Retired::Stopped => {
                        None
                    }
                }
            }
        }
    }
}

impl Cut {
    /// The last frame of a body cut short: for gRPC the status in
    /// trailers (the head went out with 200, so trailers are the only place
    /// left for it), for HTTP an error, so that hyper aborts the stream and
    /// the client sees it incomplete (no last chunk, or RST_STREAM).
    fn last_frame(self, dialect: Dialect) -> Result<Frame<Bytes>, wasmtime_wasi_http::Error> {
        use wasmtime_wasi_http::Error;
        match (dialect, self) {
            (Dialect::Grpc, Cut::Timeout) => Ok(Frame::trailers(grpc_trailers(
                GrpcCode::DeadlineExceeded,
                "the module ran over its deadline",
            ))),
            (Dialect::Grpc, Cut::Failed) => Ok(Frame::trailers(grpc_trailers(
                GrpcCode::Internal,
                "the module failed",
            ))),
            (Dialect::Http, Cut::Timeout) => Err(Error::HttpResponseTimeout),
            (Dialect::Http, Cut::Failed) => Err(Error::InternalError(Some(
                "the module failed before finishing its response".into(),
            ))),
        }
    }
}

/// A response body that cuts its guest off if it is dropped before its
/// end, and ends as [`Cut::last_frame`] says if its guest was torn down.
pub(super) struct Delivered<B> {
    inner: B,
    cut_off: CutOff,
    fate: Fate,
    dialect: Dialect,
    ended: bool,
}

impl<B> Delivered<B> {
    pub(super) fn new(inner: B, cut_off: CutOff, fate: Fate, dialect: Dialect) -> Self {
        if let Fate::Task(fate) = &fate {
            fate.delivering.store(true, Ordering::Relaxed);
        }
        Delivered {
            inner,
            cut_off,
            fate,
            dialect,
            ended: false,
        }
    }
}

impl<B> Drop for Delivered<B> {
    fn drop(&mut self) {
        self.fate.ended();
    }
}

impl<B> Body for Delivered<B>
where
    B: Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Unpin,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none()
            && let Some(cut) = self.fate.get()
        {
            self.ended = true;
            frame = Some(cut.last_frame(self.dialect));
        }
        // hyper stops polling a body that says it has ended.
        if frame.is_none() || self.ended || self.inner.is_end_stream() {
            self.cut_off.disarm();
            self.fate.ended();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A reused instance's streaming response body, delivered within a
/// deadline (`limits.timeout`, counted from the request's arrival, to the
/// last byte). It holds the request's concurrency slot, and the guest's
/// side of the stream, until the body ends, hyper drops it, or the
/// deadline passes, whichever is first. A client that never reads stalls
/// hyper's writes, and hyper then polls nothing, so the deadline is kept
/// by a timer of its own: it frees the slot and drops the guest's stream
/// (so the guest's task on the shared instance ends too). A fresh
/// instance gets the same bound from its task's timeout.
pub(super) struct Bounded<B> {
    state: Arc<std::sync::Mutex<Delivery<B>>>,
    dialect: Dialect,
    fate: Fate,
    _timer: tokio_util::task::AbortOnDropHandle<()>,
}

enum Delivery<B> {
    Streaming {
        body: B,
        /// Held, never read: dropping it frees the slot, and the
        /// instance's count of streaming responses.
        _slot: (Slot, Option<crate::runtime::Streaming>),
        /// hyper's task while it waits on this body: woken at the deadline
        /// so that it sees the error and closes the connection.
        waker: Option<std::task::Waker>,
    },
    Done,
    Expired,
    /// Expired, and its last frame given to hyper.
    Ended,
}

impl<B: Send + 'static> Bounded<B> {
    pub(super) fn new(
        inner: B,
        slot: Slot,
        deadline: tokio::time::Instant,
        module: Arc<str>,
        dialect: Dialect,
        fate: Fate,
        hangup: Hangup,
    ) -> Self {
        let streaming = match &fate {
            Fate::Instance(instance) => instance.get().map(|i| i.streaming()),
            _ => None,
        };
        let state = Arc::new(std::sync::Mutex::new(Delivery::Streaming {
            body: inner,
            _slot: (slot, streaming),
            waker: None,
        }));
        let timer = tokio::spawn({
            let state = Arc::downgrade(&state);
            async move {
                tokio::time::sleep_until(deadline).await;
                let Some(state_arc) = state.upgrade() else {
                    return;
                };
                let mut state = state_arc.lock().unwrap_or_else(|e| e.into_inner());
                if let Delivery::Streaming { waker, .. } = &mut *state {
                    let waker = waker.take();
                    // Dropped here, outside of hyper: slot and stream.
                    *state = Delivery::Expired;
                    drop(state);
                    tracing::warn!(
                        module = &*module,
                        "response body not delivered within limits.timeout: cut off"
                    );
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                    let weak = Arc::downgrade(&state_arc);
                    drop(state_arc);
                    hangup.unless_taken(move || {
                        weak.upgrade().is_none_or(|state| {
                            let state = state.lock().unwrap_or_else(|e| e.into_inner());
                            !matches!(*state, Delivery::Expired)
                        })
                    });
                }
            }
        });
        Bounded {
            state,
            dialect,
            fate,
            _timer: tokio_util::task::AbortOnDropHandle::new(timer),
        }
    }
}

impl<B> Body for Bounded<B>
where
    B: Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Unpin,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Delivery::Streaming {
            body: inner, waker, ..
        } = &mut *state
        else {
            return Poll::Ready(match *state {
                Delivery::Expired => {
                    *state = Delivery::Ended;
                    Some(Cut::Timeout.last_frame(self.dialect))
                }
                _ => None,
            });
        };
        let Poll::Ready(frame) = Pin::new(&mut *inner).poll_frame(cx) else {
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        };
        if frame.is_none()
            && let Some(cut) = self.fate.get()
        {
            *state = Delivery::Ended;
            return Poll::Ready(Some(cut.last_frame(self.dialect)));
        }
        if frame.is_none() || inner.is_end_stream() {
            *state = Delivery::Done;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            Delivery::Streaming { body, .. } => body.is_end_stream(),
            Delivery::Done | Delivery::Ended => true,
            Delivery::Expired => false,
        }
    }
}

/// Most of an unread request body drained after the guest answered.
const LINGER_BYTES: usize = 8 << 20;
/// Longest a drain of an unread request body may take.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The request body as the guest gets it. Dropped unread (the guest
/// answered without reading it all: an early 413, a redirect), the rest is
/// read and discarded in the background, up to [`LINGER_BYTES`] and
/// [`LINGER_TIME`], so the client can finish sending and read the answer.
/// Closing a socket with unread bytes makes the kernel send a reset that
/// can destroy the response in flight; nginx's "lingering close" does the
/// same for the same reason.
///
/// It also tells whether the guest is waiting for bytes the client has not
/// sent: a guest that runs out of time there was held up by the client,
/// not by its own code (a 408, not a 504, and nothing against a canary). A
/// guest that never reads the body, or has read all of it, is not waiting.
pub(super) struct Lingering {
    body: Option<Incoming>,
    waiting: Arc<AtomicBool>,
}

impl Lingering {
    pub(super) fn new(body: Incoming, waiting: Arc<AtomicBool>) -> Self {
        Lingering {
            body: Some(body),
            waiting,
        }
    }
}

impl Body for Lingering {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(body).poll_frame(cx);
        self.waiting.store(frame.is_pending(), Ordering::Relaxed);
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            use http_body_util::BodyExt;
            let drain = async {
                let mut drained = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    drained += frame.data_ref().map_or(0, |d| d.len());
                    if drained > LINGER_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIME, drain).await;
        });
    }
}

/// Frames already read, then the rest of the stream (if any).
pub(crate) struct Prefixed {
    frames: std::collections::VecDeque<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>,
    rest: Option<HyperOutgoingBody>,
}

impl Prefixed {
    /// `prefix` (when not empty), then `rest`.
    pub(crate) fn new(prefix: Bytes, rest: HyperOutgoingBody) -> Self {
        let mut me = Self::ending(prefix, None);
        me.rest = Some(rest);
        me
    }

    /// `prefix` (when not empty), then `last` (trailers, or the error that
    /// ended the body), then the end.
    fn ending(
        prefix: Bytes,
        last: Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>,
    ) -> Self {
        let frames = (!prefix.is_empty())
            .then(|| Ok(Frame::data(prefix)))
            .into_iter()
            .chain(last)
            .collect();
        Prefixed { frames, rest: None }
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}

/// Most a response may hold to leave whole, in one write.
const COALESCE_LIMIT: usize = 64 << 10;

/// Small guest responses leave in one write with a `Content-Length`
/// instead of a chunked stream of a head and several body writes. Nothing
/// is waited for: after one turn of the scheduler (in which a guest that
/// answers at once writes and finishes its body), only the frames already
/// there are taken. If that is the whole body it is sent whole; otherwise
/// the head leaves now with what was read, and the rest streams, so
/// server-sent events and long polls get their head at once.
pub(super) async fn coalesce(body: HyperOutgoingBody) -> HyperOutgoingBody {
    use http_body_util::BodyExt;
    tokio::task::yield_now().await;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        let frame = match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => break,
        };
        match frame {
            None => {
                return http_body_util::Full::new(buf.freeze())
                    .map_err(|never| match never {})
                    .boxed_unsync();
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    if buf.len() > COALESCE_LIMIT {
                        break;
                    }
                }
                Err(trailers) => {
                    // Trailers end the body; keep them behind the data.
                    return Prefixed::ending(buf.freeze(), Some(Ok(trailers))).boxed_unsync();
                }
            },
            Some(Err(e)) => {
                return Prefixed::ending(buf.freeze(), Some(Err(e))).boxed_unsync();
            }
        }
    }
    Prefixed::new(buf.freeze(), body).boxed_unsync()
}
