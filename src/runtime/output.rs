//! The job's producer: one per processing thread, transactional under
//! exactly-once, and how a transaction ends. It tracks where its changelog
//! records landed, so the store can record how far it has caught up with its
//! own changelog after each commit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, TopicPartitionList};

use super::RuntimeError;
use crate::kafka::{drain, send_lingering};
use crate::modules::Rejection;

/// How long one blocking call into Kafka may take.
pub(super) const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
const COMMIT_ATTEMPTS: usize = 5;
/// A commit slower than this is logged with the time of each of its steps.
const SLOW_COMMIT: Duration = Duration::from_secs(1);

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

/// Ends a transaction: sends what lingers, adds the consumed offsets (with
/// the group metadata, so a zombie is fenced), waits for every
/// acknowledgement and commits. Without exactly-once, commits the offsets
/// once everything was acknowledged.
pub fn finish<C: ConsumerContext>(
    producer: &JobProducer,
    exactly_once: bool,
    consumer: &BaseConsumer<C>,
    offsets: &TopicPartitionList,
) -> Result<(), KafkaError> {
    let started = Instant::now();
    send_lingering(producer);
    if !exactly_once {
        drain(producer, KAFKA_TIMEOUT)?;
        if offsets.count() > 0 {
            consumer.commit(offsets, CommitMode::Sync)?;
        }
        return Ok(());
    }
    // The offsets join the transaction while its records are still
    // being acknowledged: both round trips overlap.
    if offsets.count() > 0 {
        let group = consumer.group_metadata().ok_or(KafkaError::Canceled)?;
        producer.send_offsets_to_transaction(offsets, &group, KAFKA_TIMEOUT)?;
    }
    let offsets_sent = started.elapsed();
    drain(producer, KAFKA_TIMEOUT)?;
    let drained = started.elapsed();
    let mut attempt = 1;
    let result = loop {
        match producer.commit_transaction(KAFKA_TIMEOUT) {
            Err(e) if attempt < COMMIT_ATTEMPTS && is_retriable(&e) => {
                tracing::warn!(error = %e, attempt, "transaction commit will be retried");
                attempt += 1;
            }
            other => break other,
        }
    };
    if started.elapsed() > SLOW_COMMIT {
        tracing::warn!(
            offsets_ms = offsets_sent.as_millis() as u64,
            drain_ms = (drained - offsets_sent).as_millis() as u64,
            commit_ms = (started.elapsed() - drained).as_millis() as u64,
            "slow transaction commit"
        );
    }
    result
}

fn is_retriable(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_retriable(),
        KafkaError::Flush(_) => true,
        _ => false,
    }
}
