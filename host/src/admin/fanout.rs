//! `?pods=all`: one admin action, repeated on every pod of the Deployment.
//!
//! Each pod runs its own canary and its own reload, and `kubectl
//! port-forward` reaches one pod. With `admin.peers` naming the chart's
//! headless Service, one request to any pod reaches them all: this pod
//! resolves the name (cluster DNS answers with every pod's address, ready
//! or not), sends the same request with the caller's bearer token to each
//! address, itself included, and gathers what each pod answered. Every pod
//! checks the token and acts for itself, as if it had been called alone.
//!
//! The name comes from the operator's config, never from the request, so a
//! caller cannot send the token anywhere else; the requests sent carry no
//! query, so they never fan out again.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// More addresses than this is not a Deployment's pods.
const MAX_PODS: usize = 256;
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A reload answers once the changed modules compiled, which takes a
/// while for a large one.
const POD_TIMEOUT: Duration = Duration::from_secs(60);
/// A pod's answer is a small JSON document; more is cut off as an error.
const MAX_ANSWER: usize = 64 * 1024;

/// Sends `method path` to every address `peers` resolves to and answers
/// with each pod's status and body: 200 when every pod answered with a 2xx,
/// or with a 409 whose state is the one asked for (a canary aborted there
/// already), and 502 otherwise: a 409 saying `promoted` to an abort is a
/// pod serving what the operator wanted out.
pub(super) async fn fan_out(
    peers: &str,
    method: &Method,
    path: &str,
    authorization: Option<&HeaderValue>,
) -> (StatusCode, Value) {
    let pods = match resolve(peers).await {
        Ok(pods) => pods,
        Err(error) => {
            tracing::error!(
                peers,
                error = error.as_str(),
                "admin fan-out: no pods to ask"
            );
            return (
                StatusCode::BAD_GATEWAY,
                json!({ "error": error, "peers": peers }),
            );
        }
    };
    let answers = join_all(pods.iter().map(|&pod| async move {
        let asked = tokio::time::timeout(POD_TIMEOUT, ask(pod, method, path, authorization));
        match asked.await {
            Ok(Ok((status, body))) => json!({
                "pod": pod.to_string(),
                "status": status.as_u16(),
                "answer": answer(&body),
            }),
            Ok(Err(error)) => json!({ "pod": pod.to_string(), "error": error }),
            Err(_) => json!({
                "pod": pod.to_string(),
                "error": format!("no answer within {}s", POD_TIMEOUT.as_secs()),
            }),
        }
    }))
    .await;
    let wanted = wanted_state(path);
    let failed = answers
        .iter()
        .filter(|a| {
            let status = a["status"].as_u64().unwrap_or(0);
            let done = (200..300).contains(&status)
                || (status == 409 && wanted.is_some() && a["answer"]["state"].as_str() == wanted);
            if !done {
                tracing::warn!(
                    pod = a["pod"].as_str(),
                    path,
                    status,
                    error = a["error"].as_str().or(a["answer"]["error"].as_str()),
                    "admin action failed on a pod"
                );
            }
            !done
        })
        .count();
    tracing::info!(
        peers,
        path,
        pods = answers.len(),
        failed,
        "admin action repeated on every pod"
    );
    let status = if failed == 0 {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    (status, json!({ "pods": answers, "failed": failed }))
}

/// The state a canary action leaves a canary in: a pod whose canary is
/// already there has nothing left to do.
fn wanted_state(path: &str) -> Option<&'static str> {
    let action = path.strip_prefix("/admin/canary/")?.rsplit_once('/')?.1;
    Some(match action {
        "abort" => "rolled_back",
        "promote" => "promoted",
        "pause" => "paused",
        "resume" => "progressing",
        _ => return None,
    })
}

/// The pods' admin addresses, each once, in a stable order.
async fn resolve(peers: &str) -> Result<BTreeSet<SocketAddr>, String> {
    let found = match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(peers)).await {
        Ok(Ok(found)) => found.collect::<BTreeSet<_>>(),
        Ok(Err(e)) => return Err(format!("cannot resolve admin.peers {peers}: {e}")),
        Err(_) => {
            return Err(format!(
                "cannot resolve admin.peers {peers}: no answer within {}s",
                RESOLVE_TIMEOUT.as_secs()
            ));
        }
    };
    if found.is_empty() {
        return Err(format!("admin.peers {peers} resolves to no address"));
    }
    if found.len() > MAX_PODS {
        return Err(format!(
            "admin.peers {peers} resolves to {} addresses, more than the {MAX_PODS} pods one action reaches",
            found.len()
        ));
    }
    Ok(found)
}

