//! `omni bench --memory`: omni's peak RSS with its default `[limits]` and
//! `[store]` under four shapes of state, each in a fresh omni run of its own
//! (own topics, group, Redis key prefix and state directory), so peaks do
//! not mix:
//!
//! - `rooms`: 1M distinct rooms, one small event each;
//! - `hot`: 1M events, half of them to one room updating a few small tags,
//!   the rest over 10k rooms;
//! - `wide`: 40k rooms × 30 tags × 200-byte values (1.2M events);
//! - `closed`: 10k rooms with a few tags each, then closed, under a short
//!   `closed_stream_retention_secs`: the store's and Redis' key counts right
//!   after the closes, and again once the retention passed.
//!
//! While omni works through a phase, its RSS and its memory gauges (RocksDB,
//! the Redis backlog) are sampled, so a peak can be traced to its part.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::store::{RocksStore, StateStore};
use omni::topology::Topology;
use serde::Serialize;
use serde_json::{json, Value};

use super::process::OmniProcess;
use super::shapes::{self, Events};
use super::workload::Expected;
use super::BenchArgs;

/// Most peak RSS a phase may take with the default configuration.
const TARGET_MIB: f64 = 400.0;
const MIB: f64 = 1048576.0;

/// The memory phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// 1M distinct rooms, one small event each.
    Rooms,
    /// Half the traffic to one hot room, the rest over 10k rooms.
    Hot,
    /// 40k rooms × 30 tags × 200-byte values.
    Wide,
    /// 10k rooms opened and closed, with a short closed-stream retention.
    Closed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Rooms => "rooms",
            Phase::Hot => "hot",
            Phase::Wide => "wide",
            Phase::Closed => "closed",
        }
    }
}

/// What every phase runs against.
struct Bench<'a> {
    args: &'a BenchArgs,
    kafka: &'a KafkaSettings,
    redis_url: &'a str,
    id: String,
}

impl Bench<'_> {
    /// A room or event count of the full-size phase, scaled by `--memory-scale`.
    fn scaled(&self, n: u64) -> u64 {
        ((n as f64 * self.args.memory_scale).round() as u64).max(1)
    }
}

