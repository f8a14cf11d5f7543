//! `omni bench --service`: `omni serve` under many watchers while the job
//! runs at a fixed rate ([`watch`]), then `GetSnapshot` at a fixed request
//! rate ([`snapshot`]). `--service-phases` picks the phases.
//!
//! With `--service-baseline EXE`, every phase also runs against an `omni
//! serve` started from that other binary (an older build, say), interleaved
//! with the current one on the same job, Kafka and Redis, so the two compare
//! under the same load on a shared machine; the report adds the current
//! figures over the baseline's as ratios. Each figure comes with the
//! machine's load average, since other work on the machine moves them.

mod snapshot;
mod watch;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::proto::omni::omni_client::OmniClient;
use omni::topology::Topology;
use tonic::transport::{Channel, Endpoint};

use super::latency::Percentiles;
use super::process::{cpu_seconds_of, OmniProcess};
use super::workload::Workload;
use super::BenchArgs;

const ROOM_PREFIX: &str = "app/bench/room/r";

/// Rooms `GetSnapshot` asks for, in turn.
const SNAPSHOT_ROOMS: usize = 1000;

/// Events written before a `GetSnapshot` phase that follows no watch phase.
const SNAPSHOT_SEED_EVENTS: u64 = 20_000;

/// The service phases `--service-phases` may pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// `--service-watchers` watchers while the job runs at `--rate`.
    Watch,
    /// `GetSnapshot` at `--service-snapshot-rate` requests per second.
    Snapshot,
}

/// One `omni serve` build under measurement.
#[derive(Debug, Clone)]
struct Build {
    /// `current` (this binary) or `baseline`.
    label: &'static str,
    exe: PathBuf,
    /// Whether it writes the delivery trace (`--delivery-trace`, which older builds lack).
    traced: bool,
}

/// A running `omni serve`.
struct ServeProcess {
    child: std::process::Child,
    addr: String,
    label: &'static str,
}

impl ServeProcess {
    fn spawn(build: &Build, topology_file: &Path, dir: &Path, trace: Option<&Path>) -> anyhow::Result<ServeProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("serve.log"))?;
        let mut command = std::process::Command::new(&build.exe);
        command.args(["serve", "--topology"]).arg(topology_file).args(["--listen", &addr]);
        if let Some(trace) = trace {
            command.arg("--delivery-trace").arg(trace);
        }
        let child = command
            // The topology file says everything: no setting of the bench's environment overrides it.
            .env_remove("OMNI_BROKERS")
            .env_remove("OMNI_REDIS_URL")
            .env_remove("OMNI_KEY_PREFIX")
            .env_remove("OMNI_SERVICE_LISTEN")
            .env_remove("OMNI_SERVICE_TOKENS")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(ServeProcess { child, addr, label: build.label })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until its `/readyz` says ready: a fresh serve first reads the
    /// broadcast's last minute, the previous phases' load included.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("omni serve ({}) exited with {status} before it was ready", self.label);
            }
            let asked = tokio::time::timeout(Duration::from_secs(2), crate::cli::health::get(&self.addr, "/readyz"));
            if matches!(asked.await, Ok(Ok((200, _)))) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "omni serve ({}) was not ready within 120 s", self.label);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for the exit (which flushes the delivery trace).
    fn terminate(mut self) -> anyhow::Result<()> {
        std::process::Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait()?.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "omni serve ({}) did not stop within 15 s of SIGTERM",
                self.label
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        // After `terminate` the child is reaped, and both calls do nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine's load average (1, 5 and 15 minutes) at one moment.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct LoadAverage([f64; 3]);

impl LoadAverage {
    fn now() -> LoadAverage {
        let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
        LoadAverage([(); 3].map(|()| fields.next().unwrap_or(0.0)))
    }
}

/// The load average when a phase started and when it ended.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct LoadDuring {
    start: LoadAverage,
    end: LoadAverage,
}

/// CPU used over a stretch of time, in cores (the machine has `machine_cores`).
#[derive(Debug, Clone, Default, serde::Serialize)]
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

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
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

/// The builds to measure: this binary, and the baseline when one is given.
fn builds(args: &BenchArgs) -> anyhow::Result<Vec<Build>> {
    let mut builds = vec![Build { label: "current", exe: std::env::current_exe()?, traced: true }];
    if let Some(exe) = &args.service_baseline {
        anyhow::ensure!(exe.is_file(), "--service-baseline {}: no such file", exe.display());
        builds.push(Build { label: "baseline", exe: exe.clone(), traced: writes_delivery_trace(exe)? });
    }
    Ok(builds)
}

/// Whether `omni serve` of this binary takes `--delivery-trace` (older builds do not).
fn writes_delivery_trace(exe: &Path) -> anyhow::Result<bool> {
    let help = std::process::Command::new(exe).args(["serve", "--help"]).output()?;
    Ok(String::from_utf8_lossy(&help.stdout).contains("--delivery-trace"))
}

/// Current over baseline: latency percentiles, and serve's CPU per unit of work.
fn ratios(current: (&Percentiles, f64), baseline: (&Percentiles, f64)) -> serde_json::Value {
    let ratio = |a: f64, b: f64| if b > 0.0 { serde_json::json!(a / b) } else { serde_json::Value::Null };
    let ((current, current_cpu), (baseline, baseline_cpu)) = (current, baseline);
    serde_json::json!({
        "latency_p50": ratio(current.p50_ms, baseline.p50_ms),
        "latency_p99": ratio(current.p99_ms, baseline.p99_ms),
        "latency_p999": ratio(current.p999_ms, baseline.p999_ms),
        "serve_cpu_per_unit": ratio(current_cpu, baseline_cpu),
    })
}

