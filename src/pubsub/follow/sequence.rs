//! Keeps each followed room's versions contiguous: a change either follows
//! the room's last reported version, is dropped as already covered, or opens
//! a gap that is filled from the room's Redis change stream or, failing
//! that, bridged by re-reading the room. Pure apart from the reads behind
//! [`RoomSource`], so every path is tested without Kafka or Redis.

use std::collections::HashMap;
use std::time::Duration;

use super::FollowEvent;
use crate::pubsub::PubSubError;
use crate::view::{ChangeRecord, RoomSnapshot};

/// The version reported last for each room.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    pub(super) known: HashMap<String, u64>,
}

/// What a change means for the room's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Already covered.
    Skip,
    /// The very next version.
    Next,
    /// Versions after `after` are missing before it.
    Gap { after: u64 },
}

impl Tracker {
    fn step(&self, path: &str, version: u64) -> Step {
        let known = self.known.get(path).copied().unwrap_or(0);
        if version <= known {
            Step::Skip
        } else if version - known == 1 {
            Step::Next
        } else {
            Step::Gap { after: known }
        }
    }

    /// Remembers the versions of reported events, in order.
    pub(super) fn record<'a>(&mut self, events: impl IntoIterator<Item = &'a FollowEvent>) {
        for event in events {
            self.known.insert(event.path().to_owned(), event.version());
        }
    }
}

/// The missing versions `after+1 .. version` from a room's change stream,
/// if it still holds every one of them.
fn fill_gap(after: u64, version: u64, fetched: Vec<ChangeRecord>) -> Option<Vec<ChangeRecord>> {
    let mut missing = Vec::new();
    let mut expected = after.saturating_add(1);
    for change in fetched {
        if change.version >= version {
            break;
        }
        if change.version < expected {
            continue;
        }
        if change.version != expected {
            return None;
        }
        missing.push(change);
        expected += 1;
    }
    (expected == version).then_some(missing)
}

/// The outcome of re-reading a room for a change that could not be bridged.
#[derive(Debug, PartialEq)]
enum Resync {
    /// Report these events.
    Events(Vec<FollowEvent>),
    /// Redis is behind the change (it is written after the commit): try again.
    Lagging(RoomSnapshot),
}

fn resync(snapshot: Option<RoomSnapshot>, change: &ChangeRecord) -> Resync {
    match snapshot {
        Some(s) if s.version >= change.version => Resync::Events(vec![FollowEvent::Resynchronised(s)]),
        Some(s) if s.version.checked_add(1) == Some(change.version) => {
            Resync::Events(vec![FollowEvent::Resynchronised(s), FollowEvent::Change(change.clone())])
        }
        Some(s) => Resync::Lagging(s),
        // A closed room has no hash, and its state before the change is gone:
        // report it as empty so the sequence can go on.
        None => Resync::Events(vec![
            FollowEvent::Resynchronised(RoomSnapshot {
                path: change.path.clone(),
                version: change.version.saturating_sub(1),
                modules: Default::default(),
                updated_at: String::new(),
            }),
            FollowEvent::Change(change.clone()),
        ]),
    }
}

/// How long to wait for Redis to catch up with a change before giving up on it.
#[derive(Debug, Clone, Copy)]
pub(super) struct LagPolicy {
    retries: u32,
    delay: Duration,
}

impl LagPolicy {
    pub(super) const DEFAULT: LagPolicy = LagPolicy { retries: 10, delay: Duration::from_millis(100) };
}

/// The Redis reads gap repair needs; a trait so the repair logic can be
/// tested without Redis.
pub(super) trait RoomSource {
    async fn changes_after(&mut self, path: &str, after: u64) -> Result<Vec<ChangeRecord>, PubSubError>;
    async fn snapshot(&mut self, path: &str) -> Result<Option<RoomSnapshot>, PubSubError>;
}

