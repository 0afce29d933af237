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
    SHADOW_DIR,
    ".git",
    "target",
    "node_modules",
    "__pycache__",
    ".venv",
    "dist",
];

/// Where the good builds are kept, in the project (never a source).
const SHADOW_DIR: &str = ".berth-dev";

/// What a burst of file events calls for.
#[derive(Debug, Default, PartialEq)]
struct Change {
    /// Rerun the builds of these modules.
    builds: BTreeSet<String>,
    /// The config file changed: read it again and reload.
    config: bool,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.builds.is_empty() && !self.config
    }
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
    /// `watch` as written, and compiled.
    patterns: Vec<String>,
    watch: GlobSet,
    output: PathBuf,
}

impl PartialEq for Build {
    fn eq(&self, other: &Self) -> bool {
        (&self.module, &self.command, &self.patterns, &self.output)
            == (
                &other.module,
                &other.command,
                &other.patterns,
                &other.output,
            )
    }
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
        let file = absolute(&options.config)?;
        let dir = file.parent().map(Path::to_owned).unwrap_or_default();
        let mut builds = Vec::new();
        for spec in config.module_specs() {
            let module = &config.modules[&spec.name];
            let Some(command) = module.build.clone() else {
                continue;
            };
            // The host is pointed at the good builds through `BERTH_`
            // variables, whose names carry no case and nest at `__`.
            if spec.name != spec.name.to_ascii_lowercase() || spec.name.contains("__") {
                bail!(
                    "modules.{}: berth dev needs module names in lower case, without `__`",
                    spec.name
                );
            }
            let ModuleSource::File { path, .. } = spec.source else {
                bail!(
                    "modules.{}.build: the module must come from `file` (what the build writes)",
                    spec.name
                );
            };
            let fields = module.build_fields();
            let watch = fields.watch_set(&|k: &str| format!("modules.{}.{k}", spec.name))?;
            // Absolute, as the watcher reports paths: a relative config
            // path (`./berth.toml`) gives relative ones here, and an output
            // that is not recognised as such rebuilds itself forever.
            let output = absolute(&path)?;
            builds.push(Build {
                module: spec.name.clone(),
                command,
                patterns: module.watch.clone(),
                watch,
                output,
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
        let mut change = Change::default();
        if path == config_file {
            change.config = true;
            return change;
        }
        let Ok(rel) = path.strip_prefix(&self.dir) else {
            return change;
        };
        if self.builds.iter().any(|b| b.output == path) {
            return change;
        }
        let in_build_dir = rel.components().any(|c| match c {
            Component::Normal(part) => NEVER_SOURCES.iter().any(|n| part == *n),
            _ => false,
        });
        if !in_build_dir {
            change.builds = self
                .builds
                .iter()
                .filter(|b| b.watch.is_match(rel))
                .map(|b| b.module.clone())
                .collect();
        }
        change
    }
}

/// `path` from the root, with `.` and `..` resolved by its text: the form
/// the watcher reports paths in (it joins names onto the watched
/// directory, which is this form too), so that paths compare equal.
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let full =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let mut clean = PathBuf::new();
    for part in full.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    Ok(clean)
}

/// Runs the loop until `shutdown` resolves or the host exits.
pub async fn run(
    options: DevOptions,
    shutdown: impl Future<Output = &'static str>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let config_file = absolute(&options.config)?;
    let mut project = Project::load(&options)?;
    check_ports(&project.config)?;
    let shadow = Shadow::new(&project.dir)?;
    let (tx, mut changes) = mpsc::unbounded_channel();
    let _watcher = watch(&project.dir, tx)?;
    let token = admin_token(&project.config)?;
    let admin = Admin {
        client: Client::builder(TokioExecutor::new()).build_http(),
        addr: project.config.admin.listen,
        token: token.value,
    };

    let everything = Change {
        builds: project.builds.iter().map(|b| b.module.clone()).collect(),
        config: false,
    };
    tokio::select! {
        _ = step(&mut project, everything, &options, &shadow, None) => {}
        signal = &mut shutdown => return stopping(signal, None).await,
    }
    // Set when the host refused to start: wait for a change before trying
    // again.
    let mut refused = false;
    'serve: loop {
        // The host cannot start without a good build of every module.
        loop {
            match project.builds.iter().find(|b| !shadow.has(b)) {
                Some(b) => say(&format!(
                    "{} has no good build yet: waiting for a change to its sources",
                    b.module
                )),
                None if refused => refused = false,
                None => break,
            }
            let waited = tokio::select! {
                change = next_change(&mut changes, &project, &config_file) => Ok(change),
                signal = &mut shutdown => Err(signal),
            };
            let signal = match waited {
                Ok(change) => tokio::select! {
                    _ = step(&mut project, change, &options, &shadow, None) => continue,
                    signal = &mut shutdown => signal,
                },
                Err(signal) => signal,
            };
            return stopping(signal, None).await;
        }
        let mut host = spawn_host(&options, token.generated.as_deref(), &project, &shadow)?;
        tokio::select! {
            ready = admin.wait_ready(&project) => ready?,
            exit = host.wait() => {
                say(&format!(
                    "the host could not start ({}): fix what it says above and save",
                    describe(exit)
                ));
                refused = true;
                continue 'serve;
            }
            signal = &mut shutdown => return stopping(signal, Some(host)).await,
        }
        print_urls(&project.config);

        loop {
            let change = tokio::select! {
                change = next_change(&mut changes, &project, &config_file) => change,
                exit = host.wait() => bail!("the host exited ({})", describe(exit)),
                signal = &mut shutdown => return stopping(signal, Some(host)).await,
            };
            // A signal stops a build or a reload half way: dropping the step
            // kills the build's process group.
            let restart = tokio::select! {
                restart = step(&mut project, change, &options, &shadow, Some(&admin)) => restart,
                exit = host.wait() => bail!("the host exited ({})", describe(exit)),
                signal = &mut shutdown => return stopping(signal, Some(host)).await,
            };
            if restart {
                say("the modules to build changed: restarting the host");
                stop(host).await?;
                continue 'serve;
            }
        }
    }
}

