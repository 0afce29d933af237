//! Canary releases: a real berth splits a module's traffic between two
//! real versions under real load, judges each step, and promotes or rolls
//! back. v1 (`swap_v1`) answers `v1`; v2 (`swap_v2`) answers `v2`, or
//! fails or dawdles as its config says.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::{self, Berth, admin_post, get, get_with, metric, wasm};

/// A module `shop` on `/shop`: v1 stable, v2 as its canary.
fn config(canary: &str, module_extra: &str) -> String {
    format!(
        "[runtime]\ncache_dir = \"\"\n\n[modules.shop]\nfile = {:?}\nroute = \"/shop\"\n{module_extra}\n\n\
         [modules.shop.canary]\nfile = {:?}\n{canary}\n",
        wasm("swap_v1").display().to_string(),
        wasm("swap_v2").display().to_string(),
    )
}

/// `text` with its outcomes kept in `cache` and no file watching (the
/// tests reload by hand).
fn kept_in(cache: &std::path::Path, text: String) -> String {
    text.replace(
        "cache_dir = \"\"",
        &format!(
            "cache_dir = {:?}\nwatch = false",
            cache.display().to_string()
        ),
    )
}

/// One answer the load saw: when (Unix ms), its status and body.
#[derive(Clone, Debug)]
struct Seen {
    at_ms: u64,
    status: u16,
    body: String,
}

