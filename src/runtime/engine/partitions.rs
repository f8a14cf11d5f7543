//! The partitions a processing thread owns: taking them (each restores
//! before it is consumed), giving them up, resuming them once restored, and
//! pausing them for the Redis writer's backlog.

use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;

use super::{cache_weight, Engine, Task};
use crate::runtime::RuntimeError;

impl Engine {
    /// Takes newly assigned partitions: each restores its store before it is consumed.
    pub(in crate::runtime) fn assign<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, partitions: &[i32]) {
        let mut paused = TopicPartitionList::new();
        self.health.positions.assigned(self.progress.thread(), partitions);
        for &partition in partitions {
            paused.add_partition(&self.topics.input, partition);
            self.tasks.insert(partition, Task { restoring: true, ..Task::default() });
            self.restores.start(partition);
        }
        if let Err(e) = consumer.pause(&paused) {
            self.failure.get_or_insert(e.into());
        }
        self.update_health();
    }

    /// Gives up partitions: their work is already in the committed transaction.
    pub(in crate::runtime) fn revoke(&mut self, partitions: &[i32]) {
        self.health.positions.revoked(self.progress.thread(), partitions);
        self.restores.revoke(partitions);
        for partition in partitions {
            self.refusals.forget(*partition, None);
            if let Some(task) = self.tasks.remove(partition) {
                let weights = task.recent.iter().map(|(path, room)| cache_weight(path, room.state().encoded_len()));
                self.room_cache_bytes = self.room_cache_bytes.saturating_sub(weights.sum());
            }
            metrics::gauge!("omni_restore_remaining_records", "partition" => partition.to_string()).set(0.0);
        }
        self.update_health();
    }

    /// Resumes partitions whose restore finished, after putting their state in Redis.
    pub(in crate::runtime) fn finish_restores<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        while let Ok(done) = self.restore_results.try_recv() {
            // A report from a restore that was cancelled (revoked, maybe reassigned since) is stale.
            if !self.restores.finished(done.partition, done.generation) {
                continue;
            }
            let Some(task) = self.tasks.get_mut(&done.partition) else { continue };
            let restored = done.result?;
            tracing::info!(partition = done.partition, records = restored.records, "partition restored");
            task.restored = Some(restored);
        }
        // Kept apart from the reports: a start that fails is tried again.
        self.start_restored(consumer)
    }

    /// Pauses or resumes the active partitions as the Redis writer's
    /// backlog asks (see [`Backpressure`]). Restoring partitions stay paused
    /// either way; they resume when restored.
    pub(in crate::runtime) fn apply_backpressure<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let Some(redis) = &self.redis else { return Ok(()) };
        let Some(hold) = self.backpressure.change(redis) else { return Ok(()) };
        let mut active = TopicPartitionList::new();
        for (&partition, task) in &self.tasks {
            if !task.restoring {
                active.add_partition(&self.topics.input, partition);
            }
        }
        if hold {
            consumer.pause(&active)?;
        } else {
            consumer.resume(&active)?;
        }
        Ok(())
    }

    pub(super) fn update_health(&mut self) {
        let restoring = self.tasks.values().filter(|t| t.restoring).count();
        self.health.set_partitions(&mut self.thread_health, self.tasks.len(), restoring);
    }

    /// Marks this thread as a member of the group, once it got an assignment.
    pub(in crate::runtime) fn mark_joined(&mut self) {
        self.health.mark_joined(&mut self.thread_health);
    }

    /// Marks this thread as out of the group: its assignment was lost (its
    /// session timed out), so it is not ready until it is assigned again.
    pub(in crate::runtime) fn mark_left(&mut self) {
        self.health.mark_left(&mut self.thread_health);
    }
}
