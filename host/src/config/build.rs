//! `build` and `watch` of `[modules.NAME]`: how `berth dev` rebuilds a
//! module from its sources. `berth serve` reads and checks them but never
//! runs anything.

use super::{ConfigError, rejected};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// `build` and `watch` of one module, as written (a view: the fields
/// live in [`ModuleConfig`](super::ModuleConfig), whose unknown keys are
/// refused, which a flattened struct would defeat).
#[derive(Debug, Clone, Copy)]
pub struct BuildFields<'a> {
    /// A shell command, run in the config file's directory, that writes the
    /// module's `file`.
    pub build: Option<&'a str>,
    /// Globs, relative to the config file's directory, of the sources whose
    /// change reruns `build`; required with it.
    pub watch: &'a [String],
}

impl BuildFields<'_> {
    /// The watch globs as one set; errors name `key.watch[i]`.
    pub fn watch_set(&self, key: &dyn Fn(&str) -> String) -> Result<GlobSet, ConfigError> {
        let mut set = GlobSetBuilder::new();
        for (i, pattern) in self.watch.iter().enumerate() {
            // `*` stays within a directory, as in a shell: `*.py` is the
            // project's top-level sources, not everything under `.venv`.
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| rejected(format!("{}[{i}]", key("watch")), e.kind().to_string()))?;
            set.add(glob);
        }
        set.build()
            .map_err(|e| rejected(key("watch"), e.kind().to_string()))
    }

    pub(super) fn check(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        match self.build {
            Some(command) if command.trim().is_empty() => {
                return Err(rejected(key("build"), "is empty"));
            }
            None if !self.watch.is_empty() => {
                return Err(rejected(
                    key("watch"),
                    "needs `build`: it names what reruns the build",
                ));
            }
            // Without globs every written file would rerun the build, the
            // build's own logs and caches included: say which sources.
            Some(_) if self.watch.is_empty() => {
                return Err(rejected(
                    key("watch"),
                    "is needed with `build`: the globs of the sources whose change reruns it, \
                     e.g. [\"src/**\"]",
                ));
            }
            _ => {}
        }
        for (i, pattern) in self.watch.iter().enumerate() {
            if pattern.starts_with("./") {
                return Err(rejected(
                    format!("{}[{i}]", key("watch")),
                    "write it without the leading `./`: globs are relative already",
                ));
            }
            if pattern.starts_with('/') || pattern.split('/').any(|s| s == "..") {
                return Err(rejected(
                    format!("{}[{i}]", key("watch")),
                    "must stay inside the config file's directory (no leading `/`, no `..`)",
                ));
            }
        }
        self.watch_set(key).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> String {
        format!("modules.m.{k}")
    }

    fn check(build: Option<&str>, watch: &[&str]) -> Result<GlobSet, ConfigError> {
        let watch: Vec<String> = watch.iter().map(|s| (*s).to_owned()).collect();
        let f = BuildFields {
            build,
            watch: &watch,
        };
        f.check(&key)?;
        f.watch_set(&key)
    }

    #[test]
    fn a_build_with_globs_passes_and_matches_what_it_names() {
        let set = check(Some("npm run build"), &["src/**", "package.json"]).unwrap();
        assert!(set.is_match("src/app.ts"));
        assert!(set.is_match("src/a/b.ts"));
        assert!(set.is_match("package.json"));
        assert!(!set.is_match("dist/m.wasm"));
        let set = check(Some("make"), &["*.py"]).unwrap();
        assert!(set.is_match("app.py"));
        assert!(!set.is_match(".venv/lib/site.py"));
        check(None, &[]).unwrap();
    }

    #[test]
    fn bad_fields_are_refused_with_their_key() {
        let cases: [(Option<&str>, &[&str], &str); 7] = [
            (Some("  "), &["src/**"], "modules.m.build"),
            (Some("make"), &[], "modules.m.watch"),
            (Some("make"), &["./src/**"], "modules.m.watch[0]"),
            (None, &["src/**"], "modules.m.watch"),
            (Some("make"), &["src/[a"], "modules.m.watch[0]"),
            (Some("make"), &["ok", "/etc/**"], "modules.m.watch[1]"),
            (Some("make"), &["../x/**"], "modules.m.watch[0]"),
        ];
        for (build, watch, want) in cases {
            let err = check(build, watch).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should name {want}");
        }
    }
}
