//! `berth dev`: a module author's inner loop on the production host.
//!
//! It runs each module's `build` command, starts `berth serve` with the
//! project's `berth.toml` as a child process (the very host, config and
//! limits of production), then watches the sources: a change reruns the
//! build of the modules whose `watch` globs it matches and asks the host for
//! a reload through its admin port. The reload answers with what it did, so
//! a module that fails to load is reported at once, and the host keeps its
//! last good version serving, as it does for a bad build.
//!
//! The host's own file watcher is turned off in the child: it would see a
//! half-written component while a build writes it. The config file is
//! watched here instead, and a change to it is a reload too.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use globset::GlobSet;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigSource, ModuleSource, Overrides};

/// How long a burst of file events may take to settle before a build.
const SETTLE: Duration = Duration::from_millis(150);

/// Directories that hold builds, dependencies and tools, never sources: a
/// change there never reruns a build (an `npm install` or a `pip install`
/// would otherwise rebuild in a loop).
const NEVER_SOURCES: &[&str] = &[
    ".git",
    "target",
    "node_modules",
    "__pycache__",
    ".venv",
    "dist",
];

/// What a burst of file events calls for.
#[derive(Debug, PartialEq)]
enum Change {
    /// Rerun these builds (indexes into `Project::builds`).
    Sources(BTreeSet<usize>),
    /// The config file changed: read it again and reload.
    Config,
}

/// What `berth dev` was asked for.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The project's config file.
    pub config: PathBuf,
    /// Passed on to `berth serve`.
    pub overrides: Overrides,
}

/// One module `berth dev` rebuilds.
#[derive(Debug)]
struct Build {
    module: String,
    command: String,
    /// `None`: every file of the project outside build and tool
    /// directories.
    watch: Option<GlobSet>,
    output: PathBuf,
}

/// The project as its config file describes it.
#[derive(Debug)]
struct Project {
    /// The config file's directory: where builds run and globs start.
    dir: PathBuf,
    config: Config,
    builds: Vec<Build>,
}

impl Project {
    fn load(options: &DevOptions) -> anyhow::Result<Project> {
        let source = ConfigSource {
            file: Some(options.config.clone()),
            overrides: options.overrides.clone(),
        };
        let config = source.load()?;
        let file = std::path::absolute(&options.config)
            .with_context(|| format!("cannot resolve {}", options.config.display()))?;
        let dir = file.parent().map(Path::to_owned).unwrap_or_default();
        let mut builds = Vec::new();
        for spec in config.module_specs() {
            let module = &config.modules[&spec.name];
            let Some(command) = module.build.clone() else {
                continue;
            };
            let ModuleSource::File { path, .. } = spec.source else {
                bail!(
                    "modules.{}.build: the module must come from `file` (what the build writes)",
                    spec.name
                );
            };
            let fields = module.build_fields();
            let watch = (!module.watch.is_empty())
                .then(|| fields.watch_set(&|k: &str| format!("modules.{}.{k}", spec.name)))
                .transpose()?;
            builds.push(Build {
                module: spec.name.clone(),
                command,
                watch,
                output: path,
            });
        }
        if builds.is_empty() {
            bail!(
                "no module of {} has a `build` command: add `build = \"...\"` (and `watch = [...]`) \
                 to a [modules.NAME] section",
                file.display()
            );
        }
        Ok(Project {
            dir,
            config,
            builds,
        })
    }

    /// What a change of `path` (absolute) calls for.
    fn affected(&self, path: &Path, config_file: &Path) -> Change {
        if path == config_file {
            return Change::Config;
        }
        let mut hit = BTreeSet::new();
        let Ok(rel) = path.strip_prefix(&self.dir) else {
            return Change::Sources(hit);
        };
        if self.builds.iter().any(|b| b.output == path) {
            return Change::Sources(hit);
        }
        let in_build_dir = rel.components().any(|c| match c {
            Component::Normal(part) => NEVER_SOURCES.iter().any(|n| part == *n),
            _ => false,
        });
        if in_build_dir {
            return Change::Sources(hit);
        }
        for (i, build) in self.builds.iter().enumerate() {
            let wanted = build.watch.as_ref().is_none_or(|globs| globs.is_match(rel));
            if wanted {
                hit.insert(i);
            }
        }
        Change::Sources(hit)
    }
}

