//! Test harness: starts the real `berth` binary on port 0, learns its
//! addresses from the start-up log, waits for `/ready`, and talks HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of a guest component built by `make guests`.
pub fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = dir
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `make guests` first",
        path.display()
    );
    path
}

/// A test tool that `make test` builds in the background (wkg, wasmtime):
/// waits while `building` (the build's marker folder) exists, then
/// requires `bin`. `how` says what installs it.
pub fn background_tool(bin: &Path, building: &Path, how: &str) -> PathBuf {
    // Both builds take minutes on two cores; far more means a stuck one.
    let deadline = Instant::now() + Duration::from_secs(40 * 60);
    while building.is_dir() && !bin.is_file() {
        assert!(
            Instant::now() < deadline,
            "{} is still being built after 40 minutes",
            bin.display()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(bin.is_file(), "{} is missing: {how}", bin.display());
    bin.to_owned()
}

/// The modules section for a config, one `(name, route, wasm, extra)` each.
pub fn module(name: &str, route: &str, wasm_name: &str, extra: &str) -> String {
    format!(
        "[modules.{name}]\nfile = {:?}\nroute = {route:?}\n{extra}\n",
        wasm(wasm_name).display().to_string()
    )
}

#[derive(Default)]
struct Logs {
    lines: Vec<String>,
    closed: bool,
    /// Stop reading stdout (the pipe fills, as with a stuck log collector).
    paused: bool,
}

/// A running `berth serve`, killed on drop.
pub struct Berth {
    child: Child,
    logs: Arc<(Mutex<Logs>, Condvar)>,
    pub addr: String,
    pub admin: String,
    /// Holds the config file, unless the test keeps its own.
    _dir: tempfile::TempDir,
    config: PathBuf,
}

/// A `berth` run that ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub fn berth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_berth")
}

/// Writes `config` as `berth.toml` in a fresh folder.
fn write_config(config: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

fn command(config: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(berth_bin());
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .env("LOG_LEVEL", "info")
        .env("LOG_FORMAT", "json")
        .env("BERTH_ADMIN__TOKEN", ADMIN_TOKEN);
    // An empty value unsets the variable.
    for (k, v) in env {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    cmd
}

impl Berth {
    /// Starts berth with this config and waits until it is ready.
    pub fn start(config: &str) -> Berth {
        Self::start_with(config, &[])
    }

    /// Same, with extra environment variables.
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Berth {
        let berth = Self::spawn(config, env);
        berth.wait_ready(Duration::from_secs(60));
        berth
    }

    /// Starts berth with the config file at `path` (which the test keeps)
    /// and waits until it is ready.
    pub fn start_at(path: &Path) -> Berth {
        let berth = Self::spawn_at(tempfile::tempdir().unwrap(), path, &[]);
        berth.wait_ready(Duration::from_secs(60));
        berth
    }

    /// Starts berth and returns once it has bound its ports, ready or not.
    pub fn spawn(config: &str, env: &[(&str, &str)]) -> Berth {
        let (dir, path) = write_config(config);
        Self::spawn_at(dir, &path, env)
    }

    fn spawn_at(dir: tempfile::TempDir, path: &Path, env: &[(&str, &str)]) -> Berth {
        let mut child = command(path, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning berth");
        let logs = Arc::new((Mutex::new(Logs::default()), Condvar::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*sink;
                let mut logs = lock.lock().unwrap();
                logs.lines.push(line);
                cv.notify_all();
                while logs.paused {
                    logs = cv.wait(logs).unwrap();
                }
            }
            let (lock, cv) = &*sink;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        let mut berth = Berth {
            child,
            logs,
            addr: String::new(),
            admin: String::new(),
            _dir: dir,
            config: path.to_path_buf(),
        };
        let addr_of = |which: &str, b: &Berth| {
            b.wait_for_log(Duration::from_secs(30), |l| {
                l["message"] == "listening" && l["listener"] == which
            })
            .unwrap_or_else(|| panic!("berth never logged its {which} address"))["addr"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        berth.addr = addr_of("traffic", &berth);
        berth.admin = addr_of("admin", &berth);
        berth
    }

    /// Polls `/ready` until it answers 200, then waits for the "ready" log
    /// line: logs go out through a non-blocking writer, so the lines that
    /// precede it (one "module loaded" per module) may reach the pipe after
    /// `/ready` already answers.
    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if get(&self.admin_url("/ready")).status == 200 {
                let left = deadline.saturating_duration_since(Instant::now());
                if self
                    .wait_for_log(left, |l| l["message"] == "ready")
                    .is_none()
                {
                    panic!("/ready answered but no \"ready\" line was logged");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "berth not ready after {limit:?}; logs:\n{}",
            self.log_text()
        );
    }

    /// `http://ADDR/path` on the traffic port.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://ADMIN/path` on the admin port.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Every log line so far, parsed (non-JSON lines are skipped).
    pub fn log_lines(&self) -> Vec<Value> {
        let logs = self.logs.0.lock().unwrap();
        logs.lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Every raw log line so far.
    pub fn log_text(&self) -> String {
        self.logs.0.lock().unwrap().lines.join("\n")
    }

    /// Waits for a log line matching `pred`.
    pub fn wait_for_log(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + limit;
        let (lock, cv) = &*self.logs;
        let mut logs = lock.lock().unwrap();
        let mut seen = 0;
        loop {
            for line in &logs.lines[seen..] {
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && pred(&v)
                {
                    return Some(v);
                }
            }
            seen = logs.lines.len();
            let now = Instant::now();
            if logs.closed || now >= deadline {
                return None;
            }
            logs = cv.wait_timeout(logs, deadline - now).unwrap().0;
        }
    }

    /// Stops or resumes reading berth's stdout.
    pub fn pause_logs(&self, paused: bool) {
        let (lock, cv) = &*self.logs;
        lock.lock().unwrap().paused = paused;
        cv.notify_all();
    }

    /// The config file berth was started with; tests may rewrite it.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.config.clone()
    }

    /// The process id, to send it signals.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- berth logs ---\n{}", self.log_text());
        }
    }
}

/// Runs `berth serve` with a config that is expected to fail at start-up.
pub fn run_expecting_exit(config: &str, env: &[(&str, &str)]) -> Finished {
    let (_dir, path) = write_config(config);
    let mut child = command(&path, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("berth kept running although its config is bad");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `berth ARGS...` to completion.
/// A free loopback port: bound, then let go, for a process that must be
/// told its port in advance.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends SIGTERM to a child process (it may have exited already).
pub fn sigterm(child: &std::process::Child) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::TERM,
    );
}

pub fn run_cli(args: &[&str]) -> Finished {
    let out = Command::new(berth_bin()).args(args).output().unwrap();
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn reply(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    match resp {
        Ok(mut r) => Reply {
            status: r.status().as_u16(),
            headers: r
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: r.body_mut().read_to_string().unwrap_or_default(),
        },
        Err(e) => Reply {
            status: 0,
            headers: vec![],
            body: e.to_string(),
        },
    }
}

/// `GET url`; status 0 when the connection failed.
pub fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

/// `GET url` with headers.
pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    reply(req.call())
}

/// `POST url` with a body.
pub fn post(url: &str, body: &str) -> Reply {
    reply(agent().post(url).send(body))
}

/// The value of the sample `name{labels...}` in a Prometheus text page;
/// labels not listed are not compared.
pub fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            (rest.starts_with('{') || rest.starts_with(' '))
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

impl Berth {
    /// The current `/metrics` page.
    pub fn metrics(&self) -> String {
        get(&self.admin_url("/metrics")).body
    }

    /// Resident memory of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the process ever had, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// The admin token every test instance is started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// `POST url` with this `Authorization` header.
pub fn post_authorized(url: &str, authorization: &str) -> Reply {
    reply(
        agent()
            .post(url)
            .header("authorization", authorization)
            .send_empty(),
    )
}

/// `POST url` with no body, as an operator holding the admin token.
pub fn admin_post(url: &str) -> Reply {
    reply(
        agent()
            .post(url)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send_empty(),
    )
}

/// Established TCP connections of process `pid` to `port` on loopback,
/// from `/proc/<pid>/net/tcp`: how many connections a pool really opened.
pub fn established_to(pid: i32, port: u16) -> usize {
    let port = format!(":{port:04X}");
    std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<_> = l.split_whitespace().collect();
            cols.len() > 3 && cols[2].ends_with(&port) && cols[3] == "01"
        })
        .count()
}

/// Clients sending GETs back to back until [`Load::finish`] (or a time
/// limit): answers `ok` accepts are counted, others kept as failures, and
/// the span of every request is recorded.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    served: Arc<std::sync::atomic::AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    spans: Arc<Mutex<Vec<(Instant, Instant)>>>,
}

/// What a [`Load`] saw.
pub struct LoadReport {
    pub served: usize,
    pub failures: Vec<String>,
    pub spans: Vec<(Instant, Instant)>,
}

impl Load {
    /// One client per URL.
    pub fn start(urls: Vec<String>, limit: Duration, ok: fn(&Reply) -> bool) -> Load {
        let load = Load {
            stop: Arc::default(),
            threads: Vec::new(),
            served: Arc::default(),
            failures: Arc::default(),
            spans: Arc::default(),
        };
        let threads = urls
            .into_iter()
            .map(|url| {
                let (stop, served, failures, spans) = (
                    load.stop.clone(),
                    load.served.clone(),
                    load.failures.clone(),
                    load.spans.clone(),
                );
                std::thread::spawn(move || {
                    let deadline = Instant::now() + limit;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        let started = Instant::now();
                        let r = get(&url);
                        spans.lock().unwrap().push((started, Instant::now()));
                        if ok(&r) {
                            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        } else {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", r.status, r.body));
                        }
                    }
                })
            })
            .collect();
        Load { threads, ..load }
    }

    /// Stops the clients and reports.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        LoadReport {
            served: self.served.load(std::sync::atomic::Ordering::Relaxed),
            failures: std::mem::take(&mut self.failures.lock().unwrap()),
            spans: std::mem::take(&mut self.spans.lock().unwrap()),
        }
    }
}
