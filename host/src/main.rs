//! The `berth` command line: `serve` (the default), `new`, `dev`, `check`,
//! `push`, `pull`, `compile` and `version`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use berth_host::app::{self, ServeError};
use berth_host::config::ConfigSource;
use berth_host::config::{Overrides, RegistryConfig};
use berth_host::registry::Registry;
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
    /// A TOML file of secrets (`[modules.NAME.secrets]`, `[admin] token`,
    /// `[registry.credentials.HOST]`), merged over the config file with
    /// its keys' case kept: how the chart delivers its Secret.
    #[arg(long, env = "BERTH_SECRETS_FILE", global = true)]
    secrets_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured modules (the default).
    Serve,
    /// Check a component against the host's world: print its imports and
    /// exports and any import the host cannot satisfy. Exit 1 on problems.
    Check {
        /// The component file, or `oci://REGISTRY/REPOSITORY[:TAG][@DIGEST]`.
        file: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Push a component to an OCI registry as a CNCF Wasm artifact and
    /// print its manifest digest (what `oci = "...@sha256:..."` pins).
    Push {
        /// The component file.
        file: PathBuf,
        /// Where to push: `REGISTRY/REPOSITORY:TAG`.
        reference: String,
        /// A manifest annotation, `KEY=VALUE` (repeatable); adds to or
        /// replaces the `org.opencontainers.image.*` ones Berth sets.
        #[arg(long = "annotation", value_name = "KEY=VALUE", value_parser = key_value)]
        annotations: Vec<(String, String)>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Pull a component from an OCI registry into a file; print the
    /// manifest digest it resolved to.
    Pull {
        /// `REGISTRY/REPOSITORY[:TAG][@DIGEST]`.
        reference: String,
        /// The file to write.
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Start a module project from a template: `berth new --template rust
    /// hello`, then `cd hello` and `berth dev`.
    New {
        /// The module's name: lowercase letters, digits and `-`; also the
        /// project's directory.
        #[arg(required_unless_present = "list")]
        name: Option<String>,
        /// The template (`--list` shows them).
        #[arg(long, short, default_value = "rust")]
        template: String,
        /// The path prefix the module serves (default: `/NAME`).
        #[arg(long)]
        route: Option<String>,
        /// Where to create the project's directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// List the templates.
        #[arg(long)]
        list: bool,
    },
    /// Build, serve and rebuild on change: runs each module's `build`,
    /// serves the project's berth.toml with this host, and on a change to a
    /// module's `watch` globs rebuilds it and swaps it in.
    Dev {
        /// The project directory, holding berth.toml (`--config` names
        /// another file).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Compile every module and canary of the config into a folder that
    /// `runtime.prebuilt_dir` names, so that pods start without compiling:
    /// run it where the image is built, with the pods' own config (set
    /// `runtime.compile_target = "portable"` unless every node has the
    /// build machine's CPU).
    Compile {
        /// The folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the version.
    Version,
}

/// How `push`, `pull` and `check` reach a registry; `[registry]` of the
/// config file, as flags.
#[derive(clap::Args, Clone, Default)]
struct RegistryArgs {
    /// A Docker `config.json` with credentials (repeatable; default:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
    #[arg(long = "auth-file", value_name = "FILE")]
    auth_files: Vec<PathBuf>,
    /// Extra CA certificates (PEM) to trust besides the platform's.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// A registry to speak plain HTTP to (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
}

impl RegistryArgs {
    fn client(&self) -> anyhow::Result<Registry> {
        let config = RegistryConfig {
            auth_files: self.auth_files.clone(),
            ca_file: self.ca_file.clone(),
            insecure_registries: self.insecure_registries.clone(),
            ..RegistryConfig::default()
        };
        Ok(Registry::new(&config)?)
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Version => {
            println!("berth {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check {
            file,
            json,
            registry,
        } => check(&file, json, &registry),
        Command::Push {
            file,
            reference,
            annotations,
            registry,
        } => push(&file, &reference, annotations, &registry),
        Command::Pull {
            reference,
            output,
            registry,
        } => pull(&reference, &output, &registry),
        Command::New {
            name,
            template,
            route,
            dir,
            list,
        } => new(name.as_deref(), &template, route.as_deref(), &dir, list),
        Command::Dev { dir } => dev(&dir, cli.serve),
        Command::Compile { out } => compile(&out, cli.serve),
        Command::Serve => serve(cli.serve),
    }
}

/// `berth compile`: an entry per module and canary in `out`, written with
/// the same engine settings `serve` would use for this config.
fn compile(out: &std::path::Path, args: ServeArgs) -> ExitCode {
    let source = ConfigSource {
        file: args.config,
        overrides: Overrides {
            secrets_file: args.secrets_file,
            ..Overrides::default()
        },
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let specs: Vec<_> = config
        .module_specs()
        .into_iter()
        .chain(config.canary_specs().into_iter().map(|c| c.module))
        .collect();
    if specs.is_empty() {
        return fail(EXIT_CONFIG, "the config names no modules to compile");
    }
    if let Err(e) = berth_host::runtime::output_dir(out) {
        return fail(1, format!("--out {}: {e}", out.display()));
    }
    let opts = RuntimeOptions {
        // Nothing is served: no compile cache, and no prebuilt folder
        // (the one being written may be it).
        cache_dir: None,
        prebuilt_dir: None,
        ..RuntimeOptions::from_config(&config)
    };
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|rt| {
            let runtime = Runtime::new(&opts)?;
            rt.block_on(async {
                for spec in &specs {
                    let path = berth_host::runtime::prebuild(&runtime, spec, out).await?;
                    println!("{}: {}", spec.name, path.display());
                }
                anyhow::Ok(())
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_CONFIG, format!("{e:#}")),
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
        secrets_file: args.secrets_file,
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

fn new(
    name: Option<&str>,
    template: &str,
    route: Option<&str>,
    parent: &std::path::Path,
    list: bool,
) -> ExitCode {
    use berth_host::scaffold::{TEMPLATES, Template};
    if list {
        for t in TEMPLATES {
            println!("{:<8} {}", t.name, t.about);
        }
        return ExitCode::SUCCESS;
    }
    let name = name.unwrap_or_default();
    let created = Template::find(template)
        .and_then(|t| berth_host::scaffold::create(t, name, route, parent).map(|dir| (t, dir)));
    let (template, dir) = match created {
        Ok(done) => done,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    println!(
        "created {name} from the {} template in {}",
        template.name,
        dir.display()
    );
    let missing = template.missing_tools();
    for tool in &missing {
        eprintln!("berth: to build it: {}", tool.hint());
    }
    println!("next:\n  cd {}\n  berth dev", dir.display());
    ExitCode::SUCCESS
}

fn dev(dir: &std::path::Path, args: ServeArgs) -> ExitCode {
    let options = berth_host::dev::DevOptions {
        config: args.config.unwrap_or_else(|| dir.join("berth.toml")),
        overrides: Overrides {
            listen: args.listen,
            admin_listen: args.admin_listen,
            secrets_file: args.secrets_file,
        },
    };
    let result = block_on(async {
        let mut signals = Signals::install().context("installing signal handlers")?;
        berth_host::dev::run(options, async move { signals.next().await }).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_CONFIG, format!("{e:#}")),
    }
}

/// Runs one registry operation on a small runtime of its own.
fn block_on<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

fn push(
    file: &std::path::Path,
    reference: &str,
    extra: Vec<(String, String)>,
    registry: &RegistryArgs,
) -> ExitCode {
    let result = block_on(async {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let size = bytes.len();
        let parsed = berth_host::registry::parse(reference)?;
        // No time of its own: the same bytes pushed twice give the same
        // digest, so one digest can be promoted from dev to prod.
        // SOURCE_DATE_EPOCH (the reproducible-builds convention) dates it.
        let mut annotations = BTreeMap::new();
        if let Ok(epoch) = std::env::var("SOURCE_DATE_EPOCH") {
            let secs: u64 = epoch.trim().parse().with_context(|| {
                format!("SOURCE_DATE_EPOCH `{epoch}` is not a number of seconds")
            })?;
            annotations.insert(
                "org.opencontainers.image.created".to_owned(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
                )
                .to_string(),
            );
        }
        if let Some(title) = file.file_name() {
            annotations.insert(
                "org.opencontainers.image.title".into(),
                title.to_string_lossy().into_owned(),
            );
        }
        if let Some(tag) = parsed.tag() {
            annotations.insert("org.opencontainers.image.version".into(), tag.to_owned());
        }
        annotations.extend(extra);
        let digest = registry
            .client()?
            .push(bytes, reference, annotations)
            .await?;
        eprintln!(
            "pushed {} ({size} bytes) to {reference}; pin it as {}/{}@{digest}",
            file.display(),
            parsed.registry(),
            parsed.repository()
        );
        Ok(digest)
    });
    match result {
        Ok(digest) => {
            println!("{digest}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("{e:#}")),
    }
}

fn pull(reference: &str, output: &std::path::Path, registry: &RegistryArgs) -> ExitCode {
    let result = block_on(async {
        let pulled = registry.client()?.pull(reference, None, "-").await?;
        let tmp = output.with_extension("part");
        std::fs::write(&tmp, &pulled.bytes)
            .and_then(|()| std::fs::rename(&tmp, output))
            .with_context(|| format!("cannot write {}", output.display()))?;
        eprintln!(
            "pulled {} ({} bytes, sha256 {}) into {}",
            pulled.pinned,
            pulled.bytes.len(),
            pulled.sha256,
            output.display()
        );
        Ok(pulled.manifest_digest)
    });
    match result {
        Ok(digest) => {
            println!("{digest}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("{e:#}")),
    }
}

fn check(file: &str, json: bool, registry: &RegistryArgs) -> ExitCode {
    let runtime = match Runtime::new(&RuntimeOptions::for_check()) {
        Ok(r) => r,
        Err(e) => return fail(1, format!("{e:#}")),
    };
    let report = if let Some(reference) = file.strip_prefix("oci://") {
        let pulled = block_on(async { Ok(registry.client()?.pull(reference, None, "-").await?) });
        match pulled {
            Ok(p) => berth_host::runtime::check_bytes(&runtime, "module", file, p.bytes),
            Err(e) => return fail(1, format!("{e:#}")),
        }
    } else {
        match berth_host::runtime::check_file(&runtime, std::path::Path::new(file)) {
            Ok(r) => r,
            Err(e) => return fail(1, format!("{e:#}")),
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!("{file}:");
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
