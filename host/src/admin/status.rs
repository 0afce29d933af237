//! The status page (`GET /` on the admin port): what an operator wants to
//! see at a glance, from the same state `/info` reads, as plain HTML.
//!
//! - No JavaScript and no external assets: it refreshes itself with a meta
//!   refresh, and its style sheet is served from this port
//!   (`/status.css`), so the Content-Security-Policy can forbid everything
//!   else (`default-src 'none'`).
//! - Everything it prints goes through maud, which escapes at compile
//!   time: a route, a file name or an error message holding markup is
//!   shown as text.
//! - It prints no config values and no secrets: names, routes, sources
//!   (URLs without credentials), digests, figures and errors.
//!
//! Rates, error ratios and p99s come from the host's own counters:
//! [`Sampler`] keeps a few samples of every module version's counts, and
//! the page shows the difference between the newest and one about
//! [`WINDOW`] older.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use maud::{DOCTYPE, Markup, html};

use super::AdminState;
use crate::metrics::{Sample, quantile};

/// How often the sampler takes the counts.
pub(super) const EVERY: Duration = Duration::from_secs(2);
/// The span rates are computed over, at most.
const WINDOW: Duration = Duration::from_secs(10);
/// How often the page reloads itself, in seconds.
const REFRESH: u32 = 5;

/// The Content-Security-Policy of the page: nothing but its own style
/// sheet; no scripts, frames, forms or images.
pub(super) const CSP: &str = "default-src 'none'; style-src 'self'; base-uri 'none'; \
                              form-action 'none'; frame-ancestors 'none'";

