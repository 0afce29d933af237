//! The request body as the guest reads it: streamed, with the module's size
//! limit enforced as bytes arrive rather than after buffering.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

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
