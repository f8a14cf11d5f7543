//! The unary calls: `Publish`, `GetSnapshot`, `GetDeltas`, `KeepAlive`.

use prost::Message as _;
use tonic::Status;

use super::convert::{change_message, publish_status, snapshot_text_message};
use super::state::Shared;
use crate::path::Path;
use crate::proto::omni::{self as pb, publish_request::Body};
use crate::proto::tecate::{room_event::Kind, RoomEvent};
use crate::pubsub::{NewLease, PubSubError};
use crate::view::{self, ChangeRecord};

/// Most lease ids one `KeepAlive` names.
pub const MAX_KEEPALIVE_LEASES: usize = 1000;

/// Most changes one `GetDeltas` returns.
pub const MAX_DELTAS: usize = 1000;

fn invalid_path(text: &str, error: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("path {text:?}: {error}"))
}

/// A room path's canonical text; `INVALID_ARGUMENT` naming the problem.
pub fn room_path(text: &str) -> Result<String, Status> {
    Path::parse_room(text).map(|p| p.to_string()).map_err(|e| invalid_path(text, e))
}

/// The lease a `recording_started` event with `lease_ttl_ms` takes;
/// `INVALID_ARGUMENT` for any other use, or a TTL the job would refuse.
fn new_lease(request: &pb::PublishRequest) -> Result<Option<NewLease>, Status> {
    if request.lease_ttl_ms == 0 {
        return Ok(None);
    }
    let Some(Body::Event(RoomEvent { kind: Some(Kind::RecordingStarted(_)), .. })) = &request.body else {
        return Err(Status::invalid_argument("`lease_ttl_ms` goes only with a `recording_started` event"));
    };
    let lease = NewLease::fresh(request.lease_ttl_ms);
    lease.map(Some).map_err(|error| Status::invalid_argument(format!("lease_ttl_ms: {error}")))
}

/// Waits for Kafka to take a record, within the service's bound.
async fn acknowledged(
    shared: &Shared,
    sent: impl std::future::Future<Output = Result<(i32, i64), PubSubError>>,
) -> Result<(i32, i64), Status> {
    // librdkafka's message.timeout.ms ends a send first; this only guards against a stuck client.
    let bound = std::time::Duration::from_millis(shared.topology.service.publish_timeout_ms + 5_000);
    match tokio::time::timeout(bound, sent).await {
        Ok(Ok(placed)) => Ok(placed),
        Ok(Err(error)) => Err(publish_status(&error)),
        Err(_) => Err(Status::deadline_exceeded("kafka did not acknowledge the record in time")),
    }
}

pub async fn publish(shared: &Shared, request: pb::PublishRequest) -> Result<pb::PublishResponse, Status> {
    let service = &shared.topology.service;
    let lease = new_lease(&request)?;
    let (topic, path, payload, content_type) = match request.body {
        None => return Err(Status::invalid_argument("a publish needs an `event` or a `payload`")),
        Some(Body::Event(mut event)) => {
            if !request.topic.is_empty() && request.topic != shared.topology.input_topic() {
                return Err(Status::invalid_argument("an `event` goes to the job's input topic: leave `topic` empty"));
            }
            if event.kind.is_none() {
                return Err(Status::invalid_argument("the event has no kind (recording_started, tag_set, …)"));
            }
            let path = Path::parse_room(&request.path).map_err(|e| invalid_path(&request.path, e))?;
            // Defaults a producer would otherwise have to invent.
            if event.event_id.is_empty() {
                event.event_id = uuid::Uuid::new_v4().to_string();
            }
            if event.occurred_at.is_none() {
                event.occurred_at = Some(crate::proto::now());
            }
            let payload = event.encode_to_vec();
            let key_bytes = path.to_string().len();
            let limit = shared.topology.limits.max_record_bytes;
            if key_bytes + payload.len() > limit {
                return Err(Status::invalid_argument(format!(
                    "the event's record would be {} bytes, over the job's limits.max_record_bytes of {limit}",
                    key_bytes + payload.len()
                )));
            }
            (shared.topology.input_topic().to_owned(), path, payload, None)
        }
        Some(Body::Payload(payload)) => {
            if !service.pubsub_topics.contains(&request.topic) {
                return Err(Status::permission_denied(format!(
                    "topic {:?} is not one of the service's pubsub_topics",
                    request.topic
                )));
            }
            let path: Path = request.path.parse().map_err(|e| invalid_path(&request.path, e))?;
            if payload.len() > service.max_message_bytes {
                return Err(Status::invalid_argument(format!(
                    "the payload is {} bytes, over the service's max_message_bytes of {}",
                    payload.len(),
                    service.max_message_bytes
                )));
            }
            let content_type = Some(request.content_type).filter(|c| !c.is_empty());
            (request.topic, path, payload, content_type)
        }
    };
    let (partition, offset) = match &lease {
        Some(lease) => acknowledged(shared, shared.publisher.publish_leased(&topic, &path, &payload, lease)).await?,
        None => {
            acknowledged(shared, shared.publisher.publish_to(&topic, &path, &payload, content_type.as_deref())).await?
        }
    };
    let lease_id = lease.map(|lease| lease.id).unwrap_or_default();
    Ok(pb::PublishResponse { topic, partition, offset, lease_id })
}

