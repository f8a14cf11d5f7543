//! Starting to consume a partition once its store is restored, from the
//! offset committed with that state, which the restore read with the
//! input's watermarks (see [`crate::runtime::restore`]): no call here waits
//! on a broker. A start that fails (librdkafka has not started the
//! partition's fetcher yet) is that partition's alone: it stays paused and
//! is tried again shortly, while the others go on, and it is counted and
//! logged until it starts.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::{timers, Engine};
use crate::runtime::offsets::WaitingToStart;
use crate::runtime::output::KAFKA_TIMEOUT;
use crate::runtime::restore::Restored;
use crate::runtime::RuntimeError;

/// Longest pause between two attempts at starting a partition.
const MOST_START_DELAY: Duration = Duration::from_secs(2);

/// A partition whose start failed, and when to try it again.
pub(super) struct StartRetry {
    waiting: WaitingToStart,
    next_attempt: Instant,
    delay: Duration,
}

impl Engine {
    /// Starts consuming the partitions whose restore finished, each at
    /// the offset its restore read; one that cannot start yet waits alone.
    /// Only a Kafka error is waited out; the store's ends the job.
    pub(super) fn start_restored<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let now = Instant::now();
        let due: Vec<(i32, Restored)> = self
            .tasks
            .iter()
            .filter(|(_, task)| task.restoring && task.start_retry.as_ref().is_none_or(|r| r.next_attempt <= now))
            .filter_map(|(&partition, task)| Some((partition, task.restored.clone()?)))
            .collect();
        for (partition, restored) in due {
            if let Err(error) = self.resume_restored(consumer, partition, restored) {
                if !matches!(error, RuntimeError::Client(_) | RuntimeError::Kafka(_)) {
                    return Err(error);
                }
                let Some(task) = self.tasks.get_mut(&partition) else { continue };
                let retry = match task.start_retry.take() {
                    None => StartRetry {
                        waiting: WaitingToStart::new(partition, &error),
                        next_attempt: now,
                        delay: Duration::from_millis(100),
                    },
                    Some(mut retry) => {
                        retry.waiting.again(&error);
                        retry.delay = (retry.delay * 2).min(MOST_START_DELAY);
                        retry
                    }
                };
                task.start_retry = Some(StartRetry { next_attempt: now + retry.delay, ..retry });
            }
        }
        Ok(())
    }

    /// Starts consuming a restored partition at its committed offset, or
    /// its first one when it never committed: absolute, since librdkafka
    /// looks a logical one up, and a lookup still in flight at a later
    /// seek (a rewind) is retried and overrides it.
    ///
    /// Its timers are loaded with leases counted from the commit's stamp,
    /// and wait until the partition consumed what its topic held now: a
    /// lease overdue because the job was down fires right after, unless a
    /// keep-alive sent meanwhile was waiting there.
    fn resume_restored<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partition: i32,
        Restored { committed, input: (low, end), .. }: Restored,
    ) -> Result<(), RuntimeError> {
        let from = match committed.offset {
            Offset::Offset(at) => at,
            _ => low,
        };
        tracing::info!(partition, offset = from, "consuming the restored partition");
        consumer.seek(&self.topics.input, partition, Offset::Offset(from), KAFKA_TIMEOUT)?;
        // Held back for Redis, it resumes with the others.
        if !self.backpressure.held_back() {
            let mut resume = TopicPartitionList::new();
            resume.add_partition(&self.topics.input, partition);
            consumer.resume(&resume)?;
        }
        // No stamp (an offset committed by an older omni): a whole TTL from now.
        let keepalives_committed_ms = committed.stamped_ms.unwrap_or_else(timers::wall_clock_ms);
        let deadlines = timers::load_deadlines(self.store.as_ref(), partition, keepalives_committed_ms)?;
        let Some(task) = self.tasks.get_mut(&partition) else { return Ok(()) };
        task.deadlines = deadlines;
        task.keepalives_committed_ms = keepalives_committed_ms;
        task.timers_wait_for = (from < end).then_some(end);
        task.committed_offset = Some(from);
        // Only once consuming again: a failed seek or resume must not
        // leave a partition paused and counted as ready.
        task.restored = None;
        task.start_retry = None;
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
