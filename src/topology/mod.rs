//! Topology files: what a processing job reads, which modules fold it, and
//! where the results go. Parsed strictly (an unknown key is an error) so a
//! typo never silently falls back to a default.

mod describe;
mod layers;
mod service;

use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kafka::{KafkaSettings, TopicSettings};
use crate::modules::Limits;
use crate::store::StoreOptions;

pub use describe::{describe, Format};
pub use layers::{topology_file, Layers, DEFAULT_TOPOLOGY, TOPOLOGY_ENV};
pub use service::ServiceSettings;

/// Errors loading or validating a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("reading topology {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("topology {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("invalid topology: {0}")]
    Invalid(String),
    #[error("{0}")]
    Missing(String),
}

/// The largest room state a topology may allow: every change to a room at
/// that size costs a changelog and a broadcast record of about that size.
const MOST_ROOM_STATE_BYTES: usize = 64 << 20;

/// A processing job's whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Names the consumer group and prefixes the transactional id and the changelog topic.
    pub application_id: String,
    /// Input topics of Tecate room events, keyed by room path.
    #[serde(default = "default_inputs")]
    pub inputs: Vec<String>,
    /// Modules to run, in order; each must be registered.
    pub modules: Vec<String>,
    /// Every effective change goes here, keyed by room path.
    #[serde(default = "default_broadcast")]
    pub broadcast_topic: String,
    /// Refused records go here with the reason in headers.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_topic: String,
    /// Partition count for topics omni creates when they are missing.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// How often a transaction commits, in milliseconds.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Create missing topics at start-up. Turn off where the cluster forbids it;
    /// the job then checks that the topics exist with matching partition counts.
    #[serde(default = "default_true")]
    pub create_topics: bool,
    /// Exactly-once through Kafka transactions. Only the embedded demo turns it off.
    #[serde(default = "default_true")]
    pub exactly_once: bool,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub kafka: KafkaSettings,
    /// Replication and changelog compaction of the topics omni creates.
    #[serde(default)]
    pub topics: TopicSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub store: StoreSettings,
    #[serde(default)]
    pub instance: InstanceSettings,
    #[serde(default)]
    pub http: HttpSettings,
    /// `omni serve`, the Omni service.
    #[serde(default)]
    pub service: ServiceSettings,
}

/// Where room state is published for late joiners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://[user[:password]@]host:port[/db]`, or `rediss://` for TLS. Empty disables
    /// Redis. `OMNI_REDIS_URL` overrides it; `OMNI_REDIS_PASSWORD` supplies a password.
    pub url: String,
    /// Prefix of every key omni writes (`<prefix>:room:{<path>}`).
    pub key_prefix: String,
    /// How many of a room's latest versions its change stream keeps.
    pub stream_max_len: usize,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings { url: String::new(), key_prefix: "omni".into(), stream_max_len: 1000 }
    }
}

/// The local state store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Directory of the RocksDB store; one per instance. `OMNI_STATE_DIR` overrides it.
    pub dir: PathBuf,
    #[serde(flatten)]
    pub memory: StoreOptions,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings { dir: PathBuf::from(".omni/state"), memory: StoreOptions::default() }
    }
}

/// This process's identity in the consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceSettings {
    /// Stable id of this instance: suffix of the transactional id, so a restarted
    /// instance fences its previous self at once. Random per start when empty.
    pub id: String,
    /// Static group membership (`group.instance.id`): a restart within the
    /// session timeout keeps its partitions without a rebalance. Off when empty.
    pub static_membership: bool,
    /// Transaction timeout: how long a crashed instance's open transaction can
    /// hold back readers. Milliseconds.
    pub transaction_timeout_ms: u64,
    /// Processing threads, as Kafka Streams' `num.stream.threads`: each is a
    /// group member with its own consumer, transactional producer and share
    /// of the partitions, over the instance's one store and Redis writer.
    pub threads: usize,
    /// Warm copies kept of each partition besides its owner, as Kafka
    /// Streams' `num.standby.replicas`: this instance follows the changelog
    /// of the partitions it stands by for, so taking one over restores only
    /// the last records. Costs each standby its share of disk and of
    /// changelog reading. 0 turns standbys off.
    pub standby_replicas: usize,
}

impl Default for InstanceSettings {
    fn default() -> Self {
        // Kafka Streams' exactly-once default: short, so a crash stalls readers briefly.
        InstanceSettings {
            id: String::new(),
            static_membership: false,
            transaction_timeout_ms: 10_000,
            threads: 1,
            standby_replicas: 0,
        }
    }
}

/// The operations endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`. Port 0 picks a free port;
    /// the chosen address is logged. `OMNI_HTTP_LISTEN` overrides it.
    pub listen: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings { listen: "127.0.0.1:0".into() }
    }
}

fn default_inputs() -> Vec<String> {
    vec!["tecate.room-events".into()]
}
fn default_broadcast() -> String {
    "omni.room-state".into()
}
fn default_dead_letter() -> String {
    "omni.room-events.dlq".into()
}
fn default_partitions() -> i32 {
    8
}
fn default_commit_interval_ms() -> u64 {
    100
}
fn default_true() -> bool {
    true
}

