//! Shared test utilities: the real services, a fresh topology (topics,
//! group, Redis prefix, state dir) per test so tests run in parallel without
//! cleanup, a generator of room events, a reference model built from the
//! pure folds, and readers for every output.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use omni::kafka::KafkaSettings;
use omni::modules::{Limits, Registry, RoomFolder};
use omni::proto::omni::{RoomState, StateChange};
use omni::proto::tecate::{room_event::Kind, *};
use omni::proto::{timestamp_from_millis, Message as _};
use omni::runtime::Health;
use omni::topology::Topology;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::oneshot;

/// Brokers and Redis URL of the real services.
pub struct Services {
    pub brokers: String,
    pub redis_url: String,
}

/// The services from `OMNI_BROKERS` / `OMNI_REDIS_URL`, or started through the harness once per run.
pub fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| {
        if let (Ok(brokers), Ok(redis_url)) = (std::env::var("OMNI_BROKERS"), std::env::var("OMNI_REDIS_URL")) {
            return Services { brokers, redis_url };
        }
        let script = repo_root().join("integration/services.sh");
        let up = std::process::Command::new("bash").arg(&script).arg("up").status().expect("running services.sh up");
        assert!(up.success(), "integration/services.sh up failed");
        let env = std::process::Command::new("bash").arg(&script).arg("env").output().expect("services.sh env");
        let text = String::from_utf8_lossy(&env.stdout).into_owned();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.trim_start_matches("export ").strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("services.sh env printed no {name}"))
                .trim_matches('"')
                .to_owned()
        };
        Services { brokers: value("OMNI_BROKERS"), redis_url: value("OMNI_REDIS_URL") }
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub fn kafka() -> KafkaSettings {
    KafkaSettings::with_brokers(services().brokers.clone())
}

/// Logs of the job under test, shown for failing tests (filter with `OMNI_LOG`).
fn init_logs() {
    static LOGS: OnceLock<()> = OnceLock::new();
    LOGS.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("OMNI_LOG").unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A topology of its own: topics, group, Redis prefix and state dir nobody else uses.
pub fn fresh_topology(name: &str, partitions: i32, state_dir: &FsPath) -> Topology {
    init_logs();
    let id = unique(name);
    let mut t = Topology::with_defaults(&id, &["recording", "tags"]);
    t.inputs = vec![format!("{id}.events")];
    t.broadcast_topic = format!("{id}.state");
    t.dead_letter_topic = format!("{id}.dlq");
    t.partitions = partitions;
    t.kafka = kafka();
    t.redis.url = services().redis_url.clone();
    t.redis.key_prefix = id.clone();
    t.store.dir = state_dir.to_owned();
    t
}

/// A job running in this process.
pub struct RunningJob {
    pub health: Arc<Health>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), omni::runtime::RuntimeError>>,
}

