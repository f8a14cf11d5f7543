//! Liveness and readiness of the job, summed over its processing threads,
//! as the operations endpoint reports them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::lag::Positions;
use super::progress::{Stall, ThreadProgress, STALL_AFTER};
use crate::view::{RedisTrouble, WriterStatus};

/// Liveness and readiness, read by the operations endpoint, summed over the
/// instance's processing threads.
#[derive(Debug, Default)]
pub struct Health {
    pub(super) threads: AtomicUsize,
    progress: Mutex<Vec<Arc<ThreadProgress>>>,
    joined: AtomicUsize,
    assigned: AtomicUsize,
    restoring: AtomicUsize,
    restore_total: AtomicU64,
    restore_done: AtomicU64,
    /// Where each assigned partition's processing has got to, for the lag watcher.
    pub(super) positions: Positions,
    /// The Redis writer's status, when the job writes to Redis.
    redis: Mutex<Option<Arc<WriterStatus>>>,
}

/// One processing thread's share of [`Health`].
#[derive(Debug, Default)]
pub(super) struct ThreadHealth {
    joined: bool,
    assigned: usize,
    restoring: usize,
}

impl Health {
    pub(super) fn mark_joined(&self, thread: &mut ThreadHealth) {
        if !std::mem::replace(&mut thread.joined, true) {
            self.joined.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn mark_left(&self, thread: &mut ThreadHealth) {
        if std::mem::replace(&mut thread.joined, false) {
            self.joined.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn set_partitions(&self, thread: &mut ThreadHealth, assigned: usize, restoring: usize) {
        self.assigned.fetch_add(assigned, Ordering::Relaxed);
        self.assigned.fetch_sub(std::mem::replace(&mut thread.assigned, assigned), Ordering::Relaxed);
        self.restoring.fetch_add(restoring, Ordering::Relaxed);
        self.restoring.fetch_sub(std::mem::replace(&mut thread.restoring, restoring), Ordering::Relaxed);
        metrics::gauge!("omni_assigned_partitions").set(self.assigned() as f64);
    }

    /// Ready once every processing thread joined the group and every
    /// assigned partition is restored, and while no thread is stalled. A
    /// thread whose assignment was lost (a session timeout) counts as joined
    /// again only once it is assigned anew.
    pub fn ready(&self) -> bool {
        let threads = self.threads.load(Ordering::Relaxed);
        threads > 0
            && self.joined.load(Ordering::Relaxed) == threads
            && self.restoring.load(Ordering::Relaxed) == 0
            && self.stall().is_none()
    }

    /// A processing thread stuck in one step for longer than [`STALL_AFTER`], if any.
    pub fn stall(&self) -> Option<Stall> {
        let now = Instant::now();
        let threads = self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        threads.iter().find_map(|thread| thread.stalled(now, STALL_AFTER))
    }

    /// Redis trouble: writes failing as a whole since a while, and why;
    /// `None` while Redis takes writes or when the job has no Redis.
    pub fn redis_trouble(&self) -> Option<RedisTrouble> {
        self.redis.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref()?.trouble()
    }

    /// Whether the job writes to Redis at all.
    pub fn writes_redis(&self) -> bool {
        self.redis.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_some()
    }

    pub(super) fn watch_redis(&self, status: Arc<WriterStatus>) {
        *self.redis.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(status);
    }

    /// Watches a processing thread's progress.
    pub(super) fn watch(&self, thread: Arc<ThreadProgress>) {
        self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(thread);
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    /// Changelog records restored so far and to restore in all, since start-up.
    pub fn restore_progress(&self) -> (u64, u64) {
        (self.restore_done.load(Ordering::Relaxed), self.restore_total.load(Ordering::Relaxed))
    }

    pub(super) fn restore_planned(&self, records: u64) {
        self.restore_total.fetch_add(records, Ordering::Relaxed);
    }

    pub(super) fn restore_advanced(&self, records: u64) {
        self.restore_done.fetch_add(records, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_lost_its_assignment_is_not_ready_until_assigned_again() {
        let health = Health::default();
        health.threads.store(1, Ordering::Relaxed);
        let mut thread = ThreadHealth::default();
        assert!(!health.ready(), "not ready before joining");
        health.mark_joined(&mut thread);
        health.set_partitions(&mut thread, 2, 0);
        assert!(health.ready());
        // A session timeout: the assignment is lost, every partition revoked.
        health.mark_left(&mut thread);
        health.set_partitions(&mut thread, 0, 0);
        assert!(!health.ready(), "0 partitions after a lost assignment is not ready");
        health.mark_left(&mut thread);
        health.mark_joined(&mut thread);
        assert!(health.ready(), "assigned again (even 0 partitions, in a group with more members than partitions)");
        health.mark_joined(&mut thread);
        assert_eq!(health.joined.load(Ordering::Relaxed), 1, "counted once");
    }
}
