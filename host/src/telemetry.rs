//! Logging and tracing set-up.
//!
//! Logs: JSON lines on stdout (or a human format with `LOG_FORMAT=pretty`),
//! filtered by `LOG_LEVEL` (a level or `RUST_LOG`-style directives;
//! `RUST_LOG` is read when `LOG_LEVEL` is unset), written by a background
//! thread so a slow stdout does not stall requests: when it falls 64k lines
//! behind, lines are dropped and counted (`berth_log_lines_dropped_total`)
//! rather than blocking the traffic threads. A write to stdout that stays
//! blocked fails liveness ([`log_writer_stalled`]).
//!
//! Traces: exported with OTLP over HTTP/protobuf when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, in
//! batches, configured by the standard `OTEL_*` variables
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`). Without an endpoint no span is
//! made at all (see [`tracing_enabled`]). `https://` endpoints are
//! verified against the platform's roots (`SSL_CERT_FILE` and
//! `SSL_CERT_DIR` name others).

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
/// When the write to stdout in progress began, in ms since [`EPOCH`]; 0
/// while none is.
static WRITE_SINCE: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ms() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    (epoch.elapsed().as_millis() as u64).max(1)
}

/// Log lines dropped so far because stdout fell behind.
pub fn dropped_log_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// How long the current write to stdout has been blocked, if longer than
/// `limit` (a full pipe nobody drains: the log collector is gone).
pub fn log_writer_stalled(limit: Duration) -> Option<Duration> {
    let since = WRITE_SINCE.load(Ordering::Relaxed);
    if since == 0 {
        return None;
    }
    let blocked = Duration::from_millis(now_ms().saturating_sub(since));
    (blocked > limit).then_some(blocked)
}

/// Stdout, noting when each write starts and ends.
struct WatchedStdout(std::io::Stdout);

impl Write for WatchedStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        WRITE_SINCE.store(now_ms(), Ordering::Relaxed);
        let written = self.0.write(buf);
        WRITE_SINCE.store(0, Ordering::Relaxed);
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        WRITE_SINCE.store(now_ms(), Ordering::Relaxed);
        let flushed = self.0.flush();
        WRITE_SINCE.store(0, Ordering::Relaxed);
        flushed
    }
}

/// Longest log line written. The fmt layer writes each event as one
/// `write`, so a longer one is replaced whole by a line that says so and
/// keeps its start: an error text from outside (a registry's body, a
/// guest's) can never make a megabyte line.
pub const MAX_LOG_LINE: usize = 64 << 10;

/// `text` cut to at most `max` bytes on a character boundary, with `…`
/// when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    format!("{}…", &text[..text.floor_char_boundary(max)])
}

/// Caps each line a writer of `M` is given (see [`MAX_LOG_LINE`]).
struct Capped<M> {
    inner: M,
    json: bool,
}

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Capped<M>
{
    type Writer = CappedWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        CappedWriter {
            inner: self.inner.make_writer(),
            json: self.json,
        }
    }
}

struct CappedWriter<W> {
    inner: W,
    json: bool,
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One event is one line. JSON escapes line breaks inside values; the
        // human format does not, so a newline a guest logs (or a client
        // sends in a value a guest logs) would start a line that reads as
        // an event of its own.
        let body = &buf[..buf.len().saturating_sub(1)];
        if !self.json && body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            let escaped = escape_breaks(buf);
            self.write_line(&escaped)?;
            return Ok(buf.len());
        }
        self.write_line(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> CappedWriter<W> {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if line.len() <= MAX_LOG_LINE {
            return self.inner.write_all(line);
        }
        self.inner.write_all(cut_line(line, self.json).as_bytes())
    }
}

/// `line` with every line break but the last written as `\n` or `\r`.
fn escape_breaks(line: &[u8]) -> Vec<u8> {
    let (body, end) = match line.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (line, &b""[..]),
    };
    let mut out = Vec::with_capacity(line.len() + 16);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out
}

/// The line written instead of one over [`MAX_LOG_LINE`]: still one JSON
/// object in the JSON format.
fn cut_line(line: &[u8], json: bool) -> String {
    let head = truncate(
        &String::from_utf8_lossy(&line[..4096.min(line.len())]),
        4000,
    );
    if json {
        let mut out = serde_json::json!({
            "level": "WARN",
            "target": "berth::log",
            "message": "log line cut: it was over the longest line written",
            "bytes": line.len(),
            "max": MAX_LOG_LINE,
            "head": head,
        })
        .to_string();
        out.push('\n');
        out
    } else {
        format!("{head} … (log line of {} bytes cut)\n", line.len())
    }
}

/// Whether spans are exported; the request path makes none otherwise.
pub fn tracing_enabled() -> bool {
    EXPORT.get().is_some()
}

