//! `berth new`: a module project from a template, with the guest SDK of its
//! language vendored in. Templates and SDKs are embedded in the binary at
//! build time (host/build.rs), so this works offline and always writes the
//! SDK this host speaks.
//!
//! A template is a directory of `templates/`; its files may hold
//! `{{name}}`, `{{snake}}` (the name with `-` as `_`) and `{{route}}`. The
//! SDK of its language goes to `vendor/berth-sdk/`, with the host's WIT in
//! `vendor/berth-sdk/wit/`, copied byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// One project template.
#[derive(Debug)]
pub struct Template {
    /// What `--template` takes, and its directory under `templates/`.
    pub name: &'static str,
    /// One line for `berth new --list`.
    pub about: &'static str,
    /// The SDK it vendors: a directory under the embedded `sdk/`.
    sdk: &'static str,
    /// What its build command needs.
    tools: &'static [Tool],
}

/// Every template, in the order `--list` shows them.
pub const TEMPLATES: &[Template] = &[
    Template {
        name: "rust",
        about: "Rust, WASI 0.2: a fresh instance per request (the default)",
        sdk: "rust",
        tools: &[Tool::Cargo, Tool::WasiTarget],
    },
    Template {
        name: "rust-p3",
        about: "Rust, WASI 0.3: an async handler, instances reused across requests",
        sdk: "rust",
        tools: &[Tool::Cargo, Tool::WasiTarget],
    },
    Template {
        name: "ts",
        about: "TypeScript, built with componentize-js",
        sdk: "js",
        tools: &[Tool::Npm],
    },
    Template {
        name: "js",
        about: "JavaScript, built with componentize-js",
        sdk: "js",
        tools: &[Tool::Npm],
    },
    Template {
        name: "python",
        about: "Python, built with componentize-py",
        sdk: "python",
        tools: &[Tool::ComponentizePy],
    },
];

/// A program a template's build needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `cargo`.
    Cargo,
    /// The Rust standard library for `wasm32-wasip2`.
    WasiTarget,
    /// `npm` (with Node.js).
    Npm,
    /// `componentize-py`.
    ComponentizePy,
}

impl Tool {
    /// How to get it.
    pub fn hint(self) -> &'static str {
        match self {
            Tool::Cargo => "cargo is not on PATH: install Rust with rustup (https://rustup.rs)",
            Tool::WasiTarget => {
                "Rust cannot build for wasm32-wasip2: run `rustup target add wasm32-wasip2`"
            }
            Tool::Npm => "npm is not on PATH: install Node.js 18 or later, which brings npm",
            Tool::ComponentizePy => {
                "componentize-py is not on PATH: run `pip install -r requirements.txt` in the \
                 project (a virtualenv is best)"
            }
        }
    }

    /// Whether it is there.
    pub fn present(self) -> bool {
        let runs = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        match self {
            Tool::Cargo => runs("cargo", &["--version"]),
            Tool::Npm => runs("npm", &["--version"]),
            Tool::ComponentizePy => runs("componentize-py", &["--version"]),
            // Asking rustc where the target's library would be works with
            // and without rustup; the directory exists only if installed.
            Tool::WasiTarget => Command::new("rustc")
                .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
                .is_some_and(|dir| dir.is_dir()),
        }
    }
}

impl Template {
    /// The template called `name`.
    pub fn find(name: &str) -> Result<&'static Template, NewError> {
        TEMPLATES
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| NewError::UnknownTemplate(name.to_owned()))
    }

    /// The tools its build needs that are missing here.
    pub fn missing_tools(&self) -> Vec<Tool> {
        let mut missing: Vec<Tool> = Vec::new();
        for &tool in self.tools {
            // Without cargo there is no point asking about its target.
            if tool == Tool::WasiTarget && missing.contains(&Tool::Cargo) {
                continue;
            }
            if !tool.present() {
                missing.push(tool);
            }
        }
        missing
    }
}

/// Why a project could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    /// No such template.
    #[error("no template `{0}`: choose one of {known}", known = names())]
    UnknownTemplate(String),
    /// The module name is not one the config and every toolchain accept.
    #[error(
        "invalid module name `{0}`: use a lowercase letter, then lowercase letters, digits \
         and single `-` (at most 63 characters)"
    )]
    BadName(String),
    /// The route is not a path.
    #[error("invalid route `{0}`: it must start with `/` and hold no spaces, `?` or `#`")]
    BadRoute(String),
    /// The directory is there already; nothing was written.
    #[error("{} already exists: choose another name or remove it", .0.display())]
    Exists(PathBuf),
    /// Writing failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn names() -> String {
    TEMPLATES
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_name(name: &str) -> Result<(), NewError> {
    let bytes = name.as_bytes();
    let ok = (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && !name.ends_with('-')
        && !name.contains("--")
        // The vendored SDK's package: a project of that name cannot build.
        && name != "berth-sdk";
    if ok {
        Ok(())
    } else {
        Err(NewError::BadName(name.to_owned()))
    }
}

fn check_route(route: &str) -> Result<(), NewError> {
    // The route is written into TOML and into source strings of every
    // language: refuse anything that would need quoting there.
    let ok = route.starts_with('/')
        && route
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '"' | '\'' | '\\' | '`'));
    if ok {
        Ok(())
    } else {
        Err(NewError::BadRoute(route.to_owned()))
    }
}

