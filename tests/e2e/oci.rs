//! Modules from OCI registries, against the real CNCF distribution
//! registry (Debian's `docker-registry`) on loopback: once with TLS and
//! htpasswd auth, once anonymous over plain HTTP. `wkg` (installed from
//! crates.io at a pinned version by `scripts/setup.sh`) checks interop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::support::*;
use crate::tls::PrivateCa;

const USER: &str = "ci-bot";
const PASSWORD: &str = "correct horse battery staple";

/// A `docker-registry serve` on a free loopback port, stopped on drop.
struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    host: String,
    dir: tempfile::TempDir,
    /// For the TLS registry: the CA that signed its certificate.
    ca: Option<PrivateCa>,
    config: PathBuf,
}

impl Registry {
    /// Anonymous, plain HTTP (listed in `insecure_registries`).
    fn anonymous() -> Registry {
        Self::start(false)
    }

    /// TLS with a private CA, and htpasswd auth.
    fn secured() -> Registry {
        Self::start(true)
    }

    fn start(secured: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let host = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: \"\"\n\
             http:\n  addr: {host}\n  secret: berth-test\n",
            dir.path().join("data").display()
        );
        let mut ca = None;
        if secured {
            let pca = PrivateCa::new();
            let (cert, key) = pca.leaf_pem_files(dir.path());
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            let htpasswd = dir.path().join("htpasswd");
            let hash = bcrypt::hash(PASSWORD, 4).unwrap();
            std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                htpasswd.display()
            );
            ca = Some(pca);
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut registry = Registry {
            child: None,
            host,
            dir,
            ca,
            config: config_path,
        };
        registry.resume();
        registry
    }

    /// Starts (again) on the same port and storage.
    fn resume(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package `docker-registry`) must be installed: run `make setup`");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&self.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry never listened on {}",
                self.host
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts the registry with another password, as an operator
    /// rotating the registry's credentials would.
    fn rotate(&mut self, password: &str) {
        self.stop();
        let hash = bcrypt::hash(password, 4).unwrap();
        std::fs::write(self.dir.path().join("htpasswd"), format!("{USER}:{hash}\n")).unwrap();
        self.resume();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn reference(&self, repo: &str) -> String {
        format!("{}/{repo}", self.host)
    }

    /// A Docker config.json with this registry's credentials (`auth`, the
    /// base64 form `docker login` writes).
    fn docker_config(&self, password: &str) -> PathBuf {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
        let path = self
            .dir
            .path()
            .join(format!("docker-{}.json", password.len()));
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"https://{}": {{"auth": "{auth}"}}}}}}"#,
                self.host
            ),
        )
        .unwrap();
        path
    }

    /// `berth` flags to reach this registry.
    fn flags(&self) -> Vec<String> {
        match &self.ca {
            Some(ca) => vec![
                "--ca-file".into(),
                ca.ca_file.display().to_string(),
                "--auth-file".into(),
                self.docker_config(PASSWORD).display().to_string(),
            ],
            None => vec!["--insecure-registry".into(), self.host.clone()],
        }
    }

    /// The `[registry]` section of a berth config to reach it.
    fn section(&self) -> String {
        match &self.ca {
            Some(ca) => format!(
                "[registry]\nca_file = {:?}\nauth_files = [{:?}]\nretries = 0\n",
                ca.ca_file.display().to_string(),
                self.docker_config(PASSWORD).display().to_string()
            ),
            None => format!(
                "[registry]\ninsecure_registries = [{:?}]\nretries = 0\n",
                self.host
            ),
        }
    }

    /// `berth push`; returns the pinned reference.
    fn push(&self, wasm_name: &str, repo_tag: &str) -> String {
        let file = wasm(wasm_name).display().to_string();
        let reference = self.reference(repo_tag);
        let mut args = vec!["push", &file, &reference];
        let flags = self.flags();
        args.extend(flags.iter().map(String::as_str));
        let out = run_cli(&args);
        assert!(out.status.success(), "berth push failed: {}", out.stderr);
        let digest = out.stdout.trim().to_owned();
        assert!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "{}",
            out.stdout
        );
        let repo = repo_tag.split(':').next().unwrap();
        format!("{}@{digest}", self.reference(repo))
    }

    /// The file the registry stores a blob in.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn digest_of(pinned: &str) -> &str {
    pinned.rsplit_once('@').unwrap().1
}

