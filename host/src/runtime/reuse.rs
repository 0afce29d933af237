//! Instances that serve more than one request: every WASI 0.3 module by
//! default, and any module whose `instances.max_requests` is above 1.
//!
//! They run on wasmtime-wasi-http's `ProxyHandler`, the worker machinery
//! of `wasmtime serve`: one worker task per instance takes requests from a
//! queue while it has room (`max_concurrent`) and life (`max_requests`),
//! and ends when idle past `idle_timeout`. Berth supplies the policy here:
//! how a store is made (the module's capabilities and limits), when an
//! instance must stop taking requests, and what is counted when it ends.
//!
//! A request that runs over its deadline cannot be cancelled inside a
//! shared instance (wasmtime has no API to cancel one guest task, see
//! wasmtime#11833), so its instance is retired: it takes no new requests,
//! its other requests run to their own ends, and a guest that never yields
//! is torn down by the worker's expiry. A trap or a memory-limit hit
//! poisons the whole store: every request it was running fails (500), and
//! the next request gets a new instance.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::TaskGroupId;
use wasmtime::{Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler::{
    HandlerState, Instance, ProxyPre, ShouldAccept, WorkerExpiration, WorkerState, WorkerStatus,
};

use super::{Host, MemoryLimitExceeded, RequestContext, Tasks, World};
use crate::config::Instances;
use crate::metrics::{GuestMetrics, InstanceMetrics};
use crate::outbound::ModuleOutbound;

/// How long instances of a module live, resolved for its world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Reuse {
    /// Requests one instance serves in its life.
    pub max_requests: u32,
    /// Requests one instance serves at once.
    pub max_concurrent: u32,
    /// How long an idle instance waits for its next request.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Reuse {
    /// `instances` with the defaults of `world` filled in: a fresh instance
    /// per request for WASI 0.2, `wasmtime serve`'s 128 and 16 for 0.3.
    pub fn resolve(instances: &Instances, world: World) -> Reuse {
        let (requests, concurrent) = match world {
            World::P2 => (1, 1),
            World::P3 => (128, 16),
        };
        let max_requests = instances.max_requests.unwrap_or(requests);
        Reuse {
            max_requests,
            // A WASI 0.2 handler runs one request at a time per instance.
            max_concurrent: match world {
                World::P2 => 1,
                World::P3 => instances.max_concurrent.unwrap_or(concurrent),
            }
            .min(max_requests),
            idle_timeout: instances.idle_timeout.unwrap_or(Duration::from_secs(1)),
        }
    }

    /// Whether every request gets an instance of its own, never shared.
    pub fn is_fresh(&self) -> bool {
        self.max_requests == 1
    }
}

/// Why an instance stopped taking requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// It served `max_requests`.
    MaxRequests,
    /// It waited `idle_timeout` with nothing to do.
    Idle,
    /// A request on it ran over its deadline.
    Timeout,
    /// It trapped.
    Trap,
    /// It went over the module's memory limit.
    MemoryLimit,
    /// Its worker was stopped: the module was replaced or removed, or the
    /// host shut down.
    Stopped,
}

impl Retired {
    /// The `reason` label of `berth_instances_retired_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Retired::MaxRequests => "max_requests",
            Retired::Idle => "idle",
            Retired::Timeout => "timeout",
            Retired::Trap => "trap",
            Retired::MemoryLimit => "memory_limit",
            Retired::Stopped => "stopped",
        }
    }
}

/// Why one instance retires (the first reason set wins), whether its
/// worker tore it down mid-request, and how many of its responses are
/// still streaming.
#[derive(Debug, Default)]
pub struct Retirement {
    why: OnceLock<Retired>,
    torn_down: AtomicBool,
    streaming: AtomicUsize,
}

impl Retirement {
    fn set(&self, why: Retired) {
        let _ = self.why.set(why);
    }

    /// A retirement as the worker would leave it, for tests of what reads it.
    #[cfg(test)]
    pub(crate) fn of(why: Retired, torn_down: bool) -> Arc<Self> {
        let retirement = Arc::new(Retirement::default());
        retirement.set(why);
        retirement.torn_down.store(torn_down, Ordering::Relaxed);
        retirement
    }

    /// The reason, once there is one.
    pub fn reason(&self) -> Option<Retired> {
        self.why.get().copied()
    }

    /// Whether the worker gave up on the instance while requests were on
    /// it (a guest past the deadline that never yields): every stream
    /// still open on it was cut off.
    pub fn torn_down(&self) -> bool {
        self.torn_down.load(Ordering::Relaxed)
    }

