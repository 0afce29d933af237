//! WASI 0.3 (`wasi:http/handler@0.3`) modules: every host feature applied
//! to them as to 0.2 modules, instance reuse and its failure modes, and
//! which 0.3.x releases load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::downstream::{Blackhole, Downstream, Mode};
use crate::support::*;

/// The 0.3 fixture at `/p3`, with `extra` settings.
fn p3(extra: &str) -> String {
    module("svc", "/p3", "p3_service", extra)
}

fn count(berth: &Berth) -> u64 {
    let r = get(&berth.url("/p3/count"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.trim().parse().unwrap()
}

/// Sends the raw HTTP/1.1 `request` and returns every line of the answer
/// (head, chunk sizes and payload alike, trimmed) with when it arrived,
/// counted from the send.
fn timed_lines(berth: &Berth, request: &str) -> Vec<(String, Duration)> {
    use std::io::{BufRead, Write};
    let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let started = Instant::now();
    let mut reader = std::io::BufReader::new(conn);
    let (mut lines, mut line) = (vec![], String::new());
    while reader.read_line(&mut line).unwrap() > 0 {
        lines.push((line.trim().to_owned(), started.elapsed()));
        line.clear();
    }
    lines
}

#[test]
fn both_worlds_load_side_by_side_and_info_and_check_name_them() {
    let config = p3("config = { greeting = \"hi\" }") + &module("plain", "/", "plain_hello", "");
    let berth = Berth::start(&config);
    // Routing: each world behind its own prefix.
    assert_eq!(get(&berth.url("/p3")).body, "hi from p3\n");
    let other = get(&berth.url("/other"));
    assert_eq!((other.status, other.body.as_str()), (200, "hello\n"));
    let info = get(&berth.admin_url("/info")).json();
    let world = |name: &str| {
        info["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| (m["world"].clone(), m["instances"].clone()))
            .unwrap()
    };
    let (svc, reuse) = world("svc");
    assert_eq!(svc, "wasi:http@0.3");
    assert_eq!(reuse["max_requests"], 128);
    assert_eq!(reuse["max_concurrent"], 16);
    let (plain, reuse) = world("plain");
    assert_eq!(plain, "wasi:http@0.2");
    assert_eq!(reuse["max_requests"], 1);
    let loaded = berth
        .wait_for_log(Duration::from_secs(1), |l| {
            l["message"] == "module loaded" && l["module"] == "svc"
        })
        .unwrap();
    assert_eq!(loaded["world"], "wasi:http@0.3");

    let out = run_cli(&["check", wasm("p3_service").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("world: wasi:http@0.3"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("wasi:http/handler@0.3.2"),
        "{}",
        out.stdout
    );
    let out = run_cli(&["check", "--json", wasm("plain_hello").to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["world"], "wasi:http@0.2");
}

/// The fixture's `0.3.2` names rewritten to another release, everywhere
/// (export, imports and the embedded type information), so the component
/// is otherwise the same.
fn as_release(version: &str) -> tempfile::NamedTempFile {
    let mut bytes = std::fs::read(wasm("p3_plain")).unwrap();
    let (from, to) = (b"@0.3.2", format!("@{version}"));
    assert_eq!(to.len(), from.len());
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to.as_bytes());
            i += from.len();
        } else {
            i += 1;
        }
    }
    let file = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    file
}

#[test]
fn every_0_3_x_release_loads_and_0_4_does_not() {
    // wasmtime 50 implements 0.3.0; imports of later 0.3.x releases
    // resolve to it by semver, and the handler is found by the same rule.
    for version in ["0.3.0", "0.3.1", "0.3.2", "0.3.9"] {
        let file = as_release(version);
        let out = run_cli(&["check", file.path().to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{version}: {}{}",
            out.stdout,
            out.stderr
        );
        assert!(out.stdout.contains(&format!("wasi:http/handler@{version}")));
        assert!(
            out.stdout.contains("world: wasi:http@0.3"),
            "{}",
            out.stdout
        );
    }
    let file = as_release("0.3.1");
    let config = format!(
        "[modules.next]\nfile = {:?}\nroute = \"/\"\n",
        file.path().display().to_string()
    );
    let berth = Berth::start(&config);
    assert_eq!(get(&berth.url("/hello")).body, "hello\n");
    // A release the host does not implement is named, not half-served.
    let file = as_release("0.4.0");
    let out = run_cli(&["check", file.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stdout.contains("wasi:http/types@0.4.0  MISSING"),
        "{}",
        out.stdout
    );
}

#[test]
fn config_logging_guest_metrics_and_access_logs_work_for_p3() {
    let config = "[log]\naccess_log = true\n".to_owned()
        + &p3("config = { greeting = \"hej\" }\nsecrets = { token = \"s3cr3t\" }");
    let berth = Berth::start_with(
        &config,
        &[("BERTH_MODULES__SVC__CONFIG__GREETING", "hallo")],
    );
    assert_eq!(get(&berth.url("/p3")).body, "hallo from p3\n");
    let r = get_with(&berth.url("/p3/log"), &[("x-request-id", "p3-req-1")]);
    assert_eq!(r.status, 200);
    let line = berth
        .wait_for_log(Duration::from_secs(2), |l| {
            l["message"] == "p3 guest log line"
        })
        .expect("the guest's wasi:logging line");
    assert_eq!(line["module"], "svc");
    assert_eq!(line["request_id"], "p3-req-1");
    let access = berth
        .wait_for_log(Duration::from_secs(2), |l| {
            l["target"] == "access" && l["request_id"] == "p3-req-1"
        })
        .expect("an access log line for the p3 request");
    assert_eq!(access["status"], 200);
    assert_eq!(access["route"], "/p3");
    for _ in 0..3 {
        assert_eq!(get(&berth.url("/p3/metric")).status, 200);
    }
    let page = berth.metrics();
    assert_eq!(
        metric(&page, "berth_guest_svc_p3_hits_total", &[]),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &page,
            "berth_http_server_requests_total",
            &[("module", "svc"), ("status", "200")]
        ),
        Some(5.0)
    );
    // The secret reached the guest, and no log line holds it.
    let secret = get(&berth.url("/p3/secret"));
    assert_eq!(
        (secret.status, secret.body.as_str()),
        (200, "token of 6 bytes\n")
    );
    assert!(!berth.log_text().contains("s3cr3t"));
}

/// `max_concurrent` decides whether requests in flight together share an
/// instance: each instance numbers the requests it has served.
#[test]
fn max_concurrent_decides_whether_requests_in_flight_share_an_instance() {
    for (extra, want) in [("instances = { max_concurrent = 1 }", [1, 1]), ("", [1, 2])] {
        let berth = Berth::start(&p3(extra));
        let url = berth.url("/p3/sleep");
        let calls: Vec<_> = (0..2)
            .map(|i| {
                let url = url.clone();
                std::thread::sleep(Duration::from_millis(200 * i));
                std::thread::spawn(move || get_with(&url, &[("x-sleep-ms", "1500")]))
            })
            .collect();
        let mut seen: Vec<u64> = calls
            .into_iter()
            .map(|c| {
                let r = c.join().unwrap();
                assert_eq!(r.status, 200, "{}", r.body);
                r.body.trim().rsplit(' ').next().unwrap().parse().unwrap()
            })
            .collect();
        seen.sort();
        assert_eq!(seen, want, "`{extra}`: request numbers per instance");
        let created = metric(
            &berth.metrics(),
            "berth_instances_created_total",
            &[("module", "svc")],
        );
        assert_eq!(
            created,
            Some(if want == [1, 1] { 2.0 } else { 1.0 }),
            "`{extra}`"
        );
    }
}

#[test]
fn instances_are_reused_up_to_max_requests_then_retired() {
    let berth = Berth::start(&p3("instances = { max_requests = 3, max_concurrent = 1 }"));
    let seen: Vec<u64> = (0..7).map(|_| count(&berth)).collect();
    // One instance serves three requests in turn; then a new one starts.
    assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1]);
    let page = berth.metrics();
    let svc = [("module", "svc")];
    assert_eq!(
        metric(&page, "berth_instances_created_total", &svc),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &page,
            "berth_instances_retired_total",
            &[("module", "svc"), ("reason", "max_requests")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&page, "berth_instance_requests_sum", &svc),
        Some(6.0)
    );
}

#[test]
fn a_fresh_p3_instance_per_request_keeps_no_state_and_idle_instances_retire() {
    let berth = Berth::start(&p3("instances = { max_requests = 1 }"));
    for _ in 0..3 {
        assert_eq!(count(&berth), 1);
    }
    let berth = Berth::start(&p3("instances = { idle_timeout = \"200ms\" }"));
    assert_eq!(count(&berth), 1);
    assert_eq!(count(&berth), 2);
    std::thread::sleep(Duration::from_millis(700));
    // The idle instance is gone: the next request starts over.
    assert_eq!(count(&berth), 1);
    let page = berth.metrics();
    assert_eq!(
        metric(
            &page,
            "berth_instances_retired_total",
            &[("module", "svc"), ("reason", "idle")]
        ),
        Some(1.0)
    );
}

#[test]
fn a_trap_or_memory_hit_fails_its_request_and_the_next_gets_a_clean_instance() {
    let berth = Berth::start(&p3("limits = { memory = \"16MiB\" }"));
    assert_eq!(count(&berth), 1);
    assert_eq!(count(&berth), 2);
    let r = get(&berth.url("/p3/trap"));
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.json()["error"], "the module failed");
    assert_eq!(count(&berth), 1, "the trapped instance served again");
    let r = get(&berth.url("/p3/grow"));
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.json()["error"], "the module ran out of memory");
    assert_eq!(
        count(&berth),
        1,
        "the instance over its memory served again"
    );
    let page = berth.metrics();
    for (kind, reason) in [("trap", "trap"), ("memory_limit", "memory_limit")] {
        assert_eq!(
            metric(
                &page,
                "berth_guest_failures_total",
                &[("module", "svc"), ("kind", kind)]
            ),
            Some(1.0),
            "{kind}"
        );
        assert_eq!(
            metric(
                &page,
                "berth_instances_retired_total",
                &[("module", "svc"), ("reason", reason)]
            ),
            Some(1.0),
            "{reason}"
        );
    }
}

