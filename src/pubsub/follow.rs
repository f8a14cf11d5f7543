//! Late joiners: the current state of matching rooms, then every change to
//! them, with each room's versions contiguous.
//!
//! The state lives in two places that are updated at different moments: the
//! broadcast topic gets a change when the processor's Kafka transaction
//! commits, and Redis only afterwards. A [`Follower`] therefore subscribes
//! to the topic a little in the past *before* reading Redis, and drops the
//! changes the snapshot already covers. When a room's versions jump (the
//! look-back did not reach far enough, or the room was first seen mid-way),
//! the missing versions come from the room's Redis change stream, or, when
//! that no longer holds them, the room is re-read and announced as
//! [`FollowEvent::Resynchronised`].

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use prost::Message as _;
use redis::aio::MultiplexedConnection;

use super::{Delivery, Pattern, PubSubError, StartAt, Subscriber};
use crate::kafka::KafkaSettings;
use crate::proto::omni::StateChange;
use crate::proto::rfc3339;
use crate::view::{self, ChangeRecord, KeyLayout, RoomSnapshot, ViewError};

/// How far back a follower starts reading the broadcast topic, by default.
/// It must cover the time between a change's commit and its Redis write.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(60);

/// How long to wait before retrying a change whose Redis reads failed.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// One thing a [`Follower`] reports.
///
/// Serialises as JSON with a `"type"` tag and the fields of the snapshot or
/// change beside it:
///
/// ```
/// use omni::pubsub::FollowEvent;
/// use omni::view::ChangeRecord;
///
/// let event = FollowEvent::Change(ChangeRecord {
///     path: "app/a/room/r".into(),
///     version: 3,
///     module: "tags".into(),
///     state: serde_json::json!({"topic": "rust"}),
///     cause_event_id: "e1".into(),
///     occurred_at: "2024-01-01T00:00:00Z".into(),
///     processed_at: "2024-01-01T00:00:01Z".into(),
/// });
/// let json = serde_json::to_string(&event).unwrap();
/// assert!(json.starts_with(r#"{"type":"change","path":"app/a/room/r","version":3,"module":"tags""#));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FollowEvent {
    /// A room's state when the follower started.
    Snapshot(RoomSnapshot),
    /// One change, at the version after the room's previous event.
    Change(ChangeRecord),
    /// The room's state re-read after a gap that could not be filled; the
    /// next change for the room follows on from this version.
    Resynchronised(RoomSnapshot),
}

impl FollowEvent {
    /// The room's canonical path.
    pub fn path(&self) -> &str {
        match self {
            FollowEvent::Snapshot(s) | FollowEvent::Resynchronised(s) => &s.path,
            FollowEvent::Change(c) => &c.path,
        }
    }

    /// The room's version after this event.
    pub fn version(&self) -> u64 {
        match self {
            FollowEvent::Snapshot(s) | FollowEvent::Resynchronised(s) => s.version,
            FollowEvent::Change(c) => c.version,
        }
    }
}

/// The [`ChangeRecord`] of a broadcast `StateChange`: the state parsed as
/// JSON, the timestamps as RFC 3339.
///
/// ```
/// use omni::proto::omni::StateChange;
/// use omni::pubsub::change_record;
///
/// let change = StateChange { path: "app/a/room/r".into(), version: 2, module: "tags".into(),
///     state_json: r#"{"k":"v"}"#.into(), ..Default::default() };
/// let record = change_record(change).unwrap();
/// assert_eq!(record.state["k"], "v");
/// assert_eq!(record.occurred_at, "1970-01-01T00:00:00Z");
/// ```
pub fn change_record(change: StateChange) -> Result<ChangeRecord, serde_json::Error> {
    // Proto3 cannot tell an unset string from "", and a cleared module is "{}".
    let state = if change.state_json.is_empty() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_str(&change.state_json)?
    };
    Ok(ChangeRecord {
        occurred_at: rfc3339(change.occurred_at.as_ref()),
        processed_at: rfc3339(change.processed_at.as_ref()),
        path: change.path,
        version: change.version,
        module: change.module,
        state,
        cause_event_id: change.cause_event_id,
    })
}