/// Flips a byte in the middle of a stored blob: same size, other digest.
fn tamper(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(file, bytes).unwrap();
}

/// Starts berth with `config`, expecting it to stop with exit code 2 and a
/// message holding every one of `needles`.
fn start_fails(config: &str, needles: &[&str]) {
    let failed = run_expecting_exit(config, &[]);
    assert_eq!(failed.status.code(), Some(2), "{}", failed.stderr);
    for needle in needles {
        assert!(
            failed.stderr.contains(needle),
            "no `{needle}` in: {}",
            failed.stderr
        );
    }
}

fn oci_module(name: &str, route: &str, reference: &str, extra: &str) -> String {
    format!("[modules.{name}]\noci = {reference:?}\nroute = {route:?}\n{extra}\n")
}

/// A config with its own compile cache folder (kept across restarts), on
/// one worker thread: pulls run on a blocking thread driven by the
/// single-threaded scheduler a pod limited to one CPU gets.
fn with_cache(cache: &Path, rest: &str) -> String {
    format!(
        "[runtime]\ncache_dir = {:?}\nworker_threads = 1\n{rest}",
        cache.display().to_string()
    )
}

fn layer_digest(registry: &Registry, pinned: &str) -> String {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry.blob_file(digest_of(pinned))).unwrap())
            .unwrap();
    manifest["layers"][0]["digest"].as_str().unwrap().to_owned()
}

#[test]
fn push_then_pull_round_trips_over_tls_with_auth_and_bad_credentials_are_named() {
    let registry = Registry::secured();
    let pinned = registry.push("hello", "team/hello:1.0");

    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("pulled.wasm");
    let out_s = out.display().to_string();
    let flags = registry.flags();
    let mut args = vec!["pull", &pinned, "-o", &out_s];
    args.extend(flags.iter().map(String::as_str));
    let pulled = run_cli(&args);
    assert!(pulled.status.success(), "{}", pulled.stderr);
    assert_eq!(pulled.stdout.trim(), digest_of(&pinned));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(wasm("hello")).unwrap()
    );

    // The artifact is the CNCF Wasm format, with the component's world in
    // its config and OCI annotations on the manifest.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry.blob_file(digest_of(&pinned))).unwrap())
            .unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.version"],
        "1.0"
    );
    // No push time: the same bytes pushed again are the same digest.
    assert!(manifest["annotations"]["org.opencontainers.image.created"].is_null());
    assert_eq!(registry.push("hello", "team/hello:1.0"), pinned);
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(registry.blob_file(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let exports = config["component"]["exports"].to_string();
    assert!(
        exports.contains("wasi:http/incoming-handler@0.2"),
        "{config}"
    );

    // `berth check` reads the same reference.
    let oci = format!("oci://{pinned}");
    let mut args = vec!["check", &oci];
    args.extend(flags.iter().map(String::as_str));
    let checked = run_cli(&args);
    assert!(
        checked.status.success(),
        "{}{}",
        checked.stdout,
        checked.stderr
    );
    assert!(
        checked.stdout.contains("world: wasi:http@0.2"),
        "{}",
        checked.stdout
    );

    // The Docker config found through DOCKER_CONFIG, as `docker login` leaves it.
    let docker_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        registry.docker_config(PASSWORD),
        docker_dir.path().join("config.json"),
    )
    .unwrap();
    let ca = registry.ca.as_ref().unwrap().ca_file.display().to_string();
    let via_env = Command::new(berth_bin())
        .args(["pull", &pinned, "-o", &out_s, "--ca-file", &ca])
        .env("DOCKER_CONFIG", docker_dir.path())
        .output()
        .unwrap();
    assert!(
        via_env.status.success(),
        "{}",
        String::from_utf8_lossy(&via_env.stderr)
    );

    // A wrong password, and no credentials at all: refused, and said so.
    let wrong = registry.docker_config("wrong").display().to_string();
    for auth in [
        vec!["--auth-file", &wrong],
        vec!["--auth-file", "/nonexistent/config.json"],
    ] {
        let mut args = vec!["pull", &pinned, "-o", &out_s, "--ca-file", &ca];
        args.extend(auth);
        let refused = run_cli(&args);
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            refused.stderr.contains("refused access") && refused.stderr.contains(&registry.host),
            "{}",
            refused.stderr
        );
        assert!(
            !refused.stderr.contains("wrong"),
            "a secret leaked: {}",
            refused.stderr
        );
    }
    // Without the CA the registry's certificate is not trusted.
    let untrusted = run_cli(&["pull", &pinned, "-o", &out_s]);
    assert_eq!(untrusted.status.code(), Some(1));
    assert!(
        untrusted.stderr.contains("cannot reach"),
        "{}",
        untrusted.stderr
    );
}

