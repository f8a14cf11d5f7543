//! The consumer's librdkafka callbacks: rebalances drive the engine.

use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};

use super::engine::Engine;
use super::progress::{Stage, ThreadProgress};

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

impl ConsumerContext for JobContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
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
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.progress.enter(Stage::Rebalancing);
                let partitions = self.partitions(list);
                tracing::info!(?partitions, "partitions assigned");
                metrics::counter!("omni_rebalances_total", "kind" => "assign").increment(1);
                let mut engine = self.lock();
                engine.assign(consumer, &partitions);
                // Only now: the new partitions already count as restoring.
                engine.mark_joined();
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}
