//! `omni bench --leases`: what keep-alives cost and how late leases fire.
//! omni runs three phases at the bench's fixed event rate: events alone
//! (the baseline CPU), then `--lease-count` leases each kept alive once a
//! second beside the events (the keep-alives' CPU is the difference), then
//! the keep-alives stop and every lease expires while the events go on. A
//! lease's lag is its expiry change's `processed_at` minus its deadline
//! (the change's `occurred_at`), read back from the broadcast topic.

use std::time::{Duration, Instant};

use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::modules::HEARTBEAT_LOST;
use omni::proto::omni::StateChange;
use omni::proto::tecate::{room_event::Kind, RecordingStarted, RoomEvent};
use omni::proto::{millis_of, timestamp_from_millis, Message as _};
use omni::pubsub::{keep_alive_payload, NewLease, KEEPALIVE_HEADER};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

use super::latency::Percentiles;
use super::process::OmniProcess;
use super::workload::{fast_producer, send, Workload};
use super::BenchArgs;

/// How long a lease lives without a keep-alive.
const LEASE_TTL: Duration = Duration::from_secs(3);

fn lease_room(i: usize) -> String {
    format!("app/bench/room/lease-{i}")
}

pub async fn run(args: &BenchArgs, kafka: &KafkaSettings, redis_url: &str) -> anyhow::Result<()> {
    let id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let state = tempfile::tempdir()?;
    let topology = super::bench_topology(&id, args, kafka, redis_url, state.path());
    let input = topology.input_topic().to_owned();
    ensure_topics(kafka, &[TopicSpec { name: input.clone(), partitions: args.partitions, configs: vec![] }]).await?;
    let omni = OmniProcess::spawn(&topology, state.path())?;
    wait_ready(&omni).await?;
    let phase = Duration::from_secs(args.lease_phase_secs);
    let load = Load { brokers: kafka.brokers.clone(), topic: input, rate: args.rate, leases: args.lease_count };

    eprintln!("bench {id}: {} events/s alone for {phase:?}", args.rate);
    let baseline = load.clone().measure(&omni, phase, None).await?;
    eprintln!("bench {id}: {} leases, each kept alive once a second, beside the events", args.lease_count);
    let lease_ids = load.take_leases()?;
    let kept = load.clone().measure(&omni, phase, Some(lease_ids.clone())).await?;
    let expiring_from = chrono::Utc::now().timestamp_millis();
    eprintln!("bench {id}: keep-alives stopped; waiting for every lease to expire");
    let wait = LEASE_TTL + Duration::from_secs(10);
    load.clone().measure(&omni, wait, None).await?;
    let (brokers, broadcast, count) = (kafka.brokers.clone(), topology.broadcast_topic.clone(), args.lease_count);
    let lags =
        tokio::task::spawn_blocking(move || expiry_lags(&brokers, &broadcast, expiring_from, count, wait)).await??;
    omni.terminate()?;
    super::clean_up(kafka, redis_url, &id, &topology).await;

    let keepalives_per_s = kept.keepalives as f64 / kept.seconds;
    let extra_cpu = kept.cpu_per_s() - baseline.cpu_per_s();
    let report = json!({
        "leases": args.lease_count,
        "events_per_s": baseline.events as f64 / baseline.seconds,
        "keepalives_per_s": keepalives_per_s,
        "cpu_s_per_s_events_alone": baseline.cpu_per_s(),
        "cpu_s_per_s_with_keepalives": kept.cpu_per_s(),
        "keepalive_cpu_s_per_million": extra_cpu / keepalives_per_s * 1e6,
        "leases_expired": lags.samples,
        "timer_lag": lags,
        "timer_lag_target_p99_ms": args.commit_interval_ms + 50,
    });
    println!(
        "leases: {} kept alive at {keepalives_per_s:.0}/s beside {:.0} events/s",
        args.lease_count, report["events_per_s"]
    );
    println!("keep-alive CPU: {:.2} s per million", report["keepalive_cpu_s_per_million"]);
    println!(
        "timer lag p50/p99/max: {:.0}/{:.0}/{:.0} ms ({} expired)",
        lags.p50_ms, lags.p99_ms, lags.max_ms, lags.samples
    );
    println!("{report}");
    Ok(())
}