    /// Counts one response of this instance as streaming until the guard
    /// is dropped. A WASI 0.3 handler returns its head and writes the body
    /// from a task of its own, which wasmtime no longer counts as a request
    /// on the instance; `max_concurrent` counts it through this.
    pub fn streaming(self: &Arc<Self>) -> Streaming {
        self.streaming.fetch_add(1, Ordering::Relaxed);
        Streaming(self.clone())
    }
}

/// One response streaming from a reused instance; see
/// [`Retirement::streaming`].
pub struct Streaming(Arc<Retirement>);

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request carries to the instance that takes it.
pub struct Ticket {
    /// Who the request's log lines and outbound calls belong to.
    pub cx: RequestContext,
    /// Filled in by the instance that takes the request: the caller reads
    /// from it why a failed instance failed.
    pub instance: Arc<OnceLock<Arc<Retirement>>>,
}

/// Everything a module's instances are made from. One per module version;
/// the `ProxyHandler` built on it owns the request queue and the workers.
pub(crate) struct Workers {
    pub(crate) pre: ProxyPre<Host>,
    pub(crate) reuse: Reuse,
    pub(crate) timeout: Duration,
    pub(crate) memory_limit: u64,
    pub(crate) config: Arc<WasiConfigVariables>,
    pub(crate) outbound: Arc<ModuleOutbound>,
    pub(crate) guest_metrics: Arc<GuestMetrics>,
    pub(crate) metrics: InstanceMetrics,
    /// The context of an instance between requests (start-up log lines).
    pub(crate) idle_cx: RequestContext,
}

impl HandlerState for Workers {
    type StoreData = Host;
    type WorkerExpiration = Expiry;
    type WorkerState = Worker;

    async fn instantiate(&self) -> wasmtime::Result<Instance<Host, Expiry, Worker>> {
        let retirement = Arc::new(Retirement::default());
        let tasks = Tasks::new(self.idle_cx.clone());
        let mut host = Host::reused(
            tasks.clone(),
            self.config.clone(),
            self.outbound.clone(),
            self.guest_metrics.clone(),
            self.memory_limit,
        );
        let hit = retirement.clone();
        host.on_memory_exceeded(Arc::new(move || hit.set(Retired::MemoryLimit)));
        let engine = match &self.pre {
            ProxyPre::P2(pre) => pre.instance_pre().engine().clone(),
            ProxyPre::P3(pre) => pre.instance_pre().engine().clone(),
        };
        let mut store = Store::new(&engine, host);
        store.task_group_hook(tasks.hook());
        store.limiter(|h| &mut h.limits);
        // The store is shared, so a deadline cannot trap it for one
        // request: every tick yields, which lets the worker check its
        // expiry (and the runtime run other tasks) even while a guest spins.
        store.epoch_deadline_callback(|_| {
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store.set_epoch_deadline(1);
        let slot = super::instance_starting().await;
        let proxy = self.pre.instantiate_async(&mut store).await?;
        drop(slot);
        self.metrics.created.inc();
        Ok(Instance {
            store,
            proxy,
            view: WasiHttpView::http,
            expiration: Expiry {
                idle_timeout: self.reuse.idle_timeout,
                timeout: self.timeout,
                sleep: Box::pin(tokio::time::sleep(Duration::MAX / 4)),
                retirement: retirement.clone(),
            },
            state: Worker {
                tasks,
                // A 0.2 handler writes its body before it returns.
                counts_streaming: matches!(self.pre, ProxyPre::P3(_)),
                reuse: self.reuse,
                timeout: self.timeout,
                served: AtomicUsize::new(0),
                retirement,
                metrics: self.metrics.clone(),
            },
        })
    }
}

/// One instance's life: how many requests it takes, and its retirement.
pub(crate) struct Worker {
    /// Which request each task group serves.
    tasks: Tasks,
    /// Whether responses still streaming count against `max_concurrent`
    /// (WASI 0.3: see [`Retirement::streaming`]).
    counts_streaming: bool,
    reuse: Reuse,
    timeout: Duration,
    served: AtomicUsize,
    retirement: Arc<Retirement>,
    metrics: InstanceMetrics,
}

impl WorkerState for Worker {
    type StoreData = Host;
    type RequestData = Ticket;

    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept {
        if self.retirement.reason().is_some() {
            return ShouldAccept::Never;
        }
        let streaming = if self.counts_streaming {
            self.retirement.streaming.load(Ordering::Relaxed)
        } else {
            0
        };
        if total >= self.reuse.max_requests as usize {
            self.retirement.set(Retired::MaxRequests);
            ShouldAccept::Never
        } else if concurrent + streaming >= self.reuse.max_concurrent as usize {
            ShouldAccept::No
        } else {
            ShouldAccept::Yes
        }
    }

    fn on_request_start(
        &self,
        _store: StoreContextMut<'_, Host>,
        ticket: Ticket,
        group: TaskGroupId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + Sync + 'static>> {
        self.served.fetch_add(1, Ordering::Relaxed);
        let _ = ticket.instance.set(self.retirement.clone());
        self.tasks.start(group, ticket.cx);
        let retirement = self.retirement.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::time::sleep(timeout).await;
            retirement.set(Retired::Timeout);
        })
    }

