//! {{name}}: a Berth module (WASI 0.3). Its handler is async: it can await
//! outbound calls and stream bodies, and one instance serves many requests
//! at once (so keep no per-request state in globals). `berth dev` rebuilds
//! and serves it on every change; `cargo test` runs the tests below.

use berth_sdk::metrics::Counter;
use berth_sdk::p3::{Body, Request, Response, collect, full, send};
use berth_sdk::{config, info};
use serde_json::json;

/// `berth_guest_{{snake}}_greetings_total` on the host's `/metrics`.
static GREETINGS: Counter = Counter::new("greetings");

/// Where `berth.toml` routes this module.
const ROUTE: &str = "{{route}}";

async fn handle(req: Request) -> Response<Body> {
    let path = req.uri().path();
    let rest = path.strip_prefix(ROUTE).unwrap_or(path);
    match rest.trim_matches('/') {
        "" => {
            let name = berth_sdk::query_param(req.uri().query().unwrap_or(""), "name")
                .unwrap_or_else(|| "world".into());
            answer(200, greet(&name))
        }
        "upstream" => upstream().await,
        _ => answer(404, json!({ "error": "not found" })),
    }
}

/// Calls `upstream_url`; the host allows only `allowed_outbound_hosts`.
async fn upstream() -> Response<Body> {
    let Some(url) = config::get("upstream_url") else {
        return answer(503, json!({ "error": "upstream_url is not set" }));
    };
    let request = match berth_sdk::p3::http::Request::get(&url).body(full("")) {
        Ok(request) => request,
        Err(e) => return answer(502, json!({ "error": format!("bad upstream_url: {e}") })),
    };
    match send(request).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match collect(resp.into_body()).await {
                Ok(body) => answer(
                    200,
                    json!({ "status": status, "body": String::from_utf8_lossy(&body) }),
                ),
                Err(code) => answer(502, json!({ "error": format!("{code:?}") })),
            }
        }
        Err(code) => answer(502, json!({ "error": format!("{code:?}") })),
    }
}

fn answer(status: u16, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status.try_into().unwrap_or_default();
    response.headers_mut().insert(
        "content-type",
        berth_sdk::p3::http::HeaderValue::from_static("application/json"),
    );
    response
}

fn greet(name: &str) -> serde_json::Value {
    info!("greeted {name}");
    GREETINGS.inc();
    let greeting = config::get_or("greeting", "Hello");
    json!({ "message": format!("{greeting}, {name}!") })
}

berth_sdk::p3::service!(handle);

#[cfg(test)]
mod tests {
    // On your machine the SDK talks to `berth_sdk::testing`, an in-memory
    // host: set config, read logs and metrics. (The async handler itself
    // needs the host's WASI 0.3 types: `berth dev` runs it.)
    use super::*;
    use berth_sdk::{Level, testing};

    #[test]
    fn greets_with_the_configured_greeting_logs_and_counts() {
        testing::set_config("greeting", "Hi");
        assert_eq!(greet("Ada"), json!({ "message": "Hi, Ada!" }));
        assert_eq!(testing::logs(), [(Level::Info, "greeted Ada".to_owned())]);
        assert_eq!(testing::counter("greetings"), 1);
    }
}
