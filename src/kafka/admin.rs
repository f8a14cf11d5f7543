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

/// Creates every missing topic; an existing one is left as it is.
pub async fn ensure_topics(settings: &KafkaSettings, specs: &[TopicSpec]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let configs: Vec<Vec<(&str, &str)>> =
        specs.iter().map(|s| s.configs.iter().map(|(k, v)| (*k, v.as_str())).collect()).collect();
    let topics: Vec<NewTopic> = specs
        .iter()
        .zip(&configs)
        .map(|(spec, configs)| {
            let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(-1));
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
pub async fn max_message_bytes(settings: &KafkaSettings, topics: &[&str]) -> Result<Vec<(String, usize)>, KafkaError> {
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
