//! Conformance: the same WASI 0.3 component (`p3_plain`, standard
//! interfaces only) under Berth and under `wasmtime serve` of the pinned
//! wasmtime release gives the same answers: streaming request and response
//! bodies, trailers, forbidden headers, outbound GET and POST with large
//! bodies, outbound timeouts, and a middleware that forwards the request.
//!
//! `make conformance` runs it (and `make bench`): it needs `wasmtime`, which
//! `make wasmtime` builds into `.tools/wasmtime` (or `BERTH_WASMTIME`
//! points at). Building wasmtime-cli takes 10-20 minutes on 2 cores, more
//! than CI's budget allows on top of everything else, so `make test`
//! leaves it out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::downstream::{Downstream, Mode};
use crate::support::*;

const WASMTIME_VERSION: &str = "50.0.1";

fn wasmtime_bin() -> PathBuf {
    let path = std::env::var_os("BERTH_WASMTIME").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/wasmtime/bin/wasmtime"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: `make wasmtime` installs wasmtime-cli {WASMTIME_VERSION}",
        path.display()
    );
    path
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

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[test]
#[ignore = "needs wasmtime-cli: `make conformance`"]
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
    let cases: Vec<(&str, Vec<u8>, &[&str], &str)> = vec![
        (
            "hello",
            request("GET", "/hello", &[], b""),
            &[],
            "status 200\nhello\n",
        ),
        (
            "forbidden headers",
            request("GET", "/forbidden", &[], b""),
            &[],
            "status 200\nconnection: refused\nkeep-alive: refused\nproxy-connection: refused\n\
          transfer-encoding: refused\nupgrade: refused\n",
        ),
        (
            "trailers",
            request("GET", "/trailers", &[("te", "trailers")], b""),
            &[],
            "status 200\nbody with trailers\ntrailer x-checksum: abc123\n",
        ),
        (
            "streamed echo of 1 MB",
            request("POST", "/echo", &[], &big),
            &["x-echo"],
            "",
        ),
        (
            "outbound GET",
            request("GET", "/fetch", &[("x-url", &down_url)], b""),
            &[],
            "status 200\nupstream 200, 13 bytes\n",
        ),
        (
            "outbound POST of 1 MB",
            request("POST", "/fetch", &[("x-url", &down_url)], &big),
            &[],
            "status 200\nupstream 200, 13 bytes\n",
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
            "",
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
        ),
    ];
    let mut differences = Vec::new();
    for (name, req, keep, expected) in &cases {
        let started = Instant::now();
        let ours = exchange(&berth.addr, req, keep);
        let theirs = exchange(&wasmtime.addr, req, keep);
        if ours != theirs {
            differences.push(format!(
                "{name}:\n  berth:    {:?}\n  wasmtime: {:?}",
                cut(&ours),
                cut(&theirs)
            ));
        }
        if !expected.is_empty() && ours != *expected {
            differences.push(format!(
                "{name}: berth gave {:?}, expected {expected:?}",
                cut(&ours)
            ));
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name} took too long"
        );
    }
    assert!(
        differences.is_empty(),
        "answers differ:\n{}",
        differences.join("\n")
    );
    // The echo came back whole, and the POST reached the upstream whole
    // from both hosts.
    let echo = exchange(&berth.addr, &request("POST", "/echo", &[], &big), &[]);
    assert_eq!(echo.len(), "status 200\n".len() + big.len());
    let posted: Vec<usize> = down
        .bodies()
        .into_iter()
        .filter(|n| *n == big.len())
        .collect();
    assert_eq!(posted.len(), 2, "{:?}", down.bodies());
}

fn cut(s: &str) -> String {
    if s.len() > 300 {
        format!("{}… ({} bytes)", &s[..300], s.len())
    } else {
        s.to_owned()
    }
}
