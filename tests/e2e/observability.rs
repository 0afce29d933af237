//! Logs, Prometheus metrics (scraped by a real Prometheus server) and
//! OpenTelemetry traces (received by a real OTLP receiver).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::otlp::{KIND_CLIENT, KIND_SERVER, Receiver};
use crate::support::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{PARENT}-01")
}

#[test]
fn log_lines_are_json_and_request_lines_carry_ids() {
    let berth = Berth::start(
        &(module("hello", "/hello", "hello", "") + &module("m", "/m", "misbehave", "")),
    );
    let tp = traceparent();
    let r = get_with(
        &berth.url("/hello?name=Json"),
        &[("x-request-id", "rid-1"), ("traceparent", &tp)],
    );
    assert_eq!(r.status, 200);
    get_with(&berth.url("/m/print"), &[("x-request-id", "rid-2")]);
    let access = berth
        .wait_for_log(Duration::from_secs(5), |l| {
            l["target"] == "access" && l["request_id"] == "rid-2"
        })
        .expect("access log line");
    assert_eq!(access["method"], "GET");
    assert_eq!(access["route"], "/m");
    assert_eq!(access["status"], 200);
    assert!(access["duration_ms"].as_f64().is_some());

    // Every line parses; every request-scoped one carries the three ids.
    let text = berth.log_text();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["request_id"].is_string() {
            assert!(v["module"].is_string(), "no module: {line}");
            let trace = v["trace_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no trace_id: {line}"));
            assert_eq!(trace.len(), 32, "{line}");
        }
    }
    // The incoming traceparent's trace id is the one logged.
    let guest = berth
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "greeting Json")
        .expect("guest log line");
    assert_eq!(guest["trace_id"], TRACE_ID);
    assert_eq!(guest["request_id"], "rid-1");
    assert_eq!(guest["target"], "guest");
    // Guest levels are kept: stdout is info, wasi:logging keeps its level.
    let lines = berth.log_lines();
    let from = |msg: &str| lines.iter().find(|l| l["message"] == msg).cloned().unwrap();
    assert_eq!(from("a wasi:logging line")["level"], "INFO");
    assert_eq!(from("line two from stderr")["stream"], "stderr");
}

#[test]
fn the_access_log_can_be_turned_off() {
    let berth = Berth::start(
        &("[log]\naccess_log = false\n".to_owned() + &module("hello", "/hello", "hello", "")),
    );
    assert_eq!(get(&berth.url("/hello?name=quiet")).status, 200);
    berth
        .wait_for_log(Duration::from_secs(5), |l| l["message"] == "greeting quiet")
        .expect("guest line");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!berth.log_lines().iter().any(|l| l["target"] == "access"));
}

