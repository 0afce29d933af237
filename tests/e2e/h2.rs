//! HTTP/2 by prior knowledge (h2c) on the traffic port: every host feature
//! per stream, drain with GOAWAY, gRPC statuses for the host's own answers,
//! a real load client (`h2load`), and the HTTP/2 attacks (rapid reset, a
//! CONTINUATION flood, streams past the limit, a client that never reads),
//! each while another client is being served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::*;

/// One answer on an HTTP/2 stream.
#[derive(Debug)]
pub(crate) struct H2Reply {
    pub(crate) version: Version,
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Option<HeaderMap>,
}

impl H2Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A request: method, path, headers and body.
type Call<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>);

/// A client connection speaking h2c by prior knowledge (hyper's client).
pub(crate) struct H2 {
    rt: tokio::runtime::Runtime,
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    pub(crate) fn connect(addr: &str) -> H2 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sender = rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("an HTTP/2 handshake");
            tokio::spawn(conn);
            sender
        });
        H2 { rt, sender }
    }

    /// Sends every request at once on this one connection, each on its own
    /// stream; the answers in the same order.
    fn send_all(&self, requests: Vec<Call>) -> Vec<Result<H2Reply, String>> {
        let calls: Vec<_> = requests
            .into_iter()
            .map(|(method, path, headers, body)| {
                let mut req = http::Request::builder()
                    .method(method)
                    .uri(format!("http://berth{path}"));
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let req = req.body(Full::new(Bytes::from(body))).unwrap();
                let mut sender = self.sender.clone();
                self.rt.spawn(async move {
                    let exchange = async {
                        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                        let (parts, body) = resp.into_parts();
                        let body = body.collect().await.map_err(|e| e.to_string())?;
                        Ok(H2Reply {
                            version: parts.version,
                            status: parts.status.as_u16(),
                            headers: parts.headers,
                            trailers: body.trailers().cloned(),
                            body: body.to_bytes().to_vec(),
                        })
                    };
                    tokio::time::timeout(Duration::from_secs(30), exchange)
                        .await
                        .unwrap_or_else(|_| Err("no answer in 30 s".into()))
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|call| self.rt.block_on(call).unwrap())
            .collect()
    }

    pub(crate) fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<H2Reply, String> {
        self.send_all(vec![(method, path, headers.to_vec(), body.to_vec())])
            .remove(0)
    }

    fn get(&self, path: &str) -> H2Reply {
        self.send(Method::GET, path, &[], b"")
            .unwrap_or_else(|e| panic!("GET {path} over h2: {e}"))
    }
}

#[test]
fn h2c_and_http1_share_the_traffic_port_and_each_stream_is_observed() {
    let berth = Berth::start(
        &("[log]\naccess_log = true\n".to_owned() + &module("hello", "/", "plain_hello", "")),
    );
    let h2 = H2::connect(&berth.addr);
    let r = h2
        .send(Method::GET, "/hello", &[("x-request-id", "over-h2")], b"")
        .unwrap();
    assert_eq!((r.version, r.status), (Version::HTTP_2, 200));
    assert_eq!(r.body, b"hello\n");
    assert_eq!(r.header("x-request-id"), Some("over-h2"));
    // HTTP/1.1 on the same port, as before.
    let r = get_with(&berth.url("/hello"), &[("x-request-id", "over-h1")]);
    assert_eq!((r.status, r.body.as_str()), (200, "hello\n"));
    for (id, protocol) in [("over-h2", "2"), ("over-h1", "1.1")] {
        let line = berth
            .wait_for_log(Duration::from_secs(2), |l| {
                l["target"] == "access" && l["request_id"] == id
            })
            .unwrap_or_else(|| panic!("no access line for {id}"));
        assert_eq!(line["protocol"], protocol, "{line}");
        assert_eq!(line["status"], 200, "{line}");
    }
    assert_eq!(
        metric(
            &berth.metrics(),
            "berth_http_server_requests_total",
            &[("module", "hello"), ("status", "200")]
        ),
        Some(2.0)
    );
}

#[test]
fn a_client_that_stalls_or_leaves_in_the_preface_or_idles_is_let_go() {
    let berth = Berth::start(
        &("[server]\nheader_read_timeout = \"1s\"\n".to_owned()
            + &module("hello", "/", "plain_hello", "")),
    );
    let closed_within = |mut conn: TcpStream, limit: Duration| {
        conn.set_read_timeout(Some(limit)).unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).is_ok()
    };
    // Part of the preface, then the client leaves: closed at once, not
    // held (a peek could not see it go).
    let conn = TcpStream::connect(&berth.addr).unwrap();
    (&conn).write_all(b"PRI * HT").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        closed_within(conn, Duration::from_millis(900)),
        "a client that left is held"
    );
    // Part of the preface, then nothing: closed at header_read_timeout.
    let conn = TcpStream::connect(&berth.addr).unwrap();
    (&conn).write_all(b"PRI * HT").unwrap();
    assert!(
        closed_within(conn, Duration::from_secs(4)),
        "a stalled preface is held"
    );
    // A whole handshake and no stream: GOAWAY once it has idled that long.
    let raw = RawH2::connect(&berth.addr, &[]);
    assert_eq!(
        raw.goaway(Duration::from_secs(4)),
        Some(0),
        "{:?}",
        raw.head()
    );
    // Past them all, both protocols are served.
    assert_eq!(H2::connect(&berth.addr).get("/hello").status, 200);
    assert_eq!(get(&berth.url("/hello")).status, 200);
}

