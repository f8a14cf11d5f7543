//! The watch phase: single-room watchers (ranks 0..n of the Zipf workload,
//! so the busiest rooms are watched) on one `omni serve` while the job runs
//! at a fixed rate.
//!
//! Added delivery latency is "broadcast record committed → watcher receives
//! it": a reference read_committed consumer of the broadcast topic, on a
//! thread of its own so the watchers' work does not delay its clock, sees a
//! record as soon as its transaction commits (the way `omni serve`'s own
//! consumer does), and a change's latency is when its watcher received it
//! minus when the reference did. The record's timestamp is not used: it is
//! the produce time, before the commit, so it would add the commit interval.
//!
//! That end-to-end figure also holds the loopback transport and this
//! bench's own client, which decodes every watcher's stream on the cores
//! serve and the job use. So when serve writes its delivery trace, each
//! change is split at serve's two marks (its shared consumer received it;
//! it handed it to gRPC for the watcher), all on the machine's wall clock:
//! reference → serve's consumer, serve's consumer → gRPC, and gRPC → the
//! watcher in the bench. Reference → gRPC is serve's added latency.
//!
//! A second reference, the same plain consumer, says how much later than
//! the first it sees each change. The two are as often ahead as behind, so
//! its p99 is how far behind the reference any one more consumer (serve's
//! too) already is before doing any work: the floor, on this machine under
//! this load, of serve's added latency.
//!
//! The client side is kept cheap: one task per HTTP/2 connection of 500
//! streams, receipts pushed into a local vector.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::{SelectAll, StreamExt as _};
use omni::proto::omni::{self as pb, watch_event};
use omni::proto::Message as _;
use omni::pubsub::{Pattern, StartAt, Subscriber};
use omni::topology::Topology;
use tokio::sync::watch;

use super::{connect, rss_mib, CpuClock, CpuShare, LoadAverage, LoadDuring, ServeProcess, ROOM_PREFIX};
use crate::cli::bench::latency::Percentiles;
use crate::cli::bench::process::cpu_seconds_of;
use crate::cli::bench::workload::Workload;
use crate::cli::bench::BenchArgs;

/// Watch streams per HTTP/2 connection.
pub const STREAMS_PER_CONNECTION: usize = 500;

/// Figures of one watch phase on one build.
#[derive(Debug, serde::Serialize)]
pub struct WatchPhase {
    serve: &'static str,
    watchers: usize,
    achieved_events_per_s: f64,
    load_average: LoadDuring,
    /// Reference consumer's receipt → the watcher's receipt in the bench, per change.
    pub added_delivery: Percentiles,
    /// Reference consumer's receipt → a second reference's (the same plain
    /// consumer on a thread of its own), per change: what one more consumer
    /// costs on this machine under this load, which serve's consumer also pays.
    second_reference_behind: Percentiles,
    /// `added_delivery` split at serve's marks, from its delivery trace
    /// (absent for a build without one).
    delivery_split: Option<DeliverySplit>,
    /// Seconds serve took, ready and with its watchers open, to go idle
    /// (under 5 % of a core) before the load started.
    serve_settle_s: f64,
    /// Changes the reference saw for watched rooms that no watcher reported.
    missed: usize,
    /// `resynchronised` events the watchers got (a gap their follower could
    /// not fill; the changes it covers count as missed).
    resynchronised: usize,
    /// Watch streams that ended during the phase, by status code.
    streams_ended: BTreeMap<String, usize>,
    /// CPU used while the job was fed, in cores.
    cpu: CpuShare,
    /// Serve's CPU per change delivered to a watcher, in microseconds
    /// (every broadcast record is decoded too, watched or not).
    pub serve_cpu_us_per_change: f64,
    serve_rss_mib_before: f64,
    serve_rss_mib_under_load: f64,
    serve_rss_target_mib: f64,
}