#[test]
fn a_module_is_served_from_a_registry_and_a_restart_does_not_pull_again() {
    let mut registry = Registry::secured();
    let pinned = registry.push("hello", "team/hello:1.0");
    let cache = tempfile::tempdir().unwrap();
    // Credentials in the config itself: used, and never printed.
    let ca = registry.ca.as_ref().unwrap().ca_file.display().to_string();
    let inline = format!(
        "[registry]\nca_file = {ca:?}\nretries = 0\n\
         [registry.credentials.{:?}]\nusername = {USER:?}\npassword = {PASSWORD:?}\n",
        registry.host
    );
    // At the most verbose level: no credential in any line.
    let berth = Berth::start_with(
        &with_cache(
            cache.path(),
            &(inline + &oci_module("hello", "/hello", &pinned, "")),
        ),
        &[("LOG_LEVEL", "trace")],
    );
    assert_eq!(get(&berth.url("/hello")).status, 200);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let log = berth.log_text();
    assert!(!log.contains(PASSWORD), "the registry password was logged");
    assert!(
        !log.contains(&basic),
        "the registry credentials were logged"
    );
    assert!(
        !log.to_lowercase().contains("authorization: basic"),
        "an auth header was logged"
    );
    drop(berth);
    std::fs::remove_dir_all(cache.path().join("downloads")).unwrap();

    let config = with_cache(
        cache.path(),
        &(registry.section() + &oci_module("hello", "/hello", &pinned, "")),
    );
    let berth = Berth::start(&config);
    let reply = get(&berth.url("/hello"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let info = get(&berth.admin_url("/info")).json();
    let module = &info["modules"][0];
    assert_eq!(module["resolved"], pinned.as_str());
    assert_eq!(module["file"], format!("oci://{pinned}"));
    let pulled = berth
        .wait_for_log(Duration::from_secs(5), |l| l["message"] == "module pulled")
        .expect("no `module pulled` line");
    assert_eq!(pulled["cached"], false);
    assert_eq!(pulled["resolved"], pinned.as_str());
    drop(berth);

    // The registry is gone; the cached copy, verified, is served.
    registry.stop();
    let berth = Berth::start(&config);
    assert_eq!(get(&berth.url("/hello")).status, 200);
    let pulled = berth
        .wait_for_log(Duration::from_secs(5), |l| l["message"] == "module pulled")
        .unwrap();
    assert_eq!(pulled["cached"], true);
    drop(berth);

    // A cached copy that was tampered with is not used: the pull goes to
    // the registry, which is down, so start-up fails and says why.
    let layer = layer_digest(&registry, &pinned);
    tamper(
        &cache
            .path()
            .join("downloads")
            .join(format!("{}.wasm", &layer[7..])),
    );
    // The error names the registry it went back to, not only the module.
    let host = pinned.split('/').next().unwrap();
    start_fails(&config, &["module `hello`", host]);
}

#[test]
fn tampered_manifests_and_layers_are_refused_before_compiling() {
    let registry = Registry::anonymous();
    let pinned = registry.push("hello", "team/hello:1.0");
    let layer = layer_digest(&registry, &pinned);
    let cache = tempfile::tempdir().unwrap();

    tamper(&registry.blob_file(&layer));
    let config = with_cache(
        cache.path(),
        &(registry.section() + &oci_module("hello", "/hello", &pinned, "")),
    );
    start_fails(
        &config,
        &["module `hello`", &format!("layer {layer}"), "refusing it"],
    );

    // The manifest itself altered (a registry serving other content under
    // the pinned digest): refused by the digest computed here.
    tamper(&registry.blob_file(&layer)); // restored
    let manifest = registry.blob_file(digest_of(&pinned));
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"1.0\"", "\"6.6\"")).unwrap();
    start_fails(&config, &["the manifest has digest", digest_of(&pinned)]);
}

