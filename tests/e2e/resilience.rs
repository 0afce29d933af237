//! Host-enforced limits and the outbound policy, with misbehaving guests
//! and a real downstream server that fails on purpose.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::downstream::{Blackhole, Downstream, Mode};
use crate::support::*;

fn misbehave(limits: &str) -> String {
    module("m", "/m", "misbehave", &format!("limits = {{ {limits} }}"))
        + &module("hello", "/hello", "hello", "")
}

/// A request that runs over its deadline on a reused WASI 0.2 instance is
/// a 504 every time, whether the guest sleeps in a host call or spins, and
/// whichever of the host's timer and the instance's own teardown ends it
/// first.
#[test]
fn a_reused_p2_instance_over_its_deadline_is_a_504_every_time() {
    let berth = Berth::start(&module(
        "m",
        "/m",
        "misbehave",
        "limits = { timeout = \"300ms\" }\ninstances = { max_requests = 100 }",
    ));
    // The race was lost about one time in three: eight tries each.
    for path in ["/m/sleep?ms=2000", "/m/loop"] {
        for _ in 0..8 {
            let r = get(&berth.url(path));
            assert_eq!(r.status, 504, "{path}: {}", r.body);
        }
    }
    assert_eq!(get(&berth.url("/m/ok")).status, 200);
}

/// Also on one worker thread (what a pod with a CPU limit of 1 gets): the
/// epoch ticks make spinning guests yield to everything else.
#[test]
fn a_spinning_guest_gets_504_and_probes_keep_answering() {
    for (threads, scheduler) in [
        ("[runtime]\nworker_threads = 2\n", "multi-thread"),
        ("[runtime]\nworker_threads = 1\n", "current-thread"),
    ] {
        let berth = Berth::start(&(threads.to_owned() + &misbehave("timeout = \"500ms\"")));
        assert!(
            berth
                .wait_for_log(Duration::from_secs(5), |l| l["scheduler"] == scheduler)
                .is_some(),
            "berth did not log the {scheduler} scheduler"
        );
        let spinners: Vec<_> = (0..3)
            .map(|_| {
                let url = berth.url("/m/loop");
                std::thread::spawn(move || {
                    let started = Instant::now();
                    (get(&url), started.elapsed())
                })
            })
            .collect();
        // While all three spin (the module's active-request gauge says so),
        // the admin port and other modules answer.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let active = metric(
                &berth.metrics(),
                "berth_http_server_active_requests",
                &[("module", "m")],
            );
            if active == Some(3.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{scheduler}: spinners not running: {active:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(get(&berth.admin_url("/healthz")).status, 200);
        assert_eq!(get(&berth.url("/hello")).status, 200);
        for s in spinners {
            let (r, took) = s.join().unwrap();
            assert_eq!(r.status, 504, "{scheduler}: {}", r.body);
            assert!(
                took >= Duration::from_millis(500),
                "{scheduler}: answered before the timeout: {took:?}"
            );
            // Generous bound: the timeout plus ticks, on a loaded machine.
            assert!(took < Duration::from_secs(5), "{scheduler}: took {took:?}");
        }
        let page = berth.metrics();
        assert_eq!(
            metric(
                &page,
                "berth_guest_failures_total",
                &[("module", "m"), ("kind", "timeout")]
            ),
            Some(3.0)
        );
    }
}

#[test]
fn a_blocked_log_writer_fails_liveness_without_stalling_traffic() {
    let berth = Berth::start(&format!(
        "[admin]\nstall_timeout = \"1s\"\n\n{}",
        module("hello", "/hello", "hello", "")
    ));
    assert_eq!(get(&berth.admin_url("/healthz")).status, 200);
    // Nobody drains stdout any more: the pipe and the writer's buffer fill.
    berth.pause_logs(true);
    let started = Instant::now();
    let mut healthz = get(&berth.admin_url("/healthz"));
    while started.elapsed() < Duration::from_secs(30) {
        // Every request still gets its answer: lines are dropped instead.
        let r = get(&berth.url("/hello?name=a-rather-long-name-to-fill-the-pipe-faster"));
        assert_eq!(r.status, 200, "{}", r.body);
        healthz = get(&berth.admin_url("/healthz"));
        if healthz.status == 503 {
            break;
        }
    }
    assert_eq!(
        healthz.status, 503,
        "liveness never noticed the blocked writer"
    );
    assert!(healthz.body.contains("log writer"), "{}", healthz.body);
    // Still failing a while later: the writer is stuck, not slow.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(&berth.admin_url("/healthz")).status, 503);
    // The collector comes back: liveness recovers.
    berth.pause_logs(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&berth.admin_url("/healthz")).status != 200 {
        assert!(Instant::now() < deadline, "liveness did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guest_that_logs_in_a_loop_is_rate_limited_and_its_lines_capped() {
    let berth = Berth::start(&module(
        "m",
        "/m",
        "misbehave",
        "limits = { log_rate = 10 }",
    ));
    let r = get(&berth.url("/m/spam?n=500&bytes=100000"));
    assert_eq!(r.status, 200, "{}", r.body);
    let page = berth.metrics();
    let dropped = metric(
        &page,
        "berth_guest_log_lines_dropped_total",
        &[("module", "m"), ("reason", "rate_limit")],
    )
    .unwrap_or(0.0);
    // Five seconds' worth (50 lines) may pass in a burst; the rest drop.
    assert!(dropped >= 400.0, "dropped {dropped}");
    berth
        .wait_for_log(Duration::from_secs(5), |l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("log_rate"))
        })
        .expect("one warning about the rate limit");
    let spam: Vec<_> = berth
        .log_lines()
        .into_iter()
        .filter(|l| l["target"] == "guest" && l["module"] == "m")
        .collect();
    // The documented burst passes whole (the warning follows its last
    // line), and little more: a budget that drops everything, or lets
    // everything through, fails one side.
    assert!(
        (50..=60).contains(&spam.len()),
        "{} guest lines passed, the burst is 50",
        spam.len()
    );
    assert!(dropped <= 450.0, "dropped {dropped}");
    for line in &spam {
        let message = line["message"].as_str().unwrap();
        assert!(message.len() < 17 << 10, "a {} byte line", message.len());
        assert!(
            message.ends_with("bytes cut]"),
            "{}",
            &message[message.len() - 40..]
        );
    }
    let warnings = berth
        .log_lines()
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("log_rate"))
        })
        .count();
    assert_eq!(warnings, 1);
}