/// Clients sending `GET /shop` back to back, recording every answer.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Traffic {
    fn start(berth: &Berth, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, seen, url) = (stop.clone(), seen.clone(), berth.url("/shop"));
                std::thread::spawn(move || {
                    // Bounded whatever the test does.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let r = get(&url);
                        seen.lock().unwrap().push(Seen {
                            at_ms: now_ms(),
                            status: r.status,
                            body: r.body.trim().to_owned(),
                        });
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            threads,
            seen,
        }
    }

    fn finish(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        std::mem::take(&mut self.seen.lock().unwrap())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn canary_info(berth: &Berth) -> Value {
    let info = get(&berth.admin_url("/info")).json();
    info["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "shop")
        .unwrap_or_else(|| panic!("no module shop in {info}"))
        .clone()
}

/// Waits until the canary's state is `state`, returning the module's
/// `/info` entry.
fn wait_state(berth: &Berth, state: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let module = canary_info(berth);
        if module["canary"]["state"] == state {
            return module;
        }
        assert!(
            Instant::now() < deadline,
            "the canary never got to {state}: {module:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn judgements(canary: &Value) -> Vec<Value> {
    canary["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| ["pass", "fail", "wait"].contains(&e["result"].as_str().unwrap()))
        .cloned()
        .collect()
}

fn sha256_of(name: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(wasm(name)).unwrap()))
}

/// How far (in points) the share of `n` requests drawn at `weight` % may
/// stray by chance: five standard deviations of the binomial, and at least
/// two points for the requests in flight as the weight changes.
fn tolerance(weight: f64, n: f64) -> f64 {
    let p = weight / 100.0;
    (5.0 * (p * (1.0 - p) / n).sqrt() * 100.0).max(2.0)
}

#[test]
fn a_healthy_canary_is_promoted_through_every_step_at_its_weights() {
    let berth = Berth::start(&config(
        "steps = [20, 50, 80]\ninterval = \"2s\"\nmin_requests = 50",
        "",
    ));
    let traffic = Traffic::start(&berth, 4);
    let module = wait_state(&berth, "promoted", Duration::from_secs(30));
    // A little traffic on the promoted version before stopping.
    std::thread::sleep(Duration::from_millis(500));
    let seen = traffic.finish();
    let after = now_ms();

    let failed: Vec<_> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");

    // The host's windows: each step's share close to its weight.
    let canary = &module["canary"];
    let steps = judgements(canary);
    assert_eq!(
        steps
            .iter()
            .map(|e| e["result"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["pass", "pass", "pass"],
        "{canary:#}"
    );
    for (entry, weight) in steps.iter().zip([20.0, 50.0, 80.0]) {
        let n = |t: &str| entry[t]["requests"].as_f64().unwrap();
        let (stable, canary) = (n("stable"), n("canary"));
        assert!(stable + canary >= 200.0, "too little traffic: {entry}");
        let share = 100.0 * canary / (stable + canary);
        assert!(
            (share - weight).abs() < tolerance(weight, stable + canary),
            "step at {weight}%: the canary served {share:.1}%: {entry}"
        );
        assert_eq!(entry["weight"].as_f64(), Some(weight));
    }
    // The clients' view of the same windows (the middle of each, away
    // from the moment the weight changes): v2's share tracks the weight.
    for pair in steps.windows(2) {
        let (from, to) = (
            pair[0]["at_ms"].as_u64().unwrap(),
            pair[1]["at_ms"].as_u64().unwrap(),
        );
        let margin = (to - from) / 10;
        let window: Vec<_> = seen
            .iter()
            .filter(|s| s.at_ms > from + margin && s.at_ms < to - margin)
            .collect();
        let v2 = window.iter().filter(|s| s.body == "v2").count() as f64;
        let share = 100.0 * v2 / window.len() as f64;
        let weight = pair[1]["weight"].as_f64().unwrap();
        assert!(
            window.len() > 100 && (share - weight).abs() < tolerance(weight, window.len() as f64),
            "clients saw {share:.1}% v2 over {} answers at weight {weight}",
            window.len()
        );
    }
    // Promoted: v2 is the stable version and serves everything.
    let promoted_at = canary["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["result"] == "promoted")
        .unwrap()["at_ms"]
        .as_u64()
        .unwrap();
    assert!(
        seen.iter()
            .filter(|s| s.at_ms > promoted_at + 100 && s.at_ms < after)
            .all(|s| s.body == "v2"),
        "v1 still answered after the promotion"
    );
    // Read again: the state says "promoted" (weight 100, every request
    // already v2's) a moment before the route's stable version is swapped.
    assert_eq!(canary_info(&berth)["sha256"], sha256_of("swap_v2"));
    assert_eq!(get(&berth.url("/shop")).body.trim(), "v2");
    // The config file now names v2 as the module's source, without the
    // canary; reloading it changes nothing that serves.
    let deadline = Instant::now() + Duration::from_secs(5);
    let written = loop {
        let text = std::fs::read_to_string(berth.config_path()).unwrap();
        if !text.contains("canary") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the config file still has the canary:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        written.contains(&wasm("swap_v2").display().to_string()),
        "{written}"
    );
    assert!(
        !written.contains(&wasm("swap_v1").display().to_string()),
        "{written}"
    );
    let report = admin_post(&berth.admin_url("/admin/reload")).json();
    assert_eq!(report["changed"], serde_json::json!([]), "{report}");
    assert_eq!(canary_info(&berth)["sha256"], sha256_of("swap_v2"));

    let page = berth.metrics();
    assert_eq!(
        metric(&page, "berth_canary_state", &[("module", "shop")]),
        Some(2.0)
    );
    assert_eq!(
        metric(&page, "berth_canary_weight", &[("module", "shop")]),
        Some(100.0)
    );
    assert_eq!(
        metric(
            &page,
            "berth_canary_judgements_total",
            &[("module", "shop"), ("result", "pass")]
        ),
        Some(3.0)
    );
    let v2 = &sha256_of("swap_v2")[..12];
    for track in ["stable", "canary"] {
        let served = metric(
            &page,
            "berth_http_server_requests_total",
            &[
                ("module", "shop"),
                ("version", v2),
                ("track", track),
                ("status", "200"),
            ],
        );
        assert!(
            served.unwrap_or(0.0) > 0.0,
            "no {track} series for v2:\n{page}"
        );
    }
    assert!(
        berth
            .log_lines()
            .iter()
            .any(|l| l["message"] == "canary advanced"
                && l["module"] == "shop"
                && l["from"] == 20
                && l["to"] == 50),
        "no log line for the step from 20% to 50%"
    );
}

#[test]
fn a_canary_that_fails_requests_is_rolled_back_after_its_first_step() {
    let berth = Berth::start(&config(
        "steps = [10, 50, 100]\ninterval = \"2s\"\nmin_requests = 20",
        "config = { fail_percent = \"30\" }",
    ));
    let started = Instant::now();
    let traffic = Traffic::start(&berth, 4);
    let module = wait_state(&berth, "rolled_back", Duration::from_secs(20));
    // Three more intervals of load on the rolled-back module.
    std::thread::sleep(Duration::from_secs(6));
    let seen = traffic.finish();
    let elapsed = started.elapsed().as_secs_f64();

    let canary = &module["canary"];
    let steps = judgements(canary);
    assert_eq!(steps.len(), 1, "judged more than once: {canary:#}");
    assert_eq!(steps[0]["result"], "fail");
    let reason = canary["reason"].as_str().unwrap();
    assert!(
        reason.contains("success rate") && reason.contains("99%"),
        "{reason}"
    );
    let rolled_back_at = canary["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["result"] == "rolled_back")
        .unwrap()["at_ms"]
        .as_u64()
        .unwrap();

    // After the rollback no request reaches v2.
    let late: Vec<_> = seen
        .iter()
        .filter(|s| s.at_ms > rolled_back_at + 100)
        .collect();
    assert!(late.len() > 100, "too little traffic after the rollback");
    assert!(
        late.iter().all(|s| s.status == 200 && s.body == "v1"),
        "v2 answered after the rollback"
    );
    // What the canary cost: at most its weight x one interval x the
    // request rate x its failure rate (with room for chance), however long
    // the load went on after.
    let failures = seen.iter().filter(|s| s.status == 500).count() as f64;
    let rate = seen.len() as f64 / elapsed;
    let bound = 0.10 * 2.0 * rate * 0.30 * 1.6 + 10.0;
    assert!(failures > 0.0, "v2 never failed: was it ever served?");
    assert!(
        failures <= bound,
        "{failures} failures, bound {bound:.0} (rate {rate:.0}/s)"
    );
    let page = berth.metrics();
    assert_eq!(
        metric(&page, "berth_canary_state", &[("module", "shop")]),
        Some(3.0)
    );
    assert_eq!(
        metric(&page, "berth_canary_weight", &[("module", "shop")]),
        Some(0.0)
    );
    assert_eq!(canary_info(&berth)["sha256"], sha256_of("swap_v1"));
    // The series of the canary's track stop growing.
    let canary_served = |page: &str| {
        metric(
            page,
            "berth_http_server_requests_total",
            &[("module", "shop"), ("track", "canary"), ("status", "500")],
        )
    };
    let before = canary_served(&page);
    for _ in 0..50 {
        assert_eq!(get(&berth.url("/shop")).body.trim(), "v1");
    }
    assert_eq!(canary_served(&berth.metrics()), before);
    assert!(berth.log_lines().iter().any(|l| {
        l["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("canary rolled back")
    }));
}

#[test]
fn a_slow_canary_is_rolled_back_for_latency() {
    let berth = Berth::start(&config(
        "steps = [30, 100]\ninterval = \"2s\"\nmin_requests = 5\nmax_p99 = \"100ms\"",
        "config = { delay_ms = \"150\" }",
    ));
    let traffic = Traffic::start(&berth, 4);
    let module = wait_state(&berth, "rolled_back", Duration::from_secs(20));
    let seen = traffic.finish();
    assert!(seen.iter().all(|s| s.status == 200), "a request failed");
    let canary = &module["canary"];
    let reason = canary["reason"].as_str().unwrap();
    assert!(
        reason.contains("p99 latency") && reason.contains("max_p99 100.0ms"),
        "{reason}"
    );
    let step = &judgements(canary)[0];
    assert_eq!(step["canary"]["errors"], 0);
    assert!(step["canary"]["p99_ms"].as_f64().unwrap() > 100.0, "{step}");
    assert!(step["stable"]["p99_ms"].as_f64().unwrap() < 100.0, "{step}");
}

#[test]
fn a_canary_with_too_few_requests_waits_and_is_not_promoted() {
    let berth = Berth::start(&config(
        "steps = [50]\ninterval = \"500ms\"\nmin_requests = 1000",
        "",
    ));
    for _ in 0..20 {
        assert_eq!(get(&berth.url("/shop")).status, 200);
    }
    std::thread::sleep(Duration::from_secs(2));
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(canary["state"], "progressing", "{canary:#}");
    assert_eq!(canary["weight"], 50);
    let steps = judgements(&canary);
    assert!(steps.len() >= 2, "{canary:#}");
    assert!(steps.iter().all(|e| e["result"] == "wait"), "{canary:#}");
    assert!(
        steps[0]["reason"].as_str().unwrap().contains("1000 needed"),
        "{canary:#}"
    );
    let page = berth.metrics();
    assert!(
        metric(
            &page,
            "berth_canary_judgements_total",
            &[("module", "shop"), ("result", "wait")]
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(canary_info(&berth)["sha256"], sha256_of("swap_v1"));
}

#[test]
fn a_sticky_key_always_sees_one_version_and_keys_split_by_the_weight() {
    let berth = Berth::start(&config(
        "steps = [50, 100]\ninterval = \"1h\"\nsticky = { header = \"x-user\" }",
        "",
    ));
    let keys: Vec<String> = (0..60).map(|k| format!("user-{k}")).collect();
    let seen = versions_of(&berth, &keys, "x-user", &|k| k.to_owned());
    let on_canary = seen.iter().filter(|v| *v == "v2").count();
    // 60 keys at 50%: 30 expected; 12 to 48 is more than four sigma.
    assert!(
        (12..=48).contains(&on_canary),
        "{on_canary} of 60 keys on the canary at 50%"
    );
    // Without the key, requests are split at random.
    let v2 = (0..200)
        .filter(|_| get(&berth.url("/shop")).body.trim() == "v2")
        .count();
    assert!(
        (50..=150).contains(&v2),
        "{v2} of 200 unkeyed requests on v2"
    );
}

/// The version each of `keys` sees (five requests each, which must agree),
/// keyed by `header`.
fn versions_of(
    berth: &Berth,
    keys: &[String],
    header: &str,
    value: &dyn Fn(&str) -> String,
) -> Vec<String> {
    keys.iter()
        .map(|key| {
            let v = value(key);
            let bodies: Vec<String> = (0..5)
                .map(|_| {
                    get_with(&berth.url("/shop"), &[(header, &v)])
                        .body
                        .trim()
                        .to_owned()
                })
                .collect();
            assert!(
                bodies.iter().all(|b| b == &bodies[0]),
                "{key} saw both versions: {bodies:?}"
            );
            bodies[0].clone()
        })
        .collect()
}

/// At 10 %, then at 60 % after a real step up: keys split by the weight
/// (a hash that ignored it would put half on the canary at 10 %), and a
/// key on the canary stays there when its share grows.
#[test]
fn sticky_keys_split_by_the_weight_and_stay_on_the_canary_as_it_grows() {
    let berth = Berth::start(&config(
        "steps = [10, 60]\ninterval = \"2s\"\nmin_requests = 1\nsticky = { header = \"x-user\" }",
        "",
    ));
    let url = |action: &str| berth.admin_url(&format!("/admin/canary/shop/{action}"));
    assert_eq!(admin_post(&url("pause")).status, 200);
    assert_eq!(canary_info(&berth)["canary"]["weight"], 10);
    let keys: Vec<String> = (0..200).map(|k| format!("user-{k}")).collect();
    let plain = |k: &str| k.to_owned();
    let at10 = versions_of(&berth, &keys, "x-user", &plain);
    let on = |seen: &[String]| seen.iter().filter(|v| *v == "v2").count() as f64;
    let share = on(&at10) / keys.len() as f64 * 100.0;
    assert!(
        (share - 10.0).abs() <= tolerance(10.0, keys.len() as f64),
        "{share:.1} % of keys on the canary at 10 %"
    );
    // Step up through a passing window, and hold at 60 %.
    assert_eq!(admin_post(&url("resume")).status, 200);
    let traffic = Traffic::start(&berth, 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while canary_info(&berth)["canary"]["weight"] != 60 {
        assert!(Instant::now() < deadline, "never stepped up to 60 %");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(admin_post(&url("pause")).status, 200);
    traffic.finish();
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(
        (&canary["weight"], &canary["state"]),
        (&60.into(), &"paused".into()),
        "{canary:#}"
    );
    let at60 = versions_of(&berth, &keys, "x-user", &plain);
    for (key, (before, after)) in keys.iter().zip(at10.iter().zip(&at60)) {
        assert!(
            before != "v2" || after == "v2",
            "{key} left the canary when it grew"
        );
    }
    let share = on(&at60) / keys.len() as f64 * 100.0;
    assert!(
        (share - 60.0).abs() <= tolerance(60.0, keys.len() as f64),
        "{share:.1} % of keys on the canary at 60 %"
    );
}

#[test]
fn a_sticky_cookie_keeps_a_client_on_one_version() {
    let berth = Berth::start(&config(
        "steps = [10, 50]\ninterval = \"1h\"\nsticky = { cookie = \"uid\" }",
        "",
    ));
    let keys: Vec<String> = (0..200).map(|k| format!("user-{k}")).collect();
    // Among other cookies, as a browser sends them.
    let seen = versions_of(&berth, &keys, "cookie", &|k| {
        format!("theme=dark; uid={k}; lang=en")
    });
    let share = seen.iter().filter(|v| *v == "v2").count() as f64 / 2.0;
    assert!(
        (share - 10.0).abs() <= tolerance(10.0, 200.0),
        "{share:.1} % of cookies on the canary at 10 %"
    );
}

#[test]
fn operators_promote_abort_pause_and_resume_from_the_admin_port() {
    // No file watching: the reload below is the admin's, and its report
    // says what started.
    let quiet = |text: String| text.replace("[runtime]\n", "[runtime]\nwatch = false\n");
    let berth = Berth::start(&quiet(config("steps = [10, 50]\ninterval = \"1h\"", "")));
    let url = |action: &str| berth.admin_url(&format!("/admin/canary/shop/{action}"));
    // The token is required.
    assert_eq!(
        support::post_authorized(&url("promote"), "Bearer wrong").status,
        401
    );
    assert_eq!(canary_info(&berth)["canary"]["state"], "progressing");
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/nope/abort")).status,
        404
    );
    assert_eq!(admin_post(&url("rollback")).status, 404);

    let paused = admin_post(&url("pause"));
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["state"], "paused");
    assert_eq!(admin_post(&url("pause")).status, 409);
    assert_eq!(admin_post(&url("resume")).json()["state"], "progressing");

    let aborted = admin_post(&url("abort"));
    assert_eq!(aborted.status, 200, "{}", aborted.body);
    assert_eq!(aborted.json()["reason"], "aborted by an operator");
    for _ in 0..40 {
        assert_eq!(get(&berth.url("/shop")).body.trim(), "v1");
    }
    let again = admin_post(&url("promote"));
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(
        again
            .body
            .contains("already rolled_back: promote does not apply"),
        "{}",
        again.body
    );

    // A reload that names a new canary starts it; promote it by hand.
    let config = quiet(config("steps = [10, 50]\ninterval = \"1h\"", "")).replace(
        &wasm("swap_v2").display().to_string(),
        &wasm("plain_hello").display().to_string(),
    );
    std::fs::write(berth.config_path(), config).unwrap();
    let report = admin_post(&berth.admin_url("/admin/reload")).json();
    assert_eq!(
        report["canaries_started"],
        serde_json::json!(["shop"]),
        "{report}"
    );
    assert_eq!(canary_info(&berth)["canary"]["weight"], 10);
    let promoted = admin_post(&url("promote"));
    assert_eq!(promoted.status, 200, "{}", promoted.body);
    let module = wait_state(&berth, "promoted", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while canary_info(&berth)["sha256"] != sha256_of("plain_hello") {
        assert!(Instant::now() < deadline, "never swapped in: {module:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..20 {
        assert_ne!(get(&berth.url("/shop")).body.trim(), "v1");
    }
    assert!(
        berth
            .log_lines()
            .iter()
            .any(|l| l["message"] == "canary action requested on the admin port")
    );
}

/// A paused canary is not judged however much traffic it serves, and the
/// first window after a resume holds only requests made after it.
#[test]
fn a_paused_canary_holds_and_a_resumed_one_judges_only_new_requests() {
    let berth = Berth::start(&config(
        "steps = [10, 50]\ninterval = \"500ms\"\nmin_requests = 1",
        "",
    ));
    let url = |action: &str| berth.admin_url(&format!("/admin/canary/shop/{action}"));
    // No traffic yet: any window judged so far was a `wait` at 10 %.
    assert_eq!(admin_post(&url("pause")).status, 200);
    let held = canary_info(&berth)["canary"].clone();
    assert_eq!(held["weight"], 10, "{held:#}");
    let seen = Traffic::start(&berth, 2);
    std::thread::sleep(Duration::from_millis(1700));
    let served = seen.finish();
    assert!(
        served.iter().filter(|s| s.body == "v2").count() > 5,
        "the canary served while paused"
    );
    let canary = canary_info(&berth)["canary"].clone();
    for key in ["state", "step", "weight", "history"] {
        assert_eq!(
            canary[key], held[key],
            "{key} moved while paused: {canary:#}"
        );
    }

    // Resumed with no new traffic: the next window is empty, so it waits,
    // although the paused window had plenty of good canary answers.
    assert_eq!(admin_post(&url("resume")).status, 200);
    let before = judgements(&canary_info(&berth)["canary"]).len();
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = loop {
        let canary = canary_info(&berth)["canary"].clone();
        if let Some(next) = judgements(&canary).get(before) {
            break next.clone();
        }
        assert!(Instant::now() < deadline, "no judgement after resume");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(next["result"], "wait", "{next}");
    assert_eq!(canary_info(&berth)["canary"]["weight"], 10);
    // New requests after the resume count, and the canary moves on.
    let seen = Traffic::start(&berth, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while canary_info(&berth)["canary"]["weight"] == 10 {
        assert!(Instant::now() < deadline, "never stepped up after resume");
        std::thread::sleep(Duration::from_millis(20));
    }
    seen.finish();
}

#[test]
fn a_canary_that_cannot_load_fails_without_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("v2.wasm");
    std::fs::write(&broken, b"not wasm at all").unwrap();
    let config = config("", "").replace(
        &wasm("swap_v2").display().to_string(),
        &broken.display().to_string(),
    );
    let berth = Berth::start(&config);
    for _ in 0..20 {
        let r = get(&berth.url("/shop"));
        assert_eq!((r.status, r.body.trim()), (200, "v1"));
    }
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(canary["state"], "failed_to_load", "{canary:#}");
    let error = canary["error"].as_str().unwrap();
    assert!(
        error.contains("v2.wasm") && error.contains("not a WebAssembly file"),
        "{error}"
    );
    let page = berth.metrics();
    assert_eq!(
        metric(&page, "berth_canary_state", &[("module", "shop")]),
        Some(3.0)
    );
    // A reload reports it under the canary's key, and nothing else.
    let report = admin_post(&berth.admin_url("/admin/reload"));
    assert_eq!(report.status, 422);
    assert!(
        report.json()["errors"]["shop.canary"].is_string(),
        "{}",
        report.body
    );
}

/// Sends SIGTERM to berth.
fn terminate(berth: &Berth) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &berth.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sigterm_mid_canary_drains_both_versions() {
    let mut berth = Berth::start(&format!(
        "[shutdown]\ndrain_delay = \"0s\"\ngrace_period = \"10s\"\n\n{}",
        config(
            "steps = [50]\ninterval = \"1h\"\nsticky = { header = \"x-user\" }",
            ""
        )
    ));
    // Find a key for each version.
    let mut keys = std::collections::BTreeMap::new();
    for k in 0..200 {
        let key = format!("k{k}");
        let body = get_with(&berth.url("/shop"), &[("x-user", &key)])
            .body
            .trim()
            .to_owned();
        keys.entry(body).or_insert(key);
        if keys.len() == 2 {
            break;
        }
    }
    assert_eq!(keys.len(), 2, "one version only: {keys:?}");
    let slow: Vec<_> = keys
        .values()
        .map(|key| {
            let (url, key) = (berth.url("/shop?ms=1500"), key.clone());
            std::thread::spawn(move || get_with(&url, &[("x-user", &key)]))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    terminate(&berth);
    let mut bodies: Vec<String> = slow
        .into_iter()
        .map(|t| {
            let r = t.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            r.body.trim().to_owned()
        })
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["v1", "v2"]);
    let status = berth
        .wait_exit(Duration::from_secs(15))
        .expect("berth did not exit");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_restart_keeps_a_rollback_and_restarts_a_running_canary_at_step_zero() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let write = |canary: &str, extra: &str| {
        let text = config(canary, extra).replace(
            "cache_dir = \"\"",
            &format!("cache_dir = {:?}", cache.path().display().to_string()),
        );
        std::fs::write(&path, text).unwrap();
    };
    let run = || support::Berth::start_at(&path);

    // Running at step 1 (50%), then restarted: back at step 0 (10%).
    write("steps = [10, 50]\ninterval = \"1s\"\nmin_requests = 1", "");
    let berth = run();
    let traffic = Traffic::start(&berth, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while canary_info(&berth)["canary"]["weight"] != 50 {
        assert!(Instant::now() < deadline, "never reached step 1");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Hold it there: a long interval would restart it, so pause instead.
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/pause")).status,
        200
    );
    traffic.finish();
    drop(berth);
    let berth = run();
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(
        (canary["step"].as_u64(), canary["weight"].as_u64()),
        (Some(0), Some(10)),
        "{canary:#}"
    );

    // Rolled back, then restarted: it stays rolled back, v1 serves alone.
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/abort")).status,
        200
    );
    wait_state(&berth, "rolled_back", Duration::from_secs(5));
    // The outcome is written when the table is swapped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_dir(cache.path().join("canaries")).is_ok_and(|mut d| d.next().is_some()) {
        assert!(Instant::now() < deadline, "the outcome was never written");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(berth);
    let berth = run();
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(canary["state"], "rolled_back", "{canary:#}");
    assert_eq!(canary["reason"], "aborted by an operator");
    for _ in 0..40 {
        assert_eq!(get(&berth.url("/shop")).body.trim(), "v1");
    }
    assert!(
        berth
            .log_lines()
            .iter()
            .any(|l| l["message"] == "canary ended before this start: not run again")
    );
}

/// Waits until every one of 20 answers of `/shop` is `want`.
fn wait_serving(berth: &Berth, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answers: Vec<String> = (0..20)
            .map(|_| get(&berth.url("/shop")).body.trim().to_owned())
            .collect();
        if answers.iter().all(|a| a == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never served only {want}: {answers:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_promotion_writes_back_only_the_version_that_was_judged() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let text = kept_in(
        cache.path(),
        config("steps = [10, 50]\ninterval = \"1h\"", ""),
    );
    std::fs::write(&path, &text).unwrap();
    let berth = Berth::start_at(&path);
    assert_eq!(canary_info(&berth)["canary"]["state"], "progressing");

    // The operator starts v3 (plain_hello) and leaves a mistake elsewhere
    // (good TOML, a bad value), so that this file does not load; then v2
    // is promoted.
    let edited = text.replace(
        &wasm("swap_v2").display().to_string(),
        &wasm("plain_hello").display().to_string(),
    ) + "\n[log]\naccess_log = \"maybe\"\n";
    std::fs::write(&path, &edited).unwrap();
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/promote")).status,
        200
    );
    wait_state(&berth, "promoted", Duration::from_secs(5));
    wait_serving(&berth, "v2");
    assert!(
        berth
            .wait_for_log(Duration::from_secs(5), |l| l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("config file left as it is")))
            .is_some(),
        "no line says why the file was left"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        edited,
        "the operator's edit was overwritten"
    );

    // With the typo fixed, v3 is a new canary: judged from its first step,
    // never served whole.
    std::fs::write(
        &path,
        edited.replace("access_log = \"maybe\"", "access_log = true"),
    )
    .unwrap();
    let report = admin_post(&berth.admin_url("/admin/reload")).json();
    assert_eq!(
        report["canaries_started"],
        serde_json::json!(["shop"]),
        "{report}"
    );
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(
        (canary["state"].as_str(), canary["weight"].as_u64()),
        (Some("progressing"), Some(10)),
        "{canary:#}"
    );

    // An edit that loads but names another canary (made inside the
    // watcher's debounce, say), then v3 is promoted: the edit stays.
    let fixed = std::fs::read_to_string(&path).unwrap();
    let next = fixed.replace(
        &wasm("plain_hello").display().to_string(),
        &wasm("hello").display().to_string(),
    );
    assert_ne!(next, fixed);
    std::fs::write(&path, &next).unwrap();
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/promote")).status,
        200
    );
    wait_state(&berth, "promoted", Duration::from_secs(5));
    assert!(
        berth
            .wait_for_log(Duration::from_secs(5), |l| l["why"]
                == "its canary is no longer the version that was judged")
            .is_some(),
        "no line says why the file was left"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), next);
}

#[test]
fn a_rolled_back_file_rebuilt_in_place_is_a_new_canary() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let next = dir.path().join("next.wasm");
    std::fs::copy(wasm("swap_v2"), &next).unwrap();
    let path = dir.path().join("berth.toml");
    let text = kept_in(
        cache.path(),
        config("steps = [10, 50]\ninterval = \"1h\"", "").replace(
            &wasm("swap_v2").display().to_string(),
            &next.display().to_string(),
        ),
    );
    std::fs::write(&path, &text).unwrap();
    let berth = Berth::start_at(&path);
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/abort")).status,
        200
    );
    wait_state(&berth, "rolled_back", Duration::from_secs(5));
    wait_serving(&berth, "v1");
    // The status page keeps the ended canary, with why and when.
    let page = get(&berth.admin_url("/")).body;
    let canaries = page.split("<h2>Canaries</h2>").nth(1).unwrap_or_default();
    for shown in ["shop", "rolled_back", "aborted by an operator", "next.wasm"] {
        assert!(
            canaries.contains(shown),
            "no {shown} in the Canaries section: {page}"
        );
    }
    assert!(canaries.contains(&this_year()), "no end time in {canaries}");
    // The same name, new bytes: a reload judges them.
    std::fs::copy(wasm("plain_hello"), &next).unwrap();
    let report = admin_post(&berth.admin_url("/admin/reload")).json();
    assert_eq!(
        report["canaries_started"],
        serde_json::json!(["shop"]),
        "{report}"
    );
    assert_eq!(canary_info(&berth)["canary"]["state"], "progressing");
    assert_eq!(
        canary_info(&berth)["canary"]["sha256"],
        sha256_of("plain_hello")
    );

    // And across a restart with new content, the same.
    admin_post(&berth.admin_url("/admin/canary/shop/abort"));
    wait_state(&berth, "rolled_back", Duration::from_secs(5));
    drop(berth);
    std::fs::copy(wasm("swap_v2"), &next).unwrap();
    let berth = Berth::start_at(&path);
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(canary["state"], "progressing", "{canary:#}");
    assert_eq!(canary["weight"], 10, "{canary:#}");
}

#[test]
fn an_outcome_survives_a_configmap_update_and_a_restart() {
    // The kubelet's layout: berth.toml -> ..data/berth.toml, ..data ->
    // ..<timestamp>/, and every update writes a new timestamped folder and
    // swaps the link.
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = kept_in(
        cache.path(),
        config("steps = [10, 50]\ninterval = \"1h\"", ""),
    );
    let publish = |stamp: &str, text: &str| {
        let folder = dir.path().join(stamp);
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("berth.toml"), text).unwrap();
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(stamp, &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
    };
    publish("..2026_12_05_01", &text);
    let path = dir.path().join("berth.toml");
    std::os::unix::fs::symlink("..data/berth.toml", &path).unwrap();

    let berth = Berth::start_at(&path);
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/promote")).status,
        200
    );
    wait_state(&berth, "promoted", Duration::from_secs(5));
    wait_serving(&berth, "v2");
    drop(berth);

    // An unrelated update (a comment), then a restart.
    publish(
        "..2026_12_05_02",
        &format!("# another replica count\n{text}"),
    );
    let berth = Berth::start_at(&path);
    let canary = canary_info(&berth)["canary"].clone();
    assert_eq!(canary["state"], "promoted", "{canary:#}");
    wait_serving(&berth, "v2");
}

#[test]
fn shedding_a_saturated_canary_is_not_held_against_it() {
    // v2 takes 300 ms and may run one request at a time: six clients on
    // it at once are mostly shed. Shedding is the host protecting it, and
    // a client must not be able to force a rollback that way.
    let berth = Berth::start(&config(
        "steps = [100]\ninterval = \"2s\"\nmin_requests = 1",
        "config = { delay_ms = \"300\" }\nlimits = { max_concurrency = 1 }",
    ));
    let traffic = Traffic::start(&berth, 6);
    let module = wait_state(&berth, "promoted", Duration::from_secs(15));
    let seen = traffic.finish();
    assert!(
        seen.iter().any(|s| s.status == 503),
        "nothing was shed: the test proves nothing"
    );
    let judged = judgements(&module["canary"]);
    let refused: u64 = judged
        .iter()
        .filter_map(|e| e["canary"]["refused"].as_u64())
        .sum();
    assert!(refused > 0, "{module:#}");
    assert!(judged.iter().all(|e| e["result"] != "fail"), "{module:#}");
}

#[test]
fn a_cache_folder_refused_as_not_berths_keeps_no_canary_state_either() {
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("NOTES.txt"), b"mine").unwrap();
    let berth = Berth::start(&config("steps = [10, 50]\ninterval = \"1h\"", "").replace(
        "cache_dir = \"\"",
        &format!("cache_dir = {:?}", project.path().display().to_string()),
    ));
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/abort")).status,
        200
    );
    wait_state(&berth, "rolled_back", Duration::from_secs(5));
    wait_serving(&berth, "v1");
    let names: Vec<String> = std::fs::read_dir(project.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["NOTES.txt"], "berth wrote into a folder it refused");
    assert!(
        berth
            .log_lines()
            .iter()
            .any(|l| l["message"] == "compile cache disabled: cannot use its folder")
    );
}

/// This year and a dash, as the status page writes times (RFC 3339).
fn this_year() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..5].to_owned()
}

#[test]
fn a_canary_that_runs_over_its_deadline_is_judged_on_its_504s() {
    // Shed requests are not judged; a guest's own timeouts are.
    let berth = Berth::start(&config(
        "steps = [50]\ninterval = \"1s\"\nmin_requests = 1",
        "config = { delay_ms = \"400\" }\nlimits = { timeout = \"150ms\" }",
    ));
    let traffic = Traffic::start(&berth, 2);
    let module = wait_state(&berth, "rolled_back", Duration::from_secs(15));
    let seen = traffic.finish();
    assert!(seen.iter().any(|s| s.status == 504), "no timeout seen");
    assert!(
        module["canary"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("success rate")),
        "{module:#}"
    );
}

#[test]
fn a_canary_source_set_from_the_environment_is_never_written_into_the_file() {
    // The file names v2; the environment runs plain_hello instead, which is
    // the version judged and promoted. Copying the file's table would make
    // v2, never judged, the stable version.
    let text = config("steps = [10, 50]\ninterval = \"1h\"", "")
        .replace("[runtime]\n", "[runtime]\nwatch = false\n");
    let plain = wasm("plain_hello").display().to_string();
    let berth = Berth::start_with(&text, &[("BERTH_MODULES__SHOP__CANARY__FILE", &plain)]);
    assert_eq!(
        canary_info(&berth)["canary"]["sha256"],
        sha256_of("plain_hello")
    );
    let before = std::fs::read_to_string(berth.config_path()).unwrap();
    assert_eq!(
        admin_post(&berth.admin_url("/admin/canary/shop/promote")).status,
        200
    );
    wait_state(&berth, "promoted", Duration::from_secs(5));
    assert!(
        berth
            .wait_for_log(Duration::from_secs(5), |l| l["why"]
                == "its canary is no longer the version that was judged")
            .is_some(),
        "no line says why the file was left"
    );
    assert_eq!(
        std::fs::read_to_string(berth.config_path()).unwrap(),
        before
    );
}
