//! The environment layer: `BERTH_` variables, `__` for nesting, for the
//! known sections only, with their values taken as written.
//!
//! figment's own `Env` provider parses every value as a TOML-like scalar,
//! so `BERTH_ADMIN__TOKEN=000420` became the number 420 and a config value
//! `1.10` became `1.1`. This provider keeps what a variable says: a value is
//! read as a number or a boolean only when that reading gives back exactly
//! the text written (so `8080`, `true` and `2.5` still set numeric and
//! boolean keys), and never under the keys whose values are strings by
//! nature (a module's `config` and `secrets`, registry credentials, the
//! admin token).

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
            let value = if holds_strings(&path) {
                Value::from(raw)
            } else {
                as_written(raw)
            };
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

/// Whether the key's value is a string whatever it looks like.
fn holds_strings(path: &[String]) -> bool {
    let key: Vec<&str> = path.iter().map(String::as_str).collect();
    matches!(
        key.as_slice(),
        ["modules", _, "config" | "secrets", ..]
            | ["modules", _, "canary", "config" | "secrets", ..]
            | ["registry", "credentials", ..]
            | ["admin", "token"]
    )
}

/// `raw` as a number or boolean when that is exactly what it says,
/// otherwise the string as written.
fn as_written(raw: String) -> Value {
    let parsed: Value = raw.parse().expect("parsing a value is infallible");
    let same = match &parsed {
        Value::Num(_, n) => {
            n.to_u128().map(|n| n.to_string()) == Some(raw.clone())
                || n.to_i128().map(|n| n.to_string()) == Some(raw.clone())
                || n.to_f64().is_some_and(|f| f.to_string() == raw)
        }
        Value::Bool(_, b) => b.to_string() == raw,
        // Arrays and tables are written on purpose (`[1, 2]`).
        Value::Array(..) | Value::Dict(..) => true,
        _ => false,
    };
    if same { parsed } else { Value::from(raw) }
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
            ("BERTH_MODULES__SHOP__CONFIG__COUNT", "3"),
            ("BERTH_MODULES__SHOP__SECRETS__PIN", "0042"),
            ("BERTH_REGISTRY__CREDENTIALS__R__USERNAME", "12345"),
            ("BERTH_SERVER__MAX_HEADERS", "50"),
            ("BERTH_LOG__ACCESS_LOG", "false"),
            ("BERTH_RUNTIME__WORKER_THREADS", "007"),
            ("BERTH_DEFAULTS__LIMITS__TIMEOUT", "2s"),
        ];
        let s = |key| value(&vars, key).into_string();
        assert_eq!(s("admin.token").as_deref(), Some("000420"));
        assert_eq!(s("modules.shop.config.version").as_deref(), Some("1.10"));
        assert_eq!(s("modules.shop.config.count").as_deref(), Some("3"));
        assert_eq!(s("modules.shop.secrets.pin").as_deref(), Some("0042"));
        assert_eq!(
            s("registry.credentials.r.username").as_deref(),
            Some("12345")
        );
        assert_eq!(s("defaults.limits.timeout").as_deref(), Some("2s"));
        // Numbers and booleans that read back as written stay typed.
        assert_eq!(value(&vars, "server.max_headers").to_u128(), Some(50));
        assert_eq!(value(&vars, "log.access_log").to_bool(), Some(false));
        // A leading zero is not a number as written: kept as text, so the
        // typed key refuses it by name instead of reading another number.
        assert_eq!(s("runtime.worker_threads").as_deref(), Some("007"));
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