#[test]
fn a_client_that_hangs_up_cancels_its_guest_and_frees_the_slot() {
    let berth = Berth::start(&misbehave("max_concurrency = 1, timeout = \"60s\""));
    let active = || {
        metric(
            &berth.metrics(),
            "berth_http_server_active_requests",
            &[("module", "m")],
        )
    };
    // A request whose guest would sleep for 20 s; the client gives up.
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.write_all(b"GET /m/sleep?ms=20000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while active() != Some(1.0) {
        assert!(Instant::now() < deadline, "the guest never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(conn);
    // The guest is cancelled: the gauge falls and the one slot is free
    // long before the 20 s sleep would end.
    let deadline = Instant::now() + Duration::from_secs(5);
    while active() != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the guest kept running after the hang-up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = get(&berth.url("/m/ok"));
    assert_eq!(r.status, 200, "the slot stayed taken: {}", r.body);
}

#[test]
fn memory_hogs_panics_and_stack_overflows_get_500() {
    let berth = Berth::start(&misbehave("memory = \"32MiB\""));
    let r = get(&berth.url("/m/alloc?mb=100"));
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("memory"), "{}", r.body);
    // Within the limit it works.
    assert_eq!(get(&berth.url("/m/alloc?mb=4")).status, 200);
    assert_eq!(get(&berth.url("/m/panic")).status, 500);
    assert_eq!(get(&berth.url("/m/stack")).status, 500);
    let page = berth.metrics();
    let failures = |kind| {
        metric(
            &page,
            "berth_guest_failures_total",
            &[("module", "m"), ("kind", kind)],
        )
    };
    assert_eq!(
        failures("memory_limit"),
        Some(1.0),
        "memory hits are counted apart"
    );
    assert_eq!(failures("trap"), Some(2.0));
}

#[test]
fn huge_responses_are_capped() {
    let berth = Berth::start(&misbehave("max_response_body = \"1MiB\""));
    // Read the body as it comes: the head is 200 and on its way, so the
    // cap shows as a body cut off at 1 MiB, not as a missing answer.
    let mut resp = ureq::get(&berth.url("/m/big?mb=8"))
        .call()
        .expect("a response head");
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let read = std::io::Read::read_to_end(&mut resp.body_mut().as_reader(), &mut got);
    assert!(
        read.is_err(),
        "the body ended cleanly at {} bytes",
        got.len()
    );
    assert!(
        got.len() <= 1 << 20,
        "{} bytes passed the 1 MiB cap",
        got.len()
    );
    assert!(got.len() >= 512 << 10, "only {} bytes arrived", got.len());
    // A response under the cap is whole.
    let r = get(&berth.url("/m/big?mb=0"));
    assert_eq!(r.status, 200);
    assert_eq!(get(&berth.url("/hello")).status, 200);
}

#[test]
fn two_hundred_bad_requests_leave_the_host_healthy() {
    let berth = Berth::start(&misbehave(
        "timeout = \"200ms\", memory = \"32MiB\", max_response_body = \"1MiB\"",
    ));
    // Warm up, then take the baseline.
    for _ in 0..20 {
        assert_eq!(get(&berth.url("/hello")).status, 200);
    }
    let rss_before = berth.rss_kib();
    let healthy = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (url, healthy, stop) = (berth.admin_url("/healthz"), healthy.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if get(&url).status != 200 {
                    healthy.store(false, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let bad = ["panic", "stack", "alloc?mb=100", "loop", "big?mb=4"];
    let abuse = |rounds: usize| {
        for i in 0..rounds {
            let what = bad[i % bad.len()];
            let r = get(&berth.url(&format!("/m/{what}")));
            if !what.starts_with("big") {
                assert!(r.status == 500 || r.status == 504, "{what}: {}", r.status);
            }
        }
    };
    // The first round fills the pool slots and caches; the second must
    // not grow memory further (a leak per request would: 100 KiB a request
    // is 20 MiB a round).
    abuse(200);
    let rss_mid = berth.rss_kib();
    abuse(200);
    stop.store(true, Ordering::Relaxed);
    probe.join().unwrap();
    assert!(
        healthy.load(Ordering::Relaxed),
        "/healthz failed during the abuse"
    );
    for _ in 0..20 {
        let r = get(&berth.url("/hello?name=after"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["message"], "Hello, after!");
    }
    let rss_after = berth.rss_kib();
    assert!(
        rss_after < rss_mid + 8 * 1024,
        "RSS grew from {rss_mid} KiB to {rss_after} KiB over the second 200 (baseline {rss_before} KiB)"
    );
}

#[test]
fn over_the_concurrency_limit_requests_are_shed_with_503() {
    let (n, k) = (2, 3);
    let berth = Berth::start(&misbehave(&format!("max_concurrency = {n}")));
    let barrier = Arc::new(std::sync::Barrier::new(n + k));
    let handles: Vec<_> = (0..n + k)
        .map(|_| {
            let (url, barrier) = (berth.url("/m/sleep?ms=1500"), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                get(&url)
            })
        })
        .collect();
    let replies: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let shed: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        shed.len(),
        k,
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(served, n);
    for r in shed {
        assert_eq!(r.header("retry-after"), Some("1"));
    }
}

#[test]
fn request_bodies_over_the_limit_get_413_even_when_streamed() {
    let berth = Berth::start(&misbehave("max_body = \"1KiB\""));
    let r = post(&berth.url("/m/echo"), &"x".repeat(4096));
    assert_eq!(r.status, 413, "{}", r.body);
    let r = post(&berth.url("/m/echo"), &"x".repeat(512));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["bytes"], 512);
    // Chunked, so no Content-Length tells the size up front.
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = String::from(
        "POST /m/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    );
    for _ in 0..8 {
        req.push_str(&format!("200\r\n{}\r\n", "y".repeat(0x200)));
    }
    req.push_str("0\r\n\r\n");
    conn.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[test]
fn slow_and_oversized_clients_are_cut_off_and_garbage_gets_4xx() {
    let berth = Berth::start(
        &("[server]\nheader_read_timeout = \"1s\"\n".to_owned() + &misbehave("timeout = \"5s\"")),
    );
    // Too many headers.
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut many = String::from("GET /hello HTTP/1.1\r\nhost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    conn.write_all(many.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Oversized header block.
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let big = format!(
        "GET /hello HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = conn.write_all(big.as_bytes());
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    // Garbage of many shapes: a 4xx or a closed connection, never a crash.
    let samples: [&[u8]; 8] = [
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        b"POST /m/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"G\xffT /\xff HTTP/1.1\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nbad header line\r\n\r\n",
    ];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut inputs: Vec<Vec<u8>> = samples.iter().map(|s| s.to_vec()).collect();
    for _ in 0..100 {
        // xorshift: random bytes appended to a valid request line.
        let mut junk = b"GET /hello HTTP/1.1\r\n".to_vec();
        for _ in 0..64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            junk.push(rng as u8);
        }
        junk.extend_from_slice(b"\r\n\r\n");
        inputs.push(junk);
    }
    for input in &inputs {
        let mut conn = TcpStream::connect(&berth.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = conn.write_all(input);
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        let head = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || head.starts_with("HTTP/1.1 4") || head.starts_with("HTTP/1.1 200"),
            "{:?} -> {head}",
            String::from_utf8_lossy(input)
        );
    }
    assert_eq!(get(&berth.url("/hello")).status, 200, "host survived");

    // An idle keep-alive connection is closed after the header timeout.
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "idle connection kept open"
    );

    // Slowloris: a request head that never ends is cut off by the header
    // read timeout rather than held forever.
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "slow client held the connection for {:?}",
        started.elapsed()
    );
}

// --- outbound ---

fn caller(downstream: &Downstream, outbound: &str) -> String {
    module(
        "m",
        "/m",
        "misbehave",
        &format!(
            "allowed_outbound_hosts = [\"http://{}\"]\noutbound = {{ {outbound} }}",
            downstream.addr
        ),
    )
}

fn fetch(berth: &Berth, target: &str) -> Reply {
    get(&berth.url(&format!("/m/fetch?url={target}")))
}

#[test]
fn outbound_retries_a_failing_upstream_until_it_answers() {
    let down = Downstream::start(Mode::FailFirst(2, None));
    let berth = Berth::start(&caller(&down, "retries = 3, retry_backoff = \"10ms\""));
    let r = fetch(&berth, &down.url("/x"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], 200);
    assert_eq!(r.json()["body"], "downstream ok");
    assert_eq!(down.hits(), 3);
    let upstream = down.addr.to_string();
    let page = berth.metrics();
    let labels = [("module", "m"), ("upstream", upstream.as_str())];
    assert_eq!(
        metric(&page, "berth_http_client_retries_total", &labels),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &page,
            "berth_http_client_requests_total",
            &[labels[0], labels[1], ("outcome", "200")]
        ),
        Some(1.0)
    );
}

#[test]
fn outbound_honours_retry_after() {
    let down = Downstream::start(Mode::FailFirst(1, Some(1)));
    let berth = Berth::start(&caller(&down, "retries = 1, retry_backoff = \"1ms\""));
    let started = Instant::now();
    let r = fetch(&berth, &down.url("/"));
    assert_eq!(r.json()["status"], 200, "{}", r.body);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not waited for"
    );
}

#[test]
fn a_huge_retry_after_is_not_waited_for_and_panics_nothing() {
    // `Instant::now() + Retry-After` overflowed and panicked the worker.
    let down = Downstream::start(Mode::FailFirst(1, Some(i64::MAX as u64)));
    let berth = Berth::start(&caller(&down, "retries = 1, retry_backoff = \"1ms\""));
    let r = fetch(&berth, &down.url("/"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], 503, "{}", r.body);
    assert_eq!(down.hits(), 1, "a wait past the deadline is no retry");
    assert!(
        !berth.log_text().contains("panicked"),
        "{}",
        berth.log_text()
    );
    // The worker is still there.
    assert_eq!(fetch(&berth, &down.url("/")).json()["status"], 200);
}

#[test]
fn a_body_that_stops_arriving_is_the_clients_408_not_the_guests_504() {
    let berth = Berth::start(&module(
        "m",
        "/m",
        "misbehave",
        "limits = { timeout = \"1s\" }",
    ));
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"POST /m/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nonly ten b")
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).unwrap_or(0);
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // A guest that is itself too slow is still a 504, with or without a
    // body that arrived whole.
    let slow = get(&berth.url("/m/sleep?ms=3000"));
    assert_eq!(slow.status, 504, "{}", slow.body);
    let slow = post(&berth.url("/m/sleep?ms=3000"), "a body that arrived whole");
    assert_eq!(slow.status, 504, "{}", slow.body);
}

