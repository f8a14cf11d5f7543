//! The consumer's librdkafka callbacks: rebalances drive the engine.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::engine::Engine;
use super::progress::{Stage, ThreadProgress};
use super::RuntimeError;

/// How long the rebalance callback waits for the new partitions' ends.
const PLACEHOLDER_BUDGET: Duration = Duration::from_secs(3);

/// Shares the engine between the processing loop and the rebalance callbacks,
/// which librdkafka runs on the loop's own thread inside `poll`.
pub struct JobContext {
    pub engine: Arc<Mutex<Engine>>,
    pub input: String,
    pub progress: Arc<ThreadProgress>,
}

impl JobContext {
    pub fn lock(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements().iter().filter(|e| e.topic() == self.input).map(|e| e.partition()).collect()
    }
}

/// Locks the engine; a poisoned lock still holds a consistent engine, since
/// no engine method panics midway by design.
pub fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Rebalances only: lag comes from [`super::lag`], which a blocked thread cannot freeze.
impl ClientContext for JobContext {}

/// Takes the assignment itself, rather than leaving it to librdkafka, to
/// choose where new partitions start (see [`JobContext::start_at_placeholder`]).
impl ConsumerContext for JobContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, list: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.start_at_placeholder(consumer, list);
                let assigned = if cooperative { consumer.incremental_assign(list) } else { consumer.assign(list) };
                match assigned {
                    Ok(()) => self.assigned(consumer, list),
                    Err(e) => self.fail("could not take the assigned partitions", e.into()),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoking(consumer, list);
                self.give_up(consumer, list, cooperative);
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error");
                // As librdkafka asks: the assignment is dropped, and the group hands it out again.
                self.give_up(consumer, list, cooperative);
            }
        }
    }
}

impl JobContext {
    /// Starts every new input partition at a placeholder, its last stable
    /// offset, and the engine pauses it at once and seeks it to its
    /// committed offset once restored. librdkafka would otherwise read the
    /// committed offsets itself, of all new partitions in one request, and
    /// start none of them while an open transaction holds any one's (a
    /// read_committed consumer asks for stable offsets): one dead
    /// instance's transaction would hold every partition, and a seek on a
    /// partition not started fails. The restores read each partition's
    /// offset on their own.
    ///
    /// The placeholder is absolute and in range: a logical one (the end,
    /// the beginning), or a fetch out of range before the pause takes hold,
    /// makes librdkafka look an offset up, and a lookup still in flight at
    /// the seek is retried and then overrides it. It is asked for all new
    /// partitions at once, within one short budget, since the partitions
    /// kept have a transaction open meanwhile. Without an answer the
    /// partitions start as librdkafka would have them, from their committed
    /// offsets; each then waits until librdkafka started it.
    fn start_at_placeholder(&self, consumer: &BaseConsumer<Self>, list: &mut TopicPartitionList) {
        let partitions = self.partitions(list);
        if partitions.is_empty() {
            return;
        }
        let mut latest = TopicPartitionList::new();
        for &partition in &partitions {
            latest.add_partition(&self.input, partition);
        }
        let ends =
            latest.set_all_offsets(Offset::End).and_then(|()| consumer.offsets_for_times(latest, PLACEHOLDER_BUDGET));
        let ends = match ends {
            Ok(ends) => ends,
            Err(e) => {
                tracing::warn!(error = %e, ?partitions, "no placeholder for the new partitions; librdkafka reads their offsets");
                return;
            }
        };
        for element in ends.elements_for_topic(&self.input) {
            let start = match (element.error(), element.offset()) {
                (Ok(()), Offset::Offset(end)) => Offset::Offset(end),
                _ => Offset::Stored,
            };
            if let Err(e) = list.set_partition_offset(&self.input, element.partition(), start) {
                self.fail("could not set a new partition's start", e.into());
            }
        }
    }

    fn revoking(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        self.progress.enter(Stage::Rebalancing);
        let partitions = self.partitions(list);
        tracing::info!(?partitions, lost = consumer.assignment_lost(), "partitions revoked");
        metrics::counter!("omni_rebalances_total", "kind" => "revoke").increment(1);
        let mut engine = self.lock();
        // Finish the revoked partitions' in-flight work while this
        // instance still owns them; a lost assignment can only be
        // abandoned, and a closing engine (after an error) commits nothing.
        let result = if engine.closing {
            engine.abort_open()
        } else if consumer.assignment_lost() {
            engine.mark_left();
            engine.abort(consumer, &partitions)
        } else {
            engine.commit(consumer)
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "could not finish the transaction on revoke");
            engine.failure.get_or_insert(e);
        }
        engine.revoke(&partitions);
    }

    fn give_up(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList, cooperative: bool) {
        let given_up = if cooperative { consumer.incremental_unassign(list) } else { consumer.unassign() };
        if let Err(e) = given_up {
            self.fail("could not give up the revoked partitions", e.into());
        }
    }

    fn assigned(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        self.progress.enter(Stage::Rebalancing);
        let partitions = self.partitions(list);
        tracing::info!(?partitions, "partitions assigned");
        metrics::counter!("omni_rebalances_total", "kind" => "assign").increment(1);
        let mut engine = self.lock();
        engine.assign(consumer, &partitions);
        // Only now: the new partitions already count as restoring.
        engine.mark_joined();
    }

    /// Hands an error met inside the callback to the loop, which ends the job with it.
    fn fail(&self, what: &str, error: RuntimeError) {
        tracing::error!(%error, "{what}");
        self.lock().failure.get_or_insert(error);
    }
}
