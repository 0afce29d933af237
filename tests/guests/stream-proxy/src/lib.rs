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
//! With `x-drip-ms: N` it proxies nothing: it answers 200, then writes
//! `tick` lines N ms apart. Between two lines it only sleeps, so it cannot
//! notice a client that hung up; only the host can end it.
//!
//! With `x-trap-after: N` it answers 200, writes N bytes and traps
//! without finishing the body.

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
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
        let path = header(&headers, "x-upstream-path").unwrap_or_else(|| "/".into());
        drop(headers);

        let outgoing = OutgoingRequest::new(Fields::new());
        let _ = outgoing.set_method(&Method::Post);
        let _ = outgoing.set_scheme(Some(&Scheme::Http));
        let _ = outgoing.set_authority(Some(&upstream));
        let _ = outgoing.set_path_with_query(Some(&path));
        let up_body = outgoing.body().expect("request body");
        let future = match outgoing_handler::handle(outgoing, None) {
            Ok(f) => f,
            Err(e) => return answer(out, 502, &format!("outbound refused: {e:?}\n")),
        };

        // The response head first, before a byte of the request body.
        let upstream_resp = loop {
            match future.get() {
                Some(Ok(Ok(resp))) => break resp,
                Some(Ok(Err(e))) => return answer(out, 502, &format!("upstream: {e:?}\n")),
                Some(Err(())) => return answer(out, 502, "response taken twice\n"),
                None => {
                    future.subscribe().block();
                }
            }
        };
        let resp = OutgoingResponse::new(Fields::new());
        let _ = resp.set_status_code(upstream_resp.status());
        let down_body = resp.body().expect("response body");
        ResponseOutparam::set(out, Ok(resp));

        let in_body = req.consume().expect("request body");
        let up_resp_body = upstream_resp.consume().expect("upstream body");
        let mut up = Pipe::new(
            in_body.stream().expect("request stream"),
            up_body.write().expect("outbound stream"),
        );
        let mut down = Pipe::new(
            up_resp_body.stream().expect("upstream stream"),
            down_body.write().expect("response stream"),
        );
        let mut up_body = Some(up_body);
        while !down.done {
            while up.step() | down.step() {}
            if up.done
                && let Some(body) = up_body.take()
            {
                up.close();
                let _ = OutgoingBody::finish(body, None);
            }
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
        let _ = OutgoingBody::finish(down_body, None);
    }
}

wasi::http::proxy::export!(Proxy);
