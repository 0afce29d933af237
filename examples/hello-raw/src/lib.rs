//! The `hello` example written without the Berth SDK, on raw `wasi:http`
//! bindings (the `wasi` crate) and wit-bindgen for `wasi:config` and
//! `wasi:logging`. It behaves like `hello`; compare the two.

use std::io::{Read, Write};

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

mod caps {
    wit_bindgen::generate!({
        path: "../../guest-sdk/wit",
        world: "berth:sdk/capabilities",
        generate_all,
    });
}
use caps::wasi::config::store;
use caps::wasi::logging::logging::{Level, log};

struct Hello;

impl Guest for Hello {
    fn handle(req: IncomingRequest, out: ResponseOutparam) {
        // Drain the request body, as a well-behaved handler does.
        if let Ok(body) = req.consume()
            && let Ok(mut stream) = body.stream()
        {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        }
        let greeting = match store::get("greeting") {
            Ok(Some(g)) => g,
            _ => "Hello".to_string(),
        };
        let name = req
            .path_with_query()
            .and_then(|pq| {
                let (_, query) = pq.split_once('?')?;
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("name=").map(|v| v.replace('+', " ")))
            })
            .unwrap_or_else(|| "world".to_string());
        log(Level::Info, "hello_raw", &format!("greeting {name}"));
        let body_text = format!(
            "{{\"message\":\"{}, {}!\"}}",
            greeting.replace('"', "\\\""),
            name.replace('"', "\\\"")
        );

        let headers = Fields::new();
        let _ = headers.append("content-type", b"application/json");
        let resp = OutgoingResponse::new(headers);
        let _ = resp.set_status_code(200);
        let body = resp.body().expect("response body");
        ResponseOutparam::set(out, Ok(resp));
        {
            let mut stream = body.write().expect("body stream");
            let _ = stream.write_all(body_text.as_bytes());
            let _ = std::io::Write::flush(&mut stream);
        }
        let _ = OutgoingBody::finish(body, None);
    }
}

wasi::http::proxy::export!(Hello);