/// Writes the project `name` from `template` into `parent/name`, and
/// returns its directory. Nothing is left behind when it fails.
pub fn create(
    template: &Template,
    name: &str,
    route: Option<&str>,
    parent: &Path,
) -> Result<PathBuf, NewError> {
    check_name(name)?;
    let route = route.map_or_else(|| format!("/{name}"), str::to_owned);
    check_route(&route)?;
    // The host routes `/api` and `/api/x` to a route `/api/`; the
    // templates strip the route as written from the path.
    let route = match route.trim_end_matches('/') {
        "" => "/".to_owned(),
        trimmed => trimmed.to_owned(),
    };
    if !parent.is_dir() {
        return Err(NewError::Io {
            path: parent.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        });
    }
    let dir = parent.join(name);
    if dir.symlink_metadata().is_ok() {
        return Err(NewError::Exists(dir));
    }
    // Built beside its final place and renamed in, so a failure half way
    // (a full disk) leaves no half project that the next try refuses. The
    // staging name is unguessable and created exclusively: nothing planted
    // there beforehand can be merged into the project, or deleted.
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| NewError::Io {
        path: parent.to_owned(),
        source: std::io::Error::other(e),
    })?;
    let staging = parent.join(format!(".{name}.berth-new-{}", hex::encode(nonce)));
    std::fs::create_dir(&staging).map_err(|source| NewError::Io {
        path: staging.clone(),
        source,
    })?;
    let result = write_all(template, name, &route, &staging).and_then(|()| {
        std::fs::rename(&staging, &dir).map_err(|source| NewError::Io {
            path: dir.clone(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map(|()| dir)
}

fn write_all(template: &Template, name: &str, route: &str, dir: &Path) -> Result<(), NewError> {
    let snake = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{snake}}", &snake)
            .replace("{{route}}", route)
    };
    for (path, bytes, executable) in files(&format!("templates/{}/", template.name)) {
        let contents = match std::str::from_utf8(bytes) {
            Ok(text) => fill(text).into_bytes(),
            Err(_) => bytes.to_vec(),
        };
        write(&dir.join(path), &contents, executable)?;
    }
    let vendor = dir.join("vendor/berth-sdk");
    for (path, bytes, executable) in files(&format!("sdk/{}/", template.sdk)) {
        write(&vendor.join(path), bytes, executable)?;
    }
    for (path, bytes, executable) in files("sdk/wit/") {
        write(&vendor.join("wit").join(path), bytes, executable)?;
    }
    Ok(())
}

/// The embedded files under `prefix`, with the prefix taken off.
fn files(prefix: &str) -> impl Iterator<Item = (&'static str, &'static [u8], bool)> + '_ {
    embedded::FILES
        .iter()
        .filter_map(move |(path, bytes, x)| Some((path.strip_prefix(prefix)?, *bytes, *x)))
}

/// Writes a file; `executable` keeps a script runnable (npm does not
/// restore the bit of a `bin` in a package that is already installed).
fn write(path: &Path, contents: &[u8], executable: bool) -> Result<(), NewError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| NewError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, contents).map_err(io)?;
    if executable {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_is_embedded_with_a_config_and_readme_and_its_sdk() {
        for t in TEMPLATES {
            let prefix = format!("templates/{}/", t.name);
            let names: Vec<&str> = files(&prefix).map(|(p, ..)| p).collect();
            for needed in ["berth.toml", "README.md", ".gitignore"] {
                assert!(
                    names.contains(&needed),
                    "{} lacks {needed}: {names:?}",
                    t.name
                );
            }
            assert!(
                files(&format!("sdk/{}/", t.sdk)).count() > 0,
                "no SDK for {}",
                t.name
            );
        }
        assert!(files("sdk/wit/").any(|(p, ..)| p == "world.wit"));
    }

    #[test]
    fn the_vendored_rust_sdk_is_this_version_and_stands_alone() {
        let manifest = files("sdk/rust/")
            .find(|(p, ..)| *p == "Cargo.toml")
            .map(|(_, b, _)| std::str::from_utf8(b).unwrap())
            .unwrap();
        let version = format!("version = \"{}\"", env!("CARGO_PKG_VERSION"));
        assert!(manifest.contains(&version), "{manifest}");
        assert!(!manifest.contains("workspace = true"), "{manifest}");
    }

    #[test]
    fn nothing_of_a_working_copy_is_embedded() {
        for (path, ..) in embedded::FILES {
            for part in path.split('/') {
                assert!(
                    ![
                        "node_modules",
                        "__pycache__",
                        ".pytest_cache",
                        "target",
                        "dist"
                    ]
                    .contains(&part),
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn a_project_gets_its_names_filled_in_and_the_sdk_beside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Template::find("rust").unwrap();
        let dir = create(t, "order-api", Some("/orders"), tmp.path()).unwrap();
        let config = std::fs::read_to_string(dir.join("berth.toml")).unwrap();
        assert!(config.contains("[modules.order-api]"), "{config}");
        assert!(config.contains("route = \"/orders\""), "{config}");
        assert!(config.contains("order_api.wasm"), "{config}");
        assert!(!config.contains("{{"), "{config}");
        assert!(dir.join("vendor/berth-sdk/Cargo.toml").is_file());
        assert!(dir.join("vendor/berth-sdk/wit/world.wit").is_file());
        // A script of a vendored SDK stays runnable.
        let js = create(Template::find("js").unwrap(), "web", None, tmp.path()).unwrap();
        let bin = js.join("vendor/berth-sdk/bin/berth-componentize.js");
        let mode = std::os::unix::fs::PermissionsExt::mode(&bin.metadata().unwrap().permissions());
        assert_eq!(mode & 0o111, 0o111, "{mode:o}");
        assert!(!js.join("vendor/berth-sdk/package-lock.json").exists());
        let slash = create(t, "slash", Some("/api/"), tmp.path()).unwrap();
        let config = std::fs::read_to_string(slash.join("berth.toml")).unwrap();
        assert!(config.contains("route = \"/api\""), "{config}");
        let plain = create(t, "other", None, tmp.path()).unwrap();
        let config = std::fs::read_to_string(plain.join("berth.toml")).unwrap();
        assert!(config.contains("route = \"/other\""), "{config}");
        // The SDK is copied byte for byte; the project's own files are not
        // executable.
        let (_, lib, _) = files("sdk/rust/")
            .find(|(p, ..)| *p == "src/lib.rs")
            .unwrap();
        assert_eq!(
            std::fs::read(dir.join("vendor/berth-sdk/src/lib.rs")).unwrap(),
            lib
        );
        for file in ["berth.toml", "vendor/berth-sdk/Cargo.toml"] {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &dir.join(file).metadata().unwrap().permissions(),
            );
            assert_eq!(mode & 0o111, 0, "{file} {mode:o}");
        }
    }

    #[test]
    fn every_template_takes_the_route_and_leaves_no_placeholder() {
        let tmp = tempfile::tempdir().unwrap();
        for t in TEMPLATES {
            let name = format!("m-{}", t.name);
            let dir = create(t, &name, Some("/custom-r"), tmp.path()).unwrap();
            let mut seen_route = false;
            for (path, ..) in files(&format!("templates/{}/", t.name)) {
                let text = std::fs::read_to_string(dir.join(path)).unwrap();
                assert!(!text.contains("{{"), "{}/{path}: {text}", t.name);
                seen_route |= text.contains("/custom-r");
            }
            assert!(seen_route, "{} never uses the route", t.name);
        }
    }

    #[test]
    fn a_planted_staging_directory_is_neither_merged_nor_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Template::find("rust").unwrap();
        // Whatever a neighbour plants beside the project, under any name
        // of the staging form, stays where it is and out of the project.
        let planted = tmp
            .path()
            .join(format!(".x.berth-new-{}", std::process::id()));
        std::fs::create_dir(&planted).unwrap();
        std::fs::write(planted.join("build.rs"), "evil").unwrap();
        let dir = create(t, "x", None, tmp.path()).unwrap();
        assert!(!dir.join("build.rs").exists());
        assert!(planted.join("build.rs").exists());
        let stray: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| {
                n.to_string_lossy().contains("berth-new") && **n != *planted.file_name().unwrap()
            })
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    #[test]
    fn bad_input_is_refused_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Template::find("rust").unwrap();
        for name in [
            "",
            "berth-sdk",
            "Hello",
            "1st",
            "a_b",
            "a--b",
            "a-",
            "a b",
            "../x",
            &"a".repeat(64),
        ] {
            let err = create(t, name, None, tmp.path()).unwrap_err();
            assert!(matches!(err, NewError::BadName(_)), "{name}: {err}");
        }
        for route in [
            "orders", "/a b", "/a?b", "/a#b", "/a'b", "/a`b", "/a\"b", "/a\\b",
        ] {
            let err = create(t, "ok", Some(route), tmp.path()).unwrap_err();
            assert!(err.to_string().contains("invalid route"), "{route}: {err}");
        }
        std::fs::create_dir(tmp.path().join("taken")).unwrap();
        let err = create(t, "taken", None, tmp.path()).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        create(t, &"a".repeat(63), None, tmp.path()).unwrap();
        let err = create(t, "m", None, &tmp.path().join("absent")).unwrap_err();
        assert!(
            err.to_string().contains("absent: no such directory"),
            "{err}"
        );
        let err = Template::find("go").unwrap_err().to_string();
        assert!(err.contains("rust, rust-p3"), "{err}");
    }
}
