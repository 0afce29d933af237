//! The `berth` command line: `serve` (the default), `check` and `version`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use berth_host::app::{self, ServeError};
use berth_host::config::ConfigSource;
use berth_host::config::Overrides;
use berth_host::runtime::{Runtime, RuntimeOptions};
use berth_host::signal::Signals;
use berth_host::telemetry;

/// Exit code for bad configuration or modules.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Serve WebAssembly components as microservices"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args, Clone, Default)]
struct ServeArgs {
    /// Config file (default: /etc/berth/berth.toml when present).
    #[arg(long, short, env = "BERTH_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Traffic address, overrides `server.listen`.
    #[arg(long, global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Admin address, overrides `admin.listen`.
    #[arg(long, global = true)]
    admin_listen: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured modules (the default).
    Serve,
    /// Check a component against the host's world: print its imports and
    /// exports and any import the host cannot satisfy. Exit 1 on problems.
    Check {
        /// The component file.
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Version => {
            println!("berth {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { file, json } => check(&file, json),
        Command::Serve => serve(cli.serve),
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("berth: {message}");
    ExitCode::from(code)
}

fn serve(args: ServeArgs) -> ExitCode {
    let (filter, format) = match telemetry::settings_from_env() {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let overrides = Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
    };
    let source = ConfigSource {
        file: args.config,
        overrides,
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let _guard = match telemetry::init(filter, format) {
        Ok(g) => g,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let ignored = berth_host::config::ignored_env_vars();
    if !ignored.is_empty() {
        tracing::warn!(
            variables = ?ignored,
            "ignoring BERTH_ variables that name no config section (Kubernetes service links?)"
        );
    }
    // On one CPU, the multi-threaded scheduler's cross-thread wake-ups and
    // work-stealing bookkeeping buy nothing and cost 10-30% per request.
    let threads = config.worker_threads();
    let (mut builder, scheduler) = match threads {
        1 => (
            tokio::runtime::Builder::new_current_thread(),
            "current-thread",
        ),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            (b, "multi-thread")
        }
    };
    tracing::info!(worker_threads = threads, scheduler, "async runtime");
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the async runtime: {e}")),
    };
    let result = rt.block_on(async {
        // Installed before anything slow, so a pod deleted while it starts
        // is not ignored. The first signal starts the drain; the next one
        // ends the process at once.
        let mut signals = Signals::install().context("installing signal handlers")?;
        let listeners = app::Listeners::bind(&config).await?;
        let shutdown = async move {
            let name = signals.next().await;
            signals.exit_on_next();
            name
        };
        app::run(config, source, listeners, shutdown).await
    });
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = match err {
                ServeError::Load(_) => EXIT_CONFIG,
                ServeError::Other(_) => 1,
            };
            tracing::error!(error = %format!("{err:#}"), "berth cannot start");
            // The log writer is asynchronous; say it on stderr as well so
            // the cause is next to the exit code.
            eprintln!("berth: {err:#}");
            ExitCode::from(code)
        }
    };
    // Guests stuck past the grace period must not hold up the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

fn check(file: &std::path::Path, json: bool) -> ExitCode {
    let runtime = match Runtime::new(&RuntimeOptions::for_check()) {
        Ok(r) => r,
        Err(e) => return fail(1, format!("{e:#}")),
    };
    let report = match berth_host::runtime::check_file(&runtime, file) {
        Ok(r) => r,
        Err(e) => return fail(1, format!("{e:#}")),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!("{}:", file.display());
        if let Some(world) = report.world {
            println!("  world: {}", world.as_str());
        }
        println!("  exports:");
        for e in &report.exports {
            println!("    {e}");
        }
        println!("  imports:");
        for i in &report.imports {
            let missing = report.unsatisfied.iter().any(|u| &u.name == i);
            println!("    {i}{}", if missing { "  MISSING" } else { "" });
        }
        if !report.http_handler {
            println!(
                "  exports neither wasi:http/incoming-handler@0.2.x nor wasi:http/handler@0.3.x"
            );
        }
        match &report.error {
            None => println!("ok: the host can serve this component"),
            Some(e) => println!("error: {e}"),
        }
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
