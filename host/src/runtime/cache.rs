//! The on-disk cache of precompiled components, for fast (re)starts.
//!
//! An entry is keyed by the sha256 of the component and a fingerprint of
//! the engine and its settings, so a new Berth version or a changed engine
//! setting never picks up a stale artifact. Each entry carries the sha256 of
//! its own payload: a truncated or corrupt file is detected, deleted and
//! rebuilt, never handed to the engine.
//!
//! Entries are native code that the engine runs unchecked, so the folder
//! must be berth's own: owned by the process's user, mode 0700, not a
//! symlink, holding only what Berth writes. A folder of another user, or
//! one holding anything else, is refused and left as it is (the cache is
//! then off); a folder of ours that others could write to (an emptyDir is
//! 0777) has its entries deleted and is closed to them. Old entries are pruned: the live modules' and the newest few are
//! kept, within a total size (below the chart's emptyDir `sizeLimit`).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// An entry: this magic, the sha256 of the component it was compiled
/// from, the sha256 of the payload, then wasmtime's payload. The first
/// digest ties the code to the component, whatever the file is named.
const MAGIC: &[u8; 8] = b"BERTHC02";
const HEADER: usize = MAGIC.len() + 64;

/// Entries kept beyond the live modules' when pruning.
const KEEP_OLD: usize = 8;

/// A folder of precompiled components.
pub struct CompileCache {
    dir: PathBuf,
    max_bytes: u64,
}

/// Where a compiled component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from the cache.
    Cache,
    /// Compiled now (and stored when the cache is on).
    Compiled,
}

