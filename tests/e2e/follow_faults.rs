//! Late joiners against a Redis that loses data, lags the broadcast or is
//! down. Each test runs the job against a Redis of its own, so flushing,
//! pausing or stopping it disturbs no other test. A follower must never
//! report a room wrongly, nor stay stale once Redis is back: its view,
//! built from its events alone, ends equal to Redis and to the model.

use std::collections::BTreeMap;
use std::time::Duration;

use omni::modules::{Registry, RoomFolder, ROOM_MODULE};
use omni::proto::tecate::{room_event::Kind, RecordingStarted, RoomEvent, TagSet};
use omni::pubsub::{FollowEvent, Follower, Pattern};
use omni::topology::Topology;
use omni::view::KeyLayout;

use crate::common::*;

const ROOM: &str = "app/ff/room/r";

fn tag(id: usize, key: &str, value: &str) -> (String, RoomEvent) {
    let kind = Kind::TagSet(TagSet { key: key.into(), value: value.into() });
    (ROOM.to_owned(), event(id, 1_795_773_600_000 + id as i64, kind))
}

fn recording(id: usize) -> (String, RoomEvent) {
    let kind = Kind::RecordingStarted(RecordingStarted { recording_id: "rec1".into(), started_by: "u7".into() });
    (ROOM.to_owned(), event(id, 1_795_773_600_000 + id as i64, kind))
}

/// A topology whose job writes to `redis` instead of the shared Redis.
async fn topology_on(name: &str, dir: &std::path::Path, redis: &ScratchRedis) -> Topology {
    let mut topology = fresh_topology(name, 2, &dir.join("state"));
    topology.redis.url = redis.url("");
    create_input(&topology).await;
    topology
}

async fn start_follower(topology: &Topology, pattern: &str, lookback: Duration) -> Follower {
    let redis = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let started = Follower::start(
        &topology.kafka,
        &topology.broadcast_topic,
        redis,
        keys,
        Pattern::parse(pattern).unwrap(),
        lookback,
    );
    tokio::time::timeout(Duration::from_secs(60), started).await.expect("the follower starts within 60 s").unwrap()
}

/// The room as a follower's events describe it, checked as they arrive:
/// a snapshot only first, each change the version after the previous
/// event, a resync only forward.
#[derive(Debug, Default)]
struct View {
    version: u64,
    modules: BTreeMap<String, serde_json::Value>,
    seen: Vec<String>,
}

impl View {
    fn apply(&mut self, event: &FollowEvent) {
        assert_eq!(event.path(), ROOM, "only the room is followed");
        match event {
            FollowEvent::Snapshot(s) => {
                assert!(self.seen.is_empty(), "a snapshot after {:?}", self.seen);
                (self.version, self.modules) = (s.version, s.modules.clone());
            }
            FollowEvent::Resynchronised(s) => {
                assert!(s.version > self.version, "resynchronised backwards to {} after {:?}", s.version, self.seen);
                (self.version, self.modules) = (s.version, s.modules.clone());
            }
            FollowEvent::Change(c) => {
                assert_eq!(c.version, self.version + 1, "versions are contiguous; saw {:?}", self.seen);
                if c.module == ROOM_MODULE {
                    self.modules.clear();
                } else {
                    self.modules.insert(c.module.clone(), c.state.clone());
                }
                self.version = c.version;
            }
        }
        self.seen.push(describe(event));
    }
}

fn describe(event: &FollowEvent) -> String {
    match event {
        FollowEvent::Snapshot(s) => format!("snapshot {}", s.version),
        FollowEvent::Change(c) => format!("change {}", c.version),
        FollowEvent::Resynchronised(s) => format!("resync {} {:?}", s.version, s.modules.keys().collect::<Vec<_>>()),
    }
}

/// Reads the follower until its events bring the room to `version`.
async fn follow_to(follower: &mut Follower, view: &mut View, version: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while view.version < version {
        match tokio::time::timeout_at(deadline, follower.next()).await {
            Ok(Some(Ok(event))) => view.apply(&event),
            Ok(Some(Err(e))) => panic!("follower error: {e}; saw {:?}", view.seen),
            Ok(None) => panic!("the follower ended; saw {:?}", view.seen),
            Err(_) => panic!("the follower did not reach version {version}; saw {:?}", view.seen),
        }
    }
}

/// Everything the follower reports within `window` (nothing, when it must wait).
async fn follow_for(follower: &mut Follower, view: &mut View, window: Duration) {
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(next) = tokio::time::timeout_at(deadline, follower.next()).await {
        match next {
            Some(Ok(event)) => view.apply(&event),
            other => panic!("follower: {other:?}; saw {:?}", view.seen),
        }
    }
}