#[test]
fn log_level_filters_lines() {
    let out = run_expecting_exit(
        &module("hello", "/hello", "hello", ""),
        &[("LOG_LEVEL", "berth=loud")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("LOG_LEVEL"), "{}", out.stderr);

    // RUST_LOG-style directives: host lines at info, guest lines at warn.
    let berth = Berth::start_with(
        &module("hello", "/hello", "hello", ""),
        &[("LOG_LEVEL", "info,guest=warn")],
    );
    let r = get_with(
        &berth.url("/hello?name=hidden"),
        &[("x-request-id", "quiet-1")],
    );
    assert_eq!(r.status, 200);
    berth
        .wait_for_log(Duration::from_secs(5), |l| {
            l["request_id"] == "quiet-1" && l["target"] == "access"
        })
        .expect("access line still logged");
    assert!(!berth.log_text().contains("greeting hidden"));
}

#[test]
fn guest_metrics_show_up_and_the_series_cap_holds() {
    let berth = Berth::start(&module(
        "m",
        "/m",
        "misbehave",
        "limits = { metric_series = 5 }",
    ));
    assert_eq!(get(&berth.url("/m/metrics?n=10")).status, 200);
    let page = berth.metrics();
    let hits = page
        .lines()
        .filter(|l| l.starts_with("berth_guest_m_hits_total{"))
        .count();
    assert_eq!(hits, 5, "{page}");
    assert!(
        metric(
            &page,
            "berth_guest_metrics_dropped_total",
            &[("module", "m"), ("reason", "series_limit")]
        )
        .unwrap()
            >= 5.0
    );
    // Under the cap every kind is exported.
    let berth = Berth::start(&module("m", "/m", "misbehave", ""));
    get(&berth.url("/m/metrics?n=2"));
    get(&berth.url("/m/metrics?n=2"));
    // The same module imports berth:metrics@0.1.0 too, as modules built
    // before 0.1.1 do: the host links it and counts.
    let old = get(&berth.url("/m/metrics-0.1.0"));
    assert_eq!((old.status, old.body.as_str()), (200, "counted\n"));
    let page = berth.metrics();
    assert_eq!(
        metric(&page, "berth_guest_m_old_hits_total", &[("module", "m")]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &page,
            "berth_guest_m_hits_total",
            &[("module", "m"), ("shard", "1")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&page, "berth_guest_m_queue_depth", &[("module", "m")]),
        Some(4.0)
    );
    assert_eq!(
        metric(
            &page,
            "berth_guest_m_work_seconds_count",
            &[("module", "m")]
        ),
        Some(2.0)
    );
    // A histogram with buckets of the guest's choosing: 3 items, twice.
    for (le, count) in [("1", 0.0), ("5", 2.0), ("25", 2.0), ("+Inf", 2.0)] {
        assert_eq!(
            metric(
                &page,
                "berth_guest_m_order_items_bucket",
                &[("module", "m"), ("le", le)]
            ),
            Some(count),
            "le={le}"
        );
    }
    assert_eq!(
        metric(
            &page,
            "berth_guest_m_order_items_bucket",
            &[("module", "m"), ("le", "0.005")]
        ),
        None,
        "the host's latency buckets replaced the guest's"
    );
    // Labelled observations get the chosen buckets too.
    assert_eq!(
        metric(
            &page,
            "berth_guest_m_order_bytes_bucket",
            &[("module", "m"), ("kind", "book"), ("le", "1000")]
        ),
        Some(2.0)
    );
}

#[test]
fn metrics_pass_promtool() {
    let down = crate::downstream::Downstream::start(crate::downstream::Mode::Ok);
    let berth = Berth::start(
        &(module("hello", "/hello", "hello", "")
            + &module(
                "shop",
                "/m",
                "misbehave",
                &format!("allowed_outbound_hosts = [\"http://{}\"]", down.addr),
            )),
    );
    for path in ["/hello", "/m/panic", "/m/metrics?n=3", "/nope"] {
        get(&berth.url(path));
    }
    get(&berth.url(&format!("/m/fetch?url={}", down.url("/"))));
    // Named `shop`, not `m`: promtool reads a lone `m` as an abbreviated unit.
    let page = berth.metrics();
    for family in [
        "berth_http_server_requests_total",
        "berth_http_server_request_duration_seconds_bucket",
        "berth_http_server_active_requests",
        "berth_module_instantiation_duration_seconds_bucket",
        "berth_module_compile_duration_seconds_bucket",
        "berth_module_loads_total",
        "berth_guest_failures_total",
        "berth_http_client_requests_total",
        "berth_http_client_request_duration_seconds_bucket",
        "berth_build_info",
        "berth_module_info",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(page.contains(family), "{family} missing");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by scripts/setup.sh)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: berth\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (installed by scripts/setup.sh)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

#[test]
fn a_real_prometheus_scrapes_the_red_metrics() {
    let berth = Berth::start(&module("hello", "/hello", "hello", ""));
    let prom = start_prometheus(&berth.admin);
    for _ in 0..10 {
        assert_eq!(get(&berth.url("/hello")).status, 200);
    }
    let query = |q: &str| {
        let url = format!("{}/api/v1/query?query={}", prom.url, q);
        let r = get(&url);
        if r.status != 200 {
            return None;
        }
        let v = r.json();
        let result = v["data"]["result"].as_array()?.clone();
        result
            .first()
            .map(|s| s["value"][1].as_str().unwrap_or("").to_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (count, histogram) = loop {
        let count = query(
            "berth_http_server_requests_total%7Bmodule%3D%22hello%22%2Cstatus%3D%22200%22%7D",
        );
        let histogram =
            query("berth_http_server_request_duration_seconds_count%7Bmodule%3D%22hello%22%7D");
        if let (Some(c), Some(h)) = (&count, &histogram)
            && c == "10"
            && h == "10"
        {
            break (c.clone(), h.clone());
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the metrics: {count:?} {histogram:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!((count.as_str(), histogram.as_str()), ("10", "10"));
    let up = query("up%7Bjob%3D%22berth%22%7D");
    assert_eq!(up.as_deref(), Some("1"));
}

fn otel_env<'a>(receiver: &'a str, service: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver),
        ("OTEL_SERVICE_NAME", service),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
    ]
}

/// Two traced hosts: `berth-a` (the misbehave fixture at `/m`, with `env`
/// added, allowed to call b) in front of `berth-b` (hello at `/hello`).
fn two_hosts(receiver: &Receiver, env: &[(&str, &str)]) -> (Berth, Berth) {
    let endpoint = receiver.endpoint();
    let downstream = Berth::start_with(
        &module("hello", "/hello", "hello", ""),
        &otel_env(&endpoint, "berth-b"),
    );
    let mut a_env = otel_env(&endpoint, "berth-a");
    a_env.extend_from_slice(env);
    let upstream = Berth::start_with(
        &module(
            "m",
            "/m",
            "misbehave",
            &format!("allowed_outbound_hosts = [\"http://{}\"]", downstream.addr),
        ),
        &a_env,
    );
    (upstream, downstream)
}

#[test]
fn one_trace_spans_two_hosts() {
    let receiver = Receiver::start();
    let (upstream, downstream) = two_hosts(&receiver, &[]);
    let tp = traceparent();
    let target = downstream.url("/hello?name=traced");
    let r = get_with(
        &upstream.url(&format!("/m/fetch?url={target}")),
        &[("traceparent", &tp)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], 200);

    let spans = receiver.wait_for(Duration::from_secs(30), |spans| {
        let server = |svc: &str| {
            spans
                .iter()
                .any(|s| s.service == svc && s.kind == KIND_SERVER && s.trace_id == TRACE_ID)
        };
        server("berth-a") && server("berth-b")
    });
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == TRACE_ID).collect();
    let a_server = ours
        .iter()
        .find(|s| s.service == "berth-a" && s.kind == KIND_SERVER)
        .unwrap();
    assert_eq!(
        a_server.parent_span_id, PARENT,
        "continues the caller's span"
    );
    assert_eq!(a_server.attr("http.request.method"), Some("GET"));
    assert_eq!(a_server.attr("http.route"), Some("/m"));
    assert_eq!(a_server.attr("http.response.status_code"), Some("200"));
    let a_guest = ours
        .iter()
        .find(|s| s.service == "berth-a" && s.name.starts_with("guest"))
        .expect("a child span for the guest call");
    assert_eq!(a_guest.parent_span_id, a_server.span_id);
    let a_client = ours
        .iter()
        .find(|s| s.service == "berth-a" && s.kind == KIND_CLIENT)
        .expect("a client span for the outbound call");
    assert_eq!(a_client.parent_span_id, a_server.span_id);
    assert_eq!(a_client.attr("http.response.status_code"), Some("200"));
    let b_server = ours
        .iter()
        .find(|s| s.service == "berth-b" && s.kind == KIND_SERVER)
        .unwrap();
    assert_eq!(
        b_server.parent_span_id, a_client.span_id,
        "the downstream continues from the client span"
    );
    let b_guest = ours
        .iter()
        .find(|s| s.service == "berth-b" && s.name.starts_with("guest"))
        .expect("guest span on b");
    assert!(
        b_guest.events.iter().any(|e| e.contains("greeting traced")),
        "guest log attached to its span: {:?}",
        b_guest.events
    );
}

/// What went wrong is on the spans: a trap fails the request's span and
/// its guest call's (with the error as an event), a refused outbound call
/// fails its client span and says why, and a guest's stdout, stderr and
/// `wasi:logging` lines are events on its guest span. What the client did
/// is not the guest's failure: a body it never finishes (a 408) leaves the
/// guest span unfailed, and a request without a Host header gets its 400
/// with no guest span at all.
#[test]
fn failures_and_guest_output_show_on_the_spans() {
    use crate::otlp::STATUS_ERROR;
    let receiver = Receiver::start();
    // Nothing listens on port 1: the call is refused.
    let berth = Berth::start_with(
        &module(
            "m",
            "/m",
            "misbehave",
            "allowed_outbound_hosts = [\"http://127.0.0.1:1\"]\nlimits = { timeout = \"1s\" }",
        ),
        &otel_env(&receiver.endpoint(), "berth-f"),
    );
    let raw = |request: String| {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        answer
    };
    let trace = |n: u8| format!("{n:02x}{}", &TRACE_ID[2..]);
    let parent = |n: u8| format!("00-{}-00f067aa0ba902b7-01", trace(n));
    assert_eq!(
        get_with(&berth.url("/m/panic"), &[("traceparent", &parent(1))]).status,
        500
    );
    let r = get_with(&berth.url("/m/print"), &[("traceparent", &parent(2))]);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get_with(
        &berth.url("/m/fetch?url=http://127.0.0.1:1/"),
        &[("traceparent", &parent(3))],
    );
    assert_eq!(r.status, 502, "{}", r.body);
    // Three of the ten bytes promised, then nothing until the module's
    // timeout.
    let answer = raw(format!(
        "POST /m/echo HTTP/1.1\r\nHost: x\r\ntraceparent: {}\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabc",
        parent(4)
    ));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let answer = raw(format!(
        "GET /m/ok HTTP/1.1\r\ntraceparent: {}\r\nConnection: close\r\n\r\n",
        parent(5)
    ));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Host header"), "{answer}");

    let spans = receiver.wait_for(Duration::from_secs(30), |spans| {
        (1..=5).all(|n| {
            spans
                .iter()
                .any(|s| s.trace_id == trace(n) && s.kind == KIND_SERVER)
        })
    });
    let find = |n: u8, pred: &dyn Fn(&crate::otlp::Span) -> bool| {
        spans
            .iter()
            .find(|s| s.trace_id == trace(n) && pred(s))
            .unwrap_or_else(|| panic!("no such span in trace {n}: {spans:?}"))
    };
    let server = |n| find(n, &|s| s.kind == KIND_SERVER);
    let guest = |n| find(n, &|s| s.name.starts_with("guest"));

    assert_eq!(server(1).status.0, STATUS_ERROR, "{:?}", server(1));
    assert_eq!(server(1).attr("http.response.status_code"), Some("500"));
    let trapped = guest(1);
    assert_eq!(trapped.status.0, STATUS_ERROR, "{trapped:?}");
    assert!(!trapped.status.1.is_empty(), "says why: {trapped:?}");
    let why = trapped.event("request failed").expect("a failure event");
    assert!(
        why.iter().any(|(k, v)| k == "error" && v.contains("trap")),
        "{why:?}"
    );

    assert_eq!(server(2).status.0, 0, "a 200 is not a failure");
    let printed = guest(2);
    let has = |line: &str, key: &str, value: &str| {
        let attributes = printed
            .event(line)
            .unwrap_or_else(|| panic!("{line}: {printed:?}"));
        for (k, v) in [("level", "INFO"), ("module", "m"), (key, value)] {
            assert!(
                attributes.iter().any(|(a, b)| a == k && b == v),
                "{line}: {k}={v} in {attributes:?}"
            );
        }
    };
    has("line one from stdout", "stream", "stdout");
    has("line two from stderr", "stream", "stderr");
    has("a wasi:logging line", "target", "guest");
    assert_eq!(printed.status.0, 0);

    let client = find(3, &|s| s.kind == KIND_CLIENT);
    assert_eq!(client.status.0, STATUS_ERROR, "{client:?}");
    assert!(!client.status.1.is_empty(), "says why: {client:?}");
    assert_eq!(client.attr("server.port"), Some("1"));
    assert_eq!(server(3).status.0, STATUS_ERROR);
    assert_eq!(server(3).attr("http.response.status_code"), Some("502"));

    assert_eq!(server(4).attr("http.response.status_code"), Some("408"));
    let held_up = guest(4);
    assert_eq!(held_up.status.0, 0, "the client's doing: {held_up:?}");
    assert_eq!(server(4).status.0, 0);

    assert_eq!(server(5).attr("http.response.status_code"), Some("400"));
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id == trace(5) && s.name.starts_with("guest")),
        "no guest was called: {spans:?}"
    );
}

/// A ratio sampler samples new traces by ratio and follows the caller's
/// `sampled` flag, on this host and, through the `traceparent` it sends, on
/// the next one.
#[test]
fn the_parent_based_sampler_follows_the_callers_flag() {
    let receiver = Receiver::start();
    // Ratio 0 on berth-a: no new trace is sampled there, only those a
    // caller sampled.
    let (upstream, downstream) = two_hosts(
        &receiver,
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    );
    let target = downstream.url("/hello");
    let call = |flags: Option<(&str, &str)>| {
        let tp = flags.map(|(trace, f)| format!("00-{trace}-{PARENT}-{f}"));
        let headers: Vec<(&str, &str)> = tp.iter().map(|t| ("traceparent", t.as_str())).collect();
        let r = get_with(&upstream.url(&format!("/m/fetch?url={target}")), &headers);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["status"], 200);
    };
    let sampled = "11111111111111111111111111111111";
    let unsampled = "22222222222222222222222222222222";
    let marker = "33333333333333333333333333333333";
    call(Some((sampled, "01")));
    call(Some((unsampled, "00")));
    call(None);
    call(Some((marker, "01")));
    // Each host exports in its own batches: wait for the marker on both.
    let spans = receiver.wait_for(Duration::from_secs(30), |spans| {
        ["berth-a", "berth-b"].iter().all(|svc| {
            spans
                .iter()
                .any(|s| s.service == *svc && s.trace_id == marker)
        })
    });
    for service in ["berth-a", "berth-b"] {
        assert!(
            spans
                .iter()
                .any(|s| s.service == service && s.kind == KIND_SERVER && s.trace_id == sampled),
            "{service} exports the trace its caller sampled: {:?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.trace_id))
                .collect::<Vec<_>>()
        );
    }
    let others: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id != sampled && s.trace_id != marker)
        .map(|s| (&s.service, &s.name, &s.trace_id))
        .collect();
    assert!(
        others.is_empty(),
        "neither host exports the unsampled trace nor a new trace at ratio 0: {others:?}"
    );
}

