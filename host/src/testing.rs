//! Shared by the in-process tests: the guest components `make guests`
//! builds, configs written to a temporary folder, and a small HTTP client.

use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::config::{Config, ConfigSource};

/// A guest component built by `make guests`: in `BERTH_GUESTS_DIR` when
/// set (`make mutants` builds in a copy of the tree), else in the target
/// folder.
pub(crate) fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("BERTH_GUESTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
                .join("wasm32-wasip2/release")
        });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `make guests` first",
        path.display()
    );
    path
}

/// A config file in its own folder, as `--config` would read it.
pub(crate) struct ConfigFile {
    /// The folder, removed on drop.
    pub(crate) dir: tempfile::TempDir,
    /// Reads the file again, as a reload does.
    pub(crate) source: ConfigSource,
}

impl ConfigFile {
    /// Writes `toml` below a `[runtime]` section that keeps the engine
    /// small (tests run many engines at once) and the cache off.
    pub(crate) fn new(toml: &str) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("berth.toml");
        let source = ConfigSource {
            file: Some(file),
            overrides: Default::default(),
        };
        let config = ConfigFile { dir, source };
        config.write(toml);
        config
    }

    /// Replaces the file's content.
    pub(crate) fn write(&self, toml: &str) {
        let text = format!(
            "[runtime]\nmax_instances = 8\ncache_dir = \"\"\nwatch = false\nmodules_dir = {:?}\n\n{toml}",
            self.dir.path()
        );
        std::fs::write(self.source.file.as_ref().unwrap(), text).unwrap();
    }

    /// The config as it is now.
    pub(crate) fn load(&self) -> Config {
        self.source.load().unwrap()
    }
}

/// `[modules.<name>]` serving `component` (a guest of `make guests`,
/// copied into the modules folder so tests can change it) at `route`.
pub(crate) fn module(config: &ConfigFile, name: &str, route: &str, component: &str) -> String {
    std::fs::copy(
        wasm(component),
        config.dir.path().join(format!("{name}.wasm")),
    )
    .unwrap();
    format!("[modules.{name}]\nroute = \"{route}\"\nfile = \"{name}.wasm\"\n")
}

/// A response, read whole.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

/// Sends one request over a fresh connection.
pub(crate) async fn send(method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `GET url`.
pub(crate) async fn get(url: &str) -> Reply {
    send(Method::GET, url, &[]).await
}

/// Every module of `file` loaded, as a routing table.
pub(crate) async fn routes(
    file: &ConfigFile,
) -> (
    std::sync::Arc<crate::router::Routes>,
    std::sync::Arc<crate::metrics::Metrics>,
) {
    use crate::runtime::{Fetched, Module, Runtime, RuntimeOptions};
    let config = file.load();
    let runtime = Runtime::new(&RuntimeOptions::from_config(&config)).unwrap();
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let mut modules = Vec::new();
    for spec in config.module_specs() {
        let fetched = Fetched::fetch(&spec, &runtime).await.unwrap();
        let module = Module::load(&runtime, spec, fetched, &metrics).unwrap();
        modules.push(std::sync::Arc::new(module));
    }
    let routes = crate::router::Routes::default();
    routes.publish(crate::router::Router::new(modules));
    (std::sync::Arc::new(routes), metrics)
}

/// How a [`Peer`] answers: from the request's path and query, and how
/// often that path was asked before.
pub(crate) type Answer = dyn Fn(&str, usize) -> http::Response<PeerBody> + Send + Sync;

/// The body of a [`Peer`]'s answer: whole, or [`dripped`].
pub(crate) type PeerBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

/// Each request's path and query, and its `Authorization`.
type AskedLog = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

/// An HTTP/1.1 server on loopback that answers every request with an
/// [`Answer`] and keeps what it was asked: a peer (registry, Prometheus)
/// that fails and lies on demand. Stops when dropped.
pub(crate) struct Peer {
    /// `127.0.0.1:PORT`.
    pub(crate) host: String,
    /// Each request's path and query, and its `Authorization`, in order:
    /// one lock, so that concurrent requests cannot pair them wrongly.
    asked: AskedLog,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Peer {
    pub(crate) async fn start(answer: std::sync::Arc<Answer>) -> Peer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let asked = AskedLog::default();
        let log = asked.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (answer, log) = (answer.clone(), log.clone());
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let path = req.uri().path().to_owned();
                    let whole = req.uri().to_string();
                    let n = {
                        let mut log = log.lock().unwrap();
                        let n = log
                            .iter()
                            .filter(|(p, _)| p.split('?').next() == Some(path.as_str()))
                            .count();
                        let authorization = req.headers().get(http::header::AUTHORIZATION);
                        let authorization = authorization.and_then(|v| v.to_str().ok());
                        log.push((whole.clone(), authorization.map(str::to_owned)));
                        n
                    };
                    let response = answer(&whole, n);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
                );
            }
        });
        Peer {
            host,
            asked,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Every request's path and query so far, in order.
    pub(crate) fn asked(&self) -> Vec<String> {
        let asked = self.asked.lock().unwrap();
        asked.iter().map(|(uri, _)| uri.clone()).collect()
    }

    /// Every request's `Authorization` so far, in the order of [`Peer::asked`].
    pub(crate) fn authorizations(&self) -> Vec<Option<String>> {
        let asked = self.asked.lock().unwrap();
        asked.iter().map(|(_, auth)| auth.clone()).collect()
    }
}

/// A 200 with `body`.
pub(crate) fn ok(body: &[u8]) -> http::Response<PeerBody> {
    use http_body_util::BodyExt;
    http::Response::new(Full::new(Bytes::copy_from_slice(body)).boxed_unsync())
}

/// A 200 whose body is `first`, then after `pause` the rest: a slow peer.
pub(crate) fn dripped(
    first: &[u8],
    pause: std::time::Duration,
    rest: &[u8],
) -> http::Response<PeerBody> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let frame = |bytes: &[u8]| Ok(http_body::Frame::data(Bytes::copy_from_slice(bytes)));
    let (first, rest) = (frame(first), frame(rest));
    let rest = async move {
        tokio::time::sleep(pause).await;
        rest
    };
    let frames = futures_util::stream::iter([first]).chain(futures_util::stream::once(rest));
    http::Response::new(http_body_util::StreamBody::new(frames).boxed_unsync())
}

/// A failure status with a registry's error envelope.
pub(crate) fn status(code: u16) -> http::Response<PeerBody> {
    let mut response = ok(b"{\"errors\":[{\"message\":\"said so\"}]}");
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
}
