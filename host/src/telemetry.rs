//! Logging set-up: JSON lines on stdout (or a human format with
//! `LOG_FORMAT=pretty`), filtered by `LOG_LEVEL` (a level or `RUST_LOG`-style
//! directives; `RUST_LOG` is read when `LOG_LEVEL` is unset). Lines are
//! written by a background thread so a slow stdout does not stall requests.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Keeps the log writer alive; dropping it flushes what is buffered.
#[must_use = "dropping the guard stops the log writer"]
pub struct TelemetryGuard {
    _writer: WorkerGuard,
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

/// Installs the global subscriber.
pub fn init(filter: EnvFilter, format: LogFormat) -> TelemetryGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        // Block rather than drop lines if stdout falls this far behind.
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
    TelemetryGuard { _writer: guard }
}
