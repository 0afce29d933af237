//! A WASI 0.3 fixture that exercises every host feature: config, logging,
//! metrics, per-instance state, streaming, outbound calls (one, or two at
//! once), and each way a guest can fail.

use std::sync::atomic::{AtomicU64, Ordering};

use berth_sdk::metrics::Counter;
use berth_sdk::p3::http::{Method, StatusCode};
use berth_sdk::p3::http_body_util::BodyExt;
use berth_sdk::p3::{Body, ErrorCode, Request, Response, channel, collect, full, send, spawn};

/// Lives as long as the instance: shows whether requests share one.
static SERVED: AtomicU64 = AtomicU64::new(0);
static HITS: Counter = Counter::new("p3_hits");

fn status(code: u16, text: impl Into<String>) -> Response<Body> {
    let mut resp = Response::new(full(text.into()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn sleep_ms(ms: u64) {
    berth_sdk::p3::wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
}

/// The guest's own timeouts for a call, in ms: to connect, and to the
/// first byte and between bytes.
#[derive(Default, Clone, Copy)]
struct Within {
    connect: Option<u64>,
    bytes: Option<u64>,
}

/// An outbound call to `url`: GET, or POST with `body`, with the guest's
/// own timeouts where `within` sets them.
async fn call(
    url: &str,
    body: Option<Vec<u8>>,
    within: Within,
) -> Result<(u16, String), ErrorCode> {
    use berth_sdk::p3::wasip3::http::types::RequestOptions;
    use berth_sdk::p3::wasip3::http_compat::RequestOptionsExtension;
    let mut builder = berth_sdk::p3::http::Request::builder().uri(url);
    if within.connect.is_some() || within.bytes.is_some() {
        let options = RequestOptions::new();
        let ns = |ms: Option<u64>| ms.map(|ms| ms * 1_000_000);
        let _ = options.set_connect_timeout(ns(within.connect));
        let _ = options.set_first_byte_timeout(ns(within.bytes));
        let _ = options.set_between_bytes_timeout(ns(within.bytes));
        builder = builder.extension(RequestOptionsExtension(options));
    }
    let req = match body {
        Some(b) => builder.method(Method::POST).body(full(b)),
        None => builder.method(Method::GET).body(full("")),
    }
    .map_err(|e| ErrorCode::InternalError(Some(e.to_string())))?;
    let resp = send(req).await?;
    let code = resp.status().as_u16();
    let body = collect(resp.into_body()).await?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

async fn handle(req: Request) -> Response<Body> {
    let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
    // The route prefix (the first segment) is the host's business.
    let full = req.uri().path();
    let path = full[1..]
        .find('/')
        .map_or("", |i| &full[i + 1..])
        .to_owned();
    match path.as_str() {
        "" | "/" => {
            let greeting = berth_sdk::config::get_or("greeting", "hello");
            status(200, format!("{greeting} from p3\n"))
        }
        "/count" => status(200, format!("{served}\n")),
        "/header" => {
            // The value of the request header named by `x-name`.
            let name = header(&req, "x-name").unwrap_or_default();
            match header(&req, &name) {
                Some(value) => status(200, format!("{value}\n")),
                None => status(404, format!("no {name}\n")),
            }
        }
        "/secret" => {
            // Read through wasi:config like any value; only its size goes
            // out, so a leak in the host's logs is the host's.
            match berth_sdk::config::get("token") {
                Some(token) => status(200, format!("token of {} bytes\n", token.len())),
                None => status(404, "no token\n"),
            }
        }
        "/log" => {
            berth_sdk::info!("p3 guest log line");
            status(200, "logged\n")
        }
        "/metric" => {
            HITS.inc();
            status(200, "counted\n")
        }
        "/sleep" => {
            let ms = header(&req, "x-sleep-ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            sleep_ms(ms).await;
            status(200, format!("slept {ms} as request {served}\n"))
        }
        "/spin" => {
            let mut x: u64 = 1;
            loop {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        "/trap" => panic!("p3 guest asked to trap"),
        "/grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "/echo" => {
            // Streams the request body back as it arrives.
            let (mut tx, body) = channel();
            let mut incoming = req.into_body();
            spawn(async move {
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(data) = frame.into_data()
                        && !tx.send(data).await
                    {
                        break;
                    }
                }
            });
            Response::new(body)
        }
        "/drip" => {
            // Lines written over time, after the head is out.
            let (mut tx, body) = channel();
            let n = header(&req, "x-lines")
                .and_then(|v| v.parse().ok())
                .unwrap_or(3u32);
            spawn(async move {
                for i in 0..n {
                    if !tx.send(format!("tick {i}\n")).await {
                        break;
                    }
                    sleep_ms(20).await;
                }
            });
            Response::new(body)
        }
        "/fetch" => {
            let Some(url) = header(&req, "x-url") else {
                return status(400, "x-url missing\n");
            };
            // A wait first, so that other requests start on this instance
            // before the call: whose context does it carry?
            if let Some(ms) = header(&req, "x-sleep-ms").and_then(|v| v.parse().ok()) {
                sleep_ms(ms).await;
            }
            berth_sdk::info!("fetching {url}");
            println!("stdout: fetching {url}");
            let within = Within {
                connect: header(&req, "x-connect-within-ms").and_then(|v| v.parse().ok()),
                bytes: header(&req, "x-within-ms").and_then(|v| v.parse().ok()),
            };
            let body = if req.method() == Method::POST {
                match collect(req.into_body()).await {
                    Ok(b) => Some(b.to_vec()),
                    Err(e) => return status(400, format!("{e:?}\n")),
                }
            } else {
                None
            };
            match call(&url, body, within).await {
                Ok((code, text)) => status(200, format!("{code} {text}")),
                Err(e) => status(502, format!("outbound failed: {e:?}\n")),
            }
        }
        "/fanout" => {
            // Two upstreams at once; each answer streams out as it lands.
            let (a, b) = (header(&req, "x-url-a"), header(&req, "x-url-b"));
            let (Some(a), Some(b)) = (a, b) else {
                return status(400, "x-url-a and x-url-b needed\n");
            };
            let (mut tx, body) = channel();
            spawn(async move {
                let line = |r: Result<(u16, String), ErrorCode>| match r {
                    Ok((code, text)) => format!("{code} {}\n", text.trim()),
                    Err(e) => format!("error {e:?}\n"),
                };
                // Whichever lands first is written first, while the other
                // is still on its way.
                let (fa, fb) = (
                    Box::pin(call(&a, None, Within::default())),
                    Box::pin(call(&b, None, Within::default())),
                );
                let (first, rest) = match futures_util::future::select(fa, fb).await {
                    futures_util::future::Either::Left((r, other)) => (r, other),
                    futures_util::future::Either::Right((r, other)) => (r, other),
                };
                tx.send(line(first)).await;
                tx.send(line(rest.await)).await;
            });
            Response::new(body)
        }
        _ => status(404, "no such fixture route\n"),
    }
}

berth_sdk::p3::service!(handle);
