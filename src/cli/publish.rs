//! `omni publish`: Tecate room events from the command line or a JSON-lines file.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::ops::runner::probe_brokers;
use omni::path::Path;
use omni::proto::tecate::{
    room_event::Kind, RecordingStarted, RecordingStopped, RoomClosed, RoomEvent, TagRemoved, TagSet,
};
use omni::proto::{now, timestamp_from_millis, Message};
use omni::pubsub::NewLease;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Deserialize;

use super::config::{self, Flags, KafkaArgs, TopologyArg};

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Room path, e.g. app/a1/room/r1 (omit with --file).
    #[arg(required_unless_present = "file")]
    pub path: Option<String>,
    #[command(subcommand)]
    pub event: Option<EventArg>,
    /// Newline-delimited JSON events: {"path":..., "type":"tag_set", "key":..., "value":...}.
    /// They are sent in batches, in the file's order.
    #[arg(long, conflicts_with = "path", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Topic to publish to [default: the topology's input topic].
    #[arg(long)]
    pub topic: Option<String>,
    #[command(flatten)]
    pub topology: TopologyArg,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// How long an event may take to be acknowledged, retries included (librdkafka's
    /// delivery.timeout.ms); past it, publish fails naming the brokers. Without this
    /// flag, delivery.timeout.ms in [kafka.properties], else 30 s.
    #[arg(long, value_name = "SECS")]
    pub delivery_timeout_secs: Option<u64>,
}

/// How long an event may take to be acknowledged when nothing else says.
const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Events sent but not yet acknowledged, at most.
const IN_FLIGHT: usize = 10_000;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum EventArg {
    /// A recording started.
    RecordingStart {
        /// Id of the recording that started.
        #[arg(long)]
        recording_id: String,
        /// Who started it (a user id).
        #[arg(long)]
        by: String,
        /// Take a lease with this heartbeat TTL (e.g. 10s): unless kept alive
        /// (`omni keepalive`), the recording stops by itself. Prints the lease id last.
        #[arg(long, value_parser = super::keepalive::parse_duration)]
        lease_ttl: Option<std::time::Duration>,
    },
    /// A recording stopped.
    RecordingStop {
        /// Id of the recording that stopped; empty stops whichever is active.
        #[arg(long, default_value = "")]
        recording_id: String,
        /// Why it stopped, kept in the room's recording state.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// A tag was set.
    TagSet {
        /// Tag key.
        key: String,
        /// Tag value.
        value: String,
    },
    /// A tag was removed.
    TagRemove {
        /// Tag key.
        key: String,
    },
    /// The room closed.
    RoomClose,
}

impl EventArg {
    fn kind(self) -> Kind {
        match self {
            EventArg::RecordingStart { recording_id, by, .. } => {
                Kind::RecordingStarted(RecordingStarted { recording_id, started_by: by })
            }
            EventArg::RecordingStop { recording_id, reason } => {
                Kind::RecordingStopped(RecordingStopped { recording_id, reason })
            }
            EventArg::TagSet { key, value } => Kind::TagSet(TagSet { key, value }),
            EventArg::TagRemove { key } => Kind::TagRemoved(TagRemoved { key }),
            EventArg::RoomClose => Kind::RoomClosed(RoomClosed {}),
        }
    }
}

/// A fresh lease for an event with `--lease-ttl`.
fn new_lease(event: &Option<EventArg>) -> anyhow::Result<Option<NewLease>> {
    let Some(EventArg::RecordingStart { lease_ttl: Some(ttl), .. }) = event else { return Ok(None) };
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    Ok(Some(NewLease::fresh(ttl_ms).context("--lease-ttl")?))
}

/// One line of a `--file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonEvent {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub event_id: Option<String>,
    /// Milliseconds since the epoch; now when absent.
    #[serde(default)]
    pub occurred_at_ms: Option<i64>,
    #[serde(default)]
    pub recording_id: String,
    #[serde(default)]
    pub started_by: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: String,
}

impl JsonEvent {
    pub fn into_event(self) -> anyhow::Result<(Path, RoomEvent)> {
        let path = Path::parse_room(&self.path)?;
        let kind = match self.kind.as_str() {
            "recording_started" => Kind::RecordingStarted(RecordingStarted { recording_id: self.recording_id, started_by: self.started_by }),
            "recording_stopped" => Kind::RecordingStopped(RecordingStopped { recording_id: self.recording_id, reason: self.reason }),
            "tag_set" => Kind::TagSet(TagSet { key: self.key, value: self.value }),
            "tag_removed" => Kind::TagRemoved(TagRemoved { key: self.key }),
            "room_closed" => Kind::RoomClosed(RoomClosed {}),
            other => anyhow::bail!("unknown event type {other:?} (recording_started, recording_stopped, tag_set, tag_removed, room_closed)"),
        };
        let mut event = new_event(kind);
        if let Some(id) = self.event_id {
            event.event_id = id;
        }
        if let Some(ms) = self.occurred_at_ms {
            event.occurred_at = Some(timestamp_from_millis(ms));
        }
        Ok((path, event))
    }
}

