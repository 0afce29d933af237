//! Canary releases inside the process: a module's second version serves a
//! share of its requests, rising step by step, while each step's window of
//! both versions' figures is judged. A pass moves to the next step (and
//! after the last, promotes the canary); failures roll it back at once.
//!
//! A [`Canary`] is shared by the routing table (which asks it, per
//! request, which version serves: one atomic load and a random number or a
//! hash of the sticky key), the admin port (promote, abort, pause, resume,
//! and `/info`) and its run task ([`Canary::run`], started by the reloader).
//! Every transition happens under one lock in this type, so the timer and
//! an operator cannot both decide. What a finished canary leaves to do —
//! swapping the routing table — is the reloader's: it hears of it through
//! the channel given to [`Canary::new`]. The weight already sends all
//! traffic to the right version by then.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::config::{CanaryConfig, CanarySpec, Track};
use crate::metrics::Metrics;
use crate::runtime::{Module, version_label};

pub mod fleet;

/// Judgements kept for `/info`; a canary that waits for traffic for days
/// must not grow without bound.
const HISTORY: usize = 64;

/// Where a canary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Serving its step's weight; judged at the end of each interval.
    Progressing,
    /// Held at its weight by an operator; not judged.
    Paused,
    /// Became the stable version.
    Promoted,
    /// Taken out of traffic; the stable version serves everything.
    RolledBack,
}

impl State {
    /// The value of `berth_canary_state`.
    fn gauge(self) -> i64 {
        match self {
            State::Progressing => 0,
            State::Paused => 1,
            State::Promoted => 2,
            State::RolledBack => 3,
        }
    }

    /// The API's word for it (as `/info` shows it).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Progressing => "progressing",
            State::Paused => "paused",
            State::Promoted => "promoted",
            State::RolledBack => "rolled_back",
        }
    }

    /// Promoted or rolled back: nothing changes any more.
    pub fn is_final(self) -> bool {
        matches!(self, State::Promoted | State::RolledBack)
    }
}

/// What an operator may ask of a canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Make it the stable version now.
    Promote,
    /// Roll it back now.
    Abort,
    /// Hold the weight; stop judging.
    Pause,
    /// Judge again, from a fresh window.
    Resume,
}

impl Action {
    /// The action's name in the admin API's path.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Promote => "promote",
            Action::Abort => "abort",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "promote" => Action::Promote,
            "abort" => Action::Abort,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            _ => return Err(()),
        })
    }
}

/// Why an operator's action was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "the canary of module `{module}` is already {}: {} does not apply",
    state.as_str(),
    action.as_str()
)]
pub struct Refused {
    /// The module.
    pub module: String,
    /// Where the canary is.
    pub state: State,
    /// What was asked.
    pub action: Action,
}

/// One version's figures over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Requests answered.
    pub requests: u64,
    /// Of those, answered 5xx.
    pub errors: u64,
    /// Share of non-5xx answers, in percent (none without requests).
    pub success_rate: Option<f64>,
    /// 99th percentile latency until the response head, in milliseconds.
    pub p99_ms: Option<f64>,
    /// Requests the host refused before the version ran (shed at its
    /// concurrency limit): shown, never judged, so that a client cannot
    /// force a rollback by saturating a version.
    pub refused: u64,
}

impl Figures {
    /// Figures of these counts, with the success rate they give.
    pub fn of(requests: u64, errors: u64, p99_ms: Option<f64>, refused: u64) -> Figures {
        let errors = errors.min(requests);
        Figures {
            requests,
            errors,
            success_rate: (requests > 0)
                .then(|| 100.0 * (requests - errors) as f64 / requests as f64),
            p99_ms,
            refused,
        }
    }
}

/// A judgement, or an operator's action.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// The step (0-based) it applied to.
    pub step: usize,
    /// The canary's weight during that window, in percent.
    pub weight: u8,
    /// `pass`, `fail`, `wait`, `promoted`, `rolled_back`, `paused` or
    /// `resumed`; with fleet analysis also `joined` (the fleet's step taken
    /// up), `followed` (a step the fleet reached first) and `unavailable`
    /// (Prometheus did not answer: the canary holds).
    pub result: &'static str,
    /// Why: the threshold missed, the measured values, or who acted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The stable version's figures in the window (judgements only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable: Option<Figures>,
    /// The canary's figures in the window (judgements only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Figures>,
    /// The wall-clock window judged, with fleet analysis: every replica's
    /// judgement of it saw the same figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<fleet::Window>,
}

/// What a canary looks like now, for `/info`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Where it is.
    pub state: State,
    /// The current step (0-based).
    pub step: usize,
    /// Every step's weight.
    pub steps: Vec<u8>,
    /// The canary's share of requests now, in percent.
    pub weight: u8,
    /// Where the canary's component comes from.
    pub source: String,
    /// Its sha256.
    pub sha256: String,
    /// Failed judgements in a row.
    pub failures: u32,
    /// Why it finished, when it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Both versions' figures in the window running now.
    pub window: WindowFigures,
    /// Judgements and actions, oldest first (the most recent 64).
    pub history: Vec<Entry>,
    /// Fleet analysis: where the figures come from and whether they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisView>,
}

/// What `/info` shows of a canary's fleet analysis.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisView {
    /// The Prometheus server asked.
    pub prometheus: String,
    /// `joining` (the fleet's record not read yet: no canary traffic
    /// here), `ok`, or `unavailable` (holding; rolls back after
    /// `rollback_after_unavailable`).
    pub status: &'static str,
    /// Why the last query failed, while it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when it fails (Unix milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable_since_ms: Option<u64>,
    /// The queries of a window (evaluated at its end) and of the record.
    pub queries: Vec<String>,
    /// The labels that name this canary in the fleet's record.
    pub record: BTreeMapLabels,
}

/// Label names and values, in order.
pub type BTreeMapLabels = std::collections::BTreeMap<&'static str, String>;

/// The figures of both versions in one window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WindowFigures {
    /// The stable version's.
    pub stable: Figures,
    /// The canary's.
    pub canary: Figures,
}

/// The outcome of judging one window.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every threshold held.
    Pass,
    /// A threshold was missed; says which, with the values.
    Fail(String),
    /// Too few requests to judge; says how many.
    Wait(String),
}

/// Judges a window: too few canary requests wait; then success rate, the
/// absolute p99 and the p99 against the stable version's.
pub fn judge(policy: &CanaryConfig, stable: &Figures, canary: &Figures) -> Verdict {
    if canary.requests < policy.min_requests {
        return Verdict::Wait(format!(
            "{} canary requests in the window, {} needed",
            canary.requests, policy.min_requests
        ));
    }
    let rate = canary.success_rate.unwrap_or(0.0);
    if rate < policy.min_success_rate {
        return Verdict::Fail(format!(
            "success rate {rate:.2}% is below {}% ({} of {} requests failed)",
            policy.min_success_rate, canary.errors, canary.requests
        ));
    }
    let p99 = canary.p99_ms.unwrap_or(0.0);
    if let Some(max) = policy.max_p99 {
        let max_ms = max.as_secs_f64() * 1e3;
        if p99 > max_ms {
            return Verdict::Fail(format!(
                "p99 latency {p99:.1}ms is over max_p99 {max_ms:.1}ms"
            ));
        }
    }
    if let Some(ratio) = policy.max_p99_ratio
        && stable.requests >= policy.min_requests
        && let Some(base) = stable.p99_ms
        && p99 > base * ratio
    {
        return Verdict::Fail(format!(
            "p99 latency {p99:.1}ms is over {ratio} x the stable version's {base:.1}ms"
        ));
    }
    Verdict::Pass
}

/// Upper bounds of the latency buckets, in seconds: 100 µs growing by a
/// fifth each, up to about a minute, so a p99 read from them is within 20 %.
fn bounds() -> &'static [f64] {
    static BOUNDS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        std::iter::successors(Some(1e-4), |b| Some(b * 1.2))
            .take_while(|b| *b < 60.0)
            .collect()
    })
}

/// One version's counts over the current window: atomic adds on the
/// request path, taken (and reset) when the window is judged.
struct Window {
    requests: AtomicU64,
    errors: AtomicU64,
    refused: AtomicU64,
    /// One slot per bound, and one past the last.
    buckets: Box<[AtomicU64]>,
}