#[test]
fn the_breaker_opens_fails_fast_and_closes_after_the_cool_down() {
    let down = Downstream::start(Mode::AlwaysFail);
    let berth = Berth::start(&caller(
        &down,
        "retries = 0, circuit_breaker = { failures = 3, open_for = \"1s\", half_open_probes = 1 }",
    ));
    for _ in 0..3 {
        let r = fetch(&berth, &down.url("/"));
        assert_eq!(r.json()["status"], 503, "{}", r.body);
    }
    assert_eq!(down.hits(), 3);
    let upstream = down.addr.to_string();
    let labels = [("module", "m"), ("upstream", upstream.as_str())];
    assert_eq!(
        metric(&berth.metrics(), "berth_http_client_circuit_state", &labels),
        Some(2.0)
    );
    // Open: calls fail fast without reaching the server.
    for _ in 0..5 {
        let r = fetch(&berth, &down.url("/"));
        assert_eq!(r.status, 502);
        assert!(r.body.contains("circuit is open"), "{}", r.body);
    }
    assert_eq!(
        down.hits(),
        3,
        "calls reached the server while the circuit was open"
    );
    // The upstream recovers; after the cool-down a probe closes the circuit.
    down.set_mode(Mode::Ok);
    std::thread::sleep(Duration::from_millis(1100));
    let r = fetch(&berth, &down.url("/"));
    assert_eq!(r.json()["status"], 200, "{}", r.body);
    assert_eq!(
        metric(&berth.metrics(), "berth_http_client_circuit_state", &labels),
        Some(0.0)
    );
    assert_eq!(fetch(&berth, &down.url("/")).json()["status"], 200);
}

