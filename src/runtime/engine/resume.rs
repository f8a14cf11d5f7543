//! Starting to consume a partition once its store is restored, from the
//! offset committed with that state, which the restore read (see
//! [`crate::runtime::restore`]). A start that fails (librdkafka has not
//! started the partition's fetcher yet, a broker is away) is that
//! partition's alone: it stays paused and is tried again shortly, while the
//! others go on, and it is counted and logged until it starts.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::{timers, Engine};
use crate::runtime::offsets::{Committed, WaitingToStart};
use crate::runtime::output::KAFKA_TIMEOUT;
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
        let due: Vec<(i32, Committed)> = self
            .tasks
            .iter()
            .filter(|(_, task)| task.restoring && task.start_retry.as_ref().is_none_or(|r| r.next_attempt <= now))
            .filter_map(|(&partition, task)| Some((partition, task.restored.clone()?)))
            .collect();
        for (partition, committed) in due {
            if let Err(error) = self.resume_restored(consumer, partition, committed) {
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

    /// Starts consuming a restored partition at its committed offset: a
    /// seek, made only now, since one made before the partition was paused
    /// for its restore does not always survive the pause.
    ///
    /// Its timers are loaded with leases counted from the commit's stamp,
    /// and wait until the partition consumed what its topic held now: a
    /// lease overdue because the job was down fires right after, unless a
    /// keep-alive sent meanwhile was waiting there.
    fn resume_restored<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partition: i32,
        committed: Committed,
    ) -> Result<(), RuntimeError> {
        let (low, end) = consumer.fetch_watermarks(&self.topics.input, partition, KAFKA_TIMEOUT)?;
        tracing::info!(partition, offset = ?committed.offset, "consuming the restored partition");
        consumer.seek(&self.topics.input, partition, committed.offset, KAFKA_TIMEOUT)?;
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
        let from = match committed.offset {
            Offset::Offset(at) => at,
            _ => low,
        };
        task.timers_wait_for = (from < end).then_some(end);
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
