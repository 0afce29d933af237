//! Berth: a host that serves WebAssembly components (`wasi:http/proxy`)
//! as twelve-factor microservices on Kubernetes.
//!
//! # Layout
//! The modules form layers; each imports only from layers below it
//! (`scripts/check_layers.py`, run by `make lint`, enforces this), so data
//! flows one way: config → outbound and registry → runtime → canary → router → reload →
//! server and admin → app.
//!
//! - Foundations, importing nothing above them:
//!   - [`config`]: layered configuration (defaults, TOML file, `BERTH_*`
//!     env vars, flags), its validation, and the module specs it resolves
//!     to (source, limits, parsed allow-list).
//!   - [`telemetry`]: logging and OTLP trace export set-up.
//!   - [`trace`]: W3C trace context: extraction, ids in logs, injection.
//!   - [`metrics`]: Prometheus metrics, resolved per module at load.
//!   - [`redact`]: URLs without the credentials they may carry.
//!   - [`signal`]: shutdown signals.
//! - [`outbound`]: the policy every outbound call of a guest goes through.
//! - [`registry`]: pulling and pushing modules as OCI artifacts.
//! - [`runtime`]: the wasmtime engine, the linker holding the guest world,
//!   module loading and checking, and a module's per-request store.
//! - [`canary`]: a module's canary version: which version serves each
//!   request, each step's window, judgements, promotion and rollback.
//! - [`router`]: path-prefix routing to each module's release (stable
//!   version, and canary), and the table in force.
//! - [`reload`]: loading modules and hot-swapping them (watcher, rescan,
//!   `SIGHUP`, `POST /admin/reload`); owns the load status.
//! - [`server`]: the traffic listener; each request as named steps, one
//!   fresh instance per request.
//! - [`admin`]: probes, `/info` and `/metrics` on their own port and
//!   thread; owns the process's health.
//! - [`app`]: assembles the pieces for `berth serve`.

pub mod admin;
pub mod app;
pub mod canary;
pub mod config;
pub mod dev;
pub mod metrics;
pub mod outbound;
pub mod redact;
pub mod registry;
pub mod reload;
pub mod router;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod signal;
pub mod telemetry;
pub mod trace;

#[cfg(test)]
mod testing;
