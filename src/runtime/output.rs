//! The job's producer: one per processing thread, transactional under
//! exactly-once, and how a transaction ends. It tracks where its changelog
//! records landed, so the store can record how far it has caught up with its
//! own changelog after each commit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, TopicPartitionList};

use super::RuntimeError;
use crate::kafka::{commit_transaction, drain, send_lingering};
use crate::modules::Rejection;

/// How long one blocking call into Kafka may take.
pub(super) const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Header names on dead-lettered records.
pub const HEADER_ERROR_KIND: &str = "omni.error.kind";
pub const HEADER_ERROR_MESSAGE: &str = "omni.error.message";
pub const HEADER_SOURCE_TOPIC: &str = "omni.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "omni.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "omni.source.offset";

/// Records delivery results; shared between librdkafka's callbacks and the engine.
pub struct DeliveryTracker {
    changelog_topic: String,
    /// Changelog partition → offset after the last delivered record.
    changelog_ends: Mutex<HashMap<i32, i64>>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) if message.topic() == self.changelog_topic => {
                let mut ends = self.changelog_ends.lock().expect("delivery lock");
                let end = ends.entry(message.partition()).or_insert(0);
                *end = (*end).max(message.offset() + 1);
            }
            Ok(_) => {}
            // Purged by an abort, by a fatal error or by dropping a fenced
            // producer: the transaction is given up anyway, and counted as such.
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight), _)) => {
            }
            Err((error, message)) => {
                // The transaction cannot commit now; the engine aborts and retries it.
                tracing::warn!(%error, topic = message.topic(), "record not delivered");
                metrics::counter!("omni_produce_errors_total").increment(1);
            }
        }
    }
}

pub type JobProducer = BaseProducer<DeliveryTracker>;

/// Builds the producer. Under exactly-once its transactions still need
/// [`Producer::init_transactions`] before the first one begins.
pub fn create_producer(
    mut config: rdkafka::ClientConfig,
    changelog_topic: &str,
    transactional_id: Option<&str>,
    transaction_timeout: Duration,
) -> Result<JobProducer, RuntimeError> {
    config
        .set("linger.ms", "5")
        .set("batch.size", "262144")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "16384")
        // Room states can approach a megabyte at the tag limits.
        .set("message.max.bytes", "8388608")
        .set("compression.type", "lz4")
        .set("enable.idempotence", "true");
    if let Some(id) = transactional_id {
        config.set("transactional.id", id).set("transaction.timeout.ms", transaction_timeout.as_millis().to_string());
    }
    let tracker = DeliveryTracker { changelog_topic: changelog_topic.to_owned(), changelog_ends: Mutex::default() };
    Ok(config.create_with_context(tracker)?)
}

/// Changelog end offsets delivered since the last call.
pub fn take_changelog_ends(producer: &JobProducer) -> HashMap<i32, i64> {
    std::mem::take(&mut *producer.context().changelog_ends.lock().expect("delivery lock"))
}

/// Sends a record, serving delivery reports while the local queue is full.
pub fn send(producer: &JobProducer, record: BaseRecord<'_, [u8], [u8]>) -> Result<(), RuntimeError> {
    Ok(crate::kafka::send(producer, record)?)
}

/// Headers that explain a dead letter.
pub fn dead_letter_headers(rejection: &Rejection, topic: &str, partition: i32, offset: i64) -> OwnedHeaders {
    let partition = partition.to_string();
    let offset = offset.to_string();
    OwnedHeaders::new()
        .insert(Header { key: HEADER_ERROR_KIND, value: Some(rejection.kind.as_str()) })
        .insert(Header { key: HEADER_ERROR_MESSAGE, value: Some(rejection.message.as_str()) })
        .insert(Header { key: HEADER_SOURCE_TOPIC, value: Some(topic) })
        .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(partition.as_str()) })
        .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(offset.as_str()) })
}

/// Ends a transaction (see [`crate::kafka::commit_transaction`]). Without
/// exactly-once, commits the offsets once everything was acknowledged.
pub fn finish<C: ConsumerContext>(
    producer: &JobProducer,
    exactly_once: bool,
    consumer: &BaseConsumer<C>,
    offsets: &TopicPartitionList,
) -> Result<(), KafkaError> {
    if exactly_once {
        return commit_transaction(producer, consumer, offsets, KAFKA_TIMEOUT);
    }
    send_lingering(producer);
    drain(producer, KAFKA_TIMEOUT)?;
    if offsets.count() > 0 {
        consumer.commit(offsets, CommitMode::Sync)?;
    }
    Ok(())
}
