//! A real HTTP server for outbound tests that misbehaves on purpose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use http_body_util::combinators::BoxBody;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// How the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// 200 with these bytes.
    Serve(Bytes),
    /// 200 `downstream ok`.
    Ok,
    /// 503 for the next `n` requests, then 200; with `Retry-After` seconds
    /// when given.
    FailFirst(usize, Option<u64>),
    /// Always 503.
    AlwaysFail,
    /// Never answers.
    Hang,
    /// 200 with these bytes after this long.
    Delay(Duration, Bytes),
    /// 200 with a first chunk of the body at once, then nothing.
    Stall,
}

/// A listener on a free loopback port, and the one-thread runtime a test
/// server runs it on (the server lives as long as the runtime).
pub fn loopback_listener() -> (tokio::runtime::Runtime, tokio::net::TcpListener) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    (runtime, listener)
}

/// A downstream that answers `ok` and keeps the `traceparent` of every
/// call (empty when there was none); it lives as long as the runtime.
pub fn traceparents() -> (SocketAddr, Arc<Mutex<Vec<String>>>, tokio::runtime::Runtime) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let (addr, runtime) = serve(
        move |req: Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let parent = req
                    .headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                record.lock().unwrap().push(parent);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        },
        None,
    );
    (addr, seen, runtime)
}

/// Serves HTTP/1 (over TLS with a server config) on a free loopback port
/// from a runtime of its own; the server lives as long as the returned
/// runtime.
pub fn serve<F, Fut, B>(
    handler: F,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> (SocketAddr, tokio::runtime::Runtime)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let (runtime, listener) = loopback_listener();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match acceptor {
                    None => {
                        http.serve_connection(TokioIo::new(stream), service_fn(handler))
                            .await
                    }
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        http.serve_connection(TokioIo::new(tls), service_fn(handler))
                            .await
                    }
                };
            });
        }
    });
    (addr, runtime)
}

/// The server; it stops with the test process.
pub struct Downstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<usize>>>,
    mode: Arc<Mutex<Mode>>,
    _runtime: tokio::runtime::Runtime,
}

impl Downstream {
    /// A static file server for `bytes`.
    pub fn serving(bytes: Vec<u8>) -> Downstream {
        Self::start(Mode::Serve(Bytes::from(bytes)))
    }

    pub fn start(mode: Mode) -> Downstream {
        Self::start_with(mode, None)
    }

    /// Same, over TLS.
    pub fn start_with(
        mode: Mode,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> Downstream {
        let hits = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let (h, b, m) = (hits.clone(), bodies.clone(), mode.clone());
        let (addr, runtime) = serve(move |req| answer(req, h.clone(), b.clone(), m.clone()), tls);
        Downstream {
            addr,
            hits,
            bodies,
            mode,
            _runtime: runtime,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The length of each request body received, in order.
    pub fn bodies(&self) -> Vec<usize> {
        self.bodies.lock().unwrap().clone()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    hits: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<usize>>>,
    mode: Arc<Mutex<Mode>>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    use http_body_util::BodyExt;
    let len = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => usize::MAX,
    };
    bodies.lock().unwrap().push(len);
    let now = {
        let mut m = mode.lock().unwrap();
        let now = m.clone();
        if let Mode::FailFirst(n, after) = now {
            *m = if n <= 1 {
                Mode::Ok
            } else {
                Mode::FailFirst(n - 1, after)
            };
        }
        now
    };
    let unavailable = |retry_after: Option<u64>| {
        let mut r = Response::builder().status(503);
        if let Some(secs) = retry_after {
            r = r.header("retry-after", secs.to_string());
        }
        r.body(BoxBody::new(Full::new(Bytes::from_static(b"unavailable"))))
            .unwrap()
    };
    Ok(match now {
        Mode::Ok => Response::new(BoxBody::new(Full::new(Bytes::from_static(
            b"downstream ok",
        )))),
        Mode::Serve(bytes) => Response::new(BoxBody::new(Full::new(bytes))),
        Mode::FailFirst(_, after) => unavailable(after),
        Mode::AlwaysFail => unavailable(None),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(300)).await;
            Response::new(BoxBody::new(Full::new(Bytes::new())))
        }
        Mode::Delay(after, bytes) => {
            tokio::time::sleep(after).await;
            Response::new(BoxBody::new(Full::new(bytes)))
        }
        Mode::Stall => {
            let first = futures_util::stream::once(async {
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"first bytes")))
            });
            let never = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_secs(300)).await;
                Ok(http_body::Frame::data(Bytes::new()))
            });
            use futures_util::StreamExt;
            Response::new(BoxBody::new(http_body_util::StreamBody::new(
                first.chain(never),
            )))
        }
    })
}

/// An address where a TCP connect never completes: a loopback listener
/// that never accepts, with its accept queue filled. Linux drops the SYNs
/// of a listener whose queue is full (no SYN-ACK, no reset), so a
/// connect waits until its own timeout, as to a host behind a firewall.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: std::net::TcpListener,
    _queued: Vec<std::net::TcpStream>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        // The queue holds the listen backlog plus one; a connect that
        // times out proves it full.
        loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(conn) => queued.push(conn),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                Err(e) => panic!("filling the blackhole's queue: {e}"),
            }
            assert!(queued.len() < 10_000, "the accept queue never filled");
        }
        Blackhole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
