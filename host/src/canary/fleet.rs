//! Fleet-wide canary analysis: every replica judges the same closed window
//! of wall-clock time on the whole fleet's figures, read from Prometheus,
//! and so reaches the same verdict at the same moment, with no controller
//! and no protocol of Berth's own.
//!
//! - **Windows** are aligned to multiples of the canary's interval since
//!   the Unix epoch, and judged two scrape intervals after they close, when
//!   every replica's last samples of them are in. The queries are evaluated
//!   at the window's end, so the same data gives the same figures to every
//!   replica that asks.
//! - **The record** is the series the replicas export themselves:
//!   `berth_canary_fleet_state` and `berth_canary_fleet_step`, labelled
//!   with the module, both versions and a hash of the canary's settings.
//!   Each tick reads the fleet's highest of each over a day: any replica's
//!   rollback rolls every replica back, a promotion promotes, and a replica
//!   that missed a window or started late (a restart, a scale-up) takes up
//!   the fleet's step. Prometheus is already where the fleet's figures
//!   live; a Lease or ConfigMap would add RBAC and an API client for no
//!   data the series do not carry.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::Figures;
use crate::config::Analysis;

/// The fleet's record is read over this much history, so a canary's
/// outcome outlives the pods that reached it (a rollout replaces them all).
const RECORD_LOOKBACK: &str = "1d";
/// A Prometheus answer is a few series; more is not one.
const MAX_ANSWER: usize = 1 << 20;
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The window's queries, shared with the chart's dashboard.
const QUERIES: &str = include_str!("queries.promql");

/// The query named `name` of [`QUERIES`], for `matchers` over `range`.
fn window_query(name: &str, matchers: &str, range: &str) -> String {
    QUERIES
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("queries.promql has no query `{name}`"))
        // The range first: an operator's label value may hold `RANGE`.
        .replace("RANGE", range)
        .replace("MATCHERS", matchers)
}

/// A window of wall-clock time, `[start, end)`, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Its first millisecond.
    pub start_ms: u64,
    /// The first millisecond after it.
    pub end_ms: u64,
}

impl Window {
    /// The latest window that may be judged at `now_ms`: it ends on a
    /// multiple of `interval` at least two scrape intervals ago.
    pub fn judgeable(now_ms: u64, interval: Duration, scrape: Duration) -> Window {
        let interval = interval.as_millis().max(1) as u64;
        let settled = now_ms.saturating_sub(2 * scrape.as_millis() as u64);
        let end = settled / interval * interval;
        Window {
            start_ms: end.saturating_sub(interval),
            end_ms: end,
        }
    }

    /// The window after this one.
    pub fn next(self) -> Window {
        Window {
            start_ms: self.end_ms,
            end_ms: 2 * self.end_ms - self.start_ms,
        }
    }

    /// When this window may be judged.
    pub fn due_ms(self, scrape: Duration) -> u64 {
        self.end_ms + 2 * scrape.as_millis() as u64
    }
}

/// What the fleet has recorded of this canary: the highest state and
/// step any replica exported over the lookback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// `berth_canary_fleet_state`'s highest value (2 promoted, 3 rolled back).
    pub state: Option<i64>,
    /// The highest step any replica reached.
    pub step: Option<usize>,
}

/// The labels that name one canary across the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The module.
    pub module: String,
    /// The stable version's `version` label (sha256 prefix).
    pub stable: String,
    /// The canary's.
    pub canary: String,
    /// A hash of the canary's settings: changing any of them starts a
    /// canary the fleet has not judged.
    pub spec: String,
}

impl Identity {
    /// Label values in the order of the fleet gauges' label names.
    pub fn values(&self) -> [&str; 4] {
        [&self.module, &self.stable, &self.canary, &self.spec]
    }
}

/// A Prometheus client for one canary's questions.
pub struct Fleet {
    client: reqwest::Client,
    analysis: Analysis,
    identity: Identity,
    /// The questions never change for one canary: built once.
    window_queries: [String; 3],
    record_queries: [String; 2],
}

/// The figures of both versions in a window, with the queries that gave them.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    /// The window asked about.
    pub window: Window,
    /// The stable version's figures, fleet-wide.
    pub stable: Figures,
    /// The canary's.
    pub canary: Figures,
}