/// Follows the state of the rooms matching a pattern: a snapshot of each
/// existing room, then its changes, without losing or repeating a version.
///
/// ```no_run
/// use omni::kafka::KafkaSettings;
/// use omni::pubsub::{Follower, Pattern, DEFAULT_LOOKBACK};
/// use omni::view::KeyLayout;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = KafkaSettings::with_brokers("localhost:9094");
/// let redis = redis::Client::open("redis://localhost:6379")?;
/// let pattern = Pattern::parse("app/a1/room/*")?;
/// let mut follower =
///     Follower::start(&settings, "omni.broadcast", redis, KeyLayout::default(), pattern, DEFAULT_LOOKBACK).await?;
/// while let Some(event) = follower.next().await {
///     println!("{}", serde_json::to_string(&event?)?);
/// }
/// # Ok(())
/// # }
/// ```
pub struct Follower {
    subscriber: Subscriber,
    redis: RedisSource,
    tracker: Tracker,
    lag: LagPolicy,
    ready: VecDeque<FollowEvent>,
    /// The change being settled; kept across errors and cancellations so it is retried, not lost.
    in_flight: Option<ChangeRecord>,
    failed: bool,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("subscriber", &self.subscriber)
            .field("rooms", &self.tracker.known.len())
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Subscribes to `broadcast_topic` from `lookback` ago, then reads the
    /// matching rooms' snapshots from Redis. Waits for the topic to exist;
    /// bound it with `tokio::time::timeout`. Must run on a Tokio runtime.
    pub async fn start(
        settings: &KafkaSettings,
        broadcast_topic: &str,
        redis: redis::Client,
        keys: KeyLayout,
        pattern: Pattern,
        lookback: Duration,
    ) -> Result<Follower, PubSubError> {
        let lookback_millis = i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX);
        let since = chrono::Utc::now().timestamp_millis().saturating_sub(lookback_millis);
        // Subscribing first fixes the start offsets, so no change can fall
        // between the snapshot and the stream.
        let subscriber = Subscriber::subscribe(settings, broadcast_topic, pattern, StartAt::Timestamp(since)).await?;
        let mut redis = RedisSource { client: redis, keys, conn: None };
        let snapshots = redis.initial_snapshots(subscriber.pattern()).await?;
        tracing::debug!(topic = broadcast_topic, pattern = %subscriber.pattern(), rooms = snapshots.len(), "follower started");
        let ready: VecDeque<FollowEvent> = snapshots.into_iter().map(FollowEvent::Snapshot).collect();
        let mut tracker = Tracker::default();
        tracker.record(ready.iter());
        Ok(Follower { subscriber, redis, tracker, lag: LagPolicy::DEFAULT, ready, in_flight: None, failed: false })
    }

    /// The next event: first the snapshots, then changes as they happen.
    ///
    /// After an error (Kafka or Redis), calling again retries; a change
    /// whose gap could not be repaired yet is kept and retried, so no
    /// version is skipped. Cancelling a call loses nothing.
    pub async fn next(&mut self) -> Option<Result<FollowEvent, PubSubError>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            if self.in_flight.is_none() {
                let delivery = match self.subscriber.next().await? {
                    Ok(delivery) => delivery,
                    Err(error) => return Some(Err(error)),
                };
                match decode(&delivery) {
                    Ok(change) if self.subscriber.pattern().matches(&change.path) => self.in_flight = Some(change),
                    Ok(_) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "skipping an undecodable broadcast record");
                        continue;
                    }
                }
            } else if self.failed {
                tokio::time::sleep(RETRY_DELAY).await;
            }
            let Some(change) = self.in_flight.as_ref() else {
                continue;
            };
            match settle(&self.tracker, &mut self.redis, change, self.lag).await {
                Ok(events) => {
                    self.tracker.record(events.iter());
                    self.ready.extend(events);
                    self.in_flight = None;
                    self.failed = false;
                }
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error));
                }
            }
        }
    }

    /// The pattern being followed.
    pub fn pattern(&self) -> &Pattern {
        self.subscriber.pattern()
    }

    /// The version of the last event reported for a room, if any.
    pub fn known_version(&self, path: &str) -> Option<u64> {
        self.tracker.known.get(path).copied()
    }
}