#[test]
fn a_request_over_its_deadline_gets_504_and_its_neighbour_is_not_cancelled() {
    let berth = Berth::start(&p3("limits = { timeout = \"1s\" }"));
    assert_eq!(count(&berth), 1);
    // A request that waits past its deadline, and a short one on the same
    // instance while it waits.
    let long = {
        let url = berth.url("/p3/sleep");
        std::thread::spawn(move || {
            let started = Instant::now();
            (get_with(&url, &[("x-sleep-ms", "5000")]), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let short = get_with(&berth.url("/p3/sleep"), &[("x-sleep-ms", "300")]);
    assert_eq!(short.status, 200, "{}", short.body);
    assert_eq!(
        short.body, "slept 300 as request 3\n",
        "not the shared instance"
    );
    let (long, took) = long.join().unwrap();
    assert_eq!(long.status, 504, "{}", long.body);
    assert!(took < Duration::from_secs(3), "504 after {took:?}");
    // The instance that ran over is retired: the next request starts over.
    assert_eq!(count(&berth), 1);
    // A guest that spins never yields to its neighbours: the component
    // model cannot cancel it, so its instance is torn down.
    let spin = get(&berth.url("/p3/spin"));
    assert_eq!(spin.status, 504, "{}", spin.body);
    assert_eq!(count(&berth), 1);
    assert_eq!(get(&berth.admin_url("/healthz")).status, 200);
    let page = berth.metrics();
    assert_eq!(
        metric(
            &page,
            "berth_guest_failures_total",
            &[("module", "svc"), ("kind", "timeout")]
        ),
        Some(2.0)
    );
    // Both instances are retired for their timeouts (the spinning one as
    // its worker gives up on it, a moment after the 504).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let retired = metric(
            &berth.metrics(),
            "berth_instances_retired_total",
            &[("module", "svc"), ("reason", "timeout")],
        );
        if retired == Some(2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retired for timeouts: {retired:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn p3_bodies_stream_both_ways_and_limits_hold() {
    let berth = Berth::start(&p3(
        "limits = { max_body = \"256KiB\", max_concurrency = 2 }",
    ));
    let body: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let r = post(&berth.url("/p3/echo"), &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body, "the echo differs");
    // Over `max_body`, chunked (no length up front), to a route that reads
    // the whole body before it answers: 413.
    let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = String::from(
        "POST /p3/fetch HTTP/1.1\r\nhost: x\r\nx-url: http://127.0.0.1:9/\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    );
    for _ in 0..40 {
        req.push_str(&format!("2000\r\n{}\r\n", "y".repeat(0x2000)));
    }
    req.push_str("0\r\n\r\n");
    use std::io::{Read, Write};
    let _ = conn.write_all(req.as_bytes());
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let r = get_with(&berth.url("/p3/drip"), &[("x-lines", "4")]);
    assert_eq!(r.body, "tick 0\ntick 1\ntick 2\ntick 3\n");
    // Frame by frame both ways on the pooled path: a host that gathered the
    // request body before the guest, or the response body before the
    // client, deadlocks.
    crate::streaming::ping_pong(&berth.addr, "/p3/echo", &[]);
    // The first drip frame leaves long before the last (50 lines, 20 ms
    // apart: a second).
    let lines = timed_lines(
        &berth,
        "GET /p3/drip HTTP/1.1\r\nhost: x\r\nx-lines: 50\r\nconnection: close\r\n\r\n",
    );
    let at = |tick: &str| {
        lines
            .iter()
            .find(|(l, _)| l == tick)
            .unwrap_or_else(|| panic!("no `{tick}` in {lines:?}"))
            .1
    };
    let (first, last) = (at("tick 0"), at("tick 49"));
    assert!(
        last - first >= Duration::from_millis(500),
        "the drip came in one piece: first {first:?}, last {last:?}"
    );
    // Over the concurrency limit: shed at once.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = berth.url("/p3/sleep");
            std::thread::spawn(move || get_with(&url, &[("x-sleep-ms", "1500")]))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let shed = get(&berth.url("/p3/count"));
    assert_eq!(shed.status, 503, "{}", shed.body);
    assert_eq!(shed.header("retry-after"), Some("1"));
    assert_eq!(
        metric(
            &berth.metrics(),
            "berth_http_server_shed_requests_total",
            &[("module", "svc")]
        ),
        Some(1.0)
    );
    for s in slow {
        assert_eq!(s.join().unwrap().status, 200);
    }
}

#[test]
fn a_p3_response_the_client_never_reads_frees_its_slot_at_the_deadline() {
    use std::io::Write;
    let berth = Berth::start(&p3(
        "limits = { max_concurrency = 2, timeout = \"2s\", max_body = \"64MiB\" }",
    ));
    // Two clients post 16 MiB to the streaming echo and read nothing: far
    // more than the kernel's buffers hold, so the echo backs up.
    let hogs: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let conn = std::net::TcpStream::connect(&berth.addr).unwrap();
            let mut w = conn.try_clone().unwrap();
            w.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
            std::thread::spawn(move || {
                let head = format!(
                    "POST /p3/echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                    16 << 20
                );
                let _ = w.write_all(head.as_bytes());
                let chunk = vec![b'x'; 64 << 10];
                for _ in 0..256 {
                    if w.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
            conn
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let shed = get(&berth.url("/p3/count"));
    assert_eq!(
        shed.status, 503,
        "the echoes should hold both slots: {}",
        shed.body
    );
    // `limits.timeout` bounds the delivery too: 2 s after they arrived,
    // their slots are free although nobody read a byte.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&berth.url("/p3/count"));
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unread responses still hold the slots: {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        berth
            .log_lines()
            .iter()
            .any(|l| l["message"] == "response body not delivered within limits.timeout: cut off")
    );
    drop(hogs);
}

/// A client that hangs up on the pooled path, before its head is whole,
/// halfway through its request body, or halfway through the answer, frees
/// its slot at once, not at the 60 s deadline, and the module goes on
/// serving with its one slot.
#[test]
fn a_client_that_hangs_up_on_the_pooled_path_frees_its_slot_at_once() {
    use std::io::{Read, Write};
    let berth = Berth::start(&p3("limits = { timeout = \"60s\", max_concurrency = 1 }"));
    let active = || {
        metric(
            &berth.metrics(),
            "berth_http_server_active_requests",
            &[("module", "svc")],
        )
    };
    let connect = || {
        let conn = std::net::TcpStream::connect(&berth.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn
    };
    // Reads until `marker` has come back.
    let read_until = |conn: &mut std::net::TcpStream, marker: &str| {
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains(marker) {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).expect("the answer so far");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    };
    let freed = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while active() != Some(0.0) {
            assert!(
                Instant::now() < deadline,
                "{what}: the request still holds its slot"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = get(&berth.url("/p3/count"));
        assert_eq!(r.status, 200, "{what}: {}", r.body);
    };

    // Mid-head: the request never reaches the guest.
    let mut conn = connect();
    conn.write_all(b"POST /p3/echo HTTP/1.1\r\nhost: x\r\ncontent-len")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(conn);
    freed("mid-head");

    // Mid-request-body: the echo's head and first line are out, 99 KB
    // of the body are still to come.
    let mut conn = connect();
    conn.write_all(
        b"POST /p3/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nfirst line\n",
    )
    .unwrap();
    read_until(&mut conn, "first line");
    assert_eq!(active(), Some(1.0), "the echo is mid-body");
    drop(conn);
    freed("mid-request-body");

    // Mid-response: a drip of 20 s, hung up after its first line.
    let mut conn = connect();
    conn.write_all(b"GET /p3/drip HTTP/1.1\r\nhost: x\r\nx-lines: 1000\r\n\r\n")
        .unwrap();
    read_until(&mut conn, "tick 0");
    assert_eq!(active(), Some(1.0), "the drip is mid-body");
    drop(conn);
    freed("mid-response");

    // A hang-up is the client's doing: no request was counted as failed.
    let page = berth.metrics();
    let failed: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("berth_http_server_requests_total{"))
        .filter(|l| l.contains("status=\"5") && !l.ends_with(" 0"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
fn a_p3_stream_cut_at_its_deadline_closes_the_connection() {
    use std::io::{Read, Write};
    let berth = Berth::start(&p3("limits = { timeout = \"2s\" }"));
    // A client that reads a stream the guest is slow to write (5,000
    // lines, 20 ms apart: 100 s): at the deadline the response is cut and
    // the connection closed, not left hanging half-sent. No timing is
    // asserted: a read that waits 30 s for a 100 s stream tells the two
    // apart.
    let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"GET /p3/drip HTTP/1.1\r\nhost: x\r\nx-lines: 5000\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let ended = conn.read_to_end(&mut seen);
    assert!(
        !matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "the connection hung after the deadline ({} bytes)",
        seen.len()
    );
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("tick 4999"), "the stream was not cut");
}

#[test]
fn concurrent_requests_on_one_p3_instance_keep_their_own_trace_and_ids() {
    // A downstream that records the `traceparent` of every call.
    let (addr, seen, _downstream) = crate::downstream::traceparents();
    let berth = Berth::start(&p3(&format!(
        "allowed_outbound_hosts = [\"http://{addr}\"]\ninstances = {{ max_concurrent = 4 }}"
    )));
    let target = format!("http://{addr}/");
    let parent = |id: char| format!("00-{}-{}-01", id.to_string().repeat(32), "1".repeat(16));
    // A waits, then calls; B starts on the same instance meanwhile, and
    // calls at once.
    let slow = {
        let (url, target, parent) = (berth.url("/p3/fetch"), target.clone(), parent('a'));
        std::thread::spawn(move || {
            get_with(
                &url,
                &[
                    ("x-url", &target),
                    ("x-sleep-ms", "800"),
                    ("traceparent", &parent),
                    ("x-request-id", "request-a"),
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let fast = get_with(
        &berth.url("/p3/fetch"),
        &[
            ("x-url", &target),
            ("traceparent", &parent('b')),
            ("x-request-id", "request-b"),
        ],
    );
    assert_eq!(fast.status, 200, "{}", fast.body);
    assert_eq!(slow.join().unwrap().status, 200);
    assert_eq!(count(&berth), 3, "all three on one instance");
    let trace_ids: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.split('-').nth(1).unwrap_or_default().to_owned())
        .collect();
    let mut sorted = trace_ids.clone();
    sorted.sort();
    assert_eq!(sorted, ["a".repeat(32), "b".repeat(32)], "{trace_ids:?}");
    // Each guest log line is the request's own.
    for (id, trace) in [("request-a", 'a'), ("request-b", 'b')] {
        let line = berth
            .wait_for_log(Duration::from_secs(5), |l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("fetching"))
                    && l["request_id"] == id
            })
            .unwrap_or_else(|| panic!("no guest line of {id}"));
        assert_eq!(line["trace_id"], trace.to_string().repeat(32), "{line}");
    }
    // Guest stdout on the shared instance: never another request's ids.
    // Stdout is relayed after the guest's own log line, so wait for both
    // before counting.
    for id in ["request-a", "request-b"] {
        berth
            .wait_for_log(Duration::from_secs(5), |l| {
                l["stream"] == "stdout" && l["request_id"] == id
            })
            .unwrap_or_else(|| panic!("no stdout line of {id}"));
    }
    let printed: Vec<_> = berth
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["stream"] == "stdout"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("stdout: fetching"))
        })
        .collect();
    assert_eq!(printed.len(), 2, "{printed:?}");
    let mut ids: Vec<&str> = printed
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["request-a", "request-b"], "{printed:?}");
}

fn fetch(berth: &Berth, url: &str) -> Reply {
    get_with(&berth.url("/p3/fetch"), &[("x-url", url)])
}

#[test]
fn p3_outbound_calls_follow_the_policy() {
    let down = Downstream::start(Mode::Ok);
    let port = down.addr.port();
    let config = p3(&format!(
        "allowed_outbound_hosts = [\"http://{}\"]\noutbound = {{ retries = 0 }}",
        down.addr
    )) + &module(
        "wild",
        "/wild",
        "p3_service",
        "allowed_outbound_hosts = [\"http://*:*\"]",
    );
    let berth = Berth::start(&config);
    let r = fetch(&berth, &down.url("/x"));
    assert_eq!(r.body, "200 downstream ok", "{}", r.body);
    let r = get_with(&berth.url("/p3/fetch"), &[("x-url", &down.url("/p"))]);
    assert_eq!(r.status, 200);
    // A POST whose body the guest passes on.
    let posted = post_via_fetch(&berth, &down.url("/post"), &"b".repeat(100_000));
    assert_eq!(posted, "200 downstream ok");
    assert_eq!(down.bodies().last(), Some(&100_000));
    // Not listed, and loopback behind a wildcard: refused.
    for target in [
        format!("http://127.0.0.2:{port}/"),
        format!("http://localhost:{port}/"),
    ] {
        let r = fetch(&berth, &target);
        assert_eq!(r.status, 502, "{target}: {}", r.body);
        assert!(r.body.contains("HttpRequestDenied"), "{}", r.body);
    }
    let r = get_with(&berth.url("/wild/fetch"), &[("x-url", &down.url("/"))]);
    assert!(
        r.body.contains("HttpRequestDenied"),
        "loopback guard: {}",
        r.body
    );
    let hits = down.hits();
    assert_eq!(hits, 3, "denied calls reached the upstream");
    // The three calls that went out shared one pooled connection.
    assert_eq!(
        established_to(berth.pid(), down.addr.port()),
        1,
        "calls from a p3 guest are not pooled"
    );
    let page = berth.metrics();
    assert!(
        metric(
            &page,
            "berth_http_client_denied_total",
            &[("module", "svc")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
}

/// `POST /p3/fetch` with `body`, which the fixture forwards to `url`.
fn post_via_fetch(berth: &Berth, url: &str, body: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    agent
        .post(&berth.url("/p3/fetch"))
        .header("x-url", url)
        .send(body)
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

#[test]
fn p3_outbound_retries_breaker_and_timeouts_apply() {
    let down = Downstream::start(Mode::FailFirst(2, None));
    let outbound = "retries = 3, retry_backoff = \"10ms\", first_byte_timeout = \"500ms\", \
                    circuit_breaker = { failures = 3, open_for = \"30s\", half_open_probes = 1 }";
    let config = p3(&format!(
        "allowed_outbound_hosts = [\"http://{}\"]\noutbound = {{ {outbound} }}",
        down.addr
    ));
    let berth = Berth::start(&config);
    // Retried until it answers.
    assert_eq!(fetch(&berth, &down.url("/r")).body, "200 downstream ok");
    assert_eq!(down.hits(), 3);
    // A hanging upstream times out within the bound.
    down.set_mode(Mode::Hang);
    let started = Instant::now();
    let r = fetch(&berth, &down.url("/h"));
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // An upstream that keeps failing opens the breaker: calls fail fast
    // without reaching it.
    down.set_mode(Mode::AlwaysFail);
    for _ in 0..3 {
        fetch(&berth, &down.url("/f"));
    }
    let before = down.hits();
    let r = fetch(&berth, &down.url("/f"));
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(down.hits(), before, "the open breaker let a call through");
    let page = berth.metrics();
    let upstream = down.addr.to_string();
    assert_eq!(
        metric(
            &page,
            "berth_http_client_circuit_state",
            &[("module", "svc"), ("upstream", upstream.as_str())]
        ),
        Some(2.0)
    );
}

#[test]
fn a_p3_fan_out_calls_two_upstreams_at_once_and_streams_both() {
    // a answers after 1 s, b after 2.5 s: one after the other the calls
    // would take 3.5 s; at once, 2.5 s. Streamed, a's line arrives before
    // b has answered. (Timing is the point here; the margins are 0.7 s and
    // more.)
    let a = Downstream::start(Mode::Delay(Duration::from_millis(1000), "from a".into()));
    let b = Downstream::start(Mode::Delay(Duration::from_millis(2500), "from b".into()));
    let config = p3(&format!(
        "allowed_outbound_hosts = [\"http://{}\", \"http://{}\"]",
        a.addr, b.addr
    ));
    let berth = Berth::start(&config);
    let request = format!(
        "GET /p3/fanout HTTP/1.1\r\nhost: x\r\nx-url-a: {}\r\nx-url-b: {}\r\nconnection: close\r\n\r\n",
        a.url("/a"),
        b.url("/b")
    );
    let lines: Vec<_> = timed_lines(&berth, &request)
        .into_iter()
        .filter(|(l, _)| l.starts_with("200 from"))
        .collect();
    let names: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(names, ["200 from a", "200 from b"]);
    let (first, last) = (lines[0].1, lines[1].1);
    assert!(
        first < Duration::from_millis(2300),
        "a's answer waited for b's: {first:?}"
    );
    assert!(
        last < Duration::from_millis(3200),
        "the calls ran one after the other: {last:?}"
    );
    assert_eq!((a.hits(), b.hits()), (1, 1));
}

#[test]
fn a_p3_module_hot_swaps_to_p2_and_back_under_load_and_sigterm_drains_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svc.wasm");
    std::fs::copy(wasm("p3_service"), &file).unwrap();
    let config = format!(
        "[runtime]\nrescan_interval = \"100ms\"\n[shutdown]\ndrain_delay = \"0s\"\n\
         grace_period = \"10s\"\n[modules.svc]\nfile = {:?}\nroute = \"/p3\"\n",
        file.display().to_string()
    );
    let mut berth = Berth::start(&config);
    assert_eq!(count(&berth), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (url, stop) = (berth.url("/p3/count"), stop.clone());
        std::thread::spawn(move || {
            let mut failures = vec![];
            while !stop.load(Ordering::Relaxed) {
                let r = get(&url);
                if r.status != 200 {
                    failures.push(format!("{} {}", r.status, r.body));
                }
            }
            failures
        })
    };
    // To the 0.2 hello and back, by renaming new files over the old one;
    // the answers switch with `/info`.
    for (from, world, answers) in [
        ("plain_hello", "wasi:http@0.2", "hello\n"),
        ("p3_service", "wasi:http@0.3", "hello from p3\n"),
    ] {
        let tmp = dir.path().join("next.wasm");
        std::fs::copy(wasm(from), &tmp).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = get(&berth.admin_url("/info")).json();
            if info["modules"][0]["world"] == world {
                break;
            }
            assert!(Instant::now() < deadline, "no swap to {world}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(get(&berth.url("/p3")).body, answers, "{world} answers");
    }
    stop.store(true, Ordering::Relaxed);
    let failures = load.join().unwrap();
    assert!(
        failures.is_empty(),
        "requests failed during swaps: {failures:?}"
    );
    // SIGTERM with a p3 request in flight: it completes, then berth exits 0.
    let slow = {
        let url = berth.url("/p3/sleep");
        std::thread::spawn(move || get_with(&url, &[("x-sleep-ms", "800")]))
    };
    std::thread::sleep(Duration::from_millis(200));
    std::process::Command::new("kill")
        .args(["-TERM", &berth.pid().to_string()])
        .status()
        .unwrap();
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let status = berth.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_eq!(status.code(), Some(0));
}

/// `berth compile` of `config` into `out`, as an image build would run it.
fn compile_into(config: &str, out: &std::path::Path) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("berth.toml");
    std::fs::write(&file, config).unwrap();
    std::process::Command::new(crate::support::berth_bin())
        .arg("compile")
        .arg("--config")
        .arg(&file)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn a_prebuilt_folder_from_berth_compile_starts_pods_without_compiling() {
    use std::os::unix::fs::PermissionsExt;
    let built = tempfile::tempdir().unwrap();
    // Parents made as needed, as in an image build.
    let out = built.path().join("opt/berth/prebuilt");
    let modules = p3("") + &module("plain", "/", "plain_hello", "");
    let portable = "[runtime]\ncompile_target = \"portable\"\ncache_dir = \"\"\n";
    let made = compile_into(&format!("{portable}{modules}"), &out);
    let said = String::from_utf8_lossy(&made.stdout);
    assert!(
        made.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert!(said.contains("svc: ") && said.contains("plain: "), "{said}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        2,
        "an entry per module"
    );
    // As in an image: root's, read-only for everyone.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o555)).unwrap();
    let serve = |runtime: &str| {
        format!(
            "[runtime]\n{runtime}cache_dir = \"\"\nprebuilt_dir = {:?}\n{modules}",
            out.display().to_string()
        )
    };
    let compiled = |berth: &Berth, module: &str| {
        metric(
            &berth.metrics(),
            "berth_module_compilations_total",
            &[("module", module)],
        )
    };
    {
        let berth = Berth::start(&serve("compile_target = \"portable\"\n"));
        assert_eq!(count(&berth), 1);
        assert_eq!(get(&berth.url("/")).body.trim(), "hello");
        for module in ["svc", "plain"] {
            assert_eq!(compiled(&berth, module), Some(0.0), "{module} was compiled");
            berth
                .wait_for_log(Duration::from_secs(1), |l| {
                    l["message"] == "loaded from the prebuilt folder" && l["module"] == module
                })
                .unwrap_or_else(|| panic!("{module}: {}", berth.log_text()));
        }
    }
    // Another CPU target names other entries: compiled, never refused.
    let berth = Berth::start(&serve(""));
    assert_eq!(count(&berth), 1);
    assert_eq!(compiled(&berth, "svc"), Some(1.0));
    drop(berth);

    // A folder others may write to is refused, by its key.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = run_expecting_exit(&serve(""), &[]);
    assert_ne!(refused.status.code(), Some(0));
    assert!(
        refused.stderr.contains("runtime.prebuilt_dir")
            && refused.stderr.contains("others may write"),
        "{}",
        refused.stderr
    );
    // Nor does `berth compile` write into such a folder: whoever can
    // write there could plant what the pods run.
    let made = compile_into(&format!("{portable}{modules}"), &out);
    assert_eq!(made.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&made.stderr).contains("others may write"));
    // A config naming nothing to compile, and a module that is not there.
    let none = compile_into("", &built.path().join("none"));
    assert_eq!(none.status.code(), Some(2));
    let missing = compile_into(
        "[modules.gone]\nfile = \"/nonexistent/gone.wasm\"\nroute = \"/\"\n",
        &built.path().join("gone"),
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("gone"));
}

#[test]
fn p3_modules_use_the_compile_cache() {
    let cache = tempfile::tempdir().unwrap();
    let config = format!(
        "[runtime]\ncache_dir = {:?}\n",
        cache.path().display().to_string()
    ) + &p3("")
        + &module("plain", "/", "plain_hello", "");
    // The compiler's runs, counted by the host where it calls Cranelift.
    let compiled = |berth: &Berth, module: &str| {
        metric(
            &berth.metrics(),
            "berth_module_compilations_total",
            &[("module", module)],
        )
    };
    {
        let berth = Berth::start(&config);
        assert_eq!(count(&berth), 1);
        assert!(!berth.log_text().contains("loaded from the compile cache"));
        for module in ["svc", "plain"] {
            assert_eq!(compiled(&berth, module), Some(1.0), "{module}");
        }
    }
    let berth = Berth::start(&config);
    assert_eq!(count(&berth), 1);
    for module in ["svc", "plain"] {
        assert_eq!(
            compiled(&berth, module),
            Some(0.0),
            "{module} was compiled again"
        );
        berth
            .wait_for_log(Duration::from_secs(1), |l| {
                l["message"] == "loaded from the compile cache" && l["module"] == module
            })
            .unwrap_or_else(|| panic!("{module}: no cache load logged"));
    }
}

#[test]
fn p3_requests_are_traced_across_two_hosts_with_guest_logs_on_their_spans() {
    use crate::otlp::{KIND_CLIENT, KIND_SERVER, Receiver};
    const TRACE_ID: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let env = |service: &'static str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", service.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let (b_env, a_env) = (env("p3-b"), env("p3-a"));
    let b_pairs: Vec<(&str, &str)> = b_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let b = Berth::start_with(&p3(""), &b_pairs);
    let a_pairs: Vec<(&str, &str)> = a_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Berth::start_with(
        &p3(&format!("allowed_outbound_hosts = [\"http://{}\"]", b.addr)),
        &a_pairs,
    );
    let tp = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let r = get_with(
        &a.url("/p3/fetch"),
        &[("x-url", &b.url("/p3/log")), ("traceparent", &tp)],
    );
    assert_eq!(r.body, "200 logged\n");
    let spans = receiver.wait_for(Duration::from_secs(30), |spans| {
        let has = |service: &str, guest: bool, kind: i32| {
            spans.iter().any(|s| {
                s.service == service
                    && s.trace_id == TRACE_ID
                    && (if guest {
                        s.name.starts_with("guest")
                    } else {
                        s.kind == kind
                    })
            })
        };
        has("p3-a", false, KIND_SERVER)
            && has("p3-a", true, 0)
            && has("p3-a", false, KIND_CLIENT)
            && has("p3-b", false, KIND_SERVER)
            && has("p3-b", true, 0)
    });
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == TRACE_ID).collect();
    let find = |service: &str, pred: &dyn Fn(&crate::otlp::Span) -> bool| {
        ours.iter()
            .find(|s| s.service == service && pred(s))
            .unwrap_or_else(|| panic!("no such span on {service}: {ours:?}"))
    };
    let a_server = find("p3-a", &|s| s.kind == KIND_SERVER);
    let a_guest = find("p3-a", &|s| s.name.starts_with("guest"));
    assert_eq!(a_guest.parent_span_id, a_server.span_id);
    let a_client = find("p3-a", &|s| s.kind == KIND_CLIENT);
    assert_eq!(a_client.parent_span_id, a_server.span_id);
    let b_server = find("p3-b", &|s| s.kind == KIND_SERVER);
    assert_eq!(
        b_server.parent_span_id, a_client.span_id,
        "the trace crosses the hop"
    );
    let b_guest = find("p3-b", &|s| s.name.starts_with("guest"));
    assert_eq!(b_guest.parent_span_id, b_server.span_id);
    // A reused instance runs outside the guest span (in its worker's task):
    // its log lines land on the request's span.
    assert!(
        b_server
            .events
            .iter()
            .any(|e| e.contains("p3 guest log line")),
        "guest log on its request's span: {:?}",
        b_server.events
    );
}

#[test]
fn a_request_that_logged_on_a_reused_instance_has_its_span_exported_when_it_ends() {
    use crate::otlp::{KIND_SERVER, Receiver};
    const TRACE_ID: &str = "6bf92f3577b34da6a3ce929d0e0e4738";
    let receiver = Receiver::start();
    let berth = Berth::start_with(
        // The instance outlives the wait below by far: a span held by it
        // would be exported only when it retires.
        &p3("instances = { idle_timeout = \"10m\" }"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
            ("OTEL_SERVICE_NAME", "p3-log"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let tp = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let r = get_with(&berth.url("/p3/log"), &[("traceparent", &tp)]);
    assert_eq!(r.status, 200, "{}", r.body);
    // Fails (the spans got so far shown) if the span never comes while
    // the instance lives.
    receiver.wait_for(Duration::from_secs(20), |spans| {
        spans
            .iter()
            .any(|s| s.trace_id == TRACE_ID && s.kind == KIND_SERVER)
    });
}

#[test]
fn a_shutdown_retires_reused_instances_as_stopped_not_as_traps() {
    // Retirements without an error are debug lines.
    let mut berth = Berth::start_with(
        &format!(
            "[shutdown]\ndrain_delay = \"0s\"\n{}",
            p3("instances = { idle_timeout = \"60s\" }")
        ),
        &[("LOG_LEVEL", "info,berth_host::runtime::reuse=debug")],
    );
    assert_eq!(get(&berth.url("/p3/")).status, 200);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &berth.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = berth
        .wait_exit(Duration::from_secs(30))
        .expect("berth did not exit");
    assert_eq!(exit.code(), Some(0));
    let retired: Vec<_> = berth
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "instance retired")
        .collect();
    assert!(!retired.is_empty(), "no retirement logged");
    assert!(
        retired.iter().all(|l| l["reason"] == "stopped"),
        "a normal shutdown reported as something else: {retired:?}"
    );
}

#[test]
fn a_p3_body_that_stops_arriving_is_a_408_and_a_slow_p3_guest_a_504() {
    use std::io::{Read, Write};
    let berth = Berth::start(&p3("limits = { timeout = \"1s\" }"));
    // /fetch reads the whole body first, and waits for bytes the client
    // never sends.
    let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(
        b"POST /p3/fetch HTTP/1.1\r\nhost: x\r\nx-url: http://127.0.0.1:9/\r\n\
          content-length: 1000\r\n\r\nten bytes.",
    )
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).unwrap_or(0);
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // A guest that sleeps past its deadline with a whole body unread: 504.
    let slow = get_with(&berth.url("/p3/sleep"), &[("x-sleep-ms", "3000")]);
    assert_eq!(slow.status, 504, "{}", slow.body);
}

/// The guest's own connect, first-byte and between-bytes timeouts hold on
/// the pooled path too, far under the host's 10 s.
#[test]
fn a_p3_guests_shorter_request_timeouts_hold() {
    let hang = Downstream::start(Mode::Hang);
    let stall = Downstream::start(Mode::Stall);
    let hole = Blackhole::start();
    let berth = Berth::start(&p3(&format!(
        "allowed_outbound_hosts = [\"http://{}\", \"http://{}\", \"http://{}\"]\n\
         outbound = {{ retries = 0, connect_timeout = \"10s\" }}",
        hang.addr, stall.addr, hole.addr
    )));
    // Each case sets only the timeout it is about.
    for (url, option, what) in [
        (hole.url("/x"), "x-connect-within-ms", "connect"),
        (hang.url("/x"), "x-within-ms", "first byte"),
        (stall.url("/x"), "x-within-ms", "between bytes"),
    ] {
        let started = Instant::now();
        let r = get_with(&berth.url("/p3/fetch"), &[("x-url", &url), (option, "200")]);
        let took = started.elapsed();
        assert_eq!(r.status, 502, "{what}: {}", r.body);
        assert!(r.body.contains("Timeout"), "{what}: {}", r.body);
        // A wide margin for a busy machine; the host's would take 10 s.
        assert!(
            took < Duration::from_secs(5),
            "{what}: the guest's 200 ms did not apply: {took:?}"
        );
    }
}

#[test]
fn a_stream_cut_by_a_neighbours_trap_never_looks_complete() {
    use std::io::{Read, Write};
    // One reused instance: a drip of 150 lines (3 s) is in flight when a
    // neighbour on the same instance traps and takes the instance down.
    // The drip's stream ends then, and must not end as if complete.
    let berth = Berth::start(&p3(
        "instances = { max_concurrent = 16 }\nlimits = { timeout = \"10s\" }",
    ));
    assert_eq!(get(&berth.url("/p3/count")).status, 200, "a warm instance");
    let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(
        b"GET /p3/drip HTTP/1.1\r\nhost: x\r\nx-lines: 150\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut seen = vec![0u8; 256];
    let n = conn.read(&mut seen).unwrap();
    seen.truncate(n);
    let trap = get(&berth.url("/p3/trap"));
    assert_eq!(trap.status, 500, "{}", trap.body);
    conn.read_to_end(&mut seen).expect("the stream ends");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("tick 149"),
        "the drip outlived the trap: the neighbour ran elsewhere"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a stream cut by its instance's end looked complete: {text}"
    );
}

#[test]
fn a_quick_request_on_a_busy_reused_instance_has_a_span_as_short_as_itself() {
    use crate::otlp::{KIND_SERVER, Receiver};
    let receiver = Receiver::start();
    let berth = Berth::start_with(
        &p3("instances = { max_concurrent = 4, idle_timeout = \"10m\" }"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
            ("OTEL_SERVICE_NAME", "p3-span-time"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let parent = |id: char| format!("00-{}-{}-01", id.to_string().repeat(32), "1".repeat(16));
    // The long request keeps the instance busy for 3 s; the quick one
    // runs on the same instance meanwhile and takes 200 ms.
    let long = {
        let (url, tp) = (berth.url("/p3/sleep"), parent('c'));
        std::thread::spawn(move || get_with(&url, &[("x-sleep-ms", "3000"), ("traceparent", &tp)]))
    };
    std::thread::sleep(Duration::from_millis(300));
    let quick = get_with(
        &berth.url("/p3/sleep"),
        &[("x-sleep-ms", "200"), ("traceparent", &parent('d'))],
    );
    assert_eq!(quick.status, 200, "{}", quick.body);
    assert_eq!(long.join().unwrap().status, 200);
    assert_eq!(count(&berth), 3, "all three on one instance");
    let server = |spans: &[crate::otlp::Span], id: char| {
        let trace = id.to_string().repeat(32);
        spans
            .iter()
            .find(|s| s.trace_id == trace && s.kind == KIND_SERVER)
            .cloned()
    };
    let spans = receiver.wait_for(Duration::from_secs(20), |spans| {
        server(spans, 'c').is_some() && server(spans, 'd').is_some()
    });
    let (long, quick) = (server(&spans, 'c').unwrap(), server(&spans, 'd').unwrap());
    // Compared with each other, not with a clock: a 200 ms request on a
    // 15 times longer one's instance has a span under half as long, and
    // ends first. Held until the instance had nothing left to run, it
    // would last about as long as the long one.
    let took = |s: &crate::otlp::Span| s.end_ns - s.start_ns;
    assert!(
        took(&quick) < took(&long) / 2 && quick.end_ns < long.end_ns,
        "the quick request's span lasted {} ms, the long one's {} ms",
        took(&quick) / 1_000_000,
        took(&long) / 1_000_000
    );
}
