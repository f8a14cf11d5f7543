//! `omni publish`: Tecate room events from the command line or a JSON-lines file.

use std::path::PathBuf;

use anyhow::Context;
use omni::kafka::{ensure_topics, KafkaSettings, TopicSpec};
use omni::modules::LEASE_HEADER;
use omni::path::Path;
use omni::proto::tecate::{
    room_event::Kind, RecordingStarted, RecordingStopped, RoomClosed, RoomEvent, TagRemoved, TagSet,
};
use omni::proto::{now, timestamp_from_millis, Message};
use omni::pubsub::Publisher;
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Room path, e.g. app/a1/room/r1 (omit with --file).
    #[arg(required_unless_present = "file")]
    pub path: Option<String>,
    #[command(subcommand)]
    pub event: Option<EventArg>,
    /// Newline-delimited JSON events: {"path":..., "type":"tag_set", "key":..., "value":...}.
    #[arg(long, conflicts_with = "path")]
    pub file: Option<PathBuf>,
    /// Topic; defaults to the topology's input topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Topology whose input topic (and partition count) to use.
    #[arg(long, default_value = "topologies/room-state.toml")]
    pub topology: PathBuf,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum EventArg {
    /// A recording started.
    RecordingStart {
        #[arg(long)]
        recording_id: String,
        #[arg(long)]
        by: String,
        /// Take a lease with this heartbeat TTL (e.g. 10s): unless kept alive
        /// (`omni keepalive`), the recording stops by itself. Prints the lease id last.
        #[arg(long, value_parser = super::keepalive::parse_duration)]
        lease_ttl: Option<std::time::Duration>,
    },
    /// A recording stopped.
    RecordingStop {
        #[arg(long, default_value = "")]
        recording_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// A tag was set.
    TagSet { key: String, value: String },
    /// A tag was removed.
    TagRemove { key: String },
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

/// A fresh lease for an event with `--lease-ttl`: its id, and its `omni.lease` header value.
fn new_lease(event: &Option<EventArg>) -> Option<(String, Vec<u8>)> {
    let Some(EventArg::RecordingStart { lease_ttl: Some(ttl), .. }) = event else { return None };
    let lease_id = uuid::Uuid::new_v4().to_string();
    let lease = omni::proto::omni::Lease { lease_id: lease_id.clone(), ttl_ms: ttl.as_millis() as i64 };
    Some((lease_id, lease.encode_to_vec()))
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

pub async fn run(args: PublishArgs, kafka: KafkaSettings) -> anyhow::Result<()> {
    let (topic, partitions) = match omni::topology::Topology::load(&args.topology) {
        Ok(t) => (args.topic.clone().unwrap_or_else(|| t.input_topic().to_owned()), t.partitions),
        Err(_) if args.topic.is_some() => (args.topic.clone().unwrap_or_default(), 8),
        Err(e) => return Err(e).context("no --topic given, and the topology to take it from did not load"),
    };
    // A topic created here gets the job's partition count, not the broker's default.
    ensure_topics(&kafka, &[TopicSpec { name: topic.clone(), partitions, configs: vec![] }]).await?;
    let publisher = Publisher::new(&kafka, topic.clone())?;
    let lease = new_lease(&args.event);
    let events: Vec<(Path, RoomEvent)> = match (&args.file, args.path, args.event) {
        (Some(file), _, _) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(i, line)| {
                    let parsed: JsonEvent = serde_json::from_str(line).with_context(|| format!("line {}", i + 1))?;
                    parsed.into_event().with_context(|| format!("line {}", i + 1))
                })
                .collect::<anyhow::Result<_>>()?
        }
        (None, Some(path), Some(event)) => vec![(Path::parse_room(&path)?, new_event(event.kind()))],
        (None, _, None) => {
            anyhow::bail!("name an event: recording-start, recording-stop, tag-set, tag-remove or room-close")
        }
        (None, None, Some(_)) => anyhow::bail!("name a room path"),
    };
    let count = events.len();
    for (path, event) in events {
        let headers: Vec<(&str, &[u8])> = lease.iter().map(|(_, bytes)| (LEASE_HEADER, &bytes[..])).collect();
        let (partition, offset) =
            publisher.publish_with_headers(&topic, &path, &event.encode_to_vec(), &headers).await?;
        if count == 1 {
            println!("published {} to {topic} partition {partition} offset {offset}", event.event_id);
        }
    }
    if let Some((lease_id, _)) = lease {
        println!("{lease_id}");
    }
    if count != 1 {
        println!("published {count} events to {topic}");
    }
    Ok(())
}