#[test]
fn grpc_answers_are_for_http2_posts_only_and_header_counts_hold_on_http2() {
    let berth = Berth::start(&module("hello", "/hello", "plain_hello", ""));
    // An HTTP/1.1 client naming gRPC still gets an HTTP answer: an empty
    // 200 would mislead it, or a cache in front of it.
    let r = get_with(
        &berth.url("/nowhere"),
        &[("content-type", "application/grpc")],
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.header("grpc-status").is_none());
    // server.max_headers (100) holds on HTTP/2 as on HTTP/1.1.
    let h2 = H2::connect(&berth.addr);
    let names: Vec<String> = (0..150).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = h2.send(Method::GET, "/hello", &many, b"").unwrap();
    assert_eq!(r.status, 431, "{r:?}");
    assert_eq!(h2.get("/hello").status, 200);
}

#[test]
fn h2c_can_be_turned_off() {
    let berth = Berth::start(
        &("[server]\nhttp2 = false\n".to_owned() + &module("hello", "/", "plain_hello", "")),
    );
    // The preface is not an HTTP/1.1 request line: hyper answers 400 or
    // closes, and no HTTP/2 SETTINGS frame ever comes back.
    let mut raw = RawH2::connect(&berth.addr, &[]);
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &hpack_get("/hello"),
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert!(raw.frames_of(SETTINGS).is_empty(), "{:?}", raw.head());
    assert_eq!(get(&berth.url("/hello")).status, 200);
}

#[test]
fn each_stream_gets_its_own_admission_body_limit_and_deadline() {
    let berth = Berth::start(&module(
        "svc",
        "/p3",
        "p3_service",
        "limits = { max_concurrency = 2, timeout = \"1s\", max_body = \"1KiB\" }",
    ));
    let h2 = H2::connect(&berth.addr);
    let sleep = |ms: &'static str| (Method::GET, "/p3/sleep", vec![("x-sleep-ms", ms)], vec![]);
    // Three at once on one connection, two slots: one is shed.
    let mut statuses: Vec<u16> = h2
        .send_all(vec![sleep("700"), sleep("700"), sleep("700")])
        .into_iter()
        .map(|r| r.unwrap().status)
        .collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503]);
    // Side by side on one connection: one body over the limit, one under.
    let answers = h2.send_all(vec![
        (Method::POST, "/p3/echo", vec![], vec![b'x'; 2048]),
        (Method::POST, "/p3/echo", vec![], b"small".to_vec()),
    ]);
    let (big, small) = (answers[0].as_ref().unwrap(), answers[1].as_ref().unwrap());
    assert_eq!(big.status, 413);
    assert_eq!((small.status, small.body.as_slice()), (200, &b"small"[..]));
    // The module's deadline holds per stream.
    let slow = h2
        .send(Method::GET, "/p3/sleep", &[("x-sleep-ms", "3000")], b"")
        .unwrap();
    assert_eq!(slow.status, 504);
}

#[test]
fn a_grpc_client_gets_the_hosts_answers_as_grpc_statuses() {
    let berth = Berth::start(
        &(module(
            "svc",
            "/p3",
            "p3_service",
            "limits = { max_concurrency = 1, timeout = \"1s\", max_body = \"1KiB\" }",
        ) + &module("m", "/m", "misbehave", "")),
    );
    let h2 = H2::connect(&berth.addr);
    let grpc = vec![("content-type", "application/grpc"), ("te", "trailers")];
    let call = |path: &'static str, extra: Vec<(&'static str, &'static str)>, body: Vec<u8>| {
        (Method::POST, path, [grpc.clone(), extra].concat(), body)
    };
    let check = |r: &H2Reply, code: &str, message: &str| {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/grpc"), "{r:?}");
        assert_eq!(r.header("grpc-status"), Some(code), "{r:?}");
        assert_eq!(r.header("grpc-message"), Some(message), "{r:?}");
        assert!(r.body.is_empty(), "trailers-only: {r:?}");
    };
    let answers = h2.send_all(vec![
        call("/nowhere/pkg.Svc/Method", vec![], vec![]),
        call("/p3/echo", vec![], vec![0; 2048]),
        call("/m/panic", vec![], vec![]),
    ]);
    check(answers[0].as_ref().unwrap(), "12", "no route for this path");
    check(
        answers[1].as_ref().unwrap(),
        "8",
        "request body exceeds the module's max_body",
    );
    check(answers[2].as_ref().unwrap(), "13", "the module failed");
    // One slot: a call while another holds it is UNAVAILABLE, with the
    // pushback gRPC clients honour; the holder runs past its deadline.
    let h2 = Arc::new(h2);
    let late = {
        let (h2, call) = (
            h2.clone(),
            call("/p3/sleep", vec![("x-sleep-ms", "3000")], vec![]),
        );
        std::thread::spawn(move || h2.send_all(vec![call]).remove(0))
    };
    std::thread::sleep(Duration::from_millis(300));
    let shed = h2
        .send_all(vec![call("/p3/count", vec![], vec![])])
        .remove(0);
    let (late, shed) = (late.join().unwrap().unwrap(), shed.unwrap());
    check(&late, "4", "the module did not answer in time");
    check(&shed, "14", "the module is at its concurrency limit");
    assert_eq!(shed.header("grpc-retry-pushback-ms"), Some("1000"));
    // Metrics count what happened, in HTTP terms.
    let page = berth.metrics();
    for (module, status) in [("svc", "504"), ("svc", "413"), ("svc", "503"), ("m", "500")] {
        assert_eq!(
            metric(
                &page,
                "berth_http_server_requests_total",
                &[("module", module), ("status", status)]
            ),
            Some(1.0),
            "{module} {status}"
        );
    }
}

