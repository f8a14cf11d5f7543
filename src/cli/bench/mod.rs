//! `omni bench`: how fast omni is, next to the ceiling, on a real broker.
//!
//! Against the Kafka and Redis it is pointed at (the harness's, normally) it
//! preloads Zipf-skewed room events, runs a stateless transactional
//! passthrough over them (the ceiling), then omni itself from a cold start
//! as a child process (throughput, CPU, peak RSS), then a fixed-rate load
//! (latency to the broadcast topic and to Redis), then a restore from the
//! changelog with the state directory deleted. It prints a table and, last,
//! one JSON object with every figure. `--memory` runs only the memory
//! phases instead ([`memory`]), `--failover` only the failover of an
//! instance lost with its disk ([`failover`]).

mod failover;
mod latency;
mod leases;
mod memory;
mod passthrough;
mod process;
mod service;
mod shapes;
mod workload;

use std::time::{Duration, Instant};

use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::topology::Topology;
use serde_json::json;

use super::config::{Flags, KafkaArgs, RedisUrlArg, TopologyArg};

use process::{HistogramTotals, OmniProcess};
use workload::{Expected, Workload};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Events to preload.
    #[arg(long, default_value = "2000000")]
    pub events: u64,
    /// Rooms, Zipf-skewed (rank 1 is the hot room).
    #[arg(long, default_value = "10000")]
    pub rooms: usize,
    /// Zipf exponent of room popularity.
    #[arg(long, default_value = "1.0")]
    pub zipf: f64,
    /// Input partitions.
    #[arg(long, default_value = "8")]
    pub partitions: i32,
    /// Processing threads of omni (the passthrough has one).
    #[arg(long, default_value = "1")]
    pub threads: usize,
    /// Commit interval of both jobs, in milliseconds.
    #[arg(long, default_value = "100")]
    pub commit_interval_ms: u64,
    /// Fixed rate of the latency phase, events per second.
    #[arg(long, default_value = "20000")]
    pub rate: u64,
    /// Duration of the latency phase in seconds (0 skips it).
    #[arg(long, default_value = "60")]
    pub latency_secs: u64,
    /// Skip the restore phase.
    #[arg(long)]
    pub skip_restore: bool,
    /// Skip the resync phase (Redis loses every key of the run; omni rewrites them from its store).
    #[arg(long)]
    pub skip_resync: bool,
    /// Random seed of the workload.
    #[arg(long, default_value = "42")]
    pub seed: u64,
    /// Run only the memory phases: omni's peak RSS with its default limits
    /// under 1M distinct rooms, a hot room, wide rooms, and rooms closed.
    #[arg(long)]
    pub memory: bool,
    /// Memory phases to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "rooms,hot,wide,closed")]
    pub memory_phases: Vec<memory::Phase>,
    /// Scales every memory phase's room and event counts (0.01 for a quick check).
    #[arg(long, default_value = "1.0")]
    pub memory_scale: f64,
    /// `closed_stream_retention_secs` of the closed-rooms memory phase.
    #[arg(long, default_value = "5")]
    pub memory_retention_secs: u64,
    /// Changes omni's topology in the memory phases, to find where memory
    /// goes: a dotted key and a TOML value, e.g. `limits.redis_backlog_bytes=8388608`
    /// or `redis.url=""` (no Redis). Repeatable. The report then no longer
    /// measures the default configuration, and says so.
    #[arg(long, value_name = "KEY=VALUE")]
    pub memory_set: Vec<String>,
    /// Where Kafka and Redis are: the topology's [kafka] (brokers and properties)
    /// and [redis] url; the bench uses topics and keys of its own.
    #[command(flatten)]
    pub topology: TopologyArg,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis_url: RedisUrlArg,
    /// Run only the service phases: `omni serve` under many single-room
    /// watchers while the job runs at `--rate`, then `GetSnapshot` latency
    /// (see `--service-phases`).
    #[arg(long)]
    pub service: bool,
    /// Watcher counts of the service phases, one phase each.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub service_watchers: Vec<usize>,
    /// Seconds of load per service phase.
    #[arg(long, default_value = "30")]
    pub service_secs: u64,
    /// `GetSnapshot` requests per second in the service phase.
    #[arg(long, default_value = "5000")]
    pub service_snapshot_rate: u64,
    /// Seconds of `GetSnapshot` calls per build.
    #[arg(long, default_value = "10")]
    pub service_snapshot_secs: u64,
    /// Service phases to run, in order: `watch` (the watcher counts at
    /// `--rate`), `snapshot` (`GetSnapshot` at its rate).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "watch,snapshot")]
    pub service_phases: Vec<service::Phase>,
    /// Another omni binary (an older build, say) whose `omni serve` runs every
    /// service phase too, interleaved with this one's; the report adds this
    /// build's figures over the other's.
    #[arg(long, value_name = "EXE")]
    pub service_baseline: Option<std::path::PathBuf>,
    /// Run only the lease phases: the CPU cost of keep-alives and the timer
    /// lag, with `--lease-count` leases kept alive once a second beside `--rate` events/s.
    #[arg(long)]
    pub leases: bool,
    /// Leases of the lease phases.
    #[arg(long, default_value = "10000")]
    pub lease_count: usize,
    /// Length of each measured lease phase, in seconds.
    #[arg(long, default_value = "30")]
    pub lease_phase_secs: u64,
    /// Run only the failover: three `omni run` instances, one killed with -9
    /// and its state directory deleted under load; times until every
    /// partition it owned processes again on the others.
    #[arg(long)]
    pub failover: bool,
    /// Rooms of the failover, each given an event before the kill.
    #[arg(long, default_value = "1000000")]
    pub failover_rooms: u64,
    /// `instance.standby_replicas` of each failover scenario, one scenario each.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub failover_standbys: Vec<usize>,
    /// Events per second of the steady load around the kill (beside 50 a
    /// second to a probe room of each partition).
    #[arg(long, default_value = "2000")]
    pub failover_rate: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let flags = Flags { kafka: Some(&args.kafka), redis_url: Some(&args.redis_url), ..Flags::default() };
    let configured = super::config::load(&args.topology, flags)?;
    let (kafka, redis_url) = (configured.kafka, configured.redis.url);
    if args.memory {
        return memory::run(&args, &kafka, &redis_url).await;
    }
    if args.service {
        return service::run(&args, &kafka, &redis_url).await;
    }
    if args.leases {
        return leases::run(&args, &kafka, &redis_url).await;
    }
    if args.failover {
        return failover::run(&args, &kafka, &redis_url).await;
    }
    let id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let input = format!("{id}.events");
    let commit_interval = Duration::from_millis(args.commit_interval_ms);
    ensure_topics(
        &kafka,
        &[
            TopicSpec { name: input.clone(), partitions: args.partitions, configs: vec![] },
            TopicSpec { name: format!("{id}.passthrough"), partitions: args.partitions, configs: vec![] },
        ],
    )
    .await?;
    eprintln!(
        "bench {id}: preloading {} events over {} rooms on {} partitions",
        args.events, args.rooms, args.partitions
    );
    let (expected, preload_rate, mut workload) = {
        let (brokers, input, events) = (kafka.brokers.clone(), input.clone(), args.events);
        let mut workload = Workload::new(args.seed, args.rooms, args.zipf);
        tokio::task::spawn_blocking(move || {
            workload::preload(&brokers, &input, &mut workload, events)
                .map(|(expected, rate)| (expected, rate, workload))
        })
        .await??
    };
    eprintln!("bench {id}: preloaded at {preload_rate:.0} events/s; {} changes expected", expected.changes);

    eprintln!("bench {id}: passthrough (the ceiling)");
    let passthrough_rate = {
        let (brokers, input, output, id, events) =
            (kafka.brokers.clone(), input.clone(), format!("{id}.passthrough"), id.clone(), args.events);
        tokio::task::spawn_blocking(move || passthrough::run(&brokers, &input, &output, events, commit_interval, &id))
            .await??
    };
    eprintln!("bench {id}: passthrough {passthrough_rate:.0} events/s");

    let state = tempfile::tempdir()?;
    let topology = bench_topology(&id, &args, &kafka, &redis_url, state.path());

    eprintln!("bench {id}: omni from a cold start");
    let omni = OmniProcess::spawn(&topology, state.path())?;
    let started = Instant::now();
    let kafka_secs = wait_until_final(&kafka, &topology, &expected, &redis_url, args.events, started).await?;
    let omni_secs = started.elapsed().as_secs_f64();
    let omni_rate = args.events as f64 / omni_secs;
    let cpu = omni.cpu_seconds()?;
    let throughput_rss = omni.peak_rss_bytes()?;
    eprintln!("bench {id}: omni {omni_rate:.0} events/s");

    let resync = if args.skip_resync {
        None
    } else {
        eprintln!("bench {id}: Redis loses every key of the run; omni rewrites them from its store");
        let secs = time_resync(&redis_url, &id, &topology, &expected).await?;
        eprintln!("bench {id}: every room back in Redis after {secs:.2} s");
        Some(json!({ "rooms": expected.rooms.len(), "seconds": secs }))
    };

    let latency = if args.latency_secs > 0 {
        eprintln!("bench {id}: latency at {} events/s for {} s", args.rate, args.latency_secs);
        let run = latency::LatencyRun {
            brokers: &kafka.brokers,
            input: &input,
            broadcast: &topology.broadcast_topic,
            redis_url: &redis_url,
            key_prefix: &id,
            rate: args.rate,
            duration: Duration::from_secs(args.latency_secs),
        };
        const COMMITS: &str = "omni_commit_seconds";
        const PIPELINES: &str = "omni_redis_write_seconds";
        let (commits, pipelines) = (omni.histogram_totals(COMMITS).await, omni.histogram_totals(PIPELINES).await);
        let mut report = run.run(&mut workload).await?;
        let since = |before: Option<HistogramTotals>, after: Option<HistogramTotals>| after?.mean_ms_since(before?);
        report.commit_mean_ms = since(commits, omni.histogram_totals(COMMITS).await);
        report.redis_pipeline_mean_ms = since(pipelines, omni.histogram_totals(PIPELINES).await);
        Some(report)
    } else {
        None
    };
    let peak_rss = omni.peak_rss_bytes()?;
    omni.terminate()?;

    let restore = if args.skip_restore {
        None
    } else {
        eprintln!("bench {id}: restore with the state directory deleted");
        std::fs::remove_dir_all(&topology.store.dir)?;
        let omni = OmniProcess::spawn(&topology, state.path())?;
        let restore = omni.time_restore(args.partitions).await?;
        omni.terminate()?;
        Some(restore)
    };

    let ratio = omni_rate / passthrough_rate;
    let report = json!({
        "omni_over_passthrough_ratio": ratio,
        "omni_events_per_s": omni_rate,
        "passthrough_events_per_s": passthrough_rate,
        "events": args.events,
        "rooms": args.rooms,
        "partitions": args.partitions,
        "threads": args.threads,
        "commit_interval_ms": args.commit_interval_ms,
        "changes": expected.changes,
        "preload_events_per_s": preload_rate,
        "omni_seconds": omni_secs,
        "omni_seconds_until_offsets_committed": kafka_secs,
        "cpu_seconds_per_million_events": cpu / (args.events as f64 / 1e6),
        "peak_rss_mib_throughput": throughput_rss as f64 / 1048576.0,
        "peak_rss_mib": peak_rss as f64 / 1048576.0,
        "latency": latency,
        "restore": restore,
        "resync": resync,
    });
    clean_up(&kafka, &redis_url, &id, &topology).await;
    print_table(&report);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The topology omni runs under: the defaults, with the run's own topics,
