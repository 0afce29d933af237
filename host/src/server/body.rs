//! The request body as the guest reads it: streamed, with the module's size
//! limit enforced as bytes arrive rather than after buffering.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// `Incoming` that fails once more than `limit` bytes have arrived, and
/// records that it did so the host can answer 413 whatever the guest does
/// with the error.
pub(super) struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl LimitedBody {
    pub(super) fn new(inner: Incoming, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
            exceeded,
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.exceeded.store(true, Ordering::Relaxed);
                        this.remaining = 0;
                        return Poll::Ready(Some(Err(
                            wasmtime_wasi_http::Error::HttpRequestBodySize(Some(this.limit)),
                        )));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The guest's response body, cut off past the module's
/// `max_response_body`. Bodies stream through without being buffered; this
/// only counts.
pub(super) struct CappedBody {
    inner: HyperOutgoingBody,
    remaining: u64,
    limit: u64,
}

impl CappedBody {
    pub(super) fn new(inner: HyperOutgoingBody, limit: u64) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
        }
    }
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > this.remaining {
                this.remaining = 0;
                tracing::warn!(
                    limit = this.limit,
                    "response body over max_response_body: cut off"
                );
                return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseBodySize(
                    Some(this.limit),
                ))));
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

/// Bytes already read, then the rest of the stream.
pub(crate) struct Prefixed {
    prefix: Option<Bytes>,
    rest: HyperOutgoingBody,
}

impl Prefixed {
    pub(crate) fn new(prefix: Bytes, rest: HyperOutgoingBody) -> Self {
        Prefixed {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// Most a response may hold to leave whole, in one write.
const COALESCE_LIMIT: usize = 64 << 10;

/// Small guest responses leave in one write with a `Content-Length`
/// instead of a chunked stream of a head and several body writes: waits
/// for the first body frame, then takes what the guest has already written
/// without waiting again. If that is the whole body it is sent whole;
/// otherwise what was read goes first and the rest streams.
pub(super) async fn coalesce(body: HyperOutgoingBody) -> HyperOutgoingBody {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut first = true;
    loop {
        let frame = if first {
            first = false;
            body.frame().await
        } else {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => break,
            }
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
                    let last = OneFrame(Some(Ok(trailers))).boxed_unsync();
                    return Prefixed::new(buf.freeze(), last).boxed_unsync();
                }
            },
            Some(Err(e)) => {
                let last = OneFrame(Some(Err(e))).boxed_unsync();
                return Prefixed::new(buf.freeze(), last).boxed_unsync();
            }
        }
    }
    Prefixed::new(buf.freeze(), body).boxed_unsync()
}

/// A body of one last frame (trailers, or the error that ended a body).
struct OneFrame(Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>);

impl Body for OneFrame {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take())
    }
}