impl CompileCache {
    /// Opens (and creates) the cache folder, holding at most `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        private_dir(dir)?;
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            max_bytes,
        })
    }

    /// Deletes entries no live module uses, beyond the newest
    /// [`KEEP_OLD`], and then the oldest ones until the folder (downloads
    /// included) fits in its size. `live` holds the live modules' sha256.
    pub fn prune(&self, live: &HashSet<String>) {
        let mut entries: Vec<(PathBuf, u64, std::time::SystemTime, bool)> = Vec::new();
        for dir in [self.dir.clone(), self.dir.join("downloads")] {
            let Ok(read) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in read.flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if !ours_in(&dir, &self.dir, &name) {
                    continue;
                }
                let sha = name.split(['-', '.']).next().unwrap_or_default();
                let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                entries.push((path, meta.len(), modified, live.contains(sha)));
            }
        }
        // Live first, then newest first: what is deleted comes from the end.
        entries.sort_by(|a, b| b.3.cmp(&a.3).then(b.2.cmp(&a.2)));
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        let mut old_kept = 0;
        let mut keep = Vec::new();
        for (path, len, _, is_live) in entries {
            if is_live {
                keep.push(len);
                continue;
            }
            old_kept += 1;
            if old_kept <= KEEP_OLD {
                keep.push(len);
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        // Still too big: drop kept old entries, oldest first.
        if total > self.max_bytes {
            let mut old: Vec<(PathBuf, u64, std::time::SystemTime)> = Vec::new();
            for dir in [self.dir.clone(), self.dir.join("downloads")] {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !ours_in(&dir, &self.dir, &name) {
                        continue;
                    }
                    let sha = name.split(['-', '.']).next().unwrap_or_default().to_owned();
                    if let Ok(meta) = entry.metadata()
                        && meta.is_file()
                        && !live.contains(&sha)
                    {
                        old.push((
                            entry.path(),
                            meta.len(),
                            meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                        ));
                    }
                }
            }
            old.sort_by_key(|e| e.2);
            for (path, len, _) in old {
                if total <= self.max_bytes {
                    break;
                }
                if std::fs::remove_file(&path).is_ok() {
                    total -= len;
                }
            }
        }
        if total > self.max_bytes {
            tracing::warn!(
                dir = %self.dir.display(),
                bytes = total,
                max = self.max_bytes,
                "the live modules alone exceed runtime.cache_max_size"
            );
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, engine: &Engine, sha256: &str) -> PathBuf {
        self.dir.join(entry_name(engine, sha256))
    }

    /// The cached component for `sha256`, or `compile`d and stored.
    pub fn get_or_compile(
        &self,
        engine: &Engine,
        module: &str,
        sha256: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, Origin)> {
        let path = self.entry(engine, sha256);
        if let Ok(data) = std::fs::read(&path) {
            match verified_payload(&data, sha256).map(|payload| deserialize(engine, payload)) {
                Some(Ok(component)) => {
                    tracing::info!(module, file = %path.display(), "loaded from the compile cache");
                    return Ok((component, Origin::Cache));
                }
                _ => {
                    tracing::warn!(
                        module,
                        file = %path.display(),
                        "corrupt compile cache entry: rebuilding it"
                    );
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let payload = announced(module, bytes.len(), || engine.precompile_component(bytes))?;
        if let Err(e) = write_entry(&path, sha256, &payload) {
            tracing::warn!(module, file = %path.display(), error = %e, "cannot write the compile cache");
        }
        Ok((deserialize(engine, &payload)?, Origin::Compiled))
    }
}

/// An entry's file name: the component's digest and a fingerprint of the
/// engine (the host has one per world, with different settings, and the
/// fingerprint covers the CPU features it compiles for).
pub(crate) fn entry_name(engine: &Engine, sha256: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    format!("{sha256}-{:016x}.cwasm", hasher.finish())
}

/// Writes the entry of the component `sha256` (hex) at `path`: aside, then
/// renamed, so readers never see half an entry. The temporary file is
/// made anew, never through a symlink or over another file, and is
/// readable by all (a prebuilt folder is read by the pods' user).
pub(crate) fn write_entry(path: &Path, sha256: &str, payload: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let component = hex::decode(sha256)
        .ok()
        .filter(|d| d.len() == 32)
        .ok_or_else(|| std::io::Error::other(format!("`{sha256}` is not a sha256")))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // A leftover of a run that died (or a planted link: removing a link
    // never touches what it points to).
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&tmp)?;
        // The umask would otherwise decide.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(MAGIC)?;
        f.write_all(&component)?;
        f.write_all(&Sha256::digest(payload))?;
        f.write_all(payload)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Opens (creating it 0755 if missing) the folder `berth compile` writes:
/// one that `serve` would trust as a prebuilt folder, since a folder others
/// could write to lets them plant what the pods run.
pub fn output_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Prebuilt::open(dir).map(drop)
}

/// A read-only folder of entries that `berth compile` wrote (into the
/// image, so that every pod of it starts without compiling): looked in
/// before the compile cache, never written or pruned.
pub struct Prebuilt {
    dir: PathBuf,
    /// The folder as it was checked: entries are opened relative to it, so
    /// a folder renamed or replaced by a symlink later is not followed.
    fd: std::os::fd::OwnedFd,
}

/// Entries larger than this many times their component, plus a margin,
/// are not read: compiled code is a few times the size of its Wasm.
const MAX_GROWTH: u64 = 16;
const MAX_MARGIN: u64 = 64 << 20;

impl Prebuilt {
    /// Opens `dir`. Its entries are native code the engine runs
    /// unchecked, so a folder that a user other than root or this
    /// process's could write to is refused, as is a symlink.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a folder (or a symlink to one)",
            ),
            e => e.into(),
        })?;
        trusted(&std::fs::File::from(fd.try_clone()?).metadata()?)?;
        Ok(Prebuilt {
            dir: dir.to_path_buf(),
            fd,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The component of `sha256` (`size` bytes) as compiled for `engine`,
    /// when the folder holds a sound, trusted entry for them; otherwise
    /// `None` (and a warning, unless there is no entry at all).
    pub fn get(
        &self,
        engine: &Engine,
        module: &str,
        sha256: &str,
        size: usize,
    ) -> Option<Component> {
        use rustix::fs::{Mode, OFlags};
        use std::io::Read;
        let name = entry_name(engine, sha256);
        let path = self.dir.join(&name);
        let skip = |why: &str| -> Option<Component> {
            tracing::warn!(module, file = %path.display(), why, "prebuilt entry not used: compiling");
            None
        };
        // Relative to the checked folder, not following a symlink, and not
        // waiting on a FIFO; judged by the opened file's own metadata, so
        // what is checked is what is read.
        let fd = match rustix::fs::openat(
            &self.fd,
            name.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return None,
            Err(e) => return skip(&std::io::Error::from(e).to_string()),
        };
        let file = std::fs::File::from(fd);
        let meta = match file.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => return skip("not a regular file"),
            Err(e) => return skip(&e.to_string()),
        };
        if let Err(e) = trusted(&meta) {
            return skip(&e.to_string());
        }
        let most = (size as u64).saturating_mul(MAX_GROWTH) + MAX_MARGIN;
        if meta.len() > most {
            return skip(&format!(
                "{} bytes, more than code of this component can be",
                meta.len()
            ));
        }
        let mut data = Vec::new();
        if let Err(e) = file.take(most).read_to_end(&mut data) {
            return skip(&e.to_string());
        }
        match verified_payload(&data, sha256).map(|payload| deserialize(engine, payload)) {
            Some(Ok(component)) => {
                tracing::info!(module, file = %path.display(), "loaded from the prebuilt folder");
                Some(component)
            }
            Some(Err(e)) => skip(&format!("{e:#}")),
            None => skip("not an entry of this component, or corrupt"),
        }
    }
}