/// A new event of `kind`, with a fresh id, occurring now.
pub fn new_event(kind: Kind) -> RoomEvent {
    RoomEvent { event_id: uuid::Uuid::new_v4().to_string(), occurred_at: Some(now()), kind: Some(kind) }
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let topology = config::load(&args.topology, Flags { kafka: Some(&args.kafka), ..Flags::default() })?;
    let topic = args.topic.clone().unwrap_or_else(|| topology.input_topic().to_owned());
    let events = read_events(&args)?;
    let (kafka, timeout) = with_delivery_timeout(topology.kafka.clone(), args.delivery_timeout_secs)?;
    let brokers = kafka.brokers.clone();
    let probe = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || probe_brokers(&kafka, timeout.min(Duration::from_secs(10)))).await?
    };
    probe.map_err(|e| anyhow::anyhow!("cannot reach the Kafka brokers {brokers}: {e}"))?;
    // A topic created here gets the job's partition count, not the broker's default.
    let spec = TopicSpec { name: topic.clone(), partitions: topology.partitions, configs: vec![] };
    tokio::time::timeout(timeout, ensure_topics(&kafka, &[spec]))
        .await
        .map_err(|_| {
            anyhow::anyhow!("the Kafka brokers {brokers} did not create topic {topic} within {} s", timeout.as_secs())
        })?
        .with_context(|| format!("creating topic {topic} on {brokers}"))?;
    let producer: FutureProducer = kafka.producer_config().set("enable.idempotence", "true").create()?;
    let count = events.len();
    let lease = new_lease(&args.event)?;
    let headers = lease.as_ref().map(|lease| {
        let (key, value) = lease.record_header();
        OwnedHeaders::new().insert(Header { key, value: Some(value) })
    });
    let delivered = send_in_order(&producer, &topic, events, headers).await.map_err(|failure| {
        anyhow::anyhow!(
            "event {} of {count} was not delivered to {topic} on the Kafka brokers {brokers} within the delivery timeout ({} s): {}",
            failure.index + 1,
            timeout.as_secs(),
            failure.error
        )
    })?;
    match delivered.as_slice() {
        [(event_id, partition, offset)] if count == 1 => {
            println!("published {event_id} to {topic} partition {partition} offset {offset}")
        }
        _ => println!("published {count} events to {topic}"),
    }
    // Last, so a script takes it with `tail -n 1`.
    if let Some(lease) = lease {
        println!("{}", lease.id);
    }
    Ok(())
}

/// The events to publish: the file's lines, or the one from the command line.
fn read_events(args: &PublishArgs) -> anyhow::Result<Vec<(Path, RoomEvent)>> {
    match (&args.file, &args.path, &args.event) {
        (Some(file), _, _) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(i, line)| {
                    let parsed: JsonEvent = serde_json::from_str(line).with_context(|| format!("line {}", i + 1))?;
                    parsed.into_event().with_context(|| format!("line {}", i + 1))
                })
                .collect()
        }
        (None, Some(path), Some(event)) => Ok(vec![(Path::parse_room(path)?, new_event(event.clone().kind()))]),
        (None, _, None) => {
            anyhow::bail!("name an event: recording-start, recording-stop, tag-set, tag-remove or room-close")
        }
        (None, None, Some(_)) => anyhow::bail!("name a room path"),
    }
}

/// The settings with `delivery.timeout.ms` set: from the flag, else from
/// `[kafka.properties]`, else [`DEFAULT_DELIVERY_TIMEOUT`].
fn with_delivery_timeout(mut kafka: KafkaSettings, secs: Option<u64>) -> anyhow::Result<(KafkaSettings, Duration)> {
    let timeout = match (secs, kafka.properties.get("delivery.timeout.ms")) {
        (Some(secs), _) => Duration::from_secs(secs),
        (None, Some(ms)) => Duration::from_millis(ms.parse().context("delivery.timeout.ms in [kafka.properties]")?),
        (None, None) => DEFAULT_DELIVERY_TIMEOUT,
    };
    anyhow::ensure!(!timeout.is_zero(), "the delivery timeout must be positive");
    kafka.properties.insert("delivery.timeout.ms".into(), timeout.as_millis().to_string());
    Ok((kafka, timeout))
}

/// An event the brokers did not acknowledge.
struct Failure {
    index: usize,
    error: KafkaError,
}

/// Sends every event, queued in order so the idempotent producer keeps each
/// room's events in order, up to [`IN_FLIGHT`] awaiting acknowledgement at
/// once; returns each event's id, partition and offset. `headers` go on every record.
async fn send_in_order(
    producer: &FutureProducer,
    topic: &str,
    events: Vec<(Path, RoomEvent)>,
    headers: Option<OwnedHeaders>,
) -> Result<Vec<(String, i32, i64)>, Failure> {
    let mut in_flight: VecDeque<(usize, String, DeliveryFuture)> = VecDeque::new();
    let mut delivered = Vec::with_capacity(events.len());
    for (index, (path, event)) in events.into_iter().enumerate() {
        let (key, value) = (path.to_string(), event.encode_to_vec());
        loop {
            let mut record = FutureRecord::to(topic).key(key.as_bytes()).payload(&value);
            if let Some(headers) = &headers {
                record = record.headers(headers.clone());
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push_back((index, event.event_id.clone(), delivery));
                    break;
                }
                // librdkafka's queue is full: wait for the oldest acknowledgement, then retry.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => match in_flight.pop_front() {
                    Some(oldest) => delivered.push(acknowledged(oldest).await?),
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                Err((error, _)) => return Err(Failure { index, error }),
            }
        }
        if in_flight.len() >= IN_FLIGHT {
            if let Some(oldest) = in_flight.pop_front() {
                delivered.push(acknowledged(oldest).await?);
            }
        }
    }
    while let Some(oldest) = in_flight.pop_front() {
        delivered.push(acknowledged(oldest).await?);
    }
    Ok(delivered)
}

async fn acknowledged(
    (index, event_id, delivery): (usize, String, DeliveryFuture),
) -> Result<(String, i32, i64), Failure> {
    match delivery.await {
        Ok(Ok(delivery)) => Ok((event_id, delivery.partition, delivery.offset)),
        Ok(Err((error, _))) => Err(Failure { index, error }),
        Err(_) => Err(Failure { index, error: KafkaError::Canceled }),
    }
}
