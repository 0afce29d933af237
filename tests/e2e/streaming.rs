//! Full duplex through an outbound call: the `stream-proxy` guest waits for
//! the upstream's response head, then pipes the client's chunked body up
//! while it streams the upstream's answer down (wasmtime's `/double-echo`
//! shape). The upstream echoes as it reads, so nothing completes unless
//! every hop streams both ways at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

use crate::support::*;

/// How the upstream answers.
#[derive(Clone, Copy)]
enum Upstream {
    /// Head at once, then each chunk back as it arrives.
    Echo,
    /// Same, every byte twice: the response outgrows the request.
    Double,
    /// 413 at once, without reading the body.
    EarlyReject,
}

fn upstream(mode: Upstream) -> (SocketAddr, tokio::runtime::Runtime) {
    let handler = move |req: Request<hyper::body::Incoming>| async move {
        let body: BoxBody<Bytes, hyper::Error> = match mode {
            Upstream::Echo => req.into_body().boxed(),
            Upstream::Double => req
                .into_body()
                .map_frame(|f| f.map_data(|d| d.iter().flat_map(|b| [*b, *b]).collect()))
                .boxed(),
            Upstream::EarlyReject => {
                let r = Response::builder().status(413).body(
                    Full::new(Bytes::from_static(b"too large\n"))
                        .map_err(|never| match never {})
                        .boxed(),
                );
                return Ok::<_, Infallible>(r.unwrap());
            }
        };
        Ok(Response::new(body))
    };
    crate::downstream::serve(handler, None)
}

/// `len` pseudo-random bytes in 16 KiB chunks, with no declared length, so
/// hyper sends them chunked.
struct Generated {
    rng: fastrand::Rng,
    left: usize,
}

impl Generated {
    fn new(len: usize) -> Self {
        Generated {
            rng: fastrand::Rng::with_seed(len as u64),
            left: len,
        }
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(16 * 1024);
        self.left -= n;
        let mut chunk = vec![0u8; n];
        self.rng.fill(&mut chunk);
        Some(Bytes::from(chunk))
    }

    /// The sha256 of the whole stream, with each byte `repeat` times.
    fn digest(len: usize, repeat: usize) -> String {
        let mut g = Generated::new(len);
        let mut h = Sha256::new();
        while let Some(chunk) = g.next_chunk() {
            if repeat == 1 {
                h.update(&chunk);
            } else {
                h.update(chunk.iter().flat_map(|b| [*b; 2]).collect::<Vec<u8>>());
            }
        }
        hex::encode(h.finalize())
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.next_chunk().map(|c| Ok(Frame::data(c))))
    }
}

struct Exchange {
    status: u16,
    len: usize,
    sha256: String,
}

/// A hyper client connection to berth (full duplex: it reads the answer
/// while the body is still going up), and the request through the proxy
/// to `upstream` with this body.
async fn connect<B>(
    addr: &str,
    upstream: SocketAddr,
    body: B,
) -> (hyper::client::conn::http1::SendRequest<B>, Request<B>)
where
    B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{addr}/proxy"))
        .header("x-upstream", upstream.to_string())
        .header("x-upstream-path", "/echo")
        .body(body)
        .unwrap();
    (sender, req)
}

/// POSTs `len` bytes through the proxy to `upstream`.
fn exchange(berth: &Berth, upstream: SocketAddr, len: usize) -> Exchange {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = berth.addr.clone();
    rt.block_on(async move {
        let (mut sender, req) = connect(&addr, upstream, Generated::new(len)).await;
        let run = async {
            let resp = sender.send_request(req).await.expect("response head");
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let (mut h, mut n) = (Sha256::new(), 0);
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("response body").into_data() {
                    n += data.len();
                    h.update(&data);
                }
            }
            Exchange {
                status,
                len: n,
                sha256: hex::encode(h.finalize()),
            }
        };
        // Far below the module's timeout (60 s): a stalled exchange fails
        // here, not as a 504.
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the exchange stalled")
    })
}

fn proxy(upstream: SocketAddr) -> Berth {
    Berth::start(&module(
        "proxy",
        "/proxy",
        "stream_proxy",
        &format!(
            "allowed_outbound_hosts = [\"http://{upstream}\"]\nlimits = {{ timeout = \"60s\", max_body = \"64MiB\" }}"
        ),
    ))
}

#[test]
fn a_guest_streams_a_body_through_an_echoing_upstream_in_full_duplex() {
    let (up, _rt) = upstream(Upstream::Echo);
    let berth = proxy(up);
    for len in [1 << 20, 16 << 20] {
        let x = exchange(&berth, up, len);
        assert_eq!(x.status, 200);
        assert_eq!(x.len, len);
        assert_eq!(x.sha256, Generated::digest(len, 1), "{len} bytes");
    }
}

#[test]
fn a_response_larger_than_the_request_streams_too() {
    let (up, _rt) = upstream(Upstream::Double);
    let berth = proxy(up);
    let len = 1 << 20;
    let x = exchange(&berth, up, len);
    assert_eq!(x.status, 200);
    assert_eq!(x.len, 2 * len);
    assert_eq!(x.sha256, Generated::digest(len, 2));
}

