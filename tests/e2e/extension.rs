//! A state type added from outside: a new module, registered without
//! touching the runtime, shows up in the broadcast and in Redis.

use std::collections::BTreeMap;
use std::time::Duration;

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

/// An extension binary's whole `main` is the library's runner: it gets the
/// operations endpoint (`/metrics`, `/healthz`, `/readyz`) `omni run` has,
/// with its own module's metrics in it. This test is that `main`, with a
/// stop signal of its own in place of SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_run_by_the_library_runner_serves_metrics_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("extops", 2, &dir.path().join("state"));
    topology.modules = vec!["recording".into(), "tags".into(), "recording_count".into()];
    create_input(&topology).await;
    let registry = Registry::with_builtins().register(RecordingCount);
    let folder = RoomFolder::new(registry.select(&topology.modules).unwrap(), Limits::default());
    let events = generate(5, 300, 20);
    let expected = model(&folder, &events);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let job = omni::ops::runner::start(topology.clone(), registry, async {
        let _ = stopped.await;
    })
    .await
    .expect("the runner starts");
    let addr = job.addr.to_string();
    let running = tokio::spawn(job.wait());

    let ready = wait_for(Duration::from_secs(90), "/readyz 200", || {
        let addr = addr.clone();
        async move { http_get(&addr, "/readyz").await.filter(|(status, _)| *status == 200) }
    })
    .await;
    assert_eq!(ready.1.trim(), "ready: 2 partitions");
    produce(&producer(), topology.input_topic(), &events);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;

    let own = expected.changes.values().flatten().filter(|c| c.1 == "recording_count").count();
    let metrics = wait_for(Duration::from_secs(30), "the module's changes in /metrics", || {
        let addr = addr.clone();
        async move {
            let (_, text) = http_get(&addr, "/metrics").await?;
            let line =
                text.lines().find(|l| l.starts_with("omni_changes_emitted_total{module=\"recording_count\"}"))?;
            (line.rsplit(' ').next()?.parse::<f64>().ok()? >= own as f64).then_some(text)
        }
    })
    .await;
    assert!(metrics.contains("# HELP omni_consumer_lag"), "{metrics}");
    assert_eq!(http_get(&addr, "/healthz").await.map(|(s, b)| (s, b.trim().to_owned())), Some((200, "ok".into())));

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), running).await.expect("the runner stops");
    result.expect("the runner's task").expect("the runner ends without error");
}
