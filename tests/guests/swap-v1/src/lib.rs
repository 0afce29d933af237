//! Version 1 of a module, for hot-swap tests. `?ms=N` answers after N
//! milliseconds, to keep requests in flight across a swap.

fn handle(req: berth_sdk::Request) -> berth_sdk::Response {
    if let Some(ms) = req.query_param("ms").and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    berth_sdk::Response::text("v1\n")
}

berth_sdk::handler!(handle);
