//! The environment layer: `BERTH_` variables, `__` for nesting, for the
//! known sections only, with their values taken as written.
//!
//! figment's own `Env` provider parses every value as a TOML-like scalar,
//! so `BERTH_ADMIN__TOKEN=000420` became the number 420 and a config value
//! `1.10` became `1.1`. This provider hands every value over as the string
//! written; the config is extracted with figment's lossy reading, which
//! turns a string into a number or a boolean only where the key wants one
//! (`BERTH_SERVER__MAX_HEADERS=50`). Arrays and tables written on purpose
//! (`["a", "b"]`) are parsed, to a bounded depth.

use figment::value::{Dict, Map, Tag, Value};
use figment::{Error, Metadata, Profile, Provider};

/// The top-level sections that `BERTH_` variables may set. Only these are
/// read from the environment: the kubelet injects service links such as
/// `BERTH_SERVICE_HOST` and `BERTH_PORT_80_TCP_ADDR` for any Service whose
/// name starts with `berth`, and those must not stop the pod.
const SECTIONS: &[&str] = &[
    "server",
    "admin",
    "runtime",
    "defaults",
    "log",
    "shutdown",
    "modules",
    "upstreams",
    "registry",
];

/// `BERTH_` variables that are flags of the CLI, not config keys.
const FLAGS: &[&str] = &["config", "secrets_file"];

/// The section a `BERTH_` variable's key (after the prefix, `__` split into
/// dots, lower case) would set, when it is one of ours.
pub(super) fn section(key: &str) -> Option<&str> {
    let section = key.split('.').next()?;
    SECTIONS.contains(&section).then_some(section)
}

/// `BERTH_` variables that the config ignores because they name no section
/// (service links, mostly), to name them in one warning at start-up.
pub fn ignored_env_vars() -> Vec<String> {
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            name.strip_prefix("BERTH_").is_some_and(|rest| {
                let key = rest.to_ascii_lowercase().replace("__", ".");
                !FLAGS.contains(&key.as_str()) && section(&key).is_none()
            })
        })
        .collect();
    names.sort();
    names
}

/// The `BERTH_` variables of the process as a figment layer.
#[derive(Debug, Clone, Default)]
pub(super) struct EnvLayer {
    /// Variables read instead of the process's, for tests.
    vars: Option<Vec<(String, String)>>,
}

impl EnvLayer {
    fn vars(&self) -> Vec<(String, String)> {
        match &self.vars {
            Some(vars) => vars.clone(),
            // Names or values that are not UTF-8 cannot be ours.
            None => std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    #[cfg(test)]
    fn of(vars: &[(&str, &str)]) -> Self {
        EnvLayer {
            vars: Some(
                vars.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        // Errors name the key and the variable that set it.
        Metadata::named("`BERTH_` environment variable(s)").interpolater(|_, keys| {
            let var: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!("{} (BERTH_{})", keys.join("."), var.join("__"))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let mut dict = Dict::new();
        for (name, raw) in self.vars() {
            let Some(rest) = name.strip_prefix("BERTH_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(String::is_empty) || section(&path[0]).is_none() {
                continue;
            }
            let value = as_written(raw);
            let nested = path
                .iter()
                .rev()
                .fold(value, |value, key| {
                    let mut d = Dict::new();
                    d.insert(key.clone(), value);
                    Value::Dict(Tag::Default, d)
                })
                .into_dict()
                .expect("a path of at least one key nests in a dict");
            dict = merge(dict, nested);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Deepest nesting of an array or table value parsed from a variable:
/// figment's parser recurses, and a deep one would overflow the stack.
const MAX_NESTING: usize = 8;

/// `raw` as the string written, unless it is an array or a table (`[...]`,
/// `{...}`) of bounded depth, which is parsed.
fn as_written(raw: String) -> Value {
    let structured = raw.trim_start().starts_with(['[', '{']);
    if structured && nesting(&raw) <= MAX_NESTING {
        raw.parse().expect("parsing a value is infallible")
    } else {
        Value::from(raw)
    }
}

/// How deep brackets nest in `text` (quotes not considered: a bracket in
/// a quoted string only makes this more careful).
fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for c in text.chars() {
        match c {
            '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `b` merged into `a`, tables key by key.
fn merge(mut a: Dict, b: Dict) -> Dict {
    for (k, v) in b {
        let v = match (a.remove(&k), v) {
            (Some(Value::Dict(_, old)), Value::Dict(tag, new)) => Value::Dict(tag, merge(old, new)),
            (_, v) => v,
        };
        a.insert(k, v);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(vars: &[(&str, &str)], key: &str) -> Value {
        figment::Figment::from(EnvLayer::of(vars))
            .find_value(key)
            .unwrap()
    }

    #[test]
    fn values_are_taken_as_written() {
        let vars = [
            ("BERTH_ADMIN__TOKEN", "000420"),
            ("BERTH_MODULES__SHOP__CONFIG__VERSION", "1.10"),
            ("BERTH_MODULES__SHOP__CANARY__CONFIG__VERSION", "2.10"),
            ("BERTH_MODULES__SHOP__SECRETS__PIN", "0042"),
            ("BERTH_REGISTRY__CREDENTIALS__R__USERNAME", "12345"),
            ("BERTH_SERVER__MAX_HEADERS", "50"),
            ("BERTH_SHUTDOWN__DRAIN_DELAY", "0"),
            ("BERTH_LOG__ACCESS_LOG", "false"),
            (
                "BERTH_MODULES__SHOP__ALLOWED_OUTBOUND_HOSTS",
                "[\"https://a.example\"]",
            ),
        ];
        let s = |key| value(&vars, key).into_string();
        for (key, want) in [
            ("admin.token", "000420"),
            ("modules.shop.config.version", "1.10"),
            ("modules.shop.canary.config.version", "2.10"),
            ("modules.shop.secrets.pin", "0042"),
            ("registry.credentials.r.username", "12345"),
            ("server.max_headers", "50"),
            ("shutdown.drain_delay", "0"),
            ("log.access_log", "false"),
        ] {
            assert_eq!(s(key).as_deref(), Some(want), "{key}");
        }
        // Written as an array on purpose: an array.
        let hosts = value(&vars, "modules.shop.allowed_outbound_hosts");
        assert_eq!(hosts.into_array().map(|a| a.len()), Some(1));
    }

    #[test]
    fn a_deeply_nested_value_is_a_string_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        let vars = [("BERTH_LOG__ACCESS_LOG", deep.as_str())];
        assert_eq!(
            value(&vars, "log.access_log").into_string(),
            Some(deep.clone())
        );
        assert_eq!(nesting("[[1], {a = [2]}]"), 3);
    }

    #[test]
    fn only_our_sections_are_read() {
        let vars = [
            ("BERTH_SERVICE_HOST", "10.0.0.1"),
            ("BERTH_PORT_80_TCP_ADDR", "10.0.0.1"),
            ("BERTH_CONFIG", "/etc/berth.toml"),
            ("BERTH_SERVER____X", "1"),
            ("OTHER_SERVER__LISTEN", "1"),
            ("BERTH_LOG__REDACT_QUERY", "true"),
        ];
        let fig = figment::Figment::from(EnvLayer::of(&vars));
        let keys: Vec<String> = fig
            .data()
            .unwrap()
            .values()
            .flat_map(|d| d.keys().cloned())
            .collect();
        assert_eq!(keys, ["log"]);
    }
}
