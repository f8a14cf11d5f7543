//! The input offsets the group holds: where a partition resumes, and the
//! stamp each commit leaves on them, from which leases count their TTL.
//!
//! A read_committed client asks for *stable* offsets (KIP-447): while a
//! transaction that carries a partition's offset is open (a dead
//! instance's, until the coordinator times it out), that partition's
//! offset cannot be read. Whoever asks must wait for that partition alone,
//! and says so while it waits ([`WaitingToStart`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::output::KAFKA_TIMEOUT;
use super::RuntimeError;
use crate::kafka::KafkaSettings;

/// What a committed offset's metadata starts with: omni's stamp, then the
/// commit's wall-clock time in milliseconds.
const STAMP_PREFIX: &str = "omni:committed_ms=";

/// The metadata a committed input offset carries: the commit's time.
pub fn offset_stamp(committed_ms: i64) -> String {
    format!("{STAMP_PREFIX}{committed_ms}")
}

/// The commit time an offset's metadata holds, if omni stamped it.
pub fn stamped_ms(metadata: &str) -> Option<i64> {
    metadata.strip_prefix(STAMP_PREFIX)?.parse().ok()
}

/// A partition's committed position, as the group holds it.
#[derive(Debug, Clone)]
pub struct Committed {
    pub partition: i32,
    /// Its committed offset, or its beginning when it never committed.
    pub offset: Offset,
    /// When the transaction that committed it did, if its offset carries omni's stamp.
    pub stamped_ms: Option<i64>,
}

/// Where each partition of `partitions` resumes: its committed offset, or
/// its beginning when it never committed. A partition's own error comes
/// with no offset: while an open transaction holds it, librdkafka gives up
/// after a few retries. Taken for "never committed", it would send the
/// partition back to its beginning, to fold again what the store already
/// holds; the error goes to the caller, which asks again.
pub fn committed_positions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: TopicPartitionList,
    timeout: Duration,
) -> Result<Vec<Committed>, RuntimeError> {
    let committed = consumer.committed_offsets(partitions, timeout)?;
    let mut positions = Vec::with_capacity(committed.count());
    for element in committed.elements() {
        if let Err(e) = element.error() {
            tracing::debug!(partition = element.partition(), error = %e, "committed offset not readable yet");
            return Err(e.into());
        }
        let offset = match element.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        let stamped_ms = stamped_ms(element.metadata());
        positions.push(Committed { partition: element.partition(), offset, stamped_ms });
    }
    Ok(positions)
}

/// [`committed_positions`] with the usual Kafka timeout.
pub fn committed_now<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: TopicPartitionList,
) -> Result<Vec<Committed>, RuntimeError> {
    committed_positions(consumer, partitions, KAFKA_TIMEOUT)
}

/// How long one ask for a partition's committed offset or watermarks may
/// take. librdkafka retries an offset an open transaction holds until then,
/// so this is also how often a waiting partition asks again, and how long a
/// revoke may wait for a restore that waits.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads the group's committed input offsets off the processing thread,
/// with a client of the group's own that never joins it.
#[derive(Clone)]
pub struct OffsetsReader {
    client: Arc<BaseConsumer>,
    topic: String,
}

impl OffsetsReader {
    pub fn new(settings: &KafkaSettings, group_id: &str, topic: &str) -> Result<OffsetsReader, RuntimeError> {
        let client = crate::kafka::fresh_leaders(settings.client_config())
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()?;
        Ok(OffsetsReader { client: Arc::new(client), topic: topic.to_owned() })
    }

    /// `partition`'s committed position, or the error that kept it
    /// unreadable (a timeout, when an open transaction holds it).
    pub fn read(&self, partition: i32) -> Result<Committed, RuntimeError> {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, partition);
        committed_positions(&self.client, list, READ_TIMEOUT)?
            .pop()
            .ok_or_else(|| RuntimeError::Invalid(format!("the group returned no offset for partition {partition}")))
    }

    /// `partition`'s first offset and its last stable one: the input a
    /// read_committed consumer can read now.
    pub fn watermarks(&self, partition: i32) -> Result<(i64, i64), RuntimeError> {
        Ok(self.client.fetch_watermarks(&self.topic, partition, READ_TIMEOUT)?)
    }
}

/// How often a partition that still cannot start says so.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// A partition whose store is restored but that cannot be consumed yet,
/// counted in `omni_partitions_waiting_to_start` for as long as this lives,
/// and logged when it starts waiting and every ten seconds after.
pub struct WaitingToStart {
    partition: i32,
    since: Instant,
    reported: Instant,
}

impl WaitingToStart {
    pub fn new(partition: i32, why: &dyn std::fmt::Display) -> WaitingToStart {
        metrics::gauge!("omni_partitions_waiting_to_start").increment(1.0);
        tracing::warn!(partition, %why, "the partition cannot start yet; the others go on");
        let now = Instant::now();
        WaitingToStart { partition, since: now, reported: now }
    }

    /// Counts another failed attempt, and reports it when the last report is old.
    pub fn again(&mut self, why: &dyn std::fmt::Display) {
        metrics::counter!("omni_partition_start_retries_total").increment(1);
        if self.reported.elapsed() >= REPORT_EVERY {
            self.reported = Instant::now();
            let waited_s = self.since.elapsed().as_secs();
            tracing::warn!(partition = self.partition, waited_s, %why, "the partition still cannot start");
        }
    }
}

impl Drop for WaitingToStart {
    fn drop(&mut self) {
        metrics::gauge!("omni_partitions_waiting_to_start").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_stamp_reads_back_and_foreign_metadata_reads_as_none() {
        assert_eq!(stamped_ms(&offset_stamp(1_764_489_600_123)), Some(1_764_489_600_123));
        assert_eq!(stamped_ms(""), None, "no metadata: committed by an older omni");
        assert_eq!(stamped_ms("someone else's note"), None);
        assert_eq!(stamped_ms("omni:committed_ms=soon"), None);
    }
}
