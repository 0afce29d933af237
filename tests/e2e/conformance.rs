//! Conformance: the same WASI 0.3 component (`p3_plain`, standard
//! interfaces only) under Berth and under `wasmtime serve` of the pinned
//! wasmtime release gives the same answers: streaming request and response
//! bodies, trailers, forbidden headers, outbound GET and POST with large
//! bodies, outbound timeouts, and a middleware that forwards the request.
//! Berth gives each answer over HTTP/2 (h2c) as over HTTP/1.1 too.
//!
//! It needs `wasmtime` of that release, which `scripts/wasmtime.sh` builds
//! into `.tools/` (or `BERTH_WASMTIME` points at). `make test` starts that
//! build in the background while the host compiles (a test build, without
//! full optimisation: answers are compared here, not speed), and this test
//! waits for it; `make conformance` runs this test alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::downstream::{Downstream, Mode};
use crate::support::*;

const WASMTIME_VERSION: &str = "50.0.1";

/// `BERTH_WASMTIME`, or the optimised build of `make wasmtime` (the
/// bench's), or the test build `make test` makes in the background.
fn wasmtime_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("BERTH_WASMTIME") {
        return PathBuf::from(path);
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    let bench = tools.join("wasmtime/bin/wasmtime");
    if bench.is_file() {
        return bench;
    }
    background_tool(
        &tools.join("wasmtime-test/bin/wasmtime"),
        &tools.join("wasmtime-test-building"),
        "`scripts/wasmtime.sh test` (run by `make test`)",
    )
}

/// `wasmtime serve` of the fixture on a free loopback port, killed on drop.
struct WasmtimeServe {
    child: Child,
    addr: String,
}

impl WasmtimeServe {
    fn start() -> WasmtimeServe {
        let bin = wasmtime_bin();
        let version = Command::new(&bin).arg("--version").output().unwrap();
        let version = String::from_utf8_lossy(&version.stdout).into_owned();
        assert!(
            version.contains(WASMTIME_VERSION),
            "pinned {WASMTIME_VERSION}, found {version}"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(bin)
            // `-Scli`: all of WASI, as Berth links (the guest's std imports
            // wasi:cli 0.2); without it only the proxy world is linked.
            .args(["serve", "-Scli", "--addr", &addr])
            .arg(wasm("p3_plain"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning wasmtime serve");
        // It prints "Serving HTTP on ..." once it listens.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Serving HTTP") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(120))
            .expect("wasmtime serve never listened");
        WasmtimeServe { child, addr }
    }
}

impl Drop for WasmtimeServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP/1.1 exchange, so trailers and framing are visible:
/// the status, the headers named in `keep`, and the decoded body with
/// its trailers.
fn exchange(addr: &str, request: &[u8], keep: &[&str]) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(request).unwrap();
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap_or("")
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let mut out = format!("status {status}\n");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    for name in keep {
        for (k, v) in headers.iter().filter(|(k, _)| k == name) {
            out.push_str(&format!("{k}: {v}\n"));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        out.push_str(&dechunk(rest));
    } else {
        out.push_str(rest);
    }
    out
}

/// A chunked body's data, then its trailers as `trailer name: value`.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body + "[truncated]";
        };
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            for line in after.split("\r\n").filter(|l| !l.is_empty()) {
                body.push_str(&format!("trailer {}\n", line.to_ascii_lowercase()));
            }
            return body;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// A request of a case, sent as HTTP/1.1 bytes or on an HTTP/2 stream.
struct Req<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: &'a [u8],
}

fn request<'a>(
    method: &'a str,
    path: &'a str,
    headers: &[(&'a str, &'a str)],
    body: &'a [u8],
) -> Req<'a> {
    Req {
        method,
        path,
        headers: headers.to_vec(),
        body,
    }
}