/// Runs the loop until `shutdown` resolves or the host exits.
pub async fn run(
    options: DevOptions,
    shutdown: impl Future<Output = &'static str>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let config_file = std::path::absolute(&options.config)
        .with_context(|| format!("cannot resolve {}", options.config.display()))?;
    let mut project = Project::load(&options)?;
    let (tx, mut changes) = mpsc::unbounded_channel();
    let _watcher = watch(&project.dir, tx)?;

    for build in &project.builds {
        run_build(build, &project.dir).await;
    }
    // The host cannot start without every module's file: wait for builds
    // that fix them.
    loop {
        let missing: Vec<_> = project
            .builds
            .iter()
            .filter(|b| !b.output.is_file())
            .collect();
        if missing.is_empty() {
            break;
        }
        for b in &missing {
            say(&format!(
                "{} has no build yet ({} is missing): waiting for a change to its sources",
                b.module,
                b.output.display()
            ));
        }
        tokio::select! {
            change = next_change(&mut changes, &project, &config_file) => {
                project = rebuild(project, change, &options).await.0;
            }
            signal = &mut shutdown => {
                say(&format!("{signal}: stopping"));
                return Ok(());
            }
        }
    }

    let token = admin_token(&project.config)?;
    let mut host = spawn_host(&options, token.generated.as_deref())?;
    let admin = Admin {
        client: Client::builder(TokioExecutor::new()).build_http(),
        addr: project.config.admin.listen,
        token: token.value,
    };
    tokio::select! {
        ready = admin.wait_ready(&project) => ready?,
        exit = host.wait() => bail!("the host exited while starting ({})", describe(exit)),
        signal = &mut shutdown => {
            say(&format!("{signal}: stopping"));
            return stop(host).await;
        }
    }
    print_urls(&project.config);

    loop {
        tokio::select! {
            change = next_change(&mut changes, &project, &config_file) => {
                let built;
                (project, built) = rebuild(project, change, &options).await;
                if built {
                    admin.reload().await;
                }
            }
            exit = host.wait() => bail!("the host exited ({})", describe(exit)),
            signal = &mut shutdown => {
                say(&format!("{signal}: stopping"));
                return stop(host).await;
            }
        }
    }
}

/// Prints a line of `berth dev`'s own, apart from the host's logs.
fn say(line: &str) {
    eprintln!("berth dev: {line}");
}

fn describe(exit: std::io::Result<std::process::ExitStatus>) -> String {
    match exit {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    }
}

/// Waits for a burst of changes that calls for something.
async fn next_change(
    changes: &mut mpsc::UnboundedReceiver<PathBuf>,
    project: &Project,
    config_file: &Path,
) -> Change {
    loop {
        let Some(first) = changes.recv().await else {
            // The watcher is gone (it lives as long as the loop does).
            return std::future::pending().await;
        };
        let mut paths = vec![first];
        tokio::time::sleep(SETTLE).await;
        while let Ok(p) = changes.try_recv() {
            paths.push(p);
        }
        let mut builds = BTreeSet::new();
        for path in &paths {
            match project.affected(path, config_file) {
                Change::Config => return Change::Config,
                Change::Sources(hit) => builds.extend(hit),
            }
        }
        if !builds.is_empty() {
            return Change::Sources(builds);
        }
    }
}

/// Reruns the builds of a change, or re-reads the config after a change to
/// it (keeping the old one if the new one is invalid: the host says why
/// when it reloads). Returns whether the host has something new to load.
async fn rebuild(project: Project, change: Change, options: &DevOptions) -> (Project, bool) {
    match change {
        Change::Sources(builds) => {
            let mut built = false;
            for i in builds {
                built |= run_build(&project.builds[i], &project.dir).await;
            }
            (project, built)
        }
        Change::Config => {
            say("berth.toml changed: reloading");
            match Project::load(options) {
                Ok(new) => (new, true),
                Err(e) => {
                    say(&format!("{e:#}"));
                    (project, true)
                }
            }
        }
    }
}

/// Runs one build with the terminal as its output, so its errors keep the
/// compiler's own formatting. Returns whether it succeeded.
async fn run_build(build: &Build, dir: &Path) -> bool {
    say(&format!("building {}: {}", build.module, build.command));
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(&build.command)
        .current_dir(dir)
        .kill_on_drop(true)
        .status()
        .await;
    let took = started.elapsed().as_secs_f64();
    match status {
        Ok(s) if s.success() => {
            say(&format!("built {} in {took:.1} s", build.module));
            true
        }
        Ok(s) => {
            say(&format!(
                "the build of {} failed ({s}) after {took:.1} s; the last good version keeps serving",
                build.module
            ));
            false
        }
        Err(e) => {
            say(&format!(
                "cannot run the build of {} with sh: {e}",
                build.module
            ));
            false
        }
    }
}