pub async fn run(args: &BenchArgs, kafka: &KafkaSettings, redis_url: &str) -> anyhow::Result<()> {
    let id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bench = Bench { args, kafka, redis_url, id };
    let mut phases = Vec::new();
    for &phase in &args.memory_phases {
        eprintln!("bench {}: memory phase {}", bench.id, phase.name());
        let report = match phase {
            Phase::Rooms => simple_phase(&bench, phase, shapes::distinct_rooms(bench.scaled(1_000_000))).await?,
            Phase::Hot => {
                let events = shapes::hot_room(bench.scaled(1_000_000), bench.scaled(10_000), args.seed);
                simple_phase(&bench, phase, events).await?
            }
            Phase::Wide => {
                simple_phase(&bench, phase, shapes::wide_rooms(bench.scaled(40_000), 30, 200, args.seed)).await?
            }
            Phase::Closed => closed_phase(&bench).await?,
        };
        let peak = report["peak_rss_mib"].as_f64().unwrap_or_default();
        eprintln!("bench {}: {} peak RSS {peak:.1} MiB", bench.id, phase.name());
        phases.push(report);
    }
    let defaults = Topology::with_defaults("bench", &["recording", "tags"]);
    let report = json!({
        "mode": "memory",
        "target_peak_rss_mib": TARGET_MIB,
        "all_meet_target": phases.iter().all(|p| p["meets_target"] == true),
        "scale": args.memory_scale,
        "partitions": args.partitions,
        "threads": args.threads,
        "commit_interval_ms": args.commit_interval_ms,
        "limits": defaults.limits,
        "store": defaults.store.memory,
        "default_config": args.memory_set.is_empty(),
        "settings": args.memory_set,
        "phases": phases,
    });
    print_table(&report);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Applies `key=value` settings (a dotted key into the topology, a TOML
/// value) to the topology, for a diagnostic run.
fn apply_settings(topology: &mut Topology, settings: &[String]) -> anyhow::Result<()> {
    if settings.is_empty() {
        return Ok(());
    }
    let mut document = toml::Value::try_from(&*topology)?;
    for setting in settings {
        let (key, value) = setting.split_once('=').with_context(|| format!("{setting:?} is not KEY=VALUE"))?;
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .with_context(|| format!("the value of {setting:?} is not TOML"))?
            .remove("v")
            .context("a TOML value")?;
        let mut keys: Vec<&str> = key.trim().split('.').collect();
        let last = keys.pop().context("an empty key")?;
        let mut table = document.as_table_mut().context("a topology is a table")?;
        for part in keys {
            let entry = table.entry(part).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().with_context(|| format!("{part} in {key} is not a table"))?;
        }
        table.insert(last.to_owned(), value);
    }
    *topology = document.try_into().context("the topology with --memory-set")?;
    Ok(())
}

/// One phase's omni run: its topology, state directory, and what it was fed.
struct PhaseRun {
    id: String,
    topology: Topology,
    state: tempfile::TempDir,
    expected: Expected,
    events: u64,
    preload_rate: f64,
}

impl PhaseRun {
    async fn create(bench: &Bench<'_>, phase: Phase) -> anyhow::Result<PhaseRun> {
        let id = format!("{}-{}", bench.id, phase.name());
        let state = tempfile::tempdir()?;
        let mut topology = super::bench_topology(&id, bench.args, bench.kafka, bench.redis_url, state.path());
        if phase == Phase::Closed {
            topology.limits.closed_stream_retention_secs = bench.args.memory_retention_secs;
        }
        apply_settings(&mut topology, &bench.args.memory_set)?;
        let input =
            TopicSpec { name: topology.input_topic().to_owned(), partitions: bench.args.partitions, configs: vec![] };
        ensure_topics(bench.kafka, &[input]).await?;
        Ok(PhaseRun { id, topology, state, expected: Expected::default(), events: 0, preload_rate: 0.0 })
    }

    /// Produces the events to the phase's input, folding them into what omni must end with.
    async fn preload(&mut self, bench: &Bench<'_>, events: Events) -> anyhow::Result<()> {
        let (brokers, input) = (bench.kafka.brokers.clone(), self.topology.input_topic().to_owned());
        let mut expected = std::mem::take(&mut self.expected);
        let (expected, count, rate) = tokio::task::spawn_blocking(move || {
            shapes::preload(&brokers, &input, &mut expected, events).map(|(count, rate)| (expected, count, rate))
        })
        .await??;
        self.expected = expected;
        self.events += count;
        self.preload_rate = rate;
        eprintln!("bench {}: preloaded {count} events at {rate:.0} events/s", self.id);
        Ok(())
    }

    /// Waits, as the throughput phase does, until omni committed every event
    /// produced so far and Redis holds every open room's final version,
    /// sampling omni's memory meanwhile.
    async fn process(&self, bench: &Bench<'_>, omni: &OmniProcess, peaks: &mut Peaks) -> anyhow::Result<()> {
        let (kafka, redis_url) = (bench.kafka, bench.redis_url);
        // Without Redis (a diagnostic run) only the offsets tell.
        let no_rooms = Expected::default();
        let expected = if self.redis_on() { &self.expected } else { &no_rooms };
        let wait = super::wait_until_final(kafka, &self.topology, expected, redis_url, self.events, Instant::now());
        tokio::pin!(wait);
        loop {
            tokio::select! {
                done = &mut wait => return done.map(|_| ()),
                () = tokio::time::sleep(Duration::from_millis(500)) => peaks.add(Sample::of(omni).await),
            }
        }
    }

    fn redis_on(&self) -> bool {
        !self.topology.redis.url.is_empty()
    }

    /// Deletes the phase's topics and Redis keys.
    async fn clean_up(&self, bench: &Bench<'_>) {
        super::clean_up(bench.kafka, bench.redis_url, &self.id, &self.topology).await;
    }
}

/// omni's memory at one moment, in MiB (and rooms).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Sample {
    rss_mib: f64,
    rocksdb_memory_mib: f64,
    redis_backlog_mib: f64,
    redis_backlog_rooms: f64,
}

impl Sample {
    async fn of(omni: &OmniProcess) -> Sample {
        const GAUGES: [&str; 3] = ["omni_rocksdb_memory_bytes", "omni_redis_backlog_bytes", "omni_redis_backlog_rooms"];
        let gauges = omni.metrics(&GAUGES).await;
        let gauge = |i: usize| gauges[i].unwrap_or(0.0);
        Sample {
            rss_mib: omni.rss_bytes().unwrap_or(0) as f64 / MIB,
            rocksdb_memory_mib: gauge(0) / MIB,
            redis_backlog_mib: gauge(1) / MIB,
            redis_backlog_rooms: gauge(2),
        }
    }
}

/// The highest of each figure over a run, and every figure when RSS was highest.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Peaks {
    samples: u64,
    highest: Sample,
    at_highest_rss: Sample,
}

