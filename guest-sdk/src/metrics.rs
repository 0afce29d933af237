//! Metrics the module defines, exported by the host on its Prometheus
//! endpoint as `berth_guest_<module>_<name>` (counters get `_total`).
//!
//! ```no_run
//! use berth_sdk::metrics::{Counter, Histogram};
//!
//! static ORDERS: Counter = Counter::new("orders");
//! static LOOKUP: Histogram = Histogram::new("lookup_seconds");
//!
//! ORDERS.inc();
//! ORDERS.add_with(2, &[("kind", "book")]);
//! LOOKUP.observe(0.012);
//! ```
//!
//! Updates never fail in the guest: an invalid name, a change of label
//! names, or a series over the operator's cap is dropped and counted by the
//! host.

use core::sync::atomic::{AtomicBool, Ordering};

#[cfg(target_arch = "wasm32")]
use crate::bindings::berth::metrics::metrics as host;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::metrics as host;

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A counter: only goes up.
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    name: &'static str,
}

impl Counter {
    /// A counter named `name` (`[a-zA-Z_][a-zA-Z0-9_]*`).
    pub const fn new(name: &'static str) -> Self {
        Counter { name }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        host::counter_add(self.name, n, &[]);
    }

    /// Adds `n` to the series with these labels.
    pub fn add_with(&self, n: u64, labels_: &[(&str, &str)]) {
        host::counter_add(self.name, n, &labels(labels_));
    }
}

/// A gauge: a value that goes up and down.
#[derive(Debug, Clone, Copy)]
pub struct Gauge {
    name: &'static str,
}

impl Gauge {
    /// A gauge named `name`.
    pub const fn new(name: &'static str) -> Self {
        Gauge { name }
    }

    /// Sets the value.
    pub fn set(&self, value: f64) {
        host::gauge_set(self.name, value, &[]);
    }

    /// Sets the value of the series with these labels.
    pub fn set_with(&self, value: f64, labels_: &[(&str, &str)]) {
        host::gauge_set(self.name, value, &labels(labels_));
    }
}

/// A histogram of values (seconds, for durations). Its buckets are the
/// host's latency buckets (0.5 ms to 30 s) unless chosen with
/// [`Histogram::with_buckets`].
#[derive(Debug)]
pub struct Histogram {
    name: &'static str,
    buckets: Option<&'static [f64]>,
    /// Whether this instance has told the host its buckets.
    chosen: AtomicBool,
}

impl Histogram {
    /// A histogram named `name`, with the host's latency buckets.
    pub const fn new(name: &'static str) -> Self {
        Histogram {
            name,
            buckets: None,
            chosen: AtomicBool::new(false),
        }
    }

    /// A histogram named `name` with these bucket upper bounds: 1 to 64
    /// finite values, strictly increasing (`+Inf` is added). Bounds the
    /// host refuses, or bounds that differ from those the histogram already
    /// has (from an earlier version of the module), are dropped and counted
    /// by the host, which then keeps the histogram's buckets as they are.
    ///
    /// ```no_run
    /// use berth_sdk::metrics::Histogram;
    ///
    /// static SIZE: Histogram = Histogram::with_buckets("order_items", &[1.0, 5.0, 25.0, 100.0]);
    /// SIZE.observe(3.0);
    /// ```
    pub const fn with_buckets(name: &'static str, buckets: &'static [f64]) -> Self {
        Histogram {
            name,
            buckets: Some(buckets),
            chosen: AtomicBool::new(false),
        }
    }

    fn choose(&self) {
        if let Some(buckets) = self.buckets {
            if !self.chosen.swap(true, Ordering::Relaxed) {
                host::histogram_buckets(self.name, buckets);
            }
        }
    }

    /// Records a value.
    pub fn observe(&self, value: f64) {
        self.choose();
        host::histogram_observe(self.name, value, &[]);
    }

    /// Records a value in the series with these labels.
    pub fn observe_with(&self, value: f64, labels_: &[(&str, &str)]) {
        self.choose();
        host::histogram_observe(self.name, value, &labels(labels_));
    }
}
