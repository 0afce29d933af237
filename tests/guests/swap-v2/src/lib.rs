//! Version 2 of a module, for hot-swap and canary tests. `?ms=N` answers
//! after N milliseconds, to keep requests in flight across a swap. Its
//! `wasi:config` can make it a bad release: `fail_percent` answers that
//! share of requests with 500, `delay_ms` delays every answer.

use std::hash::{BuildHasher, RandomState};

fn handle(req: berth_sdk::Request) -> berth_sdk::Response {
    let setting = |key: &str| {
        berth_sdk::config::get(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ms = req
        .query_param("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        + setting("delay_ms");
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    // A fresh instance per request: a fresh random seed (wasi:random) per
    // request, so failures are spread at random over the requests.
    if RandomState::new().hash_one(0u8) % 100 < setting("fail_percent") {
        return berth_sdk::Response::error(500, "v2 failed on purpose");
    }
    berth_sdk::Response::text("v2\n")
}

berth_sdk::handler!(handle);
