//! # berth-sdk: write Berth modules in plain Rust
//!
//! A Berth module is a WebAssembly component (`wasm32-wasip2`) that answers
//! HTTP requests. The host does everything operational — routing, limits,
//! retries, logs, metrics, traces — so a module is only business logic.
//! This crate turns the component plumbing into a function from
//! [`Request`] to [`Response`], plus [`config`], [`log`](crate::info),
//! [`metrics`] and outbound [`http`].
//!
//! ```no_run
//! use berth_sdk::{Request, Response, config, info};
//!
//! fn handle(req: Request) -> Response {
//!     let greeting = config::get("greeting").unwrap_or_else(|| "hello".into());
//!     info!("greeting {}", req.path());
//!     Response::json(&serde_json::json!({ "message": greeting }))
//! }
//!
//! berth_sdk::handler!(handle);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` from a
//! `cdylib` crate and point a `[modules.NAME]` entry of `berth.toml` at the
//! `.wasm` file.
//!
//! The handler may return anything that implements [`IntoResponse`]: a
//! [`Response`], or a `Result<Response, E>` whose error becomes a 500 JSON
//! answer (and an error log line).
//!
//! With the `p3` feature, [`p3`] builds WASI 0.3 modules instead: an
//! `async fn handle(req) -> Response` that can stream bodies and make
//! outbound calls concurrently. WASI 0.2 stays the default until the
//! tooling most users have builds 0.3.
//!
//! With the `grpc` feature, [`grpc`] serves gRPC methods over prost
//! messages: unary, server-, client- and bidirectional streaming.
//!
//! The world the host implements is in this crate's `wit/` folder:
//! `wasi:http/proxy` plus `wasi:config/store`, `wasi:logging/logging` and
//! `berth:metrics/metrics`.
#![deny(missing_docs)]

mod error;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod http;
mod message;
pub mod metrics;
#[cfg(feature = "p3")]
pub mod p3;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use error::Error;
pub use message::{IntoResponse, Request, Response, query_param};

#[allow(missing_docs, unreachable_pub, unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "berth:sdk/capabilities",
        generate_all,
    });
}

/// Configuration values set by the operator for this module
/// (`[modules.NAME.config]` in `berth.toml`, overridable per key by
/// environment variables on the host).
///
/// In `cargo test` on your machine these read [`testing::set_config`].
pub mod config {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::wasi::config::store;

    /// The value of `key`, or `None` when it is not set.
    pub fn get(key: &str) -> Option<String> {
        try_get(key).ok().flatten()
    }

    /// The value of `key`, or `default` when it is not set.
    pub fn get_or(key: &str, default: &str) -> String {
        get(key).unwrap_or_else(|| default.to_owned())
    }

    /// The value of `key`, telling a missing key from a host failure.
    pub fn try_get(key: &str) -> Result<Option<String>, crate::Error> {
        #[cfg(target_arch = "wasm32")]
        return store::get(key).map_err(|e| crate::Error::Config(describe(e)));
        #[cfg(not(target_arch = "wasm32"))]
        Ok(crate::testing::config_get(key))
    }

    /// Every key and value.
    pub fn get_all() -> Result<Vec<(String, String)>, crate::Error> {
        #[cfg(target_arch = "wasm32")]
        return store::get_all().map_err(|e| crate::Error::Config(describe(e)));
        #[cfg(not(target_arch = "wasm32"))]
        Ok(crate::testing::config_all())
    }

    #[cfg(target_arch = "wasm32")]
    fn describe(e: store::Error) -> String {
        match e {
            store::Error::Upstream(s) | store::Error::Io(s) => s,
        }
    }
}

/// Log levels for [`log!`](crate::log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging information.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
}

#[doc(hidden)]
pub mod __private {
    pub use wasi;

    #[cfg(target_arch = "wasm32")]
    use crate::bindings::wasi::logging::logging as wlog;
    use crate::{IntoResponse, Level, Request};

    #[cfg(not(target_arch = "wasm32"))]
    pub fn log(level: Level, _context: &str, message: &str) {
        crate::testing::log(level, message);
    }

    #[cfg(target_arch = "wasm32")]
    pub fn log(level: Level, context: &str, message: &str) {
        let level = match level {
            Level::Trace => wlog::Level::Trace,
            Level::Debug => wlog::Level::Debug,
            Level::Info => wlog::Level::Info,
            Level::Warn => wlog::Level::Warn,
            Level::Error => wlog::Level::Error,
        };
        wlog::log(level, context, message);
    }

    /// Runs a user handler for one incoming request.
    pub fn run<R: IntoResponse>(
        req: wasi::http::types::IncomingRequest,
        out: wasi::http::types::ResponseOutparam,
        handler: fn(Request) -> R,
    ) {
        let response = match Request::from_incoming(req) {
            Ok(req) => handler(req).into_response(),
            Err(err) => crate::Response::error(400, &err.to_string()),
        };
        response.send(out);
    }
}

/// Logs a message at `level` through the host, which adds the module name,
/// request id and trace id.
///
/// ```no_run
/// berth_sdk::log!(berth_sdk::Level::Info, "user {} logged in", 42);
/// ```
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::__private::log($level, ::core::module_path!(), &::std::format!($($arg)+))
    };
}

/// Logs at info level. See [`log!`](crate::log).
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log!($crate::Level::Info, $($arg)+) };
}

/// Logs at warn level. See [`log!`](crate::log).
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log!($crate::Level::Warn, $($arg)+) };
}

/// Logs at error level. See [`log!`](crate::log).
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log!($crate::Level::Error, $($arg)+) };
}

/// Logs at debug level. See [`log!`](crate::log).
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log!($crate::Level::Debug, $($arg)+) };
}

/// Logs at trace level. See [`log!`](crate::log).
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log!($crate::Level::Trace, $($arg)+) };
}

/// Declares the module's request handler: a function taking a [`Request`]
/// and returning anything that implements [`IntoResponse`].
///
/// ```no_run
/// fn handle(_req: berth_sdk::Request) -> berth_sdk::Response {
///     berth_sdk::Response::text("hi\n")
/// }
/// berth_sdk::handler!(handle);
/// ```
#[macro_export]
macro_rules! handler {
    ($handler:path) => {
        #[doc(hidden)]
        struct __BerthHandler;

        impl $crate::__private::wasi::exports::http::incoming_handler::Guest for __BerthHandler {
            fn handle(
                req: $crate::__private::wasi::http::types::IncomingRequest,
                out: $crate::__private::wasi::http::types::ResponseOutparam,
            ) {
                $crate::__private::run(req, out, $handler)
            }
        }

        $crate::__private::wasi::http::proxy::export!(
            __BerthHandler with_types_in $crate::__private::wasi
        );
    };
}
