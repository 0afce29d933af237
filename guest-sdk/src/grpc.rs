//! gRPC services over `wasi:http` (feature `grpc`): message framing over
//! [prost](https://docs.rs/prost) types, a router by
//! `/package.Service/Method`, and gRPC statuses. All four kinds of RPC
//! work on WASI 0.2: the request's messages are read as they arrive and
//! the response's are written as they are sent, so a bidirectional stream
//! is a conversation. On WASI 0.3 (with the `p3` feature) [`p3::Router`]
//! does the same with `async` handlers.
//!
//! ```no_run
//! use berth_sdk::grpc::{self, Context, Router, Sink, Status};
//!
//! #[derive(Clone, PartialEq, prost::Message)]
//! pub struct HelloRequest {
//!     #[prost(string, tag = "1")]
//!     pub name: String,
//! }
//! #[derive(Clone, PartialEq, prost::Message)]
//! pub struct HelloReply {
//!     #[prost(string, tag = "1")]
//!     pub message: String,
//! }
//!
//! fn say_hello(req: HelloRequest, _cx: &Context) -> Result<HelloReply, Status> {
//!     if req.name.is_empty() {
//!         return Err(Status::invalid_argument("name is empty"));
//!     }
//!     Ok(HelloReply { message: format!("hello {}", req.name) })
//! }
//!
//! fn router() -> Router {
//!     Router::new().unary("/greeter.Greeter/SayHello", say_hello)
//! }
//!
//! berth_sdk::grpc_service!(router);
//! ```
//!
//! The host answers for itself in gRPC's terms too: no route is
//! `UNIMPLEMENTED`, a shed request `UNAVAILABLE`, the deadline
//! `DEADLINE_EXCEEDED` (the client's `grpc-timeout`, capped by the module's
//! `timeout`, and readable here as [`Context::timeout`]).
//!
//! Not supported: message compression (`grpc-encoding` other than
//! `identity` gets `UNIMPLEMENTED`).

use std::fmt;
use std::io::Write as _;
use std::marker::PhantomData;
use std::time::Duration;

#[cfg(feature = "p3")]
pub mod p3;

pub use prost;
use prost::Message;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::{InputStream, OutputStream, StreamError};

/// The largest message a router accepts unless told otherwise: gRPC's
/// customary 4 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 4 << 20;

/// A gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// The outcome of a call: a code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    code: Code,
    message: String,
}

impl Status {
    /// A status with this code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }

    /// `INVALID_ARGUMENT`: the request is wrong, whatever the state.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Status::new(Code::InvalidArgument, message)
    }

    /// `NOT_FOUND`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Status::new(Code::NotFound, message)
    }

    /// `FAILED_PRECONDITION`: the system is not in a state for this call.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Status::new(Code::FailedPrecondition, message)
    }

    /// `UNAVAILABLE`: try again later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Status::new(Code::Unavailable, message)
    }

    /// `INTERNAL`.
    pub fn internal(message: impl Into<String>) -> Self {
        Status::new(Code::Internal, message)
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Status {}

impl From<crate::Error> for Status {
    /// An error of a host call inside a handler, as gRPC's status for it:
    /// a timeout is `DEADLINE_EXCEEDED`, an open breaker or a failed
    /// upstream `UNAVAILABLE`, a refusal by the outbound policy
    /// `PERMISSION_DENIED`, the rest `INTERNAL`. The message is fixed:
    /// the error's own text names URLs, which may carry credentials, and
    /// the caller is not to see the module's upstreams.
    fn from(e: crate::Error) -> Self {
        let (code, message) = match e {
            crate::Error::Timeout { .. } => (Code::DeadlineExceeded, "an upstream call timed out"),
            crate::Error::Unavailable { .. } | crate::Error::Upstream { .. } => {
                (Code::Unavailable, "an upstream is unavailable")
            }
            crate::Error::Denied { .. } => (Code::PermissionDenied, "an upstream call was refused"),
            _ => (Code::Internal, "internal error"),
        };
        Status::new(code, message)
    }
}

/// One length-prefixed message: a compressed flag of 0, the length as four
/// big-endian bytes, then the encoded message.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(5 + len);
    out.push(0);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message
        .encode(&mut out)
        .expect("a Vec grows to fit the message");
    out
}