#[test]
fn a_grpc_timeout_shortens_the_deadline_and_the_guest_sees_it() {
    let berth = Berth::start(&module(
        "svc",
        "/p3",
        "p3_service",
        "limits = { timeout = \"10s\" }",
    ));
    let h2 = H2::connect(&berth.addr);
    let grpc = |timeout: &'static str, extra: Vec<(&'static str, &'static str)>| {
        [
            vec![
                ("content-type", "application/grpc"),
                ("grpc-timeout", timeout),
            ],
            extra,
        ]
        .concat()
    };
    // The client allows 300 ms of the module's 10 s.
    let started = Instant::now();
    let late = h2
        .send_all(vec![(
            Method::POST,
            "/p3/sleep",
            grpc("300m", vec![("x-sleep-ms", "5000")]),
            vec![],
        )])
        .remove(0)
        .unwrap();
    assert_eq!(late.header("grpc-status"), Some("4"), "{late:?}");
    // A wide margin for a busy machine; the module's own would be 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // The guest sees what it has: the client's budget, or the module's
    // when the client allows more.
    for (asked, seen) in [("250m", "250m\n"), ("1H", "10000m\n")] {
        let r = h2
            .send_all(vec![(
                Method::POST,
                "/p3/header",
                grpc(asked, vec![("x-name", "grpc-timeout")]),
                vec![],
            )])
            .remove(0)
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.body), seen, "{asked}");
    }
    // A deadline the client got wrong is refused, not ignored.
    let bad = h2
        .send_all(vec![(
            Method::POST,
            "/p3/count",
            grpc("soon", vec![]),
            vec![],
        )])
        .remove(0)
        .unwrap();
    assert_eq!(bad.header("grpc-status"), Some("13"), "{bad:?}");
    assert!(
        bad.header("grpc-message").unwrap().contains("grpc-timeout"),
        "{bad:?}"
    );
}