impl Peaks {
    fn add(&mut self, sample: Sample) {
        self.samples += 1;
        if sample.rss_mib >= self.highest.rss_mib {
            self.at_highest_rss = sample;
        }
        let highest = &mut self.highest;
        highest.rss_mib = highest.rss_mib.max(sample.rss_mib);
        highest.rocksdb_memory_mib = highest.rocksdb_memory_mib.max(sample.rocksdb_memory_mib);
        highest.redis_backlog_mib = highest.redis_backlog_mib.max(sample.redis_backlog_mib);
        highest.redis_backlog_rooms = highest.redis_backlog_rooms.max(sample.redis_backlog_rooms);
    }
}

/// The figures every phase reports about the omni run that processed it.
fn run_report(
    phase: Phase,
    run: &PhaseRun,
    omni: &OmniProcess,
    started: Instant,
    peaks: Peaks,
) -> anyhow::Result<Value> {
    let seconds = started.elapsed().as_secs_f64();
    let peak = omni.peak_rss_bytes()? as f64 / MIB;
    Ok(json!({
        "phase": phase,
        "events": run.events,
        "rooms": run.expected.rooms.len(),
        "changes": run.expected.changes,
        "peak_rss_mib": peak,
        "meets_target": peak <= TARGET_MIB,
        "seconds": seconds,
        "events_per_s": run.events as f64 / seconds,
        "cpu_seconds": omni.cpu_seconds()?,
        "preload_events_per_s": run.preload_rate,
        "sampled": peaks,
    }))
}

/// Preloads the events, then runs omni from a cold start until they are all processed.
async fn simple_phase(bench: &Bench<'_>, phase: Phase, events: Events) -> anyhow::Result<Value> {
    let mut run = PhaseRun::create(bench, phase).await?;
    let report = simple_run(bench, phase, &mut run, events).await;
    run.clean_up(bench).await;
    report
}

async fn simple_run(bench: &Bench<'_>, phase: Phase, run: &mut PhaseRun, events: Events) -> anyhow::Result<Value> {
    run.preload(bench, events).await?;
    eprintln!("bench {}: omni from a cold start", run.id);
    let omni = OmniProcess::spawn(&run.topology, run.state.path())?;
    let (started, mut peaks) = (Instant::now(), Peaks::default());
    run.process(bench, &omni, &mut peaks).await?;
    let report = run_report(phase, run, &omni, started, peaks)?;
    omni.terminate()?;
    Ok(report)
}

/// Rooms opened, then closed, under a short closed-stream retention.
async fn closed_phase(bench: &Bench<'_>) -> anyhow::Result<Value> {
    let mut run = PhaseRun::create(bench, Phase::Closed).await?;
    let report = closed_run(bench, &mut run).await;
    run.clean_up(bench).await;
    report
}

