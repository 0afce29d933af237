//! A streaming proxy on the bare `wasi:http/proxy` world, shaped like
//! wasmtime's `p2_api_proxy_streaming` `/double-echo` route: it opens an
//! outbound request to `http://{x-upstream}{x-upstream-path}`, waits for
//! the upstream's response head, answers with it, and then pipes the
//! client's body up and the upstream's body down at the same time.
//!
//! Waiting for the head before writing any of the request body is what a
//! proxy that forwards the upstream's status does, and it only works on a
//! host that sends the outbound head at once and hands the response head
//! back whatever state the request body is in (full duplex).
//!
//! Everything else passes through: the method, the path (unless
//! `x-upstream-path` names another), the headers both ways and the
//! upstream's trailers, so it also proxies gRPC (`grpc-status` rides in
//! the trailers, or in the head of a trailers-only answer).
//!
//! With `x-drip-ms: N` it proxies nothing: it answers 200, then writes
//! `tick` lines N ms apart. Between two lines it only sleeps, so it cannot
//! notice a client that hung up; only the host can end it.
//!
//! With `x-trap-after: N` it answers 200, writes N bytes and traps
//! without finishing the body.

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};
use wasi::io::poll::{Pollable, poll};
use wasi::io::streams::{InputStream, OutputStream, StreamError};

struct Proxy;

/// One direction of the exchange: bytes read from `src` and written to
/// `dst` as fast as both allow, without ever blocking the other direction.
struct Pipe {
    src: Option<InputStream>,
    dst: Option<OutputStream>,
    pending: Vec<u8>,
    /// The source ended (or the destination failed): nothing more to move.
    done: bool,
}

impl Pipe {
    fn new(src: InputStream, dst: OutputStream) -> Self {
        Pipe {
            src: Some(src),
            dst: Some(dst),
            pending: Vec::new(),
            done: false,
        }
    }

    /// Moves what can be moved now; whether anything changed.
    fn step(&mut self) -> bool {
        let (Some(src), Some(dst)) = (&self.src, &self.dst) else {
            return false;
        };
        if self.done {
            return false;
        }
        let mut progress = false;
        if self.pending.is_empty() {
            match src.read(64 * 1024) {
                Ok(bytes) => {
                    progress |= !bytes.is_empty();
                    self.pending = bytes;
                }
                Err(StreamError::Closed) => {
                    let _ = dst.flush();
                    self.done = true;
                    return true;
                }
                Err(StreamError::LastOperationFailed(_)) => {
                    self.done = true;
                    return true;
                }
            }
        }
        if !self.pending.is_empty() {
            match dst.check_write() {
                Ok(0) => {}
                Ok(n) => {
                    let n = (n as usize).min(self.pending.len());
                    if dst.write(&self.pending[..n]).is_err() {
                        self.done = true;
                        return true;
                    }
                    let _ = dst.flush();
                    self.pending.drain(..n);
                    progress = true;
                }
                Err(_) => {
                    // The far side stopped taking bytes (an early answer
                    // from the upstream): stop this direction only.
                    self.done = true;
                    return true;
                }
            }
        }
        progress
    }

    /// What this pipe waits on next.
    fn pollable(&self) -> Option<Pollable> {
        if self.done {
            return None;
        }
        if self.pending.is_empty() {
            self.src.as_ref().map(|s| s.subscribe())
        } else {
            self.dst.as_ref().map(|d| d.subscribe())
        }
    }

    /// Drops the streams so their bodies can be finished.
    fn close(&mut self) {
        self.src = None;
        self.dst = None;
    }
}

fn header(fields: &Fields, name: &str) -> Option<String> {
    fields
        .get(name)
        .first()
        .and_then(|v| String::from_utf8(v.clone()).ok())
}

/// `from` without the headers that belong to one hop (or to this proxy),
/// which `wasi:http` would refuse or the far side would misread.
fn forwarded(from: &Fields) -> Fields {
    const HOP: [&str; 11] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "http2-settings",
        "content-length",
        "x-upstream",
        "x-upstream-path",
        "traceparent",
    ];
    let to = Fields::new();
    for (name, value) in from.entries() {
        if !HOP.contains(&name.to_ascii_lowercase().as_str()) {
            let _ = to.append(&name, &value);
        }
    }
    to
}

fn answer(out: ResponseOutparam, status: u16, text: &str) {
    let resp = OutgoingResponse::new(Fields::new());
    let _ = resp.set_status_code(status);
    let body = resp.body().expect("response body");
    ResponseOutparam::set(out, Ok(resp));
    {
        let stream = body.write().expect("body stream");
        let _ = stream.blocking_write_and_flush(text.as_bytes());
    }
    let _ = OutgoingBody::finish(body, None);
}

fn trap_after(out: ResponseOutparam, bytes: usize) {
    let resp = OutgoingResponse::new(Fields::new());
    let body = resp.body().expect("response body");
    ResponseOutparam::set(out, Ok(resp));
    let stream = body.write().expect("body stream");
    for chunk in vec![b'x'; bytes].chunks(4096) {
        let _ = stream.blocking_write_and_flush(chunk);
    }
    panic!("stream-proxy: asked to trap after {bytes} bytes");
}

