//! What the writer tells others about how it goes: the runtime how full
//! its backlog is ([`Pressure`], for backpressure), and the operations
//! endpoint whether Redis takes writes ([`WriterStatus`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// What the writer tells the runtime about its backlog.
pub(super) struct Pressure {
    /// Bytes of writes waiting, as [`Pending`] charges them.
    pub(super) bytes: AtomicUsize,
    /// Bytes of writes sent but not yet taken in: a writer waiting on a
    /// slow Redis takes in nothing meanwhile.
    pub(super) queued: AtomicUsize,
    /// Whether Redis refuses or cannot be reached now.
    pub(super) failing: AtomicBool,
    pub(super) budget: usize,
}

/// How the writer's dealings with Redis go, for the operations endpoint:
/// since when writes fail as a whole (Redis unreachable, or refusing every
/// write), why, and how many rooms wait.
#[derive(Debug, Default)]
pub struct WriterStatus {
    failing: Mutex<Option<(Instant, String)>>,
    pub(super) backlog_rooms: AtomicUsize,
}

/// Redis trouble as [`WriterStatus::trouble`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTrouble {
    /// How long writes have been failing.
    pub for_secs: u64,
    /// The latest error.
    pub error: String,
    /// Rooms waiting to be written.
    pub backlog_rooms: usize,
}

impl WriterStatus {
    pub(super) fn failed(&self, error: &dyn std::fmt::Display) {
        let mut failing = self.failing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let since = failing.as_ref().map_or_else(Instant::now, |(since, _)| *since);
        *failing = Some((since, error.to_string()));
    }

    pub(super) fn succeeded(&self) {
        *self.failing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    /// `None` while Redis takes writes; otherwise since when and why not.
    pub fn trouble(&self) -> Option<RedisTrouble> {
        let failing = self.failing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        failing.as_ref().map(|(since, error)| RedisTrouble {
            for_secs: since.elapsed().as_secs(),
            error: error.clone(),
            backlog_rooms: self.backlog_rooms.load(Ordering::Relaxed),
        })
    }
}

impl Pressure {
    pub(super) fn total(&self) -> usize {
        self.bytes.load(Ordering::Relaxed) + self.queued.load(Ordering::Relaxed)
    }
}