/// A `grpc.health.v1.Health/Check` for `service`: the status it answers
/// (1 SERVING, 2 NOT_SERVING), or the gRPC status it failed with.
fn health_check(h2: &H2, service: &str) -> Result<u8, String> {
    // HealthCheckRequest { service = 1 }, length-prefixed.
    let mut message = vec![0x0a, service.len() as u8];
    message.extend_from_slice(service.as_bytes());
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    let r = h2
        .send(
            Method::POST,
            "/grpc.health.v1.Health/Check",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            &body,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    if let Some(code) = r.header("grpc-status") {
        return Err(code.to_owned());
    }
    let trailers = r.trailers.as_ref().expect("grpc-status in trailers");
    assert_eq!(trailers["grpc-status"], "0", "{r:?}");
    // HealthCheckResponse { status = 1 }, length-prefixed.
    assert_eq!(r.body[..7], [0, 0, 0, 0, 2, 0x08, r.body[6]], "{r:?}");
    Ok(r.body[6])
}

#[test]
fn the_grpc_health_service_answers_from_readiness_through_a_drain() {
    let config = "[shutdown]\ndrain_delay = \"3s\"\n".to_owned()
        + &module("hello", "/", "plain_hello", "")
        + &module("svc", "/p3", "p3_service", "");
    let mut berth = Berth::start(&config);
    let h2 = H2::connect(&berth.addr);
    // The host answers it, though a module's route `/` covers the path.
    assert_eq!(health_check(&h2, ""), Ok(1));
    assert_eq!(health_check(&h2, "svc"), Ok(1));
    assert_eq!(health_check(&h2, "nope"), Err("5".into()));
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &berth.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Draining: not serving, while the connection is still answered.
    let deadline = Instant::now() + Duration::from_secs(2);
    while health_check(&h2, "") != Ok(2) {
        assert!(Instant::now() < deadline, "still SERVING while draining");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(health_check(&h2, "svc"), Ok(2));
    assert!(berth.wait_exit(Duration::from_secs(15)).is_some());
}

#[test]
fn sigterm_sends_goaway_and_finishes_the_open_streams() {
    let config = "[shutdown]\ndrain_delay = \"500ms\"\ngrace_period = \"10s\"\n".to_owned()
        + &module("m", "/m", "misbehave", "");
    let mut berth = Berth::start(&config);
    let h2 = Arc::new(H2::connect(&berth.addr));
    let slow = {
        let h2 = h2.clone();
        std::thread::spawn(move || h2.get("/m/sleep?ms=2500"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &berth.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // After the drain delay the connection is told to go away: a new
    // stream on it is refused, while the open one finishes.
    std::thread::sleep(Duration::from_millis(1200));
    let refused = h2.send(Method::GET, "/m/ok", &[], b"");
    assert!(
        refused.is_err(),
        "a stream opened after GOAWAY: {refused:?}"
    );
    let slow = slow.join().unwrap();
    assert_eq!((slow.status, slow.body.as_slice()), (200, &b"slept\n"[..]));
    let status = berth
        .wait_exit(Duration::from_secs(10))
        .expect("berth exits once the stream is done");
    assert!(status.success(), "{status:?}");
}

#[test]
fn h2load_gets_every_stream_answered() {
    let berth = Berth::start(&module("hello", "/", "plain_hello", ""));
    let out = std::process::Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "16"])
        .arg(berth.url("/hello"))
        .output()
        .expect("h2load (Debian's nghttp2-client; `make setup` installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
    assert!(text.contains("Application protocol: h2c"), "{text}");
}

// --- Attacks, with a client that writes raw HTTP/2 frames ---

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A string literal in HPACK (no Huffman; short strings only).
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// `GET path` as an HPACK block: static-table entries for `:method GET`
/// and `:scheme http`, literals (not indexed) for `:path` and
/// `:authority`.
fn hpack_get(path: &str) -> Vec<u8> {
    let mut out = vec![0x82, 0x86, 0x04];
    hpack_str(&mut out, path);
    out.push(0x01);
    hpack_str(&mut out, "berth");
    out
}

/// A frame as received: type, flags, stream and payload.
type Frame = (u8, u8, u32, Vec<u8>);

/// A raw HTTP/2 connection: the preface and SETTINGS go out at once; a
/// thread records every frame the server sends until it closes.
struct RawH2 {
    conn: TcpStream,
    frames: Arc<Mutex<Vec<Frame>>>,
    closed: Arc<AtomicBool>,
}

impl RawH2 {
    /// `settings`: (identifier, value) pairs for the client's SETTINGS.
    fn connect(addr: &str, settings: &[(u16, u32)]) -> RawH2 {
        let conn = TcpStream::connect(addr).unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        (&conn).write_all(&hello).unwrap();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let mut reader = conn.try_clone().unwrap();
        let (seen, done) = (frames.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut head = [0u8; 9];
            while reader.read_exact(&mut head).is_ok() {
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                if reader.read_exact(&mut payload).is_err() {
                    break;
                }
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                seen.lock()
                    .unwrap()
                    .push((head[3], head[4], stream, payload));
            }
            done.store(true, Ordering::SeqCst);
        });
        RawH2 {
            conn,
            frames,
            closed,
        }
    }

    /// Writes `bytes`; false once the server has stopped taking them.
    fn send(&mut self, bytes: &[u8]) -> bool {
        self.conn.write_all(bytes).is_ok()
    }

    fn frames_of(&self, kind: u8) -> Vec<(u8, u32, Vec<u8>)> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.0 == kind)
            .map(|f| (f.1, f.2, f.3.clone()))
            .collect()
    }

    /// The first frames received, for failure messages.
    fn head(&self) -> Vec<(u8, u8, u32)> {
        let frames = self.frames.lock().unwrap();
        frames.iter().take(20).map(|f| (f.0, f.1, f.2)).collect()
    }

    /// The error code of the server's GOAWAY, if one came within `limit`.
    fn goaway(&self, limit: Duration) -> Option<u32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((_, _, payload)) = self.frames_of(GOAWAY).first() {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server closed the connection within `limit`.
    fn closed_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.closed.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// A well-behaved HTTP/1.1 client asking `url` every 20 ms until dropped;
/// its statuses and slowest answer are what the attack cost others.
struct Bystander {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<u16>, Duration)>,
}

impl Bystander {
    fn start(url: String) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut statuses, mut slowest) = (Vec::new(), Duration::ZERO);
            while !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                statuses.push(get(&url).status);
                slowest = slowest.max(started.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            (statuses, slowest)
        });
        Bystander { stop, thread }
    }

    /// Every answer was a 200, and none took seconds.
    fn served_throughout(self) {
        self.stop.store(true, Ordering::SeqCst);
        let (statuses, slowest) = self.thread.join().unwrap();
        assert!(statuses.len() >= 5, "too few calls: {statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == 200),
            "another client was refused during the attack: {statuses:?}"
        );
        assert!(
            slowest < Duration::from_secs(3),
            "another client waited {slowest:?} during the attack"
        );
    }
}

/// How a field of an HPACK block is sent (RFC 7541 section 6), read
/// from its first byte: strings are skipped, not decoded.
#[derive(Debug, PartialEq)]
enum Hpack {
    Indexed,
    Inserted,
    NotIndexed,
    NeverIndexed,
}

