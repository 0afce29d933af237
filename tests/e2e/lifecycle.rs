//! Pod lifecycle: graceful shutdown, hot-swap, live config reload, the
//! compile cache and URL-sourced modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

fn signal(berth: &Berth, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &berth.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} failed");
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let config = "[shutdown]\ndrain_delay = \"1s\"\ngrace_period = \"10s\"\n".to_owned()
        + &module("misbehave", "/m", "misbehave", "");
    let mut berth = Berth::start(&config);

    // Slow requests in flight when the signal arrives.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let url = berth.url("/m/sleep?ms=2500");
            std::thread::spawn(move || get(&url))
        })
        .collect();
    // Continuous light load alongside, until the listener closes.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (url, stop, ok, refused) = (
            berth.url("/m/ok"),
            stop.clone(),
            ok.clone(),
            refused.clone(),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = get(&url);
                match r.status {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    // Connection refused once the listener is closed.
                    0 => refused.fetch_add(1, Ordering::Relaxed),
                    other => panic!("request failed during drain: {other} {}", r.body),
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    signal(&berth, "TERM");

    // Readiness fails at once, while traffic is still served.
    let mut saw_not_ready = false;
    while signalled.elapsed() < Duration::from_millis(800) {
        if get(&berth.admin_url("/ready")).status == 503 {
            saw_not_ready = true;
            break;
        }
    }
    assert!(saw_not_ready, "/ready did not turn 503 during the drain");
    assert_eq!(
        get(&berth.url("/m/ok")).status,
        200,
        "traffic stops during the drain delay"
    );
    // After the drain delay, with the slow requests still running: new
    // connections are refused.
    while signalled.elapsed() < Duration::from_millis(1300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        berth.wait_exit(Duration::ZERO).is_none(),
        "exited with requests in flight"
    );
    let r = get(&berth.url("/m/ok"));
    assert_eq!(
        r.status, 0,
        "a new request was served after the drain: {}",
        r.body
    );

    for handle in slow {
        let r = handle.join().unwrap();
        assert_eq!(r.status, 200, "an in-flight request was cut: {}", r.body);
        assert_eq!(r.body, "slept\n");
        // The connection is closed after it, not kept alive.
        assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    }
    let status = berth
        .wait_exit(Duration::from_secs(1 + 10 + 5))
        .expect("berth did not exit within drain_delay + grace_period + margin");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the load never saw a refusal"
    );
    assert!(berth.log_text().contains("shutdown complete"));
}

/// A module whose download never finishes (the server never answers).
fn hanging_module(hanging: &crate::downstream::Downstream) -> String {
    format!(
        "\n[modules.slow]\nurl = \"{}\"\nsha256 = \"{}\"\nroute = \"/slow\"\n",
        hanging.url("/slow.wasm"),
        "0".repeat(64)
    )
}

/// Sends SIGTERM and expects exit code 0 within 3 s, whatever is loading.
fn terminate_promptly(berth: &mut Berth, what: &str) {
    let started = Instant::now();
    signal(berth, "TERM");
    let status = berth
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("SIGTERM {what} was ignored"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{what}: the exit took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(0));
}

const QUICK_SHUTDOWN: &str = "[shutdown]\ndrain_delay = \"0s\"\ngrace_period = \"1s\"\n";

#[test]
fn sigterm_during_start_up_exits_without_waiting_for_the_modules() {
    let hanging = crate::downstream::Downstream::start(crate::downstream::Mode::Hang);
    let mut berth = Berth::spawn(
        &format!("{QUICK_SHUTDOWN}{}", hanging_module(&hanging)),
        &[],
    );
    assert_eq!(get(&berth.admin_url("/ready")).status, 503);
    terminate_promptly(&mut berth, "during start-up");
}

