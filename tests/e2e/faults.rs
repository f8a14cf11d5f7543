//! Faults: a crash with a transaction open, a lost state directory, instances
//! joining and leaving, and Redis going away. Every run must end exact.

use std::time::Duration;

use omni::modules::Registry;

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

/// A Redis of this test's own, so stopping it disturbs no other test.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start(dir: &std::path::Path, port: u16) -> OwnRedis {
        std::fs::create_dir_all(dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnRedis { child, port, dir: dir.to_owned() }
    }

    fn stop(mut self) -> (u16, std::path::PathBuf) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.port, self.dir.clone())
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_mid_run_converges_when_back_and_never_regresses() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis = OwnRedis::start(&dir.path().join("redis"), port);
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

    let (port, redis_dir) = redis.stop();
    produce(&producer, topology.input_topic(), &events[1500..]);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);

    let redis = OwnRedis::start(&redis_dir, port);
    assert_redis_exact(&topology, &folder, &expected).await;
    job.stop().await;

    redis.stop();
}
