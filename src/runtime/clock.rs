//! When the processing loop commits.

use std::time::{Duration, Instant};

/// When commits fall due: an interval after the last one began, as in Kafka
/// Streams. The interval is then the period of commits however long each
/// takes, and bounds how long a record waits for its commit to begin.
pub(super) struct CommitClock {
    interval: Duration,
    last_began: Instant,
}

impl CommitClock {
    pub(super) fn new(interval: Duration, now: Instant) -> CommitClock {
        CommitClock { interval, last_began: now }
    }

    pub(super) fn began(&mut self, now: Instant) {
        self.last_began = now;
    }

    pub(super) fn until_due(&self, now: Instant) -> Duration {
        self.interval.saturating_sub(now.saturating_duration_since(self.last_began))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_fall_due_an_interval_after_the_last_one_began_however_long_it_took() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut clock = CommitClock::new(ms(100), start);
        assert_eq!(clock.until_due(start + ms(60)), ms(40));
        assert!(clock.until_due(start + ms(100)).is_zero());
        clock.began(start + ms(100));
        // The commit took 30 ms; the next one is still due at 200 ms, not 230.
        assert_eq!(clock.until_due(start + ms(130)), ms(70));
        assert!(clock.until_due(start + ms(200)).is_zero());
        assert!(clock.until_due(start + ms(500)).is_zero(), "a late loop finds the commit overdue");
    }
}
