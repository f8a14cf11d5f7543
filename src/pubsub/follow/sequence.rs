//! Keeps each followed room's versions contiguous. A change either follows
//! the room's last reported version, is dropped as already covered, or opens
//! a gap. A room with a gap is *behind*: its later changes are held, in
//! order, while the gap is bridged from Redis ([`bridge`]), retried with
//! back-off for as long as Redis cannot vouch for the room, and reported as
//! [`PubSubError::RedisBehind`] once that takes too long. Other rooms go on
//! meanwhile. Pure apart from the reads behind [`RoomSource`] and the clock
//! passed in, so every path is tested without Kafka or Redis.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::bridge::{bridge, Bridge, RoomSource};
use super::{FollowEvent, FollowedChange};
use crate::pubsub::PubSubError;
use crate::view::{ChangeRecord, RoomSnapshot};

/// The first wait before asking Redis again; it doubles up to [`MAX_RETRY`].
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(100);
pub(super) const MAX_RETRY: Duration = Duration::from_secs(2);
/// How long a room may wait for Redis before the follower says so.
const REPORT_BEHIND_AFTER: Duration = Duration::from_secs(30);
/// Bounds on the changes held for one behind room. Past them the oldest go:
/// the gap they leave is bridged like any other, from Redis.
const MAX_HELD_CHANGES: usize = 1_000;
const MAX_HELD_BYTES: usize = 4 << 20;

/// The version reported last for each room.
#[derive(Debug, Default)]
struct Tracker {
    known: HashMap<String, u64>,
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
}

/// A room whose next change waits for Redis.
#[derive(Debug)]
struct BehindRoom<C> {
    /// Changes from the broadcast not reported yet, oldest first, with their sizes.
    held: VecDeque<(C, usize)>,
    held_bytes: usize,
    since: Instant,
    retry_at: Instant,
    /// The wait after the next failed attempt.
    delay: Duration,
    /// Whether this wait was reported as [`PubSubError::RedisBehind`].
    reported: bool,
    /// Whether held changes were dropped during this wait (logged once).
    overflowed: bool,
}

impl<C: FollowedChange> BehindRoom<C> {
    fn new(now: Instant) -> BehindRoom<C> {
        BehindRoom {
            held: VecDeque::new(),
            held_bytes: 0,
            since: now,
            retry_at: now,
            delay: FIRST_RETRY,
            reported: false,
            overflowed: false,
        }
    }

    fn hold(&mut self, change: C, bytes: usize) {
        self.held_bytes += bytes;
        self.held.push_back((change, bytes));
        let mut dropped = 0;
        while self.held.len() > 1 && (self.held.len() > MAX_HELD_CHANGES || self.held_bytes > MAX_HELD_BYTES) {
            self.pop();
            dropped += 1;
        }
        if dropped > 0 && !self.overflowed {
            self.overflowed = true;
            let (newest, _) = self.held.back().expect("the newest change is always held");
            tracing::warn!(
                path = %newest.path(),
                version = newest.version(),
                "a room waiting for redis holds too many changes; dropping the oldest, the room will be re-read"
            );
        }
    }

    fn pop(&mut self) -> Option<C> {
        let (change, bytes) = self.held.pop_front()?;
        self.held_bytes -= bytes;
        Some(change)
    }

    fn retry_later(&mut self, now: Instant) {
        self.retry_at = now + self.delay;
        self.delay = (self.delay * 2).min(MAX_RETRY);
    }
}

/// Turns broadcast changes into a follower's events: each room's versions
/// contiguous, rooms that wait for Redis held apart.
#[derive(Debug)]
pub(super) struct Sequencer<C = ChangeRecord> {
    tracker: Tracker,
    behind: HashMap<String, BehindRoom<C>>,
    /// What to report, in order. Events go here the moment the tracker
    /// counts them, so a cancelled call loses none.
    ready: VecDeque<Result<FollowEvent<C>, PubSubError>>,
}

impl<C: FollowedChange> Sequencer<C> {
    /// Starts from the rooms' snapshots, which are reported first.
    pub(super) fn new(snapshots: Vec<RoomSnapshot>) -> Sequencer<C> {
        let mut sequencer = Sequencer { tracker: Tracker::default(), behind: HashMap::new(), ready: VecDeque::new() };
        sequencer.report(snapshots.into_iter().map(FollowEvent::Snapshot).collect());
        sequencer
    }

