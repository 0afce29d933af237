//! The value types of config keys (strings as the guest sees them,
//! redacted URLs and secrets, byte sizes) and the bound every duration is
//! checked against.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, rejected};

/// A config value as the guest sees it: always a string. Numbers and
/// booleans are accepted (environment variables arrive typed through
/// figment) and kept in their textual form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ConfigValue(pub String);

impl<'de> Deserialize<'de> for ConfigValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            S(String),
            I(i64),
            U(u64),
            F(f64),
            B(bool),
        }
        Ok(ConfigValue(
            match Scalar::deserialize(d)
                .map_err(|_| serde::de::Error::custom("expected a string, number or boolean"))?
            {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::U(u) => u.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => b.to_string(),
            },
        ))
    }
}

/// A component's download URL: presigned URLs carry credentials in their
/// userinfo and query, so it is printed and serialized (the start-up log)
/// redacted, whichever field holds it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SourceUrl(pub String);

impl std::ops::Deref for SourceUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::url(&self.0))
    }
}

impl Serialize for SourceUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::redact::url(&self.0))
    }
}

/// A secret config value: handed to the guest like any other, printed as
/// `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub ConfigValue);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A size in bytes, written as a number or with a unit (`64KiB`, `128MiB`,
/// `1GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"128MiB"`, `"10 kb"`, `"4096"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (num, unit) = text.split_at(split);
        let num: u64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size such as 128MiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => return Err(format!("unknown size unit `{other}` in `{text}`")),
        };
        num.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n != 0 && n % (1 << 30) == 0 => write!(f, "{}GiB", n >> 30),
            n if n != 0 && n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            n if n != 0 && n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            n => write!(f, "{n}B"),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a size such as 128MiB"))?
        {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// The longest a request or an outbound call may be given: far beyond any
/// sane setting, and far from where `Instant + Duration` overflows.
pub(super) const MAX_REQUEST_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Rejects `value` past `max`, naming the key.
pub(super) fn check_duration(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(rejected(
            key,
            format!(
                "{} is too long (at most {})",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}