/// Forwards file events (absolute paths) under `dir`.
fn watch(
    dir: &Path,
    tx: mpsc::UnboundedSender<PathBuf>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        for path in event.paths {
            let _ = tx.send(path);
        }
    };
    // Not through symlinks: a linked build or dependency directory would
    // cost a watch per directory of it, and is no one's source.
    let config = notify::Config::default().with_follow_symlinks(false);
    let mut watcher =
        notify::RecommendedWatcher::new(handler, config).context("cannot start a file watcher")?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(watcher)
}

/// The admin token `berth dev` reloads with.
struct Token {
    value: String,
    /// Set when the config has none: handed to the host in its environment.
    generated: Option<String>,
}

fn admin_token(config: &Config) -> anyhow::Result<Token> {
    if let Some(file) = &config.admin.token_file {
        let value = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read admin.token_file {}", file.display()))?;
        return Ok(Token {
            value: value.trim().to_owned(),
            generated: None,
        });
    }
    if let Some(token) = &config.admin.token {
        return Ok(Token {
            value: token.0.0.clone(),
            generated: None,
        });
    }
    // Anyone who can reach the admin port could reload with it: from the
    // OS's generator, as a credential should be.
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
    let value = hex::encode(bytes);
    Ok(Token {
        value: value.clone(),
        generated: Some(value),
    })
}

fn spawn_host(options: &DevOptions, token: Option<&str>) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the berth binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg("--config").arg(&options.config);
    let o = &options.overrides;
    if let Some(listen) = o.listen {
        cmd.arg("--listen").arg(listen.to_string());
    }
    if let Some(admin) = o.admin_listen {
        cmd.arg("--admin-listen").arg(admin.to_string());
    }
    if let Some(secrets) = &o.secrets_file {
        cmd.arg("--secrets-file").arg(secrets);
    }
    cmd.env("BERTH_RUNTIME__WATCH", "false");
    if let Some(token) = token {
        cmd.env("BERTH_ADMIN__TOKEN", token);
    }
    if std::env::var_os("LOG_FORMAT").is_none() && std::io::stdout().is_terminal() {
        cmd.env("LOG_FORMAT", "pretty");
    }
    cmd.kill_on_drop(true)
        .spawn()
        .context("cannot start berth serve")
}

/// Asks the host to drain, as Kubernetes would, and waits for it.
async fn stop(mut host: Child) -> anyhow::Result<()> {
    if let Some(pid) = host
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    host.wait().await.context("waiting for the host")?;
    Ok(())
}

fn print_urls(config: &Config) {
    for (name, module) in &config.modules {
        say(&format!(
            "{name} is serving at http://{}{}",
            config.server.listen, module.route
        ));
    }
}

/// The host's admin port, as `berth dev` uses it.
struct Admin {
    client: Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    token: String,
}

