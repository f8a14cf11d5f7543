//! Creating the topics a topology needs, and checking the ones that exist.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaError, KafkaSettings};

/// A topic omni needs.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// Topic configs such as `cleanup.policy=compact`.
    pub configs: Vec<(&'static str, String)>,
}

/// How the topics omni creates are replicated and, for the changelog,
/// compacted (`[topics]` in a topology file). Topics that exist already are
/// left as they are.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    /// Copies of each partition. Unset: `min(3, brokers)`, as a production
    /// cluster runs, and still creatable on a one-broker test setup.
    pub replication_factor: Option<i32>,
    /// Copies that must have a record before a write is acknowledged
    /// (`min.insync.replicas`). Unset: `min(2, replication factor)`, so one
    /// broker can be lost without losing a committed record or stopping writes.
    pub min_insync_replicas: Option<i32>,
    /// The changelog's `segment.bytes`. The active segment is never
    /// compacted, so a restore from the beginning reads all of it: 64 MiB
    /// rather than the broker's 1 GiB keeps that part short.
    pub changelog_segment_bytes: u64,
    /// The changelog's `segment.ms`: a quiet changelog's segment still rolls
    /// (and becomes compactable) after this long, not after the broker's 7 days.
    pub changelog_segment_ms: u64,
    /// The changelog's `min.cleanable.dirty.ratio`: the cleaner compacts a
    /// log once this share of it is superseded records, so a restore reads at
    /// most about that much more than one record per room (the broker's 0.5
    /// lets it read twice as much).
    pub changelog_min_cleanable_dirty_ratio: f64,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            replication_factor: None,
            min_insync_replicas: None,
            changelog_segment_bytes: 64 << 20,
            changelog_segment_ms: 3_600_000,
            changelog_min_cleanable_dirty_ratio: 0.1,
        }
    }
}

impl TopicSettings {
    /// What no broker would take, named, before anything is created.
    pub fn validate(&self) -> Result<(), String> {
        if self.replication_factor.is_some_and(|rf| rf < 1) {
            return Err("topics.replication_factor must be at least 1".into());
        }
        if self.min_insync_replicas.is_some_and(|isr| isr < 1) {
            return Err("topics.min_insync_replicas must be at least 1".into());
        }
        if let (Some(rf), Some(isr)) = (self.replication_factor, self.min_insync_replicas) {
            if isr > rf {
                return Err(format!(
                    "topics.min_insync_replicas ({isr}) is over topics.replication_factor ({rf}): no write could be acknowledged"
                ));
            }
        }
        if self.changelog_segment_bytes < 1 << 20 {
            return Err("topics.changelog_segment_bytes must be at least 1 MiB".into());
        }
        if self.changelog_segment_ms < 60_000 {
            return Err("topics.changelog_segment_ms must be at least 60000".into());
        }
        if !(self.changelog_min_cleanable_dirty_ratio > 0.0 && self.changelog_min_cleanable_dirty_ratio <= 1.0) {
            return Err("topics.changelog_min_cleanable_dirty_ratio must be in (0, 1]".into());
        }
        Ok(())
    }

    /// The replication factor and `min.insync.replicas` for a cluster of `brokers`.
    pub fn replication(&self, brokers: i32) -> (i32, i32) {
        let rf = self.replication_factor.unwrap_or(brokers.clamp(1, 3));
        let isr = self.min_insync_replicas.unwrap_or(rf.min(2));
        (rf, isr)
    }

    /// The changelog's compaction configs.
    pub fn changelog_configs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("cleanup.policy", "compact".to_owned()),
            ("segment.bytes", self.changelog_segment_bytes.to_string()),
            ("segment.ms", self.changelog_segment_ms.to_string()),
            ("min.cleanable.dirty.ratio", self.changelog_min_cleanable_dirty_ratio.to_string()),
            ("min.compaction.lag.ms", "0".to_owned()),
        ]
    }
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The partition count of a topic, or `None` while it does not exist or
/// some partition has no leader yet (as right after its creation).
fn partition_count(settings: &KafkaSettings, topic: &str) -> Result<Option<i32>, KafkaError> {
    let consumer: BaseConsumer = settings.client_config().create()?;
    let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    let served = |p: &rdkafka::metadata::MetadataPartition| p.error().is_none() && p.leader() >= 0;
    match t.error() {
        None if !t.partitions().is_empty() && t.partitions().iter().all(served) => {
            Ok(Some(t.partitions().len() as i32))
        }
        None => Ok(None),
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => Ok(None),
        Some(e) => {
            Err(KafkaError::Topic { topic: topic.to_owned(), reason: format!("{:?}", RDKafkaErrorCode::from(e)) })
        }
    }
}

/// Whether a client error only says a partition is not served yet: a topic
/// created moments ago, or a leader moving. Worth a retry, not a failure.
pub fn not_served_yet(error: &super::RdKafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
        )
    )
}