/// Whether what `meta` describes may hold code the engine runs: owned by
/// root or this process's user, and writable by neither group nor others.
fn trusted(meta: &std::fs::Metadata) -> std::io::Result<()> {
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, neither root nor this process's",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("mode {:o}: others may write to it", meta.mode() & 0o777),
        ));
    }
    Ok(())
}

/// Runs `compile` with a `compiling` line first and a `still compiling`
/// line every few seconds while it runs: a large module takes seconds to
/// compile on a small pod, and the log should say what the host is doing.
pub(super) fn announced<T>(module: &str, bytes: usize, compile: impl FnOnce() -> T) -> T {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);
    tracing::info!(module, bytes, "compiling");
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let name = module.to_owned();
    let started = std::time::Instant::now();
    let ticker = std::thread::Builder::new()
        .name("berth-compile-progress".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(EVERY) {
                tracing::info!(
                    module = name.as_str(),
                    seconds = started.elapsed().as_secs(),
                    "still compiling"
                );
            }
        });
    let out = compile();
    drop(done);
    if let Ok(ticker) = ticker {
        let _ = ticker.join();
    }
    out
}

/// The folders Berth keeps inside the cache folder: downloaded and pulled
/// components, OCI manifests, and how canaries ended.
const SUBFOLDERS: [&str; 3] = ["downloads", "oci", "canaries"];

/// Whether Berth writes entries of this name in the cache folder: a
/// compiled entry (`<sha256>-<engine>.cwasm`), its temporary file, or one
/// of [`SUBFOLDERS`].
fn ours(name: &str) -> bool {
    if SUBFOLDERS.contains(&name) {
        return true;
    }
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|c| c.is_ascii_hexdigit());
    let Some((sha, rest)) = name.split_once('-') else {
        return false;
    };
    let Some((engine, ext)) = rest.split_once('.') else {
        return false;
    };
    hex(sha, 64)
        && hex(engine, 16)
        && (ext == "cwasm"
            || ext
                .strip_prefix("tmp")
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|c| c.is_ascii_digit())))
}

/// Whether Berth writes a file of this name in its subfolder `folder`:
/// downloads (`<sha256>.wasm`), OCI manifests (`<sha256>.json`), both with
/// their temporary `.part<N>` files, and canary outcomes (`<16 hex>.json`,
/// `.berth-tmp.*`).
fn ours_inside(folder: &str, name: &str) -> bool {
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|c| c.is_ascii_hexdigit());
    let (stem, ext) = name.split_once('.').unwrap_or((name, ""));
    let part = ext
        .strip_prefix("part")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    match folder {
        "downloads" => hex(stem, 64) && (ext == "wasm" || part),
        "oci" => hex(stem, 64) && (ext == "json" || part),
        "canaries" => (hex(stem, 16) && ext == "json") || name.starts_with(".berth-tmp."),
        _ => false,
    }
}

