//! `omni bench --service`: `omni serve` under many watchers while the job
//! runs at a fixed rate. Each watcher follows one room (ranks 0..n of the
//! Zipf workload, so the busiest rooms are watched).
//!
//! Added delivery latency is "broadcast record committed → watcher receives
//! it": a reference read_committed consumer of the broadcast topic, on a
//! thread of its own so the watchers' work does not delay its clock, sees a
//! record as soon as its transaction commits (the way `omni serve`'s own
//! consumer does), and a change's latency is when its watcher received it
//! minus when the reference did. The record's timestamp is not used: it is
//! the produce time, before the commit, so it would add the commit interval.
//!
//! The client side is kept cheap, since it shares the machine's cores with
//! the job and the service: one task per HTTP/2 connection of 500 streams,
//! receipts pushed into a local vector. The report gives the CPU each of
//! serve, the job and the bench used, and the service's RSS; then
//! `GetSnapshot` latency at a fixed request rate.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{SelectAll, StreamExt as _};
use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::proto::omni::omni_client::OmniClient;
use omni::proto::omni::{self as pb, watch_event};
use omni::proto::Message as _;
use omni::pubsub::{Pattern, StartAt, Subscriber};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::latency::Percentiles;
use super::process::{cpu_seconds_of, OmniProcess};
use super::workload::Workload;
use super::BenchArgs;

/// Watch streams per HTTP/2 connection.
const STREAMS_PER_CONNECTION: usize = 500;

/// Connections `GetSnapshot` calls are spread over.
const SNAPSHOT_CONNECTIONS: usize = 4;

const ROOM_PREFIX: &str = "app/bench/room/r";

#[derive(Debug, serde::Serialize)]
struct WatchPhase {
    watchers: usize,
    achieved_events_per_s: f64,
    /// Watcher receive minus reference receive, per change.
    added_delivery: Percentiles,
    /// Changes the reference saw for watched rooms that no watcher reported.
    missed: usize,
    /// Watch streams that ended during the phase, by status code.
    streams_ended: BTreeMap<String, usize>,
    /// CPU used while the job was fed, in cores.
    cpu: CpuShare,
    /// The service's own share of the latency: how long live changes waited
    /// in their watchers' inboxes (hub receipt → the watch stream polled),
    /// from its `omni_service_watch_inbox_seconds`: the fraction of changes
    /// within each bucket bound (milliseconds).
    serve_inbox_wait_within_ms: BTreeMap<String, f64>,
    /// Record timestamp (the job's produce, before its commit) → received, as
    /// fractions within each bound (milliseconds): by `omni serve`'s shared
    /// consumer (its `omni_service_broadcast_age_seconds`), and by the
    /// reference. The same for both unless serve's consumer falls behind.
    serve_consumer_age_within_ms: BTreeMap<String, f64>,
    reference_age_within_ms: BTreeMap<String, f64>,
    serve_rss_mib_before: f64,
    serve_rss_mib_under_load: f64,
    serve_rss_target_mib: f64,
}

#[derive(Debug, serde::Serialize)]
struct SnapshotPhase {
    target_requests_per_s: u64,
    achieved_requests_per_s: f64,
    /// Failed calls, by status code (NOT_FOUND, the answer for a room the
    /// workload closed, is an answer, timed with the others).
    errors: BTreeMap<String, usize>,
    latency: Percentiles,
    cpu: CpuShare,
}

/// CPU used over a stretch of time, in cores (the machine has `machine_cores`).
#[derive(Debug, serde::Serialize)]
struct CpuShare {
    machine_cores: usize,
    serve: f64,
    job: f64,
    bench: f64,
}

/// CPU seconds of serve, the job and the bench at one moment.
struct CpuClock {
    at: Instant,
    serve: f64,
    job: f64,
    bench: f64,
}

impl CpuClock {
    fn now(serve: u32, job: u32) -> CpuClock {
        CpuClock {
            at: Instant::now(),
            serve: cpu_seconds_of(serve).unwrap_or(0.0),
            job: cpu_seconds_of(job).unwrap_or(0.0),
            bench: cpu_seconds_of(std::process::id()).unwrap_or(0.0),
        }
    }

    fn share_since(&self, earlier: &CpuClock) -> CpuShare {
        let wall = self.at.duration_since(earlier.at).as_secs_f64().max(1e-3);
        CpuShare {
            machine_cores: std::thread::available_parallelism().map_or(1, usize::from),
            serve: (self.serve - earlier.serve) / wall,
            job: (self.job - earlier.job) / wall,
            bench: (self.bench - earlier.bench) / wall,
        }
    }
}

