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
    _streaming: Option<crate::runtime::Streaming>,
}

impl Slot {
    pub(super) fn new(permit: tokio::sync::OwnedSemaphorePermit, in_flight: InFlight) -> Self {
        Slot {
            _permit: permit,
            _in_flight: in_flight,
            _streaming: None,
        }
    }

    /// Counts the response against its reused instance's
    /// `max_concurrent` for as long as the slot is held: a WASI 0.3 guest
    /// writes the body after its head is out of wasmtime's count, and
    /// [`coalesce`] may wait for that body before it is delivered.
    pub(super) fn streaming(mut self, streaming: Option<crate::runtime::Streaming>) -> Self {
        self._streaming = streaming;
        self
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
        _slot: Slot,
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
        let state = Arc::new(std::sync::Mutex::new(Delivery::Streaming {
            body: inner,
            _slot: slot,
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

/// Longest a response's head waits for the rest of its body.
pub(super) const COALESCE_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Small guest responses leave in one write with a `Content-Length`
/// instead of a chunked stream of a head and several body writes (each a
/// packet, and a wake-up of the client). A body the guest already
/// finished is taken at once. Otherwise the head waits for the body's end,
/// woken by each frame, for up to [`COALESCE_LIMIT`] bytes and
/// [`COALESCE_WAIT`]: a guest's last step can queue behind other requests'
/// work on a busy reused instance for milliseconds (a WASI 0.3 hello under
/// 64 connections: 1.9 writes a response when the head waited one turn of
/// the scheduler, 1.0 at 10 ms; see bench/NOTES.md). Past either bound,
/// or `until` (the request's deadline), the head leaves with what was read
/// and the rest streams, so server-sent events and long polls get their
/// head within the wait.
pub(super) async fn coalesce(
    body: HyperOutgoingBody,
    wait: std::time::Duration,
    until: tokio::time::Instant,
) -> HyperOutgoingBody {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut taken = Taken::Empty;
    // A guest that finished before its head was read needs no timer, nor
    // a turn of the scheduler (which re-polls the connection's futures).
    let at_once = take_ready(
        &mut body,
        &mut taken,
        &mut Context::from_waker(std::task::Waker::noop()),
    );
    match at_once {
        Gathered::Whole(done) => return done,
        Gathered::Over => return Prefixed::new(taken.freeze(), body).boxed_unsync(),
        Gathered::Pending => {}
    }
    let rest = std::future::poll_fn(|cx| match take_ready(&mut body, &mut taken, cx) {
        Gathered::Pending => Poll::Pending,
        gathered => Poll::Ready(gathered),
    });
    let until = until.min(tokio::time::Instant::now() + wait);
    match tokio::time::timeout_at(until, rest).await {
        Ok(Gathered::Whole(done)) => done,
        Ok(Gathered::Over | Gathered::Pending) | Err(_) => {
            Prefixed::new(taken.freeze(), body).boxed_unsync()
        }
    }
}

/// The data frames taken so far: one is kept as it came, without a copy.
enum Taken {
    Empty,
    One(Bytes),
    Many(bytes::BytesMut),
}

impl Taken {
    fn len(&self) -> usize {
        match self {
            Taken::Empty => 0,
            Taken::One(b) => b.len(),
            Taken::Many(b) => b.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        *self = match std::mem::replace(self, Taken::Empty) {
            Taken::Empty => Taken::One(data),
            Taken::One(first) => {
                let mut joined = bytes::BytesMut::with_capacity(first.len() + data.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                Taken::Many(joined)
            }
            Taken::Many(mut joined) => {
                joined.extend_from_slice(&data);
                Taken::Many(joined)
            }
        };
    }

    fn freeze(&mut self) -> Bytes {
        match std::mem::replace(self, Taken::Empty) {
            Taken::Empty => Bytes::new(),
            Taken::One(b) => b,
            Taken::Many(b) => b.freeze(),
        }
    }
}

/// What [`take_ready`] found.
enum Gathered {
    /// The whole body, to send as it is.
    Whole(HyperOutgoingBody),
    /// More than [`COALESCE_LIMIT`]: stream it.
    Over,
    /// The guest is still writing.
    Pending,
}

/// Takes the frames `body` has ready into `taken`, without waiting; `cx`
/// is woken when it has more.
fn take_ready(body: &mut HyperOutgoingBody, taken: &mut Taken, cx: &mut Context<'_>) -> Gathered {
    use http_body_util::BodyExt;
    loop {
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => return Gathered::Pending,
        };
        let ended = match frame {
            None => {
                return Gathered::Whole(
                    http_body_util::Full::new(taken.freeze())
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                );
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    taken.push(data);
                    if taken.len() > COALESCE_LIMIT {
                        return Gathered::Over;
                    }
                    continue;
                }
                // Trailers end the body; keep them behind the data.
                Err(trailers) => Ok(trailers),
            },
            Some(Err(e)) => Err(e),
        };
        return Gathered::Whole(Prefixed::ending(taken.freeze(), Some(ended)).boxed_unsync());
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use hyper_util::rt::TokioIo;
    use tokio::sync::{Semaphore, mpsc, oneshot};

    use super::*;

    type Error = wasmtime_wasi_http::Error;
    type Frames<E> = mpsc::UnboundedSender<Result<Frame<Bytes>, E>>;

    fn data(bytes: &[u8]) -> Result<Frame<Bytes>, Error> {
        Ok(Frame::data(Bytes::copy_from_slice(bytes)))
    }

    fn trailers(name: &'static str) -> Result<Frame<Bytes>, Error> {
        let mut map = http::HeaderMap::new();
        map.insert(name, http::HeaderValue::from_static("1"));
        Ok(Frame::trailers(map))
    }

    /// A guest's body with all its frames written: like a guest's stream,
    /// it tells its end only by returning `None`.
    fn written(frames: impl IntoIterator<Item = Result<Frame<Bytes>, Error>>) -> HyperOutgoingBody {
        let frames: Vec<_> = frames.into_iter().collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    /// One frame, known to be the last as soon as it is taken.
    fn whole(bytes: &'static [u8]) -> HyperOutgoingBody {
        Full::new(Bytes::from_static(bytes))
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    /// A body the test writes frame by frame; it ends when the sender goes.
    struct Fed<E>(mpsc::UnboundedReceiver<Result<Frame<Bytes>, E>>);

    fn fed<E>() -> (Frames<E>, Fed<E>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Fed(rx))
    }

    impl<E> Body for Fed<E> {
        type Data = Bytes;
        type Error = E;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
            self.0.poll_recv(cx)
        }
    }

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether one poll of `body`, woken through `wakes`, finds it pending.
    fn pending<B: Body + Unpin>(body: &mut B, wakes: &Arc<Wakes>) -> bool {
        let waker = std::task::Waker::from(wakes.clone());
        Pin::new(body)
            .poll_frame(&mut Context::from_waker(&waker))
            .is_pending()
    }

    /// What a body yields to its end: its bytes, then its trailers or the
    /// error that ended it.
    async fn read<B>(body: &mut B) -> (Vec<u8>, Option<http::HeaderMap>, Option<Error>)
    where
        B: Body<Data = Bytes, Error = Error> + Unpin,
    {
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame.map(Frame::into_data) {
                Ok(Ok(data)) => bytes.extend_from_slice(&data),
                Ok(Err(frame)) => return (bytes, frame.into_trailers().ok(), None),
                Err(e) => return (bytes, None, Some(e)),
            }
        }
        (bytes, None, None)
    }

    /// The bytes of a body that ends plainly, with no trailers or error.
    async fn read_plain<B>(body: &mut B) -> Vec<u8>
    where
        B: Body<Data = Bytes, Error = Error> + Unpin,
    {
        let (bytes, trailers, err) = read(body).await;
        assert!(trailers.is_none() && err.is_none(), "{trailers:?} {err:?}");
        bytes
    }

    fn grpc_status(trailers: &Option<http::HeaderMap>) -> Option<&str> {
        trailers.as_ref()?.get("grpc-status")?.to_str().ok()
    }

    /// A guest's task that runs until it is aborted.
    fn guest() -> tokio::task::JoinHandle<()> {
        tokio::spawn(std::future::pending())
    }

    /// Whether `task` ended (was aborted) once the scheduler had its turns.
    async fn ended(task: &tokio::task::JoinHandle<()>) -> bool {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        task.is_finished()
    }

    fn gauge() -> prometheus::IntGauge {
        prometheus::IntGauge::new("in_flight", "requests in flight").unwrap()
    }

    fn slot(permits: &Arc<Semaphore>, gauge: &prometheus::IntGauge) -> Slot {
        Slot::new(
            permits.clone().try_acquire_owned().unwrap(),
            InFlight::new(gauge),
        )
    }

    #[tokio::test]
    async fn a_limited_body_lets_its_limit_through_and_fails_one_byte_past_it() {
        let exceeded = Arc::new(AtomicBool::new(false));
        let mut body = Limited {
            inner: written([data(b"abcd"), data(b"efghij"), data(b"k")]),
            remaining: 10,
            limit: 10,
            exceeded: Some(exceeded.clone()),
            error: |limit| Error::HttpRequestBodySize(Some(limit)),
        };
        for want in ["abcd", "efghij"] {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), want);
        }
        assert!(
            !exceeded.load(Ordering::SeqCst),
            "10 bytes of a 10-byte limit"
        );
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(
            matches!(err, Error::HttpRequestBodySize(Some(10))),
            "{err:?}"
        );
        assert!(exceeded.load(Ordering::SeqCst));

        let mut response = Limited::response(written([data(b"0123456789")]), 8);
        let (bytes, _, err) = read(&mut response).await;
        assert!(bytes.is_empty());
        assert!(
            matches!(err, Some(Error::HttpResponseBodySize(Some(8)))),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_limited_body_tells_its_length_and_end_as_its_inner_body_does() {
        let mut body = Limited::response(whole(b"abc"), 8);
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(body.is_end_stream());
        let empty = Limited::response(
            Empty::new().map_err(|never| match never {}).boxed_unsync(),
            8,
        );
        assert!(empty.is_end_stream());
    }

    #[test]
    fn a_slot_gives_back_its_permit_and_in_flight_count_when_dropped() {
        let (permits, gauge) = (Arc::new(Semaphore::new(2)), gauge());
        let first = slot(&permits, &gauge);
        let second = slot(&permits, &gauge);
        assert_eq!((permits.available_permits(), gauge.get()), (0, 2));
        drop(first);
        assert_eq!((permits.available_permits(), gauge.get()), (1, 1));
        drop(second);
        assert_eq!((permits.available_permits(), gauge.get()), (2, 0));
    }

    #[tokio::test]
    async fn a_cut_off_dropped_armed_aborts_its_guest_and_a_disarmed_one_does_not() {
        let task = guest();
        drop(CutOff::new(task.abort_handle()));
        assert!(ended(&task).await, "armed: the guest is aborted");

        let task = guest();
        let mut cut_off = CutOff::new(task.abort_handle());
        cut_off.disarm();
        drop(cut_off);
        assert!(!ended(&task).await, "disarmed: the guest runs on");
        task.abort();

        let (permits, gauge) = (Arc::new(Semaphore::new(1)), gauge());
        let mut holding = CutOff::holding(slot(&permits, &gauge));
        assert_eq!(permits.available_permits(), 0);
        holding.disarm();
        assert_eq!(permits.available_permits(), 1, "disarming frees the slot");
    }

    #[tokio::test]
    async fn a_response_not_taken_within_the_grace_closes_its_connection() {
        let hangup = Hangup::default();
        hangup.unless_taken(|| false);
        closes_its_connection(&hangup).await;
    }

    /// Waits (boundedly) for `hangup` to close its connection.
    async fn closes_its_connection(hangup: &Hangup) {
        tokio::time::timeout(STUCK_GRACE * 20, hangup.requested())
            .await
            .expect("the connection is closed after the grace");
    }

    #[tokio::test]
    async fn a_response_taken_within_the_grace_closes_nothing() {
        let hangup = Hangup::default();
        let asked = Arc::new(AtomicBool::new(false));
        hangup.unless_taken({
            let asked = asked.clone();
            move || {
                asked.store(true, Ordering::SeqCst);
                true
            }
        });
        // One thread: once the check has run, so has anything it decided.
        while !asked.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::task::yield_now().await;
        assert!(!hangup.0.is_cancelled());
    }

    /// Past the grace (and every timer before it fired), whether `hangup`
    /// closed its connection.
    async fn closed_after_the_grace(hangup: &Hangup) -> bool {
        tokio::time::sleep(STUCK_GRACE + Duration::from_millis(300)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        hangup.0.is_cancelled()
    }

    #[tokio::test]
    async fn a_fresh_instance_keeps_the_first_way_its_task_ended() {
        let hangup = Hangup::default();
        let fate = Fate::task();
        assert_eq!(fate.get(), None);
        fate.cut(Cut::Timeout, &hangup);
        assert_eq!(fate.get(), Some(Cut::Timeout));
        fate.cut(Cut::Failed, &hangup);
        assert_eq!(fate.get(), Some(Cut::Timeout), "the first end wins");
        assert_eq!(Fate::Whole.get(), None);
        assert!(
            !closed_after_the_grace(&hangup).await,
            "no body was handed to hyper: nothing to wait for"
        );
    }

    #[tokio::test]
    async fn a_cut_guests_body_not_taken_closes_its_connection() {
        let hangup = Hangup::default();
        let fate = Fate::task();
        let (_writer, body) = fed::<Error>();
        let task = guest();
        let _delivering = Delivered::new(
            body,
            CutOff::new(task.abort_handle()),
            fate.clone(),
            Dialect::Http,
        );
        fate.cut(Cut::Timeout, &hangup);
        closes_its_connection(&hangup).await;
    }

    #[tokio::test]
    async fn a_cut_guests_body_already_ended_closes_nothing() {
        let hangup = Hangup::default();
        let fate = Fate::task();
        let task = guest();
        drop(Delivered::new(
            written([]),
            CutOff::new(task.abort_handle()),
            fate.clone(),
            Dialect::Http,
        ));
        fate.cut(Cut::Timeout, &hangup);
        assert!(!closed_after_the_grace(&hangup).await);
    }

    #[test]
    fn a_reused_instance_cuts_its_streams_for_a_trap_the_memory_limit_or_a_teardown() {
        let instance = |why, torn_down| {
            let cell = Arc::new(std::sync::OnceLock::new());
            cell.set(Retirement::of(why, torn_down)).unwrap();
            Fate::Instance(cell)
        };
        assert_eq!(Fate::Instance(Arc::default()).get(), None, "not retired");
        assert_eq!(instance(Retired::Trap, false).get(), Some(Cut::Failed));
        assert_eq!(
            instance(Retired::MemoryLimit, false).get(),
            Some(Cut::Failed)
        );
        assert_eq!(instance(Retired::Timeout, true).get(), Some(Cut::Timeout));
        assert_eq!(instance(Retired::Stopped, true).get(), Some(Cut::Timeout));
        for why in [
            Retired::Timeout,
            Retired::MaxRequests,
            Retired::Idle,
            Retired::Stopped,
        ] {
            assert_eq!(
                instance(why, false).get(),
                None,
                "{why:?}: its streams run on"
            );
        }
    }

    #[tokio::test]
    async fn a_delivered_body_passes_its_frames_and_lets_its_guest_run_once_ended() {
        // The end told by `None`.
        let task = guest();
        let mut body = Delivered::new(
            written([data(b"a"), data(b"b")]),
            CutOff::new(task.abort_handle()),
            Fate::Whole,
            Dialect::Http,
        );
        assert_eq!(read_plain(&mut body).await, b"ab".to_vec());
        drop(body);
        assert!(!ended(&task).await);
        task.abort();

        // The end told by the last frame, before any `None`.
        let task = guest();
        let mut body = Delivered::new(
            whole(b"abc"),
            CutOff::new(task.abort_handle()),
            Fate::Whole,
            Dialect::Http,
        );
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(body.is_end_stream());
        drop(body);
        assert!(!ended(&task).await);
        task.abort();

        let task = guest();
        let empty = Empty::new().map_err(|never| match never {}).boxed_unsync();
        let body = Delivered::new(
            empty,
            CutOff::new(task.abort_handle()),
            Fate::Whole,
            Dialect::Http,
        );
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_delivered_body_dropped_before_its_end_aborts_its_guest() {
        let (_writer, body) = fed::<Error>();
        let task = guest();
        let mut body = Delivered::new(
            body,
            CutOff::new(task.abort_handle()),
            Fate::Whole,
            Dialect::Http,
        );
        assert!(pending(&mut body, &Arc::default()));
        drop(body);
        assert!(ended(&task).await);
    }

    #[tokio::test]
    async fn a_torn_down_guests_body_ends_as_its_dialect_says() {
        for (cut, dialect, status) in [
            (Cut::Timeout, Dialect::Grpc, "4"),
            (Cut::Failed, Dialect::Grpc, "13"),
            (Cut::Timeout, Dialect::Http, ""),
            (Cut::Failed, Dialect::Http, ""),
        ] {
            let fate = Fate::task();
            fate.cut(cut, &Hangup::default());
            let task = guest();
            let mut body = Delivered::new(
                written([data(b"x")]),
                CutOff::new(task.abort_handle()),
                fate,
                dialect,
            );
            let (bytes, trailers, err) = read(&mut body).await;
            assert_eq!(bytes, b"x");
            match dialect {
                Dialect::Grpc => assert_eq!(grpc_status(&trailers), Some(status), "{cut:?}"),
                Dialect::Http => {
                    let want_timeout = cut == Cut::Timeout;
                    assert!(
                        matches!(err, Some(Error::HttpResponseTimeout)) == want_timeout
                            && matches!(err, Some(Error::InternalError(_))) != want_timeout,
                        "{cut:?}: {err:?}"
                    );
                }
            }
            assert!(body.is_end_stream());
            assert!(body.frame().await.is_none());
            task.abort();
        }
    }

    fn bounded<B: Send + 'static>(
        body: B,
        within: Duration,
        fate: Fate,
        dialect: Dialect,
    ) -> (Bounded<B>, Arc<Semaphore>) {
        let permits = Arc::new(Semaphore::new(1));
        let body = Bounded::new(
            body,
            slot(&permits, &gauge()),
            tokio::time::Instant::now() + within,
            "m".into(),
            dialect,
            fate,
            Hangup::default(),
        );
        (body, permits)
    }

    #[tokio::test]
    async fn a_bounded_body_frees_its_slot_on_its_last_frame() {
        let (mut body, permits) = bounded(
            whole(b"abc"),
            Duration::from_secs(60),
            Fate::Whole,
            Dialect::Http,
        );
        assert!(!body.is_end_stream());
        assert_eq!(permits.available_permits(), 0);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert_eq!(
            permits.available_permits(),
            1,
            "free before hyper drops the body"
        );
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());

        let (mut body, permits) = bounded(
            written([data(b"a"), data(b"b")]),
            Duration::from_secs(60),
            Fate::Whole,
            Dialect::Http,
        );
        assert_eq!(read_plain(&mut body).await, b"ab".to_vec());
        assert_eq!(permits.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_bounded_body_past_its_deadline_frees_its_slot_wakes_hyper_and_ends_cut() {
        for dialect in [Dialect::Http, Dialect::Grpc] {
            let (_writer, body) = fed::<Error>();
            let (mut body, permits) =
                bounded(body, Duration::from_millis(50), Fate::Whole, dialect);
            let wakes = Arc::new(Wakes::default());
            assert!(pending(&mut body, &wakes));
            tokio::time::timeout(Duration::from_secs(20), async {
                while wakes.0.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("hyper's task is woken at the deadline");
            assert_eq!(permits.available_permits(), 1);
            assert!(!body.is_end_stream(), "its last frame is still to come");
            let (bytes, trailers, err) = read(&mut body).await;
            assert!(bytes.is_empty());
            match dialect {
                Dialect::Http => {
                    assert!(matches!(err, Some(Error::HttpResponseTimeout)), "{err:?}")
                }
                Dialect::Grpc => assert_eq!(grpc_status(&trailers), Some("4")),
            }
            assert!(body.is_end_stream());
        }
    }

    #[tokio::test]
    async fn a_bounded_body_of_a_trapped_instance_ends_cut() {
        let cell = Arc::new(std::sync::OnceLock::new());
        cell.set(Retirement::of(Retired::Trap, false)).unwrap();
        let (mut body, _) = bounded(
            written([data(b"x")]),
            Duration::from_secs(60),
            Fate::Instance(cell),
            Dialect::Grpc,
        );
        let (bytes, trailers, _) = read(&mut body).await;
        assert_eq!(
            (bytes.as_slice(), grpc_status(&trailers)),
            (&b"x"[..], Some("13"))
        );
        assert!(body.is_end_stream());
    }

    /// One HTTP/1.1 connection over an in-memory pipe, served by hyper:
    /// each request's body reaches the test as a [`Lingering`] (with its
    /// `waiting` flag), and its answer (200, empty) waits for the test's
    /// word, or for the word's sender to go.
    struct Pipe {
        client: hyper::client::conn::http1::SendRequest<UnsyncBoxBody<Bytes, Infallible>>,
        bodies: mpsc::UnboundedReceiver<(Lingering, Arc<AtomicBool>, oneshot::Sender<()>)>,
    }

    async fn pipe() -> Pipe {
        let (near, far) = tokio::io::duplex(64 << 10);
        let (bodies_tx, bodies) = mpsc::unbounded_channel();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let waiting = Arc::new(AtomicBool::new(false));
            let (answer, answered) = oneshot::channel();
            let _ = bodies_tx.send((
                Lingering::new(req.into_body(), waiting.clone()),
                waiting,
                answer,
            ));
            async move {
                let _ = answered.await;
                Ok::<_, Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(far), service),
        );
        let (client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(conn);
        Pipe { client, bodies }
    }

    impl Pipe {
        /// Sends a request with `body` and returns its answer's future.
        async fn send<B>(
            &mut self,
            body: B,
        ) -> tokio::task::JoinHandle<hyper::Result<http::StatusCode>>
        where
            B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
        {
            self.client.ready().await.unwrap();
            let req = hyper::Request::post("/").body(body.boxed_unsync()).unwrap();
            let response = self.client.send_request(req);
            tokio::spawn(async move { Ok(response.await?.status()) })
        }

        async fn next_body(&mut self) -> (Lingering, Arc<AtomicBool>, oneshot::Sender<()>) {
            tokio::time::timeout(Duration::from_secs(20), self.bodies.recv())
                .await
                .expect("the request reaches the server")
                .unwrap()
        }

        /// Whether the connection serves another request.
        async fn serves_another(&mut self) -> bool {
            let limit = Duration::from_secs(20);
            let Ok(Ok(())) = tokio::time::timeout(limit, self.client.ready()).await else {
                return false;
            };
            let req = hyper::Request::get("/")
                .body(Empty::new().boxed_unsync())
                .unwrap();
            let response = tokio::spawn(self.client.send_request(req));
            // Served: the request reaches the server, which answers it.
            if tokio::time::timeout(limit, self.bodies.recv())
                .await
                .ok()
                .flatten()
                .is_none()
            {
                return false;
            }
            let answered = tokio::time::timeout(limit, response).await;
            answered.is_ok_and(|r| r.unwrap().is_ok_and(|r| r.status().is_success()))
        }
    }

    #[tokio::test]
    async fn a_request_body_reads_through_and_says_when_the_guest_waits_for_the_client() {
        let mut pipe = pipe().await;
        let answer = pipe.send(Full::new(Bytes::from_static(b"hello"))).await;
        let (mut body, waiting, word) = pipe.next_body().await;
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let got = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(got, "hello");
        assert!(body.is_end_stream());
        assert!(!waiting.load(Ordering::SeqCst));
        drop((body, word));
        assert_eq!(answer.await.unwrap().unwrap(), 200);

        let (writer, sent) = fed::<Infallible>();
        let answer = pipe.send(sent).await;
        let (mut body, waiting, word) = pipe.next_body().await;
        assert!(pending(&mut body, &Arc::default()));
        assert!(
            waiting.load(Ordering::SeqCst),
            "nothing sent yet: the guest waits on the client"
        );
        writer
            .send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        assert!(!waiting.load(Ordering::SeqCst));
        drop((writer, body, word));
        assert_eq!(answer.await.unwrap().unwrap(), 200);
    }

    const MIB: usize = 1 << 20;
    /// LINGER_BYTES as documented, in MiB: written out, so that a change
    /// of the constant fails the tests instead of moving them along.
    const LINGER_MIB: usize = 8;

    #[tokio::test]
    async fn an_unread_request_body_is_drained_so_its_connection_serves_the_next() {
        // Exactly LINGER_BYTES, its end sent only after the answer (and a
        // pause), so a drain that stopped at the limit would not see it.
        let mut pipe = pipe().await;
        let (writer, sent) = fed::<Infallible>();
        let chunk = Bytes::from(vec![b'x'; MIB]);
        for _ in 0..LINGER_MIB {
            writer.send(Ok(Frame::data(chunk.clone()))).unwrap();
        }
        let answer = pipe.send(sent).await;
        let (body, _, word) = pipe.next_body().await;
        drop((body, word));
        assert_eq!(answer.await.unwrap().unwrap(), 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(writer);
        assert!(pipe.serves_another().await, "the unread body was drained");
    }

    #[tokio::test]
    async fn an_unread_request_body_is_drained_no_further_than_linger_bytes() {
        let mut pipe = pipe().await;
        let chunk = Bytes::from(vec![b'x'; MIB]);
        let frames: Vec<_> = (0..LINGER_MIB + 4)
            .map(|_| Ok::<_, Infallible>(Frame::data(chunk.clone())))
            .collect();
        let answer = pipe
            .send(StreamBody::new(futures_util::stream::iter(frames)))
            .await;
        let (body, _, word) = pipe.next_body().await;
        drop((body, word));
        assert_eq!(answer.await.unwrap().unwrap(), 200);
        assert!(
            !pipe.serves_another().await,
            "the drain gave up past LINGER_BYTES"
        );
    }

    fn coalesced_exact(body: &HyperOutgoingBody) -> Option<u64> {
        body.size_hint().exact()
    }

    /// [`coalesce`] as requests call it, with a deadline far away.
    fn coalesced(body: HyperOutgoingBody) -> impl Future<Output = HyperOutgoingBody> {
        coalesce(body, COALESCE_WAIT, far())
    }

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(3600)
    }

    /// Fails a test whose future never ends instead of hanging it.
    async fn ends<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("still waiting after a minute")
    }

    #[tokio::test]
    async fn a_small_response_leaves_whole_with_its_length() {
        let mut body = coalesced(written([data(b"he"), data(b"l"), data(b"lo")])).await;
        assert_eq!(coalesced_exact(&body), Some(5));
        assert_eq!(read_plain(&mut body).await, b"hello".to_vec());

        let limit = vec![b'x'; COALESCE_LIMIT];
        let body = coalesced(written([data(&limit)])).await;
        assert_eq!(
            coalesced_exact(&body),
            Some(COALESCE_LIMIT as u64),
            "exactly the limit"
        );
    }

    #[tokio::test]
    async fn a_single_frame_leaves_as_it_came_without_a_copy() {
        let sent = Bytes::from_static(b"hello");
        // An empty frame before it does not make it a copy.
        let frames = [data(b""), Ok(Frame::data(sent.clone()))];
        let mut body = coalesced(written(frames)).await;
        assert_eq!(coalesced_exact(&body), Some(5));
        let got = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(got.as_ptr(), sent.as_ptr(), "the guest's bytes, not a copy");
    }

    #[test]
    fn a_finished_body_is_taken_without_a_turn_of_the_scheduler() {
        let mut gathering = std::pin::pin!(coalesced(written([data(b"hello")])));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(body) = gathering.as_mut().poll(&mut cx) else {
            panic!("it waited for a turn of the scheduler");
        };
        assert_eq!(coalesced_exact(&body), Some(5));
    }

    #[tokio::test]
    async fn a_body_finished_in_the_schedulers_next_turn_still_leaves_whole() {
        let (writer, body) = fed::<Error>();
        writer.send(data(b"hel")).unwrap();
        // Runs in the turn `coalesce` gives the guest, as a guest task does.
        tokio::spawn(async move {
            writer.send(data(b"lo")).unwrap();
        });
        let mut body = coalesced(body.boxed_unsync()).await;
        assert_eq!(coalesced_exact(&body), Some(5));
        assert_eq!(read_plain(&mut body).await, b"hello".to_vec());
    }

    #[tokio::test]
    async fn a_body_whose_end_queues_behind_other_work_still_leaves_whole() {
        let (writer, body) = fed::<Error>();
        writer.send(data(b"hel")).unwrap();
        // The guest's last steps come many turns of the scheduler later,
        // as on a reused instance busy with other requests.
        tokio::spawn(async move {
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            writer.send(data(b"l")).unwrap();
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            writer.send(data(b"o")).unwrap();
        });
        // Only the body can end the wait: a lost wake-up hangs.
        let mut body = ends(coalesce(
            body.boxed_unsync(),
            Duration::from_secs(3600),
            far(),
        ))
        .await;
        assert_eq!(coalesced_exact(&body), Some(5), "sent as a stream");
        assert_eq!(read_plain(&mut body).await, b"hello".to_vec());
    }

    #[tokio::test]
    async fn a_response_over_the_limit_streams_all_its_bytes_in_order() {
        let part = vec![b'a'; 40 << 10];
        let mut body = coalesced(written([data(&part), data(&part), data(b"tail")])).await;
        assert_eq!(coalesced_exact(&body), None, "over the limit: streamed");
        let (bytes, _, err) = read(&mut body).await;
        assert!(err.is_none());
        assert_eq!(bytes.len(), (80 << 10) + 4);
        assert!(bytes.ends_with(b"atail"));
    }

    #[tokio::test]
    async fn a_response_still_being_written_sends_its_head_and_streams_the_rest() {
        let (writer, body) = fed::<Error>();
        writer.send(data(b"head")).unwrap();
        let mut body = ends(coalesced(body.boxed_unsync())).await;
        assert_eq!(coalesced_exact(&body), None);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "head"
        );
        writer.send(data(b"tail")).unwrap();
        drop(writer);
        assert_eq!(read_plain(&mut body).await, b"tail".to_vec());
    }

    #[tokio::test]
    async fn the_head_waits_for_the_body_no_later_than_the_deadline() {
        let (writer, body) = fed::<Error>();
        writer.send(data(b"head")).unwrap();
        let until = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut body = ends(coalesce(
            body.boxed_unsync(),
            Duration::from_secs(3600),
            until,
        ))
        .await;
        assert_eq!(coalesced_exact(&body), None);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "head"
        );
        drop(writer);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn trailers_and_errors_stay_behind_the_data_they_end() {
        let mut body = coalesced(written([data(b"x"), trailers("grpc-status")])).await;
        let (bytes, trailers_got, _) = read(&mut body).await;
        assert_eq!(bytes, b"x");
        assert!(trailers_got.unwrap().contains_key("grpc-status"));

        let mut body = coalesced(written([trailers("grpc-status")])).await;
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_trailers(), "no empty data frame before them");
        assert!(body.frame().await.is_none());

        let mut body = coalesced(written([data(b"x"), Err(Error::HttpResponseTimeout)])).await;
        let (bytes, _, err) = read(&mut body).await;
        assert_eq!(bytes, b"x");
        assert!(matches!(err, Some(Error::HttpResponseTimeout)), "{err:?}");
    }
}
