//! Owned request and response types, and their conversion to and from the
//! `wasi:http` resources.

use std::io::{Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, InputStream, Method, OutgoingBody, OutgoingResponse,
    ResponseOutparam,
};

use crate::Error;

/// An incoming HTTP request, with its body read.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    pub(crate) fn from_incoming(req: IncomingRequest) -> Result<Self, Error> {
        let method = method_name(&req.method()).to_owned();
        let path_with_query = req.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = match path_with_query.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (path_with_query, None),
        };
        let headers = header_list(&req.headers());
        let body = match req.consume() {
            Ok(body) => read_body(body)?,
            Err(()) => Vec::new(),
        };
        Ok(Request {
            method,
            path,
            query,
            headers,
            body,
        })
    }

    /// A request built by hand, e.g. for unit tests of a handler.
    pub fn new(method: &str, path_and_query: &str) -> Self {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (path_and_query.to_owned(), None),
        };
        Request {
            method: method.to_ascii_uppercase(),
            path,
            query,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Sets the body (builder style).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The method in upper case: `GET`, `POST`, ...
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path, without the query string. It is the full path the client
    /// asked for, route prefix included.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The non-empty segments of the path: `/api/items/7` gives
    /// `["api", "items", "7"]`.
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }

    /// The raw query string, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The first query parameter called `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(self.query.as_deref()?, name)
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers, names in lower case.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// An HTTP response: what a handler returns, and what an outbound call
/// ([`crate::http`]) gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// An empty response with this status.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// 200 with a `text/plain` body.
    pub fn text(body: impl Into<String>) -> Self {
        Response::new(200)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into())
    }

    /// 200 with a JSON body.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(200)
                .with_header("content-type", "application/json")
                .with_body(body),
            Err(e) => Response::error(500, &format!("cannot serialize response: {e}")),
        }
    }

    /// An error with a small JSON body: `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        Response::json(&serde_json::json!({ "error": message })).with_status(status)
    }

    /// 404 with a JSON body.
    pub fn not_found() -> Self {
        Response::error(404, "not found")
    }

    /// Sets the status (builder style).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Sets the body (builder style).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8 text (lossy).
    pub fn text_body(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json_body<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    pub(crate) fn from_parts(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Self {
        Response {
            status,
            headers,
            body,
        }
    }

    /// Hands the response to the host and streams the body.
    pub(crate) fn send(self, out: ResponseOutparam) {
        let fields = Fields::new();
        for (name, value) in &self.headers {
            // A header the host forbids (e.g. `connection`) is dropped
            // rather than failing the whole response.
            let _ = fields.append(name, value.as_bytes());
        }
        let resp = OutgoingResponse::new(fields);
        let _ = resp.set_status_code(self.status);
        let body = resp.body().expect("a new response has a body");
        ResponseOutparam::set(out, Ok(resp));
        write_body(body, &self.body);
    }
}

/// What a handler may return.
pub trait IntoResponse {
    /// Converts into the response sent to the client.
    fn into_response(self) -> Response;
}

impl IntoResponse for Response {
    fn into_response(self) -> Response {
        self
    }
}

impl<E: std::fmt::Display> IntoResponse for Result<Response, E> {
    fn into_response(self) -> Response {
        self.unwrap_or_else(|e| {
            let message = e.to_string();
            crate::error!("handler failed: {message}");
            Response::error(500, &message)
        })
    }
}

pub(crate) fn method_name(m: &Method) -> &str {
    match m {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(s) => s,
    }
}

pub(crate) fn header_list(fields: &Fields) -> Vec<(String, String)> {
    fields
        .entries()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

pub(crate) fn read_body(body: IncomingBody) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    {
        let mut stream: InputStream = body
            .stream()
            .map_err(|()| Error::Io("body already read".into()))?;
        stream
            .read_to_end(&mut buf)
            .map_err(|e| Error::Io(e.to_string()))?;
    }
    let _trailers = IncomingBody::finish(body);
    Ok(buf)
}

pub(crate) fn write_body(body: OutgoingBody, data: &[u8]) {
    {
        let mut stream = body.write().expect("the body stream is taken once");
        // The stream must be dropped before the body is finished.
        let _ = stream
            .write_all(data)
            .and_then(|()| std::io::Write::flush(&mut stream));
    }
    let _ = OutgoingBody::finish(body, None);
}

pub(crate) fn write_outgoing(body: OutgoingBody, data: &[u8]) -> Result<(), Error> {
    {
        let mut stream = body
            .write()
            .map_err(|()| Error::Io("body stream already taken".into()))?;
        stream
            .write_all(data)
            .and_then(|()| std::io::Write::flush(&mut stream))
            .map_err(|e| Error::Io(e.to_string()))?;
    }
    OutgoingBody::finish(body, None).map_err(|e| Error::Io(format!("{e:?}")))
}

/// The first parameter called `name` of a query string (`a=1&b=2`),
/// percent-decoded: for handlers that get the raw query, as WASI 0.3 ones
/// do from `req.uri().query()`.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let r = Request::new("get", "/x?name=J%C3%BCrgen+K&flag&a=1");
        assert_eq!(r.method(), "GET");
        assert_eq!(r.path(), "/x");
        assert_eq!(r.query_param("name").as_deref(), Some("Jürgen K"));
        assert_eq!(r.query_param("flag").as_deref(), Some(""));
        assert_eq!(r.query_param("missing"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn segments_skip_empty_parts() {
        assert_eq!(
            Request::new("GET", "/api//items/7/").segments(),
            ["api", "items", "7"]
        );
    }

    #[test]
    fn error_results_become_500_json() {
        let r: Result<Response, &str> = Ok(Response::text("fine"));
        assert_eq!(r.into_response().status(), 200);
        let e = Response::error(418, "teapot");
        assert_eq!(e.status(), 418);
        assert_eq!(e.header("Content-Type"), Some("application/json"));
        assert_eq!(e.text_body(), r#"{"error":"teapot"}"#);
    }
}
