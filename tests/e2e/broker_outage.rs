//! Transient faults are retried, not fatal, and never destroy local state:
//! the broker restarted three times under load, a job process stopped past
//! its session and transaction timeouts and woken again (alone, and after
//! its partitions moved to another instance), and the broker restarted
//! while the job restores its store. The job runs as an `omni run` process,
//! which must never exit, and every run must end exact.
//!
//! These tests stop and start a Kafka broker, so they run against services
//! of their own ([`outage_services`]), in the broker-outage stage of
//! `integration/test.sh`, one at a time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omni::proto::tecate::room_event::Kind;
use omni::proto::tecate::{RoomEvent, TagSet};
use omni::proto::Message as _;
use omni::topology::Topology;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::common::*;

/// Longest a job may take to commit again once the broker is back: its
/// clients reconnect with a back-off of up to 10 s, and a fenced producer
/// is rebuilt and its partitions restored before they are consumed. A
/// commit caught by a broker's death can first wait out the 30 s Kafka
/// timeout in each of its three steps (offsets, delivery, commit) before it
/// is aborted: seen once in the cluster stage on a loaded machine.
const RECOVERY: Duration = Duration::from_secs(150);

/// A test's scratch folder: state directories, topology files, job logs.
/// Kept when the test fails (or `OMNI_OUTAGE_KEEP` is set), so the logs can be read.
pub(crate) struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch(Some(tempfile::Builder::new().prefix("omni-outage-").tempdir().unwrap()))
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep = std::env::var_os("OMNI_OUTAGE_KEEP").is_some();
        if std::thread::panicking() || keep {
            if let Some(dir) = self.0.take() {
                eprintln!("the test's folder (job logs, state) is kept at {}", dir.keep().display());
            }
        }
    }
}

/// An `omni run` process with its operations endpoint on a port of its own.
/// Killed if the test ends without terminating it.
pub(crate) struct Job {
    process: Option<JobProcess>,
    addr: String,
    name: String,
}

/// Starts `omni run` for `topology` as `instance`, with its store in `store`.
pub(crate) fn spawn(topology: &Topology, dir: &Path, instance: &str, store: &Path) -> Job {
    let mut t = topology.clone();
    t.store.dir = store.to_owned();
    let addr = format!("127.0.0.1:{}", pick_free_port());
    t.http.listen = addr.clone();
    Job { process: Some(JobProcess::spawn(&t, dir, instance)), addr, name: instance.to_owned() }
}

impl Job {
    fn process(&mut self) -> &mut JobProcess {
        self.process.as_mut().expect("the job runs")
    }

    fn pid(&mut self) -> String {
        self.process().child.id().to_string()
    }

    pub(crate) fn log_text(&mut self) -> String {
        self.process().log_text()
    }

    /// Fails the test if the process exited.
    pub(crate) fn alive(&mut self, when: &str) {
        let when = format!("({}) {when}", self.name);
        self.process().assert_running(&when);
    }

    /// The job's `/metrics`, failing the test if the process exited.
    async fn metrics(&mut self) -> Option<String> {
        self.alive("while its metrics were read");
        match http_get(&self.addr, "/metrics").await {
            Some((200, body)) => Some(body),
            _ => None,
        }
    }

    /// A metric summed over its label sets, 0 when absent.
    pub(crate) async fn metric(&mut self, name: &str) -> f64 {
        let text = self.metrics().await.unwrap_or_else(|| panic!("{}: /metrics did not answer", self.name));
        metric_sum(&text, name).unwrap_or(0.0)
    }

    /// Transactions committed so far.
    async fn commits(&mut self) -> f64 {
        self.metric("omni_commit_seconds_count").await
    }

    /// Waits until the job has committed after now: it is consuming and
    /// its transactions go through.
    pub(crate) async fn wait_for_a_commit(&mut self, what: &str) -> Duration {
        let started = Instant::now();
        let before = self.commits().await;
        let what = format!("{} to commit {what}", self.name);
        wait_for(RECOVERY, &what, || {
            self.alive(&format!("while waiting for it to commit {what}"));
            let addr = self.addr.clone();
            async move {
                let text = http_get(&addr, "/metrics").await?.1;
                (metric_sum(&text, "omni_commit_seconds_count")? > before).then_some(())
            }
        })
        .await;
        started.elapsed()
    }

