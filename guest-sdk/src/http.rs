//! Outbound HTTP. Every call goes through the host, which applies the
//! module's allow-list, timeouts and retries; a destination the operator has
//! not allowed fails fast with [`Error::Denied`].
//!
//! ```no_run
//! use berth_sdk::http;
//!
//! # fn demo() -> Result<(), berth_sdk::Error> {
//! let stock = http::get("http://inventory.default.svc:8080/stock/42")?;
//! let created = http::Client::post("http://orders.default.svc:8080/orders")
//!     .json(&serde_json::json!({ "sku": 42 }))?
//!     .send()?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use wasi::http::outgoing_handler;
use wasi::http::types::{ErrorCode, Fields, Method, OutgoingRequest, RequestOptions, Scheme};

use crate::message::{header_list, read_body, write_outgoing};
use crate::{Error, Response};

/// `GET url`.
pub fn get(url: &str) -> Result<Response, Error> {
    Client::get(url).send()
}

/// An outbound request being built.
#[derive(Debug, Clone)]
pub struct Client {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
}

impl Client {
    /// A request with any method.
    pub fn new(method: &str, url: &str) -> Self {
        Client {
            method: method.to_ascii_uppercase(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
            connect_timeout: None,
        }
    }

    /// A `GET` request.
    pub fn get(url: &str) -> Self {
        Client::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: &str) -> Self {
        Client::new("POST", url)
    }

    /// A `PUT` request.
    pub fn put(url: &str) -> Self {
        Client::new("PUT", url)
    }

    /// A `DELETE` request.
    pub fn delete(url: &str) -> Self {
        Client::new("DELETE", url)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and its content type.
    pub fn json<T: serde::Serialize + ?Sized>(self, value: &T) -> Result<Self, Error> {
        let body = serde_json::to_vec(value)?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// Asks for a shorter timeout (to the first byte) than the host's. The
    /// host's own limit still applies when it is shorter.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Asks for a shorter connect timeout than the host's (which still
    /// applies when it is shorter).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response.
    pub fn send(self) -> Result<Response, Error> {
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::send(crate::testing::Sent {
            method: self.method,
            url: self.url,
            headers: self.headers,
            body: self.body,
        });
        #[cfg(target_arch = "wasm32")]
        self.send_wasi()
    }

    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    fn send_wasi(self) -> Result<Response, Error> {
        let url = self.url.clone();
        let (scheme, authority, path) = split_url(&url)?;
        let fields = Fields::new();
        for (name, value) in &self.headers {
            fields
                .append(name, value.as_bytes())
                .map_err(|e| Error::InvalidRequest(format!("header `{name}`: {e:?}")))?;
        }
        let req = OutgoingRequest::new(fields);
        let method = match self.method.as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        };
        let invalid =
            |what: &str| Error::InvalidRequest(format!("{what} of {}", crate::error::shown(&url)));
        req.set_method(&method).map_err(|()| invalid("method"))?;
        req.set_scheme(Some(&scheme))
            .map_err(|()| invalid("scheme"))?;
        req.set_authority(Some(authority))
            .map_err(|()| invalid("authority"))?;
        req.set_path_with_query(Some(&path))
            .map_err(|()| invalid("path"))?;
        let body = req.body().map_err(|()| invalid("body"))?;
        let nanos = |t: Duration| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
        let options = (self.timeout.is_some() || self.connect_timeout.is_some()).then(|| {
            let o = RequestOptions::new();
            if let Some(t) = self.timeout {
                let _ = o.set_first_byte_timeout(Some(nanos(t)));
                let _ = o.set_between_bytes_timeout(Some(nanos(t)));
            }
            if let Some(t) = self.connect_timeout {
                let _ = o.set_connect_timeout(Some(nanos(t)));
            }
            o
        });
        let pending = outgoing_handler::handle(req, options).map_err(|c| from_code(&url, c))?;
        write_outgoing(body, &self.body)?;
        let resp = loop {
            match pending.get() {
                Some(result) => break result,
                None => pending.subscribe().block(),
            }
        };
        let resp = resp
            .map_err(|()| Error::Io("response already taken".into()))?
            .map_err(|c| from_code(&url, c))?;
        let status = resp.status();
        let headers = header_list(&resp.headers());
        let body = resp
            .consume()
            .map_err(|()| Error::Io("response body already taken".into()))?;
        let body = read_body(body)?;
        Ok(Response::from_parts(status, headers, body))
    }
}

fn from_code(url: &str, code: ErrorCode) -> Error {
    let url = url.to_owned();
    match code {
        ErrorCode::HttpRequestDenied | ErrorCode::DestinationIpProhibited => Error::Denied { url },
        ErrorCode::DestinationUnavailable => Error::Unavailable { url },
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::DnsTimeout => Error::Timeout { url },
        other => Error::Upstream {
            url,
            reason: format!("{other:?}"),
        },
    }
}

/// `http://host:port/path?q` → scheme, authority, path-with-query.
fn split_url(url: &str) -> Result<(Scheme, &str, String), Error> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        Error::InvalidRequest(format!("`{}` has no scheme", crate::error::shown(url)))
    })?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_owned()),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "`{}` has no host",
            crate::error::shown(url)
        )));
    }
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Ok((scheme, authority, path))
}

#[cfg(test)]
mod tests {
    use super::split_url;

    #[test]
    fn urls_split_into_parts() {
        let (_, a, p) = split_url("http://svc:8080/x/y?z=1").unwrap();
        assert_eq!((a, p.as_str()), ("svc:8080", "/x/y?z=1"));
        let (_, a, p) = split_url("https://example.com").unwrap();
        assert_eq!((a, p.as_str()), ("example.com", "/"));
        let (_, a, p) = split_url("http://h?q").unwrap();
        assert_eq!((a, p.as_str()), ("h", "/?q"));
        assert!(split_url("example.com/x").is_err());
        assert!(split_url("http:///x").is_err());
    }
}
