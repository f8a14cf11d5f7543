//! Holds consumption back while Redis cannot keep up.
//!
//! The Redis writer takes committed writes without blocking, so a Redis
//! slower than the job would let its backlog grow with every room touched.
//! Instead, once the backlog reaches its budget while Redis takes writes,
//! the thread pauses its partitions (it keeps polling, so the group and
//! commits go on) until the backlog drained to three quarters of the budget:
//! the job then runs at the speed Redis writes, as Kafka Streams' thread
//! blocks in `send` when the producer's buffer is full. A Redis that fails
//! holds nothing back: the writer sheds its backlog for a rewrite instead.

use crate::view::RedisWriter;

#[derive(Debug, Default)]
pub(super) struct Backpressure {
    held_back: bool,
}

impl Backpressure {
    /// Whether partitions are paused for Redis now.
    pub(super) fn held_back(&self) -> bool {
        self.held_back
    }

    /// The change to make, if any: `Some(true)` to pause, `Some(false)` to resume.
    pub(super) fn change(&mut self, redis: &RedisWriter) -> Option<bool> {
        let hold = if self.held_back { !redis.may_resume() } else { redis.should_hold_back() };
        if hold == self.held_back {
            return None;
        }
        self.held_back = hold;
        if hold {
            metrics::counter!("omni_redis_backpressure_pauses_total").increment(1);
            metrics::gauge!("omni_redis_backpressure_threads").increment(1.0);
            tracing::info!("redis writes fall behind its backlog budget; pausing consumption until it drains");
        } else {
            metrics::gauge!("omni_redis_backpressure_threads").decrement(1.0);
            tracing::info!("redis backlog drained; resuming consumption");
        }
        Some(hold)
    }
}
