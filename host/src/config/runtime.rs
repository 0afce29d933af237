//! `[runtime]`: engine and module-loading settings.

use std::path::PathBuf;
use std::time::Duration;

use figment::value::magic::RelativePathBuf;
use serde::{Deserialize, Serialize};

use super::values::{ByteSize, MAX_REQUEST_DURATION, check_duration};
use super::{ConfigError, rejected};

/// Engine and module-loading settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Folder that relative module `file`s are resolved against. A relative
    /// folder given in the config file is relative to that file.
    pub modules_dir: RelativePathBuf,
    /// Instances that may exist at once across all modules (sizes the
    /// pooling allocator).
    pub max_instances: u32,
    /// Threads that serve requests; unset, one per CPU this process may use
    /// (its affinity mask and cgroup CPU quota). With one thread a
    /// single-threaded scheduler runs everything on it, with no cross-thread
    /// wake-ups: 10% less CPU per hello request, 30% less with tracing and
    /// access logs on (bench/NOTES.md).
    pub worker_threads: Option<u32>,
    /// Period of the shared epoch ticker that enforces guest deadlines.
    #[serde(with = "humantime_serde")]
    pub epoch_tick: Duration,
    /// Folder for precompiled modules and downloaded ones, keyed by
    /// content hash and engine; empty disables the cache.
    pub cache_dir: PathBuf,
    /// Most the compile cache may hold; older entries are pruned (the
    /// live modules' always stay). Keep it under the volume's size limit.
    pub cache_max_size: ByteSize,
    /// Watch `modules_dir` and the config file, and swap in what changes.
    pub watch: bool,
    /// Backstop for the watcher: look for changes this often anyway.
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Dirty memory of a finished instance reset in place (memset) instead
    /// of returned to the kernel, saving the `madvise` and the page faults of
    /// the next request. Unset: 256 KiB where the kernel offers `PAGEMAP_SCAN`
    /// (Linux 6.7+, which finds the dirty pages), otherwise 0, since without
    /// it the first `keep_resident` bytes are reset whether touched or not.
    pub keep_resident: Option<ByteSize>,
    /// How long the host must have started or ended no instance before it
    /// returns the memory of warm, unused instance slots
    /// (`Engine::release_idle_pool_memory`) and the allocator's freed heap
    /// to the kernel, once per quiet spell; `0s` never does.
    #[serde(with = "humantime_serde")]
    pub release_idle_after: Duration,
    /// Finished instances whose memory is returned to the kernel together.
    pub decommit_batch: u32,
    /// Map module memory images copy-on-write (best for large guests) rather
    /// than copying their data into each instance, which only helps small
    /// guests on kernels without `PAGEMAP_SCAN` (see bench/NOTES.md).
    pub memory_cow: bool,
    /// The CPU compiled code is for: `native` (this machine's, every
    /// feature it has) or `portable` (any x86-64-v2 or aarch64 machine), so
    /// that code compiled elsewhere (`berth compile`, a prebuilt folder in
    /// the image) loads on every node of a cluster.
    pub compile_target: CompileTarget,
    /// A read-only folder of compiled components that `berth compile`
    /// wrote (into an image, typically), looked in before `cache_dir`.
    /// Compiled for another engine or CPU, an entry is not used.
    pub prebuilt_dir: Option<PathBuf>,
}

/// What compiled code may assume of the CPU.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CompileTarget {
    /// This machine's CPU, with every feature it has.
    #[default]
    Native,
    /// Any machine of this architecture: x86-64-v2 (SSE4.2, POPCNT) on
    /// x86-64, the base architecture elsewhere.
    Portable,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            modules_dir: RelativePathBuf::from("/modules"),
            max_instances: 1000,
            worker_threads: None,
            epoch_tick: Duration::from_millis(10),
            cache_dir: std::env::temp_dir().join("berth-cache"),
            cache_max_size: ByteSize(200 << 20),
            watch: true,
            rescan_interval: Duration::from_secs(30),
            keep_resident: None,
            release_idle_after: Duration::from_secs(30),
            decommit_batch: 1,
            memory_cow: true,
            compile_target: CompileTarget::Native,
            prebuilt_dir: None,
        }
    }
}

/// Most instances the pooling allocator may be sized for (it reserves
/// address space for every one).
const MAX_INSTANCES: u32 = 100_000;
/// The longest `release_idle_after` that may be set (`0s` turns the
/// release off instead).
const MAX_RELEASE_IDLE_AFTER: Duration = Duration::from_secs(3600);

impl RuntimeConfig {
    /// What types alone cannot check in `[runtime]`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.max_instances == 0 {
            return Err(rejected("runtime.max_instances", "must be at least 1"));
        }
        if self.worker_threads == Some(0) {
            return Err(rejected("runtime.worker_threads", "must be at least 1"));
        }
        check_duration(
            "runtime.epoch_tick",
            self.epoch_tick,
            Duration::from_secs(1),
        )?;
        check_duration(
            "runtime.rescan_interval",
            self.rescan_interval,
            MAX_REQUEST_DURATION,
        )?;
        check_duration(
            "runtime.release_idle_after",
            self.release_idle_after,
            MAX_RELEASE_IDLE_AFTER,
        )?;
        if self.epoch_tick.is_zero() {
            return Err(rejected("runtime.epoch_tick", "must be longer than 0s"));
        }
        if self.max_instances > MAX_INSTANCES {
            return Err(rejected(
                "runtime.max_instances",
                format!("must be at most {MAX_INSTANCES}"),
            ));
        }
        if self.decommit_batch > self.max_instances {
            return Err(rejected(
                "runtime.decommit_batch",
                "must be at most runtime.max_instances",
            ));
        }
        if let Some(dir) = &self.prebuilt_dir
            && !dir.is_absolute()
        {
            return Err(rejected(
                "runtime.prebuilt_dir",
                format!("`{}` must be an absolute path", dir.display()),
            ));
        }
        if self.rescan_interval.is_zero() {
            return Err(rejected(
                "runtime.rescan_interval",
                "must be longer than 0s",
            ));
        }
        Ok(())
    }
}