pub async fn run(args: &BenchArgs, kafka: &KafkaSettings, redis_url: &str) -> anyhow::Result<()> {
    let builds = builds(args)?;
    let id = format!("bench-svc-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let state = tempfile::tempdir()?;
    let mut topology = super::bench_topology(&id, args, kafka, redis_url, state.path());
    topology.service.max_streams_per_connection = watch::STREAMS_PER_CONNECTION;
    let spec = |name: String| TopicSpec { name, partitions: args.partitions, configs: vec![] };
    ensure_topics(kafka, &[spec(topology.input_topic().to_owned()), spec(topology.broadcast_topic.clone())]).await?;
    let job = OmniProcess::spawn(&topology, state.path())?;
    let topology_file = state.path().join("topology.toml");
    let mut workload = Workload::new(args.seed, args.rooms, args.zipf);
    let mut report = serde_json::Map::new();
    let mut comparison = serde_json::Map::new();
    // Rooms the job wrote, for GetSnapshot: asking for others would measure NOT_FOUND.
    let mut rooms = BTreeSet::new();
    if args.service_phases.contains(&Phase::Watch) {
        let mut phases = Vec::new();
        let mut compared = Vec::new();
        for (index, &watchers) in args.service_watchers.iter().enumerate() {
            let mut order: Vec<&Build> = builds.iter().collect();
            // Alternate which build goes first, so neither always meets the warmer machine.
            if index % 2 == 1 {
                order.reverse();
            }
            let mut by_label = std::collections::BTreeMap::new();
            for build in order {
                eprintln!(
                    "bench {id}: {watchers} watchers on {} at {} events/s for {} s",
                    build.label, args.rate, args.service_secs
                );
                let trace = build.traced.then(|| state.path().join(format!("trace-{}-{watchers}", build.label)));
                let mut serve = ServeProcess::spawn(build, &topology_file, state.path(), trace.as_deref())?;
                serve.wait_ready().await?;
                let run = watch::PhaseRun { args, topology: &topology, job_pid: job.pid(), watchers, trace };
                let (phase, written) = watch::phase(&run, serve, &mut workload).await?;
                rooms.extend(written);
                by_label.insert(build.label, (phase.added_delivery.clone(), phase.serve_cpu_us_per_change));
                phases.push(phase);
            }
            if let (Some((current, current_cpu)), Some((baseline, baseline_cpu))) =
                (by_label.get("current"), by_label.get("baseline"))
            {
                let ratios = ratios((current, *current_cpu), (baseline, *baseline_cpu));
                compared.push(serde_json::json!({ "watchers": watchers, "added_delivery": ratios }));
            }
        }
        report.insert("watch".into(), serde_json::to_value(phases)?);
        if !compared.is_empty() {
            comparison.insert("watch".into(), compared.into());
        }
    }
    if args.service_phases.contains(&Phase::Snapshot) {
        if rooms.is_empty() {
            rooms = seed_rooms(args, kafka, &topology, redis_url, &mut workload).await?;
        }
        let rooms: Vec<u32> = rooms.into_iter().take(SNAPSHOT_ROOMS).collect();
        eprintln!("bench {id}: GetSnapshot at {} requests/s over {} rooms", args.service_snapshot_rate, rooms.len());
        let mut serves = Vec::new();
        for build in &builds {
            let mut serve = ServeProcess::spawn(build, &topology_file, state.path(), None)?;
            serve.wait_ready().await?;
            serves.push(serve);
        }
        let phases = snapshot::phase(args, &serves, job.pid(), &rooms).await?;
        for serve in serves {
            serve.terminate()?;
        }
        if let [current, baseline] = &phases[..] {
            let ratios = ratios(
                (&current.latency, current.serve_cpu_us_per_call),
                (&baseline.latency, baseline.serve_cpu_us_per_call),
            );
            comparison.insert("get_snapshot".into(), ratios);
        }
        report.insert("get_snapshot".into(), serde_json::to_value(phases)?);
    }
    job.terminate()?;
    super::clean_up(kafka, redis_url, &id, &topology).await;
    if !comparison.is_empty() {
        report.insert("current_over_baseline".into(), comparison.into());
    }
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "service": report }))?);
    Ok(())
}

/// Writes events for `GetSnapshot` when no watch phase did, and waits until
/// Redis holds them; returns the ranks of the rooms left open.
async fn seed_rooms(
    args: &BenchArgs,
    kafka: &KafkaSettings,
    topology: &Topology,
    redis_url: &str,
    workload: &mut Workload,
) -> anyhow::Result<BTreeSet<u32>> {
    let (brokers, input) = (kafka.brokers.clone(), topology.input_topic().to_owned());
    let mut local = std::mem::replace(workload, Workload::new(args.seed + 1, args.rooms, args.zipf));
    let (expected, local) = tokio::task::spawn_blocking(move || {
        super::workload::preload(&brokers, &input, &mut local, SNAPSHOT_SEED_EVENTS).map(|(e, _)| (e, local))
    })
    .await??;
    *workload = local;
    super::wait_until_final(kafka, topology, &expected, redis_url, SNAPSHOT_SEED_EVENTS, Instant::now()).await?;
    Ok(expected
        .rooms
        .iter()
        .filter(|(_, room)| !room.closed && room.version > 0)
        .filter_map(|(path, _)| path.strip_prefix(ROOM_PREFIX)?.parse().ok())
        .collect())
}
