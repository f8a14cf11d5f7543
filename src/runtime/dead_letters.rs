//! Dead letters, and the records the broker refused, as Kafka Streams'
//! `ProductionExceptionHandler` deals with them: a refused record makes its
//! transaction abort, and the input record behind it is dead-lettered with
//! the broker's reason when the rewound input reaches it again, instead of
//! being folded, so no record is retried forever.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use rdkafka::message::{BorrowedMessage, Message};

use super::output::{dead_letter_headers, record, send, take_refused, JobProducer, Refused, Source};
use super::RuntimeError;
use crate::modules::{RejectKind, Rejection};

/// An input record whose output the broker refused.
#[derive(Debug, Clone)]
struct Poison {
    reason: String,
    /// How many times records on its behalf were refused: a refused dead
    /// letter is sent again without its value, and dropped after that.
    refusals: u32,
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
    /// since the last call. A refused batch reports every record in it;
    /// batches are smaller than any output topic takes, so the culprit is
    /// the largest record of its topic partition, and the rest are sent again.
    pub(super) fn trace(&mut self, producer: &JobProducer) {
        let mut culprits: HashMap<(String, i32), Refused> = HashMap::new();
        for refused in take_refused(producer) {
            match culprits.entry((refused.topic.clone(), refused.partition)) {
                Entry::Occupied(mut largest) if largest.get().bytes < refused.bytes => {
                    largest.insert(refused);
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(slot) => {
                    slot.insert(refused);
                }
            }
        }
        for refused in culprits.into_values() {
            self.traced += 1;
            let reason = format!("{} refused a {}-byte record: {}", refused.topic, refused.bytes, refused.reason);
            tracing::warn!(
                partition = refused.source.partition,
                offset = refused.source.offset,
                %reason,
                "the input record behind a refused record will be dead-lettered"
            );
            self.poisoned
                .entry(refused.source)
                .and_modify(|poison| poison.refusals += 1)
                .or_insert(Poison { reason, refusals: 1 });
        }
    }

    /// Dead-letters `message` if a record on its behalf was refused; false
    /// if it is to be folded as usual. The dead letter can be refused too (a
    /// dead-letter topic that takes less than the input): it is then sent
    /// without its value, and after that dropped.
    pub(super) fn dead_letter_if_refused(
        &self,
        producer: &JobProducer,
        topic: &str,
        message: &BorrowedMessage<'_>,
        source: Source,
    ) -> Result<bool, RuntimeError> {
        let Some(poison) = self.poisoned.get(&source) else { return Ok(false) };
        let rejection = Rejection::new(RejectKind::ProductionRefused, poison.reason.clone());
        match poison.refusals {
            1 => dead_letter(producer, topic, message, source, &rejection, true)?,
            2 => dead_letter(producer, topic, message, source, &rejection, false)?,
            _ => {
                tracing::error!(
                    partition = source.partition,
                    offset = source.offset,
                    reason = %poison.reason,
                    "even the dead letter of a refused record was refused; dropping the record"
                );
                metrics::counter!("omni_dead_letters_dropped_total").increment(1);
            }
        }
        Ok(true)
    }

    /// Forgets the records of a partition below its committed offset, or all of its records.
    pub(super) fn forget(&mut self, partition: i32, below: Option<i64>) {
        self.poisoned.retain(|source, _| source.partition != partition || below.is_some_and(|b| source.offset >= b));
    }
}

/// Sends a refused input record to the dead-letter topic, with its value
/// unless `with_value` is false.
pub(super) fn dead_letter(
    producer: &JobProducer,
    topic: &str,
    message: &BorrowedMessage<'_>,
    source: Source,
    rejection: &Rejection,
    with_value: bool,
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
    if let Some(value) = message.payload().filter(|_| with_value) {
        dead = dead.payload(value);
    }
    send(producer, dead)
}
