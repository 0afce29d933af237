//! `[admin]`: the admin listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::shutdown::MAX_SHUTDOWN_STEP;
use super::values::{Secret, check_duration};
use super::{ConfigError, rejected};

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin endpoints; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The bearer token that state-changing endpoints (`POST /admin/...`)
    /// require. Without it (or `token_file`) those endpoints are off.
    /// `BERTH_ADMIN__TOKEN` sets it from the environment.
    pub token: Option<Secret>,
    /// A file holding the token (a mounted Secret), read on every use so a
    /// rotated Secret takes effect at once. Wins over `token`.
    pub token_file: Option<PathBuf>,
    /// How long the traffic side may make no progress (its runtime's
    /// heartbeat, or a write of the log writer) before `/healthz` fails.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// `HOST:PORT` naming the admin port of every pod of this Deployment:
    /// the chart's headless Service, which cluster DNS answers with each
    /// pod's address. With it, `?pods=all` on an admin action repeats the
    /// action on every pod. Resolved at each use, so it follows scaling.
    pub peers: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            token: None,
            token_file: None,
            stall_timeout: Duration::from_secs(10),
            peers: None,
        }
    }
}

impl AdminConfig {
    /// What types alone cannot check in `[admin]`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.token.as_ref().is_some_and(|t| t.0.0.trim().is_empty()) {
            return Err(rejected("admin.token", "must not be empty"));
        }
        check_duration("admin.stall_timeout", self.stall_timeout, MAX_SHUTDOWN_STEP)?;
        if self.stall_timeout < Duration::from_secs(1) {
            return Err(rejected("admin.stall_timeout", "must be at least 1s"));
        }
        if let Some(peers) = &self.peers {
            check_peers(peers)?;
        }
        Ok(())
    }
}

/// `admin.peers` is a name (or address) and a port, as a socket address
/// resolver takes it: `shop-berth-blue-pods.shop.svc:9090`.
fn check_peers(peers: &str) -> Result<(), ConfigError> {
    let Some((host, port)) = peers.rsplit_once(':') else {
        return Err(rejected("admin.peers", "must be HOST:PORT"));
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if !host_ok {
        return Err(rejected(
            "admin.peers",
            "must be HOST:PORT with a DNS name or an IP address",
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(rejected(
            "admin.peers",
            "must end in a port from 1 to 65535",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::check_peers;

    #[test]
    fn peers_are_a_name_or_an_address_and_a_port() {
        for ok in [
            "shop-berth-blue-pods.shop.svc:9090",
            "10.0.0.1:9090",
            "[::1]:9090",
            "localhost:1",
        ] {
            assert!(check_peers(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "shop:0",
            "shop",
            ":9090",
            "shop:99999",
            "a b:1",
            "http://shop:9090",
            "a..b:1",
            "shop:9090/x",
        ] {
            let err = check_peers(bad).unwrap_err().to_string();
            assert!(err.contains("admin.peers"), "{bad}: {err}");
        }
    }
}
