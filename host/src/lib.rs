//! Berth: a host that serves WebAssembly components (`wasi:http/proxy`)
//! as twelve-factor microservices on Kubernetes.
//!
//! # Layout
//! - [`config`]: layered configuration (defaults, TOML file, `BERTH_*`
//!   env vars, flags) and its validation.
//! - [`runtime`]: the wasmtime engine, the linker holding the guest world,
//!   module loading and checking, the per-request store state.
//! - [`router`]: path-prefix routing to modules.
//! - [`reload`]: loading modules and hot-swapping them (watcher, rescan,
//!   `SIGHUP`, `POST /admin/reload`).
//! - [`server`]: the traffic listener; one fresh instance per request.
//! - [`admin`]: probes, `/info` and `/metrics` on their own port and thread.
//! - [`outbound`]: the policy every outbound call of a guest goes through.
//! - [`telemetry`]: logging and OTLP trace export set-up.
//! - [`trace`]: W3C trace context: extraction, ids in logs, injection.
//! - [`metrics`]: Prometheus metrics, resolved per module at load.
//! - [`redact`]: URLs without the credentials they may carry.
//! - [`signal`]: shutdown signals.
//! - [`app`]: wiring it all together for `berth serve`.

pub mod admin;
pub mod app;
pub mod config;
pub mod metrics;
pub mod outbound;
pub mod redact;
pub mod reload;
pub mod router;
pub mod runtime;
pub mod server;
pub mod signal;
pub mod telemetry;
pub mod trace;
