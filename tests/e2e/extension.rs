//! A state type added from outside: a new module, registered without
//! touching the runtime, shows up in the broadcast and in Redis.

use std::collections::BTreeMap;

use omni::modules::{Limits, Module, Registry, Rejection, RoomFolder};
use omni::proto::tecate::room_event::Kind;
use omni::proto::tecate::RoomEvent;

use crate::common::*;

/// Counts recordings started in a room.
struct RecordingCount;

impl Module for RecordingCount {
    type State = BTreeMap<String, u64>;

    fn name(&self) -> &'static str {
        "recording_count"
    }

    fn fold(&self, state: &Self::State, event: &RoomEvent, _: &Limits) -> Result<Option<Self::State>, Rejection> {
        let Some(Kind::RecordingStarted(_)) = &event.kind else { return Ok(None) };
        let mut next = state.clone();
        *next.entry("started".into()).or_default() += 1;
        Ok(Some(next))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_module_runs_without_runtime_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("ext", 2, &dir.path().join("state"));
    topology.modules = vec!["recording".into(), "tags".into(), "recording_count".into()];
    create_input(&topology).await;
    let registry = Registry::with_builtins().register(RecordingCount);
    let folder = RoomFolder::new(registry.select(&topology.modules).unwrap(), Limits::default());
    let events = generate(3, 500, 30);
    let expected = model(&folder, &events);
    assert!(expected.changes.values().flatten().any(|c| c.1 == "recording_count"));

    produce(&producer(), topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), registry).await;
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    job.stop().await;
}