impl RunningJob {
    /// Starts the job and waits until it is ready (joined, restored), failing
    /// the test at once if it stops with an error instead.
    pub async fn start(topology: Topology, registry: Registry) -> RunningJob {
        let health = Arc::new(Health::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(omni::runtime::run(topology, registry, Arc::clone(&health), async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(90);
        while !health.ready() {
            if task.is_finished() {
                panic!("the job stopped before it was ready: {:?}", task.await);
            }
            assert!(Instant::now() < deadline, "the job was not ready within 90 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        RunningJob { health, stop: Some(stop), task }
    }

    /// Stops the job cleanly and returns its result.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(60), self.task).await.expect("job stops within 60 s");
        result.expect("job task").expect("job ends without error");
    }
}

/// A job running as a separate `omni run` process (for kill -9).
pub struct JobProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl JobProcess {
    pub fn spawn(topology: &Topology, dir: &FsPath, instance: &str) -> JobProcess {
        let file = dir.join(format!("{instance}.toml"));
        let mut t = topology.clone();
        t.instance.id = instance.to_owned();
        std::fs::write(&file, toml::to_string(&t).unwrap()).unwrap();
        let log = dir.join(format!("{instance}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_omni"))
            .args(["run", "--topology"])
            .arg(&file)
            .env_remove("OMNI_BROKERS")
            .env_remove("OMNI_REDIS_URL")
            .env_remove("OMNI_STATE_DIR")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning omni run");
        JobProcess { child, log }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "omni run exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                return;
            }
            assert!(Instant::now() < deadline, "omni run did not exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A test that fails leaves no job behind to load the machine for the rest
/// of the run, and prints the end of the job's log: CI keeps nothing else.
impl Drop for JobProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- the last lines of {} ---\n{}", self.log.display(), tail.join("\n"));
        }
    }
}

/// Waits for the job whose operations endpoint is at `addr` to answer `/readyz` with 200.
pub async fn wait_ready(addr: &str, timeout: Duration) {
    wait_for(timeout, "the job ready", || async move { (http_get(addr, "/readyz").await?.0 == 200).then_some(()) })
        .await;
}

/// Polls `check` until it returns `Some`, failing after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn event(id: usize, at_ms: i64, kind: Kind) -> RoomEvent {
    RoomEvent { event_id: format!("e{id}"), occurred_at: Some(timestamp_from_millis(at_ms)), kind: Some(kind) }
}

/// A reproducible mix of events over `rooms` rooms: mostly tag sets, some
/// removals, recording starts and stops, a few closes.
pub fn generate(seed: u64, count: usize, rooms: usize) -> Vec<(String, RoomEvent)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let room = format!("app/a{}/room/r{}", rng.random_range(0..3), rng.random_range(0..rooms));
            let roll = rng.random_range(0..100);
            let kind = match roll {
                0..=54 => Kind::TagSet(TagSet {
                    key: format!("k{}", rng.random_range(0..6)),
                    value: format!("v{}", rng.random_range(0..4)),
                }),
                55..=69 => Kind::TagRemoved(TagRemoved { key: format!("k{}", rng.random_range(0..6)) }),
                70..=84 => Kind::RecordingStarted(RecordingStarted {
                    recording_id: format!("rec{}", rng.random_range(0..3)),
                    started_by: "u1".into(),
                }),
                85..=97 => {
                    Kind::RecordingStopped(RecordingStopped { recording_id: String::new(), reason: "done".into() })
                }
                _ => Kind::RoomClosed(RoomClosed {}),
            };
            (room, event(i, 1_795_773_600_000 + i as i64, kind))
        })
        .collect()
}

/// What the job must produce, computed with the pure folds.
#[derive(Debug, Default)]
pub struct Expected {
    pub rooms: BTreeMap<String, RoomState>,
    pub changes: BTreeMap<String, Vec<(u64, String, String)>>,
    pub total_changes: usize,
}

pub fn folder(modules: &[&str]) -> RoomFolder {
    let names: Vec<String> = modules.iter().map(|m| m.to_string()).collect();
    RoomFolder::new(Registry::with_builtins().select(&names).unwrap(), Limits::default())
}

pub fn model(folder: &RoomFolder, events: &[(String, RoomEvent)]) -> Expected {
    let mut expected = Expected::default();
    for (room, event) in events {
        let state = expected.rooms.entry(room.clone()).or_default();
        let Ok(outcome) = folder.fold(state, event) else { continue };
        for change in outcome.changes {
            expected.total_changes += 1;
            expected.changes.entry(room.clone()).or_default().push((
                change.version,
                change.module.to_owned(),
                change.state_json,
            ));
        }
    }
    expected.rooms.retain(|_, s| s.version > 0);
    expected
}

pub fn producer() -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

pub fn produce_raw(producer: &BaseProducer, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
    let mut record = BaseRecord::<[u8], [u8]>::to(topic);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(value) = value {
        record = record.payload(value);
    }
    omni::kafka::send(producer, record).expect("producing a test record");
}

pub fn produce(producer: &BaseProducer, topic: &str, events: &[(String, RoomEvent)]) {
    for (room, event) in events {
        produce_raw(producer, topic, Some(room.as_bytes()), Some(&event.encode_to_vec()));
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Creates the input topic with `partitions` before anything is produced to it.
pub async fn create_input(topology: &Topology) {
    omni::kafka::ensure_topics(
        &topology.kafka,
        &[omni::kafka::TopicSpec {
            name: topology.input_topic().to_owned(),
            partitions: topology.partitions,
            configs: vec![],
        }],
    )
    .await
    .expect("creating the input topic");
}

/// A record as read back from an output topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads a topic read_committed from the beginning until `want` records arrived or `timeout` passed.
pub fn read_committed(topic: &str, want: usize, timeout: Duration) -> Vec<Read> {
    read_committed_at(&services().brokers, topic, want, timeout)
}

/// As [`read_committed`], from the cluster at `brokers`.
pub fn read_committed_at(brokers: &str, topic: &str, want: usize, timeout: Duration) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    let deadline = Instant::now() + timeout;
    // Every partition assigned from its beginning, with no group
    // subscription: a reader in a group that rebalances starts over from the
    // beginning (it commits nothing) and would read records twice.
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).expect("topic metadata");
        let count = metadata.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len());
        if count > 0 {
            break count;
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}