#[test]
fn a_probe_cut_off_by_the_module_timeout_does_not_wedge_the_breaker() {
    let down = Downstream::start(Mode::AlwaysFail);
    let berth = Berth::start(&format!(
        "{}limits = {{ timeout = \"1s\" }}\n",
        caller(
            &down,
            "retries = 0, first_byte_timeout = \"30s\", circuit_breaker = { failures = 1, open_for = \"300ms\", half_open_probes = 1 }",
        )
    ));
    assert_eq!(fetch(&berth, &down.url("/")).json()["status"], 503);
    // Open; after the cool-down the probe hangs until the module's timeout
    // drops the call mid-flight.
    down.set_mode(Mode::Hang);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(fetch(&berth, &down.url("/")).status, 504);
    // The upstream recovers: once the cool-down after the lost probe is
    // over, a new probe goes through and closes the circuit.
    down.set_mode(Mode::Ok);
    std::thread::sleep(Duration::from_millis(400));
    let r = fetch(&berth, &down.url("/"));
    assert_eq!(r.status, 200, "the breaker stayed half-open: {}", r.body);
    assert_eq!(r.json()["status"], 200);
}

#[test]
fn a_hanging_upstream_times_out_within_the_bound() {
    let down = Downstream::start(Mode::Hang);
    let berth = Berth::start(&caller(
        &down,
        "first_byte_timeout = \"300ms\", retries = 0",
    ));
    let started = Instant::now();
    let r = fetch(&berth, &down.url("/"));
    let took = started.elapsed();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("timed out"), "{}", r.body);
    assert!(took >= Duration::from_millis(300));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_post_is_not_retried_unless_configured() {
    let down = Downstream::start(Mode::FailFirst(1, None));
    let berth = Berth::start(&caller(&down, "retries = 2, retry_backoff = \"1ms\""));
    let r = get(&berth.url(&format!("/m/post?url={}", down.url("/"))));
    assert_eq!(r.json()["status"], 503, "{}", r.body);
    assert_eq!(down.hits(), 1);

    let down = Downstream::start(Mode::FailFirst(1, None));
    let berth = Berth::start(&caller(
        &down,
        "retries = 2, retry_backoff = \"1ms\", retry_non_idempotent = true",
    ));
    let r = get(&berth.url(&format!("/m/post?url={}", down.url("/"))));
    assert_eq!(r.json()["status"], 200, "{}", r.body);
    assert_eq!(down.hits(), 2);
}