#[test]
fn references_need_a_digest_unless_tags_are_allowed() {
    let registry = Registry::anonymous();
    let pinned = registry.push("hello", "team/hello:1.0");
    let tagged = registry.reference("team/hello:1.0");

    start_fails(
        &(registry.section() + &oci_module("hello", "/hello", &tagged, "")),
        &["modules.hello.oci", "allow_tags"],
    );
    start_fails(
        &(registry.section()
            + &oci_module("hello", "/hello", "registry.example/team/x@sha256:abc", "")),
        &["modules.hello.oci", "not an OCI reference"],
    );

    // A digest nobody pushed: the registry has no such manifest.
    let unknown = format!(
        "{}@sha256:{}",
        registry.reference("team/hello"),
        "1".repeat(64)
    );
    start_fails(
        &(registry.section() + &oci_module("hello", "/hello", &unknown, "")),
        &["not found in the registry"],
    );

    // Plain HTTP only for registries listed as insecure; the error says so.
    start_fails(
        &("[registry]\nretries = 0\n".to_owned() + &oci_module("hello", "/hello", &pinned, "")),
        &["insecure_registries"],
    );

    // With tags allowed, the tag is resolved and the digest shown.
    let berth = Berth::start(
        &(registry.section() + &oci_module("hello", "/hello", &tagged, "allow_tags = true")),
    );
    assert_eq!(get(&berth.url("/hello")).status, 200);
    let info = get(&berth.admin_url("/info")).json();
    assert_eq!(info["modules"][0]["resolved"], pinned.as_str());
}

#[test]
fn a_registry_down_at_start_up_exits_2_naming_module_and_reference() {
    let host = format!("127.0.0.1:{}", free_port());
    let reference = format!("{host}/team/hello@sha256:{}", "2".repeat(64));
    start_fails(
        &format!(
            "[registry]\ninsecure_registries = [{host:?}]\nretries = 1\n{}",
            oci_module("orders", "/orders", &reference, "")
        ),
        &["module `orders`", &reference, "cannot reach"],
    );
}

/// A hostile registry: a manifest of 1 GiB (chunked, no length), and for
/// another repository a 400 whose body is 50 MiB.
fn hostile_registry() -> (String, tokio::runtime::Runtime) {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Bytes, Frame};
    let chunk = Bytes::from(vec![b'{'; 1 << 20]);
    let error = Bytes::from(
        format!(
            "{{\"errors\":[{{\"code\":\"DENIED\",\"message\":\"{}\"}}]}}",
            "x".repeat(50 << 20)
        )
        .into_bytes(),
    );
    let (addr, runtime) = crate::downstream::serve(
        move |req: hyper::Request<hyper::body::Incoming>| {
            let (chunk, error) = (chunk.clone(), error.clone());
            async move {
                let body = if req.uri().path().contains("/huge/") {
                    let frames = (0..1024).map(move |_| {
                        Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))
                    });
                    StreamBody::new(futures_util::stream::iter(frames)).boxed()
                } else {
                    Full::new(error).boxed()
                };
                let status = if req.uri().path().contains("/huge/") {
                    200
                } else {
                    400
                };
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                        .body(body)
                        .unwrap(),
                )
            }
        },
        None,
    );
    (addr.to_string(), runtime)
}

#[test]
fn a_hostile_registry_cannot_take_memory_or_flood_the_admin_port_and_logs() {
    let (host, _registry) = hostile_registry();
    let base = format!(
        "[registry]\ninsecure_registries = [{host:?}]\nretries = 0\n{}",
        module("hello", "/hello", "hello", "")
    );
    let berth = Berth::start(&base);
    let digest = format!("sha256:{}", "3".repeat(64));
    let report = reconfigure(
        &berth,
        &format!(
            "{base}{}{}",
            oci_module("huge", "/huge", &format!("{host}/team/huge@{digest}"), ""),
            oci_module("loud", "/loud", &format!("{host}/team/loud@{digest}"), "")
        ),
    );
    let errors = report["errors"].to_string();
    assert!(
        errors.contains("huge") && errors.contains("more than"),
        "{errors:.2000}"
    );
    assert!(
        errors.contains("loud") && errors.contains("DENIED"),
        "{errors:.2000}"
    );
    assert!(errors.len() < 8 << 10, "{} bytes of errors", errors.len());
    let peak = berth.peak_rss_kib();
    assert!(peak < 300 << 10, "peak RSS {peak} KiB");
    let info = get(&berth.admin_url("/info"));
    assert!(
        info.body.len() < 64 << 10,
        "/info is {} bytes",
        info.body.len()
    );
    let page = get(&berth.admin_url("/"));
    assert!(
        page.body.len() < 256 << 10,
        "the status page is {} bytes",
        page.body.len()
    );
    let longest = berth.log_text().lines().map(str::len).max().unwrap_or(0);
    assert!(longest <= 64 << 10, "a log line of {longest} bytes");
    assert_eq!(get(&berth.url("/hello")).status, 200);
}