impl Req<'_> {
    fn http1(&self) -> Vec<u8> {
        let (method, path) = (self.method, self.path);
        let mut out = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !self.body.is_empty() || method == "POST" {
            out.push_str(&format!("content-length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(self.body);
        bytes
    }

    /// The exchange on a stream of `h2`, told as [`exchange`] tells one.
    fn over_h2(&self, h2: &crate::h2::H2, keep: &[&str]) -> String {
        let method = self.method.parse().unwrap();
        let reply = match h2.send(method, self.path, &self.headers, self.body) {
            Ok(reply) => reply,
            Err(e) => return format!("no answer over HTTP/2: {e}"),
        };
        let mut out = format!("status {}\n", reply.status);
        for name in keep {
            for v in reply.headers.get_all(*name) {
                out.push_str(&format!("{name}: {}\n", v.to_str().unwrap_or("?")));
            }
        }
        out.push_str(&String::from_utf8_lossy(&reply.body));
        for (k, v) in reply.trailers.iter().flatten() {
            out.push_str(&format!("trailer {k}: {}\n", v.to_str().unwrap_or("?")));
        }
        out
    }
}

/// A case: its name, the request, the headers compared, the answer
/// expected, and how long it may take at most.
type Case<'a> = (&'a str, Req<'a>, &'a [&'a str], &'a str, Duration);

#[test]
fn berth_and_wasmtime_serve_answer_alike() {
    let down = Downstream::start(Mode::Ok);
    let hang = Downstream::start(Mode::Hang);
    let wasmtime = WasmtimeServe::start();
    let berth = Berth::start(&module(
        "plain",
        "/",
        "p3_plain",
        &format!(
            "allowed_outbound_hosts = [\"http://{}\", \"http://{}\"]\n\
             outbound = {{ retries = 0 }}",
            down.addr, hang.addr
        ),
    ));
    let big: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (down_url, hang_url) = (down.url("/up"), hang.url("/slow"));
    let upstream = format!("http://{}", down.addr);
    let echoed = format!("status 200\nx-echo: 1\n{}", String::from_utf8_lossy(&big));
    // Each case: its request, the headers compared, the answer expected,
    // and how long it may take at most (generous, for a busy machine:
    // where timing is the point, a host that ignored it would take far
    // longer).
    let cases: Vec<Case> = vec![
        (
            "hello",
            request("GET", "/hello", &[], b""),
            &[],
            "status 200\nhello\n",
            Duration::from_secs(30),
        ),
        (
            "forbidden headers",
            request("GET", "/forbidden", &[], b""),
            &[],
            "status 200\nconnection: refused\nkeep-alive: refused\nproxy-connection: refused\n\
          transfer-encoding: refused\nupgrade: refused\n",
            Duration::from_secs(30),
        ),
        (
            "trailers",
            request("GET", "/trailers", &[("te", "trailers")], b""),
            &[],
            "status 200\nbody with trailers\ntrailer x-checksum: abc123\n",
            Duration::from_secs(30),
        ),
        (
            "streamed echo of 1 MB",
            request("POST", "/echo", &[], &big),
            &["x-echo"],
            echoed.as_str(),
            Duration::from_secs(30),
        ),
        (
            "outbound GET",
            request("GET", "/fetch", &[("x-url", &down_url)], b""),
            &[],
            "status 200\nupstream 200, 13 bytes\n",
            Duration::from_secs(30),
        ),
        (
            "outbound POST of 1 MB",
            request("POST", "/fetch", &[("x-url", &down_url)], &big),
            &[],
            "status 200\nupstream 200, 13 bytes\n",
            Duration::from_secs(30),
        ),
        (
            "outbound first-byte timeout",
            request(
                "GET",
                "/fetch",
                &[("x-url", &hang_url), ("x-timeout-ms", "300")],
                b"",
            ),
            &[],
            "status 502\noutbound error: ErrorCode::ConnectionReadTimeout\n",
            // The guest's 300 ms, not the hosts' default of 10 s or more.
            Duration::from_secs(5),
        ),
        (
            "middleware forwarding a POST",
            request(
                "POST",
                "/proxy",
                &[("x-upstream", &upstream), ("content-type", "text/plain")],
                b"forward me",
            ),
            &[],
            "status 200\ndownstream ok",
            Duration::from_secs(30),
        ),
    ];
    let mut differences = Vec::new();
    let h2 = crate::h2::H2::connect(&berth.addr);
    for (name, req, keep, expected, within) in &cases {
        let timed = |host: &str, answer: &dyn Fn() -> String| {
            let started = Instant::now();
            let answer = answer();
            let took = started.elapsed();
            assert!(took < *within, "{name}: {host} took {took:?}");
            answer
        };
        let ours = timed("berth", &|| exchange(&berth.addr, &req.http1(), keep));
        let theirs = timed("wasmtime serve", &|| {
            exchange(&wasmtime.addr, &req.http1(), keep)
        });
        let ours_h2 = timed("berth over HTTP/2", &|| req.over_h2(&h2, keep));
        if ours_h2 != ours {
            differences.push(format!(
                "{name}:\n  berth over HTTP/2: {:?}\n  berth over 1.1:   {:?}",
                cut(&ours_h2),
                cut(&ours)
            ));
        }
        if ours != theirs {
            differences.push(format!(
                "{name}:\n  berth:    {:?}\n  wasmtime: {:?}",
                cut(&ours),
                cut(&theirs)
            ));
        }
        if ours != *expected {
            differences.push(format!(
                "{name}: berth gave {:?}, expected {:?}",
                cut(&ours),
                cut(expected)
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "answers differ:\n{}",
        differences.join("\n")
    );
    // Both stream the echo frame by frame: each line comes back before
    // the next is sent.
    crate::streaming::ping_pong(&wasmtime.addr, "/echo", &[]);
    crate::streaming::ping_pong(&berth.addr, "/echo", &[]);
    // The POST reached the upstream whole from both hosts, and from
    // Berth over HTTP/2 as well.
    let posted: Vec<usize> = down
        .bodies()
        .into_iter()
        .filter(|n| *n == big.len())
        .collect();
    assert_eq!(posted.len(), 3, "{:?}", down.bodies());
}

fn cut(s: &str) -> String {
    if s.len() > 300 {
        format!("{}… ({} bytes)", &s[..300], s.len())
    } else {
        s.to_owned()
    }
}