#[test]
fn small_complete_idempotent_bodies_are_retried_whole_and_large_ones_are_not() {
    let down = Downstream::start(Mode::FailFirst(2, None));
    let berth = Berth::start(&caller(
        &down,
        "retries = 3, retry_backoff = \"1ms\", max_retry_body = \"1KiB\"",
    ));
    let r = get(&berth.url(&format!("/m/put?bytes=1000&url={}", down.url("/"))));
    assert_eq!(r.json()["status"], 200, "{}", r.body);
    assert_eq!(down.hits(), 3);
    assert_eq!(
        down.bodies(),
        vec![1000, 1000, 1000],
        "every attempt sent the whole body"
    );

    // Past max_retry_body the body is not kept, so the call is not retried.
    let down = Downstream::start(Mode::FailFirst(1, None));
    let berth = Berth::start(&caller(
        &down,
        "retries = 3, retry_backoff = \"1ms\", max_retry_body = \"1KiB\"",
    ));
    let r = get(&berth.url(&format!("/m/put?bytes=4096&url={}", down.url("/"))));
    assert_eq!(r.json()["status"], 503, "{}", r.body);
    assert_eq!(down.bodies(), vec![4096]);
}

#[test]
fn the_allow_list_denies_by_default() {
    let down = Downstream::start(Mode::Ok);
    let port = down.addr.port();
    let config = caller(&down, "retries = 0")
        + &module(
            "wild",
            "/wild",
            "misbehave",
            "allowed_outbound_hosts = [\"http://*:*\"]",
        );
    let berth = Berth::start(&config);
    // Listed: allowed.
    assert_eq!(fetch(&berth, &down.url("/")).json()["status"], 200);
    // Not listed: a name, another IP, localhost.
    for target in [
        format!("http://example.com:{port}/"),
        format!("http://127.0.0.2:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://127.0.0.1:{}/", port.wrapping_add(1)),
    ] {
        let r = fetch(&berth, &target);
        assert_eq!(r.status, 403, "{target}: {}", r.body);
        assert!(r.body.contains("allowed_outbound_hosts"), "{}", r.body);
    }
    // A wildcard rule does not open loopback, by IP in any spelling or by
    // a name that resolves there (getaddrinfo reads `2130706433`,
    // `0x7f000001` and `127.1` as 127.0.0.1).
    let wild_targets = [
        down.url("/"),
        format!("http://localhost:{port}/"),
        format!("http://LOCALHOST.:{port}/"),
        format!("http://127.1.2.3:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://[::127.0.0.1]:{port}/"),
        format!("http://0.0.0.0:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://0x7f000001:{port}/"),
        format!("http://127.1:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[fd00:ec2::254]/latest/meta-data/".to_owned(),
        "http://100.100.100.200/latest/meta-data/".to_owned(),
    ];
    for target in &wild_targets {
        let r = get(&berth.url(&format!("/wild/fetch?url={target}")));
        assert_eq!(r.status, 403, "{target}: {}", r.body);
    }
    assert_eq!(down.hits(), 1, "a denied call reached the server");
    let page = berth.metrics();
    assert_eq!(
        metric(&page, "berth_http_client_denied_total", &[("module", "m")]),
        Some(4.0)
    );
    assert_eq!(
        metric(
            &page,
            "berth_http_client_denied_total",
            &[("module", "wild")]
        ),
        Some(wild_targets.len() as f64)
    );
    assert!(berth.log_text().contains("outbound request denied"));
}

#[test]
fn connections_to_an_upstream_are_pooled() {
    let down = Downstream::start(Mode::Ok);
    let berth = Berth::start(&caller(&down, ""));
    for _ in 0..10 {
        assert_eq!(fetch(&berth, &down.url("/")).json()["status"], 200);
    }
    assert_eq!(
        established_to(berth.pid(), down.addr.port()),
        1,
        "10 calls should share one connection"
    );
}

/// A guest's own timeouts (`wasi:http` request options), far shorter than
/// the host's 10 s, hold: to connect to a host that never completes the
/// handshake, to the first byte against an upstream that never answers, and
/// between bytes against one that stalls after its first.
#[test]
fn a_guests_shorter_request_timeouts_hold() {
    let hang = Downstream::start(Mode::Hang);
    let stall = Downstream::start(Mode::Stall);
    let hole = Blackhole::start();
    let berth = Berth::start(&module(
        "m",
        "/m",
        "misbehave",
        &format!(
            "allowed_outbound_hosts = [\"http://{}\", \"http://{}\", \"http://{}\"]\n\
             outbound = {{ retries = 0, connect_timeout = \"10s\" }}",
            hang.addr, stall.addr, hole.addr
        ),
    ));
    // Each case sets only the timeout it is about.
    let cases = [
        (hole.url("/x"), "connect_ms", "connect", None),
        (hang.url("/x"), "ms", "first byte", Some(&hang)),
        (stall.url("/x"), "ms", "between bytes", Some(&stall)),
    ];
    for (url, option, what, down) in cases {
        let started = Instant::now();
        let r = get(&berth.url(&format!("/m/fetch_within?{option}=200&url={url}")));
        let took = started.elapsed();
        assert_eq!(r.status, 504, "{what}: {}", r.body);
        // The guest's 200 ms, not the host's 10 s (a wide margin for a
        // busy machine).
        assert!(
            took < Duration::from_secs(5),
            "{what}: the guest's 200 ms did not apply: {took:?}"
        );
        if let Some(down) = down {
            assert_eq!(down.hits(), 1, "{what}");
        }
    }
}

#[test]
fn an_outbound_grpc_call_carries_what_is_left_of_the_deadline() {
    // The downstream answers with the grpc-timeout it was sent.
    let (addr, _downstream) = crate::downstream::serve(
        |req: hyper::Request<hyper::body::Incoming>| async move {
            let sent = req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from(sent),
            )))
        },
        None,
    );
    // A fresh instance per request, and one instance serving them all
    // (whose calls look up which request makes them).
    for instances in ["", "\ninstances = { max_requests = 100 }"] {
        let berth = Berth::start(&module(
            "m",
            "/m",
            "misbehave",
            &format!(
                "allowed_outbound_hosts = [\"http://{addr}\"]\nlimits = {{ timeout = \"3s\" }}{instances}"
            ),
        ));
        let call = |own: &str| {
            let r = get(&berth.url(&format!("/m/grpc_call?url=http://{addr}/svc/M{own}")));
            assert_eq!(r.status, 200, "{instances}: {}", r.body);
            r.body
        };
        let millis = |v: &str| -> u64 {
            v.strip_suffix('m')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{instances}: sent {v:?}"))
        };
        // None of its own: what is left of the module's 3 s.
        let sent = millis(&call(""));
        assert!((1..=3000).contains(&sent), "{instances}: {sent}");
        // A longer one of its own is shortened; a shorter one is kept.
        let sent = millis(&call("&own=1H"));
        assert!((1..=3000).contains(&sent), "{instances}: {sent}");
        assert_eq!(call("&own=1S"), "1S");
        if !instances.is_empty() {
            assert_eq!(
                metric(
                    &berth.metrics(),
                    "berth_instances_created_total",
                    &[("module", "m")]
                ),
                Some(1.0),
                "one instance served the three calls"
            );
        }
    }
}

