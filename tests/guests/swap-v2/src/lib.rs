//! Version 2 of a module, for hot-swap tests.

fn handle(_req: berth_sdk::Request) -> berth_sdk::Response {
    berth_sdk::Response::text("v2\n")
}

berth_sdk::handler!(handle);