/// Splits a byte stream into messages. The length is checked against the
/// limit before any of the message is buffered, so a peer announcing 4 GiB
/// costs five bytes.
#[derive(Debug)]
pub struct Frames {
    buf: Vec<u8>,
    /// Where the next message starts in `buf`: messages are taken by
    /// moving it, and the taken bytes dropped once per read, so a read full
    /// of small messages is not shifted once for each of them.
    start: usize,
    max: usize,
}

impl Frames {
    /// A splitter refusing messages over `max` bytes.
    pub fn new(max: usize) -> Self {
        Frames {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, Status> {
        let rest = &self.buf[self.start..];
        let Some(header) = rest.get(..5) else {
            return Ok(None);
        };
        match header[0] {
            0 => {}
            1 => {
                return Err(Status::new(
                    Code::Unimplemented,
                    "compressed messages are not supported",
                ));
            }
            flag => {
                return Err(Status::internal(format!(
                    "bad compressed flag {flag} in a message prefix"
                )));
            }
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        // On wasm32 `5 + len` can wrap: a length that does not fit is over
        // any limit.
        let Some(end) = len.checked_add(5).filter(|_| len <= self.max) else {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!("a message of {len} bytes is over the limit of {}", self.max),
            ));
        };
        if rest.len() < end {
            return Ok(None);
        }
        let message = rest[5..end].to_vec();
        self.start += end;
        Ok(Some(message))
    }

    /// Whether bytes of an unfinished message are left.
    pub fn is_partial(&self) -> bool {
        self.start < self.buf.len()
    }
}

/// What a handler knows of its call besides the messages.
#[derive(Debug, Clone)]
pub struct Context {
    method: String,
    metadata: Vec<(String, String)>,
    timeout: Option<Duration>,
}

impl Context {
    /// The full method name, `/package.Service/Method`.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// A metadata value (a request header; names are lowercase).
    pub fn metadata(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.metadata
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The time the call had when it reached the module, from its
    /// `grpc-timeout`, or `None` when the client set none (the module's
    /// `timeout` applies all the same). Over HTTP/2, as gRPC clients call,
    /// the host caps it by the module's `timeout`; a request that is not
    /// gRPC to the host (HTTP/1.1) passes the client's value on as sent.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

/// `TimeoutValue TimeoutUnit` of the gRPC over HTTP/2 spec.
fn parse_timeout(text: &str) -> Option<Duration> {
    // Split by bytes below: only ASCII can be a timeout (and a split
    // inside a character would panic).
    if !text.is_ascii() {
        return None;
    }
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's messages, read from the client as the handler asks for
/// them. Each item is a message or the status the call should end with
/// (a message that does not decode is `INVALID_ARGUMENT`).
pub struct Streaming<M> {
    input: Option<InputStream>,
    frames: Frames,
    _message: PhantomData<fn() -> M>,
}

impl<M: Message + Default> Streaming<M> {
    fn new(input: Option<InputStream>, max: usize) -> Self {
        Streaming {
            input,
            frames: Frames::new(max),
            _message: PhantomData,
        }
    }

    fn next_message(&mut self) -> Option<Result<M, Status>> {
        loop {
            match self.frames.next_message() {
                Ok(Some(bytes)) => return Some(decode(&bytes)),
                Ok(None) => {}
                Err(status) => {
                    self.input = None;
                    return Some(Err(status));
                }
            }
            let input = self.input.as_ref()?;
            match input.blocking_read(64 * 1024) {
                Ok(bytes) => self.frames.push(&bytes),
                Err(StreamError::Closed) => {
                    self.input = None;
                    if self.frames.is_partial() {
                        return Some(Err(cut_mid_message()));
                    }
                    return None;
                }
                Err(StreamError::LastOperationFailed(e)) => {
                    self.input = None;
                    // The host's error text is for the host's logs, not
                    // for the caller: its code says enough.
                    // Berth's body limit reaches the guest as an I/O error
                    // whose text names it (not always as an error code).
                    let over = matches!(
                        wasi::http::types::http_error_code(&e),
                        Some(wasi::http::types::ErrorCode::HttpRequestBodySize(_))
                    ) || e.to_debug_string().contains("body size exceeds");
                    return Some(Err(body_failed(over)));
                }
            }
        }
    }

    /// The one message of a unary or server-streaming call.
    fn single(mut self) -> Result<M, Status> {
        let message = self.next_message().unwrap_or_else(|| Err(no_message()))?;
        match self.next_message() {
            None => Ok(message),
            Some(Err(status)) => Err(status),
            Some(Ok(_)) => Err(second_message()),
        }
    }
}

impl<M: Message + Default> Iterator for Streaming<M> {
    type Item = Result<M, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_message()
    }
}

/// Where a handler sends its response messages, each written to the
/// client at once.
pub struct Sink<'a, M> {
    output: &'a mut OutputStream,
    _message: PhantomData<fn(&M)>,
}

impl<M: Message> Sink<'_, M> {
    /// Sends one message. Fails with `CANCELLED` when the client is gone;
    /// the handler should then stop.
    pub fn send(&mut self, message: &M) -> Result<(), Status> {
        let gone =
            |e: &dyn fmt::Display| Status::new(Code::Cancelled, format!("the client is gone: {e}"));
        let bytes = encode(message);
        // A small message in one host call, where `write_all` and `flush`
        // take three or more. A larger one goes whole: written in 4096-byte
        // calls, each waiting for the host to take the last, it would leave
        // as that many frames.
        if bytes.len() <= WRITE_AND_FLUSH_MAX {
            return self
                .output
                .blocking_write_and_flush(&bytes)
                .map_err(|e| gone(&e));
        }
        self.output
            .write_all(&bytes)
            .and_then(|()| self.output.flush())
            .map_err(|e| gone(&e))
    }
}

/// The most `blocking-write-and-flush` may write in one call.
const WRITE_AND_FLUSH_MAX: usize = 4096;

/// A route with its types erased: it is given the request stream, the
/// message limit and the response stream.
type Handler =
    Box<dyn Fn(Option<InputStream>, usize, &Context, &mut OutputStream) -> Result<(), Status>>;

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
    /// with `RESOURCE_EXHAUSTED` before it is read. The host's
    /// `limits.max_body` bounds the whole request as well.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    fn route<Req, Resp>(
        mut self,
        method: &str,
        handler: impl Fn(Streaming<Req>, &Context, &mut Sink<'_, Resp>) -> Result<(), Status> + 'static,
    ) -> Self
    where
        Req: Message + Default,
        Resp: Message,
    {
        check_method_name(method);
        let erased: Handler = Box::new(move |input, max, cx, output| {
            let mut sink = Sink {
                output,
                _message: PhantomData,
            };
            handler(Streaming::new(input, max), cx, &mut sink)
        });
        self.routes.push((method.to_owned(), erased));
        self
    }

