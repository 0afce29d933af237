//! Hello: reads its greeting from config, logs, answers JSON.

use berth_sdk::{Request, Response, config, info};
use serde_json::json;

fn handle(req: Request) -> Response {
    let greeting = config::get_or("greeting", "Hello");
    let name = req.query_param("name").unwrap_or_else(|| "world".into());
    info!("greeting {name}");
    Response::json(&json!({ "message": format!("{greeting}, {name}!") }))
}

berth_sdk::handler!(handle);