#[test]
fn sigterm_during_a_slow_reload_still_exits_within_the_grace_period() {
    let hanging = crate::downstream::Downstream::start(crate::downstream::Mode::Hang);
    let base = format!("[runtime]\nwatch = false\n\n{QUICK_SHUTDOWN}\n")
        + &module("misbehave", "/m", "misbehave", "");
    let mut berth = Berth::start(&base);
    // A reload that hangs on a download (up to a minute).
    std::fs::write(berth.config_path(), base + &hanging_module(&hanging)).unwrap();
    signal(&berth, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while hanging.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "the reload never started its download"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    terminate_promptly(&mut berth, "during a reload");
}

#[test]
fn a_second_signal_exits_at_once() {
    let config = "[shutdown]\ndrain_delay = \"30s\"\n".to_owned()
        + &module("misbehave", "/m", "misbehave", "");
    let mut berth = Berth::start(&config);
    signal(&berth, "TERM");
    berth
        .wait_for_log(Duration::from_secs(5), |l| {
            l["message"] == "shutting down: readiness now fails"
        })
        .expect("shutdown began");
    signal(&berth, "INT");
    let status = berth
        .wait_exit(Duration::from_secs(5))
        .expect("second signal did not end the process");
    assert_ne!(status.code(), Some(0));
}

// --- hot-swap ---

/// A modules folder laid out the way the kubelet lays out a ConfigMap
/// volume: `NAME -> ..data/NAME`, `..data -> ..TIMESTAMP/`.
struct ConfigMapDir {
    dir: tempfile::TempDir,
    generation: usize,
}

impl ConfigMapDir {
    fn new(files: &[(&str, &[u8])]) -> Self {
        let mut me = ConfigMapDir {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        me.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), me.dir.path().join(name)).unwrap();
        }
        me
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Exactly what the kubelet's atomic writer does: write a new
    /// timestamped folder, point `..data_tmp` at it, rename that over
    /// `..data`, remove the old folder.
    fn update(&mut self, files: &[(&str, &[u8])]) {
        let root = self.dir.path();
        let old = format!(
            "..2026_11_22_00_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        self.generation += 1;
        let new = format!(
            "..2026_11_22_00_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        std::fs::create_dir(root.join(&new)).unwrap();
        for (name, bytes) in files {
            std::fs::write(root.join(&new).join(name), bytes).unwrap();
        }
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(root.join(old));
    }
}

fn swap_config(dir: &std::path::Path, extra: &str) -> String {
    format!(
        "[runtime]\nmodules_dir = {:?}\nrescan_interval = \"30s\"\n\n[modules.svc]\nfile = \"svc.wasm\"\nroute = \"/svc\"\n{extra}\n",
        dir.display().to_string()
    )
}

fn wait_for_body(berth: &Berth, path: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if get(&berth.url(path)).body == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "`{want}` not served after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kubelet_style_swaps_under_load_fail_no_request() {
    let v1 = std::fs::read(wasm("swap_v1")).unwrap();
    let v2 = std::fs::read(wasm("swap_v2")).unwrap();
    let mut dir = ConfigMapDir::new(&[("svc.wasm", &v1)]);
    let berth = Berth::start(&swap_config(dir.path(), ""));
    assert_eq!(get(&berth.url("/svc")).body, "v1\n");

    // Four fast clients, and two whose requests take 300 ms each, so
    // requests are in flight across every swap.
    let urls = (0..6)
        .map(|i| berth.url(if i < 4 { "/svc" } else { "/svc?ms=300" }))
        .collect();
    let load = Load::start(urls, Duration::from_secs(120), |r| {
        r.status == 200 && (r.body == "v1\n" || r.body == "v2\n")
    });

    let mut switch_times = Vec::new();
    let mut swapped_at = Vec::new();
    for i in 0..20 {
        let (bytes, want) = if i % 2 == 0 {
            (&v2, "v2\n")
        } else {
            (&v1, "v1\n")
        };
        dir.update(&[("svc.wasm", bytes)]);
        switch_times.push(wait_for_body(&berth, "/svc", want, Duration::from_secs(10)));
        // The router has switched by now: a slow request still running
        // began before, on the old version.
        swapped_at.push(Instant::now());
        // Let a slow request start on this version before the next swap.
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "failed requests during swaps: {:?}",
        report.failures
    );
    assert!(report.served > 100);
    // Every answer above was whole; check that many were in flight when
    // the router switched.
    let spans = &report.spans;
    let across = swapped_at
        .iter()
        .filter(|&&t| spans.iter().any(|&(a, b)| a < t && t < b))
        .count();
    assert!(
        across >= 15,
        "only {across} of 20 swaps had a request in flight"
    );
    switch_times.sort();
    println!(
        "hot-swap: 20 swaps, {} requests served, switch time median {:?}, max {:?}",
        report.served,
        switch_times[switch_times.len() / 2],
        switch_times.last().unwrap()
    );
    let page = berth.metrics();
    assert_eq!(
        metric(
            &page,
            "berth_module_reloads_total",
            &[("module", "svc"), ("result", "ok")]
        ),
        Some(20.0)
    );
    // The serving version (v1 after an even number of swaps), and only it.
    use sha2::{Digest, Sha256};
    let sha_v1: String = Sha256::digest(&v1)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        metric(
            &page,
            "berth_module_info",
            &[("module", "svc"), ("sha256", &sha_v1)]
        ),
        Some(1.0)
    );
    assert_eq!(page.matches("berth_module_info{").count(), 1, "{page}");
    let loaded = metric(
        &page,
        "berth_module_loaded_timestamp_seconds",
        &[("module", "svc")],
    );
    assert!(loaded.unwrap() > 1.7e9);
}

#[test]
fn swaps_take_effect_while_a_log_file_beside_the_config_keeps_changing() {
    let v1 = std::fs::read(wasm("swap_v1")).unwrap();
    let v2 = std::fs::read(wasm("swap_v2")).unwrap();
    let mut dir = ConfigMapDir::new(&[("svc.wasm", &v1)]);
    let berth = Berth::start(&swap_config(dir.path(), ""));
    assert_eq!(get(&berth.url("/svc")).body, "v1\n");

    // `berth >> berth.log` next to the config, as in a local run, and an
    // editor's swap file in the modules folder: both change every 10 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let noise: Vec<_> = [
        berth.config_path().with_file_name("berth.log"),
        dir.path().join(".svc.wasm.swp"),
    ]
    .into_iter()
    .map(|path| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(path).unwrap();
            while !stop.load(Ordering::Relaxed) {
                writeln!(f, "{{\"message\":\"a log line\"}}").unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    })
    .collect();
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let load = {
        let (url, stop, failures, served) = (
            berth.url("/svc"),
            stop.clone(),
            failures.clone(),
            served.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = get(&url);
                if r.status == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // Ten swaps, 0.7 s apart; each must be served within its own window.
    let mut late = Vec::new();
    for i in 0..10 {
        let (bytes, want) = if i % 2 == 0 {
            (&v2, "v2\n")
        } else {
            (&v1, "v1\n")
        };
        let window = Instant::now() + Duration::from_millis(700);
        dir.update(&[("svc.wasm", bytes)]);
        let mut switched = false;
        while Instant::now() < window {
            if !switched && get(&berth.url("/svc")).body == want {
                switched = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !switched {
            late.push(i);
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    for t in noise {
        t.join().unwrap();
    }
    assert!(late.is_empty(), "swaps {late:?} not served within 0.7 s");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 10);
    // The reload line says how long each change took to take effect.
    let line = berth
        .wait_for_log(Duration::from_secs(1), |l| {
            l["message"] == "module swapped in" && l["since_change_ms"].is_u64()
        })
        .expect("a swap logged with the time since the change");
    assert!(line["since_change_ms"].as_u64().unwrap() < 700, "{line}");
}

#[test]
fn a_broken_module_is_refused_and_the_old_version_keeps_serving() {
    let v1 = std::fs::read(wasm("swap_v1")).unwrap();
    let mut dir = ConfigMapDir::new(&[("svc.wasm", &v1)]);
    let berth = Berth::start(&swap_config(dir.path(), ""));
    let sha_v1 = get(&berth.admin_url("/info")).json()["modules"][0]["sha256"].clone();

    let bad_import = std::fs::read(wasm("bad_import")).unwrap();
    let cases: [(&[u8], &str); 2] = [
        (
            b"\0asm\x0d\0\x01\0garbage that does not compile",
            "failed to compile",
        ),
        (&bad_import, "berth-test:missing/teleport"),
    ];
    for (i, (bytes, expected)) in cases.iter().enumerate() {
        dir.update(&[("svc.wasm", bytes)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let info = loop {
            let info = get(&berth.admin_url("/info")).json();
            if info["modules"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(expected))
            {
                break info;
            }
            assert!(
                Instant::now() < deadline,
                "error not shown in /info: {info}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            info["modules"][0]["sha256"], sha_v1,
            "the old version is still the one serving"
        );
        assert_eq!(get(&berth.url("/svc")).body, "v1\n");
        let page = berth.metrics();
        assert_eq!(
            metric(
                &page,
                "berth_module_reloads_total",
                &[("module", "svc"), ("result", "error")]
            ),
            Some((i + 1) as f64)
        );
    }
    // A good version clears the error.
    let v2 = std::fs::read(wasm("swap_v2")).unwrap();
    dir.update(&[("svc.wasm", &v2)]);
    wait_for_body(&berth, "/svc", "v2\n", Duration::from_secs(10));
    assert!(get(&berth.admin_url("/info")).json()["modules"][0]["last_error"].is_null());
}

#[test]
fn a_config_edit_reaches_the_guest_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("misbehave"), dir.path().join("m.wasm")).unwrap();
    let cfg = |greeting: &str| {
        format!(
            "[runtime]\nmodules_dir = {:?}\n\n[modules.m]\nfile = \"m.wasm\"\nroute = \"/m\"\nconfig = {{ greeting = \"{greeting}\" }}\n",
            dir.path().display().to_string()
        )
    };
    let berth = Berth::start(&cfg("one"));
    assert_eq!(get(&berth.url("/m/config")).json()["greeting"], "one");
    // The same process, still running: its start time (clock ticks after
    // boot) and state from /proc. A re-spawned server would have another
    // start time; an exited child shows as a zombie.
    let process = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<String> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (fields[0].clone(), fields[19].clone())
    };
    let before = process(berth.pid());
    assert_ne!(before.0, "Z");

    // Through the watcher.
    std::fs::write(berth.config_path(), cfg("two")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&berth.url("/m/config")).json()["greeting"] != "two" {
        assert!(Instant::now() < deadline, "config change not applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(process(berth.pid()), before, "applied in place");

    // A bad edit keeps the running config and says why.
    std::fs::write(berth.config_path(), "[modules.m]\nroute = 42\n").unwrap();
    let r = admin_post(&berth.admin_url("/admin/reload"));
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.json()["config_error"].as_str().unwrap().contains("route"),
        "{}",
        r.body
    );
    assert_eq!(get(&berth.url("/m/config")).json()["greeting"], "two");
    assert!(get(&berth.admin_url("/info")).json()["config_error"].is_string());

    // SIGHUP alone, with the watcher off: nothing else can apply the edit.
    let unwatched = |greeting: &str| {
        cfg(greeting).replace(
            "[runtime]\n",
            "[runtime]\nwatch = false\nrescan_interval = \"1h\"\n",
        )
    };
    let berth = Berth::start(&unwatched("four"));
    std::fs::write(berth.config_path(), unwatched("five")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&berth.url("/m/config")).json()["greeting"], "four");
    signal(&berth, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&berth.url("/m/config")).json()["greeting"] != "five" {
        assert!(Instant::now() < deadline, "SIGHUP reload not applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(get(&berth.admin_url("/info")).json()["config_error"].is_null());
}

#[test]
fn admin_endpoints_that_change_state_need_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("swap_v1"), dir.path().join("svc.wasm")).unwrap();
    let config = swap_config(dir.path(), "").replace("[runtime]\n", "[runtime]\nwatch = false\n");

    // No token configured: off for everyone; probes, /info and /metrics
    // stay open.
    let berth = Berth::start_with(&config, &[("BERTH_ADMIN__TOKEN", "")]);
    std::fs::copy(wasm("swap_v2"), dir.path().join("svc.wasm")).unwrap();
    let r = admin_post(&berth.admin_url("/admin/reload"));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("admin.token_file"), "{}", r.body);
    assert_eq!(get(&berth.url("/svc")).body, "v1\n", "nothing reloaded");
    for open in ["/healthz", "/ready", "/info", "/metrics"] {
        assert_eq!(get(&berth.admin_url(open)).status, 200, "{open}");
    }
    drop(berth);

    // A token in a file (a mounted Secret), re-read on every use.
    std::fs::copy(wasm("swap_v1"), dir.path().join("svc.wasm")).unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let berth = Berth::start_with(
        &config.replace(
            "[runtime]\n",
            &format!(
                "[admin]\ntoken_file = {:?}\n\n[runtime]\n",
                token_file.display().to_string()
            ),
        ),
        &[],
    );
    std::fs::copy(wasm("swap_v2"), dir.path().join("svc.wasm")).unwrap();
    let url = berth.admin_url("/admin/reload");
    for bad in [
        "",
        "Bearer ",
        "Bearer wrong",
        "Basic Zmlyc3QtdG9rZW4=",
        "Bearer first-token-and-more",
    ] {
        let r = post_authorized(&url, bad);
        assert_eq!(r.status, 401, "`{bad}`: {}", r.body);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(
        get(&berth.url("/svc")).body,
        "v1\n",
        "refused calls changed nothing"
    );
    let r = post_authorized(&url, "Bearer first-token");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(&berth.url("/svc")).body, "v2\n");
    // The Secret rotates: the old token stops working at once.
    std::fs::write(&token_file, "second-token\n").unwrap();
    assert_eq!(post_authorized(&url, "Bearer first-token").status, 401);
    assert_eq!(post_authorized(&url, "Bearer second-token").status, 200);
}

#[test]
fn admin_reload_and_sighup_work_without_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("swap_v1"), dir.path().join("svc.wasm")).unwrap();
    let config = swap_config(dir.path(), "").replace("[runtime]\n", "[runtime]\nwatch = false\n");
    let berth = Berth::start(&config);
    std::fs::copy(wasm("swap_v2"), dir.path().join("svc.wasm")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        get(&berth.url("/svc")).body,
        "v1\n",
        "nothing watches, nothing changes yet"
    );
    let r = admin_post(&berth.admin_url("/admin/reload"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed"][0], "svc");
    assert_eq!(get(&berth.url("/svc")).body, "v2\n");

    std::fs::copy(wasm("swap_v1"), dir.path().join("svc.wasm")).unwrap();
    signal(&berth, "HUP");
    wait_for_body(&berth, "/svc", "v1\n", Duration::from_secs(10));
}

#[test]
fn the_compile_cache_is_used_and_a_truncated_entry_is_rebuilt() {
    let cache = tempfile::tempdir().unwrap();
    let config = format!(
        "[runtime]\ncache_dir = {:?}\n",
        cache.path().display().to_string()
    ) + &module("hello", "/hello", "hello", "");
    {
        let berth = Berth::start(&config);
        assert_eq!(get(&berth.url("/hello")).status, 200);
        assert!(!berth.log_text().contains("loaded from the compile cache"));
    }
    {
        let berth = Berth::start(&config);
        assert_eq!(get(&berth.url("/hello")).status, 200);
        berth
            .wait_for_log(Duration::from_secs(1), |l| {
                l["message"] == "loaded from the compile cache" && l["module"] == "hello"
            })
            .expect("the second start loads the entry instead of compiling");
    }
    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "one precompiled module cached");
    let full = std::fs::metadata(&entries[0]).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&entries[0])
        .unwrap();
    f.set_len(full / 2).unwrap();
    drop(f);

    let berth = Berth::start(&config);
    assert_eq!(
        get(&berth.url("/hello?name=cache")).json()["message"],
        "Hello, cache!"
    );
    assert!(
        berth.log_text().contains("corrupt compile cache entry"),
        "the truncated entry was not detected"
    );
    assert!(!berth.log_text().contains("loaded from the compile cache"));
    assert_eq!(
        std::fs::metadata(&entries[0]).unwrap().len(),
        full,
        "entry rebuilt"
    );
}

#[test]
fn rescans_neither_download_nor_reread_what_has_not_changed() {
    let bytes = std::fs::read(wasm("hello")).unwrap();
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(&bytes));
    let server = crate::downstream::Downstream::serving(bytes);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("swap_v1"), dir.path().join("svc.wasm")).unwrap();
    let berth = Berth::start(&format!(
        "[runtime]\ncache_dir = \"\"\nwatch = false\nrescan_interval = \"50ms\"\nmodules_dir = {:?}\n\n\
         [modules.remote]\nurl = \"{}\"\nsha256 = \"{digest}\"\nroute = \"/remote\"\n\n\
         [modules.svc]\nfile = \"svc.wasm\"\nroute = \"/svc\"\n",
        dir.path().display().to_string(),
        server.url("/hello.wasm"),
    ));
    assert_eq!(server.hits(), 1);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        server.hits(),
        1,
        "rescans downloaded a module pinned by digest again"
    );
    // A file changed in place (same inode) is still noticed by its stamp.
    std::fs::copy(wasm("swap_v2"), dir.path().join("svc.wasm")).unwrap();
    wait_for_body(&berth, "/svc", "v2\n", Duration::from_secs(10));
    assert_eq!(server.hits(), 1);
}