/// group, Redis key prefix and state directory (under `dir`), and the
/// partitions, commit interval and threads of the command line.
fn bench_topology(
    id: &str,
    args: &BenchArgs,
    kafka: &KafkaSettings,
    redis_url: &str,
    dir: &std::path::Path,
) -> Topology {
    let mut topology = Topology::with_defaults(&format!("{id}-omni"), &["recording", "tags"]);
    topology.inputs = vec![format!("{id}.events")];
    topology.broadcast_topic = format!("{id}.state");
    topology.dead_letter_topic = format!("{id}.dlq");
    topology.partitions = args.partitions;
    topology.commit_interval_ms = args.commit_interval_ms;
    topology.kafka = kafka.clone();
    topology.redis.url = redis_url.to_owned();
    topology.redis.key_prefix = id.to_owned();
    topology.store.dir = dir.join("state");
    topology.instance.id = "bench".into();
    topology.instance.threads = args.threads;
    topology
}

/// Deletes the run's topics and Redis keys, so repeated runs do not weigh on the services.
async fn clean_up(kafka: &KafkaSettings, redis_url: &str, id: &str, topology: &Topology) {
    let topics = [
        topology.input_topic().to_owned(),
        format!("{id}.passthrough"),
        topology.broadcast_topic.clone(),
        topology.dead_letter_topic.clone(),
        topology.changelog_topic(),
    ];
    if let Ok(admin) =
        kafka.client_config().create::<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>>()
    {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = admin.delete_topics(&names, &rdkafka::admin::AdminOptions::new()).await {
            eprintln!("bench {id}: could not delete its topics: {e}");
        }
    }
    let Ok(client) = redis::Client::open(redis_url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    if let Err(e) = delete_keys(&mut conn, id).await {
        eprintln!("bench {id}: could not delete its Redis keys: {e}");
    }
}

/// Deletes every Redis key of the run, as a FLUSHALL would, without touching anyone else's.
async fn delete_keys(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> redis::RedisResult<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{id}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).query_async::<()>(conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Deletes every key of the run from Redis while omni runs idle, and times
/// how long omni takes to notice and rewrite every room from its store.
async fn time_resync(redis_url: &str, id: &str, topology: &Topology, expected: &Expected) -> anyhow::Result<f64> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    delete_keys(&mut conn, id).await?;
    let started = Instant::now();
    wait_for_redis_versions(&mut conn, topology, expected, Instant::now() + Duration::from_secs(1800)).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Waits until the job committed every input offset and Redis holds every
/// room's final version; returns the seconds until the offsets were committed.
async fn wait_until_final(
    kafka: &KafkaSettings,
    topology: &Topology,
    expected: &Expected,
    redis_url: &str,
    events: u64,
    started: Instant,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    let group = process::group_reader(kafka, &topology.application_id)?;
    loop {
        // A broker slow to answer under the load the bench makes is asked again.
        match process::committed_total(&group, topology.input_topic()) {
            Ok(committed) if committed >= events => break,
            Ok(_) => {}
            Err(e) => eprintln!("bench: reading the committed offsets failed ({e}); asking again"),
        }
        anyhow::ensure!(Instant::now() < deadline, "omni did not consume the preload within 30 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let committed = started.elapsed().as_secs_f64();
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    wait_for_redis_versions(&mut conn, topology, expected, deadline).await?;
    Ok(committed)
}

/// Waits until Redis holds every open room at its final version.
async fn wait_for_redis_versions(
    conn: &mut redis::aio::MultiplexedConnection,
    topology: &Topology,
    expected: &Expected,
    deadline: Instant,
) -> anyhow::Result<()> {
    let keys = omni::view::KeyLayout::new(&topology.redis.key_prefix);
    let open: Vec<(&String, u64)> =
        expected.rooms.iter().filter(|(_, s)| !s.closed && s.version > 0).map(|(r, s)| (r, s.version)).collect();
    // Rooms already seen at their final version are not asked again.
    let mut waiting: &[(&String, u64)] = &open;
    // No open room (every one closed) leaves nothing to ask.
    while !waiting.is_empty() {
        // Chunks small enough to answer within the connection's response timeout.
        let chunk = &waiting[..waiting.len().min(2000)];
        let mut pipe = redis::pipe();
        for (room, _) in chunk {
            pipe.hget(keys.room(room), "version");
        }
        let versions: Vec<Option<u64>> = pipe.query_async(conn).await?;
        let reached = chunk.iter().zip(&versions).take_while(|((_, want), got)| **got == Some(*want)).count();
        waiting = &waiting[reached..];
        if waiting.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "Redis did not reach the final versions");
        if reached < chunk.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn print_table(report: &serde_json::Value) {
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |f| format!("{f:.1}"));
    let rows = [
        ("events", report["events"].to_string()),
        ("passthrough events/s", num(&report["passthrough_events_per_s"])),
        ("omni events/s (cold start, EOS, Redis)", num(&report["omni_events_per_s"])),
        ("omni / passthrough", format!("{:.2}", report["omni_over_passthrough_ratio"].as_f64().unwrap_or(0.0))),
        ("CPU s per million events", num(&report["cpu_seconds_per_million_events"])),
        ("peak RSS MiB", num(&report["peak_rss_mib"])),
        ("latency → fold p50/p99/p999/max ms", percentiles(&report["latency"]["to_fold"])),
        ("latency → broadcast p50/p99/p999/max ms", percentiles(&report["latency"]["to_broadcast"])),
        ("latency → Redis p50/p99/p999/max ms", percentiles(&report["latency"]["to_redis"])),
        ("commit mean ms (latency phase)", num(&report["latency"]["commit_mean_ms"])),
        ("Redis pipeline mean ms (latency phase)", num(&report["latency"]["redis_pipeline_mean_ms"])),
        ("restore records/s", num(&report["restore"]["records_per_s"])),
        ("Redis rewritten after losing every key, s", num(&report["resync"]["seconds"])),
    ];
    for (name, value) in rows {
        println!("{name:<44} {value}");
    }
}

fn percentiles(p: &serde_json::Value) -> String {
    if p.is_null() {
        return "-".into();
    }
    let f = |k: &str| p[k].as_f64().map_or("-".to_owned(), |v| format!("{v:.0}"));
    format!("{}/{}/{}/{} ({} samples)", f("p50_ms"), f("p99_ms"), f("p999_ms"), f("max_ms"), p["samples"])
}