impl Window {
    fn new() -> Self {
        Window {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            buckets: (0..=bounds().len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn record(&self, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = bounds().partition_point(|b| *b < secs);
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures so far; with `reset`, the window starts again.
    fn figures(&self, reset: bool) -> Figures {
        let read = |a: &AtomicU64| {
            if reset {
                a.swap(0, Ordering::Relaxed)
            } else {
                a.load(Ordering::Relaxed)
            }
        };
        let requests = read(&self.requests);
        let errors = read(&self.errors);
        let refused = read(&self.refused);
        let mut seen = 0;
        let cumulative: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .map(read)
            .zip(bounds().iter().copied().chain([f64::INFINITY]))
            .map(|(n, le)| {
                seen += n;
                (le, seen)
            })
            .collect();
        // Past the last bound (a minute) is past every threshold.
        let p99_ms =
            crate::metrics::quantile(&cumulative[..bounds().len()], seen, 0.99).map(|s| s * 1e3);
        Figures::of(requests, errors, p99_ms, refused)
    }
}

/// Where a canary stands; changed only under [`Canary`]'s lock.
struct Progress {
    state: State,
    step: usize,
    failures: u32,
    reason: Option<String>,
    history: VecDeque<Entry>,
    /// Fleet analysis: the fleet's record has been read once.
    joined: bool,
    /// Fleet analysis: since when (Unix ms, and as an instant) and why
    /// Prometheus fails to answer.
    unavailable: Option<(u64, std::time::Instant, String)>,
}

/// A module's canary: its version, its weight, its windows and its state.
pub struct Canary {
    /// The canary version.
    pub module: Arc<Module>,
    /// What it was started from.
    pub spec: CanarySpec,
    weight: AtomicU8,
    /// Keys the sticky hash, so which keys land on the canary differs from
    /// one canary to the next and cannot be worked out ahead of time.
    seed: std::hash::RandomState,
    /// Indexed by [`Track`]: stable, canary.
    windows: [Window; 2],
    progress: Mutex<Progress>,
    /// Wakes the run task when an operator changes the state.
    wake: Notify,
    metrics: Arc<Metrics>,
    finished: mpsc::UnboundedSender<Arc<Canary>>,
    /// Fleet-wide analysis, when the policy asks for it.
    fleet: Option<fleet::Fleet>,
}

impl Drop for Canary {
    /// A canary replaced or removed leaves no record series behind.
    fn drop(&mut self) {
        if let Some(fleet) = &self.fleet {
            let labels = fleet.identity().values();
            let _ = self.metrics.canary_fleet_state.remove_label_values(&labels);
            let _ = self.metrics.canary_fleet_step.remove_label_values(&labels);
        }
    }
}

impl Canary {
    /// A canary at its first step, against the stable version of digest
    /// `stable`. `finished` hears of it once it is promoted or rolled back.
    /// With fleet analysis it serves nothing until it has read the fleet's
    /// record, and then joins the fleet's step.
    pub fn new(
        module: Arc<Module>,
        spec: CanarySpec,
        stable: &str,
        metrics: Arc<Metrics>,
        finished: mpsc::UnboundedSender<Arc<Canary>>,
    ) -> Arc<Self> {
        let fleet = spec.policy.analysis.clone().map(|analysis| {
            let identity = fleet::Identity {
                module: module.name.to_string(),
                stable: version_label(stable).to_owned(),
                canary: version_label(&module.sha256).to_owned(),
                spec: spec.settings.clone(),
            };
            fleet::Fleet::new(analysis, spec.policy.interval, identity)
        });
        let first = if fleet.is_some() {
            0
        } else {
            spec.policy.steps[0]
        };
        let canary = Arc::new(Canary {
            module,
            weight: AtomicU8::new(first),
            seed: std::hash::RandomState::new(),
            windows: [Window::new(), Window::new()],
            progress: Mutex::new(Progress {
                state: State::Progressing,
                step: 0,
                failures: 0,
                reason: None,
                history: VecDeque::new(),
                joined: false,
                unavailable: None,
            }),
            wake: Notify::new(),
            metrics,
            finished,
            spec,
            fleet,
        });
        canary.publish(State::Progressing, first, 0);
        // A counter born at 1 shows Prometheus no increase; made at 0 up
        // front, the first judgement of each kind does.
        for result in ["pass", "fail", "wait"] {
            canary
                .metrics
                .canary_judgements
                .with_label_values(&[canary.name(), result]);
        }
        tracing::info!(
            module = canary.name(),
            sha256 = canary.module.sha256.as_str(),
            source = %canary.spec.module.source,
            steps = ?canary.spec.policy.steps,
            interval_ms = canary.spec.policy.interval.as_millis() as u64,
            weight = first,
            "canary started"
        );
        canary
    }

    /// A canary that failed to load: rolled back before it served.
    pub fn failed_to_load(module: &str, metrics: &Metrics, why: &str) {
        metrics.canary_weight.with_label_values(&[module]).set(0);
        metrics
            .canary_state
            .with_label_values(&[module])
            .set(State::RolledBack.gauge());
        metrics
            .canary_judgements
            .with_label_values(&[module, "fail"])
            .inc();
        tracing::error!(
            module,
            error = why,
            "canary rolled back: it failed to load; the stable version keeps serving"
        );
    }

    fn name(&self) -> &str {
        &self.module.name
    }

    /// With fleet analysis, the `version` label of the stable version it
    /// is judged against (part of its identity in the fleet's record).
    pub fn judged_against(&self) -> Option<&str> {
        self.fleet.as_ref().map(|f| f.identity().stable.as_str())
    }

    /// The canary's share of requests now, in percent.
    pub fn weight(&self) -> u8 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Where it is now.
    pub fn state(&self) -> State {
        self.progress.lock().unwrap().state
    }

    /// Which version serves a request with these headers. Without a sticky
    /// key it is a fresh random draw against the weight; with one, a hash
    /// of the key, so a key stays on its version while the weight holds
    /// (and, as the weight rises, only moves from stable to canary).
    pub fn pick(&self, headers: &HeaderMap) -> Track {
        let weight = u64::from(self.weight.load(Ordering::Relaxed));
        if weight == 0 {
            return Track::Stable;
        }
        if weight >= 100 {
            return Track::Canary;
        }
        let roll = match self.sticky_key(headers) {
            Some(key) => self.seed.hash_one(key) % 10_000,
            None => fastrand::u64(0..10_000),
        };
        if roll < weight * 100 {
            Track::Canary
        } else {
            Track::Stable
        }
    }

    fn sticky_key<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        let sticky = self.spec.policy.sticky.as_ref()?;
        if let Some(name) = &sticky.header {
            return headers.get(name.as_str()).map(|v| v.as_bytes());
        }
        cookie(headers, sticky.cookie.as_deref()?)
    }

    /// Counts a finished request of `track` in the running window.
    pub fn record(&self, track: Track, status: u16, elapsed: Duration) {
        self.windows[track as usize].record(status, elapsed);
    }

    /// Counts a request the host refused before `track`'s version ran.
    pub fn refused(&self, track: Track) {
        self.windows[track as usize]
            .refused
            .fetch_add(1, Ordering::Relaxed);
    }

    /// What `/info` shows.
    pub fn snapshot(&self) -> Snapshot {
        let p = self.progress.lock().unwrap();
        Snapshot {
            state: p.state,
            step: p.step,
            steps: self.spec.policy.steps.clone(),
            weight: self.weight(),
            source: self.spec.module.source.to_string(),
            sha256: self.module.sha256.clone(),
            failures: p.failures,
            reason: p.reason.clone(),
            window: self.window(false),
            history: p.history.iter().cloned().collect(),
            analysis: self.fleet.as_ref().map(|fleet| {
                let id = fleet.identity();
                AnalysisView {
                    prometheus: fleet.analysis().prometheus.to_string(),
                    status: match (&p.unavailable, p.joined) {
                        (Some(_), _) => "unavailable",
                        (None, false) => "joining",
                        (None, true) => "ok",
                    },
                    error: p.unavailable.as_ref().map(|u| u.2.clone()),
                    unavailable_since_ms: p.unavailable.as_ref().map(|u| u.0),
                    queries: fleet
                        .window_queries()
                        .iter()
                        .chain(fleet.record_queries())
                        .cloned()
                        .collect(),
                    record: [
                        ("module", id.module.clone()),
                        ("stable", id.stable.clone()),
                        ("canary", id.canary.clone()),
                        ("spec", id.spec.clone()),
                    ]
                    .into(),
                }
            }),
        }
    }

    fn window(&self, reset: bool) -> WindowFigures {
        WindowFigures {
            stable: self.windows[Track::Stable as usize].figures(reset),
            canary: self.windows[Track::Canary as usize].figures(reset),
        }
    }

    /// Judges a window at the end of every interval until the canary is
    /// promoted or rolled back; holds while paused. Aborting the task
    /// (the module's canary is removed or replaced) stops it.
    pub async fn run(self: Arc<Self>) {
        if self.fleet.is_some() {
            return self.run_fleet().await;
        }
        loop {
            match self.state() {
                State::Progressing => {
                    tokio::select! {
                        _ = tokio::time::sleep(self.spec.policy.interval) => self.judge_window(),
                        // An operator acted: look at the state again.
                        _ = self.wake.notified() => {}
                    }
                }
                State::Paused => self.wake.notified().await,
                State::Promoted | State::RolledBack => return,
            }
        }
    }

    /// Judges the window that just ended and acts on the verdict.
    fn judge_window(self: &Arc<Self>) {
        let mut guard = self.progress.lock().unwrap();
        let p = &mut *guard;
        if p.state != State::Progressing {
            return;
        }
        let figures = self.window(true);
        self.conclude(p, figures, None);
    }

    /// Acts on the verdict of a window's figures: the next step, a
    /// promotion, a failure (and a rollback after `max_failures`), or a wait.
    fn conclude(
        self: &Arc<Self>,
        p: &mut Progress,
        figures: WindowFigures,
        window: Option<fleet::Window>,
    ) {
        let policy = &self.spec.policy;
        let weight = self.weight();
        let verdict = judge(policy, &figures.stable, &figures.canary);
        let (result, reason) = match &verdict {
            Verdict::Pass => ("pass", None),
            Verdict::Fail(why) => ("fail", Some(why.clone())),
            Verdict::Wait(why) => ("wait", Some(why.clone())),
        };
        self.metrics
            .canary_judgements
            .with_label_values(&[self.name(), result])
            .inc();
        push(
            &mut p.history,
            Entry {
                at_ms: now_ms(),
                step: p.step,
                weight,
                result,
                reason: reason.clone(),
                stable: Some(figures.stable),
                canary: Some(figures.canary),
                window,
            },
        );
        tracing::info!(
            module = self.name(),
            step = p.step,
            weight,
            result,
            reason = reason.as_deref(),
            canary_requests = figures.canary.requests,
            canary_errors = figures.canary.errors,
            canary_p99_ms = figures.canary.p99_ms,
            stable_requests = figures.stable.requests,
            stable_errors = figures.stable.errors,
            stable_p99_ms = figures.stable.p99_ms,
            "canary judged"
        );
        match verdict {
            Verdict::Wait(_) => {}
            Verdict::Pass => {
                p.failures = 0;
                p.step += 1;
                match policy.steps.get(p.step) {
                    Some(&next) => {
                        self.weight.store(next, Ordering::Relaxed);
                        self.publish(State::Progressing, next, p.step);
                        tracing::info!(
                            module = self.name(),
                            step = p.step,
                            from = weight,
                            to = next,
                            "canary advanced"
                        );
                    }
                    None => {
                        p.step -= 1;
                        self.finish(p, State::Promoted, "every step passed".into());
                    }
                }
            }
            Verdict::Fail(why) => {
                p.failures += 1;
                if p.failures >= policy.max_failures {
                    self.finish(p, State::RolledBack, why);
                }
            }
        }
    }

    /// The run task with fleet analysis: reads the fleet's record at once
    /// (to join it), then at every window's due time reads the record and
    /// judges the window on the fleet's figures. Paused, it still follows
    /// the fleet's outcome; it judges nothing.
    async fn run_fleet(self: Arc<Self>) {
        let Some(fleet) = &self.fleet else { return };
        let (interval, scrape) = (self.spec.policy.interval, fleet.analysis().scrape_interval);
        self.tick(fleet, None).await;
        let mut window = fleet::Window::judgeable(now_ms(), interval, scrape).next();
        loop {
            if self.state().is_final() {
                return;
            }
            let wait = Duration::from_millis(window.due_ms(scrape).saturating_sub(now_ms()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // An operator acted: look at the state again.
                _ = self.wake.notified() => continue,
            }
            self.tick(fleet, Some(window)).await;
            // Behind (slow answers): the latest window, not every one missed.
            let latest = fleet::Window::judgeable(now_ms(), interval, scrape);
            window = if latest.end_ms > window.end_ms {
                latest
            } else {
                window.next()
            };
        }
    }

    /// One look at the fleet: its record, then (progressing, and `window`
    /// given) the window's figures; every decision under the lock.
    async fn tick(self: &Arc<Self>, fleet: &fleet::Fleet, window: Option<fleet::Window>) {
        let record = fleet.record().await;
        let judged = match (&record, window) {
            (Ok(_), Some(w)) if self.state() == State::Progressing => Some(fleet.judge(w).await),
            _ => None,
        };
        let mut guard = self.progress.lock().unwrap();
        let p = &mut *guard;
        if p.state.is_final() {
            return;
        }
        // This replica's own share since the last look: what the fleet's
        // figures must at least show.
        let own = self.window(true);
        let record = match record {
            Ok(record) => record,
            Err(why) => return self.unavailable(p, why),
        };
        if record.state == Some(State::RolledBack.gauge()) {
            return self.finish(
                p,
                State::RolledBack,
                "rolled back by a replica of the fleet".into(),
            );
        }
        if record.state == Some(State::Promoted.gauge()) {
            return self.finish(
                p,
                State::Promoted,
                "promoted by a replica of the fleet".into(),
            );
        }
        let last = self.spec.policy.steps.len() - 1;
        let step = record.step.unwrap_or(0).min(last);
        if !p.joined || (step > p.step && p.state == State::Progressing) {
            let result = if p.joined { "followed" } else { "joined" };
            p.joined = true;
            p.step = p.step.max(step);
            p.failures = 0;
            let weight = self.spec.policy.steps[p.step];
            self.weight.store(weight, Ordering::Relaxed);
            self.transition(p, result, Some(format!("the fleet is at step {step}")));
            self.publish(p.state, weight, p.step);
        } else {
            // Re-exported each look: a record series removed by a replaced
            // canary of the same identity comes back.
            self.publish(p.state, self.weight(), p.step);
        }
        // Paused (or paused while the queries ran): no verdict applies.
        if p.state != State::Progressing {
            return self.available(p);
        }
        let judged = match judged {
            Some(Ok(judged)) => judged,
            Some(Err(why)) => return self.unavailable(p, why),
            None => return self.available(p),
        };
        let policy = &self.spec.policy;
        if judged.canary.requests == 0 && own.canary.requests >= policy.min_requests {
            // Labels that select no series (a typo, another scrape's
            // labels) would leave a bad canary waiting for data for ever.
            return self.unavailable(
                p,
                format!(
                    "the fleet's figures show no canary requests, though this replica served {} \
                     since its last look: do analysis.labels select this fleet's series?",
                    own.canary.requests
                ),
            );
        }
        if (policy.max_p99.is_some() || policy.max_p99_ratio.is_some())
            && judged.canary.requests > 0
            && judged.canary.p99_ms.is_none()
        {
            // A p99 threshold judged on no p99 would always pass.
            return self.unavailable(
                p,
                "no p99 for the canary: the latency histogram's buckets are not in Prometheus \
                 (dropped by a relabelling?)"
                    .into(),
            );
        }
        self.available(p);
        let figures = WindowFigures {
            stable: judged.stable,
            canary: judged.canary,
        };
        self.conclude(p, figures, Some(judged.window));
    }

    /// A look at the fleet that told all it had to: unavailable no more.
    fn available(&self, p: &mut Progress) {
        if let Some((since, _, _)) = p.unavailable.take() {
            tracing::info!(
                module = self.name(),
                unavailable_for_ms = now_ms().saturating_sub(since),
                "canary analysis available again"
            );
        }
    }

    /// Prometheus did not answer: hold (no step, no verdict), say so, and
    /// roll back once it has not answered for `rollback_after_unavailable`.
    fn unavailable(self: &Arc<Self>, p: &mut Progress, why: String) {
        let Some(fleet) = &self.fleet else { return };
        let limit = fleet.analysis().rollback_after_unavailable;
        let started = match &mut p.unavailable {
            Some((_, started, error)) => {
                *error = why.clone();
                *started
            }
            None => {
                tracing::warn!(
                    module = self.name(),
                    error = why.as_str(),
                    "canary analysis unavailable: the canary holds"
                );
                let now = std::time::Instant::now();
                p.unavailable = Some((now_ms(), now, why.clone()));
                self.transition(p, "unavailable", Some(why.clone()));
                now
            }
        };
        if started.elapsed() >= limit {
            let reason = format!(
                "analysis unavailable for {}: {why}",
                humantime::format_duration(limit)
            );
            self.finish(p, State::RolledBack, reason);
        }
    }

    /// An operator's action; the new snapshot, or why it does not apply.
    pub fn act(self: &Arc<Self>, action: Action) -> Result<Snapshot, Refused> {
        {
            let mut p = self.progress.lock().unwrap();
            let refused = || Refused {
                module: self.name().to_owned(),
                state: p.state,
                action,
            };
            match (action, p.state) {
                (_, State::Promoted | State::RolledBack) => return Err(refused()),
                (Action::Promote, _) => {
                    self.finish(&mut p, State::Promoted, "promoted by an operator".into())
                }
                (Action::Abort, _) => {
                    self.finish(&mut p, State::RolledBack, "aborted by an operator".into())
                }
                (Action::Pause, State::Progressing) => {
                    p.state = State::Paused;
                    self.transition(&mut p, "paused", None);
                }
                (Action::Resume, State::Paused) => {
                    // Requests served while paused are not this window's.
                    self.window(true);
                    p.state = State::Progressing;
                    self.transition(&mut p, "resumed", None);
                }
                (Action::Pause | Action::Resume, _) => return Err(refused()),
            }
            self.publish(p.state, self.weight(), p.step);
        }
        self.wake.notify_one();
        Ok(self.snapshot())
    }

    /// Promotes (weight 100) or rolls back (weight 0) at once, and tells
    /// the reloader to swap the routing table.
    fn finish(self: &Arc<Self>, p: &mut Progress, state: State, reason: String) {
        let weight = if state == State::Promoted { 100 } else { 0 };
        self.weight.store(weight, Ordering::Relaxed);
        p.state = state;
        p.reason = Some(reason.clone());
        let result = if state == State::Promoted {
            "promoted"
        } else {
            "rolled_back"
        };
        self.transition(p, result, Some(reason));
        self.publish(state, weight, p.step);
        let _ = self.finished.send(self.clone());
    }

    /// Records and logs a change of state.
    fn transition(&self, p: &mut Progress, result: &'static str, reason: Option<String>) {
        let weight = self.weight();
        if result == "rolled_back" {
            tracing::warn!(
                module = self.name(),
                step = p.step,
                reason = reason.as_deref(),
                "canary rolled back: the stable version serves every request"
            );
        } else {
            tracing::info!(
                module = self.name(),
                step = p.step,
                weight,
                reason = reason.as_deref(),
                "canary {result}"
            );
        }
        push(
            &mut p.history,
            Entry {
                at_ms: now_ms(),
                step: p.step,
                weight,
                result,
                reason,
                stable: None,
                canary: None,
                window: None,
            },
        );
    }

    fn publish(&self, state: State, weight: u8, step: usize) {
        let name = self.name();
        if let Some(fleet) = &self.fleet {
            let labels = fleet.identity().values();
            self.metrics
                .canary_fleet_state
                .with_label_values(&labels)
                .set(state.gauge());
            self.metrics
                .canary_fleet_step
                .with_label_values(&labels)
                .set(step as i64);
        }
        self.metrics
            .canary_weight
            .with_label_values(&[name])
            .set(i64::from(weight));
        self.metrics
            .canary_state
            .with_label_values(&[name])
            .set(state.gauge());
    }
}

/// How a canary ended, kept so a reload or a restart does not run it
/// again: a promoted canary keeps serving as the stable version, and a
/// rolled-back one stays out of traffic, for as long as the config names
/// the same versions of both: the same digests, whatever names them.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Settled {
    /// The module's stable source when the canary ended, as shown.
    pub stable: String,
    /// The canary's source, as shown.
    pub canary: String,
    /// What the stable version is: its digest (see
    /// `reload::canaries::identity`). An outcome written before these
    /// existed has none, and matches nothing.
    #[serde(default)]
    pub stable_id: String,
    /// What the judged canary is: the digest of the bytes that ran.
    #[serde(default)]
    pub canary_id: String,
    /// The canary's sha256.
    pub sha256: String,
    /// Promoted or rolled back.
    pub state: State,
    /// Why.
    pub reason: String,
    /// Unix time in milliseconds.
    pub at_ms: u64,
}

/// Every module's canary as the admin port sees it: the running or
/// finished canary of this process, how an earlier one ended, or why one
/// could not load. The reloader writes it.
#[derive(Default)]
pub struct Board(Mutex<BoardInner>);

#[derive(Default)]
struct BoardInner {
    live: std::collections::BTreeMap<String, Arc<Canary>>,
    settled: std::collections::BTreeMap<String, Settled>,
    errors: std::collections::BTreeMap<String, String>,
}

impl Board {
    /// The canary of `module` this process started, if any.
    pub fn get(&self, module: &str) -> Option<Arc<Canary>> {
        self.0.lock().unwrap().live.get(module).cloned()
    }

    /// What `/info` shows for `module`'s canary.
    pub fn info(&self, module: &str) -> Option<serde_json::Value> {
        let inner = self.0.lock().unwrap();
        if let Some(error) = inner.errors.get(module) {
            return Some(serde_json::json!({ "state": "failed_to_load", "error": error }));
        }
        if let Some(canary) = inner.live.get(module) {
            return serde_json::to_value(canary.snapshot()).ok();
        }
        inner
            .settled
            .get(module)
            .and_then(|s| serde_json::to_value(s).ok())
    }

    /// Names of the modules with an entry.
    pub fn modules(&self) -> Vec<String> {
        let inner = self.0.lock().unwrap();
        let mut names: Vec<String> = inner
            .live
            .keys()
            .chain(inner.settled.keys())
            .chain(inner.errors.keys())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub(crate) fn set_live(&self, module: &str, canary: Option<Arc<Canary>>) {
        let mut inner = self.0.lock().unwrap();
        match canary {
            Some(c) => inner.live.insert(module.to_owned(), c),
            None => inner.live.remove(module),
        };
    }

    /// Records a load failure; says whether it is news (not the error it
    /// had already).
    pub(crate) fn set_error(&self, module: &str, error: Option<String>) -> bool {
        let mut inner = self.0.lock().unwrap();
        match error {
            Some(e) => inner.errors.insert(module.to_owned(), e.clone()).as_ref() != Some(&e),
            None => inner.errors.remove(module).is_some(),
        }
    }

    pub(crate) fn settled(&self) -> std::collections::BTreeMap<String, Settled> {
        self.0.lock().unwrap().settled.clone()
    }

    pub(crate) fn set_settled(&self, settled: std::collections::BTreeMap<String, Settled>) {
        self.0.lock().unwrap().settled = settled;
    }
}

/// The value of cookie `name` in the request's `Cookie` headers. A plain
/// split of `a=1; b=2` rather than a cookie crate: the value only picks a
/// version (either is the client's to get), so a hostile one can do no
/// more than choose, which a sticky key lets any client do anyway.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let value = pair
                .trim_ascii_start()
                .strip_prefix(name.as_bytes())?
                .strip_prefix(b"=")?;
            Some(value.trim_ascii_end())
        })
}

fn push(history: &mut VecDeque<Entry>, entry: Entry) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(entry);
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> CanaryConfig {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(&format!("file = \"v2.wasm\"\n{toml}")))
            .extract()
            .unwrap()
    }

    fn figures(requests: u64, errors: u64, p99_ms: f64) -> Figures {
        Figures::of(requests, errors, Some(p99_ms), 0)
    }

    #[test]
    fn states_and_actions_have_their_words_gauges_and_finality() {
        let states = [
            State::Progressing,
            State::Paused,
            State::Promoted,
            State::RolledBack,
        ];
        let seen: Vec<_> = states
            .iter()
            .map(|s| (s.as_str(), s.gauge(), s.is_final()))
            .collect();
        assert_eq!(
            seen,
            [
                ("progressing", 0, false),
                ("paused", 1, false),
                ("promoted", 2, true),
                ("rolled_back", 3, true),
            ]
        );
        for action in [
            Action::Promote,
            Action::Abort,
            Action::Pause,
            Action::Resume,
        ] {
            assert_eq!(action.as_str().parse::<Action>(), Ok(action));
        }
        let words: Vec<_> = [
            Action::Promote,
            Action::Abort,
            Action::Pause,
            Action::Resume,
        ]
        .iter()
        .map(|a| a.as_str())
        .collect();
        assert_eq!(words, ["promote", "abort", "pause", "resume"]);
        assert_eq!("Promote".parse::<Action>(), Err(()));
        assert_eq!("".parse::<Action>(), Err(()));
    }

    #[test]
    fn a_latency_on_a_bucket_bound_is_counted_in_that_bucket() {
        let w = Window::new();
        let at = bounds()[3];
        w.record(200, Duration::from_secs_f64(at));
        w.record(500, Duration::from_secs_f64(at * 1.1));
        assert_eq!(
            w.buckets[3].load(Ordering::Relaxed),
            1,
            "le: the bound itself"
        );
        assert_eq!(w.buckets[4].load(Ordering::Relaxed), 1);
        let f = w.figures(true);
        assert_eq!((f.requests, f.errors), (2, 1));
        assert_eq!(f.success_rate, Some(50.0));
        assert_eq!(w.figures(false).requests, 0, "reset");
        // No requests: no success rate at all, rather than 0/0.
        assert_eq!(Window::new().figures(false).success_rate, None);
    }

    #[test]
    fn a_canary_that_failed_to_load_is_recorded_as_rolled_back() {
        let metrics = Metrics::new();
        metrics.canary_weight.with_label_values(&["m"]).set(25);
        Canary::failed_to_load("m", &metrics, "bad wasm");
        assert_eq!(metrics.canary_weight.with_label_values(&["m"]).get(), 0);
        assert_eq!(
            metrics.canary_state.with_label_values(&["m"]).get(),
            State::RolledBack.gauge()
        );
        assert_eq!(
            metrics
                .canary_judgements
                .with_label_values(&["m", "fail"])
                .get(),
            1
        );
    }

    #[test]
    fn a_window_is_judged_on_requests_success_rate_and_latency() {
        let p = policy("min_requests = 10\nmax_p99 = \"200ms\"\nmax_p99_ratio = 2.0");
        let stable = figures(100, 0, 50.0);
        assert_eq!(judge(&p, &stable, &figures(100, 0, 60.0)), Verdict::Pass);
        assert!(matches!(
            judge(&p, &stable, &figures(9, 0, 1.0)),
            Verdict::Wait(_)
        ));
        let Verdict::Fail(why) = judge(&p, &stable, &figures(100, 30, 10.0)) else {
            panic!("30% errors passed")
        };
        assert!(
            why.contains("success rate 70.00%") && why.contains("99%"),
            "{why}"
        );
        let Verdict::Fail(why) = judge(&p, &stable, &figures(100, 0, 250.0)) else {
            panic!("slow passed")
        };
        assert!(why.contains("max_p99"), "{why}");
        let Verdict::Fail(why) = judge(&p, &stable, &figures(100, 0, 150.0)) else {
            panic!("3x the stable p99 passed")
        };
        assert!(why.contains("stable version's 50.0ms"), "{why}");
        // Too little stable traffic to compare with: only the absolute bound.
        assert_eq!(
            judge(&p, &figures(3, 0, 1.0), &figures(100, 0, 150.0)),
            Verdict::Pass
        );
    }

    #[test]
    fn each_threshold_holds_at_its_exact_value() {
        let p = policy(
            "min_requests = 10\nmin_success_rate = 90.0\nmax_p99 = \"250ms\"\nmax_p99_ratio = 2.0",
        );
        // Exactly min_requests is judged; exactly 90 % and exactly 2x the
        // stable p99 pass.
        let stable = figures(10, 0, 50.0);
        assert_eq!(judge(&p, &stable, &figures(10, 1, 100.0)), Verdict::Pass);
        // Exactly max_p99 passes (250 ms: exact in binary, as 200 is not).
        assert_eq!(
            judge(&p, &figures(10, 0, 150.0), &figures(10, 0, 250.0)),
            Verdict::Pass
        );
        // A stable version with exactly min_requests is compared with.
        assert!(matches!(
            judge(&p, &stable, &figures(10, 0, 101.0)),
            Verdict::Fail(_)
        ));
        // One under each: waits, fails.
        assert!(matches!(
            judge(&p, &stable, &figures(9, 0, 1.0)),
            Verdict::Wait(_)
        ));
        assert!(matches!(
            judge(&p, &stable, &figures(10, 2, 1.0)),
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn the_p99_of_a_window_is_read_from_its_buckets() {
        let w = Window::new();
        for _ in 0..990 {
            w.record(200, Duration::from_millis(10));
        }
        for _ in 0..10 {
            w.record(503, Duration::from_millis(400));
        }
        let f = w.figures(true);
        assert_eq!((f.requests, f.errors), (1000, 10));
        assert_eq!(f.success_rate, Some(99.0));
        let p99 = f.p99_ms.unwrap();
        assert!((8.0..=12.0).contains(&p99), "p99 {p99}");
        // Taken with a reset: the next window starts empty.
        assert_eq!(w.figures(false).requests, 0);
        for _ in 0..100 {
            w.record(200, Duration::from_millis(300));
        }
        let p99 = w.figures(false).p99_ms.unwrap();
        assert!((250.0..=360.0).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn the_sticky_cookie_is_found_among_others_and_not_by_prefix() {
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::COOKIE,
            "theme=dark; uid-old=1".parse().unwrap(),
        );
        headers.append(http::header::COOKIE, "a=b;uid=42 ; z=9".parse().unwrap());
        assert_eq!(cookie(&headers, "uid"), Some(&b"42"[..]));
        assert_eq!(cookie(&headers, "theme"), Some(&b"dark"[..]));
        assert_eq!(cookie(&headers, "ui"), None);
        assert_eq!(cookie(&HeaderMap::new(), "uid"), None);
    }

    /// A canary of `plain_hello` against itself, started from the lines
    /// of its `[modules.app.canary]` table, with what it reports to.
    struct Started {
        canary: Arc<Canary>,
        finished: mpsc::UnboundedReceiver<Arc<Canary>>,
        metrics: Arc<Metrics>,
        _runtime: crate::runtime::Runtime,
        _config: crate::testing::ConfigFile,
    }

    async fn started(table: &str) -> Started {
        use crate::runtime::{Fetched, Runtime, RuntimeOptions};
        let file = crate::testing::ConfigFile::new("");
        let stable = crate::testing::module(&file, "app", "/", "plain_hello");
        crate::testing::module(&file, "v2", "/", "plain_hello");
        // No window ends on its own unless the table says when.
        let interval = if table.contains("interval") {
            ""
        } else {
            "interval = \"1h\""
        };
        file.write(&format!(
            "{stable}[modules.app.canary]\nfile = \"v2.wasm\"\n{interval}\n{table}\n"
        ));
        let config = file.load();
        let runtime = Runtime::new(&RuntimeOptions::from_config(&config)).unwrap();
        let metrics = Arc::new(Metrics::new());
        let spec = config.canary_specs().remove(0);
        let fetched = Fetched::fetch(&spec.module, &runtime).await.unwrap();
        let module = Module::load(&runtime, spec.module.clone(), fetched, &metrics).unwrap();
        let (tx, finished) = mpsc::unbounded_channel();
        let canary = Canary::new(Arc::new(module), spec, "", metrics.clone(), tx);
        Started {
            canary,
            finished,
            metrics,
            _runtime: runtime,
            _config: file,
        }
    }

    impl Started {
        /// `n` requests of `track` answered `status` in 5 ms.
        fn serve(&self, track: Track, status: u16, n: usize) {
            for _ in 0..n {
                self.canary.record(track, status, Duration::from_millis(5));
            }
        }

        /// The published weight and state gauges.
        fn gauges(&self) -> (i64, i64) {
            (
                self.metrics.canary_weight.with_label_values(&["app"]).get(),
                self.metrics.canary_state.with_label_values(&["app"]).get(),
            )
        }

        fn results(&self) -> Vec<&'static str> {
            self.canary
                .snapshot()
                .history
                .iter()
                .map(|e| e.result)
                .collect()
        }
    }

    fn with_header(name: &str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        headers
    }

    /// Canary picks among `n` random draws; a binomial count of mean
    /// `n * weight` is within six standard deviations of it.
    fn assert_share(picks: usize, n: usize, weight: f64, what: &str) {
        let mean = n as f64 * weight;
        let sd = (mean * (1.0 - weight)).sqrt();
        assert!(
            (picks as f64 - mean).abs() < 6.0 * sd,
            "{what}: {picks} of {n} on the canary, {mean} expected"
        );
    }

    #[tokio::test]
    async fn a_random_draw_follows_the_weight_and_the_ends_are_exact() {
        let s = started("steps = [10, 60]").await;
        assert_eq!(s.canary.weight(), 10);
        let none = HeaderMap::new();
        let n = 20_000;
        let picks = (0..n)
            .filter(|_| s.canary.pick(&none) == Track::Canary)
            .count();
        assert_share(picks, n, 0.10, "weight 10");
        s.canary.act(Action::Promote).unwrap();
        assert!((0..1000).all(|_| s.canary.pick(&none) == Track::Canary));
        let s = started("steps = [10, 60]").await;
        s.canary.act(Action::Abort).unwrap();
        assert!((0..1000).all(|_| s.canary.pick(&none) == Track::Stable));
    }

    #[tokio::test]
    async fn a_sticky_key_keeps_its_version_and_only_moves_to_the_canary_as_the_weight_rises() {
        let s =
            started("steps = [10, 60]\nmin_requests = 1\nsticky = { header = \"x-user\" }").await;
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let pick = |key: &str| s.canary.pick(&with_header("x-user", key));
        let on_canary: Vec<bool> = keys.iter().map(|k| pick(k) == Track::Canary).collect();
        for (key, was) in keys.iter().zip(&on_canary) {
            for _ in 0..3 {
                assert_eq!(pick(key) == Track::Canary, *was, "{key} moved");
            }
        }
        assert_share(
            on_canary.iter().filter(|c| **c).count(),
            2000,
            0.10,
            "step 10",
        );
        s.serve(Track::Stable, 200, 1);
        s.serve(Track::Canary, 200, 1);
        s.canary.judge_window();
        assert_eq!(s.canary.weight(), 60);
        let now: Vec<bool> = keys.iter().map(|k| pick(k) == Track::Canary).collect();
        for ((key, was), is) in keys.iter().zip(&on_canary).zip(&now) {
            assert!(!was || *is, "{key} left the canary as its weight rose");
        }
        assert_share(now.iter().filter(|c| **c).count(), 2000, 0.60, "step 60");

        // A cookie key, and a request without one, drawn at random.
        let s = started("steps = [50]\nsticky = { cookie = \"uid\" }").await;
        let pick = |key: &str| {
            s.canary
                .pick(&with_header("cookie", &format!("theme=dark; uid={key}")))
        };
        let first: Vec<Track> = (0..200).map(|i| pick(&i.to_string())).collect();
        assert!((0..200).all(|i| pick(&i.to_string()) == first[i]));
        assert_share(
            first.iter().filter(|t| **t == Track::Canary).count(),
            200,
            0.5,
            "cookie at 50",
        );
        let none = HeaderMap::new();
        let draws: Vec<Track> = (0..64).map(|_| s.canary.pick(&none)).collect();
        assert!(draws.contains(&Track::Canary) && draws.contains(&Track::Stable));
    }

    #[tokio::test]
    async fn windows_judged_in_turn_wait_advance_fail_and_promote() {
        let mut s = started("steps = [10, 50]\nmin_requests = 2\nmax_failures = 2").await;
        assert_eq!(s.gauges(), (10, State::Progressing.gauge()));
        s.canary.judge_window();
        assert_eq!(s.results(), ["wait"]);
        assert_eq!(s.canary.weight(), 10);

        s.serve(Track::Stable, 200, 2);
        s.serve(Track::Canary, 200, 2);
        s.canary.judge_window();
        let snap = s.canary.snapshot();
        assert_eq!((snap.step, snap.weight), (1, 50));
        assert_eq!(s.gauges(), (50, State::Progressing.gauge()));
        assert_eq!(
            snap.window.canary.requests, 0,
            "a judged window starts again"
        );
        let judged = snap.history.last().unwrap();
        assert_eq!((judged.step, judged.weight, judged.result), (0, 10, "pass"));
        assert_eq!(judged.canary.unwrap().requests, 2);

        s.serve(Track::Canary, 500, 2);
        s.canary.judge_window();
        let snap = s.canary.snapshot();
        assert_eq!(
            (snap.state, snap.failures, snap.weight),
            (State::Progressing, 1, 50)
        );
        s.serve(Track::Canary, 200, 2);
        s.canary.judge_window();
        let snap = s.canary.snapshot();
        assert_eq!(snap.state, State::Promoted);
        assert_eq!((snap.step, snap.weight, snap.failures), (1, 100, 0));
        assert_eq!(snap.reason.as_deref(), Some("every step passed"));
        assert_eq!(s.gauges(), (100, State::Promoted.gauge()));
        assert_eq!(s.results(), ["wait", "pass", "fail", "pass", "promoted"]);
        let done = s.finished.try_recv().expect("the reloader hears of it");
        assert!(Arc::ptr_eq(&done, &s.canary));
        let judged = |r| {
            s.metrics
                .canary_judgements
                .with_label_values(&["app", r])
                .get()
        };
        assert_eq!((judged("pass"), judged("fail"), judged("wait")), (2, 1, 1));

        // Over: a late window changes nothing.
        s.serve(Track::Canary, 500, 5);
        s.canary.judge_window();
        assert_eq!(s.results().len(), 5);
        assert_eq!(
            s.canary.act(Action::Abort).unwrap_err().state,
            State::Promoted
        );
    }

    #[tokio::test]
    async fn failed_windows_in_a_row_roll_back_at_max_failures() {
        let mut s = started("steps = [10, 50]\nmin_requests = 1\nmax_failures = 2").await;
        s.serve(Track::Canary, 500, 1);
        s.canary.judge_window();
        assert_eq!(s.canary.state(), State::Progressing);
        assert_eq!((s.canary.snapshot().failures, s.canary.weight()), (1, 10));
        assert!(s.finished.try_recv().is_err());
        s.serve(Track::Canary, 503, 1);
        s.canary.refused(Track::Canary);
        assert_eq!(s.canary.snapshot().window.canary.refused, 1);
        s.canary.judge_window();
        let snap = s.canary.snapshot();
        assert_eq!(
            (snap.state, snap.weight, snap.step),
            (State::RolledBack, 0, 0)
        );
        assert!(snap.reason.unwrap().contains("success rate 0.00%"));
        assert_eq!(s.gauges(), (0, State::RolledBack.gauge()));
        assert_eq!(s.results(), ["fail", "fail", "rolled_back"]);
        assert!(s.finished.try_recv().is_ok());
    }

    #[tokio::test]
    async fn a_paused_canary_judges_nothing_and_resumes_on_a_new_window() {
        let s = started("steps = [10, 50]\nmin_requests = 1").await;
        s.canary.act(Action::Pause).unwrap();
        assert_eq!(s.gauges(), (10, State::Paused.gauge()));
        s.serve(Track::Stable, 200, 3);
        s.serve(Track::Canary, 200, 3);
        s.canary.judge_window();
        let snap = s.canary.snapshot();
        assert_eq!((snap.state, snap.step, snap.weight), (State::Paused, 0, 10));
        assert_eq!(snap.window.canary.requests, 3, "served while paused");
        let refused = s.canary.act(Action::Pause).unwrap_err();
        assert_eq!(
            (refused.state, refused.action),
            (State::Paused, Action::Pause)
        );
        s.canary.act(Action::Resume).unwrap();
        assert_eq!(s.canary.snapshot().window.canary.requests, 0);
        assert_eq!(s.gauges(), (10, State::Progressing.gauge()));
        assert!(s.canary.act(Action::Resume).is_err());
        assert_eq!(s.results(), ["paused", "resumed"]);
    }

    #[tokio::test]
    async fn the_run_task_judges_every_interval_until_the_canary_ends() {
        let mut s = started("steps = [10, 50]\nmin_requests = 1\ninterval = \"100ms\"").await;
        let run = tokio::spawn(s.canary.clone().run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while s.finished.try_recv().is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never promoted");
            s.serve(Track::Stable, 200, 1);
            s.serve(Track::Canary, 200, 1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.canary.state(), State::Promoted);
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the run task ends with the canary")
            .unwrap();
    }

    #[tokio::test]
    async fn the_board_shows_live_settled_and_failed_canaries() {
        let s = started("steps = [10]").await;
        let board = Board::default();
        assert!(board.get("app").is_none() && board.info("app").is_none());
        board.set_live("app", Some(s.canary.clone()));
        assert!(Arc::ptr_eq(&board.get("app").unwrap(), &s.canary));
        assert_eq!(board.info("app").unwrap()["state"], "progressing");
        assert_eq!(board.info("app").unwrap()["weight"], 10);
        let settled = Settled {
            stable: "a.wasm".into(),
            canary: "b.wasm".into(),
            stable_id: "1".into(),
            canary_id: "2".into(),
            sha256: "ab".into(),
            state: State::RolledBack,
            reason: "why".into(),
            at_ms: 1,
        };
        board.set_settled([("old".to_owned(), settled.clone())].into());
        assert_eq!(board.settled()["old"], settled);
        assert_eq!(board.info("old").unwrap()["reason"], "why");
        assert!(board.set_error("bad", Some("no such file".into())), "news");
        assert!(
            !board.set_error("bad", Some("no such file".into())),
            "the same"
        );
        assert!(board.set_error("bad", Some("another".into())), "changed");
        assert_eq!(board.info("bad").unwrap()["state"], "failed_to_load");
        assert_eq!(board.info("bad").unwrap()["error"], "another");
        board.set_live("bad", Some(s.canary.clone()));
        assert_eq!(board.modules(), ["app", "bad", "old"]);
        assert!(board.set_error("bad", None));
        assert!(!board.set_error("bad", None));
        board.set_live("app", None);
        assert!(board.get("app").is_none());
        assert_eq!(board.modules(), ["bad", "old"]);
    }

    /// What a fake Prometheus answers: the fleet's record, the window's
    /// series, or 503s while `down`.
    #[derive(Default)]
    struct Answers {
        down: bool,
        /// How long each answer takes (a slow Prometheus).
        delay: Duration,
        state: Option<f64>,
        step: Option<f64>,
        /// (track, status, increase)
        requests: Vec<(&'static str, &'static str, f64)>,
        /// (track, seconds)
        p99: Vec<(&'static str, f64)>,
    }

    /// A Prometheus on loopback answering `/api/v1/query` from `Answers`.
    async fn prometheus() -> (crate::testing::Peer, Arc<Mutex<Answers>>) {
        let answers: Arc<Mutex<Answers>> = Arc::default();
        let shared = answers.clone();
        let peer = crate::testing::Peer::start(Arc::new(move |uri: &str, _| {
            let delay = shared.lock().unwrap().delay;
            // Blocks this connection's task only: the tests that slow
            // Prometheus down run on a multi-threaded runtime.
            std::thread::sleep(delay);
            let a = shared.lock().unwrap();
            if a.down {
                return crate::testing::status(503);
            }
            let url = reqwest::Url::parse(&format!("http://prometheus{uri}")).unwrap();
            let query = url
                .query_pairs()
                .find(|(k, _)| k == "query")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let series = |labels: serde_json::Value, value: f64| {
                serde_json::json!({"metric": labels, "value": [0, value.to_string()]})
            };
            let result: Vec<_> = if query.contains("berth_canary_fleet_state") {
                a.state.map(|v| series(serde_json::json!({}), v)).into_iter().collect()
            } else if query.contains("berth_canary_fleet_step") {
                a.step.map(|v| series(serde_json::json!({}), v)).into_iter().collect()
            } else if query.starts_with("sum by (track, status)") {
                a.requests
                    .iter()
                    .map(|(t, c, v)| series(serde_json::json!({"track": t, "status": c}), *v))
                    .collect()
            } else if query.starts_with("histogram_quantile") {
                a.p99
                    .iter()
                    .map(|(t, v)| series(serde_json::json!({"track": t}), *v))
                    .collect()
            } else {
                Vec::new()
            };
            let body = serde_json::json!({"status": "success",
                "data": {"resultType": "vector", "result": result}});
            crate::testing::ok(body.to_string().as_bytes())
        }))
        .await;
        (peer, answers)
    }

    /// A canary judged on the fleet's figures from `prometheus`.
    /// Its interval is an hour unless `table` says otherwise, and it rolls
    /// back after Prometheus fails to answer for `rollback_after`.
    async fn fleet_started(
        prometheus: &crate::testing::Peer,
        table: &str,
        rollback_after: &str,
    ) -> Started {
        started(&format!(
            "{table}\n[modules.app.canary.analysis]\nprometheus = \"http://{}\"\n\
             labels = {{ job = \"shop\" }}\nscrape_interval = \"100ms\"\n\
             rollback_after_unavailable = \"{rollback_after}\"\n",
            prometheus.host
        ))
        .await
    }

    /// A window ending at 1 700 000 000 250 ms (Unix), for `time=`.
    const WINDOW: fleet::Window = fleet::Window {
        start_ms: 1_699_999_999_250,
        end_ms: 1_700_000_000_250,
    };

    async fn look(s: &Started, window: Option<fleet::Window>) {
        let fleet = s.canary.fleet.as_ref().unwrap();
        s.canary.tick(fleet, window).await;
    }

    fn analysis_status(s: &Started) -> &'static str {
        s.canary.snapshot().analysis.unwrap().status
    }

    #[tokio::test]
    async fn a_fleet_canary_joins_the_fleets_step_and_judges_the_fleets_window() {
        let (prom, answers) = prometheus().await;
        let mut s = fleet_started(&prom, "steps = [10, 50, 90]\nmin_requests = 5", "1h").await;
        assert_eq!(s.canary.weight(), 0, "nothing served before it joins");
        assert_eq!(analysis_status(&s), "joining");
        answers.lock().unwrap().step = Some(1.0);
        look(&s, None).await;
        assert_eq!((s.canary.snapshot().step, s.canary.weight()), (1, 50));
        assert_eq!(s.results(), ["joined"]);
        assert_eq!(analysis_status(&s), "ok");
        let labels = s.canary.fleet.as_ref().unwrap().identity().values();
        assert_eq!(
            s.metrics.canary_fleet_step.with_label_values(&labels).get(),
            1
        );
        assert!(
            prom.asked().iter().all(|q| !q.contains("time=")),
            "joining asks only for the record, now"
        );

        // The fleet served the window well: the next step, judged on its
        // figures (not this replica's, which served nothing).
        {
            let mut a = answers.lock().unwrap();
            a.requests = vec![
                ("canary", "200", 7.4),
                ("stable", "200", 30.0),
                ("canary", "500", 0.0),
            ];
            a.p99 = vec![("canary", 0.01), ("stable", 0.01)];
        }
        look(&s, Some(WINDOW)).await;
        let snap = s.canary.snapshot();
        assert_eq!((snap.step, snap.weight), (2, 90));
        let judged = snap.history.last().unwrap();
        assert_eq!((judged.result, judged.window), ("pass", Some(WINDOW)));
        assert_eq!(judged.canary.unwrap().requests, 7);
        assert_eq!(
            s.metrics.canary_fleet_step.with_label_values(&labels).get(),
            2
        );
        let at_end = prom
            .asked()
            .iter()
            .filter(|q| q.contains("time=1700000000.250"))
            .count();
        assert_eq!(at_end, 3, "the three window queries, at the window's end");

        // A replica of the fleet rolled back: so does this one.
        answers.lock().unwrap().state = Some(State::RolledBack.gauge() as f64);
        look(&s, Some(WINDOW.next())).await;
        let snap = s.canary.snapshot();
        assert_eq!((snap.state, snap.weight), (State::RolledBack, 0));
        assert_eq!(
            snap.reason.as_deref(),
            Some("rolled back by a replica of the fleet")
        );
        assert!(s.finished.try_recv().is_ok());
        assert_eq!(
            s.metrics
                .canary_fleet_state
                .with_label_values(&labels)
                .get(),
            State::RolledBack.gauge()
        );
    }

    #[tokio::test]
    async fn a_replica_behind_follows_the_fleet_and_a_promotion_promotes() {
        let (prom, answers) = prometheus().await;
        let s = fleet_started(&prom, "steps = [10, 50, 90]", "1h").await;
        look(&s, None).await;
        assert_eq!(
            s.canary.weight(),
            10,
            "a fleet with no record starts at step 0"
        );
        answers.lock().unwrap().step = Some(2.0);
        look(&s, None).await;
        assert_eq!((s.canary.snapshot().step, s.canary.weight()), (2, 90));
        assert_eq!(s.results(), ["joined", "followed"]);
        // A record past the last step (another spec's) is clamped to it.
        answers.lock().unwrap().step = Some(7.0);
        look(&s, None).await;
        assert_eq!(s.canary.snapshot().step, 2);
        answers.lock().unwrap().state = Some(State::Promoted.gauge() as f64);
        look(&s, None).await;
        assert_eq!(
            (s.canary.state(), s.canary.weight()),
            (State::Promoted, 100)
        );
    }

    #[tokio::test]
    async fn without_prometheus_the_canary_holds_and_then_rolls_back() {
        let (prom, answers) = prometheus().await;
        let s = fleet_started(
            &prom,
            "steps = [10, 50]\nmin_requests = 1\ninterval = \"200ms\"",
            "600ms",
        )
        .await;
        look(&s, None).await;
        answers.lock().unwrap().down = true;
        look(&s, Some(WINDOW)).await;
        let snap = s.canary.snapshot();
        assert_eq!(
            (snap.state, snap.step, snap.weight),
            (State::Progressing, 0, 10)
        );
        assert_eq!(analysis_status(&s), "unavailable");
        let error = snap.analysis.unwrap().error.unwrap();
        assert!(error.contains("503"), "{error}");
        // Back in time: available again, and a later outage starts afresh.
        answers.lock().unwrap().down = false;
        look(&s, None).await;
        assert_eq!(analysis_status(&s), "ok");
        answers.lock().unwrap().down = true;
        look(&s, None).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        look(&s, None).await;
        assert_eq!(s.canary.state(), State::Progressing, "300 ms of 600");
        tokio::time::sleep(Duration::from_millis(400)).await;
        look(&s, None).await;
        let snap = s.canary.snapshot();
        assert_eq!(snap.state, State::RolledBack);
        assert!(
            snap.reason
                .unwrap()
                .starts_with("analysis unavailable for 600ms")
        );
        assert_eq!(
            s.results(),
            ["joined", "unavailable", "unavailable", "rolled_back"]
        );
    }

    #[tokio::test]
    async fn figures_the_fleet_cannot_judge_hold_the_canary_and_say_why() {
        let (prom, answers) = prometheus().await;
        let s = fleet_started(
            &prom,
            "steps = [10, 50]\nmin_requests = 2\nmax_p99 = \"1s\"",
            "1h",
        )
        .await;
        look(&s, None).await;
        // This replica served the canary; the fleet's figures show none.
        s.serve(Track::Canary, 200, 2);
        look(&s, Some(WINDOW)).await;
        let error = s.canary.snapshot().analysis.unwrap().error.unwrap();
        assert!(error.contains("do analysis.labels select"), "{error}");
        assert_eq!(s.canary.snapshot().step, 0);
        // One request short of what would make the labels suspect: a wait.
        s.serve(Track::Canary, 200, 1);
        look(&s, Some(WINDOW)).await;
        assert_eq!(analysis_status(&s), "ok");
        assert_eq!(s.results().last(), Some(&"wait"));
        // Requests with no p99 cannot be held to max_p99.
        answers.lock().unwrap().requests = vec![("canary", "200", 5.0)];
        look(&s, Some(WINDOW)).await;
        let error = s.canary.snapshot().analysis.unwrap().error.unwrap();
        assert!(error.contains("no p99"), "{error}");
        assert_eq!(s.canary.snapshot().step, 0);
        // Paused, it asks about no window and judges nothing.
        s.canary.act(Action::Pause).unwrap();
        let before = prom.asked().len();
        answers.lock().unwrap().p99 = vec![("canary", 0.01)];
        look(&s, Some(WINDOW)).await;
        assert_eq!(prom.asked().len(), before + 2, "the record only");
        assert_eq!(s.canary.snapshot().step, 0);
    }

    /// The window ends (Unix ms) of the request-count queries asked so far.
    fn judged_ends(prom: &crate::testing::Peer) -> Vec<u64> {
        prom.asked()
            .iter()
            .filter(|q| q.contains("time=") && q.contains("berth_http_server_requests_total"))
            .filter_map(|q| {
                let at = q.split("time=").nth(1)?.split('&').next()?;
                let (secs, ms) = at.split_once('.')?;
                Some(secs.parse::<u64>().ok()? * 1000 + ms.parse::<u64>().ok()?)
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_run_task_judges_each_window_once_and_catches_up_when_slow() {
        let (prom, answers) = prometheus().await;
        // Too few requests ever: every window waits, none is the last.
        let s = fleet_started(&prom, "steps = [10, 50]\ninterval = \"200ms\"", "1h").await;
        let run = tokio::spawn(s.canary.clone().run());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let ends = judged_ends(&prom);
        assert!(ends.len() >= 3, "{ends:?}");
        for pair in ends.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                200,
                "each window once, in turn: {ends:?}"
            );
        }
        // Answers slower than a window: the next look is at the latest
        // window, not at each one missed.
        answers.lock().unwrap().delay = Duration::from_millis(250);
        let before = judged_ends(&prom).len();
        tokio::time::sleep(Duration::from_millis(4000)).await;
        let slow = judged_ends(&prom)[before..].to_vec();
        run.abort();
        assert!(slow.len() >= 2, "{slow:?}");
        assert!(
            slow.windows(2).any(|pair| pair[1] - pair[0] > 200),
            "no window skipped though each look took 5 answers of 250 ms: {slow:?}"
        );
        assert!(slow.windows(2).all(|pair| pair[1] > pair[0]), "{slow:?}");
    }

    #[tokio::test]
    async fn a_record_removed_by_a_replaced_canary_of_the_same_identity_comes_back() {
        let (prom, answers) = prometheus().await;
        let s = fleet_started(&prom, "steps = [10, 50, 90]", "1h").await;
        answers.lock().unwrap().step = Some(1.0);
        look(&s, None).await;
        let labels = s.canary.fleet.as_ref().unwrap().identity().values();
        let step = || s.metrics.canary_fleet_step.with_label_values(&labels).get();
        assert_eq!(step(), 1);
        // What the old canary's drop does when a reload replaces it with
        // one of the same identity (this one, still at its step).
        s.metrics
            .canary_fleet_state
            .remove_label_values(&labels)
            .unwrap();
        s.metrics
            .canary_fleet_step
            .remove_label_values(&labels)
            .unwrap();
        look(&s, None).await;
        assert_eq!(
            s.results(),
            ["joined"],
            "no transition: the series alone came back"
        );
        let rendered = String::from_utf8(s.metrics.render()).unwrap();
        assert!(rendered.contains("berth_canary_fleet_state{"), "{rendered}");
        assert_eq!(step(), 1);
    }

    #[tokio::test]
    async fn the_run_task_looks_at_once_and_a_dropped_canary_leaves_no_record() {
        let (prom, _answers) = prometheus().await;
        let s = fleet_started(&prom, "steps = [10, 50]", "1h").await;
        let run = tokio::spawn(s.canary.clone().run());
        // The interval is an hour: only the first look asks this soon.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.canary.weight() == 0 {
            assert!(std::time::Instant::now() < deadline, "no first look");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        run.abort();
        let _ = run.await;
        let rendered = |m: &Metrics| String::from_utf8(m.render()).unwrap();
        assert!(rendered(&s.metrics).contains("berth_canary_fleet_state{"));
        let Started {
            canary, metrics, ..
        } = s;
        drop(canary);
        assert!(!rendered(&metrics).contains("berth_canary_fleet_state{"));
        assert!(!rendered(&metrics).contains("berth_canary_fleet_step{"));
    }

    #[test]
    fn the_history_keeps_the_newest_entries() {
        let mut history = VecDeque::new();
        for step in 0..HISTORY + 3 {
            push(
                &mut history,
                Entry {
                    at_ms: now_ms(),
                    step,
                    weight: 0,
                    result: "wait",
                    reason: None,
                    stable: None,
                    canary: None,
                    window: None,
                },
            );
        }
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history.front().unwrap().step, 3);
        // 2020-09-13: a clock, not a constant.
        assert!(history[0].at_ms > 1_600_000_000_000);
    }

    #[test]
    fn actions_are_parsed_by_name() {
        assert_eq!("promote".parse::<Action>(), Ok(Action::Promote));
        assert_eq!("resume".parse::<Action>(), Ok(Action::Resume));
        assert!("rollback".parse::<Action>().is_err());
    }
}