/// Keeps the log writer and the span exporter alive; dropping it flushes
/// both.
#[must_use = "dropping the guard stops the log writer and the exporter"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    _writer: WorkerGuard,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("berth: flushing traces failed: {e}");
        }
    }
}

/// The output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable, for local use.
    Pretty,
}

/// Reads `LOG_LEVEL`/`RUST_LOG` and `LOG_FORMAT`; errors name the variable.
pub fn settings_from_env() -> Result<(EnvFilter, LogFormat), String> {
    let (var, directives) = match (std::env::var("LOG_LEVEL"), std::env::var("RUST_LOG")) {
        (Ok(v), _) => ("LOG_LEVEL", v),
        (Err(_), Ok(v)) => ("RUST_LOG", v),
        _ => ("LOG_LEVEL", "info".to_owned()),
    };
    let filter = EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| format!("invalid {var} `{directives}`: {e}"))?;
    let filter = quiet_dependencies(filter, &directives);
    let format = match std::env::var("LOG_FORMAT").as_deref() {
        Err(_) | Ok("json") | Ok("") => LogFormat::Json,
        Ok("pretty") | Ok("text") => LogFormat::Pretty,
        Ok(other) => {
            return Err(format!(
                "invalid LOG_FORMAT `{other}`: expected `json` or `pretty`"
            ));
        }
    };
    Ok((filter, format))
}

/// Dependencies whose debug lines are noise or worse, held at `info`
/// unless a directive names them: oci-client logs whole token answers
/// (bearer tokens) at debug, and Cranelift writes hundreds of thousands of
/// lines compiling one large module.
const QUIET: &[&str] = &[
    "oci_client",
    "oci_wasm",
    "cranelift_codegen",
    "cranelift_frontend",
    "wasmtime_cranelift",
    "wasmtime_internal_cranelift",
    "regalloc2",
    "reqwest",
    "hyper_util",
    "h2",
    "rustls",
];

fn quiet_dependencies(mut filter: EnvFilter, directives: &str) -> EnvFilter {
    for target in QUIET {
        if !directives.contains(target) {
            filter = filter.add_directive(
                format!("{target}=info")
                    .parse()
                    .expect("a target and a level make a directive"),
            );
        }
    }
    filter
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// The span exporter the environment asks for, if any, with its sampling
/// and, when the sampler named is one Berth replaces, that sampler.
fn tracer_provider() -> Result<Option<(SdkTracerProvider, Sampling, Option<String>)>, String> {
    let wanted =
        env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v == "none");
    if !wanted || disabled {
        return Ok(None);
    }
    let (sampling, replaced) = Sampling::from_env(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
    )?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the
    // resource's detectors; only the default name is ours.
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("berth");
    }
    let provider = SdkTracerProvider::builder()
        // Berth has sampled already (`Sampling`).
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok(Some((provider, sampling, replaced)))
}

/// Samplers the spec names that need a remote service Berth does not talk
/// to.
const UNIMPLEMENTED: [&str; 3] = ["jaeger_remote", "parentbased_jaeger_remote", "xray"];

/// The samplers of the OpenTelemetry spec Berth implements, read from
/// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Which requests are traced. Berth decides this itself, before it makes
/// any span, and the SDK records whatever it is given (`AlwaysOn`): a
/// request left out then costs nothing, where a span the SDK samples out
/// still goes through the whole tracing layer (measured: 1 % sampling cost
/// +40 % CPU a request that way, as much as tracing all of them). The
/// decisions are the spec's, so the SDK's own sampler is not needed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// `parentbased_*`: a caller's `sampled` flag decides.
    parent_based: bool,
    /// The share of traces sampled where no parent decides.
    ratio: f64,
}

impl Default for Sampling {
    /// The spec's default, `parentbased_always_on`.
    fn default() -> Self {
        Sampling {
            parent_based: true,
            ratio: 1.0,
        }
    }
}

