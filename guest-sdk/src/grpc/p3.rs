//! gRPC services on WASI 0.3 (features `grpc` and `p3`): the same
//! [`Status`], framing and [`Context`] as on 0.2, with `async` handlers.
//! A call runs as a task of its own, so one instance serves many calls at
//! once (the host's `instances.max_concurrent`), and a handler may await
//! outbound calls or timers without holding the others up.
//!
//! ```ignore
//! use berth_sdk::grpc::{Context, Status, p3::Router};
//!
//! async fn say_hello(req: HelloRequest, _cx: Context) -> Result<HelloReply, Status> {
//!     Ok(HelloReply { message: format!("hello {}", req.name) })
//! }
//!
//! fn router() -> Router {
//!     Router::new().unary("/greeter.Greeter/SayHello", say_hello)
//! }
//!
//! berth_sdk::grpc_service_p3!(router);
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures_channel::mpsc;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;

use super::{Code, Context, DEFAULT_MAX_MESSAGE, Frames, Status, encode};
use crate::p3::{Body, IncomingRequestBody, Request, Response};

/// The request's messages, read from the client as the handler awaits
/// them.
pub struct Messages<M> {
    body: Option<IncomingRequestBody>,
    frames: Frames,
    _message: PhantomData<fn() -> M>,
}

impl<M: Message + Default> Messages<M> {
    fn new(body: IncomingRequestBody, max: usize) -> Self {
        Messages {
            body: Some(body),
            frames: Frames::new(max),
            _message: PhantomData,
        }
    }

    /// The next message; `None` once the client has sent its last. A
    /// message that does not decode is `INVALID_ARGUMENT`, one over the
    /// limit `RESOURCE_EXHAUSTED`, a body cut off mid-message `INTERNAL`.
    pub async fn message(&mut self) -> Option<Result<M, Status>> {
        loop {
            match self.frames.next_message() {
                Ok(Some(bytes)) => return Some(super::decode(&bytes)),
                Ok(None) => {}
                Err(status) => {
                    self.body = None;
                    return Some(Err(status));
                }
            }
            let body = self.body.as_mut()?;
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.frames.push(data);
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    let over = matches!(e, crate::p3::ErrorCode::HttpRequestBodySize(_));
                    return Some(Err(super::body_failed(over)));
                }
                None => {
                    self.body = None;
                    if self.frames.is_partial() {
                        return Some(Err(super::cut_mid_message()));
                    }
                }
            }
        }
    }

    /// Exactly one message, as a unary or server-streaming call has.
    async fn single(mut self) -> Result<M, Status> {
        let first = self
            .message()
            .await
            .unwrap_or_else(|| Err(super::no_message()))?;
        match self.message().await {
            None => Ok(first),
            Some(Err(status)) => Err(status),
            Some(Ok(_)) => Err(super::second_message()),
        }
    }
}

/// Where a handler sends its response messages; each leaves as it is sent.
pub struct Sink<M> {
    tx: mpsc::Sender<Frame<Bytes>>,
    _message: PhantomData<fn(M)>,
}

impl<M: Message> Sink<M> {
    /// Sends one message, waiting while the client is behind; `CANCELLED`
    /// once the client is gone.
    pub async fn send(&mut self, message: &M) -> Result<(), Status> {
        let frame = Frame::data(Bytes::from(encode(message)));
        std::future::poll_fn(|cx| self.tx.poll_ready(cx))
            .await
            .and_then(|()| self.tx.start_send(frame))
            .map_err(|_| Status::new(Code::Cancelled, "the client is gone"))
    }
}

type Call = Pin<Box<dyn Future<Output = Result<(), Status>>>>;

/// A route with its types erased: given the request body, the message
/// limit, the call and the response's sender, the call's future.
type Handler = Box<dyn Fn(IncomingRequestBody, usize, Context, mpsc::Sender<Frame<Bytes>>) -> Call>;

/// The methods of a module's services, by full name.
pub struct Router {
    routes: Vec<(String, Handler)>,
    max_message: usize,
}

impl Default for Router {
    fn default() -> Self {
        Router::new()
    }
}

