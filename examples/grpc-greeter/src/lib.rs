//! A gRPC service on Berth: `greeter.Greeter` (`proto/greeter.proto`), one
//! method of each kind of RPC. The messages are prost types written out by
//! hand, so the build needs no `protoc`; with many messages, generate them
//! with `prost-build` instead.

use std::time::Duration;

use berth_sdk::grpc::{Code, Context, Router, Sink, Status, Streaming};
use berth_sdk::{config, info, metrics};

/// The messages of `proto/greeter.proto`.
mod messages;
pub use messages::*;

static GREETINGS: metrics::Counter = metrics::Counter::new("greetings");

fn greet(name: &str) -> Result<HelloReply, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name is empty"));
    }
    GREETINGS.inc();
    let greeting = config::get_or("greeting", "Hello");
    Ok(HelloReply {
        message: format!("{greeting}, {name}!"),
    })
}

fn say_hello(req: HelloRequest, _cx: &Context) -> Result<HelloReply, Status> {
    greet(&req.name)
}

fn count(req: CountRequest, cx: &Context, out: &mut Sink<'_, CountReply>) -> Result<(), Status> {
    if req.to > 1000 {
        return Err(Status::invalid_argument("count to 1000 at most"));
    }
    info!("counting to {} (deadline {:?})", req.to, cx.timeout());
    for n in 1..=req.to {
        if n > 1 && req.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(req.interval_ms.into()));
        }
        out.send(&CountReply { n })?;
    }
    Ok(())
}

fn sum(numbers: Streaming<Number>, _cx: &Context) -> Result<Total, Status> {
    let mut total = Total { sum: 0, count: 0 };
    for number in numbers {
        total.sum = total
            .sum
            .checked_add(number?.value)
            .ok_or_else(|| Status::new(Code::OutOfRange, "the sum overflows an int64"))?;
        total.count += 1;
    }
    Ok(total)
}

fn chat(
    names: Streaming<HelloRequest>,
    _cx: &Context,
    out: &mut Sink<'_, HelloReply>,
) -> Result<(), Status> {
    for req in names {
        out.send(&greet(&req?.name)?)?;
    }
    Ok(())
}

fn router() -> Router {
    // A greeting needs no 4 MiB message; a larger one is refused from its
    // length prefix, before any of it is read.
    Router::new()
        .max_message_size(64 << 10)
        .unary("/greeter.Greeter/SayHello", say_hello)
        .server_streaming("/greeter.Greeter/Count", count)
        .client_streaming("/greeter.Greeter/Sum", sum)
        .bidi_streaming("/greeter.Greeter/Chat", chat)
}

berth_sdk::grpc_service!(router);
