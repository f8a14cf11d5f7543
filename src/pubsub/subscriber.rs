//! Reading subjects from a topic: [`Subscriber`] for fan-out (every reader
//! sees every matching record) and [`QueueSubscriber`] for load-balancing
//! (each record goes to one member of a queue).
//!
//! Kafka cannot filter by key on the broker, so both read the whole topic
//! and drop records whose key does not match their pattern.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{check_topic, Pattern, PubSubError, CONTENT_TYPE_HEADER};
use crate::kafka::KafkaSettings;

/// Bound on each blocking metadata or offset query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often to look again for a topic that does not exist yet.
const TOPIC_POLL: Duration = Duration::from_millis(500);

/// Where a [`Subscriber`] starts reading.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StartAt {
    /// Only records published after `subscribe` returns.
    #[default]
    Latest,
    /// Everything the topic still retains.
    Earliest,
    /// The first record at or after this time (milliseconds since the Unix
    /// epoch) in each partition; partitions with no such record start at
    /// their end.
    Timestamp(i64),
    /// Explicit offsets per partition, clamped into the retained range;
    /// partitions not listed start at their end.
    Offsets(BTreeMap<i32, i64>),
}

/// One record received on a matching subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The record key: the path's canonical text.
    pub subject: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_millis: Option<i64>,
    /// The record value; empty for a record with no value.
    pub payload: Vec<u8>,
    /// The `content-type` header, when present and UTF-8.
    pub content_type: Option<String>,
}