impl Router {
    /// A router with no methods and the default message limit.
    pub fn new() -> Self {
        Router {
            routes: Vec::new(),
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }

    /// The largest request message accepted; a larger one ends the call
    /// with `RESOURCE_EXHAUSTED` before it is read.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    fn route<Req, Resp, F, Fut>(mut self, method: &str, handler: F) -> Self
    where
        Req: Message + Default + 'static,
        Resp: Message + 'static,
        F: Fn(Messages<Req>, Context, Sink<Resp>) -> Fut + 'static,
        Fut: Future<Output = Result<(), Status>> + 'static,
    {
        super::check_method_name(method);
        let erased: Handler = Box::new(move |body, max, cx, tx| {
            Box::pin(handler(
                Messages::new(body, max),
                cx,
                Sink {
                    tx,
                    _message: PhantomData,
                },
            ))
        });
        self.routes.push((method.to_owned(), erased));
        self
    }

    /// A unary method: one request, one response.
    pub fn unary<Req, Resp, F, Fut>(self, method: &str, handler: F) -> Self
    where
        Req: Message + Default + 'static,
        Resp: Message + 'static,
        F: Fn(Req, Context) -> Fut + Clone + 'static,
        Fut: Future<Output = Result<Resp, Status>> + 'static,
    {
        self.route(method, move |req: Messages<Req>, cx, mut sink| {
            let handler = handler.clone();
            async move {
                let reply = handler(req.single().await?, cx).await?;
                sink.send(&reply).await
            }
        })
    }

    /// A server-streaming method: one request, any number of responses.
    pub fn server_streaming<Req, Resp, F, Fut>(self, method: &str, handler: F) -> Self
    where
        Req: Message + Default + 'static,
        Resp: Message + 'static,
        F: Fn(Req, Context, Sink<Resp>) -> Fut + Clone + 'static,
        Fut: Future<Output = Result<(), Status>> + 'static,
    {
        self.route(method, move |req: Messages<Req>, cx, sink| {
            let handler = handler.clone();
            async move { handler(req.single().await?, cx, sink).await }
        })
    }

    /// A client-streaming method: any number of requests, one response.
    pub fn client_streaming<Req, Resp, F, Fut>(self, method: &str, handler: F) -> Self
    where
        Req: Message + Default + 'static,
        Resp: Message + 'static,
        F: Fn(Messages<Req>, Context) -> Fut + Clone + 'static,
        Fut: Future<Output = Result<Resp, Status>> + 'static,
    {
        self.route(method, move |req: Messages<Req>, cx, mut sink| {
            let handler = handler.clone();
            async move {
                let reply = handler(req, cx).await?;
                sink.send(&reply).await
            }
        })
    }

    /// A bidirectional-streaming method: requests and responses in any
    /// order, each sent as soon as the handler sends it.
    pub fn bidi_streaming<Req, Resp, F, Fut>(self, method: &str, handler: F) -> Self
    where
        Req: Message + Default + 'static,
        Resp: Message + 'static,
        F: Fn(Messages<Req>, Context, Sink<Resp>) -> Fut + 'static,
        Fut: Future<Output = Result<(), Status>> + 'static,
    {
        self.route(method, handler)
    }

    /// Starts one call: the response head at once, its messages and
    /// status from a task of the call's own.
    #[doc(hidden)]
    pub fn serve(&self, req: Request) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let metadata: Vec<(String, String)> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_owned(), value)
            })
            .collect();
        let Some((cx, accepted)) =
            super::call_of(parts.method.as_str(), parts.uri.path(), metadata)
        else {
            // As the 0.2 router answers (`Response::error`).
            let body = serde_json::json!({ "error": super::NOT_GRPC }).to_string();
            let mut resp = Response::new(crate::p3::full(body));
            *resp.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            resp.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            return resp;
        };
        let (mut tx, rx) = mpsc::channel(4);
        let call = accepted.and_then(|()| {
            let (_, handler) = self
                .routes
                .iter()
                .find(|(name, _)| *name == cx.method)
                .ok_or_else(|| super::unknown_method(&cx))?;
            Ok(handler(body, self.max_message, cx, tx.clone()))
        });
        crate::p3::spawn(async move {
            let result = match call {
                Ok(call) => call.await,
                Err(status) => Err(status),
            };
            let mut trailers = http::HeaderMap::new();
            for (name, value) in super::status_fields(result) {
                if let Ok(value) = http::HeaderValue::from_str(&value) {
                    trailers.insert(name, value);
                }
            }
            if std::future::poll_fn(|cx| tx.poll_ready(cx)).await.is_ok() {
                let _ = tx.start_send(Frame::trailers(trailers));
            }
        });
        let mut resp = Response::new(FrameBody { rx }.boxed_unsync());
        for (name, value) in super::RESPONSE_HEADERS {
            resp.headers_mut()
                .insert(name, http::HeaderValue::from_static(value));
        }
        resp
    }
}

/// The response body: the call's messages, then its status as trailers.
struct FrameBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = crate::p3::ErrorCode;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        use futures_core::Stream;
        Pin::new(&mut self.rx).poll_next(cx).map(|f| f.map(Ok))
    }
}

/// Declares the module's gRPC services on WASI 0.3: a function returning
/// the [`Router`], built once per instance.
///
/// ```ignore
/// fn router() -> berth_sdk::grpc::p3::Router {
///     berth_sdk::grpc::p3::Router::new()
/// }
/// berth_sdk::grpc_service_p3!(router);
/// ```
#[macro_export]
macro_rules! grpc_service_p3 {
    ($router:path) => {
        ::std::thread_local! {
            static __BERTH_GRPC_ROUTER: $crate::grpc::p3::Router = $router();
        }

        async fn __berth_grpc_handle(
            req: $crate::p3::Request,
        ) -> $crate::p3::Response<$crate::p3::Body> {
            __BERTH_GRPC_ROUTER.with(|router| router.serve(req))
        }

        $crate::p3::service!(__berth_grpc_handle);
    };
}