#[test]
fn an_upstream_that_answers_before_reading_the_body_is_passed_through() {
    let (up, _rt) = upstream(Upstream::EarlyReject);
    let berth = proxy(up);
    let x = exchange(&berth, up, 1 << 20);
    assert_eq!(x.status, 413);
    assert_eq!(x.len, "too large\n".len());
}

/// A request body fed by the test, chunk by chunk.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for Fed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

/// An interactive exchange with an echo at `path` on `addr`: the client
/// sends nothing until it has the head, then one line at a time, each only
/// after the last came back. A host that holds the head until the first
/// body frame, or gathers either body before passing it on, deadlocks here.
pub fn ping_pong(addr: &str, path: &str, headers: &[(&str, String)]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (feed, rx) = tokio::sync::mpsc::channel(1);
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::post(format!("http://{addr}{path}"));
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let req = req.body(Fed(rx)).unwrap();
        let run = async {
            let resp = sender.send_request(req).await.expect("response head");
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            for i in 0..3 {
                let line = Bytes::from(format!("ping {i}\n"));
                feed.send(line.clone()).await.unwrap();
                let mut got = Vec::new();
                while got.len() < line.len() {
                    let frame = body.frame().await.expect("a frame").expect("no error");
                    got.extend_from_slice(&frame.into_data().unwrap());
                }
                assert_eq!(got, line);
            }
            drop(feed);
            while let Some(frame) = body.frame().await {
                frame.expect("a clean end");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the head or a frame never came: the exchange deadlocked");
    });
}

#[test]
fn the_response_head_leaves_before_any_body_and_frames_stream_one_by_one() {
    let (up, _rt) = upstream(Upstream::Echo);
    let berth = proxy(up);
    ping_pong(
        &berth.addr,
        "/proxy",
        &[
            ("x-upstream", up.to_string()),
            ("x-upstream-path", "/echo".to_owned()),
        ],
    );
}

#[test]
fn a_client_that_hangs_up_mid_body_cancels_its_guest_and_frees_the_slot() {
    use std::io::{Read, Write};
    // The guest sends its head and a line, then sleeps 20 s before the
    // next: it cannot notice the hang-up itself, so only the host ends it.
    let berth = Berth::start(&module(
        "proxy",
        "/proxy",
        "stream_proxy",
        "limits = { timeout = \"60s\", max_concurrency = 1 }",
    ));
    let active = || {
        metric(
            &berth.metrics(),
            "berth_http_server_active_requests",
            &[("module", "proxy")],
        )
    };
    let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET /proxy HTTP/1.1\r\nhost: x\r\nx-drip-ms: 20000\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    while !got.windows(5).any(|w| w == b"tick\n") {
        let mut buf = [0u8; 1024];
        let n = conn.read(&mut buf).expect("the head and a first line");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(active(), Some(1.0), "the guest is mid-body");
    drop(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while active() != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest kept running after the client hung up mid-body"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The one slot is free: the guest answers (400, no upstream named)
    // instead of the host shedding with 503.
    let r = get(&berth.url("/proxy"));
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn a_stream_cut_at_its_deadline_never_looks_complete() {
    use std::io::{Read, Write};
    // wasmtime-wasi-http ends the body of a torn-down guest the way it ends
    // a finished one; the host must not pass that on as a whole response.
    let berth = Berth::start(&module(
        "proxy",
        "/proxy",
        "stream_proxy",
        "limits = { timeout = \"1s\" }",
    ));
    let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"GET /proxy HTTP/1.1\r\nhost: x\r\nx-drip-ms: 100\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got)
        .expect("the connection ends after the cut");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("transfer-encoding: chunked"),
        "the test needs a chunked body: {text}"
    );
    let ticks = text.matches("tick\n").count();
    assert!((1..1000).contains(&ticks), "{ticks} ticks: {text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut-off stream ended with the last chunk, as if complete: {text}"
    );
}

#[test]
fn a_guest_that_traps_after_its_head_never_sends_a_body_that_looks_whole() {
    use std::io::{Read, Write};
    // The guest sets its head, writes a little and traps without finishing
    // its body. If the host gathered the body before the head went out it
    // still can, and must, answer with the failure (500); if the head went
    // first, the stream must end aborted. Never a 200 that looks complete.
    let berth = Berth::start(&module("proxy", "/proxy", "stream_proxy", ""));
    let (mut five_hundreds, mut aborted) = (0, 0);
    for round in 0..20 {
        let bytes = if round % 2 == 0 { 0 } else { 1024 };
        let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            conn,
            "GET /proxy HTTP/1.1\r\nhost: x\r\nx-trap-after: {bytes}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        if text.starts_with("HTTP/1.1 500") {
            five_hundreds += 1;
            continue;
        }
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("content-length") && !text.ends_with("0\r\n\r\n"),
            "{bytes} bytes, then a trap, sent as a whole response: {text}"
        );
        aborted += 1;
    }
    assert_eq!(five_hundreds + aborted, 20);
}