impl Sampling {
    /// The sampler the variables name, and the name given when Berth
    /// samples with the default in its place. A typo or a ratio that is not one is
    /// refused: the SDK would warn and trace every request, the most
    /// expensive setting, at full load.
    fn from_env(
        sampler: Option<&str>,
        arg: Option<&str>,
    ) -> Result<(Sampling, Option<String>), String> {
        // Untrimmed, as other SDKs read them; case-insensitive, as the spec
        // asks of enum values.
        let Some(given) = sampler.filter(|s| !s.is_empty()) else {
            return Ok((Sampling::default(), None));
        };
        let sampler = given.to_ascii_lowercase();
        let sampler = sampler.as_str();
        if UNIMPLEMENTED.contains(&sampler) {
            // Named by the spec and set by tooling (the OpenTelemetry
            // Operator's injection); the SDKs without them fall back to the
            // default, so a pod so configured still starts.
            return Ok((Sampling::default(), Some(given.to_owned())));
        }
        if !SAMPLERS.contains(&sampler) {
            return Err(format!(
                "OTEL_TRACES_SAMPLER={given:?} is not a sampler Berth supports; use one of {}",
                SAMPLERS.join(", ")
            ));
        }
        let ratio = match sampler.trim_start_matches("parentbased_") {
            "always_on" => 1.0,
            "always_off" => 0.0,
            // Without an argument the spec's default, 1.0.
            _ => match arg.filter(|a| !a.is_empty()) {
                None => 1.0,
                Some(arg) => arg
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!(
                            "OTEL_TRACES_SAMPLER_ARG={arg:?} is not a ratio from 0 to 1 (for {sampler}; 0.01 traces 1 % of new traces)"
                        )
                    })?,
            },
        };
        let sampling = Sampling {
            parent_based: sampler.starts_with("parentbased_"),
            ratio,
        };
        Ok((sampling, None))
    }

    /// Whether a request is traced, given its caller's trace id and
    /// `sampled` flag, if it has a caller.
    pub fn sampled(&self, parent: Option<(u128, bool)>) -> bool {
        match parent {
            Some((_, sampled)) if self.parent_based => sampled,
            // The spec's TraceIdRatioBased: the same trace id gets the same
            // answer on every host that uses the ratio.
            Some((trace_id, _)) => {
                (trace_id as u64 >> 1) < (self.ratio * (1u64 << 63) as f64) as u64
            }
            // A new trace: a random draw at the ratio, made before its id
            // exists (the tracing layer picks the id later). Services
            // downstream should follow this decision with a parent-based
            // sampler (the spec's default) rather than draw again by id.
            None => self.ratio >= 1.0 || fastrand::f64() < self.ratio,
        }
    }
}

/// How requests are sampled and the tracer their spans are made with, set
/// once while spans are exported.
static EXPORT: OnceLock<(Sampling, opentelemetry_sdk::trace::SdkTracer)> = OnceLock::new();

/// The tracer request spans are made with, while spans are exported.
pub(crate) fn tracer() -> Option<&'static opentelemetry_sdk::trace::SdkTracer> {
    EXPORT.get().map(|(_, tracer)| tracer)
}

/// Whether a request with this caller (trace id and `sampled` flag) gets
/// spans; false whenever spans are not exported.
pub fn sampled(parent: Option<(u128, bool)>) -> bool {
    EXPORT.get().is_some_and(|(s, _)| s.sampled(parent))
}