#[test]
fn rotated_registry_credentials_take_effect_at_the_next_pull() {
    let mut registry = Registry::secured();
    let v1 = registry.push("hello", "team/rot:1");
    let v2 = registry.push("plain_hello", "team/rot:2");
    let secret = tempfile::tempdir().unwrap();
    let auth = secret.path().join("config.json");
    std::fs::copy(registry.docker_config(PASSWORD), &auth).unwrap();
    let ca = registry.ca.as_ref().unwrap().ca_file.display().to_string();
    let config = |reference: &str| {
        format!(
            "[runtime]\ncache_dir = \"\"\n[registry]\nca_file = {ca:?}\nauth_files = [{:?}]\n\
             retries = 0\n{}",
            auth.display().to_string(),
            oci_module("rot", "/rot", reference, "")
        )
    };
    let berth = Berth::start(&config(&v1));
    assert_eq!(get(&berth.url("/rot")).status, 200);

    // The password changes, and the mounted Secret with it.
    let rotated = "a new password for the new quarter";
    registry.rotate(rotated);
    std::fs::copy(registry.docker_config(rotated), &auth).unwrap();
    let report = reconfigure(&berth, &config(&v2));
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let info = get(&berth.admin_url("/info")).json();
    let sha = info["modules"][0]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(format!("sha256:{sha}"), layer_digest(&registry, &v2));
}

/// Rewrites the served config and has it reloaded through the admin API.
fn reconfigure(berth: &Berth, config: &str) -> serde_json::Value {
    std::fs::write(berth.config_path(), config).unwrap();
    admin_post(&berth.admin_url("/admin/reload")).json()
}

#[test]
fn a_registry_down_during_a_reload_keeps_the_old_version_serving() {
    let mut registry = Registry::anonymous();
    let v1 = registry.push("swap_v1", "team/svc:1");
    let v2 = registry.push("swap_v2", "team/svc:2");
    let cache = tempfile::tempdir().unwrap();
    let section = registry.section();
    let config = |r: &str| {
        with_cache(
            cache.path(),
            &(section.clone() + &oci_module("svc", "/svc", r, "")),
        )
    };
    let berth = Berth::start(&config(&v1));
    assert_eq!(get(&berth.url("/svc")).body, "v1\n");

    registry.stop();
    reconfigure(&berth, &config(&v2));
    assert_eq!(
        get(&berth.url("/svc")).body,
        "v1\n",
        "the old version stopped serving"
    );
    let info = get(&berth.admin_url("/info")).json();
    let error = info["modules"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains(&v2) && error.contains("cannot reach"),
        "{info}"
    );

    // Back up: the next reload pulls and swaps in.
    registry.resume();
    reconfigure(&berth, &config(&v2));
    assert_eq!(get(&berth.url("/svc")).body, "v2\n");
    let info = get(&berth.admin_url("/info")).json();
    assert!(info["modules"][0]["last_error"].is_null(), "{info}");
    assert_eq!(info["modules"][0]["resolved"], v2.as_str());
}