    /// Waits until `/readyz` answers 200 with `body`, or any 200 for `None`.
    pub(crate) async fn wait_ready(&mut self, body: Option<&str>, timeout: Duration) {
        let what = format!("{} to be ready ({})", self.name, body.unwrap_or("any partitions"));
        wait_for(timeout, &what, || {
            self.alive("while waiting for it to be ready");
            let addr = self.addr.clone();
            async move {
                let (status, text) = http_get(&addr, "/readyz").await?;
                (status == 200 && body.is_none_or(|b| text.trim() == b)).then_some(())
            }
        })
        .await;
    }

    /// Keeps checking the process is alive for `span`: the deliberate length
    /// of an outage the scenario stages.
    pub(crate) async fn stays_alive_for(&mut self, span: Duration, when: &str) {
        let end = Instant::now() + span;
        while Instant::now() < end {
            self.alive(when);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends the process a signal (`STOP`, `CONT`) by its pid.
    fn signal(&mut self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGTERM, then a clean exit.
    fn terminate(mut self) {
        let process = self.process.take().expect("the job runs");
        let log = process.log.clone();
        process.terminate();
        keep_log(&log, "stopped");
    }

    /// kill -9.
    pub(crate) fn kill9(mut self) {
        let process = self.process.take().expect("the job runs");
        let log = process.log.clone();
        process.kill9();
        keep_log(&log, "killed");
    }
}

/// Moves an ended job's log aside (`i1.log` → `i1.1.killed.log`), so that
/// the instance started again under the same name does not overwrite it.
fn keep_log(log: &Path, how: &str) {
    let taken = |n: usize| ["stopped", "killed"].iter().any(|h| log.with_extension(format!("{n}.{h}.log")).exists());
    let n = (1..).find(|&n| !taken(n)).unwrap();
    std::fs::rename(log, log.with_extension(format!("{n}.{how}.log"))).unwrap();
}

impl Drop for Job {
    fn drop(&mut self) {
        // A failed test must not leave its job running in the group.
        if let Some(mut process) = self.process.take() {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

/// Counts the load's deliveries and keeps its failures.
#[derive(Clone, Default)]
struct Deliveries {
    acknowledged: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => self.failed.lock().unwrap().push(e.to_string()),
        }
    }
}

/// Events produced to the input on a thread of their own, a chunk at a
/// time, while the test stages its faults. The producer is idempotent, so
/// every room's events land in order and once, and it waits out outages
/// far longer than the tests stage: an event is never given up.
pub(crate) struct Load {
    thread: std::thread::JoinHandle<Result<(), String>>,
    /// Events handed to the producer so far.
    handed: Arc<AtomicUsize>,
    /// Set to produce what is left at once.
    hurry: Arc<AtomicBool>,
    deliveries: Deliveries,
    total: usize,
}

impl Load {
    /// Produces `events` to the input of `topology`, `chunk` events every `pace`.
    pub(crate) fn start(topology: &Topology, events: Vec<(String, RoomEvent)>, chunk: usize, pace: Duration) -> Load {
        let deliveries = Deliveries::default();
        let producer: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", &topology.kafka.brokers)
            .set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "600000")
            // Back quickly once the broker is: the load is not what is tested.
            .set("reconnect.backoff.max.ms", "1000")
            .create_with_context(deliveries.clone())
            .expect("load producer");
        let handed = Arc::new(AtomicUsize::new(0));
        let hurry = Arc::new(AtomicBool::new(false));
        let topic = topology.input_topic().to_owned();
        let total = events.len();
        let thread = {
            let (handed, hurry) = (Arc::clone(&handed), Arc::clone(&hurry));
            std::thread::spawn(move || {
                for part in events.chunks(chunk) {
                    for (room, event) in part {
                        let value = event.encode_to_vec();
                        let record = BaseRecord::to(&topic).key(room.as_bytes()).payload(&value[..]);
                        omni::kafka::send(&producer, record).map_err(|e| format!("producing: {e}"))?;
                    }
                    handed.fetch_add(part.len(), Ordering::Relaxed);
                    let next = Instant::now() + pace;
                    while Instant::now() < next && !hurry.load(Ordering::Relaxed) {
                        producer.poll(Duration::from_millis(20));
                    }
                }
                let deadline = Instant::now() + Duration::from_secs(300);
                while producer.in_flight_count() > 0 && Instant::now() < deadline {
                    producer.poll(Duration::from_millis(50));
                }
                match producer.in_flight_count() {
                    0 => Ok(()),
                    n => Err(format!("{n} events still unacknowledged after 300 s")),
                }
            })
        };
        Load { thread, handed, hurry, deliveries, total }
    }

    pub(crate) fn handed(&self) -> usize {
        self.handed.load(Ordering::Relaxed)
    }

    /// Produces the rest at once and waits until every event is acknowledged.
    pub(crate) fn finish(self) {
        self.hurry.store(true, Ordering::Relaxed);
        let outcome = self.thread.join().expect("the load thread");
        let failed = self.deliveries.failed.lock().unwrap().clone();
        assert!(failed.is_empty(), "the test's producer lost events (not the job's doing): {failed:?}");
        outcome.unwrap_or_else(|e| panic!("the test's producer: {e}"));
        assert_eq!(self.deliveries.acknowledged.load(Ordering::Relaxed), self.total, "events acknowledged");
    }
}

/// The number of log lines after byte `from` that contain `needle`, once
/// stripped of the colours the job's log has (`lost=true` is written as
/// `lost\x1b[0m\x1b[2m=\x1b[0mtrue`).
pub(crate) fn lines_with(text: &str, from: usize, needle: &str) -> usize {
    text.get(from..).unwrap_or_default().lines().filter(|l| strip_colours(l).contains(needle)).count()
}

/// `line` without its ANSI escape sequences (`ESC [ … letter`).
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks the outcome of a run against the model: the broadcast, Redis,
/// and, once every job has stopped, the stores.
pub(crate) async fn assert_exact(
    topology: &Topology,
    events: &[(String, RoomEvent)],
    jobs: Vec<Job>,
    stores: &[&Path],
) {
    let started = Instant::now();
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, events);
    let changes = read_broadcast_at(&topology.kafka.brokers, &topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    let broadcast = started.elapsed();
    assert_redis_exact(topology, &folder, &expected).await;
    let redis = started.elapsed();
    for mut job in jobs {
        job.alive("at the end of the run");
        job.terminate();
    }
    assert_store_exact(stores, topology.partitions, &expected);
    eprintln!(
        "exact: {} changes over {} rooms; checked in {:.1?} (broadcast {broadcast:.1?}, redis {:.1?}, stop and stores {:.1?})",
        expected.total_changes,
        expected.rooms.len(),
        started.elapsed(),
        redis - broadcast,
        started.elapsed() - redis
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_broker_restarts_under_load_never_stop_the_job_and_the_run_stays_exact() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    outage_broker("start");
    let topology = outage_topology("restarts", 4, &dir.join("state"));
    create_input(&topology).await;
    let events = generate(51, 20_000, 300);

    let mut job = spawn(&topology, dir, "i1", &topology.store.dir);
    job.wait_ready(None, Duration::from_secs(90)).await;
    // About 100 events a second, enough to outlast the three outages and the
    // recoveries after them, in small chunks so a transaction is nearly
    // always open; whatever is left goes at once after the last outage.
    let load = Load::start(&topology, events.clone(), 5, Duration::from_millis(50));
    job.wait_for_a_commit("before the first outage").await;
    for (round, down) in [8, 14, 20].into_iter().enumerate() {
        let handed = load.handed();
        outage_broker("stop");
        job.stays_alive_for(Duration::from_secs(down), &format!("while the broker was down ({down} s)")).await;
        outage_broker("start");
        assert!(load.handed() > handed, "events were produced during outage {}", round + 1);
        let back = job.wait_for_a_commit(&format!("after outage {}", round + 1)).await;
        eprintln!("outage {}: the broker down {down} s, the job committing {back:.1?} after it was back", round + 1);
    }
    assert!(load.handed() < events.len(), "the load outlasted the outages");
    load.finish();

    // How the job rode the outages out varies with where each caught it: a
    // commit retried until the broker was back, a transaction aborted and
    // the input rewound, a fenced producer rebuilt, partitions lost with the
    // group session and restored when given back. Any will do, as long as
    // the job lives on and the run is exact.
    let log = job.log_text();
    let ways = ["step of the transaction commit failed; retrying", "aborting it and rewinding", "producer rebuilt"];
    let ways: Vec<_> = ways.iter().map(|&w| (w, lines_with(&log, 0, w))).collect();
    eprintln!("three restarts: {ways:?}, partitions lost {} times", lines_with(&log, 0, "lost=true"));
    let store = topology.store.dir.clone();
    assert_exact(&topology, &events, vec![job], &[&store]).await;
}

/// How long a zombie sleeps: past its session timeout (10 s), its
/// transaction timeout (10 s) and the coordinator's sweep for timed-out
/// transactions (every 10 s), so its open transaction is aborted under it
/// and its producer's epoch bumped.
const ZOMBIE_SLEEP: Duration = Duration::from_secs(30);

/// Log lines of a thread recovering from a failed transaction or a fencing.
const RECOVERY_LINES: [&str; 3] = ["producer rebuilt", "aborting it and rewinding", "producer fenced"];

/// The recovery lines logged after byte `from`, by kind.
fn recoveries_after(log: &str, from: usize) -> Vec<(&'static str, usize)> {
    RECOVERY_LINES.iter().map(|&line| (line, lines_with(log, from, line))).filter(|(_, n)| *n > 0).collect()
}

/// The last stable offset (where read_committed readers stop) and the high
/// watermark of each partition of `topic`.
fn stable_and_high(brokers: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
    let client = |isolation: &str| -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("isolation.level", isolation)
            .create()
            .expect("watermarks client")
    };
    let (committed, uncommitted) = (client("read_committed"), client("read_uncommitted"));
    (0..partitions)
        .map(|p| {
            let timeout = Duration::from_secs(10);
            let stable = committed.fetch_watermarks(topic, p, timeout).expect("last stable offset").1;
            let high = uncommitted.fetch_watermarks(topic, p, timeout).expect("high watermark").1;
            (stable, high)
        })
        .collect()
}

/// Whether the job's group has committed every input record produced so far.
fn all_committed(topology: &Topology) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &topology.kafka.brokers)
        .set("group.id", &topology.application_id)
        .set("isolation.level", "read_committed")
        .create()
        .expect("offsets client");
    let input = topology.input_topic();
    let mut partitions = TopicPartitionList::new();
    for p in 0..topology.partitions {
        partitions.add_partition(input, p);
    }
    let Ok(committed) = consumer.committed_offsets(partitions, Duration::from_secs(10)) else { return false };
    committed.elements().iter().all(|element| {
        let end = consumer.fetch_watermarks(input, element.partition(), Duration::from_secs(10)).ok().map(|w| w.1);
        match (element.offset(), end) {
            (Offset::Offset(at), Some(end)) => at >= end,
            // Nothing committed yet: done only if nothing was produced there.
            (_, Some(end)) => end == 0,
            _ => false,
        }
    })
}

/// SIGSTOPs the job while a transaction of its is open, so the coordinator
/// times it out under the sleeping job: its broadcast records hold a
/// partition's last stable offset behind the high watermark, and still do a
/// second later (a commit under way would have moved it on by then; another
/// instance's transactions commit within the commit interval). Tries again,
/// woken between attempts, until it caught one. Returns when it stopped it.
async fn stop_mid_transaction(job: &mut Job, topology: &Topology) -> Instant {
    let (brokers, topic) = (&topology.kafka.brokers, &topology.broadcast_topic);
    for _ in 0..20 {
        job.signal("STOP");
        let stopped = Instant::now();
        let first = stable_and_high(brokers, topic, topology.partitions);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = stable_and_high(brokers, topic, topology.partitions);
        if first.iter().zip(&second).any(|(&(before, _), &(stable, high))| stable == before && stable < high) {
            return stopped;
        }
        job.signal("CONT");
        job.wait_for_a_commit("before it is stopped again").await;
    }
    panic!("{} was never stopped with a transaction open in 20 attempts", job.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_woken_after_its_session_rebuilds_its_producer_and_the_run_stays_exact() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    outage_broker("start");
    let topology = outage_topology("zombie", 4, &dir.join("state"));
    create_input(&topology).await;
    let events = generate(52, 12_000, 300);

    let mut job = spawn(&topology, dir, "i1", &topology.store.dir);
    job.wait_ready(None, Duration::from_secs(90)).await;
    let load = Load::start(&topology, events.clone(), 50, Duration::from_millis(250));
    job.wait_for_a_commit("before it is stopped").await;
    let handed = load.handed();
    let stopped = stop_mid_transaction(&mut job, &topology).await;
    tokio::time::sleep(ZOMBIE_SLEEP.saturating_sub(stopped.elapsed())).await;
    assert!(load.handed() > handed, "events were produced while the job was stopped");
    let woken = job.log_text().len();
    job.signal("CONT");
    let back = job.wait_for_a_commit("after it was woken").await;
    eprintln!("the zombie committing again {back:.1?} after it was woken");

    let log = job.log_text();
    let recoveries = recoveries_after(&log, woken);
    eprintln!("after waking: {recoveries:?}");
    assert!(
        lines_with(&log, woken, "producer rebuilt") > 0,
        "the woken job did not rebuild its fenced producer (recoveries after waking: {recoveries:?})"
    );
    assert!(job.metric("omni_producer_rebuilds_total").await >= 1.0, "omni_producer_rebuilds_total counts it");
    load.finish();
    let store = topology.store.dir.clone();
    assert_exact(&topology, &events, vec![job], &[&store]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_woken_after_its_partitions_moved_is_fenced_and_rejoins_and_the_run_stays_exact() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    outage_broker("start");
    let topology = outage_topology("zombie2", 4, &dir.join("a"));
    create_input(&topology).await;
    let events = generate(53, 12_000, 300);
    let (store_a, store_b) = (dir.join("a"), dir.join("b"));

    let mut zombie = spawn(&topology, dir, "i1", &store_a);
    zombie.wait_ready(None, Duration::from_secs(90)).await;
    let mut other = spawn(&topology, dir, "i2", &store_b);
    other.wait_ready(None, Duration::from_secs(90)).await;
    let load = Load::start(&topology, events.clone(), 50, Duration::from_millis(250));
    wait_for(Duration::from_secs(60), "the two instances to share the partitions", || {
        zombie.alive("while the partitions were shared out");
        other.alive("while the partitions were shared out");
        let (a, b) = (zombie.addr.clone(), other.addr.clone());
        async move {
            let a = scraped_metric(&a, "omni_assigned_partitions").await?;
            let b = scraped_metric(&b, "omni_assigned_partitions").await?;
            (a > 0.0 && b > 0.0 && a + b == 4.0).then_some(())
        }
    })
    .await;
    zombie.wait_for_a_commit("before it is stopped").await;

    let stopped = stop_mid_transaction(&mut zombie, &topology).await;
    // Its session expires, and its partitions move to the other instance,
    // which restores them once the zombie's open transaction is aborted.
    other.wait_ready(Some("ready: 4 partitions"), Duration::from_secs(60)).await;
    other.wait_for_a_commit("with every partition").await;
    let moved = stopped.elapsed();
    tokio::time::sleep(ZOMBIE_SLEEP.saturating_sub(moved)).await;
    let woken = zombie.log_text().len();
    zombie.signal("CONT");
    eprintln!("the partitions moved {moved:.1?} after the zombie was stopped; woken after {:.1?}", stopped.elapsed());

    // It finds itself out of the group, rejoins, gets partitions back and commits.
    wait_for(RECOVERY, "the woken zombie to own partitions again", || {
        zombie.alive("while it rejoined");
        let addr = zombie.addr.clone();
        async move { (scraped_metric(&addr, "omni_assigned_partitions").await? > 0.0).then_some(()) }
    })
    .await;
    let back = zombie.wait_for_a_commit("after it rejoined").await;
    eprintln!("the zombie committing again {back:.1?} after it owned partitions again");
    let log = zombie.log_text();
    let recoveries = recoveries_after(&log, woken);
    eprintln!("after waking: {recoveries:?}");
    // Fenced twice over: by the group (its partitions were lost under it) and
    // by the coordinator (its open transaction timed out, its epoch bumped).
    assert!(lines_with(&log, woken, "lost=true") > 0, "the woken zombie did not find its partitions lost");
    assert!(
        lines_with(&log, woken, "producer rebuilt") > 0,
        "the woken zombie did not rebuild its fenced producer (recoveries after waking: {recoveries:?})"
    );
    other.alive("after the zombie rejoined");
    load.finish();
    assert_exact(&topology, &events, vec![zombie, other], &[&store_a, &store_b]).await;
}

/// A restore's progress, from the job's `/metrics` and `/readyz`.
#[derive(Debug, Clone, Copy)]
struct RestoreProgress {
    /// `omni_restore_remaining_records`, over the partitions whose restore
    /// has begun (at most two restore at once; the others wait their turn).
    remaining: f64,
    /// `omni_restored_records_total`: records written to the store.
    restored: f64,
    /// Whether `/readyz` says the job is ready with all `partitions`
    /// restored (an instance whose partitions were lost is ready with none).
    ready: bool,
}

impl Job {
    async fn restore_progress(&mut self, partitions: i32) -> Option<RestoreProgress> {
        let text = self.metrics().await?;
        let (status, body) = http_get(&self.addr, "/readyz").await?;
        let ready = status == 200 && body.trim() == format!("ready: {partitions} partitions");
        Some(RestoreProgress {
            remaining: metric_sum(&text, "omni_restore_remaining_records").unwrap_or(0.0),
            restored: metric_sum(&text, "omni_restored_records_total").unwrap_or(0.0),
            ready,
        })
    }

    /// Polls `/metrics` back to back (a restore can be quick) until `until`
    /// holds for the restore's progress, and returns that progress.
    async fn watch_restore(
        &mut self,
        partitions: i32,
        what: &str,
        until: impl Fn(RestoreProgress) -> bool,
    ) -> RestoreProgress {
        let deadline = Instant::now() + RECOVERY;
        loop {
            if let Some(progress) = self.restore_progress(partitions).await {
                if until(progress) {
                    return progress;
                }
            }
            assert!(Instant::now() < deadline, "{}: timed out waiting for {what}", self.name);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Each partition's `from` offsets, in the order the job's restores began
/// ("restoring from the changelog partition=… from=… to=…").
fn restore_starts(log: &str) -> std::collections::BTreeMap<i32, Vec<i64>> {
    let mut starts = std::collections::BTreeMap::<i32, Vec<i64>>::new();
    for line in log.lines().map(strip_colours).filter(|l| l.contains("restoring from the changelog")) {
        let field = |name: &str| -> i64 {
            let value = line.split(&format!(" {name}=")).nth(1).and_then(|rest| rest.split(' ').next());
            value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {name} in: {line}"))
        };
        starts.entry(field("partition") as i32).or_default().push(field("from"));
    }
    starts
}

/// The records the changelog holds, over its partitions (high watermark less
/// low): all that a restore from scratch reads.
fn changelog_span(topology: &Topology) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &topology.kafka.brokers)
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("watermarks client");
    let changelog = topology.changelog_topic();
    (0..topology.partitions)
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(&changelog, p, Duration::from_secs(10)).expect("watermarks");
            high - low
        })
        .sum()
}

/// Produces `events` at once and waits until the job committed them all.
async fn process_all(job: &mut Job, topology: &Topology, events: &[(String, RoomEvent)]) {
    Load::start(topology, events.to_vec(), events.len().max(1), Duration::ZERO).finish();
    wait_for(Duration::from_secs(180), "the job to commit every event", || {
        job.alive("while it processed the events");
        let done = all_committed(topology);
        async move { done.then_some(()) }
    })
    .await;
}

/// Restarts the broker while `job` restores, down for each of `downs` in
/// turn: the first time as soon as the restore began, then each time once
/// it has written more records since the broker went down.
async fn restart_the_broker_while_restoring(job: &mut Job, partitions: i32, downs: &[Duration]) {
    let mut restored = None;
    for (round, &down) in (1..).zip(downs) {
        let what = format!("the restore to go on before broker restart {round}");
        let seen = job
            .watch_restore(partitions, &what, |p| match restored {
                // Begun: a partition has records left, or some are written already.
                None => p.remaining > 0.0 || p.restored > 0.0,
                // Going on again: more records written since the broker went down.
                Some(restored) => p.restored > restored || p.ready,
            })
            .await;
        assert!(
            !seen.ready,
            "the restore was over before broker restart {round} ({seen:?}): the changelog is too small to restart the broker during it"
        );
        outage_broker("stop");
        let stopped = job.restore_progress(partitions).await.expect("/metrics answers with the broker down");
        eprintln!("broker restart {round}: {seen:?} when it was stopped, {stopped:?} once it was down");
        assert!(
            !stopped.ready,
            "the restore finished while the broker was stopping ({stopped:?}): the changelog is too small"
        );
        restored = Some(stopped.restored);
        job.stays_alive_for(down, &format!("while the broker was down during the restore ({round})")).await;
        outage_broker("start");
    }
}

/// Partitions of the restore tests: few, so that each restores for a couple
/// of seconds (two restore at once) and a broker stopped while they do
/// always cuts them off midway, however long it takes to stop.
const RESTORE_PARTITIONS: i32 = 2;
/// Rooms of the big changelog the restore tests build.
const RESTORE_ROOMS: usize = 100_000;
/// Changes to each of them, so the changelog holds `RESTORE_ROOMS * RESTORE_ROUNDS` records.
const RESTORE_ROUNDS: usize = 6;

/// `rounds` rounds of one tag set for each of `rooms` rooms under `app/<app>`:
/// each event changes its room, and a room's events are a round apart, far
/// more than a commit interval, so each is a changelog record of its own.
fn bulk_events(app: &str, rooms: usize, rounds: usize) -> Vec<(String, RoomEvent)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rooms as u64 * 31 + rounds as u64);
    let mut events = Vec::with_capacity(rooms * rounds);
    for round in 0..rounds {
        for room in 0..rooms {
            let id = 1_000_000 + events.len();
            let kind = Kind::TagSet(TagSet { key: format!("k{}", rng.random_range(0..6)), value: format!("v{round}") });
            events.push((format!("app/{app}/room/r{room}"), event(id, 1_795_773_600_000 + id as i64, kind)));
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_survives_two_broker_restarts_and_keeps_local_state() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    outage_broker("start");
    let topology = outage_topology("restore", RESTORE_PARTITIONS, &dir.join("state"));
    create_input(&topology).await;
    let first = bulk_events("bulk", RESTORE_ROOMS, RESTORE_ROUNDS);
    let rest = generate(62, 5_000, 300);

    let mut job = spawn(&topology, dir, "i1", &topology.store.dir);
    job.wait_ready(None, Duration::from_secs(90)).await;
    let building = Instant::now();
    process_all(&mut job, &topology, &first).await;
    job.terminate();
    let span = changelog_span(&topology);
    eprintln!("changelog: {span} records, built in {:.1?}", building.elapsed());

    // The state directory is gone: every partition restores from scratch.
    std::fs::remove_dir_all(&topology.store.dir).unwrap();
    let mut job = spawn(&topology, dir, "i1", &topology.store.dir);
    let started = Instant::now();
    // Briefly, then past the group session (10 s with the restart), which
    // takes the partitions away mid-restore and gives them back.
    let downs = [Duration::from_secs(2), Duration::from_secs(5)];
    restart_the_broker_while_restoring(&mut job, topology.partitions, &downs).await;
    let all = format!("ready: {} partitions", topology.partitions);
    job.wait_ready(Some(&all), RECOVERY).await;
    eprintln!("restored and ready {:.1?} after the start", started.elapsed());

    let log = job.log_text();
    assert_eq!(lines_with(&log, 0, "rebuilding the partition"), 0, "a restore cleared its partition");
    let starts = restore_starts(&log);
    assert_eq!(starts.len(), topology.partitions as usize, "every partition restored: {starts:?}");
    for (partition, from) in &starts {
        assert_eq!(from[0], 0, "partition {partition} restores from scratch first");
        assert!(from.windows(2).all(|w| w[0] <= w[1]), "partition {partition} resumed where it got to: {from:?}");
    }
    assert!(
        starts.values().any(|from| from.iter().any(|&f| f > 0)),
        "no restore cut off by the broker went on from the records it had written: {starts:?}"
    );
    let retries = job.metric("omni_restore_retries_total").await;
    eprintln!("restores: {starts:?} (partition: from offsets), {retries} retried after a failure");
    // Every record was written to the store once: retries went on from the
    // store's checkpoint, never from the start again.
    let restored = job.restore_progress(topology.partitions).await.unwrap().restored;
    assert!(restored <= span as f64, "{restored} records restored from a changelog of {span}");
    assert!(
        restored >= model(&folder(&["recording", "tags"]), &first).rooms.len() as f64,
        "{restored} records restored"
    );

    process_all(&mut job, &topology, &rest).await;
    let events: Vec<_> = first.into_iter().chain(rest).collect();
    let store = topology.store.dir.clone();
    assert_exact(&topology, &events, vec![job], &[&store]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_behind_restoring_through_a_broker_restart_is_caught_up_not_cleared() {
    let scratch = Scratch::new();
    let dir = scratch.path();
    outage_broker("start");
    let topology = outage_topology("behind", RESTORE_PARTITIONS, &dir.join("a"));
    create_input(&topology).await;
    let (store_a, store_b) = (dir.join("a"), dir.join("b"));
    let first = generate(63, 20_000, 300);
    let second = bulk_events("bulk", RESTORE_ROOMS, RESTORE_ROUNDS);
    let rest = generate(65, 5_000, 300);

    // The first instance builds state and stops cleanly, which flushes its
    // store: the checkpoint on disk is the changelog's end.
    let mut job = spawn(&topology, dir, "i1", &store_a);
    job.wait_ready(None, Duration::from_secs(90)).await;
    process_all(&mut job, &topology, &first[..10_000]).await;
    job.terminate();
    let checkpointed = changelog_span(&topology);
    // Started again, it goes on and dies by kill -9 with a transaction open:
    // what it wrote since lived in memtables only (the store has no
    // write-ahead log; the changelog is its log), so its store is behind.
    let mut job = spawn(&topology, dir, "i1", &store_a);
    job.wait_ready(None, Duration::from_secs(90)).await;
    process_all(&mut job, &topology, &first[10_000..15_000]).await;
    let load = Load::start(&topology, first[15_000..].to_vec(), 250, Duration::from_millis(50));
    job.wait_for_a_commit("before it is killed").await;
    job.kill9();
    load.finish();

    // Meanwhile another instance takes over, and the changelog grows far past i1's store.
    let mut other = spawn(&topology, dir, "i2", &store_b);
    other.wait_ready(None, Duration::from_secs(90)).await;
    let building = Instant::now();
    process_all(&mut other, &topology, &second).await;
    other.terminate();
    eprintln!("i2 built the changelog in {:.1?}", building.elapsed());
    let span = changelog_span(&topology);
    eprintln!("changelog: {checkpointed} records at i1's flushed checkpoint, {span} now");

    // i1 comes back with its store intact but behind: it catches up from its checkpoint.
    let mut job = spawn(&topology, dir, "i1", &store_a);
    let started = Instant::now();
    restart_the_broker_while_restoring(&mut job, topology.partitions, &[Duration::from_secs(8)]).await;
    let all = format!("ready: {} partitions", topology.partitions);
    job.wait_ready(Some(&all), RECOVERY).await;
    eprintln!("caught up and ready {:.1?} after the start", started.elapsed());

    let log = job.log_text();
    assert_eq!(lines_with(&log, 0, "rebuilding the partition"), 0, "a restore cleared its store's partition");
    let starts = restore_starts(&log);
    assert_eq!(starts.len(), topology.partitions as usize, "every partition caught up: {starts:?}");
    for (partition, from) in &starts {
        assert!(from[0] > 0, "partition {partition} starts from its store's checkpoint, not from scratch: {from:?}");
        assert!(from.windows(2).all(|w| w[0] <= w[1]), "partition {partition} resumed where it got to: {from:?}");
    }
    assert!(
        starts.values().any(|from| from.iter().any(|&f| f > from[0])),
        "no restore cut off by the broker went on from the records it had written: {starts:?}"
    );
    let retries = job.metric("omni_restore_retries_total").await;
    eprintln!("restores: {starts:?} (partition: from offsets), {retries} retried after a failure");
    // Only what the store lacked was restored, once.
    let restored = job.restore_progress(topology.partitions).await.unwrap().restored;
    assert!(
        restored <= (span - checkpointed) as f64,
        "{restored} records restored, though the store lacked at most {} of {span}",
        span - checkpointed
    );

    process_all(&mut job, &topology, &rest).await;
    let events: Vec<_> = first.into_iter().chain(second).chain(rest).collect();
    // i1 owns every partition now: its store alone must be exact.
    assert_exact(&topology, &events, vec![job], &[&store_a]).await;
}
