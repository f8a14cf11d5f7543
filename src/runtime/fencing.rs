//! How often a processing thread may rebuild a fenced producer.
//!
//! A producer is fenced when its transaction outlived
//! `transaction.timeout.ms` (a long stall) or when another producer took its
//! transactional id. The first is rare and worth riding out, as Kafka
//! Streams does; the second repeats, since two instances with one id fence
//! each other in turn, and must stop the job with a clear error.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Remembers recent fencings, to tell a rare one (a transaction that timed
/// out through a long stall) from a fight over one transactional id.
#[derive(Debug, Default)]
pub(super) struct FencingBudget {
    recent: VecDeque<Instant>,
}

impl FencingBudget {
    /// How far back fencings count.
    pub(super) const WINDOW: Duration = Duration::from_secs(600);
    /// Most fencings within the window that are still ridden out.
    pub(super) const MOST: usize = 3;

    /// Records a fencing at `now`, and returns how many fell within the window.
    pub(super) fn record(&mut self, now: Instant) -> usize {
        while self.recent.front().is_some_and(|&at| now.duration_since(at) > Self::WINDOW) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencings_within_the_window_add_up() {
        let start = Instant::now();
        let mut budget = FencingBudget::default();
        let counts: Vec<usize> =
            (0..=FencingBudget::MOST as u64).map(|i| budget.record(start + Duration::from_secs(i))).collect();
        assert_eq!(counts, (1..=FencingBudget::MOST + 1).collect::<Vec<_>>());
    }

    #[test]
    fn fencings_older_than_the_window_are_forgotten() {
        let start = Instant::now();
        let mut budget = FencingBudget::default();
        for i in 0..FencingBudget::MOST as u64 {
            budget.record(start + Duration::from_secs(i));
        }
        let later = start + FencingBudget::WINDOW + Duration::from_secs(FencingBudget::MOST as u64);
        assert_eq!(budget.record(later), 1, "a fencing long after the others counts alone");
    }
}
