//! omni on a production-shaped cluster: three Kafka nodes (each broker and
//! controller) and a Redis Cluster of three masters with a replica each.
//! Under load, the Kafka node leading input and changelog partitions is
//! killed with -9 and started again; a Redis master is killed with -9 and
//! its replica takes over; one of three omni instances is killed with -9,
//! its state directory deleted, and it starts again empty. Every run must
//! end exact: the broadcast holds each room's changes once, contiguous, as
//! the model computes them, Redis holds every room's final state (and never
//! went back a version meanwhile), and the stores too.
//!
//! These tests kill nodes, so they run against services of their own
//! ([`cluster_services`]), in the cluster stage of `integration/test.sh`,
//! one at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omni::pubsub::{Follower, Pattern};
use omni::topology::Topology;
use omni::view::{KeyLayout, RedisTarget};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::broker_outage::{assert_exact, spawn, Job, Load, Scratch};
use crate::common::*;

/// Each partition's leader, by node id, as the cluster's metadata says.
fn leaders(brokers: &str, topic: &str) -> Vec<i32> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("metadata client");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("topic metadata");
    let topic = metadata.topics().first().expect("the topic");
    topic.partitions().iter().map(|p| p.leader()).collect()
}

/// A topology on the cluster whose topics exist (the job creates them; the
/// input is created first so the load can start at once).
async fn topology(name: &str, dir: &std::path::Path) -> Topology {
    let topology = cluster_topology(name, 4, &dir.join("state"));
    create_input(&topology).await;
    topology
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_node_leading_input_and_changelog_killed_under_load_loses_nothing() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    let topology = topology("cluster-kafka", dir).await;
    let events = generate(71, 16_000, 300);

    let mut job = spawn(&topology, dir, "i1", &topology.store.dir);
    job.wait_ready(None, Duration::from_secs(90)).await;
    let brokers = &topology.kafka.brokers;
    for (topic, rf) in [(topology.input_topic().to_owned(), 3), (topology.changelog_topic(), 3)] {
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
        let replicas = metadata.topics()[0].partitions().iter().map(|p| p.replicas().len()).min();
        assert_eq!(replicas, Some(rf), "{topic} is replicated {rf} ways");
    }
    // The node that leads an input partition and a changelog partition both.
    let (input, changelog) = (leaders(brokers, topology.input_topic()), leaders(brokers, &topology.changelog_topic()));
    let victim = *input
        .iter()
        .find(|node| changelog.contains(node))
        .unwrap_or_else(|| panic!("no node leads both an input and a changelog partition: {input:?} {changelog:?}"));
    let node = format!("kafka-{victim}");

    // About 200 events a second for 80 s: enough to outlast the kill, the
    // recovery (up to half a minute, when the node led the group's or the
    // transactions' coordinator too) and the restart.
    let load = Load::start(&topology, events.clone(), 10, Duration::from_millis(50));
    job.wait_for_a_commit("before the kill").await;
    let handed = load.handed();
    cluster_service("kill", &node);
    eprintln!("killed {node} (leader of input partitions {input:?}, changelog {changelog:?})");
    // The other two nodes hold every partition in sync: the job keeps committing.
    let moved = job.wait_for_a_commit(&format!("with {node} killed")).await;
    eprintln!("{node} killed: the job committed again {moved:.1?} later");
    job.stays_alive_for(Duration::from_secs(5), &format!("with {node} down")).await;
    assert!(load.handed() > handed, "events were produced while {node} was down");
    assert!(
        !leaders(brokers, topology.input_topic()).contains(&victim),
        "the killed node no longer leads an input partition"
    );
    cluster_service("start", &node);
    job.wait_for_a_commit(&format!("after {node} was back")).await;
    assert!(load.handed() < events.len(), "the load outlasted the kill and the restart");
    load.finish();

    let store = topology.store.dir.clone();
    assert_exact(&topology, &events, vec![job], &[&store]).await;
}

