//! Where a partition consumes from once its store is restored, and what
//! its committed offset says besides: the stamp of the commit, from which
//! its leases count their TTL (see [`super::timers::offset_stamp`]).

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::{timers, Engine};
use crate::runtime::output::KAFKA_TIMEOUT;
use crate::runtime::RuntimeError;

/// A partition's committed position, as the group holds it.
pub(super) struct Committed {
    pub(super) partition: i32,
    /// Its committed offset, or its beginning when it never committed.
    pub(super) offset: Offset,
    /// When the transaction that committed it did, if its offset carries omni's stamp.
    pub(super) stamped_ms: Option<i64>,
}

impl Engine {
    /// Starts consuming a restored partition from a position set here: the
    /// first record that arrived while it restored, else its committed
    /// offset. A seek made before the partition was paused for its restore
    /// does not always survive the pause: librdkafka then resets the
    /// position, to the beginning under `auto.offset.reset=earliest`, and
    /// input the store already holds is folded again.
    ///
    /// Its timers are loaded with leases counted from the commit's stamp,
    /// and wait until the partition consumed what its topic held now: a
    /// lease overdue because the job was down fires right after, unless a
    /// keep-alive sent meanwhile was waiting there.
    pub(super) fn resume_restored<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partition: i32,
    ) -> Result<(), RuntimeError> {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topics.input, partition);
        let committed = committed_positions(consumer, list)?.pop();
        let rewind_to = self.tasks.get(&partition).and_then(|task| task.rewind_to);
        let offset = match (rewind_to, &committed) {
            (Some(offset), _) => Offset::Offset(offset),
            (None, Some(committed)) => committed.offset,
            (None, None) => Offset::Beginning,
        };
        let (low, end) = consumer.fetch_watermarks(&self.topics.input, partition, KAFKA_TIMEOUT)?;
        tracing::info!(partition, ?offset, "consuming the restored partition");
        consumer.seek(&self.topics.input, partition, offset, KAFKA_TIMEOUT)?;
        // Held back for Redis, it resumes with the others.
        if !self.backpressure.held_back() {
            let mut resume = TopicPartitionList::new();
            resume.add_partition(&self.topics.input, partition);
            consumer.resume(&resume)?;
        }
        // No stamp (an offset committed by an older omni): a whole TTL from now.
        let keepalives_committed_ms = committed.and_then(|c| c.stamped_ms).unwrap_or_else(timers::wall_clock_ms);
        let deadlines = timers::load_deadlines(self.store.as_ref(), partition, keepalives_committed_ms)?;
        let Some(task) = self.tasks.get_mut(&partition) else { return Ok(()) };
        task.deadlines = deadlines;
        task.keepalives_committed_ms = keepalives_committed_ms;
        let from = match offset {
            Offset::Offset(at) => at,
            _ => low,
        };
        task.timers_wait_for = (from < end).then_some(end);
        // Only once consuming again: a failed seek or resume must not
        // leave a partition paused and counted as ready.
        task.rewind_to = None;
        task.restored = false;
        task.restoring = false;
        self.update_health();
        Ok(())
    }

    /// Lets the timers of partitions that consumed up to where they
    /// resumed fire again. Positions count past transaction markers,
    /// which no record shows.
    pub(in crate::runtime) fn release_timers(&mut self, positions: &TopicPartitionList) {
        for element in positions.elements_for_topic(&self.topics.input) {
            let Offset::Offset(position) = element.offset() else { continue };
            let Some(task) = self.tasks.get_mut(&element.partition()) else { continue };
            if task.timers_wait_for.is_some_and(|end| position >= end) {
                task.timers_wait_for = None;
            }
        }
    }
}

/// Where each partition of `partitions` resumes: its committed offset, or
/// its beginning when it never committed. A partition's own error comes
/// with no offset: right after a fencing the aborted transaction's offsets
/// stay unstable until its markers are written, and librdkafka gives up on
/// them after two retries. Taken for "never committed", it would send the
/// partition back to its beginning, to fold again what the store already
/// holds; the error goes to the recovery, which asks again.
pub(super) fn committed_positions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: TopicPartitionList,
) -> Result<Vec<Committed>, RuntimeError> {
    let committed = consumer.committed_offsets(partitions, KAFKA_TIMEOUT)?;
    let mut positions = Vec::with_capacity(committed.count());
    for element in committed.elements() {
        if let Err(e) = element.error() {
            tracing::warn!(partition = element.partition(), error = %e, "committed offset not readable yet");
            return Err(e.into());
        }
        let offset = match element.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        let stamped_ms = timers::stamped_ms(element.metadata());
        positions.push(Committed { partition: element.partition(), offset, stamped_ms });
    }
    Ok(positions)
}
