//! `berth new` and `berth dev`, as a module author meets them: create a
//! project from each template with the real binary, build it with the
//! command its `berth.toml` declares, run its unit tests, serve it, and use
//! every host feature the template shows (config, a log line with the
//! request id, a guest metric, an outbound call under the allow-list).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::downstream::Downstream;
use crate::support::*;

/// Where the Rust template projects build: one directory for all of them,
/// so the SDK's dependencies compile once per CI run, outside the
/// workspace's target directory (which the running `cargo test` locks).
fn rust_builds() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("template-builds")
}

/// `berth new --template TEMPLATE NAME [--route ROUTE]` in a fresh folder,
/// with the tools of the repository on the PATH.
fn new_project(template: &str, name: &str, route: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(berth_bin());
    cmd.args(["new", "--template", template, name, "--dir"])
        .arg(tmp.path())
        .env("PATH", tool_path());
    if let Some(route) = route {
        cmd.args(["--route", route]);
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("berth dev"), "{stdout}");
    assert!(
        !stderr.contains("to build it"),
        "every tool is here: {stderr}"
    );
    let project = tmp.path().join(name);
    if template.starts_with("rust") {
        std::fs::create_dir_all(rust_builds()).unwrap();
        std::os::unix::fs::symlink(rust_builds(), project.join("target")).unwrap();
    }
    (tmp, project)
}

/// The repository's tool venv (`make k8s-tools`: componentize-py), put
/// first on the PATH of the authors' commands, as an activated venv would.
fn tool_path() -> String {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin");
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", venv.display())
}

/// A shell command run in the project as its author would, with none of
/// the workspace's cargo settings leaking in.
fn sh(project: &Path, command: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(project)
        .env("PATH", tool_path())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    cmd
}

fn run(project: &Path, command: &str) {
    let out = sh(project, command).output().unwrap();
    assert!(
        out.status.success(),
        "`{command}` failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn edit_config(project: &Path, change: impl FnOnce(&mut toml_edit::DocumentMut)) {
    let path = project.join("berth.toml");
    let mut doc: toml_edit::DocumentMut = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    change(&mut doc);
    std::fs::write(&path, doc.to_string()).unwrap();
}

/// The `build` command the project's config declares for `name`.
fn build_command(project: &Path, name: &str) -> String {
    let doc: toml_edit::DocumentMut = std::fs::read_to_string(project.join("berth.toml"))
        .unwrap()
        .parse()
        .unwrap();
    doc["modules"][name]["build"].as_str().unwrap().to_owned()
}

/// Builds, unit-tests, serves and exercises a fresh project.
fn template_serves(template: &str, name: &str, route: Option<&str>, unit_tests: &str) {
    let (_tmp, project) = new_project(template, name, route);
    run(&project, &build_command(&project, name));
    run(&project, unit_tests);
    exercise(
        &project,
        name,
        route.map_or_else(|| format!("/{name}"), str::to_owned),
    );
}

/// Serves the project's own config (ports aside) and uses what the
/// template shows: a config value, a log line, a metric, an outbound call
/// to an allowed upstream and one to an upstream outside the allow-list.
fn exercise(project: &Path, name: &str, route: String) {
    let down = Downstream::serving(b"upstream says hi".to_vec());
    let allowed = format!("http://{}", down.addr);
    edit_config(project, |doc| {
        let module = &mut doc["modules"][name];
        module["allowed_outbound_hosts"] =
            toml_edit::value(toml_edit::Array::from_iter([allowed.as_str()]));
        module["config"]["greeting"] = toml_edit::value("Howdy");
        module["config"]["upstream_url"] = toml_edit::value(format!("{allowed}/up"));
    });
    let berth = Berth::start_at(&project.join("berth.toml"));

    let hello = get_with(
        &berth.url(&format!("{route}?name=Ada")),
        &[("x-request-id", "template-req-1")],
    );
    assert_eq!(hello.status, 200, "{}", hello.body);
    assert!(
        hello
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        hello.headers
    );
    assert_eq!(hello.json()["message"], "Howdy, Ada!", "{}", hello.body);
    let plain = get(&berth.url(&route));
    assert_eq!(plain.json()["message"], "Howdy, world!", "{}", plain.body);
    let line = berth
        .wait_for_log(Duration::from_secs(5), |l| {
            l["target"] == "guest" && l["message"] == "greeted Ada"
        })
        .unwrap_or_else(|| panic!("no guest log line:\n{}", berth.log_text()));
    assert_eq!(line["request_id"], "template-req-1", "{line}");
    assert_eq!(line["module"], name, "{line}");
    let snake = name.replace('-', "_");
    let greetings = metric(
        &berth.metrics(),
        &format!("berth_guest_{snake}_greetings_total"),
        &[("module", name)],
    );
    assert_eq!(greetings, Some(2.0), "{}", berth.metrics());

    let up = get(&berth.url(&format!("{route}/upstream")));
    assert_eq!(up.status, 200, "{}", up.body);
    assert_eq!(up.json()["status"], 200, "{}", up.body);
    assert_eq!(up.json()["body"], "upstream says hi", "{}", up.body);

    let missing = get(&berth.url(&format!("{route}/nope")));
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(missing.json()["error"], "not found", "{}", missing.body);

    // The same upstream under another name is not on the allow-list.
    edit_config(project, |doc| {
        doc["modules"][name]["config"]["upstream_url"] =
            toml_edit::value(format!("http://localhost:{}/up", down.addr.port()));
    });
    let reload = admin_post(&berth.admin_url("/admin/reload"));
    assert_eq!(reload.status, 200, "{}", reload.body);
    let refused = get(&berth.url(&format!("{route}/upstream")));
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{}",
        refused.body
    );
    assert_eq!(down.hits(), 1, "the refused call reached the upstream");
}

