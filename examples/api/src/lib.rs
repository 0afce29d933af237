//! A small JSON API with routing inside the module: a read-only product
//! catalogue and an order-quote endpoint that validates its input.

use berth_sdk::{Request, Response, config, info, warn};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Clone, Copy)]
struct Product {
    id: u32,
    name: &'static str,
    price_cents: u64,
}

const CATALOGUE: &[Product] = &[
    Product {
        id: 1,
        name: "anchor",
        price_cents: 12_900,
    },
    Product {
        id: 2,
        name: "buoy",
        price_cents: 2_450,
    },
    Product {
        id: 3,
        name: "hawser",
        price_cents: 8_000,
    },
];

#[derive(Deserialize)]
struct QuoteRequest {
    product_id: u32,
    quantity: u32,
}

#[derive(Serialize)]
struct Quote {
    product: Product,
    quantity: u32,
    currency: String,
    total_cents: u64,
}

fn handle(req: Request) -> Response {
    // Routed here under `/api`; everything after it is ours.
    let segments = req.segments();
    match (req.method(), &segments[1..]) {
        ("GET", ["products"]) => Response::json(CATALOGUE),
        ("GET", ["products", id]) => match id.parse::<u32>().ok().and_then(find) {
            Some(p) => Response::json(&p),
            None => Response::error(404, &format!("no product `{id}`")),
        },
        ("POST", ["quotes"]) => quote(&req),
        (_, ["products"] | ["products", _] | ["quotes"]) => {
            Response::error(405, "method not allowed").with_header("allow", "GET, POST")
        }
        _ => Response::not_found(),
    }
}

fn find(id: u32) -> Option<Product> {
    CATALOGUE.iter().copied().find(|p| p.id == id)
}

fn quote(req: &Request) -> Response {
    let ask: QuoteRequest = match req.json() {
        Ok(q) => q,
        Err(e) => {
            warn!("rejected quote: {e}");
            return Response::error(400, &e.to_string());
        }
    };
    let Some(product) = find(ask.product_id) else {
        return Response::error(422, &format!("no product `{}`", ask.product_id));
    };
    if ask.quantity == 0 {
        return Response::error(422, "quantity must be at least 1");
    }
    let quote = Quote {
        product,
        quantity: ask.quantity,
        currency: config::get_or("currency", "EUR"),
        total_cents: product.price_cents * u64::from(ask.quantity),
    };
    info!("quoted {} x {}", quote.quantity, product.name);
    Response::json(&quote).with_status(201)
}

berth_sdk::handler!(handle);