impl Fleet {
    /// A client for `analysis`, through the platform's roots for https.
    pub fn new(analysis: Analysis, interval: Duration, identity: Identity) -> Fleet {
        // reqwest is built without a provider of its own (as for the
        // registry): ring, once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .timeout(QUERY_TIMEOUT)
            // A redirect could carry the bearer token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let id = &identity;
        let matchers = |own: String| -> String {
            // The operator's labels, escaped as PromQL strings (JSON's
            // escapes are PromQL's).
            let fleet: String = analysis
                .labels
                .iter()
                .map(|(k, v)| format!(",{k}={}", serde_json::Value::from(v.as_str())))
                .collect();
            format!(
                "module={}{own}{fleet}",
                serde_json::Value::from(id.module.as_str())
            )
        };
        let window = matchers(format!(",version=~\"{}|{}\"", id.stable, id.canary));
        let range = format!("{}ms", interval.as_millis());
        let window_queries =
            ["requests", "shed", "p99"].map(|name| window_query(name, &window, &range));
        let record = matchers(format!(
            ",stable=\"{}\",canary=\"{}\",spec=\"{}\"",
            id.stable, id.canary, id.spec
        ));
        let record_queries = ["state", "step"].map(|what| {
            format!("max(max_over_time(berth_canary_fleet_{what}{{{record}}}[{RECORD_LOOKBACK}]))")
        });
        Fleet {
            client,
            analysis,
            identity,
            window_queries,
            record_queries,
        }
    }

    /// The names that identify this canary in the fleet's record.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The analysis settings.
    pub fn analysis(&self) -> &Analysis {
        &self.analysis
    }

    /// The queries of a window: requests by track and status, shed
    /// requests by version, and the p99 by track. Public for `/info`.
    pub fn window_queries(&self) -> &[String; 3] {
        &self.window_queries
    }

    /// The queries of the record: the highest state and step.
    pub fn record_queries(&self) -> &[String; 2] {
        &self.record_queries
    }

    /// Both versions' fleet-wide figures in `window`.
    pub async fn judge(&self, window: Window) -> Result<Judged, String> {
        let [requests, shed, p99] = self.window_queries();
        let at = Some(window.end_ms);
        let requests = self.query(requests, at).await?;
        let shed = self.query(shed, at).await?;
        let p99 = self.query(p99, at).await?;
        Ok(self.figures(window, &requests, &shed, &p99))
    }

    /// Figures from the three answers; a pure function, so the verdict at
    /// a window's edge can be tested on recorded answers.
    pub fn figures(
        &self,
        window: Window,
        requests: &[Sample],
        shed: &[Sample],
        p99: &[Sample],
    ) -> Judged {
        // `increase` extrapolates to the window's edges; whole requests are
        // what the thresholds count.
        let count = |v: f64| {
            if v.is_finite() && v > 0.0 {
                v.round() as u64
            } else {
                0
            }
        };
        let version_of = |track: &str| match track {
            "canary" => &self.identity.canary,
            _ => &self.identity.stable,
        };
        let figures = |track: &str| {
            let of_track = requests.iter().filter(|s| s.label("track") == Some(track));
            let with = |pick: &dyn Fn(&str) -> bool| -> u64 {
                of_track
                    .clone()
                    .filter(|s| s.label("status").is_some_and(pick))
                    .map(|s| count(s.value))
                    .sum()
            };
            let all = with(&|_| true);
            let errors = with(&|c| c.starts_with('5'));
            // Shed requests are the host's 503s, not the version's: shown,
            // never judged (as in a replica's own analysis). They come off
            // the 503s only: `increase` misses the first value of a series
            // born in the window, so the 503s may read fewer than the sheds,
            // and taking the rest off would hide the version's 500s.
            let shed_count: u64 = shed
                .iter()
                .filter(|s| s.label("version") == Some(version_of(track)))
                .map(|s| count(s.value))
                .sum();
            let shed_503s = shed_count.min(with(&|c| c == "503"));
            let p99_ms = p99
                .iter()
                .find(|s| s.label("track") == Some(track))
                .map(|s| s.value * 1e3)
                .filter(|v| v.is_finite());
            Figures::of(
                all.saturating_sub(shed_503s),
                errors.saturating_sub(shed_503s),
                p99_ms,
                shed_count,
            )
        };
        Judged {
            window,
            stable: figures("stable"),
            canary: figures("canary"),
        }
    }

