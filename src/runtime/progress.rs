//! What each processing thread is doing and since when: the watchdog's view.
//!
//! A thread marks every step it enters. A thread that stays in one step
//! longer than [`STALL_AFTER`] (a RocksDB write that never returns, a call
//! into Kafka that hangs) is stalled: `/healthz` and `/readyz` then fail,
//! and the watchdog logs where it is stuck, once per stall.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// How long a thread may stay in one step before it counts as stalled:
/// longer than the slowest legitimate step, a transaction commit whose every
/// call into Kafka waits out its 30 s timeout.
pub const STALL_AFTER: Duration = Duration::from_secs(120);

/// The steps of a processing thread's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Polling = 0,
    Processing,
    Committing,
    WritingStore,
    Aborting,
    Recovering,
    Rebalancing,
    Stopping,
}

impl Stage {
    const ALL: [Stage; 8] = [
        Stage::Polling,
        Stage::Processing,
        Stage::Committing,
        Stage::WritingStore,
        Stage::Aborting,
        Stage::Recovering,
        Stage::Rebalancing,
        Stage::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Polling => "polling the input",
            Stage::Processing => "folding a record",
            Stage::Committing => "committing the transaction",
            Stage::WritingStore => "writing the state store",
            Stage::Aborting => "aborting the transaction",
            Stage::Recovering => "recovering from a failed transaction",
            Stage::Rebalancing => "handling a rebalance",
            Stage::Stopping => "stopping",
        }
    }
}

/// One processing thread's current step and when it entered it.
#[derive(Debug)]
pub struct ThreadProgress {
    pub thread: usize,
    stage: AtomicU8,
    /// Milliseconds since `epoch` when the current step began.
    since_ms: AtomicU64,
    epoch: Instant,
}

/// A thread found stuck in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub thread: usize,
    pub stage: &'static str,
    pub for_secs: u64,
}

impl ThreadProgress {
    pub fn new(thread: usize) -> ThreadProgress {
        ThreadProgress { thread, stage: AtomicU8::new(0), since_ms: AtomicU64::new(0), epoch: Instant::now() }
    }

    /// The processing thread's number.
    pub fn thread(&self) -> usize {
        self.thread
    }

    /// Marks the start of a step, which is also progress.
    pub fn enter(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
        self.since_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The step the thread has been in for longer than `limit`, if any.
    pub fn stalled(&self, now: Instant, limit: Duration) -> Option<Stall> {
        let since = self.epoch + Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        let stuck = now.saturating_duration_since(since);
        let stage = Stage::ALL[usize::from(self.stage.load(Ordering::Relaxed)).min(Stage::ALL.len() - 1)];
        (stuck > limit && stage != Stage::Stopping).then(|| Stall {
            thread: self.thread,
            stage: stage.as_str(),
            for_secs: stuck.as_secs(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_stalled_once_one_step_outlasts_the_limit() {
        let progress = ThreadProgress::new(3);
        progress.enter(Stage::WritingStore);
        let limit = Duration::from_secs(10);
        let now = Instant::now();
        assert_eq!(progress.stalled(now, limit), None);
        let stall = progress.stalled(now + Duration::from_secs(11), limit).expect("stalled");
        assert_eq!((stall.thread, stall.stage), (3, "writing the state store"));
        assert!(stall.for_secs >= 10);
        progress.enter(Stage::Polling);
        assert_eq!(progress.stalled(Instant::now() + Duration::from_secs(5), limit), None, "progress clears it");
        progress.enter(Stage::Stopping);
        assert_eq!(progress.stalled(Instant::now() + Duration::from_secs(60), limit), None, "stopping is not a stall");
    }
}