    /// A unary method: one request, one response.
    pub fn unary<Req, Resp>(
        self,
        method: &str,
        handler: impl Fn(Req, &Context) -> Result<Resp, Status> + 'static,
    ) -> Self
    where
        Req: Message + Default,
        Resp: Message,
    {
        self.route(method, move |req: Streaming<Req>, cx, sink| {
            let reply = handler(req.single()?, cx)?;
            sink.send(&reply)
        })
    }

    /// A server-streaming method: one request, any number of responses.
    pub fn server_streaming<Req, Resp>(
        self,
        method: &str,
        handler: impl Fn(Req, &Context, &mut Sink<'_, Resp>) -> Result<(), Status> + 'static,
    ) -> Self
    where
        Req: Message + Default,
        Resp: Message,
    {
        self.route(method, move |req: Streaming<Req>, cx, sink| {
            handler(req.single()?, cx, sink)
        })
    }

    /// A client-streaming method: any number of requests, one response.
    pub fn client_streaming<Req, Resp>(
        self,
        method: &str,
        handler: impl Fn(Streaming<Req>, &Context) -> Result<Resp, Status> + 'static,
    ) -> Self
    where
        Req: Message + Default,
        Resp: Message,
    {
        self.route(method, move |req: Streaming<Req>, cx, sink| {
            let reply = handler(req, cx)?;
            sink.send(&reply)
        })
    }

    /// A bidirectional-streaming method: requests and responses in any
    /// order, each sent as soon as the handler sends it.
    pub fn bidi_streaming<Req, Resp>(
        self,
        method: &str,
        handler: impl Fn(Streaming<Req>, &Context, &mut Sink<'_, Resp>) -> Result<(), Status> + 'static,
    ) -> Self
    where
        Req: Message + Default,
        Resp: Message,
    {
        self.route(method, handler)
    }

    /// Serves one incoming request.
    #[doc(hidden)]
    pub fn serve(&self, req: IncomingRequest, out: ResponseOutparam) {
        let metadata = crate::message::header_list(&req.headers());
        let method = req.method();
        let path = req.path_with_query().unwrap_or_default();
        let Some((cx, accepted)) = call_of(crate::message::method_name(&method), &path, metadata)
        else {
            return crate::Response::error(415, NOT_GRPC).send(out);
        };
        let resp = OutgoingResponse::new(fields(RESPONSE_HEADERS.map(|(k, v)| (k, v.to_owned()))));
        let body = resp.body().expect("a new response has a body");
        ResponseOutparam::set(out, Ok(resp));
        let mut output = body.write().expect("the body stream is taken once");
        let incoming = req.consume().ok();
        let input = incoming.as_ref().and_then(|b| b.stream().ok());
        let result = accepted.and_then(|()| {
            let (_, handler) = self
                .routes
                .iter()
                .find(|(name, _)| *name == cx.method)
                .ok_or_else(|| unknown_method(&cx))?;
            handler(input, self.max_message, &cx, &mut output)
        });
        // Child streams go before their bodies are finished.
        drop(output);
        if let Some(incoming) = incoming {
            let _ = IncomingBody::finish(incoming);
        }
        let _ = OutgoingBody::finish(body, Some(fields(status_fields(result))));
    }
}

/// Fields made in one host call; a field the host refuses is left out, as
/// an `append` of it would fail alone.
fn fields(list: impl IntoIterator<Item = (&'static str, String)>) -> Fields {
    let list: Vec<(String, Vec<u8>)> = list
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.into_bytes()))
        .collect();
    Fields::from_list(&list).unwrap_or_else(|_| {
        let fields = Fields::new();
        for (name, value) in &list {
            let _ = fields.append(name, value);
        }
        fields
    })
}

/// What a module serving gRPC answers (with 415) to anything else, as the
/// gRPC over HTTP/2 spec asks.
const NOT_GRPC: &str = "this module serves gRPC (application/grpc)";

/// The head of every gRPC response.
const RESPONSE_HEADERS: [(&str, &str); 2] = [
    ("content-type", "application/grpc"),
    ("grpc-accept-encoding", "identity"),
];

/// The call a request makes, and whether it can be served (a compressed
/// one cannot); `None` when the request is not gRPC at all.
fn call_of(
    method: &str,
    path_with_query: &str,
    metadata: Vec<(String, String)>,
) -> Option<(Context, Result<(), Status>)> {
    let header = |name: &str| {
        metadata
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let grpc = header("content-type").is_some_and(|ct| {
        ct == "application/grpc"
            || ct.starts_with("application/grpc+")
            || ct.starts_with("application/grpc;")
    });
    if !grpc || method != "POST" {
        return None;
    }
    let encoding = header("grpc-encoding").unwrap_or("identity");
    let accepted = if encoding == "identity" {
        Ok(())
    } else {
        Err(Status::new(
            Code::Unimplemented,
            format!("grpc-encoding {encoding} is not supported"),
        ))
    };
    let cx = Context {
        timeout: header("grpc-timeout").and_then(parse_timeout),
        method: path_with_query
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned(),
        metadata,
    };
    Some((cx, accepted))
}

/// The trailers that end a call: `grpc-status`, and `grpc-message` when
/// there is one.
fn status_fields(result: Result<(), Status>) -> Vec<(&'static str, String)> {
    let status = result.err().unwrap_or_else(|| Status::new(Code::Ok, ""));
    let mut fields = vec![("grpc-status", (status.code as u8).to_string())];
    if !status.message.is_empty() {
        fields.push(("grpc-message", percent_encode(&status.message)));
    }
    fields
}

fn check_method_name(method: &str) {
    assert!(
        method.starts_with('/') && method[1..].contains('/'),
        "a gRPC method is named /package.Service/Method, not {method:?}"
    );
}

fn unknown_method(cx: &Context) -> Status {
    Status::new(Code::Unimplemented, format!("unknown method {}", cx.method))
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, Status> {
    M::decode(bytes)
        .map_err(|e| Status::invalid_argument(format!("the message does not decode: {e}")))
}

fn cut_mid_message() -> Status {
    Status::internal("the request ended inside a message")
}

fn no_message() -> Status {
    Status::internal("the call has no request message")
}

fn second_message() -> Status {
    Status::internal("a unary call has more than one request message")
}

/// Why the request stream failed: over the module's body limit, or cut
/// (the host's error text is for the host's logs, not for the caller).
fn body_failed(over_limit: bool) -> Status {
    if over_limit {
        Status::new(
            Code::ResourceExhausted,
            "the request is over the module's body limit",
        )
    } else {
        Status::new(Code::Cancelled, "the request stream failed")
    }
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII,
/// and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Declares the module's gRPC services: a function returning the
/// [`Router`]. It is built once per instance.
///
/// ```no_run
/// fn router() -> berth_sdk::grpc::Router {
///     berth_sdk::grpc::Router::new()
/// }
/// berth_sdk::grpc_service!(router);
/// ```
#[macro_export]
macro_rules! grpc_service {
    ($router:path) => {
        #[doc(hidden)]
        struct __BerthGrpc;

        impl $crate::__private::wasi::exports::http::incoming_handler::Guest for __BerthGrpc {
            fn handle(
                req: $crate::__private::wasi::http::types::IncomingRequest,
                out: $crate::__private::wasi::http::types::ResponseOutparam,
            ) {
                ::std::thread_local! {
                    static ROUTER: $crate::grpc::Router = $router();
                }
                ROUTER.with(|router| router.serve(req, out));
            }
        }

        $crate::__private::wasi::http::proxy::export!(
            __BerthGrpc with_types_in $crate::__private::wasi
        );
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Note {
        #[prost(string, tag = "1")]
        text: String,
    }

    #[test]
    #[should_panic(expected = "/package.Service/Method")]
    fn a_route_not_named_as_a_grpc_method_is_refused() {
        check_method_name("SayHello");
    }

    #[test]
    fn frames_split_what_encode_joins_across_reads() {
        let mut wire = encode(&Note { text: "one".into() });
        wire.extend(encode(&Note { text: "two".into() }));
        let mut frames = Frames::new(DEFAULT_MAX_MESSAGE);
        let mut got = Vec::new();
        // One byte at a time: every split point of both messages.
        for b in &wire {
            frames.push(&[*b]);
            while let Some(m) = frames.next_message().unwrap() {
                got.push(Note::decode(m.as_slice()).unwrap().text);
            }
        }
        assert_eq!(got, ["one", "two"]);
        assert!(!frames.is_partial());
        frames.push(&wire[..3]);
        assert!(frames.is_partial());
    }

    #[test]
    fn an_oversized_or_compressed_message_is_refused_from_its_prefix() {
        let mut frames = Frames::new(10);
        frames.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        let err = frames.next_message().unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().contains("4294967295"), "{err}");
        let mut frames = Frames::new(10);
        frames.push(&[0, 0, 0, 0, 11]);
        assert_eq!(
            frames.next_message().unwrap_err().code(),
            Code::ResourceExhausted
        );
        let mut frames = Frames::new(10);
        frames.push(&[0, 0, 0, 0, 10]);
        assert_eq!(frames.next_message().unwrap(), None, "10 bytes are allowed");
        let mut frames = Frames::new(10);
        frames.push(&[1, 0, 0, 0, 1, 0]);
        assert_eq!(
            frames.next_message().unwrap_err().code(),
            Code::Unimplemented
        );
        let mut frames = Frames::new(10);
        frames.push(&[7, 0, 0, 0, 1, 0]);
        assert_eq!(frames.next_message().unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in [
            "",
            "m",
            "123456789m",
            "5x",
            "-5m",
            "5",
            "1é",
            "é",
            "1\u{fffd}",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn host_errors_reach_the_caller_without_their_urls() {
        let url = "http://svc:TOPSECRET@orders.internal/v1?api_key=TOPSECRET".to_owned();
        for e in [
            crate::Error::Denied { url: url.clone() },
            crate::Error::Timeout { url: url.clone() },
            crate::Error::Unavailable { url: url.clone() },
            crate::Error::Upstream {
                url: url.clone(),
                reason: "ConnectionRefused".into(),
            },
            crate::Error::Io(url.clone()),
        ] {
            let status = Status::from(e.clone());
            assert!(!status.message().contains("TOPSECRET"), "{e:?} -> {status}");
            assert!(!status.message().contains("orders"), "{e:?} -> {status}");
        }
        let codes = [
            (
                crate::Error::Denied { url: url.clone() },
                Code::PermissionDenied,
            ),
            (
                crate::Error::Timeout { url: url.clone() },
                Code::DeadlineExceeded,
            ),
            (
                crate::Error::Unavailable { url: url.clone() },
                Code::Unavailable,
            ),
            (
                crate::Error::Upstream {
                    url,
                    reason: "x".into(),
                },
                Code::Unavailable,
            ),
            (crate::Error::Io("x".into()), Code::Internal),
        ];
        for (e, code) in codes {
            assert_eq!(Status::from(e.clone()).code(), code, "{e:?}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% off: ok"), "50%25 off: ok");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
