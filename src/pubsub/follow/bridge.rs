//! Bridging one gap in a room's versions from Redis: the missing changes
//! from the room's change stream, or else the room's state re-read.
//!
//! Redis is written only after the broadcast, so it may lag a change, and it
//! may have lost data (a flush, an eviction). A room Redis holds no hash for
//! is therefore *unknown*, not empty: the one exception is a closed room,
//! whose change stream outlives its hash and ends with the close. Whenever
//! Redis cannot vouch for the state just before the change, the answer is
//! [`Bridge::Wait`], never a guess.

use super::{FollowEvent, FollowedChange};
use crate::modules::ROOM_MODULE;
use crate::pubsub::PubSubError;
use crate::view::RoomSnapshot;

/// The Redis reads gap repair needs; a trait so the repair logic can be
/// tested without Redis.
pub(super) trait RoomSource<C> {
    async fn changes_after(&mut self, path: &str, after: u64) -> Result<Vec<C>, PubSubError>;
    async fn snapshot(&mut self, path: &str) -> Result<Option<RoomSnapshot>, PubSubError>;
}

/// What one attempt to bridge a gap found.
#[derive(Debug, PartialEq)]
pub(super) enum Bridge<C> {
    /// Report these events: afterwards the room is at or past the change.
    Events(Vec<FollowEvent<C>>),
    /// Redis cannot vouch for the room's state before the change yet. Its
    /// hash's version, if it has one.
    Wait { redis_version: Option<u64> },
}

/// Tries once to bring `change` onto its room's sequence, the room being
/// known up to `after` (< `change.version - 1`). Only reads, so a failure or
/// cancellation can simply retry.
pub(super) async fn bridge<C: FollowedChange, S: RoomSource<C>>(
    source: &mut S,
    after: u64,
    change: &C,
) -> Result<Bridge<C>, PubSubError> {
    let (path, version) = (change.path(), change.version());
    let fetched = source.changes_after(path, after).await?;
    // The stream outlives a closed room's hash and always ends at its close.
    let stream_close = fetched.last().filter(|c| c.module() == ROOM_MODULE).cloned();
    if let Some(missing) = fill_gap(after, version, fetched) {
        tracing::debug!(%path, after, version, "filled a gap from redis");
        let mut events: Vec<FollowEvent<C>> = missing.into_iter().map(FollowEvent::Change).collect();
        events.push(FollowEvent::Change(change.clone()));
        return Ok(Bridge::Events(events));
    }
    if change.module() == ROOM_MODULE {
        // A close clears every module: the room after it is known without Redis.
        tracing::info!(%path, after, version, "resynchronised a room at its close");
        return Ok(Bridge::Events(vec![FollowEvent::Resynchronised(closed_room(change))]));
    }
    let bridged = match source.snapshot(path).await? {
        Some(snapshot) => from_snapshot(snapshot, change),
        None => match stream_close {
            Some(close) => from_close(&close, change),
            // Lost, or not written yet: unknown either way.
            None => Bridge::Wait { redis_version: None },
        },
    };
    if let Bridge::Events(_) = &bridged {
        tracing::info!(%path, after, version, "resynchronised a room after a gap");
    }
    Ok(bridged)
}

/// The missing versions `after+1 .. version` from a room's change stream,
/// if it still holds every one of them.
fn fill_gap<C: FollowedChange>(after: u64, version: u64, fetched: Vec<C>) -> Option<Vec<C>> {
    let mut missing = Vec::new();
    let mut expected = after.saturating_add(1);
    for change in fetched {
        if change.version() >= version {
            break;
        }
        if change.version() < expected {
            continue;
        }
        if change.version() != expected {
            return None;
        }
        missing.push(change);
        expected += 1;
    }
    (expected == version).then_some(missing)
}

/// The room's hash covers the change, or is just before it; anything older
/// is a Redis that has not caught up yet.
fn from_snapshot<C: FollowedChange>(snapshot: RoomSnapshot, change: &C) -> Bridge<C> {
    if snapshot.version >= change.version() {
        Bridge::Events(vec![FollowEvent::Resynchronised(snapshot)])
    } else if snapshot.version + 1 == change.version() {
        Bridge::Events(vec![FollowEvent::Resynchronised(snapshot), FollowEvent::Change(change.clone())])
    } else {
        Bridge::Wait { redis_version: Some(snapshot.version) }
    }
}

