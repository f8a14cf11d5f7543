//! Golden files: a hand-checked input of room events and the exact changes
//! it must produce (tests/golden). The pure folds must reproduce it, and so
//! must the real job when it is stopped midway, loses its state directory,
//! and restores from the changelog before going on.

use std::collections::BTreeMap;

use omni::modules::Registry;
use omni::proto::omni::{RoomState, StateChange};
use omni::proto::tecate::{room_event::Kind, *};
use omni::proto::timestamp_from_millis;
use serde_json::Value;

use crate::common::*;

fn golden(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join("tests/golden").join(name)).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn input() -> Vec<(String, RoomEvent)> {
    golden("room-events.jsonl")
        .into_iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            let kind = match v["type"].as_str().unwrap() {
                "recording_started" => Kind::RecordingStarted(RecordingStarted {
                    recording_id: s("recording_id"),
                    started_by: s("started_by"),
                }),
                "recording_stopped" => {
                    Kind::RecordingStopped(RecordingStopped { recording_id: s("recording_id"), reason: s("reason") })
                }
                "tag_set" => Kind::TagSet(TagSet { key: s("key"), value: s("value") }),
                "tag_removed" => Kind::TagRemoved(TagRemoved { key: s("key") }),
                "room_closed" => Kind::RoomClosed(RoomClosed {}),
                other => panic!("unknown type {other}"),
            };
            let event = RoomEvent {
                event_id: s("event_id"),
                occurred_at: Some(timestamp_from_millis(v["occurred_at_ms"].as_i64().unwrap())),
                kind: Some(kind),
            };
            (s("path"), event)
        })
        .collect()
}

/// The golden changes per room, in order: (version, module, state, cause).
fn expected() -> BTreeMap<String, Vec<(u64, String, Value, String)>> {
    let mut rooms: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for v in golden("room-events.expected.jsonl") {
        rooms.entry(v["path"].as_str().unwrap().to_owned()).or_default().push((
            v["version"].as_u64().unwrap(),
            v["module"].as_str().unwrap().to_owned(),
            v["state"].clone(),
            v["cause"].as_str().unwrap().to_owned(),
        ));
    }
    rooms
}

fn as_golden(changes: impl IntoIterator<Item = StateChange>) -> BTreeMap<String, Vec<(u64, String, Value, String)>> {
    let mut rooms: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for c in changes {
        let state = serde_json::from_str(&c.state_json).unwrap();
        rooms.entry(c.path).or_default().push((c.version, c.module, state, c.cause_event_id));
    }
    rooms
}

#[test]
fn the_pure_folds_reproduce_the_golden_changes() {
    let folder = folder(&["recording", "tags"]);
    let mut rooms: BTreeMap<String, RoomState> = BTreeMap::new();
    let mut changes = Vec::new();
    for (path, event) in input() {
        let outcome = folder.fold(rooms.entry(path.clone()).or_default(), &event).unwrap();
        changes.extend(outcome.changes.into_iter().map(|c| StateChange {
            path: path.clone(),
            version: c.version,
            module: c.module.to_owned(),
            state_json: c.state_json,
            cause_event_id: event.event_id.clone(),
            ..StateChange::default()
        }));
    }
    assert_eq!(as_golden(changes), expected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_reproduces_the_golden_changes_across_a_lost_state_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("golden", 3, &dir.path().join("state"));
    create_input(&topology).await;
    let events = input();
    let (first, rest) = events.split_at(12);
    let producer = producer();
    let folder = folder(&["recording", "tags"]);

    produce(&producer, topology.input_topic(), first);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    read_broadcast(&topology.broadcast_topic, model(&folder, first).total_changes);
    job.stop().await;
    std::fs::remove_dir_all(&topology.store.dir).unwrap();

    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    produce(&producer, topology.input_topic(), rest);
    let want = expected();
    let total = want.values().map(Vec::len).sum();
    let changes = read_broadcast(&topology.broadcast_topic, total);
    assert_eq!(as_golden(changes), want);
    job.stop().await;
}
