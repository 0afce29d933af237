//! The core runtime: routing, config injection, isolation, probes, `/info`,
//! start-up errors and `berth check`.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::support::*;

fn examples_config() -> String {
    [
        module("hello", "/", "hello", "config = { greeting = \"Hello\" }"),
        module("api", "/api", "api", ""),
        module("raw", "/raw", "hello_raw", "config = { greeting = \"Hi\" }"),
        module(
            "misbehave",
            "/misbehave",
            "misbehave",
            "config = { plain = \"visible\" }\nsecrets = { token = \"hunter2-s3cr3t\" }",
        ),
    ]
    .concat()
}

#[test]
fn routes_by_longest_prefix() {
    let berth = Berth::start(&examples_config());
    // `/api` beats the catch-all `/`.
    let r = get(&berth.url("/api/products/2"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["name"], "buoy");
    // Anything else falls through to `/`.
    let r = get(&berth.url("/elsewhere?name=Ada"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["message"], "Hello, Ada!");
    // `/apix` is not under `/api`.
    let r = get(&berth.url("/apix"));
    assert_eq!(r.json()["message"], "Hello, world!");
    // Routing inside a module, with a request body.
    let r = post(
        &berth.url("/api/quotes"),
        r#"{"product_id": 2, "quantity": 3}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["total_cents"], 7350);
    let r = post(&berth.url("/api/quotes"), "not json");
    assert_eq!(r.status, 400);
}

#[test]
fn no_route_is_a_404_json() {
    let berth = Berth::start(&module("api", "/api", "api", ""));
    let r = get(&berth.url("/nothing/here"));
    assert_eq!(r.status, 404);
    let body = r.json();
    assert_eq!(body["status"], 404);
    let id = r.header("x-request-id").expect("x-request-id");
    assert_eq!(body["request_id"], id);
}

#[test]
fn config_is_injected_and_env_overrides_a_key() {
    let config = module(
        "hello",
        "/hello",
        "hello",
        "config = { greeting = \"Hello\" }",
    ) + &module(
        "misbehave",
        "/m",
        "misbehave",
        "config = { a = \"from-file\", b = 2 }",
    );
    let berth = Berth::start_with(
        &config,
        &[
            ("BERTH_MODULES__HELLO__CONFIG__GREETING", "Hola"),
            ("BERTH_MODULES__MISBEHAVE__CONFIG__C", "from-env"),
        ],
    );
    let r = get(&berth.url("/hello?name=Ada"));
    assert_eq!(r.json()["message"], "Hola, Ada!");
    let all = get(&berth.url("/m/config")).json();
    assert_eq!(all["a"], "from-file");
    assert_eq!(all["b"], "2");
    assert_eq!(all["c"], "from-env");
}

#[test]
fn a_trapping_module_is_isolated() {
    let berth = Berth::start(&examples_config());
    for what in ["panic", "stack"] {
        let r = get(&berth.url(&format!("/misbehave/{what}")));
        assert_eq!(r.status, 500, "{what}: {}", r.body);
        let id = r.header("x-request-id").unwrap().to_owned();
        assert_eq!(r.json()["request_id"], id.as_str());
        // The failure is logged with the module and request id.
        let logged = berth.wait_for_log(Duration::from_secs(5), |l| {
            l["message"] == "request failed" && l["request_id"] == id.as_str()
        });
        assert_eq!(logged.expect("failure logged")["module"], "misbehave");
    }
    // The same module and its neighbours keep serving.
    assert_eq!(get(&berth.url("/misbehave/ok")).status, 200);
    assert_eq!(get(&berth.url("/api/products")).status, 200);
    assert_eq!(get(&berth.url("/?name=x")).status, 200);
    assert_eq!(get(&berth.admin_url("/healthz")).status, 200);
}

#[test]
fn a_component_built_without_the_sdk_serves() {
    let berth = Berth::start(&examples_config());
    let r = get(&berth.url("/raw?name=Bob"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["message"], "Hi, Bob!");
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn guest_logs_carry_module_and_request_id() {
    let berth = Berth::start(&examples_config());
    let r = get_with(&berth.url("/?name=Logan"), &[("x-request-id", "req-42")]);
    assert_eq!(r.header("x-request-id"), Some("req-42"));
    let line = berth
        .wait_for_log(Duration::from_secs(5), |l| l["message"] == "greeting Logan")
        .expect("guest log line");
    assert_eq!(line["module"], "hello");
    assert_eq!(line["request_id"], "req-42");
    assert_eq!(line["level"], "INFO");

    get_with(
        &berth.url("/misbehave/print"),
        &[("x-request-id", "req-43")],
    );
    for text in ["line one from stdout", "line two from stderr"] {
        let line = berth
            .wait_for_log(Duration::from_secs(5), |l| l["message"] == text)
            .unwrap_or_else(|| panic!("`{text}` not logged"));
        assert_eq!(line["module"], "misbehave");
        assert_eq!(line["request_id"], "req-43");
    }
}

#[test]
fn probes_and_info() {
    let berth = Berth::start(&examples_config());
    assert_eq!(get(&berth.admin_url("/healthz")).status, 200);
    assert_eq!(get(&berth.admin_url("/ready")).status, 200);
    let info = get(&berth.admin_url("/info")).json();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let modules = info["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 4);
    let api = modules.iter().find(|m| m["name"] == "api").unwrap();
    let bytes = std::fs::read(wasm("api")).unwrap();
    assert_eq!(api["route"], "/api");
    assert_eq!(api["size"], bytes.len());
    assert_eq!(api["sha256"], hex(&Sha256::digest(&bytes)));
    assert!(api["file"].as_str().unwrap().ends_with("api.wasm"));
    // The start-up log names each module with its digest.
    let loaded = berth
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "module loaded" && l["module"] == "api")
        .expect("module loaded line");
    assert_eq!(loaded["sha256"], api["sha256"]);
}

#[test]
fn secrets_reach_the_guest_but_never_logs_or_info() {
    let berth = Berth::start(&examples_config());
    let all = get(&berth.url("/misbehave/config")).json();
    assert_eq!(all["token"], "hunter2-s3cr3t");
    assert_eq!(all["plain"], "visible");
    let info = get(&berth.admin_url("/info")).body;
    assert!(!info.contains("hunter2"), "{info}");
    let logs = berth.log_text();
    assert!(logs.contains("effective configuration"));
    assert!(logs.contains("visible"), "plain config is logged");
    assert!(!logs.contains("hunter2"), "a secret leaked into the logs");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// --- start-up errors: exit code 2 and one message naming the cause ---

fn assert_config_error(config: &str, env: &[(&str, &str)], expected: &[&str]) {
    let out = run_expecting_exit(config, env);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", out.stderr);
    // figment prints keys from env vars in their original (upper) case.
    let stderr = out.stderr.to_lowercase();
    for e in expected {
        assert!(
            stderr.contains(&e.to_lowercase()),
            "stderr lacks `{e}`:\n{}",
            out.stderr
        );
    }
}

#[test]
fn invalid_config_values_name_the_key() {
    assert_config_error(
        "[runtime]\nepoch_tick = \"soon\"\n",
        &[],
        &["runtime.epoch_tick"],
    );
    assert_config_error("[runtime]\nmodule_dir = \"/x\"\n", &[], &["module_dir"]);
    assert_config_error(
        &module("a", "/a", "hello", "limits = { timeout = \"0s\" }"),
        &[],
        &["modules.a.limits.timeout"],
    );
    assert_config_error(
        "[runtime]\nworker_threads = 0\n",
        &[],
        &["runtime.worker_threads", "at least 1"],
    );
    // A bad value from the environment names the variable's key too.
    assert_config_error(
        "",
        &[("BERTH_RUNTIME__MAX_INSTANCES", "lots")],
        &["runtime.max_instances"],
    );
}

#[test]
fn service_link_variables_are_ignored_with_one_warning_and_typos_still_fail() {
    // What the kubelet injects into every pod of the namespace for a
    // Service named `berth` (and `berth-admin`), as `helm install berth`
    // creates: these must not stop the pod.
    let links = [
        ("BERTH_SERVICE_HOST", "10.96.0.10"),
        ("BERTH_SERVICE_PORT", "80"),
        ("BERTH_SERVICE_PORT_HTTP", "80"),
        ("BERTH_PORT", "tcp://10.96.0.10:80"),
        ("BERTH_PORT_80_TCP", "tcp://10.96.0.10:80"),
        ("BERTH_PORT_80_TCP_PROTO", "tcp"),
        ("BERTH_PORT_80_TCP_PORT", "80"),
        ("BERTH_PORT_80_TCP_ADDR", "10.96.0.10"),
        ("BERTH_ADMIN_SERVICE_HOST", "10.96.0.11"),
    ];
    let berth = Berth::start_with(&module("hello", "/hello", "hello", ""), &links);
    assert_eq!(get(&berth.url("/hello")).status, 200);
    let warnings: Vec<_> = berth
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "WARN" && l["variables"].is_string())
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    for (name, _) in links {
        assert!(
            warnings[0]["variables"].as_str().unwrap().contains(name),
            "{name} not named: {}",
            warnings[0]
        );
    }

    // A typo inside a known section is still an error naming the key.
    assert_config_error("", &[("BERTH_DEFAULTS__LIMITS__TIMOUT", "1s")], &["timout"]);
}

#[test]
fn a_missing_module_file_is_named() {
    assert_config_error(
        "[modules.ghost]\nfile = \"/nonexistent/ghost.wasm\"\nroute = \"/g\"\n",
        &[],
        &["module `ghost`", "/nonexistent/ghost.wasm"],
    );
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    // The smallest valid core module: magic and version 1.
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let text = dir.path().join("text.wasm");
    std::fs::write(&text, "hello, I am not wasm").unwrap();
    let cfg = |path: &std::path::Path| {
        format!(
            "[modules.m]\nfile = {:?}\nroute = \"/m\"\n",
            path.display().to_string()
        )
    };
    assert_config_error(&cfg(&core), &[], &["module `m`", "core WebAssembly module"]);
    assert_config_error(&cfg(&text), &[], &["module `m`", "not a WebAssembly file"]);
}

#[test]
fn a_component_with_unknown_imports_is_refused_at_load_time() {
    assert_config_error(
        &module("tele", "/t", "bad_import", ""),
        &[],
        &["module `tele`", "berth-test:missing/teleport@0.1.0"],
    );
}

#[test]
fn check_reports_good_and_bad_components() {
    let good = wasm("hello");
    let out = run_cli(&["check", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("wasi:http/incoming-handler@0.2"));
    assert!(out.stdout.contains("wasi:config/store@0.2.0-rc.1"));
    assert!(out.stdout.contains("ok: the host can serve this component"));

    let bad = wasm("bad_import");
    let out = run_cli(&["check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("berth-test:missing/teleport@0.1.0  MISSING"),
        "{}",
        out.stdout
    );

    let out = run_cli(&["check", "--json", bad.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        report["unsatisfied"][0]["name"],
        "berth-test:missing/teleport@0.1.0"
    );
    assert_eq!(report["http_handler"], true);
}

#[test]
fn version_prints_the_version() {
    let out = run_cli(&["version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout.trim(),
        format!("berth {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_pinned_file_with_another_digest_is_refused() {
    let wrong = "ab".repeat(32);
    assert_config_error(
        &module("hello", "/hello", "hello", &format!("sha256 = \"{wrong}\"")),
        &[],
        &["module `hello`", &wrong, "refusing it"],
    );
    let bytes = std::fs::read(wasm("hello")).unwrap();
    let right = hex(&Sha256::digest(&bytes));
    let berth = Berth::start(&module(
        "hello",
        "/hello",
        "hello",
        &format!("sha256 = \"{right}\""),
    ));
    assert_eq!(get(&berth.url("/hello")).status, 200);
}

#[test]
fn the_smoke_test_passes_against_berth_and_fails_clearly_elsewhere() {
    let berth = Berth::start(&module("hello", "/hello", "hello", ""));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/smoke_test.sh");
    let smoke = |target: &str, admin: &str| {
        std::process::Command::new("bash")
            .arg(&script)
            .env("TARGET_URL", target)
            .env("ADMIN_URL", admin)
            .output()
            .unwrap()
    };
    let ok = smoke(&berth.url(""), &berth.admin_url(""));
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{said}");
    assert!(said.contains("info lists hello"), "{said}");

    // Nothing listens on port 1.
    let bad = smoke("http://127.0.0.1:1", &berth.admin_url(""));
    let said = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(
        said.contains("FAIL module request: http://127.0.0.1:1/hello"),
        "{said}"
    );
    assert!(said.contains("smoke test FAILED"), "{said}");
}

/// A fresh instance per request, however the pool resets a finished one:
/// only its dirty pages in place (the default where the kernel has
/// `PAGEMAP_SCAN`), everything returned to the kernel, or data segments
/// copied rather than mapped.
#[test]
fn no_state_survives_from_one_request_to_the_next() {
    let resets: [&[(&str, &str)]; 3] = [
        &[],
        &[("BERTH_RUNTIME__KEEP_RESIDENT", "0")],
        &[("BERTH_RUNTIME__MEMORY_COW", "false")],
    ];
    for env in resets {
        let berth = Berth::start_with(&module("misbehave", "/m", "misbehave", ""), env);
        std::thread::scope(|s| {
            for t in 0..4 {
                let berth = &berth;
                s.spawn(move || {
                    for i in 0..20 {
                        let r = get(&berth.url(&format!("/m/state?mb={}", 1 + (t + i) % 6)));
                        assert_eq!(r.status, 200, "{env:?}: {}", r.body);
                        assert_eq!(r.json()["calls"], 42, "{env:?}: a global kept its value");
                        assert_eq!(
                            r.json()["dirty_bytes"],
                            0,
                            "{env:?}: grown memory not zeroed"
                        );
                        if i % 5 == 0 {
                            assert_eq!(get(&berth.url("/m/alloc?mb=3")).status, 200);
                        }
                    }
                });
            }
        });
    }
}

/// A request without a Host header cannot be handed to a WASI 0.2 guest
/// (`wasi:http` gives it the authority): it gets a 400 from the host, and a
/// reused instance is not taken down by it, whoever sends it how often.
#[test]
fn a_request_without_a_host_never_reaches_a_wasi_02_instance() {
    use std::io::{Read, Write};
    let config = module("fresh", "/fresh", "hello", "")
        + &module(
            "kept",
            "/kept",
            "misbehave",
            "instances = { max_requests = 100 }",
        );
    let berth = Berth::start(&config);
    let send = |request: &str| {
        let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    };
    assert_eq!(get(&berth.url("/kept/ok")).status, 200);
    for path in ["/fresh", "/kept/ok"] {
        for version in ["1.1", "1.0"] {
            let answer = send(&format!(
                "GET {path} HTTP/{version}\r\nConnection: close\r\n\r\n"
            ));
            assert!(answer.contains(" 400 "), "{path} {version}: {answer}");
            assert!(answer.contains("Host header"), "{path} {version}: {answer}");
        }
    }
    assert_eq!(get(&berth.url("/kept/ok")).status, 200);
    let page = berth.metrics();
    let kept = [("module", "kept")];
    assert_eq!(
        metric(&page, "berth_instances_created_total", &kept),
        Some(1.0),
        "one instance served it all"
    );
    let trapped = metric(
        &page,
        "berth_instances_retired_total",
        &[("module", "kept"), ("reason", "trap")],
    );
    assert_eq!(trapped.unwrap_or(0.0), 0.0);
}

/// A `Host` header that is not `host[:port]` never reaches a guest, which
/// takes it as the request's authority (a JavaScript module builds its
/// `request.url` from it).
#[test]
fn a_host_header_with_a_path_or_a_bad_port_is_refused() {
    use std::io::{Read, Write};
    let berth = Berth::start(&module("hello", "/hello", "hello", ""));
    let send = |host: &str| {
        let mut conn = std::net::TcpStream::connect(&berth.addr).unwrap();
        write!(
            conn,
            "GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(send("example.com:8080").starts_with("HTTP/1.1 200"));
    for bad in ["x/hello/upstream#", "a b", "[::1", "a:99999", "u@h"] {
        let answer = send(bad);
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad}: {answer}");
        assert!(answer.contains("Host header"), "{bad}: {answer}");
    }
}
