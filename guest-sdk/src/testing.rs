//! An in-memory host for unit tests on your machine (`cargo test`).
//!
//! Outside WebAssembly there is no Berth host to import from, so the SDK's
//! [`config`](crate::config), logs, [`metrics`](crate::metrics) and
//! outbound [`http`](crate::http) calls come here instead: a test sets the
//! config and the upstream's answers, calls its handler, and reads what it
//! logged and counted. State is per thread, and the test harness runs each
//! test on a thread of its own, so tests never see each other's.
//!
//! ```
//! use berth_sdk::{Request, Response, config, info, testing};
//!
//! fn handle(req: Request) -> Response {
//!     info!("hi from {}", req.path());
//!     Response::text(config::get_or("greeting", "Hello"))
//! }
//!
//! testing::set_config("greeting", "Hi");
//! assert_eq!(handle(Request::new("GET", "/x")).text_body(), "Hi");
//! assert_eq!(testing::logs(), [(berth_sdk::Level::Info, "hi from /x".to_owned())]);
//! ```
//!
//! The real host's rules (allow-list, metric name checks, series caps) are
//! not applied here; the end-to-end run through `berth dev` has them.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::{Error, Level, Response};

/// An outbound request the code under test sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The whole URL.
    pub url: String,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

type Upstream = Box<dyn FnMut(&Sent) -> Result<Response, Error>>;
type Series = (String, Vec<(String, String)>);

#[derive(Default)]
struct Host {
    config: BTreeMap<String, String>,
    logs: Vec<(Level, String)>,
    counters: BTreeMap<Series, u64>,
    gauges: BTreeMap<Series, f64>,
    histograms: BTreeMap<Series, Vec<f64>>,
    upstream: Option<Upstream>,
    sent: Vec<Sent>,
}

thread_local! {
    static HOST: RefCell<Host> = RefCell::default();
}

fn with<T>(f: impl FnOnce(&mut Host) -> T) -> T {
    HOST.with(|h| f(&mut h.borrow_mut()))
}

fn series(name: &str, labels: &[(String, String)]) -> Series {
    let mut labels = labels.to_vec();
    labels.sort();
    (name.to_owned(), labels)
}

/// Sets a config value (or secret) the code under test reads.
pub fn set_config(key: &str, value: &str) {
    with(|h| h.config.insert(key.to_owned(), value.to_owned()));
}

/// Every line logged so far, with its level.
pub fn logs() -> Vec<(Level, String)> {
    with(|h| h.logs.clone())
}

/// The counter `name` summed over all its label sets (0 if never added to).
pub fn counter(name: &str) -> u64 {
    with(|h| {
        h.counters
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    })
}

/// The gauge `name` with these labels, if it was set.
pub fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: Vec<_> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    with(|h| h.gauges.get(&series(name, &labels)).copied())
}

/// Every value the histogram `name` recorded, over all its label sets.
pub fn observations(name: &str) -> Vec<f64> {
    with(|h| {
        h.histograms
            .iter()
            .filter(|((n, _), _)| n == name)
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    })
}

/// Answers the outbound calls of the code under test. Without one, a call
/// fails with [`Error::Unavailable`].
pub fn on_outbound(answer: impl FnMut(&Sent) -> Result<Response, Error> + 'static) {
    with(|h| h.upstream = Some(Box::new(answer)));
}

/// The outbound requests sent so far.
pub fn sent() -> Vec<Sent> {
    with(|h| h.sent.clone())
}

pub(crate) fn config_get(key: &str) -> Option<String> {
    with(|h| h.config.get(key).cloned())
}

pub(crate) fn config_all() -> Vec<(String, String)> {
    with(|h| h.config.clone().into_iter().collect())
}

pub(crate) fn log(level: Level, message: &str) {
    with(|h| h.logs.push((level, message.to_owned())));
}