/// Waits until `topic` exists with a leader for every partition, up to `timeout`;
/// `None` if it never did.
pub async fn wait_for_topic(
    settings: &KafkaSettings,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, KafkaError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let count = partition_count(settings, topic)?;
        if count.is_some() || tokio::time::Instant::now() >= deadline {
            return Ok(count);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many brokers the cluster has, as its metadata says.
fn broker_count(settings: &KafkaSettings) -> Result<i32, KafkaError> {
    let consumer: BaseConsumer = settings.client_config().create()?;
    let metadata = consumer.fetch_metadata(None, METADATA_TIMEOUT)?;
    Ok(metadata.brokers().len() as i32)
}

/// Creates every missing topic, replicated as the default [`TopicSettings`]
/// say; an existing one is left as it is.
pub async fn ensure_topics(settings: &KafkaSettings, specs: &[TopicSpec]) -> Result<(), KafkaError> {
    ensure_topics_with(settings, &TopicSettings::default(), specs).await
}

/// Creates every missing topic with the replication `topics` asks for; an
/// existing one is left as it is.
pub async fn ensure_topics_with(
    settings: &KafkaSettings,
    topics: &TopicSettings,
    specs: &[TopicSpec],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let (replication, min_insync) = topics.replication(broker_count(settings)?);
    let min_insync = min_insync.to_string();
    let configs: Vec<Vec<(&str, &str)>> = specs
        .iter()
        .map(|s| {
            let mut configs: Vec<(&str, &str)> = vec![("min.insync.replicas", min_insync.as_str())];
            configs.extend(s.configs.iter().map(|(k, v)| (*k, v.as_str())));
            configs
        })
        .collect();
    let topics: Vec<NewTopic> = specs
        .iter()
        .zip(&configs)
        .map(|(spec, configs)| {
            let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(replication));
            for (key, value) in configs {
                topic = topic.set(key, value);
            }
            topic
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaError::Topic { topic, reason: format!("create failed: {code}") }),
        }
    }
    Ok(())
}

/// Each topic's `max.message.bytes`: the largest record batch its brokers
/// take, as the broker reports it (the topic's own setting, or the broker's
/// default when the topic has none).
///
/// On a cluster, a topic created moments ago may not be known yet to the
/// broker asked: that is asked again for up to [`CONFIGS_WAIT`].
pub async fn max_message_bytes(settings: &KafkaSettings, topics: &[&str]) -> Result<Vec<(String, usize)>, KafkaError> {
    let deadline = tokio::time::Instant::now() + CONFIGS_WAIT;
    loop {
        match describe_max_message_bytes(settings, topics).await {
            Err(KafkaError::Topic { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            described => return described,
        }
    }
}

/// How long a new topic's configs may take to be known to every broker.
const CONFIGS_WAIT: Duration = Duration::from_secs(15);

async fn describe_max_message_bytes(
    settings: &KafkaSettings,
    topics: &[&str],
) -> Result<Vec<(String, usize)>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let specifiers: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let mut sizes = Vec::with_capacity(topics.len());
    for (topic, result) in topics.iter().zip(admin.describe_configs(&specifiers, &options).await?) {
        let fail = |reason: String| KafkaError::Topic { topic: (*topic).to_owned(), reason };
        let resource = result.map_err(|code| fail(format!("describing its configs failed: {code}")))?;
        let value = resource
            .get("max.message.bytes")
            .and_then(|entry| entry.value.as_deref())
            .ok_or_else(|| fail("the broker reported no max.message.bytes".to_owned()))?;
        let bytes = value.parse().map_err(|_| fail(format!("max.message.bytes {value:?} is not a number")))?;
        sizes.push(((*topic).to_owned(), bytes));
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_follows_the_cluster_up_to_three_copies_two_in_sync() {
        let defaults = TopicSettings::default();
        assert_eq!(defaults.replication(1), (1, 1));
        assert_eq!(defaults.replication(2), (2, 2));
        assert_eq!(defaults.replication(3), (3, 2));
        assert_eq!(defaults.replication(6), (3, 2));
        let set = TopicSettings { replication_factor: Some(2), ..TopicSettings::default() };
        assert_eq!(set.replication(6), (2, 2));
        let set = TopicSettings { min_insync_replicas: Some(1), ..TopicSettings::default() };
        assert_eq!(set.replication(3), (3, 1));
    }

    #[test]
    fn settings_no_broker_would_take_are_refused() {
        assert!(TopicSettings::default().validate().is_ok());
        let isr_over_rf =
            TopicSettings { replication_factor: Some(2), min_insync_replicas: Some(3), ..TopicSettings::default() };
        assert!(isr_over_rf.validate().unwrap_err().contains("min_insync_replicas (3)"));
        let ratio = TopicSettings { changelog_min_cleanable_dirty_ratio: 0.0, ..TopicSettings::default() };
        assert!(ratio.validate().is_err());
    }

    #[test]
    fn the_changelog_is_compacted_with_short_segments() {
        let configs = TopicSettings::default().changelog_configs();
        let get = |key: &str| configs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("cleanup.policy"), Some("compact"));
        assert_eq!(get("segment.bytes"), Some("67108864"));
        assert_eq!(get("min.cleanable.dirty.ratio"), Some("0.1"));
    }
}