/// Each field of an HPACK block: how it is sent, and its name's index (0
/// for a name sent as a string, 1-61 in the static table, 62 on in the
/// connection's dynamic table).
fn hpack_fields(block: &[u8]) -> Vec<(Hpack, usize)> {
    fn int(block: &[u8], at: &mut usize, bits: u32) -> usize {
        let max = (1usize << bits) - 1;
        let mut value = usize::from(block[*at]) & max;
        *at += 1;
        if value == max {
            let mut shift = 0;
            loop {
                let b = block[*at];
                *at += 1;
                value += usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        value
    }
    fn literal(block: &[u8], at: &mut usize, bits: u32) -> usize {
        let name = int(block, at, bits);
        for _ in 0..if name == 0 { 2 } else { 1 } {
            let len = int(block, at, 7);
            *at += len;
        }
        name
    }
    let (mut at, mut fields) = (0, Vec::new());
    while at < block.len() {
        let first = block[at];
        let field = if first & 0x80 != 0 {
            (Hpack::Indexed, int(block, &mut at, 7))
        } else if first & 0xc0 == 0x40 {
            (Hpack::Inserted, literal(block, &mut at, 6))
        } else if first & 0xe0 == 0x20 {
            // A dynamic table size update, not a field.
            int(block, &mut at, 5);
            continue;
        } else if first & 0x10 != 0 {
            (Hpack::NeverIndexed, literal(block, &mut at, 4))
        } else {
            (Hpack::NotIndexed, literal(block, &mut at, 4))
        };
        fields.push(field);
    }
    fields
}

/// A response's `x-request-id` is new for every response: stored in the
/// client's HPACK table it would never be used again, and h2's encoder
/// compares each new one with every stored one (a profiled 5 us a
/// response). The hello's only header whose name is not in the static
/// table is that id: each response sends it as a literal, never indexed,
/// whose name is not looked up in the dynamic table either.
#[test]
fn the_request_id_of_an_h2c_response_is_not_stored_in_the_hpack_table() {
    let berth = Berth::start(&module("hello", "/", "plain_hello", ""));
    let raw = RawH2::connect(&berth.addr, &[]);
    let mut conn = &raw.conn;
    for stream in [1u32, 3, 5, 7, 9] {
        conn.write_all(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            stream,
            &hpack_get("/hello"),
        ))
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while raw.frames_of(HEADERS).len() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let heads = raw.frames_of(HEADERS);
    assert_eq!(heads.len(), 5, "{:?}", raw.head());
    for (_, stream, block) in heads {
        let fields = hpack_fields(&block);
        // `:status 200`, then the rest by name.
        assert_eq!(
            fields[0],
            (Hpack::Indexed, 8),
            "stream {stream}: {fields:?}"
        );
        let unnamed: Vec<_> = fields
            .iter()
            .filter(|(how, name)| *how != Hpack::Indexed && (*name == 0 || *name >= 62))
            .collect();
        assert_eq!(
            unnamed,
            [&(Hpack::NeverIndexed, 0)],
            "stream {stream}: the request id is stored, or its name is: {fields:?}"
        );
    }
}

#[test]
fn a_rapid_reset_flood_gets_goaway_and_others_are_served() {
    let berth = Berth::start(&module("m", "/m", "misbehave", ""));
    let bystander = Bystander::start(berth.url("/m/ok"));
    std::thread::sleep(Duration::from_millis(200));
    let mut raw = RawH2::connect(&berth.addr, &[]);
    // CVE-2023-44487: open a stream and cancel it at once, thousands of
    // times, never over the concurrent-stream limit.
    let block = hpack_get("/m/sleep?ms=1000");
    let mut sent = 0;
    'flood: for batch in 0..100u32 {
        let mut bytes = Vec::new();
        for i in 0..100u32 {
            let stream = 2 * (batch * 100 + i) + 1;
            bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
            bytes.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        }
        if !raw.send(&bytes) {
            break 'flood;
        }
        sent += 100;
    }
    let code = raw.goaway(Duration::from_secs(5));
    assert!(
        code.is_some() || raw.closed_within(Duration::from_secs(1)),
        "{sent} streams opened and reset without a GOAWAY: {:?}",
        raw.head()
    );
    // ENHANCE_YOUR_CALM
    assert_eq!(code, Some(0xb), "{:?}", raw.head());
    bystander.served_throughout();
}

#[test]
fn a_continuation_flood_is_cut_off_and_others_are_served() {
    let berth = Berth::start(&module("m", "/m", "misbehave", ""));
    let bystander = Bystander::start(berth.url("/m/ok"));
    std::thread::sleep(Duration::from_millis(200));
    let mut raw = RawH2::connect(&berth.addr, &[]);
    // A head that never ends: HEADERS without END_HEADERS, then 16 KiB
    // CONTINUATION frames of header fields (literal, new names) for up
    // to 64 MiB.
    let mut fields = Vec::new();
    while fields.len() < 16_000 {
        fields.push(0x00);
        hpack_str(&mut fields, "x-flood");
        hpack_str(&mut fields, &"v".repeat(100));
    }
    let mut accepted = 0usize;
    if raw.send(&frame(HEADERS, 0, 1, &hpack_get("/m/ok"))) {
        let chunk: Vec<u8> = (0..16)
            .flat_map(|_| frame(CONTINUATION, 0, 1, &fields))
            .collect();
        while accepted < 64 << 20 && raw.send(&chunk) {
            accepted += chunk.len();
        }
    }
    assert!(
        raw.closed_within(Duration::from_secs(5)),
        "the server still reads an endless head after {accepted} bytes: {:?}",
        raw.head()
    );
    assert!(accepted < 64 << 20, "64 MiB of one head were read");
    bystander.served_throughout();
}

#[test]
fn streams_past_the_limit_are_refused() {
    let berth = Berth::start(
        &("[server]\nhttp2_max_streams = 4\n".to_owned() + &module("m", "/m", "misbehave", "")),
    );
    let mut raw = RawH2::connect(&berth.addr, &[]);
    // Twenty streams at once, ignoring the server's SETTINGS.
    let block = hpack_get("/m/sleep?ms=1500");
    let bytes: Vec<u8> = (0..20u32)
        .flat_map(|i| frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, &block))
        .collect();
    assert!(raw.send(&bytes));
    // The server announced its limit, refused the excess, and served four.
    let deadline = Instant::now() + Duration::from_secs(10);
    while raw.frames_of(HEADERS).len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let settings = raw.frames_of(SETTINGS);
    let announced = settings
        .iter()
        .filter(|(flags, _, _)| flags & 1 == 0)
        .flat_map(|(_, _, payload)| payload.chunks(6).map(|c| c.to_vec()).collect::<Vec<_>>())
        .find(|c| c[..2] == [0, 3])
        .map(|c| u32::from_be_bytes(c[2..6].try_into().unwrap()));
    assert_eq!(announced, Some(4), "SETTINGS_MAX_CONCURRENT_STREAMS");
    let refused = raw
        .frames_of(RST_STREAM)
        .iter()
        .filter(|(_, _, payload)| payload[..] == REFUSED_STREAM.to_be_bytes())
        .count();
    let served: std::collections::HashSet<u32> =
        raw.frames_of(HEADERS).iter().map(|(_, s, _)| *s).collect();
    assert_eq!(served.len(), 4, "{:?}", raw.head());
    assert_eq!(refused, 16, "{:?}", raw.head());
}