pub(crate) fn send(request: Sent) -> Result<Response, Error> {
    let url = request.url.clone();
    // Taken out while it runs, so an answer may itself use the SDK.
    let upstream = with(|h| {
        h.sent.push(request.clone());
        h.upstream.take()
    });
    let Some(mut upstream) = upstream else {
        return Err(Error::Unavailable { url });
    };
    let answer = upstream(&request);
    // Put back unless the answer set another one meanwhile.
    with(|h| {
        if h.upstream.is_none() {
            h.upstream = Some(upstream);
        }
    });
    answer
}

/// The `berth:metrics` functions, as the host's bindings spell them.
pub(crate) mod metrics {
    use super::{series, with};

    pub(crate) fn counter_add(name: &str, value: u64, labels: &[(String, String)]) {
        with(|h| *h.counters.entry(series(name, labels)).or_default() += value);
    }

    pub(crate) fn gauge_set(name: &str, value: f64, labels: &[(String, String)]) {
        with(|h| h.gauges.insert(series(name, labels), value));
    }

    pub(crate) fn histogram_observe(name: &str, value: f64, labels: &[(String, String)]) {
        with(|h| {
            h.histograms
                .entry(series(name, labels))
                .or_default()
                .push(value)
        });
    }

    pub(crate) fn histogram_buckets(_name: &str, _buckets: &[f64]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Counter, Gauge, Histogram};

    #[test]
    fn config_logs_and_metrics_land_in_the_fake() {
        assert_eq!(crate::config::get("missing"), None);
        set_config("greeting", "Hi");
        assert_eq!(crate::config::get_or("greeting", "Hello"), "Hi");
        assert_eq!(
            crate::config::get_all().unwrap(),
            [("greeting".to_owned(), "Hi".to_owned())]
        );
        crate::warn!("careful {}", 1);
        assert_eq!(logs(), [(Level::Warn, "careful 1".to_owned())]);

        static ORDERS: Counter = Counter::new("orders");
        ORDERS.inc();
        ORDERS.add_with(2, &[("kind", "book")]);
        assert_eq!(counter("orders"), 3);
        assert_eq!(counter("other"), 0);
        Gauge::new("depth").set_with(4.0, &[("q", "a"), ("r", "b")]);
        assert_eq!(gauge("depth", &[("r", "b"), ("q", "a")]), Some(4.0));
        assert_eq!(gauge("depth", &[]), None);
        static SIZE: Histogram = Histogram::with_buckets("size", &[1.0, 10.0]);
        SIZE.observe(3.0);
        SIZE.observe_with(5.0, &[("k", "v")]);
        assert_eq!(observations("size"), [3.0, 5.0]);
    }

    #[test]
    fn outbound_calls_are_answered_by_the_fake_and_recorded() {
        let err = crate::http::get("http://up.example/x").unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
        on_outbound(|sent| Ok(Response::text(format!("{} {}", sent.method, sent.url))));
        let answer = crate::http::Client::post("http://up.example/y")
            .header("x-a", "1")
            .body("hi")
            .send()
            .unwrap();
        assert_eq!(answer.text_body(), "POST http://up.example/y");
        // The answer stays for the next call, and may set the one after.
        let again = crate::http::get("http://up.example/z").unwrap();
        assert_eq!(again.text_body(), "GET http://up.example/z");
        on_outbound(|_| {
            on_outbound(|_| Ok(Response::text("second")));
            Ok(Response::text("first"))
        });
        assert_eq!(crate::http::get("http://a/").unwrap().text_body(), "first");
        assert_eq!(crate::http::get("http://a/").unwrap().text_body(), "second");
        let sent = sent();
        assert_eq!(sent.len(), 5);
        assert_eq!(sent[1].headers, [("x-a".to_owned(), "1".to_owned())]);
        assert_eq!(sent[1].body, b"hi");
    }

    #[test]
    fn another_thread_sees_none_of_this_ones_state() {
        set_config("greeting", "Hi");
        crate::info!("here");
        crate::metrics::Counter::new("orders").inc();
        let there =
            std::thread::spawn(|| (logs(), crate::config::get("greeting"), counter("orders")))
                .join()
                .unwrap();
        assert_eq!(there, (Vec::new(), None, 0));
        assert_eq!(counter("orders"), 1);
    }
}
