//! `[server]`: the traffic listener.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{ByteSize, MAX_REQUEST_DURATION, check_duration};
use super::{ConfigError, rejected};

/// The traffic listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to accept traffic on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Time a client has to send a request head; also how long an idle
    /// keep-alive connection is kept (slowloris protection).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers); more gets 431.
    pub max_header_bytes: ByteSize,
    /// Most headers in a request; more gets 431.
    pub max_headers: u32,
    /// Whether clients may speak HTTP/2 without TLS (h2c, by prior
    /// knowledge, as gRPC clients do) on the same port as HTTP/1.1.
    pub http2: bool,
    /// Most streams one HTTP/2 connection may have open at once; the
    /// client is told in its SETTINGS and more are refused.
    pub http2_max_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: ByteSize(64 << 10),
            max_headers: 100,
            http2: true,
            http2_max_streams: 100,
        }
    }
}

/// Most headers a request may be allowed (hyper's default is 100; it
/// allocates a slot for each on every request).
const MAX_HEADERS: u32 = 1000;
/// Largest request head that may be allowed.
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Most concurrent HTTP/2 streams a connection may be allowed: each holds
/// a task and its flow-control buffers.
const MAX_HTTP2_STREAMS: u32 = 1000;

impl ServerConfig {
    /// What types alone cannot check in `[server]`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        check_duration(
            "server.header_read_timeout",
            self.header_read_timeout,
            MAX_REQUEST_DURATION,
        )?;
        if self.header_read_timeout.is_zero() {
            return Err(rejected(
                "server.header_read_timeout",
                "must be longer than 0s",
            ));
        }
        // hyper allocates room for `max_headers` on every request, and
        // buffers up to `max_header_bytes` per connection.
        if self.max_header_bytes.0 < 1024 || self.max_header_bytes.0 > MAX_HEADER_BYTES {
            return Err(rejected(
                "server.max_header_bytes",
                "must be between 1KiB and 1MiB",
            ));
        }
        if !(1..=MAX_HEADERS).contains(&self.max_headers) {
            return Err(rejected(
                "server.max_headers",
                format!("must be between 1 and {MAX_HEADERS}"),
            ));
        }
        if !(1..=MAX_HTTP2_STREAMS).contains(&self.http2_max_streams) {
            return Err(rejected(
                "server.http2_max_streams",
                format!("must be between 1 and {MAX_HTTP2_STREAMS}"),
            ));
        }
        Ok(())
    }
}
