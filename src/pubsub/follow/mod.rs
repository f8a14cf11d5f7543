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
//! [`FollowEvent::Resynchronised`]. Redis may lag, lose data or be down, so
//! a room it cannot vouch for waits, its later changes held, and is retried
//! until Redis catches up; nothing is guessed.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use prost::Message as _;
use tokio::time::Instant;

use super::{Delivery, Pattern, PubSubError, StartAt, Subscriber};
use crate::kafka::KafkaSettings;
use crate::proto::omni::StateChange;
use crate::proto::rfc3339;
use crate::view::{self, ChangeRecord, KeyLayout, RedisTarget, RoomSnapshot, ViewConnection, ViewError};
use bridge::RoomSource;
use sequence::{Sequencer, FIRST_RETRY, MAX_RETRY};

mod bridge;
mod sequence;

/// Broadcast changes decoded once and shared by several followers (the Omni
/// service's watchers), each with the size of its broadcast record. The feed
/// reports [`PubSubError::Lagged`] when its reader fell too far behind.
pub type ChangeFeed<C = ChangeRecord> = Pin<Box<dyn Stream<Item = Result<(C, usize), PubSubError>> + Send>>;

/// A change as a [`Follower`] sequences it: the little it must know of it,
/// and how to make one of a change read back from Redis to fill a gap. A
/// [`ChangeRecord`] is one; a follower that only passes changes on (the Omni
/// service's watchers) can use a form that does not parse the state.
pub trait FollowedChange: Clone + Send + 'static {
    /// The room's canonical path.
    fn path(&self) -> &str;
    /// The room's version after this change.
    fn version(&self) -> u64;
    /// The module whose state changed (`room` for a close).
    fn module(&self) -> &str;
    /// When the job folded the change, as RFC 3339 text.
    fn processed_at(&self) -> String;
    /// The change as the room's change stream in Redis holds it.
    fn from_record(record: ChangeRecord) -> Self;
}

impl FollowedChange for ChangeRecord {
    fn path(&self) -> &str {
        &self.path
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn module(&self) -> &str {
        &self.module
    }

    fn processed_at(&self) -> String {
        self.processed_at.clone()
    }

    fn from_record(record: ChangeRecord) -> Self {
        record
    }
}

/// How far back a follower starts reading the broadcast topic, by default.
/// It must cover the time between a change's commit and its Redis write.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(60);

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
pub enum FollowEvent<C = ChangeRecord> {
    /// A room's state when the follower started.
    Snapshot(RoomSnapshot),
    /// One change, at the version after the room's previous event.
    Change(C),
    /// The room's state after a gap the change stream could not fill:
    /// re-read from Redis once Redis has caught up, or, after a close, the
    /// empty room at the close's version (`updated_at` being the close's
    /// `processed_at`). The next change for the room follows on from it.
    Resynchronised(RoomSnapshot),
}

impl<C: FollowedChange> FollowEvent<C> {
    /// The room's canonical path.
    pub fn path(&self) -> &str {
        match self {
            FollowEvent::Snapshot(s) | FollowEvent::Resynchronised(s) => &s.path,
            FollowEvent::Change(c) => c.path(),
        }
    }

    /// The room's version after this event.
    pub fn version(&self) -> u64 {
        match self {
            FollowEvent::Snapshot(s) | FollowEvent::Resynchronised(s) => s.version,
            FollowEvent::Change(c) => c.version(),
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
/// // or omni::view::RedisTarget::open("redis+cluster://localhost:7000,localhost:7001")?
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
pub struct Follower<C = ChangeRecord> {
    changes: Changes<C>,
    pattern: Pattern,
    redis: RedisSource,
    sequencer: Sequencer<C>,
}

impl<C: FollowedChange> std::fmt::Debug for Follower<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("pattern", &self.pattern.to_string())
            .field("rooms", &self.sequencer.rooms())
            .field("rooms_behind", &self.sequencer.rooms_behind())
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Subscribes to `broadcast_topic` from `lookback` ago, then reads the
    /// matching rooms' snapshots from Redis. Waits for the topic to exist
    /// and for Redis to answer (retrying with back-off, logged once); bound
    /// it with `tokio::time::timeout`. Must run on a Tokio runtime. `redis`
    /// is a `redis::Client` or a [`RedisTarget`] (which may be a Redis Cluster).
    pub async fn start(
        settings: &KafkaSettings,
        broadcast_topic: &str,
        redis: impl Into<RedisTarget>,
        keys: KeyLayout,
        pattern: Pattern,
        lookback: Duration,
    ) -> Result<Follower, PubSubError> {
        let lookback_millis = i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX);
        let since = chrono::Utc::now().timestamp_millis().saturating_sub(lookback_millis);
        // Subscribing first fixes the start offsets, so no change can fall
        // between the snapshot and the stream.
        let subscriber = Subscriber::subscribe(settings, broadcast_topic, pattern, StartAt::Timestamp(since)).await?;
        let pattern = subscriber.pattern().clone();
        let follower = Follower::over(Changes::Broadcast(subscriber), pattern, redis.into(), None, keys).await?;
        tracing::debug!(topic = broadcast_topic, pattern = %follower.pattern, rooms = follower.sequencer.rooms(), "follower started");
        Ok(follower)
    }
}

impl<C: FollowedChange> Follower<C> {
    /// A follower over a shared [`ChangeFeed`] instead of a consumer of its
    /// own. The feed must already be receiving when this is called, and it
    /// should start with recent changes (as [`start`](Follower::start)'s
    /// look-back does), since Redis lags the broadcast. Reads the matching
    /// rooms' snapshots, waiting for Redis like `start`. `connection`, when
    /// given, is shared with other followers (a multiplexed connection); the
    /// follower makes one of its own from `redis` only after it fails.
    pub async fn from_feed(
        feed: ChangeFeed<C>,
        redis: RedisTarget,
        connection: Option<ViewConnection>,
        keys: KeyLayout,
        pattern: Pattern,
    ) -> Result<Follower<C>, PubSubError> {
        Follower::over(Changes::Feed(feed), pattern, redis, connection, keys).await
    }