async fn stopping(signal: &'static str, host: Option<Child>) -> anyhow::Result<()> {
    say(&format!("{signal}: stopping"));
    match host {
        Some(host) => stop(host).await,
        None => Ok(()),
    }
}

/// Acts on a change: takes the new config, reruns builds and installs the
/// good ones; then, when there is a host, reloads it. Returns whether the
/// host must be restarted instead: the set of modules to build changed, and
/// the host was told where their builds are when it started.
async fn step(
    project: &mut Project,
    change: Change,
    options: &DevOptions,
    shadow: &Shadow,
    admin: Option<&Admin>,
) -> bool {
    let mut to_build = change.builds;
    let mut restart = false;
    if change.config {
        say("berth.toml changed");
        match Project::load(options) {
            Ok(new) => {
                // New modules, and modules whose build changed, build now.
                to_build.extend(
                    new.builds
                        .iter()
                        .filter(|b| !project.builds.contains(b))
                        .map(|b| b.module.clone()),
                );
                let names = |p: &Project| -> BTreeSet<String> {
                    p.builds.iter().map(|b| b.module.clone()).collect()
                };
                restart = names(&new) != names(project);
                *project = new;
            }
            // The host says why when it reloads, and keeps its config.
            Err(e) => say(&format!("{e:#}")),
        }
    }
    let mut built = Vec::new();
    for build in project
        .builds
        .iter()
        .filter(|b| to_build.contains(&b.module))
    {
        if run_build(build, &project.dir).await && shadow.install(build) {
            built.push(build);
        }
    }
    if restart {
        return true;
    }
    let what = if !built.is_empty() {
        Some(format!("loading {}", sizes(built.iter().copied())))
    } else if change.config {
        Some("reloading berth.toml".to_owned())
    } else {
        None
    };
    if let (Some(admin), Some(what)) = (admin, what) {
        admin.reload(what).await;
    }
    false
}

/// Refuses ports that `berth dev` could not point at: port 0 (it prints the
/// URL and reloads through the admin port) and ports already taken (another
/// `berth dev`, whose `/ready` would be taken for this host's).
fn check_ports(config: &Config) -> anyhow::Result<()> {
    for (what, addr) in [
        ("server.listen (--listen)", config.server.listen),
        ("admin.listen (--admin-listen)", config.admin.listen),
    ] {
        if addr.port() == 0 {
            bail!("{what} is {addr}: berth dev needs a fixed port");
        }
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("{what} {addr} is taken: is another berth dev running?"))?;
    }
    Ok(())
}

/// The good builds the host serves, under `.berth-dev/` in the project: a
/// build writes its output in place, and the host must never load a
/// half-written file or the output of a build that then failed. Only a
/// build that succeeded is copied here, by an atomic rename.
struct Shadow {
    dir: PathBuf,
}

