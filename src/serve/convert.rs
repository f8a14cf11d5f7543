//! Between omni's room state (as Redis and the follower hold it) and the
//! Omni service's messages, and from errors to gRPC statuses.

use std::time::Duration;

use prost_types::Timestamp;
use tonic::Status;

use crate::proto::omni::{self as pb, watch_event};
use crate::pubsub::{broadcast_change, FollowEvent, FollowedChange, PubSubError};
use crate::view::{ChangeRecord, RoomSnapshot, RoomSnapshotText, ViewError};

/// A timestamp from RFC 3339 text; absent when the text is empty or malformed.
pub fn timestamp(text: &str) -> Option<Timestamp> {
    let at = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some(Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 })
}

pub fn snapshot_message(snapshot: RoomSnapshot) -> pb::RoomSnapshot {
    pb::RoomSnapshot {
        updated_at: timestamp(&snapshot.updated_at),
        path: snapshot.path,
        version: snapshot.version,
        modules: snapshot.modules.into_iter().map(|(name, state)| (name, state.to_string())).collect(),
    }
}

/// A snapshot read as text: its strings move into the message, no state is parsed or printed.
pub fn snapshot_text_message(snapshot: RoomSnapshotText) -> pb::RoomSnapshot {
    pb::RoomSnapshot {
        updated_at: timestamp(&snapshot.updated_at),
        path: snapshot.path,
        version: snapshot.version,
        modules: snapshot.modules,
    }
}

pub fn change_message(change: ChangeRecord) -> pb::StateChange {
    pb::StateChange {
        occurred_at: timestamp(&change.occurred_at),
        processed_at: timestamp(&change.processed_at),
        state_json: change.state.to_string(),
        path: change.path,
        version: change.version,
        module: change.module,
        cause_event_id: change.cause_event_id,
    }
}

/// A broadcast change as the service passes it on: the message as the job
/// sent it (its path filled in from the record's key when absent), its state
/// JSON text checked but not parsed, so a watcher's event needs no conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct WireChange(pub pb::StateChange);

impl WireChange {
    /// The change of a broadcast record, as [`broadcast_change`] reads it
    /// (its key is its path). Fails on a record that is not a `StateChange`
    /// with a JSON state, or whose path is another room's.
    pub fn decode(payload: &[u8], key: &str) -> Result<WireChange, String> {
        let mut change = broadcast_change(payload, key)?;
        // As the change stream in Redis writes them (see `change_record`): a
        // cleared module is `{}`, and a missing time is the epoch.
        if change.state_json.is_empty() {
            change.state_json.push_str("{}");
        } else {
            serde_json::from_str::<serde::de::IgnoredAny>(&change.state_json)
                .map_err(|e| format!("state_json is not JSON: {e}"))?;
        }
        change.occurred_at.get_or_insert_with(Timestamp::default);
        change.processed_at.get_or_insert_with(Timestamp::default);
        Ok(WireChange(change))
    }
}

impl FollowedChange for WireChange {
    fn path(&self) -> &str {
        &self.0.path
    }

    fn version(&self) -> u64 {
        self.0.version
    }

    fn module(&self) -> &str {
        &self.0.module
    }

    fn processed_at(&self) -> String {
        crate::proto::rfc3339(self.0.processed_at.as_ref())
    }

    fn from_record(record: ChangeRecord) -> Self {
        WireChange(change_message(record))
    }
}

pub fn watch_event(event: FollowEvent<WireChange>) -> pb::WatchEvent {
    let event = match event {
        FollowEvent::Snapshot(s) => watch_event::Event::Snapshot(snapshot_message(s)),
        FollowEvent::Change(c) => watch_event::Event::Change(c.0),
        FollowEvent::Resynchronised(s) => watch_event::Event::Resynchronised(snapshot_message(s)),
    };
    pb::WatchEvent { event: Some(event) }
}

/// `UNAVAILABLE` for a Redis that failed or did not answer in time; the
/// client may retry.
pub fn redis_status(error: &ViewError) -> Status {
    match error {
        ViewError::Redis(e) => Status::unavailable(format!("redis: {e}")),
        ViewError::Malformed { .. } => Status::internal(error.to_string()),
    }
}

