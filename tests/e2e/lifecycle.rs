//! Pod lifecycle: graceful shutdown on SIGTERM.

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

    for handle in slow {
        let r = handle.join().unwrap();
        assert_eq!(r.status, 200, "an in-flight request was cut: {}", r.body);
        assert_eq!(r.body, "slept\n");
    }
    let status = berth
        .wait_exit(Duration::from_secs(1 + 10 + 5))
        .expect("berth did not exit within drain_delay + grace_period + margin");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(berth.log_text().contains("shutdown complete"));
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
