//! A module that misbehaves on request, for the host's isolation and limit
//! tests. `GET /<route>/<what>` picks the behaviour.

use berth_sdk::{Request, Response, config, http, info, metrics};

fn handle(req: Request) -> Response {
    let what = req.segments().get(1).copied().unwrap_or("ok").to_owned();
    let n = |key: &str, default: u64| {
        req.query_param(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    match what.as_str() {
        "ok" => Response::text("ok\n"),
        "panic" => panic!("misbehave: asked to panic"),
        "loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "alloc" => {
            let mb = n("mb", 256) as usize;
            let mut v: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mb {
                v.push(vec![1u8; 1 << 20]);
            }
            Response::text(format!("allocated {}\n", v.len()))
        }
        "stack" => Response::text(format!("{}\n", recurse(std::hint::black_box(1)))),
        "big" => Response::new(200).with_body(vec![b'x'; (n("mb", 1) << 20) as usize]),
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_millis(n("ms", 1000)));
            Response::text("slept\n")
        }
        "state" => {
            // What a previous request left behind must be gone: globals back
            // to their initial values, and memory grown by an earlier
            // instance zeroed (the allocator trusts fresh pages to be zero).
            use std::sync::atomic::{AtomicU64, Ordering};
            static CALLS: AtomicU64 = AtomicU64::new(41);
            let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
            let mut fresh = vec![0u8; (n("mb", 4) << 20) as usize];
            let dirty = fresh.iter().filter(|b| **b != 0).count();
            fresh.fill(0xAA);
            std::hint::black_box(&fresh);
            Response::json(&serde_json::json!({ "calls": calls, "dirty_bytes": dirty }))
        }
        "echo" => Response::json(&serde_json::json!({ "bytes": req.body().len() })),
        "metrics" => {
            // `n` distinct label values of one counter, to test the cap.
            static HITS: metrics::Counter = metrics::Counter::new("hits");
            static DEPTH: metrics::Gauge = metrics::Gauge::new("queue_depth");
            static TOOK: metrics::Histogram = metrics::Histogram::new("work_seconds");
            for i in 0..n("n", 1) {
                HITS.add_with(1, &[("shard", &i.to_string())]);
            }
            DEPTH.set(4.0);
            TOOK.observe(0.25);
            // Buckets of its own: item counts, not seconds.
            static ITEMS: metrics::Histogram =
                metrics::Histogram::with_buckets("order_items", &[1.0, 5.0, 25.0]);
            ITEMS.observe(3.0);
            static SIZES: metrics::Histogram =
                metrics::Histogram::with_buckets("order_bytes", &[100.0, 1000.0]);
            SIZES.observe_with(500.0, &[("kind", "book")]);
            Response::text("counted\n")
        }
        "metrics-0.1.0" => {
            metrics_010::berth::metrics::metrics::counter_add("old_hits", 1, &[]);
            Response::text("counted\n")
        }
        "spam" => {
            let line = "x".repeat(n("bytes", 100) as usize);
            for _ in 0..n("n", 100) {
                info!("{line}");
            }
            Response::text("spammed\n")
        }
        "print" => {
            println!("line one from stdout");
            eprintln!("line two from stderr");
            info!("a wasi:logging line");
            Response::text("printed\n")
        }
        "config" => match config::get_all() {
            Ok(all) => Response::json(
                &all.into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
            Err(e) => Response::error(500, &e.to_string()),
        },
        "fetch" => {
            let url = req.query_param("url").unwrap_or_default();
            match http::get(&url) {
                Ok(r) => Response::json(&serde_json::json!({
                    "status": r.status(), "body": r.text_body()
                })),
                Err(e @ berth_sdk::Error::Denied { .. }) => Response::error(403, &e.to_string()),
                Err(e) => Response::error(502, &e.to_string()),
            }
        }
        "grpc_call" => {
            // An outbound gRPC-shaped call (the host carries the request's
            // deadline onward), with the guest's own `grpc-timeout` if
            // `own` is given.
            let url = req.query_param("url").unwrap_or_default();
            let mut call = http::Client::post(&url).header("content-type", "application/grpc");
            if let Some(own) = req.query_param("own") {
                call = call.header("grpc-timeout", &own);
            }
            match call.body(vec![0, 0, 0, 0, 0]).send() {
                Ok(r) => Response::text(r.text_body()),
                Err(e) => Response::error(502, &e.to_string()),
            }
        }
        "fetch_within" => {
            // A call with the guest's own, shorter timeouts than the
            // host's: `ms` to the first byte and between bytes,
            // `connect_ms` to connect.
            let url = req.query_param("url").unwrap_or_default();
            let mut call = http::Client::get(&url);
            if req.query_param("ms").is_some() {
                call = call.timeout(std::time::Duration::from_millis(n("ms", 200)));
            }
            if req.query_param("connect_ms").is_some() {
                call = call.connect_timeout(std::time::Duration::from_millis(n("connect_ms", 200)));
            }
            match call.send() {
                Ok(r) => Response::json(&serde_json::json!({
                    "status": r.status(), "body": r.text_body()
                })),
                Err(e) => Response::error(504, &e.to_string()),
            }
        }
        "post" => {
            let url = req.query_param("url").unwrap_or_default();
            match http::Client::post(&url).body("payload").send() {
                Ok(r) => Response::json(&serde_json::json!({
                    "status": r.status(), "body": r.text_body()
                })),
                Err(e) => Response::error(502, &e.to_string()),
            }
        }
        "put" => {
            let url = req.query_param("url").unwrap_or_default();
            let body = vec![b'p'; n("bytes", 7) as usize];
            match http::Client::put(&url).body(body).send() {
                Ok(r) => Response::json(&serde_json::json!({
                    "status": r.status(), "body": r.text_body()
                })),
                Err(e) => Response::error(502, &e.to_string()),
            }
        }
        _ => Response::not_found(),
    }
}

fn recurse(depth: u64) -> u64 {
    let pad = std::hint::black_box([depth; 64]);
    if depth == u64::MAX {
        return pad[0];
    }
    recurse(depth + 1) + pad[3]
}

berth_sdk::handler!(handle);

/// `berth:metrics@0.1.0` as modules built before 0.1.1 import it: the host
/// (0.1.1) must still link and serve them.
mod metrics_010 {
    wit_bindgen::generate!({
        inline: "
            package berth:metrics@0.1.0;
            interface metrics {
                type label = tuple<string, string>;
                counter-add: func(name: string, value: u64, labels: list<label>);
            }
            world old { import metrics; }
        ",
        world: "berth:metrics/old",
    });
}
