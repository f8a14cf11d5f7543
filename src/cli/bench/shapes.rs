//! The memory phases' inputs: shapes of state that press on omni's memory
//! bounds (many rooms, one hot room, wide rooms, rooms that close), made
//! deterministically and folded alongside by the same pure folds the job
//! runs, so the bench knows every room's final version.

use std::time::{Duration, Instant};

use omni::proto::tecate::{room_event::Kind, RoomClosed, RoomEvent, TagSet};
use omni::proto::{timestamp_from_millis, Message as _};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::Producer;

use super::workload::{fast_producer, folder, send, Expected};

/// A room path and the event that goes to it.
pub type Event = (String, Kind);

/// Events of a shape, in the order they are produced.
pub type Events = Box<dyn Iterator<Item = Event> + Send>;

fn tag(key: String, value: String) -> Kind {
    Kind::TagSet(TagSet { key, value })
}

/// One small event in each of `rooms` distinct rooms.
pub fn distinct_rooms(rooms: u64) -> Events {
    Box::new((0..rooms).map(|r| (format!("app/bench/room/m{r}"), tag("topic".into(), format!("v{r}")))))
}

/// `events` events, every other one to one hot room, which keeps updating
/// four small tags; the rest spread at random over `rooms` other rooms, each
/// holding at most eight small tags.
pub fn hot_room(events: u64, rooms: u64, seed: u64) -> Events {
    let mut rng = StdRng::seed_from_u64(seed);
    Box::new((0..events).map(move |i| {
        if i % 2 == 0 {
            ("app/bench/room/hot".to_owned(), tag(format!("k{}", i / 2 % 4), i.to_string()))
        } else {
            let room = rng.random_range(0..rooms.max(1));
            (format!("app/bench/room/r{room}"), tag(format!("k{}", rng.random_range(0..8)), i.to_string()))
        }
    }))
}

/// `rooms` rooms that each end with `tags` tags of `value_bytes`-byte random
/// values. Tags go round the rooms (every room's first tag, then every
/// room's second, ...), so every room grows at once and the whole state is
/// in play until the end.
pub fn wide_rooms(rooms: u64, tags: u64, value_bytes: usize, seed: u64) -> Events {
    let mut rng = StdRng::seed_from_u64(seed);
    Box::new((0..tags).flat_map(move |t| (0..rooms).map(move |r| (t, r))).map(move |(t, r)| {
        let value: String = (0..value_bytes).map(|_| char::from(rng.sample(rand::distr::Alphanumeric))).collect();
        (format!("app/bench/room/w{r}"), tag(format!("tag{t:02}"), value))
    }))
}

/// The room paths of the closed-rooms phase.
pub fn closing_room(r: u64) -> String {
    format!("app/bench/room/c{r}")
}

/// `tags` small tags in each of `rooms` rooms, room after room.
pub fn rooms_to_close(rooms: u64, tags: u64) -> Events {
    Box::new(
        (0..rooms)
            .flat_map(move |r| (0..tags).map(move |t| (closing_room(r), tag(format!("k{t}"), format!("v{r}-{t}"))))),
    )
}

/// A `room_closed` for each of the rooms of [`rooms_to_close`].
pub fn closes(rooms: u64) -> Events {
    Box::new((0..rooms).map(|r| (closing_room(r), Kind::RoomClosed(RoomClosed {}))))
}

/// Produces the events to `topic`, folding each into `expected`; returns
/// how many were produced and at what rate.
pub fn preload(brokers: &str, topic: &str, expected: &mut Expected, events: Events) -> anyhow::Result<(u64, f64)> {
    let producer = fast_producer(brokers, 20)?;
    let folder = folder();
    let started = Instant::now();
    let base_ms = chrono::Utc::now().timestamp_millis();
    let mut count = 0u64;
    for (room, kind) in events {
        let event = RoomEvent {
            event_id: format!("m{count}"),
            occurred_at: Some(timestamp_from_millis(base_ms + count as i64 / 1000)),
            kind: Some(kind),
        };
        expected.apply(&folder, &room, &event);
        send(&producer, topic, &room, &event.encode_to_vec())?;
        count += 1;
        if count.is_multiple_of(10_000) {
            omni::kafka::serve_ready(&producer);
        }
    }
    producer.flush(Duration::from_secs(300))?;
    Ok((count, count as f64 / started.elapsed().as_secs_f64().max(1e-3)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_of_the_traffic_goes_to_the_hot_room() {
        let events: Vec<Event> = hot_room(10_000, 100, 1).collect();
        let hot = events.iter().filter(|(room, _)| room == "app/bench/room/hot").count();
        assert_eq!(hot, 5_000);
    }

    #[test]
    fn wide_rooms_end_with_every_tag_at_full_size() {
        let mut expected = Expected::default();
        let folder = folder();
        for (i, (room, kind)) in wide_rooms(3, 4, 200, 1).enumerate() {
            let event = RoomEvent { event_id: format!("e{i}"), occurred_at: None, kind: Some(kind) };
            expected.apply(&folder, &room, &event);
        }
        assert_eq!(expected.rooms.len(), 3);
        for state in expected.rooms.values() {
            assert_eq!(state.version, 4);
            assert!(state.modules["tags"].len() > 4 * 200, "{}", state.modules["tags"].len());
        }
    }

    #[test]
    fn every_room_to_close_is_closed() {
        let mut expected = Expected::default();
        let folder = folder();
        for (i, (room, kind)) in rooms_to_close(5, 3).chain(closes(5)).enumerate() {
            let event = RoomEvent { event_id: format!("e{i}"), occurred_at: None, kind: Some(kind) };
            expected.apply(&folder, &room, &event);
        }
        assert!(expected.rooms.values().all(|s| s.closed && s.version == 4));
    }
}