#[test]
fn an_unknown_sampler_stops_the_start_and_a_remote_one_falls_back() {
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    for (sampler, arg, named) in [
        ("parentbased_ratio", "0.1", "OTEL_TRACES_SAMPLER"),
        ("parentbased_traceidratio", "1%", "OTEL_TRACES_SAMPLER_ARG"),
    ] {
        let mut env = otel_env(&endpoint, "bad");
        env.extend([
            ("OTEL_TRACES_SAMPLER", sampler),
            ("OTEL_TRACES_SAMPLER_ARG", arg),
        ]);
        let out = run_expecting_exit(&module("hello", "/hello", "hello", ""), &env);
        assert!(!out.status.success());
        assert!(
            out.stderr.contains(&format!("{named}=")),
            "names the variable: {}",
            out.stderr
        );
    }
    // Named by the spec, set by tooling, needing a service Berth does not
    // use: it starts with the default, and says so.
    let mut env = otel_env(&endpoint, "remote");
    env.push(("OTEL_TRACES_SAMPLER", "parentbased_jaeger_remote"));
    let berth = Berth::start_with(&module("hello", "/hello", "hello", ""), &env);
    assert_eq!(get(&berth.url("/hello")).status, 200);
    let note = berth
        .wait_for_log(Duration::from_secs(5), |l| {
            l["level"] == "WARN" && l["sampler"] == "parentbased_jaeger_remote"
        })
        .expect("a warning naming the sampler");
    assert!(
        note["message"]
            .as_str()
            .unwrap()
            .contains("parentbased_always_on"),
        "{note}"
    );
}

