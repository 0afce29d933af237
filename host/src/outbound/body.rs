//! Bodies of outbound calls: the request body buffered (when small) so a
//! retry can replay it, and the response body with a between-bytes timeout.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use wasmtime_wasi_http::Error;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::server::body::Prefixed;

/// A request body, replayable when it was small enough to buffer.
pub(super) enum RequestBody {
    /// Whole and replayable.
    Buffered(Bytes),
    /// Too large to keep: sent once, never retried.
    Streaming(Option<HyperOutgoingBody>),
}

impl RequestBody {
    /// Reads up to `limit` bytes; past that the body streams.
    pub(super) async fn read(mut body: HyperOutgoingBody, limit: u64) -> Result<Self, Error> {
        if body.size_hint().lower() > limit {
            return Ok(RequestBody::Streaming(Some(body)));
        }
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                // Trailers: rare on requests; sent as they are, no retry.
                continue;
            };
            if (buf.len() + data.len()) as u64 > limit {
                buf.extend_from_slice(&data);
                let prefixed = Prefixed::new(buf.freeze(), body);
                return Ok(RequestBody::Streaming(Some(prefixed.boxed_unsync())));
            }
            buf.extend_from_slice(&data);
        }
        Ok(RequestBody::Buffered(buf.freeze()))
    }

    /// Whether another attempt can send this body again.
    pub(super) fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }

    /// The body for the next attempt.
    pub(super) fn attempt(&mut self) -> HyperOutgoingBody {
        match self {
            RequestBody::Buffered(bytes) => Full::new(bytes.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
            RequestBody::Streaming(body) => body.take().unwrap_or_else(|| {
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed_unsync()
            }),
        }
    }
}

/// A response body that fails when the upstream goes quiet for longer than
/// `timeout` between two frames.
pub(super) struct BetweenBytes {
    inner: Incoming,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl BetweenBytes {
    pub(super) fn new(inner: Incoming, timeout: Duration) -> Self {
        BetweenBytes {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl Body for BetweenBytes {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Error::from)))
            }
            Poll::Pending => {
                ready!(this.sleep.as_mut().poll(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
