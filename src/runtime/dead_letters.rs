//! Dead letters, and the records the broker refused, as Kafka Streams'
//! `ProductionExceptionHandler` deals with them: a refused record makes its
//! transaction abort, and the input record behind it is dead-lettered with
//! the broker's reason when the rewound input reaches it again, instead of
//! being folded, so no record is retried forever.

use std::collections::HashMap;

use rdkafka::message::{BorrowedMessage, Message};

use super::output::{dead_letter_headers, record, send, take_refused, JobProducer, Refused, Source};
use super::RuntimeError;
use crate::modules::{RejectKind, Rejection};

/// An input record whose output the broker refused.
#[derive(Debug, Clone)]
struct Poison {
    reason: String,
    /// Its dead letter was refused too (a dead-letter topic that takes less
    /// than the input): it goes without its value, and is dropped after that.
    dead_letter_refused: bool,
    dropped: bool,
}

/// The input records to dead-letter instead of folding, until committed.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    poisoned: HashMap<Source, Poison>,
    /// Refused records traced to their input so far: progress, for the
    /// thread's back-off.
    pub traced: u64,
}

impl Refusals {
    /// Remembers the input records behind the records the broker refused
    /// since the last call. A refused batch reports every record in it; the
    /// producer's batches are smaller than any output topic took at
    /// start-up, and a record larger than a batch travels alone, so only
    /// such a record can be the culprit. Refused records that all fit a
    /// batch mean a topic now takes less than a batch: a configuration
    /// change that needs a restart (which sizes batches anew), reported as
    /// an error rather than blamed on an innocent record.
    pub(super) fn trace(
        &mut self,
        producer: &JobProducer,
        batch_bytes: usize,
        dead_letter_topic: &str,
    ) -> Result<(), RuntimeError> {
        let mut culprits: HashMap<Source, Refused> = HashMap::new();
        let mut unexplained = None;
        for refused in take_refused(producer) {
            if refused.bytes <= batch_bytes {
                unexplained.get_or_insert(refused);
                continue;
            }
            culprits.entry(refused.source).or_insert(refused);
        }
        if culprits.is_empty() {
            if let Some(refused) = unexplained {
                return Err(RuntimeError::Invalid(format!(
                    "{} refused a batch of records of at most {batch_bytes} bytes ({}): its max.message.bytes must \
                     have been lowered since omni started; restart omni so its batches fit again",
                    refused.topic, refused.reason
                )));
            }
        }
        for (source, refused) in culprits {
            self.traced += 1;
            let reason = format!("{} refused a {}-byte record: {}", refused.topic, refused.bytes, refused.reason);
            tracing::warn!(partition = source.partition, offset = source.offset, %reason, "the input record behind a refused record will be dead-lettered");
            let own_dead_letter = refused.topic == dead_letter_topic;
            match self.poisoned.get_mut(&source) {
                Some(poison) if own_dead_letter && poison.dead_letter_refused => poison.dropped = true,
                Some(poison) if own_dead_letter => poison.dead_letter_refused = true,
                Some(_) => {}
                None => {
                    let poison = Poison { reason, dead_letter_refused: own_dead_letter, dropped: false };
                    self.poisoned.insert(source, poison);
                }
            }
        }
        Ok(())
    }

    /// Dead-letters `message` if a record on its behalf was refused; false
    /// if it is to be folded as usual.
    pub(super) fn dead_letter_if_refused(
        &self,
        producer: &JobProducer,
        topic: &str,
        message: &BorrowedMessage<'_>,
        source: Source,
        value_bytes: usize,
    ) -> Result<bool, RuntimeError> {
        let Some(poison) = self.poisoned.get(&source) else { return Ok(false) };
        if poison.dropped {
            tracing::error!(
                partition = source.partition,
                offset = source.offset,
                reason = %poison.reason,
                "even the dead letter of a refused record was refused; dropping the record"
            );
            metrics::counter!("omni_dead_letters_dropped_total").increment(1);
            return Ok(true);
        }
        let rejection = Rejection::new(RejectKind::ProductionRefused, poison.reason.clone());
        let value_bytes = if poison.dead_letter_refused { 0 } else { value_bytes };
        dead_letter(producer, topic, message, source, &rejection, value_bytes)?;
        Ok(true)
    }

    /// Forgets the records of a partition below its committed offset, or all of its records.
    pub(super) fn forget(&mut self, partition: i32, below: Option<i64>) {
        self.poisoned.retain(|source, _| source.partition != partition || below.is_some_and(|b| source.offset >= b));
    }

    /// Forgets the records of partitions no longer assigned.
    pub(super) fn keep_only(&mut self, assigned: impl Fn(i32) -> bool) {
        self.poisoned.retain(|source, _| assigned(source.partition));
    }
}

/// Sends a refused input record to the dead-letter topic, with its key and
/// its value when the key and value fit `record_bytes` (what the topic is
/// known to take), and without its value otherwise: a dead letter the
/// broker would refuse must not hold the partition up.
pub(super) fn dead_letter(
    producer: &JobProducer,
    topic: &str,
    message: &BorrowedMessage<'_>,
    source: Source,
    rejection: &Rejection,
    record_bytes: usize,
) -> Result<(), RuntimeError> {
    tracing::warn!(
        kind = rejection.kind.as_str(),
        reason = %rejection.message,
        topic = message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        "record dead-lettered"
    );
    metrics::counter!("omni_dead_letters_total", "kind" => rejection.kind.as_str()).increment(1);
    let headers = dead_letter_headers(rejection, message.topic(), message.partition(), message.offset());
    let mut dead = record(topic, source).headers(headers);
    if let Some(key) = message.key() {
        dead = dead.key(key);
    }
    let size = message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len);
    if let Some(value) = message.payload().filter(|_| size <= record_bytes) {
        dead = dead.payload(value);
    }
    send(producer, dead)
}