pub async fn keep_alive(shared: &Shared, request: pb::KeepAliveRequest) -> Result<pb::KeepAliveResponse, Status> {
    let path = Path::parse_room(&request.path).map_err(|e| invalid_path(&request.path, e))?;
    if request.lease_ids.is_empty() || request.lease_ids.len() > MAX_KEEPALIVE_LEASES {
        return Err(Status::invalid_argument(format!(
            "a keep-alive names 1 to {MAX_KEEPALIVE_LEASES} lease ids, not {}",
            request.lease_ids.len()
        )));
    }
    let topic = shared.topology.input_topic();
    let (partition, offset) =
        acknowledged(shared, shared.publisher.keep_alive(topic, &path, &request.lease_ids)).await?;
    Ok(pb::KeepAliveResponse { partition, offset })
}

/// One `HGETALL` on the shared multiplexed connection; module states go
/// into the reply as the text Redis holds.
pub async fn get_snapshot(
    shared: &Shared,
    deadline: std::time::Duration,
    request: pb::GetSnapshotRequest,
) -> Result<pb::RoomSnapshot, Status> {
    let path = room_path(&request.path)?;
    let (keys, read_path) = (&shared.keys, path.as_str());
    let snapshot = shared
        .with_redis(deadline, |mut conn| async move { view::snapshot_text(&mut conn, keys, read_path).await })
        .await?;
    match snapshot {
        Some(snapshot) => Ok(snapshot_text_message(snapshot)),
        None => Err(Status::not_found(format!("room {path} is not known (never written, or closed)"))),
    }
}

/// What Redis holds for a `GetDeltas`.
struct Held {
    /// The changes after the asked version.
    after: Vec<ChangeRecord>,
    /// Every change the stream holds, read only when the first is not the next version.
    all: Option<Vec<ChangeRecord>>,
    /// The hash's version, read only when nothing newer was found.
    hash_version: Option<u64>,
}

pub async fn get_deltas(
    shared: &Shared,
    deadline: std::time::Duration,
    request: pb::GetDeltasRequest,
) -> Result<pb::GetDeltasResponse, Status> {
    let path = room_path(&request.path)?;
    let after_version = request.after_version;
    let limit = match request.limit as usize {
        0 => MAX_DELTAS,
        n => n.min(MAX_DELTAS),
    };
    let keys = shared.keys.clone();
    let read_path = path.clone();
    let held = shared
        .with_redis(deadline, |mut conn| async move {
            let after = view::changes_after(&mut conn, &keys, &read_path, after_version).await?;
            if after.first().is_some_and(|c| c.version == after_version + 1) {
                return Ok(Held { after, all: None, hash_version: None });
            }
            let all = view::changes_after(&mut conn, &keys, &read_path, 0).await?;
            let hash_version = if after.is_empty() {
                view::snapshot(&mut conn, &keys, &read_path).await?.map(|s| s.version)
            } else {
                None
            };
            Ok(Held { after, all: Some(all), hash_version })
        })
        .await?;
    let Held { after, all, hash_version } = held;
    let all = all.unwrap_or_default();
    let trimmed = |oldest: Option<u64>| {
        let held = match oldest {
            Some(oldest) => format!("the oldest version it holds is {oldest}"),
            None => "it holds none".to_owned(),
        };
        Status::out_of_range(format!(
            "the change stream of {path} no longer holds version {}: {held}; read the snapshot and continue from its version",
            after_version + 1
        ))
    };
    if let Some(first) = after.first() {
        if first.version != after_version + 1 {
            return Err(trimmed(all.first().map(|c| c.version)));
        }
        let contiguous =
            after.iter().enumerate().take_while(|(i, c)| c.version == after_version + 1 + *i as u64).count();
        let taken = contiguous.min(limit);
        let more = taken < after.len();
        return Ok(pb::GetDeltasResponse {
            changes: after.into_iter().take(taken).map(change_message).collect(),
            more,
        });
    }
    // Nothing newer: up to date, trimmed past the version, or unknown.
    let current = hash_version.or(all.last().map(|c| c.version));
    match current {
        None => Err(Status::not_found(format!("room {path} is not known (no state and no change stream)"))),
        Some(current) if current > after_version => Err(trimmed(all.first().map(|c| c.version))),
        Some(_) => Ok(pb::GetDeltasResponse { changes: Vec::new(), more: false }),
    }
}