/// Opens the rooms (a few tags each) and waits for them in Redis, closes
/// them and waits until every hash is gone, and counts keys right then: in
/// Redis at once, in the store once omni stopped. Then omni runs again on
/// its store until the retention passed, and the keys are counted again.
async fn closed_run(bench: &Bench<'_>, run: &mut PhaseRun) -> anyhow::Result<Value> {
    let rooms = bench.scaled(10_000);
    run.preload(bench, shapes::rooms_to_close(rooms, 3)).await?;
    let omni = OmniProcess::spawn(&run.topology, run.state.path())?;
    let (started, mut peaks) = (Instant::now(), Peaks::default());
    run.process(bench, &omni, &mut peaks).await?;
    let before = redis_keys(bench.redis_url, &run.id).await?;
    eprintln!("bench {}: {rooms} rooms open ({before:?}); closing them", run.id);
    run.preload(bench, shapes::closes(rooms)).await?;
    run.process(bench, &omni, &mut peaks).await?;
    if run.redis_on() {
        wait_until_hashes_gone(bench.redis_url, run, rooms).await?;
    }
    let closed = Instant::now();
    let redis = (redis_keys(bench.redis_url, &run.id).await?, closed.elapsed());
    let mut report = run_report(Phase::Closed, run, &omni, started, peaks)?;
    omni.terminate()?;
    let after_closes = KeyCounts::at(redis, store_rooms(&run.topology, bench.args.partitions)?, closed);

    let retention = Duration::from_secs(run.topology.limits.closed_stream_retention_secs);
    eprintln!("bench {}: omni again on its store until {} s past the closes", run.id, retention.as_secs() + 10);
    let omni = OmniProcess::spawn(&run.topology, run.state.path())?;
    omni.time_restore(bench.args.partitions).await?;
    tokio::time::sleep_until((closed + retention + Duration::from_secs(10)).into()).await;
    let redis = (redis_keys(bench.redis_url, &run.id).await?, closed.elapsed());
    let restart_peak = omni.peak_rss_bytes()? as f64 / MIB;
    omni.terminate()?;
    let after_retention = KeyCounts::at(redis, store_rooms(&run.topology, bench.args.partitions)?, closed);
    report["retention_secs"] = json!(retention.as_secs());
    report["restart_peak_rss_mib"] = json!(restart_peak);
    report["keys"] = json!({
        "before_closes": { "redis_hashes": before.hashes, "redis_streams": before.streams },
        "after_closes": after_closes,
        "after_retention": after_retention,
    });
    Ok(report)
}

/// A run's room keys in Redis.
#[derive(Debug, Clone, Copy, Default)]
struct RedisKeys {
    hashes: u64,
    streams: u64,
}

/// Counts the room hashes and change streams under the run's key prefix.
async fn redis_keys(redis_url: &str, prefix: &str) -> anyhow::Result<RedisKeys> {
    let mut conn = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    let (mut counts, mut cursor) = (RedisKeys::default(), 0u64);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:room:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        for key in keys {
            if key.ends_with(":changes") {
                counts.streams += 1;
            } else {
                counts.hashes += 1;
            }
        }
        if next == 0 {
            return Ok(counts);
        }
        cursor = next;
    }
}

/// Rooms the store holds, and how many of them closed.
#[derive(Debug, Clone, Copy, Default)]
struct StoreRooms {
    rooms: u64,
    closed: u64,
}

/// Counts the rooms of every partition in a stopped omni's store.
fn store_rooms(topology: &Topology, partitions: i32) -> anyhow::Result<StoreRooms> {
    let store = RocksStore::open(&topology.store.dir, topology.store.memory)?;
    let mut counts = StoreRooms::default();
    for partition in 0..partitions {
        store.visit_rooms(partition, &mut |_, state| {
            counts.rooms += 1;
            counts.closed += u64::from(state.closed);
            true
        })?;
    }
    Ok(counts)
}

/// Key counts at one point of the closed-rooms phase.
#[derive(Debug, Clone, Copy, Serialize)]
struct KeyCounts {
    redis_hashes: u64,
    redis_streams: u64,
    store_rooms: u64,
    store_closed_rooms: u64,
    /// When Redis was counted (omni running), after every room's hash was gone.
    redis_seconds_after_closes: f64,
    /// When the store was counted (omni stopped).
    store_seconds_after_closes: f64,
}

impl KeyCounts {
    /// Redis' counts and when they were taken, and the store's counted now.
    fn at(redis: (RedisKeys, Duration), store: StoreRooms, closed: Instant) -> KeyCounts {
        KeyCounts {
            redis_hashes: redis.0.hashes,
            redis_streams: redis.0.streams,
            store_rooms: store.rooms,
            store_closed_rooms: store.closed,
            redis_seconds_after_closes: redis.1.as_secs_f64(),
            store_seconds_after_closes: closed.elapsed().as_secs_f64(),
        }
    }
}