#[test]
fn a_client_that_never_reads_holds_its_slots_only_until_the_deadline() {
    let berth = Berth::start(&module(
        "m",
        "/m",
        "misbehave",
        "limits = { timeout = \"2s\", max_concurrency = 4 }",
    ));
    // A window of zero: the server may send heads but not one body byte,
    // and the client never opens it.
    let mut raw = RawH2::connect(&berth.addr, &[(0x4, 0)]);
    let block = hpack_get("/m/big?mb=4");
    let bytes: Vec<u8> = (0..4u32)
        .flat_map(|i| frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, &block))
        .collect();
    assert!(raw.send(&bytes));
    let active = || {
        metric(
            &berth.metrics(),
            "berth_http_server_active_requests",
            &[("module", "m")],
        )
        .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while active() < 4.0 {
        assert!(Instant::now() < deadline, "the four streams never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&berth.url("/m/ok")).status, 503, "the slots are held");
    // At the module's deadline the unread bodies are cut and the slots
    // free, though the connection stays open and unread.
    let deadline = Instant::now() + Duration::from_secs(10);
    while active() > 0.0 {
        assert!(
            Instant::now() < deadline,
            "unread streams still hold their slots"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&berth.url("/m/ok")).status, 200);
    assert!(raw.frames_of(DATA).is_empty(), "{:?}", raw.head());
    assert!(!raw.closed_within(Duration::ZERO));
}

/// An upstream that answers each request with the HTTP version it came
/// in on, after `delay` (`/hang`: after 30 s), and counts the connections
/// it accepted and the `/hang` requests it holds: HTTP/2 (by ALPN over
/// TLS, or by prior knowledge in the clear) or HTTP/1.1.
struct VersionUpstream {
    port: u16,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    hanging: Arc<std::sync::atomic::AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl VersionUpstream {
    /// Over TLS with `tls` (whose ALPN list decides the version), or in
    /// the clear speaking HTTP/2 only (an h2c server such as a gRPC one).
    fn start(tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>, delay: Duration) -> Self {
        Self::start_with(tls, delay, 200)
    }

    /// Same, allowing `max_streams` at once on an HTTP/2 connection.
    fn start_with(
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
        delay: Duration,
        max_streams: u32,
    ) -> Self {
        let (rt, listener) = crate::downstream::loopback_listener();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hanging = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (counted, held) = (connections.clone(), hanging.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, held) = (acceptor.clone(), held.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let held = held.clone();
                        async move {
                            if req.uri().path() == "/hang" {
                                held.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                            tokio::time::sleep(delay).await;
                            let version = format!("{:?}", req.version());
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(version),
                            )))
                        }
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http2().max_concurrent_streams(max_streams);
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                        }
                        None => {
                            builder = builder.http2_only();
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        VersionUpstream {
            port,
            connections,
            hanging,
            _rt: rt,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// `/m/fetch` of `url` through the misbehave guest: the upstream's body.
fn fetched(berth: &Berth, url: &str) -> Result<String, String> {
    let r = get(&berth.url(&format!("/m/fetch?url={url}")));
    if r.status != 200 {
        return Err(format!("{}: {}", r.status, r.body));
    }
    Ok(r.json()["body"].as_str().unwrap_or_default().to_owned())
}

/// `n` fetches of `url` at once; each must succeed.
fn fetched_at_once(berth: &Berth, url: &str, n: usize) {
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..n).map(|_| s.spawn(|| fetched(berth, url))).collect();
        for call in calls {
            call.join().unwrap().expect("a concurrent fetch");
        }
    });
}

#[test]
fn outbound_tls_takes_http2_by_alpn_and_multiplexes_calls_on_one_connection() {
    let ca = crate::tls::PrivateCa::new();
    let mut h2_tls = (*ca.server).clone();
    h2_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let delay = Duration::from_millis(300);
    let h2 = VersionUpstream::start(Some(Arc::new(h2_tls)), delay);
    // No ALPN from the server: the client must stay on HTTP/1.1.
    let h1 = VersionUpstream::start(Some(ca.server.clone()), delay);
    let config = module(
        "m",
        "/m",
        "misbehave",
        &format!(
            "allowed_outbound_hosts = [\"https://localhost:{}\", \"https://localhost:{}\"]",
            h2.port, h1.port
        ),
    );
    let ca_file = ca.ca_file.display().to_string();
    let berth = Berth::start_with(&config, &[("SSL_CERT_FILE", &ca_file)]);
    let (h2_url, h1_url) = (
        format!("https://localhost:{}/v", h2.port),
        format!("https://localhost:{}/v", h1.port),
    );
    assert_eq!(fetched(&berth, &h2_url).unwrap(), "HTTP/2.0");
    assert_eq!(fetched(&berth, &h1_url).unwrap(), "HTTP/1.1");

    // Six calls in flight at once: over HTTP/1.1 they need connections of
    // their own; over HTTP/2 they are streams of the one pooled connection.
    fetched_at_once(&berth, &h1_url, 6);
    assert!(
        h1.connections() > 1,
        "HTTP/1.1 calls overlapped: {}",
        h1.connections()
    );
    fetched_at_once(&berth, &h2_url, 6);
    assert_eq!(h2.connections(), 1, "HTTP/2 calls share one connection");
}

#[test]
fn an_upstream_configured_for_h2c_is_spoken_to_in_http2_by_prior_knowledge() {
    let up = VersionUpstream::start(None, Duration::ZERO);
    let h1 = crate::downstream::Downstream::start(crate::downstream::Mode::Ok);
    let url = format!("http://127.0.0.1:{}/v", up.port);
    let allow = format!(
        "allowed_outbound_hosts = [\"http://127.0.0.1:{}\", \"http://{}\"]",
        up.port, h1.addr
    );
    let with_h2c = format!(
        "[upstreams.\"127.0.0.1:{}\"]\nh2c = true\n{}",
        up.port,
        module("m", "/m", "misbehave", &allow)
    );
    let berth = Berth::start(&with_h2c);
    // An HTTP/1.1 upstream of the same module before and after: each call
    // gets the protocol of its own upstream.
    assert_eq!(fetched(&berth, &h1.url("/x")).unwrap(), "downstream ok");
    assert_eq!(fetched(&berth, &url).unwrap(), "HTTP/2.0");
    assert_eq!(fetched(&berth, &h1.url("/x")).unwrap(), "downstream ok");
    fetched_at_once(&berth, &url, 4);
    assert_eq!(up.connections(), 1, "h2c calls share one connection");
    // A guest's shorter connect timeout picks another pool, of the same
    // protocol.
    let r = get(&berth.url(&format!("/m/fetch_within?url={url}&connect_ms=500")));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["body"], "HTTP/2.0");
    drop(berth);

    // Not configured so, a cleartext call is HTTP/1.1, which an HTTP/2-only
    // server refuses: the guest gets a protocol error, not a hang.
    let berth = Berth::start(&module("m", "/m", "misbehave", &allow));
    let err = fetched(&berth, &url).unwrap_err();
    assert!(err.starts_with("502"), "{err}");
    drop(berth);

    // `h2c` in the defaults reaches every upstream of every module.
    let berth = Berth::start(&format!(
        "[defaults.outbound]\nh2c = true\n{}",
        module("m", "/m", "misbehave", &allow)
    ));
    assert_eq!(fetched(&berth, &url).unwrap(), "HTTP/2.0");
}

#[test]
fn a_grpc_stream_whose_guest_traps_mid_body_ends_internal_without_its_internals() {
    let berth = Berth::start(&module("proxy", "/proxy", "stream_proxy", ""));
    let h2 = H2::connect(&berth.addr);
    for bytes in ["0", "1024", "100000"] {
        let reply = h2
            .send(
                Method::POST,
                "/proxy",
                &[
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    ("x-trap-after", bytes),
                ],
                b"",
            )
            .unwrap_or_else(|e| panic!("after {bytes} bytes: {e}"));
        assert_eq!(reply.status, 200, "{reply:?}");
        // Trailers-only when the host still held the head, else the
        // bytes that left and then trailers; never a clean end.
        let status = reply.trailers.as_ref().unwrap_or(&reply.headers);
        let field = |name: &str| status.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(
            field("grpc-status"),
            Some("13"),
            "after {bytes} bytes: {reply:?}"
        );
        let message = field("grpc-message").unwrap_or_default();
        assert!(
            !message.contains("panicked") && !message.contains("stream-proxy"),
            "guest internals in {message:?}"
        );
        assert!(reply.body.len() <= bytes.parse().unwrap(), "{reply:?}");
    }
}

#[test]
fn one_modules_calls_never_queue_behind_anothers_on_a_shared_http2_connection() {
    // The upstream takes two streams at a time per connection. Module `a`
    // holds both with calls that hang; module `b`'s call must still be
    // answered, not queued behind them until its first-byte timeout.
    let up = VersionUpstream::start_with(None, Duration::ZERO, 2);
    let allow = format!(
        "allowed_outbound_hosts = [\"http://127.0.0.1:{}\"]",
        up.port
    );
    let config = format!(
        "[upstreams.\"127.0.0.1:{}\"]\nh2c = true\nfirst_byte_timeout = \"20s\"\n\n{}{}",
        up.port,
        module("a", "/a", "misbehave", &allow),
        module("b", "/b", "misbehave", &allow),
    );
    let berth = Berth::start(&config);
    let hang = format!("/a/fetch?url=http://127.0.0.1:{}/hang", up.port);
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let url = berth.url(&hang);
            std::thread::spawn(move || get(&url))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hanging.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "module a's calls never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = get(&berth.url(&format!(
        "/b/fetch_within?url=http://127.0.0.1:{}/v&ms=5000",
        up.port
    )));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["body"], "HTTP/2.0");
    drop(berth);
    for holder in holders {
        let _ = holder.join();
    }
}

