//! `omni bench --failover`: how long the partitions of an instance lost
//! with its disk take to process again on the other instances.
//!
//! One scenario per `--failover-standbys` value (0 and 1 by default), each
//! with topics, a group, a Redis key prefix and state directories of its
//! own: three `omni run` instances join one group; `--failover-rooms` rooms
//! (1M) get an event each, and the bench waits until every offset is
//! committed and every Redis backlog is empty; a steady load keeps every
//! partition busy, a probe room per partition getting an event every 20 ms.
//! Then the instance owning the most partitions is killed with -9 and its
//! state directory deleted, and the bench times:
//!
//! - kill → rebalanced: the group is stable with the survivors owning every
//!   partition. A killed member never leaves the group, so this waits out
//!   the consumers' `session.timeout.ms` (10 s, set in the runtime's
//!   consumer configuration; a `[kafka] properties` entry overrides it);
//! - rebalanced → processing: each of the dead's partitions has its
//!   committed input offset moved *and* its probe room's Redis version
//!   advanced (the restore, or the standby's catch-up, comes in between);
//! - the total.
//!
//! Progress is sampled every 25 ms from the group's committed offsets and
//! from Redis, and measured against what both held a second after the kill
//! (by then whatever the dead instance had in flight has landed).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use omni::kafka::{ensure_topics, group_assignment, partition_for, KafkaSettings, TopicSpec};
use omni::proto::tecate::{room_event::Kind, RoomEvent, TagSet};
use omni::proto::{timestamp_from_millis, Message as _};
use omni::runtime::member_instance;
use omni::topology::Topology;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use super::process::{group_reader, OmniProcess};
use super::workload::{fast_producer, send};
use super::BenchArgs;

const INSTANCES: usize = 3;
/// The consumers' session timeout, as the runtime sets it: what bounds the rebalance after a kill.
const SESSION_TIMEOUT_MS: u64 = 10_000;
/// Target from the rebalance to every partition processing again, with a standby.
const TARGET_SECONDS: f64 = 3.0;
/// How often each probe room gets an event.
const PROBE_EVERY: Duration = Duration::from_millis(20);
const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// After the kill, what the dead instance had sent (a commit, a Redis
/// pipeline) may still land: progress counts from what was there this long after.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest wait of any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn run(args: &BenchArgs, kafka: &KafkaSettings, redis_url: &str) -> anyhow::Result<()> {
    let id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut scenarios = Vec::new();
    for &standbys in &args.failover_standbys {
        eprintln!("bench {id}: failover with {standbys} standby replica(s)");
        let scenario = Scenario::create(args, kafka, redis_url, &format!("{id}-s{standbys}"), standbys).await?;
        scenarios.push(scenario.run().await?);
    }
    let by_standbys = |n: u64| scenarios.iter().find(|s| s["standby_replicas"] == n);
    let ratio = |key: &str| match (by_standbys(1), by_standbys(0)) {
        (Some(one), Some(none)) => Some(one[key].as_f64()? / none[key].as_f64()?),
        _ => None,
    };
    let report = json!({
        "mode": "failover",
        "rooms": args.failover_rooms,
        "partitions": args.partitions,
        "instances": INSTANCES,
        "threads": args.threads,
        "commit_interval_ms": args.commit_interval_ms,
        "load_events_per_s": args.failover_rate,
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "rebalance_bounded_by": "session.timeout.ms of the input consumers (src/runtime/thread.rs consumer_config)",
        "target_rebalanced_to_processing_s": TARGET_SECONDS,
        "standby_over_none_rebalanced_to_processing": ratio("rebalanced_to_processing_s"),
        "standby_over_none_kill_to_processing": ratio("kill_to_processing_s"),
        "scenarios": scenarios,
    });
    print_table(&report);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One `omni run` of the group, with a state directory of its own.