    fn drop(&self, store: Store<Host>, result: wasmtime::Result<()>) {
        // wasmtime-wasi-http hands a worker whose future was dropped (a
        // module replaced, a shutdown) over as "worker panicked"; a real
        // panic is still unwinding here.
        let stopped = result
            .as_ref()
            .is_err_and(|e| !std::thread::panicking() && e.to_string() == "worker panicked");
        let result = if stopped {
            self.retirement.set(Retired::Stopped);
            Ok(())
        } else {
            result
        };
        if let Err(e) = &result {
            self.retirement
                .set(if e.downcast_ref::<MemoryLimitExceeded>().is_some() {
                    Retired::MemoryLimit
                } else {
                    Retired::Trap
                });
        }
        // Without another reason, the worker ended because it was idle.
        self.retirement.set(Retired::Idle);
        let why = self.retirement.reason().unwrap_or(Retired::Idle);
        let served = self.served.load(Ordering::Relaxed);
        self.metrics.retired(why.as_str());
        self.metrics.requests.observe(served as f64);
        let module = &*store.data().cx.module;
        match &result {
            Err(e) => {
                tracing::warn!(module, reason = why.as_str(), served, error = %format!("{e:#}"), "instance retired")
            }
            Ok(()) => tracing::debug!(module, reason = why.as_str(), served, "instance retired"),
        }
        drop(store);
    }
}

/// When a worker gives up on its instance: idle past `idle_timeout`, or
/// busy past the request deadline (a guest that never yields to its
/// requests' own deadlines).
pub(crate) struct Expiry {
    idle_timeout: Duration,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    retirement: Arc<Retirement>,
}