/// Reads the broadcast topic until `want` changes, then keeps reading briefly to catch extras (duplicates).
pub fn read_broadcast(topic: &str, want: usize) -> Vec<StateChange> {
    let mut records = read_committed(topic, want, Duration::from_secs(90));
    assert_eq!(
        records.len(),
        want,
        "broadcast topic {topic} holds {} committed changes, expected {want}",
        records.len()
    );
    records.extend(read_committed_after(topic, &records));
    records
        .iter()
        .map(|r| StateChange::decode(r.value.as_deref().unwrap_or_default()).expect("broadcast value decodes"))
        .collect()
}

/// Any records beyond those already read (nothing, for an exact run).
fn read_committed_after(topic: &str, seen: &[Read]) -> Vec<Read> {
    let all = read_committed(topic, seen.len() + 1, Duration::from_secs(3));
    all.into_iter().skip(seen.len()).collect()
}

/// Asserts the broadcast is exactly the model's changes: per room, contiguous versions from 1, no duplicate, same states.
pub fn assert_broadcast_exact(changes: &[StateChange], expected: &Expected) {
    let mut by_room: BTreeMap<String, Vec<(u64, String, String)>> = BTreeMap::new();
    for c in changes {
        by_room.entry(c.path.clone()).or_default().push((c.version, c.module.clone(), c.state_json.clone()));
    }
    assert_eq!(by_room.len(), expected.changes.len(), "rooms with changes");
    for (room, want) in &expected.changes {
        let got = by_room.get(room).unwrap_or_else(|| panic!("no broadcast for {room}"));
        let versions: Vec<u64> = got.iter().map(|c| c.0).collect();
        let contiguous: Vec<u64> = (1..=got.len() as u64).collect();
        assert_eq!(versions, contiguous, "versions of {room} are contiguous from 1 without duplicates");
        assert_eq!(got, want, "changes of {room}");
    }
}

/// Waits until Redis holds the model's final state for every room, then checks it exactly.
/// A Redis Cluster (`redis+cluster://`) is read through a cluster connection.
pub async fn assert_redis_exact(topology: &Topology, folder: &RoomFolder, expected: &Expected) {
    let client = omni::view::RedisTarget::open(topology.redis.url.as_str()).unwrap();
    // Generous bounds: a loaded machine must not fail the check for the code under test.
    let mut conn = client.connect_bounded(Duration::from_secs(10)).await.unwrap();
    let keys = omni::view::KeyLayout::new(&topology.redis.key_prefix);
    for (room, state) in &expected.rooms {
        let want_version = state.version;
        let snapshot = wait_for(Duration::from_secs(60), &format!("redis version {want_version} of {room}"), || {
            let mut conn = conn.clone();
            let keys = keys.clone();
            let room = room.clone();
            async move {
                if state.closed {
                    let hash: HashMap<String, String> =
                        redis::AsyncCommands::hgetall(&mut conn, keys.room(&room)).await.ok()?;
                    let last = omni::view::changes_after(&mut conn, &keys, &room, want_version - 1).await.ok()?;
                    (hash.is_empty() && last.first().map(|c| c.version) == Some(want_version)).then_some(None)
                } else {
                    let snap = omni::view::snapshot(&mut conn, &keys, &room).await.ok()??;
                    (snap.version == want_version).then_some(Some(snap))
                }
            }
        })
        .await;
        if let Some(snapshot) = snapshot {
            for (module, json) in folder.module_states(state) {
                let want: serde_json::Value = serde_json::from_str(&json).unwrap();
                assert_eq!(snapshot.modules.get(module), Some(&want), "redis {module} of {room}");
            }
        }
    }
    let _ = &mut conn;
}