/// No hash, and the stream ends with `close`: the room is empty at the
/// close's version. Only a close at or after the version before the change
/// tells the state the change applies to.
fn from_close<C: FollowedChange>(close: &C, change: &C) -> Bridge<C> {
    if close.version() >= change.version() {
        Bridge::Events(vec![FollowEvent::Resynchronised(closed_room(close))])
    } else if close.version() + 1 == change.version() {
        Bridge::Events(vec![FollowEvent::Resynchronised(closed_room(close)), FollowEvent::Change(change.clone())])
    } else {
        Bridge::Wait { redis_version: None }
    }
}

/// The empty room a close leaves, at the close's version.
fn closed_room(close: &impl FollowedChange) -> RoomSnapshot {
    RoomSnapshot {
        path: close.path().to_owned(),
        version: close.version(),
        modules: Default::default(),
        updated_at: close.processed_at(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::pubsub::follow::tests::{change, close, snap, PATH};
    use crate::view::ChangeRecord;

    /// Redis as the follower sees it, one state per bridging attempt (the
    /// last repeats), so a lagging or flushed Redis can catch up.
    #[derive(Default)]
    pub(in crate::pubsub::follow) struct FakeRedis {
        /// Per attempt: the room's hash and its change stream.
        pub(in crate::pubsub::follow) states: Vec<(Option<RoomSnapshot>, Vec<ChangeRecord>)>,
        /// Attempts so far (each starts with a stream read).
        pub(in crate::pubsub::follow) attempts: usize,
        pub(in crate::pubsub::follow) snapshot_reads: usize,
        pub(in crate::pubsub::follow) fail: bool,
    }

    impl FakeRedis {
        pub(in crate::pubsub::follow) fn holding(snapshot: Option<RoomSnapshot>, stream: Vec<ChangeRecord>) -> Self {
            FakeRedis { states: vec![(snapshot, stream)], ..Default::default() }
        }

        fn state(&self) -> (Option<RoomSnapshot>, Vec<ChangeRecord>) {
            let at = self.attempts.saturating_sub(1).min(self.states.len().saturating_sub(1));
            self.states.get(at).cloned().unwrap_or_default()
        }
    }

    impl RoomSource<ChangeRecord> for FakeRedis {
        async fn changes_after(&mut self, _: &str, after: u64) -> Result<Vec<ChangeRecord>, PubSubError> {
            if self.fail {
                return Err(PubSubError::Task("redis down".into()));
            }
            self.attempts += 1;
            Ok(self.state().1.into_iter().filter(|c| c.version > after).collect())
        }

        async fn snapshot(&mut self, _: &str) -> Result<Option<RoomSnapshot>, PubSubError> {
            self.snapshot_reads += 1;
            Ok(self.state().0)
        }
    }

    pub(in crate::pubsub::follow) fn run<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(future)
    }

    pub(in crate::pubsub::follow) fn shape(events: &[FollowEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                FollowEvent::Snapshot(s) => format!("snapshot {}", s.version),
                FollowEvent::Change(c) => format!("change {}", c.version),
                FollowEvent::Resynchronised(s) if s.modules.is_empty() => format!("resync {} empty", s.version),
                FollowEvent::Resynchronised(s) => format!("resync {}", s.version),
            })
            .collect()
    }

    fn stream(versions: impl IntoIterator<Item = u64>) -> Vec<ChangeRecord> {
        versions.into_iter().map(change).collect()
    }

    /// The outcome of one attempt, as text: the events' shape, or `wait <redis version>`.
    fn attempt(redis: &mut FakeRedis, after: u64, change: &ChangeRecord) -> Vec<String> {
        match run(bridge(redis, after, change)).unwrap() {
            Bridge::Events(events) => shape(&events),
            Bridge::Wait { redis_version } => vec![format!("wait {redis_version:?}")],
        }
    }

    #[test]
    fn gaps_fill_only_from_a_contiguous_stream() {
        let versions = |v: Option<Vec<ChangeRecord>>| v.map(|cs| cs.iter().map(|c| c.version).collect::<Vec<_>>());
        assert_eq!(versions(fill_gap(2, 5, stream([3, 4, 5, 6]))), Some(vec![3, 4]));
        assert_eq!(versions(fill_gap(2, 5, stream([1, 2, 3, 4]))), Some(vec![3, 4]));
        assert_eq!(versions(fill_gap(2, 5, stream([4, 5]))), None);
        assert_eq!(versions(fill_gap(2, 5, stream([3]))), None);
        assert_eq!(versions(fill_gap(2, 5, stream([3, 5]))), None);
        assert_eq!(versions(fill_gap(2, 5, Vec::new())), None);
        assert_eq!(versions(fill_gap(0, 3, stream([1, 2]))), Some(vec![1, 2]));
    }

    #[test]
    fn a_gap_is_filled_from_the_change_stream_without_reading_the_hash() {
        let mut redis = FakeRedis::holding(Some(snap(9)), stream(1..=9));
        assert_eq!(attempt(&mut redis, 4, &change(8)), ["change 5", "change 6", "change 7", "change 8"]);
        assert_eq!(attempt(&mut redis, 0, &change(3)), ["change 1", "change 2", "change 3"]);
        assert_eq!(redis.snapshot_reads, 0);
    }

    #[test]
    fn a_hash_at_or_past_the_change_covers_it() {
        let mut redis = FakeRedis::holding(Some(snap(10)), stream(9..=10));
        assert_eq!(attempt(&mut redis, 4, &change(8)), ["resync 10"]);
        let mut redis = FakeRedis::holding(Some(snap(8)), Vec::new());
        assert_eq!(attempt(&mut redis, 4, &change(8)), ["resync 8"]);
    }

    #[test]
    fn a_hash_just_before_the_change_is_followed_by_it() {
        let mut redis = FakeRedis::holding(Some(snap(7)), stream(7..=7));
        assert_eq!(attempt(&mut redis, 4, &change(8)), ["resync 7", "change 8"]);
    }

    #[test]
    fn an_older_hash_is_a_redis_still_catching_up() {
        let mut redis = FakeRedis::holding(Some(snap(5)), stream(5..=5));
        assert_eq!(attempt(&mut redis, 2, &change(8)), ["wait Some(5)"]);
    }

    #[test]
    fn a_missing_room_with_no_stream_is_unknown_not_empty() {
        // Flushed, evicted, or not written yet: nothing says what the room holds.
        let mut redis = FakeRedis::holding(None, Vec::new());
        assert_eq!(attempt(&mut redis, 0, &change(3)), ["wait None"]);
        assert_eq!(attempt(&mut redis, 2, &change(6)), ["wait None"]);
    }

    #[test]
    fn a_missing_hash_beside_a_stream_that_does_not_end_in_a_close_is_unknown() {
        // An open room's hash and stream are written together, so this is lost data.
        let mut redis = FakeRedis::holding(None, stream(3..=5));
        assert_eq!(attempt(&mut redis, 1, &change(6)), ["wait None"]);
    }

    #[test]
    fn a_room_closed_just_before_the_change_starts_empty() {
        let mut redis = FakeRedis::holding(None, vec![change(4), close(5)]);
        let Bridge::Events(events) = run(bridge(&mut redis, 2, &change(6))).unwrap() else { panic!() };
        assert_eq!(shape(&events), ["resync 5 empty", "change 6"]);
        let FollowEvent::Resynchronised(empty) = &events[0] else { panic!("{events:?}") };
        assert_eq!((empty.path.as_str(), empty.updated_at.as_str()), (PATH, "2024-01-01T00:00:01Z"));
    }

    #[test]
    fn a_room_closed_at_or_after_the_change_is_empty_at_its_close() {
        let mut redis = FakeRedis::holding(None, vec![change(6), close(7)]);
        assert_eq!(attempt(&mut redis, 2, &change(6)), ["resync 7 empty"]);
        let mut redis = FakeRedis::holding(None, vec![close(6)]);
        assert_eq!(attempt(&mut redis, 2, &change(6)), ["resync 6 empty"]);
    }

    #[test]
    fn a_close_older_than_the_version_before_the_change_is_a_lagging_reopen() {
        // Closed at 4, reopened at 5, 6 and 7: Redis has not written the reopening yet.
        let mut redis = FakeRedis::holding(None, vec![close(4)]);
        assert_eq!(attempt(&mut redis, 2, &change(7)), ["wait None"]);
    }

    #[test]
    fn a_close_is_the_empty_room_whatever_redis_holds() {
        let mut redis = FakeRedis::holding(None, Vec::new());
        assert_eq!(attempt(&mut redis, 2, &close(9)), ["resync 9 empty"]);
        let mut redis = FakeRedis::holding(Some(snap(3)), stream(3..=3));
        assert_eq!(attempt(&mut redis, 2, &close(9)), ["resync 9 empty"]);
        assert_eq!(redis.snapshot_reads, 0);
        // The stream still wins when it holds the changes before the close.
        let mut redis = FakeRedis::holding(None, vec![change(3), change(4), close(5)]);
        assert_eq!(attempt(&mut redis, 2, &close(5)), ["change 3", "change 4", "change 5"]);
    }

    #[test]
    fn a_redis_error_is_returned_for_a_retry() {
        let mut redis = FakeRedis { fail: true, ..Default::default() };
        assert!(run(bridge(&mut redis, 2, &change(5))).is_err());
    }
}
