//! Faults: a crash with a transaction open, a lost state directory, instances
//! joining and leaving, Redis going away, and a fenced producer. Every run
//! must end exact.

use std::time::Duration;

use omni::modules::Registry;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;

use crate::common::*;

/// Waits until the broadcast topic holds at least `n` committed changes.
fn wait_for_progress(topic: &str, n: usize) {
    let got = read_committed(topic, n, Duration::from_secs(60)).len();
    assert!(got >= n, "only {got} of {n} changes appeared on {topic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("kill9", 4, &dir.path().join("state"));
    create_input(&topology).await;
    let events = generate(11, 6000, 120);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let producer = producer();

    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    produce(&producer, topology.input_topic(), &events[..3000]);
    wait_for_progress(&topology.broadcast_topic, 200);
    // Events keep arriving, so a transaction is open when the process dies.
    produce(&producer, topology.input_topic(), &events[3000..4000]);
    job.kill9();

    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    produce(&producer, topology.input_topic(), &events[4000..]);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    job.terminate();
    assert_store_exact(&[&topology.store.dir], topology.partitions, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_state_directory_is_rebuilt_from_the_changelog() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("wipe", 4, &dir.path().join("state"));
    create_input(&topology).await;
    let events = generate(12, 3000, 80);
    let folder = folder(&["recording", "tags"]);
    let first = model(&folder, &events[..1500]);
    let expected = model(&folder, &events);
    let producer = producer();

    produce(&producer, topology.input_topic(), &events[..1500]);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    read_broadcast(&topology.broadcast_topic, first.total_changes);
    job.stop().await;

    std::fs::remove_dir_all(&topology.store.dir).unwrap();
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    produce(&producer, topology.input_topic(), &events[1500..]);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    job.stop().await;
    assert_store_exact(&[&topology.store.dir], topology.partitions, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_joins_then_one_leaves_and_state_follows() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("scale", 6, &dir.path().join("a"));
    let mut second = topology.clone();
    second.store.dir = dir.path().join("b");
    create_input(&topology).await;
    let events = generate(13, 6000, 150);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let producer = producer();

    let a = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    produce(&producer, topology.input_topic(), &events[..2000]);
    wait_for_progress(&topology.broadcast_topic, 500);
    let b = RunningJob::start(second.clone(), Registry::with_builtins()).await;
    produce(&producer, topology.input_topic(), &events[2000..4000]);
    wait_for(Duration::from_secs(60), "both instances to own partitions", || {
        let split =
            a.health.assigned() > 0 && b.health.assigned() > 0 && a.health.assigned() + b.health.assigned() == 6;
        async move { split.then_some(()) }
    })
    .await;
    a.stop().await;
    produce(&producer, topology.input_topic(), &events[4000..]);
    wait_for(Duration::from_secs(60), "the remaining instance to own every partition", || {
        let all = b.health.assigned() == 6;
        async move { all.then_some(()) }
    })
    .await;

    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    b.stop().await;
    assert_store_exact(&[&topology.store.dir, &second.store.dir], topology.partitions, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_mid_run_converges_when_back() {
    let dir = tempfile::tempdir().unwrap();
    // A Redis of this test's own, so stopping it disturbs no other test.
    let redis_dir = dir.path().join("redis");
    let redis = ScratchRedis::start(&redis_dir);
    let port = redis.port;
    let mut topology = fresh_topology("redis-down", 4, &dir.path().join("state"));
    topology.redis.url = format!("redis://127.0.0.1:{port}");
    create_input(&topology).await;
    let events = generate(14, 4000, 60);
    let folder = folder(&["recording", "tags"]);
    let first = model(&folder, &events[..1500]);
    let expected = model(&folder, &events);
    let producer = producer();

    produce(&producer, topology.input_topic(), &events[..1500]);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    read_broadcast(&topology.broadcast_topic, first.total_changes);
    assert_redis_exact(&topology, &folder, &first).await;

    drop(redis);
    produce(&producer, topology.input_topic(), &events[1500..]);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);

    let redis = ScratchRedis::start_on(&redis_dir, port);
    assert_redis_exact(&topology, &folder, &expected).await;
    job.stop().await;

    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_is_rebuilt_in_place_and_the_run_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("fenced", 4, &dir.path().join("state"));
    create_input(&topology).await;
    let events = generate(13, 5000, 100);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let producer = producer();

    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    produce(&producer, topology.input_topic(), &events[..2500]);
    wait_for_progress(&topology.broadcast_topic, 200);
    // Another producer takes the job's transactional id, as a transaction
    // timeout would: the coordinator bumps the epoch and aborts what is open.
    let usurper: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("transactional.id", format!("{}-i1-0", topology.application_id))
        .create()
        .expect("usurping producer");
    usurper.init_transactions(Duration::from_secs(30)).expect("usurping the job's transactional id");
    produce(&producer, topology.input_topic(), &events[2500..]);

    let log = job.log.clone();
    wait_for(Duration::from_secs(60), "the job to rebuild its fenced producer", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("producer rebuilt").then_some(()) }
    })
    .await;
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    job.terminate();
    assert_store_exact(&[&topology.store.dir], topology.partitions, &expected);
}