/// Checks the RocksDB store (after the job stopped) holds exactly the model's rooms.
pub fn assert_store_exact(dirs: &[&FsPath], partitions: i32, expected: &Expected) {
    let mut found: BTreeMap<String, RoomState> = BTreeMap::new();
    for dir in dirs {
        let store = omni::store::RocksStore::open(dir, Default::default()).expect("store reopens");
        for p in 0..partitions {
            use omni::store::StateStore;
            for (room, state) in store.rooms(p).unwrap() {
                let newer = found.get(&room).is_none_or(|s| s.version < state.version);
                if newer {
                    found.insert(room, state);
                }
            }
        }
    }
    let versions = |m: &BTreeMap<String, RoomState>| {
        m.iter().map(|(k, v)| (k.clone(), (v.version, v.modules.clone(), v.closed))).collect::<BTreeMap<_, _>>()
    };
    assert_eq!(versions(&found), versions(&expected.rooms), "store contents");
}

// ---------------------------------------------------------------------------
// Helpers for the pub/sub, CLI and operations tests.

/// A loopback port nobody listens on right now.
pub fn pick_free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` of a test's own on a free loopback port, killed when dropped.
pub struct ScratchRedis {
    child: std::process::Child,
    pub port: u16,
}

impl ScratchRedis {
    /// Starts redis-server in `dir` on a free port and waits until it accepts connections.
    pub fn start(dir: &FsPath) -> ScratchRedis {
        ScratchRedis::start_on(dir, pick_free_port())
    }

    /// Starts redis-server in `dir` on `port`, keeping its data in an append-only
    /// file there, so a restart on the same dir and port finds it again.
    pub fn start_on(dir: &FsPath, port: u16) -> ScratchRedis {
        ScratchRedis::start_with(dir, port, &["--save", "", "--appendonly", "yes"])
    }

    /// Starts redis-server in `dir` on `port` with these persistence options,
    /// and waits until it accepts connections.
    pub fn start_with(dir: &FsPath, port: u16, persistence: &[&str]) -> ScratchRedis {
        std::fs::create_dir_all(dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(persistence)
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let redis = ScratchRedis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    /// The URL for `userinfo` (`""`, `"user:password"`).
    pub fn url(&self, userinfo: &str) -> String {
        match userinfo {
            "" => format!("redis://127.0.0.1:{}", self.port),
            u => format!("redis://{u}@127.0.0.1:{}", self.port),
        }
    }
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback: `(status, body)`, or `None` when nothing answers.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok().flatten()
}

/// The sum of a Prometheus metric's samples (every label set) in `/metrics` text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The sum of a metric's samples on the `/metrics` of the process whose
/// operations endpoint is `addr`; `None` while it does not answer or lacks it.
pub async fn scraped_metric(addr: &str, name: &str) -> Option<f64> {
    metric_sum(&http_get(addr, "/metrics").await?.1, name)
}

/// The `omni` binary with the real services in its environment and no other `OMNI_*` variable.
pub fn omni_cli() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_omni"));
    for (name, _) in std::env::vars() {
        if name.starts_with("OMNI_") {
            command.env_remove(name);
        }
    }
    command.env("OMNI_BROKERS", &services().brokers).env("OMNI_REDIS_URL", &services().redis_url);
    command
}

/// Writes `topology` as a TOML file the binary reads.
pub fn write_topology(topology: &Topology, file: &FsPath) {
    std::fs::write(file, toml::to_string(topology).unwrap()).unwrap();
}

/// The lines a child process writes to a pipe, read on a thread so they can be awaited with a deadline.
pub struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
}

impl Lines {
    pub fn new(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx }
    }

    /// The next line, or `None` when none came within `timeout` (or the pipe closed).
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.rx.recv_timeout(timeout).ok()
    }
}

// ---------------------------------------------------------------------------
// Helpers for staging Redis faults on a test's own Redis (never the shared one).

impl ScratchRedis {
    /// Starts redis-server in `dir` on a free port with no persistence at
    /// all, so a FLUSHALL leaves nothing behind to reload.
    pub fn start_volatile(dir: &FsPath) -> ScratchRedis {
        ScratchRedis::start_with(dir, pick_free_port(), &["--save", "", "--appendonly", "no"])
    }
}

/// A connection for a test's reads and commands. redis-rs gives up on a
/// reply after 500 ms and on a connect after 1 s by default: too short for a
/// machine loaded by the whole suite, where a refused read would fail a
/// test for no fault of the code under test.
pub async fn redis_connection(client: &redis::Client) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    client.get_multiplexed_async_connection_with_config(&config).await.expect("connecting to redis")
}

/// Runs one command (`FLUSHALL`, `CLIENT UNPAUSE`, …) on the Redis at `url`.
pub async fn redis_command(url: &str, args: &[&str]) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = redis_connection(&client).await;
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    let _: redis::Value = command.query_async(&mut conn).await.unwrap_or_else(|e| panic!("redis {args:?}: {e}"));
}

/// Holds every client's writes on the Redis at `url` for up to `pause` (reads go on).
pub async fn pause_redis_writes(url: &str, pause: Duration) {
    redis_command(url, &["CLIENT", "PAUSE", &pause.as_millis().to_string(), "WRITE"]).await;
}

/// Ends a [`pause_redis_writes`] early.
pub async fn unpause_redis(url: &str) {
    redis_command(url, &["CLIENT", "UNPAUSE"]).await;
}

// ---------------------------------------------------------------------------
// Helpers for the broker-outage tests (`broker_outage.rs`). They stop and
// start a Kafka broker, so they run against a Kafka and a Redis of their own
// (`OMNI_SERVICES_DIR=<folder> integration/services.sh up`), never against
// the shared ones other tests run on meanwhile.

/// The broker-outage tests' own services.
pub struct OutageServices {
    pub brokers: String,
    pub redis_url: String,
    /// Their `services.sh` state folder: `stop kafka` / `start kafka` act on it.
    pub dir: PathBuf,
}

/// The outage services from `OMNI_OUTAGE_BROKERS`, `OMNI_OUTAGE_REDIS_URL`
/// and `OMNI_OUTAGE_SERVICES_DIR`. A test without them fails: they are not
/// skipped, since a skipped test would pass unseen.
pub fn outage_services() -> &'static OutageServices {
    static OUTAGE: OnceLock<OutageServices> = OnceLock::new();
    OUTAGE.get_or_init(|| {
        let var = |name: &str| {
            std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
                panic!(
                    "{name} is not set. The broker-outage tests stop and start a Kafka broker, so they need one of \
                     their own: they run in the broker-outage stage of integration/test.sh. By hand: \
                     `export OMNI_SERVICES_DIR=$PWD/integration/.state/outage; bash integration/services.sh up`, \
                     then set OMNI_OUTAGE_BROKERS and OMNI_OUTAGE_REDIS_URL to what `services.sh env` prints and \
                     OMNI_OUTAGE_SERVICES_DIR to that folder"
                )
            })
        };
        let outage = OutageServices {
            brokers: var("OMNI_OUTAGE_BROKERS"),
            redis_url: var("OMNI_OUTAGE_REDIS_URL"),
            dir: PathBuf::from(var("OMNI_OUTAGE_SERVICES_DIR")),
        };
        if let Ok(shared) = std::env::var("OMNI_BROKERS") {
            assert_ne!(shared, outage.brokers, "the broker-outage tests must not stop the shared broker");
        }
        // Stopping the folder's broker must stop the broker the tests use, and no other.
        let env = std::process::Command::new("bash")
            .arg(repo_root().join("integration/services.sh"))
            .arg("env")
            .env("OMNI_SERVICES_DIR", &outage.dir)
            .output()
            .expect("services.sh env");
        let text = String::from_utf8_lossy(&env.stdout).into_owned();
        assert!(
            env.status.success()
                && text.lines().any(|l| l.trim_start_matches("export ") == format!("OMNI_BROKERS={}", outage.brokers)),
            "OMNI_OUTAGE_SERVICES_DIR={} holds another broker than OMNI_OUTAGE_BROKERS={}: services.sh env says\n{text}{}",
            outage.dir.display(),
            outage.brokers,
            String::from_utf8_lossy(&env.stderr)
        );
        outage
    })
}

/// Stops or starts (`"stop"`, `"start"`) the outage services' broker, with
/// the same port and data; `start` returns once it serves metadata.
pub fn outage_broker(action: &str) {
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("integration/services.sh"))
        .args([action, "kafka"])
        .env("OMNI_SERVICES_DIR", &outage_services().dir)
        .status()
        .expect("running services.sh");
    assert!(status.success(), "services.sh {action} kafka failed");
}

/// As [`fresh_topology`], on the outage services.
pub fn outage_topology(name: &str, partitions: i32, state_dir: &FsPath) -> Topology {
    let mut t = fresh_topology(name, partitions, state_dir);
    t.kafka = KafkaSettings::with_brokers(outage_services().brokers.clone());
    t.redis.url = outage_services().redis_url.clone();
    t
}

/// As [`read_broadcast`], from the cluster at `brokers`.
pub fn read_broadcast_at(brokers: &str, topic: &str, want: usize) -> Vec<StateChange> {
    let records = read_committed_at(brokers, topic, want, Duration::from_secs(90));
    assert_eq!(
        records.len(),
        want,
        "broadcast topic {topic} holds {} committed changes, expected {want}",
        records.len()
    );
    // Then anything beyond them: nothing, for an exact run.
    let extra = read_committed_at(brokers, topic, want + 1, Duration::from_secs(3)).into_iter().skip(want);
    records
        .into_iter()
        .chain(extra)
        .map(|r| StateChange::decode(r.value.as_deref().unwrap_or_default()).expect("broadcast value decodes"))
        .collect()
}

impl JobProcess {
    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the process has exited, showing the end of its log.
    pub fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(200)..].join("\n");
            panic!("omni run ({}) exited with {status} {when}; the end of its log:\n{tail}", self.log.display());
        }
    }
}

// Helpers for the cluster tests (`cluster.rs`): three Kafka nodes and a Redis
// Cluster of their own, whose nodes the tests kill and start again.

/// The cluster tests' own services.
pub struct ClusterServices {
    pub brokers: String,
    pub redis_url: String,
    /// Their `services.sh` state folder: `kill kafka-2` / `start kafka-2` act on it.
    pub dir: PathBuf,
}

/// The cluster services from `OMNI_CLUSTER_BROKERS`, `OMNI_CLUSTER_REDIS_URL`
/// and `OMNI_CLUSTER_SERVICES_DIR`. A test without them fails: a skipped
/// test would pass unseen.
pub fn cluster_services() -> &'static ClusterServices {
    static CLUSTER: OnceLock<ClusterServices> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let var = |name: &str| {
            std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
                panic!(
                    "{name} is not set. The cluster tests kill Kafka nodes and Redis masters, so they need a \
                     cluster of their own: they run in the cluster stage of integration/test.sh. By hand: \
                     `export OMNI_SERVICES_DIR=$PWD/integration/.state-cluster; \
                     bash integration/services.sh up --kafka-nodes 3 --redis-cluster`, then set \
                     OMNI_CLUSTER_BROKERS and OMNI_CLUSTER_REDIS_URL to what `services.sh env` prints and \
                     OMNI_CLUSTER_SERVICES_DIR to that folder"
                )
            })
        };
        let cluster = ClusterServices {
            brokers: var("OMNI_CLUSTER_BROKERS"),
            redis_url: var("OMNI_CLUSTER_REDIS_URL"),
            dir: PathBuf::from(var("OMNI_CLUSTER_SERVICES_DIR")),
        };
        assert!(cluster.redis_url.starts_with("redis+cluster://"), "OMNI_CLUSTER_REDIS_URL is no Redis Cluster");
        cluster
    })
}

/// Runs `services.sh ACTION NAME` (`kill kafka-2`, `start redis-7002`…) on the cluster services.
pub fn cluster_service(action: &str, name: &str) {
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("integration/services.sh"))
        .args([action, name])
        .env("OMNI_SERVICES_DIR", &cluster_services().dir)
        .status()
        .expect("running services.sh");
    assert!(status.success(), "services.sh {action} {name} failed");
}

/// The cluster services' `services.sh status` lines.
pub fn cluster_status() -> String {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("integration/services.sh"))
        .arg("status")
        .env("OMNI_SERVICES_DIR", &cluster_services().dir)
        .output()
        .expect("running services.sh status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// As [`fresh_topology`], on the cluster services.
pub fn cluster_topology(name: &str, partitions: i32, state_dir: &FsPath) -> Topology {
    let mut t = fresh_topology(name, partitions, state_dir);
    t.kafka = KafkaSettings::with_brokers(cluster_services().brokers.clone());
    t.redis.url = cluster_services().redis_url.clone();
    t
}
