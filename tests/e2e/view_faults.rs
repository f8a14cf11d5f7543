//! The Redis view is never silently wrong: one room Redis keeps refusing
//! freezes no other, a room past its write budget leaves a resync marker in
//! its stream, and a Redis that lost its data (FLUSHALL, or a restart from
//! an older snapshot) is repaired from the store with no new input and no
//! restart. Each test owns its Redis, so FLUSHALL and CLIENT PAUSE disturb
//! no other test.

use std::time::{Duration, Instant};

use omni::modules::Registry;
use omni::proto::tecate::room_event::Kind;
use omni::proto::tecate::{RoomEvent, TagSet};
use omni::view::KeyLayout;
use rand::{Rng, SeedableRng};

use crate::common::*;

fn tag_set(id: usize, room: &str, key: &str, value: String) -> (String, RoomEvent) {
    (room.to_owned(), event(id, 1_795_773_600_000 + id as i64, Kind::TagSet(TagSet { key: key.into(), value })))
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis_connection(&redis::Client::open(url).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_redis_keeps_refusing_is_retried_alone_and_freezes_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("refusing", 2, &dir.path().join("state"));
    create_input(&topology).await;
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let mut conn = connection(&topology.redis.url).await;
    // The bad room's hash key holds a string: every write to it fails (WRONGTYPE).
    let bad = "app/a0/room/r0";
    let _: () = redis::AsyncCommands::set(&mut conn, keys.room(bad), "not a hash").await.unwrap();
    let events = generate(51, 2000, 40);
    assert!(events.iter().any(|(room, _)| room == bad));
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    produce(&producer(), topology.input_topic(), &events);

    let mut others = expected.rooms.clone();
    others.remove(bad);
    let others = Expected { rooms: others, ..Expected::default() };
    assert_redis_exact(&topology, &folder, &others).await;
    let held: String = redis::AsyncCommands::get(&mut conn, keys.room(bad)).await.unwrap();
    assert_eq!(held, "not a hash", "the bad room was refused all along");

    // Once the cause is gone, the room's own retries bring it in.
    let _: () = redis::AsyncCommands::del(&mut conn, keys.room(bad)).await.unwrap();
    assert_redis_exact(&topology, &folder, &expected).await;
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_room_taking_600_changes_under_a_client_pause_stalls_no_other_room() {
    let dir = tempfile::tempdir().unwrap();
    let redis = ScratchRedis::start_volatile(&dir.path().join("redis"));
    let url = redis.url("");
    let mut topology = fresh_topology("paused", 2, &dir.path().join("state"));
    topology.redis.url = url.clone();
    create_input(&topology).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(52);
    let large = "app/a/room/large";
    let mut before = Vec::new();
    for k in 0..100 {
        before.push(tag_set(before.len(), large, &format!("k{k:02}"), random_value(&mut rng)));
    }
    for r in 0..30 {
        before.push(tag_set(before.len(), &format!("app/a/room/small{r}"), "k", "0".into()));
    }
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let producer = producer();
    produce(&producer, topology.input_topic(), &before);
    let folder = folder(&["recording", "tags"]);
    assert_redis_exact(&topology, &folder, &model(&folder, &before)).await;

    // Redis holds writes for 5 s while the large room (~400 kB) takes 600
    // changes: a write carrying them all would be ~240 MB.
    pause_redis_writes(&url, Duration::from_secs(5)).await;
    let paused_at = Instant::now();
    let mut during = before.clone();
    for i in 0..600 {
        let key = format!("k{:02}", i % 100);
        during.push(tag_set(during.len(), large, &key, random_value(&mut rng)));
        if i % 20 == 0 {
            during.push(tag_set(during.len(), &format!("app/a/room/small{}", i % 30), "k", format!("{i}")));
        }
    }
    produce(&producer, topology.input_topic(), &during[before.len()..]);
    let expected = model(&folder, &during);
    assert_redis_exact(&topology, &folder, &expected).await;
    assert!(paused_at.elapsed() >= Duration::from_secs(4), "the pause held the writes");

    // The large room's writes were cut to their budget: its stream says so.
    let mut conn = connection(&url).await;
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let entries: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut conn, keys.changes(large)).await.unwrap();
    assert!(
        entries.ids.iter().any(|entry| entry.map.contains_key("resync")),
        "a resync marker in the large room's stream"
    );
    job.stop().await;
}

fn random_value(rng: &mut impl Rng) -> String {
    (0..4000).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect()
}

/// Events over `rooms` rooms, each room 1 to 3 tags.
fn spread(rooms: usize, tag: &str) -> Vec<(String, RoomEvent)> {
    let mut events = Vec::new();
    for r in 0..rooms {
        for k in 0..1 + r % 3 {
            events.push(tag_set(events.len(), &format!("app/a/room/r{r}"), &format!("{tag}{k}"), "v".into()));
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushall_is_repaired_from_the_store_with_no_new_input() {
    let dir = tempfile::tempdir().unwrap();
    let redis = ScratchRedis::start_volatile(&dir.path().join("redis"));
    let url = redis.url("");
    let mut topology = fresh_topology("flushall", 4, &dir.path().join("state"));
    topology.redis.url = url.clone();
    create_input(&topology).await;
    let mut events = spread(300, "k");
    // Closed rooms must come back closed, not open.
    for r in 0..20 {
        let close = Kind::RoomClosed(Default::default());
        events.push((format!("app/a/room/r{r}"), event(events.len(), 1_795_773_700_000, close)));
    }
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    produce(&producer(), topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    assert_redis_exact(&topology, &folder, &expected).await;

    redis_command(&url, &["FLUSHALL"]).await;
    let flushed = Instant::now();
    assert_redis_exact(&topology, &folder, &expected).await;
    assert!(flushed.elapsed() < Duration::from_secs(30), "repaired in {:?}", flushed.elapsed());
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_back_from_an_older_snapshot_returns_to_the_newest_versions() {
    let dir = tempfile::tempdir().unwrap();
    let redis_dir = dir.path().join("redis");
    let snapshots = ["--save", "", "--appendonly", "no", "--dbfilename", "dump.rdb"];
    let port = pick_free_port();
    let redis = ScratchRedis::start_with(&redis_dir, port, &snapshots);
    let url = redis.url("");
    let mut topology = fresh_topology("old-snapshot", 4, &dir.path().join("state"));
    topology.redis.url = url.clone();
    create_input(&topology).await;
    let first = spread(200, "k");
    let producer = producer();
    produce(&producer, topology.input_topic(), &first);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let folder = folder(&["recording", "tags"]);
    assert_redis_exact(&topology, &folder, &model(&folder, &first)).await;
    redis_command(&url, &["SAVE"]).await;
    let old = std::fs::read(redis_dir.join("dump.rdb")).unwrap();

    let mut all = first.clone();
    all.extend(spread(200, "n").into_iter().map(|(room, mut e)| {
        e.event_id = format!("later-{}", e.event_id);
        (room, e)
    }));
    for r in 0..10 {
        let close = Kind::RoomClosed(Default::default());
        all.push((format!("app/a/room/r{r}"), event(all.len(), 1_795_773_700_000, close)));
    }
    produce(&producer, topology.input_topic(), &all[first.len()..]);
    let expected = model(&folder, &all);
    assert_redis_exact(&topology, &folder, &expected).await;

    // Redis dies and comes back from the older snapshot.
    drop(redis);
    std::fs::write(redis_dir.join("dump.rdb"), old).unwrap();
    let _redis = ScratchRedis::start_with(&redis_dir, port, &snapshots);
    let mut conn = connection(&url).await;
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let back: Option<String> =
        redis::AsyncCommands::hget(&mut conn, keys.room("app/a/room/r150"), "version").await.unwrap();
    assert_eq!(back.as_deref(), Some("1"), "Redis did come back older");
    let restarted = Instant::now();
    assert_redis_exact(&topology, &folder, &expected).await;
    assert!(restarted.elapsed() < Duration::from_secs(30), "repaired in {:?}", restarted.elapsed());
    job.stop().await;
}