/// The first master in the cluster services' status (`redis-PORT: running, …, master`).
fn a_master() -> String {
    let status = cluster_status();
    status
        .lines()
        .find(|l| l.starts_with("redis-") && l.contains("running") && l.ends_with("master"))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no running master in:\n{status}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_master_killed_under_load_fails_over_and_rooms_and_followers_end_exact() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    let topology = topology("cluster-redis", dir).await;
    let events = generate(72, 12_000, 300);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);

    let mut job = spawn(&topology, dir, "i1", &topology.store.dir);
    job.wait_ready(None, Duration::from_secs(90)).await;
    let load = Load::start(&topology, events.clone(), 20, Duration::from_millis(50));
    job.wait_for_a_commit("before the kill").await;

    // A late joiner on every room: its snapshots come from every master.
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let redis = RedisTarget::open(&topology.redis.url).unwrap();
    let pattern = Pattern::parse("app/*/room/*").unwrap();
    let lookback = Duration::from_secs(120);
    let mut follower = tokio::time::timeout(
        Duration::from_secs(60),
        Follower::start(&topology.kafka, &topology.broadcast_topic, redis, keys, pattern, lookback),
    )
    .await
    .expect("the follower starts within 60 s")
    .expect("the follower starts");
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let following = tokio::spawn(async move {
        while let Some(event) = follower.next().await {
            if let Ok(event) = event {
                let _ = seen_tx.send((event.path().to_owned(), event.version()));
            }
        }
    });

    let master = a_master();
    let handed = load.handed();
    cluster_service("kill", &master);
    eprintln!("killed {master}");
    job.stays_alive_for(Duration::from_secs(8), &format!("with {master} down")).await;
    job.wait_for_a_commit(&format!("after {master} was killed")).await;
    assert!(load.handed() > handed, "events were produced while {master} failed over");
    load.finish();

    // The follower: never a version back, and every room at its final version.
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    wait_for(Duration::from_secs(90), "the follower to see every room's final version", || {
        while let Ok((path, version)) = seen.try_recv() {
            let before = last.insert(path.clone(), version).unwrap_or(0);
            assert!(version > before, "the follower went from version {before} to {version} of {path}");
        }
        let done = expected.rooms.iter().all(|(room, state)| last.get(room) == Some(&state.version));
        async move { done.then_some(()) }
    })
    .await;
    following.abort();

    // The killed master comes back as a replica, for the tests after this one.
    cluster_service("start", &master);
    let store = topology.store.dir.clone();
    assert_exact(&topology, &events, vec![job], &[&store]).await;

    // `omni snapshot` reads rooms from whichever master holds them.
    for (room, state) in expected.rooms.iter().step_by(expected.rooms.len() / 5 + 1) {
        let prefix = &topology.redis.key_prefix;
        let output = omni_cli()
            .args(["snapshot", room, "--json", "--redis-url", &topology.redis.url, "--key-prefix", prefix])
            .output();
        let output = output.expect("running omni snapshot");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "omni snapshot {room}: {}", String::from_utf8_lossy(&output.stderr));
        let json: serde_json::Value = serde_json::from_str(text.trim()).expect("snapshot prints JSON");
        assert_eq!(json["version"], serde_json::json!(state.version), "omni snapshot {room} on the cluster");
    }
}

/// Each job's `omni_assigned_partitions`.
async fn assigned(jobs: &mut [Job]) -> Vec<f64> {
    let mut counts = Vec::new();
    for job in jobs {
        counts.push(job.metric("omni_assigned_partitions").await);
    }
    counts
}