    /// What the fleet has recorded.
    pub async fn record(&self) -> Result<Record, String> {
        let [state, step] = self.record_queries();
        let first =
            |samples: Vec<Sample>| samples.first().map(|s| s.value).filter(|v| v.is_finite());
        let state = first(self.query(state, None).await?);
        let step = first(self.query(step, None).await?);
        Ok(Record {
            state: state.map(|v| v as i64),
            step: step.filter(|v| *v >= 0.0).map(|v| v as usize),
        })
    }

    /// One instant query, at `at_ms` or now.
    async fn query(&self, promql: &str, at_ms: Option<u64>) -> Result<Vec<Sample>, String> {
        let base = self.analysis.prometheus.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!("{base}/api/v1/query"))
            .map_err(|e| format!("analysis.prometheus: {e}"))?;
        url.query_pairs_mut().append_pair("query", promql);
        if let Some(at) = at_ms {
            url.query_pairs_mut()
                .append_pair("time", &format!("{}.{:03}", at / 1000, at % 1000));
        }
        let mut req = self.client.get(url);
        if let Some(file) = &self.analysis.bearer_token_file {
            let token = std::fs::read_to_string(file)
                .map_err(|e| format!("analysis.bearer_token_file {}: {e}", file.display()))?;
            req = req.bearer_auth(token.trim());
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| format!("Prometheus unreachable: {}", without_url(&e)))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("Prometheus answer cut off: {}", without_url(&e)))?
        {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(format!("Prometheus answered more than {MAX_ANSWER} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse(status.as_u16(), &body)
    }
}

/// An error's text without the URL, whose query is long and says nothing
/// the log line does not.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "Prometheus");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// One series of an instant vector: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// Its value at the query's time.
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// The instant vector of a `/api/v1/query` answer, or why there is none.
pub fn parse(status: u16, body: &[u8]) -> Result<Vec<Sample>, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        data: Option<Data>,
        #[serde(default)]
        error: Option<String>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Data {
        result_type: String,
        result: Vec<Series>,
    }
    #[derive(serde::Deserialize)]
    struct Series {
        metric: BTreeMap<String, String>,
        value: (f64, String),
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|_| {
        format!(
            "Prometheus answered {status} with no API answer (is analysis.prometheus its base URL?)"
        )
    })?;
    if answer.status != "success" {
        let why: String = answer.error.unwrap_or_default().chars().take(200).collect();
        return Err(format!("Prometheus refused the query ({status}): {why}"));
    }
    let data = answer
        .data
        .ok_or("Prometheus answered success with no data")?;
    if data.result_type != "vector" {
        return Err(format!(
            "Prometheus answered a {}, not a vector",
            data.result_type
        ));
    }
    Ok(data
        .result
        .into_iter()
        .map(|s| Sample {
            labels: s.metric,
            // "NaN", "+Inf": parse as such; anything else is no value.
            value: s.value.1.parse().unwrap_or(f64::NAN),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(labels: &[(&str, &str)]) -> Fleet {
        let analysis = Analysis {
            prometheus: crate::config::SourceUrl("http://127.0.0.1:9".into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            scrape_interval: Duration::from_secs(1),
            bearer_token_file: None,
            rollback_after_unavailable: Duration::from_secs(600),
        };
        Fleet::new(
            analysis,
            Duration::from_secs(10),
            Identity {
                module: "orders".into(),
                stable: "aaaaaaaaaaaa".into(),
                canary: "cccccccccccc".into(),
                spec: "0badc0de".into(),
            },
        )
    }

    #[test]
    fn windows_are_aligned_to_the_wall_clock_and_wait_two_scrapes() {
        let (i, s) = (Duration::from_secs(10), Duration::from_secs(1));
        // 12:00:10.000 is a boundary; the window before it is judgeable
        // from 12:00:12.000 on, not a millisecond earlier.
        let boundary = 1_796_515_210_000;
        let before = Window::judgeable(boundary + 1_999, i, s);
        let at = Window::judgeable(boundary + 2_000, i, s);
        assert_eq!(before.end_ms, boundary - 10_000);
        assert_eq!((at.start_ms, at.end_ms), (boundary - 10_000, boundary));
        assert_eq!(at.due_ms(s), boundary + 2_000);
        assert_eq!(before.next(), at);
        // Every replica, whenever it looks within the same 10 s, asks
        // about the same window.
        for offset in [2_000, 5_000, 11_999] {
            assert_eq!(Window::judgeable(boundary + offset, i, s), at);
        }
    }

    fn sample(labels: &[(&str, &str)], value: &str) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value: value.parse().unwrap(),
        }
    }

    #[test]
    fn recorded_answers_give_the_same_figures_and_shed_requests_are_not_judged() {
        // An answer recorded from Prometheus 2.x for a window: increase()
        // extrapolates, so counts come as fractions.
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"track":"stable","status":"200"},"value":[1796515210,"180.4"]},
            {"metric":{"track":"canary","status":"200"},"value":[1796515210,"19.6"]},
            {"metric":{"track":"canary","status":"500"},"value":[1796515210,"2.2"]},
            {"metric":{"track":"canary","status":"503"},"value":[1796515210,"5"]}]}}"#;
        let requests = parse(200, body).unwrap();
        let shed = vec![sample(&[("version", "cccccccccccc")], "5")];
        let p99 = vec![
            sample(&[("track", "stable")], "0.012"),
            sample(&[("track", "canary")], "NaN"),
        ];
        let f = fleet(&[]);
        let w = Window {
            start_ms: 1_796_515_200_000,
            end_ms: 1_796_515_210_000,
        };
        let judged = f.figures(w, &requests, &shed, &p99);
        assert_eq!((judged.stable.requests, judged.stable.errors), (180, 0));
        assert_eq!(judged.stable.p99_ms, Some(12.0));
        // 20 + 2 + 5 answered, of which 5 shed: 22 judged, 2 failed.
        assert_eq!(
            (
                judged.canary.requests,
                judged.canary.errors,
                judged.canary.refused
            ),
            (22, 2, 5)
        );
        assert_eq!(judged.canary.p99_ms, None);
        // The same answers, the same figures: what every replica computes.
        let again = f.figures(w, &requests, &shed, &p99);
        assert_eq!(again.canary, judged.canary);
        // A burst shed in a window whose 503 series was born in it (its
        // first value is not in `increase`): the sheds hide no 500.
        let flood = vec![sample(&[("version", "cccccccccccc")], "45")];
        let born = &requests[..3];
        let judged = f.figures(w, born, &flood, &p99);
        assert_eq!(
            (
                judged.canary.requests,
                judged.canary.errors,
                judged.canary.refused
            ),
            (22, 2, 45)
        );
    }

    #[test]
    fn label_values_are_escaped_into_the_queries() {
        let f = fleet(&[("namespace", "shop\"}or vector(1)#"), ("job", "a\\b")]);
        let [requests, _, _] = f.window_queries();
        assert!(
            requests.contains(r#"namespace="shop\"}or vector(1)#""#),
            "{requests}"
        );
        assert!(requests.contains(r#"job="a\\b""#), "{requests}");
        assert!(requests.contains(r#"version=~"aaaaaaaaaaaa|cccccccccccc""#));
        assert!(requests.ends_with("[10000ms]))"), "{requests}");
        let [state, step] = f.record_queries();
        assert_eq!(
            state,
            r#"max(max_over_time(berth_canary_fleet_state{module="orders",stable="aaaaaaaaaaaa",canary="cccccccccccc",spec="0badc0de",job="a\\b",namespace="shop\"}or vector(1)#"}[1d]))"#
        );
        assert!(step.starts_with("max(max_over_time(berth_canary_fleet_step{"));
        // The placeholders of queries.promql in a label value stay as written.
        let f = fleet(&[("namespace", "RANGE MATCHERS")]);
        for q in f.window_queries() {
            assert!(q.contains(r#"namespace="RANGE MATCHERS""#), "{q}");
            assert!(q.contains("[10000ms]"), "{q}");
        }
    }

    #[test]
    fn answers_that_are_not_a_vector_are_refused_with_why() {
        let err = parse(
            400,
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err();
        assert!(
            err.contains("refused the query (400): parse error"),
            "{err}"
        );
        let err = parse(200, b"<html>login</html>").unwrap_err();
        assert!(err.contains("base URL"), "{err}");
        let err = parse(
            200,
            br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
        )
        .unwrap_err();
        assert!(err.contains("matrix"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_is_an_error_not_a_verdict() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut f = fleet(&[]);
        f.analysis.prometheus = crate::config::SourceUrl(format!("http://127.0.0.1:{port}"));
        let err = f.record().await.unwrap_err();
        assert!(err.starts_with("Prometheus unreachable"), "{err}");
        assert!(!err.contains("query="), "{err}");
    }
}