#[test]
fn url_modules_are_verified_against_their_digest() {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(wasm("hello")).unwrap();
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let server = crate::downstream::Downstream::serving(bytes);
    let cache = tempfile::tempdir().unwrap();
    let config = |sha: &str| {
        format!(
            "[runtime]\ncache_dir = {:?}\n\n[modules.remote]\nurl = \"{}\"\nsha256 = \"{sha}\"\nroute = \"/remote\"\n",
            cache.path().display().to_string(),
            // A presigned URL: credentials in the userinfo and the query.
            server
                .url("/hello.wasm?X-Amz-Signature=sekrit-sig&token=sekrit-token")
                .replace("http://", "http://alice:sekrit-pass@")
        )
    };
    let berth = Berth::start(&config(&digest));
    assert_eq!(
        get(&berth.url("/remote?name=url")).json()["message"],
        "Hello, url!"
    );
    let info = get(&berth.admin_url("/info")).json();
    assert_eq!(info["modules"][0]["sha256"], digest.as_str());
    assert!(
        info["modules"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("/hello.wasm?X-Amz-Signature=REDACTED&token=REDACTED"),
        "{info}"
    );
    for shown in [info.to_string(), berth.log_text()] {
        assert!(!shown.contains("sekrit"), "a credential leaked: {shown}");
    }
    drop(berth);

    // `log.redact_query = false` keeps the query's values (an operator who
    // knows they carry none), never the userinfo.
    let berth = Berth::start(&format!(
        "[log]\nredact_query = false\n\n{}",
        config(&digest)
    ));
    let info = get(&berth.admin_url("/info")).json();
    let file = info["modules"][0]["file"].as_str().unwrap();
    assert!(
        file.ends_with("/hello.wasm?X-Amz-Signature=sekrit-sig&token=sekrit-token"),
        "{file}"
    );
    assert!(
        !file.contains("alice") && !file.contains("sekrit-pass"),
        "{file}"
    );
    drop(berth);

    let wrong = "0".repeat(64);
    let out = run_expecting_exit(&config(&wrong), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("module `remote`"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&wrong) && out.stderr.contains(&digest),
        "{}",
        out.stderr
    );
}

#[test]
fn a_module_being_compiled_is_listed_as_loading_and_the_log_says_so() {
    // The 13 MB JavaScript module takes seconds to compile, with no cache.
    let berth = Berth::spawn(
        &format!(
            "[runtime]\ncache_dir = \"\"\n{}",
            module("js", "/js", "js-hello", "")
        ),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let loading = loop {
        let info = get(&berth.admin_url("/info")).json();
        if let Some(m) = info["modules"].as_array().and_then(|m| m.first()) {
            break m.clone();
        }
        assert!(Instant::now() < deadline, "/info never listed the module");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(loading["name"], "js", "{loading}");
    assert_eq!(loading["state"], "loading", "{loading}");
    assert_eq!(loading["serving"], false, "{loading}");
    let page = get(&berth.admin_url("/")).body;
    assert!(page.contains("loading"), "{page}");
    berth.wait_ready(Duration::from_secs(120));
    let line = berth
        .wait_for_log(Duration::from_secs(5), |l| {
            l["message"] == "compiling" && l["module"] == "js"
        })
        .expect("no `compiling` line");
    assert!(line["bytes"].as_u64().unwrap() > 10 << 20, "{line}");
    let info = get(&berth.admin_url("/info")).json();
    assert_eq!(info["modules"][0]["serving"], true, "{info}");
}

#[test]
fn modules_of_the_same_bytes_are_compiled_once() {
    let config = |modules: &str| format!("[runtime]\ncache_dir = \"\"\n{modules}");
    let modules: String = (0..20)
        .map(|i| module(&format!("m{i}"), &format!("/m{i}"), "hello", ""))
        .collect();
    let berth = Berth::start(&config(&modules));
    for i in [0, 19] {
        assert_eq!(get(&berth.url(&format!("/m{i}"))).status, 200);
    }
    let compiles = || {
        berth
            .log_lines()
            .iter()
            .filter(|l| l["message"] == "compiling")
            .count()
    };
    // Reloads `modules` through the admin port.
    let reload = |modules: &str| {
        std::fs::write(berth.config_path(), config(modules)).unwrap();
        let report = admin_post(&berth.admin_url("/admin/reload")).json();
        assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    };
    assert_eq!(compiles(), 1, "{}", berth.log_text());
    // Two of them swapped at once to new bytes: one compile between them.
    reload(&modules.replacen(
        &wasm("hello").display().to_string(),
        &wasm("plain_hello").display().to_string(),
        2,
    ));
    assert_eq!(compiles(), 2, "one more, for the new bytes only");
    // And back to bytes already loaded (the other 18 serve them): none.
    reload(&modules);
    assert_eq!(compiles(), 2, "{}", berth.log_text());
}

/// After a burst and a quiet spell, the warm slots of both instance pools
/// go back to the kernel, once per spell, and the next requests are served
/// from cold slots.
#[test]
fn idle_instance_memory_goes_back_to_the_kernel_after_a_quiet_spell() {
    let config = "[runtime]\nrelease_idle_after = \"1s\"\n".to_owned()
        + &module("hello", "/hello", "hello", "")
        // A reused instance idling out frees a slot and starts a new quiet
        // spell; retiring well inside the spell keeps it to one release.
        + &module(
            "svc",
            "/p3",
            "p3_service",
            "instances = { idle_timeout = \"100ms\" }",
        );
    let berth = Berth::start(&config);
    let burst = || {
        let urls = (0..4)
            .flat_map(|_| [berth.url("/hello"), berth.url("/p3")])
            .collect();
        let load = Load::start(urls, Duration::from_secs(10), |r| r.status == 200);
        std::thread::sleep(Duration::from_millis(1500));
        let report = load.finish();
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert!(report.served > 8);
    };
    let releases = || {
        berth
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "returned idle instance memory to the kernel")
            .collect::<Vec<_>>()
    };
    burst();
    let first = berth
        .wait_for_log(Duration::from_secs(30), |l| {
            l["message"] == "returned idle instance memory to the kernel"
        })
        .expect("a release after the quiet spell");
    assert!(
        first["bytes"].as_u64().is_some_and(|b| b > 0),
        "warm slots held memory: {first}"
    );
    // Once per spell: quiet for longer, still one line.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(releases().len(), 1);
    assert_eq!(get(&berth.url("/hello")).status, 200);
    assert_eq!(get(&berth.url("/p3")).body, "hello from p3\n");
    burst();
    let deadline = Instant::now() + Duration::from_secs(30);
    while releases().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(releases().len(), 2, "released again after the next burst");
}