async fn wait_ready(omni: &OmniProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while omni.metrics(&["omni_ready"]).await.first().copied().flatten() != Some(1.0) {
        anyhow::ensure!(Instant::now() < deadline, "omni was not ready within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The fixed-rate load: events to the bench's rooms, and keep-alives.
#[derive(Clone)]
struct Load {
    brokers: String,
    topic: String,
    rate: u64,
    leases: usize,
}

/// What a phase produced, and the CPU omni spent meanwhile.
struct Phase {
    events: u64,
    keepalives: u64,
    seconds: f64,
    cpu_seconds: f64,
}

impl Phase {
    fn cpu_per_s(&self) -> f64 {
        self.cpu_seconds / self.seconds
    }
}

impl Load {
    /// Takes a lease on a recording in each lease room; returns the lease ids.
    fn take_leases(&self) -> anyhow::Result<Vec<String>> {
        let producer = fast_producer(&self.brokers, 5)?;
        let now = chrono::Utc::now().timestamp_millis();
        let ids: Vec<String> = (0..self.leases).map(|i| format!("bench-lease-{i}")).collect();
        for (i, lease_id) in ids.iter().enumerate() {
            let start = Kind::RecordingStarted(RecordingStarted { recording_id: "rec".into(), started_by: "u".into() });
            let event = RoomEvent {
                event_id: format!("s{i}"),
                occurred_at: Some(timestamp_from_millis(now)),
                kind: Some(start),
            };
            let lease = NewLease::with_id(lease_id.clone(), LEASE_TTL.as_millis() as i64)?;
            let (key, header) = lease.record_header();
            let headers = OwnedHeaders::new().insert(Header { key, value: Some(header) });
            let value = event.encode_to_vec();
            let room = lease_room(i);
            omni::kafka::send(
                &producer,
                BaseRecord::to(&self.topic).key(room.as_bytes()).payload(&value[..]).headers(headers),
            )?;
        }
        producer.flush(Duration::from_secs(60))?;
        Ok(ids)
    }

    /// Runs the load for `length` (with keep-alives of `leases`, each once a
    /// second, when given) and measures omni's CPU meanwhile.
    async fn measure(self, omni: &OmniProcess, length: Duration, leases: Option<Vec<String>>) -> anyhow::Result<Phase> {
        let cpu_before = omni.cpu_seconds()?;
        let started = Instant::now();
        let (events, keepalives) = tokio::task::spawn_blocking(move || self.produce(length, leases)).await??;
        let seconds = started.elapsed().as_secs_f64();
        Ok(Phase { events, keepalives, seconds, cpu_seconds: omni.cpu_seconds()? - cpu_before })
    }

    fn produce(&self, length: Duration, leases: Option<Vec<String>>) -> anyhow::Result<(u64, u64)> {
        let producer = fast_producer(&self.brokers, 5)?;
        let mut workload = Workload::new(7, 10_000, 1.0);
        let leases = leases.unwrap_or_default();
        let keepalive_rate = leases.len() as f64;
        let started = Instant::now();
        let (mut events, mut keepalives) = (0u64, 0u64);
        while started.elapsed() < length {
            let elapsed = started.elapsed().as_secs_f64();
            while (events as f64) < elapsed * self.rate as f64 {
                let room = workload.room();
                let event = workload.event(chrono::Utc::now().timestamp_millis());
                send(&producer, &self.topic, &room, &event.encode_to_vec())?;
                events += 1;
            }
            while !leases.is_empty() && (keepalives as f64) < elapsed * keepalive_rate {
                let i = keepalives as usize % leases.len();
                keep_alive(&producer, &self.topic, &lease_room(i), &leases[i])?;
                keepalives += 1;
            }
            omni::kafka::serve_ready(&producer);
            std::thread::sleep(Duration::from_millis(5));
        }
        producer.flush(Duration::from_secs(60))?;
        Ok((events, keepalives))
    }
}

fn keep_alive(producer: &BaseProducer, topic: &str, room: &str, lease_id: &str) -> anyhow::Result<()> {
    let value = keep_alive_payload(&[lease_id.to_owned()])?;
    let (key, kind) = KEEPALIVE_HEADER;
    let headers = OwnedHeaders::new().insert(Header { key, value: Some(kind) });
    omni::kafka::send(producer, BaseRecord::to(topic).key(room.as_bytes()).payload(&value[..]).headers(headers))?;
    Ok(())
}

/// Reads the broadcast from `from_ms` on for the leases' expiry changes; each lag in ms.
fn expiry_lags(
    brokers: &str,
    topic: &str,
    from_ms: i64,
    want: usize,
    timeout: Duration,
) -> anyhow::Result<Percentiles> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-lag-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    let mut times = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        times.add_partition_offset(topic, partition, Offset::Offset(from_ms))?;
    }
    let start = consumer.offsets_for_times(times, Duration::from_secs(10))?;
    consumer.assign(&start)?;
    let mut lags = Vec::with_capacity(want);
    let deadline = Instant::now() + timeout + Duration::from_secs(30);
    while lags.len() < want && Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        if !message.key().is_some_and(|k| k.starts_with(b"app/bench/room/lease-")) {
            continue;
        }
        let change = StateChange::decode(message.payload().unwrap_or_default())?;
        if change.state_json.contains(HEARTBEAT_LOST) {
            lags.push((millis_of(change.processed_at.as_ref()) - millis_of(change.occurred_at.as_ref())) as f64);
        }
    }
    Ok(Percentiles::of(lags))
}
