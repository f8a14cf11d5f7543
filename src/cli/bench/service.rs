//! `omni bench --service`: `omni serve` under many watchers while the job
//! runs at a fixed rate. Each watcher follows one room (ranks 0..n of the
//! Zipf workload, so the busiest rooms are watched); a read_committed reader
//! of the broadcast topic in this process is the reference, and a change's
//! added delivery latency is when its watcher received it minus when the
//! reference did. Also the service's RSS, and `GetSnapshot` latency at a
//! fixed request rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::proto::omni::omni_client::OmniClient;
use omni::proto::omni::{self as pb, watch_event};
use omni::proto::Message as _;
use omni::pubsub::{Pattern, StartAt, Subscriber};
use tonic::transport::Channel;

use super::latency::Percentiles;
use super::process::OmniProcess;
use super::workload::Workload;
use super::BenchArgs;

/// Watch streams per HTTP/2 connection.
const STREAMS_PER_CONNECTION: usize = 500;

#[derive(Debug, serde::Serialize)]
struct WatchPhase {
    watchers: usize,
    achieved_events_per_s: f64,
    /// Watcher receive minus reference receive, per change.
    added_delivery: Percentiles,
    /// Changes the reference saw for watched rooms that no watcher reported.
    missed: usize,
    serve_rss_mib_before: f64,
    serve_rss_mib_under_load: f64,
    serve_rss_target_mib: f64,
}

#[derive(Debug, serde::Serialize)]
struct SnapshotPhase {
    target_requests_per_s: u64,
    achieved_requests_per_s: f64,
    errors: usize,
    latency: Percentiles,
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
    for &watchers in &args.service_watchers {
        eprintln!("bench {id}: {watchers} watchers at {} events/s for {} s", args.rate, args.service_secs);
        phases.push(watch_phase(args, &topology, &serve, watchers, &mut workload).await?);
    }
    eprintln!("bench {id}: GetSnapshot at {} requests/s", args.service_snapshot_rate);
    let snapshots = snapshot_phase(&serve, args.service_snapshot_rate, args.rooms.min(1000)).await?;
    drop(serve);
    job.terminate()?;
    let report = serde_json::json!({ "service": { "watch": phases, "get_snapshot": snapshots } });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn connect(addr: &str) -> anyhow::Result<OmniClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match OmniClient::connect(format!("http://{addr}")).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

type Received = Arc<Mutex<HashMap<(String, u64), Instant>>>;

async fn watch_phase(
    args: &BenchArgs,
    topology: &omni::topology::Topology,
    serve: &Serve,
    watchers: usize,
    workload: &mut Workload,
) -> anyhow::Result<WatchPhase> {
    let received: Received = Arc::default();
    let mut tasks = Vec::new();
    let mut client = connect(&serve.addr).await?;
    for rank in 0..watchers {
        if rank % STREAMS_PER_CONNECTION == 0 {
            client = connect(&serve.addr).await?;
        }
        let room = format!("app/bench/room/r{rank}");
        let mut stream = client.watch(pb::WatchRequest { pattern: room }).await?.into_inner();
        let received = Arc::clone(&received);
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                if let Some(watch_event::Event::Change(change)) = event.event {
                    received.lock().expect("received").insert((change.path, change.version), Instant::now());
                }
            }
        }));
    }
    let rss_before = rss_mib(serve.child.id());
    let reference: Received = Arc::default();
    let pattern = Pattern::parse("app/bench/room/*")?;
    let mut reader =
        Subscriber::subscribe(&topology.kafka, &topology.broadcast_topic, pattern, StartAt::Latest).await?;
    let reading = {
        let reference = Arc::clone(&reference);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = reader.next().await {
                if let Ok(change) = omni::proto::omni::StateChange::decode(delivery.payload.as_slice()) {
                    reference.lock().expect("reference").insert((change.path, change.version), Instant::now());
                }
            }
        })
    };
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
    tokio::time::sleep(Duration::from_secs(3)).await;
    reading.abort();
    sampling.abort();
    for task in &tasks {
        task.abort();
    }
    let reference = std::mem::take(&mut *reference.lock().expect("reference"));
    let received = std::mem::take(&mut *received.lock().expect("received"));
    let watched = |path: &str| {
        path.strip_prefix("app/bench/room/r").and_then(|r| r.parse::<usize>().ok()).is_some_and(|r| r < watchers)
    };
    let mut samples = Vec::new();
    let mut missed = 0;
    for (key, at) in &reference {
        if !watched(&key.0) {
            continue;
        }
        match received.get(key) {
            Some(got) if got >= at => samples.push(got.duration_since(*at).as_secs_f64() * 1000.0),
            Some(got) => samples.push(-(at.duration_since(*got).as_secs_f64() * 1000.0)),
            None => missed += 1,
        }
    }
    let peak = *rss_peak.lock().expect("peak");
    Ok(WatchPhase {
        watchers,
        achieved_events_per_s: achieved,
        added_delivery: Percentiles::of(samples),
        missed,
        serve_rss_mib_before: rss_before,
        serve_rss_mib_under_load: peak,
        serve_rss_target_mib: 100.0 + watchers as f64 * 16.0 / 1024.0,
    })
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

async fn snapshot_phase(serve: &Serve, rate: u64, rooms: usize) -> anyhow::Result<SnapshotPhase> {
    let client = connect(&serve.addr).await?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let duration = Duration::from_secs(10);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut calls = Vec::new();
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let (mut client, samples, errors) = (client.clone(), Arc::clone(&samples), Arc::clone(&errors));
            let path = format!("app/bench/room/r{}", sent as usize % rooms.max(1));
            calls.push(tokio::spawn(async move {
                let asked = Instant::now();
                match client.get_snapshot(pb::GetSnapshotRequest { path }).await {
                    Ok(_) => samples.lock().expect("samples").push(asked.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => *errors.lock().expect("errors") += 1,
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
    let latency = Percentiles::of(std::mem::take(&mut *samples.lock().expect("samples")));
    let errors = *errors.lock().expect("errors");
    Ok(SnapshotPhase { target_requests_per_s: rate, achieved_requests_per_s: achieved, errors, latency })
}
