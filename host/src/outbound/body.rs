//! Bodies of outbound calls: the request body streamed as the guest writes
//! it, with a copy kept (when small) so a retry can replay it, and the
//! response body with a between-bytes timeout.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use wasmtime_wasi_http::Error;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// A guest's request body, handed to one attempt after another.
///
/// Every attempt streams: nothing waits for the body before the request
/// head goes out, so a guest that writes its body only after it has seen
/// the response head (a full-duplex proxy) never deadlocks with the host.
/// While bytes pass, up to `limit` of them are kept; a later attempt
/// replays the kept bytes and then carries on reading from the guest.
/// Once more than `limit` bytes (or trailers, or an error) have passed, the
/// copy is dropped and the body can no longer be replayed, so the call is
/// not retried. The same idea as linkerd2-proxy's `ReplayBody`.
pub(super) struct ReplayBody {
    shared: Arc<Mutex<Replay>>,
    /// Which attempt this is; an older attempt that hyper still polls gets
    /// an error rather than bytes meant for the newer one.
    generation: u64,
    /// Kept chunks this attempt has already sent.
    replayed: usize,
}

struct Replay {
    /// The guest's body; `None` once it ended.
    source: Option<HyperOutgoingBody>,
    kept: Vec<Bytes>,
    kept_len: u64,
    limit: u64,
    /// Too much passed to keep a copy: no replay.
    overflowed: bool,
    generation: u64,
}

impl Replay {
    fn overflow(&mut self) {
        self.overflowed = true;
        self.kept = Vec::new();
    }
}

impl ReplayBody {
    /// The first attempt's body; keeps up to `limit` bytes for replays.
    pub(super) fn new(source: HyperOutgoingBody, limit: u64) -> Self {
        let overflowed = source.size_hint().lower() > limit;
        ReplayBody {
            shared: Arc::new(Mutex::new(Replay {
                source: Some(source),
                kept: Vec::new(),
                kept_len: 0,
                limit,
                overflowed,
                generation: 0,
            })),
            generation: 0,
            replayed: 0,
        }
    }

    /// Whether another attempt could send the whole body again.
    pub(super) fn replayable(&self) -> bool {
        !self.shared.lock().unwrap().overflowed
    }

