//! Embeds what `berth new` writes: the project templates and the guest
//! SDKs they vendor, so the command works offline and matches the binary's
//! version. Generates `$OUT_DIR/embedded.rs`: `(path, bytes, executable)`,
//! sorted by path.

use std::path::{Path, PathBuf};

/// What is embedded: (directory under the repository root, name it takes,
/// entries of it never embedded).
const TREES: &[(&str, &str, &[&str])] = &[
    ("templates", "templates", &[]),
    (
        "guest-sdk",
        "sdk/rust",
        &["js", "python", "wit", "target", "README.md"],
    ),
    ("guest-sdk/wit", "sdk/wit", &["README.md"]),
    // The lockfile pins the SDK's own test tools, not an author's project.
    ("guest-sdk/js", "sdk/js", &["test", "package-lock.json"]),
    ("guest-sdk/python", "sdk/python", &["tests"]),
];

/// Build outputs and caches a working copy may hold, never shipped.
const NEVER: &[&str] = &[
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    "dist",
    ".venv",
    "target",
];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let mut files = Vec::new();
    for (dir, name, skip) in TREES {
        let base = root.join(dir);
        println!("cargo:rerun-if-changed={}", base.display());
        walk(&base, &base, skip, &mut |rel, abs| {
            files.push((format!("{name}/{rel}"), abs.to_owned()));
        });
    }
    files.sort();
    let mut out = String::from(
        "/// `(path, contents, executable)` of every embedded file, sorted by path.\n",
    );
    out.push_str("pub(super) static FILES: &[(&str, &[u8], bool)] = &[\n");
    for (name, abs) in &files {
        let mode = std::fs::metadata(abs).unwrap().permissions();
        let executable = std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0;
        out.push_str(&format!(
            "    ({name:?}, include_bytes!({:?}), {executable}),\n",
            abs.display().to_string()
        ));
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("embedded.rs");
    std::fs::write(dest, out).unwrap();
}

fn walk(base: &Path, dir: &Path, skip: &[&str], found: &mut dyn FnMut(&str, &Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let top = dir == base;
        if NEVER.contains(&name.as_str()) || (top && skip.contains(&name.as_str())) {
            continue;
        }
        if path.is_dir() {
            walk(base, &path, skip, found);
        } else {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            found(&rel, &path);
        }
    }
}
