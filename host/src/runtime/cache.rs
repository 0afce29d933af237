//! The on-disk cache of precompiled components, for fast (re)starts.
//!
//! An entry is keyed by the sha256 of the component and a fingerprint of
//! the engine and its settings, so a new Berth version or a changed engine
//! setting never picks up a stale artifact. Each entry carries the sha256 of
//! its own payload: a truncated or corrupt file is detected, deleted and
//! rebuilt, never handed to the engine.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 8] = b"BERTHC01";
const HEADER: usize = MAGIC.len() + 32;

/// A folder of precompiled components.
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
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
    /// Opens (and creates) the cache folder.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The cached component for `sha256`, or `compile`d and stored.
    pub fn get_or_compile(
        &self,
        engine: &Engine,
        module: &str,
        sha256: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, Origin)> {
        let path = self.entry(sha256);
        if let Ok(data) = std::fs::read(&path) {
            match verified_payload(&data).map(|payload| deserialize(engine, payload)) {
                Some(Ok(component)) => return Ok((component, Origin::Cache)),
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
        let payload = engine.precompile_component(bytes)?;
        if let Err(e) = self.store(&path, &payload) {
            tracing::warn!(module, file = %path.display(), error = %e, "cannot write the compile cache");
        }
        Ok((deserialize(engine, &payload)?, Origin::Compiled))
    }

    fn store(&self, path: &Path, payload: &[u8]) -> std::io::Result<()> {
        // Write aside, then rename: readers never see half an entry.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&Sha256::digest(payload))?;
        f.write_all(payload)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

fn verified_payload(data: &[u8]) -> Option<&[u8]> {
    if data.len() < HEADER || &data[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (digest, payload) = data[MAGIC.len()..].split_at(32);
    (Sha256::digest(payload).as_slice() == digest).then_some(payload)
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

    #[test]
    fn payloads_are_verified() {
        let payload = b"machine code".to_vec();
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&Sha256::digest(&payload));
        data.extend_from_slice(&payload);
        assert_eq!(verified_payload(&data), Some(&payload[..]));
        assert_eq!(verified_payload(&data[..data.len() - 1]), None, "truncated");
        let mut flipped = data.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(verified_payload(&flipped), None, "corrupt");
        assert_eq!(verified_payload(b"BERTHC0"), None);
    }
}
