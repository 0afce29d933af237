//! A circuit breaker per upstream: it opens after consecutive failures,
//! fails calls fast while open, lets a few probes through once the
//! cool-down is over, and closes on a successful probe.
//!
//! Written here rather than taken from a crate: the state machine is a few
//! lines, and the crates on offer either tie it to a tower stack that does
//! not fit the wasi-http hook or have gone unmaintained.

use std::sync::Mutex;
use std::time::Instant;

use prometheus::IntGauge;

use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probes: u32 },
}

/// The breaker of one upstream.
pub(super) struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<State>,
    gauge: IntGauge,
}

/// A call admitted by the breaker; report how it went with
/// [`Admission::record`]. Dropping it unreported counts as a failure: a
/// call whose future is dropped (the module's timeout tore the instance
/// down mid-call) must still release its probe slot, or a half-open
/// breaker would refuse every call after it for good.
#[must_use]
pub(super) struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Admission<'_> {
    /// Reports the outcome of the admitted call.
    pub(super) fn record(mut self, success: bool) {
        self.recorded = true;
        self.breaker.record(self.probe, success);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.record(self.probe, false);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub(super) fn new(cfg: BreakerConfig, gauge: IntGauge) -> Self {
        gauge.set(0);
        Breaker {
            cfg,
            state: Mutex::new(State::Closed { failures: 0 }),
            gauge,
        }
    }

    /// Whether a call may go out now.
    pub(super) fn admit(&self) -> Option<Admission<'_>> {
        let admitted = |probe| {
            Some(Admission {
                breaker: self,
                probe,
                recorded: false,
            })
        };
        if self.cfg.failures == 0 {
            return admitted(false);
        }
        let mut state = self.state.lock().unwrap();
        match *state {
            State::Closed { .. } => admitted(false),
            State::Open { until } if Instant::now() < until => None,
            State::Open { .. } => {
                self.set(&mut state, State::HalfOpen { probes: 1 });
                admitted(true)
            }
            State::HalfOpen { probes } if probes < self.cfg.half_open_probes => {
                *state = State::HalfOpen { probes: probes + 1 };
                admitted(true)
            }
            State::HalfOpen { .. } => None,
        }
    }

    fn record(&self, probe: bool, success: bool) {
        if self.cfg.failures == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap();
        let open = State::Open {
            until: Instant::now() + self.cfg.open_for,
        };
        match (*state, success) {
            (State::Closed { .. }, true) => *state = State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 >= self.cfg.failures => {
                self.set(&mut state, open)
            }
            (State::Closed { failures }, false) => {
                *state = State::Closed {
                    failures: failures + 1,
                }
            }
            (State::HalfOpen { .. }, true) if probe => {
                self.set(&mut state, State::Closed { failures: 0 })
            }
            (State::HalfOpen { .. }, false) if probe => self.set(&mut state, open),
            // A call admitted before the circuit opened: its news is stale.
            _ => {}
        }
    }

    fn set(&self, state: &mut State, new: State) {
        *state = new;
        self.gauge.set(match new {
            State::Closed { .. } => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(failures: u32, open_for: Duration) -> Breaker {
        Breaker::new(
            BreakerConfig {
                failures,
                open_for,
                half_open_probes: 1,
            },
            IntGauge::new("g", "g").unwrap(),
        )
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers() {
        let b = breaker(3, Duration::from_millis(30));
        for _ in 0..2 {
            let a = b.admit().unwrap();
            a.record(false);
        }
        // A success resets the count.
        let a = b.admit().unwrap();
        a.record(true);
        for _ in 0..3 {
            let a = b.admit().unwrap();
            a.record(false);
        }
        assert!(b.admit().is_none(), "open after 3 failures");
        assert_eq!(b.gauge.get(), 2);
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit().expect("half-open lets a probe through");
        assert!(b.admit().is_none(), "only one probe at a time");
        assert_eq!(b.gauge.get(), 1);
        probe.record(true);
        assert_eq!(b.gauge.get(), 0);
        assert!(b.admit().is_some());
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = breaker(1, Duration::from_millis(20));
        let a = b.admit().unwrap();
        a.record(false);
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.admit().unwrap();
        probe.record(false);
        assert!(b.admit().is_none());
    }

    #[test]
    fn a_dropped_probe_counts_as_a_failure_and_frees_the_half_open_slot() {
        let b = breaker(1, Duration::from_millis(20));
        b.admit().unwrap().record(false);
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.admit().expect("half-open");
        // The call's future is dropped mid-flight (module timeout).
        drop(probe);
        assert_eq!(b.gauge.get(), 2, "a lost probe reopens the circuit");
        assert!(b.admit().is_none());
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.admit().expect("a new probe after the cool-down");
        probe.record(true);
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn a_half_open_circuit_lets_through_as_many_probes_as_configured() {
        let b = Breaker::new(
            BreakerConfig {
                failures: 1,
                open_for: Duration::from_millis(20),
                half_open_probes: 3,
            },
            IntGauge::new("g", "g").unwrap(),
        );
        b.admit().unwrap().record(false);
        std::thread::sleep(Duration::from_millis(30));
        let probes: Vec<_> = (0..3)
            .map(|i| b.admit().unwrap_or_else(|| panic!("probe {i} of 3")))
            .collect();
        assert!(b.admit().is_none(), "a fourth probe while three are out");
        assert!(probes.iter().all(|p| p.probe));
        let mut probes = probes.into_iter();
        probes.next().unwrap().record(true);
        assert_eq!(b.gauge.get(), 0, "one good probe closes the circuit");
        // The other two, reporting late, are stale news for a closed circuit.
        for p in probes {
            p.record(true);
        }
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn a_call_admitted_before_the_circuit_opened_cannot_close_or_reopen_it() {
        let b = breaker(2, Duration::from_millis(20));
        let early_ok = b.admit().unwrap();
        let early_fail = b.admit().unwrap();
        b.admit().unwrap().record(false);
        b.admit().unwrap().record(false);
        assert_eq!(b.gauge.get(), 2, "open");
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.admit().expect("half-open");
        assert_eq!(b.gauge.get(), 1);
        // Calls from before the circuit opened report while the probe is out.
        early_ok.record(true);
        assert_eq!(b.gauge.get(), 1, "a stale success closed the circuit");
        early_fail.record(false);
        assert_eq!(b.gauge.get(), 1, "a stale failure reopened the circuit");
        probe.record(true);
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn zero_failures_disables_it() {
        let b = breaker(0, Duration::from_secs(1));
        for _ in 0..10 {
            let a = b.admit().unwrap();
            a.record(false);
        }
        assert!(b.admit().is_some());
    }
}
