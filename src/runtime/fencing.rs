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
    pub(super) recent: VecDeque<Instant>,
}

impl FencingBudget {
    pub(super) const WINDOW: Duration = Duration::from_secs(600);
    const MOST: usize = 3;

    /// Records a fencing at `now`; false once more than `MOST` fell within `WINDOW`.
    pub(super) fn allow(&mut self, now: Instant) -> bool {
        while self.recent.front().is_some_and(|&at| now.duration_since(at) > Self::WINDOW) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.recent.len() <= Self::MOST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_fencings_are_ridden_out_and_a_run_of_them_is_not() {
        let start = Instant::now();
        let mut budget = FencingBudget::default();
        for i in 0..FencingBudget::MOST as u64 {
            assert!(budget.allow(start + Duration::from_secs(i)), "fencing {i} is allowed");
        }
        assert!(!budget.allow(start + Duration::from_secs(10)), "one more within the window is not");
    }

    #[test]
    fn fencings_older_than_the_window_are_forgotten() {
        let start = Instant::now();
        let mut budget = FencingBudget::default();
        for i in 0..FencingBudget::MOST as u64 {
            assert!(budget.allow(start + Duration::from_secs(i)));
        }
        let later = start + FencingBudget::WINDOW + Duration::from_secs(FencingBudget::MOST as u64);
        assert!(budget.allow(later), "a fencing long after the others is allowed again");
        assert_eq!(budget.recent.len(), 1);
    }
}