/// Waits until no closed room has a hash in Redis any more: the close's
/// write deleted it (every room's hash was there before the closes).
async fn wait_until_hashes_gone(redis_url: &str, run: &PhaseRun, rooms: u64) -> anyhow::Result<()> {
    let keys = omni::view::KeyLayout::new(&run.topology.redis.key_prefix);
    let mut conn = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut next = 0u64;
    while next < rooms {
        let chunk = next..(next + 2000).min(rooms);
        let mut pipe = redis::pipe();
        for room in chunk.clone() {
            pipe.exists(keys.room(&shapes::closing_room(room)));
        }
        let present: Vec<bool> = pipe.query_async(&mut conn).await?;
        let gone = present.iter().take_while(|present| !**present).count() as u64;
        next += gone;
        if gone < chunk.end - chunk.start {
            anyhow::ensure!(Instant::now() < deadline, "closed rooms' hashes still in Redis after 10 minutes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn print_table(report: &Value) {
    let num = |v: &Value| v.as_f64().map_or("-".to_owned(), |f| format!("{f:.1}"));
    println!(
        "{:<8} {:>9} {:>9} {:>10} {:>6} {:>11} {:>11} {:>10}",
        "phase", "events", "rooms", "peak MiB", "≤ 400", "RocksDB MiB", "backlog MiB", "events/s"
    );
    let phases = report["phases"].as_array().cloned().unwrap_or_default();
    for p in &phases {
        let sampled = &p["sampled"]["highest"];
        println!(
            "{:<8} {:>9} {:>9} {:>10} {:>6} {:>11} {:>11} {:>10}",
            p["phase"].as_str().unwrap_or("-"),
            p["events"],
            p["rooms"],
            num(&p["peak_rss_mib"]),
            if p["meets_target"] == true { "yes" } else { "NO" },
            num(&sampled["rocksdb_memory_mib"]),
            num(&sampled["redis_backlog_mib"]),
            p["events_per_s"].as_f64().map_or("-".to_owned(), |f| format!("{f:.0}")),
        );
        if let Some(keys) = p.get("keys") {
            let before = &keys["before_closes"];
            println!("  before closes: Redis {} hashes, {} streams", before["redis_hashes"], before["redis_streams"]);
            for (when, k) in [("after closes", &keys["after_closes"]), ("after retention", &keys["after_retention"])] {
                println!(
                    "  {when}: Redis {} hashes, {} streams ({} s after); store {} rooms, {} closed ({} s after)",
                    k["redis_hashes"],
                    k["redis_streams"],
                    num(&k["redis_seconds_after_closes"]),
                    k["store_rooms"],
                    k["store_closed_rooms"],
                    num(&k["store_seconds_after_closes"]),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_change_the_topology_by_dotted_key() {
        let mut topology = Topology::with_defaults("t", &["tags"]);
        let settings = ["limits.room_cache_bytes=1024", "redis.url=\"\"", "store.block_cache_mib = 16"];
        apply_settings(&mut topology, &settings.map(String::from)).unwrap();
        assert_eq!(topology.limits.room_cache_bytes, 1024);
        assert_eq!(topology.redis.url, "");
        assert_eq!(topology.store.memory.block_cache_mib, 16);
        assert_eq!(topology.limits.redis_backlog_bytes, 32 << 20, "the rest stays as it was");
    }

    #[test]
    fn a_setting_the_topology_does_not_know_is_refused() {
        let mut topology = Topology::with_defaults("t", &["tags"]);
        assert!(apply_settings(&mut topology, &["limits.room_cache_mib=1".into()]).is_err());
        assert!(apply_settings(&mut topology, &["limits".into()]).is_err());
    }

    #[test]
    fn peaks_keep_every_figure_at_the_highest_rss() {
        let mut peaks = Peaks::default();
        let sample = |rss_mib, redis_backlog_mib| Sample { rss_mib, redis_backlog_mib, ..Sample::default() };
        peaks.add(sample(100.0, 50.0));
        peaks.add(sample(300.0, 10.0));
        peaks.add(sample(200.0, 60.0));
        assert_eq!((peaks.highest.rss_mib, peaks.highest.redis_backlog_mib), (300.0, 60.0));
        assert_eq!((peaks.at_highest_rss.rss_mib, peaks.at_highest_rss.redis_backlog_mib), (300.0, 10.0));
        assert_eq!(peaks.samples, 3);
    }
}