/// A fan-out subscription: every record on `topic` whose subject matches.
///
/// It reads all partitions itself, with no consumer group and no commits,
/// so any number of subscribers see the same records independently.
/// Partitions added to the topic after `subscribe` are not read.
///
/// ```no_run
/// use omni::kafka::KafkaSettings;
/// use omni::pubsub::{Pattern, StartAt, Subscriber};
///
/// # async fn demo() -> Result<(), omni::pubsub::PubSubError> {
/// let settings = KafkaSettings::with_brokers("localhost:9094");
/// let pattern = Pattern::parse("app/*/room/r9")?;
/// let mut sub = Subscriber::subscribe(&settings, "chat", pattern, StartAt::Earliest).await?;
/// while let Some(delivery) = sub.next().await {
///     let delivery = delivery?;
///     println!("{} @{}: {} bytes", delivery.subject, delivery.offset, delivery.payload.len());
/// }
/// # Ok(())
/// # }
/// ```
pub struct Subscriber {
    consumer: Arc<StreamConsumer>,
    topic: String,
    pattern: Pattern,
    resolved: BTreeMap<i32, i64>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("topic", &self.topic)
            .field("pattern", &self.pattern.to_string())
            .field("resolved", &self.resolved)
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Subscribes to `topic`, waiting for it to exist, and returns once the
    /// start point is fixed as concrete offsets: everything published after
    /// this returns will be received.
    ///
    /// Waiting for a missing topic (or an unreachable cluster) never gives
    /// up; wrap the call in `tokio::time::timeout` to bound it. Must run on
    /// a Tokio runtime.
    pub async fn subscribe(
        settings: &KafkaSettings,
        topic: &str,
        pattern: Pattern,
        start: StartAt,
    ) -> Result<Subscriber, PubSubError> {
        check_topic(topic)?;
        let mut config = settings.client_config();
        // librdkafka wants a group id even for assign(); a fresh one joins no one.
        config
            .set("group.id", format!("omni-sub-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            // Only reached if retention deletes records under our position:
            // keep reading from what is left rather than jumping to the end.
            .set("auto.offset.reset", "earliest");
        let consumer: Arc<StreamConsumer> = Arc::new(config.create()?);
        let partitions = wait_for_partitions(&consumer, topic).await?;
        if let StartAt::Offsets(offsets) = &start {
            let unknown: Vec<i32> = offsets.keys().filter(|p| !partitions.contains(p)).copied().collect();
            if !unknown.is_empty() {
                tracing::warn!(topic, ?unknown, "start offsets name partitions the topic does not have; ignoring them");
            }
        }
        let resolved = loop {
            let query = {
                let (consumer, topic, partitions, start) =
                    (Arc::clone(&consumer), topic.to_owned(), partitions.clone(), start.clone());
                blocking(move || resolve_offsets(&consumer, &topic, &partitions, &start)).await
            };
            match query {
                // A new topic's metadata can name a leader before that broker serves it.
                Err(e) if is_not_ready(&e) => {
                    tracing::debug!(topic, error = %e, "topic not served yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        let mut assignment = TopicPartitionList::new();
        for (&partition, &offset) in &resolved {
            assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        consumer.assign(&assignment)?;
        tracing::debug!(topic, pattern = %pattern, offsets = ?resolved, "subscribed");
        Ok(Subscriber { consumer, topic: topic.to_owned(), pattern, resolved })
    }

    /// The next matching record. Records without a UTF-8 key, or whose key
    /// does not match, are skipped. Never returns `None` (Kafka topics do not
    /// end); after an error, calling again continues. Cancellation-safe.
    pub async fn next(&mut self) -> Option<Result<Delivery, PubSubError>> {
        next_matching(&self.consumer, &self.pattern).await
    }

    /// The offset each partition started at.
    pub fn resolved_offsets(&self) -> &BTreeMap<i32, i64> {
        &self.resolved
    }

    /// Each partition's end now, its high watermark: once [`Self::reached`]
    /// them, this subscriber has read everything published before this call.
    pub async fn end_offsets(&self) -> Result<BTreeMap<i32, i64>, PubSubError> {
        let (consumer, topic) = (Arc::clone(&self.consumer), self.topic.clone());
        let partitions: Vec<i32> = self.resolved.keys().copied().collect();
        blocking(move || {
            let mut ends = BTreeMap::new();
            for partition in partitions {
                ends.insert(partition, consumer.fetch_watermarks(&topic, partition, QUERY_TIMEOUT)?.1);
            }
            Ok(ends)
        })
        .await
    }

    /// Whether this subscriber has read up to `ends` in every partition.
    /// Its position moves past transaction markers and aborted records,
    /// which no delivery shows; a partition it has read nothing of yet is
    /// where it started.
    pub fn reached(&self, ends: &BTreeMap<i32, i64>) -> Result<bool, PubSubError> {
        let positions = self.consumer.position()?;
        Ok(ends.iter().all(|(&partition, &end)| {
            let started = self.resolved.get(&partition).copied().unwrap_or(0);
            let position = match positions.find_partition(&self.topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(position)) => position.max(started),
                _ => started,
            };
            position >= end
        }))
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }
}

/// A queue subscription, like a NATS queue group: the members of one queue
/// share a Kafka consumer group, so each record reaches one member, and
/// progress is committed so a restarted member resumes where the queue was.
///
/// The group's partitions are assigned after `join` returns, so with
/// [`StartAt::Latest`] a brand-new queue may miss records published in the
/// first moments. `Latest`/`Earliest` apply only when the queue has no
/// committed position yet.
///
/// ```no_run
/// use omni::kafka::KafkaSettings;
/// use omni::pubsub::{Pattern, QueueSubscriber, StartAt};
///
/// # async fn demo() -> Result<(), omni::pubsub::PubSubError> {
/// let settings = KafkaSettings::with_brokers("localhost:9094");
/// let pattern = Pattern::parse("app/>")?;
/// let mut worker = QueueSubscriber::join(&settings, "jobs", "workers", pattern, StartAt::Earliest).await?;
/// while let Some(delivery) = worker.next().await {
///     let delivery = delivery?;
///     println!("working on {}", delivery.subject);
/// }
/// # Ok(())
/// # }
/// ```
pub struct QueueSubscriber {
    consumer: Arc<StreamConsumer>,
    topic: String,
    queue: String,
    pattern: Pattern,
}

impl std::fmt::Debug for QueueSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSubscriber")
            .field("topic", &self.topic)
            .field("queue", &self.queue)
            .field("pattern", &self.pattern.to_string())
            .finish_non_exhaustive()
    }
}

impl QueueSubscriber {
    /// Joins `queue` (the consumer group id) on `topic`, waiting for the
    /// topic to exist. Only [`StartAt::Earliest`] and [`StartAt::Latest`]
    /// are accepted. Must run on a Tokio runtime.
    pub async fn join(
        settings: &KafkaSettings,
        topic: &str,
        queue: &str,
        pattern: Pattern,
        start: StartAt,
    ) -> Result<QueueSubscriber, PubSubError> {
        check_topic(topic)?;
        if queue.is_empty() || queue.len() > 255 || queue.chars().any(char::is_control) {
            return Err(PubSubError::InvalidQueue(queue.to_owned()));
        }
        let reset = match start {
            StartAt::Earliest => "earliest",
            StartAt::Latest => "latest",
            StartAt::Timestamp(_) | StartAt::Offsets(_) => {
                return Err(PubSubError::UnsupportedStart(
                    "a queue resumes from its committed offsets, so it starts only at Earliest or Latest; \
                     use a Subscriber for a timestamp or explicit offsets",
                ))
            }
        };
        let mut config = settings.client_config();
        config
            .set("group.id", queue)
            .set("enable.auto.commit", "true")
            .set("auto.offset.reset", reset)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("isolation.level", "read_committed");
        let consumer: Arc<StreamConsumer> = Arc::new(config.create()?);
        // Subscribing to a missing topic only yields errors, so wait for it as a Subscriber does.
        wait_for_partitions(&consumer, topic).await?;
        consumer.subscribe(&[topic])?;
        tracing::debug!(topic, queue, pattern = %pattern, "joined queue");
        Ok(QueueSubscriber { consumer, topic: topic.to_owned(), queue: queue.to_owned(), pattern })
    }

    /// The next matching record assigned to this member; see [`Subscriber::next`].
    /// A skipped record still counts as consumed for the queue.
    pub async fn next(&mut self) -> Option<Result<Delivery, PubSubError>> {
        next_matching(&self.consumer, &self.pattern).await
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }
}

async fn next_matching(consumer: &StreamConsumer, pattern: &Pattern) -> Option<Result<Delivery, PubSubError>> {
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(error) => return Some(Err(error.into())),
        };
        if let Some(delivery) = delivery_of(&message, pattern) {
            return Some(Ok(delivery));
        }
        tracing::trace!(topic = message.topic(), partition = message.partition(), offset = message.offset(), "skipped");
        // A busy topic full of other subjects would otherwise never yield to the runtime.
        tokio::task::consume_budget().await;
    }
}

/// The delivery for a record, or `None` when its key is missing, not UTF-8
/// or does not match.
fn delivery_of<M: Message>(message: &M, pattern: &Pattern) -> Option<Delivery> {
    let subject = std::str::from_utf8(message.key()?).ok()?;
    if !pattern.matches(subject) {
        return None;
    }
    let content_type = message
        .headers()
        .and_then(|headers| headers.iter().filter(|h| h.key == CONTENT_TYPE_HEADER).last())
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .map(str::to_owned);
    Some(Delivery {
        subject: subject.to_owned(),
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_millis: message.timestamp().to_millis(),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        content_type,
    })
}

/// Runs a blocking librdkafka query off the async threads.
async fn blocking<T: Send + 'static>(
    query: impl FnOnce() -> Result<T, PubSubError> + Send + 'static,
) -> Result<T, PubSubError> {
    tokio::task::spawn_blocking(query).await.map_err(|e| PubSubError::Task(e.to_string()))?
}

/// Polls metadata until `topic` exists with a leader for every partition
/// (right after creation it may not have one yet), returning its partitions.
async fn wait_for_partitions(consumer: &Arc<StreamConsumer>, topic: &str) -> Result<Vec<i32>, PubSubError> {
    let mut polls: u64 = 0;
    loop {
        let result = {
            let consumer = Arc::clone(consumer);
            let topic = topic.to_owned();
            blocking(move || ready_partitions(&consumer, &topic)).await
        };
        match result {
            Ok(Some(partitions)) => return Ok(partitions),
            Ok(None) if polls == 0 => {
                tracing::info!(topic, "topic does not exist yet; waiting for it")
            }
            Ok(None) => {}
            // Every 20th, so a long outage is visible without flooding the log.
            Err(error) if polls.is_multiple_of(20) => {
                tracing::warn!(topic, %error, "cannot read topic metadata; retrying")
            }
            Err(_) => {}
        }
        polls += 1;
        tokio::time::sleep(TOPIC_POLL).await;
    }
}

fn ready_partitions(consumer: &StreamConsumer, topic: &str) -> Result<Option<Vec<i32>>, PubSubError> {
    let metadata = consumer.fetch_metadata(Some(topic), QUERY_TIMEOUT)?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    let not_ready = |code: RDKafkaErrorCode| {
        matches!(code, RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::LeaderNotAvailable)
    };
    if let Some(error) = found.error() {
        let code = RDKafkaErrorCode::from(error);
        return if not_ready(code) { Ok(None) } else { Err(KafkaError::MetadataFetch(code).into()) };
    }
    let partitions = found.partitions();
    if partitions.is_empty() || partitions.iter().any(|p| p.error().is_some() || p.leader() < 0) {
        return Ok(None);
    }
    let mut ids: Vec<i32> = partitions.iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Ok(Some(ids))
}

/// Whether an error only says the topic is not served yet, right after its creation.
fn is_not_ready(error: &PubSubError) -> bool {
    let PubSubError::Kafka(e) = error else { return false };
    crate::kafka::not_served_yet(e) || e.rdkafka_error_code() == Some(RDKafkaErrorCode::NotCoordinator)
}

/// Queries the watermarks (and, for a timestamp, the offsets for it) and
/// turns the start point into one offset per partition.
fn resolve_offsets(
    consumer: &StreamConsumer,
    topic: &str,
    partitions: &[i32],
    start: &StartAt,
) -> Result<BTreeMap<i32, i64>, PubSubError> {
    let mut bounds = BTreeMap::new();
    for &partition in partitions {
        // With read_committed this high mark is the last stable offset, so
        // an open transaction's records are still ahead of us.
        bounds.insert(partition, consumer.fetch_watermarks(topic, partition, QUERY_TIMEOUT)?);
    }
    let found = match start {
        StartAt::Timestamp(millis) => {
            let mut query = TopicPartitionList::new();
            for &partition in partitions {
                query.add_partition_offset(topic, partition, Offset::Offset((*millis).max(0)))?;
            }
            let answer = consumer.offsets_for_times(query, QUERY_TIMEOUT)?;
            let mut found = BTreeMap::new();
            for element in answer.elements() {
                element.error()?;
                // Offset::End means no record at or after the time.
                if let Offset::Offset(offset) = element.offset() {
                    found.insert(element.partition(), offset);
                }
            }
            found
        }
        StartAt::Offsets(offsets) => offsets.clone(),
        StartAt::Latest | StartAt::Earliest => BTreeMap::new(),
    };
    Ok(start_offsets(start, &bounds, &found))
}

/// The start offset of each partition given its (low, high) watermarks and
/// the offsets found for a timestamp or given explicitly.
fn start_offsets(
    start: &StartAt,
    bounds: &BTreeMap<i32, (i64, i64)>,
    found: &BTreeMap<i32, i64>,
) -> BTreeMap<i32, i64> {
    bounds
        .iter()
        .map(|(&partition, &(low, high))| {
            let offset = match start {
                StartAt::Earliest => low,
                StartAt::Latest => high,
                // max then min, not clamp: clamp panics if a broker ever reports low > high.
                StartAt::Timestamp(_) | StartAt::Offsets(_) => {
                    found.get(&partition).map_or(high, |&o| o.max(low).min(high))
                }
            };
            (partition, offset)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
    use rdkafka::Timestamp;

    fn message(key: Option<&[u8]>, headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"payload".to_vec()),
            key.map(<[u8]>::to_vec),
            "chat".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            2,
            41,
            headers,
        )
    }

    #[test]
    fn a_matching_record_becomes_a_delivery() {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "other", value: Some("x") })
            .insert(Header { key: CONTENT_TYPE_HEADER, value: Some("application/json") });
        let pattern = Pattern::parse("app/*/room/r1").unwrap();
        let delivery = delivery_of(&message(Some(b"app/a/room/r1"), Some(headers)), &pattern).unwrap();
        assert_eq!(
            delivery,
            Delivery {
                subject: "app/a/room/r1".into(),
                topic: "chat".into(),
                partition: 2,
                offset: 41,
                timestamp_millis: Some(1_700_000_000_000),
                payload: b"payload".to_vec(),
                content_type: Some("application/json".into()),
            }
        );
        let plain = delivery_of(&message(Some(b"app/a/room/r1"), None), &pattern).unwrap();
        assert_eq!(plain.content_type, None);
    }

    #[test]
    fn records_without_a_matching_utf8_key_are_skipped() {
        let pattern = Pattern::parse(">").unwrap();
        assert!(delivery_of(&message(None, None), &pattern).is_none());
        assert!(delivery_of(&message(Some(&[0xff, 0xfe]), None), &pattern).is_none());
        assert!(delivery_of(&message(Some(b"not a path"), None), &pattern).is_none());
        let narrow = Pattern::parse("app/b/>").unwrap();
        assert!(delivery_of(&message(Some(b"app/a/room/r1"), None), &narrow).is_none());
    }

    #[test]
    fn start_points_resolve_to_offsets_within_the_watermarks() {
        let bounds = BTreeMap::from([(0, (5, 10)), (1, (0, 0)), (2, (3, 7))]);
        let none = BTreeMap::new();
        assert_eq!(start_offsets(&StartAt::Latest, &bounds, &none), BTreeMap::from([(0, 10), (1, 0), (2, 7)]));
        assert_eq!(start_offsets(&StartAt::Earliest, &bounds, &none), BTreeMap::from([(0, 5), (1, 0), (2, 3)]));
        // Partition 1 has nothing after the time, so it starts at its end.
        let found = BTreeMap::from([(0, 8), (2, 3)]);
        assert_eq!(start_offsets(&StartAt::Timestamp(1), &bounds, &found), BTreeMap::from([(0, 8), (1, 0), (2, 3)]));
        let explicit = BTreeMap::from([(0, 2), (2, 100), (9, 1)]);
        assert_eq!(
            start_offsets(&StartAt::Offsets(explicit.clone()), &bounds, &explicit),
            BTreeMap::from([(0, 5), (1, 0), (2, 7)])
        );
        let odd = BTreeMap::from([(0, (9, 4))]);
        assert_eq!(
            start_offsets(&StartAt::Offsets(BTreeMap::new()), &odd, &BTreeMap::from([(0, 6)])),
            BTreeMap::from([(0, 4)])
        );
    }
}
