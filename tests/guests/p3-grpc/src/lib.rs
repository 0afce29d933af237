//! The example's `greeter.Greeter` on WASI 0.3 with the SDK's async gRPC
//! router: the same four methods and statuses, with replies that say
//! "p3" so a test knows which module answered, and waits that are timers
//! (other calls on the instance run meanwhile).

use berth_sdk::grpc::p3::{Messages, Router, Sink};
use berth_sdk::grpc::{Code, Context, Status};

// The example's messages, the same file.
include!("../../../../examples/grpc-greeter/src/messages.rs");

fn greet(name: &str) -> Result<HelloReply, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name is empty"));
    }
    let greeting = berth_sdk::config::get_or("greeting", "Hello");
    Ok(HelloReply {
        message: format!("{greeting} from p3, {name}!"),
    })
}

async fn say_hello(req: HelloRequest, _cx: Context) -> Result<HelloReply, Status> {
    greet(&req.name)
}

async fn count(req: CountRequest, _cx: Context, mut out: Sink<CountReply>) -> Result<(), Status> {
    if req.to > 1000 {
        return Err(Status::invalid_argument("count to 1000 at most"));
    }
    for n in 1..=req.to {
        if n > 1 && req.interval_ms > 0 {
            let nanos = u64::from(req.interval_ms) * 1_000_000;
            berth_sdk::p3::wasip3::clocks::monotonic_clock::wait_for(nanos).await;
        }
        out.send(&CountReply { n }).await?;
    }
    Ok(())
}

async fn sum(mut numbers: Messages<Number>, _cx: Context) -> Result<Total, Status> {
    let mut total = Total { sum: 0, count: 0 };
    while let Some(number) = numbers.message().await {
        total.sum = total
            .sum
            .checked_add(number?.value)
            .ok_or_else(|| Status::new(Code::OutOfRange, "the sum overflows an int64"))?;
        total.count += 1;
    }
    Ok(total)
}

async fn chat(
    mut names: Messages<HelloRequest>,
    _cx: Context,
    mut out: Sink<HelloReply>,
) -> Result<(), Status> {
    while let Some(req) = names.message().await {
        out.send(&greet(&req?.name)?).await?;
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

berth_sdk::grpc_service_p3!(router);
