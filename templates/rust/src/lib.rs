//! {{name}}: a Berth module (WASI 0.2). `berth dev` rebuilds and serves it
//! on every change; `cargo test` runs the tests below on your machine.

use berth_sdk::metrics::Counter;
use berth_sdk::{Request, Response, config, http, info};
use serde_json::json;

/// `berth_guest_{{snake}}_greetings_total` on the host's `/metrics`.
static GREETINGS: Counter = Counter::new("greetings");

/// Where `berth.toml` routes this module.
const ROUTE: &str = "{{route}}";

fn handle(req: Request) -> Response {
    let rest = req.path().strip_prefix(ROUTE).unwrap_or(req.path());
    match rest.trim_matches('/') {
        "" => {
            let name = req.query_param("name").unwrap_or_else(|| "world".into());
            info!("greeted {name}");
            GREETINGS.inc();
            Response::json(&greet(&config::get_or("greeting", "Hello"), &name))
        }
        "upstream" => upstream(),
        _ => Response::json(&json!({ "error": "not found" })).with_status(404),
    }
}

/// Calls `upstream_url`; the host allows only `allowed_outbound_hosts`.
fn upstream() -> Response {
    let Some(url) = config::get("upstream_url") else {
        return Response::json(&json!({ "error": "upstream_url is not set" })).with_status(503);
    };
    match http::get(&url) {
        Ok(answer) => Response::json(&json!({
            "status": answer.status(),
            "body": answer.text_body(),
        })),
        Err(e) => Response::json(&json!({ "error": e.to_string() })).with_status(502),
    }
}

fn greet(greeting: &str, name: &str) -> serde_json::Value {
    json!({ "message": format!("{greeting}, {name}!") })
}

berth_sdk::handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets_by_name_with_the_configured_greeting() {
        assert_eq!(greet("Hi", "Ada"), json!({ "message": "Hi, Ada!" }));
    }
}
