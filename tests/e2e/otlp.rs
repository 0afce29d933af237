//! A real OTLP/HTTP receiver: accepts `POST /v1/traces` with protobuf
//! bodies, as any collector would, and keeps the spans for assertions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

/// A received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub name: String,
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: Vec<(String, String)>,
    pub events: Vec<String>,
    /// Each event's name with its attributes.
    pub event_attributes: Vec<(String, Vec<(String, String)>)>,
    /// The status code (0 unset, 1 ok, 2 error) and its message.
    pub status: (i32, String),
    /// When it started and ended, in ns since the Unix epoch.
    pub start_ns: u64,
    pub end_ns: u64,
}

pub const STATUS_ERROR: i32 = 2;
pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;

impl Span {
    /// The attributes of the first event called `name`.
    pub fn event(&self, name: &str) -> Option<&[(String, String)]> {
        self.event_attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, attributes)| attributes.as_slice())
    }

    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    _runtime: tokio::runtime::Runtime,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flatten(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(value_text).unwrap_or_default(),
            )
        })
        .collect()
}

fn value_text(v: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

impl Receiver {
    pub fn start() -> Receiver {
        Self::start_with(None)
    }

    /// Same, over TLS.
    pub fn start_with(tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        let (addr, runtime) = crate::downstream::serve(move |req| receive(req, sink.clone()), tls);
        Receiver {
            addr,
            spans,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `pred` holds for the spans received so far.
    pub fn wait_for(&self, limit: Duration, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if pred(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans never arrived as expected; got {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn receive(
    req: Request<hyper::body::Incoming>,
    sink: Arc<Mutex<Vec<Span>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let Ok(body) = body else {
        return Ok(Response::builder()
            .status(400)
            .body(Full::default())
            .unwrap());
    };
    if path != "/v1/traces" {
        return Ok(Response::builder()
            .status(404)
            .body(Full::default())
            .unwrap());
    }
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return Ok(Response::builder()
            .status(400)
            .body(Full::default())
            .unwrap());
    };
    let mut received = Vec::new();
    for rs in export.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(value_text)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                received.push(Span {
                    service: service.clone(),
                    name: s.name,
                    kind: s.kind,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: flatten(&s.attributes),
                    events: s.events.iter().map(|e| e.name.clone()).collect(),
                    event_attributes: s
                        .events
                        .into_iter()
                        .map(|e| (e.name, flatten(&e.attributes)))
                        .collect(),
                    status: s.status.map_or((0, String::new()), |s| (s.code, s.message)),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                });
            }
        }
    }
    sink.lock().unwrap().extend(received);
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    Ok(Response::builder()
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(answer)))
        .unwrap())
}
