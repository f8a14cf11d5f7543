//! The Redis view against a real Redis: compare-and-set by version, closes,
//! and the change stream a late joiner catches up from.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omni::proto::Timestamp;
use omni::view::{
    changes_after, snapshot, spawn_writer, ChangeEntry, KeyLayout, RoomWrite, StoredRooms, WriterOptions,
};

use crate::common::*;

fn write(version: u64, closed: bool, tags: &str, changes: impl IntoIterator<Item = u64>) -> RoomWrite {
    RoomWrite {
        path: "app/a/room/r".into(),
        partition: 0,
        version,
        closed,
        modules: vec![("tags".into(), tags.into())],
        updated_at: Some(Timestamp { seconds: 1_795_773_600, nanos: 0 }),
        changes: changes
            .into_iter()
            .map(|v| ChangeEntry {
                version: v,
                module: "tags",
                state_json: format!("{{\"v\":\"{v}\"}}"),
                cause_event_id: format!("e{v}"),
                occurred_at: Some(Timestamp { seconds: 1_795_773_600, nanos: 0 }),
                processed_at: Some(Timestamp { seconds: 1_795_773_601, nanos: 0 }),
            })
            .collect(),
        truncated: false,
    }
}

/// The writer's options for these tests, with a stream of `stream_max_len` versions.
fn options(keys: &KeyLayout, stream_max_len: usize) -> WriterOptions {
    WriterOptions {
        keys: keys.clone(),
        stream_max_len,
        batch_rooms: 16,
        backlog_bytes: 64 << 20,
        write_bytes: 4 << 20,
        closed_stream_retention: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_goes_back_a_version_and_a_close_keeps_the_last_version() {
    let keys = KeyLayout::new(&unique("view"));
    let client = redis::Client::open(services().redis_url.as_str()).unwrap();
    let (writer, task) = spawn_writer(client.clone(), options(&keys, 3), None);
    let mut conn = redis_connection(&client).await;
    let version = |conn: redis::aio::MultiplexedConnection, keys: KeyLayout| async move {
        let mut conn = conn;
        snapshot(&mut conn, &keys, "app/a/room/r").await.unwrap().map(|s| s.version)
    };

    writer.send(vec![write(5, false, r#"{"k":"new"}"#, 1..=5)]);
    wait_for(Duration::from_secs(10), "version 5", || {
        let f = version(conn.clone(), keys.clone());
        async move { (f.await == Some(5)).then_some(()) }
    })
    .await;
    // An older write (a replay, or a lagging previous owner) changes nothing.
    writer.send(vec![write(3, false, r#"{"k":"old"}"#, 2..=3)]);
    writer.send(vec![write(6, false, r#"{"k":"newer"}"#, 6..=6)]);
    wait_for(Duration::from_secs(10), "version 6", || {
        let f = version(conn.clone(), keys.clone());
        async move { (f.await == Some(6)).then_some(()) }
    })
    .await;
    let snap = snapshot(&mut conn, &keys, "app/a/room/r").await.unwrap().unwrap();
    assert_eq!(snap.modules["tags"], serde_json::json!({"k": "newer"}));
    // Each version once, in order. The stream keeps the last 3 versions, so
    // the write of 1-5 brought only 3-5, in one entry that 6 does not trim.
    let stream: Vec<u64> =
        changes_after(&mut conn, &keys, "app/a/room/r", 0).await.unwrap().iter().map(|c| c.version).collect();
    assert_eq!(stream, vec![3, 4, 5, 6]);
    // Versions 3-5 share one entry; a reader after 3 gets only 4 and 5 of it.
    let after_three: Vec<u64> =
        changes_after(&mut conn, &keys, "app/a/room/r", 3).await.unwrap().iter().map(|c| c.version).collect();
    assert_eq!(after_three, vec![4, 5, 6]);
    let after_five = changes_after(&mut conn, &keys, "app/a/room/r", 5).await.unwrap();
    assert_eq!(after_five.len(), 1);
    assert_eq!(after_five[0].cause_event_id, "e6");

    // A close deletes the hash; the stream remembers the version, so a replay cannot resurrect the room.
    writer.send(vec![write(7, true, "{}", 7..=7)]);
    wait_for(Duration::from_secs(10), "the hash to go", || {
        let f = version(conn.clone(), keys.clone());
        async move { f.await.is_none().then_some(()) }
    })
    .await;
    writer.send(vec![write(6, false, r#"{"k":"zombie"}"#, 6..=6), write(8, false, r#"{"k":"reopened"}"#, 8..=8)]);
    wait_for(Duration::from_secs(10), "version 8", || {
        let f = version(conn.clone(), keys.clone());
        async move { (f.await == Some(8)).then_some(()) }
    })
    .await;
    let snap = snapshot(&mut conn, &keys, "app/a/room/r").await.unwrap().unwrap();
    assert_eq!(snap.modules["tags"], serde_json::json!({"k": "reopened"}));

    // A close known only from the store (a reconcile, without its change
    // entry) still leaves the stream ending at the close, so an older
    // write from a lagging previous owner cannot recreate the room.
    writer.send(vec![write(9, true, "{}", [])]);
    wait_for(Duration::from_secs(10), "the hash to go again", || {
        let f = version(conn.clone(), keys.clone());
        async move { f.await.is_none().then_some(()) }
    })
    .await;
    writer.send(vec![write(8, false, r#"{"k":"lagging"}"#, 8..=8), write(10, false, r#"{"k":"fresh"}"#, 10..=10)]);
    wait_for(Duration::from_secs(10), "version 10", || {
        let f = version(conn.clone(), keys.clone());
        async move { (f.await == Some(10)).then_some(()) }
    })
    .await;
    let stream: Vec<u64> =
        changes_after(&mut conn, &keys, "app/a/room/r", 7).await.unwrap().iter().map(|c| c.version).collect();
    assert_eq!(stream, vec![8, 9, 10]);
    drop(writer);
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_adds_only_the_changes_the_stream_lacks() {
    let keys = KeyLayout::new(&unique("retry"));
    let client = redis::Client::open(services().redis_url.as_str()).unwrap();
    let (writer, task) = spawn_writer(client.clone(), options(&keys, 1000), None);
    writer.send(vec![write(5, false, "{}", 1..=5)]);
    drop(writer);
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    // A write that reached Redis but whose reply was lost comes back merged with newer changes.
    let (writer, task) = spawn_writer(client.clone(), options(&keys, 1000), None);
    writer.send(vec![write(8, false, "{}", 3..=8)]);
    drop(writer);
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    let mut conn = redis_connection(&client).await;
    let entries: usize = redis::AsyncCommands::xlen(&mut conn, keys.changes("app/a/room/r")).await.unwrap();
    assert_eq!(entries, 2, "one stream entry per write");
    let raw: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut conn, keys.changes("app/a/room/r")).await.unwrap();
    let second: String = raw.ids[1].get("changes").unwrap();
    let versions: Vec<u64> = serde_json::from_str::<Vec<serde_json::Value>>(&second)
        .unwrap()
        .iter()
        .map(|c| c["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![6, 7, 8], "the retried entry leaves out what the stream holds");
    let all: Vec<u64> =
        changes_after(&mut conn, &keys, "app/a/room/r", 0).await.unwrap().iter().map(|c| c.version).collect();
    assert_eq!(all, (1..=8).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_is_capped() {
    let keys = KeyLayout::new(&unique("cap"));
    let client = redis::Client::open(services().redis_url.as_str()).unwrap();
    let (writer, task) = spawn_writer(client.clone(), options(&keys, 100), None);
    for v in 1..=1000u64 {
        writer.send(vec![write(v, false, "{}", v..=v)]);
    }
    drop(writer);
    tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap();
    let mut conn = redis_connection(&client).await;
    let held: Vec<u64> =
        changes_after(&mut conn, &keys, "app/a/room/r", 0).await.unwrap().iter().map(|c| c.version).collect();
    assert!((100..=250).contains(&held.len()), "a stream keeping the last 100 versions holds {}", held.len());
    assert_eq!(held, ((1001 - held.len() as u64)..=1000).collect::<Vec<_>>(), "the newest versions, in order");
    let last = changes_after(&mut conn, &keys, "app/a/room/r", 999).await.unwrap();
    assert_eq!(last.iter().map(|c| c.version).collect::<Vec<_>>(), vec![1000]);
    assert_eq!(last[0].state, serde_json::json!({"v": "1000"}));
    assert_eq!(last[0].occurred_at, "2026-11-27T10:00:00Z");
}

/// A store a step behind Redis, as the job's is (it takes a commit just
/// after Redis does): the first time the writer asks for a room, it does
/// not hold it yet.
struct StoreOneStepBehind {
    asked: Mutex<HashSet<String>>,
}

impl StoredRooms for StoreOneStepBehind {
    fn room(&self, path: &str, partition: i32) -> Option<RoomWrite> {
        if self.asked.lock().unwrap().insert(path.to_owned()) {
            return None;
        }
        Some(RoomWrite {
            path: path.to_owned(),
            partition,
            truncated: true,
            changes: Vec::new(),
            ..write(1, false, "{}", [])
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_room_waiting_as_its_path_is_written_once_the_store_holds_it() {
    let keys = KeyLayout::new(&unique("reload"));
    let client = redis::Client::open(services().redis_url.as_str()).unwrap();
    // A budget no write fits in: every room waits as its path, to be read back from the store.
    let options = WriterOptions { backlog_bytes: 1, ..options(&keys, 100) };
    let store = Arc::new(StoreOneStepBehind { asked: Mutex::new(HashSet::new()) });
    let (writer, task) = spawn_writer(client.clone(), options, Some(store));
    let rooms: Vec<String> = (0..20).map(|i| format!("app/a/room/new{i}")).collect();
    writer.send(rooms.iter().map(|path| RoomWrite { path: path.clone(), ..write(1, false, "{}", 1..=1) }).collect());
    let mut conn = redis_connection(&client).await;
    for path in &rooms {
        wait_for(Duration::from_secs(10), &format!("{path} in redis"), || {
            let (mut conn, keys) = (conn.clone(), keys.clone());
            async move { snapshot(&mut conn, &keys, path).await.ok()?.filter(|s| s.version == 1) }
        })
        .await;
    }
    drop(writer);
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    let _ = &mut conn;
}

/// The value of the one writer marker under `keys`, once there is one.
async fn marker_value(conn: &mut redis::aio::MultiplexedConnection, keys: &KeyLayout) -> Option<u64> {
    let found: Vec<String> = redis::cmd("KEYS").arg(keys.writer_marker("*")).query_async(conn).await.ok()?;
    let value: Option<String> = redis::AsyncCommands::get(conn, found.first()?).await.ok()?;
    value?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_tells_a_redis_that_lost_data_from_one_that_kept_it() {
    let dir = tempfile::tempdir().unwrap();
    let redis = ScratchRedis::start_volatile(&dir.path().join("redis"));
    let url = redis.url("");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = redis_connection(&client).await;
    let keys = KeyLayout::new(&unique("marker"));
    let (writer, task) = spawn_writer(client.clone(), options(&keys, 100), None);
    writer.send(vec![write(1, false, r#"{"a":"1"}"#, [1])]);
    // Idle, the writer checks its marker every second; Redis kept everything.
    wait_for(Duration::from_secs(15), "four marker checks", || {
        let (mut conn, keys) = (conn.clone(), keys.clone());
        async move { marker_value(&mut conn, &keys).await.filter(|&v| v >= 4) }
    })
    .await;
    assert_eq!(writer.losses(), 0, "a Redis that kept its data is no loss");

    redis_command(&url, &["FLUSHALL"]).await;
    wait_for(Duration::from_secs(10), "the FLUSHALL noticed", || {
        let losses = writer.losses();
        async move { (losses == 1).then_some(()) }
    })
    .await;

    // Redis back from an older snapshot: the marker holds an older value.
    let marker: Vec<String> = redis::cmd("KEYS").arg(keys.writer_marker("*")).query_async(&mut conn).await.unwrap();
    let _: () = redis::AsyncCommands::set(&mut conn, &marker[0], "1").await.unwrap();
    wait_for(Duration::from_secs(10), "the older snapshot noticed", || {
        let losses = writer.losses();
        async move { (losses == 2).then_some(()) }
    })
    .await;
    let steady = writer.losses();
    let checks = marker_value(&mut conn, &keys).await.unwrap();
    wait_for(Duration::from_secs(15), "three more marker checks", || {
        let (mut conn, keys) = (conn.clone(), keys.clone());
        async move { marker_value(&mut conn, &keys).await.filter(|&v| v >= checks + 3) }
    })
    .await;
    assert_eq!(writer.losses(), steady, "no loss is reported twice");
    drop(writer);
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_catch_up_recipe_returns_every_version_after_v() {
    let client = redis::Client::open(services().redis_url.as_str()).unwrap();
    let keys = KeyLayout::new(&unique("recipe"));
    let (writer, task) = spawn_writer(client.clone(), options(&keys, 1000), None);
    let mut conn = redis_connection(&client).await;
    // Versions 1-3 in one entry (id 3), 4-6 in another (id 6), 7 alone.
    for (version, changes) in [(3, vec![1, 2, 3]), (6, vec![4, 5, 6]), (7, vec![7])] {
        writer.send(vec![write(version, false, "{}", changes)]);
        wait_for(Duration::from_secs(10), "the write in redis", || {
            let (mut conn, key) = (conn.clone(), keys.room("app/a/room/r"));
            async move {
                let at: Option<u64> = redis::AsyncCommands::hget(&mut conn, key, "version").await.ok()?;
                (at == Some(version)).then_some(())
            }
        })
        .await;
    }
    drop(writer);
    task.await.unwrap();
    let ids: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut conn, keys.changes("app/a/room/r")).await.unwrap();
    let ids: Vec<&str> = ids.ids.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["3-0", "6-0", "7-0"], "one entry per write");
    // As typed in the README for v = 5: `XRANGE <key> 6 +`.
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(keys.changes("app/a/room/r")).arg("6").arg("+").query_async(&mut conn).await.unwrap();
    let mut versions = Vec::new();
    for entry in reply.ids {
        let text: String = entry.get("changes").unwrap();
        let changes: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        versions.extend(changes.iter().map(|c| c["version"].as_u64().unwrap()).filter(|&v| v > 5));
    }
    assert_eq!(versions, vec![6, 7], "every version after 5, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_do_not_follow_on_from_what_redis_holds_leave_a_resync_marker() {
    let client = redis::Client::open(services().redis_url.as_str()).unwrap();
    let keys = KeyLayout::new(&unique("hole"));
    let mut conn = redis_connection(&client).await;
    let (writer, task) = spawn_writer(client.clone(), options(&keys, 1000), None);
    writer.send(vec![write(3, false, "{}", [1, 2, 3])]);
    let room = keys.room("app/a/room/r");
    let stream = keys.changes("app/a/room/r");
    let reader = conn.clone();
    let at_version = |version: u64| {
        let (conn, room) = (reader.clone(), room.clone());
        move || {
            let (mut conn, room) = (conn.clone(), room.clone());
            async move {
                let at: Option<u64> = redis::AsyncCommands::hget(&mut conn, room, "version").await.ok()?;
                (at == Some(version)).then_some(())
            }
        }
    };
    wait_for(Duration::from_secs(10), "version 3", at_version(3)).await;
    // Redis loses the room; the next live write carries only its own change.
    let _: () = redis::AsyncCommands::del(&mut conn, &[&room, &stream]).await.unwrap();
    writer.send(vec![write(6, false, "{}", [6])]);
    wait_for(Duration::from_secs(10), "version 6", at_version(6)).await;
    drop(writer);
    task.await.unwrap();
    let entries: redis::streams::StreamRangeReply = redis::AsyncCommands::xrange_all(&mut conn, &stream).await.unwrap();
    let shape: Vec<(String, bool)> = entries.ids.iter().map(|e| (e.id.clone(), e.map.contains_key("resync"))).collect();
    assert_eq!(shape, [("5-0".to_owned(), true), ("6-0".to_owned(), false)], "versions 1-5 are marked missing");
}