/// Installs the global subscriber. Call it before starting any async
/// runtime: the exporter's HTTP client runs its own.
pub fn init(filter: EnvFilter, format: LogFormat) -> Result<TelemetryGuard, String> {
    // The OTLP exporter's HTTP client takes rustls with the process-wide
    // crypto provider and the platform's roots, so `https://` endpoints
    // work, with a private CA through SSL_CERT_FILE.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (writer, guard) = NonBlockingBuilder::default()
        // Drop (and count) rather than block the traffic threads when
        // stdout falls this far behind: a guest that logs in a loop, or a
        // stuck log collector, must not stall every request.
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        // The worker drains every queued line before it flushes, so under
        // load many lines leave in one write(2) instead of one each.
        .finish(std::io::BufWriter::with_capacity(
            64 << 10,
            WatchedStdout(std::io::stdout()),
        ));
    let _ = DROPPED.set(writer.error_counter());
    now_ms();
    // Log lines carry their ids as fields and never print span context, so
    // the log layer skips spans (Berth makes none through `tracing`; a
    // dependency's would only cost formatting).
    // (The hint keeps the filter's maximum level known: without one, `log`
    // records from every dependency would be built and filtered at runtime.)
    let events = filter_fn(|meta| meta.is_event()).with_max_level_hint(LevelFilter::TRACE);
    let filter = filter.and(events);
    let json = format == LogFormat::Json;
    let writer = Capped {
        inner: writer,
        json,
    };
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        // Colours only on a terminal: a file or a pipe gets plain text.
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let (provider, replaced) = match tracer_provider()? {
        Some((provider, sampling, replaced)) => {
            // Spans are made by `trace` with this tracer, not through
            // `tracing`, and have no level: LOG_LEVEL=warn does not drop
            // traces.
            let _ = EXPORT.set((sampling, provider.tracer("berth")));
            (Some(provider), replaced)
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(logs).init();
    if let Some(sampler) = replaced {
        tracing::warn!(
            sampler,
            "this sampler needs a remote sampling service Berth does not use; sampling with parentbased_always_on instead"
        );
    }
    Ok(TelemetryGuard {
        provider,
        _writer: guard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_human_log_line_keeps_a_logged_newline_inside_it() {
        let mut out = Vec::new();
        let mut w = CappedWriter {
            inner: &mut out,
            json: false,
        };
        w.write_all(b"INFO guest: greeted a\n2026 ERROR forged\r\n")
            .unwrap();
        w.write_all(b"INFO plain\n").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "INFO guest: greeted a\\n2026 ERROR forged\\r\nINFO plain\n"
        );
        // JSON escapes its own; its lines pass untouched.
        let mut out = Vec::new();
        let mut w = CappedWriter {
            inner: &mut out,
            json: true,
        };
        w.write_all(b"{\"message\":\"a\\nb\"}\n").unwrap();
        assert_eq!(out, b"{\"message\":\"a\\nb\"}\n");
    }

    #[test]
    fn samplers_are_read_as_the_spec_says_and_bad_ones_refused() {
        let read = |s, a| {
            let (sampling, replaced) = Sampling::from_env(s, a).unwrap();
            assert_eq!(replaced, None, "{s:?}");
            sampling
        };
        let parent = |ratio| Sampling {
            parent_based: true,
            ratio,
        };
        assert_eq!(read(None, None), Sampling::default());
        assert_eq!(read(Some(""), None), parent(1.0));
        assert_eq!(
            read(Some("parentbased_traceidratio"), Some("0.01")),
            parent(0.01)
        );
        assert_eq!(
            read(Some("parentbased_always_off"), Some("junk")),
            parent(0.0)
        );
        let plain = read(Some("traceidratio"), None);
        assert_eq!((plain.parent_based, plain.ratio), (false, 1.0));
        assert_eq!(
            read(Some("ParentBased_TraceIdRatio"), Some("0.5")),
            parent(0.5)
        );
        assert_eq!(
            Sampling::from_env(Some("xray"), None),
            Ok((Sampling::default(), Some("xray".to_owned())))
        );
        let typo = Sampling::from_env(Some("parentbased_ratio"), None).unwrap_err();
        assert!(
            typo.contains("OTEL_TRACES_SAMPLER=\"parentbased_ratio\""),
            "{typo}"
        );
        assert!(typo.contains("parentbased_traceidratio"), "{typo}");
        for arg in ["1%", "1.5", "-0.1", " 0.5", "NaN"] {
            let e = Sampling::from_env(Some("parentbased_traceidratio"), Some(arg)).unwrap_err();
            assert!(e.contains("OTEL_TRACES_SAMPLER_ARG"), "{arg}: {e}");
        }
    }

    #[test]
    fn sampling_decisions_follow_the_parent_or_the_ratio() {
        let none = Sampling {
            parent_based: true,
            ratio: 0.0,
        };
        assert!(none.sampled(Some((7, true))), "a sampled caller decides");
        assert!(!none.sampled(Some((7, false))));
        assert!(!none.sampled(None));
        let all = Sampling {
            parent_based: false,
            ratio: 1.0,
        };
        assert!(
            all.sampled(Some((7, false))),
            "not parent-based: the ratio decides"
        );
        assert!(all.sampled(None));
        // A ratio: about that share of new traces, and always the same
        // answer for one trace id.
        let some = Sampling {
            parent_based: false,
            ratio: 0.25,
        };
        let roots = (0..20_000).filter(|_| some.sampled(None)).count();
        assert!((4_000..6_000).contains(&roots), "{roots} of 20000");
        let ids: Vec<u128> = (0..20_000).map(|_| fastrand::u128(..)).collect();
        let by_id = ids
            .iter()
            .filter(|id| some.sampled(Some((**id, true))))
            .count();
        assert!((4_000..6_000).contains(&by_id), "{by_id} of 20000");
        assert!(
            ids.iter()
                .all(|id| some.sampled(Some((*id, true))) == some.sampled(Some((*id, false))))
        );
    }

    #[test]
    fn a_line_over_the_cap_is_replaced_by_one_that_says_so() {
        let mut out = Vec::new();
        let mut w = CappedWriter {
            inner: &mut out,
            json: true,
        };
        let huge = format!("{{\"message\":\"{}\"}}\n", "x".repeat(MAX_LOG_LINE * 2));
        assert_eq!(w.write(huge.as_bytes()).unwrap(), huge.len());
        let line = String::from_utf8(out).unwrap();
        assert!(line.len() < 8 << 10, "{}", line.len());
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["bytes"], huge.len());
        let mut out = Vec::new();
        CappedWriter {
            inner: &mut out,
            json: true,
        }
        .write_all(b"short\n")
        .unwrap();
        assert_eq!(out, b"short\n");
    }

    #[test]
    fn dependencies_stay_at_info_unless_named() {
        let filter = quiet_dependencies(EnvFilter::new("debug"), "debug");
        let text = filter.to_string();
        assert!(text.contains("oci_client=info"), "{text}");
        let filter = quiet_dependencies(EnvFilter::new("oci_client=trace"), "oci_client=trace");
        assert!(!filter.to_string().contains("oci_client=info"));
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("hi", 2), "hi");
    }
}