struct Instance {
    name: String,
    /// `<application_id>-<name>`: its members' `client.id` in the group's
    /// description, less the processing thread's number.
    in_group: String,
    dir: tempfile::TempDir,
    process: Option<OmniProcess>,
}

impl Instance {
    fn process(&self) -> &OmniProcess {
        self.process.as_ref().expect("a live instance")
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        self.process().metrics(&[name]).await.pop().flatten()
    }
}

/// One failover run: its topics, its three instances and its probe rooms.
struct Scenario<'a> {
    args: &'a BenchArgs,
    kafka: &'a KafkaSettings,
    redis_url: &'a str,
    id: String,
    standbys: usize,
    topology: Topology,
    instances: Vec<Instance>,
    /// One preloaded room per partition, in partition order.
    probes: Vec<String>,
    group: BaseConsumer,
}

impl<'a> Scenario<'a> {
    async fn create(
        args: &'a BenchArgs,
        kafka: &'a KafkaSettings,
        redis_url: &'a str,
        id: &str,
        standbys: usize,
    ) -> anyhow::Result<Scenario<'a>> {
        let scratch = tempfile::tempdir()?;
        let mut topology = super::bench_topology(id, args, kafka, redis_url, scratch.path());
        topology.instance.standby_replicas = standbys;
        let input = TopicSpec { name: topology.input_topic().to_owned(), partitions: args.partitions, configs: vec![] };
        ensure_topics(kafka, &[input]).await?;
        let mut instances = Vec::new();
        for i in 1..=INSTANCES {
            let name = format!("i{i}");
            let in_group = format!("{}-{name}", topology.application_id);
            instances.push(Instance { name, in_group, dir: tempfile::tempdir()?, process: None });
        }
        let group = group_reader(kafka, &topology.application_id)?;
        let probes = probe_rooms(args.failover_rooms, args.partitions);
        Ok(Scenario { args, kafka, redis_url, id: id.to_owned(), standbys, topology, instances, probes, group })
    }

    fn instance_topology(&self, instance: &Instance) -> Topology {
        let mut topology = self.topology.clone();
        topology.store.dir = instance.dir.path().join("state");
        topology.instance.id = instance.name.clone();
        topology
    }

    async fn run(mut self) -> anyhow::Result<Value> {
        for i in 0..self.instances.len() {
            let topology = self.instance_topology(&self.instances[i]);
            self.instances[i].process = Some(OmniProcess::spawn(&topology, self.instances[i].dir.path())?);
        }
        // Every instance in the group before any event: no instance holds
        // state of a partition it gave away, which would shorten a restore.
        let owners = self.wait_for_group(INSTANCES, "all three instances to share the partitions").await?;
        eprintln!("bench {}: partitions per instance {:?}", self.id, count_by_owner(&owners));
        let (preload_secs, process_secs) = self.preload().await?;

        let load = SteadyLoad::start(&self, self.args.failover_rate);
        let sampler = Sampler::start(&self)?;
        let outcome = self.fail_one(&sampler).await;
        let load_rate = load.stop()?;
        sampler.stop()?;
        let mut report = outcome?;
        report["preload_s"] = json!(preload_secs);
        report["preload_processed_s"] = json!(process_secs);
        report["load_events_per_s"] = json!(load_rate);
        for instance in &mut self.instances {
            if let Some(process) = instance.process.take() {
                process.terminate()?;
            }
        }
        super::clean_up(self.kafka, self.redis_url, &self.id, &self.topology).await;
        Ok(report)
    }

    /// Produces an event to every room and waits until the group committed
    /// them all and every instance wrote its rooms to Redis. Returns the
    /// seconds of the produce and of the processing.
    async fn preload(&self) -> anyhow::Result<(f64, f64)> {
        let (brokers, input, rooms) =
            (self.kafka.brokers.clone(), self.topology.input_topic().to_owned(), self.args.failover_rooms);
        eprintln!("bench {}: an event to each of {rooms} rooms", self.id);
        let started = Instant::now();
        tokio::task::spawn_blocking(move || preload(&brokers, &input, rooms)).await??;
        let produced = started.elapsed().as_secs_f64();
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let committed = tokio::task::block_in_place(|| {
                committed(&self.group, self.topology.input_topic(), self.args.partitions)
            });
            if committed.is_ok_and(|c| c.iter().map(|&o| o.max(0) as u64).sum::<u64>() >= rooms) {
                let mut drained = true;
                for instance in &self.instances {
                    drained &= instance.metric("omni_redis_backlog_rooms").await == Some(0.0);
                }
                if drained {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the preload was not processed within {STEP_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let processed = started.elapsed().as_secs_f64();
        eprintln!("bench {}: produced in {produced:.1} s, processed and in Redis after {processed:.1} s", self.id);
        Ok((produced, processed))
    }

    /// With the load running: waits until every partition progresses (and,
    /// when this build reports standbys, until each has its standbys), kills
    /// the instance owning the most partitions, deletes its state directory,
    /// and times the takeover.
    async fn fail_one(&mut self, sampler: &Sampler) -> anyhow::Result<Value> {
        let warm_from = Instant::now();
        sampler.wait_for_progress(warm_from, &(0..self.args.partitions).collect::<Vec<_>>()).await?;
        let standby_metrics = self.wait_for_standbys().await?;
        let owners = self.membership_now()?.owners;
        let counts = count_by_owner(&owners);
        let victim = (0..self.instances.len())
            .max_by_key(|&i| (counts.get(&self.instances[i].in_group).copied().unwrap_or(0), std::cmp::Reverse(i)))
            .expect("instances");
        let victim_client = self.instances[victim].in_group.clone();
        let lost: Vec<i32> = owners.iter().filter(|(_, c)| **c == victim_client).map(|(p, _)| *p).collect();
        let survivors: Vec<usize> = (0..self.instances.len()).filter(|&i| i != victim).collect();
        let restored_before = self.sum_metric(&survivors, "omni_restored_records_total").await;
        let standby_records_before = self.sum_metric(&survivors, "omni_standby_records_total").await;

        let name = self.instances[victim].name.clone();
        eprintln!("bench {}: kill -9 {name} (partitions {lost:?}) and delete its state directory", self.id);
        self.instances[victim].process.take().expect("a live victim").kill()?;
        let killed = Instant::now();
        std::fs::remove_dir_all(self.instances[victim].dir.path().join("state"))?;

        let owners = self.wait_for_group(INSTANCES - 1, "the survivors to own every partition").await?;
        let rebalanced = Instant::now();
        eprintln!("bench {}: rebalanced {:.2} s after the kill", self.id, (rebalanced - killed).as_secs_f64());
        let progress = sampler.wait_for_progress(killed + SETTLE, &lost).await?;
        let restored = self.sum_metric(&survivors, "omni_restored_records_total").await;
        let standby_records = self.sum_metric(&survivors, "omni_standby_records_total").await;

        let since_kill = |at: Instant| (at - killed).as_secs_f64();
        let processing = progress.values().map(|p| p.processing()).max().unwrap_or(rebalanced).max(rebalanced);
        let partitions: Vec<Value> = lost
            .iter()
            .map(|p| {
                json!({
                    "partition": p,
                    "new_owner": owners.get(p).map(|c| c.trim_start_matches(&format!("{}-", self.id))),
                    "offsets_moved_s_after_kill": since_kill(progress[p].offsets_moved),
                    "redis_advanced_s_after_kill": since_kill(progress[p].redis_advanced),
                })
            })
            .collect();
        let rebalanced_to_processing = (processing - rebalanced).as_secs_f64();
        eprintln!(
            "bench {}: every lost partition processing {rebalanced_to_processing:.2} s after the rebalance",
            self.id
        );
        let delta = |after: Option<f64>, before: Option<f64>| Some(after? - before?);
        Ok(json!({
            "standby_replicas": self.standbys,
            "standby_metrics_reported": standby_metrics.is_some(),
            "standby_partitions_before_kill": standby_metrics,
            "victim": name,
            "victim_partitions": lost,
            "kill_to_rebalanced_s": since_kill(rebalanced),
            "rebalanced_to_processing_s": rebalanced_to_processing,
            "kill_to_processing_s": since_kill(processing),
            "meets_target": rebalanced_to_processing <= TARGET_SECONDS,
            "restored_records": delta(restored, restored_before),
            "standby_records_during_takeover": delta(standby_records, standby_records_before),
            "lost_partitions": partitions,
        }))
    }

    /// With standbys asked for and reported (`omni_standby_partitions`),
    /// waits until the instances follow `standbys` copies of every
    /// partition and the copies are caught up (`omni_standby_lag_records`
    /// within a second of the steady load), as in a job running for a
    /// while; returns how many they follow, `None` if this build does not
    /// report standbys.
    async fn wait_for_standbys(&self) -> anyhow::Result<Option<f64>> {
        let all: Vec<usize> = (0..self.instances.len()).collect();
        let want = (self.standbys * self.args.partitions as usize) as f64;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let following = self.sum_metric(&all, "omni_standby_partitions").await;
            let lag = self.sum_metric(&all, "omni_standby_lag_records").await.unwrap_or(f64::MAX);
            match following {
                None => return Ok(None),
                Some(n) if n >= want && lag <= self.args.failover_rate as f64 => return Ok(Some(n)),
                Some(_) => {}
            }
            anyhow::ensure!(Instant::now() < deadline, "the standbys were not set up within {STEP_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A metric summed over the instances at `which`; `None` if one does not report it.
    async fn sum_metric(&self, which: &[usize], name: &str) -> Option<f64> {
        let mut sum = 0.0;
        for &i in which {
            sum += self.instances[i].metric(name).await?;
        }
        Some(sum)
    }

    fn membership_now(&self) -> anyhow::Result<Membership> {
        tokio::task::block_in_place(|| {
            membership(&self.group, &self.topology.application_id, self.topology.input_topic())
        })
    }

    /// Waits until the group is stable with `members` members owning every
    /// partition; returns each partition's owner (its client id).
    async fn wait_for_group(&self, members: usize, what: &str) -> anyhow::Result<BTreeMap<i32, String>> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.membership_now() {
                Ok(m) if m.stable && m.members == members && m.owners.len() == self.args.partitions as usize => {
                    return Ok(m.owners)
                }
                Ok(_) => {}
                Err(e) => eprintln!("bench {}: describing the group failed ({e}); asking again", self.id),
            }
            anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn count_by_owner(owners: &BTreeMap<i32, String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for owner in owners.values() {
        *counts.entry(owner.clone()).or_default() += 1;
    }
    counts
}

fn room(r: u64) -> String {
    format!("app/bench/room/m{r}")
}

/// The first room of each partition, among `rooms`.
fn probe_rooms(rooms: u64, partitions: i32) -> Vec<String> {
    let mut probes: Vec<Option<String>> = vec![None; partitions as usize];
    for r in 0..rooms {
        let name = room(r);
        let slot = &mut probes[partition_for(name.as_bytes(), partitions) as usize];
        if slot.is_none() {
            *slot = Some(name);
        }
        if probes.iter().all(Option::is_some) {
            break;
        }
    }
    probes.into_iter().map(|p| p.unwrap_or_else(|| "app/bench/room/none".into())).collect()
}

/// A tag set that always changes its room: the value counts up.
fn tag_event(n: u64) -> Vec<u8> {
    RoomEvent {
        event_id: format!("f{n}"),
        occurred_at: Some(timestamp_from_millis(chrono::Utc::now().timestamp_millis())),
        kind: Some(Kind::TagSet(TagSet { key: "load".into(), value: n.to_string() })),
    }
    .encode_to_vec()
}

/// One event to each of `rooms` rooms.
fn preload(brokers: &str, topic: &str, rooms: u64) -> anyhow::Result<()> {
    let producer = fast_producer(brokers, 20)?;
    for r in 0..rooms {
        send(&producer, topic, &room(r), &tag_event(r))?;
        if r % 10_000 == 0 {
            omni::kafka::serve_ready(&producer);
        }
    }
    producer.flush(Duration::from_secs(300))?;
    Ok(())
}

/// Events at a fixed rate to random rooms, and to every probe room each
/// [`PROBE_EVERY`], on a thread of their own until stopped.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<f64>>,
}

impl SteadyLoad {
    fn start(scenario: &Scenario<'_>, rate: u64) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let (brokers, topic) = (scenario.kafka.brokers.clone(), scenario.topology.input_topic().to_owned());
        let (rooms, probes, seed) = (scenario.args.failover_rooms, scenario.probes.clone(), scenario.args.seed);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let producer = fast_producer(&brokers, 5)?;
                let mut rng = StdRng::seed_from_u64(seed);
                let started = Instant::now();
                let (mut events, mut next_probe) = (0u64, started);
                while !stop.load(Ordering::Relaxed) {
                    while (events as f64) < started.elapsed().as_secs_f64() * rate as f64 {
                        send(&producer, &topic, &room(rng.random_range(0..rooms)), &tag_event(events))?;
                        events += 1;
                    }
                    if Instant::now() >= next_probe {
                        for probe in &probes {
                            send(&producer, &topic, probe, &tag_event(events))?;
                            events += 1;
                        }
                        next_probe += PROBE_EVERY;
                    }
                    omni::kafka::serve_ready(&producer);
                    std::thread::sleep(Duration::from_millis(5));
                }
                producer.flush(Duration::from_secs(60))?;
                Ok(events as f64 / started.elapsed().as_secs_f64())
            })
        };
        SteadyLoad { stop, thread }
    }

    /// Stops the load; returns the events per second it produced.
    fn stop(self) -> anyhow::Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))?
    }
}