/// Whether pruning may delete the file `name` of `folder` (the cache's
/// own folder, or its `downloads`): only entries Berth writes there.
fn ours_in(folder: &Path, cache: &Path, name: &str) -> bool {
    if folder == cache {
        return ours(name) && !SUBFOLDERS.contains(&name);
    }
    name.strip_suffix(".wasm")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Makes sure `dir` is a folder only this process's user can touch, and
/// one that holds nothing but Berth's own entries. Berth never deletes or
/// re-permissions what it did not write: a `cache_dir` that points at a
/// folder with other files in it (`.`, a project, `/var/cache`) is refused,
/// and the host runs without the cache.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(Error::other(format!(
            "{} is not a folder (a symlink?): refusing to load native code through it",
            dir.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to berth's uid {me}: refusing to load native code from it",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // A volume's root (a PVC) has one; it is the filesystem's.
        if name == "lost+found" {
            continue;
        }
        let foreign = |what: &str| {
            Error::other(format!(
                "{} holds `{what}`, which Berth did not write: refusing to use it as the cache \
                 (set runtime.cache_dir to a folder of its own)",
                dir.display()
            ))
        };
        let is_dir = entry.file_type()?.is_dir();
        if !ours(&name) || is_dir != SUBFOLDERS.contains(&name.as_str()) {
            return Err(foreign(&name));
        }
        if is_dir {
            for inner in std::fs::read_dir(entry.path())? {
                let inner = inner?;
                let inner_name = inner.file_name().to_string_lossy().into_owned();
                if !inner.file_type()?.is_file() || !ours_inside(&name, &inner_name) {
                    return Err(foreign(&format!("{name}/{inner_name}")));
                }
            }
        }
        entries.push(entry);
    }
    if meta.mode() & 0o077 != 0 {
        // Others could have written entries: trust none of them. Only
        // names Berth writes are here (checked above).
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.mode() & 0o777),
            "compile cache folder was open to others: its entries deleted and the folder set to 0700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in entries {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

fn verified_payload<'d>(data: &'d [u8], sha256: &str) -> Option<&'d [u8]> {
    if data.len() < HEADER || &data[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (component, rest) = data[MAGIC.len()..].split_at(32);
    let (digest, payload) = rest.split_at(32);
    (hex::encode(component) == sha256.to_ascii_lowercase()
        && Sha256::digest(payload).as_slice() == digest)
        .then_some(payload)
}