/// The page's style sheet.
pub(super) const CSS: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2430;background:#fafbfc}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}\
table{border-collapse:collapse;width:100%;background:#fff}\
th,td{border:1px solid #d8dee6;padding:.35em .6em;text-align:left;vertical-align:top}\
th{background:#eef2f6}td.n{text-align:right;font-variant-numeric:tabular-nums}\
code{font:12px ui-monospace,monospace;word-break:break-all}\
.ok{color:#1a7f37}.bad{color:#c0262d;font-weight:600}.warn{color:#9a6700}\
.meta{color:#57606a}";

/// Counts of one module version at one moment.
type Counts = BTreeMap<(String, String), Sample>;

/// A few samples of every module version's counts, newest last.
#[derive(Default)]
pub(super) struct Sampler(Mutex<VecDeque<(Instant, Counts)>>);

impl Sampler {
    /// Takes the counts of every version serving now.
    pub(super) fn sample(&self, state: &AdminState) {
        let table = state.routes.current();
        let mut counts = Counts::new();
        for release in table.releases() {
            let versions =
                std::iter::once(&release.stable).chain(release.canary.as_ref().map(|c| &c.module));
            for m in versions {
                counts.insert((m.name.to_string(), m.sha256.clone()), m.metrics.sample());
            }
        }
        let mut samples = self.0.lock().unwrap();
        samples.push_back((Instant::now(), counts));
        let keep = (WINDOW.as_secs() / EVERY.as_secs()) as usize + 1;
        while samples.len() > keep {
            samples.pop_front();
        }
    }

    /// Rate, error ratio and p99 of each version over the window.
    fn figures(&self) -> BTreeMap<(String, String), Figures> {
        let samples = self.0.lock().unwrap();
        let Some((t1, last)) = samples.back() else {
            return BTreeMap::new();
        };
        // Each version from its oldest sample: one loaded a moment ago
        // has a rate as soon as it has two.
        last.iter()
            .filter_map(|(key, now)| {
                let (t0, before) = samples
                    .iter()
                    .find_map(|(t, counts)| Some((t, counts.get(key)?)))?;
                let secs = t1.duration_since(*t0).as_secs_f64();
                Some((key.clone(), Figures::between(before, now, secs)))
            })
            .collect()
    }
}

/// One version's figures over a window.
struct Figures {
    rate: Option<f64>,
    error_ratio: Option<f64>,
    p99: Option<f64>,
}

impl Figures {
    fn between(before: &Sample, now: &Sample, secs: f64) -> Self {
        let requests = now.requests.saturating_sub(before.requests);
        let errors = now.errors.saturating_sub(before.errors);
        let deltas: Vec<(f64, u64)> = now
            .buckets
            .iter()
            .zip(&before.buckets)
            .map(|((le, n), (_, b))| (*le, n.saturating_sub(*b)))
            .collect();
        Figures {
            rate: (secs > 0.0).then(|| requests as f64 / secs),
            error_ratio: (requests > 0).then(|| errors as f64 / requests as f64),
            p99: quantile(&deltas, requests, 0.99),
        }
    }
}

/// The page.
pub(super) fn page(state: &AdminState, sampler: &Sampler) -> String {
    let table = state.routes.current();
    let errors = state.reload.status.errors();
    let loading = state.reload.status.loading();
    let figures = sampler.figures();
    let ready = state.health.is_ready();
    let draining = state.health.draining();
    let uptime = SystemTime::now()
        .duration_since(state.health.started_at)
        .unwrap_or_default();
    let config_error = state.reload.status.config_error();
    let breakers = state.metrics.breakers();
    let board = &state.reload.canaries;
    let canaries: Vec<(String, serde_json::Value)> = board
        .modules()
        .into_iter()
        .filter_map(|m| Some((m.clone(), board.info(&m)?)))
        .collect();
    let markup: Markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(REFRESH);
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Berth status" }
                link rel="stylesheet" href="/status.css";
            }
            body {
                h1 { "Berth " (env!("CARGO_PKG_VERSION")) }
                p.meta {
                    @if draining { span.bad { "draining" } }
                    @else if ready { span.ok { "ready" } }
                    @else { span.warn { "loading" } }
                    " · up " (humantime::format_duration(Duration::from_secs(uptime.as_secs())))
                    " · refreshes every " (REFRESH) " s · rates over the last "
                    (WINDOW.as_secs()) " s"
                }
                @if let Some(e) = &config_error {
                    p.bad { "The config file on disk is rejected (the running one stays): " code { (e) } }
                }
                h2 { "Modules" }
                table {
                    thead { tr {
                        th { "module" } th { "route" } th { "world" } th { "source" } th { "sha256" }
                        th { "track" } th { "loaded" } th { "last reload" }
                        th { "req/s" } th { "errors" } th { "p99" }
                    } }
                    tbody {
                        @for release in table.releases() {
                            @let versions = std::iter::once((&release.stable, None))
                                .chain(release.canary.as_ref().map(|c| (&c.module, Some(c.weight()))));
                            @for (m, weight) in versions {
                                @let f = figures.get(&(m.name.to_string(), m.sha256.clone()));
                                tr {
                                    td { (m.name) }
                                    td { code { (m.route) } }
                                    td { (m.world.as_str()) }
                                    td {
                                        code { (m.origin) }
                                        @if let Some(resolved) = &m.resolved {
                                            br; span.meta { "resolved: " } code { (resolved) }
                                        }
                                    }
                                    td { code title=(m.sha256) { (crate::runtime::version_label(&m.sha256)) } }
                                    td {
                                        (m.track.as_str())
                                        @if let Some(w) = weight { " (" (w) " %)" }
                                    }
                                    td { (humantime::format_rfc3339_seconds(m.loaded_at)) }
                                    td {
                                        @match errors.get(&*m.name) {
                                            Some(e) => span.bad { "failed: " code { (e) } },
                                            None => span.ok { "ok" },
                                        }
                                    }
                                    td.n { (num(f.and_then(|f| f.rate), "", 1)) }
                                    td.n { (num(f.and_then(|f| f.error_ratio).map(|r| r * 100.0), " %", 2)) }
                                    td.n { (num(f.and_then(|f| f.p99).map(|s| s * 1e3), " ms", 1)) }
                                }
                            }
                        }
                        @for (name, since) in &loading {
                            @if !table.modules().any(|m| &*m.name == name) {
                                tr {
                                    td { (name) }
                                    td colspan="6" { span.warn { "loading" } }
                                    td colspan="4" { "since " (humantime::format_rfc3339_seconds(*since)) }
                                }
                            }
                        }
                        // Added by a reload that failed: nothing serves them.
                        @for (name, e) in &errors {
                            @if !table.modules().any(|m| &*m.name == name) {
                                tr {
                                    td { (name) }
                                    td colspan="6" { span.bad { "not serving" } }
                                    td colspan="4" { span.bad { "failed: " code { (e) } } }
                                }
                            }
                        }
                    }
                }
                h2 { "Canaries" }
                @if canaries.is_empty() {
                    p.meta { "No canary." }
                } @else {
                    table {
                        thead { tr {
                            th { "module" } th { "state" } th { "weight" } th { "source" }
                            th { "sha256" } th { "reason" } th { "ended" }
                            th { "analysis" } th { "last judgement" }
                        } }
                        tbody {
                            @for (module, c) in &canaries {
                                @let text = |key: &str| c[key].as_str().unwrap_or("").to_owned();
                                @let state = text("state");
                                tr {
                                    td { (module) }
                                    td {
                                        @match state.as_str() {
                                            "rolled_back" | "failed_to_load" => span.bad { (state) },
                                            "promoted" => span.ok { (state) },
                                            _ => span.warn { (state) },
                                        }
                                    }
                                    td.n { (c["weight"].as_u64().map_or("–".to_owned(), |w| format!("{w} %"))) }
                                    td { code { (text("source")) (text("canary")) } }
                                    td { code { (crate::runtime::version_label(&text("sha256"))) } }
                                    td { (text("reason")) (text("error")) }
                                    td { (ended(c)) }
                                    td {
                                        @let analysis = &c["analysis"];
                                        @match analysis["status"].as_str() {
                                            None => "local",
                                            Some("unavailable") => span.bad {
                                                "fleet: unavailable " code { (analysis["error"].as_str().unwrap_or("")) }
                                            },
                                            Some(status) => span.ok { "fleet: " (status) },
                                        }
                                        @if let Some(queries) = analysis["queries"].as_array() {
                                            details {
                                                summary { "queries" }
                                                @for q in queries { code { (q.as_str().unwrap_or("")) } br; }
                                            }
                                        }
                                    }
                                    td { (last_judgement(c)) }
                                }
                            }
                        }
                    }
                }
                h2 { "Outbound upstreams" }
                @if breakers.is_empty() {
                    p.meta { "No outbound calls yet." }
                } @else {
                    table {
                        thead { tr { th { "module" } th { "upstream" } th { "circuit breaker" } } }
                        tbody {
                            @for (module, upstream, breaker) in &breakers {
                                tr {
                                    td { (module) }
                                    td { code { (upstream) } }
                                    td {
                                        @match breaker {
                                            0 => span.ok { "closed" },
                                            1 => span.warn { "half-open" },
                                            _ => span.bad { "open" },
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                p.meta {
                    "JSON: " a href="/info" { "/info" } " · metrics: " a href="/metrics" { "/metrics" }
                }
            }
        }
    };
    markup.into_string()
}

/// When a canary ended, from its outcome or its last history entry.
/// The last judgement of a canary: its verdict, step and both versions'
/// figures (fleet-wide with fleet analysis).
fn last_judgement(c: &serde_json::Value) -> String {
    let history = c["history"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let Some(e) = history.iter().rev().find(|e| e.get("canary").is_some()) else {
        return "–".into();
    };
    let figures = |f: &serde_json::Value| {
        let rate = f["success_rate"]
            .as_f64()
            .map_or("–".into(), |r| format!("{r:.2} %"));
        let p99 = f["p99_ms"]
            .as_f64()
            .map_or("–".into(), |p| format!("{p:.1} ms"));
        format!(
            "{} req, {rate}, p99 {p99}",
            f["requests"].as_u64().unwrap_or(0)
        )
    };
    format!(
        "{} at step {}: canary {}; stable {}",
        e["result"].as_str().unwrap_or(""),
        e["step"].as_u64().unwrap_or(0),
        figures(&e["canary"]),
        figures(&e["stable"])
    )
}

fn ended(canary: &serde_json::Value) -> String {
    let state = canary["state"].as_str().unwrap_or("");
    if !matches!(state, "promoted" | "rolled_back") {
        return "–".to_owned();
    }
    let at = canary["at_ms"].as_u64().or_else(|| {
        canary["history"]
            .as_array()
            .and_then(|h| h.last())
            .and_then(|e| e["at_ms"].as_u64())
    });
    at.map_or("–".to_owned(), |ms| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    })
}

fn num(value: Option<f64>, unit: &str, digits: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.digits$}{unit}"),
        _ => "–".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_of_a_window_comes_from_bucket_differences() {
        let before = Sample {
            requests: 100,
            errors: 1,
            buckets: vec![(0.01, 90), (0.1, 100), (1.0, 100)],
        };
        let now = Sample {
            requests: 300,
            errors: 21,
            buckets: vec![(0.01, 90), (0.1, 290), (1.0, 300)],
        };
        let f = Figures::between(&before, &now, 10.0);
        assert_eq!(f.rate, Some(20.0));
        assert_eq!(f.error_ratio, Some(0.1));
        // 200 new requests: 190 in (0.01, 0.1], 10 in (0.1, 1]: the 198th
        // is in the last bucket.
        let p99 = f.p99.unwrap();
        assert!((0.1..=1.0).contains(&p99), "{p99}");
        assert_eq!(quantile(&[(0.1, 0)], 0, 0.99), None);
    }

    #[test]
    fn a_canarys_last_judgement_shows_its_verdict_step_and_figures() {
        let c = serde_json::json!({"history": [
            {"result": "joined", "step": 1},
            {"result": "fail", "step": 2,
             "canary": {"requests": 40, "success_rate": 80.0, "p99_ms": 12.5},
             "stable": {"requests": 400, "success_rate": 100.0, "p99_ms": null}},
            {"result": "rolled_back", "step": 2},
        ]});
        assert_eq!(
            last_judgement(&c),
            "fail at step 2: canary 40 req, 80.00 %, p99 12.5 ms; stable 400 req, 100.00 %, p99 –"
        );
        assert_eq!(last_judgement(&serde_json::json!({"history": []})), "–");
    }
}