/// What the services held at one moment: each partition's committed input
/// offset, and each probe room's Redis version, each read at its own time.
struct Sample {
    offsets_at: Instant,
    offsets: Vec<i64>,
    versions_at: Instant,
    versions: Vec<u64>,
}

/// When a partition was first seen processing after a moment.
struct Progress {
    offsets_moved: Instant,
    redis_advanced: Instant,
}

impl Progress {
    /// Processing again: both its offsets and its Redis rooms move.
    fn processing(&self) -> Instant {
        self.offsets_moved.max(self.redis_advanced)
    }
}

/// Samples committed offsets and probe versions every [`SAMPLE_EVERY`] on a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl Sampler {
    fn start(scenario: &Scenario<'_>) -> anyhow::Result<Sampler> {
        let (stop, samples) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let group = group_reader(scenario.kafka, &scenario.topology.application_id)?;
        let (topic, partitions) = (scenario.topology.input_topic().to_owned(), scenario.args.partitions);
        let keys = omni::view::KeyLayout::new(&scenario.topology.redis.key_prefix);
        let probe_keys: Vec<String> = scenario.probes.iter().map(|p| keys.room(p)).collect();
        let client = redis::Client::open(scenario.redis_url)?;
        let thread = {
            let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
            std::thread::spawn(move || {
                let mut redis = client.get_connection_with_timeout(Duration::from_secs(5))?;
                redis.set_read_timeout(Some(Duration::from_secs(5)))?;
                while !stop.load(Ordering::Relaxed) {
                    let next = Instant::now() + SAMPLE_EVERY;
                    // A broker slow to answer under load is asked again at the next sample.
                    if let Ok(offsets) = committed(&group, &topic, partitions) {
                        let offsets_at = Instant::now();
                        let mut pipe = redis::pipe();
                        for key in &probe_keys {
                            pipe.hget(key, "version");
                        }
                        // A Redis slow to answer is asked again too.
                        if let Ok(versions) = pipe.query::<Vec<Option<u64>>>(&mut redis) {
                            let versions = versions.into_iter().map(Option::unwrap_or_default).collect();
                            let sample = Sample { offsets_at, offsets, versions_at: Instant::now(), versions };
                            samples.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
                        }
                    }
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                Ok(())
            })
        };
        Ok(Sampler { stop, samples, thread })
    }

    /// Waits until each of `partitions` progressed past what the first
    /// sample taken at or after `from` held; returns when each did.
    async fn wait_for_progress(&self, from: Instant, partitions: &[i32]) -> anyhow::Result<BTreeMap<i32, Progress>> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(progress) = self.progress(from, partitions) {
                return Ok(progress);
            }
            anyhow::ensure!(!self.thread.is_finished(), "the sampler stopped");
            anyhow::ensure!(
                Instant::now() < deadline,
                "partitions {partitions:?} did not progress within {STEP_TIMEOUT:?}"
            );
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    fn progress(&self, from: Instant, partitions: &[i32]) -> Option<BTreeMap<i32, Progress>> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let start = samples.iter().position(|s| s.offsets_at >= from)?;
        let (baseline, later) = (&samples[start], &samples[start + 1..]);
        let mut progress = BTreeMap::new();
        for &p in partitions {
            let i = p as usize;
            let offsets_moved = later.iter().find(|s| s.offsets[i] > baseline.offsets[i])?.offsets_at;
            let redis_advanced = later.iter().find(|s| s.versions[i] > baseline.versions[i])?.versions_at;
            progress.insert(p, Progress { offsets_moved, redis_advanced });
        }
        Some(progress)
    }

    fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("the sampler panicked"))?
    }
}

