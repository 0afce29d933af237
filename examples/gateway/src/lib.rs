//! A module that calls another service through the host: it forwards
//! `GET /gateway/<path>` to `<upstream><path>` and wraps the answer.
//! The host enforces the allow-list, timeouts and retries; the module only
//! says where to go.

use berth_sdk::{Request, Response, config, http, info};
use serde_json::json;

fn handle(req: Request) -> Result<Response, berth_sdk::Error> {
    let Some(upstream) = config::get("upstream") else {
        return Ok(Response::error(500, "config key `upstream` is not set"));
    };
    let rest = req.path().strip_prefix("/gateway").unwrap_or("");
    let query = req.query().map(|q| format!("?{q}")).unwrap_or_default();
    let url = format!("{}{rest}{query}", upstream.trim_end_matches('/'));
    info!("forwarding to {url}");
    let answer = match http::get(&url) {
        Ok(answer) => answer,
        Err(e @ berth_sdk::Error::Denied { .. }) => {
            return Ok(Response::error(403, &e.to_string()));
        }
        Err(e) => return Ok(Response::error(502, &e.to_string())),
    };
    Ok(Response::json(&json!({
        "upstream": url,
        "status": answer.status(),
        "body": answer.text_body(),
    })))
}

berth_sdk::handler!(handle);