impl Topology {
    /// Reads and validates a topology file, without the environment's
    /// overrides ([`Topology::load_layered`] adds those).
    pub fn load(path: &FsPath) -> Result<Topology, TopologyError> {
        let topology = Topology::parse_file(path)?;
        topology.validate()?;
        Ok(topology)
    }

    /// Reads a topology file, strictly, without validating it.
    fn parse_file(path: &FsPath) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError::Read(path.to_owned(), e))?;
        toml::from_str(&text).map_err(|e| TopologyError::Parse(path.to_owned(), e))
    }

    /// A topology with every default, for the demo and tests.
    pub fn with_defaults(application_id: &str, modules: &[&str]) -> Topology {
        toml::from_str(&format!("application_id = {application_id:?}\nmodules = {:?}\n", modules))
            .expect("defaults parse")
    }

    pub fn validate(&self) -> Result<(), TopologyError> {
        let invalid = |m: &str| Err(TopologyError::Invalid(m.to_owned()));
        if self.application_id.is_empty() {
            return invalid("application_id is empty");
        }
        match self.inputs.len() {
            0 => return invalid("inputs is empty"),
            1 => {}
            // A second input topic needs an assignor that co-locates partition n
            // of every input on one instance; cooperative-sticky does not.
            _ => return invalid("only one input topic is supported: rooms must be co-partitioned in one topic"),
        }
        if self.modules.is_empty() {
            return invalid("modules is empty");
        }
        if self.partitions < 1 {
            return invalid("partitions must be at least 1");
        }
        if self.commit_interval_ms == 0 {
            return invalid("commit_interval_ms must be positive");
        }
        // A commit that falls due must have time to finish well within the
        // transaction timeout, or the coordinator aborts it and fences the producer.
        if self.commit_interval_ms.saturating_mul(3) > self.instance.transaction_timeout_ms {
            return invalid(
                "commit_interval_ms must be at most a third of instance.transaction_timeout_ms, \
                 so a transaction commits well before the coordinator times it out",
            );
        }
        if self.limits.max_room_state_bytes == 0 || self.limits.max_room_state_bytes > MOST_ROOM_STATE_BYTES {
            return invalid("limits.max_room_state_bytes must be between 1 and 64 MiB");
        }
        if self.instance.threads == 0 {
            return invalid("instance.threads must be at least 1");
        }
        if self.redis.stream_max_len == 0 {
            return invalid(
                "redis.stream_max_len must be at least 1: a closed room's last version lives in its stream",
            );
        }
        self.topics.validate().map_err(TopologyError::Invalid)?;
        let topics = [&self.inputs[0], &self.broadcast_topic, &self.dead_letter_topic];
        if topics.iter().any(|t| t.is_empty()) {
            return invalid("topic names must not be empty");
        }
        if self.inputs[0] == self.broadcast_topic || self.inputs[0] == self.dead_letter_topic {
            return invalid("the input topic cannot also be an output topic");
        }
        Ok(())
    }

    pub fn input_topic(&self) -> &str {
        &self.inputs[0]
    }

    /// The compacted topic that backs the room state store.
    pub fn changelog_topic(&self) -> String {
        format!("{}-room-state-changelog", self.application_id)
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_topology_loads_with_the_documented_defaults() {
        let path = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("topologies/room-state.toml");
        let t = Topology::load(&path).unwrap();
        assert_eq!(t.inputs, vec!["tecate.room-events".to_owned()]);
        assert_eq!(t.modules, vec!["recording".to_owned(), "tags".to_owned()]);
        assert_eq!(t.broadcast_topic, "omni.room-state");
        assert_eq!(t.dead_letter_topic, "omni.room-events.dlq");
        assert_eq!(t.commit_interval_ms, 100);
        assert_eq!(t.limits, Limits::default());
        assert!(t.exactly_once);
    }

    #[test]
    fn an_unknown_key_is_an_error_anywhere() {
        for text in [
            "application_id = 'a'\nmodules = ['tags']\ncommit_interval = 5\n",
            "application_id = 'a'\nmodules = ['tags']\n[redis]\nurll = 'x'\n",
            "application_id = 'a'\nmodules = ['tags']\n[limits]\nmax_tags = 3\n",
        ] {
            let err = toml::from_str::<Topology>(text).unwrap_err().to_string();
            assert!(err.contains("unknown field"), "{err}");
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let mut t = Topology::with_defaults("a", &["tags"]);
        assert!(t.validate().is_ok());
        t.inputs.push("second".into());
        assert!(t.validate().unwrap_err().to_string().contains("one input topic"));
        let mut t = Topology::with_defaults("a", &["tags"]);
        t.commit_interval_ms = 5000;
        assert!(t.validate().unwrap_err().to_string().contains("a third of instance.transaction_timeout_ms"));
        let mut t = Topology::with_defaults("a", &["tags"]);
        t.limits.max_room_state_bytes = 0;
        assert!(t.validate().unwrap_err().to_string().contains("max_room_state_bytes"));
        let mut t = Topology::with_defaults("a", &["tags"]);
        t.broadcast_topic = t.inputs[0].clone();
        assert!(t.validate().is_err());
        assert_eq!(t.changelog_topic(), "a-room-state-changelog");
    }
}
