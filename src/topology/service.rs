//! The `[service]` section of a topology file: how `omni serve` listens,
//! what it lets clients publish and subscribe to, and its bounds.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of `omni serve`, the Omni service. Every field has a default,
/// so a topology without `[service]` serves on 127.0.0.1:50051.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// Address of gRPC (HTTP/2), the JSON API (HTTP/1.1) and `/metrics`,
    /// `/healthz`, `/readyz`. `OMNI_SERVICE_LISTEN` and `--listen` override it.
    pub listen: String,
    /// Topics a client may `Publish` a raw payload to and `Subscribe` to.
    /// Empty: none (room events always go to the job's input topic).
    pub pubsub_topics: Vec<String>,
    /// Largest request (and raw payload) accepted, in bytes.
    pub max_message_bytes: usize,
    /// How many broadcast changes a watcher may fall behind the shared
    /// consumer before its stream ends with `RESOURCE_EXHAUSTED`.
    pub watch_buffer: usize,
    /// How many bytes of broadcast records a watcher may fall behind before
    /// its stream ends with `RESOURCE_EXHAUSTED` (whichever bound comes first).
    pub watch_buffer_bytes: usize,
    /// How far back (milliseconds) the shared consumer's replay reaches for a
    /// joining watcher, covering changes committed but not yet in Redis.
    pub watch_lookback_ms: u64,
    /// Bound on the replay's bytes; the oldest changes go first past it.
    pub watch_lookback_bytes: usize,
    /// Concurrent `Watch` and `Subscribe` streams per client connection.
    pub max_streams_per_connection: usize,
    /// How long a unary call may wait for Redis before `UNAVAILABLE`, and a
    /// `Watch` for its first snapshots, in milliseconds (a shorter
    /// `grpc-timeout` wins).
    pub redis_timeout_ms: u64,
    /// How long a `Publish` waits for the broker's acknowledgement before
    /// `DEADLINE_EXCEEDED` (librdkafka's `message.timeout.ms`).
    pub publish_timeout_ms: u64,
    /// A file with the accepted bearer tokens, one a line. With it, or with
    /// `OMNI_SERVICE_TOKENS` (comma-separated), every call needs
    /// `authorization: Bearer <token>`. Tokens are never logged.
    pub tokens_file: Option<PathBuf>,
    /// PEM certificate chain and key: with both, gRPC is served over TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            listen: "127.0.0.1:50051".into(),
            pubsub_topics: Vec::new(),
            max_message_bytes: 1 << 20,
            watch_buffer: 4096,
            watch_buffer_bytes: 256 << 10,
            watch_lookback_ms: 60_000,
            watch_lookback_bytes: 16 << 20,
            max_streams_per_connection: 100,
            redis_timeout_ms: 5_000,
            publish_timeout_ms: 10_000,
            tokens_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}