#[test]
fn the_rust_template_builds_tests_and_serves() {
    template_serves("rust", "hello-rust", None, "cargo test --quiet");
}

#[test]
fn the_rust_p3_template_builds_tests_and_serves() {
    template_serves(
        "rust-p3",
        "hello-p3",
        Some("/api/v1/p3"),
        "cargo test --quiet",
    );
}

#[test]
fn the_typescript_template_builds_tests_and_serves() {
    template_serves("ts", "hello-ts", None, "npm test --silent");
}

#[test]
fn the_javascript_template_builds_tests_and_serves() {
    template_serves("js", "hello-js", Some("/js/greet"), "npm test --silent");
}

#[test]
fn the_python_template_builds_tests_and_serves() {
    template_serves(
        "python",
        "hello-py",
        Some("/py"),
        "python3 -m unittest --quiet",
    );
}

#[test]
fn new_refuses_bad_input_and_names_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = run_cli(&["new", "--template", "go", "x", "--dir", dir]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("no template `go`"), "{}", out.stderr);
    assert!(out.stderr.contains("python"), "{}", out.stderr);
    let out = run_cli(&["new", "Bad_Name", "--dir", dir]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("invalid module name `Bad_Name`"),
        "{}",
        out.stderr
    );
    assert!(run_cli(&["new", "twice", "--dir", dir]).status.success());
    let out = run_cli(&["new", "twice", "--dir", dir]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    let list = run_cli(&["new", "--list"]);
    for t in ["rust", "rust-p3", "ts", "js", "python"] {
        assert!(
            list.stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(t)),
            "{}",
            list.stdout
        );
    }
}

/// `berth dev`, its output (its own lines and the host's) collected.
struct Dev {
    child: std::process::Child,
    output: Arc<Mutex<String>>,
}

impl Dev {
    fn start(project: &Path, listen: u16, admin: u16) -> Dev {
        Self::start_with(project, listen, admin, &[])
    }

    fn start_with(project: &Path, listen: u16, admin: u16, args: &[&str]) -> Dev {
        let mut child = Command::new(berth_bin())
            .args(["dev", "--listen", &format!("127.0.0.1:{listen}")])
            .args(args)
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .current_dir(project)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CLIPPY_ARGS")
            .env_remove("BERTH_ADMIN__TOKEN")
            .env("PATH", tool_path())
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut text = sink.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        Dev { child, output }
    }