/// Where a change's delivery time goes, per change, in milliseconds of the
/// machine's wall clock. The parts' percentiles do not add up to the whole's.
#[derive(Debug, serde::Serialize)]
struct DeliverySplit {
    /// Reference's receipt → serve handed the change to gRPC: serve's added
    /// latency (its consumer, its fan-out and its follower), without the
    /// transport or this bench's client.
    serve_added: Percentiles,
    /// Reference's receipt → serve's shared consumer decoded it.
    reference_to_serve_consumer: Percentiles,
    /// Serve's consumer → handed to gRPC for the watcher.
    serve_consumer_to_grpc: Percentiles,
    /// Handed to gRPC → the watcher's receipt in the bench: HTTP/2 on both
    /// sides, loopback TCP, and this bench's client waiting for a core.
    grpc_to_watcher: Percentiles,
    /// Changes found at both of serve's marks and by the watcher.
    changes: usize,
}

/// What a watch phase runs on.
pub struct PhaseRun<'a> {
    pub args: &'a BenchArgs,
    pub topology: &'a Topology,
    pub job_pid: u32,
    pub watchers: usize,
    /// Where serve writes its delivery trace, when it does.
    pub trace: Option<PathBuf>,
}

/// Microseconds since the Unix epoch: the one clock the bench and serve share.
fn wall_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// A change as received: the watcher's rank, the version, when (wall clock, µs).
type Receipt = (u32, u64, i64);

/// What one connection's watchers saw.
#[derive(Default)]
struct Watched {
    receipts: Vec<Receipt>,
    ended: BTreeMap<String, usize>,
    resynchronised: usize,
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
                    match event.event {
                        Some(watch_event::Event::Change(change)) => {
                            watched.receipts.push((rank, change.version, wall_micros()));
                        }
                        Some(watch_event::Event::Resynchronised(_)) => watched.resynchronised += 1,
                        _ => {}
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

/// When the reference saw each watched room's change (wall clock, µs).
type Reference = HashMap<(u32, u64), i64>;

/// The reference: a read_committed consumer on a thread and runtime of its
/// own, noting when each watched room's change became readable.
fn reference_reader(
    topology: &Topology,
    watchers: usize,
    last_seen: Arc<AtomicI64>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<Reference>> {
    let (kafka, topic) = (topology.kafka.clone(), topology.broadcast_topic.clone());
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let mut seen = HashMap::new();
            let pattern = Pattern::parse("app/bench/room/*").expect("a valid pattern");
            let mut reader = match Subscriber::subscribe(&kafka, &topic, pattern, StartAt::Latest).await {
                Ok(reader) => reader,
                Err(error) => {
                    let _ = subscribed_tx.send(Err(error.to_string()));
                    return seen;
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
                let at = wall_micros();
                last_seen.fetch_max(at, Ordering::Relaxed);
                let rank = delivery.subject.strip_prefix(ROOM_PREFIX).and_then(|r| r.parse::<u32>().ok());
                if let Some(rank) = rank.filter(|&r| (r as usize) < watchers) {
                    if let Ok(change) = pb::StateChange::decode(delivery.payload.as_slice()) {
                        seen.insert((rank, change.version), at);
                    }
                }
            }
            seen
        })
    });
    subscribed.recv()?.map_err(anyhow::Error::msg)?;
    Ok(thread)
}

/// Opens the phase's watchers on `serve`, one task per connection; returns
/// once every watch is open.
async fn open_watchers(
    serve: &ServeProcess,
    watchers: usize,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<Watched>>>> {
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
    Ok(connections)
}

/// Waits until serve is idle (under 5 % of a core over half a second, for at
/// most a minute): a fresh serve first reads the broadcast's last minute, the
/// previous phase's load included, and live changes wait behind that. Returns how long it took.
pub async fn caught_up(pid: u32) -> Duration {
    let started = Instant::now();
    let mut before = cpu_seconds_of(pid).unwrap_or(0.0);
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_seconds_of(pid).unwrap_or(0.0);
        if now - before < 0.025 {
            break;
        }
        before = now;
    }
    started.elapsed()
}

