//! The job's producer: one per processing thread, transactional under
//! exactly-once, and how a transaction ends. It tracks where its changelog
//! records landed, so the store can record how far it has caught up with its
//! own changelog after each commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, TopicPartitionList};

use super::RuntimeError;
use crate::kafka::{commit_transaction, drain, refused_by_broker, send_lingering};
use crate::modules::{Limits, Rejection};

/// How long one blocking call into Kafka may take.
pub(super) const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Header names on dead-lettered records.
pub const HEADER_ERROR_KIND: &str = "omni.error.kind";
pub const HEADER_ERROR_MESSAGE: &str = "omni.error.message";
pub const HEADER_SOURCE_TOPIC: &str = "omni.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "omni.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "omni.source.offset";

/// The input record a produced record came from, carried through its
/// delivery report so a record the broker refuses can be traced back to the
/// event behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    pub partition: i32,
    pub offset: i64,
}

/// A record the broker refused for what it is.
#[derive(Debug, Clone)]
pub struct Refused {
    pub source: Source,
    pub topic: String,
    pub bytes: usize,
    pub reason: String,
}

/// Most refusals remembered between two aborts; each refused record fails
/// its whole transaction, so a handful at a time is all there can be.
const MOST_REFUSALS: usize = 1024;

/// Records delivery results; shared between librdkafka's callbacks and the engine.
pub struct DeliveryTracker {
    changelog_topic: String,
    /// Changelog partition → offset after the last delivered record.
    changelog_ends: Mutex<HashMap<i32, i64>>,
    /// Records refused since the last abort.
    refused: Mutex<Vec<Refused>>,
    /// A record of the open transaction was not delivered: it cannot commit.
    failed: AtomicBool,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = Box<Source>;

    fn delivery(&self, result: &DeliveryResult<'_>, source: Box<Source>) {
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
            Err((error, message)) if refused_by_broker(error) => {
                self.failed.store(true, Ordering::Relaxed);
                // The transaction cannot commit now; the engine aborts it and
                // dead-letters the event behind this record when it meets it again.
                tracing::warn!(%error, topic = message.topic(), bytes = message.payload_len(), "the broker refused a record");
                metrics::counter!("omni_produce_errors_total", "kind" => "refused").increment(1);
                let mut refused = self.refused.lock().expect("delivery lock");
                if refused.len() < MOST_REFUSALS {
                    refused.push(Refused {
                        source: *source,
                        topic: message.topic().to_owned(),
                        bytes: message.payload_len(),
                        reason: error.to_string(),
                    });
                }
            }
            Err((error, message)) => {
                self.failed.store(true, Ordering::Relaxed);
                // The transaction cannot commit now; the engine aborts and retries it.
                tracing::warn!(%error, topic = message.topic(), "record not delivered");
                metrics::counter!("omni_produce_errors_total", "kind" => "transient").increment(1);
            }
        }
    }
}

pub type JobProducer = BaseProducer<DeliveryTracker>;

/// The largest record, in bytes, that each output can carry under `limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LargestRecords {
    pub changelog: usize,
    pub broadcast: usize,
    pub dead_letter: usize,
}

/// Room path text is at most 1 KiB; a record's framing, header names and
/// numbers take well under the rest of this.
const RECORD_OVERHEAD: usize = 2048;

/// Dead-letter reasons are cut to this many bytes.
const MOST_REASON_BYTES: usize = 1024;

/// The largest input record a dead letter can carry whole on a dead-letter
/// topic that takes records of `takes` bytes.
pub fn dead_letter_record_bytes(takes: usize) -> usize {
    takes.saturating_sub(MOST_REASON_BYTES + RECORD_OVERHEAD)
}