impl WorkerExpiration for Expiry {
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        status: WorkerStatus,
        start: Instant,
    ) -> Poll<()> {
        let (limit, why) = match status {
            WorkerStatus::Idle => (self.idle_timeout, Retired::Idle),
            WorkerStatus::Requests | WorkerStatus::PostReturn => (self.timeout, Retired::Timeout),
        };
        let Some(deadline) = start.checked_add(limit) else {
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        let expired = self.sleep.as_mut().poll(cx);
        if expired.is_ready() {
            self.retirement.set(why);
            if why == Retired::Timeout {
                self.retirement.torn_down.store(true, Ordering::Relaxed);
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_world_and_settings_override_them() {
        let unset = Instances::default();
        let p2 = Reuse::resolve(&unset, World::P2);
        assert_eq!((p2.max_requests, p2.max_concurrent), (1, 1));
        assert!(p2.is_fresh());
        let p3 = Reuse::resolve(&unset, World::P3);
        assert_eq!((p3.max_requests, p3.max_concurrent), (128, 16));
        assert_eq!(p3.idle_timeout, Duration::from_secs(1));
        let set = Instances {
            max_requests: Some(4),
            max_concurrent: Some(8),
            idle_timeout: Some(Duration::from_millis(250)),
        };
        let p3 = Reuse::resolve(&set, World::P3);
        // Never more at once than in a lifetime.
        assert_eq!((p3.max_requests, p3.max_concurrent), (4, 4));
        assert_eq!(p3.idle_timeout, Duration::from_millis(250));
        // A 0.2 handler is synchronous: reuse, but one request at a time.
        let p2 = Reuse::resolve(&set, World::P2);
        assert_eq!((p2.max_requests, p2.max_concurrent), (4, 1));
        assert!(!p2.is_fresh());
    }

    /// A worker of `reuse`; `counts_streaming` for a WASI 0.3 one.
    fn worker(reuse: Reuse, counts_streaming: bool) -> Worker {
        let metrics = crate::metrics::Metrics::new();
        let module = metrics.for_module("m", "/m", "v1", "stable");
        let cx = RequestContext {
            module: "m".into(),
            request_id: "-".into(),
            trace: crate::trace::TraceContext::untraced(),
            logs: Arc::new(super::super::host::LogBudget::new(
                10,
                prometheus::IntCounter::new("dropped", "dropped").unwrap(),
            )),
            deadline: None,
        };
        Worker {
            tasks: Tasks::new(cx),
            counts_streaming,
            reuse,
            timeout: Duration::from_secs(1),
            served: AtomicUsize::new(0),
            retirement: Arc::default(),
            metrics: module.instances,
        }
    }

    fn reuse(max_requests: u32, max_concurrent: u32) -> Reuse {
        Reuse {
            max_requests,
            max_concurrent,
            idle_timeout: Duration::from_secs(1),
        }
    }

    fn accepts(w: &Worker, concurrent: usize, total: usize) -> &'static str {
        match w.should_accept_request(concurrent, total) {
            ShouldAccept::Yes => "yes",
            ShouldAccept::No => "no",
            ShouldAccept::Never => "never",
        }
    }

    #[test]
    fn an_instance_takes_requests_within_its_bounds_and_retires_at_its_life() {
        let w = worker(reuse(4, 2), true);
        assert_eq!(accepts(&w, 0, 0), "yes");
        assert_eq!(accepts(&w, 1, 1), "yes");
        assert_eq!(accepts(&w, 2, 2), "no", "at max_concurrent");
        assert_eq!(w.retirement.reason(), None);
        // Responses still streaming count as requests on the instance...
        let one = w.retirement.streaming();
        assert_eq!(accepts(&w, 1, 2), "no");
        drop(one);
        assert_eq!(accepts(&w, 1, 2), "yes");
        // ...on WASI 0.3 only: a 0.2 handler has written its body when it
        // returns.
        let p2 = worker(reuse(4, 2), false);
        let _held = p2.retirement.streaming();
        assert_eq!(accepts(&p2, 1, 2), "yes");
        // The last of its life: retired for good, with the reason.
        assert_eq!(accepts(&w, 0, 3), "yes");
        assert_eq!(accepts(&w, 0, 4), "never");
        assert_eq!(w.retirement.reason(), Some(Retired::MaxRequests));
        assert_eq!(accepts(&w, 0, 0), "never", "retired is final");
    }

    #[test]
    fn retirement_reasons_have_their_metric_labels() {
        let labels: Vec<_> = [
            Retired::MaxRequests,
            Retired::Idle,
            Retired::Timeout,
            Retired::Trap,
            Retired::MemoryLimit,
            Retired::Stopped,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(
            labels,
            [
                "max_requests",
                "idle",
                "timeout",
                "trap",
                "memory_limit",
                "stopped"
            ]
        );
    }

    #[tokio::test]
    async fn expiry_tears_a_busy_instance_down_at_the_deadline_and_an_idle_one_at_idle_timeout() {
        let expiry = |retirement: &Arc<Retirement>| Expiry {
            idle_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            sleep: Box::pin(tokio::time::sleep(Duration::MAX / 4)),
            retirement: retirement.clone(),
        };
        let poll = |e: &mut Expiry, status, started_ago: u64| {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let start = Instant::now() - Duration::from_secs(started_ago);
            Pin::new(e).poll(&mut cx, status, start).is_ready()
        };
        // Busy: bounded by the request deadline, not by idle_timeout.
        let busy = Arc::new(Retirement::default());
        let mut e = expiry(&busy);
        assert!(!poll(&mut e, WorkerStatus::Requests, 0));
        assert!(!poll(&mut e, WorkerStatus::Requests, 2));
        assert_eq!(busy.reason(), None);
        assert!(poll(&mut e, WorkerStatus::PostReturn, 6));
        assert_eq!(busy.reason(), Some(Retired::Timeout));
        assert!(busy.torn_down());
        // Idle: bounded by idle_timeout, and nothing is cut.
        let idle = Arc::new(Retirement::default());
        let mut e = expiry(&idle);
        assert!(!poll(&mut e, WorkerStatus::Idle, 0));
        assert!(poll(&mut e, WorkerStatus::Idle, 2));
        assert_eq!(idle.reason(), Some(Retired::Idle));
        assert!(!idle.torn_down(), "nothing was running on it");
    }

    #[test]
    fn the_first_retirement_reason_wins() {
        let r = Retirement::default();
        assert_eq!(r.reason(), None);
        r.set(Retired::MemoryLimit);
        r.set(Retired::Trap);
        assert_eq!(r.reason(), Some(Retired::MemoryLimit));
    }
}