struct Serve {
    child: std::process::Child,
    addr: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

pub async fn run(args: &BenchArgs, kafka: &KafkaSettings, redis_url: &str) -> anyhow::Result<()> {
    let id = format!("bench-svc-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let state = tempfile::tempdir()?;
    let mut topology = super::bench_topology(&id, args, kafka, redis_url, state.path());
    topology.service.max_streams_per_connection = STREAMS_PER_CONNECTION;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    topology.service.listen = format!("127.0.0.1:{port}");
    let spec = |name: String| TopicSpec { name, partitions: args.partitions, configs: vec![] };
    ensure_topics(kafka, &[spec(topology.input_topic().to_owned()), spec(topology.broadcast_topic.clone())]).await?;
    let job = OmniProcess::spawn(&topology, state.path())?;
    let log = std::fs::File::create(state.path().join("serve.log"))?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--topology"])
        .arg(state.path().join("topology.toml"))
        .env_remove("OMNI_BROKERS")
        .env_remove("OMNI_REDIS_URL")
        .env_remove("OMNI_SERVICE_LISTEN")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let serve = Serve { child, addr: topology.service.listen.clone() };
    let mut workload = Workload::new(args.seed, args.rooms, args.zipf);
    let mut phases = Vec::new();
    // Rooms the job wrote, for GetSnapshot: asking for others would measure NOT_FOUND.
    let mut rooms = std::collections::BTreeSet::new();
    for &watchers in &args.service_watchers {
        eprintln!("bench {id}: {watchers} watchers at {} events/s for {} s", args.rate, args.service_secs);
        let (phase, written) = watch_phase(args, &topology, &serve, job.pid(), watchers, &mut workload).await?;
        phases.push(phase);
        rooms.extend(written);
    }
    eprintln!("bench {id}: GetSnapshot at {} requests/s", args.service_snapshot_rate);
    let rooms: Vec<u32> = rooms.into_iter().take(1000).collect();
    let snapshots = snapshot_phase(&serve, job.pid(), args.service_snapshot_rate, &rooms).await?;
    drop(serve);
    job.terminate()?;
    super::clean_up(kafka, redis_url, &id, &topology).await;
    let report = serde_json::json!({ "service": { "watch": phases, "get_snapshot": snapshots } });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn connect(addr: &str) -> anyhow::Result<OmniClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wide windows, so the client does not spend its CPU on window updates.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(1 << 20));
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(OmniClient::new(channel)),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A change as received: the watcher's rank, the version, when.
type Receipt = (u32, u64, Instant);

/// What one connection's watchers saw.
#[derive(Default)]
struct Watched {
    receipts: Vec<Receipt>,
    ended: BTreeMap<String, usize>,
}

/// Opens the watches of `ranks` on one connection, says so, then records
/// every change until `stop`.
async fn watch_connection(
    addr: String,
    ranks: std::ops::Range<usize>,
    opened: tokio::sync::oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Watched> {
    let mut client = connect(&addr).await?;
    let mut streams = SelectAll::new();
    for rank in ranks {
        let stream = client.watch(pb::WatchRequest { pattern: format!("{ROOM_PREFIX}{rank}") }).await?.into_inner();
        streams.push(stream.map(move |event| (rank as u32, event)));
    }
    let _ = opened.send(());
    let mut watched = Watched::default();
    loop {
        tokio::select! {
            next = streams.next() => match next {
                Some((rank, Ok(event))) => {
                    if let Some(watch_event::Event::Change(change)) = event.event {
                        watched.receipts.push((rank, change.version, Instant::now()));
                    }
                }
                Some((_, Err(status))) => {
                    *watched.ended.entry(omni::serve::code_name(status.code()).to_owned()).or_default() += 1;
                }
                None => break,
            },
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    Ok(watched)
}

/// When the reference saw each watched room's change, and every record's age.
type Reference = (HashMap<(u32, u64), Instant>, Vec<f64>);

/// The reference: a read_committed consumer on a thread and runtime of its
/// own, noting when each watched room's change became readable.
fn reference_reader(
    topology: &omni::topology::Topology,
    watchers: usize,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<Reference>> {
    let (kafka, topic) = (topology.kafka.clone(), topology.broadcast_topic.clone());
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let mut seen = HashMap::new();
            let mut ages = Vec::new();
            let pattern = Pattern::parse("app/bench/room/*").expect("a valid pattern");
            let mut reader = match Subscriber::subscribe(&kafka, &topic, pattern, StartAt::Latest).await {
                Ok(reader) => reader,
                Err(error) => {
                    let _ = subscribed_tx.send(Err(error.to_string()));
                    return (seen, ages);
                }
            };
            let _ = subscribed_tx.send(Ok(()));
            let mut stop = stop;
            loop {
                let delivery = tokio::select! {
                    delivery = reader.next() => delivery,
                    _ = stop.wait_for(|stop| *stop) => break,
                };
                let Some(Ok(delivery)) = delivery else { continue };
                let at = Instant::now();
                if let Some(stamp) = delivery.timestamp_millis {
                    ages.push((chrono::Utc::now().timestamp_millis() - stamp).max(0) as f64 / 1000.0);
                }
                let rank = delivery.subject.strip_prefix(ROOM_PREFIX).and_then(|r| r.parse::<u32>().ok());
                if let Some(rank) = rank.filter(|&r| (r as usize) < watchers) {
                    if let Ok(change) = omni::proto::omni::StateChange::decode(delivery.payload.as_slice()) {
                        seen.insert((rank, change.version), at);
                    }
                }
            }
            (seen, ages)
        })
    });
    subscribed.recv()?.map_err(anyhow::Error::msg)?;
    Ok(thread)
}

async fn watch_phase(
    args: &BenchArgs,
    topology: &omni::topology::Topology,
    serve: &Serve,
    job_pid: u32,
    watchers: usize,
    workload: &mut Workload,
) -> anyhow::Result<(WatchPhase, Vec<u32>)> {
    let (stop_tx, stop) = watch::channel(false);
    let mut connections = Vec::new();
    let mut opened = Vec::new();
    for first in (0..watchers).step_by(STREAMS_PER_CONNECTION) {
        let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
        let ranks = first..(first + STREAMS_PER_CONNECTION).min(watchers);
        connections.push(tokio::spawn(watch_connection(serve.addr.clone(), ranks, opened_tx, stop.clone())));
        opened.push(opened_rx);
    }
    for (opened, connection) in opened.into_iter().zip(&mut connections) {
        if opened.await.is_err() {
            // The connection's task ended before its watches were open: its error says why.
            connection.await??;
            anyhow::bail!("a watch connection ended early");
        }
    }
    let rss_before = rss_mib(serve.child.id());
    let inbox_before = histogram_buckets(&serve.addr, INBOX_WAIT).await?;
    let age_before = histogram_buckets(&serve.addr, BROADCAST_AGE).await?;
    let reference = reference_reader(topology, watchers, stop.clone())?;
    let rss_peak = Arc::new(Mutex::new(0f64));
    let sampling = {
        let (pid, peak) = (serve.child.id(), Arc::clone(&rss_peak));
        tokio::spawn(async move {
            loop {
                let rss = rss_mib(pid);
                {
                    let mut peak = peak.lock().expect("peak");
                    *peak = peak.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let cpu_start = CpuClock::now(serve.child.id(), job_pid);
    let achieved = {
        let (brokers, input, rate) = (topology.kafka.brokers.clone(), topology.input_topic().to_owned(), args.rate);
        let duration = Duration::from_secs(args.service_secs);
        let mut local = std::mem::replace(workload, Workload::new(args.seed + 1, args.rooms, args.zipf));
        let (rate, local) = tokio::task::spawn_blocking(move || {
            produce(&brokers, &input, rate, duration, &mut local).map(|r| (r, local))
        })
        .await??;
        *workload = local;
        rate
    };
    let cpu = CpuClock::now(serve.child.id(), job_pid).share_since(&cpu_start);
    // The last commits and deliveries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send_replace(true);
    sampling.abort();
    let (reference, reference_ages) = tokio::task::spawn_blocking(move || reference.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the reference reader panicked"))?;
    let mut received = HashMap::new();
    let mut streams_ended = BTreeMap::new();
    for connection in connections {
        let watched = connection.await??;
        received.extend(watched.receipts.into_iter().map(|(rank, version, at)| ((rank, version), at)));
        for (code, count) in watched.ended {
            *streams_ended.entry(code).or_default() += count;
        }
    }
    let mut samples = Vec::new();
    let mut missed = 0;
    for (key, at) in &reference {
        match received.get(key) {
            Some(got) if got >= at => samples.push(got.duration_since(*at).as_secs_f64() * 1000.0),
            Some(got) => samples.push(-(at.duration_since(*got).as_secs_f64() * 1000.0)),
            None => missed += 1,
        }
    }
    let peak = *rss_peak.lock().expect("peak");
    let inbox_after = histogram_buckets(&serve.addr, INBOX_WAIT).await?;
    let age_after = histogram_buckets(&serve.addr, BROADCAST_AGE).await?;
    let reference_age = cumulative(&age_after, &reference_ages);
    let written = reference.keys().map(|(rank, _)| *rank).collect::<std::collections::BTreeSet<u32>>();
    let phase = WatchPhase {
        watchers,
        achieved_events_per_s: achieved,
        added_delivery: Percentiles::of(samples),
        missed,
        streams_ended,
        cpu,
        serve_inbox_wait_within_ms: fractions_within(&inbox_before, &inbox_after),
        serve_consumer_age_within_ms: fractions_within(&age_before, &age_after),
        reference_age_within_ms: fractions_within(&[], &reference_age),
        serve_rss_mib_before: rss_before,
        serve_rss_mib_under_load: peak,
        serve_rss_target_mib: 100.0 + watchers as f64 * 16.0 / 1024.0,
    };
    Ok((phase, written.into_iter().collect()))
}

const INBOX_WAIT: &str = "omni_service_watch_inbox_seconds";
const BROADCAST_AGE: &str = "omni_service_broadcast_age_seconds";

/// Observations (seconds) as cumulative counts over the bounds of `buckets`.
fn cumulative(buckets: &[(String, f64)], observed: &[f64]) -> Vec<(String, f64)> {
    buckets
        .iter()
        .map(|(bound, _)| {
            let limit = bound.parse::<f64>().unwrap_or(f64::INFINITY);
            (bound.clone(), observed.iter().filter(|&&o| o <= limit).count() as f64)
        })
        .collect()
}

/// A histogram's cumulative bucket counts in serve's `/metrics`, by bound (seconds).
async fn histogram_buckets(addr: &str, name: &str) -> anyhow::Result<Vec<(String, f64)>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let prefix = format!("{name}_bucket{{le=\"");
    Ok(text
        .lines()
        .filter_map(|line| {
            let (bound, count) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
            Some((bound.to_owned(), count.trim().parse().ok()?))
        })
        .collect())
}

/// The fraction of the observations between two scrapes within each bound, in milliseconds.
fn fractions_within(before: &[(String, f64)], after: &[(String, f64)]) -> BTreeMap<String, f64> {
    let earlier: HashMap<&str, f64> = before.iter().map(|(bound, count)| (bound.as_str(), *count)).collect();
    let delta = |bound: &str, count: f64| count - earlier.get(bound).copied().unwrap_or(0.0);
    let total = after.iter().find(|(bound, _)| bound == "+Inf").map_or(0.0, |(b, c)| delta(b, *c));
    after
        .iter()
        .filter(|(bound, _)| bound != "+Inf" && total > 0.0)
        .filter_map(|(bound, count)| {
            let ms = bound.parse::<f64>().ok()? * 1000.0;
            Some((format!("{ms:07.1}"), delta(bound, *count) / total))
        })
        .collect()
}

fn produce(brokers: &str, input: &str, rate: u64, duration: Duration, workload: &mut Workload) -> anyhow::Result<f64> {
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let room = workload.room();
            let value = workload.event(chrono::Utc::now().timestamp_millis()).encode_to_vec();
            let record = rdkafka::producer::BaseRecord::to(input).key(room.as_bytes()).payload(&value[..]);
            omni::kafka::send(&producer, record)?;
            sent += 1;
        }
        omni::kafka::serve_ready(&producer);
        std::thread::sleep(Duration::from_millis(1));
    }
    let achieved = sent as f64 / started.elapsed().as_secs_f64();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30))?;
    Ok(achieved)
}

/// `GetSnapshot` of `rooms` (ranks) in turn at a fixed rate.
async fn snapshot_phase(serve: &Serve, job_pid: u32, rate: u64, rooms: &[u32]) -> anyhow::Result<SnapshotPhase> {
    anyhow::ensure!(!rooms.is_empty(), "no watched room was written: no room to ask for");
    let mut clients = Vec::new();
    for _ in 0..SNAPSHOT_CONNECTIONS {
        clients.push(connect(&serve.addr).await?);
    }
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let duration = Duration::from_secs(10);
    let cpu_start = CpuClock::now(serve.child.id(), job_pid);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut calls = Vec::new();
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let mut client = clients[sent as usize % clients.len()].clone();
            let (samples, errors) = (Arc::clone(&samples), Arc::clone(&errors));
            let path = format!("{ROOM_PREFIX}{}", rooms[sent as usize % rooms.len()]);
            calls.push(tokio::spawn(async move {
                let asked = Instant::now();
                match client.get_snapshot(pb::GetSnapshotRequest { path }).await.map_err(|s| (s.code(), s)) {
                    // A room the workload closed is answered NOT_FOUND, rightly.
                    Ok(_) | Err((tonic::Code::NotFound, _)) => {
                        samples.lock().expect("samples").push(asked.elapsed().as_secs_f64() * 1000.0)
                    }
                    Err((_, status)) => {
                        let code = omni::serve::code_name(status.code()).to_owned();
                        *errors.lock().expect("errors").entry(code).or_default() += 1;
                    }
                }
            }));
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let achieved = sent as f64 / started.elapsed().as_secs_f64();
    for call in calls {
        let _ = call.await;
    }
    let cpu = CpuClock::now(serve.child.id(), job_pid).share_since(&cpu_start);
    let latency = Percentiles::of(std::mem::take(&mut *samples.lock().expect("samples")));
    let errors = std::mem::take(&mut *errors.lock().expect("errors"));
    Ok(SnapshotPhase { target_requests_per_s: rate, achieved_requests_per_s: achieved, errors, latency, cpu })
}