/// Decodes a broadcast record; its key and its `path` must agree.
fn decode(delivery: &Delivery) -> Result<ChangeRecord, PubSubError> {
    let fail = |reason: String| PubSubError::Decode {
        topic: delivery.topic.clone(),
        partition: delivery.partition,
        offset: delivery.offset,
        reason,
    };
    let mut change =
        StateChange::decode(delivery.payload.as_slice()).map_err(|e| fail(format!("not a StateChange: {e}")))?;
    if change.path.is_empty() {
        change.path.clone_from(&delivery.subject);
    } else if change.path != delivery.subject {
        return Err(fail(format!("path {:?} differs from key {:?}", change.path, delivery.subject)));
    }
    change_record(change).map_err(|e| fail(format!("state_json is not JSON: {e}")))
}

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

    /// Remembers the versions of reported events, in order.
    fn record<'a>(&mut self, events: impl IntoIterator<Item = &'a FollowEvent>) {
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
struct LagPolicy {
    retries: u32,
    delay: Duration,
}

impl LagPolicy {
    const DEFAULT: LagPolicy = LagPolicy { retries: 10, delay: Duration::from_millis(100) };
}

/// The Redis reads gap repair needs; a trait so the repair logic can be
/// tested without Redis.
trait RoomSource {
    async fn changes_after(&mut self, path: &str, after: u64) -> Result<Vec<ChangeRecord>, PubSubError>;
    async fn snapshot(&mut self, path: &str) -> Result<Option<RoomSnapshot>, PubSubError>;
}

/// The events that bring `change` onto its room's contiguous sequence.
/// Touches no state, so a failure or cancellation can simply retry.
async fn settle<S: RoomSource>(
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

struct RedisSource {
    client: redis::Client,
    keys: KeyLayout,
    /// Dropped after a Redis error, because a multiplexed connection does not reconnect by itself.
    conn: Option<MultiplexedConnection>,
}

async fn connect<'a>(
    client: &redis::Client,
    slot: &'a mut Option<MultiplexedConnection>,
) -> Result<&'a mut MultiplexedConnection, PubSubError> {
    let conn = match slot.take() {
        Some(conn) => conn,
        None => client.get_multiplexed_async_connection().await?,
    };
    Ok(slot.insert(conn))
}

impl RedisSource {
    fn keep<T>(&mut self, result: Result<T, ViewError>) -> Result<T, PubSubError> {
        if let Err(ViewError::Redis(_)) = &result {
            self.conn = None;
        }
        Ok(result?)
    }

    /// The snapshots of the existing rooms matching `pattern`.
    async fn initial_snapshots(&mut self, pattern: &Pattern) -> Result<Vec<RoomSnapshot>, PubSubError> {
        let paths = if pattern.is_literal() {
            vec![pattern.to_string()]
        } else {
            let conn = connect(&self.client, &mut self.conn).await?;
            let found = view::room_paths(conn, &self.keys).await;
            self.keep(found)?.into_iter().filter(|p| pattern.matches(p)).collect()
        };
        let mut snapshots = Vec::with_capacity(paths.len());
        for path in paths {
            // A room listed a moment ago may have closed since.
            if let Some(snapshot) = self.snapshot(&path).await? {
                snapshots.push(snapshot);
            }
        }
        Ok(snapshots)
    }
}

impl RoomSource for RedisSource {
    async fn changes_after(&mut self, path: &str, after: u64) -> Result<Vec<ChangeRecord>, PubSubError> {
        let conn = connect(&self.client, &mut self.conn).await?;
        let result = view::changes_after(conn, &self.keys, path, after).await;
        self.keep(result)
    }