/// A TCP relay to `backend` that can make every connection it has open so
/// far go silent, without closing it (a peer gone without a FIN, a NAT
/// that dropped the flow), while new connections pass.
struct SilencingRelay {
    port: u16,
    opened: Arc<std::sync::atomic::AtomicUsize>,
    silent_below: Arc<std::sync::atomic::AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl SilencingRelay {
    fn start(backend: u16) -> Self {
        use std::sync::atomic::AtomicUsize;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (rt, listener) = crate::downstream::loopback_listener();
        let port = listener.local_addr().unwrap().port();
        let opened = Arc::new(AtomicUsize::new(0));
        let silent_below = Arc::new(AtomicUsize::new(0));
        let (count, silent) = (opened.clone(), silent_below.clone());
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let silent = silent.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf).await {
                            if id < silent.load(Ordering::SeqCst) {
                                // Swallow everything from now on; keep both
                                // ends open.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        SilencingRelay {
            port,
            opened,
            silent_below,
            _rt: rt,
        }
    }
}

#[test]
fn a_pooled_http2_connection_gone_silent_is_replaced_by_its_pings() {
    // Over HTTP/2 a call's timeout resets only its stream, so a silent
    // connection would stay pooled and fail every call on it; the pings
    // (every 5 s, 5 s to answer) find it out and a new one is made.
    let up = VersionUpstream::start(None, Duration::ZERO);
    let relay = SilencingRelay::start(up.port);
    let allow = format!(
        "allowed_outbound_hosts = [\"http://127.0.0.1:{}\"]",
        relay.port
    );
    let config = format!(
        "[upstreams.\"127.0.0.1:{}\"]\nh2c = true\nfirst_byte_timeout = \"1s\"\nretries = 0\n\
         circuit_breaker = {{ failures = 0 }}\n\n{}",
        relay.port,
        module("m", "/m", "misbehave", &allow),
    );
    let berth = Berth::start(&config);
    let url = format!("http://127.0.0.1:{}/v", relay.port);
    assert_eq!(fetched(&berth, &url).unwrap(), "HTTP/2.0");
    relay
        .silent_below
        .store(relay.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    assert!(
        fetched(&berth, &url).is_err(),
        "the silent connection was used"
    );
    // No call for a while: only pings sent while the connection idles can
    // find it out (within 10 s of the last byte read), and the next call
    // gets a new one.
    std::thread::sleep(Duration::from_secs(14));
    assert_eq!(fetched(&berth, &url).unwrap(), "HTTP/2.0");
    assert_eq!(relay.opened.load(Ordering::SeqCst), 2);
}

/// One framed `HelloRequest { name }` (field 1, a string), as gRPC sends it.
fn hello_call(name: &str) -> Vec<u8> {
    let mut message = vec![0x0a];
    let mut len = name.len();
    while len >= 0x80 {
        message.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    message.push(len as u8);
    message.extend_from_slice(name.as_bytes());
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend(message);
    framed
}

#[test]
fn the_sdk_routers_answer_what_is_not_a_well_formed_call_by_the_protocol() {
    // The example on WASI 0.2 and the same service on 0.3: the SDK's two
    // routers must answer alike.
    for (wasm, greeting) in [("grpc_greeter", "Hello"), ("p3_grpc", "Hello from p3")] {
        let berth = Berth::start(&module(
            "g",
            "/greeter.Greeter",
            wasm,
            "limits = { max_body = \"1MiB\" }",
        ));
        let h2 = H2::connect(&berth.addr);
        let grpc = |extra: &[(&'static str, &'static str)], body: Vec<u8>| {
            let mut headers = vec![("content-type", "application/grpc"), ("te", "trailers")];
            headers.extend_from_slice(extra);
            h2.send(Method::POST, "/greeter.Greeter/SayHello", &headers, &body)
                .unwrap_or_else(|e| panic!("{wasm}: {e}"))
        };
        let status = |r: &H2Reply| -> (String, String) {
            let fields = r.trailers.as_ref().unwrap_or(&r.headers);
            let get = |name| {
                fields
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            (get("grpc-status"), get("grpc-message"))
        };

        let ok = grpc(&[], hello_call("Ada"));
        assert_eq!(ok.status, 200, "{wasm}: {ok:?}");
        assert_eq!(ok.header("content-type"), Some("application/grpc"));
        assert_eq!(ok.header("grpc-accept-encoding"), Some("identity"));
        assert_eq!(status(&ok), ("0".into(), String::new()), "{wasm}: {ok:?}");
        assert!(
            String::from_utf8_lossy(&ok.body).contains(&format!("{greeting}, Ada!")),
            "{wasm}: {ok:?}"
        );

        let not_grpc = h2
            .send(
                Method::POST,
                "/greeter.Greeter/SayHello",
                &[("content-type", "text/plain")],
                b"Ada",
            )
            .unwrap();
        assert_eq!(not_grpc.status, 415, "{wasm}: {not_grpc:?}");

        for (what, extra, body, code, message) in [
            (
                "compressed",
                vec![("grpc-encoding", "gzip")],
                vec![],
                "12",
                "grpc-encoding gzip is not supported".to_owned(),
            ),
            (
                "cut mid-message",
                vec![],
                vec![0, 0, 0, 0, 10, 0x0a],
                "13",
                "the request ended inside a message".to_owned(),
            ),
            (
                "two messages to a unary method",
                vec![],
                [hello_call("Ada"), hello_call("Bo")].concat(),
                "13",
                "a unary call has more than one request message".to_owned(),
            ),
            (
                "no message",
                vec![],
                vec![],
                "13",
                "the call has no request message".to_owned(),
            ),
            (
                "over the router's message limit",
                vec![],
                hello_call(&"x".repeat(100_000)),
                "8",
                format!(
                    "a message of {} bytes is over the limit of 65536",
                    100_000 + 4
                ),
            ),
        ] {
            let r = grpc(&extra, body);
            assert_eq!(r.status, 200, "{wasm}, {what}: {r:?}");
            assert_eq!(
                status(&r),
                (code.to_owned(), message),
                "{wasm}, {what}: {r:?}"
            );
        }
    }
}
