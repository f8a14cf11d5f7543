//! A room's way through the open transaction: brought in from the cache
//! or the store when first touched, and its changes sent to the broadcast
//! topic and kept for Redis, whether an event or a timer caused them.

use prost::Message as _;
use rdkafka::message::{BorrowedMessage, Message};

use super::{cache_weight, DirtyRoom, RoomMap};
use crate::modules::{Change, InputHeaders, LiveRoom, RejectKind, Rejection, LEASE_HEADER, TYPE_HEADER};
use crate::proto::omni::StateChange;
use crate::proto::{now, Timestamp};
use crate::runtime::output::{record, send, JobProducer, Source};
use crate::runtime::RuntimeError;
use crate::store::{StateStore, StoreError};
use crate::view::ChangeEntry;

/// The omni headers of an input record; Tecate records have none, and cost one check.
pub(super) fn input_headers<'m>(message: &'m BorrowedMessage<'_>) -> InputHeaders<'m> {
    use rdkafka::message::Headers;
    let mut found = InputHeaders::default();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            match header.key {
                TYPE_HEADER => found.kind = header.value,
                LEASE_HEADER => found.lease = header.value,
                _ => {}
            }
        }
    }
    found
}

/// A room of the open transaction, brought in from the cache or the store
/// when first touched; the inner error is a state that does not decode.
pub(super) fn dirty_room<'t>(
    (dirty, recent): (&'t mut RoomMap<DirtyRoom>, &mut RoomMap<LiveRoom>),
    store: &dyn StateStore,
    room_cache_bytes: &mut usize,
    path: &str,
    source: Source,
) -> Result<Result<&'t mut DirtyRoom, Rejection>, RuntimeError> {
    if !dirty.contains_key(path) {
        let room = match recent.remove(path) {
            Some(room) => {
                *room_cache_bytes = room_cache_bytes.saturating_sub(cache_weight(path, room.state().encoded_len()));
                room
            }
            None => match store.get(source.partition, path) {
                Ok(state) => LiveRoom::new(state.unwrap_or_default()),
                Err(e @ StoreError::Corrupt(..)) => {
                    return Ok(Err(Rejection::new(RejectKind::CorruptState, e.to_string())));
                }
                Err(e) => return Err(e.into()),
            },
        };
        let had_timers = !room.state().timers.is_empty();
        let room = DirtyRoom {
            room,
            changed: false,
            timers_changed: false,
            had_timers,
            encoded: Vec::new(),
            changes: Vec::new(),
            last_source: source,
        };
        dirty.insert(path.to_owned(), room);
    }
    Ok(Ok(dirty.get_mut(path).expect("inserted above")))
}

/// What caused a change: an event, or a timer falling due.
pub(super) struct Cause<'a> {
    pub event_id: &'a str,
    pub occurred_at: Option<Timestamp>,
}

/// Sends a room's changes to the broadcast topic in the open transaction,
/// and keeps them for Redis.
pub(super) fn emit(
    producer: &JobProducer,
    broadcast_topic: &str,
    path: &str,
    room: &mut DirtyRoom,
    changes: Vec<Change>,
    cause: Cause<'_>,
    source: Source,
) -> Result<(), RuntimeError> {
    room.changed = true;
    room.last_source = source;
    let processed_at = now();
    for change in changes {
        let broadcast = StateChange {
            path: path.to_owned(),
            version: change.version,
            module: change.module.to_owned(),
            state_json: change.state_json,
            cause_event_id: cause.event_id.to_owned(),
            occurred_at: cause.occurred_at,
            processed_at: Some(processed_at),
        };
        let payload = broadcast.encode_to_vec();
        send(producer, record(broadcast_topic, source).key(path.as_bytes()).payload(&payload[..]))?;
        room.changes.push(ChangeEntry {
            version: broadcast.version,
            module: change.module,
            state_json: broadcast.state_json,
            cause_event_id: broadcast.cause_event_id,
            occurred_at: broadcast.occurred_at,
            processed_at: broadcast.processed_at,
        });
    }
    Ok(())
}