    async fn snapshot(&mut self, path: &str) -> Result<Option<RoomSnapshot>, PubSubError> {
        let conn = connect(&self.client, &mut self.conn).await?;
        let result = view::snapshot(conn, &self.keys, path).await;
        self.keep(result)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::proto::timestamp_from_millis;
    use proptest::prelude::*;

    const PATH: &str = "app/a/room/r";

    fn change(version: u64) -> ChangeRecord {
        ChangeRecord {
            path: PATH.into(),
            version,
            module: "tags".into(),
            state: serde_json::json!({ "v": version }),
            cause_event_id: format!("e{version}"),
            occurred_at: "2024-01-01T00:00:00Z".into(),
            processed_at: "2024-01-01T00:00:01Z".into(),
        }
    }

    fn snap(version: u64) -> RoomSnapshot {
        RoomSnapshot {
            path: PATH.into(),
            version,
            modules: BTreeMap::from([("tags".to_owned(), serde_json::json!({ "v": version }))]),
            updated_at: "2024-01-01T00:00:01Z".into(),
        }
    }

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
    fn a_state_change_becomes_a_change_record() {
        let message = StateChange {
            path: PATH.into(),
            version: 3,
            module: "recording".into(),
            state_json: r#"{"active":true}"#.into(),
            cause_event_id: "e9".into(),
            occurred_at: Some(timestamp_from_millis(1_704_067_200_000)),
            processed_at: Some(timestamp_from_millis(1_704_067_200_250)),
        };
        let record = change_record(message.clone()).unwrap();
        assert_eq!(
            record,
            ChangeRecord {
                path: PATH.into(),
                version: 3,
                module: "recording".into(),
                state: serde_json::json!({ "active": true }),
                cause_event_id: "e9".into(),
                occurred_at: "2024-01-01T00:00:00Z".into(),
                processed_at: "2024-01-01T00:00:00.250Z".into(),
            }
        );
        let cleared = change_record(StateChange { state_json: String::new(), ..message.clone() }).unwrap();
        assert_eq!(cleared.state, serde_json::json!({}));
        assert!(change_record(StateChange { state_json: "{not json".into(), ..message }).is_err());
    }

    #[test]
    fn broadcast_records_are_decoded_and_checked_against_their_key() {
        let message = StateChange { path: PATH.into(), version: 1, state_json: "{}".into(), ..Default::default() };
        let delivery = Delivery {
            subject: PATH.into(),
            topic: "omni.broadcast".into(),
            partition: 0,
            offset: 7,
            timestamp_millis: None,
            payload: message.encode_to_vec(),
            content_type: None,
        };
        assert_eq!(decode(&delivery).unwrap().version, 1);
        let unnamed = StateChange { path: String::new(), ..message.clone() };
        assert_eq!(decode(&Delivery { payload: unnamed.encode_to_vec(), ..delivery.clone() }).unwrap().path, PATH);
        let other = Delivery { subject: "app/a/room/other".into(), ..delivery.clone() };
        assert!(matches!(decode(&other), Err(PubSubError::Decode { offset: 7, .. })));
        let garbage = Delivery { payload: vec![0xff, 0xff, 0xff], ..delivery.clone() };
        assert!(decode(&garbage).unwrap_err().to_string().contains("not a StateChange"));
        let bad_json = StateChange { state_json: "[".into(), ..message };
        assert!(decode(&Delivery { payload: bad_json.encode_to_vec(), ..delivery }).is_err());
    }

    #[test]
    fn events_serialise_with_a_type_tag_and_flat_fields() {
        let json = |e: &FollowEvent| serde_json::to_value(e).unwrap();
        assert_eq!(
            json(&FollowEvent::Change(change(3))),
            serde_json::json!({
                "type": "change", "path": PATH, "version": 3, "module": "tags", "state": { "v": 3 },
                "cause_event_id": "e3", "occurred_at": "2024-01-01T00:00:00Z", "processed_at": "2024-01-01T00:00:01Z",
            })
        );
        let snapshot = serde_json::json!({
            "path": PATH, "version": 2, "tags": { "v": 2 }, "updated_at": "2024-01-01T00:00:01Z",
        });
        let mut tagged = snapshot.clone();
        tagged["type"] = "snapshot".into();
        assert_eq!(json(&FollowEvent::Snapshot(snap(2))), tagged);
        tagged["type"] = "resynchronised".into();
        assert_eq!(json(&FollowEvent::Resynchronised(snap(2))), tagged);
        let text = serde_json::to_string(&FollowEvent::Change(change(3))).unwrap();
        assert!(
            text.starts_with(r#"{"type":"change","path":"app/a/room/r","version":3,"module":"tags","state":{"v":3}"#),
            "{text}"
        );
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