fn drip(out: ResponseOutparam, ms: u64) {
    let resp = OutgoingResponse::new(Fields::new());
    let body = resp.body().expect("response body");
    ResponseOutparam::set(out, Ok(resp));
    let stream = body.write().expect("body stream");
    for _ in 0..1000 {
        if stream.blocking_write_and_flush(b"tick\n").is_err() {
            break;
        }
        wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
    }
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

/// The gRPC status fields of a trailers-only answer, which come in its
/// head. `wasi:http` has no trailers-only response (a head, then a body
/// that may end at once or not), so they go on as trailers: a gRPC client
/// reads a status only from the end of the stream once a head has come
/// without it.
const GRPC_STATUS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// The upstream's trailers, once its body has been read to the end; else
/// the status a trailers-only answer had in `head`.
fn trailers(body: IncomingBody, head: &Fields) -> Option<Fields> {
    let future = IncomingBody::finish(body);
    future.subscribe().block();
    if let Some(Ok(Ok(Some(fields)))) = future.get() {
        return Some(fields.clone());
    }
    let status = Fields::new();
    for name in GRPC_STATUS {
        for value in head.get(name) {
            let _ = status.append(name, &value);
        }
    }
    (!status.entries().is_empty()).then_some(status)
}

impl Guest for Proxy {
    fn handle(req: IncomingRequest, out: ResponseOutparam) {
        let headers = req.headers();
        if let Some(ms) = header(&headers, "x-drip-ms").and_then(|v| v.parse::<u64>().ok()) {
            return drip(out, ms);
        }
        if let Some(n) = header(&headers, "x-trap-after").and_then(|v| v.parse::<usize>().ok()) {
            return trap_after(out, n);
        }
        let Some(upstream) = header(&headers, "x-upstream") else {
            return answer(out, 400, "x-upstream missing\n");
        };
        let path = header(&headers, "x-upstream-path")
            .or_else(|| req.path_with_query())
            .unwrap_or_else(|| "/".into());
        let outgoing = OutgoingRequest::new(forwarded(&headers));
        drop(headers);
        let _ = outgoing.set_method(&req.method());
        let _ = outgoing.set_scheme(Some(&Scheme::Http));
        let _ = outgoing.set_authority(Some(&upstream));
        let _ = outgoing.set_path_with_query(Some(&path));
        let up_body = outgoing.body().expect("request body");
        let future = match outgoing_handler::handle(outgoing, None) {
            Ok(f) => f,
            Err(e) => return answer(out, 502, &format!("outbound refused: {e:?}\n")),
        };
        let in_body = req.consume().expect("request body");
        let mut up = Pipe::new(
            in_body.stream().expect("request stream"),
            up_body.write().expect("outbound stream"),
        );
        let mut up_body = Some(up_body);
        // Moves the request body up while it can; finishes it at its end.
        let mut pump_up = |up: &mut Pipe| {
            while up.step() {}
            if up.done
                && let Some(body) = up_body.take()
            {
                up.close();
                let _ = OutgoingBody::finish(body, None);
            }
        };

        // The response head first, before a byte of the request body; but
        // a gRPC server answers only once it has read a message, so gRPC
        // bodies go up while the head is awaited.
        let early = header(&req.headers(), "content-type")
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let upstream_resp = loop {
            match future.get() {
                Some(Ok(Ok(resp))) => break resp,
                Some(Ok(Err(e))) => return answer(out, 502, &format!("upstream: {e:?}\n")),
                Some(Err(())) => return answer(out, 502, "response taken twice\n"),
                None if early => {
                    pump_up(&mut up);
                    let waits: Vec<Pollable> = [Some(future.subscribe()), up.pollable()]
                        .into_iter()
                        .flatten()
                        .collect();
                    poll(&waits.iter().collect::<Vec<_>>());
                }
                None => future.subscribe().block(),
            }
        };
        let head = upstream_resp.headers();
        let down_head = forwarded(&head);
        for name in GRPC_STATUS {
            let _ = down_head.delete(name);
        }
        let resp = OutgoingResponse::new(down_head);
        let _ = resp.set_status_code(upstream_resp.status());
        let down_body = resp.body().expect("response body");
        ResponseOutparam::set(out, Ok(resp));

        let up_resp_body = upstream_resp.consume().expect("upstream body");
        let mut down = Pipe::new(
            up_resp_body.stream().expect("upstream stream"),
            down_body.write().expect("response stream"),
        );
        while !down.done {
            while down.step() {}
            pump_up(&mut up);
            let waits: Vec<Pollable> = [up.pollable(), down.pollable()]
                .into_iter()
                .flatten()
                .collect();
            if waits.is_empty() {
                break;
            }
            poll(&waits.iter().collect::<Vec<_>>());
        }
        up.close();
        down.close();
        drop(up_body);
        let _ = OutgoingBody::finish(down_body, trailers(up_resp_body, &head));
    }
}

wasi::http::proxy::export!(Proxy);