/// Each partition's committed offset (-1 where none is).
fn committed(reader: &BaseConsumer, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = reader.committed_offsets(list, Duration::from_secs(10))?;
    let mut offsets = vec![-1; partitions as usize];
    for e in committed.elements() {
        if let (Offset::Offset(o), Some(slot)) = (e.offset(), offsets.get_mut(e.partition() as usize)) {
            *slot = o;
        }
    }
    Ok(offsets)
}

/// The group as its coordinator describes it.
struct Membership {
    stable: bool,
    members: usize,
    /// Each assigned partition of the input and its owner instance.
    owners: BTreeMap<i32, String>,
}

fn membership(reader: &BaseConsumer, group: &str, topic: &str) -> anyhow::Result<Membership> {
    let described = group_assignment(reader, group, topic, Duration::from_secs(5))?;
    let owners = described
        .members
        .iter()
        .flat_map(|m| m.partitions.iter().map(|&p| (p, member_instance(&m.client_id).to_owned())))
        .collect();
    Ok(Membership { stable: described.stable(), members: described.members.len(), owners })
}

fn print_table(report: &Value) {
    let num = |v: &Value| v.as_f64().map_or("-".to_owned(), |f| format!("{f:.2}"));
    println!(
        "failover: {} rooms, {} partitions, {} instances, load {} events/s",
        report["rooms"], report["partitions"], report["instances"], report["load_events_per_s"]
    );
    for s in report["scenarios"].as_array().into_iter().flatten() {
        println!(
            "standbys {}: kill → rebalanced {} s (session timeout {} ms), rebalanced → processing {} s, total {} s, \
             restored records {}",
            s["standby_replicas"],
            num(&s["kill_to_rebalanced_s"]),
            report["session_timeout_ms"],
            num(&s["rebalanced_to_processing_s"]),
            num(&s["kill_to_processing_s"]),
            s["restored_records"],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_partition_gets_a_probe_room_of_its_own() {
        let probes = probe_rooms(1000, 8);
        assert_eq!(probes.len(), 8);
        for (p, room) in probes.iter().enumerate() {
            assert_eq!(partition_for(room.as_bytes(), 8), p as i32, "{room}");
        }
    }
}