    /// The next event or error to report.
    pub(super) fn pop(&mut self) -> Option<Result<FollowEvent<C>, PubSubError>> {
        self.ready.pop_front()
    }

    /// The version of the last event reported for a room, if any.
    pub(super) fn known_version(&self, path: &str) -> Option<u64> {
        self.tracker.known.get(path).copied()
    }

    pub(super) fn rooms(&self) -> usize {
        self.tracker.known.len()
    }

    pub(super) fn rooms_behind(&self) -> usize {
        self.behind.len()
    }

    /// Takes a change from the broadcast (`bytes` is its size, for the
    /// bounds on held changes): reported at once when it is the room's next
    /// version and the room waits for nothing, held otherwise.
    pub(super) fn admit(&mut self, change: C, bytes: usize, now: Instant) {
        if let Some(room) = self.behind.get_mut(change.path()) {
            room.hold(change, bytes);
            return;
        }
        match self.tracker.step(change.path(), change.version()) {
            Step::Skip => {}
            Step::Next => self.report(vec![FollowEvent::Change(change)]),
            Step::Gap { after } => {
                tracing::debug!(path = %change.path(), after, version = change.version(), "a gap; waiting for redis");
                let mut room = BehindRoom::new(now);
                let path = change.path().to_owned();
                room.hold(change, bytes);
                self.behind.insert(path, room);
            }
        }
    }

    /// A behind room whose retry is due at `now`, if any.
    pub(super) fn due(&self, now: Instant) -> Option<String> {
        self.behind
            .iter()
            .filter(|(_, room)| room.retry_at <= now)
            .min_by_key(|(_, room)| room.retry_at)
            .map(|(p, _)| p.clone())
    }