    async fn over(
        changes: Changes<C>,
        pattern: Pattern,
        redis: RedisTarget,
        conn: Option<ViewConnection>,
        keys: KeyLayout,
    ) -> Result<Follower<C>, PubSubError> {
        let mut redis = RedisSource { client: redis, keys, conn, failing: false };
        let snapshots = redis.initial_snapshots(&pattern).await?;
        Ok(Follower { changes, pattern, redis, sequencer: Sequencer::new(snapshots) })
    }

    /// The next event: first the snapshots, then changes as they happen.
    ///
    /// A room whose gap Redis cannot bridge yet (it lags, lost the room, or
    /// is down) waits, its later changes held, while other rooms go on; it
    /// is retried with back-off until Redis catches up. One that waits over
    /// 30 s is reported once as [`PubSubError::RedisBehind`]. After an error
    /// (that one, or Kafka's), calling again continues. Cancelling a call
    /// loses nothing.
    pub async fn next(&mut self) -> Option<Result<FollowEvent<C>, PubSubError>> {
        loop {
            if let Some(reported) = self.sequencer.pop() {
                return Some(reported);
            }
            if let Some(path) = self.sequencer.due(Instant::now()) {
                self.sequencer.catch_up(&mut self.redis, &path, Instant::now()).await;
                continue;
            }
            let retry = self.sequencer.next_retry();
            let received = tokio::select! {
                received = self.changes.next() => received?,
                () = sleep_until(retry) => continue,
            };
            match received {
                Ok(Some((change, bytes))) if self.pattern.matches(change.path()) => {
                    self.sequencer.admit(change, bytes, Instant::now())
                }
                Ok(_) => {}
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// The pattern being followed.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// The version of the last event reported for a room, if any.
    pub fn known_version(&self, path: &str) -> Option<u64> {
        self.sequencer.known_version(path)
    }
}

/// Where a follower's changes come from.
enum Changes<C> {
    /// A consumer of its own on the broadcast topic.
    Broadcast(Subscriber),
    /// Changes decoded elsewhere and shared.
    Feed(ChangeFeed<C>),
}

impl<C: FollowedChange> Changes<C> {
    /// The next change with its record's size; `Ok(None)` for a record skipped as undecodable.
    async fn next(&mut self) -> Option<Result<Option<(C, usize)>, PubSubError>> {
        match self {
            Changes::Broadcast(subscriber) => Some(subscriber.next().await?.map(|delivery| match decode(&delivery) {
                Ok(change) => Some((C::from_record(change), delivery.payload.len())),
                Err(error) => {
                    tracing::warn!(%error, "skipping an undecodable broadcast record");
                    None
                }
            })),
            Changes::Feed(feed) => Some(feed.next().await?.map(Some)),
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
    let change = broadcast_change(&delivery.payload, &delivery.subject).map_err(fail)?;
    change_record(change).map_err(|e| fail(format!("state_json is not JSON: {e}")))
}

/// The change a broadcast record carries. Its key is its path: a change
/// without a path takes the key, and one whose path is another room's is
/// refused, since subscribers find a room's changes by key.
pub fn broadcast_change(payload: &[u8], key: &str) -> Result<StateChange, String> {
    let mut change = StateChange::decode(payload).map_err(|e| format!("not a StateChange: {e}"))?;
    if change.path.is_empty() {
        key.clone_into(&mut change.path);
    } else if change.path != key {
        return Err(format!("path {:?} differs from key {:?}", change.path, key));
    }
    Ok(change)
}

/// Whether an error is Redis failing to answer (down, restarting, timing
/// out, refusing), which is worth waiting out, rather than bad data.
fn is_redis_failure(error: &PubSubError) -> bool {
    matches!(error, PubSubError::Redis(_) | PubSubError::View(ViewError::Redis(_)))
}

struct RedisSource {
    client: RedisTarget,
    keys: KeyLayout,
    /// Dropped after a Redis error, because a multiplexed connection does not reconnect by itself.
    conn: Option<ViewConnection>,
    /// Whether the last read failed, so an outage is logged once, not per retry.
    failing: bool,
}

impl RedisSource {
    async fn connection(&mut self) -> Result<ViewConnection, PubSubError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let connected = self.client.connect().await.map_err(PubSubError::from);
        let conn = self.observe(connected)?;
        Ok(self.conn.insert(conn).clone())
    }

    /// Logs the first failure of an outage and the recovery, and drops a
    /// connection that failed.
    fn observe<T>(&mut self, result: Result<T, PubSubError>) -> Result<T, PubSubError> {
        match &result {
            Err(error) => {
                if is_redis_failure(error) {
                    self.conn = None;
                }
                if !self.failing {
                    self.failing = true;
                    if is_redis_failure(error) {
                        tracing::warn!(%error, "redis not reachable; waiting");
                    } else {
                        tracing::warn!(%error, "redis holds unreadable room state; waiting");
                    }
                }
            }
            Ok(_) if self.failing => {
                self.failing = false;
                tracing::info!("redis answers again");
            }
            Ok(_) => {}
        }
        result
    }

    /// The snapshots of the existing rooms matching `pattern`, waiting with
    /// back-off while Redis does not answer.
    async fn initial_snapshots(&mut self, pattern: &Pattern) -> Result<Vec<RoomSnapshot>, PubSubError> {
        let mut delay = FIRST_RETRY;
        loop {
            match self.read_initial_snapshots(pattern).await {
                Err(error) if is_redis_failure(&error) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                }
                read => return read,
            }
        }
    }

    async fn read_initial_snapshots(&mut self, pattern: &Pattern) -> Result<Vec<RoomSnapshot>, PubSubError> {
        let paths = if pattern.is_literal() {
            vec![pattern.to_string()]
        } else {
            let mut conn = self.connection().await?;
            let found = view::room_paths(&mut conn, &self.keys).await.map_err(PubSubError::from);
            self.observe(found)?.into_iter().filter(|p| pattern.matches(p)).collect()
        };
        let mut snapshots = Vec::with_capacity(paths.len());
        for path in paths {
            // A room listed a moment ago may have closed since.
            if let Some(snapshot) = self.read_snapshot(&path).await? {
                snapshots.push(snapshot);
            }
        }
        Ok(snapshots)
    }

    async fn read_snapshot(&mut self, path: &str) -> Result<Option<RoomSnapshot>, PubSubError> {
        let mut conn = self.connection().await?;
        let read = view::snapshot(&mut conn, &self.keys, path).await.map_err(PubSubError::from);
        self.observe(read)
    }
}

impl<C: FollowedChange> RoomSource<C> for RedisSource {
    async fn changes_after(&mut self, path: &str, after: u64) -> Result<Vec<C>, PubSubError> {
        let mut conn = self.connection().await?;
        let read = view::changes_after(&mut conn, &self.keys, path, after).await.map_err(PubSubError::from);
        Ok(self.observe(read)?.into_iter().map(C::from_record).collect())
    }

    async fn snapshot(&mut self, path: &str) -> Result<Option<RoomSnapshot>, PubSubError> {
        self.read_snapshot(path).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::proto::timestamp_from_millis;

    pub(super) const PATH: &str = "app/a/room/r";

    pub(super) fn change(version: u64) -> ChangeRecord {
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

    /// The room's close at `version`, as the broadcast and the change stream carry it.
    pub(super) fn close(version: u64) -> ChangeRecord {
        ChangeRecord { module: crate::modules::ROOM_MODULE.into(), state: serde_json::json!({}), ..change(version) }
    }

    pub(super) fn snap(version: u64) -> RoomSnapshot {
        RoomSnapshot {
            path: PATH.into(),
            version,
            modules: BTreeMap::from([("tags".to_owned(), serde_json::json!({ "v": version }))]),
            updated_at: "2024-01-01T00:00:01Z".into(),
        }
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
}