/// Samples serve's RSS every 500 ms, keeping the peak.
fn sample_rss(pid: u32) -> (tokio::task::JoinHandle<()>, Arc<Mutex<f64>>) {
    let peak = Arc::new(Mutex::new(0f64));
    let sampling = {
        let peak = Arc::clone(&peak);
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
    (sampling, peak)
}

/// Runs the phase on `serve`, and stops it at the end (it writes its trace out as it stops).
pub async fn phase(
    run: &PhaseRun<'_>,
    serve: ServeProcess,
    workload: &mut Workload,
) -> anyhow::Result<(WatchPhase, Vec<u32>)> {
    let (args, watchers) = (run.args, run.watchers);
    let (stop_tx, stop) = watch::channel(false);
    let connections = open_watchers(&serve, watchers, &stop).await?;
    let settle = caught_up(serve.pid()).await;
    let rss_before = rss_mib(serve.pid());
    let last_seen = Arc::new(AtomicI64::new(0));
    let reference = reference_reader(run.topology, watchers, Arc::clone(&last_seen), stop.clone())?;
    let second_reference = reference_reader(run.topology, watchers, Arc::clone(&last_seen), stop.clone())?;
    let (sampling, rss_peak) = sample_rss(serve.pid());
    let load_start = LoadAverage::now();
    let cpu_start = CpuClock::now(serve.pid(), run.job_pid);
    let achieved = feed_the_job(run, workload).await?;
    let cpu = CpuClock::now(serve.pid(), run.job_pid).share_since(&cpu_start);
    let load_end = LoadAverage::now();
    drained(&last_seen).await;
    stop_tx.send_replace(true);
    sampling.abort();
    let (reference, second_reference) =
        tokio::task::spawn_blocking(move || (reference.join(), second_reference.join())).await?;
    let panicked = |_| anyhow::anyhow!("a reference reader panicked");
    let (reference, second_reference) = (reference.map_err(panicked)?, second_reference.map_err(panicked)?);
    let second_reference_behind = Percentiles::of(
        reference.iter().filter_map(|(key, at)| second_reference.get(key).map(|second| millis(second - at))).collect(),
    );
    let Gathered { received, streams_ended, resynchronised } = gather(connections).await?;
    let mut samples = Vec::new();
    let mut missed = 0;
    for (key, at) in &reference {
        match received.get(key) {
            Some(got) => samples.push(millis(got - at)),
            None => missed += 1,
        }
    }
    let peak = *rss_peak.lock().expect("peak");
    let label = serve.label;
    serve.terminate()?;
    let delivery_split = match &run.trace {
        Some(trace) => Some(split(&read_trace(trace)?, &reference, &received)),
        None => None,
    };
    let written = reference.keys().map(|(rank, _)| *rank).collect::<std::collections::BTreeSet<u32>>();
    let phase = WatchPhase {
        serve: label,
        watchers,
        achieved_events_per_s: achieved,
        serve_settle_s: settle.as_secs_f64(),
        load_average: LoadDuring { start: load_start, end: load_end },
        serve_cpu_us_per_change: cpu.serve * args.service_secs as f64 / received.len().max(1) as f64 * 1e6,
        added_delivery: Percentiles::of(samples),
        second_reference_behind,
        delivery_split,
        missed,
        resynchronised,
        streams_ended,
        cpu,
        serve_rss_mib_before: rss_before,
        serve_rss_mib_under_load: peak,
        serve_rss_target_mib: 100.0 + watchers as f64 * 16.0 / 1024.0,
    };
    Ok((phase, written.into_iter().collect()))
}

/// Waits until the references have seen nothing for a second (at most a
/// minute): the job has committed the last of its backlog, and every
/// change's watcher has had that second to receive it, so a change no
/// watcher reported was lost, not still in flight.
async fn drained(last_seen: &AtomicI64) {
    const QUIET_MICROS: i64 = 1_000_000;
    let started = Instant::now();
    while wall_micros() - last_seen.load(Ordering::Relaxed) < QUIET_MICROS
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the workload to the job's input at `--rate` for `--service-secs`;
/// returns the rate achieved.
async fn feed_the_job(run: &PhaseRun<'_>, workload: &mut Workload) -> anyhow::Result<f64> {
    let args = run.args;
    let (brokers, input, rate) = (run.topology.kafka.brokers.clone(), run.topology.input_topic().to_owned(), args.rate);
    let duration = Duration::from_secs(args.service_secs);
    let mut local = std::mem::replace(workload, Workload::new(args.seed + 1, args.rooms, args.zipf));
    let (achieved, local) =
        tokio::task::spawn_blocking(move || produce(&brokers, &input, rate, duration, &mut local).map(|r| (r, local)))
            .await??;
    *workload = local;
    Ok(achieved)
}

/// What every connection's watchers saw, together.
struct Gathered {
    /// When each (rank, version) arrived (wall clock, µs).
    received: HashMap<(u32, u64), i64>,
    streams_ended: BTreeMap<String, usize>,
    resynchronised: usize,
}

async fn gather(connections: Vec<tokio::task::JoinHandle<anyhow::Result<Watched>>>) -> anyhow::Result<Gathered> {
    let mut gathered = Gathered { received: HashMap::new(), streams_ended: BTreeMap::new(), resynchronised: 0 };
    for connection in connections {
        let watched = connection.await??;
        gathered.resynchronised += watched.resynchronised;
        gathered.received.extend(watched.receipts.into_iter().map(|(rank, version, at)| ((rank, version), at)));
        for (code, count) in watched.ended {
            *gathered.streams_ended.entry(code).or_default() += count;
        }
    }
    Ok(gathered)
}

/// Serve's two marks of a change (wall clock, µs), when it has them.
#[derive(Debug, Default, Clone, Copy)]
struct Marks {
    received: Option<i64>,
    sent: Option<i64>,
}

/// Serve's delivery trace, by watched rank and version (the first of each mark).
fn read_trace(path: &std::path::Path) -> anyhow::Result<HashMap<(u32, u64), Marks>> {
    use std::io::BufRead as _;
    let mut marks: HashMap<(u32, u64), Marks> = HashMap::new();
    for line in std::io::BufReader::new(std::fs::File::open(path)?).lines() {
        let line = line?;
        let mut fields = line.splitn(4, ' ');
        let (Some(mark), Some(version), Some(at), Some(path)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(version), Ok(at), Some(Ok(rank))) =
            (version.parse::<u64>(), at.parse::<i64>(), path.strip_prefix(ROOM_PREFIX).map(str::parse::<u32>))
        else {
            continue;
        };
        let entry = marks.entry((rank, version)).or_default();
        match mark {
            "r" => entry.received = entry.received.or(Some(at)),
            "s" => entry.sent = entry.sent.or(Some(at)),
            _ => {}
        }
    }
    Ok(marks)
}

/// Each change's delivery split at serve's marks.
fn split(
    marks: &HashMap<(u32, u64), Marks>,
    reference: &Reference,
    received: &HashMap<(u32, u64), i64>,
) -> DeliverySplit {
    let (mut serve_added, mut to_consumer, mut to_grpc, mut to_watcher) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (key, at) in reference {
        let (Some(got), Some(Marks { received: Some(consumed), sent: Some(sent) })) =
            (received.get(key), marks.get(key))
        else {
            continue;
        };
        serve_added.push(millis(sent - at));
        to_consumer.push(millis(consumed - at));
        to_grpc.push(millis(sent - consumed));
        to_watcher.push(millis(got - sent));
    }
    DeliverySplit {
        changes: serve_added.len(),
        serve_added: Percentiles::of(serve_added),
        reference_to_serve_consumer: Percentiles::of(to_consumer),
        serve_consumer_to_grpc: Percentiles::of(to_grpc),
        grpc_to_watcher: Percentiles::of(to_watcher),
    }
}

fn millis(micros: i64) -> f64 {
    micros as f64 / 1000.0
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
