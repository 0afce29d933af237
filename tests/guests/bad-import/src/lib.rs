//! Imports `berth-test:missing/teleport`, which no host provides.

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{Fields, IncomingRequest, OutgoingResponse, ResponseOutparam};

mod bindings {
    wit_bindgen::generate!({ path: "wit", world: "needs-teleport" });
}

struct Handler;

impl Guest for Handler {
    fn handle(_req: IncomingRequest, out: ResponseOutparam) {
        let ok = bindings::berth_test::missing::teleport::beam("mars");
        let resp = OutgoingResponse::new(Fields::new());
        let _ = resp.set_status_code(if ok { 200 } else { 500 });
        ResponseOutparam::set(out, Ok(resp));
    }
}

wasi::http::proxy::export!(Handler);