#[test]
fn https_upstreams_and_otlp_trust_the_platform_roots_and_spans_hide_credentials() {
    // A private CA, as a cluster with its own PKI has, named by
    // SSL_CERT_FILE; the same host without it must refuse the upstream.
    let ca = crate::tls::PrivateCa::new();
    let receiver = Receiver::start_with(Some(ca.server.clone()));
    let upstream = crate::downstream::Downstream::start_with(
        crate::downstream::Mode::Ok,
        Some(ca.server.clone()),
    );
    let port = upstream.addr.port();
    let config = module(
        "m",
        "/m",
        "misbehave",
        &format!("allowed_outbound_hosts = [\"https://localhost:{port}\"]"),
    );
    let endpoint = format!("https://localhost:{}", receiver.addr.port());
    let ca_file = ca.ca_file.display().to_string();
    let mut env = otel_env(&endpoint, "berth-tls");
    env.push(("SSL_CERT_FILE", &ca_file));
    let berth = Berth::start_with(&config, &env);
    let target = format!("https://localhost:{port}/private?token=sekrit-token");
    let r = get(&berth.url(&format!(
        "/m/fetch?url={}",
        target.replace('?', "%3F").replace('=', "%3D")
    )));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["body"], "downstream ok");

    let spans = receiver.wait_for(Duration::from_secs(30), |spans| {
        spans
            .iter()
            .any(|s| s.service == "berth-tls" && s.kind == KIND_CLIENT)
    });
    let client = spans
        .iter()
        .find(|s| s.service == "berth-tls" && s.kind == KIND_CLIENT)
        .unwrap();
    assert_eq!(
        client.attr("url.full"),
        Some(format!("https://localhost:{port}/private?token=REDACTED").as_str())
    );
    assert!(!berth.log_text().contains("sekrit"));
    drop(berth);

    let plain = Berth::start(&config);
    let r = get(&plain.url(&format!("/m/fetch?url={target}")));
    assert_eq!(r.status, 502, "an unknown CA must be refused: {}", r.body);
}

/// A caller's reserved trace-flag bits stop here on a traced request as
/// on an untraced one: only `sampled` and `random-trace-id` go on.
#[test]
fn reserved_trace_flags_are_not_passed_downstream_by_a_traced_host() {
    let receiver = Receiver::start();
    let (addr, seen, _downstream) = crate::downstream::traceparents();
    let berth = Berth::start_with(
        &module(
            "m",
            "/m",
            "misbehave",
            &format!("allowed_outbound_hosts = [\"http://{addr}\"]"),
        ),
        &otel_env(&receiver.endpoint(), "flags"),
    );
    // Sampled (traced here, the flags the SDK's span carries) and not.
    for (sent, kept) in [("ff", "03"), ("fe", "02")] {
        let tp = format!("00-{TRACE_ID}-{PARENT}-{sent}");
        let r = get_with(
            &berth.url(&format!("/m/fetch?url=http://{addr}/")),
            &[("traceparent", &tp)],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let last = seen.lock().unwrap().last().cloned().unwrap_or_default();
        assert!(
            last.starts_with(&format!("00-{TRACE_ID}-")) && last.ends_with(&format!("-{kept}")),
            "sent {sent}, passed on {last:?}"
        );
    }
}