    /// When the next behind room is due.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.behind.values().map(|room| room.retry_at).min()
    }

    /// Reports as much of a behind room's held changes as Redis lets it
    /// bridge now (`now` being the time of the attempt), and schedules the
    /// next attempt for the rest. State changes only between reads, so
    /// cancelling loses nothing.
    pub(super) async fn catch_up<S: RoomSource<C>>(&mut self, source: &mut S, path: &str, now: Instant) {
        loop {
            let Some(room) = self.behind.get_mut(path) else { return };
            let Some((front, _)) = room.held.front() else {
                tracing::debug!(path, "a room caught up with redis");
                self.behind.remove(path);
                return;
            };
            let after = match self.tracker.step(path, front.version()) {
                Step::Skip => {
                    room.pop();
                    continue;
                }
                Step::Next => {
                    let next = room.pop().into_iter().map(FollowEvent::Change).collect();
                    self.report(next);
                    continue;
                }
                Step::Gap { after } => after,
            };
            match bridge(source, after, front).await {
                Ok(Bridge::Events(events)) => {
                    room.pop();
                    self.report(events);
                }
                Ok(Bridge::Wait { redis_version }) => return self.wait(path, redis_version, now),
                Err(error) => {
                    // The source logs failures once per outage.
                    tracing::debug!(path, %error, "bridging a gap failed; retrying");
                    return self.wait(path, None, now);
                }
            }
        }
    }

    /// Schedules a behind room's next attempt, and reports it once it has
    /// waited too long.
    fn wait(&mut self, path: &str, redis_version: Option<u64>, now: Instant) {
        let Some(room) = self.behind.get_mut(path) else { return };
        room.retry_later(now);
        let waited = now.saturating_duration_since(room.since);
        if waited < REPORT_BEHIND_AFTER || room.reported {
            return;
        }
        room.reported = true;
        let version = room.held.back().map_or(0, |(change, _)| change.version());
        tracing::warn!(path, version, ?redis_version, ?waited, "redis stays behind a room; still waiting");
        let error = PubSubError::RedisBehind { path: path.to_owned(), version, redis_version, waited };
        self.ready.push_back(Err(error));
    }

    fn report(&mut self, events: Vec<FollowEvent<C>>) {
        for event in events {
            self.tracker.known.insert(event.path().to_owned(), event.version());
            self.ready.push_back(Ok(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::modules::ROOM_MODULE;
    use crate::pubsub::follow::bridge::tests::{run, shape, FakeRedis};
    use crate::pubsub::follow::tests::{change, close, snap, PATH};
    use proptest::prelude::*;

    const OTHER: &str = "app/a/room/other";

    /// Every attempt that is due at `now`, as the follower makes them.
    fn attempt_due(sequencer: &mut Sequencer, redis: &mut FakeRedis, now: Instant) {
        while let Some(path) = sequencer.due(now) {
            run(sequencer.catch_up(redis, &path, now));
        }
    }

    /// What is ready to report, as text.
    fn drain(sequencer: &mut Sequencer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(reported) = sequencer.pop() {
            match reported {
                Ok(event) => out.extend(shape(&[event])),
                Err(PubSubError::RedisBehind { version, redis_version, .. }) => {
                    out.push(format!("behind {version} redis {redis_version:?}"))
                }
                Err(error) => out.push(format!("error {error}")),
            }
        }
        out
    }

    /// A follower that started from Redis showing the room at `version`.
    fn started_at(version: u64) -> Sequencer {
        let mut sequencer = Sequencer::new(vec![snap(version)]);
        assert_eq!(drain(&mut sequencer), [format!("snapshot {version}")]);
        sequencer
    }

    #[test]
    fn steps_follow_the_known_version() {
        let mut tracker = Tracker::default();
        tracker.known.insert(PATH.into(), 5);
        assert_eq!(tracker.step(PATH, 4), Step::Skip);
        assert_eq!(tracker.step(PATH, 5), Step::Skip);
        assert_eq!(tracker.step(PATH, 6), Step::Next);
        assert_eq!(tracker.step(PATH, 9), Step::Gap { after: 5 });
        assert_eq!(tracker.step("app/a/room/new", 1), Step::Next);
        assert_eq!(tracker.step("app/a/room/new", 3), Step::Gap { after: 0 });
        assert_eq!(tracker.step("app/a/room/new", 0), Step::Skip);
    }

    #[test]
    fn the_next_version_passes_at_once_and_old_ones_are_dropped() {
        let mut sequencer = started_at(4);
        let now = Instant::now();
        for version in [3, 4, 5, 5, 6] {
            sequencer.admit(change(version), 1, now);
        }
        assert_eq!(drain(&mut sequencer), ["change 5", "change 6"]);
        assert_eq!((sequencer.rooms_behind(), sequencer.next_retry()), (0, None));
        assert_eq!(sequencer.known_version(PATH), Some(6));
    }

    #[test]
    fn a_room_with_a_gap_waits_without_holding_up_other_rooms() {
        let mut sequencer = started_at(2);
        let mut redis = FakeRedis::holding(Some(snap(5)), Vec::new());
        let now = Instant::now();
        sequencer.admit(change(8), 1, now);
        attempt_due(&mut sequencer, &mut redis, now);
        sequencer.admit(change(9), 1, now);
        sequencer.admit(ChangeRecord { path: OTHER.into(), ..change(1) }, 1, now);
        assert_eq!(drain(&mut sequencer), ["change 1"]);
        assert_eq!(sequencer.known_version(OTHER), Some(1));
        assert_eq!(sequencer.known_version(PATH), Some(2), "nothing of the waiting room is reported");
        assert_eq!(sequencer.rooms_behind(), 1);
    }

    #[test]
    fn a_lagging_redis_is_retried_until_it_catches_up_and_held_changes_follow_in_order() {
        let mut sequencer = started_at(2);
        let lagging = (Some(snap(5)), Vec::new());
        let mut redis = FakeRedis {
            states: vec![lagging.clone(), lagging.clone(), lagging, (Some(snap(7)), Vec::new())],
            ..Default::default()
        };
        let t0 = Instant::now();
        sequencer.admit(change(8), 1, t0);
        attempt_due(&mut sequencer, &mut redis, t0);
        for version in 9..=10 {
            sequencer.admit(change(version), 1, t0);
        }
        let mut now = t0;
        while let Some(at) = sequencer.next_retry() {
            assert_eq!(drain(&mut sequencer), Vec::<String>::new());
            now = at;
            attempt_due(&mut sequencer, &mut redis, now);
        }
        assert_eq!(drain(&mut sequencer), ["resync 7", "change 8", "change 9", "change 10"]);
        assert_eq!(redis.attempts, 4);
        assert_eq!(now - t0, Duration::from_millis(100 + 200 + 400));
        assert_eq!(sequencer.rooms_behind(), 0);
    }

    #[test]
    fn retries_back_off_from_a_tenth_of_a_second_to_two_seconds() {
        let mut sequencer = started_at(2);
        let mut redis = FakeRedis::holding(Some(snap(5)), Vec::new());
        let t0 = Instant::now();
        sequencer.admit(change(8), 1, t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..7 {
            attempt_due(&mut sequencer, &mut redis, now);
            let at = sequencer.next_retry().unwrap();
            waits.push((at - now).as_millis());
            now = at;
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn a_room_redis_leaves_behind_for_long_is_reported_once_and_still_caught_up() {
        let mut sequencer = started_at(2);
        let behind = (Some(snap(5)), Vec::new());
        let mut redis = FakeRedis { states: vec![behind; 40], ..Default::default() };
        redis.states.push((Some(snap(9)), Vec::new()));
        let t0 = Instant::now();
        sequencer.admit(change(8), 1, t0);
        sequencer.admit(change(9), 1, t0);
        let mut reported = Vec::new();
        while let Some(at) = sequencer.next_retry() {
            attempt_due(&mut sequencer, &mut redis, at);
            reported.extend(drain(&mut sequencer).into_iter().map(|r| (r, (at - t0).as_secs())));
        }
        let (texts, seconds): (Vec<String>, Vec<u64>) = reported.into_iter().unzip();
        assert_eq!(texts, ["behind 9 redis Some(5)", "resync 9"]);
        assert!((30..=32).contains(&seconds[0]), "reported after {} s", seconds[0]);
    }

    #[test]
    fn a_redis_error_keeps_the_room_waiting_and_loses_nothing() {
        let mut sequencer = started_at(2);
        let mut redis = FakeRedis { fail: true, ..FakeRedis::holding(Some(snap(7)), Vec::new()) };
        let now = Instant::now();
        sequencer.admit(change(8), 1, now);
        attempt_due(&mut sequencer, &mut redis, now);
        assert_eq!(drain(&mut sequencer), Vec::<String>::new());
        assert_eq!(sequencer.rooms_behind(), 1);
        redis.fail = false;
        let retry = sequencer.next_retry().unwrap();
        attempt_due(&mut sequencer, &mut redis, retry);
        assert_eq!(drain(&mut sequencer), ["resync 7", "change 8"]);
    }

    #[test]
    fn a_room_waiting_too_long_keeps_only_its_newest_changes() {
        let mut sequencer = started_at(2);
        let mut redis = FakeRedis::holding(Some(snap(3)), Vec::new());
        let now = Instant::now();
        let newest = 10 + MAX_HELD_CHANGES as u64 + 5;
        for version in 10..=newest {
            sequencer.admit(change(version), 1, now);
        }
        let room = &sequencer.behind[PATH];
        assert_eq!(room.held.len(), MAX_HELD_CHANGES);
        assert_eq!(room.held.front().unwrap().0.version, newest + 1 - MAX_HELD_CHANGES as u64);
        // A huge change pushes out everything before it, but is kept itself.
        sequencer.admit(change(newest + 1), MAX_HELD_BYTES + 1, now);
        assert_eq!(sequencer.behind[PATH].held.len(), 1);
        redis.states.push((Some(snap(newest + 1)), Vec::new()));
        attempt_due(&mut sequencer, &mut redis, now);
        let retry = sequencer.next_retry().unwrap();
        attempt_due(&mut sequencer, &mut redis, retry);
        assert_eq!(drain(&mut sequencer), [format!("resync {}", newest + 1)]);
    }

    #[test]
    fn a_late_joiner_drops_what_its_snapshot_covers() {
        // The processor committed 3..=8; Redis shows 6 when the follower reads it.
        let mut sequencer = started_at(6);
        let mut redis = FakeRedis::holding(Some(snap(6)), (1..=6).map(change).collect());
        let now = Instant::now();
        for version in 3..=8 {
            sequencer.admit(change(version), 1, now);
            attempt_due(&mut sequencer, &mut redis, now);
        }
        assert_eq!(drain(&mut sequencer), ["change 7", "change 8"]);
        assert_eq!(redis.attempts, 0, "no gap, no Redis read");
    }

    /// A room's history: versions 1..=latest, one of them maybe a close.
    fn history(latest: u64, close_at: Option<u64>) -> Vec<ChangeRecord> {
        (1..=latest).map(|v| if Some(v) == close_at { close(v) } else { change(v) }).collect()
    }

    /// The room's true modules at `version`.
    fn true_state(history: &[ChangeRecord], version: u64) -> BTreeMap<String, serde_json::Value> {
        let mut modules = BTreeMap::new();
        for c in history.iter().take_while(|c| c.version <= version) {
            if c.module == ROOM_MODULE {
                modules.clear();
            } else {
                modules.insert(c.module.clone(), c.state.clone());
            }
        }
        modules
    }

    /// What Redis holds once it has written `version`: no hash after a
    /// close, and the last `cap` changes in the stream.
    fn redis_at(history: &[ChangeRecord], version: u64, cap: u64) -> (Option<RoomSnapshot>, Vec<ChangeRecord>) {
        let closed = version == 0 || history[version as usize - 1].module == ROOM_MODULE;
        let hash = (!closed).then(|| RoomSnapshot { modules: true_state(history, version), ..snap(version) });
        let stream = history.iter().filter(|c| c.version <= version && c.version + cap > version).cloned().collect();
        (hash, stream)
    }

    /// Applies events as a consumer would, checking the follower's promises:
    /// per room, each change is the version after the previous event, a
    /// resync only moves forward, and every state shown is the true one.
    fn apply(
        events: &[FollowEvent],
        history: &[ChangeRecord],
    ) -> Result<(u64, BTreeMap<String, serde_json::Value>), TestCaseError> {
        let (mut version, mut view) = (0, BTreeMap::new());
        for (i, event) in events.iter().enumerate() {
            match event {
                FollowEvent::Snapshot(s) | FollowEvent::Resynchronised(s) => {
                    prop_assert!(i == 0 || s.version > version, "backwards in {:?}", shape(events));
                    prop_assert!(i == 0 || matches!(event, FollowEvent::Resynchronised(_)), "{:?}", shape(events));
                    prop_assert_eq!(&s.modules, &true_state(history, s.version), "state at {}", s.version);
                    (version, view) = (s.version, s.modules.clone());
                }
                FollowEvent::Change(c) => {
                    prop_assert_eq!(c.version, version + 1, "in {:?}", shape(events));
                    if c.module == ROOM_MODULE {
                        view.clear();
                    } else {
                        view.insert(c.module.clone(), c.state.clone());
                    }
                    version = c.version;
                }
            }
        }
        Ok((version, view))
    }

    proptest! {
        /// Redis starts at `start` (lagging, flushed, or closed there) and
        /// writes `latest` after `lag_attempts` attempts; Kafka delivers some
        /// of the versions up to `latest`, in order, from the look-back point on.
        #[test]
        fn versions_stay_contiguous_and_true_whatever_kafka_and_redis_hold(
            latest in 1u64..30,
            start_lag in 0u64..30,
            flushed in any::<bool>(),
            close_at in prop::option::of(1u64..30),
            cap in 1u64..10,
            lag_attempts in 0usize..6,
            lookback in 0u64..30,
            drops in prop::collection::vec(any::<bool>(), 30),
        ) {
            let history = history(latest, close_at);
            let start = latest.saturating_sub(start_lag);
            let initial = if flushed { (None, Vec::new()) } else { redis_at(&history, start, cap) };
            let mut redis = FakeRedis { states: vec![initial.clone(); lag_attempts], ..Default::default() };
            redis.states.push(redis_at(&history, latest, cap));
            let mut sequencer = Sequencer::new(initial.0.into_iter().collect());
            let mut now = Instant::now();
            for v in latest.saturating_sub(lookback).max(1)..=latest {
                if drops[v as usize % drops.len()] && v != latest {
                    continue;
                }
                sequencer.admit(history[v as usize - 1].clone(), 1, now);
                attempt_due(&mut sequencer, &mut redis, now);
                now += Duration::from_millis(50);
            }
            while let Some(at) = sequencer.next_retry() {
                now = at;
                attempt_due(&mut sequencer, &mut redis, now);
            }
            let events: Vec<FollowEvent> = std::iter::from_fn(|| sequencer.pop()).map(Result::unwrap).collect();
            let (version, view) = apply(&events, &history)?;
            prop_assert_eq!(version, latest);
            prop_assert_eq!(view, true_state(&history, latest));
        }
    }
}