/// One pod's answer to the request, over a connection of its own.
async fn ask(
    pod: SocketAddr,
    method: &Method,
    path: &str,
    authorization: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes), String> {
    let stream = TcpStream::connect(pod)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("cannot speak HTTP: {e}"))?;
    let _conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    let mut req = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(header::HOST, pod.to_string());
    if let Some(authorization) = authorization {
        req = req.header(header::AUTHORIZATION, authorization.clone());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("answer unread: {e} (at most {MAX_ANSWER} bytes)"))?
        .to_bytes();
    Ok((status, body))
}

/// A pod's body as the JSON it is, or as text.
fn answer(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).trim_end().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unresolvable_or_empty_name_is_named_in_the_error() {
        let (status, body) = fan_out(
            "no-such-host.invalid:9090",
            &Method::POST,
            "/admin/reload",
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("admin.peers no-such-host.invalid:9090"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_pod_that_refuses_the_connection_fails_the_action() {
        // A port nobody listens on, found through the resolver.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let (status, body) = fan_out(
            &format!("127.0.0.1:{port}"),
            &Method::POST,
            "/admin/reload",
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body["failed"], 1);
        let error = body["pods"][0]["error"].as_str().unwrap();
        assert!(error.starts_with("cannot connect"), "{error}");
    }

    /// A pod on a free loopback port that answers every request with 409
    /// and `body`.
    async fn pod_answering_409(body: &'static str) -> String {
        pod(body, None).await
    }

    /// The same, or with 200 when `token` is given and the request carries
    /// it (401 when it does not).
    async fn pod(body: &'static str, token: Option<&'static str>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    head.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let status = match token {
                    None => "409 Conflict",
                    Some(t) if head.contains(&format!("authorization: bearer {t}\r\n")) => "200 OK",
                    Some(_) => "401 Unauthorized",
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_abort_that_meets_a_promoted_canary_fails_and_one_already_rolled_back_does_not() {
        let promoted =
            pod_answering_409(r#"{"error":"already promoted","state":"promoted"}"#).await;
        let (status, body) = fan_out(&promoted, &Method::POST, "/admin/canary/a/abort", None).await;
        assert_eq!(
            (status, body["failed"].as_u64()),
            (StatusCode::BAD_GATEWAY, Some(1)),
            "{body}"
        );
        let rolled_back =
            pod_answering_409(r#"{"error":"already rolled_back","state":"rolled_back"}"#).await;
        let (status, body) =
            fan_out(&rolled_back, &Method::POST, "/admin/canary/a/abort", None).await;
        assert_eq!(
            (status, body["failed"].as_u64()),
            (StatusCode::OK, Some(0)),
            "{body}"
        );
        // A reload knows no such state: its 409 is a failure.
        let (status, _) = fan_out(&rolled_back, &Method::POST, "/admin/reload", None).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn the_callers_token_goes_to_each_pod_and_a_2xx_is_done() {
        let addr = pod(r#"{"state":"rolled_back"}"#, Some("t0k3n")).await;
        let token = HeaderValue::from_static("Bearer t0k3n");
        let (status, body) =
            fan_out(&addr, &Method::POST, "/admin/canary/a/abort", Some(&token)).await;
        assert_eq!(
            (status, body["failed"].as_u64()),
            (StatusCode::OK, Some(0)),
            "{body}"
        );
        assert_eq!(body["pods"][0]["status"], 200);
        assert_eq!(body["pods"][0]["answer"]["state"], "rolled_back");
        let (status, body) = fan_out(&addr, &Method::POST, "/admin/canary/a/abort", None).await;
        assert_eq!(
            (status, body["pods"][0]["status"].as_u64()),
            (StatusCode::BAD_GATEWAY, Some(401))
        );
    }

    #[test]
    fn a_conflict_is_done_only_in_the_state_asked_for() {
        assert_eq!(
            wanted_state("/admin/canary/orders/abort"),
            Some("rolled_back")
        );
        assert_eq!(
            wanted_state("/admin/canary/orders/promote"),
            Some("promoted")
        );
        assert_eq!(wanted_state("/admin/canary/a/pause"), Some("paused"));
        assert_eq!(wanted_state("/admin/canary/a/resume"), Some("progressing"));
        assert_eq!(wanted_state("/admin/reload"), None);
        assert_eq!(wanted_state("/admin/canary/a/explode"), None);
    }

    #[test]
    fn answers_are_json_when_they_are_json() {
        assert_eq!(
            answer(br#"{"state":"aborted"}"#),
            json!({"state": "aborted"})
        );
        assert_eq!(answer(b"shutting down\n"), json!("shutting down"));
    }
}
