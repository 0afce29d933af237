//! Fan-out (WASI 0.3): calls every upstream in `config.upstreams` at once
//! and streams one line per answer as soon as it lands, so the client sees
//! the fast ones without waiting for the slowest. A 0.2 handler would have
//! to call them one after another and answer at the end.

use berth_sdk::p3::{Body, Request, Response, channel, collect, full, send, spawn};
use futures_util::stream::{FuturesUnordered, StreamExt};

async fn fetch(url: String) -> String {
    let started = berth_sdk::p3::wasip3::clocks::monotonic_clock::now();
    let request = berth_sdk::p3::http::Request::get(&url).body(full(""));
    let answer = match request {
        Err(e) => format!("bad url: {e}"),
        Ok(request) => match send(request).await {
            Err(code) => format!("failed: {code:?}"),
            Ok(resp) => {
                let status = resp.status().as_u16();
                match collect(resp.into_body()).await {
                    Ok(body) => format!("{status}, {} bytes", body.len()),
                    Err(code) => format!("{status}, body failed: {code:?}"),
                }
            }
        },
    };
    let ms = (berth_sdk::p3::wasip3::clocks::monotonic_clock::now() - started) / 1_000_000;
    format!("{url}: {answer} in {ms} ms\n")
}

async fn handle(_req: Request) -> Response<Body> {
    let upstreams = berth_sdk::config::get_or("upstreams", "");
    let urls: Vec<String> = upstreams
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    berth_sdk::info!("fanning out to {} upstreams", urls.len());
    let (mut tx, body) = channel();
    spawn(async move {
        let mut calls: FuturesUnordered<_> = urls.into_iter().map(fetch).collect();
        while let Some(line) = calls.next().await {
            if !tx.send(line).await {
                break;
            }
        }
    });
    Response::new(body)
}

berth_sdk::p3::service!(handle);
