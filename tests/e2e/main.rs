//! End-to-end tests: the real `berth` binary, real components built for
//! wasm32-wasip2 (`make guests`), real HTTP on loopback.

// Helpers are `pub` for the test modules of this one binary.
#![allow(unreachable_pub)]

mod canary;
mod conformance;
mod core;
mod downstream;
mod h2;
mod lifecycle;
mod observability;
mod oci;
mod otlp;
mod p3;
mod resilience;
mod streaming;
mod support;
mod templates;
mod tls;
