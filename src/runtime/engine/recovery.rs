//! Getting out of a failed transaction: aborting it and rewinding the
//! input to the committed offsets, or dropping it when the producer is
//! replaced, as Kafka Streams' task recovery does.

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::Engine;
use crate::kafka::abort_transaction;
use crate::runtime::offsets::{committed_now, Committed};
use crate::runtime::output::{take_changelog_ends, JobProducer, KAFKA_TIMEOUT};
use crate::runtime::progress::Stage;
use crate::runtime::RuntimeError;

impl Engine {
    /// Aborts the open transaction and rewinds every active partition, except
    /// those in `leaving` (being given up), to its committed offset.
    pub(in crate::runtime) fn abort<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        leaving: &[i32],
    ) -> Result<(), RuntimeError> {
        self.abort_open()?;
        self.rewind(consumer, leaving)
    }

    /// The producer's fencing, if it was fenced: its transaction outlived
    /// `transaction.timeout.ms` and the coordinator bumped its epoch, or
    /// another producer took its transactional id. Only a new producer can
    /// go on. So too when the transaction coordinator's broker died during a
    /// commit and the new coordinator finds the transaction in another state
    /// than the producer expects (`INVALID_TXN_STATE`: an abort of a commit
    /// already under way): a new producer's `initTransactions` settles it.
    /// Other fatal errors (authorisation, a broken sequence) are not
    /// fencings: a new producer would meet them again.
    pub(in crate::runtime) fn producer_fencing(&self) -> Option<String> {
        match self.producer.client().fatal_error()? {
            (
                RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::InvalidTransactionalState,
                why,
            ) => Some(why),
            _ => None,
        }
    }

    /// Puts a new producer, its transactions initialised, in place of a
    /// fenced one, and starts every active partition over as if it had just
    /// been assigned: back to its committed offset, then restored from the
    /// changelog before it is consumed, as Kafka Streams re-initialises its
    /// tasks after a fencing. A commit cut short by the fencing may still
    /// have committed (its reply lost): its offsets then cover records whose
    /// state only the changelog holds, so neither the open overlays nor the
    /// cached states can be trusted.
    pub(in crate::runtime) fn replace_producer<C: ConsumerContext>(
        &mut self,
        producer: JobProducer,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        self.producer = producer;
        self.discard_open();
        // No rewind: each partition's restore reads its committed offset, and it is sought there once restored.
        let active: Vec<i32> = self.tasks.iter().filter(|(_, task)| !task.restoring).map(|(&p, _)| p).collect();
        self.assign(consumer, &active);
        Ok(())
    }

    /// Seeks every active partition, except those in `leaving`, to its
    /// committed offset (its first one when it never committed: absolute,
    /// as in [`Engine::start_restored`]).
    ///
    /// A partition that had consumed past it then fires no timer until it
    /// consumed that far again: the keep-alives the aborted transaction
    /// processed renewed leases only in memory, and count once processed
    /// again. One that had consumed nothing since has nothing to read again,
    /// and its timers go on.
    fn rewind<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, leaving: &[i32]) -> Result<(), RuntimeError> {
        let mut active = TopicPartitionList::new();
        for (&partition, task) in &self.tasks {
            if !task.restoring && !leaving.contains(&partition) {
                active.add_partition(&self.topics.input, partition);
            }
        }
        if active.count() == 0 {
            return Ok(());
        }
        let consumed = consumer.position()?;
        for Committed { partition, offset, .. } in committed_now(consumer, active)? {
            let committed = match offset {
                Offset::Offset(at) => at,
                _ => consumer.fetch_watermarks(&self.topics.input, partition, KAFKA_TIMEOUT)?.0,
            };
            tracing::info!(partition, offset = committed, "rewinding to the committed offset");
            consumer.seek(&self.topics.input, partition, Offset::Offset(committed), KAFKA_TIMEOUT)?;
            let reached = match consumed.find_partition(&self.topics.input, partition).map(|e| e.offset()) {
                Some(Offset::Offset(reached)) if reached > committed => reached,
                _ => continue,
            };
            if let Some(task) = self.tasks.get_mut(&partition) {
                task.timers_wait_for = Some(task.timers_wait_for.map_or(reached, |end| end.max(reached)));
            }
        }
        Ok(())
    }

    /// Aborts the open transaction, if any, without touching positions.
    pub(in crate::runtime) fn abort_open(&mut self) -> Result<(), RuntimeError> {
        if self.open_since.is_some() && self.exactly_once {
            self.progress.enter(Stage::Aborting);
            abort_transaction(&self.producer, KAFKA_TIMEOUT)?;
        }
        self.discard_open();
        // Partitions revoked while the transaction was open were forgotten
        // already; their refusals are their next owner's to find.
        let tasks = &self.tasks;
        self.refusals.keep_only(|partition| tasks.contains_key(&partition));
        self.refusals.trace(&self.producer, self.topics.batch_bytes, &self.topics.dead_letter)
    }

    /// Forgets the open transaction, if any: what it touched is seen nowhere.
    pub(in crate::runtime) fn discard_open(&mut self) {
        if self.open_since.take().is_some() {
            metrics::counter!("omni_transaction_aborts_total").increment(1);
        }
        take_changelog_ends(&self.producer);
        for task in self.tasks.values_mut() {
            task.dirty.clear();
            task.next_offset = None;
        }
        // Timers the transaction set, fired or cancelled are back as committed.
        if let Err(error) = self.reload_deadlines() {
            self.failure.get_or_insert(error);
        }
    }
}