pub fn largest_records(limits: &Limits) -> LargestRecords {
    LargestRecords {
        changelog: limits.max_room_state_bytes + RECORD_OVERHEAD,
        // A change carries one module's state, and the event id of its cause.
        broadcast: limits.max_room_state_bytes + limits.max_record_bytes + RECORD_OVERHEAD,
        dead_letter: limits.max_record_bytes + MOST_REASON_BYTES + RECORD_OVERHEAD,
    }
}

/// The producer's batch size: 256 KiB, or less where an output topic takes
/// smaller batches, so a batch of ordinary records always fits its topic
/// and the broker refuses only a record that is too large by itself.
pub fn batch_bytes(smallest_topic_max: usize) -> usize {
    (smallest_topic_max / 2).clamp(16 << 10, 256 << 10)
}

/// Builds the producer. Under exactly-once its transactions still need
/// [`Producer::init_transactions`] before the first one begins.
pub fn create_producer(
    mut config: rdkafka::ClientConfig,
    changelog_topic: &str,
    transactional_id: Option<&str>,
    transaction_timeout: Duration,
    limits: &Limits,
    batch_bytes: usize,
) -> Result<JobProducer, RuntimeError> {
    let largest = largest_records(limits);
    // Larger than any record the limits allow, so librdkafka never refuses
    // one locally: the broker's answer is the one that counts.
    let message_max = (2 * largest.broadcast.max(largest.changelog).max(largest.dead_letter)).max(8 << 20);
    config
        .set("linger.ms", "5")
        .set("batch.size", batch_bytes.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "16384")
        .set("message.max.bytes", message_max.to_string())
        .set("compression.type", "lz4")
        .set("enable.idempotence", "true");
    if let Some(id) = transactional_id {
        config.set("transactional.id", id).set("transaction.timeout.ms", transaction_timeout.as_millis().to_string());
    }
    let tracker = DeliveryTracker {
        changelog_topic: changelog_topic.to_owned(),
        changelog_ends: Mutex::default(),
        refused: Mutex::default(),
        failed: AtomicBool::new(false),
    };
    Ok(config.create_with_context(tracker)?)
}

/// Changelog end offsets delivered since the last call.
pub fn take_changelog_ends(producer: &JobProducer) -> HashMap<i32, i64> {
    std::mem::take(&mut *producer.context().changelog_ends.lock().expect("delivery lock"))
}

/// Records the broker refused since the last call; the next transaction starts afresh.
pub fn take_refused(producer: &JobProducer) -> Vec<Refused> {
    producer.context().failed.store(false, Ordering::Relaxed);
    std::mem::take(&mut *producer.context().refused.lock().expect("delivery lock"))
}

/// Whether a record of the open transaction was not delivered: it can only
/// be aborted then, and waiting for the rest of its records would only
/// wait for them to time out.
pub fn transaction_failed(producer: &JobProducer) -> bool {
    producer.context().failed.load(Ordering::Relaxed)
}

/// A record to `topic` produced on behalf of the input record at `source`.
pub fn record<'a>(topic: &'a str, source: Source) -> BaseRecord<'a, [u8], [u8], Box<Source>> {
    BaseRecord::with_opaque_to(topic, Box::new(source))
}

/// Sends a record, serving delivery reports while the local queue is full.
pub fn send(producer: &JobProducer, record: BaseRecord<'_, [u8], [u8], Box<Source>>) -> Result<(), RuntimeError> {
    Ok(crate::kafka::send(producer, record)?)
}

/// Headers that explain a dead letter.
pub fn dead_letter_headers(rejection: &Rejection, topic: &str, partition: i32, offset: i64) -> OwnedHeaders {
    let partition = partition.to_string();
    let offset = offset.to_string();
    let mut reason = rejection.message.as_str();
    if reason.len() > MOST_REASON_BYTES {
        let mut end = MOST_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason = &reason[..end];
    }
    OwnedHeaders::new()
        .insert(Header { key: HEADER_ERROR_KIND, value: Some(rejection.kind.as_str()) })
        .insert(Header { key: HEADER_ERROR_MESSAGE, value: Some(reason) })
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
