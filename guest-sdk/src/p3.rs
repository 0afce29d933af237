//! WASI 0.3 modules: an async handler on the `http` crate's types.
//!
//! ```ignore
//! use berth_sdk::p3::{Body, Request, Response, full};
//!
//! async fn handle(req: Request) -> Response<Body> {
//!     let name = berth_sdk::config::get_or("name", "world");
//!     berth_sdk::info!("hello from {}", req.uri().path());
//!     Response::new(full(format!("hello, {name}\n")))
//! }
//!
//! berth_sdk::p3::service!(handle);
//! ```
//!
//! The module exports `wasi:http/handler@0.3.x`. Build it like a 0.2
//! module (`cargo build --release --target wasm32-wasip2`) with this
//! crate's `p3` feature on. The [`config`](crate::config), logging and
//! [`metrics`](crate::metrics) helpers work unchanged.
//!
//! Bodies stream both ways: the request body is an `http_body::Body` read
//! frame by frame as the client sends it, and any `http_body::Body` can be
//! returned, e.g. a [`channel`] fed by a task the handler spawns with
//! [`spawn`]. Outbound calls are `async` ([`send`]), so several can run at
//! once (`futures::join!`, or [`spawn`]).
//!
//! By default the host reuses a 0.3 module's instances: up to 128 requests
//! per instance, 16 at once. Globals can outlive a request; see
//! `instances` in the host's configuration.

pub use bytes::Bytes;
pub use http;
pub use http_body_util;
pub use wasip3;
pub use wasip3::http::types::ErrorCode;
pub use wasip3::http_compat::{IncomingRequestBody, IncomingResponseBody};

/// An incoming request: its body streams as the client sends it.
pub type Request = http::Request<IncomingRequestBody>;

/// A response, with any body type.
pub type Response<B = Body> = http::Response<B>;

/// A boxed body, for handlers that return bodies of different kinds.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, ErrorCode>;

/// A whole body from bytes or a string.
pub fn full(data: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body written piece by piece: send chunks on the [`Sender`] (from a
/// task started with [`spawn`]); the body ends when it is dropped.
pub fn channel() -> (Sender, Body) {
    use http_body_util::BodyExt;
    // A small buffer: a slow client holds the writer back.
    let (tx, rx) = futures_channel::mpsc::channel(4);
    (Sender { tx }, ChannelBody { rx }.boxed_unsync())
}

/// The writing end of a [`channel`] body.
pub struct Sender {
    tx: futures_channel::mpsc::Sender<Bytes>,
}

impl Sender {
    /// Sends one chunk, waiting while the client is behind; `false` once
    /// the body is no longer read.
    pub async fn send(&mut self, chunk: impl Into<Bytes>) -> bool {
        let chunk = chunk.into();
        std::future::poll_fn(|cx| self.tx.poll_ready(cx))
            .await
            .is_ok()
            && self.tx.start_send(chunk).is_ok()
    }
}

struct ChannelBody {
    rx: futures_channel::mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = ErrorCode;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, ErrorCode>>> {
        use futures_core::Stream;
        std::pin::Pin::new(&mut self.rx)
            .poll_next(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// Runs `future` next to the handler, e.g. to feed a [`channel`] body after
/// the response head is returned, or to make outbound calls concurrently.
pub fn spawn(future: impl std::future::Future<Output = ()> + 'static) {
    wasip3::wit_bindgen::spawn_local(future);
}

/// Sends an outbound request through the host (and its outbound policy).
pub async fn send<B>(req: http::Request<B>) -> Result<Response<IncomingResponseBody>, ErrorCode>
where
    B: http_body::Body + std::any::Any,
    B::Data: Into<Vec<u8>>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    let req = wasip3::http_compat::http_into_wasi_request(req)?;
    let resp = wasip3::http::client::send(req).await?;
    wasip3::http_compat::http_from_wasi_response(resp)
}

/// Reads a whole body into memory.
pub async fn collect<B>(body: B) -> Result<Bytes, ErrorCode>
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    /// Runs a user handler for one incoming request.
    pub async fn run<F, Fut, B>(
        req: wasip3::http::types::Request,
        handler: F,
    ) -> Result<wasip3::http::types::Response, ErrorCode>
    where
        F: FnOnce(Request) -> Fut,
        Fut: std::future::Future<Output = Response<B>>,
        B: http_body::Body + std::any::Any,
        B::Data: Into<Vec<u8>>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    {
        let req = wasip3::http_compat::http_from_wasi_request(req)?;
        let resp = handler(req).await;
        wasip3::http_compat::http_into_wasi_response(resp)
    }
}

/// Declares the module's WASI 0.3 handler: an `async fn` taking a
/// [`Request`] and returning a [`Response`] with any body.
#[macro_export]
macro_rules! service {
    ($handler:path) => {
        #[doc(hidden)]
        struct __BerthService;

        impl $crate::p3::wasip3::exports::http::handler::Guest for __BerthService {
            async fn handle(
                req: $crate::p3::wasip3::http::types::Request,
            ) -> ::core::result::Result<
                $crate::p3::wasip3::http::types::Response,
                $crate::p3::ErrorCode,
            > {
                $crate::p3::__private::run(req, $handler).await
            }
        }

        $crate::p3::wasip3::http::service::export!(
            __BerthService with_types_in $crate::p3::wasip3
        );
    };
}

pub use crate::service;