impl Admin {
    async fn wait_ready(&self, project: &Project) -> anyhow::Result<()> {
        let progress = Progress::start(format!("starting {}", sizes(project)));
        loop {
            let uri = format!("http://{}/ready", self.addr);
            if let Ok(resp) = self.client.get(uri.parse()?).await
                && resp.status().is_success()
            {
                progress.finish("ready");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reloads and reports what the host did with each module.
    async fn reload(&self) {
        let progress = Progress::start("reloading".to_owned());
        let request = hyper::Request::post(format!("http://{}/admin/reload", self.addr))
            .header("authorization", format!("Bearer {}", self.token))
            .body(Empty::new());
        let answer = match request {
            Ok(request) => self
                .client
                .request(request)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        let report = match answer {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                match body.map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
                    Ok(Ok(report)) => report,
                    _ => {
                        progress.finish(&format!("the reload failed ({status})"));
                        return;
                    }
                }
            }
            Err(e) => {
                progress.finish(&format!("cannot reach the host's admin port: {e:#}"));
                return;
            }
        };
        progress.finish(&describe_report(&report));
    }
}

/// One line about a reload report: what changed, what failed.
fn describe_report(report: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    if let Some(e) = report["config_error"].as_str() {
        parts.push(format!(
            "berth.toml rejected, the running config stays: {e}"
        ));
    }
    let list = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let changed = list("changed");
    if !changed.is_empty() {
        parts.push(format!("now serving the new {}", changed.join(", ")));
    }
    if let Some(errors) = report["errors"].as_object() {
        for (module, why) in errors {
            parts.push(format!(
                "{module} failed to load, its last good version keeps serving: {}",
                why.as_str().unwrap_or_default()
            ));
        }
    }
    if parts.is_empty() {
        "reloaded: nothing changed".to_owned()
    } else {
        parts.join("; ")
    }
}

/// `NAME.wasm (12.2 MiB)` for each module file present.
fn sizes(project: &Project) -> String {
    project
        .builds
        .iter()
        .map(|b| {
            let name = b.output.file_name().unwrap_or_default().to_string_lossy();
            let mib = std::fs::metadata(&b.output).map_or(0.0, |m| m.len() as f64 / 1048576.0);
            format!("{name} ({mib:.1} MiB)")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A line that counts the seconds of a long step on a terminal, and says
/// how it ended everywhere.
struct Progress {
    label: String,
    started: Instant,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(label: String) -> Progress {
        let started = Instant::now();
        let ticker = std::io::stderr().is_terminal().then(|| {
            let label = label.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    eprint!(
                        "\r\x1b[2Kberth dev: {label}… {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
            })
        });
        Progress {
            label,
            started,
            ticker,
        }
    }

    fn finish(self, outcome: &str) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
            eprint!("\r\x1b[2K");
        }
        say(&format!(
            "{}: {outcome} ({:.1} s)",
            self.label,
            self.started.elapsed().as_secs_f64()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(dir: &Path, toml: &str) -> anyhow::Result<Project> {
        let file = dir.join("berth.toml");
        std::fs::write(&file, toml).unwrap();
        Project::load(&DevOptions {
            config: file,
            overrides: Overrides::default(),
        })
    }

    const TWO: &str = r#"
[runtime]
modules_dir = "."
[modules.web]
file = "web/dist/web.wasm"
route = "/web"
build = "npm run build"
watch = ["web/src/**"]
[modules.api]
file = "target/api.wasm"
route = "/api"
build = "cargo build"
[modules.plain]
file = "plain.wasm"
route = "/plain"
"#;

    #[test]
    fn a_change_reruns_only_the_builds_that_watch_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = project(tmp.path(), TWO).unwrap();
        let config = p.dir.join("berth.toml");
        let names = |path: &str| -> Vec<&str> {
            let Change::Sources(hit) = p.affected(&p.dir.join(path), &config) else {
                panic!("{path} is not a source");
            };
            hit.into_iter()
                .map(|i| p.builds[i].module.as_str())
                .collect()
        };
        // `api` watches everything but build outputs; `web` only its globs.
        assert_eq!(names("web/src/app.ts"), ["api", "web"]);
        assert_eq!(names("src/lib.rs"), ["api"]);
        assert_eq!(names("target/debug/x.o"), Vec::<&str>::new());
        assert_eq!(names("web/node_modules/x/index.js"), Vec::<&str>::new());
        assert_eq!(names("web/src/.venv/x.py"), Vec::<&str>::new());
        // Its own output never reruns a build, even where a glob says so.
        assert_eq!(names("web/dist/web.wasm"), Vec::<&str>::new());
        assert_eq!(p.affected(&config, &config), Change::Config);
        assert_eq!(
            p.affected(Path::new("/elsewhere/x"), &config),
            Change::Sources(BTreeSet::new())
        );
    }

    #[test]
    fn a_project_without_builds_or_with_a_build_of_no_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = project(
            tmp.path(),
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("no module of"), "{err}");
        let err = project(
            tmp.path(),
            "[modules.a]\noci = \"r.example/a@sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nroute = \"/a\"\nbuild = \"make\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("modules.a.build"), "{err:#}");
    }

    #[test]
    fn a_reload_report_reads_as_one_line() {
        let ok = serde_json::json!({"changed": ["web"], "errors": {}});
        assert_eq!(describe_report(&ok), "now serving the new web");
        let bad =
            serde_json::json!({"changed": [], "errors": {"web": "module `web`: not a component"}});
        let line = describe_report(&bad);
        assert!(line.contains("web failed to load"), "{line}");
        assert!(line.contains("not a component"), "{line}");
        let same = serde_json::json!({"changed": [], "errors": {}});
        assert_eq!(describe_report(&same), "reloaded: nothing changed");
    }
}
