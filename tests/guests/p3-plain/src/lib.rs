//! Conformance fixture: standard `wasi:http@0.3` only (no Berth imports),
//! so the same component runs under `wasmtime serve` and Berth and their
//! answers can be compared. Routes: streaming bodies both ways, trailers,
//! forbidden headers, outbound GET and POST, outbound timeouts, and a
//! middleware that forwards the whole request.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use wasip3::http::types::{self, ErrorCode, Fields, RequestOptions};
use wasip3::http_compat::{
    IncomingRequestBody, RequestOptionsExtension, http_from_wasi_request, http_from_wasi_response,
    http_into_wasi_request, http_into_wasi_response,
};

type Body = UnsyncBoxBody<Bytes, ErrorCode>;

struct Plain;

wasip3::http::service::export!(Plain);

impl wasip3::exports::http::handler::Guest for Plain {
    async fn handle(request: types::Request) -> Result<types::Response, ErrorCode> {
        let request = http_from_wasi_request(request)?;
        match request.uri().path() {
            "/fetch" | "/proxy" => forward(request).await,
            _ => http_into_wasi_response(serve(request).await),
        }
    }
}

fn text(code: u16, body: impl Into<Bytes>) -> http::Response<Body> {
    let mut resp = http::Response::new(
        Full::new(body.into())
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    resp
}

async fn serve(req: http::Request<IncomingRequestBody>) -> http::Response<Body> {
    match req.uri().path() {
        "/hello" => text(200, "hello\n"),
        "/echo" => {
            // Streams the body back, trailers included, as it arrives.
            let mut resp = http::Response::new(
                req.into_body()
                    .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))
                    .boxed_unsync(),
            );
            resp.headers_mut()
                .insert("x-echo", HeaderValue::from_static("1"));
            resp
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
            let frames: Vec<Result<Frame<Bytes>, ErrorCode>> = vec![
                Ok(Frame::data(Bytes::from_static(b"body with trailers\n"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut resp = http::Response::new(
                StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
            );
            // HTTP/1.1 servers send only the trailer fields declared up front.
            resp.headers_mut()
                .insert("trailer", HeaderValue::from_static("x-checksum"));
            resp
        }
        "/forbidden" => {
            // Each name a guest must not set: the host refuses every one.
            let names = [
                "connection",
                "keep-alive",
                "proxy-connection",
                "transfer-encoding",
                "upgrade",
            ];
            let mut out = String::new();
            for name in names {
                let verdict = match Fields::from_list(&[(name.to_owned(), b"x".to_vec())]) {
                    Ok(_) => "accepted",
                    Err(_) => "refused",
                };
                out.push_str(&format!("{name}: {verdict}\n"));
            }
            text(200, out)
        }
        _ => text(404, "not found\n"),
    }
}

/// `/fetch`: the request's method and body to `x-url`, answering with
/// the upstream's status and body. `/proxy`: the whole request (method,
/// headers, body) to `x-upstream` plus its path, answered as is. Both
/// honour `x-timeout-ms` as the first-byte timeout.
async fn forward(req: http::Request<IncomingRequestBody>) -> Result<types::Response, ErrorCode> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let proxy = req.uri().path() == "/proxy";
    let target = if proxy {
        header("x-upstream").map(|u| format!("{u}/forwarded"))
    } else {
        header("x-url")
    };
    let Some(target) = target else {
        return http_into_wasi_response(text(400, "no target\n"));
    };
    let timeout = header("x-timeout-ms").and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    let mut out = http::Request::builder()
        .method(parts.method.clone())
        .uri(&target);
    if proxy {
        for (name, value) in &parts.headers {
            if !name.as_str().starts_with("x-") && name != "host" {
                out = out.header(name, value);
            }
        }
    }
    let body = if parts.method == Method::GET {
        Full::new(Bytes::new())
            .map_err(|n| match n {})
            .boxed_unsync()
    } else {
        body.map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))
            .boxed_unsync()
    };
    let mut out = out
        .body(body)
        .map_err(|e| ErrorCode::InternalError(Some(e.to_string())))?;
    if let Some(ms) = timeout {
        let options = RequestOptions::new();
        let _ = options.set_first_byte_timeout(Some(Duration::from_millis(ms).as_nanos() as u64));
        out.extensions_mut()
            .insert(RequestOptionsExtension(options));
    }
    let sent = wasip3::http::client::send(http_into_wasi_request(out)?).await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(code) => {
            return http_into_wasi_response(text(502, format!("outbound error: {code:?}\n")));
        }
    };
    if proxy {
        return Ok(resp);
    }
    let resp = http_from_wasi_response(resp)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?
        .to_bytes();
    http_into_wasi_response(text(
        200,
        format!("upstream {status}, {} bytes\n", body.len()),
    ))
}