    /// The body for the next attempt: what was kept, then the rest of the
    /// guest's body. Supersedes every earlier attempt's body.
    pub(super) fn replay(&self) -> ReplayBody {
        let mut shared = self.shared.lock().unwrap();
        shared.generation += 1;
        ReplayBody {
            shared: self.shared.clone(),
            generation: shared.generation,
            replayed: 0,
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().unwrap();
        if shared.generation != this.generation {
            return Poll::Ready(Some(Err(Error::InternalError(Some(
                "request body superseded by a retry".into(),
            )))));
        }
        if let Some(chunk) = shared.kept.get(this.replayed) {
            this.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(source) = shared.source.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(source).poll_frame(cx));
        match &frame {
            None => shared.source = None,
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) if !shared.overflowed => {
                    if shared.kept_len + data.len() as u64 <= shared.limit {
                        shared.kept_len += data.len() as u64;
                        shared.kept.push(data.clone());
                        this.replayed += 1;
                    } else {
                        shared.overflow();
                    }
                }
                Some(_) => {}
                // Trailers would have to be replayed after the data; rare
                // on requests, so such a body is simply not retried.
                None => shared.overflow(),
            },
            Some(Err(_)) => shared.overflow(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap();
        shared.generation == self.generation
            && self.replayed >= shared.kept.len()
            && shared.source.as_ref().is_none_or(|s| s.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap();
        let kept: u64 = shared
            .kept
            .iter()
            .skip(self.replayed)
            .map(|c| c.len() as u64)
            .sum();
        let rest = shared
            .source
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |s| s.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint
    }
}

/// A response body that fails when the upstream goes quiet for longer than
/// `timeout` between two frames.
pub(super) struct BetweenBytes<B = Incoming> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<B> BetweenBytes<B> {
    pub(super) fn new(inner: B, timeout: Duration) -> Self {
        BetweenBytes {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl<B> Body for BetweenBytes<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Error>,
{
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
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A guest body that hands out its chunks one poll at a time.
    struct Chunks(VecDeque<&'static [u8]>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(Bytes::from(c)))))
        }
    }

    fn source(chunks: &[&'static [u8]]) -> HyperOutgoingBody {
        Chunks(chunks.iter().copied().collect()).boxed_unsync()
    }

    async fn read_all(body: ReplayBody) -> Result<Vec<u8>, Error> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_small_body_streams_and_replays_whole_after_a_partial_attempt() {
        let body = ReplayBody::new(source(&[b"ab", b"cd", b"ef"]), 64);
        let mut first = body.replay();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab", "streams before the end");
        assert!(body.replayable());
        // The second attempt gets what the first sent, then the rest.
        assert_eq!(read_all(body.replay()).await.unwrap(), b"abcdef");
        assert!(body.replayable());
        assert_eq!(read_all(body.replay()).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn an_attempt_superseded_by_a_retry_gets_an_error_not_bytes() {
        let body = ReplayBody::new(source(&[b"ab", b"cd"]), 64);
        let mut first = body.replay();
        let _ = first.frame().await;
        let second = body.replay();
        assert!(first.frame().await.unwrap().is_err());
        assert_eq!(read_all(second).await.unwrap(), b"abcd");
    }

    #[tokio::test]
    async fn past_the_limit_the_copy_is_dropped_and_no_replay_is_offered() {
        // A small chunk after the overflow must not start a new copy.
        let body = ReplayBody::new(source(&[b"abcd", b"efgh", b"i"]), 6);
        assert_eq!(read_all(body.replay()).await.unwrap(), b"abcdefghi");
        assert!(!body.replayable());
        assert!(body.shared.lock().unwrap().kept.is_empty(), "copy freed");
        // The limit is on the sum of the chunks, not on each.
        let body = ReplayBody::new(source(&[b"a", b"bcdef"]), 5);
        assert_eq!(read_all(body.replay()).await.unwrap(), b"abcdef");
        assert!(!body.replayable(), "6 bytes passed a limit of 5");
        let body = ReplayBody::new(source(&[b"ab", b"cde"]), 5);
        assert_eq!(read_all(body.replay()).await.unwrap(), b"abcde");
        assert!(body.replayable(), "5 bytes fit a limit of 5");
    }

    #[tokio::test]
    async fn an_attempt_ends_after_the_kept_bytes_and_the_guests_end() {
        let empty = http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        assert!(ReplayBody::new(empty, 8).replay().is_end_stream());

        let body = ReplayBody::new(source(&[b"ab", b"cd"]), 8);
        let first = body.replay();
        assert!(!first.is_end_stream(), "the guest's body is still to come");
        assert_eq!(read_all(first).await.unwrap(), b"abcd");
        // A replay has its kept bytes still to send, then ends.
        let mut again = body.replay();
        assert!(!again.is_end_stream(), "kept bytes still to send");
        let _ = again.frame().await;
        assert!(!again.is_end_stream());
        let _ = again.frame().await;
        assert!(again.is_end_stream());
        // An attempt superseded by a newer one never claims to be whole.
        let newer = body.replay();
        assert!(!again.is_end_stream());
        assert!(!newer.is_end_stream());
    }

    /// A response body: its frames, then quiet (`Pending`) for good.
    struct ThenQuiet(VecDeque<&'static [u8]>);

    impl Body for ThenQuiet {
        type Data = Bytes;
        type Error = Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
            match self.0.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(c))))),
                None => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|c| c.len() as u64).sum())
        }
    }

    #[tokio::test]
    async fn between_bytes_passes_frames_and_fails_a_quiet_upstream() {
        let within = Duration::from_millis(200);
        let mut body = BetweenBytes::new(ThenQuiet([&b"ab"[..], b"cd"].into()), within);
        assert_eq!(body.size_hint().exact(), Some(4));
        assert!(!body.is_end_stream());
        // Each frame restarts the timer: frames a little apart all pass.
        for want in ["ab", "cd"] {
            tokio::time::sleep(within / 2).await;
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), want);
        }
        assert!(body.is_end_stream());
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, Error::ConnectionReadTimeout), "{err:?}");
        assert!(
            started.elapsed() >= within / 2,
            "the timer restarted at the last frame"
        );
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_never_kept_and_hints_pass_through() {
        let big = http_body_util::Full::new(Bytes::from(vec![7u8; 100]))
            .map_err(|never| match never {})
            .boxed_unsync();
        let body = ReplayBody::new(big, 10);
        assert!(!body.replayable());
        let first = body.replay();
        assert_eq!(first.size_hint().exact(), Some(100));
        assert_eq!(read_all(first).await.unwrap().len(), 100);

        let small = http_body_util::Full::new(Bytes::from_static(b"xyz"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let body = ReplayBody::new(small, 10);
        assert_eq!(read_all(body.replay()).await.unwrap(), b"xyz");
        let again = body.replay();
        assert_eq!(again.size_hint().exact(), Some(3), "kept bytes count");
        assert_eq!(read_all(again).await.unwrap(), b"xyz");
    }
}