pub fn redis_timeout(waited: Duration) -> Status {
    Status::unavailable(format!("redis did not answer within {} ms", waited.as_millis()))
}

/// A publish's failure: the broker did not acknowledge in time, or refused.
pub fn publish_status(error: &PubSubError) -> Status {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    match error {
        PubSubError::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)) => {
            Status::deadline_exceeded(format!("kafka did not acknowledge the record in time: {error}"))
        }
        PubSubError::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize,
        )) => Status::invalid_argument(format!("kafka refused the record as too large: {error}")),
        PubSubError::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
        )) => Status::failed_precondition(format!("the topic does not exist: {error}")),
        PubSubError::InvalidTopic(_) | PubSubError::InvalidLease(_) => Status::invalid_argument(error.to_string()),
        _ => Status::unavailable(format!("publishing failed: {error}")),
    }
}

/// The deadline a client set with `grpc-timeout`, if any.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = text.split_at(text.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_change_whose_path_is_not_its_key_is_refused() {
        use prost::Message as _;
        let change = |path: &str| {
            pb::StateChange { path: path.into(), version: 1, state_json: "{}".into(), ..Default::default() }
                .encode_to_vec()
        };
        let refused = WireChange::decode(&change("app/a/room/y"), "app/a/room/x").unwrap_err();
        assert!(refused.contains("differs from key"), "{refused}");
        assert_eq!(WireChange::decode(&change("app/a/room/x"), "app/a/room/x").unwrap().0.path, "app/a/room/x");
        assert_eq!(WireChange::decode(&change(""), "app/a/room/x").unwrap().0.path, "app/a/room/x");
    }

    #[test]
    fn timestamps_round_trip_through_rfc3339() {
        let ts = timestamp("2026-11-27T10:00:00.250Z").unwrap();
        assert_eq!(crate::proto::rfc3339(Some(&ts)), "2026-11-27T10:00:00.250Z");
        assert_eq!(timestamp(""), None);
    }

    #[test]
    fn a_wire_change_is_what_the_change_record_would_have_made() {
        use prost::Message as _;
        let stamp = |millis| Some(crate::proto::timestamp_from_millis(millis));
        let sent = pb::StateChange {
            path: "app/a/room/r".into(),
            version: 4,
            module: "tags".into(),
            state_json: r#"{"k":"v","n":[1,2]}"#.into(),
            cause_event_id: "e4".into(),
            occurred_at: stamp(1_704_067_200_123),
            processed_at: stamp(1_704_067_200_456),
        };
        for message in [
            sent.clone(),
            pb::StateChange { path: String::new(), ..sent.clone() },
            pb::StateChange { state_json: String::new(), occurred_at: None, processed_at: None, ..sent.clone() },
        ] {
            let wire = WireChange::decode(&message.encode_to_vec(), "app/a/room/r").unwrap();
            let record =
                crate::pubsub::change_record(pb::StateChange { path: "app/a/room/r".into(), ..message }).unwrap();
            assert_eq!(wire.0, change_message(record.clone()));
            assert_eq!(WireChange::from_record(record.clone()), wire);
            assert_eq!(wire.processed_at(), record.processed_at);
        }
        let not_json = pb::StateChange { state_json: "{oops".into(), ..sent };
        assert!(WireChange::decode(&not_json.encode_to_vec(), "app/a/room/r").unwrap_err().contains("not JSON"));
        assert!(WireChange::decode(&[0xff, 0xff], "app/a/room/r").is_err());
    }

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&metadata), None);
        for (text, expected) in
            [("5S", Duration::from_secs(5)), ("250m", Duration::from_millis(250)), ("2M", Duration::from_secs(120))]
        {
            metadata.insert("grpc-timeout", text.parse().unwrap());
            assert_eq!(grpc_timeout(&metadata), Some(expected));
        }
        metadata.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&metadata), None);
    }
}