/// The events that bring `change` onto its room's contiguous sequence.
/// Touches no state, so a failure or cancellation can simply retry.
pub(super) async fn settle<S: RoomSource>(
    tracker: &Tracker,
    source: &mut S,
    change: &ChangeRecord,
    lag: LagPolicy,
) -> Result<Vec<FollowEvent>, PubSubError> {
    let after = match tracker.step(&change.path, change.version) {
        Step::Skip => return Ok(Vec::new()),
        Step::Next => return Ok(vec![FollowEvent::Change(change.clone())]),
        Step::Gap { after } => after,
    };
    let mut attempt = 0;
    loop {
        let fetched = source.changes_after(&change.path, after).await?;
        if let Some(missing) = fill_gap(after, change.version, fetched) {
            tracing::debug!(path = %change.path, after, version = change.version, "filled a gap from redis");
            let mut events: Vec<FollowEvent> = missing.into_iter().map(FollowEvent::Change).collect();
            events.push(FollowEvent::Change(change.clone()));
            return Ok(events);
        }
        match resync(source.snapshot(&change.path).await?, change) {
            Resync::Events(events) => {
                tracing::info!(path = %change.path, after, version = change.version, "resynchronised a room after a gap");
                return Ok(events);
            }
            Resync::Lagging(snapshot) if attempt >= lag.retries => {
                // Reporting the change now would break the sequence; the
                // room's next change repairs the gap once Redis catches up.
                tracing::warn!(
                    path = %change.path,
                    version = change.version,
                    redis_version = snapshot.version,
                    "redis stayed behind a change; dropping it for now"
                );
                return Ok(if snapshot.version > after {
                    vec![FollowEvent::Resynchronised(snapshot)]
                } else {
                    Vec::new()
                });
            }
            Resync::Lagging(_) => {
                attempt += 1;
                tokio::time::sleep(lag.delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::pubsub::follow::tests::{change, snap, PATH};
    use proptest::prelude::*;

    /// Redis as the follower sees it: a change stream and a sequence of
    /// snapshots (the last one repeats), so a lagging Redis can catch up.
    #[derive(Default)]
    struct FakeRedis {
        stream: Vec<ChangeRecord>,
        snapshots: Vec<Option<RoomSnapshot>>,
        snapshot_reads: usize,
        fail: bool,
    }

    impl RoomSource for FakeRedis {
        async fn changes_after(&mut self, _: &str, after: u64) -> Result<Vec<ChangeRecord>, PubSubError> {
            if self.fail {
                return Err(PubSubError::Task("redis down".into()));
            }
            Ok(self.stream.iter().filter(|c| c.version > after).cloned().collect())
        }

        async fn snapshot(&mut self, _: &str) -> Result<Option<RoomSnapshot>, PubSubError> {
            let i = self.snapshot_reads.min(self.snapshots.len().saturating_sub(1));
            self.snapshot_reads += 1;
            Ok(self.snapshots.get(i).cloned().flatten())
        }
    }

    const NO_WAIT: LagPolicy = LagPolicy { retries: 3, delay: Duration::ZERO };

    fn run<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(future)
    }

    fn tracker_at(version: Option<u64>) -> Tracker {
        let mut tracker = Tracker::default();
        if let Some(v) = version {
            tracker.known.insert(PATH.into(), v);
        }
        tracker
    }

    fn shape(events: &[FollowEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                FollowEvent::Snapshot(s) => format!("snapshot {}", s.version),
                FollowEvent::Change(c) => format!("change {}", c.version),
                FollowEvent::Resynchronised(s) => format!("resync {}", s.version),
            })
            .collect()
    }

    fn settle_shape(known: Option<u64>, redis: &mut FakeRedis, version: u64) -> Vec<String> {
        shape(&run(settle(&tracker_at(known), redis, &change(version), NO_WAIT)).unwrap())
    }

    #[test]
    fn steps_follow_the_known_version() {
        let tracker = tracker_at(Some(5));
        assert_eq!(tracker.step(PATH, 4), Step::Skip);
        assert_eq!(tracker.step(PATH, 5), Step::Skip);
        assert_eq!(tracker.step(PATH, 6), Step::Next);
        assert_eq!(tracker.step(PATH, 9), Step::Gap { after: 5 });
        assert_eq!(tracker.step("app/a/room/new", 1), Step::Next);
        assert_eq!(tracker.step("app/a/room/new", 3), Step::Gap { after: 0 });
        assert_eq!(tracker.step("app/a/room/new", 0), Step::Skip);
    }

    #[test]
    fn gaps_fill_only_from_a_contiguous_stream() {
        let versions = |v: Option<Vec<ChangeRecord>>| v.map(|cs| cs.iter().map(|c| c.version).collect::<Vec<_>>());
        let stream = |vs: &[u64]| vs.iter().map(|&v| change(v)).collect::<Vec<_>>();
        assert_eq!(versions(fill_gap(2, 5, stream(&[3, 4, 5, 6]))), Some(vec![3, 4]));
        assert_eq!(versions(fill_gap(2, 5, stream(&[1, 2, 3, 4]))), Some(vec![3, 4]));
        assert_eq!(versions(fill_gap(2, 5, stream(&[4, 5]))), None);
        assert_eq!(versions(fill_gap(2, 5, stream(&[3]))), None);
        assert_eq!(versions(fill_gap(2, 5, stream(&[3, 5]))), None);
        assert_eq!(versions(fill_gap(2, 5, Vec::new())), None);
        assert_eq!(versions(fill_gap(0, 3, stream(&[1, 2]))), Some(vec![1, 2]));
    }

    #[test]
    fn the_next_version_passes_and_old_ones_are_dropped() {
        let mut redis = FakeRedis::default();
        assert_eq!(settle_shape(Some(4), &mut redis, 5), ["change 5"]);
        assert_eq!(settle_shape(Some(4), &mut redis, 4), Vec::<String>::new());
        assert_eq!(settle_shape(None, &mut redis, 1), ["change 1"]);
    }

    #[test]
    fn a_gap_is_filled_from_the_change_stream() {
        let mut redis = FakeRedis { stream: (1..=9).map(change).collect(), ..Default::default() };
        assert_eq!(settle_shape(Some(4), &mut redis, 8), ["change 5", "change 6", "change 7", "change 8"]);
        assert_eq!(settle_shape(None, &mut redis, 3), ["change 1", "change 2", "change 3"]);
        assert_eq!(redis.snapshot_reads, 0);
    }

    #[test]
    fn an_unfillable_gap_resynchronises_from_the_snapshot() {
        // Redis is exactly one behind the change: resync, then the change.
        let mut redis =
            FakeRedis { stream: (7..=7).map(change).collect(), snapshots: vec![Some(snap(7))], ..Default::default() };
        assert_eq!(settle_shape(Some(4), &mut redis, 8), ["resync 7", "change 8"]);
        // Redis is at or past the change: the snapshot covers it.
        let mut redis = FakeRedis { snapshots: vec![Some(snap(10))], ..Default::default() };
        assert_eq!(settle_shape(Some(4), &mut redis, 8), ["resync 10"]);
        let mut redis = FakeRedis { snapshots: vec![Some(snap(8))], ..Default::default() };
        assert_eq!(settle_shape(Some(4), &mut redis, 8), ["resync 8"]);
    }

    #[test]
    fn a_closed_room_resynchronises_as_empty_before_the_change() {
        let mut redis = FakeRedis { snapshots: vec![None], ..Default::default() };
        let events = run(settle(&tracker_at(Some(2)), &mut redis, &change(6), NO_WAIT)).unwrap();
        assert_eq!(shape(&events), ["resync 5", "change 6"]);
        let FollowEvent::Resynchronised(empty) = &events[0] else { panic!("{events:?}") };
        assert!(empty.modules.is_empty());
        assert_eq!(empty.path, PATH);
    }

    #[test]
    fn a_lagging_redis_is_given_time_to_catch_up() {
        let mut redis =
            FakeRedis { snapshots: vec![Some(snap(5)), Some(snap(6)), Some(snap(7))], ..Default::default() };
        assert_eq!(settle_shape(Some(2), &mut redis, 8), ["resync 7", "change 8"]);
        assert_eq!(redis.snapshot_reads, 3);
    }

    #[test]
    fn a_redis_that_stays_behind_never_breaks_the_sequence() {
        let mut redis = FakeRedis { snapshots: vec![Some(snap(5))], ..Default::default() };
        assert_eq!(settle_shape(Some(2), &mut redis, 9), ["resync 5"]);
        assert_eq!(redis.snapshot_reads, NO_WAIT.retries as usize + 1);
        // Behind even what was reported: nothing, rather than going backwards.
        let mut redis = FakeRedis { snapshots: vec![Some(snap(2))], ..Default::default() };
        assert_eq!(settle_shape(Some(4), &mut redis, 9), Vec::<String>::new());
    }

    #[test]
    fn a_redis_error_reports_nothing_so_the_change_can_be_retried() {
        let mut redis = FakeRedis { fail: true, ..Default::default() };
        assert!(run(settle(&tracker_at(Some(2)), &mut redis, &change(5), NO_WAIT)).is_err());
        // No Redis needed for the next version.
        assert_eq!(settle_shape(Some(2), &mut redis, 3), ["change 3"]);
    }

    #[test]
    fn a_late_joiner_drops_what_its_snapshot_covers() {
        // The processor committed 3..=8; Redis shows 6 when the follower reads it.
        let mut tracker = Tracker::default();
        let mut out = vec![FollowEvent::Snapshot(snap(6))];
        tracker.record(out.iter());
        let mut redis =
            FakeRedis { stream: (1..=6).map(change).collect(), snapshots: vec![Some(snap(6))], ..Default::default() };
        for v in 3..=8 {
            let events = run(settle(&tracker, &mut redis, &change(v), NO_WAIT)).unwrap();
            tracker.record(events.iter());
            out.extend(events);
        }
        assert_eq!(shape(&out), ["snapshot 6", "change 7", "change 8"]);
    }

    /// Checks the promise of a follower: per room, each change is the
    /// version after the previous event, and a resync only moves forward.
    fn assert_contiguous(events: &[FollowEvent]) -> Result<(), TestCaseError> {
        let mut known: HashMap<&str, u64> = HashMap::new();
        for event in events {
            let previous = known.get(event.path()).copied();
            match event {
                FollowEvent::Snapshot(_) => {
                    prop_assert!(previous.is_none(), "second snapshot in {:?}", shape(events))
                }
                FollowEvent::Change(c) => {
                    prop_assert_eq!(c.version, previous.unwrap_or(0) + 1, "in {:?}", shape(events))
                }
                FollowEvent::Resynchronised(s) => {
                    prop_assert!(s.version > previous.unwrap_or(0), "backwards in {:?}", shape(events))
                }
            }
            known.insert(event.path(), event.version());
        }
        Ok(())
    }

    proptest! {
        /// Redis holds version `redis_at` (or nothing, when the room closed or
        /// never reached Redis) and the last `cap` changes; Kafka delivers
        /// some of the versions up to `latest`, in order, from the look-back
        /// point on.
        #[test]
        fn versions_stay_contiguous_whatever_kafka_and_redis_hold(
            latest in 1u64..30,
            redis_lag in 0u64..30,
            closed in any::<bool>(),
            cap in 0u64..10,
            lookback in 0u64..30,
            drops in prop::collection::vec(any::<bool>(), 30),
        ) {
            let redis_at = latest.saturating_sub(redis_lag);
            let snapshot = (redis_at > 0 && !closed).then(|| snap(redis_at));
            let mut redis = FakeRedis {
                stream: (redis_at.saturating_sub(cap) + 1..=redis_at).map(change).collect(),
                snapshots: vec![snapshot.clone()],
                ..Default::default()
            };
            let mut tracker = Tracker::default();
            let mut out: Vec<FollowEvent> = snapshot.into_iter().map(FollowEvent::Snapshot).collect();
            tracker.record(out.iter());
            let from = latest.saturating_sub(lookback).max(1);
            for v in from..=latest {
                if drops[v as usize % drops.len()] && v != latest {
                    continue;
                }
                let events = run(settle(&tracker, &mut redis, &change(v), LagPolicy { retries: 0, delay: Duration::ZERO })).unwrap();
                tracker.record(events.iter());
                out.extend(events);
            }
            assert_contiguous(&out)?;
            // The newest change is always reached when Redis is not behind it by more than one.
            if redis_at + 1 >= latest {
                prop_assert_eq!(tracker.known.get(PATH).copied(), Some(latest.max(redis_at)));
            }
        }
    }
}
