//! `hello` on the bare proxy world, for side-by-side benchmarks.

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl Guest for Hello {
    fn handle(_req: IncomingRequest, out: ResponseOutparam) {
        let headers = Fields::new();
        let _ = headers.append("content-type", b"text/plain");
        let resp = OutgoingResponse::new(headers);
        let body = resp.body().expect("response body");
        ResponseOutparam::set(out, Ok(resp));
        {
            let stream = body.write().expect("body stream");
            let _ = stream.blocking_write_and_flush(b"hello\n");
        }
        let _ = OutgoingBody::finish(body, None);
    }
}

wasi::http::proxy::export!(Hello);