impl Shadow {
    /// Starts empty: a good build of an earlier session need not match
    /// the sources of this one, so every module is built before it serves.
    fn new(project: &Path) -> anyhow::Result<Shadow> {
        let dir = project.join(SHADOW_DIR);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot empty {}", dir.display()));
            }
            _ => {}
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Shadow { dir })
    }

    fn path(&self, build: &Build) -> PathBuf {
        self.dir.join(format!("{}.wasm", build.module))
    }

    fn has(&self, build: &Build) -> bool {
        self.path(build).is_file()
    }

    /// Copies a build's output in; says why not when it cannot.
    fn install(&self, build: &Build) -> bool {
        let to = self.path(build);
        let part = to.with_extension("wasm.part");
        let done = std::fs::copy(&build.output, &part).and_then(|_| std::fs::rename(&part, &to));
        if let Err(e) = &done {
            say(&format!(
                "the build of {} succeeded but {} cannot be copied: {e}",
                build.module,
                build.output.display()
            ));
        }
        done.is_ok()
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
        let mut change = Change::default();
        for path in &paths {
            let hit = project.affected(path, config_file);
            change.builds.extend(hit.builds);
            change.config |= hit.config;
        }
        if !change.is_empty() {
            return change;
        }
    }
}

/// Runs one build with the terminal as its output, so its errors keep the
/// compiler's own formatting. Returns whether it succeeded.
async fn run_build(build: &Build, dir: &Path) -> bool {
    say(&format!("building {}: {}", build.module, build.command));
    let started = Instant::now();
    // Its own process group, so that a build stopped half way (Ctrl-C)
    // takes the compiler it started with it, not only `sh`.
    let child = Command::new("sh")
        .arg("-c")
        .arg(&build.command)
        .current_dir(dir)
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let status = match child {
        Ok(mut child) => {
            let group = child
                .id()
                .and_then(|id| rustix::process::Pid::from_raw(id as i32))
                .map(KillGroupOnDrop);
            let status = child.wait().await;
            std::mem::forget(group);
            status
        }
        Err(e) => Err(e),
    };
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

/// Kills a build's process group unless forgotten once the build ended.
struct KillGroupOnDrop(rustix::process::Pid);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process_group(self.0, rustix::process::Signal::KILL);
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

fn spawn_host(
    options: &DevOptions,
    token: Option<&str>,
    project: &Project,
    shadow: &Shadow,
) -> anyhow::Result<Child> {
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
    // berth dev is the watcher, and the host loads the good builds only.
    cmd.env("BERTH_RUNTIME__WATCH", "false");
    for build in &project.builds {
        cmd.env(
            format!("BERTH_MODULES__{}__FILE", build.module.to_ascii_uppercase()),
            shadow.path(build),
        );
    }
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
        let progress = Progress::start(format!("starting {}", sizes(&project.builds)));
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
    async fn reload(&self, what: String) {
        let progress = Progress::start(what);
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
    let removed = list("removed");
    if !removed.is_empty() {
        parts.push(format!("no longer serving {}", removed.join(", ")));
    }
    let restart = list("restart_needed");
    if !restart.is_empty() {
        parts.push(format!(
            "changes to {} apply when berth dev starts again",
            restart.join(", ")
        ));
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

/// `NAME.wasm (12.2 MiB)` for each build's output.
fn sizes<'a>(builds: impl IntoIterator<Item = &'a Build>) -> String {
    builds
        .into_iter()
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

    /// The project of `toml`, its config named with a `.` in its path, as
    /// `berth dev` in the project's directory names `./berth.toml`: the
    /// paths derived from it must still compare equal to the watcher's.
    /// (Not a relative path: figment's test jails change the working
    /// directory of the whole test process.)
    fn project(dir: &Path, toml: &str) -> anyhow::Result<Project> {
        std::fs::write(dir.join("berth.toml"), toml).unwrap();
        Project::load(&DevOptions {
            config: dir.join(".").join("berth.toml"),
            overrides: Overrides::default(),
        })
    }

    #[test]
    fn paths_are_made_absolute_and_plain() {
        assert_eq!(
            absolute(Path::new("/a/./b/../c")).unwrap(),
            PathBuf::from("/a/c")
        );
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
file = "api.wasm"
route = "/api"
build = "cargo build"
watch = ["**"]
[modules.plain]
file = "plain.wasm"
route = "/plain"
"#;

    #[test]
    fn a_change_reruns_only_the_builds_that_watch_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = project(tmp.path(), TWO).unwrap();
        let config = p.dir.join("berth.toml");
        let names = |path: &str| -> Vec<String> {
            let change = p.affected(&p.dir.join(path), &config);
            assert!(!change.config, "{path}");
            change.builds.into_iter().collect::<Vec<_>>()
        };
        // `api` watches everything but build and tool directories and
        // outputs; `web` only its globs.
        assert_eq!(names("web/src/app.ts"), ["api", "web"]);
        assert_eq!(names("src/lib.rs"), ["api"]);
        assert_eq!(names("target/debug/x.o"), Vec::<&str>::new());
        assert_eq!(names(".git/index"), Vec::<&str>::new());
        assert_eq!(names("__pycache__/a.pyc"), Vec::<&str>::new());
        // An output at the top, outside any build directory: still not a
        // source, or the build would rerun itself forever.
        assert_eq!(names("api.wasm"), Vec::<&str>::new());
        assert_eq!(names("web/node_modules/x/index.js"), Vec::<&str>::new());
        assert_eq!(names("web/src/.venv/x.py"), Vec::<&str>::new());
        // Its own output never reruns a build, even where a glob says so.
        assert_eq!(names("web/dist/web.wasm"), Vec::<&str>::new());
        assert!(p.affected(&config, &config).config);
        assert_eq!(
            p.affected(Path::new("/elsewhere/x"), &config),
            Change::default()
        );
    }

    #[tokio::test]
    async fn a_burst_of_the_config_and_a_source_calls_for_both() {
        let tmp = tempfile::tempdir().unwrap();
        let p = project(tmp.path(), TWO).unwrap();
        let config = p.dir.join("berth.toml");
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(p.dir.join("target/x.o")).unwrap();
        tx.send(config.clone()).unwrap();
        tx.send(p.dir.join("web/src/app.ts")).unwrap();
        let change = next_change(&mut rx, &p, &config).await;
        assert!(change.config);
        assert_eq!(
            change.builds,
            BTreeSet::from(["api".to_owned(), "web".to_owned()])
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
            "[modules.a]\noci = \"r.example/a@sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nroute = \"/a\"\nbuild = \"make\"\nwatch = [\"src/**\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("modules.a.build"), "{err:#}");
        // Names an environment variable cannot carry to the host.
        for name in ["Web", "a__b"] {
            let err = project(
                tmp.path(),
                &format!("[modules.{name}]\nfile = \"a.wasm\"\nroute = \"/a\"\nbuild = \"make\"\nwatch = [\"src/**\"]\n"),
            )
            .unwrap_err();
            assert!(err.to_string().contains("without `__`"), "{name}: {err:#}");
        }
    }

    #[test]
    fn a_session_starts_with_no_good_build_of_an_earlier_one() {
        let tmp = tempfile::tempdir().unwrap();
        let p = project(tmp.path(), TWO).unwrap();
        let old = tmp.path().join(SHADOW_DIR).join("api.wasm");
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, b"old").unwrap();
        let shadow = Shadow::new(&p.dir).unwrap();
        assert!(!shadow.has(&p.builds[0]));
        std::fs::write(&p.builds[0].output, b"new").unwrap();
        assert!(shadow.install(&p.builds[0]));
        assert_eq!(std::fs::read(shadow.path(&p.builds[0])).unwrap(), b"new");
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
        let config = serde_json::json!({
            "config_error": "modules.a.route: missing", "changed": [], "errors": {},
            "removed": ["old"], "restart_needed": ["server"],
        });
        let line = describe_report(&config);
        assert!(
            line.contains("berth.toml rejected, the running config stays: modules.a.route"),
            "{line}"
        );
        assert!(line.contains("no longer serving old"), "{line}");
        assert!(
            line.contains("server apply when berth dev starts again"),
            "{line}"
        );
    }

    #[test]
    fn outputs_are_named_with_their_size() {
        let tmp = tempfile::tempdir().unwrap();
        let p = project(tmp.path(), TWO).unwrap();
        std::fs::create_dir_all(tmp.path().join("web/dist")).unwrap();
        std::fs::write(tmp.path().join("web/dist/web.wasm"), vec![0u8; 2 << 20]).unwrap();
        assert_eq!(sizes(&p.builds[1..]), "web.wasm (2.0 MiB)");
        assert_eq!(sizes(&p.builds), "api.wasm (0.0 MiB), web.wasm (2.0 MiB)");
    }

    #[test]
    fn a_token_is_made_up_only_when_the_config_has_none() {
        let config = Config::default();
        let (a, b) = (admin_token(&config).unwrap(), admin_token(&config).unwrap());
        assert_eq!(a.value.len(), 32);
        assert!(
            a.value.chars().all(|c| c.is_ascii_hexdigit()),
            "{}",
            a.value
        );
        assert_ne!(a.value, b.value);
        assert_eq!(a.generated.as_deref(), Some(a.value.as_str()));
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut config = Config::default();
        config.admin.token_file = Some(file);
        let t = admin_token(&config).unwrap();
        assert_eq!((t.value.as_str(), t.generated), ("from-file", None));
    }
}
