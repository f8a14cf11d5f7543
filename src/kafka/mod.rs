//! Kafka client setup: connection and security settings shared by every
//! client omni makes, the Java-compatible partitioner, topic creation, and
//! reading a consumer group's assignment.

mod admin;
mod group;
mod partitioner;
mod producer;

use std::collections::BTreeMap;

use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::ClientConfig;

pub use admin::{
    ensure_topics, ensure_topics_with, max_message_bytes, not_served_yet, wait_for_topic, TopicSettings, TopicSpec,
};
pub use group::{group_assignment, GroupAssignment, MemberAssignment};
pub use partitioner::{murmur2, partition_for};
pub use producer::{
    abort_transaction, commit_transaction, drain, refused_by_broker, send, send_lingering, serve_ready,
};

/// Errors from Kafka clients.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
}

/// How to reach and authenticate to the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port…]`. `OMNI_BROKERS` overrides it.
    pub brokers: String,
    /// Extra librdkafka properties passed to every client, for SASL and TLS:
    /// `security.protocol`, `sasl.mechanism` (PLAIN, SCRAM-SHA-256/512),
    /// `sasl.username`, `ssl.ca.location`, … Secrets belong in
    /// `OMNI_KAFKA_SASL_PASSWORD` or a file named by `sasl.password.file`.
    pub properties: BTreeMap<String, String>,
}

/// Lets a client that only asks for offsets (it never consumes, so
/// librdkafka refreshes no topic's metadata for it) see a new partition
/// leader: its cached metadata expires after 5 s, not 15 minutes. Without
/// it, a leader lost while the cache was filled answers "unknown
/// partition" until the entry expires, however often it is asked.
pub fn fresh_leaders(mut config: ClientConfig) -> ClientConfig {
    config.set("metadata.max.age.ms", "5000");
    config
}

/// Bounds a consumer's prefetched input to about `kib` KiB of records.
///
/// Small records cost librdkafka far more memory than their bytes (about
/// 120 MiB of resident memory for 8 MiB of 100-byte events), so the bound
/// must be small. A consumer past it stops fetching for `fetch.queue.backoff.ms`,
/// by default a second, in which it would run dry: the back-off is cut to
/// well under the time it takes to process the bound.
pub fn bound_prefetch(config: &mut ClientConfig, kib: usize) {
    config.set("queued.max.messages.kbytes", kib.to_string()).set("fetch.queue.backoff.ms", "50");
}

/// librdkafka properties whose values are secrets.
pub const SECRET_PROPERTIES: [&str; 3] = ["sasl.password", "ssl.key.password", "ssl.keystore.password"];

impl KafkaSettings {
    pub fn with_brokers(brokers: impl Into<String>) -> KafkaSettings {
        KafkaSettings { brokers: brokers.into(), properties: BTreeMap::new() }
    }

    /// A client config with the brokers and every pass-through property set.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// A config for producers whose keyed records must land where Java's and
    /// Node's default partitioner puts them.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config.set("partitioner", "murmur2_random");
        config
    }
}