    fn text(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output holds `what` `count` times.
    fn wait_for(&self, what: &str, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.text().matches(what).count() < count {
            assert!(
                Instant::now() < deadline,
                "no `{what}` (x{count}) after {limit:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        sigterm(&self.child);
        let _ = self.child.wait();
    }
}

/// Polls `url` until its JSON `message` is `want`.
fn wait_for_message(url: &str, want: &str, dev: &Dev) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = get(url);
        if reply.status == 200 && reply.json()["message"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never answered {want}; last {} {}:\n{}",
            reply.status,
            reply.body,
            dev.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dev_rebuilds_on_change_keeps_the_last_good_version_and_recovers() {
    let (_tmp, project) = new_project("rust", "dev-loop", None);
    let (listen, admin) = (free_port(), free_port());
    let dev = Dev::start(&project, listen, admin);
    let url = format!("http://127.0.0.1:{listen}/dev-loop?name=Ada");
    dev.wait_for(
        &format!("dev-loop is serving at http://127.0.0.1:{listen}/dev-loop"),
        1,
        Duration::from_secs(300),
    );
    // The URL is printed once it serves, not before.
    let first = get(&url);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["message"], "Hello, Ada!", "{}", first.body);

    let source = project.join("src/lib.rs");
    let original = std::fs::read_to_string(&source).unwrap();
    let edited = original.replace("{greeting}, {name}!", "{greeting}, {name}?");
    assert_ne!(edited, original);
    std::fs::write(&source, &edited).unwrap();
    wait_for_message(&url, "Hello, Ada?", &dev);
    dev.wait_for("now serving the new dev-loop", 1, Duration::from_secs(10));

    // A syntax error: the compiler's own message, and the old version on.
    std::fs::write(&source, format!("{edited}\nfn broken( {{\n")).unwrap();
    dev.wait_for("the build of dev-loop failed", 1, Duration::from_secs(120));
    let text = dev.text();
    assert!(text.contains("error: "), "the compiler's report:\n{text}");
    assert!(
        text.contains("src/lib.rs"),
        "the compiler's report:\n{text}"
    );
    let reply = get(&url);
    assert_eq!(reply.json()["message"], "Hello, Ada?", "{}", reply.body);

    // berth.toml is watched too: a new value serves, a broken file is
    // refused by name and the running config stays.
    edit_config(&project, |doc| {
        doc["modules"]["dev-loop"]["config"]["greeting"] = toml_edit::value("Hi");
    });
    wait_for_message(&url, "Hi, Ada?", &dev);
    let config = project.join("berth.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("route = ", "rout = ")).unwrap();
    dev.wait_for(
        "berth.toml rejected, the running config stays",
        1,
        Duration::from_secs(30),
    );
    assert_eq!(get(&url).json()["message"], "Hi, Ada?");
    std::fs::write(&config, good).unwrap();

    // The fix is picked up like any other change.
    std::fs::write(
        &source,
        original.replace("{greeting}, {name}!", "{greeting}, {name}."),
    )
    .unwrap();
    wait_for_message(&url, "Hi, Ada.", &dev);
}

/// A project whose build copies a prebuilt component: `berth dev`'s own
/// behaviour, with no compiler in the way.
fn copying_project() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().to_owned();
    std::fs::create_dir(project.join("src")).unwrap();
    std::fs::write(
        project.join("dev.toml"),
        "[runtime]\nmodules_dir = \".\"\n\n[modules.app]\nfile = \"app.wasm\"\nroute = \"/app\"\nbuild = \"cp src/v.wasm app.wasm\"\nwatch = [\"src/**\"]\n",
    )
    .unwrap();
    (tmp, project)
}

#[test]
fn dev_waits_for_a_first_build_keeps_the_last_good_load_and_drains() {
    let (_tmp, project) = copying_project();
    let (listen, admin) = (free_port(), free_port());
    let mut dev = Dev::start_with(&project, listen, admin, &["--config", "dev.toml"]);
    dev.wait_for("app has no good build yet", 1, Duration::from_secs(30));

    // A build that succeeds but that the host cannot load: it says so and
    // waits for the next change.
    let source = project.join("src/v.wasm");
    std::fs::write(&source, b"not a component").unwrap();
    dev.wait_for("the host could not start", 1, Duration::from_secs(60));
    std::fs::copy(wasm("swap_v1"), &source).unwrap();
    dev.wait_for("app is serving at", 1, Duration::from_secs(60));
    let url = format!("http://127.0.0.1:{listen}/app");
    assert_eq!(get(&url).body, "v1\n");
    // Its own output is not a source: no build reruns by itself.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        dev.text().matches("building app").count(),
        3,
        "{}",
        dev.text()
    );

    std::fs::write(&source, b"not a component").unwrap();
    dev.wait_for(
        "app failed to load, its last good version keeps serving",
        1,
        Duration::from_secs(60),
    );
    assert_eq!(get(&url).body, "v1\n");

    // One reload per change, the one berth dev asks for: the host's own
    // watcher is off.
    std::fs::copy(wasm("swap_v2"), &source).unwrap();
    dev.wait_for("now serving the new app", 1, Duration::from_secs(60));
    assert_eq!(get(&url).body, "v2\n");

    // SIGTERM drains the host, as in a pod, and ends berth dev cleanly.
    sigterm(&dev.child);
    let status = dev.child.wait().unwrap();
    assert!(status.success(), "{status}\n{}", dev.text());
    dev.wait_for("shutdown complete", 1, Duration::from_secs(5));
}

/// Processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect()
}

#[test]
fn a_signal_during_a_build_stops_berth_dev_and_the_whole_build() {
    let (_tmp, project) = copying_project();
    // A build that outlives its shell's patience: `sh` runs `sleep`.
    let config = project.join("dev.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("cp src/v.wasm", "sleep 307 && cp src/v.wasm"),
    )
    .unwrap();
    let (listen, admin) = (free_port(), free_port());
    let mut dev = Dev::start_with(&project, listen, admin, &["--config", "dev.toml"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_with("sleep 307").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the build never started:\n{}",
            dev.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sigterm(&dev.child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "berth dev ignored SIGTERM during a build"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", dev.text());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(processes_with("sleep 307"), Vec::<String>::new());
}

#[test]
fn new_names_the_tools_it_cannot_find() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty-bin");
    std::fs::create_dir(&empty).unwrap();
    let new = |path: &Path, name: &str| {
        let out = Command::new(berth_bin())
            .args(["new", name, "--dir"])
            .arg(tmp.path())
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = new(&empty, "no-cargo");
    assert!(stderr.contains("cargo is not on PATH"), "{stderr}");
    assert!(!stderr.contains("wasm32-wasip2"), "{stderr}");
    // Cargo, but a Rust without the WebAssembly target.
    let fake = tmp.path().join("fake-bin");
    std::fs::create_dir(&fake).unwrap();
    for (tool, script) in [("cargo", "exit 0"), ("rustc", "echo /nonexistent")] {
        let file = fake.join(tool);
        std::fs::write(&file, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let stderr = new(&fake, "no-target");
    assert!(
        stderr.contains("rustup target add wasm32-wasip2"),
        "{stderr}"
    );
    assert!(!stderr.contains("cargo is not on PATH"), "{stderr}");
}

/// The README's first module: `berth new --template ts hello`, `cd
/// hello`, `berth dev`, and a request.
#[test]
fn a_new_typescript_project_answers_through_berth_dev() {
    let (_tmp, project) = new_project("ts", "hello", None);
    let (listen, admin) = (free_port(), free_port());
    let dev = Dev::start(&project, listen, admin);
    dev.wait_for(
        &format!("hello is serving at http://127.0.0.1:{listen}/hello"),
        1,
        Duration::from_secs(300),
    );
    wait_for_message(
        &format!("http://127.0.0.1:{listen}/hello?name=Ada"),
        "Hello, Ada!",
        &dev,
    );
}

#[test]
fn dev_refuses_a_project_without_a_build() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("berth.toml"),
        "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\n",
    )
    .unwrap();
    let out = run_cli(&["dev", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("no module of"), "{}", out.stderr);
    assert!(out.stderr.contains("build = "), "{}", out.stderr);
}
