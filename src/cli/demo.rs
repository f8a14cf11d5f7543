//! `omni demo`: the main job on embedded defaults, needing no external
//! service. An in-process Kafka (librdkafka's mock cluster), a Redis on a
//! free port when `redis-server` is installed, a generator of realistic
//! room events, the processor, and a live view of the rooms, until Ctrl-C.
//!
//! The mock cluster is not faithful to transactions (read_committed readers
//! see aborted records, and transactional offset commits do not stick), so
//! the demo runs the job at-least-once and says so. Tests never use it.

use std::collections::BTreeMap;
use std::time::Duration;

use omni::modules::Registry;
use omni::ops::runner;
use omni::proto::omni::StateChange;
use omni::proto::tecate::{room_event::Kind, RecordingStarted, RecordingStopped, RoomClosed, TagRemoved, TagSet};
use omni::proto::Message as _;
use omni::topology::Topology;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::Message;

use super::publish::new_event;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Rooms the generator spreads events over.
    #[arg(long, default_value = "12")]
    pub rooms: usize,
    /// Events generated per second.
    #[arg(long, default_value = "20")]
    pub rate: u32,
}

const PARTITIONS: i32 = 4;

/// How long the demo's generator and live view may take to close after the job stopped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mock = MockCluster::new(1)?;
    let brokers = mock.bootstrap_servers();
    let mut topology = Topology::with_defaults("omni-demo", &["recording", "tags"]);
    topology.kafka.brokers = brokers.clone();
    topology.exactly_once = false;
    topology.create_topics = false;
    topology.partitions = PARTITIONS;
    let state = tempfile::tempdir()?;
    topology.store.dir = state.path().join("state");
    for topic in [
        topology.input_topic().to_owned(),
        topology.changelog_topic(),
        topology.broadcast_topic.clone(),
        topology.dead_letter_topic.clone(),
    ] {
        mock.create_topic(&topic, PARTITIONS, 1)?;
    }
    let redis = super::embedded_redis::start(state.path()).await;
    match &redis {
        Some(r) => {
            topology.redis.url = r.url.clone();
            println!("demo: redis-server on {}", r.url);
        }
        None => println!("demo: no redis-server on PATH, so room state is shown from the broadcast only"),
    }
    println!("demo: in-process Kafka (librdkafka mock cluster) at {brokers}");
    println!(
        "demo: the mock cluster is not faithful to transactions, so this demo runs at-least-once, without exactly-once"
    );
    println!("demo: {} rooms, {} events/s; Ctrl-C stops", args.rooms, args.rate);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let generator = tokio::task::spawn_blocking({
        let brokers = brokers.clone();
        let topic = topology.input_topic().to_owned();
        let stop = stop_rx.clone();
        move || generate(&brokers, &topic, args.rooms, args.rate, stop)
    });
    let view = tokio::task::spawn_blocking({
        let brokers = brokers.clone();
        let topic = topology.broadcast_topic.clone();
        let stop = stop_rx.clone();
        move || live_view(&brokers, &topic, stop)
    });
    let result = runner::run(topology, Registry::with_builtins(), runner::shutdown_signal()).await;
    let _ = stop_tx.send(true);
    // Redis first: nothing below may leave it running.
    drop(redis);
    // The mock cluster's clients can hang in their close; the demo's own
    // threads get a bounded while, and a mock cluster still in use is left
    // to the process's exit rather than destroyed under them.
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = generator.await;
        let _ = view.await;
    })
    .await;
    match closed {
        Ok(()) => drop(mock),
        Err(_) => {
            eprintln!(
                "demo: the generator or the view did not close within {} s; exiting without them",
                CLOSE_TIMEOUT.as_secs()
            );
            std::mem::forget(mock);
        }
    }
    Ok(result?)
}

fn generate(
    brokers: &str,
    topic: &str,
    rooms: usize,
    rate: u32,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let producer: BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).set("partitioner", "murmur2_random").create()?;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let pause = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    while !*stop.borrow() {
        let room = format!("app/demo/room/r{}", rng.random_range(0..rooms.max(1)));
        let kind = match rng.random_range(0..100) {
            0..=59 => Kind::TagSet(TagSet {
                key: ["topic", "lang", "level", "mood"][rng.random_range(0..4)].into(),
                value: ["physics", "en", "advanced", "calm", "chemistry", "fr"][rng.random_range(0..6)].into(),
            }),
            60..=74 => {
                Kind::TagRemoved(TagRemoved { key: ["topic", "lang", "level", "mood"][rng.random_range(0..4)].into() })
            }
            75..=86 => Kind::RecordingStarted(RecordingStarted {
                recording_id: format!("rec{}", rng.random_range(0..3)),
                started_by: format!("u{}", rng.random_range(0..9)),
            }),
            87..=97 => {
                Kind::RecordingStopped(RecordingStopped { recording_id: String::new(), reason: "host stopped".into() })
            }
            _ => Kind::RoomClosed(RoomClosed {}),
        };
        let value = new_event(kind).encode_to_vec();
        let _ = producer.send(BaseRecord::to(topic).key(room.as_bytes()).payload(&value));
        omni::kafka::serve_ready(&producer);
        std::thread::sleep(pause);
    }
    let _ = producer.flush(Duration::from_secs(2));
    Ok(())
}

/// Follows the broadcast and prints every room's state every two seconds.
fn live_view(brokers: &str, topic: &str, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "omni-demo-view")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut rooms: BTreeMap<String, (u64, BTreeMap<String, String>)> = BTreeMap::new();
    let mut last_print = std::time::Instant::now();
    while !*stop.borrow() {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            if let Ok(change) = StateChange::decode(message.payload().unwrap_or_default()) {
                let room = rooms.entry(change.path).or_default();
                room.0 = change.version;
                if change.module == omni::modules::ROOM_MODULE {
                    room.1.clear();
                } else {
                    room.1.insert(change.module, change.state_json);
                }
            }
        }
        if last_print.elapsed() >= Duration::from_secs(2) && !rooms.is_empty() {
            last_print = std::time::Instant::now();
            println!("--- {} rooms", rooms.len());
            for (path, (version, modules)) in &rooms {
                let shown: Vec<String> = modules.iter().map(|(m, s)| format!("{m}={s}")).collect();
                println!(
                    "room {path:<22} v{version:<5} {}",
                    if shown.is_empty() { "(closed)".to_owned() } else { shown.join(" ") }
                );
            }
        }
    }
    Ok(())
}