/// The follower's view equals the room in Redis, which equals the model;
/// and the follower reports nothing more.
async fn assert_view_exact(
    follower: &mut Follower,
    view: &mut View,
    topology: &Topology,
    folder: &RoomFolder,
    events: &[(String, RoomEvent)],
) {
    let expected = model(folder, events);
    let state = &expected.rooms[ROOM];
    follow_to(follower, view, state.version).await;
    assert_redis_exact(topology, folder, &expected).await;
    let client = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let mut conn = redis_connection(&client).await;
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let redis_room = omni::view::snapshot(&mut conn, &keys, ROOM).await.unwrap().expect("the room is in redis");
    assert_eq!((view.version, &view.modules), (redis_room.version, &redis_room.modules), "saw {:?}", view.seen);
    for (module, json) in folder.module_states(state) {
        let want: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(view.modules.get(module), Some(&want), "{module}; saw {:?}", view.seen);
    }
    follow_for(follower, view, Duration::from_secs(1)).await;
    assert_eq!(view.version, state.version, "nothing after the final version; saw {:?}", view.seen);
    tracing::info!(seen = ?view.seen, "the follower's view is exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_redis_lost_is_unknown_to_a_follower_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    let redis = ScratchRedis::start_volatile(&dir.path().join("redis"));
    let topology = topology_on("follow-flush", dir.path(), &redis).await;
    let folder = folder(&["recording", "tags"]);
    let mut events = vec![recording(1), tag(2, "topic", "physics")];
    let producer = producer();
    produce(&producer, topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    assert_redis_exact(&topology, &folder, &model(&folder, &events)).await;

    // Redis loses everything, and nothing is written back before the follower starts.
    let client = redis::Client::open(redis.url("")).unwrap();
    let mut conn = redis_connection(&client).await;
    let mut flush_then_pause = redis::pipe();
    flush_then_pause.atomic().cmd("FLUSHALL").ignore().cmd("CLIENT").arg(&["PAUSE", "60000", "WRITE"]).ignore();
    let _: () = flush_then_pause.query_async(&mut conn).await.unwrap();
    let mut follower = start_follower(&topology, ROOM, Duration::ZERO).await;
    events.push(tag(3, "level", "intro"));
    produce(&producer, topology.input_topic(), &events[2..]);
    read_broadcast(&topology.broadcast_topic, 3);
    // The follower has version 3 but no state to apply it to: it must wait.
    let mut view = View::default();
    follow_for(&mut follower, &mut view, Duration::from_secs(1)).await;
    assert!(view.seen.is_empty(), "nothing is known of the room while redis lacks it; saw {:?}", view.seen);

    unpause_redis(&redis.url("")).await;
    assert_view_exact(&mut follower, &mut view, &topology, &folder, &events).await;
    assert!(view.modules.contains_key("recording"), "the recording survives; saw {:?}", view.seen);
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_waits_out_a_redis_that_lags_the_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    let redis = ScratchRedis::start(&dir.path().join("redis"));
    let topology = topology_on("follow-lag", dir.path(), &redis).await;
    let folder = folder(&["recording", "tags"]);
    let mut events: Vec<_> = (1..=5).map(|i| tag(i, &format!("k{i}"), "v")).collect();
    let producer = producer();
    produce(&producer, topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    assert_redis_exact(&topology, &folder, &model(&folder, &events)).await;

    // Versions 6 and 7 are committed while Redis takes no writes.
    pause_redis_writes(&redis.url(""), Duration::from_secs(60)).await;
    events.extend((6..=7).map(|i| tag(i, &format!("k{i}"), "v")));
    produce(&producer, topology.input_topic(), &events[5..]);
    read_broadcast(&topology.broadcast_topic, 7);
    let mut follower = start_follower(&topology, ROOM, Duration::ZERO).await;
    let mut view = View::default();
    follow_to(&mut follower, &mut view, 5).await;
    assert_eq!(view.seen, ["snapshot 5"]);

    // Version 8 cannot be bridged while Redis stays at 5.
    events.push(tag(8, "k8", "v"));
    produce(&producer, topology.input_topic(), &events[7..]);
    follow_for(&mut follower, &mut view, Duration::from_secs(2)).await;
    assert_eq!(view.seen, ["snapshot 5"], "nothing until redis catches up");

    unpause_redis(&redis.url("")).await;
    assert_view_exact(&mut follower, &mut view, &topology, &folder, &events).await;
    assert_eq!(view.seen, ["snapshot 5", "change 6", "change 7", "change 8"]);
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_started_while_redis_is_down_starts_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let redis_dir = dir.path().join("redis");
    let redis = ScratchRedis::start(&redis_dir);
    let port = redis.port;
    let topology = topology_on("follow-down", dir.path(), &redis).await;
    let folder = folder(&["recording", "tags"]);
    let mut events = vec![recording(1), tag(2, "topic", "physics")];
    let producer = producer();
    produce(&producer, topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    assert_redis_exact(&topology, &folder, &model(&folder, &events)).await;

    drop(redis);
    let starting = {
        let topology = topology.clone();
        tokio::spawn(async move { start_follower(&topology, "app/ff/room/*", omni::pubsub::DEFAULT_LOOKBACK).await })
    };
    events.push(tag(3, "level", "intro"));
    produce(&producer, topology.input_topic(), &events[2..]);
    read_broadcast(&topology.broadcast_topic, 3);
    // The scenario itself: Redis stays down a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!starting.is_finished(), "the follower waits for redis rather than failing");

    let redis = ScratchRedis::start_on(&redis_dir, port);
    let mut follower = starting.await.expect("the follower task");
    let mut view = View::default();
    assert_view_exact(&mut follower, &mut view, &topology, &folder, &events).await;
    job.stop().await;
    drop(redis);
}