/// Waits until every job owns partitions and together they own all `partitions`.
async fn wait_for_split(jobs: &mut [Job], partitions: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let counts = assigned(jobs).await;
        if counts.iter().all(|&c| c > 0.0) && counts.iter().sum::<f64>() == f64::from(partitions) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: partitions per instance still {counts:?} after 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads every room's version from Redis over and over until stopped,
/// failing if one ever goes back (a takeover writing an older state over a
/// newer one); returns how many sweeps it made.
fn watch_redis_versions(topology: &Topology, rooms: Vec<String>) -> (Arc<AtomicBool>, tokio::task::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let redis = RedisTarget::open(&topology.redis.url).unwrap();
    let watching = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut conn = redis.connect_bounded(Duration::from_secs(10)).await.expect("a Redis connection");
            let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
            let mut sweeps = 0;
            while !stop.load(Ordering::Relaxed) {
                for room in &rooms {
                    // A read failed over a Redis hiccup is read again in the next sweep.
                    let Ok(version) =
                        redis::AsyncCommands::hget::<_, _, Option<u64>>(&mut conn, keys.room(room), "version").await
                    else {
                        continue;
                    };
                    // No hash: the room is not written yet, or closed (a reopened room goes on from its version).
                    let Some(version) = version else { continue };
                    let before = seen.insert(room, version).unwrap_or(0);
                    assert!(version >= before, "Redis went from version {before} to {version} of {room}");
                }
                sweeps += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sweeps
        })
    };
    (stop, watching)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_instances_killed_with_its_state_directory_under_load_loses_nothing() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    let mut topology = cluster_topology("cluster-instances", 6, &dir.join("state"));
    topology.instance.standby_replicas = 1;
    create_input(&topology).await;
    let events = generate(73, 12_000, 300);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);

    let names = ["i1", "i2", "i3"];
    let stores: Vec<PathBuf> = names.iter().map(|name| dir.join(format!("{name}-state"))).collect();
    let mut jobs: Vec<Job> =
        names.iter().zip(&stores).map(|(name, store)| spawn(&topology, dir, name, store)).collect();
    for job in &mut jobs {
        job.wait_ready(None, Duration::from_secs(90)).await;
    }
    wait_for_split(&mut jobs, topology.partitions, "before the load").await;
    let (stop_watching, watching) = watch_redis_versions(&topology, expected.rooms.keys().cloned().collect());

    // About 200 events a second for 60 s: enough to outlast the session
    // timeout (10 s) the survivors wait for, their takeover, and the restart.
    let load = Load::start(&topology, events.clone(), 10, Duration::from_millis(50));
    let mut victim = jobs.remove(1);
    victim.wait_for_a_commit("before the kill").await;
    let handed = load.handed();
    victim.kill9();
    std::fs::remove_dir_all(&stores[1]).unwrap();
    eprintln!("killed i2 with -9 and deleted its state directory");

    // The survivors take its partitions once its session times out, restore
    // them (from their standby copies or the changelog) and commit.
    let deadline = Instant::now() + Duration::from_secs(90);
    while assigned(&mut jobs).await.iter().sum::<f64>() < f64::from(topology.partitions) {
        assert!(Instant::now() < deadline, "the survivors did not take i2's partitions within 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for job in &mut jobs {
        job.wait_for_a_commit("after i2's partitions moved").await;
    }
    assert!(load.handed() > handed, "events were produced while i2 was away");

    // i2 starts again with an empty state directory and takes its share back.
    jobs.insert(1, spawn(&topology, dir, "i2", &stores[1]));
    jobs[1].wait_ready(None, Duration::from_secs(90)).await;
    wait_for_split(&mut jobs, topology.partitions, "after i2 started again").await;
    jobs[1].wait_for_a_commit("after it started again").await;
    assert!(load.handed() < events.len(), "the load outlasted the kill and the restart");
    load.finish();

    let store_dirs: Vec<&std::path::Path> = stores.iter().map(PathBuf::as_path).collect();
    assert_exact(&topology, &events, jobs, &store_dirs).await;
    stop_watching.store(true, Ordering::Relaxed);
    let sweeps = watching.await.expect("the Redis watcher");
    assert!(sweeps > 10, "Redis versions were read all along ({sweeps} sweeps)");
}
