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
    // On your machine the SDK talks to `berth_sdk::testing`, an in-memory
    // host: set config and upstream answers, read logs and metrics.
    use super::*;
    use berth_sdk::{Level, testing};

    #[test]
    fn greets_with_the_configured_greeting_logs_and_counts() {
        testing::set_config("greeting", "Hi");
        let answer = handle(Request::new("GET", "{{route}}?name=Ada"));
        assert_eq!(answer.status(), 200);
        let body: serde_json::Value = answer.json_body().unwrap();
        assert_eq!(body, json!({ "message": "Hi, Ada!" }));
        assert_eq!(testing::logs(), [(Level::Info, "greeted Ada".to_owned())]);
        assert_eq!(testing::counter("greetings"), 1);
    }

    #[test]
    fn passes_on_what_the_upstream_answered() {
        testing::set_config("upstream_url", "https://example.com/");
        testing::on_outbound(|sent| Ok(Response::text(format!("you asked for {}", sent.url))));
        let answer = handle(Request::new("GET", "{{route}}/upstream"));
        let body: serde_json::Value = answer.json_body().unwrap();
        assert_eq!(
            body,
            json!({ "status": 200, "body": "you asked for https://example.com/" })
        );
    }

    #[test]
    fn without_an_upstream_url_says_so() {
        let answer = handle(Request::new("GET", "{{route}}/upstream"));
        assert_eq!(answer.status(), 503);
    }
}