#[test]
fn a_config_edit_from_digest_a_to_b_under_load_fails_no_request() {
    let registry = Registry::anonymous();
    let a = registry.push("swap_v1", "team/svc:1");
    let b = registry.push("swap_v2", "team/svc:2");
    let config = |r: &str| registry.section() + &oci_module("svc", "/svc", r, "");
    let berth = Berth::start(&config(&a));
    assert_eq!(get(&berth.url("/svc")).body, "v1\n");

    let load = Load::start(
        (0..4).map(|_| berth.url("/svc")).collect(),
        Duration::from_secs(60),
        |r| r.status == 200 && (r.body == "v1\n" || r.body == "v2\n"),
    );
    // A ConfigMap edit, seen by the watcher: A -> B -> A -> B.
    for (i, (reference, want)) in [(&b, "v2\n"), (&a, "v1\n"), (&b, "v2\n")]
        .into_iter()
        .enumerate()
    {
        std::fs::write(berth.config_path(), config(reference)).unwrap();
        let started = Instant::now();
        while get(&berth.url("/svc")).body != want {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "swap {i} to {reference} never happened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "failed requests during the swaps: {:?}",
        report.failures
    );
    assert!(report.served > 50);
}

/// `wkg`, installed by `scripts/setup.sh` into `.tools/bin` (in the
/// background under `make test`).
fn wkg() -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    background_tool(
        &tools.join("bin/wkg"),
        &tools.join("wkg-building"),
        "run `make setup`",
    )
}

#[test]
fn artifacts_of_wkg_and_berth_push_are_interchangeable() {
    let registry = Registry::anonymous();
    // wkg pushes, berth serves (a WASI 0.3 component, to cover that world).
    let out = Command::new(wkg())
        .args(["oci", "push", "--insecure", &registry.host])
        .arg(registry.reference("team/p3:1"))
        .arg(wasm("p3_plain"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wkg push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let digest = text
        .lines()
        .find_map(|l| l.strip_prefix("digest: "))
        .unwrap_or_else(|| panic!("wkg printed no digest: {text}"))
        .trim()
        .to_owned();
    let pinned = format!("{}@{digest}", registry.reference("team/p3"));
    let berth = Berth::start(&(registry.section() + &oci_module("p3", "/", &pinned, "")));
    let reply = get(&berth.url("/hello"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    drop(berth);

    // berth pushes, wkg pulls the same bytes.
    let pinned = registry.push("hello", "team/hello:1");
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("hello.wasm");
    let out = Command::new(wkg())
        .args(["oci", "pull", "--insecure", &registry.host, "-o"])
        .arg(&out_file)
        .arg(&pinned)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wkg pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&out_file).unwrap(),
        std::fs::read(wasm("hello")).unwrap()
    );
}

/// A TCP proxy that passes the registry's answers on at about `rate`
/// bytes a second: a slow link, for progress logs.
fn throttled_proxy(upstream: String, rate: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0; rate / 10];
                while let Ok(n) = s_read.read(&mut buf) {
                    if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    addr
}

#[test]
fn a_13_mb_javascript_module_ships_through_a_registry_with_progress_logs() {
    let registry = Registry::anonymous();
    let pinned = registry.push("js-hello", "team/js-hello:1");
    let size = std::fs::metadata(wasm("js-hello")).unwrap().len();
    assert!(size > 10 << 20, "the JS component is only {size} bytes");
    // Pulled through a link of ~4 MB/s, so the pull takes a few seconds.
    let slow = throttled_proxy(registry.host.clone(), 4 << 20);
    let through_proxy = pinned.replacen(&registry.host, &slow, 1);
    let cache = tempfile::tempdir().unwrap();
    let config = with_cache(
        cache.path(),
        &format!(
            "[registry]\ninsecure_registries = [{slow:?}]\n{}",
            oci_module("js", "/js", &through_proxy, "")
        ),
    );
    let berth = Berth::spawn(&config, &[]);
    berth.wait_ready(Duration::from_secs(300));
    let reply = get(&berth.url("/js?name=berth"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, "hello from JavaScript, berth\n");

    let progress: Vec<_> = berth
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "pulling")
        .collect();
    assert!(!progress.is_empty(), "no progress lines for a slow pull");
    let mut last = 0;
    for line in &progress {
        assert_eq!(line["total"], size);
        let percent = line["percent"].as_u64().unwrap();
        assert!(percent >= last && percent <= 100, "{line}");
        last = percent;
    }
    // At most one a second: a 3 s pull logs at most 3 or 4 lines.
    let pulled = berth
        .wait_for_log(Duration::from_secs(1), |l| l["message"] == "pulled")
        .unwrap();
    let seconds = pulled["ms"].as_u64().unwrap() / 1000;
    assert!(
        progress.len() as u64 <= seconds + 1,
        "{} lines in {seconds}s",
        progress.len()
    );
}
