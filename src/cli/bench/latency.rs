//! Latency at a fixed rate: events are produced on a schedule with their
//! produce time as `occurred_at`; the broadcast side measures every change
//! as it arrives read_committed, and the Redis side measures probe rooms
//! through keyspace notifications (one event in a hundred goes to a probe
//! room, so notifications stay a small load next to the job's).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use omni::proto::omni::StateChange;
use omni::proto::tecate::{room_event::Kind, RoomEvent, TagSet};
use omni::proto::{millis_of, timestamp_from_millis, Message as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::workload::{send, Workload};

const PROBE_ROOMS: usize = 50;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<f64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
        Percentiles { samples: samples.len(), p50_ms: at(0.50), p99_ms: at(0.99), p999_ms: at(0.999), max_ms: at(1.0) }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LatencyReport {
    pub target_events_per_s: u64,
    pub achieved_events_per_s: f64,
    /// Produce → folded by omni (the change's `processed_at`): ingest and
    /// processing, without the wait for the transaction to commit.
    pub to_fold: Percentiles,
    pub to_broadcast: Percentiles,
    pub to_redis: Percentiles,
    /// Mean time of omni's transaction commits during the phase, from its
    /// `omni_commit_seconds`: what an event waits beyond the commit interval.
    pub commit_mean_ms: Option<f64>,
    /// Mean time of omni's Redis pipelines during the phase, from its
    /// `omni_redis_write_seconds`.
    pub redis_pipeline_mean_ms: Option<f64>,
}

pub struct LatencyRun<'a> {
    pub brokers: &'a str,
    pub input: &'a str,
    pub broadcast: &'a str,
    pub redis_url: &'a str,
    pub key_prefix: &'a str,
    pub rate: u64,
    pub duration: Duration,
}

async fn set_keyspace_events(conn: &mut redis::aio::MultiplexedConnection, classes: &str) -> redis::RedisResult<()> {
    redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(classes).query_async(conn).await
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl LatencyRun<'_> {
    pub async fn run(&self, workload: &mut Workload) -> anyhow::Result<LatencyReport> {
        let stop = Arc::new(AtomicBool::new(false));
        let broadcast_samples = Arc::new(Mutex::new(Vec::new()));
        let fold_samples = Arc::new(Mutex::new(Vec::new()));
        let consumer = self.broadcast_reader()?;
        let reader = {
            let (stop, samples) = (Arc::clone(&stop), Arc::clone(&broadcast_samples));
            let folds = Arc::clone(&fold_samples);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                        if let Ok(change) = StateChange::decode(message.payload().unwrap_or_default()) {
                            let occurred = millis_of(change.occurred_at.as_ref());
                            samples.lock().expect("samples").push((now_ms() - occurred) as f64);
                            let folded = millis_of(change.processed_at.as_ref()) - occurred;
                            folds.lock().expect("samples").push(folded as f64);
                        }
                    }
                }
            })
        };
        let redis_samples = Arc::new(Mutex::new(Vec::new()));
        let mut config = redis::Client::open(self.redis_url)?.get_multiplexed_async_connection().await?;
        let (_, events_before): (String, String) =
            redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut config).await?;
        set_keyspace_events(&mut config, "Kh").await?;
        let watcher = self.watch_probes(Arc::clone(&redis_samples), Arc::clone(&stop)).await?;

        let achieved = self.produce(workload)?;
        // Let the last commit interval land before counting.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let _ = reader.join();
        watcher.abort();
        // Notifications cost the server on every hash write: back as they were for what follows.
        set_keyspace_events(&mut config, &events_before).await?;
        let to_fold = Percentiles::of(std::mem::take(&mut *fold_samples.lock().expect("samples")));
        let to_broadcast = Percentiles::of(std::mem::take(&mut *broadcast_samples.lock().expect("samples")));
        let to_redis = Percentiles::of(std::mem::take(&mut *redis_samples.lock().expect("samples")));
        Ok(LatencyReport {
            target_events_per_s: self.rate,
            achieved_events_per_s: achieved,
            to_fold,
            to_broadcast,
            to_redis,
            commit_mean_ms: None,
            redis_pipeline_mean_ms: None,
        })
    }

    /// A read_committed reader positioned at the current end of every partition.
    fn broadcast_reader(&self) -> anyhow::Result<BaseConsumer> {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.brokers)
            .set("group.id", "omni-bench-latency")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "500")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(self.broadcast), Duration::from_secs(10))?;
        let mut list = TopicPartitionList::new();
        for topic in metadata.topics() {
            for partition in topic.partitions() {
                let (_, high) = consumer.fetch_watermarks(self.broadcast, partition.id(), Duration::from_secs(10))?;
                list.add_partition_offset(self.broadcast, partition.id(), Offset::Offset(high))?;
            }
        }
        consumer.assign(&list)?;
        Ok(consumer)
    }

    /// Subscribes to keyspace notifications of the probe rooms' hashes (the
    /// caller turns them on).
    async fn watch_probes(
        &self,
        samples: Arc<Mutex<Vec<f64>>>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let client = redis::Client::open(self.redis_url)?;
        let mut reads = client.get_multiplexed_async_connection().await?;
        let mut pubsub = client.get_async_pubsub().await?;
        let channel = format!("__keyspace@0__:{}:room:{{app/bench/room/probe-*}}", self.key_prefix);
        pubsub.psubscribe(&channel).await?;
        let keys_prefix = "__keyspace@0__:".len();
        Ok(tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let seen = now_ms();
                let key = message.get_channel_name()[keys_prefix..].to_owned();
                let updated: Option<String> =
                    redis::AsyncCommands::hget(&mut reads, &key, "updated_at").await.ok().flatten();
                if let Some(at) = updated.and_then(|u| chrono::DateTime::parse_from_rfc3339(&u).ok()) {
                    samples.lock().expect("samples").push((seen - at.timestamp_millis()) as f64);
                }
            }
        }))
    }

    /// Produces at the fixed rate for the duration; returns the achieved rate.
    fn produce(&self, workload: &mut Workload) -> anyhow::Result<f64> {
        // 5 ms linger (counted in the latency) and no idempotence: its five
        // in-flight batches would cap the load below the rate on a busy broker.
        let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.brokers)
            .set("partitioner", "murmur2_random")
            .set("enable.idempotence", "false")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .create()?;
        let started = Instant::now();
        let mut sent = 0u64;
        let mut probe = 0u64;
        while started.elapsed() < self.duration {
            let due = (started.elapsed().as_secs_f64() * self.rate as f64) as u64;
            while sent < due && started.elapsed() < self.duration {
                let at = now_ms();
                if sent.is_multiple_of(100) {
                    probe += 1;
                    let room = format!("app/bench/room/probe-{}", probe as usize % PROBE_ROOMS);
                    let event = RoomEvent {
                        event_id: format!("probe{probe}"),
                        occurred_at: Some(timestamp_from_millis(at)),
                        kind: Some(Kind::TagSet(TagSet { key: "seq".into(), value: probe.to_string() })),
                    };
                    send(&producer, self.input, &room, &event.encode_to_vec())?;
                } else {
                    let room = workload.room();
                    send(&producer, self.input, &room, &workload.event(at).encode_to_vec())?;
                }
                sent += 1;
            }
            omni::kafka::serve_ready(&producer);
            std::thread::sleep(Duration::from_millis(1));
        }
        let rate = sent as f64 / started.elapsed().as_secs_f64();
        producer.flush(Duration::from_secs(30))?;
        Ok(rate)
    }
}