/// Whether process `pid` still holds the TCP connection whose peer is
/// `peer` (read from /proc: the socket inodes in its fd table against
/// /proc/net/tcp).
fn holds_connection(pid: i32, peer: std::net::SocketAddr) -> bool {
    let port = format!(":{:04X}", peer.port());
    let inodes: Vec<String> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols[2].ends_with(&port).then(|| cols[9].to_owned())
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|link| {
            let link = link.to_string_lossy().into_owned();
            inodes.iter().any(|i| link == format!("socket:[{i}]"))
        })
}

#[test]
fn a_client_that_never_reads_a_cut_response_loses_its_connection() {
    // 64 MiB the client never reads: hyper stops polling the body, so at
    // the deadline nothing tells it the response is over. The host closes
    // the connection instead of keeping it, and the response's buffers,
    // until the client goes.
    let berth = Berth::start(&module(
        "m",
        "/m",
        "misbehave",
        "limits = { timeout = \"1s\", memory = \"256MiB\" }",
    ));
    let mut conn = TcpStream::connect(&berth.addr).unwrap();
    conn.write_all(b"GET /m/big?mb=64 HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let me = conn.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !holds_connection(berth.pid(), me) {
        assert!(
            Instant::now() < deadline,
            "the host never took the connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while holds_connection(berth.pid(), me) {
        assert!(
            Instant::now() < deadline,
            "the host still holds a connection whose response was cut off 29 s ago"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What was sent is a cut response, never a whole one.
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    assert!(got.len() < 64 << 20, "{} bytes", got.len());
}