/// Turns precompiled bytes back into a component.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, payload: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize` trusts its input as machine code. The
    // payload is either what `precompile_component` of this very engine just
    // returned, or a cache entry this host wrote whose sha256 matches its
    // header, under a key that includes the engine's compatibility hash; the
    // cache folder belongs to the berth process. Version or setting
    // mismatches are still rejected by wasmtime itself.
    unsafe { Component::deserialize(engine, payload) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn a_new_folder_is_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    const ENTRY: &str =
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef-0123456789abcdef.cwasm";

    #[test]
    fn a_folder_open_to_others_is_emptied_and_closed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(dir.join(ENTRY), b"evil").unwrap();
        std::fs::create_dir(dir.join("downloads")).unwrap();
        std::fs::write(
            dir.join("downloads")
                .join(format!("{}.wasm", "a".repeat(64))),
            b"evil",
        )
        .unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn a_folder_holding_anything_berth_did_not_write_is_refused_and_left_alone() {
        for open in [0o755, 0o700] {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("project");
            std::fs::create_dir_all(dir.join(".git")).unwrap();
            std::fs::create_dir_all(dir.join("src")).unwrap();
            std::fs::write(dir.join("NOTES.txt"), b"mine").unwrap();
            std::fs::write(dir.join(ENTRY), b"ours").unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(open)).unwrap();
            let err = private_dir(&dir).unwrap_err().to_string();
            assert!(err.contains("Berth did not write"), "{err}");
            assert_eq!(mode(&dir), open, "the folder's mode was changed");
            for kept in [".git", "src", "NOTES.txt", ENTRY] {
                assert!(dir.join(kept).exists(), "{kept} was deleted");
            }
        }
    }

    #[test]
    fn a_subfolder_named_like_berths_but_holding_anything_else_is_refused() {
        for (sub, file) in [
            ("downloads", "thesis.pdf"),
            ("canaries", "notes.txt"),
            ("oci", "x.json"),
        ] {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("proj");
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join(file), b"mine").unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
            let err = private_dir(&dir).unwrap_err().to_string();
            assert!(err.contains(&format!("{sub}/{file}")), "{err}");
            assert!(
                dir.join(sub).join(file).exists(),
                "{sub}/{file} was deleted"
            );
            assert_eq!(mode(&dir), 0o775);
        }
        // An entry's name on a folder is not an entry.
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("c");
        std::fs::create_dir_all(dir.join(ENTRY)).unwrap();
        assert!(private_dir(&dir).is_err());
        assert!(dir.join(ENTRY).is_dir());
    }

    #[test]
    fn only_the_names_berth_writes_are_its_own() {
        assert!(ours(ENTRY));
        assert!(ours(&ENTRY.replace(".cwasm", ".tmp123")));
        assert!(ours("downloads") && ours("oci") && ours("canaries"));
        for theirs in [
            "NOTES.txt",
            "planted.cwasm",
            ".git",
            "a-b.cwasm",
            "src",
            &ENTRY.replace(".cwasm", ".tmp"),
        ] {
            assert!(!ours(theirs), "{theirs}");
        }
    }

    #[test]
    fn a_symlink_or_another_users_folder_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(private_dir(&link).is_err());
        // Only root can give a folder away.
        if rustix::process::geteuid().is_root() {
            let theirs = root.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(12345), Some(12345)).unwrap();
            let err = private_dir(&theirs).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
            assert!(err.to_string().contains("uid 12345"), "{err}");
        }
    }

    #[test]
    fn pruning_keeps_live_and_recent_entries_within_the_size() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        private_dir(&dir).unwrap();
        let cache = CompileCache {
            dir: dir.clone(),
            max_bytes: 12_000,
        };
        // 12 old entries of 1000 bytes, oldest first, and one live one.
        for i in 0..12 {
            let path = dir.join(format!("{i:064}-{:016}.cwasm", 0));
            std::fs::write(&path, vec![0u8; 1000]).unwrap();
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        let live = format!("{:064}", 99);
        std::fs::write(dir.join(format!("{live}-{:016}.cwasm", 0)), vec![0u8; 5000]).unwrap();
        // A file someone put there, older than every entry, is not one to
        // prune (the size pass deletes the oldest first).
        std::fs::write(dir.join("NOTES.txt"), vec![0u8; 20_000]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(dir.join("NOTES.txt"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        cache.prune(&HashSet::from([live.clone()]));
        std::fs::remove_file(dir.join("NOTES.txt"))
            .expect("pruning deleted a file it did not write");
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                e.unwrap().file_name().to_string_lossy()[..64]
                    .trim_start_matches('0')
                    .to_owned()
            })
            .collect();
        left.sort();
        // The live one, then the newest old ones that fit: 5000 + 7 * 1000.
        assert!(left.contains(&"99".to_owned()), "{left:?}");
        assert_eq!(left.len(), 8, "{left:?}");
        for gone in ["", "1", "2", "3", "4"] {
            assert!(!left.contains(&gone.to_owned()), "{gone} kept: {left:?}");
        }
    }

    #[test]
    fn payloads_are_verified_and_tied_to_their_component() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry");
        let sha = "ab".repeat(32);
        write_entry(&path, &sha, b"machine code").unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(mode(&path), 0o644);
        assert_eq!(verified_payload(&data, &sha), Some(&b"machine code"[..]));
        assert_eq!(
            verified_payload(&data, &sha.to_uppercase()),
            Some(&b"machine code"[..])
        );
        assert_eq!(
            verified_payload(&data, &"cd".repeat(32)),
            None,
            "another component's"
        );
        assert_eq!(
            verified_payload(&data[..data.len() - 1], &sha),
            None,
            "truncated"
        );
        let mut flipped = data.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(verified_payload(&flipped, &sha), None, "corrupt");
        assert_eq!(verified_payload(b"BERTHC0", &sha), None);
        assert!(write_entry(&path, "not hex", b"x").is_err());
        // A link planted at the temporary name is replaced, never written
        // through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_entry(&path, &sha, b"machine code").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!tmp.exists());
    }

    #[test]
    fn a_prebuilt_entry_is_used_only_when_sound_trusted_and_for_this_engine() {
        use std::os::unix::fs::PermissionsExt;
        let engine = Engine::default();
        let bytes = std::fs::read(crate::testing::wasm("plain_hello")).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let dir = tempfile::tempdir().unwrap();
        let set_mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set_mode(dir.path(), 0o755);
        let prebuilt = Prebuilt::open(dir.path()).unwrap();
        assert!(
            prebuilt.get(&engine, "m", &sha, bytes.len()).is_none(),
            "no entry"
        );
        let entry = dir.path().join(entry_name(&engine, &sha));
        write_entry(&entry, &sha, &engine.precompile_component(&bytes).unwrap()).unwrap();
        let get = |engine: &Engine, sha: &str| prebuilt.get(engine, "m", sha, bytes.len());
        assert!(get(&engine, &sha).is_some());
        // Named as another component's entry: not that component's code.
        let other_sha = "0".repeat(64);
        std::fs::copy(&entry, dir.path().join(entry_name(&engine, &other_sha))).unwrap();
        assert!(get(&engine, &other_sha).is_none());
        // Another engine's settings name another entry.
        let mut other = wasmtime::Config::new();
        other.cranelift_opt_level(wasmtime::OptLevel::None);
        assert!(get(&Engine::new(&other).unwrap(), &sha).is_none());
        // Writable by others, or a symlink to an entry: not used, not deleted.
        set_mode(&entry, 0o666);
        assert!(get(&engine, &sha).is_none());
        set_mode(&entry, 0o644);
        let aside = dir.path().join("aside.cwasm");
        std::fs::rename(&entry, &aside).unwrap();
        std::os::unix::fs::symlink(&aside, &entry).unwrap();
        assert!(get(&engine, &sha).is_none());
        std::fs::remove_file(&entry).unwrap();
        // Corrupt: refused by its digest, and left in place.
        let mut data = std::fs::read(&aside).unwrap();
        *data.last_mut().unwrap() ^= 1;
        std::fs::write(&entry, &data).unwrap();
        set_mode(&entry, 0o644);
        assert!(get(&engine, &sha).is_none());
        assert!(entry.exists());
        // A FIFO is skipped, not waited on; an entry far larger than its
        // component's code could be is not read.
        std::fs::remove_file(&entry).unwrap();
        let fifo = std::process::Command::new("mkfifo")
            .arg("-m644")
            .arg(&entry)
            .status();
        if fifo.is_ok_and(|s| s.success()) {
            assert!(get(&engine, &sha).is_none());
            std::fs::remove_file(&entry).unwrap();
        }
        std::fs::copy(&aside, &entry).unwrap();
        set_mode(&entry, 0o644);
        assert!(get(&engine, &sha).is_some());
        assert!(
            prebuilt.get(&engine, "m", &sha, 0).is_some(),
            "within the margin"
        );
        std::fs::File::options()
            .append(true)
            .open(&entry)
            .unwrap()
            .set_len(MAX_MARGIN + 1)
            .unwrap();
        assert!(
            prebuilt.get(&engine, "m", &sha, 0).is_none(),
            "over the margin"
        );
        // The folder as checked: moved away and replaced by a link to
        // another folder after it was opened, it is still the one read.
        std::fs::copy(&aside, &entry).unwrap();
        let moved = dir.path().with_extension("moved");
        std::fs::rename(dir.path(), &moved).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path()).unwrap();
        assert!(get(&engine, &sha).is_some(), "the opened folder");
        std::fs::remove_file(dir.path()).unwrap();
        std::fs::rename(&moved, dir.path()).unwrap();
        // The folder itself: writable by others, a symlink, or a file.
        set_mode(dir.path(), 0o775);
        let err = Prebuilt::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("others may write"), "{err}");
        set_mode(dir.path(), 0o755);
        let link = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path(), link.path().join("l")).unwrap();
        assert!(Prebuilt::open(&link.path().join("l")).is_err());
        assert!(Prebuilt::open(&aside).is_err());
    }
}
